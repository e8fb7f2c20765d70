"""IMU-window datasets: TFRecord schema, writer, random-access reader and input pipeline.

A dataset is a folder of TFRecord shards plus ``manifest.json``::

    <dir>/manifest.json
    <dir>/<split>-<k:05d>.tfrecord      one tf.train.Example per IMU window

Every record holds one window (SCHEMA_VERSION 1):

    imu           float_list  T*6 values, the (T, 6) window row-major, SI units
                              (acc x,y,z in m/s^2, then gyro x,y,z in rad/s)
    imu_shape     int64_list  [T, 6]
    rate_hz       float_list  [rate]
    text          bytes_list  [utf-8 narration, may be empty]
    text_emb      float_list  Dt values, or none
    has_text      int64_list  [1 if text_emb is present else 0]
    video_emb     float_list  Dv values, or none
    has_video     int64_list  [1 if video_emb is present else 0]
    label         int64_list  [class index, -1 = unlabelled]
    source, recording_id, subject   bytes_list  [utf-8]
    start_s, end_s                  float_list  [seconds in the recording]

TFRecord framing of one record (little-endian)::

    uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
    masked_crc(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8   (mod 2^32)

No TensorFlow is needed to write or read; tf.data reads the shards all the same.

The pipeline (`BatchIterator`) is deterministic and host-sharded: in epoch e the global order
is a permutation of the split's N records seeded by (seed, e); global batch k is
order[k*G:(k+1)*G]; process p of P decodes only order[k*G + p*b : k*G + (p+1)*b] with
b = G / P, reading those records by offset. So 1 process x 4 devices and 2 processes x
2 devices see the same global batches, and a resumed iterator continues exactly where the
saved one would have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import re
import struct
import threading
from typing import BinaryIO, Iterator

import crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

SCHEMA_VERSION = 1
CHANNELS = 6
MANIFEST_NAME = "manifest.json"

_CRC_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked crc of length
_FOOTER = struct.Struct("<I")  # masked crc of data
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_MANIFEST_KEYS = ("schema_version", "T", "rate_hz", "channels", "text_dim", "video_dim",
                  "towers", "class_names", "splits")

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad dataset content; the message names the file, the record index and the field."""


@dataclasses.dataclass
class Window:
    """One IMU window and what is known about it.

    imu: (T, 6) float32, acc x,y,z [m/s^2] then gyro x,y,z [rad/s].
    text_emb: (Dt,) frozen text-tower embedding of `text`, or None.
    video_emb: (Dv,) frozen video-tower embedding of the window's video, or None.
    label: class index into the manifest's class_names, -1 when unlabelled.
    start_s, end_s: where the window lies in its recording, in seconds.
    """

    imu: np.ndarray
    rate_hz: float
    text: str = ""
    text_emb: np.ndarray | None = None
    video_emb: np.ndarray | None = None
    label: int = -1
    source: str = ""
    recording_id: str = ""
    subject: str = ""
    start_s: float = 0.0
    end_s: float = 0.0


# --------------------------------------------------------------------------- framing

