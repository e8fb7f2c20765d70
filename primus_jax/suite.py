"""The evaluation suite: every encoder on every labelled dataset, one table, resumable.

    python -m primus_jax.suite --encoder primus=runs/demo/export --encoder random \\
        --dataset watch=runs/demo/data/watch@heldout --dataset runs/demo/data/basicmotions --out runs/suite

Encoders (``--encoder [NAME=]SPEC``) and datasets (``--dataset [NAME=]DIR[@SPLIT,...]``) are
described in :mod:`primus_jax.suite_specs`. The per-channel-statistics features
(``evaluate.channel_statistics``) always run as the floor.

Per (encoder, dataset) cell and feature head: few-shot linear probes (``evaluate.few_shot_probe``:
features standardised with the training pool's statistics, multinomial logistic regression fitted
by L-BFGS to convergence, C chosen per trial by cross-validation on the shots) at k = 1, 2, 5, 10,
20 shots x 5 trials, mean +- s.e.; a k larger than some class's training windows is "n/a". Each
trial's C and convergence are stored. Zero-shot (``evaluate.zero_shot``) for encoders that learnt
text with the dataset's own text tower, against the class prototypes the dataset stores as its
windows' text embeddings; for those the probe also runs from the text prototypes (W pulled toward
the zero-shot classifier), as its own row "<encoder> (mmcl, text-prior start)". An encoder whose rate differs from a dataset's gets the windows resampled
(polyphase) when that yields its window length, and is refused with one sentence otherwise.

Writes into --out: ``cells/<encoder>--<dataset>.json`` (each atomically, as soon as the cell is
done; a rerun reuses cells whose settings, encoder and data are unchanged), then ``suite.json``,
``suite.md`` (datasets x methods at 10 shots, mean rank per method, the full grid) and
``suite.png`` (accuracy against shots, one panel per dataset).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from primus_jax import data, evaluate, paths, report
from primus_jax.suite_specs import (Dataset, Encoder, SuiteError, SuiteSettings, check_fit, fit_windows, load_all,
                                    statistics_encoder)

CELL_FORMAT = "primus_jax.suite.cell/2"
TEXT_PRIOR = "text-prior start"


def feasible_shots(settings: SuiteSettings, train_labels: np.ndarray, num_classes: int) -> tuple[int, ...]:
    """The shot counts every class has enough training windows for."""
    smallest = int(np.bincount(train_labels, minlength=num_classes).min())
    return tuple(k for k in settings.shots if k <= smallest)


def _method_name(encoder: Encoder, head: str, settings: SuiteSettings) -> str:
    return encoder.name if encoder.model is None or len(settings.heads) == 1 else f"{encoder.name} ({head})"


def run_cell(encoder: Encoder, dataset: Dataset, settings: SuiteSettings) -> dict:
    """{method name: {"few_shot": probe stats per k, "zero_shot": accuracy | "zero_shot_skipped": reason}}."""
    (train_x, train_y), (test_x, test_y) = dataset.train, dataset.test
    num_classes = len(dataset.classes)
    shots = feasible_shots(settings, train_y, num_classes)
    protocol = evaluate.FewShotProtocol(shots=shots, num_classes=num_classes, trials=settings.trials,
                                        seed=settings.seed)
    probe = settings.probe()
    if encoder.model is None:
        features = {None: (evaluate.channel_statistics(train_x), evaluate.channel_statistics(test_x))}
    else:
        train_x, test_x = fit_windows(encoder, dataset, train_x), fit_windows(encoder, dataset, test_x)
        features = {head: tuple(evaluate.encode(encoder.model, encoder.params, x, head_name=head,
                                                matmul_precision=encoder.matmul_precision) for x in (train_x, test_x))
                    for head in settings.heads}
    methods = {}
    for head, (train_f, test_f) in features.items():
        entry = {"few_shot": evaluate.few_shot_probe(train_f, train_y, test_f, test_y, protocol, config=probe,
                                                     desc=f"{dataset.name}: {encoder.name} {head or ''}",
                                                     progress=False)}
        if head == "mmcl":
            reason = _zero_shot_refusal(encoder, dataset)
            if reason:
                entry["zero_shot_skipped"] = reason
            else:
                entry["zero_shot"] = evaluate.zero_shot(test_f, test_y, dataset.prototypes)
        methods[_method_name(encoder, head, settings)] = entry
        if "zero_shot" in entry:
            methods[f"{encoder.name} ({head}, {TEXT_PRIOR})"] = {"few_shot": evaluate.few_shot_probe(
                train_f, train_y, test_f, test_y, protocol, class_text_embs=dataset.prototypes, config=probe,
                desc=f"{dataset.name}: {encoder.name} {head} {TEXT_PRIOR}", progress=False)}
    return methods


def _zero_shot_refusal(encoder: Encoder, dataset: Dataset) -> str:
    """Why zero-shot cannot run for this pair ("" when it can)."""
    if encoder.text_tower is None:
        return "the encoder learnt no text"
    if dataset.prototypes is None:
        return "the dataset has no class text embeddings"
    if encoder.text_tower != dataset.text_tower or dataset.prototypes.shape[1] != encoder.model.mm_dim:
        return f"the encoder learnt {encoder.text_tower.get('name')} text, the dataset holds " \
               f"{(dataset.text_tower or {}).get('name')} embeddings"
    return ""


def _cell_path(out_dir: str, encoder: Encoder, dataset: Dataset) -> str:
    slug = lambda text: re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    return os.path.join(out_dir, "cells", f"{slug(encoder.name)}--{slug(dataset.name)}.json")


def run_suite(encoders: Sequence[Encoder], datasets: Sequence[Dataset], out_dir: str,
              settings: SuiteSettings = SuiteSettings(), progress: bool = True) -> dict:
    """Runs (or reuses) every (encoder, dataset) cell, then writes suite.json, suite.md and suite.png.

    The statistics floor is added when ``encoders`` lacks it. Returns the suite.json content:
    {"settings", "encoders": {name: source}, "datasets": {name: info or {"skipped": reason}},
    "results": {dataset: {"num_classes", "classes", ..., "methods": {method: cell entry}}}, "cell_seconds"}
    with string shot keys ("10"), whether a cell was computed or reused.
    """
    encoders = list(encoders)
    if not any(e.model is None for e in encoders):
        encoders.append(statistics_encoder())
    names = [e.name for e in encoders]
    if len(set(names)) != len(names):
        raise SuiteError(f"encoder names must differ, got {names}: name them with NAME=SPEC.")
    usable = [d for d in datasets if not d.skipped]
    for dataset in usable:  # refuse a mis-fitting pair before any work
        for encoder in encoders:
            check_fit(encoder, dataset)
    os.makedirs(os.path.join(out_dir, "cells"), exist_ok=True)
    settings_record = json.loads(json.dumps(dataclasses.asdict(settings)))  # as a stored cell holds it
    results, cell_seconds = {}, {}
    bar = tqdm(total=len(encoders) * len(usable), desc="suite", unit="cell", disable=not progress)
    for dataset in usable:
        methods = {}
        for encoder in encoders:
            bar.set_postfix_str(f"{encoder.name} on {dataset.name}")
            path = _cell_path(out_dir, encoder, dataset)
            key = {"format": CELL_FORMAT, "settings": settings_record, "encoder": encoder.fingerprint,
                   "dataset": dataset.fingerprint}
            cell = None
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    stored = json.load(f)
                cell = stored if stored.get("key") == key else None
            if cell is None:
                start = time.perf_counter()
                cell = {"key": key, "encoder": encoder.name, "dataset": dataset.name,
                        "methods": run_cell(encoder, dataset, settings),
                        "seconds": round(time.perf_counter() - start, 2)}
                paths.atomic_write(path, json.dumps(cell, indent=2) + "\n")
                cell = json.loads(json.dumps(cell))  # string shot keys, as a reused cell has them
            cell_seconds[f"{encoder.name} on {dataset.name}"] = cell["seconds"]
            methods.update(cell["methods"])
            bar.update()
        results[dataset.name] = {
            "num_classes": len(dataset.classes), "classes": dataset.classes, "shots": list(settings.shots),
            "split": dataset.split_rule,
            "train_windows": int(dataset.train[1].size), "test_windows": int(dataset.test[1].size),
            "methods": methods}
    bar.close()
    suite = {"settings": settings_record, "encoders": {e.name: e.source for e in encoders},
             "datasets": {d.name: ({"path": d.path, "skipped": d.skipped} if d.skipped else
                                   {"path": d.path, "split": d.split_rule}) for d in datasets},
             "results": results, "cell_seconds": cell_seconds}
    paths.atomic_write(os.path.join(out_dir, "suite.json"), json.dumps(suite, indent=2) + "\n")
    paths.atomic_write(os.path.join(out_dir, "suite.md"), suite_markdown(suite))
    if results:
        paths.atomic_write(os.path.join(out_dir, "suite.png"), report.plot_accuracy_vs_shots(results))
    return suite


def table_accuracies(results: dict, shots: int) -> dict[str, dict[str, float | None]]:
    """{dataset: {method: mean accuracy at ``shots`` shots, None where n/a}}."""
    return {ds: {m: (entry.get("few_shot", {}).get(str(shots)) or entry.get("few_shot", {}).get(shots) or {})
                 .get("mean") for m, entry in r["methods"].items()} for ds, r in results.items()}


def mean_ranks(table: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Per method, the mean over datasets of its rank (1 = best, ties share the mean rank) among the
    methods with a number on that dataset; None for a method never ranked."""
    ranks: dict[str, list[float]] = {}
    for row in table.values():
        scored = {m: a for m, a in row.items() if a is not None}
        for m, a in scored.items():
            better = sum(1 for b in scored.values() if b > a)
            tied = sum(1 for b in scored.values() if b == a)
            ranks.setdefault(m, []).append(better + (tied + 1) / 2)
    methods = {m for row in table.values() for m in row}
    return {m: (float(np.mean(ranks[m])) if m in ranks else None) for m in methods}


