"""Building blocks shared by every layer: parameters with logical axes, RMSNorm, SwiGLU, embedding.

Axis legend: B batch, T length, D d_model, F FFN hidden, V vocab.

Parameters carry their logical axis names as Flax's sharding metadata (``param(value,
("embed", "mlp"))``, read by ``nnx.get_partition_spec``); the partitioning code maps those names
to mesh axes, so a layer never knows about the mesh.
Weights are stored in ``param_dtype``; every weight matmul casts them to the activation
``dtype`` in ``ops.matmul.weight_matmul`` (the one chokepoint, where a quantiser plugs in).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.ops.matmul import BF16, MatmulFormat, weight_matmul


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
  """An ``nnx.Param`` carrying its logical axis names as Flax's standard sharding metadata
  (``nnx.get_partition_spec`` reads it; ``parallel.partitioning`` maps the names to mesh axes).
  Eager sharding is off: weights are placed by the step's shardings, not at creation."""
  assert value.ndim == len(axes), (value.shape, axes)
  return nnx.Param(value, sharding_names=tuple(axes), eager_sharding=False)


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *,
                 std: float, param_dtype: str) -> nnx.Param:
  """A N(0, std^2) weight tagged with logical axis names (DeepSeek inits every matrix this way)."""
  value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
  return param(value.astype(param_dtype), axes)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 whatever the input dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype: str = "float32"):
    self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
  """Dense FFN: W_down (silu(x W_gate) * x W_up). Used for dense layers and shared experts."""

  def __init__(self, d_model: int, hidden: int, *, init_std: float, dtype: str,
               param_dtype: str, rngs: nnx.Rngs, matmul_format: MatmulFormat = BF16):
    kw = dict(std=init_std, param_dtype=param_dtype)
    self.w_gate = normal_param(rngs, (d_model, hidden), ("embed", "mlp"), **kw)
    self.w_up = normal_param(rngs, (d_model, hidden), ("embed", "mlp"), **kw)
    self.w_down = normal_param(rngs, (hidden, d_model), ("mlp", "embed"), **kw)
    self.dtype = dtype
    self.matmul_format = matmul_format

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D] in ``dtype``."""
    kw = dict(dtype=self.dtype, fmt=self.matmul_format)
    gate = weight_matmul("BTD,DF->BTF", x, self.w_gate, **kw)
    up = weight_matmul("BTD,DF->BTF", x, self.w_up, **kw)
    return weight_matmul("BTF,FD->BTD", jax.nn.silu(gate) * up, self.w_down, **kw)


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
    """The tied output head: x [B, T, D] -> logits [B, T, V] in float32."""
    return weight_matmul("BTD,VD->BTV", x, self.embedding, dtype=self.dtype,
                         preferred_element_type=jnp.float32)
