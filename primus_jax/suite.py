"""The evaluation suite: every encoder on every labelled dataset, one table, resumable.

    python -m primus_jax.suite --encoder primus=runs/demo/export --encoder random \\
        --dataset watch=runs/demo/data/watch@heldout --dataset runs/demo/data/basicmotions --out runs/suite

Encoders (``--encoder [NAME=]SPEC``, repeatable):

* an export directory (``encoder.json`` + ``params.msgpack``, see ``checkpoint.export_encoder``);
* a pretraining workdir (its ``export/`` folder);
* the PyTorch reference's Lightning checkpoint, a file ending in ``.ckpt``
  (``convert.load_reference_checkpoint``; reference architecture, 50 Hz, needs torch);
* ``random``: the architecture, window length and rate of the first other encoder (else the
  reference's architecture on any input), freshly initialised and frozen.

The per-channel-statistics features (``evaluate.channel_statistics``) always run as the floor.

Datasets (``--dataset [NAME=]DIR[@SPLIT,SPLIT...]``, repeatable): data_prep output directories
with class names in their manifest; ``@`` restricts the splits used (default: all of them).
Train / test: when the chosen splits include "train" and "test" these are used as given;
otherwise the windows are pooled and split by *group* -- subjects when every window names one
and there are at least two, else recordings -- in natural order, the last
ceil(test_fraction * groups) groups forming the test set. So no subject (or recording) lends
windows to both sides.

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
import hashlib
import json
import math
import os
import re
import sys
import time
from fractions import Fraction
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from primus_jax import data, evaluate, models

STATISTICS = "statistics (per-channel)"
RANDOM = "random"
REFERENCE_WINDOW_LENGTH = 250  # the released checkpoint: 5 s windows at 50 Hz (SPEC §4)
REFERENCE_RATE_HZ = 50.0
CELL_FORMAT = "primus_jax.suite.cell/2"
TEXT_PRIOR = "text-prior start"


class SuiteError(ValueError):
    """An encoder or dataset the suite cannot use, or mis-specified settings."""


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    """What every cell runs: the few-shot protocol, the probe, the feature heads, the split.

    The probe is ``evaluate.LinearProbeConfig(c_grid=c_grid, cv_folds=cv_folds)``. ``heads`` are encoder outputs to probe ("mmcl", "ssl", "emb"); with more than one, a method
    is named "<encoder> (<head>)". ``table_shots`` is the shot count of suite.md's main table
    (one of ``shots``). ``test_fraction`` is the share of groups held out for testing
    when a dataset has no given train / test splits.
    """

    shots: tuple[int, ...] = (1, 2, 5, 10, 20)
    trials: int = 5
    seed: int = 0
    c_grid: tuple[float, ...] = evaluate.LinearProbeConfig.c_grid
    cv_folds: int = evaluate.LinearProbeConfig.cv_folds
    heads: tuple[str, ...] = ("mmcl",)
    test_fraction: float = 1 / 3
    table_shots: int = 10

    def __post_init__(self):
        bad = [h for h in self.heads if h not in ("mmcl", "ssl", "emb")]
        if bad or not self.heads:
            raise SuiteError(f"suite heads must be among mmcl, ssl, emb, got {list(self.heads)}.")
        if not 0 < self.test_fraction < 1:
            raise SuiteError(f"suite test_fraction must lie in (0, 1), got {self.test_fraction}.")
        evaluate.FewShotProtocol(shots=self.shots, num_classes=2, trials=self.trials, seed=self.seed)
        if self.table_shots not in self.shots:
            raise SuiteError(f"suite table_shots={self.table_shots} is not among the shots {list(self.shots)}.")
        try:
            self.probe()
        except ValueError as error:
            raise SuiteError(f"suite probe settings: {error}") from None

    def probe(self) -> evaluate.LinearProbeConfig:
        return evaluate.LinearProbeConfig(c_grid=tuple(self.c_grid), cv_folds=self.cv_folds)


@dataclasses.dataclass
class Encoder:
    """A frozen encoder ready to embed windows.

    ``model`` is None for the statistics floor. ``window_length`` / ``rate_hz`` are None for
    encoders that take any input (random init, statistics). ``text_tower`` describes the tower
    whose space the mmcl head learnt (None: no text). ``fingerprint`` changes when the weights do.
    """

    name: str
    source: str
    model: models.IMUEncoder | None = None
    params: Any = None
    window_length: int | None = None
    rate_hz: float | None = None
    matmul_precision: str = "default"
    text_tower: dict | None = None
    fingerprint: str = ""


@dataclasses.dataclass
class Dataset:
    """A labelled dataset split for the suite: windows (N, T, 6) float32, labels (N,) int32."""

    name: str
    path: str
    classes: list[str] = dataclasses.field(default_factory=list)
    rate_hz: float = 0.0
    split_rule: str = ""
    train: tuple[np.ndarray, np.ndarray] | None = None
    test: tuple[np.ndarray, np.ndarray] | None = None
    text_tower: dict | None = None
    prototypes: np.ndarray | None = None  # (C, D) class text embeddings, when every class has one
    skipped: str = ""  # why the dataset cannot be evaluated ("" when it can)
    fingerprint: str = ""


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _split_name_spec(spec: str) -> tuple[str | None, str]:
    """"name=rest" -> ("name", "rest"); "rest" -> (None, "rest")."""
    name, sep, rest = spec.partition("=")
    return (name.strip(), rest.strip()) if sep and name.strip() and "/" not in name else (None, spec.strip())


def _architecture(model: models.IMUEncoder) -> dict:
    """The module's fields (its repr changes once it has been bound)."""
    return {f.name: str(getattr(model, f.name)) for f in dataclasses.fields(model) if f.name not in ("parent", "name")}


