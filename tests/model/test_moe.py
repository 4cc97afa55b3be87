"""DeepSeekMoE: routing rules, balance losses by hand, capacity, and the sorted expert path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.model import moe as M

V3_SPEC = M.RoutingSpec(top_k=4, score_func="sigmoid", n_groups=4, n_limited_groups=2,
                        group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5)
V2_SPEC = M.RoutingSpec(top_k=3, score_func="softmax", n_groups=4, n_limited_groups=2,
                        group_score="max", norm_topk_prob=False, routed_scaling_factor=16.0)


def _numpy_gate(logits, bias, spec):
  """DeepSeek's gate written independently in NumPy (float64), one token at a time."""
  experts_out, weights_out = [], []
  for row in np.asarray(logits, np.float64):
    s = np.exp(row - row.max()) / np.exp(row - row.max()).sum() if spec.score_func == "softmax" \
        else 1 / (1 + np.exp(-row))
    choice = s + (0 if bias is None else np.asarray(bias, np.float64))
    groups = choice.reshape(spec.n_groups, -1)
    group_score = groups.max(-1) if spec.group_score == "max" else np.sort(groups, -1)[:, -2:].sum(-1)
    kept = np.argsort(-group_score, kind="stable")[:spec.n_limited_groups]
    masked = np.full_like(groups, -np.inf)
    masked[kept] = groups[kept]
    top = np.argsort(-masked.reshape(-1), kind="stable")[:spec.top_k]
    w = s[top] / (s[top].sum() if spec.norm_topk_prob else 1.0) * spec.routed_scaling_factor
    experts_out.append(top)
    weights_out.append(w)
  return np.array(experts_out), np.array(weights_out)


