"""Helpers shared by every data_prep source: resampling, windowing, text cleaning, checks, reports.

Each source module (har, ego4d, egoexo4d) reads its raw files one recording at a time, cuts
(T, 6) IMU windows in SI units (m/s^2, rad/s), and writes them with `primus_jax.data.DatasetWriter`.
What it drops, and why, goes into a `Report`, which becomes `report.json` beside the shards.
"""
from __future__ import annotations

import collections
import json
import math
import re
import string
from fractions import Fraction
from typing import NamedTuple, Sequence

import numpy as np
from scipy import signal

from primus_jax import paths

STANDARD_GRAVITY = 9.80665  # m/s^2 per g
DEFAULT_SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
# Plausible median accelerometer magnitude (m/s^2) of a worn device that measures gravity;
# a median near 1 means the values are in g.
GRAVITY_MAGNITUDE_RANGE = (3.0, 30.0)
# A median gyroscope magnitude above this (rad/s) means the values are in deg/s.
MAX_MEDIAN_GYRO_RAD_S = 20.0
MAX_NARRATION_CHARS = 128


class NothingUsable(RuntimeError):
    """Raised when a data_prep run ends with no window to write."""


class Problem(NamedTuple):
    """Why a recording or window is dropped: a short `reason` (counted) and a `detail` naming it."""

    reason: str
    detail: str


def resample(x: np.ndarray, rate_in: float, rate_out: float) -> np.ndarray:
    """Polyphase resampling along axis 0 with an anti-aliasing low-pass filter.

    The rate ratio rate_out / rate_in is approximated by a fraction up/down (denominator at most
    1000); `scipy.signal.resample_poly` upsamples by `up`, filters with a Kaiser-windowed FIR
    whose cut-off is the lower of the two Nyquist frequencies, and downsamples by `down`. The
    signal is extended by a fitted line at both ends, so slowly varying parts (gravity) keep
    their level up to the edges instead of drooping towards zero.

    Args:
      x: (N, C) or (N,) samples at `rate_in` Hz.
      rate_in, rate_out: positive sampling rates in Hz.
    Returns:
      (ceil(N * up / down), C) array of the same float dtype (float64 input stays float64).
    """
    if rate_in <= 0 or rate_out <= 0:
        raise ValueError(f"resample: rates must be positive, got rate_in={rate_in}, rate_out={rate_out}.")
    x = np.asarray(x)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    ratio = Fraction(rate_out / rate_in).limit_denominator(1000)
    if ratio == 1:
        return x.astype(dtype, copy=True)
    if x.shape[0] < 2:
        raise ValueError(f"resample: need at least 2 samples along axis 0, got shape {x.shape}.")
    y = signal.resample_poly(x.astype(np.float64), ratio.numerator, ratio.denominator, axis=0, padtype="line")
    return y.astype(dtype)


def window_starts(n_samples: int, length: int, hop: int) -> np.ndarray:
    """Start indices of the full windows of `length` samples every `hop` samples: 0, hop, 2*hop, ...

    Returns an empty array when n_samples < length.
    """
    if length <= 0 or hop <= 0:
        raise ValueError(f"window_starts: length and hop must be positive, got length={length}, hop={hop}.")
    if n_samples < length:
        return np.zeros((0,), dtype=np.int64)
    return np.arange(0, n_samples - length + 1, hop, dtype=np.int64)


def sliding_windows(x: np.ndarray, length: int, hop: int) -> np.ndarray:
    """Cuts (N, C) samples into (W, length, C) full windows starting at `window_starts(N, length, hop)`."""
    starts = window_starts(x.shape[0], length, hop)
    return np.stack([x[s : s + length] for s in starts]) if len(starts) else np.zeros((0, length) + x.shape[1:], x.dtype)


