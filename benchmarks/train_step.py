"""Throughput of the full PRIMUS train step, against a large float32 matmul on the same devices.

    python -m benchmarks.train_step --batch-size 64 --steps 20 [--compute-dtype bfloat16]

The step is `train.make_steps`' train_step with the default config (two views, SS + MM + NN,
the 1.4M-parameter encoder, queue of 8192) on synthetic windows of T=250 samples with 512-d text
and video embeddings, data-parallel over every available device (`--host-devices N` splits
the CPU into N devices). Compilation is timed separately; then `--steps` steps are timed as one
dispatch stream ending in a single block, so no host sync sits between steps.

Reported: samples/s = B * steps / seconds; the step's FLOPs from XLA's cost analysis of the
compiled step (summed over devices); achieved GFLOP/s = FLOPs * steps / seconds; and
matmul_ratio = achieved / the GFLOP/s of a (size x size) float32 matmul timed in this process
(`common.matmul_gflops`). The last line is a JSON object with those numbers.
"""
from __future__ import annotations

import argparse
import sys
import time

from benchmarks import common

WINDOW_LENGTH = 250
EMBEDDING_DIM = 512


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size B")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after compilation")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="activation dtype of the encoder (params stay float32)")
    parser.add_argument("--queue-size", type=int, default=8192)
    parser.add_argument("--window-length", type=int, default=WINDOW_LENGTH, help="T, samples per window")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the reference float32 matmul")
    parser.add_argument("--hidden-dim", type=int, default=512, help="GRU width (and head width), default model 512")
    parser.add_argument("--config-override", action="append", default=[], metavar="a.b=value",
                        help="extra override of configs/default.py, e.g. objective.use_nn=False")
    common.add_device_arguments(parser)
    return parser


def benchmark_config(args: argparse.Namespace):
    """configs/default.py with the benchmark's batch, queue, dtype and any --config-override applied."""
    from configs import default

    config = default.get_config()
    config.train.global_batch_size = args.batch_size
    config.queue.size = args.queue_size
    config.model.dtype = args.compute_dtype
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


def step_flops(compiled, num_devices: int) -> float:
    """FLOPs of one step from XLA's cost analysis; an SPMD program is analysed per device, so x devices."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    if not analysis or "flops" not in analysis:
        raise RuntimeError("XLA's cost analysis of the compiled train step reports no 'flops'")
    return float(analysis["flops"]) * num_devices


def run(args: argparse.Namespace) -> dict:
    """Compiles and times the step and the matmul reference; returns the result record."""
    import jax

    from primus_jax import train

    if args.steps < 1 or args.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be positive, got {args.steps} and {args.batch_size}")
    config = benchmark_config(args)
    dims = train.DataDims(window_length=args.window_length, rate_hz=50.0,
                          text_dim=EMBEDDING_DIM, video_dim=EMBEDDING_DIM)
    mesh = train.make_mesh()
    train.validate_config(config, dims, mesh.size)
    state = train.replicate(train.create_train_state(config, dims), mesh)
    batch = train.prepare_batch(synthetic_batch(args.batch_size, args.window_length, EMBEDDING_DIM),
                                dims, config.model.mm_dim, mesh)
    train_step, _ = train.make_steps(config, dims, mesh)

    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = step_flops(compiled, mesh.size)

    state, metrics = compiled(state, batch)  # warm-up: first run allocates the donated buffers
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    loss = float(metrics["loss"])

    matmul = common.matmul_gflops(mesh, args.matmul_size)
    step_gflops = flops * args.steps / seconds / 1e9
    return {
        "benchmark": "train_step",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "devices": mesh.size,
        "compute_dtype": args.compute_dtype,
        "compile_s": round(compile_s, 3),
        "step_ms": round(1e3 * seconds / args.steps, 3),
        "samples_per_s": round(args.batch_size * args.steps / seconds, 2),
        "step_gflop": round(flops / 1e9, 4),
        "gflops_per_s": round(step_gflops, 3),
        "matmul_size": args.matmul_size,
        "matmul_gflops_per_s": round(matmul, 3),
        "matmul_ratio": round(step_gflops / matmul, 4),
        "final_loss": loss,
        **common.machine_description(),
    }


def summary(result: dict) -> list[str]:
    return [
        f"devices: {result['devices']} x {result['device_kind']}",
        f"compile: {result['compile_s']:.2f} s",
        f"step: {result['step_ms']:.1f} ms at B={result['batch_size']} ({result['compute_dtype']}), "
        f"{result['samples_per_s']:.1f} samples/s",
        f"step FLOPs (XLA cost analysis): {result['step_gflop']:.3f} GFLOP; "
        f"achieved {result['gflops_per_s']:.2f} GFLOP/s",
        f"float32 matmul {result['matmul_size']}^2: {result['matmul_gflops_per_s']:.2f} GFLOP/s; "
        f"ratio {result['matmul_ratio']:.3f}",
    ]


def main(argv=None) -> int:
    return common.run_cli(build_parser(), run, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
