r"""Ahead-of-time compile of the FULL train step for a Cloud TPU slice, on a host without a TPU:
does a preset fit the chips' HBM with a given mesh, rule set, batch and remat policy?

The step is exactly the trainer's (``train.step.abstract_train_state`` + ``jit_train_step``:
forward, backward, grad accumulation, clipping, AdamW, router-bias update) lowered against
abstract, sharded inputs and compiled by XLA:TPU for the topology's devices; nothing is
allocated. It prints the mesh, the parameter count, the compiled per-device memory (arguments,
outputs, temporaries, aliased, generated code) against the chip's HBM, and the compile time.

    python experiments/aot_train_tpu.py --preset=small --topology=v5p:2x2x2 --mesh=fsdp=-1,expert=8
    python experiments/aot_train_tpu.py --preset=deepseek-v2-lite --topology=v5p:2x2x2 \
        --mesh=fsdp=-1,expert=8 --batch=16 --seq_len=4096 --remat=full
    python experiments/aot_train_tpu.py --preset=deepseek-v3 --topology=v5p:8x8x16 \
        --mesh=fsdp=-1,expert=64 --rules=fsdp_latent --batch=1024 \
        --seq_len=4096 --remat=full --moment_dtype=bfloat16 \
        --override=expert_buffer_factor=2.0 --json_out=/tmp/v3.json
    python experiments/aot_train_tpu.py --preset=deepseek-v2-lite --topology=v5p:2x2x2 \
        --mesh=stage=2,fsdp=1,expert=4 --schedule=dualpipe --batch=16 --remat=full  # pipelined

Needs libtpu (``pip install "jax[tpu]==<jax version>"``; no TPU is used). Memory is
``argument + output - alias + temp + generated code`` per device (donated state aliases its
output), compared with the HBM of the chip named by the topology's ``device_kind`` (table
``HBM_GIB``; ``--hbm_gib`` overrides). The recommended meshes and their numbers are in
docs/tpu_pods.md.
"""

from __future__ import annotations

import json
import time
from typing import Optional

from absl import app, flags

# HBM per device (GiB) by jax ``device_kind``: one device per chip (v4/v5p megacore, v5e, v6e).
HBM_GIB = {"TPU v4": 32.0, "TPU v5": 95.0, "TPU v5p": 95.0, "TPU v5 lite": 16.0,
           "TPU v5e": 16.0, "TPU v6 lite": 32.0, "TPU v6e": 32.0}

_PRESET = flags.DEFINE_string("preset", "small", "ModelConfig preset (deepseek-v3, ...)")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x2",
                                "TPU topology name, <generation>:<chips per dim>, e.g. "
                                "v5p:8x8x16 (1024 chips), v5e:4x4 (16 chips)")
_MESH = flags.DEFINE_string("mesh", "fsdp=-1", "mesh axis sizes, e.g. data=1,fsdp=-1,expert=64,"
                            "tensor=1 (one -1 takes the remaining devices; missing axes are 1; "
                            "stage > 1 pipelines the step, with fsdp=1)")
_RULES = flags.DEFINE_string("rules", "fsdp", "partitioning rule set (parallel.partitioning)")
_RULE = flags.DEFINE_multi_string("rule", [], "change one logical axis of the rule set, "
                                  "LOGICAL=AXIS[+AXIS...] or LOGICAL=None, e.g. q_lora=fsdp")
_BATCH = flags.DEFINE_integer("batch", 0, "global batch in sequences (0: one per batch shard)")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "tokens per sequence")
_ACCUM = flags.DEFINE_integer("grad_accum", 1, "micro-batches per step (scanned)")
_REMAT = flags.DEFINE_enum("remat", None, ["none", "full", "dots", "dots_no_batch"],
                           "override the preset's remat_policy")
_MOMENTS = flags.DEFINE_enum("moment_dtype", "float32", ["float32", "bfloat16"],
                             "Adam moments' dtype (V3: bfloat16)")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "parameter (master weight) dtype")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"],
                           "activation / matmul dtype")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "more ModelConfig fields, FIELD=VALUE "
                                       "(parsed as Python literals), e.g. n_layers=8")
