"""data_prep.egoexo4d.read_vrs_imu on a real Project Aria (gen 1) recording, with projectaria-tools.

The fixture (0.4 s of IMU: stream 1202-1 imu-right at 1 kHz, 400 samples) is read from the
shared fixtures folder: $PRIMUS_FIXTURES, or <repo>/../shared/fixtures.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from data_prep import egoexo4d
from data_prep.narrated import ImuFileError, NarratedJob, Narration, Recording, WindowSettings, window_imu
from test_egoexo4d import annotation, description

FIXTURES = Path(os.environ.get("PRIMUS_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
ARIA_VRS = FIXTURES / "aria" / "aria_everyday_activities_recording.vrs"


@pytest.fixture(scope="module")
def aria_imu():
    return egoexo4d.read_vrs_imu(str(ARIA_VRS))


def test_shape_and_monotonic_timestamps(aria_imu):
    times_s, imu = aria_imu
    assert times_s.shape == (400,) and imu.shape == (400, 6)
    assert times_s[0] == 0.0 and np.all(np.diff(times_s) > 0)
    # 1 kHz: steps of 1 ms (0.94 to 1.06 ms in this file), 0.4 s in all
    assert np.all(np.abs(np.diff(times_s) - 1e-3) < 1e-4) and 0.39 < times_s[-1] < 0.40


def test_units_are_si(aria_imu):
    _, imu = aria_imu
    acc_norm = np.linalg.norm(imu[:, :3], axis=1)
    # The wearer's head moves a little (|gyro| up to 1.1 rad/s), so |acc| varies around gravity;
    # its mean over 0.4 s is gravity's 9.81 m/s^2 (not 1 g, not mg).
    assert abs(acc_norm.mean() - 9.81) < 0.3
    gyro = np.abs(imu[:, 3:])
    # rad/s: head turns are a few rad/s at most (the same motion in deg/s would read in the 10s).
    assert 0.1 < gyro.max() < 5.0


def test_resampling_to_50_hz_keeps_the_signal(aria_imu):
    times_s, imu = aria_imu
    settings = WindowSettings(window_sec=0.3, rate_hz=50.0)
    window = window_imu(times_s, imu, 0.05, 0.35, settings, "aria window")
    assert window.shape == (15, 6) and window.dtype == np.float32
    # Each 50 Hz sample against the 20 ms box average of the 1 kHz samples around it: the
    # anti-aliasing low-pass and the box differ in shape only, by well under the signal's spread
    # (measured at most 0.14 of each channel's standard deviation over the file).
    grid = 0.05 + np.arange(15) / 50.0
    box = np.stack([imu[(times_s >= t - 0.01) & (times_s < t + 0.01)].mean(axis=0) for t in grid])
    assert np.all(np.abs(window - box) < 0.25 * imu.std(axis=0))


def aria_recording(narration_times) -> Recording:
    return Recording(recording_id="aria-take", subject="s1", split="train",
                     narrations=tuple(Narration(t, "C looks around.") for t in narration_times),
                     video_path=None, load_imu=lambda: egoexo4d.read_vrs_imu(str(ARIA_VRS)))


def test_take_shorter_than_a_window_is_dropped_with_its_reason():
    job = NarratedJob("egoexo4d", catalog=None, settings=WindowSettings(), text_tower="none", video_tower="none")
    split, windows, report = job.process(aria_recording([0.2, 0.3]), {"text_tower": None, "video_tower": None})
    assert split == "train" and windows == []
    assert report.dropped == {"out of range": 2}
    assert "aria-take narration at 0.20 s: the recording is shorter than 5.0 s" in report.examples["out of range"]


def test_ego_exo_take_with_a_real_vrs_reports_the_drop(tmp_path, capsys, tiny_clip_spec):
    root = tmp_path / "root"
    take_dir = root / "takes" / "aria_take"
    (root / "annotations").mkdir(parents=True)
    take_dir.mkdir(parents=True)
    (take_dir / "aria01_noimagestreams.vrs").symlink_to(ARIA_VRS)
    (root / "takes.json").write_text(json.dumps([{"take_uid": "t1", "take_name": "aria_take",
                                                  "root_dir": "takes/aria_take"}]))
    for split in ("train", "val"):
        content = {"t1": [annotation([description(0.2, "C looks around.")])]} if split == "train" else {}
        (root / "annotations" / f"atomic_descriptions_{split}.json").write_text(json.dumps({"annotations": content}))
    status = egoexo4d.main(["--root", str(root), "--out", str(tmp_path / "out"), "--towers", tiny_clip_spec])
    assert status == 1
    error = capsys.readouterr().err
    assert "No usable window" in error and "out of range" in error


@pytest.mark.parametrize("length", [0, 4096])
def test_truncated_vrs_is_named_in_one_sentence(tmp_path, length):
    truncated = tmp_path / "cut_noimagestreams.vrs"
    truncated.write_bytes(ARIA_VRS.read_bytes()[:length])
    with pytest.raises(ImuFileError) as error:
        egoexo4d.read_vrs_imu(str(truncated))
    assert error.value.reason == "unreadable vrs"
    assert error.value.detail.startswith(f"{truncated}: projectaria-tools cannot ")
    assert "\n" not in error.value.detail


def test_vrs_cut_after_its_configuration_reads_as_a_shorter_recording(tmp_path, aria_imu):
    truncated = tmp_path / "cut.vrs"
    truncated.write_bytes(ARIA_VRS.read_bytes()[:1_000_000])
    times_s, imu = egoexo4d.read_vrs_imu(str(truncated))
    assert 0 < len(times_s) < len(aria_imu[0])
    np.testing.assert_array_equal(imu, aria_imu[1][:len(times_s)])