def pad_or_truncate(x: np.ndarray, length: int) -> np.ndarray:
    """Zero-pads at the end or truncates (N, C) samples along axis 0 to exactly `length` rows."""
    if x.shape[0] >= length:
        return x[:length]
    padding = [(0, length - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, padding)


def narration_window(
    t: float, duration: float, half: float = 2.5, floor_seconds: bool = True
) -> tuple[float, float] | None:
    """The IMU window [start, end) in seconds for a narration at time t (docs/design.md §4).

    The window is [t - half, t + half], shifted to [0, 2*half] if it starts before 0 and to
    [duration - 2*half, duration] if it ends after the recording. With `floor_seconds` both ends
    are floored to whole seconds (so 2*half must be a whole number of seconds). A window is kept
    only if it is exactly 2*half long and lies inside [0, duration]; otherwise (a recording
    shorter than the window) the result is None.
    """
    width = 2.0 * half
    if half <= 0:
        raise ValueError(f"narration_window: half width must be positive, got {half}.")
    if floor_seconds and abs(width - round(width)) > 1e-9:
        raise ValueError(f"narration_window: floor_seconds needs a whole-second window, got width {width} s.")
    start = t - half
    if start < 0:
        start = 0.0
    if start + width > duration:
        start = duration - width
    if floor_seconds:
        start = float(math.floor(start + 1e-9))
    end = start + width
    if start < 0 or end > duration + 1e-9:
        return None
    return start, end


_UNSURE = re.compile(r"#unsure\b", re.IGNORECASE)
_SPEAKER_TAG = re.compile(r"#\w+")
_CAMERA_WEARER = re.compile(r"^C\b\s*")
_PUNCTUATION_AND_SPACE = string.punctuation + string.whitespace


def clean_narration(text: str) -> str:
    """Cleans an Ego4D / Ego-Exo4D narration into a text target (docs/design.md §4, without the reference's C bug).

    Steps: "#unsure" -> "something"; drop speaker tags such as "#C", "#O", "#X"; drop a leading
    "C" that names the camera wearer ("#C C opens the door" and "C opens the door" both become
    "opens the door"); collapse runs of whitespace; strip whitespace and punctuation at both
    ends; lowercase; cut to 128 characters. Unlike the reference, a capital C inside the text
    is kept ("CPR" stays "cpr").
    """
    text = _UNSURE.sub("something", text)
    text = _SPEAKER_TAG.sub(" ", text)
    text = " ".join(text.split())
    text = _CAMERA_WEARER.sub("", text)
    return text.strip(_PUNCTUATION_AND_SPACE).lower()[:MAX_NARRATION_CHARS]


def check_imu(
    imu: np.ndarray,
    path: str,
    *,
    timestamps_s: np.ndarray | None = None,
    max_gap_s: float = 0.1,
    expect_gravity: bool = True,
) -> Problem | None:
    """Finds the first reason why (N, 6) IMU samples [ax, ay, az, gx, gy, gz] are unusable.

    Checks, in order: shape (N, 6) with N >= 2; every value finite; timestamps (if given)
    strictly increasing with no step longer than `max_gap_s`; median |acc| within [3, 30] m/s^2
    when the device measures gravity (a median near 1 suggests g units); median |gyro| at most
    20 rad/s (larger suggests deg/s). `path` names the recording in the Problem's detail.

    Returns:
      None when usable, else Problem(reason, detail) for `Report.drop(*problem)`.
    """
    imu = np.asarray(imu)
    if imu.ndim != 2 or imu.shape[1] != 6 or imu.shape[0] < 2:
        return Problem("bad shape", f"{path}: IMU has shape {imu.shape}, expected (N>=2, 6)")
    n_bad = int(np.size(imu) - np.count_nonzero(np.isfinite(imu)))
    if n_bad:
        return Problem("non-finite values", f"{path}: {n_bad} NaN or infinite IMU values")
    if timestamps_s is not None:
        steps = np.diff(np.asarray(timestamps_s, dtype=np.float64))
        if len(steps) != imu.shape[0] - 1 or np.any(steps <= 0):
            return Problem("bad timestamps", f"{path}: timestamps are not strictly increasing, one per sample")
        if steps.max() > max_gap_s:
            return Problem("gap", f"{path}: {steps.max():.3f} s gap in the samples (limit {max_gap_s} s)")
    acc_median = float(np.median(np.linalg.norm(imu[:, :3], axis=1)))
    low, high = GRAVITY_MAGNITUDE_RANGE
    if expect_gravity and not low <= acc_median <= high:
        hint = " (looks like g units)" if 0.5 <= acc_median < low else ""
        return Problem(
            "implausible acc units",
            f"{path}: median |acc| {acc_median:.2f} m/s^2 outside [{low}, {high}]{hint}",
        )
    gyro_median = float(np.median(np.linalg.norm(imu[:, 3:], axis=1)))
    if gyro_median > MAX_MEDIAN_GYRO_RAD_S:
        return Problem(
            "implausible gyro units",
            f"{path}: median |gyro| {gyro_median:.1f} rad/s above {MAX_MEDIAN_GYRO_RAD_S} (looks like deg/s)",
        )
    return None


def split_by_group(
    groups: Sequence[str], fractions: dict[str, float] | None = None, seed: int = 0
) -> dict[str, str]:
    """Deterministically assigns whole groups (recordings, subjects, takes) to splits.

    The distinct groups are sorted, shuffled with numpy's default_rng(seed) and dealt out in
    order: split i gets round-to-nearest counts by the largest-remainder method, so the counts
    sum to the number of groups. Windows never straddle splits because groups are the unit.

    Returns:
      {group: split name}.
    """
    fractions = DEFAULT_SPLIT_FRACTIONS if fractions is None else fractions
    total = sum(fractions.values())
    if not fractions or total <= 0 or any(f < 0 for f in fractions.values()):
        raise ValueError(f"split_by_group: fractions must be non-negative with a positive sum, got {fractions}.")
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    exact = np.array([f / total * len(unique) for f in fractions.values()])
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: len(unique) - counts.sum()]:
        counts[i] += 1
    names = np.repeat(list(fractions), counts)
    return {unique[j]: str(names[rank]) for rank, j in enumerate(order)}


