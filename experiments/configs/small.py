r"""The default run: the `small` preset (18M total / 4.6M activated) on the embedded corpus.

    python experiments/train.py --config=experiments/configs/small.py --workdir=/tmp/ds-small

Variants: `small.py:runlocal` (a short run for a quick look).
"""

from deepseek_jax.train.config import default_config


def get_config(arg=None):
  c = default_config()
  c.model.preset = "small"
  # ~1.9 s/step on a 2-core CPU: 200 steps of 8 x 256 tokens train in ~7 minutes.
  c.train.steps = 200
  c.train.batch_size = 8
  c.train.seq_len = 256
  c.train.log_every = 10
  c.train.eval_batches = 4
  # A short run needs a faster bias update than V3's 0.001 (tuned for 14.8T tokens) to keep
  # the experts balanced within a few hundred steps.
  c.train.router_bias_rate = ((0, 0.01),)
  c.checkpoint.every = 50
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 20
  if arg == "runlocal":
    c.train.steps = 40
    c.checkpoint.every = 20
    c.optimizer.warmup_steps = 5
  elif arg:
    raise ValueError(f"small.py: unknown variant {arg!r}; known: runlocal")
  return c
