"""The training input pipeline: deterministic, host-sharded, prefetching batches of one split.

The pipeline (`BatchIterator`) is deterministic and host-sharded: in epoch e the global order
is a permutation of the split's N records seeded by (seed, e); global batch k is
order[k*G:(k+1)*G]; process p of P decodes only order[k*G + p*b : k*G + (p+1)*b] with
b = G / P, reading those records by offset. So 1 process x 4 devices and 2 processes x
2 devices see the same global batches, and a resumed iterator continues exactly where the
saved one would have.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Iterator

import numpy as np

from primus_jax.data.reader import BATCH_FIELDS, SplitReader, stack_records
from primus_jax.data.schema import CHANNELS, DataError

log = logging.getLogger(__name__)


class _Failure:
    """An exception raised in the prefetch thread, carried to __next__."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class BatchIterator:
    """Deterministic, host-sharded, prefetching batches of one split.

    Each `next()` returns this process's LOCAL batch of b = global_batch_size / process_count
    records: {"imu": (b, T, 6) f32, "text_emb": (b, Dt) f32 (zeros where no text),
    "has_text": (b,) bool, "video_emb": (b, Dv) f32, "has_video": (b,) bool,
    "label": (b,) int32}. Epoch e's global order is a permutation of the N records drawn from
    numpy's default_rng([seed, e]) (identity with shuffle=False); global batch k is
    order[k*G:(k+1)*G] and this process takes the slice [p*b:(p+1)*b] of it, so the
    concatenation of all processes' local batches is the global batch. With
    drop_remainder=False the last global batch of an epoch is short, and so are (some)
    local slices of it.

    A background thread prepares up to `prefetch` batches ahead (0: no thread); its errors
    re-raise in `next()`. `get_state()` is the position of the next batch to be returned,
    so `set_state(get_state())` on a fresh iterator continues exactly as this one would.

    A corrupt record (bad CRC, truncation, wrong feature type or length, NaN/inf) raises
    DataError naming file, record and problem. With skip_corrupt=True it is logged and
    counted in `stats["skipped_records"]`, and its slot is filled with the next valid record
    in this process's order of the epoch (wrapping round), which is deterministic; that
    record then appears twice in the epoch.
    """

    def __init__(self, dataset_dir, split: str, global_batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, process_index: int | None = None,
                 process_count: int | None = None, num_epochs: int | None = None,
                 drop_remainder: bool = True, prefetch: int = 2, skip_corrupt: bool = False):
        if process_index is None or process_count is None:
            import jax  # deferred: data_prep tools import this module without needing jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        self._reader = SplitReader(dataset_dir, split)
        where = f"BatchIterator({self._reader.dataset_dir}, split '{split}')"
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(f"{where}: global_batch_size {global_batch_size} must be a positive "
                             f"multiple of process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"{where}: process_index {process_index} is outside "
                             f"[0, {process_count})")
        num_records = self._reader.num_records
        if num_records == 0 or (drop_remainder and num_records < global_batch_size):
            raise ValueError(f"{where}: {num_records} records are fewer than one global batch "
                             f"of {global_batch_size}")
        self.split = split
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.num_epochs, self.drop_remainder = num_epochs, drop_remainder
        self.prefetch, self.skip_corrupt = int(prefetch), skip_corrupt
        self._epoch, self._batch = 0, 0
        self._stats = {"records_read": 0, "skipped_records": 0}
        self._corrupt: dict[int, str] = {}  # global record index -> error message
        self._orders: dict[int, np.ndarray] = {}  # only the current epoch is kept
        self._source: Iterator | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch: floor(N / G), or ceil(N / G) without drop_remainder."""
        n, g = self._reader.num_records, self.global_batch_size
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
        self._stop_source()
        self._epoch, self._batch = epoch, batch

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict:
        if self._source is None:
            self._start_source()
        item = next(self._source)
        if isinstance(item, _Failure):
            self._stop_source()
            raise item.error
        if item is _END:
            self._stop_source()
            raise StopIteration
        (self._epoch, self._batch), batch, delta = item
        for key, value in delta.items():
            self._stats[key] += value
        return batch

    def close(self) -> None:
        """Stops the prefetch thread and closes the shard files."""
        self._stop_source()
        self._reader.close()

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- producer side -------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = self._reader.num_records
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            self._orders = {epoch: order}
        return self._orders[epoch]

    def _local_positions(self, step: int) -> np.ndarray:
        """Positions in the epoch order that this process reads for global batch `step`."""
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        stop = min(start + self.local_batch_size, self._reader.num_records,
                   (step + 1) * self.global_batch_size)
        return np.arange(start, max(start, stop))

    def _decode_valid(self, record: int) -> dict | None:
        """The decoded record, or None if it is corrupt and skip_corrupt is on."""
        if record in self._corrupt:
            return None
        try:
            return self._reader.decode(record)
        except DataError as error:
            if not self.skip_corrupt:
                raise
            log.warning("skipping corrupt record: %s", error)
            self._corrupt[record] = str(error)
            return None

    def _replacement(self, epoch: int, step: int, slot: int) -> dict:
        """The next valid record after (step, slot) in this process's order of the epoch."""
        order = self._epoch_order(epoch)
        positions = np.concatenate([self._local_positions(s) for s in range(self.steps_per_epoch)])
        here = step * self.local_batch_size + slot
        for offset in range(1, len(positions)):
            record = self._decode_valid(int(order[positions[(here + offset) % len(positions)]]))
            if record is not None:
                return record
        raise DataError(f"{self._reader.dataset_dir}: split '{self.split}': every record this "
                        f"process reads in epoch {epoch} is corrupt")

    def _batches(self, epoch: int, step: int) -> Iterator:
        """Yields ((epoch, step) after the batch, batch, stats delta) from a position on."""
        while self.num_epochs is None or epoch < self.num_epochs:
            if step >= self.steps_per_epoch:
                epoch, step = epoch + 1, 0
                continue
            order = self._epoch_order(epoch)
            records, skipped = [], 0
            for slot, position in enumerate(self._local_positions(step)):
                record = self._decode_valid(int(order[position]))
                if record is None:
                    skipped += 1
                    record = self._replacement(epoch, step, slot)
                records.append(record)
            batch = stack_records(records, BATCH_FIELDS) if records else self._empty_batch()
            step += 1
            yield (epoch, step), batch, {"records_read": len(records), "skipped_records": skipped}
        yield _END

    def _empty_batch(self) -> dict:
        manifest = self._reader.manifest
        shapes = {"imu": (0, manifest["T"], CHANNELS), "text_emb": (0, manifest["text_dim"]),
                  "video_emb": (0, manifest["video_dim"])}
        return {name: np.zeros(shapes.get(name, (0,)), dtype)
                for name, dtype in BATCH_FIELDS.items()}

    def _start_source(self) -> None:
        batches = self._batches(self._epoch, self._batch)
        if self.prefetch <= 0:
            self._source = self._guarded(batches)
            return
        self._stop = threading.Event()
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(batches, ready, self._stop),
                                        name="BatchIterator-prefetch", daemon=True)
        self._thread.start()
        self._source = iter(ready.get, None)

    @staticmethod
    def _guarded(batches: Iterator) -> Iterator:
        try:
            yield from batches
        except Exception as error:  # noqa: BLE001 - handed to __next__, which re-raises it
            yield _Failure(error)

    @staticmethod
    def _produce(batches: Iterator, ready: queue.Queue, stop: threading.Event) -> None:
        for item in BatchIterator._guarded(batches):
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if stop.is_set() or item is _END or isinstance(item, _Failure):
                return

    def _stop_source(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._source = None
