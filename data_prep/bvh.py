"""BVH motion-capture files: a reader and forward kinematics in numpy, vectorised over frames.

A BVH file has a HIERARCHY of joints (ROOT / JOINT blocks, each with an OFFSET from its parent
and a CHANNELS list; "End Site" blocks are leaves without channels) and a MOTION section
("Frames: F", "Frame Time: dt", then F lines of one value per channel, joints in file order).

Forward kinematics (the usual BVH convention): a joint's local transform is a translation t and a
rotation R. t is the joint's OFFSET, or its Xposition/Yposition/Zposition channel values when it
has them (they replace the offset). R is the product of the elementary rotations in the order
the channels are listed: for "Zrotation Xrotation Yrotation", R = Rz(z) Rx(x) Ry(y) (angles in
degrees). With the parent's world rotation R_p and position p_p,

    R_world = R_p R,        p_world = p_p + R_p t.

Units are the file's (see `infer_units`); `Motion.positions` is in those units.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

AXES = "XYZ"
KNOWN_CHANNELS = ("Xposition", "Yposition", "Zposition", "Xrotation", "Yrotation", "Zrotation")
# Metres per unit, and the plausible range (in that unit) of a person's size: the median over
# frames of the diagonal of the joints' bounding box (about 1.6-2.2 m for an adult in any pose).
UNITS = {"m": 1.0, "cm": 0.01, "mm": 0.001, "inch": 0.0254}
FIGURE_SIZE_RANGE = {"m": (0.8, 3.0), "inch": (30.0, 100.0), "cm": (100.0, 300.0), "mm": (1000.0, 3000.0)}
UP_AXES = ("+x", "-x", "+y", "-y", "+z", "-z")


class BvhError(ValueError):
    """A BVH file that cannot be used; the message is one sentence naming the file and the problem."""


@dataclasses.dataclass
class Skeleton:
    """The HIERARCHY: joint names, parents (-1 for the root; parents precede children), offsets (J, 3)
    and each joint's channel names with their column in a frame's values."""

    names: list[str]
    parents: np.ndarray
    offsets: np.ndarray
    channels: list[tuple[str, ...]]
    columns: list[np.ndarray]

    @property
    def n_channels(self) -> int:
        return sum(len(c) for c in self.channels)


@dataclasses.dataclass
class Clip:
    """A BVH file: its skeleton, frame time (s) and values (F, channels) as written (degrees, file units)."""

    path: str
    skeleton: Skeleton
    frame_time: float
    values: np.ndarray

    @property
    def n_frames(self) -> int:
        return self.values.shape[0]

    @property
    def rate_hz(self) -> float:
        return 1.0 / self.frame_time


_TOKEN = re.compile(r"\S+")


def parse(text: str, path: str) -> Clip:
    """Parses BVH text (the content of `path`, named in errors) into a Clip; raises BvhError."""
    motion_at = text.find("MOTION")
    if not text.lstrip().startswith("HIERARCHY") or motion_at < 0:
        raise BvhError(f"{path}: not a BVH file (no HIERARCHY and MOTION sections).")
    skeleton = _parse_hierarchy(_TOKEN.findall(text[:motion_at]), path)
    lines = text[motion_at:].split("\n", 3)
    header = dict(line.split(":", 1) for line in lines[1:3] if ":" in line)
    try:
        n_frames = int(header["Frames"])
        frame_time = float(header["Frame Time"])
    except (KeyError, ValueError):
        raise BvhError(f"{path}: the MOTION section lacks a readable 'Frames:' and 'Frame Time:' line.") from None
    if not frame_time > 0:
        raise BvhError(f"{path}: the frame time {frame_time} s is not positive.")
    try:
        values = np.array((lines[3] if len(lines) > 3 else "").split(), dtype=np.float64)
    except ValueError as error:
        raise BvhError(f"{path}: a frame value is not a number ({error}).") from None
    n_channels = skeleton.n_channels
    n_read = values.size // n_channels
    if n_read < n_frames:
        raise BvhError(f"{path}: the header says {n_frames} frames but the file holds {n_read} "
                       f"(of {n_channels} values each).")
    if n_frames < 1 or values.size != n_frames * n_channels:
        raise BvhError(f"{path}: {values.size} frame values are not {n_frames} frames of {n_channels} channels.")
    return Clip(path, skeleton, frame_time, values.reshape(n_frames, n_channels))


def read(path: str) -> Clip:
    """Reads a BVH file; raises BvhError (one sentence naming the file) when it cannot be used."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as error:
        raise BvhError(f"{path}: cannot be read ({error.strerror}).") from None
    return parse(text, path)


