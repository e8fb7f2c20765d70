"""Reading a split's records by global index, and whole splits into memory for evaluation."""

from __future__ import annotations

import numpy as np

from primus_jax import paths
from primus_jax.data.example_codec import decode_example
from primus_jax.data.manifest import MANIFEST_NAME, read_manifest
from primus_jax.data.schema import DataError
from primus_jax.data.tfrecord import TFRecordIndex


class SplitReader:
    """Decodes records of one split by global index (shards concatenated in manifest order)."""

    def __init__(self, dataset_dir, split: str):
        self.dataset_dir = paths.resolve(dataset_dir)
        self.manifest = read_manifest(self.dataset_dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{self.dataset_dir / MANIFEST_NAME}: no split "
                            f"'{split}' (splits: {sorted(splits)})")
        shards = splits[split]["shards"]
        self.files = [str(self.dataset_dir / entry["file"]) for entry in shards]
        self.starts = np.cumsum([0] + [entry["records"] for entry in shards])
        self.num_records = int(self.starts[-1])
        self._indexes: dict[int, TFRecordIndex] = {}

    def decode(self, record: int) -> dict:
        """The decoded record at global index `record`; DataError naming file and index."""
        shard = int(np.searchsorted(self.starts, record, side="right")) - 1
        if shard not in self._indexes:
            self._indexes[shard] = TFRecordIndex(self.files[shard])
        local = record - int(self.starts[shard])
        raw = self._indexes[shard].read(local)
        manifest = self.manifest
        return decode_example(raw, T=manifest["T"], text_dim=manifest["text_dim"],
                              video_dim=manifest["video_dim"],
                              where=f"{self.files[shard]}: record {local}")

    def close(self) -> None:
        for index in self._indexes.values():
            index.close()
        self._indexes.clear()


BATCH_FIELDS = {"imu": np.float32, "text_emb": np.float32, "has_text": bool,
                 "video_emb": np.float32, "has_video": bool, "label": np.int32}


def stack_records(records: list[dict], fields: dict) -> dict:
    """Stacks the named fields of decoded records into (n, ...) arrays of the given dtypes."""
    return {name: np.stack([np.asarray(r[name], dtype) for r in records])
            for name, dtype in fields.items()}


def load_split(dataset_dir, split: str) -> dict:
    """The whole split in memory, in record order, for evaluation.

    Returns imu (N, T, 6) f32, text_emb (N, Dt) f32, has_text (N,) bool, video_emb (N, Dv)
    f32, has_video (N,) bool, label (N,) int32, start_s, end_s (N,) f32; text, recording_id,
    subject, source as lists of N str; and class_names from the manifest.
    """
    reader = SplitReader(dataset_dir, split)
    try:
        records = [reader.decode(i) for i in range(reader.num_records)]
    finally:
        reader.close()
    manifest = reader.manifest
    if not records:
        raise DataError(f"{dataset_dir}: split '{split}' has no records")
    result = stack_records(records, {**BATCH_FIELDS, "start_s": np.float32, "end_s": np.float32})
    for name in ("text", "recording_id", "subject", "source"):
        result[name] = [r[name] for r in records]
    result["class_names"] = list(manifest["class_names"])
    return result
