"""Encoding and decoding of one window as a tf.train.Example (schema in primus_jax.data.schema).

No TensorFlow is needed to write or read; tf.data reads the shards all the same.
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from primus_jax.data.schema import CHANNELS, DataError, Window


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
