"""Expert parallelism: routed experts split over the mesh's ``expert`` axis, tokens sent to
their experts and back by all-to-all inside ``jax.shard_map`` (V2 §3.2, V3 §3.2).

Axis legend (one shard's view): T tokens on this shard, K top-k, P expert shards, S send rows,
R receive rows, D d_model, E experts, E' >= E physical expert slots (E' > E: redundant
experts, EPLB), El = E' / P slots per shard.

How it works (every shard runs the same code):
  0. Place. ``ExpertPlacement`` maps each top-k choice (t, k) to a physical slot: its expert's
     slot, or with redundant experts one of its replicas, round robin (``_choose_slots``). A
     scanned stack of layers, each with its own table (``stack_tables``), passes the table as
     traced arrays (``SlotTable``) and the facts all layers share as a static ``TableLayout``.
  1. Plan. Token t needs shard p = slot // El for each of its K experts, but is sent *once per
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
included), ``remote_rows`` (rows that leave their shard), ``overflow``, ``shard_slots`` [P]
(top-k slots each expert shard received: the load EPLB evens out), plus ``local_fn``'s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

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


@dataclasses.dataclass(frozen=True, init=False)
class ExpertPlacement:
  """Where each routed expert lives: ``slot_experts[s]`` is the logical expert held by physical
  slot s of the stacked expert weights as they are split over the expert axis, so shard p holds
  the slots [p El, (p + 1) El) (E' slots, El = E' / P). Dispatch reads this table and nothing
  else to find an expert's shard and its local index.

  Two kinds (one class):
    - a permutation, ``ExpertPlacement(slot_of_expert)`` with ``slot_of_expert[e]`` expert e's
      slot (E' = E); the identity keeps expert e on shard e // El;
    - redundant experts (EPLB), ``ExpertPlacement.from_slots(slot_experts, n_experts)`` or
      ``from_eplb(placement, layer)``: E' >= E slots, each expert in one or more of them. For
      each top-k choice (t, k) of expert e, dispatch picks replica (rank + j) mod R_e, rank
      being (t, k)'s position among the assignments of e on its shard, in token order, and j
      the shard's index along the batch axes: round robin, so a replica gets load / R_e give or
      take one assignment per shard. Deterministic, and invisible to the function computed.

  The weights stay logical ([E, ...] parameters, one copy per expert); a non-identity table
  gathers them into slot order ([E', ...]) on every call, inside the step, so autodiff sums the
  replicas' gradients into the one logical copy and the replicas stay identical by
  construction. That gather is an all-to-all of the expert weights per step (a placement
  used for long without replicas could store them in slot order instead).

  ``n_shards`` (optional): the expert-axis size the table was balanced for (EPLB); dispatch
  refuses a mesh whose expert axis differs. Raises ValueError (one line) for a table that is not
  a permutation, a slot naming an expert outside [0, E), an expert with no slot, or E' not
  divisible by ``n_shards``.
  """

  slot_experts: tuple[int, ...]
  n_experts: int
  n_shards: Optional[int]

  def __init__(self, slot_of_expert: Optional[Sequence[int]] = None, *,
               slot_experts: Optional[Sequence[int]] = None, n_experts: Optional[int] = None,
               n_shards: Optional[int] = None):
    if (slot_of_expert is None) == (slot_experts is None):
      raise ValueError("ExpertPlacement takes either slot_of_expert (a permutation) or "
                       "slot_experts with n_experts (redundant experts), not both or neither")
    if slot_of_expert is not None:
      slot_of_expert = tuple(int(s) for s in slot_of_expert)
      if sorted(slot_of_expert) != list(range(len(slot_of_expert))):
        raise ValueError(f"ExpertPlacement.slot_of_expert must be a permutation of "
                         f"0..{len(slot_of_expert) - 1}, got {slot_of_expert}")
      slot_experts = tuple(int(e) for e in np.argsort(np.asarray(slot_of_expert, np.int64)))
      n_experts = len(slot_experts)
    if n_experts is None:
      raise ValueError("ExpertPlacement(slot_experts=...) needs n_experts (the logical experts)")
    slot_experts = tuple(int(e) for e in slot_experts)
    bad = [(s, e) for s, e in enumerate(slot_experts) if not 0 <= e < n_experts]
    if bad:
      raise ValueError(f"ExpertPlacement: slot {bad[0][0]} names expert {bad[0][1]}, outside "
                       f"the {n_experts} experts 0..{n_experts - 1}")
    missing = sorted(set(range(n_experts)) - set(slot_experts))
    if missing:
      raise ValueError(f"ExpertPlacement: expert(s) {missing[:8]} have no slot; every one of "
                       f"the {n_experts} experts needs at least one of the "
                       f"{len(slot_experts)} slots")
    if n_shards is not None and (n_shards < 1 or len(slot_experts) % n_shards):
      raise ValueError(f"ExpertPlacement: {len(slot_experts)} slots cannot be split evenly over "
                       f"{n_shards} expert shards; use a multiple of the shard count")
    object.__setattr__(self, "slot_experts", slot_experts)
    object.__setattr__(self, "n_experts", int(n_experts))
    object.__setattr__(self, "n_shards", n_shards)

  @classmethod
  def identity(cls, n_experts: int) -> "ExpertPlacement":
    return cls(tuple(range(n_experts)))

  @classmethod
  def from_slots(cls, slot_experts: Sequence[int], n_experts: int,
                 n_shards: Optional[int] = None) -> "ExpertPlacement":
    """The placement whose slot s holds logical expert ``slot_experts[s]`` (E' >= E slots)."""
    return cls(slot_experts=slot_experts, n_experts=n_experts, n_shards=n_shards)

  @classmethod
  def from_eplb(cls, placement, layer: int) -> "ExpertPlacement":
    """Layer ``layer``'s table of an ``eplb.Placement`` (``rebalance_experts``): its
    ``slot_to_expert[layer]`` [E'] slots for ``replicas.shape[1]`` experts, balanced for
    ``placement.n_shards`` shards. For one table shared by all layers, balance the load summed
    over layers: ``rebalance_experts(load.sum(0, keepdims=True), ...)`` and layer 0. Raises
    ValueError for a layer out of range, replica counts that do not add up to the slots, or a
    table that names a missing expert."""
    layers, slots = placement.slot_to_expert.shape
    if not 0 <= layer < layers:
      raise ValueError(f"the EPLB placement has {layers} layers, asked for layer {layer}")
    replicas = np.asarray(placement.replicas[layer])
    if int(replicas.sum()) != slots or (replicas < 1).any():
      raise ValueError(f"the EPLB placement's layer {layer} has {int(replicas.sum())} replicas "
                       f"(each expert >= 1) for its {slots} slots; they must match")
    table = np.asarray(placement.slot_to_expert[layer])
    if (np.bincount(table[(table >= 0) & (table < len(replicas))], minlength=len(replicas))
        != replicas).any():
      raise ValueError(f"the EPLB placement's layer {layer}: slot_to_expert disagrees with "
                       "replicas")
    return cls.from_slots(table.tolist(), len(replicas), placement.n_shards)

  @property
  def n_slots(self) -> int:
    """E', the physical slots (E for a permutation)."""
    return len(self.slot_experts)

  @property
  def is_identity(self) -> bool:
    return self.slot_experts == tuple(range(self.n_experts))

  @property
  def is_redundant(self) -> bool:
    """Some expert has more than one slot (E' > E)."""
    return self.n_slots > self.n_experts

  @property
  def slot_of_expert(self) -> tuple[int, ...]:
    """[E] each expert's first slot (for a permutation: the permutation)."""
    first = {}
    for slot, expert in enumerate(self.slot_experts):
      first.setdefault(expert, slot)
    return tuple(first[e] for e in range(self.n_experts))

  def expert_of_slot(self) -> np.ndarray:
    """[E'] the logical expert held in each slot."""
    return np.asarray(self.slot_experts, np.int64)

  def replicas(self) -> np.ndarray:
    """[E] the slots (copies) of each expert, >= 1."""
    return np.bincount(self.expert_of_slot(), minlength=self.n_experts)

  def expert_slots(self) -> np.ndarray:
    """[E, R] the slots of each expert in increasing order, padded with its first slot past its
    replica count (R = the most replicas of any expert)."""
    table = np.tile(np.asarray(self.slot_of_expert, np.int64)[:, None],
                    (1, int(self.replicas().max())))
    filled = np.zeros(self.n_experts, np.int64)
    for slot, expert in enumerate(self.slot_experts):
      table[expert, filled[expert]] = slot
      filled[expert] += 1
    return table

  def slot_shards(self, n_shards: int) -> np.ndarray:
    """[E'] the expert shard of each slot."""
    return np.arange(self.n_slots) // (self.n_slots // n_shards)

  def shard_of(self, n_shards: int) -> np.ndarray:
    """[E] the expert shard that holds each expert (its first slot's, with replicas)."""
    return self.slot_shards(n_shards)[np.asarray(self.slot_of_expert)]

  def group_shards(self, n_shards: int, n_groups: int) -> list[set[int]]:
    """The shards holding some slot (any replica) of each of ``n_groups`` equal expert
    groups."""
    per_group = self.n_experts // n_groups
    shards = self.slot_shards(n_shards)
    out = [set() for _ in range(n_groups)]
    for slot, expert in enumerate(self.slot_experts):
      out[expert // per_group].add(int(shards[slot]))
    return out

  def group_span(self, n_shards: int, n_groups: int) -> int:
    """The most expert shards the slots of one of ``n_groups`` equal expert groups span."""
    return max(len(s) for s in self.group_shards(n_shards, n_groups))

  def groups_per_shard(self, n_shards: int, n_groups: int) -> int:
    """The most of ``n_groups`` equal expert groups with a slot on one expert shard."""
    per_shard = self.n_slots // n_shards
    group = self.expert_of_slot() // (self.n_experts // n_groups)
    return max(len(set(group[i * per_shard:(i + 1) * per_shard].tolist()))
               for i in range(n_shards))

  def slot_table(self, max_replicas: Optional[int] = None) -> "SlotTable":
    """This table as int32 arrays, ``expert_slots`` padded to ``max_replicas`` columns
    (default: this table's most replicas) with each expert's first slot."""
    slots = self.expert_slots()
    pad = (max_replicas or slots.shape[1]) - slots.shape[1]
    if pad < 0:
      raise ValueError(f"an expert has {slots.shape[1]} replicas, more than max_replicas="
                       f"{max_replicas}")
    slots = np.concatenate([slots, np.repeat(slots[:, :1], pad, 1)], 1)
    return SlotTable(self.expert_of_slot().astype(np.int32), slots.astype(np.int32),
                     self.replicas().astype(np.int32))

  def check(self, n_experts: int, n_shards: int, what: str = "the expert placement") -> None:
    """Raises ValueError (one line) unless this table fits a layer of ``n_experts`` experts
    split over ``n_shards`` expert shards."""
    _check_table(self.n_experts, self.n_slots, self.n_shards, self.is_redundant, n_experts,
                 n_shards, what)


def _check_table(table_experts: int, n_slots: int, balanced_for: Optional[int],
                 redundant: bool, n_experts: int, n_shards: int, what: str) -> None:
  if table_experts != n_experts:
    raise ValueError(f"{what} covers {table_experts} experts, the layer has {n_experts}")
  if n_slots % n_shards and not redundant:
    raise ValueError(f"n_routed_experts={n_experts} must be divisible by the mesh's expert "
                     f"axis ({n_shards}); change mesh.expert or the number of experts")
  if n_slots % n_shards:
    raise ValueError(f"{what} has {n_slots} slots, not divisible by the mesh's expert "
                     f"axis ({n_shards}); use a multiple of it")
  if balanced_for is not None and balanced_for != n_shards:
    raise ValueError(f"{what} was balanced for {balanced_for} expert shards, the mesh's "
                     f"expert axis has {n_shards}; rebalance for {n_shards}")


class SlotTable(NamedTuple):
  """An expert placement as int32 arrays (``ExpertPlacement.slot_table``): NumPy for one
  static table; traced for a layer's row of per-layer tables (``stack_tables``), which carry a
  leading [L] axis until the layer scan slices it."""

  slot_experts: Any  # [E'] the logical expert held by each slot
  expert_slots: Any  # [E, R] each expert's slots, padded with its first slot
  replicas: Any  # [E] each expert's slot count (>= 1)


@dataclasses.dataclass(frozen=True)
class TableLayout:
  """The static half of per-layer expert placements (``stack_tables``): what the tables of
  every layer of a scanned MoE stack share, so one traced layer serves them all. The tables
  themselves travel as traced ``SlotTable`` rows.

  n_experts E; n_slots E' (the same in every layer, as EPLB gives); max_replicas R (the most
  copies of any expert in any layer); n_shards (the expert-axis size they were balanced for);
  n_groups G (the routing's expert groups) with max_group_span (the most expert shards one
  group's slots span, any layer: it bounds the shards a token reaches, taken as the max over
  layers) and max_groups_per_shard (the most groups with a slot on one shard, any layer).
  It answers ``check``, ``group_span`` and ``groups_per_shard`` as ``ExpertPlacement`` does.
  """

  n_experts: int
  n_slots: int
  max_replicas: int
  n_shards: int
  n_groups: int
  max_group_span: int
  max_groups_per_shard: int

  is_identity = False  # tables are always read (and the weights gathered to slot order)

  @property
  def is_redundant(self) -> bool:
    return self.n_slots > self.n_experts

  def _same_groups(self, n_groups: int) -> None:
    if n_groups != self.n_groups:
      raise ValueError(f"the per-layer expert tables were laid out for {self.n_groups} expert "
                       f"groups, the layer routes over {n_groups}; install them again")

  def group_span(self, n_shards: int, n_groups: int) -> int:
    """``max_group_span`` (for the tables' ``n_shards``, which ``check`` enforces)."""
    self._same_groups(n_groups)
    return self.max_group_span

  def groups_per_shard(self, n_shards: int, n_groups: int) -> int:
    self._same_groups(n_groups)
    return self.max_groups_per_shard

  def check(self, n_experts: int, n_shards: int,
            what: str = "the per-layer expert placement") -> None:
    """Raises ValueError (one line) as ``ExpertPlacement.check`` does."""
    _check_table(self.n_experts, self.n_slots, self.n_shards, self.is_redundant, n_experts,
                 n_shards, what)


def stack_tables(placements: Sequence[ExpertPlacement], n_groups: int,
                 n_shards: Optional[int] = None) -> tuple[TableLayout, SlotTable]:
  """The per-layer tables of a stack of L layers, one ``ExpertPlacement`` each: their shared
  ``TableLayout`` and a ``SlotTable`` of int32 NumPy arrays with a leading [L] axis
  (``expert_slots`` padded to the most replicas of any layer). ``n_shards`` defaults to the
  shard count the placements were balanced for. Raises ValueError (one line) for no
  placements, layers with different expert or slot counts or balanced for different shard
  counts, no shard count, or slots the shards do not divide."""
  if not placements:
    raise ValueError("stack_tables needs one placement per layer, got none")
  first = placements[0]
  for layer, p in enumerate(placements):
    if (p.n_experts, p.n_slots) != (first.n_experts, first.n_slots):
      raise ValueError(f"layer {layer}'s placement has {p.n_slots} slots for {p.n_experts} "
                       f"experts, layer 0's {first.n_slots} for {first.n_experts}; a scanned "
                       "stack needs the same counts in every layer")
  balanced = {p.n_shards for p in placements} - {None}
  if len(balanced) > 1:
    raise ValueError(f"the layers' placements were balanced for different shard counts "
                     f"{sorted(balanced)}")
  n_shards = n_shards or (balanced.pop() if balanced else None)
  if n_shards is None:
    raise ValueError("stack_tables needs the expert shard count (n_shards)")
  for p in placements:
    p.check(first.n_experts, n_shards, "a layer's expert placement")
  max_replicas = max(int(p.replicas().max()) for p in placements)
  rows = [p.slot_table(max_replicas) for p in placements]
  layout = TableLayout(
      first.n_experts, first.n_slots, max_replicas, n_shards, n_groups,
      max(p.group_span(n_shards, n_groups) for p in placements),
      max(p.groups_per_shard(n_shards, n_groups) for p in placements))
  return layout, SlotTable(*(np.stack(column) for column in zip(*rows)))


def max_shards_per_token(n_experts: int, n_shards: int, n_groups: int, n_limited_groups: int,
                         top_k: int,
                         placement: Optional[Union[ExpertPlacement, TableLayout]] = None
                         ) -> int:
  """Most shards one token can be sent to: K, P, and the group limit M times the shards one
  group spans (1 when a shard holds whole groups, as V2's devices; P/G for V3's nodes). With
  redundant experts a group spans every shard holding a replica of one of its experts; with
  per-layer tables (``TableLayout``), the widest span of any layer."""
  placement = placement or ExpertPlacement.identity(n_experts)
  return min(top_k, n_shards, n_limited_groups * placement.group_span(n_shards, n_groups))


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


def _choose_slots(experts: jax.Array, placement: ExpertPlacement, table: Optional[SlotTable],
                  batch_axes: Sequence[str]) -> jax.Array:
  """[T, K] int32: the physical slot serving each top-k choice. One replica per expert: its
  slot. Redundant experts: replica (rank + j) mod R_e of expert e, rank = the choice's position
  among this shard's assignments of e (token order), j = this shard's index along
  ``batch_axes``: round robin, so the replicas split e's load evenly. A traced ``table`` (one
  layer's row of per-layer tables) always takes the round-robin path (R_e = 1 picks the one)."""
  if table is None and not placement.is_redundant:
    return jnp.asarray(placement.slot_of_expert, jnp.int32)[experts]
  if table is None:
    table = placement.slot_table()
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  by_expert = flat[order]
  rank_sorted = jnp.arange(flat.shape[0]) - jnp.searchsorted(by_expert, by_expert, side="left")
  rank = rank_sorted[jnp.argsort(order)].reshape(experts.shape)  # no scatter (XLA:CPU loops)
  shard = jax.lax.axis_index(tuple(batch_axes)) if batch_axes else 0
  replicas = jnp.asarray(table.replicas, jnp.int32)[experts]
  replica = (rank + shard) % replicas
  return jnp.asarray(table.expert_slots, jnp.int32)[experts, replica]


def _shard_body(x, experts, slot_values, expert_params, shard_args, table_args, *, local_fn,
                max_shards, buffer_factor, exchange, tensor_split, reduce_axes, placement):
  """One shard: plan, dispatch, ``local_fn``, combine. Returns (y [T, D], counters).
  ``table_args``: a traced ``SlotTable``'s arrays (per-layer tables), or () for the static
  ``placement``."""
  t, k = experts.shape
  p = jax.lax.axis_size(EXPERT_AXIS)
  per_shard = placement.n_slots // p
  sizes = buffer_sizes(t, p, max_shards, buffer_factor, exchange)
  table = SlotTable(*table_args) if table_args else None
  slot = _choose_slots(experts, placement, table, reduce_axes)  # the table, nothing else
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
  expert_of_slot = placement.expert_of_slot() if table is None else table.slot_experts
  experts_here = jax.lax.dynamic_slice_in_dim(jnp.asarray(expert_of_slot, jnp.int32),
                                              index * per_shard, per_shard)
  context = ShardContext(index, p, EXPERT_AXIS, t, max_slots, experts_here)
  y_recv, counters = local_fn(x_recv, ids_recv, values_recv, expert_params, shard_args, context)
  if tensor_split:
    y_recv = jax.lax.psum(y_recv, TENSOR_AXIS)

  y_rows = move.backward(y_recv.astype(x.dtype))
  y = _take(y_rows, plan.pos.reshape(-1), plan.assignment_of_row[:, None])
  y = y.reshape(t, k, -1).astype(jnp.float32).sum(1).astype(x.dtype)

  sent = plan.send_size.sum()
  slots_sent = jnp.where(plan.row_sent, (ids < per_shard).sum(1), 0).sum()
  slots_here = (ids_recv < per_shard).sum()  # received, before local_fn's capacity / limits
  counters = dict(counters, dispatch_rows=sent, remote_rows=sent - plan.send_size[context.index],
                  overflow=counters.get("overflow", 0) + t * k - slots_sent,
                  shard_slots=jax.nn.one_hot(index, p, dtype=jnp.int32) * slots_here)
  counters = {name: jax.lax.psum(jnp.asarray(v, jnp.float32), reduce_axes)
              for name, v in counters.items()}
  return y, counters


def expert_parallel(local_fn: LocalFn, x: jax.Array, experts: jax.Array,
                    slot_values: Sequence[jax.Array], expert_params: Sequence[jax.Array],
                    hidden_dims: Sequence[int], shard_args: Sequence[jax.Array] = (), *,
                    max_shards: int, buffer_factor: Optional[float] = None,
                    exchange: str = "auto", check_vma: bool = True,
                    placement: Optional[Union[ExpertPlacement, TableLayout]] = None,
                    table: Optional[SlotTable] = None):
  """Run routed experts expert-parallel over the context mesh's expert axis.

  x [N, D] tokens and experts / slot_values [N, K] are split over the batch axes like the batch
  (N = batch x length); expert_params [E, ...] are split over the expert axis, and over the
  tensor axis along ``hidden_dims`` (each param's expert-hidden dim) when it divides them.
  ``local_fn(x [R, D], ids [R, K], values, params, shard_args, ShardContext)`` returns
  (y [R, D], counters) for the rows one shard received. Returns (y [N, D], counters).
  ``check_vma=False`` turns off shard_map's varying-axes typing, which Pallas kernels (megablox,
  tokamax) do not support; autodiff then sums replicated inputs' gradients conservatively.
  ``placement`` (default: the identity) says which logical expert each of the E' physical slots
  holds (``ExpertPlacement``; E' > E with redundant experts); a non-identity table gathers the
  logical [E, ...] weights into slot order [E', ...] first, so their gradients stay [E, ...].
  ``max_shards`` must bound the shards a token reaches under that table
  (``max_shards_per_token(..., placement)``). Per-layer tables (a scanned stack, each layer its
  own table: ``stack_tables``) pass ``placement`` = their ``TableLayout`` and ``table`` = this
  layer's row as traced int32 arrays (slot_experts [E'], expert_slots [E, R], replicas [E]);
  the weights are then always gathered to slot order, by the traced ``slot_experts``.

  Raises ValueError without a context mesh whose expert axis is > 1, when the experts (or the
  placement's slots) do not divide over it, for a placement of another expert count or
  balanced for another expert-axis size, and for a ``TableLayout`` without its ``table`` (or
  the reverse) or a table of other shapes than its layout's.
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
  placement = placement or ExpertPlacement.identity(n_experts)
  placement.check(n_experts, p)
  if isinstance(placement, TableLayout) != (table is not None):
    raise ValueError("per-layer expert tables need both their TableLayout (placement=) and "
                     "this layer's traced SlotTable (table=)")
  if table is not None:
    table = SlotTable(*(jnp.asarray(a, jnp.int32) for a in table))
    want = SlotTable((placement.n_slots,), (n_experts, placement.max_replicas), (n_experts,))
    if tuple(a.shape for a in table) != tuple(want):
      raise ValueError(f"the expert table's shapes {[a.shape for a in table]} are not its "
                       f"layout's {list(want)} (a stacked [L, ...] table outside the scan?)")
    expert_of_slot = table.slot_experts
  elif not placement.is_identity:
    expert_of_slot = jnp.asarray(placement.expert_of_slot())
  if table is not None or not placement.is_identity:
    # logical [E, ...] -> slot order [E', ...]; the replicas' gradients sum back
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
  table_args = () if table is None else tuple(table)  # replicated on every shard
  body = jax.shard_map(
      lambda *a: _shard_body(*a, local_fn=local_fn, max_shards=max_shards,
                             buffer_factor=buffer_factor, exchange=resolve_exchange(exchange),
                             tensor_split=tensor_split, reduce_axes=reduce_axes,
                             placement=placement),
      in_specs=(batch, batch, [batch] * len(slot_values),
                [param_spec(w, d) for w, d in zip(expert_params, hidden_dims)],
                [batch] * len(shard_args), [PartitionSpec()] * len(table_args)),
      out_specs=(batch, PartitionSpec()), check_vma=check_vma)
  return body(x, experts, list(slot_values), list(expert_params), list(shard_args),
              list(table_args))


def splits_batch(n_tokens: int) -> bool:
  """Whether ``n_tokens`` rows split evenly over the context mesh's batch axes."""
  mesh = jax.sharding.get_abstract_mesh()
  return n_tokens % math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES) == 0
