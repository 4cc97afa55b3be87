r"""DeepSeek-V3's block-scaled FP8 GEMM on a Hopper GPU: the Pallas Mosaic GPU kernel against a
BF16 ``jnp.dot``, fp8.py's XLA emulation, and DeepGEMM's published figures.

    python experiments/bench_fp8_gemm.py                    # M 128 / 4096 x V3's four (N, K)
    python experiments/bench_fp8_gemm.py --m=4096 --shapes=7168:16384 --block_n=128 --stages=5
    python experiments/bench_fp8_gemm.py --grouped          # + DeepGEMM's MoE contiguous shapes

Shapes: M in {128, 4096} (a decode batch, a prefill / training chunk) times (N, K) in
{(7168, 2048), (4096, 7168), (24576, 1536), (7168, 16384)}: V3's dense GEMMs as DeepGEMM
benchmarks them (no tensor parallelism). Operands are random: x [M, K] bf16 quantised in 1x128
tiles, w [K, N] bf16 (std 0.02) in 128x128 blocks (``deepseek_jax.quant.fp8``), the weight then
converted once to the kernel's [N, K] layout (not timed). Per shape the table shows TFLOP/s
(2 M N K over the device time) of:
  fp8      ``pallas_kernels.fp8_gemm.kernel_mgpu.fp8_gemm`` (bf16 out), the best --block_n
           (shown in brackets); its wrapper's small ops (the row scales' transpose) are timed too;
  bf16     ``jnp.dot`` of the bf16 operands (XLA: cuBLAS), bf16 out;
  xla-fp8  ``fp8.scaled_dot``: the same block-scaled GEMM in XLA (E4M3 dot_general per 128-K
           slice + f32 promotion), n/a when its [M, K/128, N] f32 partials exceed
           --emulation_max_gib;
  fp8/bf16 the kernel's speed-up over BF16, and err, DeepGEMM's relative error
           1 - 2 sum(x y) / sum(x^2 + y^2) of the kernel against xla-fp8 (Hopper keeps ~14 bits
           inside a slice's FP8 accumulation, V3 §3.3.2, and the output is rounded to bf16);
  DeepGEMM and % of it: DeepGEMM's published TFLOPS for the shape.

DeepGEMM's figures are the "Normal GEMMs for dense models" and "Grouped GEMMs for MoE models
(contiguous layout)" tables of its README (github.com/deepseek-ai/DeepGEMM, README.md at commit
327ec92f6977e7fee022cb76a8f273b75483c3d8, 2025-04-09, the last version with the tables; measured
on H800 SXM5 with NVCC 12.8). The first release (commit a6d97a1, 2025-02-25) reported lower
large-M numbers, e.g. 1358 TFLOPS at M 4096, N 7168, K 16384, against 1520 here. H800 has
H100's SMs and clocks (the same 1979 dense FP8 TFLOPS) but 3.35 TB/s of HBM3; an H200 has
4.8 TB/s, so the memory-bound M = 128 rows can exceed 100% there without the kernel being better.

Timing: CUPTI kernel time (``jax.experimental.mosaic.gpu.profiler``) of each call, median over
--repeats after --warmup, with L2 flushed (a 1 GiB read + write) before each timed call, as
DeepGEMM's benchmark does; wall clock around ``block_until_ready`` (dispatch included) where
CUPTI is unavailable, as the header says. Without a Hopper GPU the script exits with one line.
"""

from __future__ import annotations

import statistics
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from deepseek_jax.quant import fp8
from pallas_kernels.fp8_gemm import kernel_mgpu

_M = flags.DEFINE_list("m", ["128", "4096"], "rows M")
_SHAPES = flags.DEFINE_list("shapes", ["7168:2048", "4096:7168", "24576:1536", "7168:16384"],
                            "N:K pairs")
_BLOCK_N = flags.DEFINE_list("block_n", ["64", "128"], "kernel tile widths to try (best shown)")
_STAGES = flags.DEFINE_integer("stages", None, "ring slots (default: the most that fit)")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed calls; the median is reported")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed calls first")
_EMULATION = flags.DEFINE_bool("emulation", True, "also time fp8.scaled_dot (XLA)")
_EMULATION_MAX_GIB = flags.DEFINE_float("emulation_max_gib", 20.0,
                                        "skip the XLA emulation above this many GiB of partials")
_GROUPED = flags.DEFINE_bool("grouped", False, "also time the grouped (MoE) kernel")

