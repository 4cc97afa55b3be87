"""Interoperability: HF-format DeepSeek checkpoints (config.json + safetensors) and orbax
parameter checkpoints; ``python -m deepseek_jax.convert`` converts between them."""

import os


def require_new_directory(directory: str) -> None:
  """Writers never overwrite: the target must not exist or must be an empty folder."""
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise FileExistsError(f"{directory} exists and is not empty; choose a new directory "
                          "(nothing is overwritten)")
