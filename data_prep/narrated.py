"""The narrated-window pipeline shared by `data_prep.ego4d` and `data_prep.egoexo4d`.

A source lists its recordings (`Recording`: IMU loader, timestamped narrations, video path, split)
and hands them to `run_cli`, which writes the dataset through `data_prep.parallel` with one
`NarratedJob`; `NarratedJob.process` is the pure per-recording function.

Each narration at t gives the window [start, end) = `common.narration_window(t, D, half)` with D
the last IMU time (docs/design.md §4). The IMU samples of the window are linearly interpolated
onto the uniform grid start + i / (m r), i < m r w (r = --rate, w = --window-sec, m = round(native
rate / r) >= 1) and decimated by m with the anti-aliasing `common.resample`, which gives exactly
T = r w samples aligned with the window; no padding or trimming is needed.

Videos are read and embedded one window at a time in small batches, so memory stays bounded.
`data_prep.parallel` runs the jobs here (`--workers N` processes) or on Apache Beam
(`--runner ...`), with the same output.
Policy for video: a window whose mp4 is missing or unreadable is kept with has_video = 0 and
counted in report.json under "kept_without_video"; `--require-video` drops it instead.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import sys
from typing import Callable, Iterator, Sequence

import numpy as np

from data_prep import common, parallel
from data_prep.video import VideoError, read_clip
from primus_jax import paths, towers
from primus_jax.data import Window


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
    """Cuts, checks and embeds the narration windows of one recording (docs/design.md §4).

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
                        help="tower spec for text and video: clip:<path-or-hub-id> or none")
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