def _masked_crc(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """Wraps one serialized record in TFRecord framing (length, its CRC, data, data CRC)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + _FOOTER.pack(_masked_crc(data))


class TFRecordIndex:
    """Random access to the records of one TFRecord file.

    The constructor scans the framing once (12-byte headers only, verifying each length CRC)
    and keeps every record's data offset and length; `read(i)` then fetches record i with
    one positioned read and verifies its data CRC. A truncated tail or a bad length CRC ends
    the scan: the records before it stay readable and reading from there on raises DataError.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        offsets, lengths = [], []
        self._scan_problem = None
        size = os.fstat(self._fd).st_size
        position = 0
        while position < size:
            header = os.pread(self._fd, _HEADER.size, position)
            if len(header) < _HEADER.size:
                self._scan_problem = (f"file is truncated inside the record header at byte "
                                      f"{position} (file has {size} bytes)")
                break
            length, length_crc = _HEADER.unpack(header)
            if _masked_crc(header[:8]) != length_crc:
                self._scan_problem = f"length CRC mismatch in the record header at byte {position}"
                break
            end = position + _HEADER.size + length + _FOOTER.size
            if end > size:
                self._scan_problem = (f"file is truncated: the record needs bytes up to {end}, "
                                      f"the file has {size}")
                break
            offsets.append(position + _HEADER.size)
            lengths.append(length)
            position = end
        self._offsets = offsets
        self._lengths = lengths

    def __len__(self) -> int:
        """Number of intact records found by the scan."""
        return len(self._offsets)

    def read(self, index: int) -> bytes:
        """The data of record `index`; DataError if it is missing, truncated or fails its CRC."""
        where = f"{self.path}: record {index}"
        if index >= len(self._offsets):
            problem = self._scan_problem or (
                f"the file holds only {len(self._offsets)} records")
            if self._scan_problem and index > len(self._offsets):
                problem += f" (at record {len(self._offsets)})"
            raise DataError(f"{where}: {problem}")
        length = self._lengths[index]
        blob = os.pread(self._fd, length + _FOOTER.size, self._offsets[index])
        data, (stored_crc,) = blob[:length], _FOOTER.unpack(blob[length:])
        if _masked_crc(data) != stored_crc:
            raise DataError(f"{where}: data CRC mismatch (the record is corrupt)")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "TFRecordIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- examples

def _example_message_class():
    """The tf.train.Example message class, built in a private descriptor pool.

    tf.train.Example is: Example{Features features = 1}; Features{map<string, Feature>
    feature = 1}; Feature{oneof kind {BytesList bytes_list = 1; FloatList float_list = 2;
    Int64List int64_list = 3}}; each *List{repeated value = 1} (packed). Registering it in
    protobuf's default pool, as the `tfrecord` package does, clashes with TensorFlow's own
    registration ("duplicate symbol 'tensorflow.BytesList'"), so TensorFlow could not be
    imported next to us; a private pool keeps the two apart.
    """
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="primus_jax/tf_example.proto", package="tensorflow", syntax="proto3")

    def message(name, fields, parent=proto):
        declared = (parent.message_type if parent is proto else parent.nested_type).add(name=name)
        for number, (field_name, field_type, label, type_name) in enumerate(fields, 1):
            added = declared.field.add(name=field_name, number=number, type=field_type,
                                       label=label)
            if type_name:
                added.type_name = type_name
        return declared

    for name, value_type in (("BytesList", field.TYPE_BYTES), ("FloatList", field.TYPE_FLOAT),
                             ("Int64List", field.TYPE_INT64)):
        message(name, [("value", value_type, field.LABEL_REPEATED, "")])
    feature = message("Feature", [
        (kind, field.TYPE_MESSAGE, field.LABEL_OPTIONAL, f".tensorflow.{type_name}")
        for kind, type_name in (("bytes_list", "BytesList"), ("float_list", "FloatList"),
                                ("int64_list", "Int64List"))])
    feature.oneof_decl.add(name="kind")
    for declared in feature.field:
        declared.oneof_index = 0
    features = message("Features", [("feature", field.TYPE_MESSAGE, field.LABEL_REPEATED,
                                     ".tensorflow.Features.FeatureEntry")])
    entry = message("FeatureEntry", [
        ("key", field.TYPE_STRING, field.LABEL_OPTIONAL, ""),
        ("value", field.TYPE_MESSAGE, field.LABEL_OPTIONAL, ".tensorflow.Feature")], features)
    entry.options.map_entry = True
    message("Example", [("features", field.TYPE_MESSAGE, field.LABEL_OPTIONAL,
                         ".tensorflow.Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _example_message_class()


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_example(window: Window) -> bytes:
    """Serializes a Window as a tf.train.Example (see the module docstring for the schema)."""
    imu = np.asarray(window.imu, dtype=np.float32)
    if imu.ndim != 2 or imu.shape[1] != CHANNELS:
        raise ValueError(f"Window.imu has shape {imu.shape}, expected (T, {CHANNELS})")
    example = Example()
    feature = example.features.feature

    def floats(name, values):
        # Parsing the packed little-endian bytes is ~40x faster than extend() on floats.
        packed = np.asarray(values, dtype="<f4").tobytes()
        feature[name].float_list.SetInParent()
        if packed:
            feature[name].float_list.MergeFromString(
                b"\x0a" + _varint(len(packed)) + packed)  # field 1, wire type 2 (packed)

    def ints(name, values):
        feature[name].int64_list.value.extend(int(v) for v in values)

    def text(name, value):
        feature[name].bytes_list.value.append(value.encode("utf-8"))

    floats("imu", imu)
    ints("imu_shape", imu.shape)
    floats("rate_hz", [window.rate_hz])
    text("text", window.text)
    floats("text_emb", [] if window.text_emb is None else window.text_emb)
    ints("has_text", [window.text_emb is not None])
    floats("video_emb", [] if window.video_emb is None else window.video_emb)
    ints("has_video", [window.video_emb is not None])
    ints("label", [window.label])
    text("source", window.source)
    text("recording_id", window.recording_id)
    text("subject", window.subject)
    floats("start_s", [window.start_s])
    floats("end_s", [window.end_s])
    return example.SerializeToString()


def decode_example(raw: bytes, *, T: int, text_dim: int, video_dim: int, where: str = "") -> dict:
    """Parses and validates one serialized window.

    Returns numpy fields: imu (T, 6) float32; text_emb (text_dim,) and video_emb (video_dim,)
    float32, zeros where absent; has_text, has_video bool; label int; rate_hz, start_s, end_s
    float; text, source, recording_id, subject str. Raises DataError "<where>: field '<name>'
    <problem>" for a missing field, a wrong feature type or length, or a non-finite value.
    """
    prefix = f"{where}: " if where else ""
    try:
        feature = Example.FromString(raw).features.feature
    except DecodeError as error:
        raise DataError(f"{prefix}not a tf.train.Example ({error})") from None

    def values(name, kind, count=None):
        found_feature = feature.get(name)
        if found_feature is None:
            raise DataError(f"{prefix}field '{name}' is missing")
        found = found_feature.WhichOneof("kind")
        if found is None and count == 0:  # an empty Feature is a valid empty list
            return []
        if found != kind:
            raise DataError(f"{prefix}field '{name}' is a {found}, expected a {kind}")
        vals = getattr(found_feature, kind).value
        if count is not None and len(vals) != count:
            raise DataError(f"{prefix}field '{name}' has {len(vals)} values, expected {count}")
        return vals

    def vector(name, count):
        array = np.array(values(name, "float_list", count), dtype=np.float32)
        if not np.isfinite(array).all():
            raise DataError(f"{prefix}field '{name}' holds NaN or infinite values")
        return array

    def real(name):
        value = values(name, "float_list", 1)[0]
        if not math.isfinite(value):
            raise DataError(f"{prefix}field '{name}' is {value}, expected a finite number")
        return value

    def flag(name):
        value = values(name, "int64_list", 1)[0]
        if value not in (0, 1):
            raise DataError(f"{prefix}field '{name}' is {value}, expected 0 or 1")
        return bool(value)

    def text(name):
        try:
            return values(name, "bytes_list", 1)[0].decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{prefix}field '{name}' is not valid utf-8") from None

    def embedding(name, has, dim):
        if not has:
            values(name, "float_list", 0)
            return np.zeros((dim,), np.float32)
        return vector(name, dim)

    shape = list(values("imu_shape", "int64_list"))
    if shape != [T, CHANNELS]:
        raise DataError(f"{prefix}field 'imu_shape' is {shape}, expected [{T}, {CHANNELS}]")
    rate_hz = real("rate_hz")
    if rate_hz <= 0:
        raise DataError(f"{prefix}field 'rate_hz' is {rate_hz}, expected a positive rate")
    label = values("label", "int64_list", 1)[0]
    if label < -1:
        raise DataError(f"{prefix}field 'label' is {label}, expected -1 (none) or a class index")
    has_text, has_video = flag("has_text"), flag("has_video")
    return {
        "imu": vector("imu", T * CHANNELS).reshape(T, CHANNELS),
        "rate_hz": rate_hz,
        "text": text("text"),
        "text_emb": embedding("text_emb", has_text, text_dim),
        "has_text": has_text,
        "video_emb": embedding("video_emb", has_video, video_dim),
        "has_video": has_video,
        "label": label,
        "source": text("source"),
        "recording_id": text("recording_id"),
        "subject": text("subject"),
        "start_s": real("start_s"),
        "end_s": real("end_s"),
    }


# --------------------------------------------------------------------------- writer

def _write_json_atomically(path: str, content: dict) -> None:
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=2)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


@dataclasses.dataclass
class _OpenShard:
    file: BinaryIO
    temporary_path: str
    records: int = 0


class DatasetWriter:
    """Streams Windows into TFRecord shards and writes manifest.json on close.

    Use as a context manager. Each split keeps one open shard; a full shard is closed under a
    hidden temporary name. `close()` (a clean exit of the `with` block) renames every shard to
    `<split>-<k:05d>.tfrecord` and then writes the manifest atomically. An exception inside
    the block deletes the temporary files and leaves the folder as it was, so a half-written
    shard never appears under its final name. With overwrite=True the previous dataset in
    out_dir stays intact until close(), which replaces it and deletes its stale shards.
    """

    def __init__(self, out_dir, *, T: int, rate_hz: float, text_dim: int, video_dim: int,
                 towers: dict | None = None, class_names: list[str] | None = None,
                 records_per_shard: int = 4096, overwrite: bool = False,
                 extra: dict | None = None):
        self.out_dir = os.fspath(out_dir)
        manifest_path = os.path.join(self.out_dir, MANIFEST_NAME)
        if os.path.exists(manifest_path) and not overwrite:
            raise FileExistsError(f"{manifest_path}: a dataset already exists here; "
                                  f"pass overwrite=True to replace it")
        if T <= 0 or rate_hz <= 0 or text_dim < 0 or video_dim < 0 or records_per_shard <= 0:
            raise ValueError(f"DatasetWriter({self.out_dir}): T={T}, rate_hz={rate_hz} and "
                             f"records_per_shard={records_per_shard} must be positive, "
                             f"text_dim={text_dim} and video_dim={video_dim} non-negative")
        clashes = sorted(set(extra or {}) & set(_MANIFEST_KEYS))
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
        self._open: dict[str, _OpenShard] = {}
        self._finished: dict[str, list[tuple[str, int]]] = {}  # split -> [(temp path, records)]
        self._manifest = None
        os.makedirs(self.out_dir, exist_ok=True)

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
        if split not in self._open:
            shard = len(self._finished.setdefault(split, []))
            temporary = os.path.join(self.out_dir, f".{split}-{shard:05d}.tfrecord.partial")
            self._open[split] = _OpenShard(open(temporary, "wb"), temporary)
        shard = self._open[split]
        shard.file.write(frame_record(encode_example(window)))
        shard.records += 1
        if shard.records == self.records_per_shard:
            self._finish_shard(split)

    def _finish_shard(self, split: str) -> None:
        shard = self._open.pop(split)
        shard.file.flush()
        os.fsync(shard.file.fileno())
        shard.file.close()
        self._finished[split].append((shard.temporary_path, shard.records))

    def close(self) -> dict:
        """Publishes the shards and manifest.json; returns the manifest."""
        if self._manifest is not None:
            return self._manifest
        for split in list(self._open):
            self._finish_shard(split)
        manifest_path = os.path.join(self.out_dir, MANIFEST_NAME)
        previous = {}
        if os.path.exists(manifest_path):
            try:
                previous = _read_json(manifest_path)
            except DataError:
                log.warning("replacing unreadable %s; its shards are left in place", manifest_path)
            os.remove(manifest_path)  # no manifest at all beats one naming replaced shards
        splits = {}
        for split, shards in sorted(self._finished.items()):
            entries = []
            for shard, (temporary, records) in enumerate(shards):
                name = f"{split}-{shard:05d}.tfrecord"
                os.replace(temporary, os.path.join(self.out_dir, name))
                entries.append({"file": name, "records": records})
            splits[split] = {"records": sum(e["records"] for e in entries), "shards": entries}
        manifest = {**self._header, "splits": splits, **self._extra}
        _write_json_atomically(manifest_path, manifest)
        kept = {e["file"] for info in splits.values() for e in info["shards"]}
        for info in (previous.get("splits") or {}).values():
            for entry in info.get("shards", []):
                stale = os.path.join(self.out_dir, str(entry.get("file")))
                if entry.get("file") not in kept and os.path.isfile(stale):
                    os.remove(stale)
        self._manifest = manifest
        return manifest

    def abort(self) -> None:
        """Deletes every temporary shard and writes nothing (no-op after close)."""
        if self._manifest is not None:
            return
        for shard in self._open.values():
            shard.file.close()
            os.remove(shard.temporary_path)
        self._open.clear()
        for shards in self._finished.values():
            for temporary, _ in shards:
                os.remove(temporary)
        self._finished.clear()


# --------------------------------------------------------------------------- manifest

def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a JSON object")
    return content


def read_manifest(dataset_dir) -> dict:
    """Loads and checks `<dataset_dir>/manifest.json`; DataError if missing or invalid."""
    path = os.path.join(os.fspath(dataset_dir), MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no manifest found; is this a dataset written by "
                        f"primus_jax.data.DatasetWriter?")
    manifest = _read_json(path)
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise DataError(f"{path}: key 'schema_version' is {manifest['schema_version']!r}; "
                        f"this primus_jax reads schema version {SCHEMA_VERSION}")
    if manifest["channels"] != CHANNELS:
        raise DataError(f"{path}: key 'channels' is {manifest['channels']!r}, expected {CHANNELS}")
    for key in ("T", "text_dim", "video_dim"):
        if not isinstance(manifest[key], int) or manifest[key] < (1 if key == "T" else 0):
            raise DataError(f"{path}: key '{key}' is {manifest[key]!r}, expected an integer")
    if not isinstance(manifest["splits"], dict):
        raise DataError(f"{path}: key 'splits' must be an object")
    for split, info in manifest["splits"].items():
        try:
            counts = [int(entry["records"]) for entry in info["shards"]]
            files_ok = all(isinstance(entry["file"], str) for entry in info["shards"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: split '{split}' needs 'records' and a 'shards' list of "
                            f"{{'file', 'records'}}") from None
        if not files_ok or sum(counts) != info.get("records"):
            raise DataError(f"{path}: split '{split}': 'records' is {info.get('records')!r} "
                            f"but its shards hold {sum(counts)}")
    return manifest


class _SplitReader:
    """Decodes records of one split by global index (shards concatenated in manifest order)."""

    def __init__(self, dataset_dir, split: str):
        self.dataset_dir = os.fspath(dataset_dir)
        self.manifest = read_manifest(self.dataset_dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{os.path.join(self.dataset_dir, MANIFEST_NAME)}: no split "
                            f"'{split}' (splits: {sorted(splits)})")
        shards = splits[split]["shards"]
        self.files = [os.path.join(self.dataset_dir, entry["file"]) for entry in shards]
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


_BATCH_FIELDS = {"imu": np.float32, "text_emb": np.float32, "has_text": bool,
                 "video_emb": np.float32, "has_video": bool, "label": np.int32}


def _stack(records: list[dict], fields: dict) -> dict:
    """Stacks the named fields of decoded records into (n, ...) arrays of the given dtypes."""
    return {name: np.stack([np.asarray(r[name], dtype) for r in records])
            for name, dtype in fields.items()}


def load_split(dataset_dir, split: str) -> dict:
    """The whole split in memory, in record order, for evaluation.

    Returns imu (N, T, 6) f32, text_emb (N, Dt) f32, has_text (N,) bool, video_emb (N, Dv)
    f32, has_video (N,) bool, label (N,) int32, start_s, end_s (N,) f32; text, recording_id,
    subject, source as lists of N str; and class_names from the manifest.
    """
    reader = _SplitReader(dataset_dir, split)
    try:
        records = [reader.decode(i) for i in range(reader.num_records)]
    finally:
        reader.close()
    manifest = reader.manifest
    if not records:
        raise DataError(f"{dataset_dir}: split '{split}' has no records")
    result = _stack(records, {**_BATCH_FIELDS, "start_s": np.float32, "end_s": np.float32})
    for name in ("text", "recording_id", "subject", "source"):
        result[name] = [r[name] for r in records]
    result["class_names"] = list(manifest["class_names"])
    return result


# --------------------------------------------------------------------------- pipeline

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
        self._reader = _SplitReader(dataset_dir, split)
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
            batch = _stack(records, _BATCH_FIELDS) if records else self._empty_batch()
            step += 1
            yield (epoch, step), batch, {"records_read": len(records), "skipped_records": skipped}
        yield _END

    def _empty_batch(self) -> dict:
        manifest = self._reader.manifest
        shapes = {"imu": (0, manifest["T"], CHANNELS), "text_emb": (0, manifest["text_dim"]),
                  "video_emb": (0, manifest["video_dim"])}
        return {name: np.zeros(shapes.get(name, (0,)), dtype)
                for name, dtype in _BATCH_FIELDS.items()}

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
