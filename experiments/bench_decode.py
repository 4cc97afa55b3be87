r"""Decode throughput and KV-cache size: MLA's absorbed latent cache vs expanded K/V caches.

    python experiments/bench_decode.py                        # small preset, 512 / 2K / 8K
    python experiments/bench_decode.py --contexts=512 --steps=8 --batch=4   # quick look

Variants (same model size: d_model, layers, experts and head dims are shared):
  mla-absorbed   MLA, latent cache [c_KV; k_R], W_UK absorbed into q, W_UV after attention
  mla-expanded   MLA, per-head K/V cache (what MLA costs without latent caching)
  mha            multi-head attention baseline, per-head K/V cache
  gqa            grouped-query baseline (n_heads / 4 KV heads), per-head K/V cache

Each variant decodes ``--steps`` tokens per row in one compiled loop over a cache of
``context`` slots, the loop ``generate()`` runs, and reports tokens/s (batch * steps / time,
the best of ``--repeats``). Cache bytes are measured on the cache arrays and checked against
``analytics.kv_cache_bytes_per_token``; the script fails if they differ.
"""

from __future__ import annotations

import functools
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import analytics
from deepseek_jax.config import ModelConfig
from deepseek_jax.model.transformer import create_model, init_cache
from deepseek_jax.train.metrics import host_cpu_name

_PRESET = flags.DEFINE_string("preset", "small", "model preset")
_CONTEXTS = flags.DEFINE_list("contexts", ["512", "2048", "8192"], "cache lengths (tokens)")
_BATCH = flags.DEFINE_integer("batch", 8, "rows decoded together")
_STEPS = flags.DEFINE_integer("steps", 16, "decode steps timed per run")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs; the best is reported")
_DTYPE = flags.DEFINE_string("dtype", None, "activation/cache dtype (default: the preset's)")

VARIANTS = {
    "mla-absorbed": (dict(), "latent", True),
    "mla-expanded": (dict(), "expanded", False),
    "mha": (dict(attention_kind="mha"), "expanded", False),
    "gqa": (None, "expanded", False),  # n_kv_heads filled in from the preset
}


def hardware() -> str:
  device = jax.devices()[0]
  return (f"{device.platform}:{device.device_kind} x{jax.device_count()} | "
          f"host CPU {host_cpu_name()}, "
          f"{os.cpu_count()} cores | jax {jax.__version__}")


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "absorb"), donate_argnums=(2,))
def decode_loop(graphdef, state, cache, start, *, steps, absorb):
  """``steps`` greedy decode steps carrying the cache, as generate()'s loop does."""
  model = nnx.merge(graphdef, state)
  batch = start.shape[0]

  def step(i, carry):
    cache, token = carry
    out = model(token[:, None], cache=cache, cache_index=start + i, absorb=absorb)
    return out.cache, jnp.argmax(out.logits[:, 0], -1).astype(jnp.int32)

  cache, token = jax.lax.fori_loop(0, steps, step, (cache, jnp.zeros(batch, jnp.int32)))
  return cache, token


def bench(cfg: ModelConfig, kind: str, absorb: bool, context: int) -> tuple[float, int, int]:
  """Returns (tokens/s, measured cache bytes, formula cache bytes)."""
  batch, steps = _BATCH.value, _STEPS.value
  graphdef, state = nnx.split(create_model(cfg))
  cache = init_cache(cfg, batch, context, kind)
  measured = analytics.cache_bytes(cache)
  formula = (analytics.kv_cache_bytes_per_token(cfg, kind, jnp.dtype(cfg.dtype).itemsize)
             * batch * context)
  start = jnp.full((batch,), context - steps, jnp.int32)  # the last `steps` slots of a full cache
  cache, token = decode_loop(graphdef, state, cache, start, steps=steps, absorb=absorb)  # compile
  token.block_until_ready()
  best = float("inf")
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    cache, token = decode_loop(graphdef, state, cache, start, steps=steps, absorb=absorb)
    token.block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return batch * steps / best, measured, formula


def main(argv):
  del argv
  base = ModelConfig.preset(_PRESET.value)
  if _DTYPE.value:
    base = base.replace(dtype=_DTYPE.value)
  contexts = [int(c) for c in _CONTEXTS.value]
  base = base.replace(max_seq_len=max(base.max_seq_len, max(contexts)))
  print(f"# bench_decode: preset={base.name} dtype={base.dtype} batch={_BATCH.value} "
        f"steps={_STEPS.value}")
  print(f"# hardware: {hardware()}")
  header = f"{'variant':<14}{'context':>8}{'tokens/s':>12}{'cache MiB':>11}{'B/token':>10}{'vs MLA':>8}"
  print(header)
  print("-" * len(header))
  for context in contexts:
    mla_bytes = None
    for name, (overrides, kind, absorb) in VARIANTS.items():
      if overrides is None:
        overrides = dict(attention_kind="gqa", n_kv_heads=max(1, base.n_heads // 4))
      cfg = base.replace(**overrides)
      tps, measured, formula = bench(cfg, kind, absorb, context)
      if measured != formula:
        raise SystemExit(f"{name}: measured cache {measured} B != formula {formula} B")
      mla_bytes = mla_bytes or measured
      per_token = measured // (_BATCH.value * context)
      print(f"{name:<14}{context:>8}{tps:>12.1f}{measured / 2**20:>11.1f}{per_token:>10}"
            f"{measured / mla_bytes:>7.1f}x", flush=True)
  print("cache bytes: measured on the arrays == analytics formula for every row")


if __name__ == "__main__":
  from deepseek_jax.cli import use_huge_pages
  use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main)
