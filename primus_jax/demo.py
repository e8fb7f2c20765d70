"""The real-data demo of configs/demo.py: prepare, pretrain PRIMUS and baselines, evaluate, report.

Everything runs offline from registry packages: seglearn's smartwatch exercises (pretraining and
in-domain evaluation, split by subject) and aeon's UEA BasicMotions (out-of-domain evaluation),
with MiniLM prompt embeddings as text targets. See configs/demo.py for the protocol.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
import time

import ml_collections
import numpy as np

from configs import ablations
from primus_jax import data, multitask, suite, suite_specs, train, trainconfig

log = logging.getLogger(__name__)

INDOMAIN = "watch (held-out subjects)"
OUT_OF_DOMAIN = "BasicMotions"
RANDOM_INIT = "random init"
METHOD_LABELS = {"primus": "PRIMUS", "simclr": "SimCLR-only", "imu2clip": "MM-only", "multitask_ssl": "MultitaskSSL"}


def prepare_data(config: ml_collections.ConfigDict, data_root: str, text_tower) -> dict[str, str]:
    """Write (or reuse) the watch and BasicMotions datasets at the pretraining rate and length.

    The watch windows start every demo.watch_hop samples (pretraining data; 0: T/2), BasicMotions'
    every T/2. A prepared dataset is reused when its manifest has the same T, rate and hop.
    """
    from data_prep import har

    T, rate_hz = 250, 50.0
    sources = {
        "watch": (lambda: har.watch_source(config.demo.heldout_subjects.split(",")), config.demo.watch_hop or T // 2),
        "basicmotions": (har.basicmotions_source, T // 2),
    }
    paths = {}
    if config.demo.mocap_dir:
        paths["mocap"] = prepare_mocap(config.demo.mocap_dir, os.path.join(data_root, "mocap"), T, rate_hz, text_tower)
    for name, (make_source, hop) in sources.items():
        out = os.path.join(data_root, name)
        paths[name] = out
        if os.path.exists(os.path.join(out, data.MANIFEST_NAME)):
            manifest = data.read_manifest(out)
            if (manifest.get("T"), manifest.get("rate_hz"), manifest.get("hop")) == (T, rate_hz, hop):
                log.info("reusing the prepared dataset %s", out)
                continue
        report = har.write_har_dataset(make_source(), out, T=T, rate_hz=rate_hz, hop=hop, text_tower=text_tower,
                                       overwrite=True)
        print(report.summary())
    return paths


def prepare_mocap(bvh_dir: str, out: str, T: int, rate_hz: float, text_tower) -> str:
    """Synthesise (or reuse) IMU from the BVH clips under bvh_dir with data_prep.mocap's defaults."""
    from data_prep import mocap

    if os.path.exists(os.path.join(out, data.MANIFEST_NAME)):
        log.info("reusing the prepared dataset %s", out)
        return out
    print(mocap.write_mocap_dataset(bvh_dir, out, T=T, rate_hz=rate_hz, text_tower=text_tower, overwrite=True).summary())
    return out


def method_config(config: ml_collections.ConfigDict, method: str, data_dir: str,
                  mocap_dir: str = "") -> ml_collections.ConfigDict:
    """The demo's training settings with the objective of ablation `method`; with a prepared mocap
    dataset, every batch is half watch, half mocap windows."""
    cfg = copy.deepcopy(config)
    cfg.data.dir = data_dir
    if mocap_dir:
        cfg.data.mixture = f"{os.path.abspath(data_dir)}:0.5,{os.path.abspath(mocap_dir)}:0.5"
    cfg.objective.update(ablations.ABLATIONS[method])
    cfg.objective.use_mm_video = False
    return cfg


def comparison_steps(config: ml_collections.ConfigDict) -> int:
    """Every method's pretraining steps in the comparison: demo.comparison_steps (0: train.num_steps)."""
    return config.demo.comparison_steps or config.train.num_steps


