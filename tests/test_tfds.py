"""The prepared dataset as a TensorFlow Datasets dataset: tfds.builder_from_directory opens what
DatasetWriter writes, record for record; TFDS metadata that disagrees with manifest.json stops our
reader; a dataset written before TFDS support still trains and gets its metadata in one command."""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import conftest
import primus_jax
from data_prep import add_tfds_metadata as add_metadata_command
from primus_jax import checkpoint, data, trainconfig
from tests.train_fixtures import TINY_T, tiny_config


TEXT_DIM, VIDEO_DIM, RATE = 5, 3, 50.0
CLASSES = ["walk", "run", "sit up"]
SPLITS = {"train": 11, "val": 3}  # train: shards of 4, 4 and 3 records


make_window = functools.partial(conftest.make_window, T=TINY_T, text_dim=TEXT_DIM, video_dim=VIDEO_DIM, rate_hz=RATE)


def write_dataset(out_dir) -> str:
    with data.DatasetWriter(out_dir, T=TINY_T, rate_hz=RATE, text_dim=TEXT_DIM, video_dim=VIDEO_DIM,
                            class_names=CLASSES, records_per_shard=4,
                            towers={"text": {"name": "minilm"}}) as writer:
        for split, count in SPLITS.items():
            for i in range(count):
                writer.add(split, make_window(i))
    return str(out_dir)


def write_pre_tfds_dataset(out_dir) -> str:
    """A dataset as primus_jax wrote it before TFDS support: schema 1 (an absent embedding is
    an empty list), shards `<split>-<k:05d>.tfrecord`, manifest.json and nothing else."""
    os.makedirs(out_dir, exist_ok=True)
    splits = {}
    for split, count in SPLITS.items():
        shards = []
        for k, start in enumerate(range(0, count, 4)):
            records = [data.encode_example(make_window(i), text_dim=0, video_dim=0)
                       for i in range(start, min(start + 4, count))]
            name = f"{split}-{k:05d}.tfrecord"
            with open(os.path.join(out_dir, name), "wb") as file:
                file.write(b"".join(data.frame_record(r) for r in records))
            shards.append({"file": name, "records": len(records)})
        splits[split] = {"records": count, "shards": shards}
    manifest = {"schema_version": 1, "T": TINY_T, "rate_hz": RATE, "channels": 6,
                "text_dim": TEXT_DIM, "video_dim": VIDEO_DIM, "towers": {}, "class_names": CLASSES,
                "splits": splits}
    with open(os.path.join(out_dir, "manifest.json"), "w") as file:
        json.dump(manifest, file)
    return str(out_dir)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tfds"))


def tfds_records(dataset_dir, split) -> list[dict]:
    builder = tfds.builder_from_directory(dataset_dir)
    return list(tfds.as_numpy(builder.as_dataset(split=split)))


def assert_tfds_equals_our_reader(dataset_dir):
    """Every split: TFDS yields our reader's records, in the same order, with equal values."""
    manifest = data.read_manifest(dataset_dir)
    for split, count in SPLITS.items():
        ours = data.load_split(dataset_dir, split)
        theirs = tfds_records(dataset_dir, split)
        assert len(theirs) == count
        for i, record in enumerate(theirs):
            window = make_window(i)
            assert record["imu"].dtype == np.float32 and record["imu"].shape == (TINY_T, 6)
            for name in ("imu", "text_emb", "video_emb", "has_text", "has_video", "label",
                         "start_s", "end_s"):
                np.testing.assert_array_equal(record[name], ours[name][i], err_msg=f"{split} {i} {name}")
            for name in ("text", "source", "recording_id", "subject"):
                assert record[name].decode("utf-8") == ours[name][i] == getattr(window, name)
            np.testing.assert_array_equal(record["imu"], window.imu)
            assert record["label"] == window.label and record["has_text"] == (window.text_emb is not None)
            assert record["imu_shape"].tolist() == [TINY_T, 6] and record["rate_hz"] == manifest["rate_hz"]


def test_tfds_yields_every_record_with_our_readers_values(dataset):
    assert_tfds_equals_our_reader(dataset)


