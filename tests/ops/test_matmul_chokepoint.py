"""Every weight matmul of the model goes through ``ops.matmul.weight_matmul``: recording what
reaches the chokepoint while the model traces must account for every weight matrix."""

import collections

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.transformer import abstract_model
from deepseek_jax.ops import matmul
from deepseek_jax.train.loss import loss_fn


def _weight_shapes(model) -> collections.Counter:
  """Per-layer shapes of every Param that a matmul multiplies (norm scales are elementwise;
  the embedding is a lookup unless it is the tied head)."""
  shapes = collections.Counter()
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = path[-1]
    if name == "scale" or (name == "embedding" and not model.config.tie_embeddings):
      continue
    shape = variable.shape
    stacked = path[0] in ("dense_layers", "moe_layers")
    shapes[shape[1:] if stacked else shape] += 1
  return shapes


@pytest.mark.parametrize("overrides", [
    dict(),  # MLA + query compression, MoE with shared experts, MTP, untied head
    dict(q_lora_rank=None, tie_embeddings=True, n_mtp_modules=0),
    dict(attention_kind="gqa", n_kv_heads=2, n_shared_experts=0),
], ids=["v3-like", "tied-no-q-lora", "gqa"])
def test_every_weight_matrix_reaches_the_chokepoint(monkeypatch, overrides):
  cfg = ModelConfig.preset("tiny", **overrides)
  seen = collections.Counter()
  product = matmul._product

  def recording(eqn, x, w, preferred_element_type, custom):
    seen[w.shape] += 1
    return product(eqn, x, w, preferred_element_type, custom)

  monkeypatch.setattr(matmul, "_product", recording)
  model = abstract_model(cfg)
  batch = {"inputs": jnp.zeros((2, 16), jnp.int32), "targets": jnp.zeros((2, 16), jnp.int32)}
  graphdef, state = nnx.split(model)
  jax.eval_shape(lambda s: loss_fn(nnx.merge(graphdef, s), batch), state)
  # Each stack's body is traced once; the tiled expert FFN reaches it with [E, D, F] weights.
  want = _weight_shapes(model)
  assert want, "no weights found"
  missing = want - seen
  assert not missing, f"weights that bypass weight_matmul: {dict(missing)}"


def test_weight_matmul_casts_both_operands_to_the_compute_dtype():
  x = jnp.ones((2, 3), jnp.float32)
  w = nnx.Param(jnp.ones((3, 4), jnp.float32))
  out = matmul.weight_matmul("TD,DF->TF", x, w, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  out32 = matmul.weight_matmul("TD,DF->TF", x.astype(jnp.bfloat16), w, dtype=jnp.bfloat16,
                               preferred_element_type=jnp.float32)
  assert out32.dtype == jnp.float32 and float(out32[0, 0]) == 3.0
