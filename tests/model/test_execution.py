"""Execution choices are explicit: resolved once from the config and the mesh, held by the
layers as plain fields, never re-derived from the ambient mesh inside a layer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.execution import resolve_execution, set_execution
from deepseek_jax.model.moe import MoE
from deepseek_jax.model.transformer import create_model
from deepseek_jax.parallel.mesh import make_mesh

CFG = ModelConfig.preset("tiny", n_mtp_modules=0)


def _moe_layers(model):
  return [node for _, node in nnx.iter_graph(model) if isinstance(node, MoE)]


def test_resolution_follows_the_platform_the_mesh_and_the_config():
  cpu = resolve_execution(CFG)
  assert (cpu.platform, cpu.attention, cpu.decode_attention, cpu.moe_dispatch,
          cpu.grouped_matmul) == ("cpu", "xla", "xla", "local", "tiled")
  ep = resolve_execution(CFG, make_mesh({"expert": 4, "data": 2}))
  assert ep.moe_dispatch == "expert_parallel" and ep.expert_exchange == "padded"
  assert resolve_execution(CFG, make_mesh({"data": 8})).moe_dispatch == "local"
  forced = resolve_execution(CFG, make_mesh({"expert": 4, "data": 2}), expert_parallel=False)
  assert forced.moe_dispatch == "local"
  kernels = resolve_execution(CFG.replace(attention_impl="pallas"))
  assert (kernels.attention, kernels.decode_attention) == ("pallas", "pallas")
  sharded = resolve_execution(CFG.replace(attention_impl="pallas"), make_mesh({"data": 8}))
  assert (sharded.attention, sharded.decode_attention) == ("pallas", "xla")  # no per-shard decode
  assert "MoE expert_parallel (padded exchange)" in ep.summary()


def test_an_expert_axis_that_does_not_divide_the_experts_is_refused_up_front():
  with pytest.raises(ValueError, match="n_routed_experts=12 must be divisible by the mesh's "
                                       "expert axis \\(8\\)"):
    resolve_execution(CFG.replace(n_routed_experts=12), make_mesh({"expert": 8}))


def test_a_local_layer_stays_local_under_an_expert_mesh():
  """The old behaviour switched on the ambient mesh; now the layer does what it was built for."""
  model = create_model(CFG, 0)
  tokens = jax.random.randint(jax.random.key(0), (8, 8), 0, CFG.vocab_size)
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).moe_stats)
  with jax.set_mesh(make_mesh({"expert": 4, "data": 2})):
    stats = run(state, tokens)
    text = run.lower(state, tokens).as_text()
  assert "dispatch_per_token" not in stats
  assert "all_to_all" not in text and "all-to-all" not in text


def test_expert_parallel_without_an_expert_mesh_fails_in_one_line():
  model = create_model(CFG, 0, execution=resolve_execution(CFG, make_mesh({"expert": 4,
                                                                              "data": 2})))
  with pytest.raises(ValueError, match="expert-parallel dispatch needs a context mesh"):
    model(jnp.zeros((8, 8), jnp.int32))


def test_set_execution_switches_a_built_model_and_keeps_its_weights():
  mesh = make_mesh({"expert": 4, "data": 2})
  model = create_model(CFG, 0, execution=resolve_execution(CFG, mesh))
  assert {layer.dispatch.mode for layer in _moe_layers(model)} == {"expert_parallel"}
  tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, CFG.vocab_size)
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh):
    ep_logits = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens).logits)(state)
  local = set_execution(model, resolve_execution(CFG))
  assert local.execution.moe_dispatch == "local"
  assert {layer.dispatch.mode for layer in _moe_layers(local)} == {"local"}
  np.testing.assert_allclose(local(tokens).logits, ep_logits, atol=2e-5, rtol=2e-5)
  dataclasses.replace(local.execution)  # frozen, hashable: a static part of the graphdef
  hash(local.execution)


def test_layers_refuse_an_unresolved_kernel_choice():
  from deepseek_jax.model.attention import AttentionSpec
  from deepseek_jax.model.mla import MultiHeadLatentAttention
  from deepseek_jax.model.rope import RotaryEmbedding
  spec = AttentionSpec(d_model=16, n_heads=2, qk_nope_head_dim=4, qk_rope_head_dim=2,
                       v_head_dim=4, softmax_scale=0.4, kv_lora_rank=8)
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    MultiHeadLatentAttention(spec, rotary=RotaryEmbedding(2), eps=1e-6, init_std=0.02,
                             dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0),
                             attention_impl="auto")


def test_loaders_resolve_the_execution_for_the_mesh_they_place_weights_on(tmp_path):
  from deepseek_jax.interop.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
  cfg = CFG.replace(attention_impl="pallas")
  save_hf_checkpoint(create_model(cfg, 0), str(tmp_path / "hf"))
  mesh = make_mesh({"expert": 4, "data": 2})
  loaded = load_hf_checkpoint(str(tmp_path / "hf"), mesh=mesh, attention_impl="pallas")
  # run under XLA's partitioning on this mesh: local MoE, no unsharded decode kernel
  assert loaded.execution == resolve_execution(loaded.config, mesh, expert_parallel=False)
  assert loaded.execution.decode_attention == "xla"
  assert {layer.dispatch.mode for layer in _moe_layers(loaded)} == {"local"}
  ep = resolve_execution(loaded.config, mesh)
  again = load_hf_checkpoint(str(tmp_path / "hf"), mesh=mesh, execution=ep)
  assert {layer.dispatch.mode for layer in _moe_layers(again)} == {"expert_parallel"}


def test_the_fp8_gemm_kernel_is_an_execution_choice_applied_to_every_layer():
  cfg = CFG.replace(matmul_format="fp8_blockwise", n_mtp_modules=1)
  cpu = resolve_execution(cfg)
  assert cpu.fp8_kernel == "xla"
  assert "matmuls fp8_blockwise (emulated on CPU" in cpu.summary()
  assert resolve_execution(CFG).summary().endswith("matmuls bf16")
  model = create_model(cfg)
  formats = [node.matmul_format for _, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Module) and hasattr(node, "matmul_format")]
  assert formats and {f.kernel for f in formats} == {"xla"}
  assert {f.name for f in formats} == {"fp8_blockwise"}
  set_execution(model, dataclasses.replace(cpu, fp8_kernel="mosaic_gpu"))
  assert {node.matmul_format.kernel for _, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module) and hasattr(node, "matmul_format")} == {"mosaic_gpu"}
