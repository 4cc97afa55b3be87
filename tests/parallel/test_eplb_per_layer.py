"""Per-layer EPLB tables in the scanned MoE stack, on 8 fake CPU devices: the tiny model with
three MoE layers whose router biases make different experts hot in each layer. With each
layer's own table (``set_expert_placement``: traced int32 tables the layer scan slices) the
model computes what the identity placement computes (logits, gradients w.r.t. the logical
expert weights); the top-k slots per expert shard, counted by the real dispatch, even out
better than with one table shared by all layers; bad tables fail in one line before compiling.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import moe as M
from deepseek_jax.model.execution import resolve_execution, set_expert_placement
from deepseek_jax.model.transformer import abstract_model, create_model
from deepseek_jax.parallel import eplb
from deepseek_jax.parallel import expert_parallel as EP
from deepseek_jax.parallel.mesh import make_mesh

MESH = {"expert": 4, "data": 2}
N_SHARDS, N_SLOTS = 4, 12  # 3 slots per shard: 4 redundant experts per layer
# 3 MoE layers (no dense stack), 8 experts in 4 groups (2 kept), top-2, no MTP.
CFG = ModelConfig.preset("tiny", n_layers=3, n_dense_layers=0, n_mtp_modules=0)
# Hot experts per layer, all on one shard under the identity (expert e on shard e // 2), but a
# different shard in each layer: a table balanced on the summed load cannot suit them all.
HOT = [(0, 1), (6, 7), (2, 3)]
B, T = 8, 8


def _skewed_model():
  model = create_model(CFG, 0, execution=resolve_execution(CFG, make_mesh(MESH)))
  bias = np.zeros((CFG.n_moe_layers, CFG.n_routed_experts), np.float32)
  for layer, hot in enumerate(HOT):
    bias[layer, list(hot)] = [0.05, 0.033]  # about 2.5x the mean load, not all of it
  model.moe_layers.ffn.router_bias[...] = jnp.asarray(bias)
  return model


_WEIGHT = jnp.cos(jnp.arange(float(CFG.vocab_size)))


def _run(model):
  """(logits, stacked MoE stats, grads w.r.t. the parameters) of sum(logits * w), jitted."""
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, CFG.vocab_size)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    out = nnx.merge(graphdef, params, rest)(tokens)
    return (out.logits * _WEIGHT).sum(), (out.logits, out.moe_stats)

  with jax.set_mesh(make_mesh(MESH)):
    (_, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, stats, grads


def _max_over_mean(shard_load):
  """[L] max / mean slots per expert shard of each layer."""
  shard_load = np.asarray(shard_load, np.float64)
  return shard_load.max(-1) / shard_load.mean(-1)


@pytest.fixture(scope="module")
def identity_run():
  model = _skewed_model()
  return model, _run(model)


def test_per_layer_tables_compute_what_the_identity_computes_and_beat_a_shared_table(
    identity_run):
  model, (logits_ref, stats_ref, grads_ref) = identity_run
  load = np.asarray(stats_ref["load"])  # [L, E]
  assert load.shape == (CFG.n_moe_layers, CFG.n_routed_experts)
  per_layer = eplb.rebalance_experts(load, N_SLOTS, CFG.n_expert_groups, 1, N_SHARDS)
  shared = eplb.shared_placement(load, N_SLOTS, CFG.n_expert_groups, 1, N_SHARDS)
  for layer, hot in enumerate(HOT):  # each layer replicates its own hot experts
    assert set(np.argsort(-load[layer])[:2]) == set(hot)
    assert (per_layer.replicas[layer, list(hot)] > 1).all()

  runs = {}
  for name, placement in [("per-layer", per_layer), ("shared", shared)]:
    installed = set_expert_placement(nnx.clone(model), placement, make_mesh(MESH))
    table = installed.moe_layers.ffn.placement_table
    assert table.slot_experts.shape == (CFG.n_moe_layers, N_SLOTS)  # [L, E'], scanned
    runs[name] = _run(installed)

  # (a) the same function as the identity: logits, gradients w.r.t. the logical weights
  logits, stats, grads = runs["per-layer"]
  np.testing.assert_allclose(logits, logits_ref, atol=2e-5, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=2e-5)
  assert grads["moe_layers"]["ffn"]["w_gate"][...].shape[:2] == (CFG.n_moe_layers,
                                                                 CFG.n_routed_experts)
  np.testing.assert_array_equal(stats["load"], stats_ref["load"])
  for s in (stats, stats_ref, runs["shared"][1]):
    assert float(s["overflow"].sum()) == 0
    np.testing.assert_array_equal(np.asarray(s["shard_load"]).sum(-1),
                                  B * T * CFG.n_activated_experts)

  # (b) per-layer tables even the real dispatch's shard loads more than one shared table
  static = _max_over_mean(stats_ref["shard_load"])
  own, one = (_max_over_mean(runs[n][1]["shard_load"]) for n in ("per-layer", "shared"))
  print(f"\nmax/mean slots per expert shard, per layer: identity {np.round(static, 3)}, "
        f"shared EPLB table {np.round(one, 3)}, per-layer EPLB tables {np.round(own, 3)}; "
        f"EPLB's own estimates shared {np.round(shared.imbalance(load), 3)}, per layer "
        f"{np.round(per_layer.imbalance(load), 3)}")
  for name in ("per-layer", "shared"):
    print(f"{name} slots per shard: {np.asarray(runs[name][1]['shard_load']).tolist()}")
  print(f"expert load per layer: {load.astype(int).tolist()}")
  assert static.min() > 1.5  # every layer really is skewed
  assert own.mean() < one.mean() < static.mean()
  assert own.max() < min(1.15, one.max())
  # round robin splits each expert's load over its replicas about as EPLB assumes
  assert (own <= per_layer.imbalance(load) + 0.1).all()


def test_tables_are_state_only_when_installed():
  model = abstract_model(CFG, resolve_execution(CFG, make_mesh(MESH)))
  before = jax.tree.structure(nnx.state(model))
  assert model.moe_layers.ffn.placement_table is None
  load = np.arange(1.0, 1 + CFG.n_moe_layers * 8).reshape(CFG.n_moe_layers, 8)
  set_expert_placement(model, eplb.rebalance_experts(load, N_SLOTS, 4, 1, N_SHARDS))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  assert "placement_table" not in params["moe_layers"]["ffn"]  # not trained
  assert rest["moe_layers"]["ffn"]["placement_table"]["replicas"][...].dtype == jnp.int32
  set_expert_placement(model, None)
  assert jax.tree.structure(nnx.state(model)) == before

  # MTP modules take the rows after the stack's, one each (the trainer's moe_load order)
  cfg = CFG.replace(n_mtp_modules=1)
  model = abstract_model(cfg, resolve_execution(cfg, make_mesh(MESH)))
  load = np.arange(1.0, 1 + 4 * 8).reshape(4, 8)
  set_expert_placement(model, eplb.rebalance_experts(load, N_SLOTS, 4, 1, N_SHARDS))
  mtp = model.mtp[0].block.ffn.placement_table
  assert mtp.slot_experts.shape == (N_SLOTS,) and mtp.replicas[...][7] > 1
  assert model.moe_layers.ffn.placement_table.slot_experts.shape == (3, N_SLOTS)


def test_bad_per_layer_tables_fail_in_one_line_before_compiling():
  mesh = make_mesh(MESH)
  model = abstract_model(CFG, resolve_execution(CFG, mesh))
  load = np.arange(1.0, 1 + CFG.n_moe_layers * 8).reshape(CFG.n_moe_layers, 8)
  good = eplb.rebalance_experts(load, N_SLOTS, 4, 1, N_SHARDS)
  cases = [
      (good.rows(0, 2), mesh, "has 2 layers, the model 3 MoE layers and 0 MTP"),
      (dataclasses.replace(good, replicas=good.replicas + 1), mesh,
       "layer 0 has 20 replicas .* for its 12 slots"),
      (eplb.rebalance_experts(np.ones((3, 16)), 16, 4, 1, N_SHARDS), mesh,
       "covers 16 experts, the layer has 8"),
      (good, make_mesh({"expert": 8}), r"12 slots, not divisible by the mesh's expert axis \(8\)"),
      (eplb.rebalance_experts(load, 16, 4, 1, 8), mesh,
       "balanced for 8 expert shards, the mesh's expert axis has 4"),
  ]
  for placement, on, message in cases:
    with pytest.raises(ValueError, match=message):
      set_expert_placement(model, placement, on)
  with pytest.raises(ValueError, match="the MoE stack has 3"):
    M.set_layer_placement(model.moe_layers.ffn, good.rows(0, 1))
  local = abstract_model(CFG)  # built for one device: local dispatch would ignore the tables
  with pytest.raises(ValueError, match="runs local dispatch.*resolve_execution"):
    set_expert_placement(local, good, mesh)

  # installed without a mesh, the layer checks when it traces: no compile
  wide = make_mesh({"expert": 8})
  wide_model = set_expert_placement(abstract_model(CFG, resolve_execution(CFG, wide)), good)
  graphdef, state = nnx.split(wide_model)
  with jax.set_mesh(wide), pytest.raises(ValueError, match=r"per-layer expert placement has "
                                         r"12 slots, not divisible by the mesh's expert axis"):
    jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.zeros((8, 8), jnp.int32)), state)

  # one static table for all layers and per-layer tables do not mix
  shared = EP.ExpertPlacement.from_eplb(good, 0)
  layer = model.moe_layers.ffn
  layer.placement_table = None
  layer.dispatch = dataclasses.replace(layer.dispatch, placement=shared)
  with pytest.raises(ValueError, match="already has DispatchSpec.placement"):
    M.set_layer_placement(layer, good)


def test_a_single_layer_with_its_own_table_and_v2_capacity_computes_the_same():
  """An unstacked layer (as an MTP module's) holds [E'] tables; V2 device-level dropping
  needs each group on one shard: the hierarchical policy with a node per shard keeps it so."""
  n_experts, d, f, b, t = 16, 8, 4, 8, 4
  v2 = M.RoutingSpec(top_k=2, score_func="softmax", n_groups=4, n_limited_groups=2,
                     group_score="max", norm_topk_prob=False)
  layer = M.MoE(d, M.ExpertSpec(n_experts, 1, f), routing=v2,
                balance=M.BalanceSpec(router_bias=True, scope="batch"),
                dispatch=M.DispatchSpec(capacity_factor=1.0, mode="expert_parallel"),
                init_std=0.3, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0))
  layer.router_bias[...] = jnp.zeros(n_experts).at[jnp.array([0, 5, 9])].set(0.3)
  x = jax.random.normal(jax.random.key(1), (b, t, d))

  def run(layer):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
      y, stats = nnx.merge(graphdef, params, rest)(x)
      return (y * jnp.cos(jnp.arange(float(d)))).sum(), (y, stats)

    with jax.set_mesh(make_mesh(MESH)):
      return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)

  (_, (y_ref, stats_ref)), grads_ref = run(layer)
  placement = eplb.rebalance_experts(np.asarray(stats_ref["load"])[None], 24, 4, 4, N_SHARDS)
  own = M.set_layer_placement(nnx.clone(layer), placement, make_mesh(MESH))
  assert own.placement_table.slot_experts.shape == (24,)
  assert own.placement_table.layout.max_group_span == 1
  (_, (y, stats)), grads = run(own)
  assert float(stats_ref["dropped"]) > 0 and float(stats["dropped"]) == float(
      stats_ref["dropped"])
  np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=2e-5)
