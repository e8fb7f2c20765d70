"""Evaluators run during pretraining (big_vision-style): downstream quality of the current encoder.

`config.evals` maps a name to a small evaluator config; each runs every `every` steps (and at the
last step) in the training process, on the current encoder params, and its metrics go to
`metrics.jsonl` (`{"step": s, "split": <name>, ...}`) and TensorBoard (`<name>/<metric>`):

    config.evals.fewshot = dict(type="fewshot", every=1000, data_dir="/data/prepared/egoexo4d_downstream",
                                shots=(1, 5, 10))

Types and their fields (defaults in `DEFAULTS`; every type also takes `every`, `data_dir`, `head`
("mmcl": the reference's downstream feature; or "ssl", "emb") and `batch_size`):

  fewshot    train_split, test_split, shots, trials, seed, c_grid. The linear probe of
             `evaluate.few_shot_probe` on frozen features at each k in `shots` (standardised
             features, logistic regression by L-BFGS, C cross-validated over `c_grid` per
             trial); writes "<k>shot" (mean top-1 test accuracy over trials), "<k>shot_se"
             (its standard error) and "<k>shot_converged" (the share of trials whose fit converged).
  zeroshot   split, text_tower. The dataset's class prompts (manifest.json "prompts", as written
             by data_prep.har) embedded once by `text_tower` (a spec of `towers.load_text_tower`:
             "minilm", "clip:<folder or hub id>"); `evaluate.zero_shot` writes
             "accuracy".
  retrieval  split, ks. IMU -> text recall@k (`evaluate.retrieval_recall`, paired: each window's
             own text embedding is its positive) over the split's windows that have text; writes
             "recall_at_<k>" (R@k).

Each also writes "seconds", its wall time. The features come from `evaluate.encode`, the code the
demo and the evaluation suite use. A config naming an unknown type or field is a
`trainconfig.ConfigError` when `Evaluators(config)` is built, before anything compiles. An evaluator
that fails when it runs (a missing dataset, fewer windows of a class than k shots, prompts of the
wrong width, ...) is reported once with one sentence and switched off; training goes on.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import ml_collections
import numpy as np

from primus_jax import data, evaluate, trainconfig

log = logging.getLogger(__name__)

COMMON = {"type": "", "every": 0, "data_dir": "", "head": "mmcl", "batch_size": 256}
DEFAULTS = {
    "fewshot": {**COMMON, "train_split": "train", "test_split": "test", "shots": (1, 5, 10), "trials": 5,
                "seed": 0, "c_grid": evaluate.LinearProbeConfig.c_grid},
    "zeroshot": {**COMMON, "split": "test", "text_tower": "minilm"},
    "retrieval": {**COMMON, "split": "test", "ks": (1, 5)},
}
HEADS = ("mmcl", "ssl", "emb")


class EvaluatorError(RuntimeError):
    """An evaluator cannot run; the message is the one sentence reported before it is switched off."""


def _load_labelled(cfg, split: str, dims: trainconfig.DataDims) -> dict:
    """The split of cfg.data_dir in memory; EvaluatorError unless it matches the pretraining windows."""
    manifest = data.read_manifest(cfg.data_dir)
    if (manifest["T"], float(manifest["rate_hz"])) != (dims.window_length, dims.rate_hz):
        raise EvaluatorError(f"{cfg.data_dir} has windows of T={manifest['T']} at {manifest['rate_hz']} Hz, but the "
                             f"encoder is pretrained on T={dims.window_length} at {dims.rate_hz} Hz")
    if split not in manifest["splits"]:
        raise EvaluatorError(f"{cfg.data_dir} has no split {split!r} (splits: {sorted(manifest['splits'])})")
    return data.load_split(cfg.data_dir, split)


class Evaluator:
    """One configured evaluator. `evaluator(params, dims)` runs `setup(dims)` the first time (loads
    its data, checks it against the pretraining windows `dims`), then `evaluate(params) -> metrics`
    on encoder params (host numpy)."""

    def __init__(self, name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
        self.name, self.cfg = name, cfg
        self.every = int(cfg.every)
        self.model = trainconfig.build_model(config.model)
        self.matmul_precision = config.model.matmul_precision
        self.feature_dim = {"mmcl": config.model.mm_dim, "ssl": config.model.ssl_dim,
                            "emb": config.model.hidden_dim}[cfg.head]
        self.ready = False

    def setup(self, dims: trainconfig.DataDims) -> None:
        raise NotImplementedError

    def evaluate(self, params) -> dict[str, float]:
        raise NotImplementedError

    def encode(self, params, windows) -> np.ndarray:
        return evaluate.encode(self.model, params, windows, batch_size=self.cfg.batch_size,
                               head_name=self.cfg.head, matmul_precision=self.matmul_precision)

    def __call__(self, params, dims: trainconfig.DataDims) -> dict[str, float]:
        if not self.ready:
            self.setup(dims)
            self.ready = True
        return self.evaluate(params)


class FewShot(Evaluator):
    """Linear probe on frozen features at each k of cfg.shots (evaluate.few_shot_probe)."""

    def setup(self, dims):
        cfg = self.cfg
        train_split = _load_labelled(cfg, cfg.train_split, dims)
        test_split = _load_labelled(cfg, cfg.test_split, dims)
        classes = train_split["class_names"]
        if len(classes) < 2:
            raise EvaluatorError(f"{cfg.data_dir} names {len(classes)} classes in manifest.json; a few-shot "
                                 f"probe needs at least 2")
        counts = np.bincount(train_split["label"], minlength=len(classes))
        k = max(cfg.shots)
        if counts.min() < k:
            short = int(np.argmin(counts))
            raise EvaluatorError(f"class {classes[short]!r} has {counts[short]} windows in split "
                                 f"{cfg.train_split!r} of {cfg.data_dir}, fewer than k={k} shots")
        self.train_windows, self.train_labels = train_split["imu"], train_split["label"]
        self.test_windows, self.test_labels = test_split["imu"], test_split["label"]
        self.protocol = evaluate.FewShotProtocol(shots=tuple(cfg.shots), num_classes=len(classes),
                                                 trials=cfg.trials, seed=cfg.seed)
        self.probe = evaluate.LinearProbeConfig(c_grid=tuple(cfg.c_grid))

    def evaluate(self, params):
        results = evaluate.few_shot_probe(
            self.encode(params, self.train_windows), self.train_labels,
            self.encode(params, self.test_windows), self.test_labels, self.protocol,
            config=self.probe, progress=False)
        metrics = {}
        for k, stats in results.items():
            metrics[f"{k}shot"] = stats["mean"]
            if stats["se"] is not None:
                metrics[f"{k}shot_se"] = stats["se"]
            metrics[f"{k}shot_converged"] = float(np.mean(stats["converged"]))
        return metrics


class ZeroShot(Evaluator):
    """Top-1 accuracy against the class prompts' text prototypes (evaluate.zero_shot)."""

    def setup(self, dims):
        from primus_jax import towers

        cfg = self.cfg
        split = _load_labelled(cfg, cfg.split, dims)
        classes = split["class_names"]
        prompts = data.read_manifest(cfg.data_dir).get("prompts")
        missing = [c for c in classes if not (prompts or {}).get(c)]
        if not classes or missing:
            raise EvaluatorError(f"{cfg.data_dir}/manifest.json has no class prompts for {missing or 'any class'} "
                                 f"(its 'prompts' field, {{class name: [texts]}}, as data_prep.har writes it)")
        tower = towers.load_text_tower(cfg.text_tower)
        if tower is None:
            raise EvaluatorError(f"text_tower={cfg.text_tower!r} embeds nothing; zero-shot needs a text tower")
        # One (1, P_c, D) call per class: classes may have different numbers of prompts.
        self.prototypes = np.concatenate([
            evaluate.class_prototypes(tower.embed(prompts[c], progress=False)[None]) for c in classes])
        if self.prototypes.shape[1] != self.feature_dim:
            raise EvaluatorError(f"text_tower={cfg.text_tower!r} gives {self.prototypes.shape[1]}-d prompt "
                                 f"embeddings, but the {cfg.head} features are {self.feature_dim}-d")
        self.windows, self.labels = split["imu"], split["label"]

    def evaluate(self, params):
        return {"accuracy": evaluate.zero_shot(self.encode(params, self.windows), self.labels, self.prototypes)}


