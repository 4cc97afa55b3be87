r"""R1-Zero on the embedded arithmetic task, several seeds: the table and the reward plot.

    python experiments/ablations/r1_zero.py --init_from=/tmp/ds-small \
        --workdir=/tmp/ds-r1zero-study --seeds=0,1 --png=docs/r1_zero.png

Runs ``experiments/rl.py --config=experiments/configs/r1_zero.py`` once per seed (each in
``<workdir>/seed<N>``; rerunning resumes or skips finished seeds), then reads their
metrics.jsonl and writes ``<workdir>/r1_zero.csv``, prints a markdown table (held-out greedy
accuracy before and after, training reward at the start and the end) and saves the plot:
training reward (10-step moving average) and held-out accuracy against the RL step.
``--plot_only`` skips the runs; extra ``--config.*`` overrides pass through to every run.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[2]

_INIT = flags.DEFINE_string("init_from", "/tmp/ds-small", "the pretrained workdir RL starts from")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/ds-r1zero-study", "one folder per seed in here")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "seeds to run")
_PNG = flags.DEFINE_string("png", "docs/r1_zero.png", "where the plot goes")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "only read finished runs and plot")
_VARIANT = flags.DEFINE_string("variant", "", "r1_zero.py variant(s), e.g. ppo or dapo")


def _records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; run without --plot_only first")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _moving_average(values: list[float], window: int = 10) -> list[float]:
  out = []
  for i in range(len(values)):
    chunk = values[max(0, i - window + 1):i + 1]
    out.append(sum(chunk) / len(chunk))
  return out


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
  rows = []
  for seed, records in runs.items():
    evals = [r for r in records if "eval_accuracy" in r]
    steps = [r for r in records if "reward" in r]
    rows.append({"seed": seed, "steps": steps[-1]["step"],
                 "held_out_before": evals[0]["eval_accuracy"] if evals[0]["step"] == 0 else None,
                 "held_out_after": evals[-1]["eval_accuracy"],
                 "held_out_best": max(r["eval_accuracy"] for r in evals),
                 "train_prompts_before": evals[0]["train_accuracy"],
                 "train_prompts_after": evals[-1]["train_accuracy"],
                 "reward_first10": sum(r["reward"] for r in steps[:10]) / len(steps[:10]),
                 "reward_last10": sum(r["reward"] for r in steps[-10:]) / len(steps[-10:]),
                 "minutes": sum(r.get("rollout_s", 0) + r.get("update_s", 0) for r in steps) / 60})
  return rows


def plot(runs: dict[str, list[dict]], png: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
  for seed, records in runs.items():
    steps = [r for r in records if "reward" in r]
    left.plot([r["step"] for r in steps], _moving_average([r["reward"] for r in steps]),
              label=f"seed {seed}")
    evals = [r for r in records if "eval_accuracy" in r]
    line, = right.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals],
                       marker="o", markersize=3, label=f"held-out, seed {seed}")
    right.plot([r["step"] for r in evals], [r["train_accuracy"] for r in evals], ls="--",
               color=line.get_color(), alpha=0.6, label=f"training prompts, seed {seed}")
  left.set(title="training reward (accuracy, 10-step mean)", xlabel="RL step", ylabel="reward")
  right.set(title="greedy accuracy: held-out vs training prompts", xlabel="RL step",
            ylabel="accuracy", ylim=(0, None))
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle("R1-Zero (GRPO, rule reward only) on single-digit arithmetic, small model, CPU")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
  fig.savefig(png, dpi=90)
  print(f"wrote {png}")


def main(argv):
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  if len(overrides) != len(argv) - 1:
    raise app.UsageError(f"unexpected arguments: {[a for a in argv[1:] if a not in overrides]}")
  config = str(REPO / "experiments" / "configs" / "r1_zero.py")
  if _VARIANT.value:
    config += ":" + _VARIANT.value
  runs = {}
  for seed in _SEEDS.value:
    workdir = os.path.join(_WORKDIR.value, f"seed{seed}")
    if not _PLOT_ONLY.value:
      cmd = [sys.executable, str(REPO / "experiments" / "rl.py"), f"--config={config}",
             f"--config.init_from={_INIT.value}", f"--config.seed={seed}", f"--workdir={workdir}",
             *overrides]
      print("$", " ".join(cmd), flush=True)
      if subprocess.run(cmd).returncode:
        sys.exit(f"error: the run of seed {seed} failed (see above); rerun to resume it")
    runs[seed] = _records(workdir)
  rows = summarise(runs)
  path = os.path.join(_WORKDIR.value, "r1_zero.csv")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  print(f"wrote {path}")
  print("| seed | steps | held-out acc. before | after | best | training-prompt acc. before | "
        "after | reward, first 10 steps | last 10 | RL minutes |\n"
        "|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    before = "n/a" if r["held_out_before"] is None else f"{r['held_out_before']:.3f}"
    print(f"| {r['seed']} | {r['steps']} | {before} | {r['held_out_after']:.3f} | "
          f"{r['held_out_best']:.3f} | {r['train_prompts_before']:.3f} | "
          f"{r['train_prompts_after']:.3f} | {r['reward_first10']:.3f} | {r['reward_last10']:.3f} | "
          f"{r['minutes']:.1f} |")
  plot(runs, _PNG.value)


if __name__ == "__main__":
  from deepseek_jax.cli import use_huge_pages
  use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main)
