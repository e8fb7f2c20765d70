"""data_prep.egoexo4d on a small Ego-Exo4D tree: takes.json, atomic descriptions, IMU CSVs, mp4s."""
import json
import sys

import numpy as np
import pytest

from data_prep import egoexo4d
from primus_jax.data import load_split, read_manifest
from test_ego4d import imu_signal, write_imu_csv
from test_video import write_index_video

TAKES = [
    {"take_uid": "uid-a", "take_name": "cmu_bike01_2", "root_dir": "takes/cmu_bike01_2", "participant_uid": 7},
    {"take_uid": "uid-b", "take_name": "upenn_dance_3", "root_dir": "takes/upenn_dance_3"},
    {"take_uid": "uid-c", "take_name": "sfu_cooking_1", "root_dir": "takes/sfu_cooking_1"},
]


def description(t, text):
    return {"text": text, "timestamp": t, "narration_subject": "C", "ego_visible": "1", "unsure": "0",
            "best_exo": {"raw_cam_id": "1", "cam_id": "cam01"}}


def annotation(descriptions, rejected=False):
    return {"annotation_uid": "x", "annotator_id": "1", "rejected": rejected, "reject_reason": None,
            "descriptions": descriptions}


TRAIN = {
    "uid-a": [annotation([description(4.0, "C turns the pedal."), description(12.3, "C lifts the wheel.")]),
              annotation([description(6.0, "C drops the bike.")], rejected=True),
              annotation([description(12.3, "C holds the wheel with his left hand.")])],
    "uid-b": [annotation([description(2.0, "C spins around.")])],
}
VAL = {"uid-c": [annotation([description(9.5, "C stirs the pot.")])]}


def make_egoexo_root(root, val=VAL):
    (root / "annotations").mkdir(parents=True)
    (root / "takes.json").write_text(json.dumps(TAKES))
    for split, content in (("train", TRAIN), ("val", val)):
        (root / "annotations" / f"atomic_descriptions_{split}.json").write_text(json.dumps({"annotations": content}))
    for take in TAKES:
        (root / take["root_dir"] / "frame_aligned_videos").mkdir(parents=True)
    # IMU clock starts at an arbitrary device time; the take's first sample is moved to 0 s.
    write_imu_csv(str(root / "imu" / "cmu_bike01_2.csv"), seconds=20, start_ms=5_000_000.0)
    write_imu_csv(str(root / "imu" / "sfu_cooking_1.csv"), seconds=20)
    write_index_video(root / "takes/cmu_bike01_2/frame_aligned_videos/aria01_214-1.mp4", seconds=20)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_clip_spec):
    root = make_egoexo_root(tmp_path_factory.mktemp("egoexo"))
    out = root / "out"
    assert egoexo4d.main(["--root", str(root), "--out", str(out), "--towers", tiny_clip_spec, "--imu-format", "csv",
                          "--frames-per-clip", "4"]) == 0
    return root, out


def test_official_splits_texts_and_report(prepared):
    _, out = prepared
    assert set(read_manifest(str(out))["splits"]) == {"train", "val"}
    train, val = load_split(str(out), "train"), load_split(str(out), "val")
    assert train["text"] == ["turns the pedal", "lifts the wheel", "holds the wheel with his left hand"]
    assert set(train["recording_id"]) == {"uid-a"} and set(train["subject"]) == {"7"}
    assert train["has_video"].all() and np.all(train["start_s"] == [1.0, 9.0, 9.0])
    assert val["text"] == ["stirs the pot"] and not val["has_video"].any()
    report = json.loads((out / "report.json").read_text())
    assert report["dropped"] == {"missing imu": 1}
    assert report["kept_without_video"] == {"missing video": 1}
    assert report["kept"] == {"train": 3, "val": 1}


def test_imu_clock_is_shifted_to_the_first_sample(prepared):
    _, out = prepared
    train = load_split(str(out), "train")
    assert train["imu"].shape == (3, 250, 6)
    expected = imu_signal(9.0 + np.arange(250) / 50.0)
    np.testing.assert_allclose(train["imu"][1][5:-5], expected[5:-5], atol=0.02)


def test_require_video_drops_windows_without_video(prepared, tmp_path, tiny_clip_spec):
    root, _ = prepared
    out = tmp_path / "out"
    assert egoexo4d.main(["--root", str(root), "--out", str(out), "--towers", tiny_clip_spec, "--imu-format", "csv",
                          "--frames-per-clip", "4", "--require-video"]) == 0
    assert set(read_manifest(str(out))["splits"]) == {"train"}
    report = json.loads((out / "report.json").read_text())
    assert report["dropped"] == {"missing imu": 1, "missing video": 1} and report["kept_without_video"] == {}


def test_vrs_without_projectaria_tools_says_how_to_install(prepared, tmp_path, monkeypatch, capsys, tiny_clip_spec):
    root, _ = prepared
    # None in sys.modules makes the import fail, also where another test imported the real package
    for name in ["projectaria_tools", *(n for n in sys.modules if n.startswith("projectaria_tools."))]:
        monkeypatch.setitem(sys.modules, name, None)
    status = egoexo4d.main(["--root", str(root), "--out", str(tmp_path / "out"), "--towers", tiny_clip_spec])
    assert status == 1
    assert "install primus_jax[aria] (projectaria-tools) to read VRS" in capsys.readouterr().err


def test_described_take_missing_from_takes_json_is_named(tmp_path, capsys, tiny_clip_spec):
    root = make_egoexo_root(tmp_path / "root", val={"uid-zzz": [annotation([description(1.0, "C waves.")])]})
    status = egoexo4d.main(["--root", str(root), "--out", str(tmp_path / "out"), "--imu-format", "csv",
                            "--towers", tiny_clip_spec])
    assert status == 1
    error = capsys.readouterr().err
    assert "atomic_descriptions_val.json" in error and "uid-zzz" in error and "takes.json" in error
