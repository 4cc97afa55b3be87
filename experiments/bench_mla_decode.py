r"""Paged MLA decode on GPU: Pallas kernel vs the XLA reference, at FlashMLA's benchmark shapes.

    python experiments/bench_mla_decode.py         # b 128, s_k 4K/8K, h_q 16..128, s_q 1/2
    python experiments/bench_mla_decode.py --heads=128 --s_q=2 --seq_lens=8192 --lengths=fixed
    python experiments/bench_mla_decode.py --quick              # one small shape (CPU: interpret)

Shapes follow FlashMLA's tests: batch 128, cache length s_k in {4096, 8192}, h_q in {16, 32,
64, 128} query heads sharing one latent KV head (C 512 + R 64), s_q in {1, 2} (2 = MTP
verification), a paged bf16 cache with 64-slot pages in shuffled order. ``--lengths=varlen``
draws each row's length uniformly from [s_k/2, s_k] (seed 0); ``fixed`` gives every row s_k.

Per shape it prints the kernel's median time (after warm-up, block_until_ready), its achieved
bandwidth (latent bytes actually read, sum(lengths) * (C + R) * 2, plus q and out bytes) and
attention TFLOP/s (2 * s_q * h_q * sum(lengths) * (C + R + C)), the same bandwidth as a % of the
GPU's measured copy bandwidth (-x over a 2 GiB array, read + write bytes / time), and the jitted
`mla_decode_reference` (which first gathers the pages into contiguous rows) with the speed-up.
On a machine without a GPU the kernels run in Pallas interpret mode; use that only with --quick.
"""

from __future__ import annotations

import importlib

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.train.metrics import median_seconds
from pallas_kernels.mla_decode import kernel_gpu
from pallas_kernels.mla_decode.reference import mla_decode_reference

_IMPL = flags.DEFINE_enum("impl", "both", ["triton", "mosaic", "both"],
                          "kernel(s) to time; 'both' times the ones that are available")
_BATCH = flags.DEFINE_integer("batch", 128, "rows")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "8192"], "cache lengths s_k")
_HEADS = flags.DEFINE_list("heads", ["16", "32", "64", "128"], "query heads h_q")
_S_Q = flags.DEFINE_list("s_q", ["1", "2"], "new tokens per row")
_LENGTHS = flags.DEFINE_enum("lengths", "both", ["varlen", "fixed", "both"], "row lengths")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed runs; the median is reported")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed runs first")
_NUM_SPLITS = flags.DEFINE_integer("num_splits", None, "kv splits (default: heuristic)")
_BLOCK_H = flags.DEFINE_integer("block_h", None, "query rows per program (default: heuristic)")
_REFERENCE = flags.DEFINE_bool("reference", True, "also time the XLA reference")
_QUICK = flags.DEFINE_bool("quick", False, "one small shape, for a smoke run")

WIDTH, ROPE, PAGE = 512, 64, 64


def kernels(interpret: bool) -> dict:
  """name -> decode(q, c_pages, r_pages, lengths, table, scale) for the requested impls."""
  names = ["triton", "mosaic"] if _IMPL.value == "both" else [_IMPL.value]
  found = {}
  for name in names:
    try:  # the Mosaic GPU kernel is optional
      module = kernel_gpu if name == "triton" else importlib.import_module(
          "pallas_kernels.mla_decode.kernel_mgpu")
    except ImportError as e:
      print(f"# {name}: not available ({e})")
      continue
    if name == "mosaic" and interpret:
      print("# mosaic: skipped without a GPU (needs Hopper)")
      continue

    def decode(q, c, r, lengths, table, scale, module=module):
      return module.mla_decode(q, c, r, lengths, table, softmax_scale=scale,
                               num_splits=_NUM_SPLITS.value, block_h=_BLOCK_H.value,
                               interpret=interpret)

    found[name] = jax.jit(decode, static_argnums=5)
  return found


def timed(fn, *args) -> float:
  """Median seconds of fn(*args) after warm-up."""
  return median_seconds(lambda: jax.block_until_ready(fn(*args)), _WARMUP.value, _REPEATS.value)


def copy_bandwidth(n_bytes: int) -> float:
  """Bytes/s of an elementwise pass over an n_bytes array (read + write), like a device copy."""
  x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
  seconds = timed(jax.jit(lambda a: -a), x)
  return 2 * n_bytes / seconds


