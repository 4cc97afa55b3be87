r"""Speculative decoding with the MTP module (V3 §5.4.3) against plain decoding: draft
acceptance and tokens/s, greedy and sampled, on a trained checkpoint.

    python experiments/train.py --config=experiments/configs/small.py --workdir=/tmp/ds-small
    python experiments/bench_speculative.py --config=experiments/configs/small.py \
        --workdir=/tmp/ds-small --batch=1,8 --new_tokens=128

Prompts are the first ``--prompt_tokens`` tokens of held-out documents. Both ways decode the
same prompts for exactly ``--new_tokens`` tokens (no stop token), each compiled once before
``--repeats`` timed runs (the best is reported). Greedy runs must give identical tokens: the
script fails if they do not. Tokens/s = batch x new tokens / seconds.
"""

from __future__ import annotations

import time

from absl import app, flags
from ml_collections import config_flags
import jax
import numpy as np

from deepseek_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "the run's experiment config",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the trained run's workdir", required=True)
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "rows decoded together")
_NEW = flags.DEFINE_integer("new_tokens", 128, "tokens generated per row")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 32, "prompt length (held-out text)")
_TEMPERATURES = flags.DEFINE_list("temperatures", ["0", "1"], "0: greedy")
_DEPTH = flags.DEFINE_integer("draft_depth", None, "MTP modules drafting (default: all)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs; the best is reported")
flags.mark_flags_as_required(["config"])


def _prompts(setup, n: int, length: int) -> list[list[int]]:
  from deepseek_jax.train import data as data_lib
  docs = [d for d in data_lib.token_sequences(setup.config.data, setup.tokenizer, "eval")
          if len(d) >= length]
  if len(docs) < n:
    raise ValueError(f"only {len(docs)} held-out documents have {length} tokens; lower "
                     "--prompt_tokens or --batch")
  return [list(map(int, d[:length])) for d in docs[:n]]


def _timed(fn):
  out = jax.block_until_ready(fn())  # compile
  best = float("inf")
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return out, best


def bench() -> list[str]:
  from deepseek_jax.inference.generate import SamplingConfig, generate
  from deepseek_jax.train import trainer
  from deepseek_jax.train.metrics import host_cpu_name
  setup, model, step = trainer.inference_model(_CONFIG.value, _WORKDIR.value)
  batches = [int(b) for b in _BATCH.value]
  temperatures = [float(t) for t in _TEMPERATURES.value]
  cfg = model.config
  lines = [f"model {cfg.name} ({_WORKDIR.value}, step {step}), {cfg.n_mtp_modules} MTP "
           f"module(s); {host_cpu_name()}, jax {jax.__version__}, {jax.devices()[0].platform}",
           "| batch | sampling | plain tok/s | speculative tok/s | speed-up | acceptance by "
           "depth | tokens per verify step |", "|---|---|---|---|---|---|---|"]
  print("\n".join(lines), flush=True)
  for batch in batches:
    prompts = _prompts(setup, batch, _PROMPT.value)
    for temperature in temperatures:
      sampling = SamplingConfig(temperature=temperature)
      run = lambda **kw: generate(model, prompts, max_new_tokens=_NEW.value, sampling=sampling,
                                  rng=jax.random.key(0), pad_id=setup.tokenizer.pad_id, **kw)
      plain, t_plain = _timed(run)
      spec, t_spec = _timed(lambda: run(speculative="mtp", draft_depth=_DEPTH.value))
      if temperature == 0 and not np.array_equal(plain.tokens, spec.tokens):
        raise RuntimeError(f"batch {batch}: greedy speculative tokens differ from plain decoding")
      tokens = batch * _NEW.value
      steps = np.asarray(spec.drafted)[:, 0].mean()
      rate = np.asarray(spec.acceptance_rate())
      line = (f"| {batch} | {'greedy' if temperature == 0 else f'T = {temperature:g}'} | "
              f"{tokens / t_plain:,.1f} | {tokens / t_spec:,.1f} | {t_plain / t_spec:.2f}x | "
              + ", ".join(f"{r:.1%}" for r in rate) + f" | {(_NEW.value - 1) / steps:.2f} |")
      print(line, flush=True)
      lines.append(line)
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cli.run_cli(bench)


if __name__ == "__main__":
  cli.use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main, flags_parser=cli.parse_flags)
