"""The real-data demo of configs/demo.py: prepare, pretrain PRIMUS and baselines, evaluate, report.

Everything runs offline from registry packages: seglearn's smartwatch exercises (pretraining and
in-domain evaluation, split by subject) and aeon's UEA BasicMotions (out-of-domain evaluation),
with MiniLM prompt embeddings as text targets. See configs/demo.py for the protocol.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import time

import jax
import ml_collections
import numpy as np

from configs import ablations
from primus_jax import data, evaluate, train

log = logging.getLogger(__name__)

INDOMAIN = "in-domain (held-out watch subjects)"
OUT_OF_DOMAIN = "out-of-domain (BasicMotions)"
RANDOM_INIT = "random init (frozen)"
STANDARD_TRAINING = "standard training (random init, end to end)"
FEATURE_HEADS = ("ssl", "mmcl", "emb")
METHOD_LABELS = {"primus": "PRIMUS", "simclr": "SimCLR-only", "imu2clip": "MM-only (IMU2CLIP-like)"}


def prepare_data(config: ml_collections.ConfigDict, data_root: str, text_tower) -> dict[str, str]:
    """Write (or reuse) the watch and BasicMotions datasets at the pretraining rate and length."""
    from data_prep import har

    dims = {"T": 250, "rate_hz": 50.0}
    sources = {
        "watch": lambda: har.watch_source(config.demo.heldout_subjects.split(",")),
        "basicmotions": har.basicmotions_source,
    }
    paths = {}
    for name, make_source in sources.items():
        out = os.path.join(data_root, name)
        paths[name] = out
        if os.path.exists(os.path.join(out, data.MANIFEST_NAME)):
            log.info("reusing the prepared dataset %s", out)
            continue
        report = har.write_har_dataset(make_source(), out, text_tower=text_tower, **dims)
        print(report.summary())
    return paths


def method_config(config: ml_collections.ConfigDict, method: str, data_dir: str) -> ml_collections.ConfigDict:
    """The demo's training settings with the objective of ablation `method`."""
    cfg = copy.deepcopy(config)
    cfg.data.dir = data_dir
    cfg.objective.update(ablations.ABLATIONS[method])
    cfg.objective.use_mm_video = False
    return cfg


def pretrain(config: ml_collections.ConfigDict, workdir: str, data_dir: str) -> dict[str, dict]:
    """Pretrain every method of config.demo.methods; returns {method: encoder params}."""
    encoders = {}
    for method in config.demo.methods:
        print(f"pretraining {METHOD_LABELS.get(method, method)} ({config.train.num_steps} steps)", flush=True)
        summary = train.train_and_evaluate(method_config(config, method, data_dir), os.path.join(workdir, "pretrain", method))
        encoders[method] = jax.device_get(summary["state"].params["encoder"])
    return encoders


def _prompt_embeddings(manifest: dict, text_tower) -> np.ndarray:
    """(C, P, D) embeddings of the manifest's class prompts."""
    prompts = [manifest["prompts"][name] for name in manifest["class_names"]]
    flat = text_tower.embed([p for group in prompts for p in group], progress=False)
    return flat.reshape(len(prompts), len(prompts[0]), -1)


def evaluation_sets(config: ml_collections.ConfigDict, paths: dict[str, str], text_tower) -> dict[str, dict]:
    """{set name: {"train": (windows, labels), "test": (windows, labels), "prompts": (C, P, D), "classes"}}."""
    heldout = data.load_split(paths["watch"], "heldout")
    test_subjects = set(config.demo.indomain_test_subjects.split(","))
    is_test = np.array([s in test_subjects for s in heldout["subject"]])
    motions_train = data.load_split(paths["basicmotions"], "train")
    motions_test = data.load_split(paths["basicmotions"], "test")
    sets = {
        INDOMAIN: (paths["watch"], (heldout["imu"][~is_test], heldout["label"][~is_test]),
                   (heldout["imu"][is_test], heldout["label"][is_test])),
        OUT_OF_DOMAIN: (paths["basicmotions"], (motions_train["imu"], motions_train["label"]),
                        (motions_test["imu"], motions_test["label"])),
    }
    out = {}
    for name, (path, train_split, test_split) in sets.items():
        manifest = data.read_manifest(path)
        out[name] = {"train": train_split, "test": test_split, "classes": manifest["class_names"],
                     "prompts": _prompt_embeddings(manifest, text_tower)}
    return out


