r"""EPLB placement from a training run's recorded expert load (deepseek_jax/parallel/eplb.py):
reads ``moe_load`` (tokens per expert per MoE layer, MTP modules last) from ``metrics.jsonl``,
averages the last ``--records`` records, and prints the placement and the load imbalance of
the busiest shard (max / mean tokens per shard) before (static: expert e on shard e // (E/S))
and after: per layer (each layer its own table: install it with
``model.execution.set_expert_placement(model, placement, mesh)``, the layer scan slices the
tables) and shared (one table balanced on the load summed over layers, a static
``ExpertPlacement.from_eplb(eplb.shared_placement(...), 0)`` in ``Execution.expert_placement``).

    python experiments/eplb.py --workdir=/tmp/ds-small --shards=8 --redundant=8
    python experiments/eplb.py --workdir=/tmp/ds-small --shards=8 --redundant=8 --groups=4 \
        --nodes=2      # hierarchical: replicas stay on their group's node
"""

from __future__ import annotations

import json
import os

from absl import app, flags
import numpy as np

from deepseek_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "a training run's workdir", required=True)
_SHARDS = flags.DEFINE_integer("shards", 8, "devices of the expert-parallel axis")
_REDUNDANT = flags.DEFINE_integer("redundant", 0, "redundant expert slots on top of E")
_GROUPS = flags.DEFINE_integer("groups", 1, "expert groups (V3: 8); hierarchical if divisible "
                               "by --nodes")
_NODES = flags.DEFINE_integer("nodes", 1, "nodes the shards are spread over")
_RECORDS = flags.DEFINE_integer("records", 5, "average the load of the last N logged steps")
_PNG = flags.DEFINE_string("png", None, "also plot the per-shard load before/after here")
_SHOW = flags.DEFINE_integer("show_layers", 2, "layers whose placement table is printed")


def read_load(workdir: str, records: int) -> np.ndarray:
  """Mean expert load [L, E] of the last ``records`` records of <workdir>/metrics.jsonl that
  have one. Raises FileNotFoundError / ValueError naming the file."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; train first with --workdir={workdir}")
  if records < 1:
    raise ValueError(f"--records must be >= 1, got {records}")
  with open(path) as f:
    loads = [r["moe_load"] for r in map(json.loads, filter(str.strip, f)) if "moe_load" in r]
  if not loads:
    raise ValueError(f"{path} has no moe_load records (a dense model, or a run from before "
                     "expert loads were logged)")
  return np.mean(np.asarray(loads[-records:], np.float64), axis=0)


def report() -> None:
  from deepseek_jax.parallel import eplb
  load = read_load(_WORKDIR.value, _RECORDS.value)
  layers, experts = load.shape
  slots = experts + _REDUNDANT.value
  if _SHARDS.value < 1 or experts % _SHARDS.value:
    raise ValueError(f"--shards={_SHARDS.value} must be a positive divisor of the run's "
                     f"{experts} experts (the static placement splits them evenly)")
  if _REDUNDANT.value < 0 or slots % _SHARDS.value:
    raise ValueError(f"--redundant={_REDUNDANT.value}: the {experts} + {_REDUNDANT.value} slots "
                     f"must split evenly over --shards={_SHARDS.value}; use a multiple of "
                     f"{_SHARDS.value}")
  placement = eplb.rebalance_experts(load, slots, _GROUPS.value, _NODES.value, _SHARDS.value)
  static = eplb.static_placement(layers, experts, _SHARDS.value)
  shared = eplb.shared_placement(load, slots, _GROUPS.value, _NODES.value, _SHARDS.value)
  before, after, one = static.imbalance(load), placement.imbalance(load), shared.imbalance(load)
  hierarchical = _GROUPS.value % _NODES.value == 0 and _NODES.value > 1
  print(f"{_WORKDIR.value}: {layers} MoE layers (MTP modules last) x {experts} experts, mean of "
        f"the last {_RECORDS.value} logged loads; {slots} slots on {_SHARDS.value} shards, "
        f"{'hierarchical' if hierarchical else 'global'} policy")
  print("| layer | max/mean per shard, static | EPLB per layer | EPLB shared | replicas of the "
        "busiest expert (per layer) |")
  print("|---|---|---|---|---|")
  for layer in range(layers):
    busiest = int(np.argmax(load[layer]))
    print(f"| {layer} | {before[layer]:.3f} | {after[layer]:.3f} | {one[layer]:.3f} | "
          f"{placement.replicas[layer, busiest]} (expert {busiest}, "
          f"{load[layer, busiest] / load[layer].mean():.2f}x the mean load) |")
  print(f"mean over layers: static {before.mean():.3f}, per layer {after.mean():.3f}, shared "
        f"{one.mean():.3f}")
  per_shard = slots // _SHARDS.value
  if _PNG.value:
    _plot(_PNG.value, load, static, placement, shared)
    print(f"wrote {_PNG.value}")
  for layer in range(min(_SHOW.value, layers)):
    print(f"layer {layer}: shard -> logical experts in its {per_shard} slots")
    for shard in range(_SHARDS.value):
      held = placement.slot_to_expert[layer, shard * per_shard:(shard + 1) * per_shard]
      print(f"  {shard}: {' '.join(str(e) for e in held)}")


def _plot(path: str, load: np.ndarray, static, placement, shared) -> None:
  """Left: max/mean load per shard by layer for the three placements. Right: the tokens each
  shard serves in the most skewed layer, static vs EPLB per layer."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  layers = load.shape[0]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
  x = np.arange(layers)
  for i, (name, p) in enumerate((("static", static), ("EPLB shared", shared),
                                 ("EPLB per layer", placement))):
    left.bar(x + (i - 1) * 0.27, p.imbalance(load), 0.27, label=name)
  left.axhline(1.0, color="black", lw=0.8, ls="--")
  left.set_xticks(x, [str(l) for l in x])
  left.set_xlabel("MoE layer (MTP last)")
  left.set_ylabel("max / mean tokens per shard")
  left.set_title(f"{p.n_shards} shards, {placement.slot_to_expert.shape[1]} slots")
  left.legend(fontsize=8)
  worst = int(np.argmax(static.imbalance(load)))
  shards = np.arange(static.n_shards)
  right.bar(shards - 0.2, static.shard_loads(load)[worst], 0.4, label="static")
  right.bar(shards + 0.2, placement.shard_loads(load)[worst], 0.4, label="EPLB per layer")
  right.set_xlabel("expert shard")
  right.set_ylabel("top-k assignments (mean per step)")
  right.set_title(f"layer {worst}, the most skewed")
  right.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cli.run_cli(report)


if __name__ == "__main__":
  app.run(main)
