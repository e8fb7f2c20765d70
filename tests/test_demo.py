"""The demo of configs/demo.py, shrunk by overrides, runs end to end from nothing and reports."""
from __future__ import annotations

import json
import os

import numpy as np

import primus_jax
from tests.train_fixtures import run_main

SHRINK = [
    "--config.train.num_steps=3", "--config.demo.baseline_steps=2", "--config.train.global_batch_size=16",
    "--config.queue.size=64", "--config.model.hidden_dim=32", "--config.model.conv_channels=8",
    "--config.model.ssl_dim=16", "--config.demo.shots=(1,2)", "--config.demo.table_shots=2",
    "--config.demo.trials=2", "--config.demo.probe_steps=20", "--config.demo.watch_hop=250",
    "--config.demo.methods=('primus','multitask_ssl')",
]


def test_shrunk_demo_prepares_pretrains_evaluates_with_the_suite_and_exports(tmp_path):
    workdir = str(tmp_path / "demo")
    proc = run_main(workdir, SHRINK, devices=1, config="configs/demo.py")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]

    for name in ("watch", "basicmotions"):  # prepared by data_prep.har, with its report
        assert os.path.exists(os.path.join(workdir, "data", name, "manifest.json"))
        assert json.load(open(os.path.join(workdir, "data", name, "report.json")))["kept"]
    assert json.load(open(os.path.join(workdir, "data", "watch", "manifest.json")))["hop"] == 250
    assert json.load(open(os.path.join(workdir, "data", "basicmotions", "manifest.json")))["hop"] == 125
    for method, steps in (("primus", 3), ("multitask_ssl", 2)):
        lines = open(os.path.join(workdir, "pretrain", method, "metrics.jsonl")).read().splitlines()
        assert json.loads(lines[-1])["step"] == steps
    result = json.load(open(os.path.join(workdir, "suite.json")))
    assert set(result["results"]) == {"watch (held-out subjects)", "BasicMotions"}
    watch = result["results"]["watch (held-out subjects)"]
    assert watch["split"].startswith("subject-disjoint: test = subjects ['10']")
    ood = result["results"]["BasicMotions"]
    assert ood["num_classes"] == 4 and ood["test_windows"] == 120
    assert set(ood["methods"]) == {f"{m} ({h})" for m in ("PRIMUS", "MultitaskSSL", "random init")
                                   for h in ("ssl", "mmcl")} | {"statistics (per-channel)"}
    for method in ood["methods"].values():
        for k in ("1", "2"):
            stats = method["few_shot"][k]
            assert len(stats["accuracies"]) == 2 and 0.0 <= stats["mean"] <= 1.0
    assert "zero_shot" in ood["methods"]["PRIMUS (mmcl)"]
    assert ood["methods"]["MultitaskSSL (mmcl)"]["zero_shot_skipped"] == "the encoder learnt no text"
    table = open(os.path.join(workdir, "suite.md")).read()
    assert "| BasicMotions |" in table and "statistics (per-channel)" in table and "PRIMUS (ssl)" in table
    assert table in out  # the demo prints its report
    with open(os.path.join(workdir, "suite.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    encode = primus_jax.load_encoder(os.path.join(workdir, "export"))
    features = encode(np.zeros((3, 250, 6), np.float32))
    assert features.shape == (3, 384) and np.all(np.isfinite(features))
