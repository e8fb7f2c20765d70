"""data_prep.ego4d on a small Ego4D v1 tree built in tmp_path: IMU CSVs, narration.json, mp4s."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep import ego4d
from primus_jax.data import BatchIterator, load_split, read_manifest
from test_video import write_index_video

RATE_IN = 200.0
COLUMNS = ["component_idx", "component_timestamp_ms", "canonical_timestamp_ms",
           "gyro_x", "gyro_y", "gyro_z", "accl_x", "accl_y", "accl_z"]


def imu_signal(times_s):
    """(N, 6) acc [m/s^2], gyro [rad/s]: slow sines on top of gravity, exactly known at any time."""
    t = np.asarray(times_s)
    return np.stack([0.8 * np.sin(2 * np.pi * 1.0 * t), 0.3 + 0.0 * t, 9.81 + 0.2 * np.cos(2 * np.pi * 0.5 * t),
                     0.4 * np.cos(2 * np.pi * 0.7 * t), 0.05 + 0.0 * t, -0.1 + 0.0 * t], axis=1)


def write_imu_csv(path, seconds=30.0, *, start_ms=0.0, nan_at=None, gap_at=None, columns=COLUMNS):
    """An Ego4D IMU CSV at ~200 Hz with timestamp jitter; optional NaN rows or a 1 s hole."""
    rng = np.random.default_rng(0)
    times = np.arange(0, seconds, 1 / RATE_IN) + rng.uniform(-4e-4, 4e-4, int(round(seconds * RATE_IN)))
    times[0] = 0.0
    if gap_at is not None:
        times = times[(times < gap_at - 0.5) | (times > gap_at + 0.5)]
    values = imu_signal(times)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i, (t, v) in enumerate(zip(times, values)):
            cells = {"component_idx": 0, "component_timestamp_ms": t * 1000, "canonical_timestamp_ms": start_ms + t * 1000,
                     "accl_x": v[0], "accl_y": v[1], "accl_z": v[2], "gyro_x": v[3], "gyro_y": v[4], "gyro_z": v[5]}
            if nan_at is not None and abs(t - nan_at) < 0.02:
                cells["gyro_y"] = ""
            writer.writerow([cells.get(name, 1.0) for name in columns])


def narration(t, text):
    return {"timestamp_sec": t, "timestamp_frame": int(t * 30), "narration_text": text, "annotation_uid": "a"}


# video uid -> (narrations, what the IMU / video files look like)
NARRATIONS = {
    "good": [narration(3.2, "#C C picks up a CPR mannequin."), narration(10.7, "#C C opens the #unsure"),
             narration(28.9, "#C C closes the door"), narration(45.0, "#C C sits"), narration(12.0, "#C C  ")],
    "nan": [narration(10.0, "#C C cuts a tomato"), narration(20.0, "#C C washes a knife")],
    "gap": [narration(15.0, "#C C walks"), narration(5.0, "#C C runs")],
    "novideo": [narration(6.0, "#C C reads a book")],
    "corrupt": [narration(6.0, "#C C paints a wall")],
    "badcols": [narration(6.0, "#C C eats"), narration(8.0, "#C C drinks")],
    "noimu": [narration(6.0, "#C C sings")] * 3,
}


def make_ego4d_root(root, videos=NARRATIONS):
    v1 = root / "v1"
    (v1 / "annotations").mkdir(parents=True)
    content = {uid: {"narration_pass_1": {"narrations": items, "summaries": []}} for uid, items in videos.items()}
    (v1 / "annotations" / "narration.json").write_text(json.dumps(content))
    (v1 / "full_scale").mkdir()
    for uid in videos:
        imu = str(v1 / "imu" / f"{uid}.csv")
        if uid == "nan":
            write_imu_csv(imu, nan_at=10.0)
        elif uid == "gap":
            write_imu_csv(imu, gap_at=15.0)
        elif uid == "badcols":
            write_imu_csv(imu, seconds=10, columns=[c.replace("accl", "acc") for c in COLUMNS])
        elif uid != "noimu":
            write_imu_csv(imu)
        if uid in ("good", "nan", "gap"):
            write_index_video(v1 / "full_scale" / f"{uid}.mp4", seconds=30)
        elif uid == "corrupt":
            (v1 / "full_scale" / f"{uid}.mp4").write_bytes(b"not an mp4 at all" * 100)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_clip_spec):
    root = make_ego4d_root(tmp_path_factory.mktemp("ego4d"))
    out = root / "out"
    status = ego4d.main(["--ego4d-root", str(root), "--out", str(out), "--towers", tiny_clip_spec,
                         "--splits", "train=0.5", "val=0.5", "--frames-per-clip", "4"])
    assert status == 0
    records = {}
    for split in read_manifest(str(out))["splits"]:
        loaded = load_split(str(out), split)
        for i, text in enumerate(loaded["text"]):
            records[(loaded["recording_id"][i], text)] = {
                key: loaded[key][i] for key in ("imu", "has_video", "video_emb", "text_emb", "start_s", "end_s")
            } | {"split": split}
    return out, records, json.loads((out / "report.json").read_text())


def test_report_counts_every_kind_of_bad_input(prepared):
    _, _, report = prepared
    assert report["dropped"] == {
        "bad columns": 2, "missing imu": 3, "non-finite values": 1, "gap": 1, "out of range": 1, "empty text": 1,
    }
    assert report["kept_without_video"] == {"missing video": 1, "unreadable video": 1}
    assert report["total_kept"] == 3 + 1 + 1 + 1 + 1


def test_records_hold_clean_text_windows_and_embeddings(prepared):
    out, records, _ = prepared
    manifest = read_manifest(str(out))
    assert manifest["T"] == 250 and manifest["rate_hz"] == 50.0
    assert set(records) == {
        ("good", "picks up a cpr mannequin"), ("good", "opens the something"), ("good", "closes the door"),
        ("nan", "washes a knife"), ("gap", "runs"), ("novideo", "reads a book"), ("corrupt", "paints a wall"),
    }
    for (uid, _), record in records.items():
        assert record["imu"].shape == (250, 6) and np.all(np.isfinite(record["imu"]))
        assert record["end_s"] - record["start_s"] == pytest.approx(5.0)
        assert record["has_video"] == (uid not in ("novideo", "corrupt"))
        assert np.linalg.norm(record["text_emb"]) == pytest.approx(1.0, abs=1e-4)
    assert len({records[key]["split"] for key in records if key[0] == "good"}) == 1  # videos never straddle
    assert (records[("good", "closes the door")]["start_s"], records[("good", "closes the door")]["end_s"]) == (24.0, 29.0)
    assert not np.allclose(records[("good", "closes the door")]["video_emb"], records[("good", "opens the something")]["video_emb"])


def test_window_imu_is_the_signal_on_the_50hz_grid(prepared):
    _, records, _ = prepared
    record = records[("good", "opens the something")]
    assert (record["start_s"], record["end_s"]) == (8.0, 13.0)
    expected = imu_signal(8.0 + np.arange(250) / 50.0)
    np.testing.assert_allclose(record["imu"][5:-5], expected[5:-5], atol=0.02)
    np.testing.assert_allclose(record["imu"], expected, atol=0.1)


def test_written_shards_feed_the_batch_iterator(prepared):
    out, records, _ = prepared
    split = next(iter(read_manifest(str(out))["splits"]))
    batch = next(BatchIterator(str(out), split, 1, shuffle=False, process_index=0, process_count=1, prefetch=0))
    assert batch["imu"].shape == (1, 250, 6) and batch["has_text"].tolist() == [True]
    assert batch["text_emb"].shape[1] > 0 and batch["video_emb"].shape[1] > 0


def test_non_numeric_imu_value_names_file_line_and_column(tmp_path):
    path = tmp_path / "v.csv"
    path.write_text("canonical_timestamp_ms,accl_x,accl_y,accl_z,gyro_x,gyro_y,gyro_z\n0,1,2,9.8,0,0,0\n5,1,x,9.8,0,0,0\n")
    with pytest.raises(ego4d.ImuFileError, match=r"v\.csv line 3: accl_y is 'x', not a number") as error:
        ego4d.read_imu_csv(str(path))
    assert error.value.reason == "bad values"


def test_nothing_usable_exits_non_zero_with_one_clear_sentence(tmp_path):
    root = make_ego4d_root(tmp_path / "root", {"badcols": NARRATIONS["badcols"], "noimu": NARRATIONS["noimu"]})
    result = subprocess.run(
        [sys.executable, "-m", "data_prep.ego4d", "--ego4d-root", str(root), "--out", str(tmp_path / "out"),
         "--towers", "none"],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(ego4d.__file__))),
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("error: No usable window in Ego4D root")
    assert "2 x bad columns" in result.stderr and "3 x missing imu" in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["dropped"] == {"bad columns": 2, "missing imu": 3}
