r"""R1-Zero on the embedded arithmetic task: GRPO from rule rewards alone, starting from the
`small` model that the README's first command pretrains (no SFT).

    python experiments/train.py --config=experiments/configs/small.py --workdir=/tmp/ds-small
    python experiments/rl.py --config=experiments/configs/r1_zero.py --workdir=/tmp/ds-r1zero

The prompts are every "a op b =" with single-digit operands (+, -, *), 20% held out; the
reward is accuracy of the completion's first line; the metric is greedy held-out accuracy.
Variants (comma-separated): `ppo` (the PPO baseline with a value model), `dapo` (token-mean
loss, clip-higher 0.28, dynamic sampling, no KL), `drgrpo` (Dr. GRPO: mean-only advantages,
constant-length aggregation), `runlocal` (a few steps, for a quick look), `study` (the GRPO vs
PPO study of experiments/ablations/sweep.py: 150 steps, every step logged, the update's memory
recorded), `full` (R1-Zero's own scale, 32 prompts x 16 samples, 1,000 steps; for an
accelerator).
"""

from deepseek_jax.rl.config import default_config


def get_config(arg=None):
  c = default_config()
  c.model.preset = "small"
  c.init_from = "/tmp/ds-small"  # the README's first command trains it
  # ~2 s per step on 2 CPU cores: 400 steps in about 14 minutes.
  c.train.steps = 400
  c.train.seq_len = 16  # the longest prompt (bos + "9 * 9 =", 8 tokens) + 6 new tokens fit
  c.checkpoint.every = 50
  c.optimizer.learning_rate = 1e-4
  c.rl.prompts_per_step = 16
  c.rl.group_size = 16
  c.rl.max_new_tokens = 6
  c.rl.beta = 0.001
  c.rl.eval_every = 25
  # experiments/sample.py --config=experiments/configs/r1_zero.py --workdir=<RL workdir>
  c.sample.prompts = ("3 + 4 =", "7 * 8 =", "9 - 2 =", "0 * 6 =")
  c.sample.max_new_tokens = 6
  variants = set(arg.split(",")) if arg else set()
  unknown = variants - {"ppo", "dapo", "drgrpo", "runlocal", "study", "full"}
  if unknown:
    raise ValueError(f"r1_zero.py: unknown variant(s) {sorted(unknown)}; known: ppo, dapo, "
                     "drgrpo, runlocal, study, full")
  if "ppo" in variants:
    c.rl.algorithm = "ppo"
  if "dapo" in variants:
    c.rl.loss_aggregation = "token_mean"
    c.rl.epsilon_high = 0.28
    c.rl.dynamic_sampling_rounds = 2
    c.rl.beta = 0.0
  if "drgrpo" in variants:
    c.rl.advantage = "drgrpo"
    c.rl.loss_aggregation = "constant_length"
  if "study" in variants:
    c.train.steps = 150
    c.train.log_every = 1
    c.checkpoint.every = 50
    c.rl.record_memory = True
  if "full" in variants:
    c.train.steps = 1000
    c.rl.prompts_per_step = 32
    c.checkpoint.every = 100
  if "runlocal" in variants:
    c.train.steps = 6
    c.checkpoint.every = 3
    c.rl.eval_every = 3
    c.rl.eval_prompts = 16
  return c