def test_tfds_info_splits_and_class_names(dataset, tmp_path):
    info = tfds.builder_from_directory(dataset).info
    manifest = data.read_manifest(dataset)
    for split, count in SPLITS.items():
        assert info.splits[split].num_examples == count == manifest["splits"][split]["records"]
        assert info.splits[split].num_shards == len(manifest["splits"][split]["shards"])
    assert info.splits["train"].shard_lengths == [4, 4, 3]
    assert info.features["label"].names == CLASSES and info.features["label"].num_classes == 3
    assert info.supervised_keys == ("imu", "label")
    assert str(info.version) == f"{data.SCHEMA_VERSION}.0.0"
    # features.json is what TFDS itself writes for the spec of the issue.
    tensor, text = tfds.features.Tensor, tfds.features.Text()
    spec = tfds.features.FeaturesDict({
        "imu": tensor(shape=(TINY_T, 6), dtype=tf.float32), "imu_shape": tensor(shape=(2,), dtype=tf.int64),
        "rate_hz": tensor(shape=(), dtype=tf.float32), "text": text,
        "text_emb": tensor(shape=(TEXT_DIM,), dtype=tf.float32), "has_text": tensor(shape=(), dtype=tf.bool),
        "video_emb": tensor(shape=(VIDEO_DIM,), dtype=tf.float32),
        "has_video": tensor(shape=(), dtype=tf.bool), "label": tfds.features.ClassLabel(names=CLASSES),
        "source": text, "recording_id": text, "subject": text,
        "start_s": tensor(shape=(), dtype=tf.float32), "end_s": tensor(shape=(), dtype=tf.float32)})

    def without_descriptions(features):
        return {name: {k: v for k, v in feature.items() if k != "description"}
                for name, feature in features["featuresDict"]["features"].items()}

    spec.save_config(str(tmp_path))
    with open(os.path.join(dataset, "features.json")) as ours, open(tmp_path / "features.json") as theirs:
        assert without_descriptions(json.load(ours)) == without_descriptions(json.load(theirs))


def test_a_tfds_batch_goes_through_load_encoder(dataset, tmp_path):
    config = tiny_config("unused")
    model = trainconfig.build_model(config.model)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, TINY_T, 6)))["params"]
    checkpoint.export_encoder(str(tmp_path / "export"), params, config.model.to_dict(), TINY_T, RATE)
    encode = primus_jax.load_encoder(str(tmp_path / "export"), batch_size=8)
    builder = tfds.builder_from_directory(dataset)
    batch = next(iter(tfds.as_numpy(builder.as_dataset(split="train", batch_size=8))))
    assert batch["imu"].shape == (8, TINY_T, 6) and batch["imu"].dtype == np.float32
    features = encode(batch["imu"])
    assert features.shape == (8, config.model.mm_dim) and np.isfinite(features).all()
    np.testing.assert_array_equal(features, encode(data.load_split(dataset, "train")["imu"][:8]))


def _edit_json(name, edit):
    def change(dataset_dir):
        path = os.path.join(dataset_dir, name)
        with open(path) as file:
            content = json.load(file)
        edit(content)
        with open(path, "w") as file:
            json.dump(content, file)
    return change


def _shard_length(info):
    info["splits"][0]["shardLengths"][2] = "4"  # splits are sorted: train [4, 4, 3], then val


