r"""FP8 training against BF16 on the default small model (DeepSeek-V3 §3.3, Fig. 10): the table
and the plot.

    python experiments/ablations/fp8_training.py --workdir=/tmp/ds-fp8-study \
        --seeds=0,1,2 --formats=bf16,fp8_blockwise,fp8_tensorwise --png=docs/fp8_training.png

Trains ``experiments/configs/small.py`` once per (format, seed) with
``--config.model.overrides.matmul_format=<format> --config.seed=<seed>``, each run in
``<workdir>/<format>/seed<N>`` (rerunning resumes unfinished runs; a finished run only
re-evaluates), with a held-out evaluation every ``--eval_every`` steps. Then it reads every
run's metrics.jsonl, writes ``<workdir>/fp8_training.csv``, prints a markdown table and saves
the plot: held-out loss against the step per format (mean over seeds, min-max band), and the
relative difference |L_fmt - L_bf16| / L_bf16 of each FP8 format from the BF16 run of the same
seed (same initialisation, same batches) over the steps, beside the BF16 seed spread and V3's
0.25%. ``--formats`` may add the control ``bf16_eps`` (BF16 with rms_norm_eps 1% larger): how
far runs drift apart from a negligible perturbation alone. ``--plot_only`` skips the runs;
extra ``--config.*`` overrides pass through to every run (e.g. ``--config.train.steps=100``
for a shorter study).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import statistics
import subprocess
import sys

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[2]
FORMATS = ("bf16", "fp8_blockwise", "fp8_tensorwise")
# A control beside the formats: BF16 with rms_norm_eps 1% larger, a change far below any
# numerical effect worth measuring. Its distance from bf16 (same seed) is how far two runs drift
# apart from a negligible perturbation alone in this short, fast-moving training.
CONTROLS = {"bf16_eps": ("bf16", ["--config.model.overrides.rms_norm_eps=1.01e-06"])}
V3_RELATIVE_ERROR = 0.0025  # V3 §3.3 / App. B: FP8 loss stays within 0.25% of BF16

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/ds-fp8-study", "one folder per run in here")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds to run (each format uses all)")
_FORMATS = flags.DEFINE_list("formats", list(FORMATS), "matmul formats; bf16 is the reference")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 20, "steps between held-out evaluations")
_PNG = flags.DEFINE_string("png", "docs/fp8_training.png", "where the plot goes")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "only read finished runs and plot")


def run_dir(workdir: str, fmt: str, seed: str) -> str:
  return os.path.join(workdir, fmt, f"seed{seed}")


def read_run(path: str) -> tuple[dict[int, float], dict[int, float]]:
  """(held-out loss by step, training cross-entropy by step) of one run's metrics.jsonl.
  Raises FileNotFoundError naming the file when the run has not been made."""
  metrics = os.path.join(path, "metrics.jsonl")
  if not os.path.exists(metrics):
    raise FileNotFoundError(f"{metrics} does not exist; run without --plot_only first")
  held_out, train = {}, {}
  with open(metrics) as f:
    for line in f:
      if not line.strip():
        continue
      r = json.loads(line)
      if "eval_loss" in r:
        held_out[r["step"]] = r["eval_loss"]
      elif "ce" in r:
        train[r["step"]] = r["ce"]
  if not held_out:
    raise FileNotFoundError(f"{metrics} has no held-out evaluations (eval_loss records); "
                            "train with --config.train.eval_every > 0")
  return held_out, train


def relative(a: float, b: float) -> float:
  return abs(a - b) / b


def summarise(runs: dict[str, dict[str, tuple]]) -> list[dict]:
  """One row per format: final held-out loss per seed, its mean and seed spread, and the
  relative difference from BF16 of the same seed (final, and the largest over the
  evaluations after the first quarter of training)."""
  reference = runs.get("bf16", {})
  rows = []
  for fmt, by_seed in runs.items():
    finals = {seed: held[max(held)] for seed, (held, _) in by_seed.items() if held}
    row = {"format": fmt, "seeds": len(finals),
           "held_out_loss": statistics.mean(finals.values()),
           "seed_spread": (max(finals.values()) - min(finals.values()))
                          / statistics.mean(finals.values())}
    row.update({f"loss_seed{seed}": loss for seed, loss in finals.items()})
    if fmt != "bf16" and reference:
      final_rel, worst_rel = [], []
      for seed, (held, _) in by_seed.items():
        if seed not in reference:
          continue
        ref = reference[seed][0]
        steps = sorted(set(held) & set(ref))
        late = [s for s in steps if s >= steps[-1] / 4] or steps
        final_rel.append(relative(held[steps[-1]], ref[steps[-1]]))
        worst_rel.append(max(relative(held[s], ref[s]) for s in late))
      row["relative_diff_final"] = statistics.mean(final_rel)
      row["relative_diff_max"] = max(worst_rel)
      ref_mean = statistics.mean(held[max(held)] for held, _ in reference.values())
      row["relative_diff_of_means"] = relative(row["held_out_loss"], ref_mean)
    rows.append(row)
  return rows


def table_markdown(rows: list[dict]) -> str:
  spread = next((r["seed_spread"] for r in rows if r["format"] == "bf16"), None)
  lines = ["| format | seeds | held-out loss (mean) | seed spread | rel. diff from BF16, final "
           "(mean over seeds) | rel. diff, largest after 25% of steps | rel. diff of the seed "
           "means | within BF16 spread and 0.25% |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "relative_diff_final" in r:
      ok = r["relative_diff_final"] < V3_RELATIVE_ERROR and (spread is None
                                                            or r["relative_diff_final"] <= spread)
      rel = (f"{100 * r['relative_diff_final']:.3f}%", f"{100 * r['relative_diff_max']:.3f}%",
             f"{100 * r['relative_diff_of_means']:.3f}%", "yes" if ok else "no")
    else:
      rel = ("—", "—", "—", "—")
    lines.append(f"| {r['format']} | {r['seeds']} | {r['held_out_loss']:.4f} | "
                 f"{100 * r['seed_spread']:.3f}% | " + " | ".join(rel) + " |")
  return "\n".join(lines)


def plot(runs: dict[str, dict[str, tuple]], png: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_rel) = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = {"bf16": "tab:blue", "fp8_blockwise": "tab:orange", "fp8_tensorwise": "tab:green",
            "bf16_eps": "tab:gray"}
  for fmt, by_seed in runs.items():
    steps = sorted(set.intersection(*(set(h) for h, _ in by_seed.values())))
    per_step = [[h[s] for h, _ in by_seed.values()] for s in steps]
    mean = [statistics.mean(v) for v in per_step]
    ax_loss.plot(steps, mean, "-o", ms=3, color=colors.get(fmt),
                 label=f"{fmt} ({len(by_seed)} seeds)")
    ax_loss.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step],
                         color=colors.get(fmt), alpha=0.2)
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("held-out loss (cross-entropy, nats/token)")
  ax_loss.set_title("Held-out loss (mean over seeds, min-max band)")
  ax_loss.legend()
  ax_loss.grid(alpha=0.3)

  reference = runs.get("bf16", {})
  for fmt, by_seed in runs.items():
    if fmt == "bf16" or not reference:
      continue
    pairs = [(h, reference[seed][0]) for seed, (h, _) in by_seed.items() if seed in reference]
    steps = sorted(set.intersection(*(set(h) & set(r) for h, r in pairs)))
    rel = [100 * statistics.mean(relative(h[s], r[s]) for h, r in pairs) for s in steps]
    ax_rel.plot(steps, rel, "-o", ms=3, color=colors.get(fmt),
                label=f"{fmt} vs bf16, same seed (mean)")
  if len(reference) > 1:
    steps = sorted(set.intersection(*(set(h) for h, _ in reference.values())))
    spread = [100 * (max(h[s] for h, _ in reference.values()) - min(h[s] for h, _ in
                                                                    reference.values()))
              / statistics.mean(h[s] for h, _ in reference.values()) for s in steps]
    ax_rel.plot(steps, spread, "--", color=colors["bf16"], label="bf16 seed spread (max-min)")
  ax_rel.axhline(100 * V3_RELATIVE_ERROR, color="red", ls=":", label="0.25% (DeepSeek-V3)")
  ax_rel.set_xlabel("step")
  ax_rel.set_ylabel("relative difference of held-out loss (%)")
  ax_rel.set_title("FP8 vs BF16: relative loss difference")
  ax_rel.legend(fontsize=8)
  ax_rel.grid(alpha=0.3)
  fig.suptitle("small preset on the embedded corpus: matmul_format ablation")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
  fig.savefig(png, dpi=110)


def main(argv):
  extra = [a for a in sys.argv[1:] if a.startswith("--config.")]
  if not _SEEDS.value or not _FORMATS.value:
    raise app.UsageError("--seeds and --formats need at least one entry each")
  unknown = [f for f in _FORMATS.value if f not in FORMATS and f not in CONTROLS]
  if unknown:
    raise app.UsageError(f"--formats: unknown {unknown}; choose from "
                         f"{list(FORMATS) + list(CONTROLS)}")
  if not _PLOT_ONLY.value:
    for fmt in _FORMATS.value:
      for seed in _SEEDS.value:
        matmul_format, control = CONTROLS.get(fmt, (fmt, []))
        cmd = [sys.executable, str(REPO / "experiments/train.py"),
               "--config=" + str(REPO / "experiments/configs/small.py"),
               f"--workdir={run_dir(_WORKDIR.value, fmt, seed)}", f"--config.seed={seed}",
               f"--config.model.overrides.matmul_format={matmul_format}", *control,
               f"--config.train.eval_every={_EVAL_EVERY.value}", *extra]
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode:
          sys.exit(f"error: the {fmt} run of seed {seed} failed (see above); rerun to resume it")
  runs = {fmt: {seed: read_run(run_dir(_WORKDIR.value, fmt, seed)) for seed in _SEEDS.value}
          for fmt in _FORMATS.value}
  rows = summarise(runs)
  csv_path = os.path.join(_WORKDIR.value, "fp8_training.csv")
  keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "format", k))
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
  print(table_markdown(rows))
  plot(runs, _PNG.value)
  print(f"wrote {csv_path} and {_PNG.value}")


def _main(argv):
  try:
    main(argv)
  except (app.UsageError, FileNotFoundError) as error:
    sys.exit(f"error: {error}")


def _parse_flags(argv):
  """absl flags, leaving the --config.* overrides for experiments/train.py (main reads
  sys.argv); a bad flag is one line."""
  try:
    return flags.FLAGS([a for a in argv if not a.startswith("--config.")])
  except flags.Error as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  from deepseek_jax.cli import use_huge_pages
  use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(_main, flags_parser=_parse_flags)