@pytest.mark.parametrize("spec", [V3_SPEC, V2_SPEC], ids=["v3", "v2"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_routing_matches_an_independent_numpy_gate(spec, with_bias):
  kl, kb = jax.random.split(jax.random.key(0))
  logits = jax.random.normal(kl, (64, 16))
  bias = 0.3 * jax.random.normal(kb, (16,)) if with_bias else None
  got = M.route(logits, bias, spec)
  want_experts, want_weights = _numpy_gate(logits, bias, spec)
  order = np.argsort(np.asarray(got.experts), -1)
  np.testing.assert_array_equal(np.sort(got.experts, -1), np.sort(want_experts, -1))
  want_order = np.argsort(want_experts, -1)
  np.testing.assert_allclose(np.take_along_axis(np.asarray(got.weights), order, -1),
                             np.take_along_axis(want_weights, want_order, -1), rtol=1e-5)


@pytest.mark.parametrize("spec", [V3_SPEC, V2_SPEC], ids=["v3", "v2"])
def test_experts_come_only_from_kept_groups(spec):
  logits = jax.random.normal(jax.random.key(1), (256, 16))
  r = M.route(logits, None, spec)
  s = np.asarray(r.scores).reshape(256, spec.n_groups, -1)
  group_score = s.max(-1) if spec.group_score == "max" else np.sort(s, -1)[..., -2:].sum(-1)
  kept = np.argsort(-group_score, -1)[:, :spec.n_limited_groups]
  chosen_groups = np.asarray(r.experts) // (16 // spec.n_groups)
  assert all(set(c) <= set(k) for c, k in zip(chosen_groups, kept))
  assert len(np.unique(chosen_groups)) == spec.n_groups  # the limit actually varies by token


def test_bias_changes_selection_but_not_weights():
  logits = jax.random.normal(jax.random.key(2), (128, 16))
  bias = jnp.zeros(16).at[3].set(5.0)  # expert 3 always chosen, whatever its score
  plain, biased = M.route(logits, None, V3_SPEC), M.route(logits, bias, V3_SPEC)
  assert bool((biased.experts == 3).any(-1).all())
  assert not bool((plain.experts == 3).any(-1).all())
  s = jax.nn.sigmoid(logits)
  chosen = jnp.take_along_axis(s, biased.experts, -1)
  np.testing.assert_allclose(biased.weights, chosen / chosen.sum(-1, keepdims=True) * 2.5, rtol=1e-6)
  np.testing.assert_allclose(biased.scores, plain.scores)


def test_sigmoid_weights_sum_to_routed_scale_and_softmax_weights_do_not():
  logits = jax.random.normal(jax.random.key(3), (32, 16))
  np.testing.assert_allclose(M.route(logits, None, V3_SPEC).weights.sum(-1), 2.5, rtol=1e-6)
  v2 = M.route(logits, None, V2_SPEC)
  np.testing.assert_allclose(v2.weights, jnp.take_along_axis(v2.scores, v2.experts, -1) * 16.0,
                             rtol=1e-6)


def test_router_math_is_float32_for_bfloat16_logits():
  r = M.route(jnp.ones((4, 16), jnp.bfloat16), None, V3_SPEC)
  assert r.scores.dtype == r.weights.dtype == jnp.float32


def test_bias_update_moves_against_load():
  bias = jnp.zeros((2, 4))
  load = jnp.array([[10.0, 2.0, 6.0, 6.0], [1.0, 1.0, 1.0, 9.0]])  # means 6 and 3
  new = M.update_router_bias(bias, load, 0.001)
  np.testing.assert_allclose(new, [[-0.001, 0.001, 0.0, 0.0], [0.001, 0.001, 0.001, -0.001]])


# Hand-computed example: 2 tokens, 4 experts, top-2, experts {0,1} on device 0, {2,3} on device 1.
SCORES = jnp.array([[[0.8, 0.1, 0.6, 0.5],    # s' = [0.40, 0.05, 0.30, 0.25], picks {0, 2}
                     [0.7, 0.6, 0.3, 0.4]]])  # s' = [0.35, 0.30, 0.15, 0.20], picks {0, 1}
EXPERTS = jnp.array([[[0, 2], [0, 1]]])
MASK = jnp.ones((1, 2))


def test_sequence_wise_balance_loss_by_hand():
  # f = 4/(2*2) * counts [2,1,1,0] = [2,1,1,0]; P = [0.375, 0.175, 0.225, 0.225]
  f, p = M.balance_fractions(SCORES, EXPERTS, MASK)
  np.testing.assert_allclose(f, [[2, 1, 1, 0]])
  np.testing.assert_allclose(p, [[0.375, 0.175, 0.225, 0.225]], rtol=1e-6)
  assert float(M.expert_balance_loss(f, p)) == pytest.approx(1.15)


def test_expert_level_loss_sequence_vs_batch_scope_by_hand():
  scores, experts, mask = SCORES.reshape(2, 1, 4), EXPERTS.reshape(2, 1, 2), jnp.ones((2, 1))
  # batch scope: the same two tokens as above -> 1.15
  assert float(M.expert_balance_loss(*M.balance_fractions(scores, experts, mask, "batch"))) \
      == pytest.approx(1.15)
  # sequence scope: seq 0 f=[2,0,2,0] P=s'0 -> 1.4; seq 1 f=[2,2,0,0] P=s'1 -> 1.3; mean 1.35
  assert float(M.expert_balance_loss(*M.balance_fractions(scores, experts, mask, "sequence"))) \
      == pytest.approx(1.35)


def test_device_level_balance_loss_by_hand():
  # f' = [mean(2,1), mean(1,0)] = [1.5, 0.5]; P' = [0.55, 0.45] -> 0.825 + 0.225
  f, p = M.balance_fractions(SCORES, EXPERTS, MASK)
  assert float(M.device_balance_loss(f, p, n_devices=2)) == pytest.approx(1.05)


def test_communication_balance_loss_by_hand():
  # M = 2: f'' = 2/(2*2) * [2 tokens sent to d0, 1 to d1] = [1.0, 0.5]; P'' = [0.55, 0.45]
  _, p = M.balance_fractions(SCORES, EXPERTS, MASK)
  assert float(M.comm_balance_loss(EXPERTS, MASK, p, n_devices=2, max_devices=2)) \
      == pytest.approx(0.775)


def test_padding_tokens_and_empty_rows_do_not_count_in_balance_losses():
  padded_scores = jnp.concatenate([SCORES, jnp.full((1, 1, 4), 0.9)], axis=1)
  padded_experts = jnp.concatenate([EXPERTS, jnp.array([[[3, 1]]])], axis=1)
  # a second sequence made only of padding must not dilute the per-sequence average
  scores = jnp.concatenate([padded_scores, jnp.full((1, 3, 4), 0.5)])
  experts = jnp.concatenate([padded_experts, jnp.zeros((1, 3, 2), jnp.int32)])
  mask = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  f, p = M.balance_fractions(scores, experts, mask)
  assert float(M.expert_balance_loss(f, p)) == pytest.approx(1.15)
  assert float(M.device_balance_loss(f, p, 2)) == pytest.approx(1.05)
  assert float(M.comm_balance_loss(experts, mask, p, 2, 2)) == pytest.approx(0.775)


def test_capacity_drops_lowest_affinity_first_on_each_device():
  devices = jnp.array([0, 0, 0, 0, 1])  # device 0 is sent 4 assignments, device 1 one
  affinity = jnp.array([0.9, 0.2, 0.7, 0.5, 0.1])
  capacity = M.device_capacity(n_tokens=5, top_k=1, n_devices=2, capacity_factor=0.8)
  assert float(capacity) == 2  # ceil(0.8 * 5 * 1 / 2)
  np.testing.assert_array_equal(M.capacity_keep(devices, affinity, 2, capacity),
                                [True, False, True, False, True])


def _moe(capacity_factor=None, routing=V3_SPEC, n_shared=1, impl="auto", seed=0):
  return M.MoE(16, M.ExpertSpec(16, n_shared, 8), routing=routing,
               balance=M.BalanceSpec(router_bias=True, scope="sequence", expert_coef=1e-2,
                                     device_coef=1e-2, comm_coef=1e-2),
               dispatch=M.DispatchSpec(capacity_factor=capacity_factor, grouped_matmul=impl),
               init_std=0.3, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(seed))


def _oracle_forward(layer, x, mask):
  """The same layer, with experts computed densely."""
  b, t, d = x.shape
  tokens = x.reshape(b * t, d)
  routing = M.route(tokens @ layer.gate[...], layer.router_bias[...], layer.routing)
  keep = None
  if layer.capacity_factor is not None:  # V2: groups are devices, each keeps its best cf*T*K/D
    k, n_dev = routing.experts.shape[1], layer.routing.n_groups
    affinity = jnp.take_along_axis(routing.scores, routing.experts, -1).reshape(-1)
    priority = jnp.where(jnp.repeat(mask.reshape(-1), k) > 0, affinity, -1.0)
    cap = M.device_capacity(mask.sum(), k, n_dev, layer.capacity_factor)
    keep = M.capacity_keep(routing.experts.reshape(-1) // (16 // n_dev), priority, n_dev, cap)
  y = M.moe_dense_oracle(tokens, routing, layer.w_gate[...], layer.w_up[...], layer.w_down[...], keep)
  return (y + layer.shared(tokens[None])[0]).reshape(b, t, d)


LOADS = {"random": None, "one_expert_gets_all": 0, "empty_experts": 1}
# V3_SPEC keeps 2 of 4 groups of 4 experts: biasing one expert (or one group) overloads a device


@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
@pytest.mark.parametrize("load", sorted(LOADS))
def test_sorted_grouped_experts_equal_dense_oracle_with_gradients(impl, capacity_factor, load):
  layer = _moe(capacity_factor, impl=impl)
  if LOADS[load] == 0:  # every token picks expert 5 (and one more)
    layer.router_bias[...] = jnp.zeros(16).at[5].set(100.0)
  elif LOADS[load] == 1:  # only experts 0-3 are ever chosen
    layer.router_bias[...] = jnp.where(jnp.arange(16) < 4, 100.0, 0.0)
  x = jax.random.normal(jax.random.key(4), (2, 12, 16))
  mask = jnp.ones((2, 12)).at[1, 9:].set(0.0)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x, oracle):
    mod = nnx.merge(graphdef, params, rest)
    y = _oracle_forward(mod, x, mask) if oracle else mod(x, mask)[0]
    return (y * jnp.cos(jnp.arange(16.0))).sum(), y

  (_, y), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x, False)
  (_, y_ref), grads_ref = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x, True)
  np.testing.assert_allclose(y, y_ref, atol=1e-4)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(got, want, atol=1e-4)
  if capacity_factor is not None and load != "random":
    assert float(layer(x, mask)[1]["dropped"]) > 0  # the extreme loads overflow the capacity


