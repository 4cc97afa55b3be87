"""Speculative decoding with the MTP modules as the draft model (DeepSeek-V3 §5.4.3).

Axis legend: B batch, P padded prompt length, K draft depth (MTP modules used), W = 2K the MTP
window, V vocab, D d_model.

Each step of the loop:

1. **Verify.** The main model runs once on [pending, d_1 .. d_K] at positions pos .. pos + K over
   its cache (s_q = K + 1: the absorbed latent path, the Pallas decode kernel on TPU/GPU for
   K = 1). Its logits give the target distribution p_0 .. p_K at those positions.
2. **Accept.** Drafts are accepted left to right: greedy, d_j while d_j = argmax p_{j-1};
   sampling, d_j with probability min(1, p_{j-1}(d_j) / q_j(d_j)) (q_j: the draft's
   distribution). After the a accepted drafts comes one more token: argmax p_a (greedy); a draw
   from the normalised residual max(0, p_a - q_{a+1}) after a rejection; a draw from p_K when all
   K were accepted (Leviathan et al. 2023, Chen et al. 2023). So every step emits 1 .. K + 1
   tokens, and the output has exactly the target model's distribution (greedy: its tokens).
3. **Roll back.** Nothing is copied: each row's position advances by a + 1, and the cache slots
   written for rejected drafts lie past it, so the next step overwrites them before any query
   can read them (a query at position p reads slots <= p).
4. **Draft.** MTP module k at position i reads h^{k-1}_i (h^0: the main model's final normed
   hidden state) and the embedding of t_{i+k}, and predicts t_{i+k+1} (``model.mtp``). With m
   the last accepted position and y the new pending token, d'_1 = MTP_1 at m on (h^0_m, y), and
   module k chains on d'_{k-1}: d'_k = MTP_k at m on (h^{k-1}_m, d'_{k-1}). Each module keeps
   its own cache (its block attends over all earlier positions). It runs over the window of
   positions pos - (K - 1) .. pos + K: the K + 1 just verified plus the K - 1 before them,
   whose module-k >= 2 entries were computed from drafts (t_{i+k} lay past the accepted tokens)
   and are rewritten now with the accepted tokens; h^0 of those K - 1 positions is carried from
   the step before. So every cache entry a query reads was computed from accepted tokens only,
   except the entries of the drafts being made.

The prefill writes the prompt into the main cache, samples the first token from p, runs the MTP
modules over the prompt and makes the first drafts.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.inference.sampling import (GenerateOutput, SamplingConfig, sample_logits,
                                             sampling_logits)
from deepseek_jax.model.transformer import init_cache, init_mtp_caches
from pallas_kernels.mla_decode.ops import PAGE_SIZE


def check_speculative(cfg, speculative: Optional[str], draft_depth: Optional[int]) -> int:
  """The draft depth K for ``generate(..., speculative=...)``: None -> 0 (plain decoding);
  "mtp" -> ``draft_depth`` or every MTP module. Raises ValueError for another method, a model
  without MTP modules, or a depth outside [1, n_mtp_modules]."""
  if speculative is None:
    if draft_depth is not None:
      raise ValueError("draft_depth is for speculative='mtp'")
    return 0
  if speculative != "mtp":
    raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
  if cfg.n_mtp_modules < 1:
    raise ValueError(f"speculative='mtp' drafts with the MTP modules, but model {cfg.name!r} "
                     "has none (n_mtp_modules=0); train with n_mtp_modules >= 1 or drop the "
                     "switch")
  if draft_depth is not None and (isinstance(draft_depth, bool)
                                  or not isinstance(draft_depth, (int, np.integer))):
    raise ValueError(f"draft_depth must be an integer, got {draft_depth!r}")
  depth = cfg.n_mtp_modules if draft_depth is None else int(draft_depth)
  if not 1 <= depth <= cfg.n_mtp_modules:
    raise ValueError(f"draft_depth must lie in [1, n_mtp_modules={cfg.n_mtp_modules}], got "
                     f"{draft_depth}")
  return depth


def speculative_slots(prompt_len: int, max_new_tokens: int, depth: int) -> int:
  """Cache slots (main and MTP) for a prefill of ``prompt_len`` tokens, ``max_new_tokens`` and
  draft depth K: a row stops at most K tokens past max_new_tokens, and its last step writes K
  slots past its position; in whole pages."""
  needed = prompt_len + max_new_tokens + 2 * depth
  return -(-needed // PAGE_SIZE) * PAGE_SIZE


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, T, ...] at per-row index [B] -> [B, ...]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, T, ...] at per-row indices [B, W] (clipped to [0, T)) -> [B, W, ...]."""
  index = jnp.clip(index, 0, x.shape[1] - 1)
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _scatter(x: jax.Array, start: jax.Array, values: jax.Array, frozen: jax.Array) -> jax.Array:
  """x [B, S] with values [B, T] written at per-row slots start .. start + T - 1, except in
  the ``frozen`` [B] rows (finished rows), which keep their old values."""
  rows = jnp.arange(x.shape[0])[:, None]
  slots = start[:, None] + jnp.arange(values.shape[1])[None]
  old = x[rows, jnp.clip(slots, 0, x.shape[1] - 1)]
  return x.at[rows, slots].set(jnp.where(frozen[:, None], old, values.astype(x.dtype)),
                               mode="drop")


