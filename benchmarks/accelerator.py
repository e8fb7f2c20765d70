"""The accelerator benchmark: one command for a GPU or TPU user, one table of the numbers that matter.

    python -m benchmarks.accelerator [--torch-peer [PATH]] [--record DIR]

Measured, in one process, on the default device (every device of the mesh for the step):
- the full PRIMUS train step (`benchmarks.train_step`) at each of --batch-sizes (default 256
  and 4096) in each of --dtypes (float32 at --matmul-precision, and bfloat16): samples/s,
  achieved TFLOP/s from the analytic count (`primus_jax.flops`) and MFU;
- forward + backward of the encoder's parts over --parts-windows windows (default 8192, the two
  views of B = 4096; `benchmarks.encoder_parts`): the conv stack, the GRU, the GRU's matmuls
  alone (its floor) and the whole encoder;
- the matmul peaks (--matmul-size square matmuls: float32 `highest`, float32 `default`, bfloat16);
- with --torch-peer, the project's plain PyTorch step (`benchmarks/torch_peer.py`, or the script
  PATH) at the same B (`--device cuda` on a GPU, `--amp` for bfloat16).

Prints one markdown table (rows: measurements; columns: float32, bfloat16) and, last, one JSON
line with every number. On a CPU run it with small sizes, e.g.
`--batch-sizes 16,32 --parts-windows 32 --matmul-size 512 --steps 2`.
"""
from __future__ import annotations

import argparse
import sys

from benchmarks import common, train_step

DTYPES = ("float32", "bfloat16")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _dtype_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in DTYPES for v in values):
        raise argparse.ArgumentTypeError(f"expected dtypes among {DTYPES}, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accelerator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=_int_list, default=[256, 4096], help="global batch sizes B of the step")
    parser.add_argument("--dtypes", type=_dtype_list, default=list(DTYPES), help="compute dtypes, comma-separated")
    parser.add_argument("--matmul-precision", choices=("default", "high", "highest"), default="default",
                        help="model.matmul_precision of the float32 step and parts")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--parts-windows", type=int, default=8192,
                        help="windows per encoder-part call (2B for a step at B); 0 skips the parts")
    parser.add_argument("--parts-repeats", type=int, default=5, help="timed calls per encoder part (best is kept)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the square matmuls of the peaks")
    parser.add_argument("--window-length", type=int, default=train_step.WINDOW_LENGTH, help="T, samples per window")
    parser.add_argument("--hidden-dim", type=int, default=512, help="GRU width (shrink only for smoke runs)")
    parser.add_argument("--queue-size", type=int, default=8192)
    parser.add_argument("--torch-peer", nargs="?", const=train_step.TORCH_PEER, default="", metavar="PATH",
                        help="run a PyTorch step at each B and dtype; without PATH the project's "
                             "benchmarks/torch_peer.py")
    parser.add_argument("--torch-peer-steps", type=int, default=0, help="timed steps of the peer; 0 uses --steps")
    return parser


def _step_args(args: argparse.Namespace, batch_size: int, dtype: str) -> argparse.Namespace:
    """benchmarks.train_step's arguments for one (B, dtype) of this run."""
    argv = ["--batch-size", str(batch_size), "--steps", str(args.steps), "--compute-dtype", dtype,
            "--matmul-precision", args.matmul_precision, "--queue-size", str(args.queue_size),
            "--window-length", str(args.window_length), "--hidden-dim", str(args.hidden_dim),
            "--matmul-size", str(args.matmul_size), "--torch-peer-steps", str(args.torch_peer_steps)]
    if args.torch_peer:
        argv += ["--torch-peer", args.torch_peer]
    return train_step.build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Times the matmul peaks, every (B, dtype) step and the encoder parts per dtype."""
    import jax

    from primus_jax import train

    if args.steps < 1 or args.parts_windows < 0 or args.parts_repeats < 1:
        raise ValueError("--steps and --parts-repeats must be positive and --parts-windows non-negative")
    if args.torch_peer:
        train_step.check_torch_peer(args.torch_peer)
    mesh = train.make_mesh()
    names = dict.fromkeys(common.MATMUL_PEAKS + (common.peak_name("float32", args.matmul_precision),))
    peaks = common.matmul_peaks(mesh, args.matmul_size, names)
    steps = []
    for dtype in args.dtypes:
        for batch_size in args.batch_sizes:
            step_args = _step_args(args, batch_size, dtype)
            result = train_step.compare_with_peaks(train_step.time_step(step_args, mesh), peaks)
            if args.torch_peer:
                result = train_step.compare_with_torch_peer(result, step_args, jax.default_backend())
            steps.append(result)
    parts = {}
    if args.parts_windows:
        from benchmarks import encoder_parts

        for dtype in args.dtypes:
            parts[dtype] = encoder_parts.time_encoder_parts(
                args.parts_windows, dtype, args.matmul_precision, args.parts_repeats,
                window_length=args.window_length, with_torch=False)
    return {
        "benchmark": "accelerator",
        "matmul_precision": args.matmul_precision,
        "matmul_size": args.matmul_size,
        "matmul_gflops_per_s": {name: round(rate, 3) for name, rate in peaks.items()},
        "steps": steps,
        "parts_windows": args.parts_windows,
        "parts": parts,
        **common.machine_description(),
    }


def table(result: dict) -> list[str]:
    """The markdown table: one row per measurement, one column per dtype."""
    rows: dict[str, dict[str, str]] = {}
    for step in result["steps"]:
        b, dtype = step["batch_size"], step["compute_dtype"]
        rows.setdefault(f"step B={b}: samples/s", {})[dtype] = f"{step['samples_per_s']:,.0f}"
        rows.setdefault(f"step B={b}: TFLOP/s (MFU)", {})[dtype] = (
            f"{step['gflops_per_s'] / 1e3:.3g} ({step['mfu']:.2f} of {step['mfu_peak']})")
        if "torch_peer" in step:
            rows.setdefault(f"step B={b}: torch peer samples/s (ours / peer)", {})[dtype] = (
                f"{step['torch_peer']['samples_per_s']:,.0f} ({step['ratio_to_torch_peer']:.2f})")
    for dtype, times in result["parts"].items():
        for part, label in (("conv_stack_ms", "conv stack"), ("gru_ms", "GRU"), ("gru_matmuls_ms", "GRU matmuls alone"),
                            ("encoder_ms", "whole encoder")):
            rows.setdefault(f"{label} fwd+bwd, {result['parts_windows']} windows: ms", {})[dtype] = f"{times[part]:.3g}"
    peaks = result["matmul_gflops_per_s"]
    float32_peaks = ", ".join(f"{name.split('_', 1)[1]} {rate / 1e3:.3g}"
                              for name, rate in peaks.items() if name.startswith("float32"))
    rows[f"matmul peak {result['matmul_size']}^2: TFLOP/s"] = {"float32": float32_peaks,
                                                              "bfloat16": f"{peaks['bfloat16'] / 1e3:.3g}"}
    columns = DTYPES
    lines = [f"device: {result['device_kind']} ({result['backend']}), float32 matmul precision "
             f"{result['matmul_precision']}", "",
             "| measurement | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cells.get(c, "") for c in columns) + " |" for name, cells in rows.items()]
    return lines


def main(argv=None) -> int:
    return common.run_cli(build_parser(), run, table, argv)


if __name__ == "__main__":
    sys.exit(main())
