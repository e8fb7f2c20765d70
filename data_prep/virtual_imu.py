"""Virtual IMU sensors on a motion-capture skeleton: the accelerometer and gyroscope a body-worn
sensor would have recorded, synthesised from one BVH clip (`data_prep.bvh`); `data_prep.mocap` turns
the result into a dataset.

Every clip is read with forward kinematics (`data_prep.bvh`), scaled to metres (--units, inferred
from the figure's size by default) and given its up axis (--up, detected by default). A site is a
point (a joint, or the mean of two joints) and a segment whose orientation the sensor takes:

    wrist_l / wrist_r   the wrist joint (hand_*), oriented with the forearm (forearm_*)
    waist               the hips joint, oriented with the hips
    thigh_l / thigh_r   midway between hip (thigh_*) and knee (knee_*), oriented with the thigh

Roles are found by name: Bandai-Namco (Hand_L, LowerArm_L, Hips, UpperLeg_R, LowerLeg_R ...),
CMU, LaFAN1 and Mixamo ("LeftHand", "LeftForeArm", "RightUpLeg", "RightLeg"; a namespace such as
"mixamorig:" is ignored). --joint-map role=Name,... names them for other skeletons.

With the site's world rotation R_s(t) = R_segment(t) M (M: the mounting rotation, uniformly random
per clip and site from --seed, or the identity with --mount none) and position p(t) in metres:

    accelerometer  R_s^T (a_world - g_world),  a_world = p'' and g_world = -9.80665 m/s^2 * up
    gyroscope      the body-frame angular velocity: at frame t, log(R_s(t-1)^T R_s(t+1)) / (2 dt)
                   (one-sided differences at the ends), in rad/s.

p'' is the second derivative of a Savitzky-Golay fit (cubic, over 2 round(0.125 s / dt) + 1 frames,
about 0.25 s: 9 frames at 30 fps): twice differencing raw marker positions multiplies their
millimetre jitter by 1/dt^2 (0.9 m/s^2 per mm at 30 fps), while a local cubic fit averages it out
and still reproduces any motion of constant acceleration (or jerk) exactly, to the clip's ends
("interp" mode fits the edge windows).

--noise adds a seeded model per clip and site: a constant bias b ~ N(0, sigma_b^2) per axis and
white noise n ~ N(0, sigma_n^2) per sample, on the accelerometer (sigma_b 0.1, sigma_n 0.05 m/s^2)
and gyroscope (sigma_b 0.01, sigma_n 0.005 rad/s), at the clip's rate before resampling.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np
from scipy import ndimage, signal

from data_prep import bvh, common


@dataclasses.dataclass(frozen=True)
class Site:
    """A virtual sensor: the mean position of `position` roles, the orientation of `orientation`."""

    position: tuple[str, ...]
    orientation: str
    phrase: str


SITES = {
    "wrist_l": Site(("hand_l",), "forearm_l", "left wrist"),
    "wrist_r": Site(("hand_r",), "forearm_r", "right wrist"),
    "waist": Site(("hips",), "hips", "waist"),
    "thigh_l": Site(("thigh_l", "knee_l"), "thigh_l", "left thigh"),
    "thigh_r": Site(("thigh_r", "knee_r"), "thigh_r", "right thigh"),
}
DEFAULT_SITES = ("wrist_l", "wrist_r", "waist", "thigh_r")
_CMU_NAMES = {"hand_l": "LeftHand", "forearm_l": "LeftForeArm", "hand_r": "RightHand", "forearm_r": "RightForeArm",
              "hips": "Hips", "thigh_l": "LeftUpLeg", "knee_l": "LeftLeg", "thigh_r": "RightUpLeg", "knee_r": "RightLeg"}
JOINT_MAPS = {
    "bandai": {"hand_l": "Hand_L", "forearm_l": "LowerArm_L", "hand_r": "Hand_R", "forearm_r": "LowerArm_R",
               "hips": "Hips", "thigh_l": "UpperLeg_L", "knee_l": "LowerLeg_L", "thigh_r": "UpperLeg_R",
               "knee_r": "LowerLeg_R"},
    "cmu": _CMU_NAMES,  # CMU (cgspeed BVH), LaFAN1 and Mixamo (after its "mixamorig:" namespace)
}
SAVGOL_SECONDS = 0.25
SAVGOL_ORDER = 3
# Rest: for REST_SECONDS around a frame the site turns slower than REST_TURN (rad/s). Rotation does
# not depend on the length unit, so a unit or frame-time error shows as |acc| far from g at rest
# (sway of a few mm/s^2 read 100 times too large); a moment of zero speed in a swing is not rest.
REST_SECONDS = 0.5
REST_TURN = 0.3
# |acc| at rest must be within this of g (m/s^2); a wrong frame time or unit scale breaks it.
REST_GRAVITY_TOLERANCE = 1.0
NOISE = {"acc_bias": 0.1, "acc_noise": 0.05, "gyro_bias": 0.01, "gyro_noise": 0.005}


class ClipProblem(ValueError):
    """A clip that cannot be synthesised: `reason` (counted in report.json) and a one-sentence message."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Synthesis:
    """How IMU is synthesised from a clip (see the module docstring)."""

    sites: tuple[str, ...] = DEFAULT_SITES
    joint_map: tuple[tuple[str, str], ...] = ()  # (role, joint name) overrides
    units: str = "auto"
    up: str = "auto"
    mount: str = "random"
    noise: bool = False
    seed: int = 0
    short: str = "mirror"
    min_seconds: float = 2.5
    window_seconds: float = 5.0  # set by write_mocap_dataset to T / rate


