"""Compile the train and eval steps for a TPU topology, on any machine, before renting it.

    python -m primus_jax.compile --config configs/pod.py --topology v5e:16x16 \\
        [--num-slices N] [--per-chip-batch B] [--window-length T] [--config.a.b=v ...]

The real steps (`train.make_steps`) are lowered with the real state and batch shapes of the config
(`ShapeDtypeStruct`s in the steps' shardings) for the devices libtpu describes (`topology.py`) and
compiled ahead of time. Nothing runs and no TPU is needed. One table, then one JSON line:

- chips, hosts, devices and chip kind;
- per device, in bytes: parameters and optimizer state, NN queue, batch (from the shardings), XLA's
  temporaries and generated code, their total (arguments + outputs not aliased to the donated state
  + temporaries + code) and the HBM a device has (`topology.HBM_GIB_PER_CHIP`);
- FLOPs per device from XLA's cost analysis of the compiled step, and `flops.py`'s analytic count of
  the global step divided by the devices;
- each collective of the compiled HLO: its count and the bytes of its results on one device;
- the compile time (lowering and compiling).

These are compile-time figures, not step times. A step whose total exceeds the device's HBM ends the
report with one sentence and exit status 1; configuration and topology errors exit with one sentence
and status 2, before anything compiles. The global batch is train.global_batch_size, or
--per-chip-batch times the chips.

libtpu is installed on machines without a TPU only to describe topologies; it would try to start a
TPU runtime in every JAX process and print warnings. This command therefore sets JAX_PLATFORMS=cpu
when it is unset (the topology description works without a runtime) and discards libtpu's
warnings while the topology is described.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402  (after JAX_PLATFORMS)
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402



def define_flags() -> None:
    """The command's flags, defined only when it runs as a command (see `cli.run_command`)."""
    config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/X.py)")
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:16x16 (primus_jax/topology.py)")
    flags.DEFINE_integer("num_slices", 1, "slices of the topology (multi-slice jobs)")
    flags.DEFINE_integer("per_chip_batch", 0, "windows per chip; 0: train.global_batch_size")
    flags.DEFINE_integer("window_length", 250, "samples per IMU window (the dataset's T)")
    flags.mark_flags_as_required(["config", "topology"])

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVE = re.compile(r"= (\(.*?\)|\S+) (" + "|".join(COLLECTIVE_KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives in compiled HLO text.

    Bytes are the size of each collective's result on one device: the gathered array of an
    all-gather, the shard of a reduce-scatter, the received array of a collective-permute. An
    asynchronous pair (-start, -done) counts once, at its start. A collective inside a loop body
    counts once, whatever the trip count.
    """
    found = {}
    for shape, kind, start in _COLLECTIVE.findall(hlo_text):
        arrays = [(_DTYPE_BYTES.get(dtype, 4), dims) for dtype, dims in _ARRAY.findall(shape)]
        if start and kind in ("all-gather", "collective-permute"):
            arrays = arrays[1:2]  # (operand, result, [contexts]): the result
        size = sum(width * _product(dims) for width, dims in arrays)
        entry = found.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += size
    return found


def _product(dims: str) -> int:
    total = 1
    for d in filter(None, dims.split(",")):
        total *= int(d)
    return total


def _device_bytes(tree) -> int:
    """Bytes of one device's shard of every ShapeDtypeStruct in tree."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(tree))


@dataclasses.dataclass
class StepReport:
    """Compile-time figures of one step on one device (bytes, FLOPs, seconds)."""

    state_bytes: int
    queue_bytes: int
    batch_bytes: int
    temp_bytes: int
    code_bytes: int
    total_bytes: int
    xla_flops: float
    analytic_flops: float
    collectives: dict
    compile_s: float


def global_batch_size(config, chips: int, per_chip_batch: int) -> int:
    """--per-chip-batch times the chips, or train.global_batch_size."""
    return per_chip_batch * chips if per_chip_batch > 0 else config.train.global_batch_size


def abstract_inputs(config, dims, mesh):
    """(state, batch) ShapeDtypeStructs in the steps' shardings, for `config` on `mesh`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from primus_jax import train

    shapes = jax.eval_shape(lambda: train.create_train_state(config, dims))
    state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   shapes, train.state_shardings(shapes, mesh))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    g, d = config.train.global_batch_size, config.model.mm_dim
    batch = {
        "imu": jax.ShapeDtypeStruct((g, dims.window_length, 6), jnp.float32, sharding=rows),
        "text_emb": jax.ShapeDtypeStruct((g, d), jnp.float32, sharding=rows),
        "has_text": jax.ShapeDtypeStruct((g,), jnp.bool_, sharding=rows),
        "video_emb": jax.ShapeDtypeStruct((g, d), jnp.float32, sharding=rows),
        "has_video": jax.ShapeDtypeStruct((g,), jnp.bool_, sharding=rows),
    }
    return state, batch


class OutOfHbm(Exception):
    """XLA refused to compile a step that does not fit a device's HBM: needed and available bytes."""

    def __init__(self, needed: float, available: float):
        super().__init__(f"{needed} bytes needed, {available} available")
        self.needed, self.available = needed, available


_XLA_OUT_OF_HBM = re.compile(r"Ran out of memory .*?\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def compile_step(jitted, state, batch, analytic_flops: float) -> tuple[StepReport, str]:
    """Lower and compile `jitted(state, batch)`; its StepReport and compiled HLO text. OutOfHbm when
    XLA refuses a program bigger than the device's HBM."""
    import jax

    started = time.perf_counter()
    lowered = jitted.lower(state, batch)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        found = _XLA_OUT_OF_HBM.search(str(error))
        if not found:
            raise
        needed, available = (float(found.group(i)) * _UNIT[found.group(i + 1)] for i in (1, 3))
        raise OutOfHbm(needed, available) from None
    compile_s = time.perf_counter() - started
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
    queue_bytes = _device_bytes(state.queue)
    report = StepReport(
        state_bytes=_device_bytes(state) - queue_bytes, queue_bytes=queue_bytes, batch_bytes=_device_bytes(batch),
        temp_bytes=memory.temp_size_in_bytes, code_bytes=memory.generated_code_size_in_bytes, total_bytes=total,
        xla_flops=float(cost.get("flops", 0.0)), analytic_flops=analytic_flops, collectives=collectives(hlo),
        compile_s=compile_s)
    return report, hlo


def hbm_problem(step: str, needed: float, available: float, queue_bytes: int, topo, config) -> str | None:
    """The sentence refusing a step that needs more than the `available` bytes of a device, or None:
    both numbers and the config fields that reduce the need."""
    from primus_jax import queue as nn_queue

    if needed <= available:
        return None
    fields = ["train.global_batch_size (or --per-chip-batch)"]
    if queue_bytes > 0.1 * needed:
        sharded = nn_queue.shards_over(config.queue.size, len(topo.devices))
        fields.append("queue.size" if sharded else f"queue.size (a multiple of the {len(topo.devices)} devices is sharded)")
    fields += ["model.hidden_dim", "model.dtype='bfloat16'"]
    return (f"the {step} step needs {needed / 2**30:.2f} GiB per device, more than the {available / 2**30:.2f} GiB "
            f"of HBM of a {topo.generation} device; reduce it with {', '.join(fields)}")


def compile_for_topology(config, topo, window_length: int = 250, per_chip_batch: int = 0,
                         steps: tuple[str, ...] = ("train", "eval")):
    """Compile config's train step, then its eval step (those of `steps`), for `topo` (a
    `topology.Topology`).

    Returns (config as compiled, {"train": (StepReport, hlo), "eval": ...}, refusal): refusal is the
    `hbm_problem` sentence of the first step over the HBM (its total above `topo`'s table, or XLA's
    own refusal to compile it), after which nothing more is compiled.
    Raises trainconfig.ConfigError (one sentence) before compiling a config that cannot run on the mesh.
    """
    from primus_jax import flops, train, trainconfig

    mesh = train.make_mesh(topo.devices)
    config = train.with_formulation(config, mesh)
    with config.unlocked():
        config.train.global_batch_size = global_batch_size(config, topo.chips, per_chip_batch)
    dims = trainconfig.DataDims(window_length=window_length, rate_hz=50.0, text_dim=config.model.mm_dim,
                                video_dim=config.model.mm_dim)
    trainconfig.validate_config(config, dims, mesh.size)
    # The run's length sets only constants of the learning-rate schedule, not the program's shapes;
    # without train.num_steps (num_epochs needs the dataset) a long run stands in.
    num_steps = config.train.num_steps or max(100_000, 2 * config.optim.warmup_steps + 1)
    try:
        train_step, eval_step = train.make_steps(config, dims, mesh, num_steps)
    except ValueError as error:  # the optimizer's schedule
        raise trainconfig.ConfigError(str(error)) from None
    state, batch = abstract_inputs(config, dims, mesh)
    compiled = {}
    queue_bytes = _device_bytes(state.queue)
    for name, jitted, backward in (("train", train_step, True), ("eval", eval_step, False)):
        if name not in steps:
            continue
        analytic = flops.step_flops(config, window_length, dims.text_dim, dims.video_dim, backward=backward).total
        try:
            compiled[name] = compile_step(jitted, state, batch, analytic / mesh.size)
        except OutOfHbm as refused:
            return config, compiled, hbm_problem(name, refused.needed, refused.available, queue_bytes, topo, config)
        refusal = hbm_problem(name, compiled[name][0].total_bytes, topo.hbm_bytes_per_device, queue_bytes, topo, config)
        if refusal:
            return config, compiled, refusal
    return config, compiled, None


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def format_table(topo, config, steps: dict) -> str:
    """The report's table: one column per compiled step."""
    names = list(steps)
    rows = [("topology", [f"{topo.name} x {topo.num_slices} slice(s)"] * len(names)),
            ("chips / hosts / devices", [f"{topo.chips} / {topo.hosts} / {len(topo.devices)}"] * len(names)),
            ("chip kind", [f"{topo.generation} ({topo.devices[0].device_kind})"] * len(names)),
            ("global batch / per device", [f"{config.train.global_batch_size} / "
                                           f"{config.train.global_batch_size // len(topo.devices)}"] * len(names)),
            ("formulation", [f"conv {config.model.conv_impl}, GRU unroll {config.model.gru_unroll}"] * len(names))]
    reports = [steps[n][0] for n in names]
    rows += [
        ("params + optimizer state", [_gib(r.state_bytes) for r in reports]),
        ("NN queue", [_gib(r.queue_bytes) for r in reports]),
        ("batch", [_gib(r.batch_bytes) for r in reports]),
        ("temporaries", [_gib(r.temp_bytes) for r in reports]),
        ("generated code", [_gib(r.code_bytes) for r in reports]),
        ("total per device", [_gib(r.total_bytes) for r in reports]),
        ("HBM per device", [_gib(topo.hbm_bytes_per_device)] * len(names)),
        ("FLOPs per device (XLA)", [f"{r.xla_flops / 1e9:.2f} GFLOP" for r in reports]),
        ("FLOPs per device (flops.py)", [f"{r.analytic_flops / 1e9:.2f} GFLOP" for r in reports]),
    ]
    for kind in COLLECTIVE_KINDS:
        if any(kind in r.collectives for r in reports):
            rows.append((kind, [f"{r.collectives.get(kind, {}).get('count', 0)} x, "
                                f"{r.collectives.get(kind, {}).get('bytes', 0) / 2**20:.2f} MiB" for r in reports]))
    rows.append(("compile time", [f"{r.compile_s:.1f} s" for r in reports]))
    width = max(len(label) for label, _ in rows)
    cells = [max(len(c) for c in [n] + [row[1][i] for row in rows]) for i, n in enumerate(names)]
    lines = [" " * width + "  " + "  ".join(n.rjust(cells[i]) for i, n in enumerate(names))]
    lines += [label.ljust(width) + "  " + "  ".join(v.rjust(cells[i]) for i, v in enumerate(values))
              for label, values in rows]
    lines.append("compile-time figures (XLA's memory and cost analysis), not step times")
    return "\n".join(lines)


def summary(topo, config, steps: dict, refusal: str | None) -> dict:
    """The JSON line: the table's numbers, bytes and FLOPs per device."""
    return {
        "topology": topo.name, "num_slices": topo.num_slices, "chips": topo.chips, "hosts": topo.hosts,
        "devices": len(topo.devices), "chip_kind": topo.generation, "hbm_bytes_per_device": topo.hbm_bytes_per_device,
        "global_batch_size": config.train.global_batch_size, "conv_impl": config.model.conv_impl,
        "gru_unroll": config.model.gru_unroll,
        "steps": {name: dataclasses.asdict(report) for name, (report, _) in steps.items()},
        "fits": refusal is None,
    }


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from primus_jax import topology, trainconfig

    try:
        topo = topology.describe(flags.FLAGS.topology, flags.FLAGS.num_slices)
        print(f"libtpu described {topo.name} (its warnings about the TPU runtime this machine lacks are "
              f"discarded); compiling the train and eval steps ...", file=sys.stderr)
        config, steps, refusal = compile_for_topology(flags.FLAGS.config, topo, flags.FLAGS.window_length,
                                                      flags.FLAGS.per_chip_batch)
    except (topology.TopologyError, trainconfig.ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if steps:
        print(format_table(topo, config, steps))
    print(json.dumps(summary(topo, config, steps, refusal)))
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from primus_jax.cli import run_command

    run_command(main, define_flags)