def make_inputs(batch, seq_len, heads, s_q, varlen, seed=0):
  """bf16 q and a shuffled paged cache holding `batch` rows of up to seq_len slots."""
  rng = np.random.default_rng(seed)
  if varlen:
    lengths = rng.integers(seq_len // 2, seq_len + 1, size=batch)
  else:
    lengths = np.full(batch, seq_len)
  per_row = -(-seq_len // PAGE)
  table = rng.permutation(batch * per_row).reshape(batch, per_row).astype(np.int32)
  keys = jax.random.split(jax.random.key(seed), 3)
  n_pages = batch * per_row
  q = jax.random.normal(keys[0], (batch, s_q, heads, WIDTH + ROPE), jnp.bfloat16)
  c_pages = jax.random.normal(keys[1], (n_pages, PAGE, WIDTH), jnp.bfloat16)
  r_pages = jax.random.normal(keys[2], (n_pages, PAGE, ROPE), jnp.bfloat16)
  return q, c_pages, r_pages, jnp.asarray(lengths, jnp.int32), jnp.asarray(table)


def main(argv):
  del argv
  device = jax.devices()[0]
  interpret = device.platform != "gpu"
  print(f"# device: {device.platform}:{device.device_kind} | jax {jax.__version__}"
        f"{' | interpret mode (no GPU)' if interpret else ''}")
  if _QUICK.value:
    batch, seq_lens, heads, s_qs = 2, [256], [16], [1, 2]
    lengths_modes = [True]
  else:
    batch, seq_lens = _BATCH.value, [int(s) for s in _SEQ_LENS.value]
    heads, s_qs = [int(h) for h in _HEADS.value], [int(s) for s in _S_Q.value]
    lengths_modes = {"varlen": [True], "fixed": [False], "both": [True, False]}[_LENGTHS.value]
  if interpret and not _QUICK.value:
    print("# warning: no GPU, interpret mode at full size will take very long")
  copy_bps = None if interpret else copy_bandwidth(2 << 30)
  if copy_bps:
    print(f"# measured copy bandwidth: {copy_bps / 1e9:.0f} GB/s (read + write)")
  decoders = kernels(interpret)
  reference = jax.jit(mla_decode_reference, static_argnames=("softmax_scale", "causal"))
  scale = (WIDTH // 4 + ROPE) ** -0.5  # V3's d_h + d_R = 192 (before YaRN's mscale)

  print(f"{'impl':7} {'b':>4} {'s_k':>5} {'len':6} {'h_q':>4} {'s_q':>3} {'ms':>8} {'GB/s':>7} "
        f"{'TFLOP/s':>8} {'%copy':>6} {'xla ms':>8} {'speedup':>7}")
  for seq_len in seq_lens:
    for varlen in lengths_modes:
      for n_heads in heads:
        for s_q in s_qs:
          args = make_inputs(batch, seq_len, n_heads, s_q, varlen)
          q, lengths = args[0], args[3]
          total = int(jnp.sum(lengths))
          n_bytes = total * (WIDTH + ROPE) * 2 + q.size * 2 + q.size // (WIDTH + ROPE) * WIDTH * 2
          flops = 2 * s_q * n_heads * total * (WIDTH + ROPE + WIDTH)
          xla = timed(lambda *a: reference(*a, softmax_scale=scale), *args) \
              if _REFERENCE.value else float("nan")
          for name, decode in decoders.items():
            seconds = timed(decode, *args, scale)
            pct = f"{100 * n_bytes / seconds / copy_bps:5.1f}%" if copy_bps else "   n/a"
            print(f"{name:7} {batch:4d} {seq_len:5d} {'varlen' if varlen else 'fixed':6} "
                  f"{n_heads:4d} {s_q:3d} {seconds * 1e3:8.3f} {n_bytes / seconds / 1e9:7.1f} "
                  f"{flops / seconds / 1e12:8.2f} {pct:>6} {xla * 1e3:8.3f} "
                  f"{xla / seconds:6.2f}x", flush=True)
          if _QUICK.value:  # a smoke run also checks the numbers
            out, lse = next(iter(decoders.values()))(*args, scale) if decoders else (None, None)
            want_out, want_lse = reference(*args, softmax_scale=scale)
            if out is not None:
              print(f"#   max |out - reference| {float(jnp.max(jnp.abs(out - want_out))):.3g}, "
                    f"max |lse - reference| {float(jnp.max(jnp.abs(lse - want_lse))):.3g}")


if __name__ == "__main__":
  from deepseek_jax.cli import use_huge_pages
  use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main)
