r"""Compiled memory of the train step per matmul format, with and without FP8 input caching
(DeepSeek-V3 §3.3.4: the linear layers' inputs kept for the backward pass in FP8).

    python experiments/bench_fp8_memory.py                       # small, 8 x 256, bfloat16
    python experiments/bench_fp8_memory.py --preset=tiny --dtype=float32

Compiles (does not run) the one train step (forward, backward, AdamW) of ``--preset`` for each
of bf16, fp8_blockwise and fp8_tensorwise, the FP8 ones with ``fp8_cache_inputs`` off and on,
and prints XLA's ``memory_analysis`` of each program: temp bytes (activations kept for the
backward pass and scratch), and the arguments (parameters, optimizer state, batch) for
reference. On CPU the FP8 GEMMs are the f32 emulation of ``quant.fp8``, so the numbers measure
what the backward pass keeps, not a kernel's workspace.
"""

from __future__ import annotations

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "small", "model preset")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences per step")
_SEQ = flags.DEFINE_integer("seq_len", 256, "tokens per sequence")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "activation / matmul dtype")

VARIANTS = (("bf16", False), ("fp8_blockwise", False), ("fp8_blockwise", True),
            ("fp8_tensorwise", False), ("fp8_tensorwise", True))


def compiled_memory(fmt: str, cache: bool) -> dict:
  """XLA's memory analysis of the compiled train step for one variant (bytes)."""
  from deepseek_jax.config import ModelConfig
  from deepseek_jax.train.step import benchmark_train_step

  cfg = ModelConfig.preset(_PRESET.value, dtype=_DTYPE.value, matmul_format=fmt,
                           fp8_cache_inputs=cache,
                           max_seq_len=max(ModelConfig.preset(_PRESET.value).max_seq_len,
                                           _SEQ.value))
  step, state, batch = benchmark_train_step(cfg, _BATCH.value, _SEQ.value)
  mem = step.lower(state, batch).compile().memory_analysis()
  return {"temp": mem.temp_size_in_bytes, "arguments": mem.argument_size_in_bytes}


def main(argv):
  del argv
  import jax
  rows = []
  for fmt, cache in VARIANTS:
    rows.append((fmt, cache, compiled_memory(fmt, cache)))
    print(f"compiled {fmt} cache_inputs={cache}", flush=True)
  base = rows[0][2]["temp"]
  print(f"\n{_PRESET.value}, batch {_BATCH.value} x {_SEQ.value}, dtype {_DTYPE.value}, "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}\n")
  print("| matmul_format | fp8_cache_inputs | temp MiB | vs bf16 | arguments MiB |")
  print("|---|---|---|---|---|")
  for fmt, cache, m in rows:
    print(f"| {fmt} | {'on' if cache else 'off'} | {m['temp'] / 2**20:.1f} | "
          f"{m['temp'] / base:.2f}x | {m['arguments'] / 2**20:.1f} |")


if __name__ == "__main__":
  from deepseek_jax.cli import use_huge_pages
  use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main)
