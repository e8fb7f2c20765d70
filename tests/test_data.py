"""primus_jax.data: schema round trips, tf.data compatibility, atomic writer, pipeline semantics."""
import functools
import json
import os

import numpy as np
import pytest

import conftest
from primus_jax import data
from primus_jax.data import example_codec

T, TEXT_DIM, VIDEO_DIM, RATE = 8, 4, 3, 50.0
CLASSES = ["walk", "run", "sit"]
NUM_TRAIN = 23


make_window = functools.partial(conftest.make_window, T=T, text_dim=TEXT_DIM, video_dim=VIDEO_DIM, rate_hz=RATE)


def write_dataset(out_dir, splits: dict, **kwargs) -> dict:
    options = dict(T=T, rate_hz=RATE, text_dim=TEXT_DIM, video_dim=VIDEO_DIM,
                   class_names=CLASSES, records_per_shard=5)
    with data.DatasetWriter(out_dir, **{**options, **kwargs}) as writer:
        for split, count in splits.items():
            for i in range(count):
                writer.add(split, make_window(i))
    return writer.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dataset")
    write_dataset(out_dir, {"train": NUM_TRAIN, "val": 4},
                  towers={"text": "minilm"}, extra={"note": "test"})
    return str(out_dir)


def ids(batch) -> list[int]:
    return [int(v) for v in batch["imu"][:, 0, 0]]


def iterator(dataset_dir, global_batch_size, **kwargs) -> data.BatchIterator:
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return data.BatchIterator(dataset_dir, "train", global_batch_size, **kwargs)


def take(it, n) -> list[dict]:
    return [next(it) for _ in range(n)]


def assert_matches_window(get, i: int, window: data.Window):
    """get(name) gives record i's field; compare with the Window it was written from."""
    np.testing.assert_array_equal(get("imu"), window.imu)
    assert bool(get("has_text")) == (window.text_emb is not None)
    assert bool(get("has_video")) == (window.video_emb is not None)
    expected_text = np.zeros(TEXT_DIM) if window.text_emb is None else window.text_emb
    expected_video = np.zeros(VIDEO_DIM) if window.video_emb is None else window.video_emb
    np.testing.assert_array_equal(get("text_emb"), expected_text)
    np.testing.assert_array_equal(get("video_emb"), expected_video)
    assert int(get("label")) == window.label, i


# ----------------------------------------------------------------------- schema and writer

def test_manifest_describes_the_dataset(dataset):
    manifest = data.read_manifest(dataset)
    assert manifest["schema_version"] == data.SCHEMA_VERSION
    assert (manifest["T"], manifest["rate_hz"], manifest["channels"]) == (T, RATE, 6)
    assert (manifest["text_dim"], manifest["video_dim"]) == (TEXT_DIM, VIDEO_DIM)
    assert manifest["class_names"] == CLASSES and manifest["towers"] == {"text": "minilm"}
    assert manifest["note"] == "test"
    train = manifest["splits"]["train"]
    assert train["records"] == NUM_TRAIN
    assert [s["records"] for s in train["shards"]] == [5, 5, 5, 5, 3]
    assert [s["file"] for s in train["shards"]][-1] == "primus_imu_windows-train.tfrecord-00004-of-00005"
    assert sorted(f for f in os.listdir(dataset) if f.startswith(".")) == []


def test_encode_decode_example_round_trip():
    window = make_window(4)
    decoded = data.decode_example(data.encode_example(window, text_dim=TEXT_DIM, video_dim=VIDEO_DIM),
                                  T=T, text_dim=TEXT_DIM, video_dim=VIDEO_DIM, where="x")
    assert_matches_window(decoded.__getitem__, 4, window)
    assert decoded["text"] == window.text and decoded["subject"] == "s0"
    assert decoded["rate_hz"] == RATE and decoded["start_s"] == pytest.approx(2.0)


def assert_same_decoded(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], np.ndarray):
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
            np.testing.assert_array_equal(a[name], b[name])
        else:
            assert (a[name], type(a[name])) == (b[name], type(b[name])), name


