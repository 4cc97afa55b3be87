"""Mesh sizes and logical-axis sharding rules."""

import jax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.transformer import abstract_model
from deepseek_jax.parallel.mesh import MESH_AXES, batch_shards, make_mesh, resolve_mesh_shape
from deepseek_jax.parallel.partitioning import RULE_SETS, get_rules, logical_to_spec, state_shardings


def test_minus_one_fills_the_remaining_devices():
  assert resolve_mesh_shape(dict(data=2, fsdp=-1, expert=2), 8) == (1, 2, 2, 2, 1)
  assert resolve_mesh_shape(dict(fsdp=-1), 8) == (1, 1, 8, 1, 1)


@pytest.mark.parametrize("shape, match", [
    (dict(fsdp=-1, data=-1), "only one axis"),
    (dict(data=3, fsdp=-1), "does not divide"),
    (dict(data=2, fsdp=2), "uses 4 devices but 8"),
    (dict(pipeline=2), "unknown axes"),
    (dict(data=0, fsdp=-1), "mesh.data=0"),
])
def test_bad_mesh_sizes_are_rejected_with_the_axis_named(shape, match):
  with pytest.raises(ValueError, match=match):
    resolve_mesh_shape(shape, 8)


def test_mesh_has_the_four_named_axes_over_all_devices():
  mesh = make_mesh(dict(data=2, fsdp=2, expert=2))
  assert mesh.axis_names == MESH_AXES and mesh.devices.size == jax.device_count() == 8
  assert batch_shards(mesh) == 8


def test_rules_map_logical_axes_once_per_array():
  mesh = make_mesh(dict(fsdp=2, expert=2, tensor=2))
  rules = get_rules("fsdp")
  assert logical_to_spec(("expert", "embed", "expert_mlp"), rules, mesh) == P("expert", "fsdp", "tensor")
  assert logical_to_spec(("batch", None), rules, mesh) == P(("fsdp", "expert"), None)  # size-1 axes dropped
  assert logical_to_spec(("heads", "mlp"), rules, mesh) == P("tensor", None)  # tensor already used
  assert logical_to_spec(("embed",), get_rules("replicated"), mesh) == P(None)


def test_non_divisible_dims_are_replicated_and_unknown_names_rejected():
  mesh = make_mesh(dict(fsdp=8))
  rules = get_rules("fsdp")
  assert logical_to_spec(("embed",), rules, mesh, shape=(12,)) == P(None)
  assert logical_to_spec(("embed",), rules, mesh, shape=(16,)) == P("fsdp")
  with pytest.raises(ValueError, match="no rule"):
    logical_to_spec(("bogus",), rules, mesh)
  with pytest.raises(ValueError, match="unknown"):
    get_rules("zero-4")


@pytest.mark.parametrize("rules", sorted(RULE_SETS))
def test_every_parameter_of_the_model_gets_a_sharding(rules):
  mesh = make_mesh(dict(data=2, fsdp=2, expert=2))
  cfg = ModelConfig.preset("tiny")
  state = nnx.state(abstract_model(cfg))
  shardings = state_shardings(state, mesh, get_rules(rules))
  leaves = jax.tree.leaves(shardings)
  assert len(leaves) == len(jax.tree.leaves(state))
  experts = shardings["moe_layers"]["ffn"]["w_gate"].get_value().spec
  # stacked layers lead, then experts / d_model / expert hidden
  assert experts == (P(None, "expert", "fsdp", None) if rules.startswith("fsdp") else
                     P(None, "expert", None, None) if rules == "tensor" else P(None, None, None, None))
  if rules == "fsdp_latent":  # the MLA up-projections split along their latent dim
    layer = shardings["moe_layers"]["attention"]
    assert layer["w_uk"].get_value().spec == P(None, "fsdp", None, None)
    assert layer["query"]["wq_b"].get_value().spec == P(None, "fsdp", None, None)
    assert layer["wkv_a"].get_value().spec == P(None, "fsdp", None)  # d_model took fsdp


def test_params_carry_flax_sharding_metadata_that_get_partition_spec_reads():
  """RL libraries reshard policy / reference models with nnx.get_partition_spec; with our rules
  as Flax logical-axis rules it gives the specs the train step uses."""
  cfg = ModelConfig.preset("tiny")
  params = nnx.state(abstract_model(cfg), nnx.Param)
  logical = nnx.get_partition_spec(params)
  spec = dict(nnx.to_flat_state(logical))
  assert spec[("moe_layers", "ffn", "w_gate")].get_value() == P("layers", "expert", "embed",
                                                                "expert_mlp")
  assert spec[("embed", "embedding")].get_value() == P("vocab", "embed")
  from deepseek_jax.parallel.partitioning import axis_rules
  mesh = make_mesh(dict(fsdp=2, expert=2, tensor=2))  # divides every tiny dim
  with nnx.logical_axis_rules(axis_rules("fsdp")):
    flax_specs = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
  ours = dict(nnx.to_flat_state(state_shardings(params, mesh, get_rules("fsdp"))))
  params_flat = dict(nnx.to_flat_state(params))
  for path, sharding in ours.items():  # equal up to axes of size 1 (the stage axis here)
    flax_sharding = NamedSharding(mesh, flax_specs[path].get_value())
    ndim = len(params_flat[path].get_value().shape)
    assert flax_sharding.is_equivalent_to(sharding.get_value(), ndim), path


def test_dims_the_mesh_does_not_divide_are_listed_and_summarised_in_one_line():
  from deepseek_jax.parallel.partitioning import replicated_dims, replication_summary
  cfg = ModelConfig.preset("tiny")
  params = nnx.state(abstract_model(cfg), nnx.Param)
  mesh = make_mesh(dict(fsdp=1, tensor=8))
  found = replicated_dims(params, mesh, get_rules("fsdp"))
  names = {r.name for r in found}
  # tiny: 4 heads and 8 experts' 32-wide FFN split 8 ways would not all divide
  assert "dense_layers.attention.wo" in names and "moe_layers.ffn.w_gate" not in names
  assert all(r.mesh_axes == ("tensor",) and r.size % 8 for r in found)
  line = replication_summary(found)
  assert line.startswith(f"{len(names)} weight(s) keep {len(found)} dim(s) whole")
  assert "\n" not in line and "tensor=8" in line
  assert replication_summary(replicated_dims(params, make_mesh(dict(fsdp=8)),
                                             get_rules("fsdp"))) is None
