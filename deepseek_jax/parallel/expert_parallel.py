"""Expert parallelism: routed experts split over the mesh's ``expert`` axis, tokens sent to
their experts and back by all-to-all inside ``jax.shard_map`` (V2 §3.2, V3 §3.2).

Axis legend (one shard's view): T tokens on this shard, K top-k, P expert shards, S send rows,
R receive rows, D d_model, E experts, El = E / P experts per shard.

How it works (every shard runs the same code):
  1. Plan. Token t needs shard p = e // El for each of its K experts, but is sent *once per
     shard* (DeepEP's de-duplication): a token whose experts sit on m shards becomes m rows.
     Group-limited routing bounds m (``max_shards_per_token``): with V2 device-limited routing
     (a group per shard) m <= M; with V3 node-limited routing (a group spans P/G shards)
     m <= M P / G. Rows are laid out by destination: chunk p holds the tokens bound for p, in
     token order.
  2. Dispatch. A row carries x_t and, per top-k slot, the local expert id (El = "not here")
     and the slot's values (combine weight; affinity for V2 dropping). The exchange is
     ``ragged_all_to_all`` on GPU/TPU. XLA:CPU lacks it, so there ``all_to_all`` moves
     fixed per-peer slabs of C rows ("padded"); ``ragged`` on CPU runs an exact emulation.
  3. Compute. The receiving shard runs ``local_fn`` on the R rows it holds: capacity, sorted
     grouped matmuls over its El experts, and the weighted sum of each row's slots, so exactly
     one row goes back per (token, shard). A tensor-sharded expert hidden dim is summed here.
  4. Combine. The reverse exchange returns the rows; token t sums its m partial outputs.

Buffers are static. The send buffer holds S = T m_max rows, always enough. The receive buffer
is the worst case R = P T (every token of every shard comes here) unless ``buffer_factor`` f
sizes it to ceil(f T m_max) rows, f = 1 being a perfectly balanced load. Rows that do not fit
are not sent: their contribution is lost and counted in ``overflow`` (in top-k slots, i.e.
token-expert assignments, like V2's ``dropped``), never silently. The receiving shard computes
at most R min(K, El) slots, or ceil(f T K) with a factor (``local_fn`` counts what it skips).
Both exchanges are linear, so autodiff runs them in reverse for the backward pass.
Counters returned (summed over the whole mesh): ``dispatch_rows`` (rows sent, local shard
included), ``remote_rows`` (rows that leave their shard), ``overflow``, plus ``local_fn``'s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from deepseek_jax.ops.rows import gather_rows, with_zero_row
from deepseek_jax.parallel.mesh import BATCH_AXES, target_platform

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"
EXCHANGES = ("auto", "ragged", "padded")


def expert_mesh():
  """The context mesh (``jax.set_mesh``) when its expert axis splits the experts, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(EXPERT_AXIS, 1) == 1:
    return None
  return mesh


def resolve_exchange(exchange: str, platform: Optional[str] = None) -> str:
  """The exchange ``exchange`` names; "auto" is "padded" on CPU (XLA:CPU has no
  ragged_all_to_all) and "ragged" elsewhere. ``platform`` defaults to ``target_platform()``.
  Raises ValueError for an unknown name."""
  if exchange not in EXCHANGES:
    raise ValueError(f"expert exchange must be one of {EXCHANGES}, got {exchange!r}")
  if exchange == "auto":
    return "padded" if (platform or target_platform()) == "cpu" else "ragged"
  return exchange


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
  """Where each routed expert lives: ``slot_of_expert[e]`` is expert e's row in the stacked
  expert weights as they are split over the expert axis, so shard p holds the slots
  [p El, (p + 1) El) (El = E / P). Dispatch reads this table and nothing else to find an
  expert's shard and its local index; the identity (today's only producer) keeps expert e on
  shard e // El. A permutation is computed exactly (tested); redundant experts (EPLB) will
  extend the table with replica slots without touching the MoE layer. A non-identity table
  gathers the stored (expert-ordered) weights into slot order on every call, an all-to-all of
  the expert weights per step; a placement used for long should store them in slot order."""

  slot_of_expert: tuple[int, ...]

  @classmethod
  def identity(cls, n_experts: int) -> "ExpertPlacement":
    return cls(tuple(range(n_experts)))

  def __post_init__(self):
    if sorted(self.slot_of_expert) != list(range(len(self.slot_of_expert))):
      raise ValueError(f"ExpertPlacement.slot_of_expert must be a permutation of "
                       f"0..{len(self.slot_of_expert) - 1}, got {self.slot_of_expert}")

  @property
  def is_identity(self) -> bool:
    return self.slot_of_expert == tuple(range(len(self.slot_of_expert)))

  def expert_of_slot(self) -> np.ndarray:
    """[E] the expert held in each slot (the inverse table)."""
    return np.argsort(np.asarray(self.slot_of_expert))

  def shard_of(self, n_shards: int) -> np.ndarray:
    """[E] the expert shard that holds each expert."""
    return np.asarray(self.slot_of_expert) // (len(self.slot_of_expert) // n_shards)