_SCHEDULE = flags.DEFINE_enum("schedule", "dualpipe", ["gpipe", "1f1b", "dualpipe"],
                              "pipeline schedule when the mesh has stage > 1")
_MICRO = flags.DEFINE_integer("micro_batches", 0, "pipeline micro-batches (0: 2 x stages)")
_CUTS = flags.DEFINE_list("layers_per_stage", [], "uneven MoE layers per pipeline stage")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "HBM per device in GiB (0: from HBM_GIB)")
_JSON = flags.DEFINE_string("json_out", None, "also write the numbers as JSON here")

GIB = 2 ** 30


def parse_mesh(text: str) -> dict[str, int]:
  """"data=1,fsdp=-1,expert=64" -> {"data": 1, "fsdp": -1, "expert": 64}."""
  sizes = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--mesh: {item!r} is not AXIS=SIZE")
    sizes[name.strip()] = int(value)
  return sizes


def parse_overrides(items) -> dict:
  """["n_layers=8", "q_lora_rank=None"] -> {"n_layers": 8, "q_lora_rank": None}."""
  import ast
  out = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--override: {item!r} is not FIELD=VALUE")
    try:
      out[name.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[name.strip()] = value  # a bare string, e.g. grouped_matmul=ragged_dot
  return out


def parse_rules(name: str, changes=()) -> dict:
  """Rule set ``name`` with ``changes`` ("q_lora=fsdp", "heads=tensor+fsdp", "vocab=None")."""
  from deepseek_jax.parallel.partitioning import get_rules
  rules = dict(get_rules(name))
  for item in changes:
    logical, sep, target = item.partition("=")
    if not sep or logical.strip() not in rules:
      raise ValueError(f"--rule: {item!r} must be LOGICAL=AXIS with LOGICAL one of "
                       f"{sorted(rules)}")
    axes = tuple(a.strip() for a in target.split("+"))
    rules[logical.strip()] = None if target.strip() == "None" else (
        axes[0] if len(axes) == 1 else axes)
  return rules


def topology_devices(name: str):
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="tpu", topology_name=name).devices


def hbm_gib(device_kind: str, override: float = 0.0) -> Optional[float]:
  return override or HBM_GIB.get(device_kind)


def build(preset: str, topology: str, mesh_text: str, rules_name: str, *,
          overrides: Optional[dict] = None, moment_dtype: str = "float32", rule_changes=()):
  """(model_cfg, mesh, rules, tx, execution) for ``preset`` on ``topology``'s devices."""
  from deepseek_jax.config import ModelConfig
  from deepseek_jax.model.execution import resolve_execution
  from deepseek_jax.parallel.mesh import make_mesh
  from deepseek_jax.train.config import default_config
  from deepseek_jax.train.optimizer import make_optimizer
  mesh = make_mesh(parse_mesh(mesh_text), devices=topology_devices(topology))
  cfg = ModelConfig.preset(preset, **(overrides or {}))
  opt = default_config().optimizer
  opt.total_steps, opt.moment_dtype = 1000, moment_dtype
  return (cfg, mesh, parse_rules(rules_name, rule_changes), make_optimizer(opt),
          resolve_execution(cfg, mesh))


def make_loss(cfg, mesh, schedule: str = "dualpipe", micro_batches: int = 0, cuts=()):
  """The trainer's pretraining loss for ``mesh``: pipelined (``train.pipeline``) when its stage
  axis is > 1, with the trainer's checks of the cut and the schedule."""
  from deepseek_jax.parallel.pipeline import Schedule, stage_layers
  from deepseek_jax.train.loss import PretrainLoss
  from deepseek_jax.train.optimizer import piecewise_constant
  from deepseek_jax.train.pipeline import PipelinedPretrainLoss
  weight = piecewise_constant(((0, cfg.mtp_loss_weight),))
  stages = mesh.shape["stage"]
  if stages == 1:
    return PretrainLoss(cfg.n_mtp_modules, weight)
  cuts = tuple(int(n) for n in cuts)
  stage_layers(cfg.n_moe_layers, stages, cuts)
  schedule = Schedule(schedule, stages, micro_batches or 2 * stages)
  return PipelinedPretrainLoss(cfg.n_mtp_modules, schedule, cuts, weight)


