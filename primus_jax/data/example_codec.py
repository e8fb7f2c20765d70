"""Encoding and decoding of one window as a tf.train.Example (schema in primus_jax.data.schema).

No TensorFlow is needed to write or read; tf.data reads the shards all the same.

Encoding writes the protobuf wire format directly, in one canonical layout: the map entries in
FIELD_ORDER, each `Features.feature` entry as

    0x0a len | 0x0a len key | 0x12 len Feature,   Feature = <kind tag> len <*List>,
    *List = 0x0a len <packed floats / varints> (floats, int64s) or 0x0a len <bytes> (bytes)

(protobuf's serializer would order map entries by its own hash). Decoding has two paths that
give the same result: `ExampleDecoder` matches a record against one compiled regular
expression of that canonical layout for the dataset's (T, Dt, Dv) and reads the packed floats
straight out of the record bytes with np.frombuffer (~10x faster than going through protobuf's
repeated fields); any record that does not match, or that fails a check, is parsed by
protobuf instead (`_decode_with_protobuf`), which reads every valid tf.train.Example (written
by tf.io.TFRecordWriter, in any field order or encoding) and words every error.
"""

from __future__ import annotations

import functools
import math
import re
import struct

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from primus_jax.data.schema import CHANNELS, DataError, Window

FIELD_ORDER = ("imu", "imu_shape", "rate_hz", "text", "text_emb", "has_text", "video_emb",
               "has_video", "label", "source", "recording_id", "subject", "start_s", "end_s")
_KIND_TAG = {"bytes_list": 0x0A, "float_list": 0x12, "int64_list": 0x1A}  # Feature's oneof
_FLOAT = struct.Struct("<f")
_LONGEST_FAST_STRING = 100  # longer strings (rare) take the protobuf path
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


@functools.lru_cache(maxsize=4096)
def _varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(tag: int, payload: bytes) -> bytes:
    """A wire-type-2 field: tag byte, varint length, payload."""
    return bytes([tag]) + _varint(len(payload)) + payload


def _feature_entry(name: str, kind: str, values: bytes) -> bytes:
    """One `Features.feature` map entry; `values` is the serialized *List message."""
    feature = _length_delimited(_KIND_TAG[kind], values)
    entry = _length_delimited(0x0A, name.encode()) + _length_delimited(0x12, feature)
    return _length_delimited(0x0A, entry)


def _float_list(values) -> bytes:
    packed = np.asarray(values, dtype="<f4").tobytes()
    return _length_delimited(0x0A, packed) if packed else b""


def _int64_list(values) -> bytes:
    return _length_delimited(0x0A, b"".join(_varint(int(v) & 0xFFFFFFFFFFFFFFFF) for v in values))


def _bytes_list(value: bytes) -> bytes:
    return _length_delimited(0x0A, value)


def encode_example(window: Window, *, text_dim: int, video_dim: int) -> bytes:
    """Serializes a Window as a tf.train.Example in the canonical layout (module docstring).

    text_dim, video_dim: the dataset's embedding sizes; an absent embedding is written as that
    many zeros with has_text / has_video 0 (schema version 2; 0 gives version 1's empty list).
    """
    imu = np.asarray(window.imu, dtype=np.float32)
    if imu.ndim != 2 or imu.shape[1] != CHANNELS:
        raise ValueError(f"Window.imu has shape {imu.shape}, expected (T, {CHANNELS})")
    lists = {
        "imu": ("float_list", _float_list(imu)),
        "imu_shape": ("int64_list", _int64_list(imu.shape)),
        "rate_hz": ("float_list", _float_list([window.rate_hz])),
        "text": ("bytes_list", _bytes_list(window.text.encode("utf-8"))),
        "text_emb": ("float_list", _float_list(np.zeros(text_dim) if window.text_emb is None
                                               else window.text_emb)),
        "has_text": ("int64_list", _int64_list([window.text_emb is not None])),
        "video_emb": ("float_list", _float_list(np.zeros(video_dim) if window.video_emb is None
                                                else window.video_emb)),
        "has_video": ("int64_list", _int64_list([window.video_emb is not None])),
        "label": ("int64_list", _int64_list([window.label])),
        "source": ("bytes_list", _bytes_list(window.source.encode("utf-8"))),
        "recording_id": ("bytes_list", _bytes_list(window.recording_id.encode("utf-8"))),
        "subject": ("bytes_list", _bytes_list(window.subject.encode("utf-8"))),
        "start_s": ("float_list", _float_list([window.start_s])),
        "end_s": ("float_list", _float_list([window.end_s])),
    }
    features = b"".join(_feature_entry(name, *lists[name]) for name in FIELD_ORDER)
    return _length_delimited(0x0A, features)


