"""HF checkpoints on disk: bit-exact round trips, FP8 dequantisation, sharded and streaming loads,
and clear errors for broken checkpoints."""

import json
import os
import shutil
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.interop.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from deepseek_jax.interop.hf_config import UnsupportedConfig
from deepseek_jax.interop.safetensors_io import (CheckpointError, CheckpointReader, TensorPlan,
                                                 write_checkpoint)
from deepseek_jax.model.transformer import create_model, forward
from deepseek_jax.parallel.mesh import make_mesh


def _tensors(directory) -> dict:
  reader = CheckpointReader(str(directory))
  return {k: np.array(reader.get(k)) for k in reader.keys()}


def _assert_same_tensors(a, b):
  ta, tb = _tensors(a), _tensors(b)
  assert sorted(ta) == sorted(tb)
  for k in ta:
    assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
    assert ta[k].tobytes() == tb[k].tobytes(), k


def _flat(model) -> dict:
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  """The tiny preset (query compression, groups, bias, YaRN, MTP) saved in several shards."""
  model = create_model(ModelConfig.preset("tiny", init_std=0.1), seed=3)
  directory = tmp_path_factory.mktemp("tiny") / "hf"
  names = save_hf_checkpoint(model, str(directory), max_shard_bytes=64 * 1024)
  assert len(names) > 3 and os.path.exists(directory / "model.safetensors.index.json")
  return model, directory


def test_save_then_load_restores_every_weight_exactly(tiny_export):
  model, directory = tiny_export
  loaded = load_hf_checkpoint(str(directory))
  assert loaded.config.n_mtp_modules == 1  # the MTP layer travels with the checkpoint
  ours, theirs = _flat(model), _flat(loaded)
  assert sorted(ours) == sorted(theirs)
  for path in ours:
    np.testing.assert_array_equal(theirs[path], ours[path], err_msg=str(path))


@pytest.mark.parametrize("layout, dtype", [("hub", None), ("fused", None), ("hub", "bfloat16")])
def test_import_export_round_trip_is_bit_exact(tiny_export, tmp_path, layout, dtype):
  model, _ = tiny_export
  source = tmp_path / "source"
  save_hf_checkpoint(model, str(source), expert_layout=layout, dtype=dtype, max_shard_bytes=100_000)
  loaded = load_hf_checkpoint(str(source))
  if dtype:
    assert loaded.config.param_dtype == dtype  # weights keep the checkpoint's dtype
  save_hf_checkpoint(loaded, str(tmp_path / "again"), expert_layout=layout, max_shard_bytes=100_000)
  _assert_same_tensors(source, tmp_path / "again")


def test_load_onto_a_mesh_shards_every_weight_and_changes_no_value(tiny_export):
  model, directory = tiny_export
  mesh = make_mesh({"data": 1, "fsdp": 2, "expert": 4, "tensor": 1})
  sharded = load_hf_checkpoint(str(directory), mesh=mesh)
  w_gate = sharded.moe_layers.ffn.w_gate[...]
  assert w_gate.sharding.spec[1] == "expert" and len(w_gate.addressable_shards) == 8
  assert w_gate.addressable_shards[0].data.shape[1] == 2  # 8 experts / 4
  for path, value in _flat(sharded).items():
    np.testing.assert_array_equal(value, _flat(model)[path], err_msg=str(path))
  tokens = jnp.arange(24).reshape(2, 12) % 128
  np.testing.assert_allclose(forward(sharded, tokens).logits, forward(model, tokens).logits,
                             atol=1e-5)


def test_loading_never_holds_a_second_copy_of_the_model(tmp_path):
  """Peak host memory while loading stays at the model itself plus about one weight, far from the
  two full copies of a load-then-convert loader (on CPU, device arrays live in host memory)."""
  cfg = ModelConfig.preset("tiny", n_layers=6, d_model=128, n_routed_experts=64, moe_ffn_dim=64,
                           vocab_size=512, n_mtp_modules=0, mtp_loss_weight=0.0)
  model = create_model(cfg)
  directory = str(tmp_path / "hf")
  save_hf_checkpoint(model, directory, max_shard_bytes=2**20)
  leaf_bytes = max(v.nbytes for v in _flat(model).values())
  total = sum(v.nbytes for v in _flat(model).values())
  bound = total + 1.25 * leaf_bytes + 2**20
  assert bound < 1.5 * total  # the bound excludes a second copy
  for mesh in [None, make_mesh({"data": 1, "fsdp": 1, "expert": 8, "tensor": 1})]:
    load_hf_checkpoint(directory, mesh=mesh)  # warm caches: measure the data path only
    tracemalloc.start()
    loaded = load_hf_checkpoint(directory, mesh=mesh)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < bound, (mesh, peak, total, leaf_bytes)
    del loaded


