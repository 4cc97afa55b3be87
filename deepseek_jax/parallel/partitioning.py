"""Sharding as data: logical axis names -> mesh axes, chosen by rule-set name.

Every parameter carries logical axis names as Flax's standard sharding metadata
(``model.layers.param``; ``nnx.get_partition_spec`` returns them), and layer stacks add a
leading "layers" axis (``nnx.vmap``'s ``transform_metadata``). ``axis_rules(name)`` gives the
same table in Flax's ``logical_axis_rules`` form, for libraries that reshard with it. A rule set maps each logical name to a mesh axis (or a
tuple of them, or None = replicated). The same table places parameters, optimizer moments and
the batch. A dimension that its mesh axes do not divide is replicated instead, and reported.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseek_jax.parallel.mesh import BATCH_AXES

Rules = Mapping[str, Any]


class Replicated(NamedTuple):
  """A dimension left whole because its mesh axes do not divide it."""

  name: str  # the array's path
  dim: int
  logical: str
  size: int
  mesh_axes: tuple
  ways: int

  def __str__(self) -> str:
    return f"{self.name} dim {self.dim} ({self.logical}={self.size}, {'x'.join(self.mesh_axes)}={self.ways})"

_SHARED = {"batch": BATCH_AXES, "length": None, "layers": "stage", "norm": None, "q_lora": None,
           "kv_lora": None, "head_dim": None}

RULE_SETS: dict[str, Rules] = {
    # ZeRO-3 style: d_model split over fsdp, experts over expert, heads / FFN over tensor.
    "fsdp": {**_SHARED, "embed": "fsdp", "vocab": "tensor", "heads": "tensor",
             "kv_heads": "tensor", "mlp": "tensor", "expert": "expert", "expert_mlp": "tensor"},
    # fsdp, and the MLA up-projections (wq_b, w_uk, w_uv: no d_model dim) split over fsdp along
    # their latent dim; at V3's size they are 12 GiB per chip in f32 when left whole (the
    # recommended TPU rules, docs/tpu_pods.md). Not expressible as Flax logical-axis rules
    # (``axis_rules``): wq_a / wkv_a carry d_model and a latent dim, and ``logical_to_spec``
    # gives fsdp to the first of them only.
    "fsdp_latent": {**_SHARED, "embed": "fsdp", "vocab": "tensor", "heads": "tensor",
                    "kv_heads": "tensor", "mlp": "tensor", "expert": "expert",
                    "expert_mlp": "tensor", "q_lora": "fsdp", "kv_lora": "fsdp"},
    # No weight sharding on d_model: tensor + expert parallelism only (Megatron-like).
    "tensor": {**_SHARED, "embed": None, "vocab": "tensor", "heads": "tensor",
               "kv_heads": "tensor", "mlp": "tensor", "expert": "expert", "expert_mlp": "tensor"},
    # Pure data parallelism: every weight replicated.
    "replicated": {**_SHARED, "embed": None, "vocab": None, "heads": None, "kv_heads": None,
                   "mlp": None, "expert": None, "expert_mlp": None},
}


def get_rules(name: str) -> Rules:
  if name not in RULE_SETS:
    raise ValueError(f"partitioning rules {name!r} unknown; choose one of {sorted(RULE_SETS)}")
  return RULE_SETS[name]


def logical_to_spec(axes: Sequence[Optional[str]], rules: Rules, mesh: Mesh,
                    shape: Optional[Sequence[int]] = None, name: str = "",
                    replicated: Optional[list] = None) -> PartitionSpec:
  """PartitionSpec for logical ``axes``; each mesh axis is used at most once per array.

  A dim of ``shape`` that its mesh axes do not divide stays whole; with ``replicated`` (a list)
  each such dim is appended as a ``Replicated`` record. Raises ValueError for a logical name
  the rules do not know.
  """
  used: set[str] = set()
  spec = []
  for dim, logical in enumerate(axes):
    if logical is None:
      spec.append(None)
      continue
    if logical not in rules:
      raise ValueError(f"logical axis {logical!r} of {name or 'an array'} has no rule; "
                       f"known: {sorted(rules)}")
    target = rules[logical]
    mesh_axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    ways = 1
    for a in mesh_axes:
      ways *= mesh.shape[a]
    if shape is not None and mesh_axes and shape[dim] % ways:
      if replicated is not None:
        replicated.append(Replicated(name, dim, logical, shape[dim], mesh_axes, ways))
      mesh_axes = ()
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _variable_axes(variable: nnx.Variable) -> tuple:
  """The logical axis names of a variable (Flax's sharding metadata); all None without them."""
  axes = tuple(variable.get_metadata().get("out_sharding") or ())
  if axes and len(axes) != len(variable.shape):
    raise ValueError(f"sharding metadata {axes} does not match the shape {variable.shape}")
  return axes or (None,) * len(variable.shape)


def axis_rules(name: str) -> tuple[tuple[str, Any], ...]:
  """Rule set ``name`` as Flax logical-axis rules: ``with nnx.logical_axis_rules(axis_rules(
  "fsdp")): nnx.get_partition_spec(state)`` gives mesh PartitionSpecs (without the
  divisibility check that ``state_shardings`` adds)."""
  return tuple(get_rules(name).items())


def state_shardings(state, mesh: Mesh, rules: Rules, replicated: Optional[list] = None):
  """The state's tree with each Variable holding its NamedSharding (same structure as the
  state, so it serves as jit in/out shardings and as orbax restore targets). Dims left whole
  are appended to ``replicated`` (see ``logical_to_spec``)."""

  def one(path, variable):
    spec = logical_to_spec(_variable_axes(variable), rules, mesh, variable.shape,
                           _path_name(path), replicated)
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def _path_name(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def replicated_dims(state, mesh: Mesh, rules: Rules) -> list[Replicated]:
  """Every dim of ``state``'s variables that stays whole because its mesh axes do not divide it."""
  found: list[Replicated] = []
  state_shardings(state, mesh, rules, found)
  return found


def replication_summary(found: Sequence[Replicated], limit: int = 4) -> Optional[str]:
  """One line naming the replicated dims (None when there are none): what a run prints at
  start-up, so a mesh that silently stops sharding some weights is seen."""
  if not found:
    return None
  arrays = sorted({r.name for r in found})
  shown = "; ".join(str(r) for r in found[:limit])
  more = f"; ... {len(found) - limit} more" if len(found) > limit else ""
  return (f"{len(arrays)} weight(s) keep {len(found)} dim(s) whole because their mesh axes do "
          f"not divide them: {shown}{more}")


def placement(state, mesh: Optional[Mesh] = None, rules: str = "fsdp"):
  """``state_shardings`` under the named ``rules`` with a mesh; every leaf on the first device
  without one."""
  if mesh is not None:
    return state_shardings(state, mesh, get_rules(rules))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda v: v.replace(device), state, is_leaf=_is_variable)


def tree_shardings_like(tree, params, param_shardings, mesh: Mesh):
  """Shardings for a tree (optimizer state) whose subtrees may mirror ``params``: those get
  the parameter shardings, every other leaf is replicated."""
  params_def = jax.tree.structure(params)
  replicated = NamedSharding(mesh, PartitionSpec())

  def visit(node):
    if jax.tree.structure(node) == params_def:
      return param_shardings
    return jax.tree.map(lambda _: replicated, node)

  return jax.tree.map(visit, tree, is_leaf=lambda n: jax.tree.structure(n) == params_def)


# How activations around a Pallas call are split (a kernel runs per shard, on whole heads).
KERNEL_RULES = {"batch": BATCH_AXES, "heads": "tensor"}


def per_shard(fn, logical_axes, *args):
  """``fn(*args)`` per shard of the context mesh: XLA cannot partition a Pallas call.

  ``logical_axes[i]`` names arg i's dims ("batch", "heads" or None); they split as
  ``KERNEL_RULES`` split them (batch over the batch axes, heads over "tensor", a dim its mesh
  axes do not divide stays whole). The output is laid out like ``args[0]``. Without a
  multi-device context mesh this is ``fn(*args)``.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  specs = tuple(logical_to_spec(axes, KERNEL_RULES, mesh, arg.shape)
                for axes, arg in zip(logical_axes, args))
  return jax.shard_map(fn, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Arrays [batch, ...] of any rank >= 1 (tokens [B, T], per-sequence values [B]): the batch
  dim over the batch axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",), rules, mesh))