def max_shards_per_token(n_experts: int, n_shards: int, n_groups: int, n_limited_groups: int,
                         top_k: int, placement: Optional[ExpertPlacement] = None) -> int:
  """Most shards one token can be sent to: K, P, and the group limit M times the shards one
  group spans (1 when a shard holds whole groups, as V2's devices; P/G for V3's nodes)."""
  per_group = n_experts // n_groups
  shard_of = (placement or ExpertPlacement.identity(n_experts)).shard_of(n_shards)
  span = max(len(set(shard_of[g * per_group:(g + 1) * per_group])) for g in range(n_groups))
  return min(top_k, n_shards, n_limited_groups * span)


class BufferSizes(NamedTuple):
  """Static send / receive buffer sizes of one shard (``buffer_sizes``)."""

  send: int  # S rows
  recv: int  # R rows
  peer: int  # C rows per peer (padded exchange)


def buffer_sizes(n_tokens: int, n_shards: int, max_shards: int, buffer_factor: Optional[float],
                 exchange: str) -> BufferSizes:
  t, p, m = n_tokens, n_shards, max_shards
  if buffer_factor is None:
    recv, peer = p * t, t
  else:
    recv = min(p * t, math.ceil(buffer_factor * t * m))
    peer = min(t, math.ceil(recv / p))
  if exchange == "padded":
    recv = p * peer
  return BufferSizes(t * m, recv, peer)


class ShardContext(NamedTuple):
  """What ``local_fn`` knows about its place: this shard's index and the axis to reduce over
  (its expert-parallel group, i.e. the shards that exchanged tokens together)."""

  index: jax.Array
  n_shards: int
  axis: str
  n_tokens: int  # T, tokens on each shard
  max_slots: int  # top-k slots to compute at most: R min(K, El), or ceil(f T K) with a factor
  experts_here: jax.Array  # [El] the expert id held in each local slot (from the placement)


class _Plan(NamedTuple):
  pos: jax.Array  # [T, K] send row of slot (t, k) if it is t's first slot for its shard, else S
  assignment_of_row: jax.Array  # [S] the (t, k) slot that fills each send row, T*K if none
  send_off: jax.Array  # [P] where my chunk for each peer starts in my send buffer
  send_size: jax.Array  # [P] rows I send each peer (after clipping to its buffer)
  remote_off: jax.Array  # [P] where my chunk lands in each peer's receive buffer
  recv_off: jax.Array  # [P] where each sender's chunk lands in my receive buffer
  recv_size: jax.Array  # [P]
  back_off: jax.Array  # [P] where my returned rows land in each sender's send buffer
  counts: jax.Array  # [P] rows wanted per peer (before clipping)
  row_sent: jax.Array  # [S] the send row fits its peer's buffer
  row_slot: jax.Array  # [S] its slot in the peer slabs (padded exchange), P*C if not sent