def _draw(logits: jax.Array, key: jax.Array, sampling: SamplingConfig):
  """(tokens [B], probabilities [B, V] float32) of ``sampling`` from logits [B, V]."""
  return sample_logits(logits, key, sampling), jax.nn.softmax(sampling_logits(logits, sampling),
                                                              axis=-1)


def _draft(model, h0_window, seq, window_start, at, caches, *, depth, absorb, sampling, key):
  """Run the K MTP modules over the window (positions window_start + 0 .. W - 1) and draft at
  window index ``at`` [B]. h0_window [B, W, D]; seq [B, S] int32 the row's tokens
  (position -> token) with the pending token at window_start + at + 1. Returns (drafts [B, K]
  int32, their distributions [B, K, V] float32, seq with the drafts written after the pending
  token, the new caches)."""
  batch, width = h0_window.shape[:2]
  positions = window_start[:, None] + jnp.arange(width)[None]
  h, drafts, probs, new_caches = h0_window, [], [], []
  modules = [model.mtp[i] for i in range(depth)]
  for k, (module, cache) in enumerate(zip(modules, caches), start=1):
    emb = model.embed(_gather(seq, positions + k))
    h, cache = module.decode(h, emb, positions, cache=cache, cache_index=window_start,
                             absorb=absorb)
    key, sub = jax.random.split(key)
    token, p = _draw(model.head(_take(h, at)[:, None])[:, 0], sub, sampling)
    seq = _scatter(seq, window_start + at + k + 1, token[:, None], jnp.zeros(batch, bool))
    drafts.append(token)
    probs.append(p)
    new_caches.append(cache)
  return jnp.stack(drafts, 1), jnp.stack(probs, 1), seq, tuple(new_caches)


def speculative_generate(model, tokens, lengths, rng, stop_tokens, *, max_new_tokens: int,
                         sampling: SamplingConfig, cache_kind: str, absorb: bool, pad_id: int,
                         return_log_probs: bool, depth: int, return_state: bool = False):
  """``generate(..., speculative="mtp")`` after its checks: prompts tokens [B, P] (right-padded
  to a bucket) with real lengths [B]. Returns GenerateOutput with ``drafted`` / ``accepted``
  [B, K]: drafts proposed and accepted at each depth, per row. ``return_state`` (tests): also
  the final loop state, {"cache", "mtp_caches", "pos" [B] (each row's pending position),
  "seq" [B, S] (its tokens by position)}."""
  graphdef, state = nnx.split(model)
  return _speculate(graphdef, state, tokens, lengths, rng, stop_tokens,
                    max_new_tokens=max_new_tokens, sampling=sampling, cache_kind=cache_kind,
                    absorb=absorb, pad_id=pad_id, return_log_probs=return_log_probs, depth=depth,
                    return_state=return_state)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling",
                                             "cache_kind", "absorb", "pad_id", "return_log_probs",
                                             "depth", "return_state"))
