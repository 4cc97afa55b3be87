"""Redundant experts (EPLB) in expert-parallel dispatch, on 8 fake CPU devices: with a skewed
routing, an EPLB placement (replicas of the busy experts spread over the shards) computes what
the identity placement computes (outputs, gradients w.r.t. the logical expert weights and the
input), for the padded exchange and the ragged emulation; the top-k slots per expert shard,
counted by the real dispatch, even out; bad placements fail in one line before compiling.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.model import moe as M
from deepseek_jax.parallel import eplb
from deepseek_jax.parallel import expert_parallel as EP
from deepseek_jax.parallel.mesh import make_mesh

N_EXPERTS, D, F, B, T = 16, 8, 4, 8, 4
N_SHARDS, N_SLOTS = 4, 24  # 6 slots per shard: 8 redundant experts
MESH = {"expert": N_SHARDS, "data": 2}
# V3 node-limited: 8 groups of 2 experts, 2 kept, top-4. Replicas let a group's experts sit on
# several shards, so a token may reach more shards than with the identity (2 -> 4).
V3 = M.RoutingSpec(top_k=4, score_func="sigmoid", n_groups=8, n_limited_groups=2,
                   group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5)
FREE = M.RoutingSpec(top_k=2, score_func="sigmoid", n_groups=1, n_limited_groups=1)
# Skew: experts 0-2 (all on shard 0 under the identity) take most of the load.
SKEW = jnp.zeros(N_EXPERTS).at[:3].set(jnp.array([0.6, 0.45, 0.3]))
_WEIGHT = jnp.cos(jnp.arange(float(D)))


def _layer(routing, exchange, placement=None, tensor_split=False):
  layer = M.MoE(D, M.ExpertSpec(N_EXPERTS, 1, F), routing=routing,
                balance=M.BalanceSpec(router_bias=True, scope="batch"),
                dispatch=M.DispatchSpec(mode="expert_parallel", exchange=exchange,
                                        placement=placement),
                init_std=0.3, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0))
  layer.router_bias[...] = SKEW
  return layer


def _with_placement(layer, placement):
  layer = nnx.clone(layer)
  layer.dispatch = dataclasses.replace(layer.dispatch, placement=placement)
  return layer


def _run(layer, mesh_shape=MESH, seed=3):
  """(y, stats, grads w.r.t. (params, x)) of sum(y * w), jitted under the mesh."""
  x = jax.random.normal(jax.random.key(seed), (B, T, D))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    y, stats = nnx.merge(graphdef, params, rest)(x)
    return (y * _WEIGHT).sum(), (y, stats)

  with jax.set_mesh(make_mesh(mesh_shape)):
    (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
  return y, stats, grads


def _eplb_placement(load, routing, n_shards=N_SHARDS, n_slots=N_SLOTS):
  """EPLB's table for the measured per-expert load [E] (one layer)."""
  placement = eplb.rebalance_experts(np.asarray(load)[None], n_slots, routing.n_groups, 1,
                                     n_shards)
  return EP.ExpertPlacement.from_eplb(placement, 0)


def _max_over_mean(shard_load):
  shard_load = np.asarray(shard_load, np.float64)
  return shard_load.max() / shard_load.mean()


def _assert_close(got, want, atol):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=atol, rtol=2e-5)


CASES = [("v3", V3, "padded", MESH), ("v3", V3, "ragged", MESH),
         ("free", FREE, "padded", {"expert": N_SHARDS, "tensor": 2}),
         ("free", FREE, "ragged", MESH)]


@pytest.mark.parametrize("name,routing,exchange,mesh", CASES,
                         ids=[f"{c[0]}-{c[2]}-{'tensor2' if 'tensor' in c[3] else 'data2'}"
                              for c in CASES])
def test_redundant_experts_compute_what_the_identity_computes_and_even_the_shards(
    name, routing, exchange, mesh):
  static = _layer(routing, exchange)
  y_ref, stats_ref, grads_ref = _run(static, mesh)
  load = np.asarray(stats_ref["load"])
  placement = _eplb_placement(load, routing)
  assert placement.is_redundant and placement.n_slots == N_SLOTS
  busy = int(np.argmax(load))
  assert placement.replicas()[busy] > 1  # the busiest expert really is replicated

  y, stats, grads = _run(_with_placement(static, placement), mesh)
  # (a) the same function: outputs, gradients w.r.t. the logical [E, ...] weights and x
  for stat in (stats, stats_ref):
    assert float(stat["overflow"]) == 0  # worst-case buffers, sized for the reachable shards
  _assert_close(y, y_ref, 2e-5)
  _assert_close(grads, grads_ref, 5e-5)
  assert grads[0]["w_gate"][...].shape == (N_EXPERTS, D, F)
  # the recorded load stays per logical expert
  np.testing.assert_array_equal(stats["load"], stats_ref["load"])
  assert stats["load"].shape == (N_EXPERTS,)

  # (b) the per-shard load of the real dispatch falls
  n_slots_total = B * T * routing.top_k
  for stat in (stats, stats_ref):
    assert float(stat["shard_load"].sum()) == n_slots_total
  np.testing.assert_array_equal(stats_ref["shard_load"],
                                load.reshape(N_SHARDS, -1).sum(1))  # identity: by arithmetic
  before, after = _max_over_mean(stats_ref["shard_load"]), _max_over_mean(stats["shard_load"])
  predicted = float(eplb.rebalance_experts(load[None], N_SLOTS, routing.n_groups, 1,
                                           N_SHARDS).imbalance(load[None])[0])
  print(f"\n{name}/{exchange}: slots per shard static {stats_ref['shard_load'].tolist()} "
        f"(max/mean {before:.3f}) -> EPLB {stats['shard_load'].tolist()} "
        f"(max/mean {after:.3f}; EPLB's own estimate {predicted:.3f})")
  assert before > 1.5, before  # the routing really is skewed
  assert after < before
  # round robin splits each expert's load over its replicas about as EPLB assumes
  assert after <= predicted + 0.15, (after, predicted)


