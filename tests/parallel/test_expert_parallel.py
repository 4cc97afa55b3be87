"""Expert parallelism on 8 fake CPU devices: the layer over a mesh equals the single-device layer.

The reference for V2 capacity dropping is the single-device layer applied to each expert-parallel
group's tokens (the tokens that are dispatched together); dropless, it is one call on the whole
batch. Exchanges: "padded" (all_to_all, CPU's default) and "ragged" (ragged_all_to_all's exact
semantics, emulated on CPU).
"""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.model import moe as M
from deepseek_jax.parallel import expert_parallel as EP
from deepseek_jax.parallel.mesh import make_mesh

N_EXPERTS, D, B, T = 16, 16, 8, 6
# V3 node-limited: 8 groups of 2 experts, 4 kept, top-4 (sigmoid, top-2-sum group score).
V3 = M.RoutingSpec(top_k=4, score_func="sigmoid", n_groups=8, n_limited_groups=4,
                   group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5)
# V2 device-limited: groups = 8 devices, M = 2 kept, top-4 (softmax, max group score).
V2 = M.RoutingSpec(top_k=4, score_func="softmax", n_groups=8, n_limited_groups=2,
                   group_score="max", norm_topk_prob=False, routed_scaling_factor=16.0)
# No group limit: a token may reach min(K, P) shards.
FREE = M.RoutingSpec(top_k=3, score_func="sigmoid", n_groups=1, n_limited_groups=1)

MESHES = {"ep2_data4": {"expert": 2, "data": 4}, "ep4_fsdp2": {"expert": 4, "fsdp": 2},
          "ep8": {"expert": 8}, "ep2_fsdp2_tensor2": {"expert": 2, "fsdp": 2, "tensor": 2}}


def _layer(routing=V3, capacity_factor=None, exchange="padded", buffer_factor=None, load=None,
           impl="auto"):
  layer = M.MoE(D, M.ExpertSpec(N_EXPERTS, 1, 8), routing=routing,
                balance=M.BalanceSpec(router_bias=True, scope="batch", expert_coef=1e-2,
                                      device_coef=1e-2, comm_coef=1e-2),
                dispatch=M.DispatchSpec(capacity_factor=capacity_factor, grouped_matmul=impl,
                                        exchange=exchange, buffer_factor=buffer_factor),
                init_std=0.3, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0))
  if load == "one_expert_gets_all":  # every token picks expert 5: one shard receives everything
    layer.router_bias[...] = jnp.zeros(N_EXPERTS).at[5].set(100.0)
  elif load == "empty_experts":  # only experts 0-3 are ever chosen; most shards get nothing
    layer.router_bias[...] = jnp.where(jnp.arange(N_EXPERTS) < 4, 100.0, 0.0)
  return layer


def _inputs(seed=4):
  x = jax.random.normal(jax.random.key(seed), (B, T, D))
  mask = jnp.ones((B, T)).at[1, 3:].set(0.0).at[6, 1:].set(0.0)  # padding on two shards
  return x, mask


_WEIGHT = jnp.cos(jnp.arange(float(D)))