def protocol_lines(settings: dict) -> list[str]:
    """suite.md's opening list: the probe, how C is chosen, the standardisation, shots and trials, split."""
    probe = evaluate.LinearProbeConfig(c_grid=tuple(settings["c_grid"]), cv_folds=settings["cv_folds"])
    return [
        f"- **Probe** on frozen features: {probe.describe()}. Each cell of the full grid records the "
        f"chosen C (median over trials) and whether every fit converged.",
        "- **Standardisation**: each feature dimension becomes (f - mu) / sigma, mu and sigma over the dataset's "
        "whole training split (its windows' features, labels unused); the test split never enters. The "
        f"per-channel-statistics floor goes through the same probe. Rows marked \"{TEXT_PRIOR}\" L2-normalise "
        "the features instead and pull W toward the class text prototypes (the zero-shot classifier).",
        f"- **Shots and trials**: k in {{{', '.join(str(s) for s in settings['shots'])}}} labelled windows per "
        f"class drawn without replacement from the training split, {settings['trials']} trials per k (trial "
        f"seeds from SeedSequence({settings['seed']}, (k, t))); top-1 accuracy on the whole test split, mean "
        "± standard error over trials.",
        "- **Split**: a dataset's own train / test splits when it has them; otherwise subject-disjoint (when "
        "every window names a subject) or recording-disjoint, the last "
        f"{settings['test_fraction']:.3g} of the groups in natural order tested. Each dataset's split is "
        "listed under Datasets.",
    ]