@pytest.mark.parametrize("dims", [(TEXT_DIM, VIDEO_DIM), (TEXT_DIM, 0), (0, VIDEO_DIM)])
def test_fast_decoding_equals_protobuf_decoding(dims):
    """Canonical records take the regex + frombuffer path, others protobuf; both agree."""
    text_dim, video_dim = dims
    decoder = example_codec.ExampleDecoder(T, text_dim, video_dim)
    for i in range(40):
        window = make_window(i)
        window.label = [-1, 0, 2, 127, 128, 70000][i % 6]
        window.text = "long narration " * (i % 9)  # up to 120 bytes: past the fast limit
        window.text_emb = window.text_emb if text_dim else None
        window.video_emb = window.video_emb if video_dim else None
        # odd i: schema 2 (an absent embedding stored as zeros); even i: schema 1 (empty list)
        raw = data.encode_example(window, text_dim=text_dim * (i % 2), video_dim=video_dim * (i % 2))
        takes_fast_path = -1 <= window.label <= 127 and len(window.text) <= 100
        assert (decoder.training_fields(raw) is not None) == takes_fast_path, i
        expected = example_codec._decode_with_protobuf(raw, T=T, text_dim=text_dim,
                                                       video_dim=video_dim)
        assert_same_decoded(decoder.decode(raw), expected)
        reordered = data.Example.FromString(raw).SerializeToString()  # protobuf's own order
        assert decoder.training_fields(reordered) is None
        assert_same_decoded(decoder.decode(reordered), expected)
        assert expected["label"] == window.label and expected["text"] == window.text


def test_load_split_round_trip_every_field(dataset):
    split = data.load_split(dataset, "train")
    assert split["imu"].shape == (NUM_TRAIN, T, 6) and split["imu"].dtype == np.float32
    assert split["label"].dtype == np.int32 and split["has_text"].dtype == bool
    assert split["class_names"] == CLASSES
    for i in range(NUM_TRAIN):
        window = make_window(i)
        assert_matches_window(lambda name: split[name][i], i, window)
        assert split["text"][i] == window.text
        assert split["recording_id"][i] == window.recording_id
        assert split["subject"][i] == window.subject and split["source"][i] == window.source
        assert split["start_s"][i] == np.float32(window.start_s)
        assert split["end_s"][i] == np.float32(window.end_s)


def test_batch_iterator_round_trip_in_order(dataset):
    with iterator(dataset, 5, shuffle=False, num_epochs=1, drop_remainder=False) as it:
        assert it.steps_per_epoch == 5
        batches = list(it)
        assert it.stats == {"records_read": NUM_TRAIN, "skipped_records": 0}
    assert [len(b["label"]) for b in batches] == [5, 5, 5, 5, 3]
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert merged["imu"].dtype == np.float32 and merged["label"].dtype == np.int32
    assert merged["has_video"].dtype == bool and merged["text_emb"].shape == (NUM_TRAIN, TEXT_DIM)
    for i in range(NUM_TRAIN):
        assert_matches_window(lambda name: merged[name][i], i, make_window(i))


