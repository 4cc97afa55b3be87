"""How a model runs, decided once: kernels or XLA, local or expert-parallel MoE dispatch.

None of these choices changes the function computed (up to float rounding, and an
expert-parallel receive buffer that overflows, which is counted). They depend on the platform
being compiled for and on the mesh, so ``resolve_execution`` decides them once, from the
config and the mesh it is given, and the model's layers hold the result as plain fields:
nothing inside a layer's ``__call__`` looks at the ambient mesh to choose an algorithm. The
trainer prints ``Execution.summary()`` once at start-up; ``set_execution`` switches a built
model (e.g. a training model used for sampling on one device).

    execution = resolve_execution(cfg, mesh)            # mesh=None: the default device
    model = create_model(cfg, execution=execution)
    print(execution.summary())
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from flax import nnx
import jax
from jax.sharding import Mesh

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.attention import GroupedQueryAttention, check_kernel_choice
from deepseek_jax.model.mla import MultiHeadLatentAttention
from deepseek_jax.model.moe import MoE, set_layer_placement
from deepseek_jax.ops.grouped_matmul import resolve_impl
from deepseek_jax.ops.matmul import MatmulFormat
from deepseek_jax.parallel import eplb
from deepseek_jax.parallel.expert_parallel import ExpertPlacement, resolve_exchange
from deepseek_jax.quant.fp8 import BLOCK as FP8_BLOCK, fp8_execution
from pallas_kernels.platform import target_platform, warn_fallback


@dataclasses.dataclass(frozen=True)
class Execution:
  """The resolved execution choices of a model (all hashable, static).

  platform: what the program is compiled for ("cpu" | "gpu" | "tpu").
  attention: "xla" | "pallas" for attention without a cache (training, packed prefill).
  decode_attention: "xla" | "pallas" for decoding 1-2 tokens per row over the latent cache.
  moe_dispatch: "local" | "expert_parallel" (the mesh's expert axis > 1).
  grouped_matmul: "tiled" | "ragged_dot" | "megablox" | "tokamax" (the routed experts).
  expert_exchange: "ragged" | "padded" (expert-parallel all-to-all).
  expert_placement: ``ExpertPlacement``, the expert -> physical weight-slot table, which fixes
    each expert's shard(s) (None = identity), redundant experts included (EPLB:
    ``ExpertPlacement.from_eplb(eplb_placement, layer)``); set it with
    ``dataclasses.replace(execution, expert_placement=...)``. One static table for every MoE
    layer (the scanned stack shares one layer's code): balance it on the load summed over
    layers. For each layer its own table (better when the layers' hot experts differ), leave
    this None and install a per-layer EPLB placement with ``set_expert_placement``.
  matmul: the weight matmuls' number format and, for FP8, how the platform runs it
    (``quant.fp8.fp8_execution``); for the log only.
  fp8_kernel: "xla" | "mosaic_gpu": what runs the dense layers' blockwise FP8 Fprop / Dgrad
    GEMMs (``ops.matmul.MatmulFormat.kernel``): the Hopper kernel on one Hopper GPU.
  """

  platform: str
  attention: str
  decode_attention: str
  moe_dispatch: str
  grouped_matmul: str
  expert_exchange: str
  expert_placement: Optional[ExpertPlacement] = None
  matmul: str = "bf16"
  fp8_kernel: str = "xla"

  def summary(self) -> str:
    """One line for the start-up log."""
    moe = self.moe_dispatch
    if moe == "expert_parallel":
      moe += f" ({self.expert_exchange} exchange"
      placement = self.expert_placement
      if placement is not None and not placement.is_identity:
        moe += (f", {placement.n_slots} expert slots for {placement.n_experts} experts"
                if placement.is_redundant else ", permuted experts")
      moe += ")"
    return (f"{self.platform}: attention {self.attention}, decode {self.decode_attention}, "
            f"MoE {moe}, grouped matmul {self.grouped_matmul}, matmuls {self.matmul}")


def _platform(mesh: Optional[Mesh]) -> str:
  """The mesh's platform (an ahead-of-time TPU topology on a CPU host is "tpu"); without one,
  the platform being compiled for (``target_platform``)."""
  return target_platform() if mesh is None else mesh.devices.flat[0].platform


def resolve_execution(cfg: ModelConfig, mesh: Optional[Mesh] = None, *,
                      expert_parallel: Optional[bool] = None) -> Execution:
  """The execution of ``cfg`` on ``mesh`` (None: one device of the default backend).

  attention_impl "auto" means the Pallas kernels on TPU and GPU and XLA on CPU; "pallas" on
  CPU runs them in interpret mode. The decode kernel has no per-shard wrapper, so it is used
  only without a multi-device mesh. MoE dispatch is expert-parallel when the mesh's expert
  axis is > 1 (``expert_parallel=False`` forces local dispatch, e.g. for sampling with small
  batches). The expert placement is the identity; another table (a permutation, or redundant
  experts from EPLB: ``ExpertPlacement.from_eplb``) is given with
  ``dataclasses.replace(execution, expert_placement=...)``; the layers check it against the
  mesh when they trace. Raises ValueError
  for an expert axis that does not divide the routed experts, and for ``fp8_blockwise`` expert
  parallelism whose tensor axis cuts the expert hidden dim into shards that are not whole
  128-wide blocks.
  """
  platform = _platform(mesh)
  multi_device = mesh is not None and mesh.size > 1
  kernels = cfg.attention_impl == "pallas" or (cfg.attention_impl == "auto"
                                               and platform in ("tpu", "gpu"))
  expert_axis = 1 if mesh is None else mesh.shape.get("expert", 1)
  ep = expert_axis > 1 if expert_parallel is None else expert_parallel
  if ep and cfg.n_moe_layers and cfg.n_routed_experts % expert_axis:
    raise ValueError(f"n_routed_experts={cfg.n_routed_experts} must be divisible by the mesh's "
                     f"expert axis ({expert_axis}); change mesh.expert or the number of experts")
  tensor = 1 if mesh is None else mesh.shape.get("tensor", 1)
  shard_f = cfg.moe_ffn_dim // tensor
  if (ep and cfg.n_moe_layers and cfg.matmul_format == "fp8_blockwise" and tensor > 1
      and cfg.moe_ffn_dim % tensor == 0 and shard_f % FP8_BLOCK):
    # Inside shard_map each shard quantises its own slice of the expert hidden dim F.
    raise ValueError(
        f"matmul_format='fp8_blockwise' with expert parallelism splits each expert's hidden dim "
        f"moe_ffn_dim={cfg.moe_ffn_dim} over the mesh's tensor axis ({tensor}) into shards of "
        f"{shard_f}, not a multiple of {FP8_BLOCK}: the 128x128 weight blocks and 1x128 tiles "
        f"would straddle shards; use a tensor axis that leaves multiples of {FP8_BLOCK} "
        f"(or mesh.tensor=1), or matmul_format='fp8_tensorwise' / 'bf16'")
  # Outside shard_map on a multi-device mesh XLA partitions the grouped matmul itself.
  grouped = resolve_impl(cfg.grouped_matmul, platform=platform,
                         partitioned=multi_device and not ep)
  exchange = resolve_exchange(cfg.expert_exchange, platform)
  matmul, fp8_kernel = cfg.matmul_format, "xla"
  if cfg.matmul_format != "bf16":
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    matmul += f" ({fp8_execution(platform, device.device_kind)})"
    if cfg.fp8_cache_inputs:
      matmul += " + FP8 input caching"
    if cfg.matmul_format == "fp8_blockwise" and platform == "gpu":
      hopper = str(getattr(device, "compute_capability", "")).startswith("9")
      if hopper and not multi_device:
        fp8_kernel = "mosaic_gpu"
        matmul = f"{cfg.matmul_format} (Mosaic GPU block-scaled kernel for Fprop/Dgrad)" + (
            " + FP8 input caching" if cfg.fp8_cache_inputs else "")
      else:
        warn_fallback("FP8 GEMM", "the Mosaic GPU kernel needs one Hopper GPU (sm_90a) and no "
                      "XLA-partitioned mesh" if hopper else f"{device.device_kind} is not Hopper")
  return Execution(platform=platform, attention="pallas" if kernels else "xla",
                   decode_attention="pallas" if kernels and not multi_device else "xla",
                   moe_dispatch="expert_parallel" if ep and cfg.n_moe_layers else "local",
                   grouped_matmul=grouped, expert_exchange=exchange, matmul=matmul,
                   fp8_kernel=fp8_kernel)


def set_execution(model: nnx.Module, execution: Execution) -> nnx.Module:
  """Apply ``execution`` to every layer of ``model`` in place (weights untouched); returns it.

  Use it to run a model built for one execution under another, e.g. a training model
  (expert-parallel) for sampling (local). ``nnx.split`` afterwards gives the matching graphdef.
  Raises ValueError for an unknown kernel choice, dispatch mode, grouped matmul or exchange.
  """
  for _, node in nnx.iter_graph(model):
    fmt = getattr(node, "matmul_format", None)
    if isinstance(fmt, MatmulFormat) and fmt.kernel != execution.fp8_kernel:
      node.matmul_format = dataclasses.replace(fmt, kernel=execution.fp8_kernel)
    if isinstance(node, (MultiHeadLatentAttention, GroupedQueryAttention)):
      node.attention_impl = check_kernel_choice("attention", execution.attention)
      if isinstance(node, MultiHeadLatentAttention):
        node.decode_impl = check_kernel_choice("decode_attention", execution.decode_attention)
    elif isinstance(node, MoE):
      node.dispatch = dataclasses.replace(
          node.dispatch, mode=execution.moe_dispatch, grouped_matmul=execution.grouped_matmul,
          exchange=execution.expert_exchange, placement=execution.expert_placement).resolved()
  if hasattr(model, "execution"):
    model.execution = execution
  return model


def set_expert_placement(model: nnx.Module, placement: Optional[eplb.Placement],
                         mesh: Optional[Mesh] = None) -> nnx.Module:
  """Install a per-layer EPLB placement (``eplb.rebalance_experts``) into a built model, in
  place; returns it. Each MoE layer gets its own table, the scanned stack keeps scanning:

      load = np.asarray(metrics["moe_load"])     # [n_moe_layers + n_mtp_modules, E]
      placement = eplb.rebalance_experts(load, n_slots, cfg.n_expert_groups, 1, expert_axis)
      set_expert_placement(model, placement, mesh)

  ``model``: a ``DeepSeekModel``, whose MoE stack takes rows 0..L-1 in order and whose MTP
  modules (if MoE) take the rows after them, one each, when ``placement`` has them (the order
  of the trainer's ``moe_load``); or a stack of blocks (``stack_blocks``) or an ``MoE`` layer
  (``moe.set_layer_placement``). None removes the tables everywhere (the identity again).
  ``Execution.expert_placement`` (one static table) must be None. With ``mesh`` the tables are
  checked against its expert axis now, else when the layers trace. Raises ValueError (one
  line, before compiling) for a row count other than the MoE stack's (or stack plus MTP
  modules'), and as ``set_layer_placement`` does: replicas that do not add up to the slots,
  another expert count, slots the expert axis does not divide, tables balanced for another
  shard count.
  """
  if isinstance(model, MoE):
    return set_layer_placement(model, placement, mesh)
  if not hasattr(model, "moe_layers"):  # a stack of blocks
    set_layer_placement(model.ffn, placement, mesh)
    return model
  stack = model.moe_layers
  mtp = [m.block.ffn for m in getattr(model, "mtp", ()) if isinstance(m.block.ffn, MoE)]
  if placement is None:
    for layer in ([stack.ffn] if stack is not None else []) + mtp:
      set_layer_placement(layer, None)
    return model
  n_stack = 0 if stack is None else stack.ffn.gate.shape[0]
  if placement.n_layers not in (n_stack, n_stack + len(mtp)) or not n_stack:
    raise ValueError(f"the EPLB placement has {placement.n_layers} layers, the model "
                     f"{n_stack} MoE layers and {len(mtp)} MTP MoE layers; give "
                     f"{n_stack} (the stack) or {n_stack + len(mtp)} (stack, then MTP) rows")
  set_layer_placement(stack.ffn, placement.rows(0, n_stack), mesh)
  if placement.n_layers > n_stack:
    for i, layer in enumerate(mtp):
      set_layer_placement(layer, placement.rows(n_stack + i, n_stack + i + 1), mesh)
  return model