class Report:
    """Counts the windows kept per split and the items dropped per reason, for report.json.

    `drop(reason, detail)` counts one dropped item (a recording, file or window, as the source
    decides) and keeps the first few details per reason as examples.
    """

    MAX_EXAMPLES = 5

    def __init__(self, source: str):
        self.source = source
        self.kept: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def keep(self, split: str, n: int = 1) -> None:
        self.kept[split] += n

    def drop(self, reason: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        if detail and len(self.examples[reason]) < self.MAX_EXAMPLES:
            self.examples[reason].append(detail)

    def merge(self, other: "Report") -> None:
        """Adds the counts of `other` (e.g. one recording's report from a worker) to this one.

        Examples are appended up to MAX_EXAMPLES per reason, so merging per-recording reports
        in recording order gives the same report as counting all recordings in one process.
        """
        self.kept.update(other.kept)
        self.dropped.update(other.dropped)
        for reason, examples in other.examples.items():
            room = self.MAX_EXAMPLES - len(self.examples[reason])
            self.examples[reason].extend(examples[: max(room, 0)])

    @classmethod
    def from_dict(cls, content: dict) -> "Report":
        """The Report that `as_dict` (report.json) describes."""
        report = cls(content["source"])
        report.kept.update(content.get("kept", {}))
        report.dropped.update(content.get("dropped", {}))
        for reason, examples in content.get("drop_examples", {}).items():
            report.examples[reason].extend(examples)
        return report

    @property
    def total_kept(self) -> int:
        return sum(self.kept.values())

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "kept": dict(sorted(self.kept.items())),
            "total_kept": self.total_kept,
            "dropped": dict(sorted(self.dropped.items())),
            "drop_examples": {k: v for k, v in sorted(self.examples.items())},
        }

    def write(self, out_dir) -> str:
        """Writes report.json atomically into out_dir (local, created if needed, or gs://); returns its path."""
        out_dir = paths.resolve(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "report.json"
        paths.atomic_write(path, json.dumps(self.as_dict(), indent=2))
        return str(path)

    def summary(self) -> str:
        kept = ", ".join(f"{split}: {n}" for split, n in sorted(self.kept.items())) or "none"
        lines = [f"{self.source}: kept {self.total_kept} windows ({kept})"]
        for reason, n in sorted(self.dropped.items()):
            example = f" e.g. {self.examples[reason][0]}" if self.examples[reason] else ""
            lines.append(f"  dropped {n} x {reason}{example}")
        return "\n".join(lines)

    def require_some(self, input_description: str) -> None:
        """Raises NothingUsable naming the input and the drop counts when no window was kept."""
        if self.total_kept == 0:
            reasons = ", ".join(f"{n} x {r}" for r, n in sorted(self.dropped.items())) or "no input found"
            raise NothingUsable(f"No usable window in {input_description} (dropped: {reasons}).")
