"""Reliability: corrupt and non-finite data, SIGKILL / SIGTERM, bad checkpoints, a full disk, config
errors and a dead peer, each through `python -m primus_jax.main` in a subprocess on real files."""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from primus_jax import checkpoint, data, train, trainconfig
from tests.train_fixtures import (export_params, free_port, run_main, tiny_config, tiny_overrides,
                                  write_tiny_dataset)

HUGE = 1e30  # finite in float32, so it passes the reader, but the encoder's statistics overflow


def _rewrite_shard(path: str, edits: dict, truncate_in: int | None = None) -> None:
    """Rewrites a TFRecord shard, record i's framed bytes replaced by edits[i](raw bytes).

    truncate_in: cut the file in the middle of that record (and drop every record after it).
    """
    with data.TFRecordIndex(path) as index:
        raws = [index.read(i) for i in range(len(index))]
    frames = [edits[i](raw) if i in edits else data.frame_record(raw) for i, raw in enumerate(raws)]
    if truncate_in is not None:
        frames = frames[:truncate_in] + [frames[truncate_in][: len(frames[truncate_in]) // 2]]
    with open(path, "wb") as f:
        f.write(b"".join(frames))


def _edited_example(change):
    """An edit that parses the tf.train.Example, applies change(feature map) and re-frames it."""
    def edit(raw: bytes) -> bytes:
        example = data.Example.FromString(raw)
        change(example.features.feature)
        return data.frame_record(example.SerializeToString())
    return edit


def _bad_crc(raw: bytes) -> bytes:
    framed = bytearray(data.frame_record(raw))
    framed[40] ^= 0xFF  # a byte inside the data: the data CRC no longer matches
    return bytes(framed)


def _imu_as_ints(feature):
    feature["imu"].int64_list.value[:] = [1, 2, 3]


def _imu_nan(feature):
    values = list(feature["imu"].float_list.value)
    values[7] = float("nan")
    feature["imu"].float_list.value[:] = values


def _imu_huge(feature):
    feature["imu"].float_list.value[:] = [HUGE] * len(feature["imu"].float_list.value)


def _shard(dataset: str, k: int) -> str:
    return os.path.join(dataset, data.read_manifest(dataset)["splits"]["train"]["shards"][k]["file"])


def _run(workdir, overrides, timeout=300, **kwargs):
    proc = run_main(workdir, overrides, **kwargs)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"train"' in line]


def _checkpoint_steps(workdir) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _restore_latest(workdir, config, dataset):
    dims = trainconfig.DataDims.from_manifest(data.read_manifest(dataset))
    mesh = train.make_mesh()
    abstract = train.abstract_state(train.replicate(train.create_train_state(config, dims), mesh), mesh)
    saver = checkpoint.Checkpointer(workdir)
    try:
        return saver.latest_step(), saver.restore_latest(abstract)
    finally:
        saver.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("clean") / "ds"))


def _copy_dataset(dataset, tmp_path, name="ds") -> str:
    copy = str(tmp_path / name)
    shutil.copytree(dataset, copy)
    return copy


# --------------------------------------------------------------------------- bad data