def compile_step(cfg, mesh, rules, tx, execution, *, batch: int, seq_len: int, grad_accum: int,
                 loss=None):
  """Lower and compile the train step for abstract inputs. Returns (compiled, seconds); XLA's
  message in place of ``compiled`` when it refuses the program for want of HBM. ``loss``:
  default ``make_loss(cfg, mesh)``."""
  import jax
  import jax.numpy as jnp
  from deepseek_jax.parallel.partitioning import batch_sharding
  from deepseek_jax.train.optimizer import lr_schedule, piecewise_constant
  from deepseek_jax.train.config import default_config
  from deepseek_jax.train.step import StepOptions, abstract_train_state, jit_train_step
  graphdef, shardings, abstract = abstract_train_state(cfg, tx, mesh, rules, execution)
  opt = default_config().optimizer
  opt.total_steps = 1000
  options = StepOptions(grad_accum=grad_accum, lr_schedule=lr_schedule(opt),
                        router_bias_rate=piecewise_constant(((0, 0.001),)))
  loss = loss or make_loss(cfg, mesh)
  step = jit_train_step(cfg, graphdef, tx, options, shardings, mesh, rules, loss)
  sh = batch_sharding(mesh, rules)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=sh)
  data = {"inputs": tokens, "targets": tokens,
          "mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32, sharding=sh)}
  start = time.perf_counter()
  lowered = step.lower(abstract, data)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program that cannot fit
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return str(e).splitlines()[0], time.perf_counter() - start
  return compiled, time.perf_counter() - start


def _state_gib(cfg, tx, mesh, rules, execution) -> float:
  """GiB per device of the train state (parameters + optimizer state), from its shardings."""
  import math
  import jax
  from deepseek_jax.train.step import abstract_train_state
  _, _, abstract = abstract_train_state(cfg, tx, mesh, rules, execution)
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract)) / GIB


