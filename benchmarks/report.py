"""Regenerates the tables of docs/benchmarks.md from the recorded measurements.

    python -m benchmarks.report [--records docs/benchmarks] [--doc docs/benchmarks.md] [--check]

Each benchmark run with `--record docs/benchmarks` appends one line to
`docs/benchmarks/<benchmark>.jsonl` (`common.record_result`). This command rewrites, for every
such file, the text between the markers

    <!-- report: <benchmark> -->
    <!-- end report: <benchmark> -->

in the document with one markdown table: the newest record of each distinct command on each
machine, oldest first, with its date, commit, machine and 1-minute load beside the numbers (a
record that fills several rows names its command on the first).
Everything outside the markers (the prose) is kept as it is. A records file without its markers,
or markers without a records file, is an error naming both. `--check` changes nothing and exits
1 when the document is not what the records give (for CI).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Callable, Iterable

from primus_jax import paths

Row = dict[str, str]
START, END = "<!-- report: {} -->", "<!-- end report: {} -->"


def _number(value) -> str:
    """A measured value for a table cell: integers and values from 1,000 up with thousands separators and
    no decimals, smaller ones to 4 significant figures."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _train_step(result: dict) -> Iterable[Row]:
    row = {"B": _number(result["batch_size"]), "dtype": result["compute_dtype"],
           "matmul precision": result["matmul_precision"], "devices": f"{result['devices']} x {result['device_kind']}",
           "steps x rounds": f"{result['steps']} x {result.get('rounds', 1)}",
           "samples/s": _number(result["samples_per_s"]), "GFLOP/step": _number(result["step_gflop"]),
           "MFU": f"{result['mfu']:.2f} of {result['mfu_peak']}"}
    if "torch_peer" in result:
        row["torch peer samples/s"] = _number(result["torch_peer"]["samples_per_s"])
        spread = result.get("ratio_to_torch_peer_by_round")
        row["ours / peer"] = f"{result['ratio_to_torch_peer']:.2f}" + (
            f" ({min(spread):.2f}-{max(spread):.2f})" if spread and len(spread) > 1 else "")
    yield row


def _torch_peer(result: dict) -> Iterable[Row]:
    yield {"B": _number(result["batch_size"]), "device": result["device"], "amp": str(result["amp"]),
           "torch": result["torch"], "threads": str(result["threads"]), "step ms": _number(result["step_ms"]),
           "samples/s": _number(result["samples_per_s"])}


def _encoder_parts(result: dict) -> Iterable[Row]:
    row = {"windows": _number(result["batch_windows"]), "dtype": result["dtype"], "precision": result["precision"]}
    for part, label in (("conv_stack", "conv stack"), ("gru", "GRU"), ("encoder", "encoder")):
        row[f"{label} ms"] = _number(result[f"{part}_ms"])
        if f"torch_{part}_ms" in result:
            row[f"torch {label} ms"] = _number(result[f"torch_{part}_ms"])
    row["GRU matmuls alone ms"] = _number(result["gru_matmuls_ms"])
    row["matmul share of GRU"] = f"{result['gru_matmul_share']:.2f}"
    yield row


def _accelerator(result: dict) -> Iterable[Row]:
    device = f"{result['device_kind']} ({result['backend']})"
    for step in result["steps"]:
        row = {"device": device, "measurement": f"step B={step['batch_size']}, samples/s",
               "dtype": step["compute_dtype"], "value": _number(step["samples_per_s"]),
               "MFU": f"{step['mfu']:.2f} of {step['mfu_peak']}"}
        if "torch_peer" in step:
            row["torch peer (ours / peer)"] = (f"{_number(step['torch_peer']['samples_per_s'])} "
                                               f"({step['ratio_to_torch_peer']:.2f})")
        yield row
    for dtype, times in result["parts"].items():
        for part in ("conv_stack", "gru", "gru_matmuls", "encoder"):
            yield {"device": device, "measurement": f"{part} fwd+bwd, {result['parts_windows']} windows, ms",
                   "dtype": dtype, "value": _number(times[f"{part}_ms"])}
    for name, rate in result["matmul_gflops_per_s"].items():
        yield {"device": device, "measurement": f"matmul peak {result['matmul_size']}^2, GFLOP/s",
               "dtype": name, "value": _number(rate)}


def _input_pipeline(result: dict) -> Iterable[Row]:
    yield {"measurement": f"decoding, one process, B={result['batch_size']}: records per CPU second",
           "value": _number(result["decode_records_per_s"]),
           "note": f"{result['decode_speedup']:.2f}x the protobuf decoding in the same run"}
    for workers, rate in result["records_per_s_by_workers"].items():
        yield {"measurement": f"data.workers={workers}: records/s to the device", "value": _number(rate),
               "note": f"{result['ratio_to_step_by_workers'][workers]:.0f}x a step of "
                       f"{_number(result['step_samples_per_s'])} samples/s ({result['step_rate_source']})"}


def _main_loop(result: dict) -> Iterable[Row]:
    yield {"B": _number(result["batch_size"]), "workers": str(result["workers"]),
           "loop samples/s": _number(result["loop_samples_per_s"]),
           "fixed-batch step samples/s": _number(result["step_samples_per_s"]), "loop / step": f"{result['ratio']:.2f}"}


def _data_prep(result: dict) -> Iterable[Row]:
    for row in result["rows"]:
        yield {"recordings": _number(row["recordings"]), "windows": _number(row["windows"]),
               "windows/s": _number(row["windows_per_s"]), "peak RSS MB": _number(row["peak_rss_mb"]),
               "RSS after imports MB": _number(row["rss_after_imports_mb"])}