CORRUPTIONS = {  # record 3 of the first shard, read in the first global batch (shuffle off)
    "truncated": ({}, 3, "file is truncated"),
    "bad_crc": ({3: _bad_crc}, None, "data CRC mismatch"),
    "wrong_type": ({3: _edited_example(_imu_as_ints)}, None, "field 'imu' is a int64_list, expected a float_list"),
    "nan": ({3: _edited_example(_imu_nan)}, None, "field 'imu' holds NaN or infinite values"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_record_stops_with_file_and_record_named(dataset, tmp_path, kind):
    edits, truncate_in, problem = CORRUPTIONS[kind]
    bad = _copy_dataset(dataset, tmp_path)
    _rewrite_shard(_shard(bad, 0), edits, truncate_in)
    code, err = _run(str(tmp_path / "w"), tiny_overrides(bad, data__shuffle=False))
    assert code == 1
    line = _error_line(err)
    assert f"{_shard(bad, 0)}: record 3: " in line and problem in line, line
    assert _checkpoint_steps(str(tmp_path / "w")) == []  # no step ran on the bad batch


def test_skip_corrupt_counts_records_and_non_finite_losses_are_skipped_then_stop(dataset, tmp_path):
    """Batches (shuffle off, 8 records each): 0 clean; 1 with a bad CRC, a wrong type and a NaN;
    2 with a truncated record and a window of 1e30; 3 clean; 4 and 5 with 1e30 windows."""
    bad = _copy_dataset(dataset, tmp_path)
    _rewrite_shard(_shard(bad, 0), {9: _bad_crc, 10: _edited_example(_imu_as_ints),
                                   12: _edited_example(_imu_nan)}, truncate_in=19)
    _rewrite_shard(_shard(bad, 1), {1: _edited_example(_imu_huge), 13: _edited_example(_imu_huge)})
    _rewrite_shard(_shard(bad, 2), {2: _edited_example(_imu_huge)})
    workdir = str(tmp_path / "w")
    overrides = tiny_overrides(bad, data__shuffle=False, data__skip_corrupt=True, data__val_split="",
                               train__max_nonfinite_in_a_row=2)
    code, err = _run(workdir, overrides)
    assert code == 1
    assert "2 non-finite losses in a row before step 6" in _error_line(err)
    rows = {r["step"]: r for r in _metrics(workdir)}
    assert [rows[s]["skipped_records"] for s in range(1, 7)] == [0, 3, 4, 4, 4, 4]
    assert [rows[s]["skipped"] for s in range(1, 7)] == [0, 0, 1, 0, 1, 1]
    assert [rows[s]["skipped_updates"] for s in range(1, 7)] == [0, 0, 1, 1, 2, 3]
    assert all(np.isfinite(rows[s]["loss"]) for s in (1, 2, 4))
    # The last good checkpoint is intact: restorable, finite, and step 6 (the stop) was not saved.
    step, (state, _) = _restore_latest(workdir, tiny_config(bad), bad)
    assert step == 5 and int(state.step) == 5 and int(state.nonfinite_total) == 2
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(jax.device_get(state.params)))


# --------------------------------------------------------------------------- interruptions

def _wait_for_checkpoint_after(proc, workdir, step, timeout=240):
    deadline = time.time() + timeout
    while not _checkpoint_steps(workdir) or max(_checkpoint_steps(workdir)) < step:
        assert proc.poll() is None, f"exited {proc.returncode} early:\n{proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"no checkpoint of step {step} appeared"
        time.sleep(0.02)


def test_two_sigkills_and_a_sigterm_resume_to_the_uninterrupted_params(dataset, tmp_path):
    steps, rng = 10, random.Random()
    overrides = tiny_overrides(dataset, train__num_steps=steps, data__val_split="")
    straight = run_main(str(tmp_path / "straight"), overrides)

    workdir = str(tmp_path / "interrupted")
    for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM):
        done = max(_checkpoint_steps(workdir), default=0)
        target = done + rng.randint(1, 2)
        proc = run_main(workdir, overrides)
        _wait_for_checkpoint_after(proc, workdir, target)
        time.sleep(rng.uniform(0.0, 0.2))  # anywhere in a step or a save
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if done:
            assert f"resumed from step {done}" in err
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == 0, err[-3000:]
            stopped = int(err.split("preempted at step ")[1].split(":")[0])
            assert stopped < steps and max(_checkpoint_steps(workdir)) == stopped
        assert not os.path.exists(os.path.join(workdir, "export"))

    code, err = _run(workdir, overrides)
    assert code == 0 and f"resumed from step {stopped}" in err, err[-3000:]
    _, straight_err = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_err[-3000:]
    a, b = export_params(str(tmp_path / "straight")), export_params(workdir)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)

    # The same workdir with other model dimensions: a clear error, not a shape traceback.
    code, err = _run(workdir, tiny_overrides(dataset, model__hidden_dim=48))
    assert code == 1
    line = _error_line(err)
    assert "different configuration" in line and "(32," in line and "(48," in line, line


# --------------------------------------------------------------------------- full disk

