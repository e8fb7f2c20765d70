"""BatchIterator with grain worker processes: same batches, exact resume, errors, a killed worker.

Each iterator with workers spawns real processes (a few seconds each here), so the dataset is
tiny and the iterators are few.
"""
import multiprocessing
import os
import signal

import numpy as np
import pytest

from primus_jax import data
from tests.test_data import CORRUPTIONS, ids, iterator, take, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("workers_dataset")
    write_dataset(out_dir, {"train": 23})
    return str(out_dir)


def test_workers_give_the_batches_of_the_main_process_and_resume_exactly(dataset):
    with iterator(dataset, 4, seed=5, num_epochs=3, workers=0, prefetch=0) as reference:
        expected = [ids(b) for b in reference]  # 3 epochs of 5 batches, across epoch ends
    with iterator(dataset, 4, seed=5, num_epochs=3, workers=2, prefetch=2) as it:
        first = [ids(b) for b in take(it, 7)]
        state = it.get_state()
        assert it.stats == {"records_read": 28, "skipped_records": 0}
    assert first == expected[:7] and state["epoch"] == 1 and state["batch"] == 2
    with iterator(dataset, 4, seed=5, num_epochs=3, workers=1, prefetch=1) as resumed:
        resumed.set_state(state)
        assert [ids(b) for b in resumed] == expected[7:]


def test_corrupt_record_in_a_worker_raises_or_is_skipped_as_in_the_main_process(tmp_path):
    corrupt, bad, words = CORRUPTIONS["nan_in_canonical_imu"]
    write_dataset(tmp_path, {"train": 6}, records_per_shard=6)
    shard = os.path.join(tmp_path, "primus_imu_windows-train.tfrecord-00000-of-00001")
    corrupt(shard, bad)
    with iterator(tmp_path, 2, shuffle=False, workers=1, prefetch=1) as it:
        take(it, bad // 2)
        with pytest.raises(data.DataError) as error:
            next(it)
    assert str(error.value).startswith(f"{shard}: record {bad}: ") and words in str(error.value)
    assert not isinstance(error.value, data.InputPipelineError)

    def skipping(workers):
        with iterator(tmp_path, 2, seed=1, workers=workers, prefetch=1, skip_corrupt=True,
                      num_epochs=2) as it:
            return [ids(b) for b in it], it.stats

    in_main, in_workers = skipping(0), skipping(2)
    assert in_workers == in_main and in_main[1] == {"records_read": 12, "skipped_records": 2}


def test_a_killed_worker_ends_the_iteration_with_a_clear_error(dataset):
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    signal.alarm(120)  # a hang fails the test instead of blocking the suite
    try:
        with iterator(dataset, 4, seed=0, workers=1, prefetch=1) as it:  # endless epochs
            before = set(multiprocessing.active_children())
            full = next(it)
            workers = [p for p in multiprocessing.active_children() if p not in before] or \
                list(multiprocessing.active_children())
            assert len(workers) == 1
            os.kill(workers[0].pid, signal.SIGKILL)
            sizes = []
            with pytest.raises(data.InputPipelineError, match="exit code -9"):
                for _ in range(1000):  # what was already decoded may still come, then the error
                    sizes.append(len(next(it)["label"]))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(full["label"]) == 4 and set(sizes) <= {4} and len(sizes) < 10
    assert np.isfinite(full["imu"]).all()
