"""How many windows each way of handling short motion-capture clips yields on a BVH collection.

    python -m benchmarks.mocap_short_clips --bvh-dir DIR [--T 250 --rate 50 --sites 4]

Reads only each clip's frame count and frame time (the MOTION header), then counts the windows of
T samples every T/2 at --rate Hz (`common.window_starts` on the resampled length) per site for:

    drop       clips shorter than one window give nothing
    mirror     clips of at least --min-seconds are extended to one window (data_prep.mocap --short mirror)
    half       windows of T/2 samples (2.5 s at the defaults), every T/4
    concat     the clips of one (collection, action, style) joined end to end, as if one recording

With --seam-every K (K > 0) it also measures what concatenation does at every K-th seam between
consecutive takes of a group: the rotation of the left forearm (Bandai-Namco's LowerArm_L) from
the last frame of one take to the first of the next, against its median frame-to-frame rotation.

The last line is JSON with the counts, the clips per option that give at least one window, the
share of clips shorter than one window and the seam statistics.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os

import numpy as np

from data_prep import bvh, common, virtual_imu


def header(path: str) -> tuple[int, float]:
    """(frames, frame time) from the MOTION section of a BVH file, reading only up to it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("Frames:"):
                frames = int(line.split(":")[1])
            elif line.startswith("Frame Time:"):
                return frames, float(line.split(":")[1])
    raise ValueError(f"{path}: no MOTION header")


def windows(n_frames: int, frame_time: float, T: int, rate: float) -> int:
    return len(common.window_starts(math.ceil(n_frames * frame_time * rate), T, T // 2))


def forearm_rotations(path: str, joint: str = "LowerArm_L") -> np.ndarray:
    clip = bvh.read(path)
    return bvh.forward_kinematics(clip)[1][:, clip.skeleton.names.index(joint)]


def seam_statistics(groups: dict, every: int) -> dict:
    """Degrees the forearm turns across every `every`-th seam, and in a typical frame of the takes."""
    pairs = [(g[i], g[i + 1]) for g in groups.values() for i in range(len(g) - 1)][::every]
    jumps, steps = [], []
    for first, second in pairs:
        a, b = forearm_rotations(first), forearm_rotations(second)
        jumps.append(np.linalg.norm(virtual_imu.rotation_log(a[-1].T @ b[0])))
        for r in (a, b):
            steps.append(np.median(np.linalg.norm(virtual_imu.rotation_log(np.swapaxes(r[:-1], -1, -2) @ r[1:]), axis=-1)))
    return {"seams": len(pairs), "seam_deg_median": round(float(np.rad2deg(np.median(jumps))), 1),
            "seam_deg_p90": round(float(np.rad2deg(np.percentile(jumps, 90))), 1),
            "frame_deg_median": round(float(np.rad2deg(np.median(steps))), 2)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mocap_short_clips", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bvh-dir", required=True)
    parser.add_argument("--T", type=int, default=250)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--min-seconds", type=float, default=2.5)
    parser.add_argument("--seam-every", type=int, default=0, help="measure every K-th concatenation seam (0: none)")
    args = parser.parse_args(argv)
    clips = [(path, *header(path)) for path in sorted(glob.glob(os.path.join(args.bvh_dir, "**", "*.bvh"), recursive=True))]
    window_s = args.T / args.rate
    counts = collections.Counter()
    producing = collections.Counter()
    groups = collections.defaultdict(float)
    members = collections.defaultdict(list)
    for path, n, dt in clips:
        seconds = n * dt
        drop = windows(n, dt, args.T, args.rate)
        mirror = drop or int(seconds >= args.min_seconds)
        half = windows(n, dt, args.T // 2, args.rate)
        for option, count in (("drop", drop), ("mirror", mirror), ("half", half)):
            counts[option] += count * args.sites
            producing[option] += count > 0
        collection, action, style = os.path.basename(path).split("_")[:3]
        groups[(collection, action, style)] += seconds
        members[(collection, action, style)].append(path)
    for seconds in groups.values():
        count = len(common.window_starts(math.ceil(seconds * args.rate), args.T, args.T // 2))
        counts["concat"] += count * args.sites
        producing["concat_groups"] += count > 0
    result = {
        "clips": len(clips), "hours": round(sum(n * dt for _, n, dt in clips) / 3600, 2),
        "clips_shorter_than_window": sum(n * dt < window_s for _, n, dt in clips),
        "windows": dict(counts), "clips_or_groups_with_a_window": dict(producing), "concat_groups": len(groups),
    }
    if args.seam_every:
        result["concat_seams"] = seam_statistics(members, args.seam_every)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
