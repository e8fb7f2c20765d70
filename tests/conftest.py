"""Test-wide settings: four simulated CPU devices, so sharding tests can use 1, 2 or 4."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


import jax  # noqa: E402  (after the environment above)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from primus_jax import data  # noqa: E402


@pytest.fixture
def float32_matmuls():
    """Trace the test's float32 matmuls and convolutions at `highest` precision (true float32 on
    CPU, GPU and TPU), for comparisons against numpy or torch float32/float64 references."""
    with jax.default_matmul_precision("highest"):
        yield


def make_window(i: int, *, T: int, text_dim: int, video_dim: int, rate_hz: float = 50.0) -> data.Window:
    """Window i of a test dataset: imu[0, 0] == i identifies it; text, video and label present on
    different patterns (text unless i % 3 == 0, video when i is odd, label i % 4 - 1)."""
    rng = np.random.default_rng(i)
    imu = rng.normal(size=(T, 6)).astype(np.float32)
    imu[0, 0] = i
    return data.Window(
        imu=imu, rate_hz=rate_hz, text=f"person does thing {i} é" if i % 3 else "",
        text_emb=rng.normal(size=text_dim).astype(np.float32) if i % 3 else None,
        video_emb=rng.normal(size=video_dim).astype(np.float32) if i % 2 else None,
        label=i % 4 - 1, source="seglearn", recording_id=f"rec{i // 5}", subject=f"s{i % 2}",
        start_s=0.5 * i, end_s=0.5 * i + T / rate_hz)


@pytest.fixture(scope="session")
def tiny_clip_spec(tmp_path_factory) -> str:
    """The tower spec "clip:<folder>" of a tiny random CLIP checkpoint saved once per session
    (tests/tiny_clip.py), loaded by the command lines like any real checkpoint."""
    from tiny_clip import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("towers"))