def _plan(dest: jax.Array, sizes: BufferSizes, exchange: str, axis: str) -> _Plan:
  t, k = dest.shape
  p = jax.lax.axis_size(axis)
  me = jax.lax.axis_index(axis)
  earlier = jnp.tril(jnp.ones((k, k), jnp.bool_), -1)  # [k, j] = j < k
  first = ~((dest[:, :, None] == dest[:, None, :]) & earlier).any(-1)  # first slot per shard
  sends = jax.nn.one_hot(jnp.where(first, dest, p), p, dtype=jnp.int32).sum(1)  # [T, P] 0/1
  counts = sends.sum(0)
  rank = jnp.cumsum(sends, 0) - sends
  send_off = jnp.cumsum(counts) - counts
  pos = send_off[dest] + jnp.take_along_axis(rank, dest, 1)
  pos = jnp.where(first & (pos < sizes.send), pos, sizes.send)
  assignment_of_row = jnp.argsort(pos.reshape(-1))[:sizes.send]
  assignment_of_row = jnp.where(jnp.arange(sizes.send) < jnp.minimum(counts.sum(), sizes.send),
                                assignment_of_row, t * k)

  everyone = jax.lax.all_gather(counts, axis)  # [sender, receiver]
  col = everyone[:, me]
  if exchange == "padded":
    c = sizes.peer
    recv_off, recv_size = jnp.arange(p) * c, jnp.minimum(col, c)
    remote_off, send_size = jnp.full((p,), me * c), jnp.minimum(counts, c)
  else:
    recv_off = jnp.cumsum(col) - col
    recv_size = jnp.clip(sizes.recv - recv_off, 0, col)
    remote_off = (jnp.cumsum(everyone, 0) - everyone)[me]
    send_size = jnp.clip(sizes.recv - remote_off, 0, counts)
  send_size = jnp.minimum(send_size, jnp.clip(sizes.send - send_off, 0, None))
  back_off = (jnp.cumsum(everyone, 1) - everyone)[:, me]
  row = jnp.arange(sizes.send)
  peer = jnp.minimum(jnp.searchsorted(jnp.cumsum(counts), row, side="right"), p - 1)
  within = row - send_off[peer]
  row_sent = within < send_size[peer]
  row_slot = jnp.where(row_sent, peer * sizes.peer + within, p * sizes.peer)
  return _Plan(pos, assignment_of_row, send_off, send_size, remote_off, recv_off, recv_size,
               back_off, counts, row_sent, row_slot)


