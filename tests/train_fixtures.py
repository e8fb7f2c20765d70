"""Shared fixtures for the training tests: a tiny real-format dataset and a tiny config."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

from primus_jax import data

TINY_DIM = 16
TINY_T = 128


def write_tiny_dataset(out_dir: str, n_train: int = 48, n_val: int = 16, seed: int = 0,
                       text_dim: int = TINY_DIM, video_dim: int = TINY_DIM) -> str:
    """A small TFRecord dataset with IMU windows, text and video embeddings; every third lacks video.

    Every window has text, so NN retrieval compares stored embeddings (by video, else by text) and
    never the barely-trained IMU features, whose near-ties would let float rounding pick the neighbour.
    """
    rng = np.random.default_rng(seed)
    with data.DatasetWriter(out_dir, T=TINY_T, rate_hz=50.0, text_dim=text_dim, video_dim=video_dim,
                            records_per_shard=20) as writer:
        for split, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                t = np.linspace(0, 2 * np.pi * (1 + i % 4), TINY_T)[:, None]
                imu = (np.sin(t * np.arange(1, 7)) + 0.1 * rng.standard_normal((TINY_T, 6))).astype(np.float32)
                imu[:, 2] += 9.81
                writer.add(split, data.Window(
                    imu=imu, rate_hz=50.0, text=f"activity {i % 4}",
                    text_emb=rng.standard_normal(text_dim).astype(np.float32) if text_dim else None,
                    video_emb=rng.standard_normal(video_dim).astype(np.float32) if (video_dim and i % 3) else None,
                    label=i % 4, source="test", recording_id=f"rec{i // 4}", subject=f"s{i % 3}",
                    start_s=float(i), end_s=float(i) + TINY_T / 50.0))
    return out_dir


def tiny_values(data_dir: str, **extra) -> dict:
    """Config fields that shrink configs/default.py to a model that trains in seconds."""
    values = {
        "data.dir": data_dir, "data.prefetch": 1,
        "data.workers": 1,  # one real decoding process, the same on every host (default: cores - 1)
        "model.hidden_dim": 32, "model.conv_channels": 8, "model.ssl_dim": TINY_DIM, "model.mm_dim": TINY_DIM,
        "queue.size": 32, "train.global_batch_size": 8, "train.num_steps": 6, "train.log_every": 1,
        "train.eval_every": 3, "train.checkpoint_every": 1, "optim.learning_rate": 1e-3,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return values


def tiny_overrides(data_dir: str, **extra) -> list[str]:
    """The tiny config as `--config.a.b=v` command-line overrides."""
    return [f"--config.{k}={v}" for k, v in tiny_values(data_dir, **extra).items()]


def tiny_config(data_dir: str, **extra):
    """configs/default.py with the tiny values applied in-process (extra: train__num_steps=3, ...)."""
    from configs import default

    config = default.get_config()
    for key, value in tiny_values(data_dir, **extra).items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(workdir: str, overrides: list[str], devices: int = 4, env_extra: dict | None = None,
             config: str = "configs/default.py", **popen) -> subprocess.Popen:
    """Start `python -m primus_jax.main` in a subprocess with `devices` simulated CPU devices.

    XLA's cheaper backend passes compile the tiny model ~40% faster; every run uses them, so
    runs compared bit for bit compile the same way.
    """
    flags = (f"--xla_force_host_platform_device_count={devices} "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "primus_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]
    return subprocess.Popen(cmd, cwd=repo_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_params(workdir: str) -> dict:
    """The params of workdir/export as saved (nested dicts of numpy arrays)."""
    import flax

    from primus_jax import checkpoint

    with open(os.path.join(workdir, "export", checkpoint.PARAMS_FILE), "rb") as f:
        return flax.serialization.msgpack_restore(f.read())
