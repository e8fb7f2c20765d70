"""The training input pipeline: deterministic, host-sharded batches of one split, on grain.

In epoch e the global order is a permutation of the split's N records seeded by (seed, e);
global batch k is order[k*G:(k+1)*G]; process p of P decodes only
order[k*G + p*b : k*G + (p+1)*b] with b = G / P, reading those records by offset. So
1 process x 4 devices and 2 processes x 2 devices see the same global batches.

The pipeline is a `grain.MapDataset` over batch positions i = e * steps_per_epoch + k whose
element is this process's decoded slice of global batch k of epoch e (`LocalBatchDecoder`).
grain's own samplers shard records per host, which is not this order, so the dataset is over
positions and the order lives in the decoder. `to_iter_dataset` prefetches in a thread and
`mp_prefetch` spreads the positions round-robin over `workers` processes, each decoding whole
local batches; elements come back in position order, so the batches do not depend on
`workers` or `prefetch`. The iterator's state is the next position (JSON, saved in the Orbax
checkpoint by primus_jax.checkpoint); restoring it rebuilds the dataset from that position.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import grain
from absl import flags
import numpy as np

from primus_jax.data.reader import SplitReader
from primus_jax.data.schema import DataError

log = logging.getLogger(__name__)


class InputPipelineError(DataError):
    """The input pipeline could not produce a batch (e.g. a decoding worker process died)."""


def default_workers() -> int:
    """Decoding worker processes sized to the host: its usable cores minus one for the trainer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, (cores or 1) - 1)


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """grain worker_init_fn: the worker exits when the process that started it is gone.

    A SIGKILL'd trainer cannot stop its workers; without this they would wait forever on a
    queue nobody reads.
    """
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            threading.Event().wait(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class LocalBatchDecoder:
    """Decodes this process's slice of one global batch; runs in grain's worker processes.

    Called with a batch position i = epoch * steps_per_epoch + step, it returns
    {"position": i, "error": None | "<shard file>: record <j>: <problem>", "batch": {imu
    (b, T, 6) f32, text_emb (b, Dt) f32, has_text (b,) bool, video_emb (b, Dv) f32,
    has_video (b,) bool, label (b,) int32}, "records_read": b, "skipped_records": s}. A
    DataError is returned rather than raised, so it reaches the trainer as it was worded.
    Pickled into the workers without open files: each opens its shards on first use.
    """

    def __init__(self, dataset_dir: str, split: str, *, num_records: int, global_batch_size: int,
                 process_index: int, process_count: int, steps_per_epoch: int, seed: int,
                 shuffle: bool, skip_corrupt: bool):
        self.dataset_dir, self.split = dataset_dir, split
        self.num_records, self.global_batch_size = num_records, global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index, self.steps_per_epoch = process_index, steps_per_epoch
        self.seed, self.shuffle, self.skip_corrupt = seed, shuffle, skip_corrupt
        self._reader: SplitReader | None = None
        self._corrupt: dict[int, str] = {}  # global record index -> error message
        self._orders: dict[int, np.ndarray] = {}  # only the current epoch is kept

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None, "_corrupt": {}, "_orders": {}}

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __call__(self, position: int) -> dict:
        epoch, step = divmod(int(position), self.steps_per_epoch)
        try:
            batch, skipped = self._decode_batch(epoch, step)
        except DataError as error:
            return {"position": position, "error": str(error)}
        return {"position": position, "error": None, "batch": batch,
                "records_read": len(batch["label"]), "skipped_records": skipped}

    @property
    def reader(self) -> SplitReader:
        if self._reader is None:
            self._reader = SplitReader(self.dataset_dir, self.split)
        return self._reader

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
                     if self.shuffle else np.arange(self.num_records))
            self._orders = {epoch: order}
        return self._orders[epoch]

    def _local_positions(self, step: int) -> np.ndarray:
        """Positions in the epoch order that this process reads for global batch `step`."""
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        stop = min(start + self.local_batch_size, self.num_records,
                   (step + 1) * self.global_batch_size)
        return np.arange(start, max(start, stop))

    def _read_valid(self, read, record: int):
        """read(record) (SplitReader.decode or .training_fields), or None if the record is
        corrupt and skip_corrupt is on (then logged, and remembered for the epoch's reads)."""
        if record in self._corrupt:
            return None
        try:
            return read(record)
        except DataError as error:
            if not self.skip_corrupt:
                raise
            log.warning("skipping corrupt record: %s", error)
            self._corrupt[record] = str(error)
            return None

    def _replacement(self, epoch: int, step: int, row: int) -> dict:
        """The next valid record after `row` of `step` in this process's epoch order."""
        order = self._epoch_order(epoch)
        positions = np.concatenate([self._local_positions(s) for s in range(self.steps_per_epoch)])
        here = step * self.local_batch_size + row
        for offset in range(1, len(positions)):
            record = self._read_valid(self.reader.decode,
                                     int(order[positions[(here + offset) % len(positions)]]))
            if record is not None:
                return record
        raise DataError(f"{self.dataset_dir}: split '{self.split}': every record this "
                        f"process reads in epoch {epoch} is corrupt")

    def _decode_batch(self, epoch: int, step: int) -> tuple[dict, int]:
        order = self._epoch_order(epoch)
        records = order[self._local_positions(step)].tolist()
        rows, skipped = [], 0
        for row, record in enumerate(records):
            fields = self._read_valid(self.reader.training_fields, record)
            if fields is None:
                skipped += 1
                fields = self.reader.decoder.training_fields_of(self._replacement(epoch, step, row))
            rows.append(fields)
        batch = self.reader.assemble_batch(rows)
        # One NaN/inf check for the whole batch; a bad row is decoded again with every check,
        # which raises (or skips) with the record's own message.
        finite = (np.isfinite(batch["imu"]).all(axis=(1, 2))
                  & np.isfinite(batch["text_emb"]).all(axis=1)
                  & np.isfinite(batch["video_emb"]).all(axis=1))
        for row in np.flatnonzero(~finite):
            if self._read_valid(self.reader.decode, records[row]) is None:
                skipped += 1
                replacement = self._replacement(epoch, step, row)
                for name in batch:
                    batch[name][row] = replacement[name]
        return batch, skipped


