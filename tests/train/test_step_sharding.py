"""The partitioned train step on 8 fake CPU devices equals the single-device step. Under a mesh
with an expert axis the MoE layers run expert-parallel (all-to-all dispatch), so these also
check the whole model's expert parallelism, MTP module included."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.execution import resolve_execution
from deepseek_jax.quant.fp8 import relative_error
from deepseek_jax.parallel.mesh import make_mesh, under_mesh
from deepseek_jax.parallel.partitioning import batch_sharding, get_rules
from deepseek_jax.train.config import default_config
from deepseek_jax.train.loss import loss_fn
from deepseek_jax.train.optimizer import make_optimizer, piecewise_constant
from deepseek_jax.train.step import StepOptions, init_train_state, jit_train_step

CFG = ModelConfig.preset("tiny", init_std=0.1, expert_balance_coef=0.01, device_balance_coef=0.01,
                         comm_balance_coef=0.01)


def _batch():
  seq = np.random.default_rng(0).integers(3, CFG.vocab_size, (8, 33)).astype(np.int32)
  mask = np.ones((8, 32), np.float32)
  mask[3, 20:] = 0  # padding in one row
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": mask}


def _tx():
  c = default_config().optimizer
  c.total_steps = 10
  return make_optimizer(c)


def _loss_and_grads(mesh_shape, rules_name, cfg=CFG):
  n = int(np.prod(list(mesh_shape.values())))
  mesh = make_mesh(mesh_shape, jax.devices()[:n])
  rules = get_rules(rules_name)
  tx = _tx()
  graphdef, state, sh = init_train_state(cfg, tx, mesh, rules, seed=0)
  batch = jax.device_put(_batch(), batch_sharding(mesh, rules))

  def f(params, rest, batch):
    return loss_fn(nnx.merge(graphdef, params, rest), batch)

  fn = under_mesh(jax.jit(jax.value_and_grad(f, has_aux=True),
                          in_shardings=(sh.params, sh.model_state, batch_sharding(mesh, rules)),
                          out_shardings=((NamedSharding(mesh, P()), NamedSharding(mesh, P())),
                                         sh.params)), mesh)
  (loss, metrics), grads = fn(state.params, state.model_state, batch)
  sharded = any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state.params))
  return jax.device_get((loss, metrics, grads)), sharded


MESHES = [
    (dict(data=8), "replicated"),
    (dict(data=2, fsdp=2, expert=2), "fsdp"),
    (dict(fsdp=2, expert=2, tensor=2), "fsdp"),
    (dict(expert=4, tensor=2), "tensor"),
]
MESH_IDS = lambda x: x if isinstance(x, str) else "-".join(f"{k}{v}" for k, v in x.items())


@pytest.fixture(scope="module")
def single_device():
  return _loss_and_grads(dict(data=1), "fsdp")[0]


@pytest.mark.parametrize("mesh_shape, rules", MESHES, ids=MESH_IDS)
def test_sharded_loss_and_gradients_equal_single_device(single_device, mesh_shape, rules):
  (loss, metrics, grads), sharded = _loss_and_grads(mesh_shape, rules)
  ref_loss, ref_metrics, ref_grads = single_device
  assert sharded == (rules != "replicated")  # the weights really are split
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_array_equal(metrics["expert_load"], ref_metrics["expert_load"])  # global load
  assert ("dispatch_per_token" in metrics) == (mesh_shape.get("expert", 1) > 1)
  assert metrics["overflow"] == 0
  for (path, g), (_, r) in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                               jax.tree_util.tree_flatten_with_path(ref_grads)[0]):
    np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


# d_model 128, moe_ffn_dim 256: whole tiles, and expert hidden shards of 128 under tensor=2.
FP8 = CFG.replace(matmul_format="fp8_blockwise", d_model=128, moe_ffn_dim=256)


@pytest.fixture(scope="module")
def single_device_fp8():
  return _loss_and_grads(dict(data=1), "fsdp", FP8)[0]


@pytest.mark.parametrize("mesh_shape, rules", MESHES, ids=MESH_IDS)
def test_sharded_fp8_step_equals_the_single_device_fp8_step(single_device_fp8, mesh_shape, rules):
  """V3's FP8 recipe under every mesh. Outside shard_map the quantisers see global arrays, so
  a weight's 128x128 blocks are the same whatever its shards; inside the expert-parallel
  shard_map each expert is whole on its shard and the tensor axis leaves 128-wide slices of
  its hidden dim (``resolve_execution`` refuses other splits); Wgrad chunks restart at each
  expert. Equal up to FP8's sensitivity to f32 summation order: a 1-ulp change before a
  quantiser can move a value by one E4M3 step, and that spreads (changing rms_norm_eps by 1%
  moves these gradients by up to 2.5e-3 in DeepGEMM's metric). A misaligned block (the tensor
  axis cutting F into 64-wide shards) gives 1.6e-3 in the loss and 0.15 in the gradients."""
  (loss, metrics, grads), _ = _loss_and_grads(mesh_shape, rules, FP8)
  ref_loss, ref_metrics, ref_grads = single_device_fp8
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-4)
  load, ref_load = metrics["expert_load"], ref_metrics["expert_load"]
  assert load.sum() == ref_load.sum() and np.abs(load - ref_load).max() <= 2  # a routing flip
  for (path, g), (_, r) in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                               jax.tree_util.tree_flatten_with_path(ref_grads)[0]):
    assert relative_error(g, r) < 1.5e-2, jax.tree_util.keystr(path)


def test_fp8_blocks_straddling_tensor_shards_of_the_experts_are_refused():
  cfg = FP8.replace(moe_ffn_dim=128)
  mesh = make_mesh(dict(expert=4, tensor=2), jax.devices()[:8])
  with pytest.raises(ValueError, match="moe_ffn_dim=128 over the mesh's tensor axis"):
    resolve_execution(cfg, mesh)
  resolve_execution(cfg.replace(matmul_format="fp8_tensorwise"), mesh)  # one scale: no blocks


def test_gradient_accumulation_equals_the_full_batch_step():
  mesh = make_mesh(dict(data=2), jax.devices()[:2])
  rules = get_rules("fsdp")
  results = []
  for accum in (1, 2):
    tx = _tx()
    graphdef, state, sh = init_train_state(CFG, tx, mesh, rules, seed=0)
    opts = StepOptions(grad_accum=accum, router_bias_rate=piecewise_constant(((0, 0.01),)))
    step = jit_train_step(CFG, graphdef, tx, opts, sh, mesh, rules)
    state, metrics = step(state, jax.device_put(_batch(), batch_sharding(mesh, rules)))
    results.append(jax.device_get((metrics, state.model_state)))
  (m1, bias1), (m2, bias2) = results
  for key in ("loss", "ce", "mtp_ce", "grad_norm", "expert_balance"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=2e-5, err_msg=key)
  np.testing.assert_array_equal(m2["expert_load"], m1["expert_load"])
  for a, b in zip(jax.tree.leaves(bias1), jax.tree.leaves(bias2)):  # same global-load update
    np.testing.assert_array_equal(a, b)
  assert float(np.abs(jax.tree.leaves(bias1)[0]).max()) > 0  # and the bias did move


def test_micro_batches_stay_sharded_over_the_batch_axes():
  """Gradient accumulation must not gather a whole micro-batch of tokens onto every device."""
  import re
  mesh = make_mesh(dict(data=2), jax.devices()[:2])
  rules = get_rules("fsdp")
  tx = _tx()
  graphdef, state, sh = init_train_state(CFG, tx, mesh, rules, seed=0)
  step = jit_train_step(CFG, graphdef, tx, StepOptions(grad_accum=2), sh, mesh, rules)
  batch = jax.device_put(_batch(), batch_sharding(mesh, rules))
  hlo = step.lower(state, batch).compile().as_text()
  # Token arrays are [..., T=32]; a gather of them would be an all-gather yielding s32[..., 32].
  gathered = [l for l in hlo.splitlines() if "all-gather(" in l and re.search(r"s32\[[\d,]*32\]", l)]
  assert not gathered, gathered[:2]


def test_expert_parallel_train_step_equals_the_single_device_step():
  """One optimizer step with the aux-loss-free bias update: the load that moves the bias is
  summed over the expert and data axes, so the biases match exactly."""
  results = []
  for shape in (dict(data=1), dict(data=2, expert=4)):
    n = int(np.prod(list(shape.values())))
    mesh, rules, tx = make_mesh(shape, jax.devices()[:n]), get_rules("fsdp"), _tx()
    graphdef, state, sh = init_train_state(CFG, tx, mesh, rules, seed=0)
    opts = StepOptions(router_bias_rate=piecewise_constant(((0, 0.01),)))
    step = jit_train_step(CFG, graphdef, tx, opts, sh, mesh, rules)
    state, metrics = step(state, jax.device_put(_batch(), batch_sharding(mesh, rules)))
    results.append(jax.device_get((state.params, state.model_state, metrics)))
  (p1, b1, m1), (p2, b2, m2) = results
  assert "dispatch_per_token" in m2 and "dispatch_per_token" not in m1
  assert 1.0 <= m2["dispatch_per_token"] <= 2.0  # top-2: at most 2 shards per token
  for a, b in zip(jax.tree.leaves(b1), jax.tree.leaves(b2)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
