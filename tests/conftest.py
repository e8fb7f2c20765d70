"""Test-wide settings: four simulated CPU devices, so sharding tests can use 1, 2 or 4."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402


@pytest.fixture
def float32_matmuls():
    """Trace the test's float32 matmuls and convolutions at `highest` precision (true float32 on
    CPU, GPU and TPU), for comparisons against numpy or torch float32/float64 references."""
    with jax.default_matmul_precision("highest"):
        yield
