r"""The DeepSeek-R1 pipeline at toy scale on the embedded task family, from the `small` model
that the README's first command pretrains (deepseek_jax/rl/pipeline.py describes the stages).

    python experiments/train.py --config=experiments/configs/small.py --workdir=/tmp/ds-small
    python experiments/r1_pipeline.py --config=experiments/configs/r1_toy.py \
        --workdir=/tmp/ds-r1-pipeline

Two seeds, five stages each (cold-start SFT, reasoning RL, rejection-sampling SFT, RL for all
scenarios, and R1-Zero for comparison). Variants: `runlocal` (one seed, a few steps per stage,
rejection sampling requiring nothing: a quick look at the machinery, not a result).
"""

from deepseek_jax.rl.pipeline import default_config


def get_config(arg=None):
  c = default_config()
  c.model.preset = "small"
  c.init_from = "/tmp/ds-small"  # the README's first command trains it
  c.optimizer.learning_rate = 1e-4
  c.rl.prompts_per_step = 8
  c.rl.group_size = 8
  c.rl.beta = 0.001
  c.rl.eval_every = 10
  c.checkpoint.every = 10
  variants = set(arg.split(",")) if arg else set()
  unknown = variants - {"runlocal"}
  if unknown:
    raise ValueError(f"r1_toy.py: unknown variant(s) {sorted(unknown)}; known: runlocal")
  if "runlocal" in variants:  # ~10 minutes; its 10-step SFT writes little that is correct,
    p = c.pipeline            # so rejection sampling keeps every distinct sample
    p.seeds = "0"
    p.rejection_require = ""
    p.sft_steps = 10
    p.reasoning_rl_steps = p.all_rl_steps = p.r1_zero_steps = 3
    c.rl.eval_every = 3
    c.rl.eval_prompts = 8
  return c
