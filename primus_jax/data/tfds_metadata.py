"""The prepared dataset as a TensorFlow Datasets (TFDS) dataset: its metadata, from manifest.json.

`tfds.builder_from_directory(dir)` opens a folder that holds, next to the shards,

    dataset_info.json   name, version, description, and per split the record count of each
                        shard and the template of the shards' file names
    features.json       the FeaturesDict of one record (TFDS's own JSON form of the spec)
    label.labels.txt    the class names, one a line (where TFDS's ClassLabel keeps them);
                        only when the manifest names classes

All three are a pure function of manifest.json (`tfds_files`), written with the standard
library only: no TensorFlow or TFDS is needed to write or read a dataset, only to open it with
TFDS. The feature spec, in the schema's field order (primus_jax.data.schema):

    imu                 Tensor (T, 6) float32     acc x,y,z [m/s^2] then gyro x,y,z [rad/s]
    imu_shape           Tensor (2,) int64         [T, 6]
    rate_hz             Tensor () float32
    text                Text
    text_emb            Tensor (Dt,) float32      zeros where has_text is False
    has_text            Tensor () bool
    video_emb           Tensor (Dv,) float32      zeros where has_video is False
    has_video           Tensor () bool
    label               ClassLabel(class_names)   int64, -1 = unlabelled
    source, recording_id, subject   Text
    start_s, end_s      Tensor () float32

Shards are named in TFDS's default template, `<DATASET_NAME>-<split>.tfrecord-<k:05d>-of-<n:05d>`
(`shard_file_name`). A dataset written before TFDS support (shards `<split>-<k:05d>.tfrecord`)
gets the matching template `{SPLIT}-{SHARD_INDEX}.{FILEFORMAT}` instead, so its files need no
renaming. Our reader keeps reading the shards manifest.json lists; `check_tfds_files` makes
opening a dataset fail when the TFDS metadata there disagrees with manifest.json.
"""

from __future__ import annotations

import json

from primus_jax import paths
from primus_jax.data.schema import CHANNELS, DataError

DATASET_NAME = "primus_imu_windows"
DATASET_INFO_NAME = "dataset_info.json"
FEATURES_NAME = "features.json"
LABELS_NAME = "label.labels.txt"
TFDS_FILE_NAMES = (LABELS_NAME, FEATURES_NAME, DATASET_INFO_NAME)  # the order they are written in
SHARD_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
PRE_TFDS_SHARD_TEMPLATE = "{SPLIT}-{SHARD_INDEX}.{FILEFORMAT}"
_FILE_FORMAT = "tfrecord"
_FEATURES = "tensorflow_datasets.core.features."


def shard_file_name(split: str, shard: int, num_shards: int) -> str:
    """The file name of shard `shard` of `num_shards` of `split`, in TFDS's default template."""
    return f"{DATASET_NAME}-{split}.{_FILE_FORMAT}-{shard:05d}-of-{num_shards:05d}"


def _shard_template(split: str, files: list[str]) -> str | None:
    """The TFDS file-name template that gives exactly `files` for `split`, or None."""
    for template, name in ((SHARD_TEMPLATE, shard_file_name),
                           (PRE_TFDS_SHARD_TEMPLATE,
                            lambda split, k, n: f"{split}-{k:05d}.{_FILE_FORMAT}")):
        if files == [name(split, k, len(files)) for k in range(len(files))]:
            return template
    return None


def _tensor(shape: tuple, dtype: str, description: str) -> dict:
    dimensions = {"dimensions": [str(d) for d in shape]} if shape else {}
    return {"pythonClassName": _FEATURES + "tensor_feature.Tensor", "description": description,
            "tensor": {"shape": dimensions, "dtype": dtype, "encoding": "none"}}


def _text(description: str) -> dict:
    return {"pythonClassName": _FEATURES + "text_feature.Text", "description": description,
            "text": {}}


