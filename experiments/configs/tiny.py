r"""A tiny run for tests and smoke checks (seconds per step on one CPU core).

    python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/ds-tiny
"""

from deepseek_jax.train.config import default_config


def get_config(arg=None):
  c = default_config()
  c.model.preset = "tiny"
  c.model.overrides.vocab_size = 320  # the byte tokenizer uses 261 ids
  c.data.corpus_documents = 2000
  c.train.steps = 20
  c.train.batch_size = 8
  c.train.seq_len = 64
  c.train.log_every = 2
  c.train.eval_batches = 2
  c.checkpoint.every = 5
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 4
  c.sample.max_new_tokens = 16
  c.sample.prompts = ("Mia lives in",)
  if arg:
    raise ValueError(f"tiny.py: unknown variant {arg!r}")
  return c
