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

import ml_collections

from configs import ablations
from primus_jax import data, suite, train

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


def pretrain(config: ml_collections.ConfigDict, workdir: str, data_dir: str, mocap_dir: str = "") -> None:
    """Pretrain and export every method of config.demo.methods into <workdir>/pretrain/<method>.

    PRIMUS trains for train.num_steps steps, the other methods for demo.baseline_steps (0: the same).
    """
    for method in config.demo.methods:
        cfg = method_config(config, method, data_dir, mocap_dir)
        if method != "primus" and config.demo.baseline_steps:
            cfg.train.num_steps = config.demo.baseline_steps
        print(f"pretraining {METHOD_LABELS.get(method, method)} ({cfg.train.num_steps} steps)", flush=True)
        train.train_and_evaluate(cfg, os.path.join(workdir, "pretrain", method))


def suite_encoders(workdir: str, methods, seed: int) -> list:
    """The pretrained exports under <workdir>/pretrain, then a random-init encoder of the same shape
    (initialised from ``seed``)."""
    encoders = [suite.load_encoder_spec(f"{METHOD_LABELS.get(m, m)}={os.path.join(workdir, 'pretrain', m, 'export')}")
                for m in methods]
    like = encoders[0] if encoders else None
    return encoders + [suite.load_encoder_spec(f"{RANDOM_INIT}={suite.RANDOM}", like, seed)]


def suite_datasets(paths: dict[str, str], settings: suite.SuiteSettings) -> list:
    """The watch windows of the held-out subjects (the last third, subject 10, tested) and BasicMotions."""
    return [suite.load_dataset_spec(f"{INDOMAIN}={paths['watch']}@heldout", settings),
            suite.load_dataset_spec(f"{OUT_OF_DOMAIN}={paths['basicmotions']}", settings)]


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The whole demo; writes suite.json, suite.md, suite.png and <workdir>/export, returns suite.json's content."""
    from primus_jax import towers

    unknown = [m for m in config.demo.methods if m not in ablations.ABLATIONS]
    if unknown:
        raise train.ConfigError(f"demo.methods has unknown methods {unknown}; choose from {sorted(ablations.ABLATIONS)}")
    try:
        settings = suite.SuiteSettings(shots=tuple(config.demo.shots), trials=config.demo.trials, seed=config.demo.seed,
                                       probe_steps=config.demo.probe_steps, heads=tuple(config.demo.features),
                                       table_shots=config.demo.table_shots)
    except suite.SuiteError as error:
        raise train.ConfigError(f"demo settings: {error}") from None
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    text_tower = towers.load_text_tower(config.demo.text_tower)
    paths = prepare_data(config, config.demo.data_root or os.path.join(workdir, "data"), text_tower)
    pretrain(config, workdir, paths["watch"], paths.get("mocap", ""))
    if "primus" in config.demo.methods:
        export = os.path.join(workdir, "export")
        shutil.rmtree(export, ignore_errors=True)
        shutil.copytree(os.path.join(workdir, "pretrain", "primus", "export"), export)
    encoders = suite_encoders(workdir, config.demo.methods, config.seed + 1)
    result = suite.run_suite(encoders, suite_datasets(paths, settings), workdir, settings)
    print(open(os.path.join(workdir, "suite.md"), encoding="utf-8").read())
    print(f"demo finished in {time.perf_counter() - start:.0f} s; report: {workdir}/suite.md, suite.png, suite.json")
    return result
