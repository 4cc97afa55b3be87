r"""The studies' base run (experiments/ablations/sweep.py): the `ablation` preset (1/4 of
small's width, 4 layers, 16 experts) on the embedded corpus, 300 steps of 8 x 128 tokens with a
held-out evaluation every 50 steps; about a minute per run on a 2-core CPU.

    python experiments/train.py --config=experiments/configs/ablation.py --workdir=/tmp/ds-abl

Variant `full`: the same study at the scale the papers' settings are meant for, for an
accelerator: the `small` preset, 32 x 1024 tokens, 5,000 steps, V3's bias rate gamma = 0.001
(the toy scale needs 0.01 to balance within a few hundred steps; see small.py).
"""

from deepseek_jax.train.config import default_config


def get_config(arg=None):
  c = default_config()
  c.model.preset = "ablation"
  c.train.steps = 300
  c.train.batch_size = 8
  c.train.seq_len = 128
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.eval_batches = 4
  c.train.router_bias_rate = ((0, 0.01),)
  c.checkpoint.every = 100
  c.checkpoint.keep = 1
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 20
  c.metrics.tensorboard = False
  c.sample.prompts = ("Mia lives in",)
  c.sample.max_new_tokens = 16
  variants = set(arg.split(",")) if arg else set()
  unknown = variants - {"full"}
  if unknown:
    raise ValueError(f"ablation.py: unknown variant(s) {sorted(unknown)}; known: full")
  if "full" in variants:
    c.model.preset = "small"
    c.train.steps = 5000
    c.train.batch_size = 32
    c.train.seq_len = 1024
    c.train.eval_every = 250
    c.train.eval_batches = 16
    c.train.router_bias_rate = ((0, 0.001),)
    c.checkpoint.every = 500
    c.optimizer.warmup_steps = 200
  return c
