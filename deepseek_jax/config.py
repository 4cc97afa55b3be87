"""Model configuration: one frozen, validated dataclass and its named presets.

Every architectural choice of DeepSeek-V2/V3 is a field here, so an ablation is a one-field
override: ``ModelConfig.preset("small", attention_kind="gqa", n_kv_heads=2)``.
Validation runs in ``__post_init__``: a bad combination raises ``ValueError`` naming the field
and the fix before anything is built or compiled. Each field's annotation is its type check
(``typed_fields``: ``int | None``, ``Literal[...]`` choices, ``tuple[X, ...]``), and the same
reading types the command-line overrides (``deepseek_jax/train/config.py``).

Shapes of the released models follow DeepSeek-V2 (arXiv 2405.04434) Table/App. and the
DeepSeek-V3 (arXiv 2412.19437) §4.2 hyper-parameters; see ../shared/REFERENCE.md §1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, get_args

from deepseek_jax import typed_fields

# The choice fields: each Literal is the field's annotation (typed_fields checks the value and
# types its command-line override); the tuple beside it is the same choices for other code.
AttentionKind = Literal["mla", "mha", "gqa"]
AttentionImpl = Literal["auto", "xla", "pallas"]
ScoreFunc = Literal["softmax", "sigmoid"]
GroupScore = Literal["max", "top2_sum"]
BalanceScope = Literal["sequence", "batch"]
BalanceLossForm = Literal["f_p", "p_only", "f_only"]
ExpertExchange = Literal["auto", "ragged", "padded"]
GroupedMatmulImpl = Literal["auto", "ragged_dot", "tiled", "megablox", "tokamax"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
DType = Literal["float32", "bfloat16", "float16"]
MatmulFormatName = Literal["bf16", "fp8_blockwise", "fp8_tensorwise"]

ATTENTION_KINDS = get_args(AttentionKind)
ATTENTION_IMPLS = get_args(AttentionImpl)
SCORE_FUNCS = get_args(ScoreFunc)
GROUP_SCORES = get_args(GroupScore)
BALANCE_SCOPES = get_args(BalanceScope)
BALANCE_LOSS_FORMS = get_args(BalanceLossForm)
EXPERT_EXCHANGES = get_args(ExpertExchange)
GROUPED_MATMUL_IMPLS = get_args(GroupedMatmulImpl)
REMAT_POLICIES = get_args(RematPolicy)
DTYPES = get_args(DType)
MATMUL_FORMATS = get_args(MatmulFormatName)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Hyper-parameters of a DeepSeek-style decoder. Field names follow the papers' symbols."""

  name: str = "custom"
  vocab_size: int
  d_model: int
  n_layers: int
  n_dense_layers: int  # the first k layers use a dense FFN (V3: 3, V2: 1)
  dense_ffn_dim: int
  max_seq_len: int = 4096

  # --- attention (MLA: V2 §2.1) ---
  attention_kind: AttentionKind = "mla"  # mha, gqa: the ablation baselines
  n_heads: int
  n_kv_heads: int | None = None  # gqa only; mha uses n_heads, mla shares one latent
  q_lora_rank: int | None = None  # d_c'; None = no query compression
  kv_lora_rank: int  # d_c
  qk_nope_head_dim: int  # d_h
  qk_rope_head_dim: int  # d_h^R
  v_head_dim: int
  decoupled_rope: bool = True  # False: rotary key part is up-projected from c_KV per head
  # auto: Pallas kernels (pallas_kernels/) on TPU and GPU, XLA on CPU; pallas on CPU runs the
  # kernels in interpret mode (slow; for tests). No effect on the function computed.
  attention_impl: AttentionImpl = "auto"

  # --- rotary embedding + YaRN (V2 App. / V3 §4.3) ---
  rope_theta: float = 10000.0
  yarn_factor: float = 1.0  # s; 1.0 disables YaRN
  yarn_original_max_len: int = 4096
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_mscale: float = 1.0  # m for the rotary amplitude (HF `mscale`)
  yarn_mscale_all_dim: float = 1.0  # m for the softmax scale (HF `mscale_all_dim`)

  # --- DeepSeekMoE (V2 §2.2, V3 §2.1.2) ---
  n_routed_experts: int = 0
  n_shared_experts: int = 0
  n_activated_experts: int = 0  # top-k routed experts per token
  moe_ffn_dim: int = 0
  score_func: ScoreFunc = "sigmoid"
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0
  n_expert_groups: int = 1  # groups (V3 nodes / V2 devices) for group-limited routing
  n_limited_groups: int = 1  # groups kept per token (V3: 4 of 8, V2: M = 3 of 8)
  group_score: GroupScore = "top2_sum"  # V3: sum of top-2 per group; V2: max per group
  router_bias: bool = False  # auxiliary-loss-free balancing bias (V3 §2.1.2)
  capacity_factor: float | None = None  # None = dropless (V3); V2: 1.0 per device (group)
  balance_loss_scope: BalanceScope = "sequence"  # sequence (V3 sequence-wise, V2 seq_aux) | batch
  # The expert-level loss's form (review arXiv 2503.11486, open question 2; moe.expert_balance_loss):
  # f_p = sum_i f_i P_i (V2 / V3); p_only = sum_i E sg(P_i) P_i (the load f_i replaced by the
  # affinity's E P_i); f_only = sum_i sg(f_i) f~_i / E (f~: f with a straight-through gradient
  # into the chosen experts' scores). All three equal 1 at perfect balance.
  balance_loss_form: BalanceLossForm = "f_p"
  expert_balance_coef: float = 0.0  # V3 alpha (1e-4) / V2 alpha_1
  device_balance_coef: float = 0.0  # V2 alpha_2
  comm_balance_coef: float = 0.0  # V2 alpha_3
  grouped_matmul: GroupedMatmulImpl = "auto"
  # expert parallelism (when the mesh's expert axis is > 1; no effect on the function computed
  # unless the receive buffer overflows, which is counted in the "overflow" metric)
  expert_exchange: ExpertExchange = "auto"  # ragged: ragged_all_to_all; padded: all_to_all
  expert_buffer_factor: float | None = None  # None: worst-case receive buffer, never overflows

  # --- multi-token prediction (V3 §2.2) ---
  n_mtp_modules: int = 0  # D
  mtp_loss_weight: float = 0.0  # lambda

  # --- numerics / init ---
  rms_norm_eps: float = 1e-6
  init_std: float = 0.006
  tie_embeddings: bool = False
  dtype: DType = "float32"  # activation / matmul dtype
  param_dtype: DType = "float32"
  # Number format of the weight matmuls (V3 §3.3; ops.matmul.MatmulFormat): "bf16" = the
  # operands in `dtype`; "fp8_blockwise" = E4M3 in 1x128 activation tiles / 128x128 weight
  # blocks for Fprop, Dgrad and Wgrad; "fp8_tensorwise" = E4M3, one scale per operand. The
  # embedding, output head, router, norms and attention core stay in `dtype` / float32.
  matmul_format: MatmulFormatName = "bf16"
  fp8_cache_inputs: bool = False  # keep FP8 matmul inputs for backward as E4M3 + scales

  # --- execution (no effect on the function computed) ---
  scan_layers: bool = True  # lax.scan over each stack (compile time independent of depth)
  remat_policy: RematPolicy = "none"  # activation checkpointing

  def __post_init__(self):
    _validate(self)

  # --- derived quantities -------------------------------------------------------------------
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.n_dense_layers

  @property
  def kv_heads(self) -> int:
    """Key/value heads of the expanded (per-head) cache."""
    return self.n_kv_heads if self.attention_kind == "gqa" else self.n_heads

  @property
  def softmax_scale(self) -> float:
    """(d_h + d_R)^-1/2, times mscale^2 under YaRN (V3 §4.3; REFERENCE §2)."""
    m = yarn_get_mscale(self.yarn_factor, self.yarn_mscale_all_dim)
    return self.qk_head_dim ** -0.5 * m * m

  def replace(self, **overrides: Any) -> "ModelConfig":
    """A validated copy with some fields changed; unknown field names raise ValueError."""
    _check_field_names(overrides)
    return dataclasses.replace(self, **overrides)

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
    """A named preset (see ``PRESETS``) with optional field overrides."""
    if name not in PRESETS:
      raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    _check_field_names(overrides)
    return cls(**{"name": name, **PRESETS[name], **overrides})

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# Read every annotation now: a field of an unsupported type fails at import, naming the field.
typed_fields.field_types(ModelConfig)


