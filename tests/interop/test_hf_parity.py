"""Logit parity with transformers' DeepseekV2 / DeepseekV3 (CPU, float32) through real checkpoints.

Each case builds a random HF model, saves it with ``save_pretrained`` (per-expert hub layout, or
v5's fused layout), loads the directory with ``load_hf_checkpoint`` and compares: full-sequence
logits, absorbed latent-cache decoding, greedy generation, and the reverse direction (our
``save_hf_checkpoint`` read back by ``from_pretrained``).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from deepseek_jax.inference.generate import generate  # noqa: E402
from deepseek_jax.interop.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from deepseek_jax.model.transformer import forward, init_cache  # noqa: E402

TOL = 1e-4

_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
             beta_fast=32, beta_slow=1)
_COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
               num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
               num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
               v_head_dim=16, n_shared_experts=1, num_experts_per_tok=2, max_position_embeddings=256,
               initializer_range=0.15, eos_token_id=None, bos_token_id=None, pad_token_id=None)

CASES = {
    # V3: query compression, 4 expert groups (2 kept), YaRN, a non-zero score-correction bias.
    "v3_qlora_groups_yarn": ("v3", dict(q_lora_rank=32, n_routed_experts=8, n_group=4, topk_group=2,
                                        routed_scaling_factor=2.5, norm_topk_prob=True,
                                        rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=1.0))),
    # V3 without query compression (V2-Lite-style attention), no YaRN, one group.
    "v3_no_qlora": ("v3", dict(q_lora_rank=None, n_routed_experts=8, n_group=1, topk_group=1,
                               routed_scaling_factor=1.5, norm_topk_prob=True,
                               rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # V2: softmax routing, device-limited 2 of 4 groups, YaRN with mscale 0.707, scale 16.
    "v2_groups_yarn": ("v2", dict(q_lora_rank=32, n_routed_experts=8, n_group=4, topk_group=2,
                                  topk_method="group_limited_greedy", routed_scaling_factor=16.0,
                                  rope_parameters=dict(_YARN, mscale=0.707, mscale_all_dim=0.707))),
    # V2-Lite: no query compression, greedy routing, tied embeddings.
    "v2_lite_tied": ("v2", dict(q_lora_rank=None, n_routed_experts=8, topk_method="greedy",
                                routed_scaling_factor=1.0, tie_word_embeddings=True,
                                rope_parameters=dict(_YARN, mscale=0.707, mscale_all_dim=0.707))),
}


def _hf_model(case: str, seed: int = 0):
  version, fields = CASES[case]
  torch.manual_seed(seed)
  if version == "v3":
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**_COMMON, **fields))
    with torch.no_grad():  # HF initialises the bias to zero; a random one exercises the mapping
      for layer in model.model.layers[model.config.first_k_dense_replace:]:
        layer.mlp.gate.e_score_correction_bias.copy_(0.05 * torch.randn(fields["n_routed_experts"]))
  else:
    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**_COMMON, **fields))
  return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """case -> (HF model, directory it was saved to in the hub layout)."""
  out = {}
  for case in CASES:
    model = _hf_model(case)
    directory = str(tmp_path_factory.mktemp(case))
    model.save_pretrained(directory)
    out[case] = (model, directory)
  return out


def _tokens(batch=2, length=12, seed=0):
  return np.random.RandomState(seed).randint(0, _COMMON["vocab_size"], (batch, length))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(checkpoints, case):
  hf_model, directory = checkpoints[case]
  model = load_hf_checkpoint(directory)
  tokens = _tokens()
  ref = _hf_logits(hf_model, tokens)
  ours = np.asarray(forward(model, jnp.asarray(tokens)).logits)
  assert np.abs(ref).max() > 1.0  # logits far from zero: the comparison means something
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["v3_qlora_groups_yarn", "v2_groups_yarn"])
def test_fused_v5_expert_layout_loads_to_the_same_logits(checkpoints, tmp_path, case):
  hf_model, _ = checkpoints[case]
  hf_model.save_pretrained(str(tmp_path), save_original_format=False)
  from safetensors import safe_open
  with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
    assert "model.layers.1.mlp.experts.gate_up_proj" in f.keys()  # really the fused layout
  tokens = _tokens(seed=1)
  ours = np.asarray(forward(load_hf_checkpoint(str(tmp_path)), jnp.asarray(tokens)).logits)
  np.testing.assert_allclose(ours, _hf_logits(hf_model, tokens), atol=TOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_absorbed_latent_cache_decoding_matches_transformers(checkpoints, case):
  """Prefill 5 tokens, then decode one token at a time over the latent cache (absorbed
  projections): every step's logits equal HF's full-sequence logits at that position."""
  hf_model, directory = checkpoints[case]
  model = load_hf_checkpoint(directory)
  tokens = _tokens(batch=2, length=10, seed=2)
  ref = _hf_logits(hf_model, tokens)
  cache = init_cache(model.config, 2, 16, "latent")
  out = forward(model, jnp.asarray(tokens[:, :5]), cache=cache, cache_index=jnp.zeros(2, jnp.int32),
                absorb=True)
  steps = [np.asarray(out.logits)]
  for t in range(5, 10):
    out = forward(model, jnp.asarray(tokens[:, t:t + 1]), cache=out.cache,
                  cache_index=jnp.full((2,), t, jnp.int32), absorb=True)
    steps.append(np.asarray(out.logits))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_gives_identical_tokens_for_20_steps(checkpoints, case):
  hf_model, directory = checkpoints[case]
  model = load_hf_checkpoint(directory)
  prompts = [[11, 52, 3, 99, 140, 7], [60, 2, 31, 8, 77, 150]]
  with torch.no_grad():
    ref = hf_model.generate(torch.tensor(prompts), max_new_tokens=20, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[:, len(prompts[0]):].numpy()
  ours = generate(model, prompts, max_new_tokens=20)  # absorbed decoding over the latent cache
  np.testing.assert_array_equal(np.asarray(ours.tokens), ref)
  assert len(set(ref[0].tolist())) > 3  # not a degenerate repeat of one token


@pytest.mark.parametrize("case", ["v3_qlora_groups_yarn", "v2_lite_tied"])
def test_our_export_loads_in_transformers_with_the_same_logits(checkpoints, tmp_path, case):
  _, directory = checkpoints[case]
  model = load_hf_checkpoint(directory)
  out_dir = str(tmp_path / "export")
  save_hf_checkpoint(model, out_dir, max_shard_bytes=40_000)  # several shards + index
  assert os.path.exists(os.path.join(out_dir, "model.safetensors.index.json"))
  cls = (transformers.DeepseekV3ForCausalLM if CASES[case][0] == "v3"
         else transformers.DeepseekV2ForCausalLM)
  reloaded = cls.from_pretrained(out_dir).eval()
  tokens = _tokens(seed=3)
  np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(tokens)).logits),
                             _hf_logits(reloaded, tokens), atol=TOL, rtol=0)


@pytest.mark.parametrize("layout, dtype", [("hub", torch.float32), ("hub", torch.bfloat16),
                                           ("fused", torch.float32)])
def test_transformers_checkpoints_round_trip_bit_exactly(tmp_path, layout, dtype):
  """save_pretrained -> load_hf_checkpoint -> save_hf_checkpoint: every tensor identical, bf16
  included (the score-correction bias stays float32, as transformers keeps it)."""
  from safetensors.torch import load_file

  hf_model = _hf_model("v3_qlora_groups_yarn").to(dtype)
  for layer in hf_model.model.layers[1:]:  # transformers keeps this buffer in float32
    layer.mlp.gate.e_score_correction_bias.data = layer.mlp.gate.e_score_correction_bias.float()
  hf_model.save_pretrained(str(tmp_path / "hf"), save_original_format=layout == "hub")
  model = load_hf_checkpoint(str(tmp_path / "hf"))
  save_hf_checkpoint(model, str(tmp_path / "ours"), expert_layout=layout)
  theirs = load_file(str(tmp_path / "hf" / "model.safetensors"))
  ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name


def test_mtp_layer_maps_onto_our_mtp_module(checkpoints, tmp_path):
  """A V3-style checkpoint with an MTP layer (``model.layers.{n}``: enorm, hnorm, eh_proj, a full
  block, shared_head). Reference: the same block run by transformers as a one-layer
  DeepseekV3 model fed h' = eh_proj [enorm(Emb(t_{i+1})); hnorm(h_i)] (vLLM's formulation)."""
  from safetensors.torch import load_file, save_file

  hf_model, directory = checkpoints["v3_qlora_groups_yarn"]
  cfg = hf_model.config
  n = cfg.num_hidden_layers
  torch.manual_seed(1)
  block_cfg = transformers.DeepseekV3Config(**{**cfg.to_dict(), "num_hidden_layers": 1,
                                               "first_k_dense_replace": 0})
  block = transformers.DeepseekV3ForCausalLM(block_cfg).eval()
  d = cfg.hidden_size
  with torch.no_grad():
    block.lm_head.weight.copy_(hf_model.lm_head.weight)  # the head is shared with the main model
    block.model.layers[0].mlp.gate.e_score_correction_bias.copy_(0.05 * torch.randn(8))
    enorm, hnorm = 1 + 0.1 * torch.randn(d), 1 + 0.1 * torch.randn(d)
    eh_proj = 0.1 * torch.randn(d, 2 * d)

  block.save_pretrained(str(tmp_path / "block"))  # the hub's per-expert names
  block_tensors = load_file(str(tmp_path / "block" / "model.safetensors"))
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  prefix = f"model.layers.{n}."
  for name, value in block_tensors.items():
    if name.startswith("model.layers.0."):
      tensors[prefix + name[len("model.layers.0."):]] = value
  tensors.update({prefix + "enorm.weight": enorm, prefix + "hnorm.weight": hnorm,
                  prefix + "eh_proj.weight": eh_proj,
                  prefix + "shared_head.norm.weight": block.model.norm.weight.clone(),
                  prefix + "shared_head.head.weight": hf_model.lm_head.weight.clone(),
                  prefix + "embed_tokens.weight": hf_model.model.embed_tokens.weight.clone()})
  ckpt = tmp_path / "with_mtp"
  ckpt.mkdir()
  save_file({k: v.contiguous() for k, v in tensors.items()}, str(ckpt / "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  with open(ckpt / "config.json", "w") as f:
    json.dump({**config, "num_nextn_predict_layers": 1}, f)

  model = load_hf_checkpoint(str(ckpt))
  assert model.config.n_mtp_modules == 1
  tokens = _tokens(batch=2, length=13, seed=4)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  out = forward(model, jnp.asarray(inputs))
  (mtp,) = model.mtp_forward(out.hidden, jnp.asarray(targets), jnp.ones(targets.shape))

  def rms(x, w):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

  with torch.no_grad():
    h = hf_model.model(torch.tensor(inputs)).last_hidden_state
    emb = hf_model.model.embed_tokens(torch.tensor(targets))
    joined = torch.cat([rms(emb, enorm), rms(h, hnorm)], dim=-1) @ eh_proj.T
    ref = block(inputs_embeds=joined).logits.numpy()
  np.testing.assert_allclose(np.asarray(mtp.logits), ref, atol=TOL, rtol=0)
