"""Windows/s and peak memory of data preparation as the number of recordings N grows.

    python -m benchmarks.data_prep [--recordings 8,32,128 --seconds 60 --rate 100]

For each N, generates N CSV recordings of `--seconds` of IMU at `--rate` Hz (gravity on z plus
noise, header ax,ay,az,gx,gy,gz) with a labels CSV, then runs `data_prep.har`'s CSV path
(`--text-tower none`: checks, resampling to 50 Hz, windows of T=250 every 125 samples, TFRecord
shards) in a fresh subprocess. The subprocess reports its wall time and its peak resident
memory (getrusage ru_maxrss) after the imports and at the end, so each N is measured alone.
Streaming preparation keeps the peak flat in N: only one recording and one open shard are in
memory at a time. The last line is a JSON object with one row per N and the peak growth from the
smallest to the largest N.
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

CHILD_FLAG = "--measure-one"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_prep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recordings", default="8,32,128", help="comma-separated N values")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each recording")
    parser.add_argument("--rate", type=float, default=100.0, help="sampling rate of the generated CSVs (Hz)")
    return parser


def write_recordings(csv_dir: str, n: int, seconds: float, rate_hz: float, seed: int = 0) -> str:
    """N CSV recordings (4 activities, 4 subjects) and labels.csv in csv_dir; returns the labels path."""
    import numpy as np

    rng = np.random.default_rng(seed)
    samples = int(round(seconds * rate_hz))
    rows = ["file,label,subject"]
    for i in range(n):
        imu = 0.3 * rng.standard_normal((samples, 6))
        imu[:, 2] += 9.81
        name = f"rec{i:05d}.csv"
        np.savetxt(os.path.join(csv_dir, name), imu, fmt="%.5f", delimiter=",", header="ax,ay,az,gx,gy,gz",
                   comments="")
        rows.append(f"{name},activity{i % 4},s{i % 4}")
    labels = os.path.join(csv_dir, "labels.csv")
    with open(labels, "w") as f:
        f.write("\n".join(rows) + "\n")
    return labels


def max_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory so far, in MB, of this process (or, with RUSAGE_CHILDREN, of its
    largest waited-for child; ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(who).ru_maxrss / 1024.0


def measure_one(csv_dir: str, labels: str, rate_hz: float, out_dir: str) -> dict:
    """Runs data_prep.har on the CSVs in this process; wall time, windows written and peak memory."""
    from data_prep import har

    rss_after_imports = max_rss_mb()
    start = time.perf_counter()
    report = har.write_har_dataset(
        har.csv_source(csv_dir, labels, rate_hz, "si", fractions={"train": 1.0}),
        out_dir, T=250, rate_hz=50.0, hop=125, text_tower=None)
    seconds = time.perf_counter() - start
    return {"windows": report.total_kept, "seconds": seconds,
            "rss_after_imports_mb": rss_after_imports, "peak_rss_mb": max_rss_mb()}


def run_child(n: int, args: argparse.Namespace, workdir: str) -> dict:
    """Generates N recordings and measures their preparation in a fresh Python process."""
    csv_dir = os.path.join(workdir, f"csv_{n}")
    os.makedirs(csv_dir)
    labels = write_recordings(csv_dir, n, args.seconds, args.rate)
    out_dir = os.path.join(workdir, f"prepared_{n}")
    command = [sys.executable, "-m", "benchmarks.data_prep", CHILD_FLAG, csv_dir, labels, str(args.rate), out_dir]
    row = common.run_json_child(command, f"data_prep.har on {n} generated recordings")
    row["recordings"] = n
    row["windows_per_s"] = row["windows"] / row["seconds"]
    return row


def run(args: argparse.Namespace) -> dict:
    try:
        counts = sorted({int(v) for v in args.recordings.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--recordings must be comma-separated integers, got {args.recordings!r}") from None
    if not counts or counts[0] < 1:
        raise ValueError(f"--recordings needs positive counts, got {args.recordings!r}")
    if args.seconds * 50.0 < 250:
        raise ValueError(f"--seconds {args.seconds} gives recordings shorter than one 5 s window")
    with tempfile.TemporaryDirectory(prefix="primus_data_prep_bench_") as workdir:
        rows = [run_child(n, args, workdir) for n in counts]
    for row in rows:
        row["seconds"] = round(row["seconds"], 3)
        row["windows_per_s"] = round(row["windows_per_s"], 1)
        row["peak_rss_mb"] = round(row["peak_rss_mb"], 1)
        row["rss_after_imports_mb"] = round(row["rss_after_imports_mb"], 1)
    return {
        "benchmark": "data_prep",
        "source": "data_prep.har csv, text tower none",
        "recording_seconds": args.seconds,
        "rate_hz": args.rate,
        "rows": rows,
        "peak_rss_growth_mb": round(rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"], 1),
        **common.machine_description(),
    }


def summary(result: dict) -> list[str]:
    rows = result["rows"]
    lines = [f"{'N':>6} {'windows':>8} {'windows/s':>10} {'peak RSS MB':>12} {'after imports MB':>17}"]
    lines += [f"{row['recordings']:>6} {row['windows']:>8} {row['windows_per_s']:>10.1f} "
              f"{row['peak_rss_mb']:>12.1f} {row['rss_after_imports_mb']:>17.1f}" for row in rows]
    lines.append(f"peak RSS growth from N={rows[0]['recordings']} to N={rows[-1]['recordings']}: "
                 f"{result['peak_rss_growth_mb']:+.1f} MB")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == CHILD_FLAG:
        csv_dir, labels, rate, out_dir = argv[1:5]
        print(json.dumps(measure_one(csv_dir, labels, float(rate), out_dir)))
        return 0
    return common.run_cli(build_parser(), run, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
