"""Ego4D v1 narrated IMU windows -> TFRecord shards with frozen text and video embeddings.

    python -m data_prep.ego4d --ego4d-root DIR --out DIR [--towers SPEC] [--window-sec 5]
        [--rate 50] [--splits train=0.8 val=0.1 test=0.1] [--limit-videos N] [--require-video]
        [--workers N | --runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner BEAM_OPTIONS...]

Input layout (Ego4D v1):
  v1/annotations/narration.json   {video_uid: {"narration_pass_1": {"narrations": [
                                    {"timestamp_sec": t, "narration_text": "#C C opens ...", ...}]},
                                    "narration_pass_2": {...}}}   (both passes are used)
  v1/imu/<video_uid>.csv          columns canonical_timestamp_ms, accl_x, accl_y, accl_z (m/s^2),
                                    gyro_x, gyro_y, gyro_z (rad/s); the canonical time is the
                                    video's clock, so narration t seconds is IMU time 1000 t ms.
  v1/full_scale/<video_uid>.mp4   the video.

Each narration at t gives the window [start, end) = `common.narration_window(t, D, half)` with D
the last IMU time (SPEC §4). The IMU samples of the window are linearly interpolated onto the
uniform grid start + i / (m r), i < m r w (r = --rate, w = --window-sec, m = round(native rate
/ r) >= 1) and decimated by m with the anti-aliasing `common.resample`, which gives exactly
T = r w samples aligned with the window; no padding or trimming is needed.

Videos are read and embedded one window at a time in small batches, so memory stays bounded.
Each recording is processed by one pure function (`NarratedJob.process`); `data_prep.parallel`
runs it here (`--workers N` processes) or on Apache Beam (`--runner ...`), with the same output.
Policy for video: a window whose mp4 is missing or unreadable is kept with has_video = 0 and
counted in report.json under "kept_without_video"; `--require-video` drops it instead.
Recordings are assigned to splits whole (`common.split_by_group` over the processed videos).

The code below the Ego4D-specific part (`Narration`, `Recording`, `recording_windows`,
`NarratedJob`, the shared command-line options) is also used by `data_prep.egoexo4d`.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import functools
import io
import json
import math
import os
import sys
from typing import Callable, Iterator, Sequence

import numpy as np

from data_prep import common, parallel
from data_prep.video import VideoError, read_clip
from primus_jax import paths, towers
from primus_jax.data import Window

IMU_TIME_COLUMN = "canonical_timestamp_ms"
IMU_VALUE_COLUMNS = ("accl_x", "accl_y", "accl_z", "gyro_x", "gyro_y", "gyro_z")
NARRATION_PASSES = ("narration_pass_1", "narration_pass_2")


class ImuFileError(Exception):
    """A recording's whole IMU file is unusable: `reason` is counted, `detail` names the file."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Narration:
    """A timestamped description of a recording: time in seconds on the IMU clock, raw text."""

    time_s: float
    text: str