def test_round_robin_splits_an_experts_assignments_evenly_over_its_replicas():
  # Expert 0 in the first slot of each of the 4 shards (5 slots each); every token picks it
  # alone (top-1): 32 assignments, 8 per replica, whichever shard the tokens sit on.
  slots = [e for p in range(N_SHARDS) for e in [0] + list(range(1 + 4 * p, 5 + 4 * p))]
  placement = EP.ExpertPlacement.from_slots([min(e, N_EXPERTS - 1) for e in slots], N_EXPERTS)
  assert placement.replicas()[0] == 4
  layer = _layer(M.RoutingSpec(top_k=1, score_func="sigmoid"), "padded", placement)
  layer.router_bias[...] = jnp.zeros(N_EXPERTS).at[0].set(100.0)
  _, stats, _ = _run(layer)
  assert np.asarray(stats["load"])[0] == B * T
  assert np.asarray(stats["shard_load"]).tolist() == [B * T // N_SHARDS] * N_SHARDS


def test_replicas_raise_the_bound_on_shards_per_token():
  identity = EP.max_shards_per_token(N_EXPERTS, N_SHARDS, 8, 2, 4)
  # shard p holds experts 4p..4p+3 and a replica of experts 0 and 1 (group 0): a token that
  # keeps group 0 and another group may now reach every shard
  slots = [e for p in range(N_SHARDS) for e in list(range(4 * p, 4 * p + 4)) + [0, 1]]
  placement = EP.ExpertPlacement.from_slots(slots, N_EXPERTS)
  spread = EP.max_shards_per_token(N_EXPERTS, N_SHARDS, 8, 2, 4, placement)
  assert (identity, spread) == (2, 4)
  assert placement.group_shards(N_SHARDS, 8)[0] == {0, 1, 2, 3}


def test_placement_tables_and_the_permutation_api():
  static = EP.ExpertPlacement.from_eplb(eplb.static_placement(2, N_EXPERTS, N_SHARDS), 1)
  assert static.is_identity and not static.is_redundant
  assert static.slot_experts == EP.ExpertPlacement.identity(N_EXPERTS).slot_experts
  assert static.n_shards == N_SHARDS
  perm = EP.ExpertPlacement((2, 0, 1, 3))
  assert perm.slot_of_expert == (2, 0, 1, 3) and perm.expert_of_slot().tolist() == [1, 2, 0, 3]
  assert perm.shard_of(2).tolist() == [1, 0, 0, 1]
  red = EP.ExpertPlacement.from_slots((1, 0, 2, 0, 3, 0), 4)
  assert red.slot_of_expert == (1, 0, 2, 4) and red.replicas().tolist() == [3, 1, 1, 1]
  assert red.expert_slots().tolist() == [[1, 3, 5], [0, 0, 0], [2, 2, 2], [4, 4, 4]]
  assert red.slot_shards(3).tolist() == [0, 0, 1, 1, 2, 2]
  hash(red)  # static: a field of the layer's graphdef


def test_bad_placements_fail_in_one_line():
  for kwargs, message in [
      (dict(slot_experts=(0, 1, 2, 16), n_experts=16), "slot 3 names expert 16, outside"),
      (dict(slot_experts=(0, 1, 2, 2), n_experts=4), r"expert\(s\) \[3\] have no slot"),
      (dict(slot_experts=(0, 1, 2, 3, 0, 1), n_experts=4, n_shards=4),
       "6 slots cannot be split evenly over 4 expert shards"),
      (dict(slot_of_expert=(0, 0, 1, 2)), "permutation"),
      (dict(), "either slot_of_expert"),
  ]:
    with pytest.raises(ValueError, match=message):
      EP.ExpertPlacement(**kwargs)

  load = np.arange(1.0, N_EXPERTS + 1)[None]
  good = eplb.rebalance_experts(load, N_SLOTS, 1, 1, N_SHARDS)
  with pytest.raises(ValueError, match="has 1 layers, asked for layer 1"):
    EP.ExpertPlacement.from_eplb(good, 1)
  too_many = dataclasses.replace(good, replicas=good.replicas + 1)  # replicas exceed the slots
  with pytest.raises(ValueError, match="40 replicas .* for its 24 slots"):
    EP.ExpertPlacement.from_eplb(too_many, 0)

  # at dispatch, before compiling: wrong expert count, slots the expert axis does not divide,
  # a table balanced for another expert axis, V2 capacity with a group's replicas split
  for placement, message in [
      (EP.ExpertPlacement.identity(8), "covers 8 experts, the layer has 16"),
      (EP.ExpertPlacement.from_slots(tuple(range(N_EXPERTS)) + (0, 1), N_EXPERTS),
       r"18 slots, not divisible by the mesh's expert axis \(4\)"),
      (EP.ExpertPlacement.from_eplb(eplb.rebalance_experts(load, 32, 1, 1, 8), 0),
       "balanced for 8 expert shards, the mesh's expert axis has 4"),
  ]:
    with pytest.raises(ValueError, match=message):
      _run(_layer(FREE, "padded", placement))
  v2 = M.RoutingSpec(top_k=2, score_func="softmax", n_groups=4, n_limited_groups=2,
                     group_score="max", norm_topk_prob=False)
  layer = _layer(v2, "padded", EP.ExpertPlacement.from_eplb(good, 0))
  layer.dispatch = dataclasses.replace(layer.dispatch, capacity_factor=1.0)
  with pytest.raises(ValueError, match="place each group's experts together"):
    _run(layer)