def _quantize_fp8(w, block):
  """DeepSeek's recipe in torch: per block scale = amax / 448, q = w / scale in e4m3."""
  import torch
  m, n = w.shape
  s = torch.zeros(-(-m // block[0]), -(-n // block[1]))
  for i in range(s.shape[0]):
    for j in range(s.shape[1]):
      blk = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
      s[i, j] = blk.abs().max().clamp(min=1e-4) / 448.0
  full = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:m, :n]
  return (w / full).to(torch.float8_e4m3fn), s


@pytest.mark.parametrize("block", [(128, 128), (16, 32)])
def test_fp8_block_scaled_weights_are_dequantised_like_deepseek(tmp_path, block):
  torch = pytest.importorskip("torch")
  from safetensors.torch import load_file, save_file

  cfg = ModelConfig.preset("tiny", dense_ffn_dim=200, init_std=0.1, n_mtp_modules=0,
                           mtp_loss_weight=0.0)
  bf16 = tmp_path / "bf16"
  save_hf_checkpoint(create_model(cfg, seed=1), str(bf16), dtype="bfloat16")
  tensors, reference = load_file(str(bf16 / "model.safetensors")), {}
  quantized = {}
  for name, w in tensors.items():
    if name.startswith("model.layers.") and name.endswith("proj.weight") and w.ndim == 2:
      q, s = _quantize_fp8(w.float(), block)
      quantized[name], quantized[name + "_scale_inv"] = q, s
      full = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:w.shape[0], :w.shape[1]]
      reference[name] = (q.float() * full).to(torch.bfloat16)  # DeepSeek's weight_dequant
    else:
      quantized[name] = reference[name] = w
  fp8 = tmp_path / "fp8"
  fp8.mkdir()
  save_file(quantized, str(fp8 / "model.safetensors"))
  config = json.loads((bf16 / "config.json").read_text())
  config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                   "activation_scheme": "dynamic", "weight_block_size": list(block)}
  (fp8 / "config.json").write_text(json.dumps(config))

  model = load_hf_checkpoint(str(fp8))
  assert model.config.param_dtype == "bfloat16"
  save_hf_checkpoint(model, str(tmp_path / "out"))
  out = load_file(str(tmp_path / "out" / "model.safetensors"))
  assert sorted(out) == sorted(reference)
  n_fp8 = sum(1 for k in quantized if k.endswith("_scale_inv"))
  assert n_fp8 > 10
  for name, value in reference.items():
    assert torch.equal(out[name], value.to(out[name].dtype)), name


# --- errors ----------------------------------------------------------------------------------------

@pytest.fixture
def broken(tiny_export, tmp_path):
  """A writable copy of the tiny export."""
  _, directory = tiny_export
  target = tmp_path / "copy"
  shutil.copytree(directory, target)
  return target


def _rewrite(directory, edit):
  """Rewrite the checkpoint as one file after ``edit(dict of tensors)``."""
  tensors = _tensors(directory)
  edit(tensors)
  for name in os.listdir(directory):
    if name.endswith(".safetensors") or name.endswith(".index.json"):
      os.remove(directory / name)
  write_checkpoint(str(directory), [TensorPlan(k, v.shape, v.dtype, lambda v=v: v)
                                    for k, v in tensors.items()])


def test_missing_shard_is_named(broken):
  os.remove(broken / "model-00002-of-{:05d}.safetensors".format(
      len([n for n in os.listdir(broken) if n.endswith(".safetensors")])))
  with pytest.raises(CheckpointError, match=r"missing shard file\(s\) \['model-00002-of-"):
    load_hf_checkpoint(str(broken))


def test_missing_tensor_is_named(broken):
  _rewrite(broken, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
  with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
    load_hf_checkpoint(str(broken))


def test_unexpected_tensor_is_named(broken):
  _rewrite(broken, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(96, np.float32)}))
  with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.q_proj\.bias"):
    load_hf_checkpoint(str(broken))


def test_shape_mismatch_names_the_tensor_and_both_shapes(broken):
  config = json.loads((broken / "config.json").read_text())
  (broken / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 48}))
  with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight: "
                                            r"checkpoint \[32, 64\], model expects \[48, 64\]"):
    load_hf_checkpoint(str(broken))


def test_unsupported_model_type_is_refused(broken):
  config = json.loads((broken / "config.json").read_text())
  (broken / "config.json").write_text(json.dumps({**config, "model_type": "mixtral"}))
  with pytest.raises(UnsupportedConfig, match="model_type='mixtral' is not supported"):
    load_hf_checkpoint(str(broken))


def test_fp8_weight_without_scales_is_refused(broken):
  def to_fp8(t):
    t["model.layers.0.mlp.gate_proj.weight"] = t["model.layers.0.mlp.gate_proj.weight"].astype(
        jnp.float8_e4m3fn)
  _rewrite(broken, to_fp8)
  with pytest.raises(CheckpointError, match=r"gate_proj\.weight is FP8 but .*_scale_inv"):
    load_hf_checkpoint(str(broken))


def test_missing_mtp_layer_suggests_skipping_it(broken):
  _rewrite(broken, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.3.shared_head")])
  with pytest.raises(CheckpointError, match="load_mtp=False"):
    load_hf_checkpoint(str(broken), load_mtp=True)
  assert load_hf_checkpoint(str(broken), load_mtp=False).config.n_mtp_modules == 0


def test_truncated_file_and_missing_config_are_clear_errors(broken, tmp_path):
  shard = sorted(n for n in os.listdir(broken) if n.endswith(".safetensors"))[0]
  with open(broken / shard, "r+b") as f:
    f.truncate(100)
  with pytest.raises(CheckpointError, match=shard):
    load_hf_checkpoint(str(broken))
  with pytest.raises(CheckpointError, match="no config.json"):
    load_hf_checkpoint(str(tmp_path))


def test_save_never_overwrites(tiny_export, tmp_path):
  model, _ = tiny_export
  (tmp_path / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not empty"):
    save_hf_checkpoint(model, str(tmp_path))
  assert (tmp_path / "keep.txt").read_text() == "mine"
  assert sorted(os.listdir(tmp_path)) == ["keep.txt"]
