"""data_prep.common helpers and the data_prep.har CLI on seglearn watch, aeon BasicMotions and CSV folders."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep import common, har
from primus_jax import towers
from primus_jax.data import load_split, read_manifest

G = common.STANDARD_GRAVITY
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------- common


def test_resample_keeps_levels_and_passband_and_removes_aliases():
    t = np.arange(500) / 50.0
    x = np.stack([np.full_like(t, G), np.sin(2 * np.pi * 1.0 * t), np.sin(2 * np.pi * 8.0 * t)], axis=1)
    down = common.resample(x.astype(np.float32), 50, 10)
    assert down.shape == (100, 3) and down.dtype == np.float32
    np.testing.assert_allclose(down[:, 0], G, atol=0.02)  # gravity stays level up to the edges
    t10 = np.arange(100) / 10.0
    np.testing.assert_allclose(down[10:-10, 1], np.sin(2 * np.pi * t10[10:-10]), atol=0.03)
    assert np.abs(down[10:-10, 2]).max() < 0.05  # 8 Hz is above the new 5 Hz Nyquist: filtered out
    up = common.resample(down[:, :2].astype(np.float64), 10, 50)
    assert up.shape == (500, 2) and up.dtype == np.float64
    np.testing.assert_allclose(up[50:-50, 1], np.sin(2 * np.pi * t[50:-50]), atol=0.03)
    np.testing.assert_array_equal(common.resample(x, 50, 50), x)
    with pytest.raises(ValueError, match="rates must be positive"):
        common.resample(x, 0, 50)


def test_windows_and_padding():
    np.testing.assert_array_equal(common.window_starts(10, 4, 3), [0, 3, 6])
    assert len(common.window_starts(3, 4, 1)) == 0
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    w = common.sliding_windows(x, 4, 3)
    assert w.shape == (3, 4, 2) and w[2, 0, 0] == 12
    assert common.sliding_windows(x[:3], 4, 3).shape == (0, 4, 2)
    assert common.pad_or_truncate(x, 12)[10:].sum() == 0 and common.pad_or_truncate(x, 4).shape == (4, 2)


@pytest.mark.parametrize(
    "t, duration, expected",
    [
        (3.7, 100.0, (1.0, 6.0)),  # [1.2, 6.2] floored
        (0.5, 100.0, (0.0, 5.0)),  # clamped at the start
        (99.0, 100.5, (95.0, 100.0)),  # clamped to [95.5, 100.5] at the end, then floored
        (2.0, 4.5, None),  # recording shorter than the window
    ],
)
def test_narration_window(t, duration, expected):
    assert common.narration_window(t, duration) == expected


def test_narration_window_without_flooring_and_other_widths():
    assert common.narration_window(3.7, 100.0, floor_seconds=False) == pytest.approx((1.2, 6.2))
    assert common.narration_window(10.0, 100.0, half=1.0) == (9.0, 11.0)
    with pytest.raises(ValueError, match="whole-second window"):
        common.narration_window(10.0, 100.0, half=1.25)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("#C C picks up the CPR dummy.", "picks up the cpr dummy"),
        ("C opens the Cupboard door!", "opens the cupboard door"),
        ("#O man X gives #unsure to C", "man x gives something to c"),
        ("  #C C   stirs   soup ...  ", "stirs soup"),
        ("#C C " + "a" * 200, "a" * 128),
    ],
)
def test_clean_narration(raw, clean):
    assert common.clean_narration(raw) == clean


def test_check_imu_reasons():
    rng = np.random.default_rng(0)
    good = np.concatenate([rng.normal(0, 1, (100, 3)) + [0, 0, G], rng.normal(0, 0.5, (100, 3))], axis=1)
    assert common.check_imu(good, "rec") is None
    nan = good.copy()
    nan[5, 4] = np.nan
    assert common.check_imu(nan, "rec").reason == "non-finite values"
    in_g = good.copy()
    in_g[:, :3] /= G
    problem = common.check_imu(in_g, "a.csv")
    assert problem.reason == "implausible acc units" and "a.csv" in problem.detail and "g units" in problem.detail
    gravity_free = good.copy()
    gravity_free[:, 2] -= G
    assert common.check_imu(gravity_free, "rec", expect_gravity=False) is None
    deg = good.copy()
    deg[:, 3:] *= 180 / np.pi * 60
    assert common.check_imu(deg, "rec").reason == "implausible gyro units"
    t = np.arange(100) / 50.0
    t[50:] += 1.0
    assert common.check_imu(good, "rec", timestamps_s=t).reason == "gap"
    assert common.check_imu(good[:, :5], "rec").reason == "bad shape"


def test_split_by_group_is_deterministic_and_whole():
    groups = [f"take{i}" for i in range(10)] * 3
    split = common.split_by_group(groups)
    assert split == common.split_by_group(list(reversed(groups)))
    assert set(split) == set(groups)
    assert sorted(list(split.values()).count(name) for name in ("train", "val", "test")) == [1, 1, 8]
    assert common.split_by_group(groups, seed=1) != split
    assert set(common.split_by_group(groups, {"a": 1, "b": 1}).values()) == {"a", "b"}
    with pytest.raises(ValueError, match="fractions"):
        common.split_by_group(groups, {"train": -1})


def test_report_counts_writes_and_requires_windows(tmp_path):
    report = common.Report("demo")
    report.drop("gap", "rec1: 2 s gap")
    report.drop("gap", "rec2: 3 s gap")
    with pytest.raises(common.NothingUsable, match=r"No usable window in demo input \(dropped: 2 x gap\)"):
        report.require_some("demo input")
    report.keep("train", 3)
    report.keep("val")
    report.require_some("demo input")
    written = json.loads(open(report.write(str(tmp_path))).read())
    assert written["kept"] == {"train": 3, "val": 1} and written["dropped"] == {"gap": 2}
    assert written["drop_examples"]["gap"] == ["rec1: 2 s gap", "rec2: 3 s gap"]
    assert "kept 4 windows" in report.summary() and "dropped 2 x gap" in report.summary()


# ------------------------------------------------------------------------------- har sources


@pytest.fixture(scope="module")
def watch_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("watch"))
    assert har.main(["--dataset", "watch", "--out", out, "--text-tower", "none"]) == 0
    return out


def test_watch_windows_are_si_and_split_by_subject(watch_dir):
    from seglearn.datasets import load_watch

    manifest = read_manifest(watch_dir)
    assert manifest["class_names"][:3] == ["pendulum", "abduction", "forward elevation"]
    assert manifest["text_dim"] == 0 and manifest["towers"] == {} and manifest["rate_hz"] == 50.0
    assert manifest["prompts"]["abduction"][0] == "a person doing shoulder abduction"
    assert all(len(p) == 5 for p in manifest["prompts"].values())
    train, heldout = load_split(watch_dir, "train"), load_split(watch_dir, "heldout")
    assert set(heldout["subject"]) == {"8", "9", "10"}
    assert set(train["subject"]) == {str(s) for s in range(1, 8)}
    for split in (train, heldout):
        assert split["imu"].shape[1:] == (250, 6)
        assert 9.0 < np.median(np.linalg.norm(split["imu"][..., :3], axis=-1)) < 11.5
        assert set(split["label"]) == set(range(7)) and not split["has_text"].any()
    # The first window of recording 0 is its first 250 samples with acc converted from g.
    raw = load_watch()["X"][0][:250] * [G, G, G, 1, 1, 1]
    first = [i for i, r in enumerate(train["recording_id"] + heldout["recording_id"]) if r.startswith("watch-000-")][0]
    np.testing.assert_allclose(np.concatenate([train["imu"], heldout["imu"]])[first], raw, rtol=1e-6, atol=1e-6)
    report = json.load(open(os.path.join(watch_dir, "report.json")))
    assert report["kept"] == {"heldout": len(heldout["label"]), "train": len(train["label"])}


def test_basicmotions_resampled_with_prompt_embeddings(tmp_path, tiny_clip_spec):
    from aeon.datasets import load_basic_motions

    out = str(tmp_path / "bm")
    text_tower = towers.load_text_tower(tiny_clip_spec)
    report = har.write_har_dataset(har.basicmotions_source(), out, text_tower=text_tower)
    assert report.kept == {"train": 120, "test": 120} and not report.dropped  # 10 s at 50 Hz: 3 windows
    train = load_split(out, "train")
    assert train["imu"].shape == (120, 250, 6)
    assert train["class_names"] == ["standing", "walking", "running", "badminton"]
    x, y = load_basic_motions(split="train")
    expected = common.resample(x[0].T, 10, 50)[125:375]
    np.testing.assert_allclose(train["imu"][1], expected, atol=1e-5)
    acc = np.linalg.norm(train["imu"][..., :3], axis=-1).mean(axis=1)
    assert acc[train["label"] == 2].mean() > 5 * acc[train["label"] == 0].mean()  # running vs standing
    assert train["has_text"].all() and train["text_emb"].shape == (120, 16)
    prompts = read_manifest(out)["prompts"]["standing"]
    prototype = text_tower.embed(prompts, progress=False).mean(axis=0)
    prototype /= np.linalg.norm(prototype)
    standing = train["label"] == 0
    np.testing.assert_allclose(train["text_emb"][standing], np.broadcast_to(prototype, (standing.sum(), 16)), atol=1e-5)
    assert set(np.array(train["text"])[standing]) == {"a person standing still"}
    assert not np.allclose(train["text_emb"][train["label"] == 1][0], prototype)  # one target per class
    assert read_manifest(out)["towers"]["text"]["name"] == "tiny-random-clip"


def write_csv(path, columns, rows):
    with open(path, "w") as f:
        f.write(",".join(columns) + "\n")
        f.writelines(",".join(f"{v:.6f}" for v in row) + "\n" for row in rows)


@pytest.fixture()
def csv_folder(tmp_path):
    rng = np.random.default_rng(0)
    n = 300  # 12 s at 25 Hz -> 600 samples at 50 Hz -> 3 windows with hop 125

    def imu_in_g():
        return np.concatenate([rng.normal(0, 0.05, (n, 3)) + [0, 0, 1], rng.normal(0, 0.3, (n, 3))], axis=1)

    t = np.arange(n) / 25.0
    write_csv(tmp_path / "walk1.csv", ["t", "ax", "ay", "az", "gx", "gy", "gz"], np.column_stack([t, imu_in_g()]))
    write_csv(tmp_path / "sit1.csv", har.CSV_IMU_COLUMNS, imu_in_g())
    write_csv(tmp_path / "wrong.csv", ["ax", "ay", "az", "wx", "wy", "wz"], imu_in_g())
    bad = imu_in_g()
    bad[10, 0] = np.nan
    write_csv(tmp_path / "nan.csv", har.CSV_IMU_COLUMNS, bad)
    write_csv(tmp_path / "short.csv", har.CSV_IMU_COLUMNS, imu_in_g()[:100])
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "file,label,subject\nwalk1.csv,walking,A\nsit1.csv,sit,B\nwrong.csv,walking,A\nnan.csv,sit,C\n"
        "missing.csv,sit,C\nshort.csv,walking,B\n,sit,A\n"
    )
    return tmp_path


def test_csv_folder_counts_bad_files_and_converts_units(csv_folder):
    out = str(csv_folder / "out")
    args = ["--dataset", "csv", "--csv-dir", str(csv_folder), "--labels", str(csv_folder / "labels.csv"),
            "--rate", "25", "--units", "g", "--heldout-subjects", "B", "--text-tower", "none", "--out", out]
    assert har.main(args) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["dropped"] == {
        "incomplete labels row": 1, "missing file": 1, "non-finite values": 1, "shorter than window": 1,
        "wrong columns": 1,
    }
    assert report["kept"] == {"heldout": 3, "train": 3}
    heldout, train = load_split(out, "heldout"), load_split(out, "train")
    assert heldout["class_names"] == ["sit", "walking"] and set(heldout["label"]) == {0} and set(train["label"]) == {1}
    assert set(heldout["subject"]) == {"B"} and set(train["recording_id"]) == {"walk1.csv"}
    assert abs(np.median(np.linalg.norm(heldout["imu"][..., :3], axis=-1)) - G) < 0.2  # g -> m/s^2
    assert heldout["text"][0] == "a person doing sit" and train["text"][0] == "a person walking"
    # The same files declared as SI look like g units and are all dropped: a clear error.
    assert har.main(args[:-1] + [str(csv_folder / "out_si"), "--units", "si"]) == 1


def test_csv_cli_fails_cleanly_when_nothing_is_usable(csv_folder):
    labels = csv_folder / "bad_labels.csv"
    labels.write_text("file,label\nwrong.csv,walking\nnan.csv,sit\nmissing.csv,sit\n")
    out = csv_folder / "nothing"
    result = subprocess.run(
        [sys.executable, "-m", "data_prep.har", "--dataset", "csv", "--csv-dir", str(csv_folder),
         "--labels", str(labels), "--rate", "25", "--text-tower", "none", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 1
    assert "error: No usable window in CSV folder" in result.stderr
    assert "1 x missing file" in result.stderr and "1 x wrong columns" in result.stderr
    assert not (out / "manifest.json").exists()
    assert json.load(open(out / "report.json"))["dropped"]["non-finite values"] == 1


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert har.main(["--dataset", "csv", "--out", str(tmp_path), "--text-tower", "none"]) == 1
    assert "--dataset csv needs --csv-dir, --labels, --rate" in capsys.readouterr().err
    labels = tmp_path / "labels.csv"
    labels.write_text("name,activity\na.csv,walking\n")
    assert har.main(["--dataset", "csv", "--csv-dir", str(tmp_path), "--labels", str(labels), "--rate", "50",
                     "--text-tower", "none", "--out", str(tmp_path / "o")]) == 1
    assert "lacks the columns 'file' and 'label'" in capsys.readouterr().err
    assert har.main(["--dataset", "watch", "--heldout-subjects", "11", "--out", str(tmp_path / "w"),
                     "--text-tower", "none"]) == 1
    assert "['11'] not among the subjects" in capsys.readouterr().err
    assert har.main(["--dataset", "watch", "--out", str(tmp_path / "w"), "--text-tower", "bogus"]) == 1
    assert "Unknown text tower spec 'bogus'" in capsys.readouterr().err


def _doc_har_source_example() -> str:
    """The Python block under docs/data_prep.md's "example: har source" marker."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "data_prep.md")
    block = open(path, encoding="utf-8").read().split("<!-- example: har source -->", 1)[1].split("```python", 1)[1]
    return block.split("```", 1)[0]