def test_moe_stats_report_load_drops_and_exclude_padding():
  layer = _moe(capacity_factor=1.0)
  layer.router_bias[...] = jnp.zeros(16).at[5].set(100.0)
  x = jax.random.normal(jax.random.key(5), (2, 8, 16))
  mask = jnp.ones((2, 8)).at[1, 6:].set(0.0)  # 14 real tokens
  _, stats = layer(x, mask)
  assert float(stats["load"].sum()) == 14 * 4 and float(stats["assignments"]) == 14 * 4
  assert float(stats["load"][5]) == 14
  capacity = 14 * 4 / 4  # cf * T_real * K / D: 14 assignments per device (group of 4 experts)
  routing = M.route(x.reshape(16, 16) @ layer.gate[...], layer.router_bias[...], layer.routing)
  real = np.asarray(routing.experts)[np.asarray(mask).reshape(-1) > 0]
  real_load = np.bincount(real.reshape(-1), minlength=16)
  np.testing.assert_array_equal(stats["load"], real_load)
  device_load = real_load.reshape(4, 4).sum(-1)
  assert device_load.max() > capacity  # expert 5's device is overloaded
  # padding yields its slots first, so each device drops only real assignments past capacity
  assert float(stats["dropped"]) == np.maximum(device_load - capacity, 0).sum() > 0