@dataclasses.dataclass(frozen=True)
class Recording:
    """One IMU recording with its narrations, its video (or None) and the split it goes to.

    `load_imu()` returns (times_s (N,), imu (N, 6)) on the narrations' clock, or raises
    ImuFileError; it is called only when the recording is processed (one at a time).
    """

    recording_id: str
    subject: str
    split: str
    narrations: tuple[Narration, ...]
    video_path: str | None
    load_imu: Callable[[], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class WindowSettings:
    """How windows are cut and embedded (see the module docstring)."""

    window_sec: float = 5.0
    rate_hz: float = 50.0
    max_gap_s: float = 0.5
    require_video: bool = False
    frames_per_clip: int = 50
    video_batch: int = 8
    text_batch: int = 256

    @property
    def length(self) -> int:
        return int(round(self.window_sec * self.rate_hz))


class EgoReport(common.Report):
    """A Report that also counts windows kept without a video embedding, per reason."""

    def __init__(self, source: str):
        super().__init__(source)
        self.without_video: collections.Counter[str] = collections.Counter()

    def keep_without_video(self, reason: str, detail: str) -> None:
        self.without_video[reason] += 1
        if len(self.examples[reason]) < self.MAX_EXAMPLES:
            self.examples[reason].append(detail)

    def merge(self, other: "EgoReport") -> None:
        super().merge(other)
        self.without_video.update(other.without_video)

    @classmethod
    def from_dict(cls, content: dict) -> "EgoReport":
        report = super().from_dict(content)
        report.without_video.update(content.get("kept_without_video", {}))
        return report

    def as_dict(self) -> dict:
        return {**super().as_dict(), "kept_without_video": dict(sorted(self.without_video.items()))}

    def summary(self) -> str:
        lines = [f"  kept {n} x without video: {reason}" for reason, n in sorted(self.without_video.items())]
        return "\n".join([super().summary()] + lines)


def read_imu_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads an Ego4D-style IMU CSV into (times_s (N,) float64, imu (N, 6) float64), sorted by time.

    Columns are found by name (canonical_timestamp_ms, accl_x..z, gyro_x..z; others ignored).
    An empty value becomes NaN (windows that touch it are dropped later); rows with an empty
    timestamp are removed since they cannot be placed in time. Plain numeric files take numpy's
    fast parser; a file with empty or bad cells is re-read row by row.

    Raises:
      ImuFileError: reason "missing imu" (no file), "bad columns" (a column is missing) or
        "bad values" (a value is not a number, or fewer than 2 timed rows), with a detail naming
        the file, line and column.
    """
    source = paths.resolve(path)
    if not source.is_file():
        raise ImuFileError("missing imu", f"{path}: IMU file not found")
    wanted = (IMU_TIME_COLUMN,) + IMU_VALUE_COLUMNS
    text = source.read_text(encoding="utf-8")
    header = [name.strip() for name in next(csv.reader(io.StringIO(text)), [])]
    missing = [name for name in wanted if name not in header]
    if missing:
        raise ImuFileError("bad columns", f"{path}: missing column(s) {', '.join(missing)} (found {header})")
    columns = [header.index(name) for name in wanted]
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, usecols=columns, ndmin=2, dtype=np.float64)
    except ValueError:
        table = _read_rows_with_blanks(text, path, wanted, columns)
    table = table[np.isfinite(table[:, 0])]
    if len(table) < 2:
        raise ImuFileError("bad values", f"{path}: fewer than 2 rows with a {IMU_TIME_COLUMN}")
    table = table[np.argsort(table[:, 0], kind="stable")]
    return table[:, 0] / 1000.0, table[:, 1:]


def _read_rows_with_blanks(text: str, path: str, wanted: Sequence[str], columns: Sequence[int]) -> np.ndarray:
    """Row-by-row parse of the `columns` of a CSV's text: blank cells -> NaN, text -> ImuFileError."""
    rows = []
    reader = csv.reader(io.StringIO(text))
    next(reader)
    for line_number, row in enumerate(reader, start=2):
        values = []
        for name, column in zip(wanted, columns):
            cell = row[column].strip() if column < len(row) else ""
            try:
                values.append(float(cell) if cell else math.nan)
            except ValueError:
                raise ImuFileError(
                    "bad values", f"{path} line {line_number}: {name} is {cell!r}, not a number"
                ) from None
        rows.append(values)
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(wanted))


def window_imu(
    times_s: np.ndarray, imu: np.ndarray, start: float, end: float, settings: WindowSettings, name: str
) -> np.ndarray | common.Problem:
    """The (T, 6) float32 window [start, end) at settings.rate_hz, or the Problem that prevents it.

    The samples bracketing the window (plus one neighbour each side) must cover it to within
    max_gap_s at both ends ("out of range") and pass `common.check_imu` (finite, increasing
    timestamps, no gap > max_gap_s, plausible units). They are interpolated onto a uniform grid
    at m * rate (m = round(native rate / rate), at least 1) and decimated by m with
    `common.resample`, giving exactly T = rate * window_sec samples.
    """
    lo = max(int(np.searchsorted(times_s, start, side="right")) - 1, 0)
    hi = min(int(np.searchsorted(times_s, end, side="left")) + 1, len(times_s))
    if hi - lo < 2 or times_s[lo] > start + settings.max_gap_s or times_s[hi - 1] < end - settings.max_gap_s:
        covered = f"[{times_s[0]:.2f}, {times_s[-1]:.2f}] s" if len(times_s) else "nothing"
        return common.Problem("out of range", f"{name}: the IMU covers {covered}")
    times, values = times_s[lo:hi], imu[lo:hi]
    problem = common.check_imu(values, name, timestamps_s=times, max_gap_s=settings.max_gap_s)
    if problem is not None:
        return problem
    native_rate = (len(times) - 1) / (times[-1] - times[0])
    factor = max(1, int(round(native_rate / settings.rate_hz)))
    grid_rate = settings.rate_hz * factor
    grid = start + np.arange(settings.length * factor) / grid_rate
    on_grid = np.stack([np.interp(grid, times, values[:, c]) for c in range(values.shape[1])], axis=1)
    return common.resample(on_grid, grid_rate, settings.rate_hz).astype(np.float32)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for first in range(0, len(items), size):
        yield items[first : first + size]