# DeepGEMM README @ 327ec92 (H800 SXM5): dense (M, N, K) and grouped (groups, M per group, N, K).
DEEPGEMM_DENSE = {
    (128, 7168, 2048): 510, (128, 4096, 7168): 533, (128, 24576, 1536): 535,
    (128, 7168, 16384): 645, (4096, 7168, 2048): 1168, (4096, 4096, 7168): 1410,
    (4096, 24576, 1536): 1212, (4096, 7168, 16384): 1520,
}
DEEPGEMM_GROUPED = {
    (4, 8192, 4096, 7168): 1346, (4, 8192, 7168, 2048): 1214,
    (8, 4096, 4096, 7168): 1346, (8, 4096, 7168, 2048): 1214,
}


def no_hopper_reason() -> str | None:
  """None on a Hopper GPU, else one line saying what is missing."""
  try:
    device = jax.devices()[0]
  except RuntimeError as e:  # a requested backend that failed to start
    return f"no JAX device ({e})"
  if device.platform != "gpu":
    return (f"no GPU (JAX's default backend is {device.platform}); this benchmark needs a "
            "Hopper GPU (sm_90a)")
  capability = str(getattr(device, "compute_capability", "9.0"))
  if capability != "9.0":
    return f"{device.device_kind} is sm_{capability.replace('.', '')}: the kernel needs sm_90a"
  return None


class Timer:
  """Median device milliseconds of fn(*args): CUPTI where it works, else wall clock."""

  def __init__(self, warmup: int, repeats: int):
    self.warmup, self.repeats = warmup, repeats
    self.flush_buffer = jnp.zeros((1 << 28,), jnp.float32)  # 1 GiB: several times any L2
    self.flush = jax.jit(lambda x: x + 1.0)
    try:
      from jax.experimental.mosaic.gpu import profiler
      _, ms = profiler.measure(jax.jit(lambda x: x * 2.0))(jnp.ones((1024,)))
      self.profiler = profiler if ms is not None else None
    except Exception as e:  # no CUPTI in this install
      print(f"# CUPTI unavailable ({type(e).__name__}: {e}); timing with the wall clock")
      self.profiler = None
    self.name = "CUPTI kernel time, L2 flushed" if self.profiler else "wall clock, L2 flushed"

  def __call__(self, fn, *args) -> float:
    for _ in range(self.warmup):
      jax.block_until_ready(fn(*args))
    times = []
    for _ in range(self.repeats):
      self.flush_buffer = jax.block_until_ready(self.flush(self.flush_buffer))
      if self.profiler is not None:
        _, ms = self.profiler.measure(fn)(*args)
      else:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ms = (time.perf_counter() - start) * 1e3
      times.append(ms)
    return statistics.median(times)


