"""Adds (or rewrites) the TFDS metadata of a prepared dataset, so that TFDS can open it.

    python -m data_prep.add_tfds_metadata DATASET_DIR        (local or gs://)

For datasets prepared before data_prep wrote TFDS metadata, and for a folder whose TFDS files
no longer agree with manifest.json (edited by hand): manifest.json is the source of truth.

A schema-1 dataset stored an absent text or video embedding as an empty list, which TFDS's
fixed-shape features cannot parse; each shard holding such a record is re-encoded in schema 2
(the absent embedding as zeros, every value kept) and replaces the shard whole, under its old
name (`paths.atomic_write`). The TFDS files and then manifest.json (now schema 2) are
written last, each atomically; until then the folder reads as before, so an interrupted run is
harmless and can simply be run again. Shards keep their names: dataset_info.json names the
template they follow.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import tqdm

from primus_jax import paths
from primus_jax.data import (MANIFEST_NAME, DataError, Window, frame_record, publish_manifest,
                             read_manifest)
from primus_jax.data.example_codec import ExampleDecoder, encode_example
from primus_jax.data.schema import SCHEMA_VERSION
from primus_jax.data.tfrecord import TFRecordIndex

_WINDOW_FIELDS = ("imu", "rate_hz", "text", "label", "source", "recording_id", "subject",
                  "start_s", "end_s")


def _window(record: dict) -> Window:
    """The Window a decoded record was written from (absent embeddings as None)."""
    return Window(**{name: record[name] for name in _WINDOW_FIELDS},
                  text_emb=record["text_emb"] if record["has_text"] else None,
                  video_emb=record["video_emb"] if record["has_video"] else None)


def _reencode_shards(dataset_dir, manifest: dict) -> int:
    """Re-encodes in schema 2 every shard that holds an absent embedding stored as an empty
    list; returns how many shards were rewritten. DataError for a corrupt or short shard."""
    directory = paths.resolve(dataset_dir)
    text_dim, video_dim = manifest["text_dim"], manifest["video_dim"]
    decoder = ExampleDecoder.for_shape(manifest["T"], text_dim, video_dim)
    shards = [(split, entry) for split, info in sorted(manifest["splits"].items())
              for entry in info["shards"]]
    rewritten = 0
    for split, entry in tqdm.tqdm(shards, desc="shards", unit="shard"):
        path = directory / entry["file"]
        with TFRecordIndex(path) as index:
            stored = [index.read(i) for i in range(min(len(index), entry["records"]))]
        if len(stored) != entry["records"]:
            raise DataError(f"{path}: holds {len(stored)} intact records, "
                            f"{directory / MANIFEST_NAME} says {entry['records']}")
        encoded = [encode_example(_window(decoder.decode(raw, f"{path}: record {i}")),
                                  text_dim=text_dim, video_dim=video_dim)
                   for i, raw in enumerate(stored)]
        if encoded == stored:
            continue
        paths.atomic_write(path, b"".join(frame_record(raw) for raw in encoded))
        rewritten += 1
    return rewritten


def add_tfds_metadata(dataset_dir) -> str:
    """Makes dataset_dir openable by tfds.builder_from_directory (module docstring); returns a
    one-line summary. DataError for a dataset that cannot be read."""
    manifest = read_manifest(dataset_dir, check_tfds=False)
    rewritten = 0
    if manifest["schema_version"] < SCHEMA_VERSION:
        rewritten = _reencode_shards(dataset_dir, manifest)
        manifest["schema_version"] = SCHEMA_VERSION
    publish_manifest(dataset_dir, manifest)
    read_manifest(dataset_dir)  # the TFDS files now agree with the manifest
    return (f"{paths.resolve(dataset_dir)}: TFDS metadata written for splits "
            f"{sorted(manifest['splits'])}; {rewritten} shard(s) re-encoded in schema "
            f"{SCHEMA_VERSION}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; a dataset that cannot be read prints one error sentence and returns 1."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.add_tfds_metadata", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_dir", help="a folder written by data_prep (local or gs://)")
    args = parser.parse_args(argv)
    try:
        print(add_tfds_metadata(paths.check_access(args.dataset_dir)))
    except (DataError, FileNotFoundError, paths.PathError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
