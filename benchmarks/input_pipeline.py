"""Throughput of the input pipeline: TFRecord shards -> device arrays, against the train step's need.

    python -m benchmarks.input_pipeline [--records 8192 --batch-size 64 --step-samples-per-s R]

Writes a temporary dataset of `--records` synthetic windows (T=250, 512-d text and video
embeddings, every third without video) with `primus_jax.data.DatasetWriter`, then reads it with
`data.BatchIterator` (shuffled, prefetching) and puts every batch on the devices with
`train.prepare_batch`, blocking until the arrays are there. One untimed batch starts the reader.

Reported: records/s and batches/s from shards to device arrays, the write rate, and
ratio = pipeline records/s / the train step's samples/s. The step's rate is
`--step-samples-per-s` when given, else measured here with `benchmarks.train_step` at the same
batch size (a few steps). The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

from benchmarks import common

WINDOW_LENGTH = 250
EMBEDDING_DIM = 512


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=8192, help="windows in the temporary dataset")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the dataset to time")
    parser.add_argument("--prefetch", type=int, default=2, help="BatchIterator prefetch depth")
    parser.add_argument("--records-per-shard", type=int, default=2048)
    parser.add_argument("--step-samples-per-s", type=float, default=0.0,
                        help="the train step's samples/s to compare with; 0 measures it here")
    parser.add_argument("--step-steps", type=int, default=3, help="timed steps when measuring the train step")
    common.add_device_arguments(parser)
    return parser


def write_synthetic_dataset(out_dir: str, records: int, records_per_shard: int, seed: int = 0) -> float:
    """Writes `records` windows into split 'train' of out_dir; returns seconds taken."""
    import numpy as np

    from primus_jax import data

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with data.DatasetWriter(out_dir, T=WINDOW_LENGTH, rate_hz=50.0, text_dim=EMBEDDING_DIM,
                            video_dim=EMBEDDING_DIM, records_per_shard=records_per_shard) as writer:
        for i in range(records):
            imu = rng.standard_normal((WINDOW_LENGTH, 6)).astype(np.float32)
            imu[:, 2] += 9.81
            writer.add("train", data.Window(
                imu=imu, rate_hz=50.0, text=f"synthetic window {i}",
                text_emb=rng.standard_normal(EMBEDDING_DIM).astype(np.float32),
                video_emb=rng.standard_normal(EMBEDDING_DIM).astype(np.float32) if i % 3 else None,
                recording_id=f"rec{i // 64}", start_s=float(i % 64), end_s=float(i % 64) + 5.0))
    return time.perf_counter() - start


def read_to_devices(dataset_dir: str, batch_size: int, epochs: int, prefetch: int) -> tuple[int, int, float]:
    """(records, batches, seconds) of reading `epochs` passes through prepare_batch onto the devices."""
    import jax

    from primus_jax import data, train

    dims = train.DataDims.from_manifest(data.read_manifest(dataset_dir))
    mesh = train.make_mesh()
    iterator = data.BatchIterator(dataset_dir, "train", batch_size, seed=0, shuffle=True,
                                  num_epochs=epochs, prefetch=prefetch)
    try:
        total_batches = iterator.steps_per_epoch * epochs
        if total_batches < 2:
            raise ValueError(f"--records x --epochs must give at least 2 batches of {batch_size}")
        jax.block_until_ready(train.prepare_batch(next(iterator), dims, EMBEDDING_DIM, mesh))
        start = time.perf_counter()
        batches = 0
        for local in iterator:
            jax.block_until_ready(train.prepare_batch(local, dims, EMBEDDING_DIM, mesh))
            batches += 1
        seconds = time.perf_counter() - start
    finally:
        iterator.close()
    return batches * batch_size, batches, seconds


def measured_step_rate(batch_size: int, steps: int) -> float:
    """samples/s of the default train step at this batch size, from benchmarks.train_step."""
    from benchmarks import train_step

    args = train_step.build_parser().parse_args(["--batch-size", str(batch_size), "--steps", str(steps)])
    return train_step.run(args)["samples_per_s"]


def run(args: argparse.Namespace) -> dict:
    if args.records < 1 or args.batch_size < 1 or args.epochs < 1:
        raise ValueError("--records, --batch-size and --epochs must be positive")
    with tempfile.TemporaryDirectory(prefix="primus_input_bench_") as dataset_dir:
        write_s = write_synthetic_dataset(dataset_dir, args.records, args.records_per_shard)
        records, batches, seconds = read_to_devices(dataset_dir, args.batch_size, args.epochs, args.prefetch)
    step_rate = args.step_samples_per_s or measured_step_rate(args.batch_size, args.step_steps)
    records_per_s = records / seconds
    import jax

    return {
        "benchmark": "input_pipeline",
        "records": args.records,
        "batch_size": args.batch_size,
        "devices": jax.device_count(),
        "write_records_per_s": round(args.records / write_s, 1),
        "records_per_s": round(records_per_s, 1),
        "batches_per_s": round(batches / seconds, 2),
        "step_samples_per_s": round(step_rate, 2),
        "step_rate_source": "given" if args.step_samples_per_s else "measured",
        "ratio_to_step": round(records_per_s / step_rate, 2),
        **common.machine_description(),
    }


def summary(result: dict) -> list[str]:
    return [
        f"write: {result['write_records_per_s']:.0f} records/s ({result['records']} records)",
        f"read to {result['devices']} device(s): {result['records_per_s']:.0f} records/s, "
        f"{result['batches_per_s']:.1f} batches/s of {result['batch_size']}",
        f"train step ({result['step_rate_source']}): {result['step_samples_per_s']:.1f} samples/s; "
        f"pipeline / step = {result['ratio_to_step']:.1f}x",
    ]


def main(argv=None) -> int:
    return common.run_cli(build_parser(), run, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
