"""config.json <-> ModelConfig: the released models' hub configs map onto our presets."""

import dataclasses

import pytest

from deepseek_jax.config import ModelConfig
from deepseek_jax.interop.hf_config import UnsupportedConfig, from_hf_config, to_hf_config

_YARN_HUB = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "original_max_position_embeddings": 4096,
             "type": "yarn"}

# The architecture fields of the released config.json files (hub dialect, as downloaded).
HUB_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "aux_loss_alpha": 0.001, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {**_YARN_HUB, "mscale": 1.0, "mscale_all_dim": 1.0},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280}
HUB_V2 = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
    "aux_loss_alpha": 0.003, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 12288, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 1536, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 160, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 128, "num_experts_per_tok": 6, "num_hidden_layers": 60,
    "num_key_value_heads": 128, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {**_YARN_HUB, "mscale": 0.707, "mscale_all_dim": 0.707},
    "rope_theta": 10000, "routed_scaling_factor": 16.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 3, "topk_method": "group_limited_greedy",
    "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400}
HUB_V2_LITE = {
    **HUB_V2, "aux_loss_alpha": 0.001, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 64, "num_attention_heads": 16,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "routed_scaling_factor": 1.0, "topk_group": 1, "topk_method": "greedy"}

# Fields that describe training or execution, not the function the weights compute.
_NOT_ARCHITECTURE = {"name", "init_std", "dtype", "param_dtype", "expert_balance_coef",
                     "device_balance_coef", "comm_balance_coef", "mtp_loss_weight", "capacity_factor"}


def _architecture(cfg: ModelConfig) -> dict:
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_ARCHITECTURE}


@pytest.mark.parametrize("hub, preset", [(HUB_V3, "deepseek-v3"), (HUB_V2, "deepseek-v2"),
                                         (HUB_V2_LITE, "deepseek-v2-lite")])
def test_released_configs_map_onto_our_presets(hub, preset):
  cfg = from_hf_config(hub)
  assert _architecture(cfg) == _architecture(ModelConfig.preset(preset))
  assert cfg.param_dtype == "bfloat16" and cfg.expert_balance_coef == hub["aux_loss_alpha"]


def test_v5_rope_parameters_dialect_reads_like_the_hub_dialect():
  v5 = {k: v for k, v in HUB_V3.items() if k not in ("rope_scaling", "rope_theta")}
  v5["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                           "original_max_position_embeddings": 4096, "beta_fast": 32,
                           "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
  assert from_hf_config(v5) == from_hf_config(HUB_V3)


def test_mtp_can_be_left_out():
  assert from_hf_config(HUB_V3, load_mtp=False).n_mtp_modules == 0
  assert from_hf_config(HUB_V3).n_mtp_modules == 1


@pytest.mark.parametrize("preset", ["tiny", "small", "deepseek-v2-lite", "deepseek-v2", "deepseek-v3"])
def test_to_hf_config_round_trips(preset):
  cfg = ModelConfig.preset(preset)
  back = from_hf_config(to_hf_config(cfg))
  assert _architecture(back) == _architecture(cfg)


def test_yarn_without_mscales_uses_transformers_defaults():
  hub = {**HUB_V2_LITE, "rope_scaling": {**_YARN_HUB}}
  cfg = from_hf_config(hub)  # amplitude 0.1 ln(s) + 1, softmax scale unchanged (as transformers)
  assert (cfg.yarn_mscale, cfg.yarn_mscale_all_dim) == (1.0, 0.0)
  assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim ** -0.5)


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type"),
    ({"rope_scaling": {**_YARN_HUB, "mscale_all_dim": 1.0}}, "rope mscale"),
    ({"topk_method": "noaux_tc"}, "topk_method"),
    ({"scoring_func": "sigmoid"}, "scoring_func"),
    ({"rope_interleave": False}, "rope_interleave"),
])
def test_unsupported_configs_are_refused_naming_the_field(change, field):
  with pytest.raises(UnsupportedConfig, match=field):
    from_hf_config({**HUB_V2_LITE, **change})


def test_export_refuses_what_hf_cannot_express():
  with pytest.raises(UnsupportedConfig, match="attention_kind='gqa'"):
    to_hf_config(ModelConfig.preset("tiny", attention_kind="gqa", n_kv_heads=2))
  with pytest.raises(UnsupportedConfig, match="group_score='max'"):
    to_hf_config(ModelConfig.preset("tiny", group_score="max"))


# --- family meaning: each field read as DeepSeek's own code for that model type reads it ---------

def test_v2_norm_topk_prob_renormalises_instead_of_scaling():
  """DeepSeek-V2's MoEGate: `if top_k > 1 and norm_topk_prob: w /= sum(w) else: w *= scale`."""
  with pytest.warns(UserWarning, match="transformers' DeepseekV2 ignores norm_topk_prob"):
    cfg = from_hf_config({**HUB_V2, "norm_topk_prob": True})  # routed_scaling_factor 16
  assert (cfg.norm_topk_prob, cfg.routed_scaling_factor) == (True, 1.0)


def test_v2_norm_topk_prob_with_one_expert_per_token_only_scales():
  cfg = from_hf_config({**HUB_V2_LITE, "norm_topk_prob": True, "num_experts_per_tok": 1,
                        "routed_scaling_factor": 16.0})
  assert (cfg.norm_topk_prob, cfg.routed_scaling_factor) == (False, 16.0)