def _embed_videos(
    candidates: list[dict], video_path: str | None, settings: WindowSettings, video_tower, report: EgoReport
) -> list[dict]:
    """Adds "video_emb" (None when the video is missing or unreadable) to each candidate window.

    Returns the candidates that stay, in order: all of them, or with `settings.require_video`
    only those with a video embedding. Clips are read and embedded video_batch at a time.
    """
    def without_video(candidate: dict, reason: str, detail: str) -> None:
        candidate["video_emb"] = None
        (report.drop if settings.require_video else report.keep_without_video)(reason, detail)

    if video_tower is None:
        for candidate in candidates:
            candidate["video_emb"] = None
        return candidates
    if video_path is None or not paths.resolve(video_path).is_file():
        for candidate in candidates:
            without_video(candidate, "missing video", f"{video_path}: video file not found")
    else:
        for batch in _batches(candidates, settings.video_batch):
            readable, clips = [], []
            for candidate in batch:
                try:
                    clips.append(read_clip(video_path, candidate["start"], candidate["end"], settings.frames_per_clip))
                    readable.append(candidate)
                except VideoError as error:
                    without_video(candidate, "unreadable video", str(error))
            if clips:
                for candidate, embedding in zip(readable, video_tower.embed_clips(clips, progress=False)):
                    candidate["video_emb"] = embedding
    return [c for c in candidates if c["video_emb"] is not None or not settings.require_video]


def recording_windows(
    recording: Recording,
    times_s: np.ndarray,
    imu: np.ndarray,
    *,
    source: str,
    settings: WindowSettings,
    text_tower,
    video_tower,
    report: EgoReport,
) -> list[Window]:
    """Cuts, checks and embeds the narration windows of one recording (SPEC §4).

    For each narration (time t, text): the text is cleaned (`common.clean_narration`; empty ->
    dropped "empty text"); t must lie within the IMU's time span (else "out of range"); the
    window is `common.narration_window(t, last IMU time, window_sec / 2)`; its IMU comes from
    `window_imu`; its video frames from `read_clip` (see the module's video policy); text and
    video embeddings are computed in batches. Every drop is counted in `report`.

    Returns:
      The recording's Windows, in narration order.
    """
    candidates = []
    for narration in recording.narrations:
        name = f"{recording.recording_id} narration at {narration.time_s:.2f} s"
        text = common.clean_narration(narration.text)
        if not text:
            report.drop("empty text", f"{name}: {narration.text!r} is empty once cleaned")
            continue
        if not times_s[0] <= narration.time_s <= times_s[-1]:
            report.drop("out of range", f"{name}: outside the IMU span [{times_s[0]:.2f}, {times_s[-1]:.2f}] s")
            continue
        bounds = common.narration_window(narration.time_s, float(times_s[-1]), half=settings.window_sec / 2)
        if bounds is None:
            report.drop("out of range", f"{name}: the recording is shorter than {settings.window_sec} s")
            continue
        window = window_imu(times_s, imu, bounds[0], bounds[1], settings, name)
        if isinstance(window, common.Problem):
            report.drop(*window)
            continue
        candidates.append({"text": text, "start": bounds[0], "end": bounds[1], "imu": window})
    candidates = _embed_videos(candidates, recording.video_path, settings, video_tower, report)
    for batch in _batches(candidates, settings.text_batch):
        embeddings = text_tower.embed([c["text"] for c in batch], progress=False) if text_tower else [None] * len(batch)
        for candidate, embedding in zip(batch, embeddings):
            candidate["text_emb"] = embedding
    return [
        Window(
            imu=c["imu"],
            rate_hz=settings.rate_hz,
            text=c["text"],
            text_emb=c["text_emb"],
            video_emb=c["video_emb"],
            source=source,
            recording_id=recording.recording_id,
            subject=recording.subject,
            start_s=c["start"],
            end_s=c["end"],
        )
        for c in candidates
    ]