def run_dir(workdir: str, method: str, seed: int) -> str:
    return os.path.join(workdir, "pretrain", method, f"seed{seed}")


def comparison_export(workdir: str, method: str, seed: int, steps: int) -> str:
    return os.path.join(run_dir(workdir, method, seed), f"export-step{steps}")


def pretrain(config: ml_collections.ConfigDict, workdir: str, data_dir: str, mocap_dir: str = "") -> None:
    """Pretrain every method of demo.methods once per seed, all for comparison_steps(config) steps.

    Run (method, seed) trains in <workdir>/pretrain/<method>/seed<seed> from the initialisation and
    data order of that seed (the same for every method); its encoder at the comparison step is kept
    as export-step<S>. MultitaskSSL also scores its pretext tasks on the held-out subjects' windows
    (its "val" metrics). Then the first seed's PRIMUS run continues, from its checkpoint at step S,
    to train.num_steps steps for the export a newcomer takes away (<run>/export).
    """
    steps = comparison_steps(config)
    for method in config.demo.methods:
        for seed in demo_seeds(config):
            cfg = method_config(config, method, data_dir, mocap_dir)
            cfg.seed = seed
            cfg.train.num_steps = steps
            if method == "multitask_ssl":
                cfg.data.val_split = "heldout"  # transformation recognition on windows it never trained on
            run = run_dir(workdir, method, seed)
            if os.path.isdir(comparison_export(workdir, method, seed, steps)):
                log.info("reusing %s", comparison_export(workdir, method, seed, steps))
                continue
            print(f"pretraining {METHOD_LABELS.get(method, method)}, seed {seed} ({steps} steps)", flush=True)
            train.train_and_evaluate(cfg, run)
            shutil.rmtree(comparison_export(workdir, method, seed, steps), ignore_errors=True)
            os.replace(os.path.join(run, "export"), comparison_export(workdir, method, seed, steps))
    if "primus" in config.demo.methods and config.train.num_steps > steps:
        cfg = method_config(config, "primus", data_dir, mocap_dir)
        cfg.seed = demo_seeds(config)[0]
        print(f"continuing PRIMUS, seed {cfg.seed}, from step {steps} to {cfg.train.num_steps} for the export",
              flush=True)
        train.train_and_evaluate(cfg, run_dir(workdir, "primus", cfg.seed))


def demo_seeds(config: ml_collections.ConfigDict) -> list[int]:
    """The pretraining seeds: config.seed, config.seed + 1, ... (demo.seeds of them)."""
    return [config.seed + i for i in range(config.demo.seeds)]


def suite_encoders(config: ml_collections.ConfigDict, workdir: str) -> list:
    """Per seed, every method's comparison export ("<label> s<seed>"), and a random-init encoder of the
    same shape ("random init s<seed>", initialised from that seed)."""
    steps = comparison_steps(config)
    encoders = []
    for seed in demo_seeds(config):
        pretrained = [suite_specs.load_encoder_spec(f"{METHOD_LABELS.get(m, m)} s{seed}="
                                              f"{comparison_export(workdir, m, seed, steps)}")
                      for m in config.demo.methods]
        like = pretrained[0] if pretrained else None
        encoders += pretrained + [suite_specs.load_encoder_spec(f"{RANDOM_INIT} s{seed}={suite_specs.RANDOM}", like, seed)]
    return encoders


