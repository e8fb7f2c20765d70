"""Tests for primus_jax.queue: ring-buffer order, lookup against brute force numpy, jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from primus_jax import queue as nnq

SIZE, IMU_DIM, TEXT_DIM, VIDEO_DIM = 10, 5, 4, 3

# The brute-force numpy argmax must rank the similarities as the device does: float32 matmuls,
# not the TF32 / bfloat16 default of GPUs and TPUs, which can reorder near ties.
pytestmark = pytest.mark.usefixtures("float32_matmuls")

enqueue_jit = jax.jit(nnq.enqueue)
lookup_jit = jax.jit(nnq.lookup, static_argnames="retrieve_by")


def _batch(batch, seed, has_text=None, has_video=None):
    rng = np.random.default_rng(seed)
    return {
        "imu": rng.normal(size=(batch, IMU_DIM)).astype(np.float32),
        "text": rng.normal(size=(batch, TEXT_DIM)).astype(np.float32),
        "video": rng.normal(size=(batch, VIDEO_DIM)).astype(np.float32),
        "has_text": rng.random(batch) < 0.6 if has_text is None else np.asarray(has_text),
        "has_video": rng.random(batch) < 0.5 if has_video is None else np.asarray(has_video),
    }


def _arrays(batch):
    return [jnp.asarray(batch[name]) for name in ("imu", "text", "video", "has_text", "has_video")]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_force_lookup(stored, query, retrieve_by="auto"):
    """Per-sample loop over slots: stored is a dict of (S, .) numpy arrays plus a filled flag."""
    result = []
    for b in range(len(query["imu"])):
        if retrieve_by == "auto" and query["has_video"][b]:
            modality, eligible = "video", stored["filled"] & stored["has_video"]
        elif retrieve_by == "auto" and query["has_text"][b]:
            modality, eligible = "text", stored["filled"] & stored["has_text"]
        else:
            modality, eligible = "imu", stored["filled"]
        best, best_similarity = None, -np.inf
        for j in np.flatnonzero(eligible):
            similarity = _unit(query[modality][b]) @ stored[modality][j]
            if similarity > best_similarity:
                best, best_similarity = j, similarity
        result.append(best)
    return result


def _numpy_queue(queue):
    return {name: np.asarray(getattr(queue, name)) for name in ("imu", "text", "video", "has_text", "has_video", "filled")}


def _check_lookup(queue, query, retrieve_by="auto"):
    found = lookup_jit(queue, *_arrays(query), retrieve_by=retrieve_by)
    stored = _numpy_queue(queue)
    expected = _brute_force_lookup(stored, query, retrieve_by)
    valid = np.asarray(found["valid"])
    np.testing.assert_array_equal(valid, [j is not None for j in expected])
    for b, j in enumerate(expected):
        if j is None:
            assert not np.any(np.asarray(found["imu"][b])) and not found["has_text"][b] and not found["has_video"][b]
            continue
        assert int(found["index"][b]) == j
        for name in ("imu", "text", "video", "has_text", "has_video"):
            np.testing.assert_array_equal(np.asarray(found[name][b]), stored[name][j])
    return found


def test_enqueue_ring_order_and_wrap_around():
    queue = nnq.init_queue(SIZE, IMU_DIM, TEXT_DIM, VIDEO_DIM)
    first, second = _batch(7, 0), _batch(6, 1)
    queue = enqueue_jit(queue, *_arrays(first))
    assert int(queue.ptr) == 7
    np.testing.assert_array_equal(queue.filled, np.arange(SIZE) < 7)
    np.testing.assert_allclose(queue.imu[:7], _unit(first["imu"]), rtol=1e-6)
    queue = enqueue_jit(queue, *_arrays(second))
    # Slots 7, 8, 9, 0, 1, 2 hold the second batch; 3..6 still hold the first one's rows 3..6.
    assert int(queue.ptr) == 3
    slots = np.array([7, 8, 9, 0, 1, 2])
    np.testing.assert_allclose(queue.video[slots], _unit(second["video"]), rtol=1e-6)
    np.testing.assert_array_equal(queue.has_text[slots], second["has_text"])
    np.testing.assert_allclose(queue.text[3:7], _unit(first["text"][3:7]), rtol=1e-6)
    np.testing.assert_array_equal(queue.filled, True)
    np.testing.assert_allclose(np.linalg.norm(queue.imu, axis=1), 1.0, rtol=1e-6)


def test_enqueue_with_write_false_leaves_the_queue_unchanged():
    queue = enqueue_jit(nnq.init_queue(SIZE, IMU_DIM, TEXT_DIM, VIDEO_DIM), *_arrays(_batch(7, 0)))
    skipped = jax.jit(nnq.enqueue)(queue, *_arrays(_batch(6, 1)), jnp.asarray(False))
    for before, after in zip(jax.tree_util.tree_leaves(queue), jax.tree_util.tree_leaves(skipped)):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    written = jax.jit(nnq.enqueue)(queue, *_arrays(_batch(6, 1)), jnp.asarray(True))
    assert int(written.ptr) == 3 and bool(written.filled.all())


def test_empty_queue_gives_no_neighbours():
    queue = nnq.init_queue(SIZE, IMU_DIM, TEXT_DIM, VIDEO_DIM)
    found = _check_lookup(queue, _batch(4, 2))
    assert not np.any(found["valid"])
    assert not np.any(found["text"]) and not np.any(found["video"])


def test_lookup_matches_brute_force_on_partly_filled_queue():
    queue = nnq.init_queue(SIZE, IMU_DIM, TEXT_DIM, VIDEO_DIM)
    stored = _batch(6, 3, has_text=[1, 0, 1, 0, 1, 0], has_video=[0, 0, 1, 0, 1, 0])
    queue = enqueue_jit(queue, *_arrays(stored))
    # Mixed query: video, text only, neither, video and text.
    query = _batch(4, 4, has_text=[0, 1, 0, 1], has_video=[1, 0, 0, 1])
    found = _check_lookup(queue, query)
    assert np.all(found["valid"])
    assert int(found["index"][0]) in (2, 4) and int(found["index"][1]) in (0, 2, 4)
    assert int(found["index"][2]) < 6
    imu_found = _check_lookup(queue, query, retrieve_by="imu")
    assert np.all(imu_found["valid"])


def test_lookup_matches_brute_force_after_wrap_around():
    queue = nnq.init_queue(SIZE, IMU_DIM, TEXT_DIM, VIDEO_DIM)
    for seed in range(5, 9):  # 4 x 4 = 16 rows through 10 slots
        queue = enqueue_jit(queue, *_arrays(_batch(4, seed)))
    assert int(queue.ptr) == 6
    _check_lookup(queue, _batch(8, 9))
    _check_lookup(queue, _batch(8, 10), retrieve_by="imu")


@pytest.mark.parametrize("has_text, has_video", [([1, 1, 0], [1, 1, 1]), ([1, 1, 1], [0, 0, 0]), ([0, 0, 0], [0, 0, 0]),
                                                 ([0, 1, 0], [1, 0, 0])])
def test_lookup_skips_only_the_matmuls_no_sample_needs(has_text, has_video):
    """Batches retrieving by video only, text only, IMU only, and by all three: the matmuls the
    lax.conds skip never leak into the result."""
    queue = nnq.init_queue(SIZE, IMU_DIM, TEXT_DIM, VIDEO_DIM)
    queue = enqueue_jit(queue, *_arrays(_batch(8, 11, has_text=[1, 0] * 4, has_video=[1, 1, 0, 0] * 2)))
    found = _check_lookup(queue, _batch(3, 12, has_text=has_text, has_video=has_video))
    assert np.all(found["valid"])


def test_sample_with_video_finds_none_when_no_slot_has_video():
    queue = nnq.init_queue(SIZE, IMU_DIM, TEXT_DIM, VIDEO_DIM)
    queue = enqueue_jit(queue, *_arrays(_batch(3, 11, has_text=[1, 1, 1], has_video=[0, 0, 0])))
    found = _check_lookup(queue, _batch(2, 12, has_text=[1, 1], has_video=[1, 0]))
    np.testing.assert_array_equal(found["valid"], [False, True])


def test_lookup_retrieves_a_stored_sample_as_its_own_neighbour():
    queue = nnq.init_queue(SIZE, IMU_DIM, TEXT_DIM, VIDEO_DIM)
    stored = _batch(8, 13, has_text=[1] * 8, has_video=[1] * 8)
    queue = enqueue_jit(queue, *_arrays(stored))
    found = lookup_jit(queue, *_arrays(stored), retrieve_by="auto")
    np.testing.assert_array_equal(found["index"], np.arange(8))


def test_enqueue_stops_gradients_to_imu_features():
    queue = nnq.init_queue(SIZE, IMU_DIM, TEXT_DIM, VIDEO_DIM)
    batch = _arrays(_batch(3, 14))

    def stored_sum(imu):
        return jnp.sum(nnq.enqueue(queue, imu, *batch[1:]).imu)

    np.testing.assert_array_equal(jax.grad(stored_sum)(batch[0]), 0.0)


def test_bad_arguments_are_named():
    queue = nnq.init_queue(4, IMU_DIM, TEXT_DIM, VIDEO_DIM)
    with pytest.raises(ValueError, match="batch of 5 does not fit a queue of 4 slots"):
        nnq.enqueue(queue, *_arrays(_batch(5, 15)))
    bad = _arrays(_batch(2, 16))
    bad[2] = jnp.zeros((2, VIDEO_DIM + 1))
    with pytest.raises(ValueError, match=r"lookup: video has shape \(2, 4\), expected \(2, 3\)"):
        nnq.lookup(queue, *bad)
    with pytest.raises(ValueError, match="retrieve_by must be one of"):
        nnq.lookup(queue, *_arrays(_batch(2, 17)), retrieve_by="video")


def _sharded(mesh, queue_size=16):
    """An empty queue of queue_size slots placed in the sharded layout on mesh."""
    queue = nnq.init_queue(queue_size, IMU_DIM, TEXT_DIM, VIDEO_DIM)
    return jax.device_put(queue, nnq.shardings(queue, mesh))


@pytest.mark.parametrize("retrieve_by", ["auto", "imu"])
def test_sharded_lookup_matches_the_replicated_lookup_of_the_same_slots(retrieve_by):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    assert mesh.size == 4
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    put = jax.jit(lambda q, *a: nnq.enqueue_sharded(q, *a, mesh=mesh))
    queue = _sharded(mesh)
    for seed in range(3):  # 3 x 8 rows into 4 rings of 4 slots: each ring wraps around
        queue = put(queue, *[jax.device_put(a, rows) for a in _arrays(_batch(8, seed))])
    assert int(queue.ptr) == 2
    query = _batch(8, 10)
    found = jax.jit(lambda q, *a: nnq.lookup_sharded(q, *a, mesh=mesh, retrieve_by=retrieve_by))(
        queue, *[jax.device_put(a, rows) for a in _arrays(query)])
    assert found["imu"].sharding.spec == jax.sharding.PartitionSpec("data")
    # The sharded slots, concatenated device by device, are the replicated queue the brute force reads.
    gathered = jax.device_get(queue)
    stored = _numpy_queue(gathered)
    expected = _brute_force_lookup(stored, query, retrieve_by)
    assert all(j is not None for j in expected)
    np.testing.assert_array_equal(np.asarray(found["index"]), expected)
    for name in ("imu", "text", "video", "has_text", "has_video"):
        np.testing.assert_array_equal(np.asarray(found[name]), stored[name][expected])
    # The last two batches (16 rows) are what the 16 slots hold, as in a replicated ring of 16.
    held = np.concatenate([_unit(_batch(8, seed)["imu"]) for seed in (1, 2)])
    np.testing.assert_allclose(np.sort(stored["imu"], axis=0), np.sort(held, axis=0), rtol=1e-6)


def test_sharded_enqueue_keeps_each_devices_last_rows_when_the_batch_outnumbers_the_slots():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch = _batch(16, 3)  # 4 rows per device, 2 slots per device
    queue = jax.jit(lambda q, *a: nnq.enqueue_sharded(q, *a, mesh=mesh))(
        _sharded(mesh, queue_size=8), *[jax.device_put(a, rows) for a in _arrays(batch)])
    stored = _numpy_queue(jax.device_get(queue))
    kept = np.concatenate([np.arange(d * 4 + 2, d * 4 + 4) for d in range(4)])
    np.testing.assert_allclose(stored["imu"], _unit(batch["imu"][kept]), rtol=1e-6)
    np.testing.assert_array_equal(stored["has_video"], batch["has_video"][kept])
    assert stored["filled"].all() and int(queue.ptr) == 0