def _step(layer):
  """jit(value_and_grad) of sum(y * w) w.r.t. (params, x); returns (y, stats), grads."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x, mask):
    y, stats = nnx.merge(graphdef, params, rest)(x, mask)
    return (y * _WEIGHT).sum(), (y, stats)

  step = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
  return lambda x, mask: step(params, x, mask)


def _expert_parallel(layer):
  """A copy of the layer with expert-parallel dispatch (chosen explicitly, as the model's
  execution does for a mesh whose expert axis is > 1)."""
  layer = nnx.clone(layer)
  layer.dispatch = dataclasses.replace(layer.dispatch, mode="expert_parallel")
  return layer


def _run(layer, x, mask, mesh_shape=None):
  """(y, stats, grads), compiled, optionally under a mesh (expert-parallel if it has an expert
  axis)."""
  if mesh_shape is None:
    (_, (y, stats)), grads = _step(layer)(x, mask)
  else:
    if mesh_shape.get("expert", 1) > 1:
      layer = _expert_parallel(layer)
    with jax.set_mesh(make_mesh(mesh_shape)):
      (_, (y, stats)), grads = _step(layer)(x, mask)
  return y, stats, grads


def _reference(layer, x, mask, mesh_shape):
  """Single-device layer per expert-parallel group (V2 dropping), or on the whole batch.
  Returns y, dropped, grads and (for one group) the stats."""
  n_groups = 1
  if layer.capacity_factor is not None:
    n_groups = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
  rows, step = B // n_groups, _step(layer)
  parts = [step(x[g * rows:(g + 1) * rows], mask[g * rows:(g + 1) * rows])
           for g in range(n_groups)]
  y = jnp.concatenate([p[0][1][0] for p in parts])
  dropped = sum(float(p[0][1][1]["dropped"]) for p in parts)
  grad_params = jax.tree.map(lambda *g: sum(g), *[p[1][0] for p in parts])
  grad_x = jnp.concatenate([p[1][1] for p in parts])
  return y, dropped, (grad_params, grad_x), parts[0][0][1][1] if n_groups == 1 else None


def _assert_close(got, want, atol=2e-5):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=atol, rtol=2e-5)


CASES = [  # (mesh, routing, capacity factor, exchange, load)
    ("ep2_data4", V3, None, "padded", None),
    ("ep4_fsdp2", V3, None, "ragged", None),
    ("ep8", V3, None, "padded", None),
    ("ep8", V2, None, "ragged", None),
    ("ep2_fsdp2_tensor2", V3, None, "padded", None),
    ("ep4_fsdp2", FREE, None, "padded", "one_expert_gets_all"),
    ("ep8", V3, None, "ragged", "one_expert_gets_all"),
    ("ep8", V3, None, "padded", "empty_experts"),
    ("ep2_data4", V2, 1.0, "padded", None),
    ("ep4_fsdp2", V2, 1.0, "ragged", "one_expert_gets_all"),
    ("ep8", V2, 1.0, "padded", "empty_experts"),
    ("ep8", V3, 0.5, "ragged", None),
    ("ep2_fsdp2_tensor2", V2, 1.0, "ragged", "one_expert_gets_all"),
]


@pytest.mark.parametrize("mesh,routing,capacity_factor,exchange,load", CASES,
                         ids=[f"{c[0]}-{'v3' if c[1] is V3 else 'v2' if c[1] is V2 else 'free'}-"
                              f"{'dropless' if c[2] is None else f'cf{c[2]}'}-{c[3]}-{c[4] or 'random'}"
                              for c in CASES])
def test_expert_parallel_equals_single_device_outputs_gradients_and_stats(
    mesh, routing, capacity_factor, exchange, load):
  layer = _layer(routing, capacity_factor, exchange, load=load)
  x, mask = _inputs()
  y, stats, grads = _run(layer, x, mask, MESHES[mesh])
  y_ref, dropped_ref, grads_ref, stats_ref = _reference(layer, x, mask, MESHES[mesh])
  _assert_close(y, y_ref)
  _assert_close(grads, grads_ref, atol=5e-5)
  assert float(stats["overflow"]) == 0  # the default buffer is the worst case
  assert float(stats["dropped"]) == dropped_ref
  if capacity_factor is not None and load is not None:
    assert dropped_ref > 0  # the extreme loads overflow V2's capacity
  if stats_ref is not None:  # global statistics: load and (batch-scope) balance terms
    for name in ("load", "assignments", "expert_balance", "device_balance", "comm_balance"):
      np.testing.assert_allclose(stats[name], stats_ref[name], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "cf1.0"])
def test_pallas_grouped_matmul_runs_expert_parallel(capacity_factor):
  # megablox (TPU's kernel, Pallas interpret mode here) has no shard_map varying-axes typing:
  # the layer turns check_vma off for it, and the gradients must still be summed correctly.
  layer = _layer(V2, capacity_factor, exchange="ragged", impl="megablox")
  x, mask = _inputs()
  y, stats, grads = _run(layer, x, mask, MESHES["ep4_fsdp2"])
  y_ref, dropped_ref, grads_ref, _ = _reference(layer, x, mask, MESHES["ep4_fsdp2"])
  _assert_close(y, y_ref)
  _assert_close(grads, grads_ref, atol=5e-5)
  assert float(stats["dropped"]) == dropped_ref


def _routing_shards(layer, x, n_shards):
  """[B*T, K] on the host: the shard of each token's top-k experts."""
  routing = M.route(x.reshape(-1, D) @ layer.gate[...], layer.router_bias[...], layer.routing)
  return np.asarray(routing.experts) // (N_EXPERTS // n_shards)


def _shards_per_token(layer, x, n_shards):
  """[B*T, P] bool: which shards each token's experts live on."""
  shards = _routing_shards(layer, x, n_shards)
  return np.stack([(shards == p).any(-1) for p in range(n_shards)], -1)


@pytest.mark.parametrize("routing,n_shards,bound", [(V2, 8, 2), (V3, 8, 4), (V3, 4, 4),
                                                    (FREE, 8, 3)], ids=["v2", "v3", "v3_ep4", "free"])
