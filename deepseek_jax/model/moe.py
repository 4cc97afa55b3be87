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
every token and exists only to test that. With ``DispatchSpec.mode="expert_parallel"`` (chosen
by ``model.execution`` when the mesh's expert axis is > 1) the same computation runs
expert-parallel (``parallel/expert_parallel.py``: all-to-all dispatch, each shard's experts on
what it received, all-to-all combine); routing and statistics are unchanged. Its
``DispatchSpec.placement`` may hold redundant experts (EPLB, ``parallel/eplb.py``): each
assignment then goes to one replica of its expert, round robin, while the weights, their
gradients and ``load`` stay per logical expert. That table is static, so one serves every layer
of a scanned stack; ``set_layer_placement`` instead gives each layer its own (EPLB balances
each layer's hot experts): int32 ``ExpertTable`` state on the layer, [L, ...] in a stack, which
the layer scan slices like the weights. Expert-parallel stats add ``shard_load`` [P], the
top-k slots each expert shard received (what EPLB evens out).

Constructor specs: ``ExpertSpec`` (how many experts, how wide), ``RoutingSpec`` (how tokens
pick them), ``BalanceSpec`` (bias and balance losses), ``DispatchSpec`` (capacity, kernels,
local or expert-parallel, exchange, buffers, expert placement).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model.layers import SwiGLU, normal_param
from deepseek_jax.ops.grouped_matmul import (default_tile, grouped_matmul, resolve_impl,
                                             tile_layout, tile_matmul)
from deepseek_jax.ops.matmul import BF16, MatmulFormat, mosaic_gpu_grouped_gemm, weight_matmul
from deepseek_jax.quant.fp8 import BLOCK as FP8_BLOCK, chunk_starts
from deepseek_jax.ops.rows import gather_rows
from deepseek_jax.parallel import eplb, expert_parallel
from deepseek_jax.parallel.expert_parallel import (ExpertPlacement, SlotTable, TableLayout,
                                                   stack_tables)


class RouterBias(nnx.Variable):
  """Aux-loss-free balancing bias: state updated from expert load, not by the optimiser."""


class ExpertTable(nnx.Variable):
  """Expert-placement state (int32): which physical slot holds which expert, per layer. Not a
  parameter; set between steps by ``set_layer_placement``, never by the optimiser."""


class PlacementTable(nnx.Module):
  """A layer's own expert placement (``set_layer_placement``): ``slot_experts`` [E'],
  ``expert_slots`` [E, R] and ``replicas`` [E] as ``ExpertTable`` int32 arrays, each with a
  leading [L] in a stacked layer (the layer scan hands each layer its row), and ``layout``, the
  static ``TableLayout`` all layers share (E', R, the shards-per-token bound)."""

  def __init__(self, layout: TableLayout, table: SlotTable):
    self.layout = layout
    self.slot_experts = ExpertTable(jnp.asarray(table.slot_experts, jnp.int32))
    self.expert_slots = ExpertTable(jnp.asarray(table.expert_slots, jnp.int32))
    self.replicas = ExpertTable(jnp.asarray(table.replicas, jnp.int32))

  def arrays(self) -> SlotTable:
    return SlotTable(self.slot_experts[...], self.expert_slots[...], self.replicas[...])


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
  """How tokens pick experts (``route``): top_k K; score_func "softmax" (V2) | "sigmoid" (V3);
  n_groups G and n_limited_groups M (group-limited routing keeps M of G groups, scored by
  group_score "max" (V2) | "top2_sum" (V3)); norm_topk_prob renormalises the selected scores
  to sum 1; routed_scaling_factor multiplies the combine weights."""

  top_k: int
  score_func: str = "sigmoid"
  n_groups: int = 1
  n_limited_groups: int = 1
  group_score: str = "top2_sum"
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
  """The experts: n_routed E fine-grained routed experts and n_shared always-on experts, each a
  SwiGLU of hidden width ffn_dim F (the shared experts form one SwiGLU of n_shared F)."""

  n_routed: int
  n_shared: int
  ffn_dim: int


@dataclasses.dataclass(frozen=True)
class BalanceSpec:
  """Load balancing: router_bias (V3's auxiliary-loss-free bias b, updated by
  ``update_router_bias``); the balance losses' scope ("sequence" | "batch") and coefficients
  alpha (expert-level, V3 sequence-wise / V2 alpha_1), alpha_2 (device), alpha_3 (comm); form
  of the expert-level loss ("f_p" | "p_only" | "f_only", ``expert_balance_loss``)."""

  router_bias: bool = False
  scope: str = "sequence"
  form: str = "f_p"
  expert_coef: float = 0.0
  device_coef: float = 0.0
  comm_coef: float = 0.0


DISPATCH_MODES = ("local", "expert_parallel")


@dataclasses.dataclass(frozen=True)
class DispatchSpec:
  """How assignments reach the experts. Changes the function computed only through
  capacity_factor (V2 device-level dropping; None = dropless) and a receive buffer that
  overflows (counted, never silent).

  mode: "local" (sorted grouped matmuls on this device, or XLA-partitioned) or
    "expert_parallel" (all-to-all over the mesh's expert axis, ``parallel.expert_parallel``);
    chosen once by ``model.execution.resolve_execution``, never from the ambient mesh.
  grouped_matmul: "tiled" | "ragged_dot" | "megablox" | "tokamax" ("auto" is resolved for the
    default platform when the layer is built).
  exchange: "ragged" | "padded" ("auto" resolved likewise); buffer_factor: None = worst-case
    receive buffers; placement: ``ExpertPlacement``, the expert -> physical slot (and so
    shard) table, with redundant experts (EPLB) if it has more slots than experts (None =
    identity). One static table serves every layer that holds this spec (the scanned MoE stack
    shares one; ``set_layer_placement`` gives each layer its own instead); the weights stay
    logical [E, ...] and the load stats stay per logical expert.
  """

  capacity_factor: Optional[float] = None
  mode: str = "local"
  grouped_matmul: str = "auto"
  exchange: str = "auto"
  buffer_factor: Optional[float] = None
  placement: Optional[ExpertPlacement] = None

  def resolved(self) -> "DispatchSpec":
    """``auto`` choices made for the default platform (a local layer on one device). Raises
    ValueError for an unknown mode, grouped matmul or exchange."""
    if self.mode not in DISPATCH_MODES:
      raise ValueError(f"DispatchSpec.mode must be one of {DISPATCH_MODES}, got {self.mode!r}")
    return dataclasses.replace(
        self, grouped_matmul=resolve_impl(self.grouped_matmul, partitioned=False),
        exchange=expert_parallel.resolve_exchange(self.exchange))


class Routing(NamedTuple):
  """The router's decision for T tokens (``route``)."""

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
  normalised, chosen, mask, n_tokens, scale = _choices(scores, experts, mask, scope)
  f = scale * chosen.sum(1)
  p = (normalised * mask[..., None]).sum(1) / n_tokens
  return f, p


def _choices(scores, experts, mask, scope: str):
  """Per scope row: normalised affinities s' [S, T', E], chosen [S, T', E] (1 where a real token
  picked the expert), mask [S, T'], token counts [S, 1] and f's factor E / (K T) [S, 1]."""
  scores, experts, mask = (_scoped(a, scope) for a in (scores, experts, mask.astype(jnp.float32)))
  n_experts, top_k = scores.shape[-1], experts.shape[-1]
  chosen = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32).sum(-2) * mask[..., None]
  n_tokens = jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
  normalised = scores / scores.sum(-1, keepdims=True)
  return normalised, chosen, mask, n_tokens, n_experts / (top_k * n_tokens)


def _mean_over_nonempty(per_row: jax.Array, nonempty: jax.Array) -> jax.Array:
  """Average over the rows that hold real tokens (an all-padding row must not dilute it)."""
  nonempty = nonempty.astype(jnp.float32)
  return (per_row * nonempty).sum() / jnp.maximum(nonempty.sum(), 1.0)


def straight_through_load(scores, experts, mask, scope: str = "sequence") -> jax.Array:
  """f~ [S, E]: the load fraction f of ``balance_fractions`` in value, with a straight-through
  gradient: each chosen (token, expert) counts s'/sg(s') (= 1) with s' the normalised affinity,
  so d f~_i / d s'_{t,i} = E / (K T s'_{t,i}) for the tokens that chose expert i."""
  normalised, chosen, _, _, scale = _choices(scores, experts, mask, scope)
  safe = jnp.where(chosen > 0, normalised, 1.0)
  ratio = safe / jax.lax.stop_gradient(safe)  # 1, carrying d log s'
  return scale * (chosen * ratio).sum(1)


def expert_balance_loss(f: jax.Array, p: jax.Array, form: str = "f_p",
                        f_straight_through: jax.Array | None = None) -> jax.Array:
  """The expert-level balance loss before alpha, averaged over sequences (or the batch), from
  f, P [S, E] (``balance_fractions``; f carries no gradient, it counts top-k choices):

  - "f_p": sum_i f_i P_i (V2 eq. 23 expert-level, V3 eq. 17-20 sequence-wise);
  - "p_only": sum_i E sg(P_i) P_i, the load f_i replaced by the affinity's estimate E P_i, so
    no top-k choice enters (review arXiv 2503.11486, open question 2); gradient E sg(P_i);
  - "f_only": sum_i sg(f_i) f~_i / E with ``f_straight_through`` f~ (required), the loads alone:
    each expert's chosen scores are pushed down in proportion to its load f_i.

  All three equal 1 at perfect balance (f_i = 1, P_i = 1/E) and grow with imbalance. Raises
  ValueError for an unknown form or "f_only" without f~."""
  if form == "f_p":
    per_row = (f * p).sum(-1)
  elif form == "p_only":
    per_row = (p.shape[-1] * jax.lax.stop_gradient(p) * p).sum(-1)
  elif form == "f_only":
    if f_straight_through is None:
      raise ValueError("expert_balance_loss form 'f_only' needs f_straight_through "
                       "(straight_through_load)")
    per_row = (jax.lax.stop_gradient(f) * f_straight_through).sum(-1) / f.shape[-1]
  else:
    raise ValueError(f"balance loss form must be 'f_p', 'p_only' or 'f_only', got {form!r}")
  return _mean_over_nonempty(per_row, f.sum(-1) > 0)  # sum_i f_i = E for real rows


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


def sort_assignments(experts: jax.Array, n_experts: int, rows: int):
  """The T*K assignments ``experts`` [T, K] sorted by expert, without scatters (XLA:CPU runs
  scatters as loops): (order [M] slots in expert order, rank [M] sorted position of each slot,
  bounds [E+1] group boundaries clipped to the first ``rows``). Ids >= E (unused slots) sort
  past every group."""
  flat_expert = experts.reshape(-1)
  order = jnp.argsort(flat_expert, stable=True)
  bounds = jnp.searchsorted(flat_expert[order], jnp.arange(n_experts + 1), side="left")
  return order, jnp.argsort(order), jnp.minimum(bounds, rows)


def expert_ffn(x, experts, weights, w_gate, w_up, w_down, *, impl="auto", max_rows=None,
               fmt: MatmulFormat = BF16):
  """Sorted grouped-matmul expert FFNs: x [T, D] -> (sum_k w_k FFN_{e_k}(x) [T, D], overflow).

  ``experts`` [T, K] ids (>= E: slot unused, e.g. dropped), ``weights`` [T, K]. The T*K slots
  are sorted by expert and only the first ``max_rows`` (default all) are computed; ``overflow``
  counts the used slots past that limit (their contribution is left out). The expert weights
  (any dtype) meet x through ``weight_matmul`` in x's dtype and number format ``fmt`` (FP8:
  Wgrad's 128-row chunks restart at each expert's first row, ``quant.fp8.chunk_starts``).
  """
  fmt = MatmulFormat(fmt) if isinstance(fmt, str) else fmt
  t, top_k = experts.shape
  n_experts, m = w_gate.shape[0], t * top_k
  rows = m if max_rows is None else min(max_rows, m)
  order, rank, bounds = sort_assignments(experts, n_experts, rows)
  group_sizes = (bounds[1:] - bounds[:-1]).astype(jnp.int32)
  overflow = jnp.sum(experts < n_experts) - bounds[-1]
  computed = (rank < bounds[-1]).reshape(t, top_k)
  x, w_gate, w_up, w_down = _same_varying_axes(x, w_gate, w_up, w_down)
  kernel = fmt.kernel == "mosaic_gpu" and fmt.name == "fp8_blockwise"
  if resolve_impl(impl) == "tiled" or kernel:  # the kernel: DeepGEMM's 128-row layout
    out = _tiled_expert_ffn(x, order[:rows], rank, group_sizes, top_k, w_gate, w_up, w_down,
                            fmt, tile=FP8_BLOCK if kernel else None)
  else:
    x_sorted = x[order[:rows] // top_k]
    gmm = lambda a, w, sizes: grouped_matmul(a, w, sizes, impl=impl)
    row_group = jnp.searchsorted(bounds[1:], jnp.arange(rows), side="right")
    kw = dict(dtype=x.dtype, product=gmm, product_args=(group_sizes,), fmt=fmt,
              chunk_starts=chunk_starts(row_group, FP8_BLOCK) if fmt.fp8 else None)
    gate = weight_matmul("MD,EDF->MF", x_sorted, w_gate, **kw)
    up = weight_matmul("MD,EDF->MF", x_sorted, w_up, **kw)
    out_sorted = weight_matmul("MF,EFD->MD", jax.nn.silu(gate) * up, w_down, **kw)
    out_sorted = jnp.concatenate([out_sorted, jnp.zeros((1, x.shape[1]), out_sorted.dtype)])
    out = out_sorted[jnp.minimum(rank, rows)].reshape(t, top_k, -1)
    out = jnp.where(computed[..., None], out, 0)  # a kernel may leave rows past the groups unset
  weights = jnp.where(computed, weights, 0.0)
  y = jnp.einsum("TKD,TK->TD", out.astype(jnp.float32), weights.astype(jnp.float32))
  return y.astype(x.dtype), overflow


def _same_varying_axes(*values):
  """Inside shard_map, mark every array (of ``values``, arrays or pytrees such as an FP8 weight
  with its scales) as varying over the union of the mesh axes any of them varies over (tokens
  vary over the batch axes, weights over expert / tensor), so the custom-VJP gradients
  type-check; autodiff then sums each gradient over the axes its array was replicated on.
  Outside shard_map this is the identity."""
  arrays, tree = jax.tree.flatten(list(values))
  varying = [getattr(jax.typeof(a).manual_axis_type, "varying", frozenset()) for a in arrays]
  union = frozenset().union(*varying)
  return jax.tree.unflatten(tree, [jax.lax.pcast(a, tuple(sorted(union - v)), to="varying")
                                   if union - v else a for a, v in zip(arrays, varying)])


class TilePlan(NamedTuple):
  """Where each assignment goes in tile space (``tile_plan``): N tiles of B rows, each tile one
  expert's; the slot N*B is a zero row (padding reads it) and T*K an unused assignment."""

  tile_group: jax.Array  # [N] expert of each tile
  token_of_slot: jax.Array  # [N*B] token read by each slot (T: a zero row)
  slot_of_assignment: jax.Array  # [T, K] slot of each assignment (N*B: not computed)
  assignment_of_slot: jax.Array  # [N*B] assignment held by each slot (T*K: none)


def tile_plan(order, rank, group_sizes, n_tokens: int, top_k: int, tile: int) -> TilePlan:
  """The tile-space layout of the assignments sorted by expert: ``order`` [rows] lists the
  computed slots in expert order, ``rank`` [M] each slot's sorted position, ``group_sizes`` [E]
  the rows of each expert; ``tile`` rows per tile (static)."""
  rows, n_experts = order.shape[0], group_sizes.shape[0]
  layout = tile_layout(group_sizes, rows, n_experts, tile)
  n_slots = layout.rows.shape[0]
  slot_of_sorted = jnp.concatenate([jnp.where(layout.valid, layout.slot, n_slots),
                                    jnp.full((1,), n_slots)])  # past the groups -> zero row
  slot_of_assignment = slot_of_sorted[jnp.minimum(rank, rows)]  # [M]
  m = n_tokens * top_k
  assignment_of_slot = jnp.concatenate([order, jnp.array([m])])[layout.rows]
  token_of_slot = jnp.where(assignment_of_slot < m, assignment_of_slot // top_k, n_tokens)
  return TilePlan(layout.tile_group, token_of_slot, slot_of_assignment.reshape(n_tokens, top_k),
                  assignment_of_slot)


def _tiled_expert_ffn(x, order, rank, group_sizes, top_k, w_gate, w_up, w_down, fmt=BF16,
                      tile=None):
  """The whole SwiGLU in tile space (CPU): one gather of tokens into expert tiles, three tile
  matmuls, one gather back to slots [T, K, D]. ``order`` [rows] lists the computed slots in
  expert order, ``rank`` [M] each slot's sorted position. Padding slots hold zero rows, and
  silu(0) * 0 = 0 keeps them zero through the FFN."""
  (t, d), rows, n_experts = x.shape, order.shape[0], w_gate.shape[0]
  tile = tile or default_tile(rows, n_experts)
  plan = tile_plan(order, rank, group_sizes, t, top_k, tile)
  n_slots = plan.token_of_slot.shape[0]
  x_tiles = gather_rows(x, plan.token_of_slot, plan.slot_of_assignment)
  x_tiles = x_tiles.reshape(-1, tile, d)
  # FP8 Wgrad chunks: 128 // tile tiles (the tile divides 128), restarting at each expert.
  kw = dict(dtype=x.dtype, product=tile_matmul, product_args=(plan.tile_group,), fmt=fmt,
            chunk_starts=chunk_starts(plan.tile_group, FP8_BLOCK // tile) if fmt.fp8 else None,
            fp8_forward=mosaic_gpu_grouped_gemm if fmt.kernel == "mosaic_gpu" else None)
  gate = weight_matmul("NBD,EDF->NBF", x_tiles, w_gate, **kw)
  up = weight_matmul("NBD,EDF->NBF", x_tiles, w_up, **kw)
  y_tiles = weight_matmul("NBF,EFD->NBD", jax.nn.silu(gate) * up, w_down, **kw)
  out = gather_rows(y_tiles.reshape(n_slots, d), plan.slot_of_assignment.reshape(-1),
                    plan.assignment_of_slot[:, None])
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
                   n_experts: int, capacity_factor: Optional[float], impl: str,
                   placement, fmt: MatmulFormat = BF16):
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
    group = jnp.where(valid, ctx.experts_here[jnp.minimum(ids, per_shard - 1)] // per_group,
                      routing.n_groups)
    n_real = jax.lax.psum(real.sum(), ctx.axis)
    capacity = device_capacity(n_real, routing.top_k, routing.n_groups, capacity_factor)
    keep = capacity_keep(group.reshape(-1), priority.reshape(-1), routing.n_groups + 1,
                         capacity).reshape(ids.shape) & valid
    dropped = (valid & ~keep & (priority >= 0)).sum().astype(jnp.float32)
    ids = jnp.where(keep, ids, per_shard)
    # Static bound: a group keeps at most cf * (every token of the EP group) * K / G slots.
    groups_here = placement.groups_per_shard(ctx.n_shards, routing.n_groups)
    most = math.ceil(capacity_factor * ctx.n_shards * ctx.n_tokens * routing.top_k
                     / routing.n_groups)
    max_slots = min(max_slots, max(most, 1) * groups_here)
  y, overflow = expert_ffn(x, ids, weights, *params, impl=impl, max_rows=max_slots, fmt=fmt)
  return y, {"dropped": dropped, "overflow": overflow}


class MoE(nnx.Module):
  """DeepSeekMoE layer. Returns (y, stats); stats feed the losses, the bias update and logging.

  Weights: router ``gate`` [D, E] (float32 math), routed experts ``w_gate`` / ``w_up`` [E, D, F]
  and ``w_down`` [E, F, D], shared experts ``shared`` (a SwiGLU of n_shared F), and the
  ``router_bias`` [E] state when balance.router_bias, and ``placement_table`` (per-layer expert
  placement state, ``set_layer_placement``) when one is installed, else None. With
  ``dispatch.mode="expert_parallel"``
  the routed experts run over the mesh's expert axis (``parallel.expert_parallel``); routing,
  statistics and losses stay global arrays, so expert loads and balance terms always count
  the whole batch.
  """

  def __init__(self, d_model: int, experts: ExpertSpec, *, routing: RoutingSpec,
               balance: BalanceSpec = BalanceSpec(), dispatch: DispatchSpec = DispatchSpec(),
               init_std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs,
               matmul_format: MatmulFormat = BF16):
    """Raises ValueError for an unknown dispatch mode, grouped matmul or exchange.
    ``matmul_format`` applies to the routed and shared experts; the router stays float32."""
    kw = dict(std=init_std, param_dtype=param_dtype)
    e, d, f = experts.n_routed, d_model, experts.ffn_dim
    self.gate = normal_param(rngs, (d, e), ("embed", "expert"), **kw)
    self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32)) if balance.router_bias else None
    self.w_gate = normal_param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), **kw)
    self.w_up = normal_param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), **kw)
    self.w_down = normal_param(rngs, (e, f, d), ("expert", "expert_mlp", "embed"), **kw)
    self.shared = (SwiGLU(d, experts.n_shared * f, init_std=init_std, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs, matmul_format=matmul_format)
                   if experts.n_shared else None)
    self.placement_table = None  # no state (the checkpoint unchanged) until one is installed
    self.matmul_format = matmul_format
    self.routing = routing
    self.balance = balance
    self.dispatch = dispatch.resolved()
    self.dtype = dtype

  @property
  def capacity_factor(self) -> Optional[float]:
    return self.dispatch.capacity_factor

  def _placement(self, n_experts: int):
    """(static placement, traced table or None): the layer's own tables if installed, else
    ``DispatchSpec.placement`` (default identity). Raises ValueError when both are set."""
    shared = self.dispatch.placement
    if self.placement_table is None:
      return shared or ExpertPlacement.identity(n_experts), None
    if shared is not None and not shared.is_identity:
      raise ValueError("the MoE layer has both DispatchSpec.placement (one table for every "
                       "layer) and per-layer tables (set_layer_placement); keep one")
    return self.placement_table.layout, self.placement_table.arrays()

  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None, drop_tokens: bool = True):
    """x [B,T,D], mask [B,T] (1 = real token; padding is excluded from load, losses and
    capacity). ``drop_tokens=False`` disables capacity dropping (inference). Raises
    ValueError when expert-parallel dispatch cannot run (no expert axis in the context mesh,
    experts or tokens that do not divide over it, V2 capacity with groups split over shards)."""
    b, t, d = x.shape
    x = x.astype(self.dtype)
    mask = jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
    tokens = x.reshape(b * t, d)
    # The router in float32 (V3 §3.3 keeps gating in high precision).
    logits = weight_matmul("TD,DE->TE", tokens, self.gate, dtype=jnp.float32)
    bias = None if self.router_bias is None else self.router_bias[...]
    routing = route(logits, bias, self.routing)
    n_experts, top_k = logits.shape[-1], self.routing.top_k
    flat_mask = jnp.repeat(mask.reshape(-1), top_k)
    dispatch = self.dispatch
    capacity_factor = dispatch.capacity_factor if drop_tokens else None
    affinity = jnp.take_along_axis(routing.scores, routing.experts, -1)
    priority = jnp.where(mask.reshape(-1, 1) > 0, affinity, -1.0)  # padding yields slots first
    # Cast at the matmul; get_value keeps a released checkpoint's FP8 blocks (quant.fp8.Fp8Weight).
    w = [getattr(self, n).get_value() for n in ("w_gate", "w_up", "w_down")]

    counters = {}
    if dispatch.mode == "expert_parallel":
      spec = self.routing
      mesh = expert_parallel.expert_mesh()
      n_shards = 1 if mesh is None else mesh.shape["expert"]
      placement, table = self._placement(n_experts)
      if mesh is not None:  # else expert_parallel names the missing mesh
        placement.check(n_experts, n_shards, "DispatchSpec.placement" if table is None
                        else "the per-layer expert placement")
      if capacity_factor is not None and placement.group_span(n_shards, spec.n_groups) > 1:
        raise ValueError(
            f"capacity_factor={capacity_factor} (V2 device-level dropping) treats each of the "
            f"n_expert_groups={spec.n_groups} groups as a device, so a group must lie on one "
            f"expert shard: make n_expert_groups a multiple of the mesh's expert axis "
            f"({n_shards}) and place each group's experts together (replicas too), or set "
            "capacity_factor=None (dropless)")
      local = functools.partial(_shard_experts, routing=spec, n_experts=n_experts,
                                capacity_factor=capacity_factor, impl=dispatch.grouped_matmul,
                                placement=placement, fmt=self.matmul_format)
      capacity_args = capacity_factor is not None
      y, counters = expert_parallel.expert_parallel(
          local, tokens, routing.experts,
          (routing.weights, priority) if capacity_args else (routing.weights,), w, (2, 2, 1),
          (mask.reshape(-1),) if capacity_args else (),
          max_shards=expert_parallel.max_shards_per_token(
              n_experts, n_shards, spec.n_groups, spec.n_limited_groups, top_k, placement),
          buffer_factor=dispatch.buffer_factor, exchange=dispatch.exchange,
          check_vma=dispatch.grouped_matmul in ("tiled", "ragged_dot"),  # Pallas: no vma types
          placement=placement, table=table)
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
      y, overflow = expert_ffn(tokens, experts, routing.weights, *w, impl=dispatch.grouped_matmul,
                               fmt=self.matmul_format)
    if self.shared is not None:
      y = y + self.shared(tokens[None])[0]

    scores = routing.scores.reshape(b, t, n_experts)
    experts = routing.experts.reshape(b, t, top_k)
    balance = self.balance
    f, p = balance_fractions(scores, experts, mask, balance.scope)
    expert_coef, device_coef, comm_coef = balance.expert_coef, balance.device_coef, balance.comm_coef
    n_groups = self.routing.n_groups
    stats = {
        "load": jnp.einsum("M,ME->E", flat_mask,
                           jax.nn.one_hot(routing.experts.reshape(-1), n_experts)),
        "dropped": dropped.astype(jnp.float32),
        "overflow": jnp.asarray(overflow, jnp.float32),
        "assignments": flat_mask.sum(),
        "expert_balance": expert_coef * expert_balance_loss(
            f, p, balance.form, straight_through_load(scores, experts, mask, balance.scope)
            if balance.form == "f_only" else None),
        "device_balance": device_coef * device_balance_loss(f, p, n_groups),
        "comm_balance": comm_coef * comm_balance_loss(experts, mask, p, n_groups,
                                                      self.routing.n_limited_groups,
                                                      balance.scope),
    }
    if "dispatch_rows" in counters:  # rows sent per token (padding included), its bound
      stats["dispatch_per_token"] = counters["dispatch_rows"] / (b * t)
      stats["remote_per_token"] = counters["remote_rows"] / (b * t)
      stats["shard_load"] = counters["shard_slots"]  # [P] slots each expert shard received
    return y.reshape(b, t, d), stats