def yarn_get_mscale(factor: float, m: float) -> float:
  """YaRN attention temperature: 0.1 * m * ln(s) + 1 for s > 1 (else 1)."""
  return 1.0 if factor <= 1.0 else 0.1 * m * math.log(factor) + 1.0


def _check_field_names(overrides: dict) -> None:
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid fields: {sorted(known)}")


def _require(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ValueError(f"ModelConfig.{field}: {message}")


def _validate(c: ModelConfig) -> None:
  typed_fields.check(c)  # types, None only where optional, and every Literal field's choices
  for f in ("vocab_size", "d_model", "n_layers", "dense_ffn_dim", "n_heads", "kv_lora_rank",
            "qk_nope_head_dim", "v_head_dim", "max_seq_len"):
    _require(getattr(c, f) > 0, f, f"must be a positive integer, got {getattr(c, f)}")
  _require(0 <= c.n_dense_layers <= c.n_layers, "n_dense_layers",
           f"must lie in [0, n_layers={c.n_layers}], got {c.n_dense_layers}")
  _require(c.q_lora_rank is None or c.q_lora_rank > 0, "q_lora_rank",
           f"must be positive or None (no query compression), got {c.q_lora_rank}")
  _require(c.qk_rope_head_dim >= 0 and c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
           f"must be a non-negative even number (RoPE rotates pairs), got {c.qk_rope_head_dim}")

  _require(not c.fp8_cache_inputs or c.matmul_format != "bf16", "fp8_cache_inputs",
           "needs an FP8 matmul_format (fp8_blockwise or fp8_tensorwise); set matmul_format or "
           "fp8_cache_inputs=False")

  if c.attention_kind == "gqa":
    _require(c.n_kv_heads is not None and c.n_kv_heads > 0, "n_kv_heads",
             "must be a positive integer when attention_kind='gqa'")
    _require(c.n_heads % c.n_kv_heads == 0, "n_kv_heads",
             f"must divide n_heads={c.n_heads}, got {c.n_kv_heads}")
  else:
    _require(c.n_kv_heads is None, "n_kv_heads",
             f"is only used with attention_kind='gqa'; set it to None for {c.attention_kind!r}")
  if c.attention_kind == "mla" and c.decoupled_rope:
    _require(c.qk_rope_head_dim > 0, "qk_rope_head_dim",
             "must be > 0 with decoupled_rope=True (the shared rotary key k_R has this width)")
  _require(c.decoupled_rope or c.attention_kind == "mla", "decoupled_rope",
           "is an MLA ablation; MHA/GQA always rotate the trailing qk_rope_head_dim dims per head")

  _require(c.rope_theta > 0, "rope_theta", f"must be positive, got {c.rope_theta}")
  _require(c.yarn_factor >= 1.0, "yarn_factor", f"must be >= 1 (1 disables YaRN), got {c.yarn_factor}")
  if c.yarn_factor > 1.0:
    _require(c.yarn_original_max_len > 0, "yarn_original_max_len", "must be positive")
    _require(c.yarn_beta_fast > c.yarn_beta_slow > 0, "yarn_beta_fast",
             f"YaRN needs beta_fast > beta_slow > 0, got {c.yarn_beta_fast}, {c.yarn_beta_slow}")

  if c.n_moe_layers > 0:
    for f in ("n_routed_experts", "n_activated_experts", "moe_ffn_dim"):
      _require(getattr(c, f) > 0, f, f"must be positive when there are MoE layers "
               f"(n_layers - n_dense_layers = {c.n_moe_layers}), got {getattr(c, f)}")
    _require(c.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
    _require(c.n_activated_experts <= c.n_routed_experts, "n_activated_experts",
             f"top-k {c.n_activated_experts} exceeds n_routed_experts={c.n_routed_experts}")
    _require(c.n_expert_groups > 0 and c.n_routed_experts % c.n_expert_groups == 0,
             "n_expert_groups",
             f"must divide n_routed_experts={c.n_routed_experts}, got {c.n_expert_groups}")
    _require(1 <= c.n_limited_groups <= c.n_expert_groups, "n_limited_groups",
             f"kept groups must lie in [1, n_expert_groups={c.n_expert_groups}], "
             f"got {c.n_limited_groups}")
    per_group = c.n_routed_experts // c.n_expert_groups
    _require(c.n_limited_groups * per_group >= c.n_activated_experts, "n_limited_groups",
             f"{c.n_limited_groups} kept groups x {per_group} experts cannot supply "
             f"top-{c.n_activated_experts}; raise n_limited_groups")
    if c.group_score == "top2_sum" and c.n_expert_groups > 1:
      _require(per_group >= 2, "group_score",
               "'top2_sum' needs >= 2 experts per group; use 'max' or fewer groups")
    _require(c.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
    _require(c.capacity_factor is None or c.capacity_factor > 0, "capacity_factor",
             f"must be positive or None (dropless), got {c.capacity_factor}")
    for f in ("expert_balance_coef", "device_balance_coef", "comm_balance_coef"):
      _require(getattr(c, f) >= 0, f, f"must be >= 0, got {getattr(c, f)}")
    _require(c.expert_buffer_factor is None or c.expert_buffer_factor > 0,
             "expert_buffer_factor", "must be positive (1.0 = a perfectly balanced load) or "
             f"None (worst case, never overflows), got {c.expert_buffer_factor}")

  _require(c.n_mtp_modules >= 0, "n_mtp_modules", "must be >= 0")
  _require(c.mtp_loss_weight >= 0, "mtp_loss_weight", "must be >= 0")
  _require(c.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
  _require(c.init_std > 0, "init_std", "must be positive")


_V3_ROUTER = dict(score_func="sigmoid", norm_topk_prob=True, group_score="top2_sum",
                  router_bias=True, capacity_factor=None)
_V2_ROUTER = dict(score_func="softmax", norm_topk_prob=False, group_score="max",
                  router_bias=False, capacity_factor=None)
_YARN_40 = dict(yarn_factor=40.0, yarn_original_max_len=4096, yarn_beta_fast=32.0,
                yarn_beta_slow=1.0, max_seq_len=163840)

PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: every code path (query compression, groups, bias, YaRN, MTP) in seconds.
    "tiny": dict(
        vocab_size=128, d_model=64, n_layers=3, n_dense_layers=1, dense_ffn_dim=128,
        max_seq_len=256, n_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, yarn_factor=4.0, yarn_original_max_len=64,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, moe_ffn_dim=32,
        routed_scaling_factor=2.5, n_expert_groups=4, n_limited_groups=2,
        expert_balance_coef=1e-4, n_mtp_modules=1, mtp_loss_weight=0.3, init_std=0.02,
        **_V3_ROUTER),
    # CPU training (README main command): ~20M total / ~5M activated parameters, byte vocab.
    "small": dict(
        vocab_size=512, d_model=256, n_layers=6, n_dense_layers=1, dense_ffn_dim=768,
        max_seq_len=8192, n_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=32, n_shared_experts=1,
        n_activated_experts=4, moe_ffn_dim=128, routed_scaling_factor=2.5, n_expert_groups=4,
        n_limited_groups=2, expert_balance_coef=1e-4, n_mtp_modules=1, mtp_loss_weight=0.3,
        init_std=0.02, **_V3_ROUTER),
    # The studies of experiments/ablations: ~1/4 of small's width, so a study of 12 to 20
    # short runs finishes in about half an hour on 2 CPU cores.
    "ablation": dict(
        vocab_size=512, d_model=128, n_layers=4, n_dense_layers=1, dense_ffn_dim=384,
        max_seq_len=8192, n_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
        n_activated_experts=2, moe_ffn_dim=64, routed_scaling_factor=2.5, n_expert_groups=4,
        n_limited_groups=2, expert_balance_coef=1e-4, n_mtp_modules=0, mtp_loss_weight=0.3,
        init_std=0.02, **_V3_ROUTER),
    # DeepSeek-V2-Lite (16B total, 2.4B activated).
    "deepseek-v2-lite": dict(
        vocab_size=102400, d_model=2048, n_layers=27, n_dense_layers=1, dense_ffn_dim=10944,
        n_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        n_activated_experts=6, moe_ffn_dim=1408, routed_scaling_factor=1.0,
        n_expert_groups=1, n_limited_groups=1, expert_balance_coef=0.001,
        yarn_mscale=0.707, yarn_mscale_all_dim=0.707, **_YARN_40, **_V2_ROUTER),
    # DeepSeek-V2 (236B total, 21B activated); device-limited routing M=3 of 8.
    # V2 trained with device-level token dropping at capacity 1.0 (groups = devices):
    # add capacity_factor=1.0 to train that way. Released weights run dropless.
    "deepseek-v2": dict(
        vocab_size=102400, d_model=5120, n_layers=60, n_dense_layers=1, dense_ffn_dim=12288,
        n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160, n_shared_experts=2,
        n_activated_experts=6, moe_ffn_dim=1536, routed_scaling_factor=16.0,
        n_expert_groups=8, n_limited_groups=3, expert_balance_coef=0.003,
        device_balance_coef=0.05, comm_balance_coef=0.02,
        yarn_mscale=0.707, yarn_mscale_all_dim=0.707, **_YARN_40, **_V2_ROUTER),
    # DeepSeek-V3 / R1 (671B total, 37B activated, + one MTP module).
    "deepseek-v3": dict(
        vocab_size=129280, d_model=7168, n_layers=61, n_dense_layers=3, dense_ffn_dim=18432,
        n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
        n_activated_experts=8, moe_ffn_dim=2048, routed_scaling_factor=2.5, n_expert_groups=8,
        n_limited_groups=4, expert_balance_coef=1e-4, n_mtp_modules=1, mtp_loss_weight=0.3,
        yarn_mscale=1.0, yarn_mscale_all_dim=1.0, **_YARN_40, **_V3_ROUTER),
}


def list_presets() -> list[str]:
  return sorted(PRESETS)
