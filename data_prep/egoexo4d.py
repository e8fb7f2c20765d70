"""Ego-Exo4D atomic-description IMU windows -> TFRecord shards (the PRIMUS pretraining set, docs/design.md §4).

    python -m data_prep.egoexo4d --root DIR --out DIR [--towers SPEC] [--imu-format vrs|csv]
        [--imu-dir DIR] [--window-sec 5] [--rate 50] [--limit-takes N] [--require-video]
        [--workers N | --runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner BEAM_OPTIONS...]

Input layout (Ego-Exo4D):
  takes.json                                  [{"take_uid", "take_name", "root_dir", ...}, ...]
  annotations/atomic_descriptions_train.json  {"annotations": {take_uid: [{"rejected": false,
  annotations/atomic_descriptions_val.json      "descriptions": [{"text", "timestamp", ...}]}]}}
  <root_dir>/*_noimagestreams.vrs             Aria recording; IMU stream 1202-1 (1 kHz), read with
                                                projectaria-tools (extra primus_jax[aria])
  <root_dir>/frame_aligned_videos/*_214-1.mp4 Aria RGB video
With --imu-format csv the IMU comes instead from <imu-dir>/<take_name>.csv with the Ego4D columns
(canonical_timestamp_ms, accl_x..z in m/s^2, gyro_x..z in rad/s), e.g. exported from the VRS.

Splits follow the official files: descriptions from the train file go to "train", from the val
file to "val". Rejected annotation jobs are skipped. Every description of every accepted
annotation is one window (duplicates across annotators are kept, as in the reference). As in
the reference, the IMU clock is shifted so that its first sample is at 0 s, which assumes the
IMU starts with the take (both formats). Windowing, embedding and the report are shared with
Ego4D (`data_prep.narrated`).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Sequence

import numpy as np

from data_prep import parallel
from data_prep.ego4d import read_imu_csv
from data_prep.narrated import ImuFileError, Recording, add_common_arguments, load_json, parse_narrations, run_cli
from primus_jax import paths

IMU_STREAM = "1202-1"
ANNOTATION_FILE = os.path.join("annotations", "atomic_descriptions_{split}.json")
MISSING_ARIA_TOOLS = "install primus_jax[aria] (projectaria-tools) to read VRS files, or pass --imu-format csv"


def require_projectaria_tools():
    """Returns projectaria_tools.core.data_provider, or raises ValueError saying how to install it."""
    try:
        from projectaria_tools.core import data_provider
    except ImportError:
        raise ValueError(f"projectaria-tools is not installed: {MISSING_ARIA_TOOLS}.") from None
    return data_provider


def read_vrs_imu(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads IMU stream 1202-1 of an Aria VRS file into (times_s (N,), imu (N, 6)).

    Aria (gen 1) glasses hold two IMUs: 1202-1 "imu-right" at 1 kHz and 1202-2 "imu-left" at
    800 Hz; this reads imu-right. imu columns: accelerometer x, y, z in m/s^2 (gravity included),
    then gyroscope x, y, z in rad/s, in the IMU's own frame. Only records whose accelerometer and
    gyroscope are both valid are kept; times are the capture timestamps in seconds, shifted so
    the first kept sample is at 0.

    Raises:
      ImuFileError: "missing imu" (no file) or "unreadable vrs" (cannot open, truncated
        inside its configuration records, no IMU stream, no valid record), naming the file.
        A file cut later reads as a shorter recording: VRS keeps the records wholly in the file.
    """
    if not paths.resolve(path).is_file():
        raise ImuFileError("missing imu", f"{path}: VRS file not found")
    data_provider = require_projectaria_tools()
    from projectaria_tools.core.stream_id import StreamId

    with paths.local_copy(path) as local:  # projectaria-tools reads local files only
        try:
            provider = data_provider.create_vrs_data_provider(local)
        except RuntimeError as error:  # e.g. a file cut inside its configuration records
            raise ImuFileError("unreadable vrs", f"{path}: projectaria-tools cannot read the VRS file, "
                                                 f"which is truncated or damaged ({error})") from None
        if not provider:
            raise ImuFileError("unreadable vrs", f"{path}: projectaria-tools cannot open the VRS file")
        stream = StreamId(IMU_STREAM)
        if stream not in provider.get_all_streams():
            raise ImuFileError("unreadable vrs", f"{path}: no IMU stream {IMU_STREAM}")
        records = [provider.get_imu_data_by_index(stream, i) for i in range(provider.get_num_data(stream))]
    records = [r for r in records if r.accel_valid and r.gyro_valid]
    if not records:
        raise ImuFileError("unreadable vrs", f"{path}: IMU stream {IMU_STREAM} has no valid record")
    times_ns = np.array([r.capture_timestamp_ns for r in records], dtype=np.int64)
    imu = np.array([list(r.accel_msec2) + list(r.gyro_radsec) for r in records], dtype=np.float64)
    order = np.argsort(times_ns, kind="stable")
    return (times_ns[order] - times_ns[order[0]]) / 1e9, imu[order]