def set_layer_placement(layer: MoE, placement: Optional[eplb.Placement],
                        mesh: Optional[jax.sharding.Mesh] = None) -> MoE:
  """Give ``layer`` per-layer expert placement tables, in place; returns it.

  ``placement`` (``eplb.rebalance_experts``) has one row per layer: L rows for a stacked layer
  (``transformer.stack_blocks``: router ``gate`` [L, D, E]), whose row l layer l of the scan
  uses, or 1 row for a single layer. They become the layer's ``placement_table``: int32 arrays
  with the layer axis, sliced by the scan like the weights, plus the static ``TableLayout`` all
  layers share (one compiled layer serves them all). Expert-parallel dispatch then reads the
  traced tables; local dispatch ignores them. None removes them (the identity again, or
  ``DispatchSpec.placement``). The tables are state, not parameters: ``nnx.split(model,
  nnx.Param, ...)`` puts them with the rest (saved in checkpoints; install them before restoring
  a checkpoint that holds them). With ``mesh`` they are checked against its expert axis now;
  they are checked again when the layer traces.

  Raises ValueError (one line, before compiling) for a row count other than the layer count, a
  row whose replicas do not add up to its slots, a table of another expert count, slots the
  mesh's expert axis does not divide, tables balanced for another shard count, a layer that
  already has a non-identity ``DispatchSpec.placement``, and a layer built for local dispatch
  (which would ignore the tables).
  """
  if placement is None:
    layer.placement_table = None
    return layer
  stacked = layer.gate.ndim == 3  # [L, D, E] in a stacked layer
  n_layers, n_experts = (layer.gate.shape[0] if stacked else 1), layer.gate.shape[-1]
  rows = placement.slot_to_expert.shape[0]
  if rows != n_layers:
    raise ValueError(f"the EPLB placement has {rows} layers, the MoE "
                     f"{f'stack has {n_layers}' if stacked else 'layer is one'}; compute it "
                     "from that stack's load rows")
  if layer.dispatch.mode != "expert_parallel":
    raise ValueError("the MoE layer runs local dispatch, which has no expert shards and would "
                     "ignore the placement; build the model for the mesh "
                     "(create_model(cfg, execution=resolve_execution(cfg, mesh)), mesh.expert > 1)")
  shared = layer.dispatch.placement
  if shared is not None and not shared.is_identity:
    raise ValueError("the MoE layer already has DispatchSpec.placement (one table for every "
                     "layer); set Execution.expert_placement=None before per-layer tables")
  placements = [ExpertPlacement.from_eplb(placement, row) for row in range(rows)]
  for row, one in enumerate(placements):
    one.check(n_experts, placement.n_shards, f"the EPLB placement's layer {row}")
  layout, table = stack_tables(placements, layer.routing.n_groups, placement.n_shards)
  expert_axis = 1 if mesh is None else mesh.shape.get(expert_parallel.EXPERT_AXIS, 1)
  if expert_axis > 1:
    layout.check(n_experts, expert_axis, "the EPLB placement")
  if not stacked:
    table = SlotTable(*(a[0] for a in table))
  layer.placement_table = nnx.data(PlacementTable(layout, table))
  return layer
