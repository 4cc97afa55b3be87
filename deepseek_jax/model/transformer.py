"""The DeepSeek decoder: embedding, dense then MoE blocks, final norm, head, MTP modules.

Axis legend: B batch, T length, D d_model, V vocab, L layers of a stack.

Layers of one kind are *stacked*: ``nnx.vmap`` builds one Block whose parameters carry a leading
L axis, and ``lax.scan`` runs it, so compile time does not grow with depth. The first
``n_dense_layers`` blocks form the dense stack, the rest the MoE stack (V3: 3 + 58).

``DeepSeekModel`` is the only module that reads ``ModelConfig``; it translates the config into
the explicit fields of each layer (``make_block``), with the execution choices (kernels,
expert-parallel dispatch) resolved once by ``model.execution.resolve_execution``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.attention import (AttentionSpec, CacheView, GroupedQueryAttention,
                                          KVCache)
from deepseek_jax.model.execution import Execution, resolve_execution
from deepseek_jax.model.layers import Embed, RMSNorm, SwiGLU, normal_param
from deepseek_jax.model.mla import LatentCache, MultiHeadLatentAttention
from deepseek_jax.model.moe import (BalanceSpec, DispatchSpec, ExpertSpec, MoE, RouterBias,
                                    RoutingSpec, update_router_bias)
from deepseek_jax.model.mtp import MTPModule, mtp_targets
from deepseek_jax.model.rope import rotary_from_config
from deepseek_jax.ops.matmul import MatmulFormat, weight_matmul


class Block(nnx.Module):
  """Pre-norm residual block: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x))."""

  def __init__(self, attention: nnx.Module, ffn: nnx.Module, d_model: int, *, eps: float,
               param_dtype: str):
    self.attn_norm = RMSNorm(d_model, eps=eps, param_dtype=param_dtype)
    self.attention = attention
    self.ffn_norm = RMSNorm(d_model, eps=eps, param_dtype=param_dtype)
    self.ffn = ffn

  def __call__(self, x, positions, *, segment_ids=None, mask=None, cache=None, cache_index=None,
               absorb: bool = False):
    """Returns (x, updated cache, MoE stats or None)."""
    h, cache = self.attention(self.attn_norm(x), positions, segment_ids=segment_ids, cache=cache,
                              cache_index=cache_index, absorb=absorb)
    x = x + h.astype(x.dtype)
    if isinstance(self.ffn, MoE):  # decoding (a cache is given) never drops tokens
      h, stats = self.ffn(self.ffn_norm(x), mask, drop_tokens=cache is None)
    else:
      h, stats = self.ffn(self.ffn_norm(x)), None
    return x + h.astype(x.dtype), cache, stats


def attention_spec(cfg: ModelConfig) -> AttentionSpec:
  """The attention layer shape of ``cfg``."""
  return AttentionSpec(
      d_model=cfg.d_model, n_heads=cfg.n_heads, qk_nope_head_dim=cfg.qk_nope_head_dim,
      qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
      softmax_scale=cfg.softmax_scale, q_lora_rank=cfg.q_lora_rank,
      kv_lora_rank=cfg.kv_lora_rank, n_kv_heads=cfg.kv_heads, decoupled_rope=cfg.decoupled_rope)


def moe_specs(cfg: ModelConfig, execution: Execution):
  """(ExpertSpec, RoutingSpec, BalanceSpec, DispatchSpec) of ``cfg``'s MoE layers."""
  experts = ExpertSpec(cfg.n_routed_experts, cfg.n_shared_experts, cfg.moe_ffn_dim)
  routing = RoutingSpec(
      top_k=cfg.n_activated_experts, score_func=cfg.score_func, n_groups=cfg.n_expert_groups,
      n_limited_groups=cfg.n_limited_groups, group_score=cfg.group_score,
      norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor)
  balance = BalanceSpec(router_bias=cfg.router_bias, scope=cfg.balance_loss_scope,
                        form=cfg.balance_loss_form,
                        expert_coef=cfg.expert_balance_coef, device_coef=cfg.device_balance_coef,
                        comm_coef=cfg.comm_balance_coef)
  dispatch = DispatchSpec(capacity_factor=cfg.capacity_factor, mode=execution.moe_dispatch,
                          grouped_matmul=execution.grouped_matmul,
                          exchange=execution.expert_exchange,
                          buffer_factor=cfg.expert_buffer_factor,
                          placement=execution.expert_placement)
  return experts, routing, balance, dispatch