def test_failed_save_is_a_clear_error_and_keeps_the_previous_checkpoint(dataset, tmp_path):
    config = tiny_config(dataset)
    dims = trainconfig.DataDims.from_manifest(data.read_manifest(dataset))
    mesh = train.make_mesh()
    state = train.replicate(train.create_train_state(config, dims), mesh)
    workdir = str(tmp_path / "w")
    saver = checkpoint.Checkpointer(workdir)
    saver.save(1, state, {"epoch": 0, "batch": 1})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (512, hard))  # every file of a save is larger
    try:
        with pytest.raises(checkpoint.CheckpointError) as caught:
            saver.save(2, state, {"epoch": 0, "batch": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
        saver.close()
    message = str(caught.value)
    assert "could not write the checkpoint of step 2" in message and "step 1 is intact" in message
    assert "\n" not in message
    step, (restored, data_state) = _restore_latest(workdir, config, dataset)
    assert step == 1 and data_state["batch"] == 1
    for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(restored)), jax.tree_util.tree_leaves(jax.device_get(state))):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("override, sentence", [
    ({"train__nonexistent": 1}, "error: --config.train.nonexistent: the config has no such field"),
    ({"objective__alpha": 2}, "error: objective.alpha must lie in [0, 1], got 2"),
    ({"objective__alpha": "abc"}, "could not convert string to float: 'abc'"),
    ({"train__global_batch_size": 6}, "global_batch_size=6 is not divisible by the 4 devices"),
    ({"train__global_batch_size": 32}, "data.val_split='val' of "),  # 16 val records: no eval batch
    ({"data__val_split": "test"}, "data.val_split='test' is not a split of"),
    ({"data__dir": ""}, "error: data.dir is empty: set --config.data.dir"),
])
def test_config_error_is_one_sentence_and_exit_2(dataset, tmp_path, override, sentence):
    code, err = _run(str(tmp_path / "w"), tiny_overrides(dataset, **override), timeout=120)
    assert code == 2
    assert sentence in _error_line(err)
    assert not os.path.exists(os.path.join(tmp_path, "w", "checkpoints"))


def test_error_raised_by_the_config_file_is_one_sentence(dataset, tmp_path):
    code, err = _run(str(tmp_path / "w"), tiny_overrides(dataset), config="configs/ablations.py:bogus", timeout=120)
    assert code == 2
    line = _error_line(err)
    assert "--config=configs/ablations.py:bogus" in line and "unknown ablation 'bogus'" in line


def test_window_too_short_for_the_encoder_is_a_config_error(tmp_path):
    short = str(tmp_path / "short")
    with data.DatasetWriter(short, T=100, rate_hz=50.0, text_dim=16, video_dim=0) as writer:
        for i in range(8):
            writer.add("train", data.Window(imu=np.ones((100, 6), np.float32), rate_hz=50.0,
                                            text_emb=np.ones(16, np.float32)))
    code, err = _run(str(tmp_path / "w"), tiny_overrides(short), timeout=120)
    assert code == 2
    assert "windows have T=100 samples, but the encoder needs at least" in _error_line(err)


# --------------------------------------------------------------------------- multi-process

def test_survivor_of_a_dead_peer_exits_with_an_error_in_bounded_time(dataset, tmp_path):
    workdir, port = str(tmp_path / "w"), free_port()
    procs = [
        run_main(workdir, tiny_overrides(
            dataset, train__num_steps=100000, data__val_split="",
            distributed__coordinator_address=f"127.0.0.1:{port}", distributed__num_processes=2,
            distributed__process_id=i, distributed__heartbeat_timeout_s=5), devices=2)
        for i in range(2)
    ]
    try:
        _wait_for_checkpoint_after(procs[0], workdir, 1)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, err = procs[0].communicate(timeout=90)
        waited = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode != 0, err[-3000:]
    assert waited < 60, f"the survivor took {waited:.0f} s to exit"


# --------------------------------------------------------------------------- data_prep

def test_data_prep_counts_infinite_values_and_wrong_units(tmp_path):
    """What tests/test_har.py leaves out: +inf (not only NaN) and a file in g declared as SI."""
    from data_prep import har

    rng = np.random.default_rng(0)

    def imu(gravity):
        return np.concatenate([rng.normal(0, 0.05, (300, 3)) + [0, 0, gravity], rng.normal(0, 0.3, (300, 3))], axis=1)

    infinite = imu(9.81)
    infinite[40, 5] = np.inf
    for name, values in (("good.csv", imu(9.81)), ("in_g.csv", imu(1.0)), ("inf.csv", infinite)):
        np.savetxt(tmp_path / name, values, delimiter=",", header=",".join(har.CSV_IMU_COLUMNS), comments="")
    (tmp_path / "labels.csv").write_text("file,label,subject\ngood.csv,walk,A\nin_g.csv,walk,B\ninf.csv,sit,C\n")
    out = tmp_path / "out"
    assert har.main(["--dataset", "csv", "--csv-dir", str(tmp_path), "--labels", str(tmp_path / "labels.csv"),
                     "--rate", "50", "--units", "si", "--text-tower", "none", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dropped"] == {"implausible acc units": 1, "non-finite values": 1}
    assert report["kept"] == {"train": 1}  # only good.csv: 300 samples hold one window
