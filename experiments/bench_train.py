r"""Training throughput: tokens/s, step time, peak memory and MFU of our jitted train step, and
HuggingFace transformers' DeepseekV3ForCausalLM (torch) on the same config and batch.

    python experiments/bench_train.py                                   # tiny, 8 x 128, ours vs HF
    python experiments/bench_train.py --preset=small --batch=8 --seq_len=256
    python experiments/bench_train.py --preset=small --hf=False --dtype=bfloat16   # accelerator

Both sides run a full step (forward, backward, AdamW(0.9, 0.95, wd 0.1)) on the same random
tokens, in separate processes one after the other, each using every core. MTP is off by default
because HF has no MTP module (--mtp adds ours). Reported: median step time over --steps after
--warmup steps, tokens/s = batch * seq_len / step time, peak memory (device peak on
accelerators, process max RSS on CPU), MFU from analytics.train_flops_per_token.
The HF side needs `pip install -e ".[hf]"`.
"""

from __future__ import annotations

import ast
import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "tiny", "model preset")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences per step")
_SEQ = flags.DEFINE_integer("seq_len", 128, "tokens per sequence")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps (compilation, allocator warm-up)")
_MTP = flags.DEFINE_bool("mtp", False, "keep our MTP module (HF has none)")
_HF = flags.DEFINE_bool("hf", True, "also time HF transformers (torch, CPU)")
_DTYPE = flags.DEFINE_string("dtype", None, "our activation dtype (default: the preset's)")
_SET = flags.DEFINE_multi_string("set", [], "a ModelConfig override field=value for our side, "
                                  "e.g. --set=scan_layers=False (repeatable)")
_ONLY = flags.DEFINE_enum("only", None, ["jax", "hf"], "internal: run one side, print JSON")


def _model_config():
  from deepseek_jax.config import ModelConfig
  overrides = dict(max_seq_len=max(ModelConfig.preset(_PRESET.value).max_seq_len, _SEQ.value))
  if not _MTP.value:
    overrides["n_mtp_modules"] = 0
  if _DTYPE.value:
    overrides["dtype"] = _DTYPE.value
  for item in _SET.value:
    field, sep, value = item.partition("=")
    if not sep or field not in ModelConfig.__dataclass_fields__:
      raise SystemExit(f"error: --set={item!r}: expected field=value with a ModelConfig field")
    try:
      overrides[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[field] = value  # a bare string such as tiled
  return ModelConfig.preset(_PRESET.value, **overrides)


def _tokens(vocab: int):
  import numpy as np
  return np.random.default_rng(0).integers(3, vocab, (_BATCH.value, _SEQ.value + 1)).astype(np.int32)


def run_jax() -> dict:
  from deepseek_jax.cli import set_cpu_xla_flags
  set_cpu_xla_flags()  # the same XLA flags as experiments/train.py
  import jax
  from deepseek_jax.train.metrics import median_seconds
  from deepseek_jax.train.optimizer import piecewise_constant
  from deepseek_jax.train.step import StepOptions, benchmark_train_step

  cfg = _model_config()
  step_fn, state, batch = benchmark_train_step(
      cfg, _BATCH.value, _SEQ.value,
      options=StepOptions(router_bias_rate=piecewise_constant(((0, 0.001),))))
  holder = {"state": state}

  def step():
    holder["state"], metrics = step_fn(holder["state"], batch)
    jax.block_until_ready(metrics)

  t0 = time.perf_counter()
  step()
  compile_s = time.perf_counter() - t0
  step_s = median_seconds(step, _WARMUP.value - 1, _STEPS.value)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return dict(step_s=step_s, first_step_s=compile_s, peak_bytes=peak,
              peak_kind="device" if "peak_bytes_in_use" in stats else "process RSS",
              devices=jax.device_count(), device=jax.devices()[0].device_kind,
              platform=jax.default_backend(), jax=jax.__version__)


def run_hf() -> dict:
  import torch
  from transformers import DeepseekV3ForCausalLM
  from deepseek_jax.interop.hf_config import to_hf_v3_config
  from deepseek_jax.train.metrics import median_seconds

  cfg = _model_config()
  torch.manual_seed(0)
  model = DeepseekV3ForCausalLM(to_hf_v3_config(cfg))
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
  ids = torch.from_numpy(_tokens(cfg.vocab_size)[:, :-1].astype("int64"))

  def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return dict(step_s=median_seconds(step, _WARMUP.value, _STEPS.value), peak_bytes=resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss * 1024, peak_kind="process RSS", torch=torch.__version__,
              threads=torch.get_num_threads(),
              params=sum(p.numel() for p in model.parameters()))


def _child(side: str) -> dict:
  argv = [a for a in sys.argv[1:] if not a.startswith("--only")]
  out = subprocess.run([sys.executable, __file__, *argv, f"--only={side}"], capture_output=True,
                       text=True, check=False)
  if out.returncode:
    raise SystemExit(f"{side} benchmark failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _ONLY.value:
    print(json.dumps(run_jax() if _ONLY.value == "jax" else run_hf()))
    return
  from deepseek_jax import analytics
  from deepseek_jax.train.metrics import device_peak_flops, host_cpu_name

  cfg = _model_config()
  tokens = _BATCH.value * _SEQ.value
  flops = analytics.train_flops_per_token(cfg, _SEQ.value)
  ours = _child("jax")
  peak, peak_source = device_peak_flops()
  cpu = host_cpu_name()
  print(f"# bench_train: preset={cfg.name} batch={_BATCH.value} seq_len={_SEQ.value} "
        f"dtype={cfg.dtype} mtp={'on' if cfg.n_mtp_modules else 'off'} "
        f"{' '.join('--set=' + s for s in _SET.value) + ' ' if _SET.value else ''}"
        f"({analytics.summary(cfg, _SEQ.value).splitlines()[0]})")
  print(f"# hardware: {ours['platform']}:{ours['device']} x{ours['devices']}, host CPU {cpu}, "
        f"{os.cpu_count()} cores; jax {ours['jax']}; MFU peak {peak / 1e12:.2f} TFLOP/s "
        f"per device ({peak_source})")
  rows = [("deepseek-jax", ours)]
  if _HF.value:
    hf = _child("hf")
    rows.append((f"HF transformers (torch {hf['torch']})", hf))
  print(f"{'implementation':<34}{'step (ms)':>10}{'tokens/s':>11}{'peak MiB':>10}{'MFU':>7}")
  for name, r in rows:
    tps = tokens / r["step_s"]
    mfu = tps * flops / (peak * ours["devices"]) if peak else float("nan")
    print(f"{name:<34}{1e3 * r['step_s']:>10.1f}{tps:>11,.0f}{r['peak_bytes'] / 2**20:>10.0f}"
          f"{100 * mfu:>6.1f}%")
  print(f"(first step incl. compilation: {ours['first_step_s']:.1f} s; peak memory = "
        f"{ours['peak_kind']})")
  if len(rows) == 2:
    print(f"speed-up vs HF: {rows[1][1]['step_s'] / ours['step_s']:.2f}x tokens/s")


if __name__ == "__main__":
  from deepseek_jax.cli import use_huge_pages
  use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main)
