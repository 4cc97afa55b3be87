"""DeepSeekMoE: shared experts + fine-grained routed experts (V2 §2.2, V3 §2.1.2).

Axis legend: B batch, T tokens (flattened B*T inside the layer), D d_model, E routed experts,
K experts per token (top-k), F expert hidden, G expert groups, M = T*K assignments.

How it works
------------
    MoE(x) = sum_shared FFN_s(x) + sum_{i in topK} g_i FFN_i(x)      (the block adds x)

Routing (``route``), all in float32:
  s = softmax(x W_r) (V2) or sigmoid(x W_r) (V3).
  Selection uses s + b, where b is the auxiliary-loss-free balancing bias (V3); b never
  enters the combine weights. Group-limited routing first keeps the best ``n_limited_groups``
  groups, scoring a group by its max (V2 device-limited routing) or the sum of its top-2 (V3
  node-limited routing), and masks the other groups' experts with -inf.
  g = the selected s, normalised to sum to 1 if ``norm_topk_prob`` (V3), times the routed scale.

Balancing:
  - bias update (``update_router_bias``): after each step, b_i += gamma * sign(mean load - load_i)
    with the load counted over the whole *global* batch; the bias is state, not a parameter.
  - balance losses: f_i = E/(K T) * #tokens routed to i, P_i = mean_t s'_{i,t} with
    s' = s / sum s, per sequence (V3 sequence-wise; V2 seq_aux) or per batch. Expert-level
    alpha * sum f_i P_i, device-level over groups-as-devices, communication-level over tokens
    sent to each device. f counts the experts a token is actually routed to (bias and group
    limit included), as V2 defines it; V3's eq. 17 writes the top-K of the unbiased s instead.
Capacity: ``capacity_factor`` None is dropless (V3). Otherwise V2's device-level dropping: the
  expert groups act as devices, each device keeps at most ceil(cf * T * K / D) of the
  assignments sent to it (T = real tokens), and drops the lowest-affinity ones first. T counts
  the tokens dispatched together: the whole batch on one device, one expert-parallel group's
  tokens (the shards along the mesh's expert axis) under expert parallelism.
  Generation never drops (the model calls the layer with ``drop_tokens=False`` when decoding).

Expert compute (``expert_ffn``) sorts the M assignments by expert and runs three grouped matmuls
(``grouped_matmul``): only the chosen experts' FLOPs. ``moe_dense_oracle`` runs every expert on
every token and exists only to test that. Under a mesh whose expert axis is > 1 the same
computation runs expert-parallel (``parallel/expert_parallel.py``: all-to-all dispatch, each
shard's experts on what it received, all-to-all combine); routing and statistics are unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model.grouped_matmul import (default_tile, gather_rows, grouped_matmul,
                                                resolve_impl, tile_layout, tile_matmul)
from deepseek_jax.model.layers import SwiGLU, normal_param
from deepseek_jax.parallel import expert_parallel


class RouterBias(nnx.Variable):
  """Aux-loss-free balancing bias: state updated from expert load, not by the optimiser."""


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
  top_k: int
  score_func: str = "sigmoid"
  n_groups: int = 1
  n_limited_groups: int = 1
  group_score: str = "top2_sum"
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0


class Routing(NamedTuple):
  experts: jax.Array  # [T, K] int32, selected expert ids
  weights: jax.Array  # [T, K] float32, combine weights g (routed scale included)
  scores: jax.Array  # [T, E] float32, affinities s (no bias)


def route(logits: jax.Array, bias: Optional[jax.Array], spec: RoutingSpec) -> Routing:
  """Select top-k experts per token from router logits [T, E] (float32 throughout)."""
  logits = logits.astype(jnp.float32)
  scores = jax.nn.softmax(logits, -1) if spec.score_func == "softmax" else jax.nn.sigmoid(logits)
  choice = scores if bias is None else scores + bias.astype(jnp.float32)
  if spec.n_limited_groups < spec.n_groups:
    t, e = choice.shape
    grouped = choice.reshape(t, spec.n_groups, e // spec.n_groups)
    if spec.group_score == "max":
      group_scores = grouped.max(-1)
    else:
      group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
    _, kept = jax.lax.top_k(group_scores, spec.n_limited_groups)
    group_mask = jax.nn.one_hot(kept, spec.n_groups, dtype=jnp.bool_).any(-2)
    choice = jnp.where(jnp.repeat(group_mask, e // spec.n_groups, axis=1), choice, -jnp.inf)
  _, experts = jax.lax.top_k(choice, spec.top_k)
  weights = jnp.take_along_axis(scores, experts, axis=-1)
  if spec.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return Routing(experts.astype(jnp.int32), weights * spec.routed_scaling_factor, scores)


def update_router_bias(bias: jax.Array, load: jax.Array, gamma) -> jax.Array:
  """Aux-loss-free update (V3 §2.1.2): b_i += gamma * sign(mean(load) - load_i).

  ``load`` [..., E] must count tokens over the whole global batch: a per-shard load would
  balance the wrong thing.
  """
  load = load.astype(jnp.float32)
  return bias + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)


# --- balance losses ------------------------------------------------------------------------------

def _scoped(x: jax.Array, scope: str) -> jax.Array:
  """[B, T, ...] -> [S, T', ...]: one row per sequence, or the whole batch as one row."""
  return x if scope == "sequence" else x.reshape((1, -1) + x.shape[2:])


def balance_fractions(scores, experts, mask, scope: str = "sequence"):
  """f [S, E] (load fraction, E/(K T) * count) and P [S, E] (mean normalised affinity).

  scores [B,T,E], experts [B,T,K], mask [B,T] (1 = real token).
  """
  scores, experts, mask = (_scoped(a, scope) for a in (scores, experts, mask.astype(jnp.float32)))
  n_experts, top_k = scores.shape[-1], experts.shape[-1]
  chosen = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32).sum(-2) * mask[..., None]
  n_tokens = jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
  f = n_experts / (top_k * n_tokens) * chosen.sum(1)
  normalised = scores / scores.sum(-1, keepdims=True)
  p = (normalised * mask[..., None]).sum(1) / n_tokens
  return f, p