def make_block(cfg: ModelConfig, moe: bool, rngs: nnx.Rngs,
               execution: Optional[Execution] = None) -> Block:
  """One block of ``cfg`` (MLA or MHA/GQA attention; MoE or dense FFN) run per ``execution``
  (default: resolved for one device of the default backend)."""
  execution = execution or resolve_execution(cfg)
  common = dict(init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                matmul_format=matmul_format(cfg, execution))
  attn_kw = dict(rotary=rotary_from_config(cfg), eps=cfg.rms_norm_eps,
                 attention_impl=execution.attention, **common)
  if cfg.attention_kind == "mla":
    attention = MultiHeadLatentAttention(attention_spec(cfg), decode_impl=execution.decode_attention,
                                         **attn_kw)
  else:
    attention = GroupedQueryAttention(attention_spec(cfg), **attn_kw)
  if moe:
    experts, routing, balance, dispatch = moe_specs(cfg, execution)
    ffn = MoE(cfg.d_model, experts, routing=routing, balance=balance, dispatch=dispatch, **common)
  else:
    ffn = SwiGLU(cfg.d_model, cfg.dense_ffn_dim, **common)
  return Block(attention, ffn, cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)


def matmul_format(cfg: ModelConfig, execution: Optional[Execution] = None) -> MatmulFormat:
  """The weight matmuls' number format of ``cfg`` (``matmul_format``, ``fp8_cache_inputs``)
  with the FP8 GEMM kernel ``execution`` chose (default: XLA)."""
  kernel = execution.fp8_kernel if execution is not None else "xla"
  return MatmulFormat(cfg.matmul_format, cfg.fp8_cache_inputs, kernel)


def stack_blocks(cfg: ModelConfig, n: int, moe: bool, rngs: nnx.Rngs,
                 execution: Optional[Execution] = None) -> Optional[Block]:
  """n independently initialised blocks as one Block with a leading layer axis (None if n=0);
  the parameters' sharding metadata gets a leading "layers" axis."""
  if n == 0:
    return None

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(rngs):
    return make_block(cfg, moe, rngs, execution)

  return create(rngs)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_blocks(stack: Optional[Block], x, positions, *, segment_ids=None, mask=None, cache=None,
                cache_index=None, absorb=False, scan_layers=True, remat_policy="none",
                layer_mask=None):
  """Run a stacked Block over its layer axis. Returns (x, stacked cache, stacked MoE stats).

  ``scan_layers=False`` unrolls the loop (same parameters, compile time grows with depth);
  ``remat_policy`` recomputes each layer's activations in the backward pass per the policy.
  ``layer_mask`` [L] bool (training only): a False layer passes x through unchanged and reports
  zero MoE stats (the padding of an uneven pipeline stage, ``train.pipeline``).
  """
  if stack is None:
    return x, cache, None
  graphdef, state = nnx.split(stack)
  n_layers = jax.tree.leaves(state)[0].shape[0]

  def layer(carry, inputs):
    x, cache = carry  # the stacked cache is carried, so layers update it in place
    layer_state, index = inputs
    view = None if cache is None else CacheView(cache, index)
    y, view, stats = nnx.merge(graphdef, layer_state)(
        x, positions, segment_ids=segment_ids, mask=mask, cache=view, cache_index=cache_index,
        absorb=absorb)
    if layer_mask is not None:
      on = layer_mask[index]
      y = jnp.where(on, y, x)
      stats = None if stats is None else jax.tree.map(lambda a: jnp.where(on, a, 0), stats)
    return (y, None if view is None else view.stacked), stats

  if remat_policy != "none":
    layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[remat_policy], prevent_cse=False)
  (x, cache), stats = jax.lax.scan(layer, (x, cache), (state, jnp.arange(n_layers)),
                                   unroll=1 if scan_layers else n_layers)
  return x, cache, stats


class DecodeCache(NamedTuple):
  """Per-stack caches, each a LatentCache or KVCache with a leading layer axis (or None)."""

  dense: Any
  moe: Any


class ModelOutput(NamedTuple):
  """What ``DeepSeekModel.__call__`` returns."""

  logits: jax.Array  # [B, T, V] float32
  hidden: jax.Array  # [B, T, D] final normed hidden state (h^0 for MTP)
  cache: Optional[DecodeCache]
  moe_stats: Optional[dict]  # each entry stacked over MoE layers: load [L, E], ...


