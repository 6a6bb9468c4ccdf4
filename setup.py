"""Installs discreteflow_jax. JAX is installed for the CPU by default; see README for TPU/GPU."""

from setuptools import find_packages, setup

# Lower bounds are the versions the test-suite was run with; upper bounds stop a
# future major/minor release with breaking API changes from being picked silently.
INSTALL_REQUIRES = [
    "jax[cpu]>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml_collections>=1.1.0,<2",
    "absl-py>=2.1,<3",
    "numpy>=2.0,<3",
    "sentencepiece>=0.2.0,<0.3",
    "tokenizers>=0.23,<0.24",
    "safetensors>=0.5,<1",
    "datasets>=4.0,<6",
    "pyarrow>=18",
    "tensorboardX>=2.6,<3",
    "matplotlib>=3.8,<4",
    # MAUVE in `evaluate sweep` (features come from our scorer; faiss-cpu and scikit-learn for clustering).
    "mauve-text>=0.4,<0.5",
]

# The TPU compiler (libtpu, pinned by jax's own "tpu" extra to the jax version) for
# discreteflow_jax.compile_check: compiles for a TPU slice on any Linux x86-64 host, no TPU needed.
# On a CPU host JAX still runs on the CPU (libtpu finds no chip); wheels exist for Linux x86-64 only.
TPU_COMPILE_REQUIRES = ['jax[tpu]>=0.10.2,<0.11; platform_system == "Linux" and platform_machine == "x86_64"']

TEST_REQUIRES = [
    "pytest>=8,<10",
    "pytest-xdist>=3.5,<4",  # two test workers: most of a test's time is compiling, which is single-threaded
    "ruff>=0.6",
    # Only the tests compare against PyTorch reference models. Pin exactly: an
    # unpinned torch pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "transformers>=5.0,<6",
    # tests/test_compile_check.py compiles a train step for a TPU topology (it skips without libtpu).
    *TPU_COMPILE_REQUIRES,
]

setup(
    name="discreteflow_jax",
    version="0.1.0",
    description="TokenFlow language models and Gumbel reflow distillation in JAX/Flax",
    packages=find_packages(include=["discreteflow_jax", "discreteflow_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": TEST_REQUIRES,
        "tpu-compile": TPU_COMPILE_REQUIRES,
        # Online HF tokenizers/checkpoints (tokenizers loaded by Hub id).
        "hf": ["transformers>=5.0,<6"],
    },
)
