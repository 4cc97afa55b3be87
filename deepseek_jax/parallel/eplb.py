"""Expert-parallel load balancing (EPLB, DeepSeek-V3 §3.4 and DeepSeek's EPLB release): place
E logical experts on P >= E physical expert slots spread over the expert-parallel shards, so the
load per shard evens out. Heavy experts get redundant copies (replicas); each token routed to an
expert goes to one of its replicas, so a replica serves load / replicas.

Axis legend: L MoE layers, E logical experts, P physical slots, S shards (devices of the expert
axis), N nodes (groups of shards with fast links), G expert groups (V3's node-limited routing).

Hierarchical policy (prefilling; G divisible by N), per layer:
  1. pack the G expert groups onto the N nodes, G / N groups each, balancing group load;
  2. inside each node, replicate its E / N experts into P / N slots, each new replica going to
     the expert with the highest load per replica;
  3. pack each node's replicas onto its S / N shards, P / S slots each, balancing replica load.
A replica never leaves its group's node, so node-limited routing still holds. Global policy
(decoding, or G not divisible by N): the same with one group and one node.

Packing is greedy: items by decreasing load, each to the least-loaded pack with room left.
Everything here is NumPy on the host: a placement is computed between steps from the per-layer
expert loads the trainer records (``metrics.jsonl`` ``moe_load``), not inside the step.
Dispatch uses one layer's table as ``parallel.expert_parallel.ExpertPlacement.from_eplb``. A
model takes the whole per-layer placement with ``model.execution.set_expert_placement`` (each
layer of the scanned MoE stack its own row, as traced tables), or one static table for all its
MoE layers (``shared_placement``, via ``Execution.expert_placement``), which balances worse
when the layers' hot experts differ.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def balanced_packing(weights: np.ndarray, n_packs: int) -> tuple[np.ndarray, np.ndarray]:
  """Split the n items of each row of ``weights`` [X, n] into ``n_packs`` packs of n / n_packs
  items, balancing the packs' summed weight. Returns (pack [X, n], rank in pack [X, n]), both
  int64. Raises ValueError when n_packs does not divide n."""
  weights = np.asarray(weights, np.float64)
  rows, n = weights.shape
  if n_packs < 1 or n % n_packs:
    raise ValueError(f"{n} items cannot be split into {n_packs} equal packs")
  size = n // n_packs
  pack = np.zeros((rows, n), np.int64)
  rank = np.zeros((rows, n), np.int64)
  for x in range(rows):
    load = np.zeros(n_packs)
    count = np.zeros(n_packs, np.int64)
    for item in np.argsort(-weights[x], kind="stable"):
      open_packs = np.flatnonzero(count < size)
      target = open_packs[np.argmin(load[open_packs])]
      pack[x, item], rank[x, item] = target, count[target]
      load[target] += weights[x, item]
      count[target] += 1
  return pack, rank


def replicate_experts(weights: np.ndarray, n_physical: int):
  """Replicate the n logical experts of each row of ``weights`` [X, n] into ``n_physical`` >= n
  slots: one replica each, then every extra replica to the expert with the highest load per
  replica. Returns (slot_to_expert [X, P], replica rank [X, P], replica count [X, n]), int64.
  Raises ValueError when n_physical < n."""
  weights = np.asarray(weights, np.float64)
  rows, n = weights.shape
  if n_physical < n:
    raise ValueError(f"{n} experts need at least {n} physical slots, got {n_physical}")
  slot_to_expert = np.tile(np.arange(n, dtype=np.int64), (rows, 1))
  rank = np.zeros((rows, n), np.int64)
  count = np.ones((rows, n), np.int64)
  extra_expert, extra_rank = [], []
  for _ in range(n, n_physical):
    heavy = np.argmax(weights / count, axis=1)
    extra_expert.append(heavy)
    extra_rank.append(count[np.arange(rows), heavy].copy())
    count[np.arange(rows), heavy] += 1
  if extra_expert:
    slot_to_expert = np.concatenate([slot_to_expert, np.stack(extra_expert, 1)], 1)
    rank = np.concatenate([rank, np.stack(extra_rank, 1)], 1)
  return slot_to_expert, rank, count


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where each layer's logical experts live: physical slot p is on shard p // (P / S).

  slot_to_expert [L, P] int64: the logical expert each slot holds.
  expert_slots [L, E, R] int64: the slots of each expert, -1 past its replica count (R = the
    most replicas of any expert).
  replicas [L, E] int64: copies of each expert (>= 1).
  n_shards: S, the shards of the expert axis.
  """

  slot_to_expert: np.ndarray
  expert_slots: np.ndarray
  replicas: np.ndarray
  n_shards: int

  @property
  def n_slots(self) -> int:
    return self.slot_to_expert.shape[1]

  @property
  def n_layers(self) -> int:
    return self.slot_to_expert.shape[0]

  def rows(self, start: int, stop: int) -> "Placement":
    """The placement of layers [start, stop) (e.g. a model's MoE stack, then its MTP modules,
    from the ``moe_load`` rows)."""
    return Placement(self.slot_to_expert[start:stop], self.expert_slots[start:stop],
                     self.replicas[start:stop], self.n_shards)

  def slot_shards(self) -> np.ndarray:
    """[P] the shard of each physical slot."""
    return np.arange(self.n_slots) // (self.n_slots // self.n_shards)

  def shard_loads(self, load: np.ndarray) -> np.ndarray:
    """Tokens per shard [L, S] (float64) for expert loads ``load`` [L, E], each expert's load
    split evenly among its replicas."""
    load = np.asarray(load, np.float64)
    per_slot = np.take_along_axis(load / self.replicas, self.slot_to_expert, axis=1)
    out = np.zeros((load.shape[0], self.n_shards))
    np.add.at(out, (slice(None), self.slot_shards()), per_slot)
    return out

  def imbalance(self, load: np.ndarray) -> np.ndarray:
    """max / mean tokens per shard [L] (1.0 = perfectly even)."""
    shards = self.shard_loads(load)
    return shards.max(1) / np.maximum(shards.mean(1), 1e-12)


