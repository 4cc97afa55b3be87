"""Run observability: one console line per logging step, TensorBoard events, metrics.jsonl.

Throughput (tokens/s, step time, MFU) covers training steps only: the window that contains the
first, compiling step reports its compile time instead, and time spent in evaluation or
checkpoint saves (``MetricsLogger.paused``) is left out of its window.

MFU = achieved model FLOP/s / (devices x peak FLOP/s). Model FLOPs per token come from
``analytics.train_flops_per_token`` (6N-style, activated parameters, causal attention, MTP);
the peak comes from a table of accelerators (dense bf16), or on CPU from a float32 matmul probe
measured at startup (reported as such).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from deepseek_jax.cli import is_remote

PEAK_FLOPS = {  # dense bf16 FLOP/s per device, by substring of jax's device_kind
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "B200": 2250e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5": 459e12, "TPU v4": 275e12,
}


def measure_cpu_peak(size: int = 1024, repeats: int = 5) -> float:
  """Best float32 matmul FLOP/s of this host over ``repeats`` runs of a [size, size] matmul
  (moves with machine load; ``cpu_peak_flops`` fixes it per CPU model)."""
  a = jnp.ones((size, size), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * size ** 3 / best


# Float32 FLOP/s per core that a matmul reaches on an idle host (best of 3 x 20 runs of the
# probe below at sizes 512, 1024 and 2048), by /proc/cpuinfo (vendor_id, cpu family, model).
# A hypervisor hides the model name and the boost clock, so the data-sheet arithmetic (cores x
# clock x FLOPs per cycle) is unreliable there; a measured figure fixed per CPU model does not
# move with machine load the way a 5-run probe at start-up did (0.10 to 0.41 TFLOP/s on the
# 2-core host below while other jobs ran; 0.51 idle). Add a row with
# ``python -m deepseek_jax.train.metrics`` on an idle machine.
CPU_PEAK_FLOPS_PER_CORE = {
    ("AuthenticAMD", 26, 2): 255e9,  # AMD EPYC (Zen 5, AVX-512) under KVM: 0.51 TFLOP/s on 2 cores
}


def _cpuinfo() -> dict:
  """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read().split("\n\n")[0]
  except OSError:
    return {}
  return dict((k.strip(), v.strip()) for k, _, v in
              (line.partition(":") for line in text.splitlines()) if k.strip())


def cpu_model_key(info: dict | None = None):
  """(vendor_id, cpu family, model) of this host, the key of ``CPU_PEAK_FLOPS_PER_CORE``."""
  info = _cpuinfo() if info is None else info
  try:
    return info["vendor_id"], int(info["cpu family"]), int(info["model"])
  except (KeyError, ValueError):
    return None


def cpu_peak_flops(cpus: int | None = None) -> tuple[float, str]:
  """(float32 FLOP/s of the ``cpus`` cores this process may use, where it came from): the
  fixed per-core figure of ``CPU_PEAK_FLOPS_PER_CORE`` for this CPU model, else the best of
  3 x 20 probe runs (512, 1024, 2048) measured now."""
  cpus = cpus or len(os.sched_getaffinity(0))
  key = cpu_model_key()
  if key in CPU_PEAK_FLOPS_PER_CORE:
    return (CPU_PEAK_FLOPS_PER_CORE[key] * cpus,
            f"f32 matmul, fixed figure for {key[0]} family {key[1]} model {key[2]}, {cpus} cores")
  best = max(measure_cpu_peak(size, repeats=20) for size in (512, 1024, 2048))
  return best, f"f32 matmul, best of 60 probe runs now ({cpus} cores)"


def device_peak_flops(override: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s per device, where the number came from). Accelerators: the dense bf16 spec
  of ``PEAK_FLOPS``. CPU: ``cpu_peak_flops`` split over the host's CPU devices. ``override``
  > 0 (``metrics.peak_flops_per_device``) wins."""
  if override > 0:
    return override, "config"
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak, f"{name} bf16 spec"
  if jax.default_backend() == "cpu":
    n = max(len(jax.local_devices()), 1)
    peak, source = cpu_peak_flops()
    return peak / n, source + (f" / {n} devices" if n > 1 else "")
  return 0.0, f"unknown device {kind!r}"


def median_seconds(step, n_warmup: int, n_timed: int) -> float:
  """Median wall-clock seconds of ``step()`` over ``n_timed`` calls after ``n_warmup`` untimed
  ones (benchmarks). ``step`` must wait for its own results (``jax.block_until_ready``)."""
  for _ in range(n_warmup):
    step()
  times = []
  for _ in range(n_timed):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def host_cpu_name() -> str:
  """The host CPU's model name (/proc/cpuinfo), for benchmark headers."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    import platform
    return platform.processor() or platform.machine()


