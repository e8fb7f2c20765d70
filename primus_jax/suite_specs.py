"""The evaluation suite's encoder and dataset specs: what they name, how they load, how windows fit.

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

An encoder whose rate differs from a dataset's gets the windows resampled (polyphase) when that
yields its window length, and is refused with one sentence otherwise (:func:`check_fit`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from fractions import Fraction
from typing import Any, Sequence

import jax
import numpy as np

from primus_jax import data, evaluate, models

STATISTICS = "statistics (per-channel)"
RANDOM = "random"
REFERENCE_WINDOW_LENGTH = 250  # the released checkpoint: 5 s windows at 50 Hz (docs/design.md §1, §4)
REFERENCE_RATE_HZ = 50.0


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



def load_all(encoder_specs: Sequence[str], dataset_specs: Sequence[str], settings: SuiteSettings,
             seed: int = 0) -> tuple[list[Encoder], list[Dataset]]:
    """Encoders and datasets from their specs; ``random`` takes the first other encoder's architecture."""
    loaded = {i: load_encoder_spec(s) for i, s in enumerate(encoder_specs) if _split_name_spec(s)[1] != RANDOM}
    like = next(iter(loaded.values()), None)
    encoders = [loaded.get(i) or load_encoder_spec(s, like, seed) for i, s in enumerate(encoder_specs)]
    return encoders, [load_dataset_spec(s, settings) for s in dataset_specs]