class MTPOutput(NamedTuple):
  """One MTP depth k's predictions, targets and mask (``DeepSeekModel.mtp_forward``)."""

  logits: jax.Array  # [B, T, V] predictions of t_{i+k+1}
  targets: jax.Array  # [B, T]
  mask: jax.Array  # [B, T]
  moe_stats: Optional[dict]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, kind: str = "latent",
               dtype: Optional[str] = None) -> DecodeCache:
  """Zero cache for ``batch`` rows of ``max_len`` slots: 'latent' (MLA) or 'expanded' (per head)."""
  one = _layer_cache(cfg, batch, max_len, kind, dtype)
  stacked = lambda n: (jax.tree.map(lambda a: jnp.zeros((n,) + a.shape, a.dtype), one)
                       if n else None)
  return DecodeCache(stacked(cfg.n_dense_layers), stacked(cfg.n_moe_layers))


def _layer_cache(cfg: ModelConfig, batch: int, max_len: int, kind: str, dtype: Optional[str]):
  """One layer's zero cache (LatentCache or KVCache, arrays [B, S, ...])."""
  dtype = dtype or cfg.dtype
  if kind == "latent":
    if cfg.attention_kind != "mla":
      raise ValueError(f"kind='latent' needs attention_kind='mla', got {cfg.attention_kind!r}; "
                       "use kind='expanded'")
    rope = cfg.qk_rope_head_dim if cfg.decoupled_rope else 0
    one = LatentCache.zeros(batch, max_len, cfg.kv_lora_rank, rope, dtype)
  elif kind == "expanded":
    one = KVCache.zeros(batch, max_len, cfg.kv_heads, cfg.qk_head_dim, cfg.v_head_dim, dtype)
  else:
    raise ValueError(f"cache kind must be 'latent' or 'expanded', got {kind!r}")
  return one


def init_mtp_caches(cfg: ModelConfig, batch: int, max_len: int, kind: str = "latent",
                    depth: Optional[int] = None, dtype: Optional[str] = None) -> tuple:
  """Zero caches of the first ``depth`` (default all) MTP modules' blocks, for speculative
  decoding (``MTPModule.decode``): one per module, each with a leading layer axis of 1."""
  depth = cfg.n_mtp_modules if depth is None else depth
  one = jax.tree.map(lambda a: a[None], _layer_cache(cfg, batch, max_len, kind, dtype))
  return tuple(one for _ in range(depth))


