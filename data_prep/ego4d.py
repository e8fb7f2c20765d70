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

Each narration becomes one window, cut, checked and embedded by the shared narrated-window
pipeline (`data_prep.narrated`, which also states the video policy). Recordings are assigned to
splits whole (`common.split_by_group` over the processed videos).
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import math
import os
import sys
from typing import Sequence

import numpy as np

from data_prep import common, parallel
from data_prep.narrated import (
    ImuFileError,
    Narration,
    Recording,
    add_common_arguments,
    load_json,
    parse_narrations,
    run_cli,
)
from primus_jax import paths

IMU_TIME_COLUMN = "canonical_timestamp_ms"
IMU_VALUE_COLUMNS = ("accl_x", "accl_y", "accl_z", "gyro_x", "gyro_y", "gyro_z")
NARRATION_PASSES = ("narration_pass_1", "narration_pass_2")


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