def _placement(slot_to_expert: np.ndarray, n_experts: int, n_shards: int) -> Placement:
  layers, slots = slot_to_expert.shape
  replicas = np.zeros((layers, n_experts), np.int64)
  for layer in range(layers):
    replicas[layer] = np.bincount(slot_to_expert[layer], minlength=n_experts)
  expert_slots = np.full((layers, n_experts, int(replicas.max())), -1, np.int64)
  for layer in range(layers):
    filled = np.zeros(n_experts, np.int64)
    for slot, expert in enumerate(slot_to_expert[layer]):
      expert_slots[layer, expert, filled[expert]] = slot
      filled[expert] += 1
  return Placement(slot_to_expert, expert_slots, replicas, n_shards)


def static_placement(n_layers: int, n_experts: int, n_shards: int) -> Placement:
  """Today's fixed arithmetic: expert e on shard e // (E / S), one copy each."""
  if n_shards < 1 or n_experts % n_shards:
    raise ValueError(f"{n_experts} experts cannot be split evenly over {n_shards} shards")
  return _placement(np.tile(np.arange(n_experts, dtype=np.int64), (n_layers, 1)), n_experts,
                    n_shards)


def rebalance_experts(load: np.ndarray, n_slots: int, n_groups: int, n_nodes: int,
                      n_shards: int) -> Placement:
  """EPLB's placement for expert loads ``load`` [L, E] (tokens, or any non-negative weight):
  ``n_slots`` physical slots (E + redundant experts) over ``n_shards`` shards in ``n_nodes``
  nodes; the hierarchical policy when ``n_groups`` (V3's expert groups) is divisible by
  ``n_nodes``, else the global one (one group, one node).

  Raises ValueError, naming the fix, for: fewer slots than experts; slots not divisible by the
  shards; shards not divisible by the nodes; experts not divisible by the groups; a negative
  load."""
  load = np.asarray(load, np.float64)
  if load.ndim != 2:
    raise ValueError(f"expert load must be [layers, experts], got shape {load.shape}")
  layers, experts = load.shape
  if (load < 0).any():
    raise ValueError("expert load must be non-negative (token counts per expert)")
  if n_slots < experts:
    raise ValueError(f"{experts} experts need at least {experts} physical slots, got "
                     f"{n_slots}; the redundant experts come on top of the logical ones")
  if n_shards < 1 or n_slots % n_shards:
    raise ValueError(f"{n_slots} physical slots cannot be split evenly over {n_shards} shards; "
                     "use a multiple of the shard count")
  if n_nodes < 1 or n_shards % n_nodes:
    raise ValueError(f"{n_shards} shards cannot be split evenly over {n_nodes} nodes")
  if n_groups < 1 or experts % n_groups:
    raise ValueError(f"{experts} experts cannot be split into {n_groups} equal groups")
  if n_groups % n_nodes:  # the global policy
    n_groups = n_nodes = 1
  group_size, per_node = experts // n_groups, n_slots // n_nodes
  if per_node < experts // n_nodes:
    raise ValueError(f"each of the {n_nodes} nodes holds {experts // n_nodes} experts but only "
                     f"{per_node} slots; raise the slot count")

  # 1. groups onto nodes
  group_load = load.reshape(layers, n_groups, group_size).sum(-1)
  group_node, group_rank = balanced_packing(group_load, n_nodes)
  # node-major order of the logical experts: node k's groups, in their pack order
  group_position = group_node * (n_groups // n_nodes) + group_rank  # [L, G]
  node_order = (group_position[:, :, None] * group_size
                + np.arange(group_size)[None, None, :]).reshape(layers, experts)
  order_to_expert = np.argsort(node_order, axis=1)  # [L, E]: position -> logical expert
  node_load = np.take_along_axis(load, order_to_expert, axis=1)
  node_load = node_load.reshape(layers * n_nodes, experts // n_nodes)

  # 2. replicas inside each node
  node_slot_expert, _, node_count = replicate_experts(node_load, per_node)  # [L*N, P/N]
  replica_load = np.take_along_axis(node_load / node_count, node_slot_expert, axis=1)

  # 3. replicas onto the node's shards
  shards_per_node = n_shards // n_nodes
  pack, rank = balanced_packing(replica_load, shards_per_node)
  slot_in_node = pack * (per_node // shards_per_node) + rank  # [L*N, P/N]
  placed = np.zeros_like(node_slot_expert)
  np.put_along_axis(placed, slot_in_node, node_slot_expert, axis=1)
  # back to logical ids: node-local index i of node k is position k * E/N + i
  positions = placed.reshape(layers, n_nodes, per_node) + \
      (np.arange(n_nodes) * (experts // n_nodes))[None, :, None]
  slot_to_expert = np.take_along_axis(order_to_expert, positions.reshape(layers, n_slots),
                                      axis=1)
  return _placement(slot_to_expert, experts, n_shards)


def shared_placement(load: np.ndarray, n_slots: int, n_groups: int, n_nodes: int,
                     n_shards: int) -> Placement:
  """One placement for every layer (one static table for the whole scanned MoE stack,
  ``ExpertPlacement.from_eplb(shared, 0)``, or installed per layer): ``rebalance_experts`` on
  the load summed over layers, repeated L times so ``shard_loads`` / ``imbalance`` score it per
  layer. Raises ValueError as ``rebalance_experts`` does."""
  load = np.asarray(load, np.float64)
  if load.ndim != 2:
    raise ValueError(f"expert load must be [layers, experts], got shape {load.shape}")
  one = rebalance_experts(load.sum(0, keepdims=True), n_slots, n_groups, n_nodes, n_shards)
  layers = load.shape[0]
  return Placement(np.repeat(one.slot_to_expert, layers, 0), np.repeat(one.expert_slots, layers, 0),
                   np.repeat(one.replicas, layers, 0), n_shards)
