"""EPLB (deepseek_jax/parallel/eplb.py): greedy packing and replication by hand, the placement's
invariants (every expert placed, slots per shard, replicas inside their group's node), the load
per shard falling on a skewed load, and bad placements refused."""

import numpy as np
import pytest

from deepseek_jax.parallel import eplb


def test_balanced_packing_by_hand():
  pack, rank = eplb.balanced_packing(np.array([[9.0, 1, 5, 5, 3, 1]]), 2)
  # by decreasing load: 9 -> pack 0 (9); 5 -> 1 (5); 5 -> 1 (10); 3 -> 0 (12); the first 1 ->
  # pack 1 (11, now full); the last 1 -> pack 0 (13)
  assert pack.tolist() == [[0, 1, 1, 1, 0, 0]]
  assert rank.tolist() == [[0, 2, 0, 1, 1, 2]]
  with pytest.raises(ValueError, match="6 items cannot be split into 4 equal packs"):
    eplb.balanced_packing(np.ones((1, 6)), 4)


def test_replicas_go_to_the_highest_load_per_replica():
  slot_to_expert, rank, count = eplb.replicate_experts(np.array([[8.0, 1, 3]]), 6)
  # 8 -> 2 copies (4 each) -> 3 copies (2.67) -> then 3 vs 2.67: expert 2 gets one
  assert count.tolist() == [[3, 1, 2]]
  assert slot_to_expert.tolist() == [[0, 1, 2, 0, 0, 2]]
  assert rank.tolist() == [[0, 0, 0, 1, 2, 1]]


def _skewed(layers=4, experts=32, seed=0):
  """Token counts per expert, log-normal (a few experts take several times the mean)."""
  rng = np.random.default_rng(seed)
  return np.round(rng.lognormal(0.0, 1.0, (layers, experts)) * 1000)


@pytest.mark.parametrize("slots, groups, nodes, shards", [
    (32, 4, 2, 8), (40, 4, 2, 8), (48, 8, 4, 8), (48, 4, 1, 8), (40, 3, 2, 4)])
def test_the_placement_keeps_every_expert_and_fills_every_shard_evenly(slots, groups, nodes,
                                                                       shards):
  experts = 32 if groups != 3 else 33
  load = _skewed(experts=experts)
  place = eplb.rebalance_experts(load, slots, groups, nodes, shards)
  assert place.slot_to_expert.shape == (4, slots)
  for layer in range(4):
    assert set(place.slot_to_expert[layer]) == set(range(experts))
    assert place.replicas[layer].sum() == slots
    for expert in range(experts):  # the table and its inverse agree
      where = place.expert_slots[layer, expert]
      where = where[where >= 0]
      assert len(where) == place.replicas[layer, expert]
      assert (place.slot_to_expert[layer, where] == expert).all()
  # the load is conserved, and no shard holds more than P / S slots
  np.testing.assert_allclose(place.shard_loads(load).sum(1), load.sum(1))
  assert np.bincount(place.slot_shards()).tolist() == [slots // shards] * shards
  if groups % nodes == 0 and nodes > 1:  # hierarchical: replicas stay on their group's node
    node_of_slot = place.slot_shards() // (shards // nodes)
    group_size = experts // groups
    for layer in range(4):
      for group in range(groups):
        members = np.isin(place.slot_to_expert[layer],
                          np.arange(group * group_size, (group + 1) * group_size))
        assert len(set(node_of_slot[members])) == 1


def test_rebalancing_lowers_the_load_of_the_busiest_shard():
  load = _skewed()
  static = eplb.static_placement(4, 32, 8).imbalance(load)
  no_redundancy = eplb.rebalance_experts(load, 32, 1, 1, 8).imbalance(load)
  redundant = eplb.rebalance_experts(load, 40, 1, 1, 8).imbalance(load)
  hierarchical = eplb.rebalance_experts(load, 40, 4, 2, 8).imbalance(load)
  # static placement is far from even; packing alone helps, redundant experts help more; the
  # hierarchical policy (replicas kept on their group's node) lies in between
  assert (static > 1.4).all(), static
  assert (no_redundancy < static).all(), no_redundancy
  assert (redundant < no_redundancy).all() and (redundant < 1.1).all(), redundant
  assert (hierarchical < static).all(), hierarchical


def test_bad_placements_are_refused():
  load = _skewed()
  for args, message in [((16, 1, 1, 8), "32 experts need at least 32 physical slots"),
                        ((36, 1, 1, 8), "36 physical slots cannot be split evenly over 8"),
                        ((32, 1, 3, 8), "8 shards cannot be split evenly over 3 nodes"),
                        ((32, 5, 1, 8), "32 experts cannot be split into 5 equal groups")]:
    with pytest.raises(ValueError, match=message):
      eplb.rebalance_experts(load, *args)
  with pytest.raises(ValueError, match="non-negative"):
    eplb.rebalance_experts(-load, 32, 1, 1, 8)
  with pytest.raises(ValueError, match="32 experts cannot be split evenly over 5 shards"):
    eplb.static_placement(4, 32, 5)


def test_shared_placement_is_one_table_balanced_on_the_summed_load():
  load = _skewed()
  shared = eplb.shared_placement(load, 40, 1, 1, 8)
  one = eplb.rebalance_experts(load.sum(0, keepdims=True), 40, 1, 1, 8)
  assert (shared.slot_to_expert == one.slot_to_expert).all()  # every layer: the same table
  assert shared.slot_to_expert.shape == (4, 40) and shared.replicas.shape == (4, 32)
  np.testing.assert_allclose(shared.imbalance(load),  # each layer scored under that table
                             [one.imbalance(load[layer:layer + 1])[0] for layer in range(4)])
  # per-layer tables fit each layer at least as well as one table for all
  per_layer = eplb.rebalance_experts(load, 40, 1, 1, 8).imbalance(load)
  assert per_layer.mean() <= shared.imbalance(load).mean()