def test_v2_renormalising_config_round_trips_through_export():
  with pytest.warns(UserWarning, match="norm_topk_prob"):
    cfg = from_hf_config({**HUB_V2_LITE, "norm_topk_prob": True})
    hub = to_hf_config(cfg)
    assert (hub["norm_topk_prob"], hub["routed_scaling_factor"]) == (True, 1.0)
    assert from_hf_config(hub) == cfg


def test_missing_fields_take_the_family_defaults_both_codes_share():
  """V3 (DeepSeek's configuration_deepseek.py = transformers' DeepseekV3Config): 8 groups keep 4,
  scale 2.5, normalised, 3 dense layers, 1 shared expert; V2: scale 1, unnormalised, softmax."""
  routing = ("n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
             "first_k_dense_replace", "n_shared_experts", "topk_method", "scoring_func",
             "moe_layer_freq", "seq_aux", "q_lora_rank", "kv_lora_rank", "num_key_value_heads")
  assert from_hf_config({k: v for k, v in HUB_V3.items() if k not in routing}) == from_hf_config(HUB_V3)
  v2_defaults = ("norm_topk_prob", "routed_scaling_factor", "scoring_func", "moe_layer_freq",
                 "seq_aux", "n_group", "topk_group", "num_key_value_heads")
  lite = {k: v for k, v in HUB_V2_LITE.items() if k not in v2_defaults}
  assert from_hf_config(lite) == from_hf_config(HUB_V2_LITE)


def test_yarn_without_original_length_assumes_4096_only_where_both_codes_do():
  rope = {k: v for k, v in HUB_V3["rope_scaling"].items() if k != "original_max_position_embeddings"}
  cfg = from_hf_config({**HUB_V3, "rope_scaling": rope, "max_position_embeddings": 4096})
  assert cfg.yarn_original_max_len == 4096
  with pytest.raises(UnsupportedConfig, match="rope original_max_position_embeddings"):
    from_hf_config({**HUB_V3, "rope_scaling": rope})  # transformers would use 163840


_NO_FACTOR = {k: v for k, v in _YARN_HUB.items() if k != "factor"}


@pytest.mark.parametrize("hub, change, field", [
    # transformers' DeepseekV3 renormalises one expert's weight to 1, DeepSeek's gate does not
    (HUB_V3, {"num_experts_per_tok": 1, "n_group": 1, "topk_group": 1}, "norm_topk_prob"),
    # MLA has no KV-head count: transformers repeats keys by heads/kv_heads and fails
    (HUB_V2_LITE, {"num_key_value_heads": 4}, "num_key_value_heads"),
    # amplitude 0.1*0.707*ln(s)+1 in DeepSeek's YaRN, 0.1*ln(s)+1 in transformers'
    (HUB_V2_LITE, {"rope_scaling": {**_YARN_HUB, "mscale": 0.707}}, "rope mscale"),
    (HUB_V2_LITE, {"rope_scaling": {**_YARN_HUB, "mscale": 0.0}}, "rope mscale"),
    (HUB_V2_LITE, {"rope_scaling": {**_NO_FACTOR, "mscale": 1.0, "mscale_all_dim": 1.0}}, "rope factor"),
    (HUB_V2_LITE, {"original_max_position_embeddings": 2048}, "original_max_position_embeddings"),
    (HUB_V2_LITE, {"rope_parameters": {"rope_type": "yarn", "factor": 20.0}}, "rope_scaling"),
    (HUB_V2_LITE, {"use_mla": False}, "use_mla"),
    # defaults that differ between DeepSeek's configuration_deepseek.py and transformers
    ({k: v for k, v in HUB_V2.items() if k != "topk_method"}, {}, "has no topk_method"),
    ({k: v for k, v in HUB_V2.items() if k != "n_routed_experts"}, {}, "has no n_routed_experts"),
    ({k: v for k, v in HUB_V2.items() if k != "n_shared_experts"}, {}, "has no n_shared_experts"),
    ({k: v for k, v in HUB_V2.items() if k != "num_hidden_layers"}, {}, "has no num_hidden_layers"),
    ({k: v for k, v in HUB_V2.items() if k != "num_experts_per_tok"}, {}, "has no num_experts_per_tok"),
    # group limits neither code runs as written
    (HUB_V2, {"n_group": None}, "n_group"),
    (HUB_V2, {"n_group": 7}, "n_group"),
    (HUB_V2, {"topk_group": 0}, "topk_group"),
    (HUB_V2, {"n_group": 80, "topk_group": 2}, "topk_group"),  # 2 kept groups of 2 < top-6
    (HUB_V3, {"n_group": 256, "topk_group": 8}, "n_group"),  # top-2 of a 1-expert group
])
def test_combinations_the_two_codes_disagree_on_are_refused_naming_the_field(hub, change, field):
  with pytest.raises(UnsupportedConfig, match=field):
    from_hf_config({**hub, **change})


@pytest.mark.parametrize("overrides, field", [
    (dict(score_func="softmax", group_score="max", router_bias=False, norm_topk_prob=True,
          routed_scaling_factor=16.0), "routed_scaling_factor=16.0"),
    (dict(score_func="softmax", group_score="max", router_bias=False, norm_topk_prob=True,
          routed_scaling_factor=1.0, n_activated_experts=1), "n_activated_experts=1"),
    (dict(norm_topk_prob=True, n_activated_experts=1), "n_activated_experts=1"),
])
def test_export_refuses_routing_no_deepseek_config_expresses(overrides, field):
  """V2 renormalises or scales, never both; neither family renormalises a single expert."""
  with pytest.raises(UnsupportedConfig, match=field):
    to_hf_config(ModelConfig.preset("tiny", **overrides))
