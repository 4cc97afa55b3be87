"""Model analytics: parameter counts, KV-cache bytes per token, training FLOPs per token.

Counts come from the model's abstract shapes (``jax.eval_shape``: nothing is allocated, so the
671B preset costs milliseconds) and are cross-checked against closed-form formulas in the tests.
Conventions: "total" and "activated" describe the main model and include the embedding and the
output head; the MTP modules are counted separately (V3's hub total of 685B adds them). The
papers' activated figures are rounded and, for V2 / V2-Lite at least, leave out the input
embedding (a lookup): ``activated - embedding`` reproduces them. Router biases are state, not
parameters, and are not counted.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.moe import MoE
from deepseek_jax.model.transformer import abstract_model

@dataclasses.dataclass(frozen=True)
class ParamCounts:
  """Parameter counts of one config (main model and MTP separately; see module docstring)."""

  total: int  # main model (embedding + layers + final norm + head)
  activated: int  # main model parameters used per token (k of E routed experts)
  embedding: int
  head: int
  mtp: int  # all MTP modules (their unique parameters)
  mtp_activated: int


def _size(variable) -> int:
  return math.prod(variable.shape)


def param_counts(cfg: ModelConfig) -> ParamCounts:
  """Counts from the abstract parameter tree of ``DeepSeekModel(cfg)``."""
  model = abstract_model(cfg)
  everything = sum(_size(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  mtp = sum(_size(v) for v in jax.tree.leaves(nnx.state(model.mtp, nnx.Param)))
  routed = {"main": 0, "mtp": 0}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, MoE):
      part = "mtp" if path[0] == "mtp" else "main"
      routed[part] += sum(_size(w) for w in (node.w_gate, node.w_up, node.w_down))
  inactive = 1 - cfg.n_activated_experts / cfg.n_routed_experts if cfg.n_routed_experts else 0
  main = everything - mtp
  return ParamCounts(total=main, activated=round(main - routed["main"] * inactive),
                     embedding=_size(model.embed.embedding),
                     head=0 if model.lm_head is None else _size(model.lm_head), mtp=mtp,
                     mtp_activated=round(mtp - routed["mtp"] * inactive))


# --- closed-form formulas (the independent cross-check) ------------------------------------------

def _attention_params(c: ModelConfig) -> int:
  n, qk, v, d = c.n_heads, c.qk_head_dim, c.v_head_dim, c.d_model
  query = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * n * qk if c.q_lora_rank else d * n * qk
  if c.attention_kind == "mla":
    shared_rope = c.qk_rope_head_dim if c.decoupled_rope else 0
    per_head_key = c.qk_nope_head_dim + (0 if c.decoupled_rope else c.qk_rope_head_dim)
    kv = d * (c.kv_lora_rank + shared_rope) + c.kv_lora_rank + c.kv_lora_rank * n * (per_head_key + v)
  else:
    kv = d * c.kv_heads * (qk + v)
  return query + kv + n * v * d


def _ffn_params(c: ModelConfig, moe: bool, activated: bool) -> int:
  d = c.d_model
  if not moe:
    return 3 * d * c.dense_ffn_dim
  experts = c.n_activated_experts if activated else c.n_routed_experts
  return d * c.n_routed_experts + 3 * d * c.moe_ffn_dim * (experts + c.n_shared_experts)


def _block_params(c: ModelConfig, moe: bool, activated: bool) -> int:
  return 2 * c.d_model + _attention_params(c) + _ffn_params(c, moe, activated)


def param_counts_formula(c: ModelConfig) -> ParamCounts:
  embedding = c.vocab_size * c.d_model
  head = 0 if c.tie_embeddings else c.d_model * c.vocab_size

  def main(activated: bool) -> int:
    return (embedding + head + c.d_model
            + c.n_dense_layers * _block_params(c, False, activated)
            + c.n_moe_layers * _block_params(c, True, activated))

  def mtp(activated: bool) -> int:
    per_module = 3 * c.d_model + 2 * c.d_model * c.d_model + _block_params(
        c, c.n_moe_layers > 0, activated)
    return c.n_mtp_modules * per_module

  return ParamCounts(total=main(False), activated=main(True), embedding=embedding, head=head,
                     mtp=mtp(False), mtp_activated=mtp(True))


def kv_cache_values_per_token(c: ModelConfig, kind: str = "latent") -> int:
  """Cached values per token over all layers: MLA latent (d_c + d_R) l; expanded K (d_h + d_R + d_v) l."""
  if kind == "latent":
    if c.attention_kind != "mla":
      raise ValueError("a latent cache exists only for attention_kind='mla'")
    per_layer = c.kv_lora_rank + (c.qk_rope_head_dim if c.decoupled_rope else 0)
  elif kind == "expanded":
    per_layer = c.kv_heads * (c.qk_head_dim + c.v_head_dim)
  else:
    raise ValueError(f"kind must be 'latent' or 'expanded', got {kind!r}")
  return per_layer * c.n_layers


def kv_cache_bytes_per_token(c: ModelConfig, kind: str = "latent", bytes_per_value: int = 2) -> int:
  """Bytes per cached token (bf16 by default). V3 latent: 576 * 2 * 61 = 70,272."""
  return kv_cache_values_per_token(c, kind) * bytes_per_value


def cache_bytes(cache) -> int:
  """Bytes actually held by a cache pytree (the measurement the formula is checked against)."""
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))


def forward_flops_per_token(c: ModelConfig, seq_len: int, include_mtp: bool = True) -> float:
  """Forward FLOPs per token: 2 x activated matmul weights (no embedding lookup, no norms)
  plus causal attention, 2 n_h (d_qk + d_v) per attended key, (T + 1) / 2 keys on average."""
  counts = param_counts_formula(c)
  norms = c.d_model * (1 + 2 * c.n_layers)
  q_norm = c.q_lora_rank or 0
  kv_norm = c.kv_lora_rank if c.attention_kind == "mla" else 0
  head = c.d_model * c.vocab_size  # the output matmul happens whether or not it is tied
  matmul = (counts.activated - counts.embedding - counts.head + head - norms
            - c.n_layers * (q_norm + kv_norm))
  layers = c.n_layers
  if include_mtp and c.n_mtp_modules:
    per_module = counts.mtp_activated // c.n_mtp_modules - 5 * c.d_model - q_norm - kv_norm
    matmul += c.n_mtp_modules * (per_module + head)  # each module also runs the shared head
    layers += c.n_mtp_modules
  attention = 2 * c.n_heads * (c.qk_head_dim + c.v_head_dim) * (seq_len + 1) / 2 * layers
  return 2.0 * matmul + attention


def train_flops_per_token(c: ModelConfig, seq_len: int, include_mtp: bool = True) -> float:
  """Forward + backward (2x forward): 3x the forward FLOPs."""
  return 3.0 * forward_flops_per_token(c, seq_len, include_mtp)


def _count(n: float) -> str:
  for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= size:
      return f"{n / size:.2f}{unit}"
  return f"{n:.0f}"


def summary(c: ModelConfig, seq_len: int = 4096) -> str:
  p = param_counts(c)
  cache = (f"latent {kv_cache_bytes_per_token(c, 'latent'):,} B, expanded "
           f"{kv_cache_bytes_per_token(c, 'expanded'):,} B" if c.attention_kind == "mla" else
           f"{kv_cache_bytes_per_token(c, 'expanded'):,} B")
  return "\n".join([
      f"preset {c.name}: {_count(p.total)} total, {_count(p.activated)} activated parameters "
      f"(+ MTP {_count(p.mtp)})",
      f"KV cache per token (bf16): {cache}",
      f"training FLOPs per token at T={seq_len}: {_count(train_flops_per_token(c, seq_len))}",
  ])