def _decode_with_protobuf(raw: bytes, *, T: int, text_dim: int, video_dim: int,
                         where: str = "") -> dict:
    """Parses and validates one serialized window with protobuf (any valid encoding).

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
        if has:
            return vector(name, dim)
        stored = feature.get(name)
        # schema 1 stored an absent embedding as an empty list (or an empty Feature), 2 as zeros
        found = ([] if stored is not None and stored.WhichOneof("kind") is None
                 else values(name, "float_list"))
        if len(found) not in (0, dim) or any(found):
            raise DataError(f"{prefix}field '{name}' is absent (its flag is 0) but holds "
                            f"{len(found)} values that are not all zero; expected none or "
                            f"{dim} zeros")
        return np.zeros((dim,), np.float32)

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


def decode_example(raw: bytes, *, T: int, text_dim: int, video_dim: int, where: str = "") -> dict:
    """Parses and validates one serialized window.

    Returns numpy fields: imu (T, 6) float32; text_emb (text_dim,) and video_emb (video_dim,)
    float32, zeros where absent; has_text, has_video bool; label int; rate_hz, start_s, end_s
    float; text, source, recording_id, subject str. Raises DataError "<where>: field '<name>'
    <problem>" for a missing field, a wrong feature type or length, or a non-finite value.
    """
    return ExampleDecoder.for_shape(T, text_dim, video_dim).decode(raw, where)


class ExampleDecoder:
    """Decodes the windows of one dataset shape (T, text_dim, video_dim), fast where canonical.

    A record in the canonical layout (see the module docstring) with strings of at most
    _LONGEST_FAST_STRING bytes and a label in -1..127 is matched by one regular expression;
    its fields are then read from the match (floats with np.frombuffer, no protobuf objects).
    Everything else, and every record that fails a check, goes through protobuf, so the
    result and the DataError message are those of `_decode_with_protobuf` in every case.
    """

    def __init__(self, T: int, text_dim: int, video_dim: int):
        self.T, self.text_dim, self.video_dim = T, text_dim, video_dim
        self._string_headers: dict[str, dict[int, bytes]] = {}
        pieces = [rb"\x0a([\x80-\xff]{0,4}[\x00-\x7f])"]  # Example.features, its length
        groups = ["length"]

        def capture(name, data_pattern, prefix):
            pieces.append(re.escape(prefix) + b"(" + data_pattern + b")")
            groups.append(name)

        def fixed_floats(name, count, marker=False):
            # marker: an empty group marks where the floats start, so that matching copies
            # none of them; the caller takes them as a memoryview of the record.
            entry = _feature_entry(name, "float_list", _float_list(np.zeros(count)))
            prefix = re.escape(entry[:len(entry) - 4 * count])
            if marker:
                pieces.append(prefix + b"()" + rb".{%d}" % (4 * count))
                groups.append(name)
            else:
                capture(name, rb".{%d}" % (4 * count), entry[:len(entry) - 4 * count])

        def embedding(name, dim):  # absent (empty list) or `dim` floats
            empty = re.escape(_feature_entry(name, "float_list", b""))
            pieces.append(b"(?:" + empty + b"|")
            fixed_floats(name, dim, marker=True)
            pieces.append(b")")

        def flag(name):
            capture(name, rb"[\x00\x01]", _feature_entry(name, "int64_list", _int64_list([0]))[:-1])

        def string(name):
            # All four lengths of a short string's entry are single bytes: the entry header
            # (everything but the string) is captured and compared with the expected one.
            headers = {}
            for n in range(_LONGEST_FAST_STRING + 1):
                entry = _feature_entry(name, "bytes_list", _bytes_list(b"x" * n))
                headers[n] = entry[:len(entry) - n]
            self._string_headers[name] = headers
            key = name.encode()
            pieces.append(rb"(\x0a[\x00-\x7f]" + re.escape(b"\x0a" + bytes([len(key)]) + key + b"\x12")
                          + rb"[\x00-\x7f]\x0a[\x00-\x7f]\x0a[\x00-\x7f])(.{0,%d}?)"
                          % _LONGEST_FAST_STRING)
            groups.extend([name + "/header", name])

        for name in FIELD_ORDER:
            if name == "imu":
                fixed_floats(name, T * CHANNELS, marker=True)
            elif name == "imu_shape":
                pieces.append(re.escape(_feature_entry(name, "int64_list", _int64_list([T, CHANNELS]))))
            elif name in ("rate_hz", "start_s", "end_s"):
                fixed_floats(name, 1)
            elif name in ("text_emb", "video_emb"):
                embedding(name, text_dim if name == "text_emb" else video_dim)
            elif name in ("has_text", "has_video"):
                flag(name)
            elif name == "label":  # 0..127 (one varint byte), or -1 (ten bytes), else protobuf
                pieces.append(b"(?:")
                capture(name, rb"[\x00-\x7f]", _feature_entry(name, "int64_list", _int64_list([0]))[:-1])
                pieces.append(b"|" + re.escape(_feature_entry(name, "int64_list", _int64_list([-1]))) + b")")
            else:
                string(name)
        self._pattern = re.compile(b"".join(pieces), re.DOTALL)
        self._group = {name: i for i, name in enumerate(groups)}  # index into match.groups()
        self._no_text, self._no_video = bytes(4 * text_dim), bytes(4 * video_dim)
        # The group indices _match reads, in the order it reads them (straight-line code there
        # is about twice as fast as loops over field names).
        self._indices = tuple(self._group[name] for name in (
            "text/header", "text", "source/header", "source", "recording_id/header",
            "recording_id", "subject/header", "subject", "rate_hz", "start_s", "end_s",
            "has_text", "has_video", "text_emb", "video_emb", "label", "imu"))

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def for_shape(T: int, text_dim: int, video_dim: int) -> "ExampleDecoder":
        """The (cached) decoder of one dataset shape."""
        return ExampleDecoder(T, text_dim, video_dim)

    def _match(self, raw) -> tuple | None:
        """The fields of a canonical record whose scalars all pass its checks, else None:
        (imu, text_emb, video_emb, has_text, has_video, label, rate_hz, start_s, end_s, text,
        source, recording_id, subject); each float vector a memoryview of the record's float32
        bytes, or None where the record has none.
        """
        match = self._pattern.fullmatch(raw)
        if match is None:
            return None
        g = match.groups()
        if g[0] != _varint(len(raw) - match.end(1)):
            return None
        (text_h, text, source_h, source, recording_h, recording, subject_h, subject, rate_at,
         start_at, end_at, has_text_at, has_video_at, text_at, video_at, label_at,
         imu_at) = self._indices
        headers = self._string_headers
        if not (headers["text"].get(len(g[text])) == g[text_h]
                and headers["source"].get(len(g[source])) == g[source_h]
                and headers["recording_id"].get(len(g[recording])) == g[recording_h]
                and headers["subject"].get(len(g[subject])) == g[subject_h]):
            return None
        try:
            strings = (g[text].decode("utf-8"), g[source].decode("utf-8"),
                       g[recording].decode("utf-8"), g[subject].decode("utf-8"))
        except UnicodeDecodeError:
            return None
        rate_hz, start_s, end_s = (_FLOAT.unpack(g[rate_at])[0], _FLOAT.unpack(g[start_at])[0],
                                   _FLOAT.unpack(g[end_at])[0])
        if not (math.isfinite(rate_hz) and math.isfinite(start_s) and math.isfinite(end_s)
                and rate_hz > 0):
            return None
        has_text, has_video = g[has_text_at] == b"\x01", g[has_video_at] == b"\x01"
        view = memoryview(raw)
        start = match.end(imu_at + 1)
        imu = view[start:start + 4 * CHANNELS * self.T]
        text_emb = video_emb = None
        if g[text_at] is not None:
            start = match.end(text_at + 1)
            text_emb = view[start:start + 4 * self.text_dim]
            if not has_text:  # an absent embedding stored as zeros (schema 2)
                if text_emb != self._no_text:
                    return None
                text_emb = None
        elif has_text and self.text_dim:
            return None
        if g[video_at] is not None:
            start = match.end(video_at + 1)
            video_emb = view[start:start + 4 * self.video_dim]
            if not has_video:
                if video_emb != self._no_video:
                    return None
                video_emb = None
        elif has_video and self.video_dim:
            return None
        label = -1 if g[label_at] is None else g[label_at][0]
        return (imu, text_emb, video_emb, has_text, has_video, label, rate_hz, start_s, end_s,
                *strings)

    def decode(self, raw, where: str = "") -> dict:
        """One record (bytes or memoryview) as `decode_example` returns it; DataError
        "<where>: <problem>"."""
        matched = self._match(raw)
        if matched is not None:
            decoded = dict(zip(("imu", "text_emb", "video_emb", "has_text", "has_video", "label",
                                "rate_hz", "start_s", "end_s", "text", "source", "recording_id",
                                "subject"), matched))
            for name, shape in (("imu", (self.T, CHANNELS)), ("text_emb", (self.text_dim,)),
                                ("video_emb", (self.video_dim,))):
                decoded[name] = (np.zeros(shape, np.float32) if decoded[name] is None else
                                 np.frombuffer(decoded[name], "<f4").astype(np.float32).reshape(shape))
            if all(np.isfinite(decoded[name]).all() for name in ("imu", "text_emb", "video_emb")):
                return decoded
        return _decode_with_protobuf(bytes(raw), T=self.T, text_dim=self.text_dim,
                                     video_dim=self.video_dim, where=where)

    def training_fields(self, raw) -> tuple | None:
        """(imu, text_emb, video_emb, has_text, has_video, label) of a canonical record, cheaply.

        The three float fields are their packed little-endian float32 bytes (T*6, Dt and Dv
        values; zeros where absent; memoryviews of `raw`, not copies), ready to be joined into
        a batch. On the fast path they
        are NOT yet checked for NaN/inf (one check over a whole batch is far cheaper): the
        caller checks and calls `decode` on a bad record, which raises its DataError. None
        for a record the fast path does not take: `training_fields_of(decode(raw, where))`
        then gives its fields, or its DataError.
        """
        matched = self._match(raw)
        if matched is None:
            return None
        imu, text_emb, video_emb, has_text, has_video, label = matched[:6]
        return (imu, self._no_text if text_emb is None else text_emb,
                self._no_video if video_emb is None else video_emb, has_text, has_video, label)

    @staticmethod
    def training_fields_of(decoded: dict) -> tuple:
        """training_fields of a record already decoded by `decode`."""
        return (decoded["imu"].astype("<f4").tobytes(), decoded["text_emb"].astype("<f4").tobytes(),
                decoded["video_emb"].astype("<f4").tobytes(), decoded["has_text"],
                decoded["has_video"], decoded["label"])