def suite_markdown(suite: dict) -> str:
    """suite.md: the k-shot table (datasets x methods), mean rank, skipped datasets, the full grid."""
    k = suite["settings"]["table_shots"]
    results = suite["results"]
    table = table_accuracies(results, k)
    ranks = mean_ranks(table)
    methods = sorted(ranks, key=lambda m: (ranks[m] is None, ranks[m] or 0.0))
    lines = ["# Evaluation suite", ""] + protocol_lines(suite["settings"]) + ["",
             f"## {k}-shot accuracy", "", "| dataset | " + " | ".join(methods) + " |",
             "|" + "---|" * (len(methods) + 1)]
    for ds, row in table.items():
        cells = [f"{row[m]:.3f}" if row.get(m) is not None else "n/a" for m in methods]
        lines.append(f"| {ds} | " + " | ".join(cells) + " |")
    lines.append("| **mean rank** | " + " | ".join(f"{ranks[m]:.2f}" if ranks[m] is not None else "n/a"
                                                 for m in methods) + " |")
    lines += ["", "Mean rank: each dataset ranks the methods by their accuracy (1 = best, ties share), "
              "averaged over the datasets.", "", "## Datasets", ""]
    for ds, info in suite["datasets"].items():
        if info.get("skipped"):
            lines.append(f"- {ds}: skipped, {info['skipped']}.")
        else:
            r = results[ds]
            lines.append(f"- {ds}: {r['num_classes']} classes, {r['train_windows']} train / {r['test_windows']} "
                         f"test windows; split {info['split']}.")
    grid = report.results_markdown(results).replace("# Evaluation results", "## Full grid", 1)
    skipped_zero_shot = sorted({f"{m}: {e['zero_shot_skipped']}" for r in results.values()
                                for m, e in r["methods"].items() if "zero_shot_skipped" in e})
    lines += ["", grid.replace("\n## ", "\n### ")]
    if skipped_zero_shot:
        lines += ["Zero-shot not run for " + "; ".join(skipped_zero_shot) + ".", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m primus_jax.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", action="append", default=[], metavar="[NAME=]SPEC",
                        help="export dir, pretraining workdir, reference .ckpt, or 'random' (repeatable)")
    parser.add_argument("--dataset", action="append", default=[], metavar="[NAME=]DIR[@SPLIT,...]",
                        help="a data_prep output directory with class names (repeatable)")
    parser.add_argument("--out", required=True, help="folder for cells/, suite.json, suite.md and suite.png")
    parser.add_argument("--shots", default="1,2,5,10,20", help="shot counts, comma-separated")
    parser.add_argument("--table-shots", type=int, help="shot count of suite.md's main table (default 10, else the most)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--c-grid", default="0.001,0.01,0.1,1,10,100,1000",
                        help="the probe's inverse L2 strengths C, cross-validated per trial (comma-separated)")
    parser.add_argument("--heads", default="mmcl", help="feature heads to probe: mmcl, ssl, emb (comma-separated)")
    parser.add_argument("--test-fraction", type=float, default=1 / 3,
                        help="share of subjects (or recordings) held out for testing without given test splits")
    return parser




