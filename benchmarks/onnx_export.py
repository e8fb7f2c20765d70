"""Size on disk and onnxruntime latency of the ONNX encoder, with the GRU as one ONNX GRU node or unrolled.

    python -m benchmarks.onnx_export [--encoder DIR] [--window-length 250] [--batch-sizes 1 64]
                                     [--threads 1] [--repeats 20] [--no-jax2onnx]

The encoder is the export at --encoder, or the reference `IMUEncoder()` with random weights at
--window-length (the weights do not change the graph or its cost). The ONNX models:
- loop: what `python -m primus_jax.export --to onnx` writes (`export.onnx_model_bytes`); the
  GRU is one ONNX GRU node, which loops over its 32 steps inside onnxruntime;
- unrolled: `onnx_model_bytes(..., gru="unrolled")`, the same module with the GRU written as 32
  copies of its cell (MatMul, Sigmoid, Tanh per step), as a tracer that unrolls the recurrence emits it;
- jax2onnx: when the jax2onnx package is importable, the JAX encoder's mmcl output converted
  straight from JAX (`jax2onnx.to_onnx`; its GRU becomes an ONNX Loop). It is not a dependency:
  jax2onnx 0.17 pins orbax-checkpoint below 0.11.37, which primus_jax cannot install beside.
All must give the same features (checked to 1e-4 of their scale before timing). For each model
and each batch size N, onnxruntime (CPU, --threads intra-op threads) runs N windows per call;
the time per window is the best of --repeats calls after 3 warm-up calls, divided by N (the
best, not the median, since other processes on a shared machine only ever add time). The models
and `load_encoder`'s jitted JAX encoder (XLA's own thread pool, for comparison) are called in
turn, round after round, so a change of load during the run falls on all of them.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time

import numpy as np

from benchmarks import common


def jax2onnx_bytes(export) -> bytes | None:
    """The export's mmcl function converted by jax2onnx, or None when jax2onnx is not installed."""
    try:
        from jax2onnx import to_onnx
    except ImportError:
        return None
    model, params = export.model, export.params
    return to_onnx(lambda x: model.apply({"params": params}, x)["mmcl"],
                   [("N", export.meta["window_length"], 6)]).SerializeToString()


def best_seconds_interleaved(calls: dict, repeats: int) -> dict[str, float]:
    """{name: best wall-clock seconds of calls[name]()} over `repeats` rounds after 3 warm-up rounds;
    each round calls every entry once, so load that drifts during the run falls on all alike."""
    times = {name: [] for name in calls}
    for round_index in range(3 + repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_index >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: min(seconds) for name, seconds in times.items()}


def run(args: argparse.Namespace) -> dict:
    import jax
    import onnx
    import onnxruntime

    from primus_jax import checkpoint, export, models

    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.threads < 0:
        raise ValueError("--batch-sizes and --repeats must be positive and --threads at least 0")
    with tempfile.TemporaryDirectory() as scratch:
        encoder_dir = args.encoder
        if encoder_dir is None:
            encoder_dir = f"{scratch}/export"
            params = models.IMUEncoder().init(jax.random.key(0), np.zeros((1, args.window_length, 6), np.float32))
            checkpoint.export_encoder(encoder_dir, params["params"], {}, args.window_length, 50.0)
        loaded = checkpoint.read_export(encoder_dir)
        graphs = {"loop": export.onnx_model_bytes(loaded, export.ONNX_OPSET),
                  "unrolled": export.onnx_model_bytes(loaded, export.ONNX_OPSET, gru="unrolled")}
        if args.jax2onnx and (converted := jax2onnx_bytes(loaded)) is not None:
            graphs["jax2onnx"] = converted
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        sessions = {name: onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
                    for name, graph in graphs.items()}
        encoder_fn = checkpoint.load_encoder(encoder_dir, batch_size=max(args.batch_sizes))
        rng = np.random.default_rng(0)
        window_length = loaded.meta["window_length"]
        records = {name: {"size_bytes": len(graph),
                          "nodes": len(onnx.load_from_string(graph).graph.node),
                          "ms_per_window": {}} for name, graph in graphs.items()}
        records["jax_load_encoder"] = {"ms_per_window": {}}
        for n in args.batch_sizes:
            x = (rng.normal(0.0, 1.0, (n, window_length, 6)) + [0.0, 9.81, 0.0, 0.0, 0.0, 0.0]).astype(np.float32)
            # ours name their outputs ssl, mmcl, finite; jax2onnx's graph has the one output mmcl
            run_mmcl = {name: functools.partial(session.run, ["mmcl" if name != "jax2onnx" else session.get_outputs()[0].name],
                                                {session.get_inputs()[0].name: x})
                        for name, session in sessions.items()}
            outputs = {name: call()[0] for name, call in run_mmcl.items()}
            scale = float(np.abs(outputs["loop"]).max())
            for name, output in outputs.items():
                if np.abs(output - outputs["loop"]).max() > 1e-4 * scale:
                    raise ValueError(f"the {name} and loop ONNX models disagree; the comparison would be meaningless")
            calls = {**run_mmcl, "jax_load_encoder": lambda: encoder_fn(x)}
            for name, seconds in best_seconds_interleaved(calls, args.repeats).items():
                records[name]["ms_per_window"][str(n)] = common.significant(seconds * 1e3 / n)
    return {**common.machine_description(), "window_length": window_length, "threads": args.threads,
            "onnxruntime": onnxruntime.__version__, "repeats": args.repeats, "models": records}


def summary(result: dict) -> list[str]:
    lines = [f"T = {result['window_length']}, onnxruntime {result['onnxruntime']}, {result['threads']} thread(s), "
             f"best of {result['repeats']} calls"]
    for name, record in result["models"].items():
        size = f"{record['size_bytes'] / 1e6:.2f} MB, {record['nodes']} nodes, " if "size_bytes" in record else ""
        per_n = ", ".join(f"N={n}: {ms:.3g} ms" for n, ms in record["ms_per_window"].items())
        lines.append(f"{name:>17}: {size}per window {per_n}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", help="an export directory (default: the reference model, random weights)")
    parser.add_argument("--window-length", type=int, default=250, help="T of the random model (default 250)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="windows per call")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--no-jax2onnx", dest="jax2onnx", action="store_false",
                        help="skip the jax2onnx conversion even when jax2onnx is installed")
    return common.run_cli(parser, run, summary, argv)


if __name__ == "__main__":
    raise SystemExit(main())
