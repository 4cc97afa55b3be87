"""Worker for test_multihost.py: train steps on a fixed global batch, print the losses.

    python multihost_worker.py OUT_JSON [PORT NUM_PROCESSES PROCESS_ID]

Each process feeds its own rows of the global batch; process 0 writes the losses.
"""

import json
import sys

import jax

if len(sys.argv) > 2:
  port, n_proc, pid = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
  jax.config.update("jax_num_cpu_devices", 2)
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=n_proc,
                             process_id=pid)

import numpy as np  # noqa: E402

from deepseek_jax.config import ModelConfig  # noqa: E402
from deepseek_jax.parallel.mesh import make_mesh  # noqa: E402
from deepseek_jax.parallel.partitioning import batch_sharding, get_rules  # noqa: E402
from deepseek_jax.train.config import default_config  # noqa: E402
from deepseek_jax.train.optimizer import make_optimizer, piecewise_constant  # noqa: E402
from deepseek_jax.train.step import StepOptions, init_train_state, jit_train_step  # noqa: E402

cfg = ModelConfig.preset("tiny", init_std=0.1)
opt = default_config().optimizer
opt.total_steps = 10
tx = make_optimizer(opt)
mesh = make_mesh(dict(data=2, fsdp=2))
rules = get_rules("fsdp")
graphdef, state, sh = init_train_state(cfg, tx, mesh, rules, seed=0)
step = jit_train_step(cfg, graphdef, tx, StepOptions(router_bias_rate=piecewise_constant(((0, 0.01),))),
                      sh, mesh, rules)
rng = np.random.default_rng(0)
losses = []
for _ in range(3):
  seq = rng.integers(3, cfg.vocab_size, (8, 33)).astype(np.int32)
  full = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": np.ones((8, 32), np.float32)}
  rows = slice(4 * jax.process_index(), 4 * (jax.process_index() + 1)) if jax.process_count() > 1 \
      else slice(None)
  batch = {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules), v[rows])
           for k, v in full.items()}
  state, metrics = step(state, batch)
  losses.append(float(metrics["loss"]))
if jax.process_index() == 0:
  with open(sys.argv[1], "w") as f:
    json.dump({"losses": losses, "devices": jax.device_count(), "processes": jax.process_count()}, f)
