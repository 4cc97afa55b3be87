r"""Ahead-of-time TPU compile of the expert-parallel MoE layer on a host without a TPU: lowers and
compiles jit(value_and_grad(loss wrt params)) of one ``MoE`` (the small preset's shapes) for a
TPU topology description, then reports whether the HLO holds the ``ragged-all-to-all`` exchange
and the megablox Mosaic kernel, and the compiled memory analysis.

    python experiments/aot_moe_tpu.py                                  # v5p:2x2x2, 8-way EP
    python experiments/aot_moe_tpu.py --grouped_matmul=ragged_dot
    python experiments/aot_moe_tpu.py --topology=v5e:2x2 --ep=4

Needs libtpu for the compiler (``pip install "jax[tpu]==<jax version>"``, e.g. in a separate
venv; no TPU device is used). The TPU backend is not the default one here, so the library must
decide TPU-vs-CPU paths from the context mesh's devices (``mesh.target_platform``), not from
``jax.default_backend()``. XLA:TPU rewrites ``ragged_dot`` into its own Mosaic kernels
("ragged-dot-*"), so no ragged-dot HLO op is left after compilation.
"""

from __future__ import annotations

import re

import numpy as np

from absl import app, flags

_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x2", "TPU topology name (v5p:2x2x2 = 8 chips)")
_EP = flags.DEFINE_integer("ep", 0, "expert-axis size (0: every device); data takes the rest")
_GMM = flags.DEFINE_enum("grouped_matmul", "megablox", ["megablox", "ragged_dot", "auto"],
                         "grouped matmul implementation")
_EXCHANGE = flags.DEFINE_enum("exchange", "ragged", ["ragged", "padded", "auto"],
                              "expert exchange")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences")
_SEQ = flags.DEFINE_integer("seq_len", 256, "tokens per sequence")
_PRESET = flags.DEFINE_string("preset", "small", "model preset whose MoE shapes are used")
_DUMP = flags.DEFINE_string("dump_hlo", None, "write the compiled HLO text here")


def _moe(cfg, rngs, mesh):
  """The preset's MoE layer, executed as ``resolve_execution`` decides for the TPU mesh (the
  --grouped_matmul / --exchange flags override its choices unless they say auto)."""
  import dataclasses
  from deepseek_jax.model.moe import MoE
  from deepseek_jax.model.execution import resolve_execution
  from deepseek_jax.model.transformer import moe_specs
  experts, routing, balance, dispatch = moe_specs(cfg, resolve_execution(cfg, mesh))
  overrides = {k: v for k, v in (("grouped_matmul", _GMM.value), ("exchange", _EXCHANGE.value))
               if v != "auto"}
  dispatch = dataclasses.replace(dispatch, **overrides)
  return MoE(cfg.d_model, experts, routing=routing, balance=balance, dispatch=dispatch,
             init_std=cfg.init_std, dtype="bfloat16", param_dtype=cfg.param_dtype, rngs=rngs)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.experimental import topologies
  from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

  from deepseek_jax.config import ModelConfig
  from deepseek_jax.parallel.mesh import BATCH_AXES, MESH_AXES, target_platform

  devices = topologies.get_topology_desc(platform="tpu", topology_name=_TOPOLOGY.value).devices
  n = len(devices)
  ep = _EP.value or n
  mesh = Mesh(np.asarray(devices).reshape(1, n // ep, 1, ep, 1), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))
  print(f"topology {_TOPOLOGY.value}: {n} devices, kinds {sorted({d.device_kind for d in devices})}"
        f", processes {sorted({d.process_index for d in devices})}; default backend "
        f"{jax.default_backend()}; mesh {dict(mesh.shape)}")

  cfg = ModelConfig.preset(_PRESET.value)
  model = nnx.eval_shape(lambda: _moe(cfg, nnx.Rngs(0), mesh))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def sharded(x, spec):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

  expert_weights = {"w_gate", "w_up", "w_down"}
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: sharded(x, P("expert") if str(getattr(path[0], "key", "")) in expert_weights
                              else P()), params)
  rest = jax.tree.map(lambda x: sharded(x, P()), rest)
  x = sharded(jax.ShapeDtypeStruct((_BATCH.value, _SEQ.value, cfg.d_model), jnp.bfloat16),
              P(BATCH_AXES))

  def loss_fn(params, rest, x):
    y, stats = nnx.merge(graphdef, params, rest)(x)
    aux = stats["expert_balance"] + stats["device_balance"] + stats["comm_balance"]
    return jnp.mean(jnp.square(y.astype(jnp.float32))) + aux

  step = jax.jit(jax.value_and_grad(loss_fn))
  with jax.set_mesh(mesh):
    print(f"target_platform() under the mesh: {target_platform()}")
    lowered = step.lower(params, rest, x)
    compiled = lowered.compile()
  hlo = compiled.as_text()
  if _DUMP.value:
    with open(_DUMP.value, "w") as f:
      f.write(hlo)
  print(f"compiled OK (grouped_matmul={_GMM.value}, exchange={_EXCHANGE.value})")
  for name in ("ragged-all-to-all", "all-to-all", "ragged-dot"):
    count = len(re.findall(rf" {re.escape(name)}(-start)?\(", hlo))
    print(f"  HLO {name} ops: {count}")
  targets = re.findall(r'custom_call_target="([^"]+)"', hlo)
  print(f"  custom-call targets: { {t: targets.count(t) for t in sorted(set(targets))} }")
  kernels = re.findall(r'%([\w.-]+?)(?:\.\d+)? = [^\n]*custom_call_target="tpu_custom_call"', hlo)
  print(f"  Mosaic (tpu_custom_call) kernels by HLO name: "
        f"{ {k: kernels.count(k) for k in sorted(set(kernels))} }")
  mem = compiled.memory_analysis()
  for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                "alias_size_in_bytes", "generated_code_size_in_bytes"):
    print(f"  memory {field}: {getattr(mem, field, None)}")


if __name__ == "__main__":
  app.run(main)