@dataclasses.dataclass(frozen=True)
class NarratedJob:
    """Narrated recordings (Ego4D videos, Ego-Exo4D takes) as a `data_prep.parallel` job.

    `catalog()` returns (recordings, input description); `process` is the pure per-recording
    function: the recording's IMU file is read (an ImuFileError drops every narration under its
    reason) and `recording_windows` cuts and embeds its windows with the worker's towers.
    """

    source: str
    catalog: Callable[[], tuple[Sequence[Recording], str]]
    settings: WindowSettings
    text_tower: str
    video_tower: str

    def setup(self) -> dict:
        return load_towers(self.text_tower, self.video_tower)

    def header(self, loaded: dict) -> dict:
        text_tower, video_tower = loaded["text_tower"], loaded["video_tower"]
        settings = self.settings
        return {
            "T": settings.length, "rate_hz": settings.rate_hz,
            "text_dim": text_tower.dim if text_tower else 0, "video_dim": video_tower.dim if video_tower else 0,
            "towers": {name: tower.describe() for name, tower in (("text", text_tower), ("video", video_tower)) if tower},
            "extra": {"window_sec": settings.window_sec, "max_gap_s": settings.max_gap_s,
                      "require_video": settings.require_video, "frames_per_clip": settings.frames_per_clip},
        }

    def new_report(self) -> EgoReport:
        return EgoReport(self.source)

    def process(self, recording: Recording, loaded: dict) -> tuple[str, list[Window], EgoReport]:
        report = EgoReport(self.source)
        try:
            times_s, imu = recording.load_imu()
        except ImuFileError as error:
            for _ in recording.narrations:
                report.drop(error.reason, error.detail)
            return recording.split, [], report
        with contextlib.ExitStack() as stack:
            if recording.video_path and loaded["video_tower"] and paths.resolve(recording.video_path).is_file():
                local = stack.enter_context(paths.local_copy(recording.video_path))  # PyAV reads local files
                recording = dataclasses.replace(recording, video_path=local)
            windows = recording_windows(
                recording, times_s, imu, source=self.source, settings=self.settings, report=report, **loaded
            )
        if windows:
            report.keep(recording.split, len(windows))
        return recording.split, windows, report

    def failed(self, recording: Recording, error: Exception) -> EgoReport:
        """Every narration of a recording whose processing raised is dropped as "failed recording"."""
        report = EgoReport(self.source)
        for _ in recording.narrations:
            report.drop("failed recording", f"{recording.recording_id}: {type(error).__name__}: {error}")
        return report


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by the Ego4D and Ego-Exo4D command lines."""
    parser.add_argument("--out", required=True, help="output folder for shards, manifest.json and report.json")
    parser.add_argument("--towers", default="clip:Searchium-ai/clip4clip-webvid150k",
                        help="tower spec for text and video: clip:<path-or-hub-id>, tiny-random or none")
    parser.add_argument("--text-tower", help="text tower spec, also minilm (default: --towers)")
    parser.add_argument("--video-tower", help="video tower spec; none writes no video embedding (default: --towers)")
    parser.add_argument("--window-sec", type=float, default=5.0, help="window length in seconds")
    parser.add_argument("--rate", type=float, default=50.0, help="output IMU rate in Hz")
    parser.add_argument("--max-gap-s", type=float, default=0.5,
                        help="drop a window whose IMU has a time gap longer than this (seconds)")
    parser.add_argument("--require-video", action="store_true",
                        help="drop windows whose video is missing or unreadable (default: keep them with has_video=0)")
    parser.add_argument("--frames-per-clip", type=int, default=50, help="video frames embedded per window")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")


def settings_from_args(args: argparse.Namespace) -> WindowSettings:
    return WindowSettings(window_sec=args.window_sec, rate_hz=args.rate, max_gap_s=args.max_gap_s,
                          require_video=args.require_video, frames_per_clip=args.frames_per_clip)


def load_towers(text_spec: str, video_spec: str) -> dict:
    """{"text_tower": ..., "video_tower": ...} for the specs; a tower that cannot load raises ValueError."""
    try:
        return {"text_tower": towers.load_text_tower(text_spec), "video_tower": towers.load_video_tower(video_spec)}
    except OSError as error:
        raise ValueError(f"cannot load the towers (text {text_spec!r}, video {video_spec!r}): {error}") from None


def run_cli(args: argparse.Namespace, driver: parallel.Driver,
            catalog: Callable[[], tuple[Sequence[Recording], str]], source: str) -> int:
    """Writes the dataset with `driver` and prints the report; returns the exit status.

    Bad input (a missing or malformed annotation file, a tower that cannot load, an existing
    dataset without --overwrite), a run with no usable window and a dead local worker print one
    error sentence to stderr and return 1.
    """
    try:
        out = paths.check_access(args.out)  # refuse a bad scheme or bucket before any work
        job = NarratedJob(source, catalog, settings_from_args(args),
                          args.text_tower or args.towers, args.video_tower or args.towers)
        report = parallel.prepare(job, out, driver=driver, overwrite=args.overwrite)
    except (common.NothingUsable, parallel.WorkerDied, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def parse_splits(pairs: Sequence[str]) -> dict[str, float]:
    """["train=0.8", "val=0.2"] -> {"train": 0.8, "val": 0.2}."""
    fractions = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            fractions[name] = float(value)
        except ValueError:
            raise ValueError(f"--splits: {pair!r} is not NAME=FRACTION.") from None
    return fractions


def load_json(path: str, what: str):
    """Parses a JSON file, raising ValueError / FileNotFoundError that name the file."""
    source = paths.resolve(path)
    if not source.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    try:
        return json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON ({error}).") from None


def parse_narrations(items: Sequence[dict], time_key: str, text_key: str, where: str) -> list[Narration]:
    """Narrations from annotation items {time_key: seconds, text_key: text}; `where` names them in errors."""
    narrations = []
    for index, item in enumerate(items):
        try:
            narrations.append(Narration(float(item[time_key]), str(item[text_key])))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where} item {index} lacks a numeric {time_key} or a {text_key}.") from None
    return narrations


def ego4d_narrations(narration_json: dict, path: str) -> dict[str, tuple[Narration, ...]]:
    """{video_uid: narrations of both passes} from Ego4D's narration.json (empty videos left out)."""
    if not isinstance(narration_json, dict):
        raise ValueError(f"{path}: expected an object keyed by video_uid, got {type(narration_json).__name__}.")
    videos = {}
    for video_uid, passes in narration_json.items():
        narrations = []
        for pass_name in NARRATION_PASSES:
            items = (passes.get(pass_name) or {}).get("narrations") or []
            narrations += parse_narrations(items, "timestamp_sec", "narration_text", f"{path}: {video_uid} {pass_name}")
        if narrations:
            videos[video_uid] = tuple(narrations)
    return videos


