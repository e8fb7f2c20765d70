"""IMU augmentations for the self-supervised term L_SS, vectorised over the whole batch.

Every transform is a pure, jittable function ``fn(key, x) -> x`` on a channels-last IMU batch
``x`` of shape (B, T, 6) (accelerometer x, y, z then gyroscope x, y, z). Randomness comes only
from ``key``; there are no Python loops over samples and no host round trips, so the transforms
run on device inside the training step.

The first six transforms follow the PRIMUS reference implementation, with two deliberate fixes
(segment permutation at any batch size, rotations that really are rotations); each docstring
says where we differ. time_warp and channel_shuffle complete the eight transformations of the
MultitaskSSL baseline (Saeed et al. 2019; ``primus_jax.multitask``). ``make_augmentation`` composes transforms by name, in list order.
"""
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

Transform = Callable[[jax.Array, jax.Array], jax.Array]

IMU_CHANNELS = 6
NOISE_STD = 0.1
SCALING_STD = 0.25
PERMUTATION_SEGMENTS = 5


def _require_imu_batch(x: jax.Array, transform_name: str, min_length: int = 1) -> None:
    """Raise ValueError unless x is a (B, T, 6) batch with T >= min_length."""
    if x.ndim != 3 or x.shape[-1] != IMU_CHANNELS or x.shape[1] < min_length:
        raise ValueError(
            f"augmentation {transform_name!r} needs an IMU batch of shape (B, T, {IMU_CHANNELS}) "
            f"with T >= {min_length}, got shape {tuple(x.shape)}."
        )


def noise(key: jax.Array, x: jax.Array) -> jax.Array:
    """Additive Gaussian jitter: x + eps, eps ~ N(0, 0.1^2) i.i.d. per element, in raw SI units."""
    _require_imu_batch(x, "noise")
    return x + NOISE_STD * jax.random.normal(key, x.shape, x.dtype)


def scaling(key: jax.Array, x: jax.Array) -> jax.Array:
    """Multiplicative jitter: x[b, t, c] * s[b, t], s ~ N(1, 0.25^2) of shape (B, T, 1).

    One factor per sample and time step, shared by all six channels. This reproduces what the
    reference does: it draws factors of shape (B, 1, T) on its channels-first layout, which is
    per-time-step jitter rather than the per-channel scaling its name suggests.
    """
    _require_imu_batch(x, "scaling")
    factors = 1.0 + SCALING_STD * jax.random.normal(key, (x.shape[0], x.shape[1], 1), x.dtype)
    return x * factors


def negate(key: jax.Array, x: jax.Array) -> jax.Array:
    """Sign flip: -x (deterministic; key unused)."""
    del key
    _require_imu_batch(x, "negate")
    return -x


def time_flip(key: jax.Array, x: jax.Array) -> jax.Array:
    """Time reversal: y[b, t] = x[b, T-1-t] (deterministic; key unused)."""
    del key
    _require_imu_batch(x, "time_flip")
    return x[:, ::-1, :]


