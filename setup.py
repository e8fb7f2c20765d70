"""Installs primus_jax, its configs and its data_prep command-line tools."""
from setuptools import find_packages, setup

setup(
    name="primus_jax",
    version="0.1.0",
    description="PRIMUS IMU-encoder pretraining (SS + MM + NN) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["primus_jax", "primus_jax.*", "configs", "data_prep", "benchmarks"]),
    package_data={"data_prep": ["mocap_templates.txt"]},  # the narration templates of data_prep.mocap
    install_requires=[
        "jax>=0.10.2,<0.12",
        "jaxlib>=0.10.2,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12.8,<0.13",
        "etils[epath]>=1.15",  # one path library for local and gs:// (primus_jax/paths.py)
        "gcsfs>=2026.10",  # epath's gs:// backend
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "scipy>=1.11",
        "threadpoolctl>=3.1",  # one BLAS thread for the linear probe's small fits
        "transformers>=4.57,<5",
        "crc32c>=2.3",
        "protobuf>=4.21",
        "grain>=0.2.18,<0.3",
        "av>=12",
        "seglearn>=1.2.5",
        "aeon>=1.0",
        "tqdm>=4.66",
        "cloudpickle>=3.0",  # ships a data_prep job to the local worker processes
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # tensorflow-datasets: opening a prepared dataset with tfds.builder_from_directory (tested
        # with 4.9.10 next to tensorflow-cpu 2.21 and protobuf 6.33); apache-beam: the DirectRunner test.
        # torch: reading the reference's Lightning checkpoint in the suite test (2.13.0, the CPU build
        # the development machines hold; an unpinned torch would pull a multi-GB CUDA build).
        # onnx, onnxruntime: the ONNX export and its check (python -m primus_jax.export --to onnx).
        # projectaria-tools is installed beside it with --no-deps (README's test command): its declared
        # dependencies (jupyter, rerun-sdk, moviepy) serve its viewers, and moviepy's pillow<12
        # contradicts apache-beam's pillow>=12.1.1; reading VRS needs only numpy.
        # jax[tpu]: libtpu, with which tests/test_compile.py compiles the steps for TPU topologies on the
        # CPU (tests/conftest.py sets JAX_PLATFORMS=cpu, so no test starts a TPU runtime).
        # scikit-learn: the linear probe's agreement test against LogisticRegression (tested with 1.9.1).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9.10,<5",
                 "gcp-storage-emulator>=2026.7", "apache-beam>=2.77", "torch==2.13.0",
                 "onnx>=1.17", "onnxruntime>=1.20", "jax[tpu]>=0.10.2,<0.12",
                 "scikit-learn>=1.5"],
        # data_prep --runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner (data_prep/beam_pipeline.py);
        # 2.77 installs on Python 3.11 next to tensorflow-cpu 2.21 and jax 0.10 (protobuf 6.33).
        "beam": ["apache-beam>=2.77"],
        # Accelerators: jax's CUDA 12 / CUDA 13 wheels (NVIDIA driver only, CUDA comes from pip), or libtpu.
        "cuda12": ["jax[cuda12]>=0.10.2,<0.12"],
        "cuda13": ["jax[cuda13]>=0.10.2,<0.12"],
        "tpu": ["jax[tpu]>=0.10.2,<0.12"],
        "torch": ["torch"],
        # python -m primus_jax.export --to onnx (traced with torch's TorchScript ONNX exporter)
        "onnx": ["torch", "onnx>=1.17"],
        "aria": ["projectaria-tools"],
    },
)