def load_encoder_spec(spec: str, like: Encoder | None = None, seed: int = 0) -> Encoder:
    """An Encoder from ``[NAME=]SPEC`` (module docstring); SuiteError names the spec when it is unusable.

    ``random`` copies the architecture, window length and rate of ``like`` (so it sees the same
    input as that pretrained encoder); without one it is the reference architecture on any input.
    """
    from primus_jax import checkpoint, convert

    name, target = _split_name_spec(spec)
    if target == RANDOM:
        model = like.model if like else models.IMUEncoder()
        dummy = np.zeros((1, models.min_input_length(), 6), np.float32)
        params = jax.device_get(model.init(jax.random.PRNGKey(seed), dummy)["params"])
        length, rate = (like.window_length, like.rate_hz) if like else (None, None)
        return Encoder(name or "random init", RANDOM, model, params, length, rate,
                       like.matmul_precision if like else "default",
                       fingerprint=_digest(RANDOM, seed, _architecture(model), length, rate))
    if target.endswith(".ckpt"):
        try:
            params = convert.load_reference_checkpoint(target)
        except (OSError, ImportError, ValueError) as error:
            raise SuiteError(f"encoder {spec}: {error}") from None
        with open(target, "rb") as f:
            fingerprint = hashlib.file_digest(f, "sha256").hexdigest()[:16]
        # The reference's mmcl head learnt CLIP's text space, which no dataset here embeds with.
        return Encoder(name or os.path.splitext(os.path.basename(target))[0], target, models.IMUEncoder(), params,
                       REFERENCE_WINDOW_LENGTH, REFERENCE_RATE_HZ, text_tower={"name": "clip (reference)"},
                       fingerprint=fingerprint)
    export = target
    if os.path.isdir(os.path.join(target, "export")) and not os.path.exists(
            os.path.join(target, checkpoint.ENCODER_CONFIG_FILE)):
        export = os.path.join(target, "export")  # a pretraining workdir
    try:
        encoder_fn = checkpoint.load_encoder(export)
    except (OSError, ValueError, checkpoint.CheckpointError) as error:
        raise SuiteError(f"encoder {spec}: not an export directory, workdir with export/ or .ckpt file ({error}).") \
            from None
    meta = json.loads(open(os.path.join(export, checkpoint.ENCODER_CONFIG_FILE)).read())
    default_name = os.path.basename(os.path.normpath(target if export == target else os.path.dirname(export)))
    return Encoder(name or default_name, export, encoder_fn.model, encoder_fn.params, encoder_fn.window_length,
                   encoder_fn.rate_hz, encoder_fn.matmul_precision, meta.get("text_tower"),
                   fingerprint=meta.get("params_sha256", "")[:16] or _digest(export))


