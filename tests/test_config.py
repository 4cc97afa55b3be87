"""ModelConfig: presets are valid, bad combinations fail early and name the field."""

import dataclasses

import pytest

from deepseek_jax import config, typed_fields
from deepseek_jax.config import PRESETS, ModelConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_valid_config(name):
  cfg = ModelConfig.preset(name)
  assert cfg.name == name
  assert cfg.n_moe_layers == cfg.n_layers - cfg.n_dense_layers


def test_config_is_frozen():
  cfg = ModelConfig.preset("tiny")
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 3


def test_overrides_revalidate_and_keep_other_fields():
  cfg = ModelConfig.preset("tiny").replace(n_activated_experts=4)
  assert cfg.n_activated_experts == 4 and cfg.d_model == 64
  with pytest.raises(ValueError, match="n_activated_experts"):
    cfg.replace(n_activated_experts=9)


@pytest.mark.parametrize("overrides, field", [
    (dict(n_activated_experts=9), "n_activated_experts"),  # top-k > experts
    (dict(scan_layers="False"), "scan_layers"),  # a string is not a bool
    (dict(d_model=64.0), "d_model"),  # a float is not an int
    (dict(n_layers=True), "n_layers"),  # nor is a bool
    (dict(n_expert_groups=3), "n_expert_groups"),  # 3 does not divide 8
    (dict(n_limited_groups=5), "n_limited_groups"),  # kept groups > groups
    (dict(n_limited_groups=1, n_activated_experts=3), "n_limited_groups"),  # 1 group of 2 < top-3
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=-4), "q_lora_rank"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),  # odd rope dim
    (dict(qk_rope_head_dim=0), "qk_rope_head_dim"),  # decoupled RoPE needs a rope dim
    (dict(n_dense_layers=4), "n_dense_layers"),
    (dict(attention_kind="linear"), "attention_kind"),
    (dict(attention_kind="gqa"), "n_kv_heads"),  # gqa without n_kv_heads
    (dict(attention_kind="gqa", n_kv_heads=3), "n_kv_heads"),  # 3 does not divide 4 heads
    (dict(n_kv_heads=2), "n_kv_heads"),  # n_kv_heads only for gqa
    (dict(attention_kind="mha", decoupled_rope=False), "decoupled_rope"),
    (dict(score_func="relu"), "score_func"),
    (dict(group_score="mean"), "group_score"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(yarn_factor=0.5), "yarn_factor"),
    (dict(yarn_beta_fast=0.5), "yarn_beta_fast"),
    (dict(expert_balance_coef=-1.0), "expert_balance_coef"),
    (dict(dtype="int8"), "dtype"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_expert_groups=8, n_limited_groups=4), "group_score"),  # top2 of 1 expert per group
])
def test_invalid_config_raises_value_error_naming_the_field(overrides, field):
  with pytest.raises(ValueError, match=rf"ModelConfig\.{field}"):
    ModelConfig.preset("tiny", **overrides)


def test_unknown_field_and_unknown_preset_are_rejected():
  with pytest.raises(ValueError, match="unknown ModelConfig field"):
    ModelConfig.preset("tiny", d_modle=32)
  with pytest.raises(ValueError, match="unknown preset 'deepseek-v4'"):
    ModelConfig.preset("deepseek-v4")


def test_v3_softmax_scale_includes_yarn_mscale():
  # (128 + 64)^-1/2 * (0.1 ln 40 + 1)^2 (REFERENCE §2)
  assert ModelConfig.preset("deepseek-v3").softmax_scale == pytest.approx(0.135234, abs=1e-6)


def test_choice_fields_are_literals_checked_with_their_choices_listed():
  kinds = typed_fields.field_types(ModelConfig)
  for field, choices in [("attention_kind", config.ATTENTION_KINDS),
                         ("attention_impl", config.ATTENTION_IMPLS),
                         ("score_func", config.SCORE_FUNCS), ("group_score", config.GROUP_SCORES),
                         ("balance_loss_scope", config.BALANCE_SCOPES),
                         ("expert_exchange", config.EXPERT_EXCHANGES),
                         ("grouped_matmul", config.GROUPED_MATMUL_IMPLS),
                         ("remat_policy", config.REMAT_POLICIES), ("dtype", config.DTYPES),
                         ("param_dtype", config.DTYPES)]:
    assert kinds[field].choices == choices, field  # the tuples other code imports
    with pytest.raises(ValueError) as error:
      ModelConfig.preset("tiny", **{field: "nope"})
    assert str(error.value) == f"ModelConfig.{field}: must be one of {choices}, got 'nope'"


@pytest.mark.parametrize("overrides, message", [
    (dict(q_lora_rank=32.0), "ModelConfig.q_lora_rank: must be int or None, got 32.0 (float)"),
    (dict(capacity_factor="1"),
     "ModelConfig.capacity_factor: must be float or None, got '1' (str)"),
    (dict(d_model=None), "ModelConfig.d_model: must be int, got None (NoneType)"),
])
def test_optional_fields_take_none_or_their_type_and_others_refuse_none(overrides, message):
  with pytest.raises(ValueError) as error:
    ModelConfig.preset("tiny", **overrides)
  assert str(error.value) == message
  assert ModelConfig.preset("tiny", q_lora_rank=None, capacity_factor=2).capacity_factor == 2


def test_a_moe_choice_is_checked_even_in_a_dense_model():
  with pytest.raises(ValueError, match=r"ModelConfig\.score_func: must be one of"):
    ModelConfig.preset("tiny", n_dense_layers=3, score_func="relu")