class BatchIterator:
    """Deterministic, host-sharded batches of one split, decoded by grain.

    Each `next()` returns this process's LOCAL batch of b = global_batch_size / process_count
    records: {"imu": (b, T, 6) f32, "text_emb": (b, Dt) f32 (zeros where no text),
    "has_text": (b,) bool, "video_emb": (b, Dv) f32, "has_video": (b,) bool,
    "label": (b,) int32}. Epoch e's global order is a permutation of the N records drawn from
    numpy's default_rng([seed, e]) (identity with shuffle=False); global batch k is
    order[k*G:(k+1)*G] and this process takes the slice [p*b:(p+1)*b] of it, so the
    concatenation of all processes' local batches is the global batch. With
    drop_remainder=False the last global batch of an epoch is short, and so are (some)
    local slices of it.

    `workers` processes decode whole local batches (0: the main process decodes), each up to
    `prefetch` batches ahead, and a thread in the main process keeps up to `prefetch` more
    (prefetch 0: no thread). The batches are the same for every `workers` and `prefetch`.
    `get_state()` is the position of the next batch to be returned, so
    `set_state(get_state())` on a fresh iterator continues exactly as this one would.

    A corrupt record (bad CRC, truncation, wrong feature type or length, NaN/inf) raises
    DataError naming file, record and problem. With skip_corrupt=True it is logged and
    counted in `stats["skipped_records"]`, and its slot is filled with the next valid record
    in this process's order of the epoch (wrapping round), which is deterministic; that
    record then appears twice in the epoch. A worker process that dies raises
    InputPipelineError; no batch is returned from a partial decode.
    """

    def __init__(self, dataset_dir, split: str, global_batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, process_index: int | None = None,
                 process_count: int | None = None, num_epochs: int | None = None,
                 drop_remainder: bool = True, prefetch: int = 2, workers: int = 0,
                 skip_corrupt: bool = False):
        if process_index is None or process_count is None:
            import jax  # deferred: data_prep tools import this module without needing jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        reader = SplitReader(dataset_dir, split)  # checks the manifest and the split now
        self._where = f"BatchIterator({reader.dataset_dir}, split '{split}')"
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(f"{self._where}: global_batch_size {global_batch_size} must be a "
                             f"positive multiple of process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"{self._where}: process_index {process_index} is outside "
                             f"[0, {process_count})")
        if prefetch < 0 or workers < 0:
            raise ValueError(f"{self._where}: prefetch {prefetch} and workers {workers} must "
                             f"not be negative")
        num_records = reader.num_records
        if num_records == 0 or (drop_remainder and num_records < global_batch_size):
            raise ValueError(f"{self._where}: {num_records} records are fewer than one global "
                             f"batch of {global_batch_size}")
        self.split = split
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.num_epochs, self.drop_remainder = num_epochs, drop_remainder
        self.prefetch, self.workers, self.skip_corrupt = int(prefetch), int(workers), skip_corrupt
        self._num_records = num_records
        self._decoder = LocalBatchDecoder(
            reader.dataset_dir, split, num_records=num_records,
            global_batch_size=self.global_batch_size, process_index=self.process_index,
            process_count=self.process_count, steps_per_epoch=self.steps_per_epoch,
            seed=self.seed, shuffle=self.shuffle, skip_corrupt=skip_corrupt)
        reader.close()
        self._epoch, self._batch = 0, 0
        self._stats = {"records_read": 0, "skipped_records": 0}
        self._iterator = None

    @property
    def num_records(self) -> int:
        """Records N in the split."""
        return self._num_records

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch: floor(N / G), or ceil(N / G) without drop_remainder."""
        n, g = self._num_records, self.global_batch_size
        return n // g if self.drop_remainder else -(-n // g)

    @property
    def stats(self) -> dict:
        """Counters over the batches returned so far: records_read, skipped_records."""
        return dict(self._stats)

    def get_state(self) -> dict:
        """JSON-serialisable position of the next batch to be returned."""
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.seed,
                "shuffle": self.shuffle, "global_batch_size": self.global_batch_size}

    def set_state(self, state: dict) -> None:
        """Moves to a position saved by get_state (same seed, shuffle and global batch size)."""
        for key in ("seed", "shuffle", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"BatchIterator.set_state: state has {key}={state[key]!r} but "
                                 f"this iterator has {key}={getattr(self, key)!r}")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= self.steps_per_epoch:
            raise ValueError(f"BatchIterator.set_state: position epoch={epoch} batch={batch} is "
                             f"outside 0..{self.steps_per_epoch} batches per epoch")
        self._stop()
        self._epoch, self._batch = epoch, batch

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._start()
        try:
            element = next(self._iterator)
        except StopIteration:
            self._stop()
            raise
        except Exception as error:  # noqa: BLE001 - grain reports a dead worker this way
            self._stop()
            raise InputPipelineError(f"{self._where}: the input pipeline failed: {error}") from None
        if element["error"] is not None:
            self._stop()
            raise DataError(element["error"])
        self._epoch, last = divmod(element["position"], self.steps_per_epoch)
        self._batch = last + 1
        for key in self._stats:
            self._stats[key] += element[key]
        return element["batch"]

    def close(self) -> None:
        """Stops the prefetching thread and worker processes and closes the shard files."""
        self._stop()
        self._decoder.close()

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        start = self._epoch * self.steps_per_epoch + self._batch
        stop = sys.maxsize if self.num_epochs is None else self.num_epochs * self.steps_per_epoch
        dataset = grain.MapDataset.range(start, max(start, stop)).map(self._decoder)
        pipeline = dataset.to_iter_dataset(grain.ReadOptions(
            num_threads=1 if self.prefetch else 0, prefetch_buffer_size=self.prefetch))
        if self.workers:
            if not flags.FLAGS.is_parsed():  # grain reads absl flags; a plain script has none
                flags.FLAGS.mark_as_parsed()
            pipeline = pipeline.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.workers,
                                             per_worker_buffer_size=max(1, self.prefetch)),
                worker_init_fn=_exit_with_parent)
        self._iterator = iter(pipeline)

    def _stop(self) -> None:
        if self._iterator is not None:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()
            self._iterator = None