def statistics_encoder() -> Encoder:
    """The per-channel-statistics floor as a suite encoder."""
    return Encoder(STATISTICS, "evaluate.channel_statistics",
                   fingerprint=_digest(evaluate.CHANNEL_STATISTICS))


def _natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _group_split(groups: list[str], test_fraction: float) -> np.ndarray:
    """(N,) bool, True for windows of the last ceil(test_fraction * G) groups in natural order."""
    ordered = sorted(set(groups), key=_natural_key)
    n_test = min(len(ordered) - 1, max(1, math.ceil(test_fraction * len(ordered))))
    test_groups = set(ordered[len(ordered) - n_test:])
    return np.array([g in test_groups for g in groups])


def load_dataset_spec(spec: str, settings: SuiteSettings) -> Dataset:
    """A Dataset from ``[NAME=]DIR[@SPLIT,...]``; unusable labelled data comes back with ``skipped`` set.

    A missing directory or manifest, or an unknown split, raises SuiteError (a typo, not a dataset
    property); missing class names or labels, or a class without training windows, skip it.
    """
    name, target = _split_name_spec(spec)
    path, _, split_list = target.partition("@")
    name = name or os.path.basename(os.path.normpath(path))
    try:
        manifest = data.read_manifest(path)
    except (OSError, data.DataError) as error:
        raise SuiteError(f"dataset {spec}: {error}") from None
    available = sorted(manifest.get("splits", {}))
    splits = [s.strip() for s in split_list.split(",") if s.strip()] or available
    unknown = [s for s in splits if s not in available]
    if unknown:
        raise SuiteError(f"dataset {spec}: no split {unknown} in {path} (it has {available}).")
    dataset = Dataset(name, path, list(manifest.get("class_names") or []), float(manifest.get("rate_hz", 0.0)),
                      text_tower=(manifest.get("towers") or {}).get("text"))
    dataset.fingerprint = _digest(path, splits, {s: manifest["splits"][s] for s in splits}, settings.test_fraction)
    if len(dataset.classes) < 2:
        dataset.skipped = f"{path}/manifest.json names {len(dataset.classes)} class names (a labelled dataset has >= 2)"
        return dataset
    loaded = {s: data.load_split(path, s) for s in splits}
    labels = np.concatenate([loaded[s]["label"] for s in splits])
    unlabelled = int(np.sum((labels < 0) | (labels >= len(dataset.classes))))
    if unlabelled:
        dataset.skipped = f"{unlabelled} of {labels.size} windows in {path} have no label among its class names"
        return dataset
    windows = np.concatenate([loaded[s]["imu"] for s in splits])
    if "train" in splits and "test" in splits:
        is_test = np.concatenate([np.full(len(loaded[s]["label"]), s == "test") for s in splits])
        keep = np.concatenate([np.full(len(loaded[s]["label"]), s in ("train", "test")) for s in splits])
        windows, labels, is_test = windows[keep], labels[keep], is_test[keep]
        dataset.split_rule = "the dataset's given train / test splits"
    else:
        subjects = [x for s in splits for x in loaded[s]["subject"]]
        by_subject = all(subjects) and len(set(subjects)) >= 2
        groups = subjects if by_subject else [x for s in splits for x in loaded[s]["recording_id"]]
        if len(set(groups)) < 2:
            dataset.skipped = f"{path} has a single recording, so no recording-disjoint test set"
            return dataset
        is_test = _group_split(groups, settings.test_fraction)
        held = sorted({g for g, t in zip(groups, is_test) if t}, key=_natural_key)
        kind = "subject" if by_subject else "recording"
        dataset.split_rule = (f"{kind}-disjoint: test = {kind}s {held[:5]}{' ...' if len(held) > 5 else ''} "
                              f"({len(held)} of {len(set(groups))})")
    dataset.train = (windows[~is_test], labels[~is_test])
    dataset.test = (windows[is_test], labels[is_test])
    counts = np.bincount(dataset.train[1], minlength=len(dataset.classes))
    if counts.min() == 0:
        dataset.skipped = f"class {dataset.classes[int(np.argmin(counts))]!r} has no training window in {path}"
    elif not dataset.test[1].size:
        dataset.skipped = f"{path} has no test window"
    text = np.concatenate([loaded[s]["text_emb"] for s in splits])
    has_text = np.concatenate([loaded[s]["has_text"] for s in splits])
    if text.shape[1] and all(has_text[labels == c].any() for c in range(len(dataset.classes))):
        dataset.prototypes = np.stack([text[(labels == c) & has_text].mean(axis=0) for c in range(len(dataset.classes))])
    return dataset


