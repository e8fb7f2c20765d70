"""The real training loop against its own train step: is the input pipeline keeping up?

    python -m benchmarks.main_loop [--records 4096 --batch-size 64 --steps 60 --log-every 10
                                    --workers -1 --prefetch 2 --compute-dtype float32]

Writes a temporary dataset of `--records` synthetic windows (T=`--window-length`, default 250,
512-d text and video, as benchmarks.input_pipeline) and runs `train.train_and_evaluate`, the loop behind
`python -m primus_jax.main`, on it with configs/default.py at batch `--batch-size` for `--steps`
steps (no validation split, no export, no checkpoint before the last step). The loop's own
samples/s (metrics.jsonl, one value per `--log-every` steps: shards -> decode -> device ->
step -> metrics) is taken over every window but the first, which holds the compilation. Then
`benchmarks.train_step` times the same step on one fixed device batch at the same B.

Reported: main-loop samples/s, fixed-batch step samples/s, and their ratio (1.0: the input
pipeline costs the loop nothing). The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from benchmarks import common
from benchmarks.input_pipeline import write_synthetic_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.main_loop",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=4096, help="windows in the temporary dataset")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size B")
    parser.add_argument("--steps", type=int, default=60, help="steps of the main loop")
    parser.add_argument("--log-every", type=int, default=10, help="steps per samples/s window")
    parser.add_argument("--workers", type=int, default=-1, help="config.data.workers (-1: automatic)")
    parser.add_argument("--prefetch", type=int, default=2, help="config.data.prefetch")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--window-length", type=int, default=250, help="T, samples per window")
    parser.add_argument("--hidden-dim", type=int, default=512, help="GRU and head width (default model 512)")
    parser.add_argument("--queue-size", type=int, default=8192)
    parser.add_argument("--step-steps", type=int, default=20, help="timed steps of the fixed-batch step")
    parser.add_argument("--records-per-shard", type=int, default=2048)
    common.add_device_arguments(parser)
    return parser


def loop_config(args: argparse.Namespace, dataset_dir: str):
    from configs import default

    config = default.get_config()
    config.data.dir = dataset_dir
    config.data.val_split = ""
    config.data.workers = args.workers
    config.data.prefetch = args.prefetch
    config.train.global_batch_size = args.batch_size
    config.train.num_steps = args.steps
    config.train.log_every = args.log_every
    config.train.eval_every = config.train.checkpoint_every = args.steps
    config.train.export = False
    config.model.dtype = args.compute_dtype
    config.model.hidden_dim = config.model.ssl_dim = args.hidden_dim
    config.queue.size = args.queue_size
    return config


def steady_loop_rate(metrics_path: str, batch_size: int, log_every: int) -> tuple[float, int]:
    """(samples/s over every logged window but the first, steps in those windows)."""
    with open(metrics_path) as file:
        rates = [row["samples_per_s"] for row in map(json.loads, file) if row["split"] == "train"]
    windows = rates[1:]
    if not windows:
        raise ValueError("--steps must cover at least two --log-every windows")
    seconds = sum(log_every * batch_size / rate for rate in windows)
    return len(windows) * log_every * batch_size / seconds, len(windows) * log_every


def run(args: argparse.Namespace) -> dict:
    if args.steps < 2 * args.log_every or args.log_every < 1 or args.batch_size < 1:
        raise ValueError("--steps must be at least two --log-every windows, both positive")
    if args.steps % args.log_every:
        raise ValueError(f"--steps {args.steps} must be a multiple of --log-every {args.log_every}")
    from benchmarks import train_step
    from primus_jax import train, train_data

    with tempfile.TemporaryDirectory(prefix="primus_main_loop_bench_") as root:
        dataset_dir, workdir = os.path.join(root, "data"), os.path.join(root, "workdir")
        write_synthetic_dataset(dataset_dir, args.records, args.records_per_shard,
                                window_length=args.window_length)
        config = loop_config(args, dataset_dir)
        summary = train.train_and_evaluate(config, workdir)
        loop_rate, timed_steps = steady_loop_rate(os.path.join(workdir, "metrics.jsonl"),
                                                  args.batch_size, args.log_every)
        workers = train_data.data_workers(config)
    step_args = train_step.build_parser().parse_args([
        "--batch-size", str(args.batch_size), "--steps", str(args.step_steps),
        "--compute-dtype", args.compute_dtype, "--queue-size", str(args.queue_size),
        "--hidden-dim", str(args.hidden_dim), "--window-length", str(args.window_length)])
    step = train_step.run(step_args)
    return {
        "benchmark": "main_loop",
        "records": args.records,
        "batch_size": args.batch_size,
        "steps": summary["step"],
        "timed_loop_steps": timed_steps,
        "workers": workers,
        "prefetch": args.prefetch,
        "compute_dtype": args.compute_dtype,
        "devices": step["devices"],
        "loop_samples_per_s": round(loop_rate, 2),
        "step_samples_per_s": step["samples_per_s"],
        "ratio": common.significant(loop_rate / step["samples_per_s"]),
        **common.machine_description(),
    }


def summary(result: dict) -> list[str]:
    return [
        f"main loop: {result['loop_samples_per_s']:.1f} samples/s over {result['timed_loop_steps']} "
        f"steps at B={result['batch_size']} ({result['compute_dtype']}, {result['workers']} "
        f"workers, prefetch {result['prefetch']}, {result['devices']} device(s))",
        f"fixed-batch step: {result['step_samples_per_s']:.1f} samples/s",
        f"main loop / step = {result['ratio']:.3f}",
    ]


def main(argv=None) -> int:
    return common.run_cli(build_parser(), run, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
