"""metrics.jsonl on resume, and the expert-load summary."""

import json

import numpy as np

from deepseek_jax.train.metrics import MetricsLogger, expert_load_stats


def test_resume_drops_later_records_and_a_line_cut_short(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (10, 20, 30))
                  + '{"step": 40, "lo')  # the process was killed mid-write
  logger = MetricsLogger(str(tmp_path), total_steps=50, tokens_per_step=8, flops_per_token=1.0,
                         n_devices=1, peak_flops=1.0, tensorboard=False, resume_step=20)
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [10, 20]
  logger.log(30, {"loss": 0.5, "ce": 0.5, "grad_norm": 1.0, "learning_rate": 1e-3})
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [10, 20, 30]


def test_expert_load_stats():
  stats = expert_load_stats(np.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]]))
  np.testing.assert_allclose(stats["max_over_mean"], [1.0, 4.0])
  np.testing.assert_allclose(stats["min_over_mean"], [1.0, 0.0])
  np.testing.assert_allclose(stats["entropy"], [1.0, 0.0], atol=1e-12)