def _rate_ratio(encoder: Encoder, dataset: Dataset) -> Fraction:
    return Fraction(encoder.rate_hz / dataset.rate_hz).limit_denominator(1000)


def check_fit(encoder: Encoder, dataset: Dataset) -> None:
    """Raises SuiteError (one sentence) when the dataset's windows cannot be given to the encoder.

    Windows of T samples at rate r_d become ceil(T * up / down) samples at the encoder's rate
    (up / down = r_e / r_d), which must equal the encoder's window length.
    """
    if encoder.model is None:
        return
    length = dataset.train[0].shape[1]
    if encoder.rate_hz is None:
        if length < models.min_input_length():
            raise SuiteError(f"encoder {encoder.name} needs windows of at least {models.min_input_length()} samples, "
                             f"dataset {dataset.name} has {length}.")
        return
    ratio = _rate_ratio(encoder, dataset)
    fitted = -(-length * ratio.numerator // ratio.denominator)
    if fitted != encoder.window_length:
        raise SuiteError(
            f"encoder {encoder.name} takes {encoder.window_length} samples at {encoder.rate_hz:g} Hz but dataset "
            f"{dataset.name} has windows of {length} samples at {dataset.rate_hz:g} Hz ({fitted} at "
            f"{encoder.rate_hz:g} Hz): prepare it with data_prep.har --target-rate {encoder.rate_hz:g} "
            f"--T {encoder.window_length}.")


def fit_windows(encoder: Encoder, dataset: Dataset, windows: np.ndarray) -> np.ndarray:
    """The dataset's windows (N, T, 6) at the encoder's rate: polyphase resampling along time
    (``scipy.signal.resample_poly``, line-extended edges so gravity keeps its level), after :func:`check_fit`."""
    from scipy import signal

    check_fit(encoder, dataset)
    if encoder.rate_hz is None or _rate_ratio(encoder, dataset) == 1:
        return windows
    ratio = _rate_ratio(encoder, dataset)
    return signal.resample_poly(windows.astype(np.float64), ratio.numerator, ratio.denominator, axis=1,
                                padtype="line").astype(np.float32)


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


def _write_json(path: str, content) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


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
                _write_json(path, cell)
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
    _write_json(os.path.join(out_dir, "suite.json"), suite)
    markdown = suite_markdown(suite)
    tmp = os.path.join(out_dir, "suite.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(markdown)
    os.replace(tmp, os.path.join(out_dir, "suite.md"))
    if results:
        evaluate.plot_accuracy_vs_shots(results, os.path.join(out_dir, "suite.png.tmp"))
        os.replace(os.path.join(out_dir, "suite.png.tmp"), os.path.join(out_dir, "suite.png"))
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
    grid = evaluate.results_markdown(results).replace("# Evaluation results", "## Full grid", 1)
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


def load_all(encoder_specs: Sequence[str], dataset_specs: Sequence[str], settings: SuiteSettings,
             seed: int = 0) -> tuple[list[Encoder], list[Dataset]]:
    """Encoders and datasets from their specs; ``random`` takes the first other encoder's architecture."""
    loaded = {i: load_encoder_spec(s) for i, s in enumerate(encoder_specs) if _split_name_spec(s)[1] != RANDOM}
    like = next(iter(loaded.values()), None)
    encoders = [loaded.get(i) or load_encoder_spec(s, like, seed) for i, s in enumerate(encoder_specs)]
    return encoders, [load_dataset_spec(s, settings) for s in dataset_specs]


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
