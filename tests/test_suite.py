"""The evaluation suite on tiny real-format datasets and a tiny exported encoder."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from primus_jax import checkpoint, data, models, suite

T, RATE, DIM = 128, 50.0, 16
TINY_MODEL = {"hidden_dim": 32, "conv_channels": 8, "ssl_dim": DIM, "mm_dim": DIM}
SETTINGS = suite.SuiteSettings(shots=(1, 2, 5), trials=2, table_shots=2)
TOWER = {"name": "tiny", "dim": DIM, "source": "test"}


def write_labelled(out_dir, *, subjects=("s1", "s2", "s3"), per_class=(4, 4, 2), class_names=("sit", "walk", "run"),
                   splits=("heldout",), rate=RATE, length=T, text=True, seed=0):
    """Windows whose class sets gravity's axis and the motion's frequency; class c has per_class[c] per subject."""
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((len(class_names), DIM)).astype(np.float32)
    with data.DatasetWriter(out_dir, T=length, rate_hz=rate, text_dim=DIM if text else 0, video_dim=0,
                            class_names=list(class_names), towers={"text": TOWER} if text else {}) as writer:
        for s_index, subject in enumerate(subjects):
            for c, count in enumerate(per_class):
                for i in range(count):
                    t = np.arange(length)[:, None] / rate
                    imu = 0.5 * np.sin(2 * np.pi * (1 + c) * t + rng.uniform(0, 6, 6)) + 0.1 * rng.standard_normal((length, 6))
                    imu[:, c % 3] += 9.81
                    writer.add(splits[s_index % len(splits)], data.Window(
                        imu=imu.astype(np.float32), rate_hz=rate, text=class_names[c],
                        text_emb=prototypes[c] if text else None, label=c, source="test",
                        recording_id=f"{subject or 'rec'}{s_index}-{i}-{c}", subject=subject, start_s=0.0, end_s=length / rate))
    return str(out_dir)


def export_tiny(export_dir, text_tower=TOWER, length=T):
    model = models.IMUEncoder(**TINY_MODEL)
    params = model.init(jax.random.PRNGKey(7), np.zeros((1, length, 6), np.float32))["params"]
    checkpoint.export_encoder(export_dir, params, dict(TINY_MODEL), length, RATE, text_tower=text_tower)
    return str(export_dir)


def test_suite_cli_writes_tables_resumes_and_skips_unlabelled(tmp_path, capsys):
    watch = write_labelled(tmp_path / "watch")  # subjects known: test = the last subject, s3
    motions = write_labelled(tmp_path / "motions", subjects=("a", "b"), per_class=(3, 3, 3),
                             splits=("train", "test"), rate=25.0, length=64, seed=1)  # resampled 25 -> 50 Hz
    with data.DatasetWriter(str(tmp_path / "nolabels"), T=T, rate_hz=RATE, text_dim=0, video_dim=0) as writer:
        writer.add("train", data.Window(imu=np.zeros((T, 6), np.float32) + [0, 0, 9.81, 0, 0, 0], rate_hz=RATE))
    export = export_tiny(tmp_path / "pretrained" / "export")
    out = str(tmp_path / "suite")
    argv = ["--encoder", f"tiny={tmp_path / 'pretrained'}", "--encoder", "random", "--dataset", watch,
            "--dataset", f"motions={motions}", "--dataset", str(tmp_path / "nolabels"), "--out", out,
            "--shots", "1,2,5", "--table-shots", "2", "--trials", "2"]
    assert os.path.isdir(export)
    assert suite.main(argv) == 0
    result = json.load(open(os.path.join(out, "suite.json")))
    assert result["datasets"]["nolabels"]["skipped"].endswith("names 0 class names (a labelled dataset has >= 2)")
    assert "skipped dataset nolabels" in capsys.readouterr().err
    w = result["results"]["watch"]
    assert w["split"].startswith("subject-disjoint: test = subjects ['s3']") and w["test_windows"] == 10
    text_prior = f"tiny (mmcl, {suite.TEXT_PRIOR})"  # the tiny export learnt the dataset's text space
    assert set(w["methods"]) == {"tiny", text_prior, "random init", suite.STATISTICS}
    assert set(w["methods"][text_prior]["few_shot"]) == {"1", "2"}
    for stats in w["methods"]["tiny"]["few_shot"].values():  # each trial's C and convergence are kept
        assert len(stats["c"]) == len(stats["converged"]) == 2 and all(c > 0 for c in stats["c"])
    assert w["methods"]["tiny"]["few_shot"]["2"]["c_selection"] == ["2-fold cross-validation"] * 2
    # Class "run" has 4 training windows (2 per subject), so 5 shots are n/a; 1 and 2 ran 2 trials each.
    assert set(w["methods"]["tiny"]["few_shot"]) == {"1", "2"}
    assert all(len(v["accuracies"]) == 2 for v in w["methods"]["tiny"]["few_shot"].values())
    assert 0.0 <= w["methods"]["tiny"]["zero_shot"] <= 1.0
    assert w["methods"]["random init"]["zero_shot_skipped"] == "the encoder learnt no text"
    m = result["results"]["motions"]
    assert m["split"] == "the dataset's given train / test splits" and m["test_windows"] == 9
    assert set(m["methods"]["tiny"]["few_shot"]) == {"1", "2"}  # 3 training windows per class
    # The statistics floor separates these classes (gravity axis, frequency) from 2 shots on.
    assert m["methods"][suite.STATISTICS]["few_shot"]["2"]["mean"] >= 0.9
    md = open(os.path.join(out, "suite.md")).read()
    assert "## 2-shot accuracy" in md and "| **mean rank** |" in md
    for item in ("- **Probe** on frozen features: multinomial logistic regression", "C chosen per trial by stratified",
                 "- **Standardisation**:", "- **Shots and trials**: k in {1, 2, 5}", "- **Split**:"):
        assert item in md, item
    assert "Probe C per shot count" in md
    assert "| 1-shot | 2-shot | 5-shot | zero-shot |" in md and "| n/a |" in md
    assert "nolabels: skipped" in md
    with open(os.path.join(out, "suite.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # A killed run: one cell and the tables lost. The rerun redoes that cell only.
    cells = sorted(os.listdir(os.path.join(out, "cells")))
    assert len(cells) == 6 and not any(c.endswith(".tmp") for c in cells)
    stamps = {c: os.stat(os.path.join(out, "cells", c)).st_mtime_ns for c in cells}
    os.remove(os.path.join(out, "cells", "random_init--motions.json"))
    os.remove(os.path.join(out, "suite.json"))
    assert suite.main(argv) == 0
    for c in cells:
        changed = os.stat(os.path.join(out, "cells", c)).st_mtime_ns != stamps[c]
        assert changed == (c == "random_init--motions.json"), c
    assert json.load(open(os.path.join(out, "suite.json")))["results"] == result["results"]


def test_suite_refuses_an_encoder_whose_window_length_cannot_be_met(tmp_path, capsys):
    watch = write_labelled(tmp_path / "watch")
    export = export_tiny(tmp_path / "export", length=200)
    assert suite.main(["--encoder", export, "--dataset", watch, "--out", str(tmp_path / "out"),
                       "--shots", "1", "--trials", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: encoder export takes 200 samples at 50 Hz but dataset watch has windows of 128 samples at 50 Hz (128 at 50 Hz): prepare it with data_prep.har --target-rate 50 --T 200.\n")
    assert not os.path.exists(tmp_path / "out" / "cells")


def test_recording_disjoint_split_without_subjects(tmp_path):
    path = write_labelled(tmp_path / "d", subjects=("", "", ""), per_class=(3, 3, 3), splits=("all",))
    dataset = suite.load_dataset_spec(f"d={path}@all", SETTINGS)
    assert dataset.split_rule.startswith("recording-disjoint")
    assert not dataset.skipped and dataset.train[1].size + dataset.test[1].size == 27
    with pytest.raises(suite.SuiteError, match="no split"):
        suite.load_dataset_spec(f"{path}@val", SETTINGS)


def test_mean_ranks_share_ties():
    ranks = suite.mean_ranks({"a": {"x": 0.9, "y": 0.5, "z": 0.5}, "b": {"x": 0.2, "y": 0.8, "z": None}})
    assert ranks == {"x": 1.5, "y": 1.75, "z": 2.5}


def test_reference_checkpoint_is_scored_on_resampled_windows_without_zero_shot(tmp_path):
    import torch  # in the test extra (the optional extra primus_jax[torch] for users)

    from tests.test_convert import random_state_dict

    checkpoint = tmp_path / "best_model.ckpt"
    state = {f"imu_encoder.{k}": torch.from_numpy(v) for k, v in random_state_dict(seed=3).items()}
    torch.save({"state_dict": state, "hyper_parameters": {"lr": 2e-4}}, checkpoint)
    path = write_labelled(tmp_path / "d", per_class=(2, 2, 2), rate=25.0, length=125)  # 5 s at 25 Hz
    encoder = suite.load_encoder_spec(f"released={checkpoint}")
    dataset = suite.load_dataset_spec(path, SETTINGS)
    assert suite.fit_windows(encoder, dataset, dataset.test[0]).shape == (6, 250, 6)
    settings = suite.SuiteSettings(shots=(1,), trials=1, table_shots=1)
    result = suite.run_suite([encoder], [dataset], str(tmp_path / "out"), settings, progress=False)
    entry = result["results"]["d"]["methods"]["released"]
    assert 0.0 <= entry["few_shot"]["1"]["mean"] <= 1.0
    assert entry["zero_shot_skipped"] == "the encoder learnt clip (reference) text, the dataset holds tiny embeddings"
