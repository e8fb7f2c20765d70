"""Decoding the frames of one time window of a video file with PyAV.

The frozen video tower (docs/design.md §3) sees k frames of the window [start, end): every frame whose
presentation time t (seconds since the stream's start) satisfies start <= t < end is a candidate,
at the file's native frame rate, and k of them are kept at the indices
`primus_jax.towers.sample_frame_indices(n, k)` (linspace(0, n - 1, k), so frames repeat when
n < k).

To avoid holding every decoded frame of a long high-resolution window in memory (an Aria RGB
window is 150 frames of 1408 x 1408), decoding takes two passes over the window: the first only
demuxes packets to learn the n presentation times, the second decodes and converts to RGB just
the k chosen frames.
"""
from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

from primus_jax.towers import sample_frame_indices


class VideoError(ValueError):
    """A video file is missing, unreadable, or has no frame in the requested window."""


def _window_name(path: str | os.PathLike, start_s: float, end_s: float) -> str:
    return f"{os.fspath(path)} window [{start_s:.3f}, {end_s:.3f}) s"


def _stream_origin(stream: av.video.stream.VideoStream) -> int:
    """The stream's first presentation timestamp in time_base units (0 when unknown)."""
    return stream.start_time if stream.start_time is not None else 0


def _window_pts(container, stream, start_pts: int, end_pts: int) -> list[int]:
    """Presentation timestamps (time_base units) of all frames with start_pts <= pts < end_pts.

    Demuxes packets from the keyframe at or before start_pts; stops once the decode timestamp
    reaches end_pts, since every later packet has pts >= dts >= end_pts.
    """
    container.seek(start_pts, stream=stream, backward=True, any_frame=False)
    window = []
    for packet in container.demux(stream):
        if packet.pts is None:
            if packet.size == 0:  # the demuxer's end-of-stream flush packet
                continue
            raise VideoError("packet without a presentation timestamp")
        if start_pts <= packet.pts < end_pts:
            window.append(packet.pts)
        decode_ts = packet.dts if packet.dts is not None else packet.pts
        if decode_ts >= end_pts:
            break
    return sorted(window)


def _decode_selected(container, stream, start_pts: int, wanted_pts: list[int]) -> dict[int, np.ndarray]:
    """Decodes from the keyframe before start_pts and converts the frames in wanted_pts to RGB."""
    container.seek(start_pts, stream=stream, backward=True, any_frame=False)
    wanted = set(wanted_pts)
    last = max(wanted)
    frames: dict[int, np.ndarray] = {}
    for frame in container.decode(stream):
        if frame.pts in wanted and frame.pts not in frames:
            frames[frame.pts] = frame.to_ndarray(format="rgb24")
        if frame.pts is not None and frame.pts >= last:
            break
    return frames


def read_clip(path: str | os.PathLike, start_s: float, end_s: float, k: int = 50) -> np.ndarray:
    """Returns k RGB frames of the window [start_s, end_s) of the first video stream of path.

    Args:
      path: a video file PyAV (FFmpeg) can open, e.g. an mp4.
      start_s, end_s: window bounds in seconds since the start of the video stream.
      k: number of frames returned.

    Returns:
      (k, H, W, 3) uint8 array: frame i is candidate number sample_frame_indices(n, k)[i] of
      the n frames whose presentation time lies in [start_s, end_s), in time order.

    Raises:
      VideoError: the file is missing, cannot be opened or decoded, has no video stream, or has
        no frame in the window. The message names the file and the window.
    """
    where = _window_name(path, start_s, end_s)
    if not end_s > start_s:
        raise VideoError(f"{where}: the window is empty (end must be after start).")
    if not os.path.isfile(path):
        raise VideoError(f"{where}: the video file does not exist.")
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise VideoError("the file has no video stream")
            stream = container.streams.video[0]
            time_base = stream.time_base or Fraction(1, 1)
            origin = _stream_origin(stream)
            start_pts = origin + int(np.ceil(Fraction(start_s) / time_base))
            end_pts = origin + int(np.ceil(Fraction(end_s) / time_base))
            window = _window_pts(container, stream, start_pts, end_pts)
            if not window:
                raise VideoError("no frame lies in the window")
            chosen = [window[i] for i in sample_frame_indices(len(window), k)]
            frames = _decode_selected(container, stream, start_pts, chosen)
    except VideoError as error:
        raise VideoError(f"{where}: {error}.") from None
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise VideoError(f"{where}: the video cannot be decoded ({error}).") from error
    missing = sorted(set(chosen) - frames.keys())
    if missing:
        raise VideoError(f"{where}: {len(missing)} frames listed by the container could not be decoded.")
    return np.stack([frames[pts] for pts in chosen])
