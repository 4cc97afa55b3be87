"""Interoperability: HF-format DeepSeek checkpoints (config.json + safetensors) and orbax
parameter checkpoints; ``python -m deepseek_jax.convert`` converts between them."""

from etils import epath


def require_new_directory(directory: str) -> None:
  """Writers never overwrite: the target must not exist or must be an empty folder."""
  path = epath.Path(directory)  # local or gs://
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise FileExistsError(f"{directory} exists and is not empty; choose a new directory "
                          "(nothing is overwritten)")