def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(c) for c in text.split(","))
    except ValueError:
        raise SuiteError(f"{flag} must be comma-separated numbers, got {text!r}.") from None


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; a bad encoder, dataset or setting prints one sentence and returns 1."""
    args = build_parser().parse_args(argv)
    try:
        if not args.encoder or not args.dataset:
            raise SuiteError("give at least one --encoder and one --dataset.")
        try:
            shots = tuple(int(k) for k in args.shots.split(","))
        except ValueError:
            raise SuiteError(f"--shots must be comma-separated integers, got {args.shots!r}.") from None
        settings = SuiteSettings(shots=shots, trials=args.trials, seed=args.seed, c_grid=_floats(args.c_grid, "--c-grid"),
                                 heads=tuple(h.strip() for h in args.heads.split(",") if h.strip()),
                                 test_fraction=args.test_fraction, table_shots=args.table_shots or (10 if 10 in shots else max(shots)))
        encoders, datasets = load_all(args.encoder, args.dataset, settings, args.seed)
        start = time.perf_counter()
        suite = run_suite(encoders, datasets, args.out, settings)
    except (SuiteError, data.DataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, info in suite["datasets"].items():
        if info.get("skipped"):
            print(f"skipped dataset {name}: {info['skipped']}", file=sys.stderr)
    print(open(os.path.join(args.out, "suite.md"), encoding="utf-8").read())
    print(f"suite finished in {time.perf_counter() - start:.0f} s; {args.out}/suite.md, suite.json, suite.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