def features_json(manifest: dict) -> dict:
    """features.json: the FeaturesDict of one record (module docstring), as TFDS writes it."""
    T, text_dim, video_dim = manifest["T"], manifest["text_dim"], manifest["video_dim"]
    num_classes = len(manifest["class_names"])
    features = {
        "imu": _tensor((T, CHANNELS), "float32",
                       "IMU window: acc x,y,z [m/s^2] then gyro x,y,z [rad/s], one row a sample"),
        "imu_shape": _tensor((2,), "int64", f"[T, {CHANNELS}]"),
        "rate_hz": _tensor((), "float32", "sampling rate [Hz]"),
        "text": _text("narration or class prompt, utf-8, may be empty"),
        "text_emb": _tensor((text_dim,), "float32",
                            "frozen text-tower embedding of text; zeros where has_text is False"),
        "has_text": _tensor((), "bool", "whether text_emb is present"),
        "video_emb": _tensor((video_dim,), "float32",
                             "frozen video-tower embedding of the window's video; zeros where "
                             "has_video is False"),
        "has_video": _tensor((), "bool", "whether video_emb is present"),
        "label": {"pythonClassName": _FEATURES + "class_label_feature.ClassLabel",
                  "description": "class index into the class names, -1 = unlabelled",
                  "classLabel": {"numClasses": str(num_classes)} if num_classes else {}},
        "source": _text("the source dataset"),
        "recording_id": _text("the recording the window was cut from"),
        "subject": _text("the person wearing the sensor"),
        "start_s": _tensor((), "float32", "window start in the recording [s]"),
        "end_s": _tensor((), "float32", "window end in the recording [s]"),
    }
    return {"pythonClassName": _FEATURES + "features_dict.FeaturesDict",
            "featuresDict": {"features": features}}


def dataset_info_json(manifest: dict) -> dict:
    """dataset_info.json: name, version, description and splits (shard lengths, file template).

    DataError if the shards of a split follow neither file-name template (module docstring).
    """
    splits = []
    for split, info in sorted(manifest["splits"].items()):
        files = [entry["file"] for entry in info["shards"]]
        template = _shard_template(split, files)
        if template is None:
            raise DataError(f"the shard files of split '{split}' {files[:2]} follow no TFDS "
                            f"file-name template; expected {shard_file_name(split, 0, len(files))} "
                            f"and so on")
        splits.append({"name": split, "filepathTemplate": template,
                       "shardLengths": [str(entry["records"]) for entry in info["shards"]]})
    towers = json.dumps(manifest["towers"], sort_keys=True)
    info = {
        "name": DATASET_NAME,
        "version": f"{manifest['schema_version']}.0.0",
        "description": (f"IMU windows prepared by primus_jax data_prep: T={manifest['T']} "
                        f"samples at {manifest['rate_hz']} Hz, {CHANNELS} channels; text "
                        f"embeddings of {manifest['text_dim']} and video embeddings of "
                        f"{manifest['video_dim']} values from the towers {towers}. "
                        f"manifest.json in this folder is the source of truth."),
        "fileFormat": _FILE_FORMAT,
        "moduleName": __name__,
        "splits": splits,
    }
    if manifest["class_names"]:
        info["supervisedKeys"] = {"tuple": {"items": [{"featureKey": "imu"},
                                                      {"featureKey": "label"}]}}
    return info


def check_class_names(class_names: list) -> None:
    """DataError unless the class names are distinct one-line strings (label.labels.txt)."""
    if any(not isinstance(name, str) or not name.strip() or name != name.strip()
           or "\n" in name or "\r" in name for name in class_names) or (
            len(set(class_names)) != len(class_names)):
        raise DataError(f"the class names {class_names} must be distinct, non-empty strings "
                        f"on one line each, without surrounding spaces (TFDS keeps them one "
                        f"a line)")


