"""TPU topologies described on any machine, for ahead-of-time compilation (`primus_jax.compile`).

libtpu (the project's `.[tpu]` extra, jax[tpu]) describes a TPU slice from its name, e.g. "v5e:16x16",
without a TPU: `jax.experimental.topologies.get_topology_desc` gives its devices, which a `Mesh` and
`jax.jit(...).lower(...).compile()` accept as if they were attached. A v4 chip appears as two devices
(its two TensorCores); v5e, v5p and v6e chips as one.

HBM per chip, from Google Cloud's TPU documentation (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
/v6e, "System architecture"): v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import sys

HBM_GIB_PER_CHIP = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
GENERATION_OF_DEVICE_KIND = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}
SHAPE_RANKS = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}
EXAMPLES = ("v4:2x2x4 (v4-32)", "v5e:2x2", "v5e:4x4", "v5e:16x16 (v5e-256)", "v5p:4x4x4 (v5p-128)",
            "v6e:16x16 (v6e-256)")
ACCEPTED = (f"GENERATION:SHAPE with GENERATION one of {', '.join(HBM_GIB_PER_CHIP)} and SHAPE the slice's chip "
            f"grid, AxBxC for v4 and v5p, AxB for v5e and v6e (e.g. {', '.join(EXAMPLES)})")
_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+)*)$")


class TopologyError(ValueError):
    """A topology that cannot be described, in one sentence."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """The devices of `num_slices` slices of the named topology, and what the compile report needs.

    devices: every device (TensorCore) of every slice; chips and hosts count all slices;
    hbm_bytes_per_device: a chip's HBM divided among its devices.
    """

    name: str
    generation: str
    num_slices: int
    devices: tuple
    chips: int
    hosts: int

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.chips

    @property
    def hbm_bytes_per_device(self) -> int:
        return HBM_GIB_PER_CHIP[self.generation] * 2**30 // self.devices_per_chip


@contextlib.contextmanager
def _quiet_stderr():
    """Discard what native code writes to file descriptor 2 (libtpu's start-up warnings about the
    TPU runtime this machine does not have); Python exceptions still carry their message."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def describe(name: str, num_slices: int = 1) -> Topology:
    """The topology `name` ("v5e:16x16"), `num_slices` times over; TopologyError in one sentence for
    an unknown name, a slice count below 1, a shape libtpu rejects, or a missing libtpu."""
    match = _NAME.match(name)
    if not match or len(match.group(2).split("x")) not in (SHAPE_RANKS[match.group(1)], 3):
        raise TopologyError(f"unknown TPU topology {name!r}; accepted: {ACCEPTED}")
    if num_slices < 1:
        raise TopologyError(f"--num-slices={num_slices}: a job needs at least one slice of {name}")
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError("compiling for a TPU topology needs libtpu, which is not installed: "
                            "pip install -e '.[tpu]' (the project's tpu extra, jax[tpu])")
    # Describing a topology loads libtpu but drives no TPU, so several processes (pytest workers,
    # compiles side by side) may do it at once: skip libtpu's one-process-per-machine lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        with _quiet_stderr():
            described = topologies.get_topology_desc(platform="tpu", topology_name=name, num_slices=num_slices)
    except Exception as error:  # libtpu's JaxRuntimeError: the shape does not form a slice
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TopologyError(f"libtpu cannot form {num_slices} slice(s) of {name}: {reason}") from None
    devices = tuple(described.devices)
    generation = GENERATION_OF_DEVICE_KIND.get(devices[0].device_kind, match.group(1))
    chips = len({(getattr(d, "slice_index", 0), d.process_index, tuple(d.coords)) for d in devices})
    hosts = len({(getattr(d, "slice_index", 0), d.process_index) for d in devices})
    return Topology(name=name, generation=generation, num_slices=num_slices, devices=devices, chips=chips,
                    hosts=hosts)