def test_drop_tokens_false_runs_dropless():
  layer = _moe(capacity_factor=0.25)
  x = jax.random.normal(jax.random.key(6), (2, 8, 16))
  y_drop, stats = layer(x)
  y_keep, stats_keep = layer(x, drop_tokens=False)
  assert float(stats["dropped"]) > 0 and float(stats_keep["dropped"]) == 0
  dropless = _moe(capacity_factor=None)  # same seed, same weights
  np.testing.assert_allclose(y_keep, dropless(x)[0], atol=1e-6)
  assert float(jnp.abs(y_drop - y_keep).max()) > 1e-3
  for term in ("expert_balance", "device_balance", "comm_balance"):
    assert stats[term].shape == () and float(stats[term]) > 0


def test_router_bias_is_state_not_a_parameter():
  layer = _moe()
  params = nnx.state(layer, nnx.Param)
  assert "router_bias" not in params and "gate" in params
  assert "router_bias" in nnx.state(layer, M.RouterBias)


@pytest.mark.parametrize("load", sorted(LOADS))
def test_fp8_experts_are_the_same_function_in_tile_space_and_sorted_rows(load):
  """matmul_format fp8_blockwise on the routed experts: the CPU tile-space path and the sorted
  grouped path (ragged_dot) quantise the same tiles, blocks and per-expert Wgrad chunks, so
  they agree far below FP8's own error (DeepGEMM's metric); both are within FP8's error of
  the unquantised experts."""
  from deepseek_jax.quant.fp8 import relative_error
  x = jax.random.normal(jax.random.key(4), (300, 256))
  w = [0.05 * jax.random.normal(jax.random.key(i), shape) for i, shape in
       ((5, (8, 256, 192)), (6, (8, 256, 192)), (7, (8, 192, 256)))]
  experts = jax.random.randint(jax.random.key(8), (300, 2), 0, 8)
  if LOADS[load] == 0:
    experts = experts.at[:, 0].set(5)
  elif LOADS[load] == 1:
    experts = experts % 4
  weights = jax.random.uniform(jax.random.key(9), (300, 2))
  cot = jax.random.normal(jax.random.key(10), (300, 256))

  def run(impl, fmt):
    f = lambda x, *w: M.expert_ffn(x, experts, weights, *w, impl=impl, fmt=fmt)[0]
    y, vjp = jax.vjp(f, x, *w)
    return (y, *vjp(cot))

  tiled, sorted_rows = run("tiled", "fp8_blockwise"), run("ragged_dot", "fp8_blockwise")
  exact = run("ragged_dot", "bf16")
  for a, b, e in zip(tiled, sorted_rows, exact):  # output, dx, dW_gate, dW_up, dW_down
    # Measured: 1e-14..1e-7 (a few E4M3 roundings flip with the f32 summation order) against
    # FP8's own ~2e-3.
    assert relative_error(a, b) < 1e-6
    assert 1e-4 < relative_error(a, e) < 3e-3


