"""HF ``config.json`` <-> ``ModelConfig`` for DeepSeek-V2 / V2-Lite / V3 / R1.

Both dialects are read: the hub's original files (``rope_scaling`` with ``"type"``,
``rope_theta``, ``topk_method``, ``scoring_func``, ``num_nextn_predict_layers``) and
transformers v5's (``rope_parameters``). Routing by model type:

  deepseek_v3: sigmoid scores, group score = sum of top-2 (+ score-correction bias), top-k
               weights renormalised if ``norm_topk_prob`` (V3, R1: true), ``noaux_tc``.
  deepseek_v2: softmax scores; ``group_limited_greedy`` keeps ``topk_group`` of ``n_group``
               groups scored by their max (V2), ``greedy`` has no group limit (V2-Lite).

YaRN follows transformers: the rotary amplitude is mscale(s, mscale) / mscale(s, mscale_all_dim)
when both are given, else mscale(s, 1); the softmax scale gets mscale(s, mscale_all_dim)^2 when
``mscale_all_dim`` is given. A config this library cannot reproduce exactly is refused with the
field named, never approximated. ``to_hf_config`` writes the hub dialect, which transformers
reads too.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from deepseek_jax.config import ModelConfig

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
_ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


class UnsupportedConfig(ValueError):
  """An HF config describes something deepseek-jax cannot reproduce exactly."""


def _unsupported(field: str, value: Any, why: str) -> UnsupportedConfig:
  return UnsupportedConfig(f"config.json {field}={value!r} is not supported: {why}")


def _rope_fields(hf: dict) -> dict:
  params = hf.get("rope_parameters") or {}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = params if params.get("rope_type", "default") != "default" else (hf.get("rope_scaling") or {})
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  fields = dict(rope_theta=float(theta))
  if kind == "default":
    return fields
  if kind != "yarn":
    raise _unsupported("rope type", kind, "DeepSeek models use 'yarn' or no scaling")
  if not scaling.get("truncate", True):
    raise _unsupported("rope truncate", False, "YaRN here rounds the correction range (floor/ceil)")
  original = int(scaling["original_max_position_embeddings"])
  factor = scaling.get("factor") or hf["max_position_embeddings"] / original
  mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
  if mscale_all_dim and not mscale:
    raise _unsupported("rope mscale", mscale, "mscale_all_dim without mscale mixes two conventions")
  if not (mscale and mscale_all_dim):  # transformers: amplitude mscale(s, 1), softmax unscaled
    mscale, mscale_all_dim = 1.0, 0.0
  fields.update(yarn_factor=float(factor), yarn_original_max_len=original,
                yarn_beta_fast=float(scaling.get("beta_fast") or 32.0),
                yarn_beta_slow=float(scaling.get("beta_slow") or 1.0),
                yarn_mscale=float(mscale), yarn_mscale_all_dim=float(mscale_all_dim))
  attention_factor = scaling.get("attention_factor")
  if attention_factor is not None:
    expected = _mscale(factor, fields["yarn_mscale"]) / _mscale(factor, fields["yarn_mscale_all_dim"])
    if not math.isclose(attention_factor, expected, rel_tol=1e-6):
      raise _unsupported("rope attention_factor", attention_factor,
                         f"the rotary amplitude here is mscale/mscale_all_dim = {expected:.6f}")
  return fields


def _mscale(factor: float, m: float) -> float:
  return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def _routing_fields(hf: dict, model_type: str) -> dict:
  n_routed = hf.get("n_routed_experts")
  if not n_routed:
    return {}
  if hf.get("moe_layer_freq", 1) != 1:
    raise _unsupported("moe_layer_freq", hf["moe_layer_freq"],
                       "every layer after first_k_dense_replace must be MoE")
  groups, kept = hf.get("n_group") or 1, hf.get("topk_group") or 1
  fields = dict(n_routed_experts=int(n_routed), n_shared_experts=int(hf.get("n_shared_experts") or 0),
                n_activated_experts=int(hf["num_experts_per_tok"]),
                moe_ffn_dim=int(hf["moe_intermediate_size"]),
                routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                expert_balance_coef=float(hf.get("aux_loss_alpha") or 0.0),
                balance_loss_scope="sequence" if hf.get("seq_aux", True) else "batch")
  if model_type == "deepseek_v3":
    method = hf.get("topk_method", "noaux_tc")
    if method != "noaux_tc":
      raise _unsupported("topk_method", method, "deepseek_v3 routes with 'noaux_tc'")
    score = hf.get("scoring_func", "sigmoid")
    if score != "sigmoid":
      raise _unsupported("scoring_func", score, "deepseek_v3 scores experts with a sigmoid")
    fields.update(score_func="sigmoid", group_score="top2_sum", router_bias=True,
                  n_expert_groups=groups, n_limited_groups=kept,
                  norm_topk_prob=bool(hf.get("norm_topk_prob", True)))
  else:
    method = hf.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
      raise _unsupported("topk_method", method, "deepseek_v2 uses 'greedy' or 'group_limited_greedy'")
    score = hf.get("scoring_func", "softmax")
    if score != "softmax":
      raise _unsupported("scoring_func", score, "deepseek_v2 scores experts with a softmax")
    limited = method == "group_limited_greedy"
    fields.update(score_func="softmax", group_score="max", router_bias=False,
                  n_expert_groups=groups if limited else 1, n_limited_groups=kept if limited else 1,
                  norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
  return fields


def from_hf_config(hf: dict, *, load_mtp: bool = True, **overrides) -> ModelConfig:
  """The ModelConfig of an HF DeepSeek config.json (a dict). ``load_mtp=False`` drops the
  MTP module(s) (``num_nextn_predict_layers``); ``overrides`` replace fields afterwards
  (``param_dtype``, ``dtype``, ``scan_layers`` ...)."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise UnsupportedConfig(f"config.json model_type={model_type!r} is not supported; deepseek-jax "
                            f"imports {MODEL_TYPES} (DeepSeek-V2, V2-Lite, V3, R1)")
  for field, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                          ("rope_interleave", True)):
    if field in hf and hf[field] != expected:
      raise _unsupported(field, hf[field], f"only {expected!r} is implemented")
  heads = int(hf["num_attention_heads"])
  n_layers = int(hf["num_hidden_layers"])
  n_routed = hf.get("n_routed_experts")
  n_mtp = int(hf.get("num_nextn_predict_layers") or 0) if load_mtp else 0
  fields = dict(
      name=f"hf:{model_type}", vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
      n_layers=n_layers,
      n_dense_layers=min(int(hf.get("first_k_dense_replace", 0)), n_layers) if n_routed else n_layers,
      dense_ffn_dim=int(hf["intermediate_size"]),
      max_seq_len=int(hf.get("max_position_embeddings", 4096)), attention_kind="mla",
      n_heads=heads, q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=int(hf["kv_lora_rank"]),
      qk_nope_head_dim=int(hf["qk_nope_head_dim"]), qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
      v_head_dim=int(hf["v_head_dim"]), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      init_std=float(hf.get("initializer_range", 0.006)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      n_mtp_modules=n_mtp, mtp_loss_weight=0.3 if n_mtp else 0.0,  # V3 §4.2: 0.3, later 0.1
      **_rope_fields(hf), **_routing_fields(hf, model_type))
  dtype = hf.get("dtype") or hf.get("torch_dtype")
  if dtype in ("float32", "bfloat16", "float16"):
    fields.update(param_dtype=dtype, dtype=dtype)
  fields.update(overrides)
  return ModelConfig(**fields)


def hf_model_type(cfg: ModelConfig) -> str:
  """deepseek_v3 or deepseek_v2: the HF architecture that computes what ``cfg`` computes."""
  if cfg.attention_kind != "mla" or not cfg.decoupled_rope:
    raise UnsupportedConfig("HF DeepSeek models implement MLA with decoupled RoPE only; got "
                            f"attention_kind={cfg.attention_kind!r}, decoupled_rope={cfg.decoupled_rope}")
  if cfg.yarn_factor > 1.0 and ((cfg.yarn_mscale_all_dim == 0 and cfg.yarn_mscale != 1.0)
                                or (cfg.yarn_mscale == 0 and cfg.yarn_mscale_all_dim != 0)):
    raise UnsupportedConfig(f"yarn_mscale={cfg.yarn_mscale}, yarn_mscale_all_dim="
                            f"{cfg.yarn_mscale_all_dim} has no HF rope_scaling equivalent")
  if cfg.n_moe_layers == 0:
    return "deepseek_v3"
  if cfg.score_func == "sigmoid" and cfg.group_score == "top2_sum":
    return "deepseek_v3"
  if cfg.score_func == "softmax" and (cfg.group_score == "max"
                                      or cfg.n_limited_groups == cfg.n_expert_groups):
    if cfg.router_bias:
      raise UnsupportedConfig("HF DeepseekV2 has no score-correction bias; got router_bias=True")
    return "deepseek_v2"
  raise UnsupportedConfig("HF routes with sigmoid + top-2-sum groups (V3) or softmax + max "
                          f"groups (V2); got score_func={cfg.score_func!r}, "
                          f"group_score={cfg.group_score!r}")


def to_hf_config(cfg: ModelConfig, dtype: Optional[str] = None) -> dict:
  """config.json (hub dialect) for ``cfg``; refuses what HF cannot express."""
  model_type = hf_model_type(cfg)
  hf = dict(
      architectures=[_ARCHITECTURES[model_type]], model_type=model_type,
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.dense_ffn_dim,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank,
      kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
      qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, hidden_act="silu",
      max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std,
      rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      attention_bias=False, attention_dropout=0.0, rope_theta=cfg.rope_theta, rope_scaling=None,
      num_nextn_predict_layers=cfg.n_mtp_modules, torch_dtype=dtype or cfg.param_dtype)
  if cfg.yarn_factor > 1.0:
    hf["rope_scaling"] = dict(
        type="yarn", factor=cfg.yarn_factor,
        original_max_position_embeddings=cfg.yarn_original_max_len,
        beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow, mscale=cfg.yarn_mscale,
        mscale_all_dim=cfg.yarn_mscale_all_dim)
  if model_type == "deepseek_v3":
    hf["rope_interleave"] = True
  limited = cfg.n_limited_groups < cfg.n_expert_groups
  hf.update(
      n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
      num_experts_per_tok=cfg.n_activated_experts, moe_intermediate_size=cfg.moe_ffn_dim,
      first_k_dense_replace=cfg.n_dense_layers, moe_layer_freq=1,
      n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
      routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.norm_topk_prob,
      scoring_func=cfg.score_func, aux_loss_alpha=cfg.expert_balance_coef,
      seq_aux=cfg.balance_loss_scope == "sequence",
      topk_method=("noaux_tc" if model_type == "deepseek_v3" else
                   "group_limited_greedy" if limited else "greedy"))
  return hf


def to_hf_v3_config(cfg: ModelConfig, **extra):
  """A transformers ``DeepseekV3Config`` (the `hf` extra) computing what ``cfg`` computes."""
  from transformers import DeepseekV3Config

  if hf_model_type(cfg) != "deepseek_v3":
    raise UnsupportedConfig("HF DeepseekV3 routes with sigmoid scores and top-2-sum group "
                            f"scoring; got score_func={cfg.score_func!r}, group_score={cfg.group_score!r}")
  hf = to_hf_config(cfg)
  for key in ("architectures", "model_type", "torch_dtype", "topk_method", "scoring_func",
              "moe_layer_freq", "aux_loss_alpha", "seq_aux", "num_nextn_predict_layers"):
    hf.pop(key, None)
  return DeepseekV3Config(**hf, use_cache=False, **extra)
