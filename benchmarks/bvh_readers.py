"""Reading BVH clips with forward kinematics: data_prep.bvh (numpy) against the bvhio library.

    python -m benchmarks.bvh_readers --bvh-dir DIR [--limit N] [--bvhio-limit 20]

For every .bvh under --bvh-dir (sorted, the first --limit), times `bvh.read` + `bvh.forward_kinematics`
(world positions of every joint, every frame). For the first --bvhio-limit clips it also times
bvhio.readAsHierarchy + loadPose(frame) + PositionWorld for every joint and frame, and reports the
largest distance between the two readers' joint positions (file units). The last line is JSON.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np

from data_prep import bvh


def bvhio_positions(path: str) -> np.ndarray:
    """(F, J, 3) world joint positions by bvhio, joints in its layout (file) order."""
    import bvhio

    root = bvhio.readAsHierarchy(path)
    joints = [joint for joint, _, _ in root.layout()]
    n_frames = bvhio.readAsBvh(path).FrameCount
    positions = np.empty((n_frames, len(joints), 3))
    for frame in range(n_frames):
        root.loadPose(frame)
        for j, joint in enumerate(joints):
            positions[frame, j] = tuple(joint.PositionWorld)
    return positions


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bvh_readers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bvh-dir", required=True)
    parser.add_argument("--limit", type=int, default=0, help="at most this many clips (0: all)")
    parser.add_argument("--bvhio-limit", type=int, default=20, help="clips also read with bvhio")
    args = parser.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.bvh_dir, "**", "*.bvh"), recursive=True))
    files = files[: args.limit] if args.limit else files

    frames, start = 0, time.perf_counter()
    for path in files:
        positions, _ = bvh.forward_kinematics(bvh.read(path))
        frames += positions.shape[0]
    numpy_s = time.perf_counter() - start

    compared = files[: args.bvhio_limit]
    numpy_compared_s = bvhio_s = 0.0
    largest_difference = 0.0
    compared_frames = 0
    for path in compared:
        start = time.perf_counter()
        ours, _ = bvh.forward_kinematics(bvh.read(path))
        numpy_compared_s += time.perf_counter() - start
        start = time.perf_counter()
        theirs = bvhio_positions(path)
        bvhio_s += time.perf_counter() - start
        largest_difference = max(largest_difference, float(np.abs(ours - theirs).max()))
        compared_frames += ours.shape[0]
    result = {
        "clips": len(files), "frames": frames, "numpy_s": round(numpy_s, 2),
        "numpy_clips_per_s": round(len(files) / numpy_s, 1), "numpy_frames_per_s": round(frames / numpy_s),
        "compared_clips": len(compared), "compared_frames": compared_frames,
        "numpy_on_compared_s": round(numpy_compared_s, 3), "bvhio_on_compared_s": round(bvhio_s, 2),
        "bvhio_frames_per_s": round(compared_frames / bvhio_s) if bvhio_s else None,
        "largest_position_difference": largest_difference,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
