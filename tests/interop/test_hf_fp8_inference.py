"""Released FP8 checkpoints (V3/R1: E4M3 weights with one scale per 128x128 block) loaded with
``keep_fp8=True`` keep their FP8 weights and scales (``quant.fp8.Fp8Weight``) and generate:
with matmul_format "bf16" the kept model computes exactly what the dequantising loader's model
computes (the same dequantised values reach every matmul), so its greedy tokens are the same;
with "fp8_blockwise" its stored blocks go straight into the block-scaled GEMM."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.inference.generate import generate
from deepseek_jax.interop.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from deepseek_jax.interop.safetensors_io import CheckpointReader, TensorPlan, write_checkpoint
from deepseek_jax.model.transformer import create_model, forward
from deepseek_jax.ops import matmul
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.quant import fp8
from deepseek_jax.quant.fp8 import Fp8Weight, fp8_weight_bytes

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11]]
TINY = dict(dense_ffn_dim=200, init_std=0.1, n_mtp_modules=0, mtp_loss_weight=0.0)
# Every 128-block survives the name map, kv_b_proj's per-head split included (H = V = 128).
ALIGNED = dict(TINY, vocab_size=256, d_model=128, n_layers=2, q_lora_rank=128, kv_lora_rank=128,
               n_heads=2, qk_nope_head_dim=128, qk_rope_head_dim=32, v_head_dim=128,
               dense_ffn_dim=256, moe_ffn_dim=128, n_routed_experts=4, n_expert_groups=2,
               n_limited_groups=1, init_std=0.05)
SPLIT = {"w_uk", "w_uv"}  # kv_b_proj's two pieces


def _quantize(w, block):
  """DeepSeek's recipe on an HF [out, in] matrix: per block scale = amax / 448 (amax >= 1e-4),
  q = w / scale in E4M3. Returns (q, scale [ceil(out/bo), ceil(in/bi)] float32)."""
  m, n = w.shape
  s = np.zeros((-(-m // block[0]), -(-n // block[1])), np.float32)
  for i in range(s.shape[0]):
    for j in range(s.shape[1]):
      blk = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
      s[i, j] = max(float(np.abs(blk).max()), 1e-4) / 448.0
  full = np.repeat(np.repeat(s, block[0], 0), block[1], 1)[:m, :n]
  return (w / full).astype(E4M3), s


def _fp8_checkpoint(directory, overrides, block, seed=1):
  """A random model of ``ModelConfig.preset("tiny", **overrides)`` written as a V3-style FP8
  checkpoint: every 2-D layer matrix but the router in E4M3 with ``*_scale_inv`` blocks."""
  cfg = ModelConfig.preset("tiny", **overrides)
  source = directory / "source"
  save_hf_checkpoint(create_model(cfg, seed=seed), str(source))
  reader = CheckpointReader(str(source))
  plans, n_fp8 = [], 0
  for name in reader.keys():
    w = np.array(reader.get(name))
    if name.startswith("model.layers.") and w.ndim == 2 and not name.endswith("mlp.gate.weight"):
      q, s = _quantize(w, block)
      plans += [TensorPlan(name, q.shape, E4M3, lambda q=q: q),
                TensorPlan(name + "_scale_inv", s.shape, s.dtype, lambda s=s: s)]
      n_fp8 += 1
    else:
      plans.append(TensorPlan(name, w.shape, w.dtype, lambda w=w: w))
  target = directory / "fp8"
  write_checkpoint(str(target), plans, max_shard_bytes=300_000)
  config = json.loads((source / "config.json").read_text())
  config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                   "activation_scheme": "dynamic", "weight_block_size": list(block)}
  (target / "config.json").write_text(json.dumps(config))
  assert n_fp8 > 10
  return str(target)


CHECKPOINTS = {"tiny-128x128": (TINY, (128, 128)), "tiny-16x32": (TINY, (16, 32)),
               "aligned-128x128": (ALIGNED, (128, 128))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """checkpoint(name) -> the directory of CHECKPOINTS[name], written once per module."""
  made = {}

  def get(name):
    if name not in made:
      overrides, block = CHECKPOINTS[name]
      made[name] = _fp8_checkpoint(tmp_path_factory.mktemp(name), overrides, block)
    return made[name]

  return get


def _kept(model) -> dict:
  """leaf name -> Fp8Weight for the Params the loader kept in FP8."""
  return {".".join(map(str, path)): variable.get_value()
          for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
          if isinstance(variable.get_value(), Fp8Weight)}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_kept_model_generates_the_greedy_tokens_of_the_dequantised_model(checkpoint, name):
  directory, block, aligned = checkpoint(name), CHECKPOINTS[name][1], name.startswith("aligned")
  lines = []
  kept_model = load_hf_checkpoint(directory, keep_fp8=True, report=lines.append)
  reference = load_hf_checkpoint(directory)  # today's path: dequantised to bf16 on load
  kept = _kept(kept_model)
  assert kept and all(w.q.dtype == jnp.float8_e4m3fn and w.block == block[::-1]
                      for w in kept.values())
  names = {leaf.rsplit(".", 1)[-1] for leaf in kept}
  assert {"wq_a", "wq_b", "wkv_a", "wo", "w_gate", "w_up", "w_down"} <= names
  # kv_b_proj's per-head split keeps the blocks only if the head dims are multiples of the
  # block's rows (16 | 16 here, 128 | 128 in the aligned model, not 128 | 16).
  split_kept = aligned or block[0] == 16
  assert (SPLIT <= names) == split_kept and (not SPLIT & names) == (not split_kept)
  assert len(lines) == 1 and lines[0].startswith(f"keep_fp8: {len(kept)} weight(s) kept in FP8")
  assert ("dequantised" in lines[0]) == (not split_kept)
  if not split_kept:
    assert "kv_b_proj splits per head at qk_nope_head_dim=16 / v_head_dim=16" in lines[0]
    assert isinstance(kept_model.moe_layers.attention.w_uk.get_value(), jax.Array)
  # The values a kept weight stands for are the dequantising loader's, bit for bit.
  values = dict(nnx.to_flat_state(nnx.state(kept_model, nnx.Param)))
  for path, variable in nnx.to_flat_state(nnx.state(reference, nnx.Param)):
    value = values[path][...]
    assert value.dtype == variable[...].dtype and jnp.array_equal(value, variable[...]), path

  # Prefill and absorbed decode over the latent cache: the same tokens, and the same logits
  # (log-probabilities equal bit for bit).
  ours = generate(kept_model, PROMPTS, max_new_tokens=8, return_log_probs=True)
  theirs = generate(reference, PROMPTS, max_new_tokens=8, return_log_probs=True)
  assert jnp.array_equal(ours.tokens, theirs.tokens)
  assert jnp.array_equal(ours.log_probs, theirs.log_probs)


@pytest.mark.parametrize("name", ["tiny-128x128", "aligned-128x128"])
def test_kept_weights_take_about_half_the_bytes_of_bf16(checkpoint, name):
  directory, aligned = checkpoint(name), name.startswith("aligned")
  lines = []
  kept_model = load_hf_checkpoint(directory, keep_fp8=True, report=lines.append)
  reference = load_hf_checkpoint(directory)
  stats = fp8_weight_bytes(nnx.state(kept_model))
  assert stats["fp8_bytes"] == stats["values"] and stats["bf16_bytes"] == 2 * stats["values"]
  ratio = (stats["fp8_bytes"] + stats["scale_bytes"]) / stats["bf16_bytes"]
  assert 0.5 < ratio < (0.501 if aligned else 0.51)  # 4 B per block of 128x128
  assert f"({ratio:.3f}x)" in lines[0]
  held = lambda m: sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(m, nnx.Param)))
  saved = held(reference) - held(kept_model)
  assert saved == stats["bf16_bytes"] - stats["fp8_bytes"] - stats["scale_bytes"]


def test_fp8_blockwise_runs_the_stored_blocks_and_stays_close(checkpoint, monkeypatch):
  directory = checkpoint("aligned-128x128")
  kw = dict(report=lambda line: None, dtype="float32")  # bf16 noise would flip MoE routes
  fp8_model = load_hf_checkpoint(directory, keep_fp8=True, matmul_format="fp8_blockwise", **kw)
  bf16_model = load_hf_checkpoint(directory, keep_fp8=True, **kw)
  requantising = load_hf_checkpoint(directory, matmul_format="fp8_blockwise", **kw)
  seen = []
  block_gemm = matmul.fp8_weight_einsum
  monkeypatch.setattr(matmul, "fp8_weight_einsum",
                      lambda eqn, x, w: seen.append(w.shape) or block_gemm(eqn, x, w))
  tokens = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
  logits = fp8_model(tokens).logits  # eagerly: every matmul traced here
  monkeypatch.undo()
  # Every kept projection but the experts' (which MoE reads as values) runs the block GEMM.
  cfg = fp8_model.config
  assert (cfg.q_lora_rank, cfg.n_heads, cfg.qk_head_dim) in seen  # wq_b
  assert (cfg.kv_lora_rank, cfg.n_heads, cfg.v_head_dim) in seen  # w_uv (expanded prefill)
  assert (cfg.n_heads, cfg.v_head_dim, cfg.d_model) in seen  # wo
  # As close to the BF16-format logits as the dequantising loader's FP8 model, which
  # re-quantises its bf16 weights (measured: 7.3e-3 both; 7.5e-4 between the two).
  exact = forward(bf16_model, tokens).logits
  assert fp8.relative_error(logits, exact) < 1.2e-2
  assert fp8.relative_error(logits, forward(requantising, tokens).logits) < 2e-3
  out = generate(fp8_model, PROMPTS, max_new_tokens=6)
  assert out.tokens.shape == (2, 6) and int(out.lengths.min()) == 6


def test_saving_a_kept_model_writes_the_dequantised_weights(checkpoint, tmp_path):
  directory = checkpoint("tiny-128x128")
  kept_model = load_hf_checkpoint(directory, keep_fp8=True, report=lambda line: None)
  save_hf_checkpoint(kept_model, str(tmp_path / "kept"))
  save_hf_checkpoint(load_hf_checkpoint(directory), str(tmp_path / "dequantised"))
  ours, theirs = (CheckpointReader(str(tmp_path / d)) for d in ("kept", "dequantised"))
  assert sorted(ours.keys()) == sorted(theirs.keys())
  for name in ours.keys():
    assert np.array(ours.get(name)).tobytes() == np.array(theirs.get(name)).tobytes(), name


def test_sharded_load_keeps_the_values_sharded_like_the_weight(checkpoint):
  directory = checkpoint("tiny-16x32")
  mesh = make_mesh({"data": 1, "fsdp": 2, "expert": 4, "tensor": 1})
  kw = dict(keep_fp8=True, report=lambda line: None, dtype="float32")  # no bf16 sum orders
  sharded = load_hf_checkpoint(directory, mesh=mesh, **kw)
  w_gate = sharded.moe_layers.ffn.w_gate.get_value()
  assert isinstance(w_gate, Fp8Weight) and w_gate.q.sharding.spec[1] == "expert"
  assert w_gate.q.addressable_shards[0].data.shape[1] == 2  # 8 experts / 4
  assert w_gate.scale.sharding.is_fully_replicated
  single = load_hf_checkpoint(directory, **kw)
  tokens = jnp.arange(24).reshape(2, 12) % 128
  np.testing.assert_allclose(forward(sharded, tokens).logits, forward(single, tokens).logits,
                             atol=1e-5)
