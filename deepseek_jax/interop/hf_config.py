"""HF ``config.json`` <-> ``ModelConfig`` for DeepSeek-V2 / V2-Lite / V3 / R1.

A field means what the code that runs that model type computes with it: DeepSeek's own
``modeling_deepseek.py`` / ``configuration_deepseek.py`` published beside each checkpoint (the
reference), which transformers' DeepseekV2 / DeepseekV3 re-implement. Where the two compute the
same thing the config is imported; where they differ, or where one of them cannot run it, the
config is refused with the field named (``UnsupportedConfig``), never read one way silently.
The one exception is below (V2 ``norm_topk_prob``): the reference is followed and a warning
says transformers differs. A field missing from config.json takes the default both codes share
for that model type (``_DEFAULTS``); where their defaults differ, the field is required.

Both dialects are read: the hub's original files (``rope_scaling`` with ``"type"``,
``rope_theta``, ``topk_method``, ``scoring_func``, ``num_nextn_predict_layers``) and
transformers v5's (``rope_parameters``). Routing by model type (the reference MoEGate):

  deepseek_v2: s = softmax; 'greedy' top-k, or 'group_limited_greedy' keeping ``topk_group`` of
               ``n_group`` groups scored by their max. The top-k weights are EITHER renormalised
               to sum 1 (``num_experts_per_tok > 1`` and ``norm_topk_prob``; the scale is then
               unused) OR multiplied by ``routed_scaling_factor``, never both.
               transformers 5.24's DeepseekV2TopkRouter ignores ``norm_topk_prob`` (it always
               scales); configs with it set load as DeepSeek's code computes, with a warning.
  deepseek_v3: s = sigmoid; selection on s + score-correction bias, group score = sum of the
               top-2, 'noaux_tc'; weights renormalised if ``norm_topk_prob`` (V3, R1: true),
               then times ``routed_scaling_factor``. With one expert per token the reference
               does not renormalise but transformers does: refused.

YaRN follows both codes where they agree: the rotary amplitude is mscale(s, mscale) /
mscale(s, mscale_all_dim) when both are given, mscale(s, 1) when neither is (the softmax scale
gets mscale(s, mscale_all_dim)^2 when ``mscale_all_dim`` is given). Only one of the two given is
refused: DeepSeek's code and transformers' then compute different amplitudes.
``to_hf_config`` writes the hub dialect and refuses a ModelConfig no DeepSeek config expresses.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple, Optional

from deepseek_jax.config import ModelConfig

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
_ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


class UnsupportedConfig(ValueError):
  """An HF config describes something deepseek-jax cannot reproduce exactly."""


class _Required(NamedTuple):
  """No default shared by DeepSeek's configuration_deepseek.py and transformers: ``why``."""

  why: str


_SHARED_DEFAULTS = dict(
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False, rope_theta=10000.0,
    moe_layer_freq=1, aux_loss_alpha=0.001, seq_aux=True)
# Per model type: DeepSeek's configuration_deepseek.py defaults where transformers' agree.
_DEFAULTS = {
    "deepseek_v2": dict(
        _SHARED_DEFAULTS, vocab_size=102400, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=_Required("DeepSeek's configuration_deepseek.py defaults it to 30, "
                                    "transformers to 32"),
        num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
        n_routed_experts=_Required("DeepSeek's code defaults it to None (a dense model), "
                                   "transformers to 64"),
        n_shared_experts=_Required("DeepSeek's code defaults it to None (no shared experts), "
                                   "transformers to 2"),
        num_experts_per_tok=_Required("neither DeepSeek's code nor transformers has a default"),
        moe_intermediate_size=1407, first_k_dense_replace=0, routed_scaling_factor=1.0,
        norm_topk_prob=False, scoring_func="softmax",
        topk_method=_Required("DeepSeek's code defaults it to 'gready', which routes nothing; "
                              "transformers to 'greedy'"),
        n_group=None, topk_group=None, num_nextn_predict_layers=0),
    "deepseek_v3": dict(
        _SHARED_DEFAULTS, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        max_position_embeddings=4096, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, moe_intermediate_size=2048, first_k_dense_replace=3,
        routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
        topk_method="noaux_tc", n_group=8, topk_group=4, num_nextn_predict_layers=1),
}
_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim")


def _unsupported(field: str, value: Any, why: str) -> UnsupportedConfig:
  return UnsupportedConfig(f"config.json {field}={value!r} is not supported: {why}")


