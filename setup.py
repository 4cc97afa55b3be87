"""deepseek-jax: DeepSeek-V2/V3/R1 techniques in JAX/Flax NNX, switchable for ablation."""

from setuptools import find_packages, setup

setup(
    name="deepseek-jax",
    version="0.1.0",
    description="DeepSeek-V2/V3/R1 (MLA, DeepSeekMoE, MTP) in JAX/Flax NNX for research",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["deepseek_jax*", "pallas_kernels*"]),
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "chex",
        "ml-collections",
        "absl-py",
        "numpy",
        "ml_dtypes",  # bfloat16 / float8 for safetensors I/O (also a jax dependency)
        "grain",  # the data pipeline
        "tensorboardX",  # event files for TensorBoard without TensorFlow
    ],
    extras_require={
        # transformers + a CPU torch: the HF parity tests (tests/interop) are part of the suite;
        # libtpu (jax[tpu]): the TPU ahead-of-time compile tests, no TPU needed.
        "test": ["pytest>=8", "pytest-xdist", "tokenizers", "torch==2.13.0", "transformers>=5.0",
                 "safetensors", "jax[tpu]>=0.10.2,<0.12"],
        "tpu": ["jax[tpu]>=0.10.2,<0.12"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.12"],
        # torch is pinned: an unpinned torch pulls several GB of CUDA wheels.
        "hf": ["torch==2.13.0", "transformers>=5.0", "safetensors", "tokenizers"],
        "notebooks": ["jupyter", "matplotlib"],
        "plots": ["matplotlib"],  # experiments/ablations/*.py write their PNGs with it
    },
)