def _parse_hierarchy(tokens: list[str], path: str) -> Skeleton:
    names, parents, offsets, channels, columns = [], [], [], [], []
    stack: list[int] = []  # joint index per open block; -1 for an End Site
    column, i = 0, 1
    try:
        while i < len(tokens):
            token = tokens[i]
            if token in ("ROOT", "JOINT"):
                parent = next((j for j in reversed(stack) if j >= 0), -1)
                if token == "ROOT" and names:
                    raise BvhError(f"{path}: more than one ROOT joint.")
                names.append(tokens[i + 1])
                parents.append(parent)
                offsets.append(np.zeros(3))
                channels.append(())
                columns.append(np.zeros(0, np.int64))
                i += 2
                pending = len(names) - 1
            elif token == "End":
                i += 2  # "End Site"
                pending = -1
            elif token == "{":
                stack.append(pending)
                i += 1
            elif token == "}":
                stack.pop()
                i += 1
            elif token == "OFFSET":
                if stack[-1] >= 0:
                    offsets[stack[-1]] = np.array(tokens[i + 1 : i + 4], dtype=np.float64)
                i += 4
            elif token == "CHANNELS":
                joint, count = stack[-1], int(tokens[i + 1])
                listed = tuple(tokens[i + 2 : i + 2 + count])
                unknown = [c for c in listed if c not in KNOWN_CHANNELS]
                if joint < 0 or len(listed) != count or unknown or len(set(listed)) != count:
                    where = "an End Site" if joint < 0 else f"joint {names[joint]}"
                    raise BvhError(f"{path}: {where} has missing or unknown channels {list(listed)} "
                                   f"(known: {', '.join(KNOWN_CHANNELS)}).")
                channels[joint] = listed
                columns[joint] = np.arange(column, column + count)
                column += count
                i += 2 + count
            else:
                raise BvhError(f"{path}: unexpected token {token!r} in the HIERARCHY.")
    except (IndexError, ValueError) as error:
        if isinstance(error, BvhError):
            raise
        raise BvhError(f"{path}: the HIERARCHY is malformed ({error}).") from None
    if not names or stack:
        raise BvhError(f"{path}: the HIERARCHY has no joint or unbalanced braces.")
    if column == 0:
        raise BvhError(f"{path}: no joint has channels.")
    return Skeleton(names, np.array(parents), np.stack(offsets), channels, columns)


def axis_rotations(axis: int, angles_rad: np.ndarray) -> np.ndarray:
    """(F, 3, 3) rotations by `angles_rad` (F,) about coordinate axis 0, 1 or 2 (right-handed)."""
    c, s = np.cos(angles_rad), np.sin(angles_rad)
    m = np.zeros(angles_rad.shape + (3, 3))
    a, b = [(1, 2), (2, 0), (0, 1)][axis]
    m[..., axis, axis] = 1.0
    m[..., a, a] = c
    m[..., b, b] = c
    m[..., a, b] = -s
    m[..., b, a] = s
    return m


def forward_kinematics(clip: Clip) -> tuple[np.ndarray, np.ndarray]:
    """World positions (F, J, 3) in file units and rotations (F, J, 3, 3) of every joint per frame."""
    skeleton, values = clip.skeleton, clip.values
    n_frames, n_joints = values.shape[0], len(skeleton.names)
    positions = np.empty((n_frames, n_joints, 3))
    rotations = np.empty((n_frames, n_joints, 3, 3))
    for j in range(n_joints):
        translation = np.broadcast_to(skeleton.offsets[j], (n_frames, 3)).copy()
        rotation = np.broadcast_to(np.eye(3), (n_frames, 3, 3))
        for name, column in zip(skeleton.channels[j], skeleton.columns[j]):
            axis = AXES.index(name[0])
            if name.endswith("position"):
                translation[:, axis] = values[:, column]
            else:
                rotation = rotation @ axis_rotations(axis, np.deg2rad(values[:, column]))
        parent = skeleton.parents[j]
        if parent < 0:
            positions[:, j], rotations[:, j] = translation, rotation
        else:
            parent_rotation = rotations[:, parent]
            positions[:, j] = positions[:, parent] + np.einsum("fij,fj->fi", parent_rotation, translation)
            rotations[:, j] = parent_rotation @ rotation
    return positions, rotations


def body_joints(skeleton: Skeleton, positions: np.ndarray) -> np.ndarray:
    """Indices of the joints that make up the body: all of them, less a chain of placeholder roots.

    Some exporters (Bandai-Namco's "joint_Root") put the body under a root that stays at the
    origin while the figure walks away; such a root (one child, at the origin in every frame) would
    stretch every bounding box, so it is left out, down to the first joint that moves or branches.
    """
    first = 0
    while True:
        children = np.flatnonzero(skeleton.parents == first)
        if len(children) != 1 or np.abs(positions[:, first]).max() > 1e-9:
            break
        first = int(children[0])
    inside = np.zeros(len(skeleton.names), bool)
    inside[first] = True
    for j in range(first + 1, len(skeleton.names)):  # parents precede their children
        inside[j] = skeleton.parents[j] >= 0 and inside[skeleton.parents[j]]
    return np.flatnonzero(inside)


def figure_size(positions: np.ndarray) -> float:
    """The median over frames of the diagonal of the body joints' (`body_joints`) bounding box (F, J, 3)."""
    return float(np.median(np.linalg.norm(positions.max(axis=1) - positions.min(axis=1), axis=-1)))


def infer_units(positions: np.ndarray) -> str | None:
    """The unit ("m", "cm", "mm" or "inch") whose FIGURE_SIZE_RANGE holds the figure's size, or None."""
    size = figure_size(positions)
    return next((unit for unit, (low, high) in FIGURE_SIZE_RANGE.items() if low <= size < high), None)


def detect_up(positions: np.ndarray) -> str:
    """The up axis ("+y", "-z", ...) of a figure, from its joint positions (F, J, 3).

    The axis is the one with the largest median extent of the joints (a person is taller than
    deep or wide, arms down); its sign puts the mean joint above the middle of that extent (most
    joints, trunk, arms and head, lie above the hips' level, the legs' four below).
    """
    extent = positions.max(axis=1) - positions.min(axis=1)
    axis = int(np.argmax(np.median(extent, axis=0)))
    middle = 0.5 * (positions[..., axis].max(axis=1) + positions[..., axis].min(axis=1))
    above = np.median(positions[..., axis].mean(axis=1) - middle)
    return ("+" if above >= 0 else "-") + AXES[axis].lower()


def up_vector(up: str) -> np.ndarray:
    """The unit vector of an up axis such as "+y" or "-z"."""
    if up not in UP_AXES:
        raise ValueError(f"the up axis must be one of {', '.join(UP_AXES)}, got {up!r}.")
    vector = np.zeros(3)
    vector["xyz".index(up[1])] = 1.0 if up[0] == "+" else -1.0
    return vector