class Retrieval(Evaluator):
    """IMU -> text recall@k on the split's windows with text (evaluate.retrieval_recall, paired)."""

    def setup(self, dims):
        cfg = self.cfg
        split = _load_labelled(cfg, cfg.split, dims)
        has_text = split["has_text"]
        if not has_text.any():
            raise EvaluatorError(f"split {cfg.split!r} of {cfg.data_dir} has no window with a text embedding")
        if split["text_emb"].shape[1] != self.feature_dim:
            raise EvaluatorError(f"{cfg.data_dir} has {split['text_emb'].shape[1]}-d text embeddings, but the "
                                 f"{cfg.head} features are {self.feature_dim}-d")
        self.windows, self.texts = split["imu"][has_text], split["text_emb"][has_text]

    def evaluate(self, params):
        recalls = evaluate.retrieval_recall(self.encode(params, self.windows), self.texts, ks=tuple(self.cfg.ks))
        return {f"recall_at_{k}": recalls[f"R@{k}"] for k in self.cfg.ks}  # TensorBoard tags take no '@'


TYPES = {"fewshot": FewShot, "zeroshot": ZeroShot, "retrieval": Retrieval}


def _configured(name: str, entry: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The entry merged over its type's DEFAULTS; ConfigError naming any unknown type, field or bad value."""
    kind = entry.get("type") or name
    if kind not in TYPES:
        raise trainconfig.ConfigError(f"evals.{name}: unknown evaluator type {kind!r}; choose from {sorted(TYPES)}")
    unknown = sorted(set(entry) - set(DEFAULTS[kind]))
    if unknown:
        raise trainconfig.ConfigError(f"evals.{name} ({kind}) has unknown fields {unknown}; valid: {sorted(DEFAULTS[kind])}")
    cfg = ml_collections.ConfigDict({**DEFAULTS[kind], **dict(entry), "type": kind})
    problems = []
    if not isinstance(cfg.every, int) or cfg.every <= 0:
        problems.append(f"every must be a positive number of steps, got {cfg.every!r}")
    if not cfg.data_dir:
        problems.append("data_dir is empty")
    if cfg.head not in HEADS:
        problems.append(f"head must be one of {HEADS}, got {cfg.head!r}")
    for field in ("shots", "ks"):
        if field in cfg and (not cfg[field] or min(cfg[field]) < 1):
            problems.append(f"{field} must be a non-empty list of positive integers, got {cfg[field]!r}")
    if kind == "fewshot" and (cfg.trials < 1 or not cfg.c_grid or min(cfg.c_grid) <= 0):
        problems.append(f"trials and every C of c_grid must be positive, got {cfg.trials} and {cfg.c_grid!r}")
    if problems:
        raise trainconfig.ConfigError(f"evals.{name}: " + "; ".join(problems))
    return cfg


class Evaluators:
    """The evaluators of `config.evals`, checked when built; `run` reports failures and switches off."""

    def __init__(self, config: ml_collections.ConfigDict):
        evals = config.get("evals") or {}
        self.active: list[Evaluator] = [
            TYPES[cfg.type](name, cfg, config)
            for name, cfg in ((name, _configured(name, entry)) for name, entry in evals.items())]

    def __len__(self) -> int:
        return len(self.active)

    def due(self, step: int, last_step: int) -> list[Evaluator]:
        """The active evaluators to run after update `step` (every `every` steps, and at the last step)."""
        return [e for e in self.active if step % e.every == 0 or step == last_step]

    def run(self, step: int, last_step: int, encoder_params, dims: trainconfig.DataDims) -> dict[str, dict[str, float]]:
        """{name: metrics} of the evaluators due at `step`, on `encoder_params` (host numpy).

        An evaluator that raises is logged once (one sentence) and removed from `active`.
        """
        results = {}
        for evaluator in self.due(step, last_step):
            start = time.perf_counter()
            try:
                metrics = evaluator(encoder_params, dims)
            except Exception as error:  # noqa: BLE001 - any failure switches this evaluator off, not the run
                detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                if not isinstance(error, (EvaluatorError, data.DataError, FileNotFoundError)):
                    detail = f"{type(error).__name__}: {detail}"
                log.warning("evaluator %r (%s) failed at step %d and is switched off: %s",
                            evaluator.name, evaluator.cfg.type, step, detail)
                self.active.remove(evaluator)
                continue
            results[evaluator.name] = {**metrics, "seconds": time.perf_counter() - start}
        return results
