"""The one place where a weight meets an activation.

Every weight matmul of the model goes through ``weight_matmul``: attention projections
(W_DQ, W_UQ, W_DKV+W_KR, W_UK, W_UV, W_O, and the MHA/GQA baselines' W_K, W_V), the dense and
shared-expert SwiGLU, the router, the routed experts (through the grouped matmul), the MTP
projection and the output head. It casts both operands to the compute dtype and runs the
product. A number format plugs in here, not at twenty call sites: ``fmt`` (a ``MatmulFormat``,
from ``ModelConfig.matmul_format``) selects V3's FP8 (1x128 activation tiles and 128x128
weight blocks, ``deepseek_jax/quant/fp8.py``) or the per-tensor FP8 baseline, for the einsum
path and the grouped expert product alike. The layers pass their format for every weight
matmul V3 runs in FP8 and leave out those it keeps in BF16/FP32: the embedding, the output
head, the MoE router and MLA's absorbed per-head products.

A weight may also be held in FP8 (``quant.fp8.Fp8Weight``: E4M3 values and 128x128 block
scales, e.g. kept from a released V3/R1 checkpoint by ``load_hf_checkpoint(keep_fp8=True)``).
Under "bf16" it is dequantised to the compute dtype and multiplied as any weight; under
"fp8_blockwise" its stored blocks go straight into the block-scaled GEMM, the activation in
1x128 tiles (inference: no FP8 backward pass for it).

Axis letters follow the caller's legend; ``eqn`` is an einsum equation with the activation
first and the weight second, e.g. ``"BTD,DF->BTF"``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.quant.fp8 import (Fp8Weight, block_scaled_gemm, fp8_einsum, fp8_product,
                                    fp8_weight_einsum, fp8_weight_product, quantize_blocks,
                                    quantize_tiles)
from pallas_kernels.platform import target_platform

Product = Callable[[jax.Array, jax.Array], jax.Array]


MATMUL_FORMATS = ("bf16", "fp8_blockwise", "fp8_tensorwise")
FP8_KERNELS = ("xla", "mosaic_gpu")


@dataclasses.dataclass(frozen=True)
class MatmulFormat:
  """The number format of the model's weight matmuls (hashable; a static layer field).

  name: "bf16" (both operands in the compute ``dtype``, no quantisation; BF16 in V3's recipe),
    "fp8_blockwise" (V3 §3.3: E4M3 with 1x128 activation tiles and 128x128 weight blocks, all
    three GEMMs, f32 accumulation) or "fp8_tensorwise" (E4M3 with one scale per operand: the
    baseline of common FP8 frameworks).
  cache_inputs: keep each FP8 matmul's input for the backward pass as E4M3 tiles + scales
    instead of in ``dtype`` (V3 §3.3.4); FP8 formats only.
  kernel: what runs the blockwise Fprop and Dgrad GEMMs of dense layers: "xla"
    (``quant.fp8.block_scaled_gemm``) or "mosaic_gpu" (``pallas_kernels.fp8_gemm``, Hopper;
    Mosaic GPU's interpreter off GPU). ``model.execution`` chooses it; no effect on the function
    computed beyond f32 summation order.
  Raises ValueError for an unknown name or kernel, or ``cache_inputs`` without FP8.
  """

  name: str = "bf16"
  cache_inputs: bool = False
  kernel: str = "xla"

  def __post_init__(self):
    if self.name not in MATMUL_FORMATS:
      raise ValueError(f"matmul format must be one of {MATMUL_FORMATS}, got {self.name!r}")
    if self.kernel not in FP8_KERNELS:
      raise ValueError(f"FP8 GEMM kernel must be one of {FP8_KERNELS}, got {self.kernel!r}")
    if self.cache_inputs and not self.fp8:
      raise ValueError("cache_inputs (fp8_cache_inputs) needs an FP8 matmul format; set "
                       "matmul_format to fp8_blockwise or fp8_tensorwise")

  @property
  def fp8(self) -> bool:
    """Whether the matmuls quantise to E4M3 (every format but "bf16")."""
    return self.name != "bf16"

  @property
  def scaling(self) -> str:
    """"blockwise" | "tensorwise": ``quant.fp8``'s name of an FP8 format's scaling. Raises
    ValueError for "bf16" (no scaling)."""
    if not self.fp8:
      raise ValueError("matmul format 'bf16' has no FP8 scaling")
    return self.name.split("_", 1)[1]


BF16 = MatmulFormat()


def weight_matmul(eqn: str, x: jax.Array, w, *, dtype, preferred_element_type=None,
                  product: Optional[Product] = None, fmt: Union[str, MatmulFormat] = BF16,
                  chunk_starts: Optional[jax.Array] = None,
                  product_args: tuple = (), fp8_forward: Optional[Product] = None) -> jax.Array:
  """``einsum(eqn, x, w)``: both operands in ``dtype``, or in E4M3 with an FP8 ``fmt``.

  Args:
    eqn: einsum equation, activation operand first, weight second.
    x: activation, any float dtype.
    w: the weight (an ``nnx.Param`` or its value): an array (stored in ``param_dtype``) or a
      ``quant.fp8.Fp8Weight`` (E4M3 values + block scales, see ``_stored_fp8``).
    dtype: compute dtype of both operands ("float32", "bfloat16", ...). The router passes
      float32 (V3 §3.3 keeps gating in high precision).
    preferred_element_type: accumulation / output dtype of the einsum (e.g. float32 for the
      logits); ignored with ``product``, which chooses its own.
    product: replaces the einsum for products that are not one (the grouped expert matmul,
      tile-space expert matmuls), called ``product(x, w, *product_args)``; ``eqn`` then
      documents the contraction. Traced arrays it needs (group sizes, tile groups) go in
      ``product_args``, not in a closure: the FP8 form is a custom VJP.
    fmt: the number format (a ``MatmulFormat`` or its name): "bf16" (the operands in
      ``dtype``), or "fp8_blockwise" / "fp8_tensorwise": all three GEMMs in E4M3
      (``quant.fp8``: V3's 1x128 / 128x128 scaling, or one scale per operand), f32
      accumulation, the result in ``dtype``. With ``product`` the FP8 form is
      ``quant.fp8.fp8_product`` (weights [E, K, N] in blocks per expert).
    chunk_starts: FP8 with ``product``: [rows] bool, where Wgrad's 128-row chunks begin
      (``quant.fp8.chunk_starts``; default every 128 rows).
    fp8_forward: blockwise FP8 with ``product``: a kernel for the Fprop
      (``quant.fp8.fp8_product``'s ``forward_gemm``, e.g. ``mosaic_gpu_grouped_gemm``).
  Returns the product; with the einsum its dtype is ``preferred_element_type`` or ``dtype``.
  Raises ValueError for an unknown ``fmt``, or an FP8 ``fmt`` whose einsum does not contract
  an ``Fp8Weight``'s leading axes.
  """
  fmt = MatmulFormat(fmt) if isinstance(fmt, str) else fmt
  if not isinstance(fmt, MatmulFormat):
    raise ValueError(f"fmt must be a MatmulFormat or one of {MATMUL_FORMATS}, got {fmt!r}")
  x = x.astype(dtype)
  w = w.get_value() if isinstance(w, nnx.Variable) else w  # the stored value, not w[...]
  if isinstance(w, Fp8Weight):
    return _stored_fp8(eqn, x, w, dtype, preferred_element_type, product, fmt, product_args)
  w = w.astype(dtype)
  if fmt.fp8:
    if product is not None:
      return fp8_product(product, x, w, fmt.scaling, chunk_starts, fmt.cache_inputs,
                         product_args, fp8_forward)
    gemm = mosaic_gpu_gemm if fmt.kernel == "mosaic_gpu" else block_scaled_gemm
    return fp8_einsum(eqn, x, w, fmt.scaling, fmt.cache_inputs, gemm)
  return _product(eqn, x, w, preferred_element_type, product, product_args)


def mosaic_gpu_grouped_gemm(x_tiles: jax.Array, w: jax.Array, tile_group: jax.Array) -> jax.Array:
  """The experts' blockwise FP8 Fprop on the Hopper kernel in DeepGEMM's contiguous layout:
  ``x_tiles`` [N, 128, K] (tiles of 128 rows, each of one expert, ``tile_group`` [N] int),
  ``w`` [E, K, F] -> float32 [N, 128, F]; the operands are quantised as ``quant.fp8`` does
  (1x128 tiles, 128x128 blocks per expert). Off GPU it runs in Mosaic GPU's interpreter."""
  from pallas_kernels.fp8_gemm import kernel_mgpu
  n, rows, k = x_tiles.shape
  f = w.shape[-1]
  qa, sa = quantize_tiles(x_tiles.reshape(n * rows, k))
  qw, sw = jax.vmap(quantize_blocks)(w)
  qb, sb = kernel_mgpu.weight_from_kn(qw, sw)
  out = kernel_mgpu.fp8_grouped_gemm(qa, sa, qb, sb, tile_group.astype(jnp.int32),
                                     out_dtype=jnp.float32, interpret=target_platform() != "gpu")
  return out[:, :f].reshape(n, rows, f)


def mosaic_gpu_gemm(qa: jax.Array, sa: jax.Array, qw: jax.Array, sw: jax.Array) -> jax.Array:
  """``quant.fp8.block_scaled_gemm`` on the Hopper kernel (``pallas_kernels.fp8_gemm``):
  ``qa`` [M, Kp] E4M3, ``sa`` [M, Kp/128], ``qw`` [Kp, Np] E4M3, ``sw`` [Kp/128, Np/128] ->
  float32 [M, Np]. The kernel reads the weight K-contiguous ([Np, Kp], a transpose XLA fuses
  into the quantiser). Off GPU it runs in Mosaic GPU's interpreter (tests)."""
  from pallas_kernels.fp8_gemm import kernel_mgpu
  qb, sb = kernel_mgpu.weight_from_kn(qw, sw)
  return kernel_mgpu.fp8_gemm(qa, sa, qb, sb, out_dtype=jnp.float32,
                              interpret=target_platform() != "gpu")


def _product(eqn, x, w, preferred_element_type, product, product_args=()):
  """The contraction itself, on operands already in the compute dtype."""
  if product is not None:
    return product(x, w, *product_args)
  merged, lead = _merge_leading_axes(eqn)
  if lead < 2:
    return jnp.einsum(eqn, x, w, preferred_element_type=preferred_element_type)
  out = jnp.einsum(merged, x.reshape((math.prod(x.shape[:lead]),) + x.shape[lead:]), w,
                   preferred_element_type=preferred_element_type)
  return out.reshape(x.shape[:lead] + out.shape[1:])


def _merge_leading_axes(eqn: str) -> tuple[str, int]:
  """("BTD,DF->BTF") -> ("MD,DF->MF", 2): the activation's ``lead`` leading axes that the
  weight does not have and the output keeps in front, in the same order, merged into one row
  axis M (a free reshape of x and of the result). XLA:CPU runs the 2-D products, and above all
  their weight gradients (a contraction over B and T), far faster: a dense SwiGLU's forward +
  backward took 44 ms with [B, T, D] operands and 28 ms with [B*T, D] (small preset shapes)."""
  lhs, rest = eqn.replace(" ", "").split(",")
  rhs, out = rest.split("->")
  lead = 0
  while (lead < min(len(lhs), len(out)) and lhs[lead] == out[lead] and lhs[lead] not in rhs
         and lhs[lead].isalpha()):
    lead += 1
  row = next(c for c in "MRZYXWQ" if c not in eqn)
  return f"{row}{lhs[lead:]},{rhs}->{row}{out[lead:]}", lead


def _stored_fp8(eqn, x, w: Fp8Weight, dtype, preferred_element_type, product, fmt,
                product_args):
  """An ``Fp8Weight`` meets the activation ``x`` (already in ``dtype``):

    bf16            w dequantised to ``dtype`` (q * scale in f32, then cast), then the product
                    as for any weight (DeepSeek's inference on its BF16 GEMM path);
    fp8_blockwise   the stored blocks as they are: ``quant.fp8.fp8_weight_einsum`` (x in 1 x bk
                    tiles, ``scaled_dot``), or with ``product`` ``fp8_weight_product`` (x
                    through 1 x bk tiles, w's exact values in f32); the weight is never
                    re-quantised;
    fp8_tensorwise  w dequantised to f32 and run as any weight in that format (one scale per
                    operand replaces the blocks).

  FP8 forms are inference-only (``cache_inputs`` and Wgrad chunks do not apply)."""
  if not fmt.fp8:
    return _product(eqn, x, w.dequantize(dtype), preferred_element_type, product, product_args)
  if fmt.scaling == "tensorwise":
    w32 = w.dequantize(jnp.float32)
    if product is not None:
      return fp8_product(product, x, w32, "tensorwise", None, False, product_args)
    return fp8_einsum(eqn, x, w32, "tensorwise")
  if product is not None:
    return fp8_weight_product(product, x, w, product_args)
  return fp8_weight_einsum(eqn, x, w)
