"""data_prep.parallel: the same dataset from the local driver (1 and 2 workers) and Apache Beam's
DirectRunner (multi-processing, 2 workers); failing recordings and a dying worker."""
import functools
import json
import os

import numpy as np
import pytest

from data_prep import ego4d, narrated, parallel
from primus_jax.data import load_split, read_manifest
from test_ego4d import NARRATIONS, make_ego4d_root

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXACT_FIELDS = ("imu", "has_text", "has_video", "label", "start_s", "end_s", "text", "recording_id", "subject", "source")


def dataset_content(out):
    """(manifest, report, {split: {field: values in record order}}) of a prepared dataset."""
    manifest = read_manifest(str(out))
    records = {split: load_split(str(out), split) for split in manifest["splits"]}
    return manifest, json.loads((out / "report.json").read_text()), records


def assert_same_dataset(actual, expected):
    """Same manifest (splits, counts, shards), same report, same records in the same order."""
    (manifest, report, records), (manifest_0, report_0, records_0) = actual, expected
    assert manifest == manifest_0 and report == report_0
    assert records.keys() == records_0.keys()
    for split in records:
        for field in EXACT_FIELDS:
            np.testing.assert_array_equal(np.asarray(records[split][field]), np.asarray(records_0[split][field]),
                                          err_msg=f"{split} {field}")
        for field in ("text_emb", "video_emb"):  # the same XLA program in another process
            np.testing.assert_allclose(records[split][field], records_0[split][field], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ego4d_root(tmp_path_factory):
    return make_ego4d_root(tmp_path_factory.mktemp("ego4d"))


def prepare_ego4d(root, out, towers, *driver_args):
    status = ego4d.main(["--ego4d-root", str(root), "--out", str(out), "--towers", towers,
                         "--splits", "train=0.5", "val=0.5", "--frames-per-clip", "4", *driver_args])
    assert status == 0
    assert not (out / parallel.STAGING_DIR).exists()
    return dataset_content(out)


def test_local_one_and_two_workers_and_beam_direct_runner_write_the_same_dataset(ego4d_root, tmp_path, monkeypatch,
                                                                                 tiny_clip_spec):
    # Beam's SDK workers are fresh Python processes: they must import data_prep from this checkout.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    one = prepare_ego4d(ego4d_root, tmp_path / "one", tiny_clip_spec)
    manifest, report, records = one
    assert set(manifest["splits"]) == {"train", "val"} and report["total_kept"] == 7
    assert report["dropped"]["missing imu"] == 3 and report["kept_without_video"] == {"missing video": 1, "unreadable video": 1}
    assert_same_dataset(prepare_ego4d(ego4d_root, tmp_path / "two", tiny_clip_spec, "--workers", "2"), one)
    beam = prepare_ego4d(ego4d_root, tmp_path / "beam", tiny_clip_spec, "--runner", "DirectRunner",
                         "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    assert_same_dataset(beam, one)


def die_once(marker, imu_path):
    """A recording's IMU loader that kills its worker process the first time it runs."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return ego4d.read_imu_csv(imu_path)


def raise_error(imu_path):
    raise RuntimeError(f"{imu_path}: decoder crashed")


def recordings_with(root, uids, replace):
    """The fixture's Ego4D recordings for `uids`, with load_imu replaced for some uids."""
    recordings, _ = ego4d.ego4d_recordings(str(root), {"train": 0.5, "val": 0.5}, 0, None)
    chosen = [r for r in recordings if r.recording_id in uids]
    return [r if r.recording_id not in replace else narrated.Recording(
        r.recording_id, r.subject, r.split, r.narrations, r.video_path, replace[r.recording_id]) for r in chosen], "test"


def narrated_job(catalog):
    return narrated.NarratedJob("ego4d", catalog, narrated.WindowSettings(frames_per_clip=4), "none", "none")


def imu_csv(root, uid):
    return str(root / "v1" / "imu" / f"{uid}.csv")


def test_a_recording_that_raises_in_a_worker_is_dropped_and_counted(ego4d_root, tmp_path):
    catalog = functools.partial(recordings_with, ego4d_root, ("good", "novideo", "gap"),
                                {"gap": functools.partial(raise_error, imu_csv(ego4d_root, "gap"))})
    report = parallel.prepare(narrated_job(catalog), tmp_path / "out", driver=parallel.Driver(workers=2))
    assert report.dropped["failed recording"] == len(NARRATIONS["gap"])
    assert report.examples["failed recording"][0].startswith("gap: RuntimeError: ")
    assert report.total_kept == 3 + 1
    assert {r for split in read_manifest(str(tmp_path / "out"))["splits"]
            for r in load_split(str(tmp_path / "out"), split)["recording_id"]} == {"good", "novideo"}


def test_a_dead_worker_stops_the_run_and_a_rerun_gives_the_same_dataset(ego4d_root, tmp_path):
    uids = ("good", "nan", "gap", "novideo")
    parallel.prepare(narrated_job(functools.partial(recordings_with, ego4d_root, uids, {})), tmp_path / "ref")
    loader = functools.partial(die_once, str(tmp_path / "died"), imu_csv(ego4d_root, "nan"))
    job = narrated_job(functools.partial(recordings_with, ego4d_root, uids, {"nan": loader}))
    out = tmp_path / "out"
    with pytest.raises(parallel.WorkerDied, match="worker process died .* published nothing, rerun it"):
        parallel.prepare(job, out, driver=parallel.Driver(workers=2))
    assert not [name for name in os.listdir(out) if not name.startswith(".")]  # no manifest, shard or report
    parallel.prepare(job, out, driver=parallel.Driver(workers=2))
    assert_same_dataset(dataset_content(out), dataset_content(tmp_path / "ref"))
    assert parallel.STAGING_DIR not in os.listdir(out)


def test_beam_options_need_a_runner_and_workers_need_the_local_driver(ego4d_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        ego4d.main(["--ego4d-root", str(ego4d_root), "--out", str(tmp_path), "--direct_num_workers=2"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --direct_num_workers=2 (Beam pipeline options need --runner)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ego4d.main(["--ego4d-root", str(ego4d_root), "--out", str(tmp_path), "--workers", "2", "--runner", "DirectRunner"])
    assert "--workers is for the local driver; with --runner use the runner's own option" in capsys.readouterr().err
