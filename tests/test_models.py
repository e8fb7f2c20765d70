"""Tests of primus_jax.models: shapes, lengths, parameter count, pooling, variants, dtypes, init."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from primus_jax.models import (
    IMUEncoder,
    adaptive_avg_pool_matrix,
    conv_stack_lengths,
    count_params,
    min_input_length,
)

BATCH = 2


def imu_batch(T: int, seed: int = 0) -> np.ndarray:
    """(BATCH, T, 6) float32 windows: gravity-like accelerometer (m/s^2) and gyroscope (rad/s)."""
    rng = np.random.default_rng(seed)
    acc = rng.normal(0.0, 2.0, (BATCH, T, 3)) + np.array([0.0, 0.0, 9.81])
    gyro = rng.normal(0.0, 0.5, (BATCH, T, 3))
    return np.concatenate([acc, gyro], axis=-1).astype(np.float32)


@pytest.fixture(scope="module")
def params():
    return jax.jit(IMUEncoder().init)(jax.random.key(0), imu_batch(250))["params"]


@pytest.fixture(scope="module")
def outputs_250(params):
    return jax.jit(IMUEncoder().apply)({"params": params}, imu_batch(250))


def test_conv_stack_lengths_match_spec():
    assert conv_stack_lengths(250) == [232, 77, 69, 23, 15, 32]
    assert conv_stack_lengths(1000) == [982, 327, 319, 106, 98, 32]


def test_min_input_length_is_the_smallest_valid_length():
    shortest = min_input_length()
    assert shortest == 123
    assert min(conv_stack_lengths(shortest)) >= 1
    assert min(conv_stack_lengths(shortest - 1)) < 1


def test_too_short_window_gives_clear_error(params):
    with pytest.raises(ValueError, match="IMUEncoder needs at least 123 time steps per window, got 122"):
        IMUEncoder().apply({"params": params}, imu_batch(122))


def test_wrong_channel_count_gives_clear_error(params):
    with pytest.raises(ValueError, match=r"shape \(B, T, 6\), got \(2, 250, 3\)"):
        IMUEncoder().apply({"params": params}, imu_batch(250)[..., :3])


def test_output_shapes_and_dtypes_for_250_and_1000(params, outputs_250):
    outputs_1000 = jax.jit(IMUEncoder().apply)({"params": params}, imu_batch(1000))
    for outputs in (outputs_250, outputs_1000):
        assert {name: value.shape for name, value in outputs.items()} == {
            "emb": (BATCH, 512),
            "ssl": (BATCH, 512),
            "mmcl": (BATCH, 512),
        }
        assert all(value.dtype == jnp.float32 for value in outputs.values())
        assert all(np.isfinite(value).all() for value in outputs.values())


def test_head_sizes_follow_fields():
    model = IMUEncoder(hidden_dim=64, ssl_dim=48, mm_dim=384)
    shapes = jax.eval_shape(model.init, jax.random.key(0), imu_batch(250))["params"]
    assert shapes["ssl_head"]["kernel"].shape == (64, 48)
    assert shapes["mmcl_head"]["kernel"].shape == (64, 384)


def test_parameter_count_equals_torch(params):
    """The GRU keeps both torch bias vectors b_ih and b_hh, 3H(D + H + 2) = 838,656 parameters;
    Flax's nn.GRUCell would fold b_hr, b_hz into the input biases and give 837,632 instead."""
    assert count_params(params["gru"]) == 3 * 512 * (32 + 512 + 2) == 838_656
    backbone = {name: value for name, value in params.items() if not name.endswith("_head")}
    assert count_params(backbone) == 850_892
    assert count_params(params) == 1_376_204


@pytest.mark.parametrize("in_length", [15, 98])
def test_adaptive_pool_matches_torch_windows(in_length):
    """Upsampling (15 -> 32, T=250) and downsampling (98 -> 32, T=1000) against torch's windows
    [floor(i L / 32), ceil((i + 1) L / 32)) computed directly."""
    signal = np.random.default_rng(1).normal(size=(in_length,)).astype(np.float32)
    direct = np.array(
        [
            signal[math.floor(i * in_length / 32) : math.ceil((i + 1) * in_length / 32)].mean()
            for i in range(32)
        ]
    )
    np.testing.assert_allclose(signal @ adaptive_avg_pool_matrix(in_length, 32), direct, rtol=1e-6, atol=1e-6)


def test_gru_over_time_runs_and_differs(params, outputs_250):
    time_major = jax.jit(IMUEncoder(gru_over="time").apply)({"params": params}, imu_batch(250))
    assert time_major["emb"].shape == (BATCH, 512)
    assert np.abs(time_major["emb"] - outputs_250["emb"]).max() > 1e-2


def test_unknown_gru_over_is_rejected(params):
    with pytest.raises(ValueError, match="gru_over must be one of"):
        IMUEncoder(gru_over="space").apply({"params": params}, imu_batch(250))


def test_bfloat16_outputs_are_float32_and_close(params, outputs_250):
    """bfloat16 activations stay within 5e-2 relative (L2) error of float32 (measured ~6e-3)."""
    model = IMUEncoder(dtype=jnp.bfloat16)
    param_shapes = jax.eval_shape(model.init, jax.random.key(0), imu_batch(250))["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(param_shapes))
    outputs = jax.jit(model.apply)({"params": params}, imu_batch(250))
    for name, reference in outputs_250.items():
        assert outputs[name].dtype == jnp.float32
        relative_error = np.linalg.norm(outputs[name] - reference) / np.linalg.norm(reference)
        assert relative_error < 5e-2, (name, relative_error)


def test_initialisation_follows_torch_defaults(params):
    bounds = {
        ("conv1", "kernel"): 1 / math.sqrt(6 * 10),
        ("conv2", "kernel"): 1 / math.sqrt(32 * 5),
        ("gru", "input_proj", "kernel"): 1 / math.sqrt(512),
        ("gru", "cell", "bias"): 1 / math.sqrt(512),
        ("ssl_head", "kernel"): 1 / math.sqrt(512),
        ("mmcl_head", "bias"): 1 / math.sqrt(512),
    }
    for path, bound in bounds.items():
        leaf = params
        for name in path:
            leaf = leaf[name]
        largest = float(np.abs(leaf).max())
        assert 0.9 * bound < largest <= bound, (path, largest, bound)
    np.testing.assert_array_equal(params["input_norm"]["scale"], np.ones(6))
    np.testing.assert_array_equal(params["feature_norm"]["bias"], np.zeros(32))
