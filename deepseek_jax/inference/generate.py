"""Autoregressive generation over the latent cache: prefill + a compiled decode loop.

Axis legend: B batch, P padded prompt length, N max new tokens, V vocab.

``generate`` pads the prompts on the right to a length bucket and runs one jitted program:
prefill writes every prompt into the cache (slot j = position j), then a ``lax.while_loop``
decodes one token per row per step, each row at its own position ``length_b + i``. Rows of
different prompt lengths therefore share a batch with no left-padding tricks: a row's stale
slots (its padding) are overwritten before any query of that row can reach them. The loop body
is traced once, so decoding never retraces per token; the loop stops early once every row has
emitted a stop token.

Padding is never counted as text. The request must fit ``ModelConfig.max_seq_len`` in real
tokens (longest prompt + max_new_tokens); the bucket only shapes the program, and is cut at
max_seq_len. The cache holds the padded prefill and every real slot, in whole 64-slot pages:
padding slots past a row's length hold garbage that its queries never read (a query at position
p reads slots <= p, all written by that row's real tokens), and RoPE angles are computed from
positions, not looked up in a max_seq_len table.

MLA models decode with the absorbed path over a ``LatentCache`` by default
(``cache_kind="latent"``); ``cache_kind="expanded"`` keeps per-head K/V instead (MHA/GQA, or
the expanded-cache baseline of the benchmark).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.inference import speculative as speculative_lib
from deepseek_jax.inference.sampling import (GenerateOutput, SamplingConfig,  # noqa: F401
                                             sample_logits, sampling_logits)
from deepseek_jax.model.transformer import init_cache
from pallas_kernels.mla_decode.ops import PAGE_SIZE


def _sample(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig):
  """(tokens [B] int32, their log-probabilities [B] float32 under ``sampling_logits``)."""
  token = sample_logits(logits, rng, sampling)
  log_probs = jax.nn.log_softmax(sampling_logits(logits, sampling), axis=-1)
  return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


def _prompt_arrays(prompts, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts as (tokens [B, L] int32, lengths [B]), L = the longest real prompt: a given
  array's extra padding columns are dropped, so only real tokens decide the bucket."""
  if isinstance(prompts, tuple) and len(prompts) == 2 and hasattr(prompts[0], "shape"):
    tokens, lengths = (np.asarray(a) for a in prompts)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
      raise ValueError(f"prompt arrays must be tokens [B, P] and lengths [B], got shapes "
                       f"{tokens.shape} and {lengths.shape}")
  else:
    prompts = [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("generate needs at least one prompt and every prompt needs >= 1 token")
    lengths = np.array([len(p) for p in prompts])
    tokens = np.full((len(prompts), int(lengths.max())), pad_id, np.int32)
    for row, p in enumerate(prompts):
      tokens[row, :len(p)] = p
  if lengths.min() < 1 or lengths.max() > tokens.shape[1]:
    raise ValueError(f"prompt lengths must lie in [1, {tokens.shape[1]}], got {lengths.tolist()}")
  return tokens[:, :int(lengths.max())].astype(np.int32), lengths.astype(np.int32)


def _pad_to_bucket(tokens: np.ndarray, pad_id: int, bucket: int, max_len: int) -> np.ndarray:
  """Right-pad tokens [B, L] with pad_id to [B, P]: P = L rounded up to a multiple of
  ``bucket``, but at most ``max_len`` (>= L), so no padding lies past max_seq_len."""
  if bucket < 1:
    raise ValueError(f"prompt_bucket must be >= 1, got {bucket}")
  length = tokens.shape[1]
  padded = max(length, min(-(-length // bucket) * bucket, max_len))
  return np.pad(tokens, ((0, 0), (0, padded - length)), constant_values=pad_id)


def cache_slots(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
  """Cache slots for a prefill of ``prompt_len`` (padded) tokens and ``max_new_tokens`` steps.

  The prefill writes slots [0, prompt_len); real tokens reach slot length + max_new_tokens - 2
  < min(prompt_len + max_new_tokens - 1, max_seq_len) (the last sampled token is never fed
  back), given length <= prompt_len <= max_seq_len. Rounded up to whole 64-slot pages, so the
  Pallas decode kernel reads the cache in place.
  """
  needed = max(prompt_len, min(prompt_len + max_new_tokens - 1, max_seq_len))
  return -(-needed // PAGE_SIZE) * PAGE_SIZE


def generate(model, prompts, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             stop_tokens: Sequence[int] = (), pad_id: int = 0, rng: Optional[jax.Array] = None,
             cache_kind: Optional[str] = None, absorb: Optional[bool] = None,
             prompt_bucket: int = 64, return_log_probs: bool = False,
             speculative: Optional[str] = None,
             draft_depth: Optional[int] = None) -> GenerateOutput:
  """Generate up to ``max_new_tokens`` per prompt.

  prompts: a list of token-id lists (any lengths), or (tokens [B, P], lengths [B]) arrays
  (columns past each row's length are padding and are ignored). prompt_bucket: prompts are
  right-padded to a multiple of it (capped at max_seq_len), so similar lengths share one
  compiled program. Returns GenerateOutput(tokens [B, max_new_tokens] int32, lengths [B],
  log_probs): with ``return_log_probs`` the log-probability [B, max_new_tokens] (float32) of
  each sampled token under the distribution it was drawn from (``sampling_logits``:
  temperature, top-k, top-p applied; 0 after a row's length) -- the rollout log-probs of RL.

  ``speculative="mtp"`` (off by default): speculative decoding with the first ``draft_depth``
  (default all) MTP modules as the draft model (``inference.speculative``, V3 §5.4.3); the
  same tokens as plain decoding when greedy and the same distribution when sampling, 1 to
  ``draft_depth`` + 1 tokens per model step; the output's ``drafted`` / ``accepted`` count the
  drafts.

  Raises ValueError if max_new_tokens < 1 or prompt_bucket < 1, a prompt is empty, prompt
  arrays have the wrong shapes or lengths, the longest real prompt + max_new_tokens exceeds
  ModelConfig.max_seq_len (padding does not count), or ``speculative`` is not None / "mtp",
  the model has no MTP modules, or ``draft_depth`` is outside [1, n_mtp_modules].
  """
  cfg = model.config
  depth = speculative_lib.check_speculative(cfg, speculative, draft_depth)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  tokens, lengths = _prompt_arrays(prompts, pad_id)
  longest = tokens.shape[1]
  if longest + max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                     f"{longest + max_new_tokens} exceeds ModelConfig.max_seq_len="
                     f"{cfg.max_seq_len}; shorten the prompt or lower max_new_tokens")
  tokens = _pad_to_bucket(tokens, pad_id, prompt_bucket, cfg.max_seq_len)
  latent_ok = cfg.attention_kind == "mla"
  cache_kind = cache_kind or ("latent" if latent_ok else "expanded")
  if absorb is None:
    absorb = cache_kind == "latent" and cfg.decoupled_rope
  rng = jax.random.key(0) if rng is None else rng
  if depth:
    return speculative_lib.speculative_generate(
        model, jnp.asarray(tokens), jnp.asarray(lengths), rng, jnp.asarray(stop_tokens, jnp.int32),
        max_new_tokens=max_new_tokens, sampling=sampling, cache_kind=cache_kind, absorb=absorb,
        pad_id=pad_id, return_log_probs=return_log_probs, depth=depth)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), rng,
                   jnp.asarray(stop_tokens, jnp.int32), max_new_tokens=max_new_tokens,
                   sampling=sampling, cache_kind=cache_kind, absorb=absorb, pad_id=pad_id,
                   return_log_probs=return_log_probs)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling",
                                             "cache_kind", "absorb", "pad_id", "return_log_probs"))
def _generate(graphdef, state, tokens, lengths, rng, stop_tokens, *, max_new_tokens, sampling,
              cache_kind, absorb, pad_id, return_log_probs):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = tokens.shape
  slots = cache_slots(prompt_len, max_new_tokens, model.config.max_seq_len)
  cache = init_cache(model.config, batch, slots, cache_kind)
  prefill = model(tokens, cache=cache, cache_index=jnp.zeros(batch, jnp.int32), absorb=absorb)
  # the head on each row's last real position only: prefill.logits [B, P, V] goes unused, so
  # XLA drops it instead of projecting every padding position onto the vocabulary
  last_hidden = prefill.hidden[jnp.arange(batch), lengths - 1]
  last_logits = model.head(last_hidden[:, None])[:, 0]
  rng, key = jax.random.split(rng)
  first, first_lp = _sample(last_logits, key, sampling)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  # (log-probs computed either way; XLA drops them when they are not returned)
  log_probs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(first_lp)
  done = jnp.isin(first, stop_tokens)

  def keep_going(carry):
    step, *_, done = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def decode_step(carry):
    step, cache, previous, rng, out, log_probs, done = carry
    result = model(previous[:, None], cache=cache, cache_index=lengths + step - 1, absorb=absorb)
    rng, key = jax.random.split(rng)
    token, lp = _sample(result.logits[:, 0], key, sampling)
    token = jnp.where(done, pad_id, token)
    out = out.at[:, step].set(token)
    log_probs = log_probs.at[:, step].set(jnp.where(done, 0.0, lp))
    done = done | jnp.isin(token, stop_tokens)
    return step + 1, result.cache, token, rng, out, log_probs, done

  carry = (jnp.int32(1), prefill.cache, first, rng, out, log_probs, done)
  step, *_, out, log_probs, done = jax.lax.while_loop(keep_going, decode_step, carry)
  is_stop = jnp.isin(out, stop_tokens)
  first_stop = jnp.where(is_stop.any(-1), jnp.argmax(is_stop, axis=-1) + 1, step)
  return GenerateOutput(out, jnp.minimum(first_stop, step),
                        log_probs if return_log_probs else None)