def test_dispatch_rows_per_token_are_distinct_shards_and_within_the_routing_bound(
    routing, n_shards, bound):
  assert EP.max_shards_per_token(N_EXPERTS, n_shards, routing.n_groups,
                                 routing.n_limited_groups, routing.top_k) == bound
  layer = _layer(routing)
  x, mask = _inputs(seed=7)
  _, stats, _ = _run(layer, x, mask, {"expert": n_shards, "data": 8 // n_shards})
  sent = _shards_per_token(layer, x, n_shards)  # one row per (token, shard): de-duplicated
  assert float(stats["dispatch_per_token"]) == pytest.approx(sent.sum(1).mean())
  assert sent.sum(1).max() <= bound
  # rows that stay on their own shard are not remote
  local_shard = (np.arange(B * T) // (B * T // 8)) % n_shards
  remote = sent.sum() - sent[np.arange(B * T), local_shard].sum()
  assert float(stats["remote_per_token"]) == pytest.approx(remote / (B * T))


def test_group_limit_bounds_shards_per_token_for_v3_nodes_spanning_shards():
  # 8 groups of 32 experts on 64 shards (V3: a node of 8 GPUs per group), 4 groups kept.
  assert EP.max_shards_per_token(256, 64, 8, 4, 8) == 8  # K binds: 4 nodes x 8 GPUs > 8
  assert EP.max_shards_per_token(256, 64, 8, 1, 8) == 8
  assert EP.max_shards_per_token(160, 8, 8, 3, 6) == 3  # V2: M = 3 devices
  assert EP.max_shards_per_token(64, 16, 4, 1, 6) == 4  # one node of 4 shards


def _expected_overflow(slots_on, n_shards, tokens_per_shard, sizes, exchange, max_slots):
  """Top-k slots lost in one expert-parallel group, simulated on the host.

  slots_on [P*T, P]: how many of each token's slots live on each shard. Each sender's chunk for
  shard p lists its tokens in order; padded keeps the first C rows of every chunk, ragged lands
  chunks in sender order until the receive buffer is full; a receiver computes <= max_slots."""
  lost = 0
  for p in range(n_shards):
    landed, received_slots = 0, 0
    for s in range(n_shards):
      chunk = slots_on[s * tokens_per_shard:(s + 1) * tokens_per_shard, p]
      chunk = chunk[chunk > 0]
      room = sizes.peer if exchange == "padded" else max(sizes.recv - landed, 0)
      landed += len(chunk)
      lost += chunk[room:].sum()
      received_slots += chunk[:room].sum()
    lost += max(received_slots - max_slots, 0)
  return lost


@pytest.mark.parametrize("exchange", ["padded", "ragged"])
def test_small_buffer_counts_exactly_the_slots_it_could_not_carry(exchange):
  factor, n_shards, top_k = 0.5, 4, V3.top_k
  layer = _layer(V3, exchange=exchange, buffer_factor=factor, load="one_expert_gets_all")
  x, mask = _inputs()
  y, stats, _ = _run(layer, x, mask, {"expert": n_shards, "data": 2})
  shards = _routing_shards(layer, x, n_shards)  # [N, K]
  slots_on = np.stack([(shards == p).sum(-1) for p in range(n_shards)], -1)
  tokens_per_shard = B * T // 8
  bound = EP.max_shards_per_token(N_EXPERTS, n_shards, V3.n_groups, V3.n_limited_groups, top_k)
  sizes = EP.buffer_sizes(tokens_per_shard, n_shards, bound, factor, exchange)
  max_slots = min(sizes.recv * min(top_k, N_EXPERTS // n_shards),
                  int(np.ceil(factor * tokens_per_shard * top_k)))
  group = n_shards * tokens_per_shard
  expected = sum(_expected_overflow(slots_on[g * group:(g + 1) * group], n_shards,
                                    tokens_per_shard, sizes, exchange, max_slots)
                 for g in range(2))
  assert expected > 0
  assert float(stats["overflow"]) == expected  # never silent
  y_ref = _run(layer, x, mask)[0]
  assert float(jnp.abs(y - y_ref).max()) > 1e-3


def test_balanced_buffer_factor_keeps_a_random_load_exact():
  layer = _layer(V3, buffer_factor=3.0)
  x, mask = _inputs()
  y, stats, _ = _run(layer, x, mask, MESHES["ep4_fsdp2"])
  assert float(stats["overflow"]) == 0
  _assert_close(y, _run(layer, x, mask)[0])


def test_capacity_mode_needs_groups_on_single_shards():
  layer = _layer(M.RoutingSpec(top_k=2, n_groups=4, n_limited_groups=2), capacity_factor=1.0)
  x, mask = _inputs()
  with pytest.raises(ValueError, match="n_expert_groups=4 .* multiple of the mesh's expert axis"):
    _run(layer, x, mask, MESHES["ep8"])


def test_expert_count_must_divide_over_the_expert_axis():
  layer = M.MoE(D, M.ExpertSpec(12, 0, 8), routing=FREE, balance=M.BalanceSpec(scope="batch"),
                init_std=0.3, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0))
  x, mask = _inputs()
  with pytest.raises(ValueError, match="n_routed_experts=12 must be divisible by the mesh's "
                                       "expert axis \\(8\\)"):
    _run(layer, x, mask, MESHES["ep8"])


def test_emulated_ragged_all_to_all_follows_the_documented_example():
  # jax.lax.ragged_all_to_all's docstring example, on an axis of size 2.
  mesh = make_mesh({"expert": 2, "data": 4})
  operand = jnp.array([[1, 2, 2, 0], [3, 4, 0, 0]] * 4, jnp.float32).reshape(8, 4)[:, :3]
  args = (jnp.zeros((8, 4)), jnp.array([[0, 1], [0, 1]] * 4),  # output, input_offsets
          jnp.array([[1, 2], [1, 1]] * 4), jnp.array([[0, 0], [1, 2]] * 4),  # send, out offsets
          jnp.array([[1, 1], [2, 1]] * 4))  # recv_sizes
  spec = jax.sharding.PartitionSpec(("data", "expert"))

  def body(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
    return EP._emulated_ragged_all_to_all(operand[0], output[0], input_offsets[0], send_sizes[0],
                                          output_offsets[0], recv_sizes[0],
                                          axis_name="expert")[None]

  out = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec)(operand, *args)
  np.testing.assert_array_equal(out[:2], [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_no_expert_axis_runs_the_single_device_path():
  layer = _layer(V3)
  x, mask = _inputs()
  y, stats, _ = _run(layer, x, mask, {"data": 8})
  assert "dispatch_per_token" not in stats
  _assert_close(y, _run(layer, x, mask)[0])
  counts = collections.Counter(EP.resolve_exchange(e) for e in ("auto", "padded"))
  assert counts == {"padded": 2}  # CPU: XLA:CPU has no ragged_all_to_all


@pytest.mark.parametrize("routing,capacity_factor,exchange", [(V3, None, "padded"),
                                                              (V2, 1.0, "ragged")],
                         ids=["v3-dropless-padded", "v2-cf1.0-ragged"])
def test_dispatch_reads_the_expert_placement_table(routing, capacity_factor, exchange):
  """A permuted expert -> shard table computes exactly what the identity does (outputs,
  gradients in the original expert order, drops), and really moves the experts: the rows
  each shard receives change."""
  layer = _layer(routing, capacity_factor, exchange)
  x, mask = _inputs()
  rng = np.random.default_rng(0)
  if capacity_factor is None:
    permutation = tuple(int(i) for i in rng.permutation(N_EXPERTS))
  else:  # V2 capacity treats a group as a device: move whole groups (2 experts each)
    slots = np.arange(N_EXPERTS).reshape(8, 2)[rng.permutation(8)][:, ::-1]
    permutation = tuple(int(i) for i in np.argsort(slots.reshape(-1)))
  placed = nnx.clone(layer)
  placed.dispatch = dataclasses.replace(placed.dispatch,
                                        placement=EP.ExpertPlacement(permutation))
  y_ref, stats_ref, grads_ref = _run(layer, x, mask, MESHES["ep4_fsdp2"])
  y, stats, grads = _run(placed, x, mask, MESHES["ep4_fsdp2"])
  _assert_close(y, y_ref)
  _assert_close(grads, grads_ref, atol=5e-5)
  assert float(stats["dropped"]) == float(stats_ref["dropped"])
  assert EP.ExpertPlacement(permutation).shard_of(4).tolist() != (np.arange(N_EXPERTS) // 4).tolist()
  with pytest.raises(ValueError, match="permutation"):
    EP.ExpertPlacement((0, 0, 1, 2))
  if capacity_factor is not None:  # a group split over two shards cannot be one V2 device
    split = nnx.clone(layer)
    split.dispatch = dataclasses.replace(split.dispatch, placement=EP.ExpertPlacement(
        tuple(range(1, N_EXPERTS)) + (0,)))
    with pytest.raises(ValueError, match="place each group's experts together"):
      _run(split, x, mask, MESHES["ep4_fsdp2"])