def _data_prep_workers(result: dict) -> Iterable[Row]:
    for row in result["rows"]:
        yield {"run": row["run"], "windows": _number(row["windows"]), "windows/s": _number(row["windows_per_s"]),
               "speed-up": f"{row['speedup']:.2f}", "worker peak RSS MB": _number(row["worker_peak_rss_mb"]),
               "driver peak RSS MB": _number(row["driver_peak_rss_mb"])}


def _peak_memory(result: dict) -> Iterable[Row]:
    yield {"peak RSS MB": _number(result["peak_rss_mb"]), "seconds": _number(result["seconds"])}


def _demo_tradeoffs(result: dict) -> Iterable[Row]:
    for phase, seconds in result["seconds"].items():
        yield {"phase": phase, "seconds": _number(seconds)}


def _input_normalisation(result: dict) -> Iterable[Row]:
    for name, means in result["mean_accuracy"].items():
        yield {"dataset, features": name, **{f"{k}-shot": f"{v:.3f}" for k, v in means.items()}}


TABLES: dict[str, Callable[[dict], Iterable[Row]]] = {
    "train_step": _train_step, "torch_peer": _torch_peer, "encoder_parts": _encoder_parts,
    "accelerator": _accelerator, "input_pipeline": _input_pipeline, "main_loop": _main_loop,
    "data_prep": _data_prep, "data_prep_workers": _data_prep_workers, "peak_memory": _peak_memory,
    "demo_tradeoffs": _demo_tradeoffs, "input_normalisation": _input_normalisation,
}
"""The table columns of each benchmark's result, one or more rows per record."""


def read_records(path: str) -> list[dict]:
    """The records of one JSONL file; ValueError naming the file and line when one is not a record."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not JSON ({error.msg})") from None
            missing = {"command", "date", "commit", "machine", "load_avg_1min", "result"} - set(record)
            if missing:
                raise ValueError(f"{path}: line {number} lacks {sorted(missing)}")
            records.append(record)
    return records


def latest(records: list[dict]) -> list[dict]:
    """The newest record of each (command, CPU, device) in date order: a rerun replaces its row."""
    newest: dict[tuple, dict] = {}
    for record in sorted(records, key=lambda r: r["date"]):
        key = (record["command"], record["machine"]["cpu"], record["result"].get("device_kind", ""))
        newest.pop(key, None)
        newest[key] = record
    return list(newest.values())


def table(benchmark: str, records: list[dict]) -> str:
    """The markdown table of a benchmark's latest records (context columns first)."""
    columns = TABLES.get(benchmark)
    if columns is None:
        raise ValueError(f"no table is defined for the benchmark {benchmark!r}; add one to benchmarks.report.TABLES")
    rows = []
    for record in latest(records):
        context = {"date": record["date"][:10],
                   "commit": record["commit"][:7] + ("+" if record.get("dirty") else ""),
                   "machine": f"{record['machine']['cpu']}, {record['machine']['cores']} cores",
                   "load": f"{record['load_avg_1min']:.1f}"}
        for number, row in enumerate(columns(record["result"])):
            rows.append({**context, **row, "command": f"`{record['command']}`" if number == 0 else ""})
    headers = list(dict.fromkeys(name for row in rows for name in row))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row.get(name, "") for name in headers) + " |" for row in rows]
    return "\n".join(lines)


def render(document: str, records_dir: str, doc_path: str = "the document") -> str:
    """`document` with every report block replaced by the table of `records_dir/<benchmark>.jsonl`."""
    files = {os.path.basename(path)[:-len(".jsonl")]: path
             for path in sorted(glob.glob(os.path.join(records_dir, "*.jsonl")))}
    marked = re.findall(r"<!-- report: (\S+) -->", document)
    for benchmark in sorted(set(files) - set(marked)):
        raise ValueError(f"{files[benchmark]} has no block in {doc_path}: add the lines "
                         f"{START.format(benchmark)} and {END.format(benchmark)} where its table goes")
    for benchmark in marked:
        if benchmark not in files:
            raise ValueError(f"{doc_path} has a block for {benchmark!r} but {records_dir} has no {benchmark}.jsonl")
        pattern = re.compile(re.escape(START.format(benchmark)) + r"\n.*?" + re.escape(END.format(benchmark)), re.S)
        if not pattern.search(document):
            raise ValueError(f"{doc_path}: {START.format(benchmark)} has no {END.format(benchmark)} after it")
        block = f"{START.format(benchmark)}\n{table(benchmark, read_records(files[benchmark]))}\n{END.format(benchmark)}"
        document = pattern.sub(lambda _: block, document)
    return document


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", default=os.path.join("docs", "benchmarks"), help="folder of <benchmark>.jsonl")
    parser.add_argument("--doc", default=os.path.join("docs", "benchmarks.md"), help="the document to regenerate")
    parser.add_argument("--check", action="store_true", help="exit 1 if the document is out of date; write nothing")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with open(args.doc, encoding="utf-8") as f:
            document = f.read()
        updated = render(document, args.records, args.doc)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.check:
        if updated != document:
            print(f"error: {args.doc} is out of date; run python -m benchmarks.report", file=sys.stderr)
            return 1
        return 0
    if updated != document:
        paths.atomic_write(args.doc, updated.encode("utf-8"))
    print(f"{args.doc}: {len(re.findall(r'<!-- report: ', updated))} tables from {args.records}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
