r"""The default run: the `small` preset (18M total / 4.6M activated) on the embedded corpus.

    python experiments/train.py --config=experiments/configs/small.py --workdir=/tmp/ds-small

Variants: `small.py:runlocal` (a short run for a quick look).
"""

from deepseek_jax.train.config import default_config


def get_config(arg=None):
  c = default_config()
  c.model.preset = "small"
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.seq_len = 256
  c.train.log_every = 20
  c.checkpoint.every = 100
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 50
  if arg == "runlocal":
    c.train.steps = 60
    c.train.log_every = 10
    c.checkpoint.every = 30
    c.optimizer.warmup_steps = 10
  elif arg:
    raise ValueError(f"small.py: unknown variant {arg!r}; known: runlocal")
  return c