def test_the_grouped_mosaic_gpu_kernel_runs_the_experts_fprop(monkeypatch):
  """kernel="mosaic_gpu": the experts' three Fprop GEMMs go to the grouped kernel in DeepGEMM's
  128-row layout (``ops.matmul.mosaic_gpu_grouped_gemm``, whose numbers
  tests/ops/test_matmul_chokepoint.py checks in the interpreter); here a stand-in of the same
  arithmetic records the calls, and the result and the (XLA) backward equal the XLA path's."""
  from deepseek_jax.ops.matmul import MatmulFormat
  from deepseek_jax.ops.grouped_matmul import tile_matmul
  from deepseek_jax.quant import fp8
  calls = []

  def stand_in(x_tiles, w, tile_group):
    calls.append(x_tiles.shape)
    return tile_matmul(fp8.fake_quant_tiles(x_tiles), fp8.fake_quant_blocks(w), tile_group)

  monkeypatch.setattr(M, "mosaic_gpu_grouped_gemm", stand_in)
  x = jax.random.normal(jax.random.key(4), (100, 128))
  w = [0.05 * jax.random.normal(jax.random.key(i), shape) for i, shape in
       ((5, (4, 128, 192)), (6, (4, 128, 192)), (7, (4, 192, 128)))]
  experts = jax.random.randint(jax.random.key(8), (100, 2), 0, 4)
  weights = jax.random.uniform(jax.random.key(9), (100, 2))
  cot = jax.random.normal(jax.random.key(10), (100, 128))
  runs = []
  for kernel in ("xla", "mosaic_gpu"):
    fmt = MatmulFormat("fp8_blockwise", kernel=kernel)
    f = lambda x, *w: M.expert_ffn(x, experts, weights, *w, impl="ragged_dot", fmt=fmt)[0]
    y, vjp = jax.vjp(f, x, *w)
    runs.append((y, *vjp(cot)))
  assert [shape[1] for shape in calls] == [128, 128, 128]  # gate, up, down; 128-row tiles
  for xla, kernel in zip(*runs):
    assert fp8.relative_error(kernel, xla) < 1e-6


def test_balance_loss_forms_by_hand_and_their_gradients():
  # f = [2,1,1,0], P = [0.375, 0.175, 0.225, 0.225] (above); E = 4
  f, p = M.balance_fractions(SCORES, EXPERTS, MASK)
  f_st = M.straight_through_load(SCORES, EXPERTS, MASK)
  np.testing.assert_allclose(f_st, f, rtol=1e-6)  # f~ has f's value
  # p_only: E sum P^2 = 4 (0.140625 + 0.030625 + 0.050625 + 0.050625) = 1.09
  assert float(M.expert_balance_loss(f, p, "p_only")) == pytest.approx(1.09)
  # f_only: sum f^2 / E = (4 + 1 + 1 + 0) / 4 = 1.5
  assert float(M.expert_balance_loss(f, p, "f_only", f_st)) == pytest.approx(1.5)
  with pytest.raises(ValueError, match="f_straight_through"):
    M.expert_balance_loss(f, p, "f_only")
  with pytest.raises(ValueError, match="'f_p', 'p_only' or 'f_only'"):
    M.expert_balance_loss(f, p, "fp")

  def loss(scores, form):
    f, p = M.balance_fractions(scores, EXPERTS, MASK)
    return M.expert_balance_loss(f, p, form, M.straight_through_load(scores, EXPERTS, MASK))

  s_sum = SCORES.sum(-1, keepdims=True)
  normalised = SCORES / s_sum
  # d/ds' by hand, then through s' = s / sum(s) (the Jacobian is (I - s' 1^T) / sum(s)).
  d_norm = {
      "f_p": jnp.broadcast_to(f[:, None] / 2, SCORES.shape),  # f_i / T (P = mean over T)
      "p_only": jnp.broadcast_to(4 * p[:, None] / 2, SCORES.shape),  # E P_i / T
      # f_only: f_i / E * E / (K T s'_{t,i}) for chosen (t, i) = f_i / (K T s'_{t,i})
      "f_only": jax.nn.one_hot(EXPERTS, 4).sum(-2) * f[:, None] / (2 * 2 * normalised),
  }
  for form, g_norm in d_norm.items():
    expected = (g_norm - (g_norm * normalised).sum(-1, keepdims=True)) / s_sum
    np.testing.assert_allclose(jax.grad(loss)(SCORES, form), expected, rtol=1e-5, atol=1e-7,
                               err_msg=form)


def test_the_balance_loss_form_is_a_model_switch():
  from deepseek_jax.config import ModelConfig
  from deepseek_jax.model.transformer import create_model
  tokens = jnp.arange(32).reshape(2, 16) % 128
  losses = {}
  for form in ("f_p", "p_only", "f_only"):
    model = create_model(ModelConfig.preset("tiny", balance_loss_form=form), 0)
    losses[form] = float(model(tokens).moe_stats["expert_balance"].sum())
  assert len(set(losses.values())) == 3, losses  # three different losses on the same routing
  with pytest.raises(ValueError, match="balance_loss_form"):
    ModelConfig.preset("tiny", balance_loss_form="P")
