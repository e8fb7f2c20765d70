"""What a pretraining config means before anything runs: the encoder and objective it describes,
the dataset shapes it must fit, and one sentence for each way it cannot run.

`DataDims` are the shapes a dataset's manifest fixes (window length T, rate, embedding widths);
`build_model` and `objective_config` turn `config.model` and `config.objective` into the encoder
and the loss switches; `validate_config` checks a config against the dims and the device count and
raises `ConfigError` listing every problem at once.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from primus_jax import augment, losses, models, optimizer, precision, profiling, queue as nn_queue

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# "primus": the PRIMUS objective (losses.py) with its switches; "multitask_ssl": the MultitaskSSL
# baseline (multitask.py), transformation recognition, which ignores the PRIMUS switches.
OBJECTIVE_METHODS = ("primus", "multitask_ssl")


class ConfigError(ValueError):
    """A configuration that cannot run, described in one sentence."""


@dataclasses.dataclass(frozen=True)
class DataDims:
    """Shapes that come from the dataset manifest rather than from the config."""

    window_length: int
    rate_hz: float
    text_dim: int
    video_dim: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> "DataDims":
        return cls(
            window_length=int(manifest["T"]),
            rate_hz=float(manifest["rate_hz"]),
            text_dim=int(manifest["text_dim"]),
            video_dim=int(manifest["video_dim"]),
        )


def build_model(model_config: ml_collections.ConfigDict) -> models.IMUEncoder:
    """The encoder described by `config.model`."""
    return models.IMUEncoder(
        hidden_dim=model_config.hidden_dim,
        conv_channels=model_config.conv_channels,
        pooled_length=model_config.pooled_length,
        ssl_dim=model_config.ssl_dim,
        mm_dim=model_config.mm_dim,
        gru_over=model_config.gru_over,
        dtype=DTYPES[model_config.dtype],
        conv_impl=model_config.get("conv_impl", "auto"),
        gru_unroll=model_config.get("gru_unroll") or None,
    )


def objective_config(config: ml_collections.ConfigDict, dims: DataDims) -> losses.ObjectiveConfig:
    """The objective's switches; a modality the dataset lacks is switched off."""
    obj = config.objective
    return losses.ObjectiveConfig(
        alpha=obj.alpha,
        use_ss=obj.use_ss,
        use_mm_text=obj.use_mm_text and dims.text_dim > 0,
        use_mm_video=obj.use_mm_video and dims.video_dim > 0,
        use_nn=obj.use_nn,
        negative_groups=obj.get("negative_groups", 1),
    )


def validate_config(config: ml_collections.ConfigDict, dims: DataDims, num_devices: int) -> None:
    """One clear sentence for each configuration error, before anything compiles."""
    problems = []
    g = config.train.global_batch_size
    if g <= 0:
        problems.append(f"train.global_batch_size must be positive, got {g}")
    elif g % num_devices:
        problems.append(
            f"train.global_batch_size={g} is not divisible by the {num_devices} devices; "
            f"use a multiple of {num_devices}")
    if not 0.0 <= config.objective.alpha <= 1.0:
        problems.append(f"objective.alpha must lie in [0, 1], got {config.objective.alpha}")
    groups = config.objective.get("negative_groups", 1)
    if groups < 1 or (g > 0 and g % groups):
        problems.append(f"objective.negative_groups={groups} must be at least 1 and divide train.global_batch_size={g}")
    if config.objective.temperature_init <= 0:
        problems.append(f"objective.temperature_init must be positive, got {config.objective.temperature_init}")
    if config.model.dtype not in DTYPES:
        problems.append(f"model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}")
    try:
        precision.check_matmul_precision(config.model.matmul_precision)
    except ValueError as error:
        problems.append(str(error))
    if config.model.gru_over not in ("channels", "time"):
        problems.append(f"model.gru_over must be 'channels' or 'time', got {config.model.gru_over!r}")
    if config.objective.method not in OBJECTIVE_METHODS:
        problems.append(f"objective.method must be one of {OBJECTIVE_METHODS}, got {config.objective.method!r}")
    elif config.objective.method == "multitask_ssl" and config.objective.use_nn:
        problems.append("objective.method='multitask_ssl' has no nearest-neighbour terms: set objective.use_nn=False")
    if config.objective.nn_retrieve_by not in ("auto", "imu"):
        problems.append(f"objective.nn_retrieve_by must be 'auto' or 'imu', got {config.objective.nn_retrieve_by!r}")
    unknown = [n for n in config.objective.augmentations if n not in augment.TRANSFORMS]
    if unknown:
        problems.append(f"objective.augmentations has unknown transforms {unknown}; valid: {sorted(augment.TRANSFORMS)}")
    if config.queue.size < g and config.objective.use_nn and not nn_queue.shards_over(config.queue.size, num_devices):
        problems.append(f"queue.size={config.queue.size} must be at least train.global_batch_size={g} (or a "
                        f"multiple of the {num_devices} devices, which shards it)")
    if config.optim.learning_rate <= 0:
        problems.append(f"optim.learning_rate must be positive, got {config.optim.learning_rate}")
    problems += optimizer.schedule_problems(config.optim)
    profile_problem = profiling.profile_window_problem(config.train.profile_steps)
    if profile_problem:
        problems.append(profile_problem)
    if config.data.get("workers", -1) < -1 or config.data.prefetch < 0:
        problems.append(f"data.workers (-1: automatic) and data.prefetch must not be negative, got "
                        f"{config.data.get('workers', -1)} and {config.data.prefetch}")
    min_t = models.min_input_length()
    if dims.window_length < min_t:
        problems.append(
            f"the dataset's windows have T={dims.window_length} samples, but the encoder needs at least {min_t}")
    for name, dim in (("text", dims.text_dim), ("video", dims.video_dim)):
        if dim and dim != config.model.mm_dim:
            problems.append(
                f"model.mm_dim={config.model.mm_dim} must equal the dataset's {name} embedding dimension {dim}")
    if problems:
        raise ConfigError("; ".join(problems))