def segment_permutation_indices(key: jax.Array, batch: int, length: int) -> jax.Array:
    """Gather indices (B, T) int32 that cut each sample into 5 segments and shuffle them.

    Per sample b: 4 distinct cut points c_1 < ... < c_4 drawn uniformly from {1, ..., T-1}
    (the 4 largest of T-1 uniform scores, hence distinct), boundaries
    e = (0, c_1, c_2, c_3, c_4, T), segment k = [e_k, e_{k+1}) (never empty), and a uniformly
    random order pi of the 5 segments. Output segment j has length L_j = e_{pi_j + 1} - e_{pi_j}
    and starts at o_j = sum_{i<j} L_i; output position t in segment j reads source index
    e_{pi_j} + (t - o_j). Each row is therefore a permutation of 0..T-1 made of 5 contiguous runs.

    The reference draws the cut points without replacement across the whole batch (so 4B <= T,
    B <= 62 at T = 250, or it fails) and may cut at 0 (an empty segment); here cuts are drawn
    per sample in [1, T-1], so any batch size works and all 5 segments are non-empty.
    """
    if length < PERMUTATION_SEGMENTS:
        raise ValueError(
            f"segment permutation needs at least {PERMUTATION_SEGMENTS} time steps, got T={length}."
        )
    cut_key, order_key = jax.random.split(key)
    cut_scores = jax.random.uniform(cut_key, (batch, length - 1))
    _, cut_offsets = jax.lax.top_k(cut_scores, PERMUTATION_SEGMENTS - 1)
    cuts = jnp.sort(cut_offsets + 1, axis=1)
    edges = jnp.concatenate(
        [jnp.zeros((batch, 1), cuts.dtype), cuts, jnp.full((batch, 1), length, cuts.dtype)], axis=1
    )
    segment_starts, segment_lengths = edges[:, :-1], jnp.diff(edges, axis=1)
    order = jnp.argsort(jax.random.uniform(order_key, (batch, PERMUTATION_SEGMENTS)), axis=1)
    out_lengths = jnp.take_along_axis(segment_lengths, order, axis=1)
    out_starts = jnp.cumsum(out_lengths, axis=1) - out_lengths
    positions = jnp.arange(length)
    # Output segment of each position: how many later segment starts lie at or before it.
    out_segment = jnp.sum(positions[None, :, None] >= out_starts[:, None, 1:], axis=2)
    source_starts = jnp.take_along_axis(segment_starts, order, axis=1)
    indices = jnp.take_along_axis(source_starts, out_segment, axis=1) + (
        positions[None, :] - jnp.take_along_axis(out_starts, out_segment, axis=1)
    )
    return indices.astype(jnp.int32)


def permute(key: jax.Array, x: jax.Array) -> jax.Array:
    """Segment permutation: y[b, t] = x[b, idx[b, t]] with idx from segment_permutation_indices."""
    _require_imu_batch(x, "permute", min_length=PERMUTATION_SEGMENTS)
    indices = segment_permutation_indices(key, x.shape[0], x.shape[1])
    return jnp.take_along_axis(x, indices[:, :, None], axis=1)


def random_rotation_matrices(key: jax.Array, batch: int) -> jax.Array:
    """Uniformly random rotations (B, 3, 3): orthonormal, det +1 (Haar measure on SO(3)).

    A 4-vector of i.i.d. N(0, 1) normalised to unit length is a uniform unit quaternion
    q = (w, x, y, z); its rotation matrix is
        R = [[1-2(y²+z²), 2(xy-wz),   2(xz+wy)],
             [2(xy+wz),   1-2(x²+z²), 2(yz-wx)],
             [2(xz-wy),   2(yz+wx),   1-2(x²+y²)]].
    """
    quaternions = jax.random.normal(key, (batch, 4))
    w, x, y, z = jnp.moveaxis(quaternions / jnp.linalg.norm(quaternions, axis=1, keepdims=True), 1, 0)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return jnp.stack([jnp.stack(row, axis=-1) for row in rows], axis=-2)


def rotation(key: jax.Array, x: jax.Array) -> jax.Array:
    """Random 3-D rotation per sample: y[b, t, s] = R_b x[b, t, s] for both triplets s (acc, gyro).

    R_b is uniform on SO(3) (random_rotation_matrices) and the same matrix rotates the
    accelerometer and the gyroscope, as a rigid re-orientation of the device would. The
    reference normalises a 6-component axis and then uses only its first 3 components, so its
    axis is not a unit vector and its matrix is not orthonormal; ours is a true rotation.
    """
    _require_imu_batch(x, "rotation")
    matrices = random_rotation_matrices(key, x.shape[0]).astype(x.dtype)
    triplets = x.reshape(x.shape[0], x.shape[1], 2, 3)
    return jnp.einsum("bij,btsj->btsi", matrices, triplets).reshape(x.shape)


