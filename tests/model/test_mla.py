"""MLA: the absorbed latent-cache path equals the expanded path; caches hold what the formula says.

Weights use init_std=0.1 so logits are O(1) and attention is far from uniform: with DeepSeek's
0.006 init every path would agree trivially.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import analytics
from deepseek_jax.config import ModelConfig
from deepseek_jax.model.attention import KVCache
from deepseek_jax.model.mla import LatentCache
from deepseek_jax.model.transformer import forward, init_cache

TOL = 1e-5
VARIANTS = {
    "q_lora+yarn": dict(),
    "no_q_compression": dict(q_lora_rank=None),
    "no_yarn": dict(yarn_factor=1.0),
}


@pytest.fixture
def model_with(make_model):
  return lambda **overrides: make_model(init_std=0.1, **overrides)


def _tokens(b=2, t=12, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 128)


def _decode_token_by_token(model, tokens, kind, absorb):
  """Prefill the first 4 tokens, then feed the rest one at a time; return all logits."""
  b, t = tokens.shape
  cache = init_cache(model.config, b, t, kind)
  out = forward(model, tokens[:, :4], cache=cache, cache_index=jnp.zeros(b, jnp.int32), absorb=absorb)
  logits, cache = [out.logits], out.cache
  for i in range(4, t):
    out = forward(model, tokens[:, i:i + 1], cache=cache, cache_index=jnp.full(b, i, jnp.int32),
                absorb=absorb)
    logits.append(out.logits)
    cache = out.cache
  return jnp.concatenate(logits, axis=1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_absorbed_prefill_matches_expanded_attention(variant, model_with):
  model, tokens = model_with(**VARIANTS[variant]), _tokens()
  expanded = forward(model, tokens).logits
  absorbed = forward(model, tokens, absorb=True).logits
  assert float(jnp.abs(expanded).std()) > 0.3  # not a vacuous comparison
  np.testing.assert_allclose(absorbed, expanded, atol=TOL, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_absorbed_decode_over_latent_cache_matches_expanded_forward(variant, model_with):
  model, tokens = model_with(**VARIANTS[variant]), _tokens()
  reference = forward(model, tokens).logits
  absorbed = _decode_token_by_token(model, tokens, "latent", absorb=True)
  np.testing.assert_allclose(absorbed, reference, atol=TOL, rtol=0)


def test_expanded_kv_cache_and_unabsorbed_latent_decode_match_too(model_with):
  model, tokens = model_with(), _tokens()
  reference = forward(model, tokens).logits
  for kind, absorb in [("expanded", False), ("latent", False)]:
    np.testing.assert_allclose(_decode_token_by_token(model, tokens, kind, absorb), reference,
                               atol=TOL, rtol=0, err_msg=f"{kind} absorb={absorb}")


def test_mla_layer_absorbed_equals_expanded_on_its_own(model_with):
  model = model_with()
  mla = model.moe_layers  # stacked; take layer 0 through split/merge
  graphdef, state = nnx.split(mla.attention)
  layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
  x = jax.random.normal(jax.random.key(3), (2, 10, model.config.d_model))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  y_exp, _ = layer(x, pos)
  y_abs, _ = layer(x, pos, absorb=True)
  np.testing.assert_allclose(y_abs, y_exp, atol=TOL, rtol=0)


def test_latent_cache_holds_only_c_kv_and_k_rope():
  cfg = ModelConfig.preset("tiny")
  cache = init_cache(cfg, batch=3, max_len=20, kind="latent")
  assert isinstance(cache.moe, LatentCache)
  assert cache.moe.c_kv.shape == (cfg.n_moe_layers, 3, 20, cfg.kv_lora_rank)
  assert cache.moe.k_rope.shape == (cfg.n_moe_layers, 3, 20, cfg.qk_rope_head_dim)
  assert isinstance(init_cache(cfg, 3, 20, "expanded").moe, KVCache)


@pytest.mark.parametrize("overrides, kind", [
    (dict(), "latent"), (dict(), "expanded"), (dict(decoupled_rope=False), "latent"),
    (dict(attention_kind="mha"), "expanded"),
    (dict(attention_kind="gqa", n_kv_heads=2), "expanded"),
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_bytes_equal_formula_and_actual_arrays(overrides, kind, dtype):
  cfg = ModelConfig.preset("tiny", **overrides)
  batch, slots = 3, 20
  cache = init_cache(cfg, batch, slots, kind, dtype=dtype)
  itemsize = jnp.dtype(dtype).itemsize
  per_token = analytics.kv_cache_bytes_per_token(cfg, kind, itemsize)
  assert analytics.cache_bytes(cache) == per_token * batch * slots
  if kind == "latent":  # (d_c + d_R) l, the MLA formula written out
    rope = cfg.qk_rope_head_dim if cfg.decoupled_rope else 0
    assert per_token == (cfg.kv_lora_rank + rope) * cfg.n_layers * itemsize
  else:  # K (d_h + d_R + d_v) l
    assert per_token == cfg.kv_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.n_layers * itemsize


def test_v3_latent_cache_is_70272_bytes_per_token_in_bf16():
  cfg = ModelConfig.preset("deepseek-v3")
  assert analytics.kv_cache_bytes_per_token(cfg, "latent", 2) == 576 * 2 * 61 == 70272


def test_coupled_rope_ablation_decodes_without_absorption(model_with):
  model, tokens = model_with(decoupled_rope=False), _tokens()
  reference = forward(model, tokens).logits
  with pytest.raises(ValueError, match="decoupled_rope"):
    forward(model, tokens, absorb=True)
  np.testing.assert_allclose(_decode_token_by_token(model, tokens, "latent", absorb=False),
                             reference, atol=TOL, rtol=0)
  assert init_cache(model.config, 1, 4, "latent").moe.k_rope.shape[-1] == 0


@pytest.mark.parametrize("overrides", [dict(attention_kind="mha"),
                                       dict(attention_kind="gqa", n_kv_heads=2)])
def test_mha_and_gqa_baselines_decode_with_kv_cache(overrides, model_with):
  model, tokens = model_with(**overrides), _tokens()
  np.testing.assert_allclose(_decode_token_by_token(model, tokens, "expanded", absorb=False),
                             forward(model, tokens).logits, atol=TOL, rtol=0)
  with pytest.raises(ValueError, match="latent"):
    init_cache(model.config, 1, 4, "latent")


def test_training_forward_drops_tokens_but_decoding_never_does(make_model):
  dropping = make_model(capacity_factor=0.25, init_std=0.1)
  dropless = make_model(init_std=0.1)  # same seed, same weights
  tokens = _tokens()
  assert float(forward(dropping, tokens).moe_stats["dropped"].sum()) > 0
  assert float(jnp.abs(forward(dropping, tokens).logits - forward(dropless, tokens).logits).max()) > 1e-3
  np.testing.assert_allclose(_decode_token_by_token(dropping, tokens, "latent", absorb=True),
                             forward(dropless, tokens).logits, atol=TOL, rtol=0)


def test_attention_is_causal(model_with):
  model, tokens = model_with(), _tokens()
  changed = tokens.at[:, 8:].set((tokens[:, 8:] + 1) % 128)
  a, b = forward(model, tokens).logits, forward(model, changed).logits
  np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-6)
  assert float(jnp.abs(a[:, 8:] - b[:, 8:]).max()) > 1e-3


def test_restarting_positions_without_segment_ids_stay_causal(model_with):
  model, tokens = model_with(), _tokens(1, 10)
  positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])  # packed rows, segment ids forgotten
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 128)
  a = forward(model, tokens, positions=positions).logits
  b = forward(model, changed, positions=positions).logits
  np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)  # no token sees a later one


def test_packed_segments_do_not_attend_across_boundaries(model_with):
  model = model_with(n_mtp_modules=0)
  first, second = _tokens(1, 5, seed=4), _tokens(1, 7, seed=5)
  packed = jnp.concatenate([first, second], axis=1)
  segment_ids = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  out = forward(model, packed, positions=positions, segment_ids=segment_ids).logits
  np.testing.assert_allclose(out[:, :5], forward(model, first).logits, atol=TOL)
  np.testing.assert_allclose(out[:, 5:], forward(model, second).logits, atol=TOL)
