"""Analytics: counts from abstract shapes equal the formulas and the papers' figures."""

import jax.numpy as jnp
import pytest
from flax import nnx

from deepseek_jax import analytics as A
from deepseek_jax.config import PRESETS, ModelConfig
from deepseek_jax.model.transformer import _forward, create_model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_abstract_shape_counts_equal_closed_form_formulas(name):
  cfg = ModelConfig.preset(name)
  assert A.param_counts(cfg) == A.param_counts_formula(cfg)


@pytest.mark.parametrize("overrides", [dict(attention_kind="gqa", n_kv_heads=2),
                                       dict(decoupled_rope=False), dict(tie_embeddings=True),
                                       dict(n_dense_layers=3, n_mtp_modules=2)])
def test_formula_tracks_ablation_variants(overrides):
  cfg = ModelConfig.preset("tiny", **overrides)
  assert A.param_counts(cfg) == A.param_counts_formula(cfg)


def _v3_by_hand():
  """DeepSeek-V3 per the paper's shapes, written out term by term (REFERENCE §1)."""
  d, v, heads, ql, kvl = 7168, 129280, 128, 1536, 512
  attention = (d * ql + ql + ql * heads * 192) + (d * 576 + kvl + kvl * heads * 256) + heads * 128 * d
  dense_ffn = 3 * d * 18432
  expert = 3 * d * 2048
  moe_total = d * 256 + 257 * expert
  moe_active = d * 256 + 9 * expert
  norms = 2 * d
  embed_and_head_and_norm = 2 * v * d + d
  total = embed_and_head_and_norm + 61 * (attention + norms) + 3 * dense_ffn + 58 * moe_total
  active = embed_and_head_and_norm + 61 * (attention + norms) + 3 * dense_ffn + 58 * moe_active
  return total, active


def test_deepseek_v3_is_671b_total_and_37b_activated_without_allocating():
  counts = A.param_counts(ModelConfig.preset("deepseek-v3"))  # abstract: no 671B allocation
  total, active = _v3_by_hand()
  assert (counts.total, counts.activated) == (total, active)
  assert counts.total == pytest.approx(671e9, rel=0.01)
  # Exact arithmetic gives 37.55B incl. embedding and head (36.63B without the input
  # embedding); the paper's "37B" is that figure rounded, 1.5% from 37.0B.
  assert 37e9 <= counts.activated < 37.6e9
  assert counts.mtp == pytest.approx(11.6e9, rel=0.01)  # + 14B hub total with shared emb/head


@pytest.mark.parametrize("name, total, activated", [
    ("deepseek-v2", 236e9, 21e9), ("deepseek-v2-lite", 15.7e9, 2.4e9)])
def test_v2_counts_match_the_paper(name, total, activated):
  counts = A.param_counts(ModelConfig.preset(name))
  assert counts.total == pytest.approx(total, rel=0.01)
  # The papers' activated figures exclude the input embedding (a lookup, no FLOPs) and are
  # rounded (V2-Lite: 2.451B -> "2.4B"; V2: 20.85B -> "21B").
  assert counts.activated - counts.embedding == pytest.approx(activated, rel=0.025)


def test_kv_cache_bytes_for_released_models():
  v3, v2 = ModelConfig.preset("deepseek-v3"), ModelConfig.preset("deepseek-v2")
  assert A.kv_cache_bytes_per_token(v3) == 70272
  assert A.kv_cache_bytes_per_token(v3, "expanded") == 128 * (192 + 128) * 61 * 2
  assert A.kv_cache_bytes_per_token(v2) == 576 * 60 * 2


@pytest.mark.parametrize("overrides", [
    dict(), dict(attention_kind="gqa", n_kv_heads=2, q_lora_rank=None),
    dict(d_model=256, vocab_size=1024, dense_ffn_dim=512)])
def test_forward_flops_agree_with_xla_cost_analysis(overrides):
  """One dense layer (XLA counts a scan body once), full attention: XLA's count is ours plus
  elementwise work (softmax, norms, RoPE), which our matmul-only formula leaves out."""
  cfg = ModelConfig.preset("tiny", n_layers=1, n_dense_layers=1, n_mtp_modules=0, **overrides)
  graphdef, state = nnx.split(create_model(cfg))
  t = 64
  cost = _forward.lower(graphdef, state, jnp.zeros((1, t), jnp.int32)).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / t
  per_key = 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
  ours = A.forward_flops_per_token(cfg, t) + per_key * (t - (t + 1) / 2)  # causal -> full
  assert ours <= xla <= 1.05 * ours


def test_tying_the_head_changes_parameters_but_not_flops():
  untied, tied = ModelConfig.preset("small"), ModelConfig.preset("small", tie_embeddings=True)
  assert A.param_counts(untied).total - A.param_counts(tied).total == 512 * 256
  assert A.forward_flops_per_token(tied, 256) == A.forward_flops_per_token(untied, 256)


def test_train_flops_are_three_forwards_and_v3_is_about_250_gflops_per_token():
  v3 = ModelConfig.preset("deepseek-v3")
  assert A.train_flops_per_token(v3, 4096) == 3 * A.forward_flops_per_token(v3, 4096)
  six_n = 6 * (A.param_counts(v3).activated - A.param_counts(v3).embedding)
  assert six_n < A.train_flops_per_token(v3, 4096, include_mtp=False) < 1.2 * six_n
