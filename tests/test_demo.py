"""The demo of configs/demo.py, shrunk by overrides, runs end to end from nothing and reports."""
from __future__ import annotations

import json
import os

import numpy as np

import primus_jax
from tests.train_fixtures import run_main

SHRINK = [
    "--config.train.num_steps=3", "--config.train.global_batch_size=16", "--config.queue.size=64",
    "--config.model.hidden_dim=32", "--config.model.conv_channels=8", "--config.model.ssl_dim=16",
    "--config.demo.shots=(1,2)", "--config.demo.trials=2", "--config.demo.probe_steps=20",
    "--config.demo.finetune_steps=2", "--config.demo.finetune_batch_size=8",
    "--config.demo.methods=('primus','simclr')",
]


def test_shrunk_demo_prepares_pretrains_evaluates_reports_and_exports(tmp_path):
    workdir = str(tmp_path / "demo")
    proc = run_main(workdir, SHRINK, devices=1, config="configs/demo.py")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]

    for name in ("watch", "basicmotions"):  # prepared by data_prep.har, with its report
        assert os.path.exists(os.path.join(workdir, "data", name, "manifest.json"))
        assert json.load(open(os.path.join(workdir, "data", name, "report.json")))["kept"]
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert len(results) == 4  # {in-domain, out-of-domain} x {ssl, mmcl} features
    ood = results["out-of-domain (BasicMotions), mmcl features"]
    assert ood["num_classes"] == 4 and ood["test_windows"] == 120
    assert set(ood["methods"]) == {"random init (frozen)", "PRIMUS", "SimCLR-only",
                                   "standard training (random init, end to end)"}
    for method in ood["methods"].values():
        for k in ("1", "2"):
            stats = method["few_shot"][k]
            assert len(stats["accuracies"]) == 2 and 0.0 <= stats["mean"] <= 1.0
    assert "zero_shot" in ood["methods"]["PRIMUS"] and "zero_shot" not in ood["methods"]["SimCLR-only"]
    table = open(os.path.join(workdir, "results.md")).read()
    assert "| PRIMUS |" in table and "out-of-domain (BasicMotions)" in table
    with open(os.path.join(workdir, "accuracy_vs_shots.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    encode = primus_jax.load_encoder(os.path.join(workdir, "export"))
    features = encode(np.zeros((3, 250, 6), np.float32))
    assert features.shape == (3, 384) and np.all(np.isfinite(features))