def _truncate_features(dataset_dir):
    path = os.path.join(dataset_dir, "features.json")
    with open(path, "r+") as file:
        file.truncate(os.path.getsize(path) // 2)


def _rename_class(dataset_dir):
    with open(os.path.join(dataset_dir, "label.labels.txt"), "w") as file:
        file.write("walk\nrun\nsit\n")


def _remove_features(dataset_dir):
    os.remove(os.path.join(dataset_dir, "features.json"))


@pytest.mark.parametrize("corrupt, name, words", [
    (_edit_json("dataset_info.json", _shard_length), "dataset_info.json",
     'splits[0].shardLengths[2] is "4", not "3"'),
    (_truncate_features, "features.json", "it is not valid JSON"),
    (_rename_class, "label.labels.txt", '[2] is "sit", not "sit up"'),
    (_remove_features, "features.json", "it is missing"),
    (_edit_json("manifest.json", lambda m: m["class_names"].reverse()), "label.labels.txt",
     "[0] is \"walk\", not \"sit up\""),
], ids=["edited_shard_length", "half_written_features", "renamed_class", "missing_features",
        "edited_manifest"])
def test_tfds_metadata_that_disagrees_with_the_manifest_is_caught_on_open(tmp_path, corrupt, name, words):
    dataset_dir = write_dataset(tmp_path / "data")
    corrupt(dataset_dir)
    for open_dataset in (lambda: data.load_split(dataset_dir, "val"),
                         lambda: data.BatchIterator(dataset_dir, "train", 2, process_index=0,
                                                    process_count=1)):
        with pytest.raises(data.DataError) as error:
            open_dataset()
        message = str(error.value)
        assert message.startswith(f"{os.path.join(dataset_dir, name)} disagrees with "
                                  f"{os.path.join(dataset_dir, 'manifest.json')}: ")
        assert words in message and message.count(". ") == 0, message
    # The command rewrites the TFDS metadata from the manifest (the source of truth).
    assert add_metadata_command.main([dataset_dir]) == 0
    assert data.load_split(dataset_dir, "val")["label"].tolist() == [-1, 0, 1]


def test_a_dataset_prepared_before_tfds_trains_and_gets_its_metadata_in_one_command(tmp_path, capsys):
    old = write_pre_tfds_dataset(tmp_path / "old")
    new = write_dataset(tmp_path / "new")
    shard_names = sorted(os.listdir(old))

    def batches(dataset_dir):
        with data.BatchIterator(dataset_dir, "train", 4, seed=3, num_epochs=2, process_index=0,
                                process_count=1) as it:
            return list(it)

    def assert_same_batches(a, b):
        assert len(a) == len(b) == 4
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for name in x:
                np.testing.assert_array_equal(x[name], y[name])

    # It trains as it is: the reader takes the shard names from the manifest, reads schema 1.
    assert_same_batches(batches(old), batches(new))
    with pytest.raises(tfds.core.dataset_info.DatasetInfoFileError):
        tfds.builder_from_directory(old)

    assert add_metadata_command.main([old]) == 0
    assert "4 shard(s) re-encoded in schema 2" in capsys.readouterr().out  # each lacks some video
    assert sorted(set(os.listdir(old)) - {"dataset_info.json", "features.json", "label.labels.txt"}) == shard_names
    assert data.read_manifest(old)["schema_version"] == data.SCHEMA_VERSION
    assert_tfds_equals_our_reader(old)
    assert_same_batches(batches(old), batches(new))
    assert add_metadata_command.main([old]) == 0  # run again: nothing left to re-encode
    assert "0 shard(s) re-encoded" in capsys.readouterr().out


def test_the_command_stops_at_a_short_shard_and_leaves_the_dataset_readable(tmp_path, capsys):
    old = write_pre_tfds_dataset(tmp_path / "old")
    shard = os.path.join(old, "train-00001.tfrecord")
    with open(shard, "r+b") as file:
        file.truncate(os.path.getsize(shard) - 9)
    val_before = data.load_split(old, "val")
    assert add_metadata_command.main([old]) == 1
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith(f"error: {shard}: holds 3 intact records, ") and "says 4" in error
    assert not os.path.exists(os.path.join(old, "dataset_info.json"))
    assert data.read_manifest(old)["schema_version"] == 1
    val_after = data.load_split(old, "val")
    for name in ("imu", "text_emb", "video_emb", "has_text", "has_video", "label"):
        np.testing.assert_array_equal(val_after[name], val_before[name])
    with data.BatchIterator(old, "train", 4, shuffle=False, num_epochs=1, process_index=0,
                            process_count=1) as it:  # the re-encoded first shard reads the same
        assert next(it)["imu"][:, 0, 0].tolist() == [0, 1, 2, 3]


def test_writer_refuses_class_names_tfds_cannot_keep(tmp_path):
    for names in (["walk", "walk"], ["walk\nrun"], [" walk"], [""]):
        with pytest.raises(ValueError, match="class names .* must be distinct"):
            data.DatasetWriter(tmp_path, T=TINY_T, rate_hz=RATE, text_dim=0, video_dim=0, class_names=names)


def test_an_unlabelled_dataset_without_embeddings_opens_in_tfds(tmp_path):
    with data.DatasetWriter(tmp_path, T=TINY_T, rate_hz=RATE, text_dim=0, video_dim=0) as writer:
        for i in range(3):
            window = make_window(i)
            writer.add("train", data.Window(imu=window.imu, rate_hz=RATE, text=window.text))
    assert not os.path.exists(tmp_path / "label.labels.txt")
    info = tfds.builder_from_directory(str(tmp_path)).info
    assert info.features["label"].num_classes == 0 and info.supervised_keys is None
    records = tfds_records(str(tmp_path), "train")
    assert [r["text_emb"].shape for r in records] == [(0,)] * 3
    assert [int(r["label"]) for r in records] == [-1] * 3
    np.testing.assert_array_equal(np.stack([r["imu"] for r in records]), data.load_split(tmp_path, "train")["imu"])
