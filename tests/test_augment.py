"""Tests for primus_jax.augment: each transform's defining property, composition, jit, keys."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from primus_jax import augment


def _imu_batch(batch=8, length=50, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, 6)), jnp.float32)


def _count_breaks(indices):
    """Number of places where a gather-index row does not continue a run (idx[t+1] != idx[t]+1)."""
    return np.sum(np.diff(indices, axis=1) != 1, axis=1)


def test_noise_has_std_point_one():
    x = jnp.ones((16, 250, 6), jnp.float32)
    delta = np.asarray(augment.noise(jax.random.key(0), x) - x)
    assert abs(delta.mean()) < 0.005
    assert abs(delta.std() - 0.1) < 0.003


def test_scaling_shares_one_factor_per_time_step():
    x = jnp.ones((32, 250, 6), jnp.float32)
    factors = np.asarray(augment.scaling(jax.random.key(1), x))
    np.testing.assert_array_equal(factors, np.repeat(factors[:, :, :1], 6, axis=2))
    assert abs(factors.mean() - 1.0) < 0.01
    assert abs(factors.std() - 0.25) < 0.01
    # Factors differ across time steps and samples.
    assert np.std(factors[0, :, 0]) > 0.1 and np.std(factors[:, 0, 0]) > 0.1


def test_negate_and_time_flip_are_exact():
    x = _imu_batch()
    key = jax.random.key(2)
    np.testing.assert_array_equal(augment.negate(key, x), -np.asarray(x))
    np.testing.assert_array_equal(augment.time_flip(key, x), np.asarray(x)[:, ::-1, :])


def test_permutation_indices_are_five_runs_at_large_batch():
    indices = np.asarray(augment.segment_permutation_indices(jax.random.key(3), 200, 250))
    assert indices.shape == (200, 250) and indices.dtype == np.int32
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.tile(np.arange(250), (200, 1)))
    breaks = _count_breaks(indices)
    # Five contiguous runs: at most 4 breaks (adjacent segments kept in order merge into one run).
    assert breaks.max() == 4
    # With a uniformly random order most samples really are shuffled.
    assert np.mean(breaks > 0) > 0.9


def test_permute_gathers_rows_and_preserves_each_sample_multiset():
    x = _imu_batch(batch=200, length=250, seed=4)
    key = jax.random.key(5)
    y = np.asarray(augment.permute(key, x))
    indices = np.asarray(augment.segment_permutation_indices(key, 200, 250))
    np.testing.assert_array_equal(y, np.take_along_axis(np.asarray(x), indices[:, :, None], axis=1))
    for sample, permuted in zip(np.asarray(x), y):
        np.testing.assert_array_equal(np.unique(sample, axis=0), np.unique(permuted, axis=0))


def test_bad_shapes_are_rejected_with_the_transform_name():
    with pytest.raises(ValueError, match=r"'permute'.*T >= 5, got shape \(2, 4, 6\)"):
        augment.permute(jax.random.key(0), jnp.zeros((2, 4, 6)))
    with pytest.raises(ValueError, match=r"'rotation'.*got shape \(2, 10, 3\)"):
        augment.rotation(jax.random.key(0), jnp.zeros((2, 10, 3)))


def test_rotation_matrices_are_proper_rotations():
    matrices = np.asarray(augment.random_rotation_matrices(jax.random.key(6), 500), np.float64)
    identity = np.broadcast_to(np.eye(3), matrices.shape)
    np.testing.assert_allclose(matrices @ matrices.transpose(0, 2, 1), identity, atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(matrices), 1.0, atol=1e-5)
    # Uniform on SO(3): the mean matrix is ~0 (a biased sampler would not average out).
    assert np.abs(matrices.mean(axis=0)).max() < 0.1


@pytest.mark.usefixtures("float32_matmuls")  # compared with float64 numpy at 1e-5 of values ~10
def test_rotation_preserves_norms_and_rotates_acc_and_gyro_together():
    x = _imu_batch(batch=6, length=30, seed=7)
    key = jax.random.key(8)
    y = np.asarray(augment.rotation(key, x), np.float64)
    xs = np.asarray(x, np.float64)
    for triplet in (slice(0, 3), slice(3, 6)):
        np.testing.assert_allclose(
            np.linalg.norm(y[..., triplet], axis=-1), np.linalg.norm(xs[..., triplet], axis=-1),
            rtol=1e-5,
        )
    matrices = np.asarray(augment.random_rotation_matrices(key, 6), np.float64)
    for b in range(6):
        np.testing.assert_allclose(y[b, :, :3], xs[b, :, :3] @ matrices[b].T, atol=1e-5)
        np.testing.assert_allclose(y[b, :, 3:], xs[b, :, 3:] @ matrices[b].T, atol=1e-5)
    assert not np.allclose(y, xs, atol=1e-3)


def test_composition_applies_in_list_order_with_split_keys():
    x = _imu_batch(seed=9)
    key = jax.random.key(10)
    first_key, second_key = jax.random.split(key)
    expected = augment.permute(second_key, augment.scaling(first_key, x))
    np.testing.assert_array_equal(augment.make_augmentation(augment.DEFAULT_TRANSFORMS)(key, x), expected)
    # The i-th listed transform receives the i-th split key.
    flip_then_noise = augment.make_augmentation(["time_flip", "noise"])(key, x)
    np.testing.assert_array_equal(flip_then_noise, augment.noise(second_key, x[:, ::-1]))
    np.testing.assert_array_equal(augment.make_augmentation([])(key, x), x)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="'jitter'.*valid names are.*rotation"):
        augment.make_augmentation(["scaling", "jitter"])
    with pytest.raises(ValueError, match="list of transform names"):
        augment.make_augmentation("scaling")


def test_jit_and_keys():
    x = _imu_batch(batch=4, length=40, seed=11)
    names = list(augment.TRANSFORMS)
    augmentation = augment.make_augmentation(names)
    jitted = jax.jit(augmentation)
    key_a, key_b = jax.random.key(12), jax.random.key(13)
    out_a = np.asarray(jitted(key_a, x))
    np.testing.assert_array_equal(out_a, jitted(key_a, x))
    assert not np.allclose(out_a, jitted(key_b, x))
    assert out_a.shape == x.shape and out_a.dtype == np.float32