def _mean_over_nonempty(per_row: jax.Array, nonempty: jax.Array) -> jax.Array:
  """Average over the rows that hold real tokens (an all-padding row must not dilute it)."""
  nonempty = nonempty.astype(jnp.float32)
  return (per_row * nonempty).sum() / jnp.maximum(nonempty.sum(), 1.0)


def expert_balance_loss(f: jax.Array, p: jax.Array) -> jax.Array:
  """sum_i f_i P_i, averaged over sequences (V3 sequence-wise / V2 expert-level, before alpha)."""
  return _mean_over_nonempty((f * p).sum(-1), f.sum(-1) > 0)  # sum_i f_i = E for real rows


def device_balance_loss(f: jax.Array, p: jax.Array, n_devices: int) -> jax.Array:
  """V2 device-level: sum_d f'_d P'_d, f'_d = mean of f over d's experts, P'_d = their sum."""
  s, e = f.shape
  f_dev = f.reshape(s, n_devices, e // n_devices).mean(-1)
  p_dev = p.reshape(s, n_devices, e // n_devices).sum(-1)
  return _mean_over_nonempty((f_dev * p_dev).sum(-1), f.sum(-1) > 0)


def comm_balance_loss(experts, mask, p, n_devices: int, max_devices: int,
                      scope: str = "sequence") -> jax.Array:
  """V2 communication: sum_d f''_d P''_d, f''_d = D/(M T) * #tokens sent to device d."""
  experts, mask = _scoped(experts, scope), _scoped(mask.astype(jnp.float32), scope)
  s, e = p.shape
  device = experts // (e // n_devices)
  sent = jax.nn.one_hot(device, n_devices, dtype=jnp.float32).max(-2) * mask[..., None]
  n_tokens = jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
  f_comm = n_devices / (max_devices * n_tokens) * sent.sum(1)
  p_dev = p.reshape(s, n_devices, e // n_devices).sum(-1)
  return _mean_over_nonempty((f_comm * p_dev).sum(-1), mask.sum(-1) > 0)


# --- expert computation ----------------------------------------------------------------------------

def device_capacity(n_tokens, top_k: int, n_devices: int, capacity_factor: float) -> jax.Array:
  """Assignments one device may keep: ceil(cf * T * K / D) (V2: cf = 1, the average load)."""
  return jnp.maximum(jnp.ceil(capacity_factor * n_tokens * top_k / n_devices), 1.0)


def capacity_keep(buckets: jax.Array, priority: jax.Array, n_buckets: int, capacity) -> jax.Array:
  """keep [M]: True for the ``capacity`` highest-priority assignments of each bucket (device)."""
  order = jnp.lexsort((-priority, buckets))  # by bucket, then priority descending
  counts = jnp.zeros(n_buckets, jnp.int32).at[buckets].add(1)
  starts = jnp.cumsum(counts) - counts
  rank_sorted = jnp.arange(buckets.shape[0]) - starts[buckets[order]]
  rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)
  return rank < capacity


def expert_ffn(x, experts, weights, w_gate, w_up, w_down, *, impl="auto", max_rows=None):
  """Sorted grouped-matmul expert FFNs: x [T, D] -> (sum_k w_k FFN_{e_k}(x) [T, D], overflow).

  ``experts`` [T, K] ids (>= E: slot unused, e.g. dropped), ``weights`` [T, K]. The T*K slots
  are sorted by expert and only the first ``max_rows`` (default all) are computed; ``overflow``
  counts the used slots past that limit (their contribution is left out).
  """
  t, top_k = experts.shape
  n_experts, m = w_gate.shape[0], t * top_k
  rows = m if max_rows is None else min(max_rows, m)
  flat_expert = experts.reshape(-1)
  # Sorting, counting and un-sorting without scatters (XLA:CPU runs scatters as loops).
  order = jnp.argsort(flat_expert, stable=True)
  bounds = jnp.searchsorted(flat_expert[order], jnp.arange(n_experts + 1), side="left")
  bounds = jnp.minimum(bounds, rows)  # unused slots (id >= E) sort past every group
  group_sizes = (bounds[1:] - bounds[:-1]).astype(jnp.int32)
  overflow = jnp.sum(flat_expert < n_experts) - bounds[-1]
  rank = jnp.argsort(order)  # [M] sorted position of each slot
  computed = (rank < bounds[-1]).reshape(t, top_k)
  x, w_gate, w_up, w_down = _same_varying_axes(x, w_gate, w_up, w_down)
  if resolve_impl(impl) == "tiled":
    out = _tiled_expert_ffn(x, order[:rows], rank, group_sizes, top_k, w_gate, w_up, w_down)
  else:
    x_sorted = x[order[:rows] // top_k]
    gate = grouped_matmul(x_sorted, w_gate, group_sizes, impl=impl)
    up = grouped_matmul(x_sorted, w_up, group_sizes, impl=impl)
    out_sorted = grouped_matmul(jax.nn.silu(gate) * up, w_down, group_sizes, impl=impl)
    out_sorted = jnp.concatenate([out_sorted, jnp.zeros((1, x.shape[1]), out_sorted.dtype)])
    out = out_sorted[jnp.minimum(rank, rows)].reshape(t, top_k, -1)
    out = jnp.where(computed[..., None], out, 0)  # a kernel may leave rows past the groups unset
  weights = jnp.where(computed, weights, 0.0)
  y = jnp.einsum("TKD,TK->TD", out.astype(jnp.float32), weights.astype(jnp.float32))
  return y.astype(x.dtype), overflow


def _same_varying_axes(*arrays):
  """Inside shard_map, mark every array as varying over the union of the mesh axes any of them
  varies over (tokens vary over the batch axes, weights over expert / tensor), so the
  custom-VJP gradients type-check; autodiff then sums each gradient over the axes its array
  was replicated on. Outside shard_map this is the identity."""
  varying = [getattr(jax.typeof(a).manual_axis_type, "varying", frozenset()) for a in arrays]
  union = frozenset().union(*varying)
  return [jax.lax.pcast(a, tuple(sorted(union - v)), to="varying") if union - v else a
          for a, v in zip(arrays, varying)]


def _tiled_expert_ffn(x, order, rank, group_sizes, top_k, w_gate, w_up, w_down):
  """The whole SwiGLU in tile space (CPU): one gather of tokens into expert tiles, three tile
  matmuls, one gather back to slots [T, K, D]. ``order`` [rows] lists the computed slots in
  expert order, ``rank`` [M] each slot's sorted position. Padding slots hold zero rows, and
  silu(0) * 0 = 0 keeps them zero through the FFN."""
  (t, d), rows, n_experts = x.shape, order.shape[0], w_gate.shape[0]
  tile = default_tile(rows, n_experts)
  layout = tile_layout(group_sizes, rows, n_experts, tile)
  n_slots = layout.rows.shape[0]
  slot_of_sorted = jnp.concatenate([jnp.where(layout.valid, layout.slot, n_slots),
                                    jnp.full((1,), n_slots)])  # past the groups -> zero row
  slot_of_assignment = slot_of_sorted[jnp.minimum(rank, rows)]  # [M]
  assignment_of_slot = jnp.concatenate([order, jnp.array([t * top_k])])[layout.rows]
  token_of_slot = jnp.where(assignment_of_slot < t * top_k, assignment_of_slot // top_k, t)
  x_tiles = gather_rows(x, token_of_slot, slot_of_assignment.reshape(t, top_k))
  x_tiles = x_tiles.reshape(-1, tile, d)
  gate = tile_matmul(x_tiles, w_gate, layout.tile_group)
  up = tile_matmul(x_tiles, w_up, layout.tile_group)
  y_tiles = tile_matmul(jax.nn.silu(gate) * up, w_down, layout.tile_group)
  out = gather_rows(y_tiles.reshape(n_slots, d), slot_of_assignment, assignment_of_slot[:, None])
  return out.reshape(t, top_k, d)


def moe_dense_oracle(x, routing: Routing, w_gate, w_up, w_down, keep=None):
  """Test oracle: every expert on every token, combined by a dense [T, E] gate matrix."""
  t, top_k = routing.experts.shape
  weights = routing.weights if keep is None else routing.weights * keep.reshape(t, top_k)
  combine = jnp.zeros((t, w_gate.shape[0]), jnp.float32)
  combine = combine.at[jnp.arange(t)[:, None], routing.experts].add(weights)
  h = jax.nn.silu(jnp.einsum("TD,EDF->TEF", x, w_gate)) * jnp.einsum("TD,EDF->TEF", x, w_up)
  out = jnp.einsum("TEF,EFD->TED", h, w_down)
  return jnp.einsum("TED,TE->TD", out.astype(jnp.float32), combine).astype(x.dtype)


def _shard_experts(x, ids, values, params, shard_args, ctx, *, routing: RoutingSpec,
                   n_experts: int, capacity_factor: Optional[float], impl: str):
  """The expert-parallel ``local_fn``: one shard's experts on the rows it received.

  ids [R, K] local expert ids (El = not on this shard), values = (weights, [priority]).
  V2 dropping ranks, per group, every assignment the group received from its expert-parallel
  group, as the single-device layer does for the same tokens."""
  weights, per_shard = values[0], params[0].shape[0]
  valid = ids < per_shard
  max_slots = ctx.max_slots
  dropped = jnp.zeros((), jnp.float32)
  if capacity_factor is not None:
    priority, (real,) = values[1], shard_args
    per_group = n_experts // routing.n_groups
    group = jnp.where(valid, (ctx.index * per_shard + ids) // per_group, routing.n_groups)
    n_real = jax.lax.psum(real.sum(), ctx.axis)
    capacity = device_capacity(n_real, routing.top_k, routing.n_groups, capacity_factor)
    keep = capacity_keep(group.reshape(-1), priority.reshape(-1), routing.n_groups + 1,
                         capacity).reshape(ids.shape) & valid
    dropped = (valid & ~keep & (priority >= 0)).sum().astype(jnp.float32)
    ids = jnp.where(keep, ids, per_shard)
    # Static bound: a group keeps at most cf * (every token of the EP group) * K / G slots.
    groups_here = max(len({(i * per_shard + e) // per_group for e in range(per_shard)})
                      for i in range(ctx.n_shards))
    most = math.ceil(capacity_factor * ctx.n_shards * ctx.n_tokens * routing.top_k
                     / routing.n_groups)
    max_slots = min(max_slots, max(most, 1) * groups_here)
  y, overflow = expert_ffn(x, ids, weights, *params, impl=impl, max_rows=max_slots)
  return y, {"dropped": dropped, "overflow": overflow}


class MoE(nnx.Module):
  """DeepSeekMoE layer. Returns (y, stats); stats feed the losses, the bias update and logging.

  Traced under a mesh (``jax.set_mesh``) whose expert axis is > 1, the routed experts run
  expert-parallel (``parallel.expert_parallel``); routing, statistics and losses stay global
  arrays, so expert loads and balance terms always count the whole batch.
  """

  def __init__(self, d_model: int, n_routed_experts: int, n_shared_experts: int, ffn_dim: int, *,
               routing: RoutingSpec, router_bias: bool, capacity_factor: Optional[float],
               balance_scope: str, expert_balance_coef: float, device_balance_coef: float,
               comm_balance_coef: float, grouped_matmul_impl: str, init_std: float, dtype: str,
               param_dtype: str, rngs: nnx.Rngs, expert_exchange: str = "auto",
               expert_buffer_factor: Optional[float] = None):
    kw = dict(std=init_std, param_dtype=param_dtype)
    e, d, f = n_routed_experts, d_model, ffn_dim
    self.gate = normal_param(rngs, (d, e), ("embed", "expert"), **kw)
    self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32)) if router_bias else None
    self.w_gate = normal_param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), **kw)
    self.w_up = normal_param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), **kw)
    self.w_down = normal_param(rngs, (e, f, d), ("expert", "expert_mlp", "embed"), **kw)
    self.shared = (SwiGLU(d, n_shared_experts * f, init_std=init_std, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs) if n_shared_experts else None)
    self.routing = routing
    self.capacity_factor = capacity_factor
    self.balance_scope = balance_scope
    self.coefs = (expert_balance_coef, device_balance_coef, comm_balance_coef)
    self.impl = grouped_matmul_impl
    self.exchange = expert_exchange
    self.buffer_factor = expert_buffer_factor
    self.dtype = dtype

  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None, drop_tokens: bool = True):
    """x [B,T,D], mask [B,T] (1 = real token; padding is excluded from load, losses and
    capacity). ``drop_tokens=False`` disables capacity dropping (inference)."""
    b, t, d = x.shape
    x = x.astype(self.dtype)
    mask = jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
    tokens = x.reshape(b * t, d)
    logits = jnp.einsum("TD,DE->TE", tokens.astype(jnp.float32),
                        self.gate[...].astype(jnp.float32))  # router in float32
    bias = None if self.router_bias is None else self.router_bias[...]
    routing = route(logits, bias, self.routing)
    n_experts, top_k = logits.shape[-1], self.routing.top_k
    flat_mask = jnp.repeat(mask.reshape(-1), top_k)
    capacity_factor = self.capacity_factor if drop_tokens else None
    affinity = jnp.take_along_axis(routing.scores, routing.experts, -1)
    priority = jnp.where(mask.reshape(-1, 1) > 0, affinity, -1.0)  # padding yields slots first
    w = [getattr(self, n)[...].astype(self.dtype) for n in ("w_gate", "w_up", "w_down")]

    counters = {}
    if expert_parallel.expert_mesh() is not None and expert_parallel.splits_batch(b * t):
      spec = self.routing
      n_shards = expert_parallel.expert_mesh().shape["expert"]
      if capacity_factor is not None and spec.n_groups % n_shards:
        raise ValueError(
            f"capacity_factor={capacity_factor} (V2 device-level dropping) treats each of the "
            f"n_expert_groups={spec.n_groups} groups as a device, so a group must lie on one "
            f"expert shard: make n_expert_groups a multiple of the mesh's expert axis "
            f"({n_shards}), or set capacity_factor=None (dropless)")
      local = functools.partial(_shard_experts, routing=spec, n_experts=n_experts,
                                capacity_factor=capacity_factor, impl=self.impl)
      capacity_args = capacity_factor is not None
      y, counters = expert_parallel.expert_parallel(
          local, tokens, routing.experts,
          (routing.weights, priority) if capacity_args else (routing.weights,), w, (2, 2, 1),
          (mask.reshape(-1),) if capacity_args else (),
          max_shards=expert_parallel.max_shards_per_token(
              n_experts, n_shards, spec.n_groups, spec.n_limited_groups, top_k),
          buffer_factor=self.buffer_factor, exchange=self.exchange,
          check_vma=resolve_impl(self.impl) in ("tiled", "ragged_dot"))  # Pallas: no vma types
      dropped, overflow = counters["dropped"], counters["overflow"]
    else:
      experts = routing.experts
      dropped = jnp.zeros(())
      if capacity_factor is not None:
        n_devices = self.routing.n_groups
        device = routing.experts.reshape(-1) // (n_experts // n_devices)
        capacity = device_capacity(mask.sum(), top_k, n_devices, capacity_factor)
        keep = capacity_keep(device, priority.reshape(-1), n_devices, capacity)
        dropped = jnp.where(keep, 0.0, flat_mask).sum()
        experts = jnp.where(keep.reshape(b * t, top_k), experts, n_experts)
      y, overflow = expert_ffn(tokens, experts, routing.weights, *w, impl=self.impl)
    if self.shared is not None:
      y = y + self.shared(tokens[None])[0]

    scores = routing.scores.reshape(b, t, n_experts)
    experts = routing.experts.reshape(b, t, top_k)
    f, p = balance_fractions(scores, experts, mask, self.balance_scope)
    expert_coef, device_coef, comm_coef = self.coefs
    n_groups = self.routing.n_groups
    stats = {
        "load": jnp.einsum("M,ME->E", flat_mask,
                           jax.nn.one_hot(routing.experts.reshape(-1), n_experts)),
        "dropped": dropped.astype(jnp.float32),
        "overflow": jnp.asarray(overflow, jnp.float32),
        "assignments": flat_mask.sum(),
        "expert_balance": expert_coef * expert_balance_loss(f, p),
        "device_balance": device_coef * device_balance_loss(f, p, n_groups),
        "comm_balance": comm_coef * comm_balance_loss(experts, mask, p, n_groups,
                                                      self.routing.n_limited_groups,
                                                      self.balance_scope),
    }
    if "dispatch_rows" in counters:  # rows sent per token (padding included), its bound
      stats["dispatch_per_token"] = counters["dispatch_rows"] / (b * t)
      stats["remote_per_token"] = counters["remote_rows"] / (b * t)
    return y.reshape(b, t, d), stats
