"""ModelConfig -> transformers ``DeepseekV3Config`` (transformers >= 5: ``rope_parameters``).

Only V3-style routing maps onto HF's DeepseekV3 (sigmoid scores, top-2-sum group scoring, a
score-correction bias). HF has no MTP module, no balance losses and no query-less MHA/GQA
ablations; ``to_hf_v3_config`` refuses configs it cannot express.
"""

from __future__ import annotations

from deepseek_jax.config import ModelConfig


def to_hf_v3_config(cfg: ModelConfig, **extra):
  from transformers import DeepseekV3Config  # the `hf` extra

  if cfg.attention_kind != "mla" or not cfg.decoupled_rope:
    raise ValueError("HF DeepseekV3 implements MLA with decoupled RoPE only; got "
                     f"attention_kind={cfg.attention_kind!r}, decoupled_rope={cfg.decoupled_rope}")
  if cfg.n_moe_layers and (cfg.score_func != "sigmoid" or cfg.group_score != "top2_sum"):
    raise ValueError("HF DeepseekV3 routes with sigmoid scores and top-2-sum group scoring; got "
                     f"score_func={cfg.score_func!r}, group_score={cfg.group_score!r}")
  if cfg.yarn_factor > 1.0:
    rope = dict(rope_type="yarn", rope_theta=cfg.rope_theta, factor=cfg.yarn_factor,
                original_max_position_embeddings=cfg.yarn_original_max_len,
                beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow,
                mscale=cfg.yarn_mscale, mscale_all_dim=cfg.yarn_mscale_all_dim)
  else:
    rope = dict(rope_type="default", rope_theta=cfg.rope_theta)
  return DeepseekV3Config(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
      first_k_dense_replace=cfg.n_dense_layers, intermediate_size=cfg.dense_ffn_dim,
      moe_intermediate_size=cfg.moe_ffn_dim, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
      qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
      v_head_dim=cfg.v_head_dim, n_routed_experts=cfg.n_routed_experts,
      n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.n_activated_experts,
      n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
      routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.norm_topk_prob,
      rope_parameters=rope, rope_interleave=True, rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_seq_len,
      initializer_range=cfg.init_std, attention_bias=False, attention_dropout=0.0, use_cache=False,
      **extra)