def memory_report(compiled, hbm: Optional[float]) -> dict:
  """Per-device bytes from XLA's memory analysis, the total and whether it fits ``hbm`` GiB."""
  mem = compiled.memory_analysis()
  fields = ("argument", "output", "temp", "alias", "generated_code")
  out = {f: int(getattr(mem, f"{f}_size_in_bytes", 0) or 0) for f in fields}
  out["total"] = (out["argument"] + out["output"] - out["alias"] + out["temp"]
                  + out["generated_code"])
  out["hbm"] = None if hbm is None else int(hbm * GIB)
  out["fits"] = None if hbm is None else out["total"] <= out["hbm"]
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from flax import nnx
  from deepseek_jax import analytics
  from deepseek_jax.config import ModelConfig
  from deepseek_jax.model.transformer import abstract_model
  from deepseek_jax.parallel.partitioning import replicated_dims, replication_summary
  from deepseek_jax.parallel.mesh import batch_shards
  overrides = dict(dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value,
                   max_seq_len=max(ModelConfig.preset(_PRESET.value).max_seq_len, _SEQ.value))
  if _REMAT.value:
    overrides["remat_policy"] = _REMAT.value
  overrides.update(parse_overrides(_OVERRIDES.value))
  cfg, mesh, rules, tx, execution = build(_PRESET.value, _TOPOLOGY.value, _MESH.value,
                                          _RULES.value, overrides=overrides,
                                          moment_dtype=_MOMENTS.value,
                                          rule_changes=_RULE.value)
  kind = mesh.devices.flat[0].device_kind
  hbm = hbm_gib(kind, _HBM.value)
  batch = _BATCH.value or batch_shards(mesh) * _ACCUM.value
  counts = analytics.param_counts(cfg)
  print(f"topology {_TOPOLOGY.value}: {mesh.size} x {kind!r} "
        f"({len({d.process_index for d in mesh.devices.flat})} hosts); HBM "
        + (f"{hbm:g} GiB per device ({'--hbm_gib' if _HBM.value else 'HBM_GIB table'})"
           if hbm else "unknown (no HBM_GIB entry; pass --hbm_gib)"))
  rules_text = " ".join([repr(_RULES.value), *_RULE.value])
  print(f"mesh {dict(mesh.shape)}; rules {rules_text}; execution {execution.summary()}")
  print(f"parameters per device: {_state_gib(cfg, tx, mesh, rules, execution):.2f} GiB with "
        "their optimizer moments; "
        + (replication_summary(replicated_dims(nnx.state(abstract_model(cfg), nnx.Param), mesh,
                                               rules)) or "every sharded dim divides evenly"))
  print(f"model {cfg.name}: {counts.total:,} total, {counts.activated:,} activated, MTP "
        f"{counts.mtp:,} parameters; dtype {cfg.dtype}, params {cfg.param_dtype}, "
        f"moments {_MOMENTS.value}, remat {cfg.remat_policy}")
  print(f"batch {batch} x {_SEQ.value} tokens, grad_accum {_ACCUM.value} "
        f"({batch // batch_shards(mesh) // _ACCUM.value} sequence(s) per batch shard per "
        "micro-batch)")
  record = dict(preset=_PRESET.value, topology=_TOPOLOGY.value, devices=mesh.size,
                device_kind=kind, mesh=dict(mesh.shape), rules=_RULES.value,
                rule_changes=list(_RULE.value), batch=batch,
                seq_len=_SEQ.value, grad_accum=_ACCUM.value, remat=cfg.remat_policy,
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, moment_dtype=_MOMENTS.value,
                overrides=parse_overrides(_OVERRIDES.value), params_total=counts.total,
                params_activated=counts.activated, params_mtp=counts.mtp,
                execution=execution.summary())
  loss = make_loss(cfg, mesh, _SCHEDULE.value, _MICRO.value, _CUTS.value)
  if mesh.shape["stage"] > 1:
    from deepseek_jax.parallel.pipeline import analyse
    a = analyse(loss.schedule)
    print(f"pipeline {a.name} over {a.n_stages} stages, {loss.schedule.n_micro} micro-batches: "
          f"{a.activations} micro-batches in flight per rank ({a.activations_formula}), "
          f"{a.parameter_copies} parameter cop{'ies' if a.parameter_copies > 1 else 'y'}")
    record.update(schedule=a.name, micro_batches=loss.schedule.n_micro)
  compiled, seconds = compile_step(cfg, mesh, rules, tx, execution, batch=batch,
                                   seq_len=_SEQ.value, grad_accum=_ACCUM.value, loss=loss)
  if isinstance(compiled, str):
    print(f"DOES NOT FIT: the compiler gave up after {seconds:.1f} s: {compiled}")
    _write_json(dict(record, compile_seconds=round(seconds, 1), memory_bytes=None,
                     compile_error=compiled))
    return 1
  mem = memory_report(compiled, hbm)
  print(f"lowered + compiled in {seconds:.1f} s; memory per device:")
  for field in ("argument", "output", "alias", "temp", "generated_code", "total"):
    print(f"  {field:15s} {mem[field] / GIB:9.2f} GiB")
  if hbm:
    print(f"  {'fits' if mem['fits'] else 'DOES NOT FIT'} in {hbm:g} GiB HBM "
          f"({100 * mem['total'] / mem['hbm']:.0f}% used)")
  _write_json(dict(record, compile_seconds=round(seconds, 1), memory_bytes=mem))
  return 0 if mem["fits"] is not False else 1


def _write_json(record: dict) -> None:
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(record, f, indent=1)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  from deepseek_jax import cli
  cli.skip_absent_tpu()  # the TPU is only a compile target: no TPU backend on a CPU host
  app.run(main)
