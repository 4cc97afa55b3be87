r"""The DeepSeek-R1 pipeline end to end: base -> cold-start SFT -> reasoning RL -> rejection-
sampling SFT -> RL for all scenarios, with R1-Zero (RL from the base) as the comparison row.

    python experiments/r1_pipeline.py --config=experiments/configs/r1_toy.py \
        --workdir=/tmp/ds-r1-pipeline [--png=docs/r1_pipeline.png]

Each stage runs in its own folder under <workdir>/seed<N>/ and resumes when rerun; a finished
stage is skipped. --config.pipeline.stages=reasoning_rl,rejection_sft runs a subset. At the
end the table (held-out accuracy, format rate, response length, KL to the base, per stage,
mean over seeds) is printed and written to <workdir>/r1_pipeline.{md,csv}, and the plot of
accuracy and response length across the stages to --png (default <workdir>/r1_pipeline.png).
Any field can be overridden with --config.a.b=value (pipeline.* in deepseek_jax/rl/pipeline.py,
rl.* in deepseek_jax/rl/config.py). SIGTERM or Ctrl-C saves the running stage's step and exits
with code 75; rerun to resume.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from deepseek_jax import cli
from deepseek_jax.rl import pipeline
from deepseek_jax.train.metrics import say
from deepseek_jax.train.trainer import PREEMPTED_EXIT_CODE

_CONFIG = config_flags.DEFINE_config_file("config", None, "pipeline config file[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "one folder per seed and stage in here",
                               required=True)
_PNG = flags.DEFINE_string("png", None, "where the plot goes (default <workdir>/r1_pipeline.png)")
flags.mark_flags_as_required(["config"])

LABELS = {"base": "base", "cold_start_sft": "cold-start\nSFT", "reasoning_rl": "reasoning\nRL",
          "rejection_sft": "rejection\nSFT", "all_rl": "RL, all\nscenarios"}


def plot(rows: list[dict], png: str, title: str) -> None:
  """Held-out accuracy (arithmetic, facts), format rate and mean response length across the
  stages: a colour per metric, a line style per seed; R1-Zero as a grey dashed line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  stages = [s for s in LABELS if any(r["stage"] == s for r in rows)]
  x = list(range(len(stages)))
  styles = ("-", "--", ":", "-.")
  for i, seed in enumerate(sorted({r["seed"] for r in rows})):
    by = {r["stage"]: r for r in rows if r["seed"] == seed}
    line = styles[i % len(styles)]
    for ax, key, color, marker, name in (
        (left, "accuracy_arithmetic", "tab:blue", "o", "arithmetic accuracy"),
        (left, "accuracy_fact", "tab:orange", "s", "fact accuracy"),
        (left, "format_rate", "tab:green", "^", "format rate"),
        (right, "response_length", "tab:purple", "o", "length")):
      ax.plot(x, [by[s].get(key, float("nan")) if s in by else float("nan") for s in stages],
              color=color, ls=line, marker=marker, label=f"{name}, seed {seed}")
  zero = [r for r in rows if r["stage"] == "r1_zero"]
  if zero:
    acc = sum(r["accuracy_arithmetic"] for r in zero) / len(zero)
    length = sum(r["response_length"] for r in zero) / len(zero)
    left.axhline(acc, color="gray", ls="--", label=f"R1-Zero arithmetic accuracy ({acc:.2f})")
    right.axhline(length, color="gray", ls="--", label=f"R1-Zero length ({length:.1f})")
  for ax, name in ((left, "held-out accuracy and format rate (greedy)"),
                   (right, "mean response length (tokens, greedy)")):
    ax.set_xticks(x, [LABELS[s] for s in stages], fontsize=8)
    ax.set_title(name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  left.set_ylim(0, 1.05)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
  fig.savefig(png, dpi=110)
  say(f"plot: {png}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = cli.run_cli(pipeline.run, _CONFIG.value, _WORKDIR.value)
  if result.get("preempted"):
    sys.exit(PREEMPTED_EXIT_CODE)
  title = (f"DeepSeek-R1 pipeline, toy scale ({_CONFIG.value.model.preset} model, "
           f"{_CONFIG.value.data.tokenizer} tokenizer)")
  try:
    plot(result["rows"], _PNG.value or os.path.join(_WORKDIR.value, "r1_pipeline.png"), title)
  except ImportError:
    say("matplotlib is not installed (pip install -e .[plots]); the table is written, the "
        "plot is not")


if __name__ == "__main__":
  cli.use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main, flags_parser=cli.parse_flags)
