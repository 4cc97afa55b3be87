r"""The default run: the `small` preset (18M total / 4.6M activated) on the embedded corpus.

    python experiments/train.py --config=experiments/configs/small.py --workdir=/tmp/ds-small

Variants (comma-separated): `runlocal` (a short run for a quick look); `ep4` (expert
parallelism: the routed experts split 4 ways over the mesh's expert axis, tokens moved by
all-to-all; on a CPU-only host the trainer splits it into 8 XLA devices, 2 x 4):

    python experiments/train.py --config=experiments/configs/small.py:ep4,runlocal \
        --workdir=/tmp/ds-small-ep
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
  variants = set(arg.split(",")) if arg else set()
  unknown = variants - {"runlocal", "ep4"}
  if unknown:
    raise ValueError(f"small.py: unknown variant(s) {sorted(unknown)}; known: runlocal, ep4")
  if "runlocal" in variants:
    c.train.steps = 40
    c.checkpoint.every = 20
    c.optimizer.warmup_steps = 5
  if "ep4" in variants:  # 32 experts: 8 per shard = one routing group (V2 device-limited, M=2)
    c.cpu_devices = 8
    c.mesh.update(dict(data=1, fsdp=-1, expert=4, tensor=1))
  return c