def expert_load_stats(load: np.ndarray) -> dict:
  """Per-layer balance of expert token counts [layers, E]: max/mean, min/mean, entropy/log E."""
  load = np.asarray(load, np.float64)
  mean = load.mean(-1, keepdims=True).clip(min=1e-9)
  p = load / load.sum(-1, keepdims=True).clip(min=1e-9)
  entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1) / math.log(load.shape[-1])
  return {"max_over_mean": (load.max(-1, keepdims=True) / mean)[:, 0],
          "min_over_mean": (load.min(-1, keepdims=True) / mean)[:, 0], "entropy": entropy}


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


class MetricsLogger:
  """metrics.jsonl, TensorBoard events and the console line. Writes on process 0 only; every
  process may call it. Call ``compiled`` after the first (compiling) step and wrap evaluation
  and checkpoint saves in ``paused`` so tokens/s and MFU measure training steps alone."""

  def __init__(self, workdir: str, *, total_steps: int, tokens_per_step: int,
               flops_per_token: float, n_devices: int, peak_flops: float, tensorboard: bool,
               resume_step: int = 0):
    self.main = jax.process_index() == 0
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak_total = peak_flops * n_devices
    self.last_step, self.last_time = resume_step, time.perf_counter()
    self.start_step, self.start_time = resume_step, self.last_time
    self.paused_seconds = 0.0  # of the current window
    self.compile_seconds = None  # reported once, by the first record after ``compiled``
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.remote = is_remote(workdir)  # gs://: epath, and the file rewritten (no append there)
    self._lines: list[str] = []  # remote: the file's lines
    self.writer = None
    if self.main:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      self._truncate_after(resume_step)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def compiled(self, step: int) -> float:
    """Step ``step`` (finished: its results are ready) included compilation: measure
    throughput from here on, and report the compile time in the next record instead of a
    throughput for the window that held it. Returns the seconds since the window began."""
    now = time.perf_counter()
    self.compile_seconds = now - self.last_time - self.paused_seconds
    self.last_step, self.last_time, self.paused_seconds = step, now, 0.0
    self.start_step, self.start_time = step, now
    return self.compile_seconds

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside (evaluation, checkpoint saves) is not training-step time."""
    begin = time.perf_counter()
    try:
      yield
    finally:
      self.paused_seconds += time.perf_counter() - begin

  def _truncate_after(self, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint: drop their old records. A line
    cut short by a killed process is dropped too; the file is replaced atomically."""
    path = epath.Path(self.path)
    if not path.exists():
      return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
      try:
        if json.loads(line).get("step", 0) <= step:
          keep.append(line if line.endswith("\n") else line + "\n")
      except ValueError:
        continue
    if self.remote:  # an object is written whole, so replacing it is already atomic
      self._lines = keep
      path.write_text("".join(keep))
      return
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def log(self, step: int, metrics: dict) -> dict:
    """``metrics``: host values of one step's metrics. Returns the record written."""
    now = time.perf_counter()
    steps = step - self.last_step
    record = {"step": step}
    for key, value in metrics.items():
      if np.ndim(value) == 0:
        record[key] = float(value)
    if steps > 0:  # 0: the window held only the compiling step (its record has compile_time)
      step_time = max(now - self.last_time - self.paused_seconds, 1e-9) / steps
      record["step_time"] = step_time
    if steps > 0 and self.tokens_per_step:  # None: the caller reports its own throughput
      tokens_per_s = self.tokens_per_step / step_time
      record["tokens_per_s"] = tokens_per_s
      if self.peak_total > 0:
        record["mfu"] = tokens_per_s * self.flops_per_token / self.peak_total
    if self.compile_seconds is not None:
      record["compile_time"] = self.compile_seconds
      self.compile_seconds = None
    self.last_step, self.last_time, self.paused_seconds = step, now, 0.0
    if "expert_load" in metrics:
      load = expert_load_stats(metrics["expert_load"])
      record["moe_load_max_over_mean"] = float(load["max_over_mean"].max())
      record["moe_load_min_over_mean"] = float(load["min_over_mean"].min())
      record["moe_load_entropy"] = float(load["entropy"].mean())
      # this step's assignments per expert [MoE layers][E] (the load heat map of the studies)
      record["moe_load"] = np.asarray(metrics["expert_load"], np.float64).round(3).tolist()
    if self.main:
      per_layer = {}
      if "expert_load" in metrics:
        for stat, values in expert_load_stats(metrics["expert_load"]).items():
          per_layer.update({f"moe_layer_{layer}/{stat}": float(v)
                            for layer, v in enumerate(values)})
      self._write(record, per_layer)
      print(self.console_line(record), flush=True)
    return record

  def _write(self, record: dict, extra_scalars: dict | None = None) -> None:
    """Append ``record`` to metrics.jsonl; its scalars (and ``extra_scalars``) to TensorBoard."""
    line = json.dumps(record) + "\n"
    if self.remote:
      self._lines.append(line)
      epath.Path(self.path).write_text("".join(self._lines))
    else:
      with open(self.path, "a") as f:
        f.write(line)
    if self.writer is not None:
      for key, value in {**record, **(extra_scalars or {})}.items():
        if key != "step" and np.ndim(value) == 0:
          self.writer.add_scalar(key, value, record["step"])
      self.writer.flush()

  def log_eval(self, step: int, result: dict) -> dict:
    """A held-out evaluation at ``step`` (``result``: loss, perplexity, tokens) as its own
    metrics.jsonl record ``{"step", "eval_loss", "eval_perplexity", "eval_tokens"}`` and
    TensorBoard scalars. Returns the record."""
    record = {"step": step, **{f"eval_{k}": v for k, v in result.items() if k != "step"}}
    if self.main:
      self._write(record)
    return record

  def console_line(self, r: dict) -> str:
    step, total = r["step"], self.total_steps
    width = 20
    filled = int(width * step / total)
    elapsed = time.perf_counter() - self.start_time
    done = max(step - self.start_step, 1)
    eta = elapsed / done * (total - step)
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}",
             f"loss {r['loss']:.4f}", f"ce {r['ce']:.4f}"]
    if "mtp_ce" in r:
      parts.append(f"mtp {r['mtp_ce']:.3f}")
    balance = sum(r.get(k, 0.0) for k in ("expert_balance", "device_balance", "comm_balance"))
    if "moe_load_max_over_mean" in r:
      parts.append(f"bal {balance:.1e} load max/mean {r['moe_load_max_over_mean']:.2f}")
    if r.get("dropped_fraction"):
      parts.append(f"drop {100 * r['dropped_fraction']:.1f}%")
    if "dispatch_per_token" in r:
      parts.append(f"EP rows/tok {r['dispatch_per_token']:.2f}")
    if r.get("overflow"):
      parts.append(f"OVERFLOW {int(r['overflow'])}")
    parts.append(f"gnorm {r['grad_norm']:.2f}")
    if "learning_rate" in r:
      parts.append(f"lr {r['learning_rate']:.2e}")
    if "tokens_per_s" in r:
      parts.append(f"{r['tokens_per_s']:,.0f} tok/s {r['step_time']:.2f} s/step")
    else:
      parts.append(f"compiled in {r['compile_time']:.1f} s")
    if "mfu" in r:
      parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"eta {_fmt_time(eta)}")
    return " | ".join(parts)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def say(message: str) -> None:
  """Print on process 0 only."""
  if jax.process_index() == 0:
    print(message, file=sys.stdout, flush=True)


if __name__ == "__main__":
  # Measure this host's row of CPU_PEAK_FLOPS_PER_CORE (run it on an idle machine).
  cpus = len(os.sched_getaffinity(0))
  best = max(measure_cpu_peak(size, repeats=20) for size in (512, 1024, 2048) for _ in range(3))
  print(f"{cpu_model_key()}: {best / cpus / 1e9:.0f}e9,  # {host_cpu_name()}, {cpus} cores, "
        f"best f32 matmul {best / 1e12:.3f} TFLOP/s")
