"""DatasetWriter: streams Windows into TFRecord shards and publishes manifest.json (and the
TFDS metadata derived from it)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from typing import BinaryIO

import numpy as np
from etils import epath

from primus_jax import paths
from primus_jax.data.example_codec import encode_example
from primus_jax.data.manifest import MANIFEST_KEYS, MANIFEST_NAME, publish_manifest, read_json
from primus_jax.data.schema import CHANNELS, SCHEMA_VERSION, DataError, Window
from primus_jax.data.tfds_metadata import check_class_names, remove_tfds_files, shard_file_name
from primus_jax.data.tfrecord import frame_record

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _OpenShard:
    file: BinaryIO
    temporary_path: epath.Path
    records: int = 0


class DatasetWriter:
    """Streams Windows into TFRecord shards and writes manifest.json on close.

    Use as a context manager. Each split keeps one open shard; a full shard is closed under a
    hidden temporary name. `close()` (a clean exit of the `with` block) renames every shard to
    its TFDS name (`tfds_metadata.shard_file_name`), writes the TFDS metadata and then the
    manifest, each atomically (`manifest.publish_manifest`). An exception inside
    the block deletes the temporary files and leaves the folder as it was, so a half-written
    shard never appears under its final name. With overwrite=True the previous dataset in
    out_dir stays intact until close(), which replaces it and deletes its stale shards.

    out_dir may be local or gs://bucket/path (`primus_jax.paths`); on GCS a shard is uploaded
    when it is closed, and publishing it is a server-side copy (`paths.move`).
    """

    def __init__(self, out_dir, *, T: int, rate_hz: float, text_dim: int, video_dim: int,
                 towers: dict | None = None, class_names: list[str] | None = None,
                 records_per_shard: int = 4096, overwrite: bool = False,
                 extra: dict | None = None):
        self.out_dir = paths.resolve(out_dir)
        manifest_path = self.out_dir / MANIFEST_NAME
        if manifest_path.exists() and not overwrite:
            raise FileExistsError(f"{manifest_path}: a dataset already exists here; "
                                  f"pass overwrite=True to replace it")
        if T <= 0 or rate_hz <= 0 or text_dim < 0 or video_dim < 0 or records_per_shard <= 0:
            raise ValueError(f"DatasetWriter({self.out_dir}): T={T}, rate_hz={rate_hz} and "
                             f"records_per_shard={records_per_shard} must be positive, "
                             f"text_dim={text_dim} and video_dim={video_dim} non-negative")
        clashes = sorted(set(extra or {}) & set(MANIFEST_KEYS))
        if clashes:
            raise ValueError(f"DatasetWriter({self.out_dir}): extra keys {clashes} clash with "
                             f"manifest fields")
        self.T, self.rate_hz = int(T), float(rate_hz)
        self.text_dim, self.video_dim = int(text_dim), int(video_dim)
        self.records_per_shard = int(records_per_shard)
        self._header = {
            "schema_version": SCHEMA_VERSION, "T": self.T, "rate_hz": self.rate_hz,
            "channels": CHANNELS, "text_dim": self.text_dim, "video_dim": self.video_dim,
            "towers": dict(towers or {}), "class_names": list(class_names or []),
        }
        self._extra = dict(extra or {})
        try:
            json.dumps({**self._header, **self._extra})
        except (TypeError, ValueError) as error:
            raise ValueError(f"DatasetWriter({self.out_dir}): towers, class_names and extra "
                             f"must be JSON-serialisable ({error})") from None
        try:  # TFDS keeps the class names one a line: found out before any work, not at close
            check_class_names(self._header["class_names"])
        except DataError as error:
            raise ValueError(f"DatasetWriter({self.out_dir}): {error}") from None
        self._open: dict[str, _OpenShard] = {}
        self._finished: dict[str, list[tuple[str, int]]] = {}  # split -> [(temp path, records)]
        self._manifest = None
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _check(self, split: str, window: Window) -> None:
        where = (f"{self.out_dir}: split '{split}' window of recording "
                 f"'{window.recording_id}' at {window.start_s} s")
        if not _SPLIT_NAME.match(split):
            raise ValueError(f"{self.out_dir}: split name {split!r} must be letters, digits, '_'")
        imu = np.asarray(window.imu)
        if imu.shape != (self.T, CHANNELS):
            raise ValueError(f"{where}: field 'imu' has shape {imu.shape}, "
                             f"expected ({self.T}, {CHANNELS})")
        if not np.isfinite(imu).all():
            raise ValueError(f"{where}: field 'imu' holds NaN or infinite values")
        if not math.isclose(window.rate_hz, self.rate_hz, rel_tol=1e-6):
            raise ValueError(f"{where}: field 'rate_hz' is {window.rate_hz}, the dataset's "
                             f"rate is {self.rate_hz}")
        for name, dim in (("text_emb", self.text_dim), ("video_emb", self.video_dim)):
            vector = getattr(window, name)
            if vector is None:
                continue
            vector = np.asarray(vector)
            if vector.shape != (dim,) or dim == 0:
                raise ValueError(f"{where}: field '{name}' has shape {vector.shape}, "
                                 f"expected ({dim},)")
            if not np.isfinite(vector).all():
                raise ValueError(f"{where}: field '{name}' holds NaN or infinite values")
        num_classes = len(self._header["class_names"])
        if window.label < -1 or (num_classes and window.label >= num_classes):
            raise ValueError(f"{where}: field 'label' is {window.label}, expected -1 or a "
                             f"class index below {num_classes or 'infinity'}")
        if not (math.isfinite(window.start_s) and math.isfinite(window.end_s)):
            raise ValueError(f"{where}: fields 'start_s'/'end_s' must be finite")

    def add(self, split: str, window: Window) -> None:
        """Validates `window` (shape (T, 6), finite, embedding dims, label) and appends it."""
        if self._manifest is not None:
            raise ValueError(f"{self.out_dir}: DatasetWriter.add after close")
        self._check(split, window)
        self._append(split, encode_example(window, text_dim=self.text_dim, video_dim=self.video_dim))

    def add_encoded(self, split: str, example: bytes) -> None:
        """Appends one serialized tf.train.Example as is, e.g. a record copied from a dataset
        written by another DatasetWriter with the same header (data_prep's merge step); its
        window was checked when that writer added it."""
        if self._manifest is not None:
            raise ValueError(f"{self.out_dir}: DatasetWriter.add_encoded after close")
        if not _SPLIT_NAME.match(split):
            raise ValueError(f"{self.out_dir}: split name {split!r} must be letters, digits, '_'")
        self._append(split, example)

    def _append(self, split: str, example: bytes) -> None:
        if split not in self._open:
            shard = len(self._finished.setdefault(split, []))
            temporary = self.out_dir / f".{split}-{shard:05d}.tfrecord.partial"
            self._open[split] = _OpenShard(temporary.open("wb"), temporary)
        shard = self._open[split]
        shard.file.write(frame_record(example))
        shard.records += 1
        if shard.records == self.records_per_shard:
            self._finish_shard(split)

    def _finish_shard(self, split: str) -> None:
        shard = self._open.pop(split)
        paths.flush_durably(shard.file)
        shard.file.close()
        self._finished[split].append((shard.temporary_path, shard.records))

    def close(self) -> dict:
        """Publishes the shards and manifest.json; returns the manifest."""
        if self._manifest is not None:
            return self._manifest
        for split in list(self._open):
            self._finish_shard(split)
        manifest_path = self.out_dir / MANIFEST_NAME
        previous = {}
        if manifest_path.exists():
            try:
                previous = read_json(manifest_path)
            except DataError:
                log.warning("replacing unreadable %s; its shards are left in place", manifest_path)
            manifest_path.unlink()  # no manifest at all beats one naming replaced shards
        remove_tfds_files(self.out_dir)  # nor may TFDS open the folder while shards change
        splits = {}
        for split, shards in sorted(self._finished.items()):
            entries = []
            for shard, (temporary, records) in enumerate(shards):
                name = shard_file_name(split, shard, len(shards))
                paths.move(temporary, self.out_dir / name)
                entries.append({"file": name, "records": records})
            splits[split] = {"records": sum(e["records"] for e in entries), "shards": entries}
        manifest = {**self._header, "splits": splits, **self._extra}
        publish_manifest(self.out_dir, manifest)
        kept = {e["file"] for info in splits.values() for e in info["shards"]}
        for info in (previous.get("splits") or {}).values():
            for entry in info.get("shards", []):
                stale = self.out_dir / str(entry.get("file"))
                if entry.get("file") not in kept and stale.is_file():
                    stale.unlink()
        self._manifest = manifest
        return manifest

    def abort(self) -> None:
        """Deletes every temporary shard and writes nothing (no-op after close)."""
        if self._manifest is not None:
            return
        for shard in self._open.values():
            shard.file.close()
            shard.temporary_path.unlink()
        self._open.clear()
        for shards in self._finished.values():
            for temporary, _ in shards:
                temporary.unlink()
        self._finished.clear()