def read_take_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """An Ego4D-style IMU CSV (see `data_prep.ego4d.read_imu_csv`) with its first sample moved to 0 s."""
    times_s, imu = read_imu_csv(path)
    return times_s - times_s[0], imu


def atomic_descriptions(annotation_json: dict, path: str) -> dict[str, list]:
    """{take_uid: descriptions of all non-rejected annotations} from an atomic_descriptions file."""
    annotations = annotation_json.get("annotations") if isinstance(annotation_json, dict) else None
    if not isinstance(annotations, dict):
        raise ValueError(f"{path}: expected an object with an \"annotations\" object keyed by take_uid.")
    takes = {}
    for take_uid, jobs in annotations.items():
        narrations = []
        for job_index, job in enumerate(jobs if isinstance(jobs, list) else [jobs]):
            if job.get("rejected"):
                continue
            where = f"{path}: take {take_uid} annotation {job_index} descriptions"
            narrations += parse_narrations(job.get("descriptions") or [], "timestamp", "text", where)
        if narrations:
            takes[take_uid] = narrations
    return takes


def _first_match(folder: str, pattern: str) -> str | None:
    """The first (sorted) file in `folder` (local or gs://) whose path below it matches `pattern`."""
    folder_path = paths.resolve(folder)
    matches = sorted(str(match) for match in folder_path.glob(pattern)) if folder_path.is_dir() else []
    return matches[0] if matches else None


def egoexo4d_recordings(
    root: str, splits: Sequence[str], imu_format: str, imu_dir: str | None, limit_takes: int | None
) -> tuple[list[Recording], str]:
    """The takes to process: those described in each official annotation file, sorted by name.

    Described takes missing from takes.json raise ValueError. With `limit_takes`, at most N
    takes per annotation file are kept.
    """
    if imu_format == "vrs":
        require_projectaria_tools()
    takes_path = os.path.join(root, "takes.json")
    takes = {}
    for index, take in enumerate(load_json(takes_path, "Ego-Exo4D takes file")):
        if not isinstance(take, dict) or not {"take_uid", "take_name", "root_dir"} <= take.keys():
            raise ValueError(f"{takes_path}: take {index} lacks take_uid, take_name or root_dir.")
        takes[take["take_uid"]] = take
    imu_dir = imu_dir or os.path.join(root, "imu")
    recordings, seen = [], set()
    for split in splits:
        path = os.path.join(root, ANNOTATION_FILE.format(split=split))
        described = atomic_descriptions(load_json(path, "Ego-Exo4D annotation file"), path)
        unknown = sorted(set(described) - takes.keys())
        if unknown:
            raise ValueError(f"{path}: {len(unknown)} take_uid(s) not in {takes_path}, e.g. {unknown[0]}.")
        chosen = sorted((uid for uid in described if uid not in seen), key=lambda uid: takes[uid]["take_name"])
        for take_uid in chosen[:limit_takes]:
            seen.add(take_uid)
            take = takes[take_uid]
            take_dir = os.path.join(root, take["root_dir"])
            if imu_format == "vrs":
                vrs = _first_match(take_dir, "*_noimagestreams.vrs")
                load = functools.partial(read_vrs_imu, vrs or os.path.join(take_dir, "*_noimagestreams.vrs"))
            else:
                load = functools.partial(read_take_csv, os.path.join(imu_dir, f"{take['take_name']}.csv"))
            recordings.append(
                Recording(
                    recording_id=take_uid,
                    subject=str(take.get("participant_uid") or take_uid),
                    split=split,
                    narrations=tuple(described[take_uid]),
                    video_path=_first_match(take_dir, "frame_aligned_videos/*_214-1.mp4"),
                    load_imu=load,
                )
            )
    return recordings, f"Ego-Exo4D root {root} ({len(recordings)} described takes)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.egoexo4d", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="Ego-Exo4D folder holding takes.json, annotations/, takes/")
    add_common_arguments(parser)
    parser.add_argument("--imu-format", choices=("vrs", "csv"), default="vrs",
                        help="read IMU from the Aria VRS (needs projectaria-tools) or from per-take CSVs")
    parser.add_argument("--imu-dir", help="folder of <take_name>.csv files for --imu-format csv (default ROOT/imu)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"],
                        help="official annotation files to read: atomic_descriptions_<split>.json")
    parser.add_argument("--limit-takes", type=int, help="process at most N takes per annotation file")
    parallel.add_driver_arguments(parser)
    args, driver = parallel.parse_args(parser, argv)
    catalog = functools.partial(egoexo4d_recordings, args.root, args.splits, args.imu_format, args.imu_dir,
                                args.limit_takes)
    return run_cli(args, driver, catalog, source="egoexo4d")


if __name__ == "__main__":
    # Run the importable data_prep.egoexo4d, not this __main__ copy: worker processes must unpickle its classes.
    from data_prep import egoexo4d as importable

    sys.exit(importable.main())
