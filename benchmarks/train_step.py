"""Throughput of the full PRIMUS train step, against matmul peaks measured on the same devices.

    python -m benchmarks.train_step --batch-size 64 --steps 20 [--compute-dtype bfloat16]
        [--matmul-precision default|high|highest] [--torch-peer [PATH]] [--rounds R] [--record DIR]

The step is `train.make_steps`' train_step with the default config (two views, SS + MM + NN,
the 1.4M-parameter encoder, queue of 8192) on synthetic windows of T=250 samples with 512-d text
and video embeddings, data-parallel over every available device (`--host-devices N` splits
the CPU into N devices). Compilation is timed separately; then `--steps` steps are timed as one
dispatch stream ending in a single block, so no host sync sits between steps.

Reported: samples/s = B * steps / seconds; the step's FLOPs from the analytic count of
`primus_jax.flops` (matmul FLOPs, the same on every backend: XLA's cost analysis of a compiled
GPU program leaves out library matmuls); achieved GFLOP/s = FLOPs * steps / seconds; its ratio
to three (size x size) matmul peaks timed in this process (`common.MATMUL_PEAKS`: float32 at
`highest`, float32 at `default`, bfloat16); and MFU = achieved / the peak of the kind the step's
matmuls use (bfloat16 for --compute-dtype bfloat16, else float32 at --matmul-precision).
With --torch-peer (the project's plain PyTorch step, `benchmarks/torch_peer.py`; or
--torch-peer PATH, any script that takes --batch-size, --steps, --device and --amp and prints a
JSON line with samples_per_s), that script is run in a subprocess right after ours at the same B, on the same device kind, with
--amp for bfloat16, and the ratio ours / peer is reported. With --rounds R > 1 the two are
interleaved: R rounds of (our --steps steps, then the peer's), reporting each round's rates and
ratio and their medians, so that a host whose speed drifts during the run (a shared machine)
moves both sides of each ratio alike. The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

from benchmarks import common

WINDOW_LENGTH = 250
EMBEDDING_DIM = 512
TORCH_PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_peer.py")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size B")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after compilation")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="activation dtype of the encoder (params stay float32)")
    parser.add_argument("--matmul-precision", choices=("default", "high", "highest"), default="default",
                        help="model.matmul_precision of the step (float32 matmuls)")
    parser.add_argument("--queue-size", type=int, default=8192)
    parser.add_argument("--window-length", type=int, default=WINDOW_LENGTH, help="T, samples per window")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the reference matmuls")
    parser.add_argument("--hidden-dim", type=int, default=512, help="GRU width (and head width), default model 512")
    parser.add_argument("--config-override", action="append", default=[], metavar="a.b=value",
                        help="extra override of configs/default.py, e.g. objective.use_nn=False")
    parser.add_argument("--torch-peer", nargs="?", const=TORCH_PEER, default="", metavar="PATH",
                        help="run a PyTorch step at the same B after ours (needs torch); without PATH the "
                             "project's benchmarks/torch_peer.py")
    parser.add_argument("--torch-peer-steps", type=int, default=0,
                        help="timed steps of the torch peer; 0 uses --steps")
    parser.add_argument("--rounds", type=int, default=1,
                        help="timed rounds of --steps steps (interleaved with the peer's); medians are reported")
    common.add_device_arguments(parser)
    return parser


def benchmark_config(args: argparse.Namespace):
    """configs/default.py with the benchmark's batch, queue, dtype and any --config-override applied."""
    from configs import default

    config = default.get_config()
    config.train.global_batch_size = args.batch_size
    config.queue.size = args.queue_size
    config.model.dtype = args.compute_dtype
    config.model.matmul_precision = args.matmul_precision
    config.model.hidden_dim = args.hidden_dim
    config.model.ssl_dim = args.hidden_dim
    for override in args.config_override:
        path, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"--config-override {override!r} is not of the form a.b=value")
        parent, _, field = path.rpartition(".")
        node = config
        for name in filter(None, parent.split(".")):
            node = node[name]
        if field not in node:
            raise ValueError(f"--config-override {override!r}: the config has no field {path!r}")
        node[field] = type(node[field])(value) if not isinstance(node[field], bool) else value.lower() == "true"
    return config


