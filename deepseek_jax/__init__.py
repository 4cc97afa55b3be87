"""deepseek-jax: DeepSeek-V2/V3/R1 techniques in JAX + Flax NNX, each switchable for ablation.

    import deepseek_jax as dsj
    cfg = dsj.ModelConfig.preset("tiny")              # or "small", "deepseek-v3", ...
    model = dsj.create_model(cfg, seed=0)
    out = dsj.forward(model, tokens)                  # logits [B, T, V], MoE stats, ...
    gen = dsj.generate(model, [[1, 2, 3]], max_new_tokens=16)
    model = dsj.load_hf_checkpoint("/ckpt/DeepSeek-V2-Lite")  # released weights (HF format)
"""

from deepseek_jax import analytics
from deepseek_jax.config import PRESETS, ModelConfig, list_presets
from deepseek_jax.inference.generate import GenerateOutput, SamplingConfig, generate
from deepseek_jax.interop.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from deepseek_jax.model.execution import Execution, resolve_execution, set_execution
from deepseek_jax.model.transformer import (DeepSeekModel, ModelOutput, abstract_model,
                                            create_model, forward, init_cache,
                                            router_bias_update)
from deepseek_jax.train.loss import Loss, PretrainLoss, loss_fn

__version__ = "0.1.0"

__all__ = [
    "DeepSeekModel", "Execution", "GenerateOutput", "Loss", "ModelConfig", "ModelOutput", "PRESETS",
    "PretrainLoss", "SamplingConfig", "abstract_model", "analytics", "create_model", "forward",
    "generate", "init_cache", "list_presets", "load_hf_checkpoint", "loss_fn",
    "resolve_execution", "router_bias_update", "save_hf_checkpoint", "set_execution",
]
