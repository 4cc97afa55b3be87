r"""Convert DeepSeek checkpoints between HF format (safetensors) and deepseek-jax orbax checkpoints.

    # HF directory -> a parameters checkpoint (weights + model config, no optimizer state)
    python -m deepseek_jax.convert --from_hf=/ckpt/DeepSeek-V2-Lite --to_orbax=/ckpt/v2-lite
    # a training workdir (latest step, or --step) or a parameters checkpoint -> HF directory
    python -m deepseek_jax.convert --from_orbax=/tmp/ds-small --to_hf=/tmp/ds-small-hf
    # HF -> HF: re-shard, change the expert layout, dequantise FP8 to bf16
    python -m deepseek_jax.convert --from_hf=/ckpt/DeepSeek-V3 --to_hf=/ckpt/v3-bf16 --dtype=bfloat16

Nothing is overwritten: the target must not exist or be empty. ``--mesh`` places the weights
on the local devices while converting (``expert=8`` spreads the experts over 8 devices).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags


def _define_flags():
  """Defined only when run as a program: importing ``convert`` defines no global flags."""
  f = flags
  f.DEFINE_string("from_hf", None, "source: an HF-format DeepSeek directory")
  f.DEFINE_string("from_orbax", None, "source: a training workdir or a parameters checkpoint")
  f.DEFINE_string("to_hf", None, "target: a new HF-format directory")
  f.DEFINE_string("to_orbax", None, "target: a new parameters checkpoint directory")
  f.DEFINE_integer("step", None, "--from_orbax step (0 included; default: the newest that verifies)")
  f.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                "weight dtype of the target (default: the source's; FP8 -> bfloat16)")
  f.DEFINE_enum("expert_layout", "hub", ["hub", "fused"],
                "--to_hf expert tensors: per expert (hub) or fused (transformers v5)")
  f.DEFINE_integer("max_shard_mb", 5000, "--to_hf: largest safetensors file, in MB")
  f.DEFINE_enum("load_mtp", "auto", ["auto", "true", "false"],
                "--from_hf: load the MTP layer (auto: if the checkpoint holds it)")
  f.DEFINE_string("mesh", "", "mesh while converting, e.g. 'expert=8' or 'fsdp=4,expert=2'")

def _mesh(spec: str):
  if not spec:
    return None
  from deepseek_jax.parallel.mesh import make_mesh
  sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
  for part in spec.split(","):
    name, _, value = part.partition("=")
    if name.strip() not in sizes or not value.strip().isdigit():
      raise ValueError(f"--mesh={spec!r}: write axis=size pairs over {sorted(sizes)}, e.g. expert=8")
    sizes[name.strip()] = int(value)
  return make_mesh(sizes)


def convert(from_hf=None, from_orbax=None, to_hf=None, to_orbax=None, *, step=None, dtype=None,
            expert_layout="hub", max_shard_mb=5000, load_mtp=None, mesh=None) -> str:
  """Library form of the command line; returns a one-line summary. The target must be new or
  an empty folder; on any failure (disk full, bad source) the partial output is removed.
  ``step`` (0 included) reads that step of ``from_orbax``, verified; default the newest step
  that verifies."""
  from deepseek_jax.interop import require_new_directory

  if (from_hf is None) == (from_orbax is None) or (to_hf is None) == (to_orbax is None):
    raise ValueError("give exactly one source (--from_hf or --from_orbax) and one target "
                     "(--to_hf or --to_orbax)")
  target = to_hf or to_orbax
  require_new_directory(target)  # checked before the (long) load, and again by the writer
  existed = os.path.isdir(target)
  try:
    return _convert(from_hf, from_orbax, to_hf, to_orbax, step=step, dtype=dtype,
                    expert_layout=expert_layout, max_shard_mb=max_shard_mb, load_mtp=load_mtp,
                    mesh=mesh)
  except BaseException:
    _remove_partial(target, existed)
    raise


def _remove_partial(target: str, existed: bool) -> None:
  """A failed conversion leaves no half-written target to block the rerun: the folder it
  created is removed, or an empty folder it was given is emptied again."""
  import shutil
  if not os.path.isdir(target):
    return
  if not existed:
    shutil.rmtree(target, ignore_errors=True)
    return
  for name in os.listdir(target):
    path = os.path.join(target, name)
    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _convert(from_hf, from_orbax, to_hf, to_orbax, *, step, dtype, expert_layout, max_shard_mb,
             load_mtp, mesh) -> str:
  from deepseek_jax.interop.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
  from deepseek_jax.interop.orbax_params import load_model, save_model

  target = to_hf or to_orbax
  if from_hf is not None:
    overrides = {"param_dtype": dtype, "dtype": dtype} if dtype else {}
    model = load_hf_checkpoint(from_hf, mesh=mesh, load_mtp=load_mtp, **overrides)
  else:
    model = load_model(from_orbax, step=step, mesh=mesh)
  cfg = model.config
  if to_hf is not None:
    files = save_hf_checkpoint(model, to_hf, expert_layout=expert_layout, dtype=dtype,
                               max_shard_bytes=max_shard_mb * 2**20)
    written = f"{len(files)} safetensors file(s), {expert_layout} expert layout"
  else:
    if dtype and dtype != cfg.param_dtype:
      raise ValueError(f"--dtype={dtype}: --from_orbax keeps the saved dtype {cfg.param_dtype}")
    save_model(model, to_orbax, extra_config={"source": os.path.abspath(from_hf or from_orbax)})
    written = "a parameters checkpoint"
  mtp = f" + {cfg.n_mtp_modules} MTP" if cfg.n_mtp_modules else ""
  return (f"converted {from_hf or from_orbax} -> {target}: {cfg.name}, {cfg.n_layers} layers{mtp}, "
          f"{cfg.param_dtype} weights; wrote {written}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from deepseek_jax.cli import run_cli
  v = flags.FLAGS
  load_mtp = {"auto": None, "true": True, "false": False}[v.load_mtp]
  summary = run_cli(lambda: convert(
      v.from_hf, v.from_orbax, v.to_hf, v.to_orbax, step=v.step, dtype=v.dtype,
      expert_layout=v.expert_layout, max_shard_mb=v.max_shard_mb, load_mtp=load_mtp,
      mesh=_mesh(v.mesh)))
  print(summary, file=sys.stdout, flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