def _take(x: jax.Array, src: jax.Array, inv: jax.Array) -> jax.Array:
  """Rows x[src] (zero rows where src == len(x)); floats through the gather-transposed gather."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    return gather_rows(x, src, inv)
  return with_zero_row(x)[src]


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
  """``lax.ragged_all_to_all``'s exact semantics from ``all_to_all`` (XLA:CPU has no ragged
  version): each slice travels padded to len(operand) rows, then lands at its offset."""
  n, m = operand.shape[0], output.shape[0]
  row = jnp.arange(n)
  src = jnp.where(row < send_sizes[:, None], input_offsets[:, None] + row, n)  # [P, n]
  slabs = with_zero_row(operand)[src]
  got = jax.lax.all_to_all(slabs, axis_name, 0, 0, tiled=True)  # [P, n, ...] by sender
  lands = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  r = jnp.arange(m)
  inside = (r >= lands[:, None]) & (r < (lands + recv_sizes)[:, None])  # [P, m]
  sender = jnp.argmax(inside, 0)
  picked = got[sender, jnp.clip(r - lands[sender], 0, n - 1)]
  hit = inside.any(0).reshape((m,) + (1,) * (output.ndim - 1))
  return jnp.where(hit, picked, output)


def _ragged(exchange_impl, operand, out_rows, *offsets_sizes, axis):
  output = jnp.zeros((out_rows,) + operand.shape[1:], operand.dtype)
  # ragged_all_to_all types its result like ``output``: mark it varying like the rows it gets.
  varying = getattr(jax.typeof(operand).manual_axis_type, "varying", frozenset())
  if varying:  # empty when shard_map's check_vma is off
    output = jax.lax.pcast(output, tuple(sorted(varying | {axis})), to="varying")
  return exchange_impl(operand, output, *offsets_sizes, axis_name=axis)


class _Exchange:
  """Moves [S, ...] send buffers to [R, ...] receive buffers (``forward``) and back."""

  def __init__(self, plan: _Plan, sizes: BufferSizes, exchange: str, axis: str):
    self.plan, self.sizes, self.exchange, self.axis = plan, sizes, exchange, axis
    if exchange == "padded":  # slab slot (p, c) <-> send row send_off[p] + c
      slot = jnp.arange(sizes.peer)
      src = jnp.where(slot < plan.send_size[:, None], plan.send_off[:, None] + slot, sizes.send)
      self.slab_src, self.row_slot = src.reshape(-1), plan.row_slot  # [P*C], [S]
    elif target_platform() == "cpu":
      self.impl = _emulated_ragged_all_to_all
    else:
      self.impl = jax.lax.ragged_all_to_all

  def forward(self, x: jax.Array) -> jax.Array:
    plan = self.plan
    if self.exchange == "padded":
      p, c = jax.lax.axis_size(self.axis), self.sizes.peer
      slabs = _take(x, self.slab_src, self.row_slot[:, None]).reshape((p, c) + x.shape[1:])
      out = jax.lax.all_to_all(slabs, self.axis, 0, 0, tiled=True)
      return out.reshape((p * c,) + x.shape[1:])
    return _ragged(self.impl, x, self.sizes.recv, plan.send_off, plan.send_size,
                   plan.remote_off, plan.recv_size, axis=self.axis)

  def backward(self, y: jax.Array) -> jax.Array:
    plan = self.plan
    if self.exchange == "padded":
      p, c = jax.lax.axis_size(self.axis), self.sizes.peer
      back = jax.lax.all_to_all(y.reshape((p, c) + y.shape[1:]), self.axis, 0, 0, tiled=True)
      return _take(back.reshape((p * c,) + y.shape[1:]), self.row_slot, self.slab_src[:, None])
    return _ragged(self.impl, y, self.sizes.send, plan.recv_off, plan.recv_size,
                   plan.back_off, plan.send_size, axis=self.axis)

  def received_rows(self) -> jax.Array:
    """[R] bool: rows of the receive buffer that hold a token."""
    r = jnp.arange(self.sizes.recv)
    return ((r >= self.plan.recv_off[:, None])
            & (r < (self.plan.recv_off + self.plan.recv_size)[:, None])).any(0)


LocalFn = Callable[..., tuple]


def _shard_body(x, experts, slot_values, expert_params, shard_args, *, local_fn, n_experts,
                max_shards, buffer_factor, exchange, tensor_split, reduce_axes,
                placement: ExpertPlacement):
  """One shard: plan, dispatch, ``local_fn``, combine. Returns (y [T, D], counters)."""
  t, k = experts.shape
  p = jax.lax.axis_size(EXPERT_AXIS)
  per_shard = n_experts // p
  sizes = buffer_sizes(t, p, max_shards, buffer_factor, exchange)
  slot = jnp.asarray(placement.slot_of_expert, jnp.int32)[experts]  # the table, nothing else
  dest, local_slot = slot // per_shard, slot % per_shard
  plan = _plan(dest, sizes, exchange, EXPERT_AXIS)
  move = _Exchange(plan, sizes, exchange, EXPERT_AXIS)

  # Per slot (t, k) that opens a row: the slot values of t's slots on the same shard.
  same = dest[:, :, None] == dest[:, None, :]  # [T, K(row), K(slot)]
  row_of_slot = plan.pos.reshape(-1, 1)
  local_ids = jnp.where(same, local_slot[:, None, :], per_shard)
  ids = _take(local_ids.reshape(t * k, k), plan.assignment_of_row, row_of_slot)
  values = [_take(jnp.where(same, v[:, None, :], 0).reshape(t * k, k).astype(v.dtype),
                  plan.assignment_of_row, row_of_slot) for v in slot_values]
  x_rows = _take(x, jnp.where(plan.assignment_of_row < t * k, plan.assignment_of_row // k, t),
                 plan.pos)

  received = move.received_rows()
  x_recv = move.forward(x_rows)
  ids_recv = jnp.where(received[:, None], move.forward(ids), per_shard)
  values_recv = [move.forward(v) for v in values]
  max_slots = sizes.recv * min(k, per_shard)
  if buffer_factor is not None:
    max_slots = min(max_slots, math.ceil(buffer_factor * t * k))
  index = jax.lax.axis_index(EXPERT_AXIS)
  experts_here = jax.lax.dynamic_slice_in_dim(
      jnp.asarray(placement.expert_of_slot(), jnp.int32), index * per_shard, per_shard)
  context = ShardContext(index, p, EXPERT_AXIS, t, max_slots, experts_here)
  y_recv, counters = local_fn(x_recv, ids_recv, values_recv, expert_params, shard_args, context)
  if tensor_split:
    y_recv = jax.lax.psum(y_recv, TENSOR_AXIS)

  y_rows = move.backward(y_recv.astype(x.dtype))
  y = _take(y_rows, plan.pos.reshape(-1), plan.assignment_of_row[:, None])
  y = y.reshape(t, k, -1).astype(jnp.float32).sum(1).astype(x.dtype)

  sent = plan.send_size.sum()
  slots_sent = jnp.where(plan.row_sent, (ids < per_shard).sum(1), 0).sum()
  counters = dict(counters, dispatch_rows=sent, remote_rows=sent - plan.send_size[context.index],
                  overflow=counters.get("overflow", 0) + t * k - slots_sent)
  counters = {name: jax.lax.psum(jnp.asarray(v, jnp.float32), reduce_axes)
              for name, v in counters.items()}
  return y, counters


def expert_parallel(local_fn: LocalFn, x: jax.Array, experts: jax.Array,
                    slot_values: Sequence[jax.Array], expert_params: Sequence[jax.Array],
                    hidden_dims: Sequence[int], shard_args: Sequence[jax.Array] = (), *,
                    max_shards: int, buffer_factor: Optional[float] = None,
                    exchange: str = "auto", check_vma: bool = True,
                    placement: Optional[ExpertPlacement] = None):
  """Run routed experts expert-parallel over the context mesh's expert axis.

  x [N, D] tokens and experts / slot_values [N, K] are split over the batch axes like the batch
  (N = batch x length); expert_params [E, ...] are split over the expert axis, and over the
  tensor axis along ``hidden_dims`` (each param's expert-hidden dim) when it divides them.
  ``local_fn(x [R, D], ids [R, K], values, params, shard_args, ShardContext)`` returns
  (y [R, D], counters) for the rows one shard received. Returns (y [N, D], counters).
  ``check_vma=False`` turns off shard_map's varying-axes typing, which Pallas kernels (megablox,
  tokamax) do not support; autodiff then sums replicated inputs' gradients conservatively.
  ``placement`` (default: the identity) says which expert each weight row holds; a
  non-identity table gathers the weights into slot order first.

  Raises ValueError without a context mesh whose expert axis is > 1, or when the experts do
  not divide over it.
  """
  mesh = expert_mesh()
  if mesh is None:
    raise ValueError("expert-parallel dispatch needs a context mesh with an expert axis > 1 "
                     "(run under jax.set_mesh(mesh)), or a model built for local dispatch "
                     "(resolve_execution(cfg) without an expert axis)")
  if not splits_batch(x.shape[0]):
    raise ValueError(f"expert-parallel dispatch splits the {x.shape[0]} tokens over the batch "
                     f"axes {dict((a, mesh.shape.get(a, 1)) for a in BATCH_AXES)}, which do not "
                     "divide them; use a batch the mesh divides, or local dispatch")
  n_experts = expert_params[0].shape[0]
  p = mesh.shape[EXPERT_AXIS]
  if n_experts % p:
    raise ValueError(f"n_routed_experts={n_experts} must be divisible by the mesh's expert axis "
                     f"({p}); change mesh.expert or the number of experts")
  placement = placement or ExpertPlacement.identity(n_experts)
  if len(placement.slot_of_expert) != n_experts:
    raise ValueError(f"the expert placement covers {len(placement.slot_of_expert)} experts, the "
                     f"layer has {n_experts}")
  if not placement.is_identity:
    expert_of_slot = jnp.asarray(placement.expert_of_slot())
    expert_params = [w[expert_of_slot] for w in expert_params]
  tensor = mesh.shape.get(TENSOR_AXIS, 1)
  tensor_split = tensor > 1 and all(w.shape[d] % tensor == 0
                                    for w, d in zip(expert_params, hidden_dims))

  def param_spec(w, hidden_dim):
    spec = [EXPERT_AXIS] + [None] * (w.ndim - 1)
    if tensor_split:
      spec[hidden_dim] = TENSOR_AXIS
    return PartitionSpec(*spec)

  batch = PartitionSpec(BATCH_AXES)
  reduce_axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  body = jax.shard_map(
      lambda *a: _shard_body(*a, local_fn=local_fn, n_experts=n_experts, max_shards=max_shards,
                             buffer_factor=buffer_factor, exchange=resolve_exchange(exchange),
                             tensor_split=tensor_split, reduce_axes=reduce_axes,
                             placement=placement),
      in_specs=(batch, batch, [batch] * len(slot_values),
                [param_spec(w, d) for w, d in zip(expert_params, hidden_dims)],
                [batch] * len(shard_args)),
      out_specs=(batch, PartitionSpec()), check_vma=check_vma)
  return body(x, experts, list(slot_values), list(expert_params), list(shard_args))


def splits_batch(n_tokens: int) -> bool:
  """Whether ``n_tokens`` rows split evenly over the context mesh's batch axes."""
  mesh = jax.sharding.get_abstract_mesh()
  return n_tokens % math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES) == 0
