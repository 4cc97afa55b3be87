r"""Pipeline schedules side by side: each schedule's bubble and activation memory per rank from
the formulas (DeepSeek-V3 Table 2; REFERENCE §6) and from its timetable, the compiled memory of
the pipelined train step of a small model (``--measure``), and a PNG of the timetables.

    python experiments/pipeline_schedules.py --stages=4 --micro_batches=8 --out=docs/results
    python experiments/pipeline_schedules.py --stages=2 --measure      # + XLA memory analysis

``--measure`` compiles the pipelined loss and gradients of ``--preset`` (default tiny, MoE
layers = 2 x stages) on ``--stages`` x 2 fake CPU devices (stage x data) and prints XLA's
per-device temporary memory for each schedule: this host's compiler, not a GPU's or a TPU's.
"""

from __future__ import annotations

import os

from absl import app, flags

_STAGES = flags.DEFINE_integer("stages", 4, "pipeline ranks PP")
_MICRO = flags.DEFINE_integer("micro_batches", 0, "micro-batches M (0: 2 x stages)")
_OUT = flags.DEFINE_string("out", None, "folder for pipeline_schedules.png / .md (none: print)")
_MEASURE = flags.DEFINE_bool("measure", False, "compile each schedule's step and print memory")
_PRESET = flags.DEFINE_string("preset", "tiny", "model preset for --measure")
_BATCH = flags.DEFINE_integer("batch", 16, "sequences per step for --measure")
_SEQ = flags.DEFINE_integer("seq_len", 64, "tokens per sequence for --measure")


def _flag_names(message: str) -> str:
  """A schedule's error in this script's flags."""
  return (message.replace("config.mesh.stage", "--stages")
          .replace("config.pipeline.micro_batches", "--micro_batches"))


def _schedules(stages: int, micro: int) -> dict:
  """{name: Schedule or the reason it cannot run}; ValueError when none can."""
  from deepseek_jax.parallel.pipeline import SCHEDULES, Schedule
  out = {}
  for name in SCHEDULES:
    try:
      out[name] = Schedule(name, stages, micro)
    except ValueError as e:
      out[name] = _flag_names(str(e))
  if all(isinstance(s, str) for s in out.values()):
    raise ValueError(out[SCHEDULES[0]])
  return out


def _table(stages: int, micro: int) -> list[str]:
  from deepseek_jax.parallel.pipeline import analyse
  rows = ["| schedule | bubble formula | bubble (F=1, B=2, W=1) | ticks | idle F/B slots | "
          "in flight per rank | formula | stash slots | parameter copies |",
          "|---|---|---|---|---|---|---|---|---|"]
  for name, schedule in _schedules(stages, micro).items():
    if isinstance(schedule, str):
      rows.append(f"| {name} | not possible here: {schedule} |")
      continue
    a = analyse(schedule)
    rows.append(f"| {name} | {a.bubble_formula} | {a.bubble:g} | {a.ticks} | {1 - a.busy:.0%} | "
                f"{a.activations} | {a.activations_formula} | {a.stash_slots} | "
                f"{a.parameter_copies} |")
  return rows