def dense_operands(m: int, n: int, k: int, seed: int = 0):
  """bf16 x [M, K], w [K, N] and their FP8 forms: (x, w, qa, sa, qw, sw, qb, sb)."""
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k), jnp.bfloat16)
  w = (jax.random.normal(kw, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
  qa, sa = jax.jit(fp8.quantize_tiles)(x)
  qw, sw = jax.jit(fp8.quantize_blocks)(w)
  qb, sb = jax.jit(kernel_mgpu.weight_from_kn)(qw, sw)
  return x, w, qa, sa, qw, sw, qb, sb


def tflops(m: int, n: int, k: int, ms: float) -> float:
  return 2 * m * n * k / (ms * 1e-3) / 1e12


def fmt(value: float | None, spec: str = ".0f") -> str:
  return "n/a" if value is None else format(value, spec)


def best_kernel_ms(timer, make_fn, args):
  """(ms, block_n) of the fastest --block_n; a block_n the kernel refuses is skipped."""
  best = (None, None)
  for block_n in (int(b) for b in _BLOCK_N.value):
    try:
      ms = timer(make_fn(block_n), *args)
    except ValueError as e:
      print(f"# block_n={block_n}: {e}")
      continue
    if best[0] is None or ms < best[0]:
      best = (ms, block_n)
  return best


def dense_rows(timer):
  bf16_dot = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.bfloat16))
  emulation = jax.jit(lambda qa, sa, qw, sw: fp8.scaled_dot(
      qa, sa, qw, jnp.repeat(sw, fp8.BLOCK, axis=1)))
  print("| M | N | K | fp8 TFLOP/s [block_n] | bf16 TFLOP/s | fp8/bf16 | xla-fp8 TFLOP/s | err "
        "| DeepGEMM (H800) | % of DeepGEMM |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for m in (int(v) for v in _M.value):
    for shape in _SHAPES.value:
      n, k = (int(v) for v in shape.split(":"))
      x, w, qa, sa, qw, sw, qb, sb = dense_operands(m, n, k)
      make = lambda block_n: jax.jit(lambda qa, sa, qb, sb: kernel_mgpu.fp8_gemm(
          qa, sa, qb, sb, block_n=block_n, stages=_STAGES.value))
      fp8_ms, block_n = best_kernel_ms(timer, make, (qa, sa, qb, sb))
      bf16_ms = timer(bf16_dot, x, w)
      partial_gib = m * (k // fp8.BLOCK) * n * 4 / 2 ** 30
      emulate = _EMULATION.value and partial_gib <= _EMULATION_MAX_GIB.value
      xla_ms = timer(emulation, qa, sa, qw, sw) if emulate else None
      error = None
      if emulate and block_n is not None:
        error = fp8.relative_error(make(block_n)(qa, sa, qb, sb), emulation(qa, sa, qw, sw))
      fp8_tf = None if fp8_ms is None else tflops(m, n, k, fp8_ms)
      bf16_tf = tflops(m, n, k, bf16_ms)
      xla_tf = None if xla_ms is None else tflops(m, n, k, xla_ms)
      published = DEEPGEMM_DENSE.get((m, n, k))
      print(f"| {m} | {n} | {k} | {fmt(fp8_tf)} [{block_n}] | {bf16_tf:.0f} | "
            f"{fmt(fp8_tf and fp8_tf / bf16_tf, '.2f')} | {fmt(xla_tf)} | {fmt(error, '.1e')} | "
            f"{fmt(published)} | "
            f"{fmt(fp8_tf and published and 100 * fp8_tf / published, '.0f')}% |", flush=True)


def grouped_rows(timer):
  print("\n| groups | M per group | N | K | fp8 TFLOP/s [block_n] | bf16 TFLOP/s | fp8/bf16 | "
        "DeepGEMM (H800) | % of DeepGEMM |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  # bf16 baseline: the same equal-sized groups as one batched dot (XLA: cuBLAS).
  bf16_batched = jax.jit(lambda x, w: jnp.einsum("gmk,gkn->gmn", x, w,
                                                 preferred_element_type=jnp.bfloat16))
  for (groups, per_group, n, k), published in DEEPGEMM_GROUPED.items():
    m = groups * per_group
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (groups, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    qa, sa = jax.jit(fp8.quantize_tiles)(x)
    qw, sw = jax.jit(jax.vmap(fp8.quantize_blocks))(w)
    qb, sb = jax.jit(kernel_mgpu.weight_from_kn)(qw, sw)
    tile_groups = jnp.repeat(jnp.arange(groups, dtype=jnp.int32), per_group // 128)
    make = lambda block_n: jax.jit(lambda *a: kernel_mgpu.fp8_grouped_gemm(
        *a, block_n=block_n, stages=_STAGES.value))
    fp8_ms, block_n = best_kernel_ms(timer, make, (qa, sa, qb, sb, tile_groups))
    bf16_ms = timer(bf16_batched, x.reshape(groups, per_group, k), w)
    fp8_tf = None if fp8_ms is None else tflops(m, n, k, fp8_ms)
    bf16_tf = tflops(m, n, k, bf16_ms)
    print(f"| {groups} | {per_group} | {n} | {k} | {fmt(fp8_tf)} [{block_n}] | {bf16_tf:.0f} | "
          f"{fmt(fp8_tf and fp8_tf / bf16_tf, '.2f')} | {published} | "
          f"{fmt(fp8_tf and 100 * fp8_tf / published, '.0f')}% |", flush=True)


def main(argv):
  del argv
  reason = no_hopper_reason()
  if reason is not None:
    sys.exit(f"bench_fp8_gemm: {reason}.")
  device = jax.devices()[0]
  timer = Timer(_WARMUP.value, _REPEATS.value)
  print(f"# device: {device.device_kind} ({device.core_count} SMs) | jax {jax.__version__} | "
        f"{timer.name}, median of {_REPEATS.value}")
  print("# DeepGEMM: README @ 327ec92 (2025-04-09), H800 SXM5; see this script's docstring")
  dense_rows(timer)
  if _GROUPED.value:
    grouped_rows(timer)


if __name__ == "__main__":
  app.run(main)
