"""Interoperability: HF-format DeepSeek checkpoints (config.json + safetensors) and orbax
parameter checkpoints; ``python -m deepseek_jax.convert`` converts between them."""