def _bare(name: str) -> str:
    return name.rsplit(":", 1)[-1].lower()


def resolve_joints(names: Sequence[str], roles: Sequence[str], overrides: dict[str, str], path: str) -> dict[str, int]:
    """{role: joint index} for `roles`: the --joint-map override, else the first JOINT_MAPS entry naming
    them all (matched case-insensitively, namespaces ignored); ClipProblem("missing joints") otherwise."""
    index = {_bare(name): j for j, name in enumerate(names)}
    for table in JOINT_MAPS.values():
        wanted = {role: _bare(overrides.get(role, table[role])) for role in roles}
        if all(name in index for name in wanted.values()):
            return {role: index[name] for role, name in wanted.items()}
    missing = sorted({role for role in roles if not any(_bare(overrides.get(role, t[role])) in index
                                                        for t in JOINT_MAPS.values())})
    raise ClipProblem("missing joints", f"{path}: the skeleton lacks joints for {', '.join(missing)}; it has "
                      f"{', '.join(names)}; map them with --joint-map ROLE=NAME,ROLE=NAME for roles among "
                      f"{', '.join(JOINT_MAPS['bandai'])}.")


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3, 3) rotations uniform on SO(3): unit quaternions from normalised 4-D normal samples."""
    q = rng.standard_normal((n, 4))
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], 1)


def rotation_log(r: np.ndarray) -> np.ndarray:
    """(..., 3) rotation vectors (axis * angle, angle in [0, pi]) of rotations r (..., 3, 3)."""
    skew = np.stack([r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1)
    sin2 = np.linalg.norm(skew, axis=-1)  # 2 sin(angle)
    cos = np.clip((np.trace(r, axis1=-2, axis2=-1) - 1) / 2, -1.0, 1.0)
    angle = np.arctan2(sin2 / 2, cos)
    small = sin2 < 1e-9
    scale = np.where(small, 0.5, angle / np.where(small, 1.0, sin2))
    vector = skew * scale[..., None]
    near_pi = small & (cos < 0)  # angle ~ pi: axis from the symmetric part, sign arbitrary
    if np.any(near_pi):
        sym = (r[near_pi] + np.eye(3)) / 2
        column = np.argmax(np.diagonal(sym, axis1=-2, axis2=-1), axis=-1)
        axis = sym[np.arange(len(column)), :, column]
        vector[near_pi] = np.pi * axis / np.linalg.norm(axis, axis=-1, keepdims=True)
    return vector


def body_angular_velocity(rotations: np.ndarray, dt: float) -> np.ndarray:
    """(F, 3) body-frame angular velocity (rad/s) of rotations (F, 3, 3): central differences of the
    relative rotation, log(R(t-1)^T R(t+1)) / (2 dt), one-sided at the ends."""
    omega = np.empty(rotations.shape[:1] + (3,))
    transposed = np.swapaxes(rotations, -1, -2)
    omega[1:-1] = rotation_log(transposed[:-2] @ rotations[2:]) / (2 * dt)
    omega[0] = rotation_log(transposed[0] @ rotations[1]) / dt
    omega[-1] = rotation_log(transposed[-2] @ rotations[-1]) / dt
    return omega


def mirror_indices(n_frames: int, length: int) -> np.ndarray:
    """Frame indices 0, 1, ..., n-1, n-2, ..., 0, 1, ... (a palindrome loop) of `length` entries."""
    period = np.concatenate([np.arange(n_frames), np.arange(n_frames - 2, 0, -1)])
    return np.resize(period, length)


def scale_to_metres(clip: bvh.Clip, positions: np.ndarray, units: str) -> float:
    """Metres per file unit: --units, or the unit `bvh.infer_units` finds; ClipProblem when none fits."""
    if units != "auto":
        return bvh.UNITS[units]
    found = bvh.infer_units(positions)
    if found is None:
        size = bvh.figure_size(positions)
        raise ClipProblem("implausible units", f"{clip.path}: a figure {size:.3g} units across fits none of the "
                          f"units {', '.join(bvh.UNITS)}; pass --units.")
    return bvh.UNITS[found]


def clip_rng(settings: Synthesis, name: str) -> np.random.Generator:
    """The clip's own generator: seeded by (seed, CRC-32 of its name), whichever worker runs it."""
    return np.random.default_rng([settings.seed, zlib.crc32(name.encode())])