class DeepSeekModel(nnx.Module):
  """The DeepSeek-V2/V3 decoder of ``cfg``: embedding, dense blocks, MoE blocks, final norm,
  output head (tied to the embedding if ``cfg.tie_embeddings``) and ``cfg.n_mtp_modules`` MTP
  modules. ``execution`` (default: ``resolve_execution(cfg)``, one device of the default
  backend) fixes the kernels and the MoE dispatch; ``set_execution`` changes them later.
  ``__call__`` returns a ``ModelOutput``; ``mtp_forward`` runs the MTP depths.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, execution: Optional[Execution] = None):
    execution = execution or resolve_execution(cfg)
    common = dict(init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.config = cfg
    self.execution = execution
    self.embed = Embed(cfg.vocab_size, cfg.d_model, **common)
    self.dense_layers = stack_blocks(cfg, cfg.n_dense_layers, moe=False, rngs=rngs,
                                     execution=execution)
    self.moe_layers = stack_blocks(cfg, cfg.n_moe_layers, moe=True, rngs=rngs,
                                   execution=execution)
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.lm_head = (None if cfg.tie_embeddings else
                    normal_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                 std=cfg.init_std, param_dtype=cfg.param_dtype))
    self.mtp = nnx.List([
        MTPModule(make_block(cfg, cfg.n_moe_layers > 0, rngs, execution), cfg.d_model,
                  eps=cfg.rms_norm_eps, matmul_format=matmul_format(cfg, execution),
                  **common) for _ in range(cfg.n_mtp_modules)])

  def head(self, h: jax.Array) -> jax.Array:
    """Output head on normed hidden states; logits returned in float32."""
    if self.lm_head is None:
      return self.embed.attend(h)
    return weight_matmul("BTD,DV->BTV", h, self.lm_head, dtype=self.config.dtype,
                         preferred_element_type=jnp.float32)

  def __call__(self, tokens, *, positions=None, segment_ids=None, mask=None,
               cache: Optional[DecodeCache] = None, cache_index=None,
               absorb: bool = False) -> ModelOutput:
    """tokens [B, T] -> ModelOutput.

    Training: ``positions`` default to 0..T-1 (pass them with ``segment_ids`` for packed rows).
    With a cache: the T tokens are written at per-row slots ``cache_index`` [B] onward and get
    positions cache_index + 0..T-1; ``absorb=True`` attends over the latent cache (MLA).
    """
    b, t = tokens.shape
    if cache is not None:
      if cache_index is None:
        raise ValueError("a cache needs cache_index [B]: the slot where each row's tokens go")
      positions = cache_index[:, None] + jnp.arange(t)[None]
    elif positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cfg = self.config
    kw = dict(segment_ids=segment_ids, mask=mask, cache_index=cache_index, absorb=absorb,
              scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy)
    x = self.embed(tokens)
    x, dense_cache, _ = scan_blocks(self.dense_layers, x, positions,
                                    cache=None if cache is None else cache.dense, **kw)
    x, moe_cache, stats = scan_blocks(self.moe_layers, x, positions,
                                      cache=None if cache is None else cache.moe, **kw)
    hidden = self.final_norm(x)
    new_cache = None if cache is None else DecodeCache(dense_cache, moe_cache)
    return ModelOutput(self.head(hidden), hidden, new_cache, stats)

  def mtp_forward(self, hidden, targets, mask, *, positions=None, segment_ids=None):
    """Run the D MTP depths from the main hidden state; one MTPOutput per depth."""
    b, t = targets.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    outputs, h = [], hidden
    for k, module in enumerate(self.mtp, start=1):
      tokens_k, targets_k, mask_k = mtp_targets(targets, mask, segment_ids, k)
      h, stats = module(h, self.embed(tokens_k), positions, segment_ids=segment_ids, mask=mask_k)
      outputs.append(MTPOutput(self.head(h), targets_k, mask_k, stats))
    return outputs


def router_bias_update(model: DeepSeekModel, loads: jax.Array, gamma) -> None:
  """Apply the aux-loss-free bias update in place.

  ``loads`` [n_moe_layers + n_mtp_modules, E]: global per-expert token counts, MoE stack rows
  first, then one row per MTP module (the order of ``train.loss`` metrics["expert_load"]).
  """
  n = model.config.n_moe_layers
  if model.moe_layers is not None and model.moe_layers.ffn.router_bias is not None:
    bias = model.moe_layers.ffn.router_bias
    bias[...] = update_router_bias(bias[...], loads[:n], gamma)
  for i, module in enumerate(model.mtp):
    bias = getattr(module.block.ffn, "router_bias", None)
    if bias is not None:
      bias[...] = update_router_bias(bias[...], loads[n + i], gamma)


def forward(model: DeepSeekModel, tokens, **kwargs) -> ModelOutput:
  """``model(tokens, **kwargs)`` compiled: one compile per shape and ``absorb`` value.

  Calling the module directly runs eagerly, op by op; use this in notebooks and loops.
  """
  graphdef, state = nnx.split(model)
  return _forward(graphdef, state, tokens, **kwargs)


@functools.partial(jax.jit, static_argnames=("graphdef", "absorb"))
def _forward(graphdef, state, tokens, *, positions=None, segment_ids=None, mask=None, cache=None,
             cache_index=None, absorb=False):
  return nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids,
                                    mask=mask, cache=cache, cache_index=cache_index, absorb=absorb)


def abstract_model(cfg: ModelConfig, execution: Optional[Execution] = None) -> DeepSeekModel:
  """The model with ShapeDtypeStruct leaves: shapes and counts without allocating weights."""
  return nnx.eval_shape(lambda: DeepSeekModel(cfg, rngs=nnx.Rngs(0), execution=execution))


def create_model(cfg: ModelConfig, seed: int = 0, *, shardings=None,
                 execution: Optional[Execution] = None) -> DeepSeekModel:
  """Build and initialise ``DeepSeekModel(cfg)`` as one compiled program.

  Eager construction dispatches and compiles every initialiser separately (~10 s for the tiny
  preset on CPU); this compiles one program per config (~3 s). With ``shardings`` (a tree of
  NamedSharding matching ``nnx.state(model)``) every weight is created directly in its shards,
  so a model larger than one device never exists whole. ``execution``: see ``DeepSeekModel``.
  """
  graphdef, _ = nnx.split(abstract_model(cfg, execution))
  # Initialisation runs once: the XLA backend's expensive passes buy nothing but compile time.
  init = jax.jit(_init_state, static_argnums=0, out_shardings=shardings,
                 compiler_options={"xla_backend_optimization_level": 0})
  return nnx.merge(graphdef, init(cfg, jax.random.key(seed)))


def _init_state(cfg: ModelConfig, key: jax.Array):
  return nnx.state(DeepSeekModel(cfg, rngs=nnx.Rngs(params=key)))


__all__ = ["Block", "DecodeCache", "DeepSeekModel", "ModelOutput", "MTPOutput", "RouterBias",
           "abstract_model", "create_model", "forward", "init_cache", "router_bias_update"]