def ego4d_recordings(
    root: str, fractions: dict[str, float], seed: int, limit_videos: int | None
) -> tuple[list[Recording], str]:
    """The Ego4D recordings to process: narrated videos (sorted by uid), split by video uid.

    With `limit_videos`, only the first N narrated videos that have an IMU file are kept.
    """
    path = os.path.join(root, "v1", "annotations", "narration.json")
    videos = ego4d_narrations(load_json(path, "Ego4D narration file"), path)
    uids = sorted(videos)

    def imu_path(uid: str) -> str:
        return os.path.join(root, "v1", "imu", f"{uid}.csv")

    if limit_videos is not None:
        uids = [uid for uid in uids if paths.resolve(imu_path(uid)).is_file()][:limit_videos]
    splits = common.split_by_group(uids, fractions, seed)
    recordings = [
        Recording(
            recording_id=uid,
            subject=uid,
            split=splits[uid],
            narrations=videos[uid],
            video_path=os.path.join(root, "v1", "full_scale", f"{uid}.mp4"),
            load_imu=functools.partial(read_imu_csv, imu_path(uid)),
        )
        for uid in uids
    ]
    return recordings, f"Ego4D root {root} ({len(recordings)} narrated videos)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.ego4d", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ego4d-root", required=True, help="folder that holds v1/ (imu, annotations, full_scale)")
    add_common_arguments(parser)
    parser.add_argument("--splits", nargs="+", default=["train=0.8", "val=0.1", "test=0.1"],
                        help="split fractions by video, NAME=FRACTION ...")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split assignment")
    parser.add_argument("--limit-videos", type=int, help="process only the first N videos that have IMU")
    parallel.add_driver_arguments(parser)
    args, driver = parallel.parse_args(parser, argv)
    try:
        fractions = parse_splits(args.splits)
    except ValueError as error:
        parser.error(str(error))
    catalog = functools.partial(ego4d_recordings, args.ego4d_root, fractions, args.seed, args.limit_videos)
    return run_cli(args, driver, catalog, source="ego4d")


if __name__ == "__main__":
    # Run the importable data_prep.ego4d, not this __main__ copy: worker processes must unpickle its classes.
    from data_prep import ego4d as importable

    sys.exit(importable.main())