def test_tf_data_reads_our_shards(dataset, tmp_path):
    import tensorflow as tf

    shard = os.path.join(dataset, "primus_imu_windows-train.tfrecord-00001-of-00005")
    spec = {
        "imu": tf.io.FixedLenFeature([T * 6], tf.float32),
        "imu_shape": tf.io.FixedLenFeature([2], tf.int64),
        "rate_hz": tf.io.FixedLenFeature([], tf.float32),
        "text": tf.io.FixedLenFeature([], tf.string),
        "text_emb": tf.io.FixedLenFeature([TEXT_DIM], tf.float32),
        "has_text": tf.io.FixedLenFeature([], tf.int64),
        "video_emb": tf.io.FixedLenFeature([VIDEO_DIM], tf.float32),
        "has_video": tf.io.FixedLenFeature([], tf.int64),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "source": tf.io.FixedLenFeature([], tf.string),
        "recording_id": tf.io.FixedLenFeature([], tf.string),
        "subject": tf.io.FixedLenFeature([], tf.string),
        "start_s": tf.io.FixedLenFeature([], tf.float32),
        "end_s": tf.io.FixedLenFeature([], tf.float32),
    }
    parsed = [tf.io.parse_single_example(raw, spec) for raw in tf.data.TFRecordDataset(shard)]
    assert len(parsed) == 5
    for offset, record in enumerate(parsed):
        window = make_window(5 + offset)
        np.testing.assert_array_equal(record["imu"].numpy().reshape(T, 6), window.imu)
        assert record["imu_shape"].numpy().tolist() == [T, 6]
        assert record["rate_hz"].numpy() == RATE
        assert record["text"].numpy().decode("utf-8") == window.text
        for name in ("text_emb", "video_emb"):
            expected = getattr(window, name)
            np.testing.assert_array_equal(record[name].numpy(), np.zeros(record[name].shape)
                                          if expected is None else expected)
            flag = "has_text" if name == "text_emb" else "has_video"
            assert record[flag].numpy() == (expected is not None)
        assert record["label"].numpy() == window.label
        for name in ("source", "recording_id", "subject"):
            assert record[name].numpy().decode() == getattr(window, name)
        assert record["start_s"].numpy() == np.float32(window.start_s)
        assert record["end_s"].numpy() == np.float32(window.end_s)
    # The other way round: our reader reads TensorFlow's framing.
    copy = os.path.join(tmp_path, "tf_written.tfrecord")
    with tf.io.TFRecordWriter(copy) as writer, data.TFRecordIndex(shard) as ours:
        originals = [ours.read(i) for i in range(len(ours))]
        for raw in originals:
            writer.write(raw)
    with data.TFRecordIndex(copy) as theirs:
        assert [theirs.read(i) for i in range(len(theirs))] == originals
    # Examples serialized by TensorFlow itself (its own field order: the protobuf path).
    for offset, raw in enumerate(originals):
        reserialized = tf.train.Example.FromString(raw).SerializeToString()
        assert reserialized != raw
        decoded = data.decode_example(reserialized, T=T, text_dim=TEXT_DIM, video_dim=VIDEO_DIM)
        assert_same_decoded(decoded, data.decode_example(raw, T=T, text_dim=TEXT_DIM,
                                                         video_dim=VIDEO_DIM))


def test_writer_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with data.DatasetWriter(tmp_path, T=T, rate_hz=RATE, text_dim=TEXT_DIM,
                                video_dim=VIDEO_DIM, records_per_shard=5) as writer:
            for i in range(12):  # two complete shards and an open one
                writer.add("train", make_window(i))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_writer_refuses_existing_dataset_and_overwrites_atomically(tmp_path):
    write_dataset(tmp_path, {"train": 12})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        data.DatasetWriter(tmp_path, T=T, rate_hz=RATE, text_dim=TEXT_DIM, video_dim=VIDEO_DIM)
    # A failed overwrite keeps the old dataset whole.
    with pytest.raises(RuntimeError):
        with data.DatasetWriter(tmp_path, T=T, rate_hz=RATE, text_dim=TEXT_DIM,
                                video_dim=VIDEO_DIM, records_per_shard=2, overwrite=True) as w:
            for i in range(6):
                w.add("train", make_window(100 + i))
            raise RuntimeError("interrupted")
    assert ids({"imu": data.load_split(tmp_path, "train")["imu"]}) == list(range(12))
    # A completed overwrite replaces it and removes its stale shards.
    write_dataset(tmp_path, {"val": 3}, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [
        "dataset_info.json", "features.json", "label.labels.txt", "manifest.json",
        "primus_imu_windows-val.tfrecord-00000-of-00001"]


@pytest.mark.parametrize("change, message", [
    (dict(imu=np.zeros((T - 1, 6), np.float32)), "field 'imu' has shape"),
    (dict(imu=np.full((T, 6), np.nan, np.float32)), "field 'imu' holds NaN"),
    (dict(text_emb=np.zeros(TEXT_DIM + 1, np.float32)), "field 'text_emb' has shape"),
    (dict(video_emb=np.array([1.0, np.inf, 0.0], np.float32)), "field 'video_emb' holds NaN"),
    (dict(label=3), "field 'label' is 3"),
    (dict(rate_hz=100.0), "field 'rate_hz' is 100.0"),
])
def test_writer_validates_windows(tmp_path, change, message):
    writer = data.DatasetWriter(tmp_path, T=T, rate_hz=RATE, text_dim=TEXT_DIM,
                                video_dim=VIDEO_DIM, class_names=CLASSES)
    window = make_window(1)
    bad = data.Window(**{**window.__dict__, **change})
    with pytest.raises(ValueError, match=message) as error:
        writer.add("train", bad)
    assert "recording 'rec0'" in str(error.value)
    writer.abort()


def test_read_manifest_errors(tmp_path):
    with pytest.raises(data.DataError, match="no manifest found"):
        data.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(data.DataError, match="not valid JSON"):
        data.read_manifest(tmp_path)
    write_dataset(tmp_path, {"train": 2}, overwrite=True)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 3}))
    with pytest.raises(data.DataError, match="'schema_version' is 3"):
        data.read_manifest(tmp_path)
    with pytest.raises(data.DataError, match="no split 'test'"):
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        data.load_split(tmp_path, "test")


