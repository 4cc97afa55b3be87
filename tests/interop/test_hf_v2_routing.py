"""DeepSeek-V2 checkpoints route as DeepSeek's own modeling_deepseek.py (MoEGate) computes:

    if top_k > 1 and norm_topk_prob:  w = w / (sum(w) + 1e-20)     # renormalise ...
    else:                             w = w * routed_scaling_factor  # ... or scale, never both

transformers 5.24's DeepseekV2TopkRouter ignores norm_topk_prob (always scales), so where the two
differ the reference is written out here (``_reference_gate``) and patched into a transformers
model; where they agree (one expert per token) transformers itself is the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from deepseek_jax.interop.hf_checkpoint import load_hf_checkpoint  # noqa: E402
from deepseek_jax.model.moe import route  # noqa: E402
from deepseek_jax.model.transformer import forward  # noqa: E402

TOL = 1e-4
_COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
               num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
               num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
               v_head_dim=16, n_shared_experts=1, n_routed_experts=8, max_position_embeddings=256,
               initializer_range=0.15, q_lora_rank=None, eos_token_id=None, bos_token_id=None,
               pad_token_id=None, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
# Renormalised routing (the scale is then unused), device-limited to 2 of 4 groups.
RENORMALISED = dict(num_experts_per_tok=2, norm_topk_prob=True, routed_scaling_factor=16.0,
                    topk_method="group_limited_greedy", n_group=4, topk_group=2)


def _reference_gate(gate, config):
  """DeepSeek-V2's MoEGate.forward (inference), written out from its modeling_deepseek.py."""
  top_k, n_experts = config.num_experts_per_tok, config.n_routed_experts

  def forward_(hidden_states):
    h = hidden_states.reshape(-1, config.hidden_size)
    logits = torch.nn.functional.linear(h.float(), gate.weight.float())
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if config.topk_method == "greedy":
      weights, idx = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    else:
      group_scores = scores.view(len(h), config.n_group, -1).max(dim=-1).values
      group_idx = torch.topk(group_scores, k=config.topk_group, dim=-1, sorted=False)[1]
      group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
      score_mask = (group_mask.unsqueeze(-1)
                    .expand(len(h), config.n_group, n_experts // config.n_group)
                    .reshape(len(h), -1))
      weights, idx = torch.topk(scores.masked_fill(~score_mask.bool(), 0.0), k=top_k, dim=-1,
                                sorted=False)
    if top_k > 1 and config.norm_topk_prob:
      weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
      weights = weights * config.routed_scaling_factor
    return logits, weights, idx

  return forward_


def _saved_v2(directory, routing, reference_gate: bool):
  torch.manual_seed(0)
  config = transformers.DeepseekV2Config(**_COMMON, **routing)
  model = transformers.DeepseekV2ForCausalLM(config).eval()
  model.save_pretrained(str(directory))
  if reference_gate:
    for layer in model.model.layers[config.first_k_dense_replace:]:
      layer.mlp.gate.forward = _reference_gate(layer.mlp.gate, config)
  return model


def _tokens(seed=0):
  return np.random.RandomState(seed).randint(0, _COMMON["vocab_size"], (2, 12))


@pytest.fixture(scope="module")
def renormalised(tmp_path_factory):
  """(reference torch model, our model loaded from its checkpoint, the checkpoint directory)."""
  directory = tmp_path_factory.mktemp("v2_norm")
  reference = _saved_v2(directory, RENORMALISED, reference_gate=True)
  with pytest.warns(UserWarning, match="ignores norm_topk_prob"):
    model = load_hf_checkpoint(str(directory))
  return reference, model, directory


def test_norm_topk_prob_weights_sum_to_one_not_to_the_routed_scale(renormalised):
  _, model, _ = renormalised
  moe = model.moe_layers.ffn
  assert (moe.routing.norm_topk_prob, moe.routing.routed_scaling_factor) == (True, 1.0)
  x = jax.random.normal(jax.random.key(0), (64, _COMMON["hidden_size"]))
  for gate in moe.gate[...]:  # [D, E] per MoE layer
    weights = route(x @ gate, None, moe.routing).weights
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=0, atol=1e-6)


def test_norm_topk_prob_logits_match_deepseeks_reference_gate(renormalised):
  reference, model, directory = renormalised
  tokens = _tokens()
  with torch.no_grad():
    ref = reference(torch.tensor(tokens)).logits.numpy()
    transformers_own = transformers.DeepseekV2ForCausalLM.from_pretrained(str(directory)).eval()
    theirs = transformers_own(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(forward(model, jnp.asarray(tokens)).logits)
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
  assert np.abs(theirs - ref).max() > 100 * TOL  # transformers' router computes something else


def test_norm_topk_prob_with_one_expert_per_token_matches_transformers(tmp_path):
  """top_k = 1: the reference scales (no renormalisation) and transformers agrees."""
  hf_model = _saved_v2(tmp_path, dict(num_experts_per_tok=1, norm_topk_prob=True,
                                      routed_scaling_factor=16.0, topk_method="greedy"),
                       reference_gate=False)
  model = load_hf_checkpoint(str(tmp_path))
  assert (model.config.norm_topk_prob, model.config.routed_scaling_factor) == (False, 16.0)
  tokens = _tokens(seed=1)
  with torch.no_grad():
    ref = hf_model(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(tokens)).logits), ref,
                             atol=TOL, rtol=0)
