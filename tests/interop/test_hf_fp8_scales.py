"""FP8 checkpoints with UE8M0 block scales (``quantization_config.scale_fmt: "ue8m0"``, later
DeepSeek releases): every scale is a power of two 2^e, stored as float32 or as safetensors
``F8_E8M0`` bytes (e + 127). Dequantisation w = q * 2^e is exact in float32, so every loaded
weight must equal, bit for bit, the reference computed here with ``np.ldexp`` in float64."""

import json

import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.config import ModelConfig
from deepseek_jax.interop.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from deepseek_jax.interop.safetensors_io import (CheckpointError, CheckpointReader, TensorPlan,
                                                 write_checkpoint)
from deepseek_jax.model.transformer import create_model

E4M3, E8M0 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e8m0fnu)


def _tensors(directory) -> dict:
  reader = CheckpointReader(str(directory))
  return {k: np.array(reader.get(k)) for k in reader.keys()}


def _expand(e, block, shape):
  return np.repeat(np.repeat(e, block[0], 0), block[1], 1)[:shape[0], :shape[1]]


def _quantize_ue8m0(w, block, rng):
  """q in e4m3 and integer exponents e [ceil(m/r), ceil(n/c)]: DeepSeek's ue8m0 recipe (scale
  amax/448 rounded up to a power of two), then a few blocks forced to the extremes of E8M0."""
  m, n = w.shape
  e = np.zeros((-(-m // block[0]), -(-n // block[1])), np.int32)
  for i in range(e.shape[0]):
    for j in range(e.shape[1]):
      blk = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
      e[i, j] = int(np.ceil(np.log2(max(float(np.abs(blk).max()), 1e-4) / 448.0)))
  q = (w / np.ldexp(1.0, _expand(e, block, w.shape))).astype(E4M3)
  e.flat[0] = -127  # smallest E8M0 scale: products are float32 subnormals, still exact
  if e.size > 1:
    e.flat[-1] = int(rng.integers(1, 20))  # and a large one
  return q, e


@pytest.fixture(scope="module")
def fp8_source(tmp_path_factory):
  """(tensors, quantized names -> (q, e), reference float32 tensors) of a tiny model."""
  cfg = ModelConfig.preset("tiny", dense_ffn_dim=200, init_std=0.1, n_mtp_modules=0,
                           mtp_loss_weight=0.0)
  directory = tmp_path_factory.mktemp("f32") / "hf"
  save_hf_checkpoint(create_model(cfg, seed=2), str(directory))
  tensors, config = _tensors(directory), json.loads((directory / "config.json").read_text())
  return tensors, config


def _quantized(tensors, block, seed=0):
  rng = np.random.default_rng(seed)
  quantized, reference = {}, {}
  for name, w in tensors.items():
    if name.startswith("model.layers.") and name.endswith("proj.weight") and w.ndim == 2:
      q, e = _quantize_ue8m0(w, block, rng)
      quantized[name] = (q, e)
      reference[name] = np.ldexp(q.astype(np.float64), _expand(e, block, w.shape)).astype(np.float32)
    else:
      reference[name] = w
  return quantized, reference


def _write(directory, tensors, quantized, scales: str, writer: str, config, block, scale_fmt="ue8m0"):
  """The checkpoint with FP8 weights and scales stored as 'e8m0' bytes or 'float32' values."""
  out = {}
  for name, w in tensors.items():
    if name not in quantized:
      out[name] = w
      continue
    q, e = quantized[name]
    out[name] = q
    out[name + "_scale_inv"] = ((e + 127).astype(np.uint8).view(E8M0) if scales == "e8m0"
                                else np.ldexp(np.float32(1.0), e).astype(np.float32))
  directory.mkdir()
  if writer == "ours":
    write_checkpoint(str(directory), [TensorPlan(k, v.shape, v.dtype, lambda v=v: v)
                                      for k, v in out.items()], max_shard_bytes=200_000)
  else:  # an independent writer: safetensors through torch's float8 dtypes
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    kinds = {E4M3: torch.float8_e4m3fn, E8M0: torch.float8_e8m0fnu}
    save_file({k: (torch.from_numpy(v.view(np.uint8).copy()).view(kinds[v.dtype])
                   if v.dtype in kinds else torch.from_numpy(v.copy())) for k, v in out.items()},
              str(directory / "model.safetensors"))
  quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
           "weight_block_size": list(block)}
  if scale_fmt:
    quant["scale_fmt"] = scale_fmt
  (directory / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
  return directory


@pytest.mark.parametrize("scales, writer, block", [("e8m0", "ours", (128, 128)),
                                                   ("e8m0", "safetensors", (16, 32)),
                                                   ("float32", "ours", (16, 32))])
def test_ue8m0_weights_dequantise_bit_exactly(fp8_source, tmp_path, scales, writer, block):
  tensors, config = fp8_source
  quantized, reference = _quantized(tensors, block)
  assert len(quantized) > 10
  source = _write(tmp_path / "fp8", tensors, quantized, scales, writer, config, block)
  if scales == "e8m0":
    assert CheckpointReader(str(source)).tensors[next(iter(quantized)) + "_scale_inv"].dtype == E8M0
  model = load_hf_checkpoint(str(source), param_dtype="float32", dtype="float32")
  save_hf_checkpoint(model, str(tmp_path / "out"))
  out = _tensors(tmp_path / "out")
  assert sorted(out) == sorted(reference)
  for name, value in reference.items():
    assert out[name].dtype == np.float32 and out[name].tobytes() == value.tobytes(), name
  tiny = [np.abs(w[(w != 0) & (np.abs(w) < np.finfo(np.float32).tiny)]) for w in
          (reference[name] for name in quantized)]  # block (0, 0) of each has scale 2^-127
  assert sum(t.size for t in tiny) > 100


def test_e8m0_scales_round_trip_through_our_writer(tmp_path):
  scales = np.arange(256, dtype=np.uint8).view(E8M0)
  write_checkpoint(str(tmp_path), [TensorPlan("s", scales.shape, E8M0, lambda: scales)])
  read = CheckpointReader(str(tmp_path)).get("s")
  assert read.dtype == E8M0 and read.tobytes() == scales.tobytes()
  from safetensors import safe_open  # the header names the dtype as safetensors does
  torch = pytest.importorskip("torch")
  with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
    assert f.get_tensor("s").dtype == torch.float8_e8m0fnu


def test_float32_scale_that_is_not_a_power_of_two_is_refused_under_ue8m0(fp8_source, tmp_path):
  tensors, config = fp8_source
  quantized, _ = _quantized(tensors, (16, 32))
  directory = _write(tmp_path / "fp8", tensors, quantized, "float32", "ours", config, (16, 32))
  bad = sorted(quantized)[0] + "_scale_inv"

  def edit(t):
    t[bad] = t[bad].copy()
    t[bad][0, 1] *= 1.5
  _rewrite(directory, edit)
  with pytest.raises(CheckpointError, match=rf"{bad}: scale .* is not a power of two.*'ue8m0'"):
    load_hf_checkpoint(str(directory))


def test_e8m0_nan_byte_is_refused_naming_the_tensor(fp8_source, tmp_path):
  tensors, config = fp8_source
  quantized, _ = _quantized(tensors, (16, 32))
  directory = _write(tmp_path / "fp8", tensors, quantized, "e8m0", "ours", config, (16, 32),
                     scale_fmt=None)  # also without scale_fmt: 0xFF is never a scale
  bad = sorted(quantized)[-1] + "_scale_inv"

  def edit(t):
    raw = t[bad].view(np.uint8).copy()
    raw.flat[-1] = 0xFF
    t[bad] = raw.view(E8M0)
  _rewrite(directory, edit)
  with pytest.raises(CheckpointError, match=rf"{bad} holds the F8_E8M0 NaN byte 0xFF"):
    load_hf_checkpoint(str(directory))


def test_unknown_scale_fmt_is_refused_naming_the_field(fp8_source, tmp_path):
  tensors, config = fp8_source
  quantized, _ = _quantized(tensors, (16, 32))
  directory = _write(tmp_path / "fp8", tensors, quantized, "e8m0", "ours", config, (16, 32),
                     scale_fmt="ue4m3")
  with pytest.raises(CheckpointError, match=r"quantization_config\.scale_fmt='ue4m3' is not supported"):
    load_hf_checkpoint(str(directory))


def test_e8m0_is_refused_as_a_weight_dtype(fp8_source, tmp_path):
  tensors, config = fp8_source
  name = "model.norm.weight"
  edited = {**tensors, name: np.ones_like(tensors[name]).astype(E8M0)}
  directory = _write(tmp_path / "e8m0_weight", edited, {}, "e8m0", "ours", config, (16, 32))
  with pytest.raises(CheckpointError, match=rf"{name} is stored as F8_E8M0"):
    load_hf_checkpoint(str(directory))


def _rewrite(directory, edit):
  """Rewrite the checkpoint as one file after ``edit(dict of tensors)``."""
  tensors = _tensors(directory)
  edit(tensors)
  for path in directory.iterdir():
    if path.name.endswith(".safetensors") or path.name.endswith(".index.json"):
      path.unlink()
  write_checkpoint(str(directory), [TensorPlan(k, v.shape, v.dtype, lambda v=v: v)
                                    for k, v in tensors.items()])