def test_doc_source_example_prepares_a_dataset(tmp_path):
    namespace = {}
    exec(compile(_doc_har_source_example(), "docs/data_prep.md example", "exec"), namespace)
    folder = tmp_path / "raw"
    folder.mkdir()
    t = np.arange(600) / 100.0  # 6 s at 100 Hz
    for subject in ("s1", "s2", "s3"):
        for c, label in enumerate(("sit", "walk", "stairs")):
            acc_g = np.stack([0.1 * np.sin(2 * np.pi * (c + 1) * t), np.zeros_like(t), np.ones_like(t)], axis=1)
            gyro_deg = np.stack([np.full_like(t, 90.0), np.zeros_like(t), np.zeros_like(t)], axis=1)
            rows = np.concatenate([1000 * t[:, None], acc_g, gyro_deg], axis=1)
            np.savetxt(folder / f"{subject}_{label}_0.csv", rows, delimiter=",",
                       header="time_ms,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z", comments="")
    np.savetxt(folder / "s1_jump_0.csv", rows, delimiter=",", header="time_ms,a,b,c,d,e,f", comments="")
    out = str(tmp_path / "my_har")
    report = har.write_har_dataset(namespace["my_har_source"](str(folder)), out, T=250, rate_hz=50.0)
    assert report.as_dict()["dropped"] == {"unknown label": 1}
    manifest = read_manifest(out)
    assert manifest["class_names"] == ["sit", "walk", "stairs"] and manifest["rate_hz"] == 50.0
    heldout = load_split(out, "heldout")
    assert set(heldout["subject"]) == {"s3"} and sorted(heldout["label"]) == [0, 1, 2]
    imu = heldout["imu"]  # 6 s at 50 Hz = 300 samples: one window of 250 per recording
    assert imu.shape == (3, 250, 6)
    np.testing.assert_allclose(imu[:, :, 2], common.STANDARD_GRAVITY, rtol=1e-4)  # g -> m/s^2
    np.testing.assert_allclose(imu[:, :, 3], np.pi / 2, rtol=1e-4)  # 90 deg/s -> rad/s
    assert len(load_split(out, "train")["label"]) == 6
