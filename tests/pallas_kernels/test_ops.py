"""The dispatching entry points (ops.py) and the model's use of the kernels, on CPU.

attention_impl="pallas" on CPU runs the TPU kernels in interpret mode, so these tests check the
wiring the accelerators use: custom_vjp gradients, the contiguous-cache-as-pages view, the
layer-stacked cache read in place, per-shard calls under a mesh, and the XLA fallbacks.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.inference.generate import generate
from deepseek_jax.model.execution import resolve_execution, set_execution
from deepseek_jax.model.transformer import create_model, init_cache
from deepseek_jax.parallel.mesh import make_mesh
from pallas_kernels.flash_attention import ops as flash_ops
from pallas_kernels.flash_attention.reference import attention_reference
from pallas_kernels.mla_decode import ops as decode_ops
from pallas_kernels.mla_decode.reference import mla_decode_reference

# Kernel-friendly small MLA: T a multiple of the kernels' blocks, TPU-tileable widths.
KERNEL_MODEL = dict(vocab_size=128, d_model=64, n_layers=2, n_dense_layers=1, dense_ffn_dim=128,
                    max_seq_len=256, n_heads=2, q_lora_rank=32, kv_lora_rank=128,
                    qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
                    n_routed_experts=4, n_shared_experts=1, n_activated_experts=2,
                    moe_ffn_dim=32, n_mtp_modules=0, init_std=0.02, dtype="float32")


def _has_pallas_call(fn, *args) -> bool:
  return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def _qkv(key, b=2, t=128, n=2, h=48, v=32):
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (b, t, n, h)), jax.random.normal(kk, (b, t, n, h)),
          jax.random.normal(kv, (b, t, n, v)))


def test_flash_attention_op_matches_reference_with_gradients():
  q, k, v = _qkv(jax.random.key(0))
  segments = jnp.asarray(np.repeat([[0, 0, 1, 1], [0, 1, 1, 2]], 32, axis=1), jnp.int32)
  dout = jax.random.normal(jax.random.key(1), q.shape[:3] + (v.shape[-1],))

  def loss(impl, q, k, v):
    out = flash_ops.flash_attention(q, k, v, segments, softmax_scale=0.3, impl=impl)
    return jnp.sum(out * dout)

  assert _has_pallas_call(lambda *a: loss("pallas", *a), q, k, v)
  value, grads = jax.value_and_grad(lambda *a: loss("pallas", *a), argnums=(0, 1, 2))(q, k, v)
  want_value, want = jax.value_and_grad(
      lambda q, k, v: jnp.sum(attention_reference(q, k, v, segments, softmax_scale=0.3)[0]
                              * dout), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(value, want_value, rtol=1e-4)
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=2e-4)


def test_flash_attention_op_falls_back_to_xla_for_shapes_the_kernel_cannot_take(caplog):
  q, k, v = _qkv(jax.random.key(2), t=100, h=24, v=16)  # 100 tokens: no whole blocks
  with caplog.at_level(logging.WARNING):
    out = flash_ops.flash_attention(q, k, v, softmax_scale=0.2, block_q=64, block_kv=64)
  assert not _has_pallas_call(
      lambda q: flash_ops.flash_attention(q, k, v, softmax_scale=0.2, block_q=64, block_kv=64), q)
  np.testing.assert_allclose(out, attention_reference(q, k, v, softmax_scale=0.2)[0], atol=1e-5)
  assert "using the XLA path" in caplog.text


def test_flash_attention_op_rejects_bad_arguments():
  q, k, v = _qkv(jax.random.key(3), t=64)
  with pytest.raises(ValueError, match="impl must be one of"):
    flash_ops.flash_attention(q, k, v, softmax_scale=1.0, impl="cuda")
  with pytest.raises(ValueError, match="self-attention"):
    flash_ops.flash_attention(q, k[:, :32], v[:, :32], softmax_scale=1.0)


@pytest.mark.parametrize("n_queries", [1, 2])
def test_decode_op_reads_a_contiguous_cache_as_pages(n_queries):
  keys = jax.random.split(jax.random.key(4), 3)
  b, s, n, c, r = 3, 256, 4, 128, 32
  q = jax.random.normal(keys[0], (b, n_queries, n, c + r))
  c_kv = jax.random.normal(keys[1], (b, s, c))
  k_rope = jax.random.normal(keys[2], (b, s, r))
  lengths = jnp.array([n_queries, 130, s], jnp.int32)
  slots = jnp.arange(s)[None, :, None]
  c_kv = jnp.where(slots < lengths[:, None, None], c_kv, jnp.nan)  # unused slots: NaN
  fn = lambda q: decode_ops.mla_decode(q, c_kv, k_rope, lengths, softmax_scale=0.1)
  assert _has_pallas_call(fn, q)
  out, lse = fn(q)
  want_out, want_lse = mla_decode_reference(q, c_kv, k_rope, lengths, softmax_scale=0.1)
  np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5)


def test_decode_op_rejects_a_query_width_that_is_not_c_plus_r():
  with pytest.raises(ValueError, match="C \\+ R"):
    decode_ops.mla_decode(jnp.zeros((1, 1, 2, 100)), jnp.zeros((1, 64, 64)),
                          jnp.zeros((1, 64, 32)), jnp.ones(1, jnp.int32), softmax_scale=1.0)


def _model(impl: str, **overrides):
  return create_model(ModelConfig(**{**KERNEL_MODEL, "attention_impl": impl, **overrides}), 0)


def test_config_rejects_an_unknown_attention_impl():
  with pytest.raises(ValueError, match="attention_impl"):
    ModelConfig(**{**KERNEL_MODEL, "attention_impl": "triton"})


def _loss_and_grads(model, tokens, segments):
  graphdef, state = nnx.split(model)
  return _split_loss_and_grads(graphdef, state, tokens, segments)


def _split_loss_and_grads(graphdef, state, tokens, segments):
  def loss(state):
    out = nnx.merge(graphdef, state)(tokens, segment_ids=segments)
    return jnp.mean(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 0])

  return jax.value_and_grad(loss)(state)


def test_training_forward_and_gradients_with_the_kernel_match_xla():
  tokens = jax.random.randint(jax.random.key(5), (2, 128), 0, 128)
  segments = jnp.asarray(np.repeat([[0, 1], [0, 0]], 64, axis=1), jnp.int32)
  graphdef, state = nnx.split(_model("pallas"))
  apply = lambda s: nnx.merge(graphdef, s)(tokens, segment_ids=segments).logits
  assert _has_pallas_call(apply, state)
  value, grads = _loss_and_grads(_model("pallas"), tokens, segments)
  want_value, want = _loss_and_grads(_model("xla"), tokens, segments)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)


def test_gqa_baseline_trains_through_the_kernel_like_xla():
  """The MHA/GQA ablation baselines use the same kernel (keys repeated per query head)."""
  tokens = jax.random.randint(jax.random.key(8), (1, 128), 0, 128)
  gqa = dict(attention_kind="gqa", n_kv_heads=1)
  value, grads = _loss_and_grads(_model("pallas", **gqa), tokens, None)
  want_value, want = _loss_and_grads(_model("xla", **gqa), tokens, None)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)


def test_training_under_a_mesh_runs_the_kernel_per_shard_and_matches_xla():
  tokens = jax.random.randint(jax.random.key(6), (4, 128), 0, 128)
  segments = jnp.asarray(np.repeat([[0, 1]] * 4, 64, axis=1), jnp.int32)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  graphdef, state = nnx.split(_model("pallas"))
  step = jax.jit(_split_loss_and_grads, static_argnums=0)
  with jax.set_mesh(mesh):
    value, grads = step(graphdef, state, tokens, segments)
    text = step.lower(graphdef, state, tokens, segments).as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text
  want_value, want = _loss_and_grads(_model("xla"), tokens, segments)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)


def test_decoding_one_and_two_tokens_with_the_kernel_matches_xla():
  """Both steps of MTP-style verification (2 new tokens, causal within the pair) and plain
  one-token decoding read the stacked latent cache through the decode kernel."""
  kernel, xla = _model("pallas"), _model("xla")
  tokens = jax.random.randint(jax.random.key(7), (2, 40), 0, 128)
  cfg = kernel.config
  results = []
  for model in (kernel, xla):
    cache = init_cache(cfg, 2, 128)
    index = jnp.zeros(2, jnp.int32)
    prefill = model(tokens[:, :37], cache=cache, cache_index=index, absorb=True)
    index = jnp.array([37, 30], jnp.int32)  # rows at different lengths
    pair = model(tokens[:, 37:39], cache=prefill.cache, cache_index=index, absorb=True)
    one = model(tokens[:, 39:], cache=pair.cache, cache_index=index + 2, absorb=True)
    results.append((pair.logits, one.logits))
  step = lambda c, t, i: kernel(t, cache=c, cache_index=i, absorb=True).logits
  assert _has_pallas_call(step, init_cache(cfg, 2, 128), tokens[:, :2], jnp.zeros(2, jnp.int32))
  for got, want in zip(*results):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_generate_with_the_decode_kernel_matches_xla():
  prompts = [[1, 2, 3, 4, 5], [7, 8]]
  got = generate(_model("pallas"), prompts, max_new_tokens=6, prompt_bucket=8)
  want = generate(_model("xla"), prompts, max_new_tokens=6, prompt_bucket=8)
  np.testing.assert_array_equal(got.tokens, want.tokens)


def _abstract(tree, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def test_model_picks_the_tpu_kernels_when_compiled_for_a_tpu_mesh(tpu_devices):
  """attention_impl="auto" on a CPU host, compiled ahead of time for TPU chips: the training
  step (per shard on data 2 x tensor 2) and a decode step (one chip) hold Mosaic kernels.

  Traced at default matmul precision: conftest's global "highest" (for f32 CPU comparisons)
  makes the upstream megablox kernel ask Mosaic for an fp32-precision bf16 matmul, which it
  rejects."""
  with jax.default_matmul_precision("default"):
    _compile_model_for_tpu(tpu_devices)


def _compile_model_for_tpu(tpu_devices):
  model = _model("auto", dtype="bfloat16")
  mesh = make_mesh({"data": 2, "tensor": 2}, tpu_devices)
  graphdef, state = nnx.split(set_execution(model, resolve_execution(model.config, mesh)))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=replicated)
  step = jax.jit(_split_loss_and_grads, static_argnums=0)
  with jax.set_mesh(mesh):
    train = step.lower(graphdef, _abstract(state, replicated), tokens, tokens).compile()
  for kernel in ("mla_flash_forward", "mla_flash_backward_dkv", "mla_flash_backward_dq"):
    assert kernel in train.as_text()

  chip = make_mesh({}, tpu_devices[:1])
  graphdef, state = nnx.split(set_execution(model, resolve_execution(model.config, chip)))
  one = jax.sharding.NamedSharding(chip, jax.sharding.PartitionSpec())
  cache = _abstract(init_cache(model.config, 4, 1024), one)
  decode = jax.jit(lambda state, cache, tok, index: nnx.merge(graphdef, state)(
      tok, cache=cache, cache_index=index, absorb=True).logits)
  with jax.set_mesh(chip):
    compiled = decode.lower(_abstract(state, one), cache,
                            jax.ShapeDtypeStruct((4, 1), jnp.int32, sharding=one),
                            jax.ShapeDtypeStruct((4,), jnp.int32, sharding=one)).compile()
  assert "mla_decode_paged" in compiled.as_text()
