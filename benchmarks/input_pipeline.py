"""Throughput of the input pipeline in steady state, for several worker counts, and per-core decoding.

    python -m benchmarks.input_pipeline [--records 4096 --batch-size 256 --workers 0,1,2
                                         --prefetch 2 --batches 64 --step-samples-per-s R]

Writes a temporary dataset of `--records` synthetic windows (T=250, 512-d text and video
embeddings, every third without video) with `primus_jax.data.DatasetWriter`. Then:

1. Decoding per core: shuffled epochs decoded in this one process by `BatchIterator`
   (workers=0, prefetch=0), against the per-record protobuf decoding that the pipeline used
   before (`np.array` over protobuf's repeated fields, then `np.stack`), alternating batch by
   batch over the same batches (`decoding_rates`): one warm-up epoch, then `--decode-rounds`
   epochs through the same iterator, the median.
2. The pipeline for each `--workers` count: `BatchIterator` (shuffled, endless epochs, the
   given prefetch) -> `train.prepare_batch` on the devices, blocking on each batch. The first
   `--warmup` batches (worker start-up, imports) are not timed; the next `--batches` are, which
   must be at least 10x the batches held in buffers (prefetch x (workers + 1)), so that the
   timed batches are decoded while the clock runs.

Reported: records/s for each, the write rate, and ratio = pipeline records/s / the train
step's samples/s (`--step-samples-per-s`, else measured here with `benchmarks.train_step` at
the same batch size). The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from benchmarks import common

WINDOW_LENGTH = 250
EMBEDDING_DIM = 512


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=4096, help="windows in the temporary dataset")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts to time")
    parser.add_argument("--prefetch", type=int, default=2, help="BatchIterator prefetch depth")
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches before timing")
    parser.add_argument("--batches", type=int, default=64, help="timed batches per worker count")
    parser.add_argument("--decode-rounds", type=int, default=3, help="timed epochs of the decoding comparison (after one warm-up epoch)")
    parser.add_argument("--records-per-shard", type=int, default=2048)
    parser.add_argument("--step-samples-per-s", type=float, default=0.0,
                        help="the train step's samples/s to compare with; 0 measures it here")
    parser.add_argument("--step-steps", type=int, default=3, help="timed steps when measuring the train step")
    common.add_device_arguments(parser)
    return parser


def write_synthetic_dataset(out_dir: str, records: int, records_per_shard: int, seed: int = 0,
                            window_length: int = WINDOW_LENGTH) -> float:
    """Writes `records` windows into split 'train' of out_dir; returns seconds taken."""
    import numpy as np

    from primus_jax import data

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with data.DatasetWriter(out_dir, T=window_length, rate_hz=50.0, text_dim=EMBEDDING_DIM,
                            video_dim=EMBEDDING_DIM, records_per_shard=records_per_shard) as writer:
        for i in range(records):
            imu = rng.standard_normal((window_length, 6)).astype(np.float32)
            imu[:, 2] += 9.81
            writer.add("train", data.Window(
                imu=imu, rate_hz=50.0, text=f"synthetic window {i}",
                text_emb=rng.standard_normal(EMBEDDING_DIM).astype(np.float32),
                video_emb=rng.standard_normal(EMBEDDING_DIM).astype(np.float32) if i % 3 else None,
                recording_id=f"rec{i // 64}", start_s=float(i % 64), end_s=float(i % 64) + 5.0))
    return time.perf_counter() - start


def decoding_rates(dataset_dir: str, batch_size: int, epochs: int) -> list[tuple[float, float]]:
    """Per epoch, (records per CPU second of BatchIterator, the same of the previous decoding).

    `epochs` shuffled epochs through ONE BatchIterator (workers=0, prefetch=0) and one reader
    for the previous decoding, as a training run reads them. Batch by batch, the previous
    decoding (one protobuf parse per record, np.array over its repeated fields, np.stack) of
    batch k is timed, then `next()` of the iterator, which decodes the same batch k.
    Alternating batch by batch puts both under the same machine load, and the clock is this
    process's CPU time (time.process_time), so other processes on a shared machine do not count.
    The first epoch also pays for mapping the shards' pages into the process.
    """
    import numpy as np

    from primus_jax import data
    from primus_jax.data import example_codec, reader

    split = reader.SplitReader(dataset_dir, "train")
    manifest = split.manifest
    rates = []
    with data.BatchIterator(dataset_dir, "train", batch_size, seed=0, process_index=0,
                            process_count=1, num_epochs=epochs, prefetch=0, workers=0) as iterator:
        for epoch in range(epochs):
            old_s = new_s = 0.0
            records = 0
            order = np.random.default_rng([0, epoch]).permutation(split.num_records)
            for k in range(iterator.steps_per_epoch):
                start = time.process_time()
                decoded = []
                for record in order[k * batch_size:(k + 1) * batch_size]:
                    raw, shard, local = split._raw(int(record))
                    decoded.append(example_codec._decode_with_protobuf(
                        bytes(raw), T=manifest["T"], text_dim=manifest["text_dim"],
                        video_dim=manifest["video_dim"], where=f"{split.files[shard]}: record {local}"))
                before = reader.stack_records(decoded, reader.BATCH_FIELDS)
                old_s += time.process_time() - start
                start = time.process_time()
                batch = next(iterator)
                new_s += time.process_time() - start
                records += len(batch["label"])
                if not np.array_equal(batch["imu"], before["imu"]):
                    raise RuntimeError("the two decodings disagree")  # guards the comparison itself
            rates.append((records / new_s, records / old_s))
    split.close()
    return rates


def read_to_devices(dataset_dir: str, batch_size: int, workers: int, prefetch: int, warmup: int,
                    batches: int) -> float:
    """records/s of `batches` batches through prepare_batch onto the devices, after `warmup`."""
    import jax

    from primus_jax import data, train, trainconfig

    dims = trainconfig.DataDims.from_manifest(data.read_manifest(dataset_dir))
    mesh = train.make_mesh()
    with data.BatchIterator(dataset_dir, "train", batch_size, seed=0, shuffle=True,
                            prefetch=prefetch, workers=workers) as iterator:
        for _ in range(warmup):
            jax.block_until_ready(train.prepare_batch(next(iterator), dims, EMBEDDING_DIM, mesh))
        start = time.perf_counter()
        for _ in range(batches):
            jax.block_until_ready(train.prepare_batch(next(iterator), dims, EMBEDDING_DIM, mesh))
        return batches * batch_size / (time.perf_counter() - start)


def measured_step_rate(batch_size: int, steps: int) -> float:
    """samples/s of the default train step at this batch size, from benchmarks.train_step."""
    from benchmarks import train_step

    args = train_step.build_parser().parse_args(["--batch-size", str(batch_size), "--steps", str(steps)])
    return train_step.run(args)["samples_per_s"]


def run(args: argparse.Namespace) -> dict:
    try:
        worker_counts = [int(w) for w in args.workers.split(",")]
    except ValueError:
        raise ValueError(f"--workers {args.workers!r} must be comma-separated integers") from None
    if min([args.records, args.batch_size, args.batches, args.decode_rounds] + [1 + w for w in worker_counts]) < 1:
        raise ValueError("--records, --batch-size, --batches and --decode-rounds must be positive, "
                         "--workers not negative")
    if args.records < args.batch_size:
        raise ValueError(f"--records {args.records} must hold one batch of {args.batch_size}")
    for workers in worker_counts:
        buffered = args.prefetch * (workers + 1)
        if args.batches < 10 * buffered:
            raise ValueError(f"--batches {args.batches} must be at least 10x the {buffered} batches "
                             f"buffered with prefetch {args.prefetch} and {workers} workers")
    with tempfile.TemporaryDirectory(prefix="primus_input_bench_") as dataset_dir:
        write_s = write_synthetic_dataset(dataset_dir, args.records, args.records_per_shard)
        # The first epoch maps the shards' pages; the median is over the epochs after it.
        steady = decoding_rates(dataset_dir, args.batch_size, args.decode_rounds + 1)[1:]
        new_rates, old_rates = [new for new, _ in steady], [old for _, old in steady]
        ratios = [new / old for new, old in steady]
        pipeline = {str(w): round(read_to_devices(dataset_dir, args.batch_size, w, args.prefetch,
                                                  args.warmup, args.batches), 1)
                    for w in worker_counts}
    step_rate = args.step_samples_per_s or measured_step_rate(args.batch_size, args.step_steps)
    import jax

    return {
        "benchmark": "input_pipeline",
        "records": args.records,
        "batch_size": args.batch_size,
        "prefetch": args.prefetch,
        "timed_batches": args.batches,
        "devices": jax.device_count(),
        "write_records_per_s": round(args.records / write_s, 1),
        "decode_protobuf_records_per_s": round(statistics.median(old_rates), 1),
        "decode_records_per_s": round(statistics.median(new_rates), 1),
        "decode_speedup": common.significant(statistics.median(ratios)),
        "records_per_s_by_workers": pipeline,
        "step_samples_per_s": round(step_rate, 2),
        "step_rate_source": "given" if args.step_samples_per_s else "measured",
        "ratio_to_step_by_workers": {w: common.significant(rate / step_rate) for w, rate in pipeline.items()},
        **common.machine_description(),
    }


def summary(result: dict) -> list[str]:
    lines = [
        f"write: {result['write_records_per_s']:.0f} records/s ({result['records']} records)",
        f"decoding in one process: {result['decode_records_per_s']:.0f} records/s, before (protobuf "
        f"fields): {result['decode_protobuf_records_per_s']:.0f}; speed-up {result['decode_speedup']:.2f}x",
    ]
    for workers, rate in result["records_per_s_by_workers"].items():
        lines.append(f"workers={workers}: {rate:.0f} records/s to {result['devices']} device(s) "
                     f"(B={result['batch_size']}, prefetch {result['prefetch']}, "
                     f"{result['timed_batches']} timed batches); "
                     f"/ step = {result['ratio_to_step_by_workers'][workers]:.2f}")
    lines.append(f"train step ({result['step_rate_source']}): {result['step_samples_per_s']:.1f} samples/s")
    return lines


def main(argv=None) -> int:
    return common.run_cli(build_parser(), run, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