def _speculate(graphdef, state, tokens, lengths, rng, stop_tokens, *, max_new_tokens, sampling,
               cache_kind, absorb, pad_id, return_log_probs, depth, return_state):
  model = nnx.merge(graphdef, state)
  cfg, k_draft, n_new = model.config, depth, max_new_tokens
  batch, prompt_len = tokens.shape
  slots = speculative_slots(prompt_len, n_new, k_draft)
  greedy = sampling.temperature == 0.0
  rows = jnp.arange(batch)

  # --- prefill: the prompt into the main cache, the first token, the MTP caches, the drafts
  cache = init_cache(cfg, batch, slots, cache_kind)
  prefill = model(tokens, cache=cache, cache_index=jnp.zeros(batch, jnp.int32), absorb=absorb)
  rng, key = jax.random.split(rng)
  first_logits = model.head(_take(prefill.hidden, lengths - 1)[:, None])[:, 0]
  first, _ = _draw(first_logits, key, sampling)
  first_lp = jnp.take_along_axis(jax.nn.log_softmax(sampling_logits(first_logits, sampling)),
                                 first[:, None], -1)[:, 0]
  seq = jnp.full((batch, slots + k_draft + 2), pad_id, jnp.int32)
  seq = seq.at[:, :prompt_len].set(tokens).at[rows, lengths].set(first)
  mtp_caches = init_mtp_caches(cfg, batch, slots, cache_kind, k_draft)
  rng, key = jax.random.split(rng)
  drafts, draft_probs, seq, mtp_caches = _draft(
      model, prefill.hidden, seq, jnp.zeros(batch, jnp.int32), lengths - 1, mtp_caches,
      depth=k_draft, absorb=absorb, sampling=sampling, key=key)
  # h^0 of the K - 1 positions before the pending one (those < 0 are never read)
  carried = _gather(prefill.hidden,
                    lengths[:, None] - k_draft + 1 + jnp.arange(k_draft - 1)[None])

  out = jnp.full((batch, n_new + k_draft + 1), pad_id, jnp.int32).at[:, 0].set(first)
  log_probs = jnp.zeros((batch, n_new + k_draft + 1), jnp.float32).at[:, 0].set(first_lp)
  done = jnp.isin(first, stop_tokens) | (n_new <= 1)
  zeros = jnp.zeros((batch, k_draft), jnp.int32)
  carry = dict(pos=lengths, emitted=jnp.ones(batch, jnp.int32), done=done, seq=seq, out=out,
               log_probs=log_probs, drafts=drafts, draft_probs=draft_probs, carried=carried,
               cache=prefill.cache, mtp_caches=mtp_caches, rng=rng, drafted=zeros,
               accepted=zeros)

  def keep_going(c):
    return ~jnp.all(c["done"])

  def step(c):
    pos, done = c["pos"], c["done"]
    pending = _take(c["seq"], pos)
    verify = model(jnp.concatenate([pending[:, None], c["drafts"]], 1), cache=c["cache"],
                   cache_index=pos, absorb=absorb)
    target_logits = sampling_logits(verify.logits, sampling)  # [B, K + 1, V]
    rng, k_accept, k_extra, k_draft_key = jax.random.split(c["rng"], 4)
    if greedy:
      target = jnp.argmax(verify.logits, -1).astype(jnp.int32)
      ok = target[:, :k_draft] == c["drafts"]
    else:
      p = jax.nn.softmax(target_logits, -1)
      p_draft = jnp.take_along_axis(p[:, :k_draft], c["drafts"][..., None], -1)[..., 0]
      q_draft = jnp.take_along_axis(c["draft_probs"], c["drafts"][..., None], -1)[..., 0]
      ok = jax.random.uniform(k_accept, p_draft.shape) * q_draft < p_draft
    n_ok = jnp.cumprod(ok.astype(jnp.int32), 1).sum(1)  # a: leading accepted drafts
    if greedy:
      extra = _take(target, n_ok)
    else:
      p_a = _take(p, n_ok)
      residual = jnp.maximum(p_a - _take(c["draft_probs"], jnp.minimum(n_ok, k_draft - 1)), 0.0)
      use_residual = (n_ok < k_draft) & (residual.sum(-1) > 0)
      dist = jnp.where(use_residual[:, None], residual, p_a)
      extra = jax.random.categorical(k_extra, jnp.log(dist), -1).astype(jnp.int32)
    index = jnp.arange(k_draft + 1)[None]
    emitted = jnp.where(index == n_ok[:, None], extra[:, None],
                        jnp.concatenate([c["drafts"], extra[:, None]], 1))  # [B, K + 1]
    lp = jnp.take_along_axis(jax.nn.log_softmax(target_logits, -1), emitted[..., None],
                             -1)[..., 0]
    out = _scatter(c["out"], c["emitted"], emitted, done)
    log_probs = _scatter(c["log_probs"], c["emitted"], lp, done)
    seq = _scatter(c["seq"], pos + 1, emitted, done)
    real = index <= n_ok[:, None]
    hits = jnp.isin(emitted, stop_tokens) & real
    stopped = hits.any(1)
    count = c["emitted"] + n_ok + 1
    # drafts count only where their token could reach the output: depth j while j <= the
    # tokens still wanted; accepted while also within this step's tokens up to a stop token
    wanted = n_new - c["emitted"]
    first_stop = jnp.where(stopped, jnp.argmax(hits, 1) + 1, k_draft + 1)
    draft_depth = jnp.arange(1, k_draft + 1)[None]
    drafted = c["drafted"] + (~done[:, None] & (draft_depth <= wanted[:, None]))
    accepted = c["accepted"] + (~done[:, None] & (draft_depth <= jnp.minimum(
        jnp.minimum(n_ok, first_stop), wanted)[:, None]))

    # MTP window: the K - 1 positions before pos (h^0 carried) and the K + 1 just verified
    start = jnp.maximum(pos - (k_draft - 1), 0)
    h0 = jnp.concatenate([c["carried"], verify.hidden], 1)  # positions pos - K + 1 .. pos + K
    window = _gather(h0, start[:, None] - (pos[:, None] - k_draft + 1)
                     + jnp.arange(2 * k_draft)[None])
    last = pos + n_ok  # m: the last accepted position
    drafts, draft_probs, seq, mtp_caches = _draft(
        model, window, seq, start, last - start, c["mtp_caches"], depth=k_draft, absorb=absorb,
        sampling=sampling, key=k_draft_key)
    carried = _gather(h0, last[:, None] + 2 - k_draft + jnp.arange(k_draft - 1)[None]
                      - (pos[:, None] - k_draft + 1))  # positions pos' - K + 1 .. pos' - 1
    keep = lambda old, new: jnp.where(done.reshape(done.shape + (1,) * (new.ndim - 1)), old, new)
    return dict(pos=keep(pos, last + 1), emitted=keep(c["emitted"], count),
                done=done | stopped | (count >= n_new), seq=keep(c["seq"], seq), out=out,
                log_probs=log_probs, drafts=keep(c["drafts"], drafts),
                draft_probs=keep(c["draft_probs"], draft_probs),
                carried=keep(c["carried"], carried), cache=verify.cache, mtp_caches=mtp_caches,
                rng=rng, drafted=drafted, accepted=accepted)

  c = jax.lax.while_loop(keep_going, step, carry)
  out = c["out"][:, :n_new]
  is_stop = jnp.isin(out, stop_tokens) & (jnp.arange(n_new)[None] < c["emitted"][:, None])
  length = jnp.where(is_stop.any(-1), jnp.argmax(is_stop, -1) + 1,
                     jnp.minimum(c["emitted"], n_new))
  real = jnp.arange(n_new)[None] < length[:, None]
  result = GenerateOutput(jnp.where(real, out, pad_id), length,
                          jnp.where(real, c["log_probs"][:, :n_new], 0.0) if return_log_probs
                          else None, c["drafted"], c["accepted"])
  if return_state:
    return result, {k: c[k] for k in ("cache", "mtp_caches", "pos", "seq")}
  return result