def suite_datasets(paths: dict[str, str], settings: suite_specs.SuiteSettings) -> list:
    """The watch windows of the held-out subjects (the last third, subject 10, tested) and BasicMotions."""
    return [suite_specs.load_dataset_spec(f"{INDOMAIN}={paths['watch']}@heldout", settings),
            suite_specs.load_dataset_spec(f"{OUT_OF_DOMAIN}={paths['basicmotions']}", settings)]


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The whole demo; writes suite.json, suite.md, suite.png and <workdir>/export, returns suite.json's content."""
    from primus_jax import towers

    unknown = [m for m in config.demo.methods if m not in ablations.ABLATIONS]
    if unknown:
        raise trainconfig.ConfigError(f"demo.methods has unknown methods {unknown}; choose from {sorted(ablations.ABLATIONS)}")
    if config.demo.seeds < 1 or not 0 <= config.demo.comparison_steps <= config.train.num_steps:
        raise trainconfig.ConfigError(f"demo.seeds must be >= 1 and demo.comparison_steps in [0, train.num_steps="
                                f"{config.train.num_steps}], got {config.demo.seeds} and {config.demo.comparison_steps}")
    try:
        settings = suite_specs.SuiteSettings(shots=tuple(config.demo.shots), trials=config.demo.trials, seed=config.demo.seed,
                                       heads=tuple(config.demo.features), table_shots=config.demo.table_shots)
    except suite_specs.SuiteError as error:
        raise trainconfig.ConfigError(f"demo settings: {error}") from None
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    text_tower = towers.load_text_tower(config.demo.text_tower)
    paths = prepare_data(config, config.demo.data_root or os.path.join(workdir, "data"), text_tower)
    pretrain(config, workdir, paths["watch"], paths.get("mocap", ""))
    if "primus" in config.demo.methods:
        export = os.path.join(workdir, "export")
        shutil.rmtree(export, ignore_errors=True)
        seed = demo_seeds(config)[0]
        final = os.path.join(run_dir(workdir, "primus", seed), "export")
        shutil.copytree(final if os.path.isdir(final) else comparison_export(workdir, "primus", seed,
                                                                             comparison_steps(config)), export)
    result = suite.run_suite(suite_encoders(config, workdir), suite_datasets(paths, settings), workdir, settings)
    report = write_comparison(config, workdir, result)
    print(open(os.path.join(workdir, "suite.md"), encoding="utf-8").read())
    print(report)
    print(f"demo finished in {time.perf_counter() - start:.0f} s; report: {workdir}/demo.md (the comparison), "
          f"suite.md, suite.png, suite.json (every encoder and seed)")
    return result


_ENCODER_METHOD = re.compile(r"^(?P<label>.+) s(?P<seed>\d+) \((?P<head>\w+)(?P<prior>, " + re.escape(suite.TEXT_PRIOR)
                             + r")?\)$")