def synthesize(clip: bvh.Clip, settings: Synthesis, name: str) -> tuple[dict[str, np.ndarray], float]:
    """({site: imu (N, 6) float64 SI}, rate_hz) for a clip; raises ClipProblem (one sentence) when unusable."""
    overrides = dict(settings.joint_map)
    roles = sorted({role for site in settings.sites for role in (*SITES[site].position, SITES[site].orientation)})
    joint = resolve_joints(clip.skeleton.names, roles, overrides, clip.path)
    positions, rotations = bvh.forward_kinematics(clip)
    body = bvh.body_joints(clip.skeleton, positions)
    metres = scale_to_metres(clip, positions[:, body], settings.units)
    up = bvh.detect_up(positions[:, body]) if settings.up == "auto" else settings.up
    gravity = -common.STANDARD_GRAVITY * bvh.up_vector(up)
    dt = clip.frame_time
    rate_hz = float(np.round(1.0 / dt, 3))
    needed = int(np.ceil(settings.window_seconds / dt)) + 1
    if settings.short == "mirror" and clip.n_frames < needed and clip.n_frames * dt >= settings.min_seconds:
        frames = mirror_indices(clip.n_frames, needed)
        positions, rotations = positions[frames], rotations[frames]
    window = max(SAVGOL_ORDER + 2, 2 * int(round(SAVGOL_SECONDS / dt / 2)) + 1)
    if len(positions) < window:
        raise ClipProblem("too short", f"{clip.path}: {len(positions)} frames, fewer than the {window} the "
                          "acceleration filter needs.")
    rng = clip_rng(settings, name)
    n_sites = len(settings.sites)
    mounts = random_rotations(rng, n_sites) if settings.mount == "random" else np.tile(np.eye(3), (n_sites, 1, 1))
    imus = {}
    for site_name, mount in zip(settings.sites, mounts):
        site = SITES[site_name]
        point = positions[:, [joint[role] for role in site.position]].mean(axis=1) * metres
        orientation = rotations[:, joint[site.orientation]] @ mount
        acceleration = signal.savgol_filter(point, window, SAVGOL_ORDER, deriv=2, delta=dt, axis=0, mode="interp")
        acc = np.einsum("fji,fj->fi", orientation, acceleration - gravity)
        gyro = body_angular_velocity(orientation, dt)
        span = int(round(REST_SECONDS / dt)) | 1
        rest = ndimage.maximum_filter1d(np.linalg.norm(gyro, axis=1), span, mode="nearest") < REST_TURN
        if rest.sum() >= span:
            at_rest = float(np.median(np.linalg.norm(acc[rest], axis=1)))
            if abs(at_rest - common.STANDARD_GRAVITY) > REST_GRAVITY_TOLERANCE:
                raise ClipProblem("implausible acc at rest", f"{clip.path}: the {site_name} sensor's median |acc| "
                                  f"at rest is {at_rest:.2f} m/s^2, not about 9.81; check the frame time and --units.")
        if settings.noise:
            acc = acc + rng.normal(0, NOISE["acc_bias"], 3) + rng.normal(0, NOISE["acc_noise"], acc.shape)
            gyro = gyro + rng.normal(0, NOISE["gyro_bias"], 3) + rng.normal(0, NOISE["gyro_noise"], gyro.shape)
        imus[site_name] = np.concatenate([acc, gyro], axis=1)
    return imus, rate_hz