# ----------------------------------------------------------------------- pipeline semantics

def test_shuffling_is_deterministic_and_covers_every_record_once_per_epoch(dataset):
    def run(seed):
        with iterator(dataset, 4, seed=seed, num_epochs=2, drop_remainder=False) as it:
            return [ids(b) for b in it]

    first, again, other = run(3), run(3), run(4)
    assert first == again
    assert first != other
    per_epoch = len(first) // 2
    epoch0 = sum(first[:per_epoch], [])
    epoch1 = sum(first[per_epoch:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(NUM_TRAIN))
    assert epoch0 != epoch1 and epoch0 != list(range(NUM_TRAIN))


def test_drop_remainder_drops_the_short_last_batch(dataset):
    with iterator(dataset, 4, num_epochs=1) as it:
        batches = list(it)
    assert it.steps_per_epoch == len(batches) == NUM_TRAIN // 4
    assert all(len(b["label"]) == 4 for b in batches)


def test_processes_slice_the_global_batch(dataset):
    def run(**kwargs):
        with iterator(dataset, 4, seed=7, **kwargs) as it:
            return take(it, 9)  # crosses an epoch boundary (5 batches per epoch)

    single = run()
    hosts = [run(process_index=p, process_count=2) for p in range(2)]
    for step, global_batch in enumerate(single):
        for name, value in global_batch.items():
            local = [hosts[p][step][name] for p in range(2)]
            assert local[0].shape[0] == 2
            np.testing.assert_array_equal(np.concatenate(local), value)
    with pytest.raises(ValueError, match="multiple of process_count 3"):
        iterator(dataset, 4, process_index=0, process_count=3)


def test_resume_from_state_equals_uninterrupted_run(dataset):
    with iterator(dataset, 4, seed=1, prefetch=2) as it:
        take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        assert state["epoch"] == 0 and state["batch"] == 3
        expected = [ids(b) for b in take(it, 6)]  # crosses into epoch 1
        it.set_state(state)  # rewinding the same iterator works too
        assert [ids(b) for b in take(it, 6)] == expected
    with iterator(dataset, 4, seed=1, prefetch=2) as resumed:
        resumed.set_state(state)
        assert [ids(b) for b in take(resumed, 6)] == expected
    with iterator(dataset, 4, seed=2) as other_seed:
        with pytest.raises(ValueError, match="seed=1"):
            other_seed.set_state(state)


# ----------------------------------------------------------------------- corruption

def rewrite_record(path, index, change):
    """Replaces record `index` of a shard by change(record bytes), keeping valid framing."""
    with data.TFRecordIndex(path) as shard:
        records = [shard.read(i) for i in range(len(shard))]
    records[index] = change(records[index])
    with open(path, "wb") as file:
        file.write(b"".join(data.frame_record(r) for r in records))


def mutate_feature(mutation):
    def change(raw):
        example = data.Example.FromString(raw)
        mutation(example.features.feature)
        return example.SerializeToString()

    return change


def truncate(path, index):
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) - 7)