def _mean_se(values: list[float]) -> dict:
    """{"mean", "se" (std(ddof=1) / sqrt(n); None for one value), "n"}."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None,
            "n": int(v.size)}


def seed_table(result: dict, shots: int) -> dict[str, dict[str, dict]]:
    """{row: {"<dataset>, <head>": {"mean", "se", "n"}}}: each method's accuracy at ``shots`` shots, mean and
    standard error over the pretraining seeds (each seed's value its mean over trials). Rows are the method
    labels ("<label> (text-prior start)" for those rows); the statistics floor, which no seed changes, has its
    trial mean in every head's column and se None."""
    values: dict[str, dict[str, list[float]]] = {}
    for dataset, entry in result["results"].items():
        heads = sorted({m["head"] for name in entry["methods"] if (m := _ENCODER_METHOD.match(name))})
        for name, method in entry["methods"].items():
            stats = method.get("few_shot", {}).get(str(shots))
            if stats is None:
                continue
            match = _ENCODER_METHOD.match(name)
            if match is None:  # the statistics floor
                for head in heads:
                    values.setdefault(name, {})[f"{dataset}, {head}"] = [stats["mean"]]
                continue
            row = match["label"] + (f" ({suite.TEXT_PRIOR})" if match["prior"] else "")
            values.setdefault(row, {}).setdefault(f"{dataset}, {match['head']}", []).append(stats["mean"])
    return {row: {column: _mean_se(v) for column, v in columns.items()} for row, columns in values.items()}


def ordering(column: dict[str, dict]) -> str:
    """The rows of one column from best to worst, joined by ">" where the gap between neighbours exceeds
    the sum of their standard errors and by "≈" otherwise (always "≈" next to a row without an error)."""
    rows = sorted(column, key=lambda r: -column[r]["mean"])
    text = rows[0] if rows else ""
    for upper, lower in zip(rows, rows[1:]):
        a, b = column[upper], column[lower]
        clear = a["se"] is not None and b["se"] is not None and a["mean"] - b["mean"] > a["se"] + b["se"]
        text += (" > " if clear else " ≈ ") + lower
    return text


def pretext_accuracy(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    """MultitaskSSL's transformation recognition on the held-out subjects' windows at the comparison step:
    {task: {"mean", "se", "n"}} over seeds (its runs' last "val" record); {} without such runs."""
    per_task: dict[str, list[float]] = {}
    for seed in demo_seeds(config):
        path = os.path.join(run_dir(workdir, "multitask_ssl", seed), "metrics.jsonl")
        if "multitask_ssl" not in config.demo.methods or not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        val = [r for r in records if r.get("split") == "val" and r["step"] <= comparison_steps(config)]
        if val:
            for task in ("task",) + multitask.TASKS:
                key = "task_accuracy" if task == "task" else f"accuracy_{task}"
                per_task.setdefault("all tasks" if task == "task" else task, []).append(val[-1][key])
    return {task: _mean_se(v) for task, v in per_task.items()}


def _cell(stats: dict | None) -> str:
    if stats is None:
        return "—"
    return f"{stats['mean']:.3f}" + (f" ± {stats['se']:.3f}" if stats["se"] is not None else "")


def write_comparison(config: ml_collections.ConfigDict, workdir: str, result: dict) -> str:
    """Writes <workdir>/demo.md, the equal-budget comparison, and returns its text."""
    shots, steps, seeds = config.demo.table_shots, comparison_steps(config), demo_seeds(config)
    table = seed_table(result, shots)
    columns = list(dict.fromkeys(c for row in table.values() for c in row))
    primus_steps = config.train.num_steps if "primus" in config.demo.methods else None
    lines = [
        "# Demo: the methods at equal budgets", "",
        f"Every method pretrained for **{steps} steps** (batch {config.train.global_batch_size}, the same "
        f"windows; per seed the same initialisation and data order), seeds {seeds}. "
        + (f"The PRIMUS export (`export/`) continued seed {seeds[0]} to **{primus_steps} steps**; this table "
           f"scores PRIMUS at step {steps}, like the others. " if primus_steps and primus_steps > steps else "")
        + f"Top-1 accuracy at {shots} shots per class with the suite's probe (suite.md), mean ± standard error "
        f"over the {len(seeds)} seed{'s' if len(seeds) > 1 else ''} (each seed: the mean of "
        f"{config.demo.trials} trials). The statistics floor depends on no seed: its trial mean fills every "
        "column of its dataset.", "",
        "| method | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for row, cells in table.items():
        lines.append(f"| {row} | " + " | ".join(_cell(cells.get(c)) for c in columns) + " |")
    lines += ["", "Orderings (\">\": the gap exceeds the sum of the two standard errors; \"≈\": it does not, "
              "or a row has no error):", ""]
    lines += [f"- {c}: {ordering({r: cells[c] for r, cells in table.items() if c in cells})}" for c in columns]
    pretext = pretext_accuracy(config, workdir)
    if pretext:
        lines += ["", f"MultitaskSSL's transformation recognition at step {steps} on the held-out subjects' "
                  "windows (original vs transformed, chance 0.5), mean ± s.e. over seeds:", "",
                  "| " + " | ".join(pretext) + " |", "|" + "---|" * len(pretext),
                  "| " + " | ".join(_cell(v) for v in pretext.values()) + " |"]
    text = "\n".join(lines) + "\n"
    tmp = os.path.join(workdir, "demo.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, os.path.join(workdir, "demo.md"))
    return text
