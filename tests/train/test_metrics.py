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


def _logger(tmp_path, **kw):
  return MetricsLogger(str(tmp_path), total_steps=50, tokens_per_step=1000, flops_per_token=1.0,
                       n_devices=1, peak_flops=1e6, tensorboard=False, **kw)


_M = {"loss": 1.0, "ce": 1.0, "grad_norm": 1.0}


class _Clock:
  """A settable perf_counter."""

  def __init__(self, monkeypatch):
    self.now = 0.0
    monkeypatch.setattr("deepseek_jax.train.metrics.time.perf_counter", lambda: self.now)


def test_the_window_holding_compilation_reports_compile_time_not_throughput(tmp_path, monkeypatch):
  clock = _Clock(monkeypatch)
  logger = _logger(tmp_path)
  clock.now = 30.0
  assert logger.compiled(1) == 30.0  # step 1 finished 30 s after the clock started
  first = logger.log(1, _M)  # log_every=1: a window holding only the compiling step
  assert first["compile_time"] == 30.0
  assert "tokens_per_s" not in first and "mfu" not in first and "step_time" not in first
  assert "compiled in 30.0 s" in logger.console_line(first)
  clock.now = 32.0
  second = logger.log(3, _M)  # steps 2-3 took 30 -> 32 s: 1 s each
  assert second["step_time"] == 1.0 and second["tokens_per_s"] == 1000.0
  assert "compile_time" not in second
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert "tokens_per_s" not in lines[0] and lines[1]["tokens_per_s"] == 1000.0


def test_the_first_record_after_compiling_measures_only_later_steps(tmp_path, monkeypatch):
  clock = _Clock(monkeypatch)
  logger = _logger(tmp_path)
  clock.now = 20.0
  logger.compiled(1)
  clock.now = 29.0
  record = logger.log(10, _M)  # steps 2..10: 9 s
  assert record["step_time"] == 1.0 and record["compile_time"] == 20.0


def test_time_paused_for_evaluation_or_saving_is_left_out(tmp_path, monkeypatch):
  clock = _Clock(monkeypatch)
  logger = _logger(tmp_path)
  clock.now = 10.0
  logger.compiled(1)
  clock.now = 12.0
  with logger.paused():  # 12 -> 22: an evaluation
    clock.now = 22.0
  clock.now = 24.0
  record = logger.log(3, _M)  # 14 s elapsed, 10 paused, 2 steps
  assert record["step_time"] == 2.0


def test_held_out_evaluations_are_their_own_records(tmp_path):
  logger = _logger(tmp_path)
  logger.log(10, _M)
  record = logger.log_eval(10, {"loss": 2.0, "perplexity": 7.389, "tokens": 640})
  assert record == {"step": 10, "eval_loss": 2.0, "eval_perplexity": 7.389, "eval_tokens": 640}
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines[-1] == record and "eval_loss" not in lines[0]


def test_the_cpu_peak_for_mfu_is_a_fixed_figure_per_cpu_model(monkeypatch):
  """MFU's CPU peak does not move with machine load: a known CPU model gets its fixed per-core
  figure times the cores this process may use; an unknown one the best of 60 probe runs; the
  config override wins over both."""
  from deepseek_jax.train import metrics
  info = {"vendor_id": "GenuineTest", "cpu family": "7", "model": "3"}
  monkeypatch.setattr(metrics, "_cpuinfo", lambda: info)
  monkeypatch.setitem(metrics.CPU_PEAK_FLOPS_PER_CORE, ("GenuineTest", 7, 3), 100e9)
  calls = []
  monkeypatch.setattr(metrics, "measure_cpu_peak",
                      lambda size, repeats: calls.append((size, repeats)) or 1e9 * size)
  peak, source = metrics.cpu_peak_flops(cpus=4)
  assert peak == 400e9 and "GenuineTest family 7 model 3, 4 cores" in source and not calls
  info["model"] = "4"  # not in the table: measured now, the best of the probes
  peak, source = metrics.cpu_peak_flops(cpus=4)
  assert peak == 2048e9 and "best of 60" in source
  assert sorted(calls) == [(512, 20), (1024, 20), (2048, 20)]
  assert metrics.device_peak_flops(override=5e12) == (5e12, "config")
  assert metrics.cpu_model_key({"vendor_id": "x"}) is None