def flip_byte(path, index):
    with data.TFRecordIndex(path) as shard:
        offset = shard._offsets[index] + 20
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x40]))


def wrong_type(path, index):
    def label_as_float(feature):
        feature["label"].float_list.value.append(1.0)

    rewrite_record(path, index, mutate_feature(label_as_float))


def short_imu(path, index):
    rewrite_record(path, index, mutate_feature(lambda f: f["imu"].float_list.value.pop()))


def nan_imu(path, index):
    def poison(feature):
        feature["imu"].float_list.value[9] = float("nan")

    rewrite_record(path, index, mutate_feature(poison))


def nan_imu_in_place(path, index):
    """NaN in the bytes of a canonical record (the fast decoding path), framing kept valid."""
    def poison(raw):
        value = np.asarray(make_window(index).imu, "<f4").reshape(-1)[9:10].tobytes()
        assert raw.count(value) == 1
        return raw.replace(value, np.array([np.nan], "<f4").tobytes())

    rewrite_record(path, index, poison)


def nonzero_absent_embedding(path, index):
    def poison(feature):
        assert not feature["has_text"].int64_list.value[0]
        feature["text_emb"].float_list.value[1] = 0.5

    rewrite_record(path, index, mutate_feature(poison))


def nonzero_absent_embedding_in_place(path, index):
    """An absent text embedding (stored as zeros) made non-zero in a canonical record."""
    def poison(raw):
        zeros = example_codec._feature_entry("text_emb", "float_list",
                                             example_codec._float_list(np.zeros(TEXT_DIM)))
        assert raw.count(zeros) == 1
        return raw.replace(zeros, example_codec._feature_entry(
            "text_emb", "float_list", example_codec._float_list([0.0, 0.5, 0.0, 0.0])))

    rewrite_record(path, index, poison)


CORRUPTIONS = {  # name: (corrupt(path, index), record index, words in the message)
    "truncated": (truncate, 5, "truncated"),
    "flipped_byte": (flip_byte, 3, "data CRC mismatch"),
    "wrong_type": (wrong_type, 3, "field 'label' is a float_list"),
    "wrong_imu_length": (short_imu, 3, "field 'imu' has 47 values, expected 48"),
    "nan_in_imu": (nan_imu, 3, "field 'imu' holds NaN"),
    "nan_in_canonical_imu": (nan_imu_in_place, 3, "field 'imu' holds NaN"),
    "nonzero_absent_embedding": (nonzero_absent_embedding, 3,
                                 "field 'text_emb' is absent (its flag is 0) but holds 4 values"),
    "nonzero_absent_embedding_in_place": (nonzero_absent_embedding_in_place, 3,
                                          "field 'text_emb' is absent (its flag is 0) but holds"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_record_raises_or_is_skipped(tmp_path, kind):
    corrupt, bad, words = CORRUPTIONS[kind]
    write_dataset(tmp_path, {"train": 6}, records_per_shard=6)
    shard = os.path.join(tmp_path, "primus_imu_windows-train.tfrecord-00000-of-00001")
    corrupt(shard, bad)

    with iterator(tmp_path, 2, shuffle=False, prefetch=2) as it:
        take(it, bad // 2)  # the batches before the bad record are fine
        with pytest.raises(data.DataError) as error:
            next(it)
    message = str(error.value)
    assert shard in message and f"record {bad}" in message and words in message
    with pytest.raises(data.DataError, match=f"record {bad}"):
        data.load_split(tmp_path, "train")

    with iterator(tmp_path, 2, shuffle=False, prefetch=2, skip_corrupt=True,
                  num_epochs=2) as it:
        batches = [ids(b) for b in it]
        stats = it.stats
    fill = (bad + 1) % 6  # the next record in this process's order, wrapping round
    epoch = [i if i != bad else fill for i in range(6)]
    assert sum(batches, []) == epoch + epoch
    assert stats == {"records_read": 12, "skipped_records": 2}
