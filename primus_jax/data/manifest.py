"""manifest.json: the dataset's header (T, rate, embedding dims, towers, classes, splits).

A dataset is a folder of TFRecord shards plus ``manifest.json`` and TFDS's metadata::

    <dir>/manifest.json                 the source of truth, written last
    <dir>/primus_imu_windows-<split>.tfrecord-<k:05d>-of-<n:05d>
                                        one tf.train.Example per IMU window
    <dir>/dataset_info.json, features.json, label.labels.txt
                                        for tfds.builder_from_directory (tfds_metadata.py)

Datasets written before TFDS support name their shards ``<split>-<k:05d>.tfrecord`` and may
lack the TFDS files; they read the same, since the reader takes the file names from the manifest.
"""

from __future__ import annotations

import json

from primus_jax import paths
from primus_jax.data.schema import CHANNELS, READABLE_SCHEMA_VERSIONS, DataError
from primus_jax.data.tfds_metadata import check_tfds_files, write_tfds_files

MANIFEST_NAME = "manifest.json"
MANIFEST_KEYS = ("schema_version", "T", "rate_hz", "channels", "text_dim", "video_dim",
                 "towers", "class_names", "splits")


def write_json_atomically(path, content: dict) -> None:
    """`content` as indented JSON at `path` (local or gs://), all or nothing (`paths.atomic_write`)."""
    paths.atomic_write(path, json.dumps(content, indent=2))


def publish_manifest(dataset_dir, manifest: dict) -> None:
    """Publishes a dataset whose shards are in place: writes the TFDS metadata of `manifest`
    (a pure function of it), then manifest.json, each file atomically.

    manifest.json goes last, so a reader never sees a manifest whose TFDS metadata is not yet
    written; a crash before it leaves no manifest, i.e. no dataset.
    """
    directory = paths.resolve(dataset_dir)
    write_tfds_files(directory, manifest)
    write_json_atomically(directory / MANIFEST_NAME, manifest)


def read_json(path) -> dict:
    try:
        content = json.loads(paths.resolve(path).read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a JSON object")
    return content


def read_manifest(dataset_dir, *, check_tfds: bool = True) -> dict:
    """Loads and checks `<dataset_dir>/manifest.json`; DataError if it is missing or invalid,
    or (with check_tfds) if TFDS metadata in the folder disagrees with it."""
    path = paths.resolve(dataset_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest found; is this a dataset written by "
                        f"primus_jax.data.DatasetWriter?")
    manifest = read_json(path)
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    if manifest["schema_version"] not in READABLE_SCHEMA_VERSIONS:
        raise DataError(f"{path}: key 'schema_version' is {manifest['schema_version']!r}; "
                        f"this primus_jax reads schema versions {list(READABLE_SCHEMA_VERSIONS)}")
    if manifest["channels"] != CHANNELS:
        raise DataError(f"{path}: key 'channels' is {manifest['channels']!r}, expected {CHANNELS}")
    for key in ("T", "text_dim", "video_dim"):
        if not isinstance(manifest[key], int) or manifest[key] < (1 if key == "T" else 0):
            raise DataError(f"{path}: key '{key}' is {manifest[key]!r}, expected an integer")
    if not isinstance(manifest["class_names"], list) or not isinstance(manifest["towers"], dict):
        raise DataError(f"{path}: key 'class_names' must be a list and 'towers' an object")
    if not isinstance(manifest["splits"], dict):
        raise DataError(f"{path}: key 'splits' must be an object")
    for split, info in manifest["splits"].items():
        try:
            counts = [int(entry["records"]) for entry in info["shards"]]
            files_ok = all(isinstance(entry["file"], str) for entry in info["shards"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: split '{split}' needs 'records' and a 'shards' list of "
                            f"{{'file', 'records'}}") from None
        if not files_ok or sum(counts) != info.get("records"):
            raise DataError(f"{path}: split '{split}': 'records' is {info.get('records')!r} "
                            f"but its shards hold {sum(counts)}")
    if check_tfds:
        check_tfds_files(path.parent, manifest, path)
    return manifest