def _field(hf: dict, model_type: str, name: str) -> Any:
  """``hf[name]``, else the model type's shared default; raises UnsupportedConfig if none."""
  if name in hf:
    return hf[name]
  default = _DEFAULTS[model_type][name]
  if isinstance(default, _Required):
    raise UnsupportedConfig(f"config.json has no {name}: {default.why}; state it in config.json")
  return default


def _rope_fields(hf: dict, max_position: int) -> dict:
  params = hf.get("rope_parameters") or {}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  legacy = hf.get("rope_scaling") or {}
  v5 = params if params.get("rope_type", "default") != "default" else {}
  if legacy and v5 and any(legacy.get(k) != v5.get(k) for k in _YARN_KEYS):
    raise _unsupported("rope_scaling", legacy, "it differs from rope_parameters (transformers "
                       "reads rope_scaling, DeepSeek's code too); keep one of them")
  scaling = legacy or v5
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  fields = dict(rope_theta=float(theta))
  if kind == "default":
    return fields
  if kind != "yarn":
    raise _unsupported("rope type", kind, "DeepSeek models use 'yarn' or no scaling")
  if not scaling.get("truncate", True):
    raise _unsupported("rope truncate", False, "YaRN here rounds the correction range (floor/ceil)")
  factor = scaling.get("factor")
  if not factor:
    raise _unsupported("rope factor", factor, "DeepSeek's YaRN requires rope_scaling['factor'] "
                       "(transformers would derive it from max_position_embeddings); state it")
  original = scaling.get("original_max_position_embeddings")
  if original is None:
    if max_position != 4096:
      raise _unsupported("rope original_max_position_embeddings", None, "DeepSeek's YaRN then "
                         f"assumes 4096, transformers max_position_embeddings={max_position}; state it")
    original = 4096
  if hf.get("original_max_position_embeddings", original) != original:
    raise _unsupported("original_max_position_embeddings", hf["original_max_position_embeddings"],
                       f"transformers prefers it to rope_scaling's {original}, DeepSeek's code "
                       "ignores it; remove it or make the two equal")
  mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
  if mscale_all_dim and not mscale:
    raise _unsupported("rope mscale", mscale, "mscale_all_dim without mscale mixes two conventions "
                       "(DeepSeek's amplitude mscale(s, 1)/mscale(s, mscale_all_dim), "
                       "transformers' mscale(s, 1)); state both")
  if not mscale_all_dim:
    if mscale is not None and mscale != 1:
      raise _unsupported("rope mscale", mscale, "without mscale_all_dim DeepSeek's code scales the "
                         "rotary amplitude by 0.1*mscale*ln(s)+1, transformers by 0.1*ln(s)+1; "
                         "add mscale_all_dim or set mscale to 1")
    mscale, mscale_all_dim = 1.0, 0.0  # amplitude mscale(s, 1), softmax unscaled (both codes)
  fields.update(yarn_factor=float(factor), yarn_original_max_len=int(original),
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


def _group_fields(get, n_routed: int, top_k: int, top2: bool) -> dict:
  """n_group / topk_group, checked to be a group limit both codes run the same way."""
  groups, kept = get("n_group"), get("topk_group")
  if groups is None or kept is None:
    raise _unsupported("n_group" if groups is None else "topk_group", None,
                       "group-limited routing needs both n_group and topk_group")
  groups, kept = int(groups), int(kept)
  if groups < 1 or n_routed % groups:
    raise _unsupported("n_group", groups, f"it must divide n_routed_experts={n_routed}")
  if top2 and n_routed // groups < 2:
    raise _unsupported("n_group", groups, "a group is scored by its top-2 experts, so each needs >= 2")
  if not 1 <= kept <= groups or kept * (n_routed // groups) < top_k:
    raise _unsupported("topk_group", kept, f"the kept groups must hold at least "
                       f"num_experts_per_tok={top_k} of the {n_routed // groups}-expert groups")
  return dict(n_expert_groups=groups, n_limited_groups=kept)


def _warn_v2_norm() -> None:
  warnings.warn("deepseek_v2 with norm_topk_prob=true and num_experts_per_tok > 1: the top-k "
                "weights are renormalised to sum 1 and routed_scaling_factor is unused, as "
                "DeepSeek's modeling_deepseek.py computes; transformers' DeepseekV2 ignores "
                "norm_topk_prob and computes something else", stacklevel=3)


def _routing_fields(hf: dict, model_type: str) -> dict:
  get = functools.partial(_field, hf, model_type)
  n_routed = get("n_routed_experts")
  if not n_routed:
    return {}
  if get("moe_layer_freq") != 1:
    raise _unsupported("moe_layer_freq", hf["moe_layer_freq"],
                       "every layer after first_k_dense_replace must be MoE")
  n_routed, top_k = int(n_routed), int(get("num_experts_per_tok"))
  norm, scale = bool(get("norm_topk_prob")), float(get("routed_scaling_factor"))
  fields = dict(n_routed_experts=n_routed, n_shared_experts=int(get("n_shared_experts") or 0),
                n_activated_experts=top_k, moe_ffn_dim=int(get("moe_intermediate_size")),
                expert_balance_coef=float(get("aux_loss_alpha") or 0.0),
                balance_loss_scope="sequence" if get("seq_aux") else "batch")
  if model_type == "deepseek_v3":
    method = get("topk_method")
    if method != "noaux_tc":
      raise _unsupported("topk_method", method, "deepseek_v3 routes with 'noaux_tc'")
    score = get("scoring_func")
    if score != "sigmoid":
      raise _unsupported("scoring_func", score, "deepseek_v3 scores experts with a sigmoid")
    if norm and top_k == 1:
      raise _unsupported("norm_topk_prob", True, "with num_experts_per_tok=1 DeepSeek's gate leaves "
                         "the weight unnormalised, transformers' normalises it to 1; set it to false")
    fields.update(score_func="sigmoid", group_score="top2_sum", router_bias=True,
                  norm_topk_prob=norm, routed_scaling_factor=scale,
                  **_group_fields(get, n_routed, top_k, top2=True))
    return fields
  method = get("topk_method")
  if method not in ("greedy", "group_limited_greedy"):
    raise _unsupported("topk_method", method, "deepseek_v2 uses 'greedy' or 'group_limited_greedy'")
  score = get("scoring_func")
  if score != "softmax":
    raise _unsupported("scoring_func", score, "deepseek_v2 scores experts with a softmax")
  if norm and top_k > 1:  # the reference renormalises INSTEAD of scaling
    _warn_v2_norm()
    norm, scale = True, 1.0
  else:
    norm = False
  groups = (_group_fields(get, n_routed, top_k, top2=False) if method == "group_limited_greedy"
            else dict(n_expert_groups=1, n_limited_groups=1))  # 'greedy' ignores n_group
  fields.update(score_func="softmax", group_score="max", router_bias=False, norm_topk_prob=norm,
                routed_scaling_factor=scale, **groups)
  return fields


def from_hf_config(hf: dict, *, load_mtp: bool = True, **overrides) -> ModelConfig:
  """The ModelConfig of an HF DeepSeek config.json (a dict). ``load_mtp=False`` drops the
  MTP module(s) (``num_nextn_predict_layers``); ``overrides`` replace fields afterwards
  (``param_dtype``, ``dtype``, ``scan_layers`` ...). Raises UnsupportedConfig naming the field
  for anything not reproduced exactly (see the module docstring)."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise UnsupportedConfig(f"config.json model_type={model_type!r} is not supported; deepseek-jax "
                            f"imports {MODEL_TYPES} (DeepSeek-V2, V2-Lite, V3, R1)")
  for field, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                          ("rope_interleave", True), ("use_mla", True)):
    if field in hf and hf[field] != expected:
      raise _unsupported(field, hf[field], f"only {expected!r} is implemented")
  get = functools.partial(_field, hf, model_type)
  heads = int(get("num_attention_heads"))
  kv_heads = get("num_key_value_heads")
  if kv_heads is not None and int(kv_heads) != heads:
    raise _unsupported("num_key_value_heads", kv_heads, "MLA expands every head from the latent: "
                       "DeepSeek's code ignores it, transformers repeats keys by "
                       f"num_attention_heads/num_key_value_heads and fails; set it to {heads}")
  n_layers = int(get("num_hidden_layers"))
  n_routed = get("n_routed_experts")
  n_mtp = int(get("num_nextn_predict_layers") or 0) if load_mtp else 0
  max_position = int(get("max_position_embeddings"))
  q_lora_rank = get("q_lora_rank")
  fields = dict(
      name=f"hf:{model_type}", vocab_size=int(get("vocab_size")), d_model=int(get("hidden_size")),
      n_layers=n_layers,
      n_dense_layers=(min(int(get("first_k_dense_replace") or 0), n_layers) if n_routed
                      else n_layers),
      dense_ffn_dim=int(get("intermediate_size")), max_seq_len=max_position,
      attention_kind="mla", n_heads=heads,
      q_lora_rank=None if q_lora_rank is None else int(q_lora_rank),
      kv_lora_rank=int(get("kv_lora_rank")), qk_nope_head_dim=int(get("qk_nope_head_dim")),
      qk_rope_head_dim=int(get("qk_rope_head_dim")), v_head_dim=int(get("v_head_dim")),
      rms_norm_eps=float(get("rms_norm_eps")), init_std=float(get("initializer_range")),
      tie_embeddings=bool(get("tie_word_embeddings")),
      n_mtp_modules=n_mtp, mtp_loss_weight=0.3 if n_mtp else 0.0,  # V3 §4.2: 0.3, later 0.1
      **_rope_fields(hf, max_position), **_routing_fields(hf, model_type))
  dtype = hf.get("dtype") or hf.get("torch_dtype")
  if dtype in ("float32", "bfloat16", "float16"):
    fields.update(param_dtype=dtype, dtype=dtype)
  fields.update(overrides)
  return ModelConfig(**fields)


def hf_model_type(cfg: ModelConfig) -> str:
  """deepseek_v3 or deepseek_v2: the HF architecture that computes what ``cfg`` computes.

  Raises UnsupportedConfig naming the field when no DeepSeek config.json expresses ``cfg``.
  """
  if cfg.attention_kind != "mla" or not cfg.decoupled_rope:
    raise UnsupportedConfig("HF DeepSeek models implement MLA with decoupled RoPE only; got "
                            f"attention_kind={cfg.attention_kind!r}, decoupled_rope={cfg.decoupled_rope}")
  if cfg.yarn_factor > 1.0 and ((cfg.yarn_mscale_all_dim == 0 and cfg.yarn_mscale != 1.0)
                                or (cfg.yarn_mscale == 0 and cfg.yarn_mscale_all_dim != 0)):
    raise UnsupportedConfig(f"yarn_mscale={cfg.yarn_mscale}, yarn_mscale_all_dim="
                            f"{cfg.yarn_mscale_all_dim} has no HF rope_scaling equivalent")
  if cfg.n_moe_layers == 0:
    return "deepseek_v3"
  if cfg.norm_topk_prob and cfg.n_activated_experts == 1:
    raise UnsupportedConfig("norm_topk_prob=True with n_activated_experts=1 has no HF equivalent: "
                            "DeepSeek's gates normalise only top_k > 1; set norm_topk_prob=False")
  if cfg.score_func == "sigmoid" and cfg.group_score == "top2_sum":
    return "deepseek_v3"
  if cfg.score_func == "softmax" and (cfg.group_score == "max"
                                      or cfg.n_limited_groups == cfg.n_expert_groups):
    if cfg.router_bias:
      raise UnsupportedConfig("HF DeepseekV2 has no score-correction bias; got router_bias=True")
    if cfg.norm_topk_prob and cfg.routed_scaling_factor != 1.0:
      raise UnsupportedConfig(
          "DeepSeek-V2's gate renormalises the top-k weights (norm_topk_prob) or scales them by "
          "routed_scaling_factor, never both; got norm_topk_prob=True, routed_scaling_factor="
          f"{cfg.routed_scaling_factor}: set one of them to False / 1.0")
    return "deepseek_v2"
  raise UnsupportedConfig("HF routes with sigmoid + top-2-sum groups (V3) or softmax + max "
                          f"groups (V2); got score_func={cfg.score_func!r}, "
                          f"group_score={cfg.group_score!r}")


def to_hf_config(cfg: ModelConfig, dtype: Optional[str] = None) -> dict:
  """config.json (hub dialect) for ``cfg``; raises UnsupportedConfig (``hf_model_type``) for
  what no DeepSeek config expresses."""
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
  if model_type == "deepseek_v2" and cfg.n_moe_layers and cfg.norm_topk_prob:
    _warn_v2_norm()
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
    raise UnsupportedConfig("HF DeepseekV3 routes with sigmoid scores and top-2-sum groups "
                            f"scoring; got score_func={cfg.score_func!r}, group_score={cfg.group_score!r}")
  hf = to_hf_config(cfg)
  for key in ("architectures", "model_type", "torch_dtype", "topk_method", "scoring_func",
              "moe_layer_freq", "aux_loss_alpha", "seq_aux", "num_nextn_predict_layers"):
    hf.pop(key, None)
  return DeepseekV3Config(**hf, use_cache=False, **extra)