def evaluate_encoders(config: ml_collections.ConfigDict, encoders: dict[str, dict], sets: dict[str, dict]) -> dict:
    """Few-shot probes for every encoder, set and feature head; zero-shot / retrieval where text was learnt.

    Each evaluation set is reported once per head of config.demo.features ("ssl", "mmcl", "emb");
    zero-shot and retrieval need the text space, so they go with "mmcl". Standard training does not
    depend on a frozen feature: it is trained once per set and listed under every head.
    """
    model = train.build_model(config.model)
    window_length = next(iter(sets.values()))["train"][0].shape[1]
    random_params = model.init(jax.random.PRNGKey(config.seed + 1), np.zeros((1, window_length, 6), np.float32))["params"]
    frozen = {RANDOM_INIT: random_params}
    frozen.update({METHOD_LABELS.get(m, m): p for m, p in encoders.items()})
    learnt_text = {METHOD_LABELS.get(m, m) for m in encoders if ablations.ABLATIONS[m].get("use_mm_text", True)}
    probe_config = evaluate.LinearProbeConfig(steps=config.demo.probe_steps)
    results = {}
    for set_name, eval_set in sets.items():
        (train_x, train_y), (test_x, test_y) = eval_set["train"], eval_set["test"]
        protocol = evaluate.FewShotProtocol(
            shots=tuple(config.demo.shots), num_classes=len(eval_set["classes"]),
            trials=config.demo.trials, seed=config.demo.seed)
        standard = None
        if config.demo.standard_training:
            finetune = evaluate.FineTuneConfig(
                steps=config.demo.finetune_steps, learning_rate=config.demo.finetune_learning_rate,
                batch_size=config.demo.finetune_batch_size, normalize_features=False)
            standard = {"few_shot": evaluate.fine_tune_probe(
                model, random_params, train_x, train_y, test_x, test_y, protocol, config=finetune,
                desc=f"{set_name}: standard training", matmul_precision=config.model.matmul_precision)}
        for head in config.demo.features:
            methods = {}
            for label, params in frozen.items():
                train_feats = evaluate.encode(model, params, train_x, head_name=head,
                                              matmul_precision=config.model.matmul_precision)
                test_feats = evaluate.encode(model, params, test_x, head_name=head,
                                             matmul_precision=config.model.matmul_precision)
                entry = {"few_shot": evaluate.few_shot_probe(
                    train_feats, train_y, test_feats, test_y, protocol, config=probe_config,
                    desc=f"{set_name}, {head}: {label}")}
                if head == "mmcl" and label in learnt_text:
                    prompts = eval_set["prompts"]
                    entry["zero_shot"] = evaluate.zero_shot(test_feats, test_y, prompts)
                    entry["retrieval"] = evaluate.retrieval_recall(
                        test_feats, prompts.reshape(-1, prompts.shape[-1]), ks=(1, 5),
                        imu_labels=test_y, text_labels=np.repeat(np.arange(prompts.shape[0]), prompts.shape[1]))
                methods[label] = entry
            if standard is not None:
                methods[STANDARD_TRAINING] = standard
            results[f"{set_name}, {head} features"] = {
                "num_classes": len(eval_set["classes"]), "classes": eval_set["classes"],
                "train_windows": int(len(train_y)), "test_windows": int(len(test_y)), "methods": methods}
    return results


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The whole demo; writes the report files and <workdir>/export, returns the results dict."""
    from primus_jax import towers

    unknown = [m for m in config.demo.methods if m not in ablations.ABLATIONS]
    if unknown:
        raise train.ConfigError(f"demo.methods has unknown methods {unknown}; choose from {sorted(ablations.ABLATIONS)}")
    heads = [h for h in config.demo.features if h not in FEATURE_HEADS]
    if heads or not config.demo.features:
        raise train.ConfigError(f"demo.features must name heads among {FEATURE_HEADS}, got {tuple(config.demo.features)}")
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    text_tower = towers.load_text_tower(config.demo.text_tower)
    paths = prepare_data(config, config.demo.data_root or os.path.join(workdir, "data"), text_tower)
    encoders = pretrain(config, workdir, paths["watch"])
    if "primus" in encoders:
        export = os.path.join(workdir, "export")
        shutil.rmtree(export, ignore_errors=True)
        shutil.copytree(os.path.join(workdir, "pretrain", "primus", "export"), export)
    results = evaluate_encoders(config, encoders, evaluation_sets(config, paths, text_tower))
    files = evaluate.write_report(results, workdir)
    print(open(files["markdown"]).read())
    print(f"demo finished in {time.perf_counter() - start:.0f} s; report: {files['markdown']}, {files['plot']}")
    return results
