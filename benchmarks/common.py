"""Shared pieces of the benchmarks: command-line device setup, timing, the matmul reference, output.

Every benchmark prints human-readable lines and, last, one JSON object (`run_cli`), so that a
script can read the numbers with `json.loads(output.splitlines()[-1])`. With `--record DIR`
that object is also appended, as one line with the command, date, git commit, machine and load
around it (`record_result`), to `DIR/<benchmark>.jsonl`; `python -m benchmarks.report` turns
those files into the tables of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--host-devices N: split the CPU into N XLA devices (must be applied before jax is imported)."""
    parser.add_argument(
        "--host-devices", type=int, default=0,
        help="simulate this many CPU devices (sets --xla_force_host_platform_device_count); 0 keeps the default")


def apply_device_arguments(args: argparse.Namespace) -> None:
    """Sets XLA_FLAGS for --host-devices; call before the first `import jax`."""
    if args.host_devices < 0:
        raise ValueError(f"--host-devices must be 0 (default) or positive, got {args.host_devices}")
    if args.host_devices:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        flags.append(f"--xla_force_host_platform_device_count={args.host_devices}")
        os.environ["XLA_FLAGS"] = " ".join(flags)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's "model name", else platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_description() -> dict:
    """CPU model, logical cores, 1-minute load average and the jax backend, for the results table."""
    import jax

    devices = jax.devices()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
    }


def significant(value: float, digits: int = 4) -> float:
    """value rounded to `digits` significant figures, for the JSON records.

    Rounding to a fixed number of decimals instead loses a small ratio (a speed-up of 0.0095
    became 0.01), and a record's fields then disagree with each other by more than rounding.
    """
    return float(f"{value:.{digits}g}")


def time_calls(call: Callable[[], object], repeats: int) -> list[float]:
    """Wall-clock seconds of each of `repeats` calls; `call` must block until its work is done."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


MATMUL_PEAKS = ("float32_highest", "float32_default", "bfloat16")
"""The matmul references every step benchmark measures: float32 at `highest` (true float32 on
every backend), float32 at `default` (TF32 on NVIDIA Ampere+, one bfloat16 pass on TPU, float32 on
CPU) and bfloat16 operands (float32 accumulation)."""


def peak_name(dtype: str, matmul_precision: str) -> str:
    """The MATMUL_PEAKS-style name of the matmul rate a step of this dtype and precision is held to.

    bfloat16 matmuls ignore the precision; float32 ones run at it ("float32_high" is measured on demand).
    """
    return "bfloat16" if dtype == "bfloat16" else f"float32_{matmul_precision}"


def matmul_gflops(mesh, size: int = 2048, dtype: str = "float32", precision: str = "highest",
                  repeats: int = 5) -> float:
    """GFLOP/s of a (size x size) @ (size x size) matmul of `dtype` at `precision` on every device of `mesh`.

    The left operand is split by rows along the mesh axis 'data' and the right one replicated, so
    each device multiplies its (size / n, size) block: 2 size^3 FLOPs in all per call. The best
    of `repeats` timed calls after one warm-up call gives the rate (the machine's attainable peak
    for a large, regular GEMM of that kind, the reference for the train step).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    if size % mesh.size:
        raise ValueError(f"matmul size {size} must be divisible by the {mesh.size} devices")
    rng = np.random.default_rng(0)
    operand = lambda: rng.standard_normal((size, size), np.float32).astype(jnp.dtype(dtype))
    a = jax.device_put(operand(), NamedSharding(mesh, PartitionSpec("data")))
    b = jax.device_put(operand(), NamedSharding(mesh, PartitionSpec()))
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, precision=precision, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()
    best = min(time_calls(lambda: matmul(a, b).block_until_ready(), repeats))
    return 2.0 * size**3 / best / 1e9


def matmul_peaks(mesh, size: int, names=MATMUL_PEAKS) -> dict[str, float]:
    """{name: GFLOP/s} for names like "float32_highest", "float32_default", "float32_high", "bfloat16"."""
    peaks = {}
    for name in names:
        dtype, _, precision = name.partition("_")
        peaks[name] = matmul_gflops(mesh, size, dtype, precision or "default")
    return peaks


def add_record_argument(parser: argparse.ArgumentParser) -> None:
    """--record DIR: append the result to DIR/<benchmark>.jsonl (see `record_result`)."""
    parser.add_argument("--record", default="", metavar="DIR",
                        help="append the final JSON line, with the git commit, machine and load, to "
                             "DIR/<benchmark>.jsonl (e.g. docs/benchmarks)")


def benchmark_name(parser: argparse.ArgumentParser) -> str:
    """"train_step" for the parser of `python -m benchmarks.train_step`."""
    return parser.prog.split()[-1].rsplit(".", 1)[-1]


def git_commit(repository: str = REPOSITORY) -> tuple[str, bool]:
    """(HEAD's commit, whether tracked files differ from it), or ("unknown", False) outside a git checkout."""
    def git(*arguments):
        return subprocess.run(["git", "-C", repository, *arguments], capture_output=True, text=True, check=False)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "unknown", False
    return head.stdout.strip(), bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())


def without_record_argument(argv: Sequence[str]) -> list[str]:
    """argv without `--record DIR` / `--record=DIR`, which says where a result goes, not what was measured."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--record":
            skip = True
        elif not argument.startswith("--record="):
            kept.append(argument)
    return kept


def record_result(directory: str, benchmark: str, result: dict, argv: Optional[Sequence[str]] = None) -> str:
    """Appends one JSON line for `result` to `directory/<benchmark>.jsonl` and returns the file's path.

    The line is {"benchmark", "command" (python -m benchmarks.<benchmark> and argv, default
    sys.argv[1:], less --record DIR), "date" (UTC, ISO 8601), "commit", "dirty" (tracked files changed since the
    commit), "machine": {"cpu", "cores"}, "load_avg_1min" (os.getloadavg at the end of the run),
    "result"}. The line is written with one write call and flushed to disk, so a file holds
    whole lines only, and earlier lines are never rewritten.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    commit, dirty = git_commit()
    record = {
        "benchmark": benchmark,
        "command": " ".join(["python", "-m", f"benchmarks.{benchmark}", *without_record_argument(argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "dirty": dirty,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "result": result,
    }
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{benchmark}.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], dict],
            summary: Callable[[dict], list[str]], argv=None) -> int:
    """Parses argv, runs the benchmark, prints its summary lines and then the JSON line; 0 on success.

    A ValueError from `run` (bad arguments) prints one error sentence and returns 1. The parser
    gets `--record DIR` here, so every benchmark that runs through run_cli can record its result.
    """
    add_record_argument(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "host_devices"):
            apply_device_arguments(args)
        result = run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"machine: {result['cpu']}, {result['cores']} cores, load {result['load_avg_1min']}")
    for line in summary(result):
        print(line)
    print(json.dumps(result, sort_keys=True), flush=True)
    if args.record:
        print(f"recorded in {record_result(args.record, benchmark_name(parser), result, argv)}", file=sys.stderr)
    return 0


def run_json_child(command: list[str], what: str) -> dict:
    """Runs a benchmark's measuring child process and returns the JSON object on its last stdout line.

    Raises RuntimeError naming `what` with the end of the child's stderr when it fails.
    """
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
