"""Building blocks shared by every layer: parameters with logical axes, RMSNorm, SwiGLU, embedding.

Axis legend: B batch, T length, D d_model, F FFN hidden, V vocab.

Parameters carry their logical axis names as metadata (``axes=("embed", "mlp")``); the
partitioning code maps those names to mesh axes, so a layer never knows about the mesh.
Weights are stored in ``param_dtype`` and cast to the activation ``dtype`` where they are used.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *,
                 std: float, param_dtype: str) -> nnx.Param:
  """A N(0, std^2) weight tagged with logical axis names (DeepSeek inits every matrix this way)."""
  assert len(shape) == len(axes), (shape, axes)
  value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
  return nnx.Param(value.astype(param_dtype), axes=tuple(axes))


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 whatever the input dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype: str = "float32"):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
  """Dense FFN: W_down (silu(x W_gate) * x W_up). Used for dense layers and shared experts."""

  def __init__(self, d_model: int, hidden: int, *, init_std: float, dtype: str,
               param_dtype: str, rngs: nnx.Rngs):
    kw = dict(std=init_std, param_dtype=param_dtype)
    self.w_gate = normal_param(rngs, (d_model, hidden), ("embed", "mlp"), **kw)
    self.w_up = normal_param(rngs, (d_model, hidden), ("embed", "mlp"), **kw)
    self.w_down = normal_param(rngs, (hidden, d_model), ("mlp", "embed"), **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    gate = jnp.einsum("BTD,DF->BTF", x, self.w_gate[...].astype(self.dtype))
    up = jnp.einsum("BTD,DF->BTF", x, self.w_up[...].astype(self.dtype))
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, self.w_down[...].astype(self.dtype))


class Embed(nnx.Module):
  """Token embedding table [V, D]; ``attend`` reuses it as a tied output head."""

  def __init__(self, vocab_size: int, d_model: int, *, init_std: float, dtype: str,
               param_dtype: str, rngs: nnx.Rngs):
    self.embedding = normal_param(rngs, (vocab_size, d_model), ("vocab", "embed"),
                                  std=init_std, param_dtype=param_dtype)
    self.dtype = dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("BTD,VD->BTV", x.astype(self.dtype), self.embedding[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)
