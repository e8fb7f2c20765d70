"""The record schema: one IMU window per tf.train.Example (SCHEMA_VERSION 2).

    imu           float_list  T*6 values, the (T, 6) window row-major, SI units
                              (acc x,y,z in m/s^2, then gyro x,y,z in rad/s)
    imu_shape     int64_list  [T, 6]
    rate_hz       float_list  [rate]
    text          bytes_list  [utf-8 narration, may be empty]
    text_emb      float_list  Dt values (Dt zeros where absent)
    has_text      int64_list  [1 if text_emb is present else 0]
    video_emb     float_list  Dv values (Dv zeros where absent)
    has_video     int64_list  [1 if video_emb is present else 0]
    label         int64_list  [class index, -1 = unlabelled]
    source, recording_id, subject   bytes_list  [utf-8]
    start_s, end_s                  float_list  [seconds in the recording]

Version 2 stores an absent embedding as zeros, so that every field has a fixed length and
TensorFlow Datasets parses the records with fixed-shape features; version 1 stored it as an
empty list. Both versions are read (READABLE_SCHEMA_VERSIONS), and both forms in either.

`Window` is the in-memory form of one record; `DataError` is raised for bad dataset content.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
CHANNELS = 6


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