def tfds_files(manifest: dict) -> dict[str, str]:
    """{file name: content} of the TFDS metadata of a checked manifest (module docstring)."""
    class_names = manifest["class_names"]
    check_class_names(class_names)
    files = {FEATURES_NAME: json.dumps(features_json(manifest), indent=2, sort_keys=True),
             DATASET_INFO_NAME: json.dumps(dataset_info_json(manifest), indent=2, sort_keys=True)}
    if class_names:
        files[LABELS_NAME] = "".join(name + "\n" for name in class_names)
    return files


def write_tfds_files(dataset_dir, manifest: dict) -> None:
    """Writes the TFDS metadata of `manifest` into dataset_dir, each file atomically, and
    deletes a labels file left by an earlier dataset that named classes.

    dataset_info.json is written last: TFDS cannot open the folder before it is there. Call it
    before manifest.json is published (primus_jax.data.manifest.publish_manifest).
    """
    directory = paths.resolve(dataset_dir)
    files = tfds_files(manifest)
    for name in TFDS_FILE_NAMES:
        if name in files:
            paths.atomic_write(directory / name, files[name])
        elif (directory / name).exists():
            (directory / name).unlink()


def remove_tfds_files(dataset_dir) -> None:
    """Deletes the TFDS metadata, dataset_info.json first (then TFDS no longer opens the folder)."""
    directory = paths.resolve(dataset_dir)
    for name in reversed(TFDS_FILE_NAMES):
        if (directory / name).exists():
            (directory / name).unlink()


def _first_difference(found, expected, where: str = "") -> str:
    """Where two parsed JSON values first differ: 'splits[0].shardLengths[1] is "5", not "4"'."""
    if isinstance(found, dict) and isinstance(expected, dict):
        for key in sorted(set(found) | set(expected)):
            if found.get(key) != expected.get(key):
                return _first_difference(found.get(key), expected.get(key),
                                         f"{where}.{key}" if where else key)
    if isinstance(found, list) and isinstance(expected, list) and len(found) == len(expected):
        for i, (a, b) in enumerate(zip(found, expected)):
            if a != b:
                return _first_difference(a, b, f"{where}[{i}]")
    return f"{where or 'its content'} is {json.dumps(found)[:80]}, not {json.dumps(expected)[:80]}"


def _disagreement(name: str, found_text: str, expected_text: str | None) -> str | None:
    """How the TFDS file `name` holding `found_text` (None: absent) differs from the expected
    text (None: not expected), or None if it agrees."""
    if found_text is None or expected_text is None:
        return (None if found_text == expected_text else "it is missing" if found_text is None
                else "it names classes and the manifest names none")
    if name == LABELS_NAME:
        found, expected = found_text.splitlines(), expected_text.splitlines()
    else:
        try:
            found = json.loads(found_text)
        except json.JSONDecodeError as error:
            return f"it is not valid JSON ({error})"
        expected = json.loads(expected_text)
    return None if found == expected else _first_difference(found, expected)


def check_tfds_files(dataset_dir, manifest: dict, manifest_path) -> None:
    """DataError naming both files if the TFDS metadata in dataset_dir disagrees with the
    manifest read from manifest_path.

    A folder with none of the TFDS files (a dataset written before TFDS support) passes; one
    with any of them must hold exactly `tfds_files(manifest)`.
    """
    directory = paths.resolve(dataset_dir)
    found = {name: (directory / name).read_text() if (directory / name).exists() else None
             for name in TFDS_FILE_NAMES}
    if all(text is None for text in found.values()):
        return
    try:
        expected = tfds_files(manifest)
    except DataError as error:
        raise DataError(f"{manifest_path}: {error}") from None
    for name in TFDS_FILE_NAMES:
        problem = _disagreement(name, found[name], expected.get(name))
        if problem is not None:
            raise DataError(f"{directory / name} disagrees with {manifest_path}: {problem}; "
                            f"rewrite the TFDS metadata from the manifest with "
                            f"`python -m data_prep.add_tfds_metadata {directory}`")