def _plot(stages: int, micro: int, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  from deepseek_jax.parallel.pipeline import timetable
  schedules = {n: s for n, s in _schedules(stages, micro).items() if not isinstance(s, str)}
  fig, axes = plt.subplots(len(schedules), 1, figsize=(11, 1.1 + 0.75 * stages * 3),
                           sharex=True, squeeze=False)
  cmap = plt.get_cmap("tab20")
  width = max(timetable(s).n_ticks for s in schedules.values())
  for ax, (name, schedule) in zip(axes[:, 0], schedules.items()):
    t = timetable(schedule)
    for r in range(stages):
      for k in range(t.n_ticks):
        for half, (table, hatch) in enumerate(((t.forward, ""), (t.backward, "//"))):
          m = table[k, r]
          if m < 0:
            continue
          y = r + 0.5 * half
          ax.add_patch(plt.Rectangle((k, y), 1, 0.48, color=cmap(m % 20), hatch=hatch,
                                     ec="black", lw=0.3))
          ax.text(k + 0.5, y + 0.24, str(m), ha="center", va="center", fontsize=6)
    ax.set_ylim(stages, 0)
    ax.set_xlim(0, width)
    ax.set_yticks(np.arange(stages) + 0.5, [f"rank {r}" for r in range(stages)])
    ax.set_title(f"{name}: {t.n_ticks} ticks, {1 - t.busy():.0%} of F/B slots idle "
                 f"(per rank: top row F, bottom row B; numbers are micro-batches)", fontsize=9)
  axes[-1, 0].set_xlabel("tick")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _measure(stages: int, micro: int) -> list[str]:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from deepseek_jax.config import ModelConfig
  from deepseek_jax.model.execution import resolve_execution
  from deepseek_jax.model.transformer import abstract_model
  from deepseek_jax.parallel.mesh import make_mesh
  from deepseek_jax.train.loss import PretrainLoss
  from deepseek_jax.train.pipeline import PipelinedPretrainLoss
  base = ModelConfig.preset(_PRESET.value)
  cfg = ModelConfig.preset(_PRESET.value, n_layers=base.n_dense_layers + 2 * stages)
  mesh = make_mesh(dict(stage=stages, data=-1), jax.devices()[:2 * stages])
  model = abstract_model(cfg, resolve_execution(cfg, mesh))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  b, t = _BATCH.value, _SEQ.value
  batch = {"inputs": jax.ShapeDtypeStruct((b, t), jnp.int32),
           "targets": jax.ShapeDtypeStruct((b, t), jnp.int32),
           "mask": jax.ShapeDtypeStruct((b, t), jnp.float32)}
  losses = {"PretrainLoss, no schedule (XLA splits the layers)": PretrainLoss(cfg.n_mtp_modules)}
  for name, schedule in _schedules(stages, micro).items():
    if not isinstance(schedule, str):
      losses[name] = PipelinedPretrainLoss(cfg.n_mtp_modules, schedule)
  rows = [f"compiled memory per device, {cfg.name} with {cfg.n_moe_layers} MoE layers, batch "
          f"{b} x {t}, mesh {dict(mesh.shape)} (XLA:CPU):",
          "| schedule | temp MiB | arguments MiB | output MiB |", "|---|---|---|---|"]
  for name, loss in losses.items():
    def f(params, rest, batch, loss=loss):
      return loss(nnx.merge(graphdef, params, rest), batch,
                  normalizers=loss.normalizers(batch, 1), step=jnp.int32(0))
    with jax.set_mesh(mesh):
      step = jax.jit(jax.value_and_grad(f, has_aux=True))
      mem = step.lower(params, rest, batch).compile()
      mem = mem.memory_analysis()
    mib = lambda x: f"{x / 2 ** 20:.2f}"
    rows.append(f"| {name} | {mib(mem.temp_size_in_bytes)} | "
                f"{mib(mem.argument_size_in_bytes)} | {mib(mem.output_size_in_bytes)} |")
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from deepseek_jax import cli
  cli.run_cli(report)


def report() -> None:
  stages = _STAGES.value
  micro = _MICRO.value or 2 * stages
  if _MEASURE.value:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from deepseek_jax.cli import set_cpu_devices
    set_cpu_devices(max(8, 2 * stages))
  rows = [f"PP = {stages} ranks, M = {micro} micro-batches", ""] + _table(stages, micro)
  if _MEASURE.value:
    rows += [""] + _measure(stages, micro)
  text = "\n".join(rows)
  print(text)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    png = os.path.join(_OUT.value, "pipeline_schedules.png")
    _plot(stages, micro, png)
    with open(os.path.join(_OUT.value, "pipeline_schedules.md"), "w") as f:
      f.write(text + "\n")
    print(f"wrote {png}")


if __name__ == "__main__":
  app.run(main)