def synthetic_batch(batch_size: int, window_length: int, dim: int, seed: int = 0) -> dict:
    """A host batch as the data pipeline yields it: gravity-on-z IMU noise and unit embeddings."""
    import numpy as np

    rng = np.random.default_rng(seed)
    imu = rng.standard_normal((batch_size, window_length, 6)).astype(np.float32)
    imu[:, :, 2] += 9.81

    def unit(n):
        v = rng.standard_normal((n, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return {"imu": imu, "text_emb": unit(batch_size), "video_emb": unit(batch_size),
            "has_text": np.ones(batch_size, bool), "has_video": np.ones(batch_size, bool)}


def check_torch_peer(path: str) -> None:
    """ValueError unless the peer script exists (checked before any timing)."""
    if not os.path.isfile(path):
        raise ValueError(f"--torch-peer {path}: no such file")


def run_torch_peer(path: str, batch_size: int, steps: int, bfloat16: bool, backend: str) -> dict:
    """The peer script's JSON result at this batch size: `python PATH --batch-size B --steps N --device D`."""
    device = "cuda" if backend == "gpu" else "cpu"
    command = [sys.executable, path, "--batch-size", str(batch_size), "--steps", str(steps), "--device", device]
    if bfloat16:
        command.append("--amp")
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        hint = "" if importlib.util.find_spec("torch") else " (torch is not installed: pip install -e '.[torch]')"
        raise ValueError(f"the torch peer {path} failed (exit {done.returncode}){hint}: {done.stderr.strip()[-2000:]}")
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as error:
        raise ValueError(f"the torch peer {path} did not end with a JSON line: {lines[-1]!r}") from error
    if "samples_per_s" not in result:
        raise ValueError(f"the torch peer {path}'s JSON line has no samples_per_s: {lines[-1]!r}")
    return result


def compile_step(args: argparse.Namespace, mesh=None):
    """Compiles the step on `mesh` (default: every device) and runs it once.

    Returns (time_steps, record): time_steps() runs `args.steps` steps as one dispatch stream
    ending in a single block and returns (seconds, the last step's metrics); record holds the
    fields that do not depend on the timing (batch, devices, dtypes, compile time, FLOPs).
    """
    import jax

    from primus_jax import flops, train, trainconfig

    if args.steps < 1 or args.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be positive, got {args.steps} and {args.batch_size}")
    config = benchmark_config(args)
    dims = trainconfig.DataDims(window_length=args.window_length, rate_hz=50.0,
                                text_dim=EMBEDDING_DIM, video_dim=EMBEDDING_DIM)
    mesh = train.make_mesh() if mesh is None else mesh
    trainconfig.validate_config(config, dims, mesh.size)
    state = train.place_state(train.create_train_state(config, dims), mesh)
    batch = train.prepare_batch(synthetic_batch(args.batch_size, args.window_length, EMBEDDING_DIM),
                                dims, config.model.mm_dim, mesh)
    train_step, _ = train.make_steps(config, dims, mesh)

    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    # Every synthetic sample has video: the look-up runs its video similarity matmul only.
    step_flops = flops.step_flops(config, dims.window_length, dims.text_dim, dims.video_dim,
                                  lookup_modalities=("video",)).total

    state, metrics = compiled(state, batch)  # warm-up: first run allocates the donated buffers
    jax.block_until_ready((state, metrics))

    def time_steps():
        nonlocal state, metrics
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        return time.perf_counter() - start, metrics

    record = {
        "benchmark": "train_step",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "devices": mesh.size,
        "compute_dtype": args.compute_dtype,
        "matmul_precision": args.matmul_precision,
        "compile_s": round(compile_s, 3),
        "step_gflop": common.significant(step_flops / 1e9, 6),
    }
    return time_steps, record


def timing_fields(record: dict, seconds: float, metrics) -> dict:
    """record + the rates of one timed run of record["steps"] steps that took `seconds`."""
    steps = record["steps"]
    return dict(
        record,
        step_ms=round(1e3 * seconds / steps, 3),
        samples_per_s=common.significant(record["batch_size"] * steps / seconds, 5),
        gflops_per_s=common.significant(record["step_gflop"] * steps / seconds, 5),
        final_loss=float(metrics["loss"]),
    )


def time_step(args: argparse.Namespace, mesh=None) -> dict:
    """Compiles and times the step once on `mesh` (default: every device); the record without the peaks."""
    time_steps, record = compile_step(args, mesh)
    return timing_fields(record, *time_steps())


def compare_with_peaks(result: dict, peaks: dict[str, float]) -> dict:
    """result + its ratio to each matmul peak and its MFU (against the peak of the step's matmul kind)."""
    mfu_peak = common.peak_name(result["compute_dtype"], result["matmul_precision"])
    rate = result["gflops_per_s"]
    return dict(
        result,
        matmul_gflops_per_s={name: round(peak, 3) for name, peak in peaks.items()},
        ratio_to_matmul={name: common.significant(rate / peak) for name, peak in peaks.items()},
        mfu_peak=mfu_peak,
        mfu=common.significant(rate / peaks[mfu_peak]),
    )


def compare_with_torch_peer(result: dict, args: argparse.Namespace, backend: str) -> dict:
    """result + the torch peer's record at the same B and dtype, and ours / peer in samples/s."""
    peer = run_torch_peer(args.torch_peer, args.batch_size, args.torch_peer_steps or args.steps,
                          args.compute_dtype == "bfloat16", backend)
    return dict(
        result,
        torch_peer=peer,
        ratio_to_torch_peer=common.significant(result["samples_per_s"] / peer["samples_per_s"]),
        torch_peer_same_model=same_model_as_peer(args),
    )


def interleaved_rounds(args: argparse.Namespace, mesh) -> dict:
    """--rounds rounds of (our steps, then the peer's when --torch-peer is given), one process.

    Reports the median round: samples/s (and the fields derived from it) of our median round,
    the peer's median samples/s, and the median of the per-round ratios ours / peer, with every
    round's values in *_by_round.
    """
    import statistics

    import jax

    time_steps, record = compile_step(args, mesh)
    rounds, peers = [], []
    for _ in range(args.rounds):
        rounds.append(time_steps())
        if args.torch_peer:
            peers.append(run_torch_peer(args.torch_peer, args.batch_size, args.torch_peer_steps or args.steps,
                                        args.compute_dtype == "bfloat16", jax.default_backend()))
    ours = [timing_fields(record, seconds, metrics) for seconds, metrics in rounds]
    median_round = sorted(ours, key=lambda r: r["samples_per_s"])[(len(ours) - 1) // 2]
    result = dict(median_round, rounds=args.rounds, samples_per_s_by_round=[r["samples_per_s"] for r in ours])
    if args.torch_peer:
        ratios = [r["samples_per_s"] / p["samples_per_s"] for r, p in zip(ours, peers)]
        peer_rates = [p["samples_per_s"] for p in peers]
        result.update(
            torch_peer=dict(peers[-1], samples_per_s=common.significant(statistics.median(peer_rates), 5)),
            torch_peer_samples_per_s_by_round=peer_rates,
            ratio_to_torch_peer=common.significant(statistics.median(ratios)),
            ratio_to_torch_peer_by_round=[common.significant(ratio) for ratio in ratios],
            torch_peer_same_model=same_model_as_peer(args),
        )
    return result


def same_model_as_peer(args: argparse.Namespace) -> bool:
    """Whether our step is the model the peer runs (default T=250, GRU 512, queue 8192, full objective)."""
    return (args.window_length, args.hidden_dim, args.queue_size) == (WINDOW_LENGTH, 512, 8192) and not args.config_override


def run(args: argparse.Namespace) -> dict:
    """Times the step, the matmul peaks and (with --torch-peer) the peer; returns the result record."""
    from primus_jax import train

    if args.torch_peer:
        check_torch_peer(args.torch_peer)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be positive, got {args.rounds}")
    mesh = train.make_mesh()
    result = interleaved_rounds(args, mesh)
    names = dict.fromkeys(common.MATMUL_PEAKS + (common.peak_name(args.compute_dtype, args.matmul_precision),))
    result = compare_with_peaks(result, common.matmul_peaks(mesh, args.matmul_size, names))
    result["matmul_size"] = args.matmul_size
    return {**result, **common.machine_description()}


def summary(result: dict) -> list[str]:
    peaks = "; ".join(f"{name} {rate:.1f} GFLOP/s (step at {result['ratio_to_matmul'][name]:.3f})"
                      for name, rate in result["matmul_gflops_per_s"].items())
    lines = [
        f"devices: {result['devices']} x {result['device_kind']}",
        f"compile: {result['compile_s']:.2f} s",
        f"step: {result['step_ms']:.1f} ms at B={result['batch_size']} ({result['compute_dtype']}, "
        f"matmul precision {result['matmul_precision']}), {result['samples_per_s']:.1f} samples/s",
        f"step FLOPs (analytic, matmuls): {result['step_gflop']:.3f} GFLOP; achieved {result['gflops_per_s']:.2f} GFLOP/s",
        f"matmul peaks {result['matmul_size']}^2: {peaks}",
        f"MFU (against {result['mfu_peak']}): {result['mfu']:.3f}",
    ]
    if "torch_peer" in result:
        peer = result["torch_peer"]
        caveat = "" if result["torch_peer_same_model"] else " (NOT the same model: ours was shrunk by the arguments)"
        lines.append(f"torch peer: {peer['samples_per_s']:.1f} samples/s; ours / peer = "
                     f"{result['ratio_to_torch_peer']:.2f}{caveat}")
    if result.get("rounds", 1) > 1:
        lines.append("rounds (ours samples/s" + (", peer, ratio" if "torch_peer" in result else "") + "): " + "; ".join(
            " / ".join(f"{value:.2f}" for value in values)
            for values in zip(*(result[key] for key in ("samples_per_s_by_round", "torch_peer_samples_per_s_by_round",
                                                         "ratio_to_torch_peer_by_round") if key in result))))
        lines.append(f"medians over {result['rounds']} rounds are reported above")
    return lines


def main(argv=None) -> int:
    return common.run_cli(build_parser(), run, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
