"""Reading a split's records by global index, and whole splits into memory for evaluation."""

from __future__ import annotations

import bisect

import numpy as np

from primus_jax import paths
from primus_jax.data.example_codec import ExampleDecoder
from primus_jax.data.manifest import MANIFEST_NAME, read_manifest
from primus_jax.data.schema import CHANNELS, DataError
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
        self._starts = [0]
        for entry in shards:
            self._starts.append(self._starts[-1] + entry["records"])
        self.num_records = self._starts[-1]
        self._indexes: dict[int, TFRecordIndex] = {}
        self.decoder = ExampleDecoder.for_shape(self.manifest["T"], self.manifest["text_dim"],
                                                 self.manifest["video_dim"])

    def _raw(self, record: int) -> tuple[memoryview, int, int]:
        """(record bytes, shard, index in the shard) of the record at global index `record`."""
        shard = bisect.bisect_right(self._starts, record) - 1
        if shard not in self._indexes:
            self._indexes[shard] = TFRecordIndex(self.files[shard])
        local = record - self._starts[shard]
        return self._indexes[shard].read_view(local), shard, local

    def decode(self, record: int) -> dict:
        """The decoded record at global index `record`; DataError naming file and index."""
        raw, shard, local = self._raw(record)
        return self.decoder.decode(raw, f"{self.files[shard]}: record {local}")

    def training_fields(self, record: int) -> tuple:
        """ExampleDecoder.training_fields of the record; on its fast path NaN/inf in the floats
        is left to the caller's check over the assembled batch."""
        raw, shard, local = self._raw(record)
        fields = self.decoder.training_fields(raw)
        if fields is None:
            where = f"{self.files[shard]}: record {local}"
            fields = self.decoder.training_fields_of(self.decoder.decode(raw, where))
        return fields

    def assemble_batch(self, rows: list[tuple]) -> dict:
        """BATCH_FIELDS arrays of n records from their `training_fields` rows."""
        n, manifest = len(rows), self.manifest
        imu, text_emb, video_emb, has_text, has_video, label = zip(*rows) if rows else [()] * 6

        def floats(parts, shape):
            # a bytearray is writable, so the array needs no second copy
            return np.frombuffer(bytearray().join(parts), "<f4").reshape(n, *shape)

        return {"imu": floats(imu, (manifest["T"], CHANNELS)),
                "text_emb": floats(text_emb, (manifest["text_dim"],)),
                "has_text": np.array(has_text, bool).reshape(n),
                "video_emb": floats(video_emb, (manifest["video_dim"],)),
                "has_video": np.array(has_video, bool).reshape(n),
                "label": np.array(label, np.int32).reshape(n)}

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
