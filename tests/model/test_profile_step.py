"""experiments/profile_step.py on the tiny preset: every component row is printed with its
forward and backward times, and the components add up to the real jitted train step."""

import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "profile_step.py"


def test_profile_rows_cover_the_step_and_sum_to_it():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users run it
  proc = subprocess.run([sys.executable, str(SCRIPT), "--preset=tiny", "--batch=2", "--seq_len=32",
                         "--steps=2"], capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  for row in ("embedding + output head + cross-entropy", "RMSNorm", "attention projections",
              "attention core", "dense SwiGLU FFN", "router", "routed experts, whole",
              "experts: 3 tile matmuls", "experts: gather back", "shared expert SwiGLU",
              "optimizer (AdamW"):
    assert row in out, row
  total = float(re.search(r"sum of the components.*?([\d.]+)\n", out).group(1))
  step = float(re.search(r"the jitted train step.*?([\d.]+)\n", out).group(1))
  assert total > 0 and step > 0
  # The components are the step's work: their sum is the step's time to within a factor of 3
  # (on tiny shapes per-program overhead dominates; on the small preset they agree to ~1%).
  assert step / 3 < total < 3 * step, (total, step)
