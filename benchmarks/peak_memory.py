"""Peak resident memory of a command, e.g. a shrunk demo pretraining run.

    python -m benchmarks.peak_memory -- python -m primus_jax.main --config configs/demo.py \
        --workdir W --config.train.num_steps=20

Runs the command as a child process and reports its wall time, exit status and peak resident
memory: getrusage(RUSAGE_CHILDREN).ru_maxrss, the largest max RSS among the waited-for
descendants (KiB on Linux). The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

from benchmarks import common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peak_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to measure, after --")
    return parser


def run(args: argparse.Namespace) -> dict:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ValueError("give the command to measure after --")
    start = time.perf_counter()
    returncode = subprocess.run(command, check=False).returncode
    seconds = time.perf_counter() - start
    if returncode != 0:
        raise ValueError(f"the measured command exited with status {returncode}: {' '.join(command)}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return {"benchmark": "peak_memory", "command": " ".join(command), "seconds": round(seconds, 1),
            "peak_rss_mb": round(peak_mb, 1), **common.machine_description()}


def summary(result: dict) -> list[str]:
    return [f"{result['command']}", f"peak RSS {result['peak_rss_mb']:.0f} MB in {result['seconds']:.0f} s"]


def main(argv=None) -> int:
    return common.run_cli(build_parser(), run, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
