"""The FP8-vs-BF16 training study script (experiments/ablations/fp8_training.py) on made-up
finished runs: its table's arithmetic and its plot, without training anything."""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "ablations" / "fp8_training.py"


def _write_run(path: pathlib.Path, held_out: dict, ce: float = 1.0):
  path.mkdir(parents=True)
  with open(path / "metrics.jsonl", "w") as f:
    for step, loss in held_out.items():
      f.write(json.dumps({"step": step, "loss": ce + 0.1, "ce": ce, "grad_norm": 1.0}) + "\n")
      f.write(json.dumps({"step": step, "eval_loss": loss, "eval_perplexity": 1.0,
                          "eval_tokens": 100}) + "\n")


def test_the_table_and_plot_from_finished_runs(tmp_path):
  runs = {("bf16", 0): {20: 3.0, 40: 2.000}, ("bf16", 1): {20: 3.1, 40: 2.010},
          ("fp8_blockwise", 0): {20: 3.0, 40: 2.002}, ("fp8_blockwise", 1): {20: 3.1, 40: 2.014}}
  for (fmt, seed), held_out in runs.items():
    _write_run(tmp_path / fmt / f"seed{seed}", held_out)
  png = tmp_path / "fp8.png"
  proc = subprocess.run([sys.executable, str(SCRIPT), "--plot_only", f"--workdir={tmp_path}",
                         "--seeds=0,1", "--formats=bf16,fp8_blockwise", f"--png={png}"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in proc.stdout.splitlines() if line.startswith("| bf16") or
          line.startswith("| fp8")}
  # bf16: mean 2.005, spread 0.010 / 2.005; fp8: (0.1% + ~0.199%) / 2 from the same seeds.
  assert rows["bf16"][:3] == ["2", "2.0050", "0.499%"]
  # seed means 2.005 vs 2.008: 0.150%
  assert rows["fp8_blockwise"][3:] == ["0.150%", "0.199%", "0.150%", "yes"]
  assert png.stat().st_size > 10_000
  assert (tmp_path / "fp8_training.csv").exists()


def test_an_unknown_format_is_one_clear_line(tmp_path):
  proc = subprocess.run([sys.executable, str(SCRIPT), "--plot_only", f"--workdir={tmp_path}",
                         "--formats=bf16,fp4"], capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == [
      "error: --formats: unknown ['fp4']; choose from ['bf16', 'fp8_blockwise', 'fp8_tensorwise', "
      "'bf16_eps']"]
