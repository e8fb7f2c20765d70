"""The demo of configs/demo.py, shrunk by overrides, runs end to end from nothing and reports."""
from __future__ import annotations

import json
import os

import numpy as np

import primus_jax
from tests.train_fixtures import run_main

SHRINK = [
    "--config.train.num_steps=3", "--config.demo.comparison_steps=2", "--config.demo.seeds=2", "--config.train.global_batch_size=16",
    "--config.queue.size=64", "--config.model.hidden_dim=32", "--config.model.conv_channels=8",
    "--config.model.ssl_dim=16", "--config.demo.shots=(1,2)", "--config.demo.table_shots=2",
    "--config.demo.trials=2", "--config.demo.watch_hop=250",
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
    for method, seed, steps in (("primus", 0, 3), ("primus", 1, 2), ("multitask_ssl", 0, 2), ("multitask_ssl", 1, 2)):
        run = os.path.join(workdir, "pretrain", method, f"seed{seed}")
        records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")).read().splitlines()]
        assert records[-1]["step"] == steps  # PRIMUS seed 0 continued past the comparison step
        assert os.path.exists(os.path.join(run, "export-step2", "encoder.json"))
        if method == "multitask_ssl":  # its pretext tasks scored on the held-out subjects
            val = [r for r in records if r["split"] == "val"]
            assert val and 0.0 <= val[-1]["accuracy_time_flip"] <= 1.0
    result = json.load(open(os.path.join(workdir, "suite.json")))
    assert set(result["results"]) == {"watch (held-out subjects)", "BasicMotions"}
    watch = result["results"]["watch (held-out subjects)"]
    assert watch["split"].startswith("subject-disjoint: test = subjects ['10']")
    ood = result["results"]["BasicMotions"]
    assert ood["num_classes"] == 4 and ood["test_windows"] == 120
    assert set(ood["methods"]) == ({f"{m} s{seed} ({h})" for m in ("PRIMUS", "MultitaskSSL", "random init")
                                    for seed in (0, 1) for h in ("ssl", "mmcl")}
                                   | {f"PRIMUS s{seed} (mmcl, text-prior start)" for seed in (0, 1)}
                                   | {"statistics (per-channel)"})
    for method in ood["methods"].values():
        for k in ("1", "2"):
            stats = method["few_shot"][k]
            assert len(stats["accuracies"]) == 2 and 0.0 <= stats["mean"] <= 1.0
    assert "zero_shot" in ood["methods"]["PRIMUS s1 (mmcl)"]
    assert ood["methods"]["MultitaskSSL s0 (mmcl)"]["zero_shot_skipped"] == "the encoder learnt no text"
    table = open(os.path.join(workdir, "suite.md")).read()
    assert "| BasicMotions |" in table and "statistics (per-channel)" in table and "PRIMUS s0 (ssl)" in table
    assert table in out  # the demo prints its reports
    comparison = open(os.path.join(workdir, "demo.md")).read()
    assert comparison in out and "pretrained for **2 steps**" in comparison and "to **3 steps**" in comparison
    # One row per method, mean ± s.e. over the two seeds of the per-seed trial means.
    header = next(line for line in comparison.splitlines() if line.startswith("| method |")).split(" | ")
    row = next(line for line in comparison.splitlines() if line.startswith("| PRIMUS |")).split(" | ")
    cell = row[header.index("BasicMotions, ssl")]
    per_seed = [ood["methods"][f"PRIMUS s{seed} (ssl)"]["few_shot"]["2"]["mean"] for seed in (0, 1)]
    assert cell == f"{np.mean(per_seed):.3f} ± {np.std(per_seed, ddof=1) / np.sqrt(2):.3f}"
    assert "| PRIMUS (text-prior start) |" in comparison and "transformation recognition" in comparison
    with open(os.path.join(workdir, "suite.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    encode = primus_jax.load_encoder(os.path.join(workdir, "export"))
    features = encode(np.zeros((3, 250, 6), np.float32))
    assert features.shape == (3, 384) and np.all(np.isfinite(features))


def test_ordering_claims_only_gaps_beyond_the_standard_errors():
    from primus_jax import demo

    column = {"B": {"mean": 0.77, "se": 0.01}, "A": {"mean": 0.80, "se": 0.01}, "C": {"mean": 0.765, "se": 0.01},
              "floor": {"mean": 0.5, "se": None}}
    assert demo.ordering(column) == "A > B ≈ C ≈ floor"  # 0.03 > 0.02; 0.005 < 0.02; no error: no claim