TIME_WARP_KNOTS = 4
TIME_WARP_STD = 0.2
# The five permutations of (x, y, z) other than the identity.
AXIS_SHUFFLES = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def time_warp_positions(key: jax.Array, batch: int, length: int) -> jax.Array:
    """Warped read positions (B, T) float32, increasing from 0 to T-1 (a smooth random time map).

    Per sample, speeds v_k ~ N(1, 0.2^2) (clipped to >= 0.1) at 4 knots spread over the window
    are linearly interpolated to T steps; the positions are the cumulative speed, rescaled so the
    window still spans [0, T-1]: stretches where v > 1 play faster, v < 1 slower.
    """
    speeds = jnp.maximum(1.0 + TIME_WARP_STD * jax.random.normal(key, (batch, TIME_WARP_KNOTS)), 0.1)
    knots = jnp.linspace(0.0, length - 1.0, TIME_WARP_KNOTS)
    steps = jax.vmap(lambda v: jnp.interp(jnp.arange(length, dtype=jnp.float32), knots, v))(speeds)
    cumulative = jnp.cumsum(steps, axis=1) - steps[:, :1]
    return cumulative / cumulative[:, -1:] * (length - 1.0)


def time_warp(key: jax.Array, x: jax.Array) -> jax.Array:
    """Time warping: y[b, t] = x[b, p[b, t]] with p from time_warp_positions, read by linear interpolation."""
    _require_imu_batch(x, "time_warp", min_length=2)
    positions = time_warp_positions(key, x.shape[0], x.shape[1])
    lower = jnp.clip(jnp.floor(positions).astype(jnp.int32), 0, x.shape[1] - 2)
    frac = (positions - lower).astype(x.dtype)[:, :, None]
    before = jnp.take_along_axis(x, lower[:, :, None], axis=1)
    after = jnp.take_along_axis(x, lower[:, :, None] + 1, axis=1)
    return before + frac * (after - before)


def channel_shuffle(key: jax.Array, x: jax.Array) -> jax.Array:
    """Axis shuffle: a random non-identity permutation of (x, y, z) per sample, the same for the
    accelerometer and the gyroscope (a relabelling of the device axes; the sensors stay apart)."""
    _require_imu_batch(x, "channel_shuffle")
    choice = jax.random.randint(key, (x.shape[0],), 0, len(AXIS_SHUFFLES))
    axes = jnp.asarray(AXIS_SHUFFLES, jnp.int32)[choice]  # (B, 3)
    channels = jnp.concatenate([axes, axes + 3], axis=1)  # (B, 6)
    return jnp.take_along_axis(x, channels[:, None, :], axis=2)


TRANSFORMS: dict[str, Transform] = {
    "noise": noise,
    "scaling": scaling,
    "negate": negate,
    "time_flip": time_flip,
    "permute": permute,
    "rotation": rotation,
    "time_warp": time_warp,
    "channel_shuffle": channel_shuffle,
}

# What the reference actually runs: its module default [1, 4] (its --transform_list is ignored).
DEFAULT_TRANSFORMS = ("scaling", "permute")


def make_augmentation(names: Sequence[str]) -> Transform:
    """Compose TRANSFORMS by name: aug(key, x) = f_n(k_n, ... f_1(k_1, x)), k_i from split(key, n).

    Transforms apply in list order; an empty list is the identity. An unknown name raises
    ValueError listing the valid names.
    """
    if isinstance(names, str):
        raise ValueError(f"make_augmentation takes a list of transform names, got the string {names!r}.")
    names = tuple(names)
    unknown = [name for name in names if name not in TRANSFORMS]
    if unknown:
        raise ValueError(
            f"unknown augmentation(s) {unknown}; valid names are {sorted(TRANSFORMS)}."
        )
    transforms = [TRANSFORMS[name] for name in names]

    def augment(key: jax.Array, x: jax.Array) -> jax.Array:
        for transform, transform_key in zip(transforms, jax.random.split(key, len(transforms))):
            x = transform(transform_key, x)
        return x

    return augment
