"""Windows/s and peak memory per worker of data_prep.ego4d's video path, by driver and worker count.

    python -m benchmarks.data_prep_workers [--workers 1,2] [--beam-workers 2] [--recordings 6]
        [--seconds 40] [--narration-every 2.5] [--width 640 --height 360 --fps 30]
        [--towers tiny-random] [--frames-per-clip 50]

Generates an Ego4D v1 tree: R recordings, each an IMU CSV at 200 Hz, an H.264 mp4 of moving
noise (so every window's frames must really be decoded) and a narration every
--narration-every seconds. Then, for each worker count W (and, with --beam-workers, for Apache
Beam's DirectRunner in multi-processing mode), runs `python -m data_prep.ego4d --workers W` in
a fresh process and reports:

  seconds, windows/s     wall time of the whole run (worker start, tower loading, decoding,
                         embedding, staging and the merge), windows kept / seconds
  worker peak RSS MB     the largest peak resident memory of one worker process (the run's
                         own process when W = 1; getrusage RUSAGE_CHILDREN otherwise)
  driver peak RSS MB     the peak of the process that drives the run and merges

The last line is a JSON object with one row per run and each run's speed-up over W = 1.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

from benchmarks import common
from benchmarks.data_prep import max_rss_mb

CHILD_FLAG = "--measure-one"
TINY_RANDOM = "tiny-random"
IMU_RATE_HZ = 200.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_prep_workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated local worker counts")
    parser.add_argument("--beam-workers", type=int, default=2, help="DirectRunner workers; 0 skips the Beam run")
    parser.add_argument("--recordings", type=int, default=6, help="recordings (videos) to generate")
    parser.add_argument("--seconds", type=float, default=40.0, help="length of each recording")
    parser.add_argument("--narration-every", type=float, default=2.5, help="seconds between narrations")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--towers", default=TINY_RANDOM,
                        help=f"tower spec passed to data_prep.ego4d; {TINY_RANDOM} (the default) saves the tests' tiny "
                             "random CLIP (tests/tiny_clip.py) to a checkpoint folder and passes clip:<folder>")
    parser.add_argument("--frames-per-clip", type=int, default=50, help="frames embedded per window")
    return parser


def write_video(path: str, seconds: float, width: int, height: int, fps: int, seed: int) -> None:
    """An H.264 mp4 of a noise texture that slides one pixel per frame (cheap to make, real to decode)."""
    import av
    import numpy as np

    texture = np.random.default_rng(seed).integers(0, 256, (height, width + int(seconds * fps) + 1, 3), np.uint8)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(round(seconds * fps))):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[:, i : i + width]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_ego4d_tree(root: str, args: argparse.Namespace) -> int:
    """The Ego4D v1 layout of `data_prep.ego4d` with generated recordings; returns the narration count."""
    import numpy as np

    for folder in ("annotations", "imu", "full_scale"):
        os.makedirs(os.path.join(root, "v1", folder))
    narrations, rng = {}, np.random.default_rng(0)
    for r in range(args.recordings):
        uid = f"video{r:04d}"
        times = np.arange(0.0, args.seconds, 1.0 / IMU_RATE_HZ)
        imu = 0.3 * rng.standard_normal((len(times), 6))
        imu[:, 2] += 9.81
        table = np.column_stack([times * 1000.0, imu])
        np.savetxt(os.path.join(root, "v1", "imu", f"{uid}.csv"), table, fmt="%.5f", delimiter=",", comments="",
                   header="canonical_timestamp_ms,accl_x,accl_y,accl_z,gyro_x,gyro_y,gyro_z")
        write_video(os.path.join(root, "v1", "full_scale", f"{uid}.mp4"), args.seconds, args.width, args.height,
                    args.fps, seed=r)
        items = [{"timestamp_sec": float(t), "narration_text": f"#C C does step {i} of task {r}"}
                 for i, t in enumerate(np.arange(args.narration_every, args.seconds, args.narration_every))]
        narrations[uid] = {"narration_pass_1": {"narrations": items}}
    with open(os.path.join(root, "v1", "annotations", "narration.json"), "w") as f:
        json.dump(narrations, f)
    return sum(len(v["narration_pass_1"]["narrations"]) for v in narrations.values())


def measure_one(root: str, out: str, towers: str, frames_per_clip: str, *driver_args: str) -> dict:
    """Runs data_prep.ego4d in this process; wall time, windows kept and peak memory."""
    from data_prep import ego4d

    start = time.perf_counter()
    status = ego4d.main(["--ego4d-root", root, "--out", out, "--towers", towers, "--splits", "train=1",
                         "--frames-per-clip", frames_per_clip, *driver_args])
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"data_prep.ego4d {' '.join(driver_args)} failed with status {status}")
    with open(os.path.join(out, "report.json")) as f:
        windows = json.load(f)["total_kept"]
    driver_peak = max_rss_mb(resource.RUSAGE_SELF)
    in_process = not driver_args or driver_args == ("--workers", "1")
    return {"windows": windows, "seconds": seconds, "driver_peak_rss_mb": driver_peak,
            "worker_peak_rss_mb": driver_peak if in_process else max_rss_mb(resource.RUSAGE_CHILDREN)}


def run_child(name: str, driver_args: list[str], root: str, out: str, towers: str,
              args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "benchmarks.data_prep_workers", CHILD_FLAG, root, out, towers,
               str(args.frames_per_clip), *driver_args]
    row = common.run_json_child(command, f"data_prep.ego4d ({name})")
    row["run"] = name
    row["windows_per_s"] = row["windows"] / row["seconds"]
    return row


def run(args: argparse.Namespace) -> dict:
    try:
        counts = [int(v) for v in args.workers.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--workers must be comma-separated integers, got {args.workers!r}") from None
    if not counts or min(counts) < 1 or args.beam_workers < 0:
        raise ValueError(f"--workers needs counts >= 1 and --beam-workers >= 0, got {args.workers!r}, {args.beam_workers}")
    if args.seconds < 5.0 + args.narration_every:
        raise ValueError(f"--seconds {args.seconds} leaves no narration with a whole 5 s window")
    runs = [(f"local {w} worker{'s' if w > 1 else ''}", ["--workers", str(w)]) for w in counts]
    if args.beam_workers:
        runs.append((f"beam DirectRunner {args.beam_workers} workers",
                     ["--runner", "DirectRunner", "--direct_running_mode=multi_processing",
                      f"--direct_num_workers={args.beam_workers}"]))
    with tempfile.TemporaryDirectory(prefix="primus_data_prep_workers_") as workdir:
        root = os.path.join(workdir, "ego4d")
        narrations = write_ego4d_tree(root, args)
        towers = args.towers
        if towers == TINY_RANDOM:
            from tests.tiny_clip import save_tiny_clip

            towers = save_tiny_clip(workdir)
        rows = [run_child(name, driver_args, root, os.path.join(workdir, f"out_{i}"), towers, args)
                for i, (name, driver_args) in enumerate(runs)]
    base = rows[0]["windows_per_s"]
    for row in rows:
        row["speedup"] = common.significant(row["windows_per_s"] / base)
        row["windows_per_s"], row["seconds"] = common.significant(row["windows_per_s"]), common.significant(row["seconds"])
        for key in ("driver_peak_rss_mb", "worker_peak_rss_mb"):
            row[key] = round(row[key], 1)
    return {
        "benchmark": "data_prep_workers",
        "source": f"data_prep.ego4d, towers {args.towers}, {args.frames_per_clip} frames per clip",
        "recordings": args.recordings, "recording_seconds": args.seconds, "narrations": narrations,
        "video": f"{args.width}x{args.height} {args.fps} fps H.264",
        "rows": rows,
        **common.machine_description(),
    }


def summary(result: dict) -> list[str]:
    lines = [f"{result['recordings']} recordings x {result['recording_seconds']} s, {result['video']}, "
             f"{result['narrations']} narrations; {result['source']}",
             f"{'run':<30} {'windows':>8} {'seconds':>8} {'windows/s':>10} {'speed-up':>9} "
             f"{'worker peak MB':>15} {'driver peak MB':>15}"]
    lines += [f"{row['run']:<30} {row['windows']:>8} {row['seconds']:>8.1f} {row['windows_per_s']:>10.2f} "
              f"{row['speedup']:>9.2f} {row['worker_peak_rss_mb']:>15.1f} {row['driver_peak_rss_mb']:>15.1f}"
              for row in result["rows"]]
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == CHILD_FLAG:
        print(json.dumps(measure_one(*argv[1:])))
        return 0
    return common.run_cli(build_parser(), run, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
