"""The datasets a pretraining run reads: data.dir or a data.mixture of several, their manifests,
their splits checked against the batch, and the training batch iterator over them.
"""
from __future__ import annotations

import jax
import ml_collections

from primus_jax import data
from primus_jax.trainconfig import ConfigError, DataDims


def data_workers(config: ml_collections.ConfigDict) -> int:
    """config.data.workers, with -1 resolved to the host's usable cores minus one."""
    workers = config.data.get("workers", -1)
    return data.default_workers() if workers == -1 else workers


def dataset_sources(config: ml_collections.ConfigDict) -> list[data.MixtureSource]:
    """The datasets the run trains on: config.data.mixture's (names under data.dir), else data.dir alone."""
    if not config.data.mixture:
        if not config.data.dir:
            raise ConfigError("data.dir is empty: set --config.data.dir to a dataset prepared by data_prep")
        return [data.MixtureSource(str(config.data.dir), str(config.data.dir), 1.0)]
    try:
        sources = data.parse_mixture(config.data.mixture, config.data.dir)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not sources:
        raise ConfigError(f"data.mixture={config.data.mixture!r} names no dataset")
    return sources


MIXTURE_FIELDS = ("T", "rate_hz", "text_dim", "video_dim")


def read_manifests(sources: list[data.MixtureSource]) -> tuple[list[dict], DataDims]:
    """Each source's manifest and the DataDims they share.

    ConfigError naming two datasets and the field when a mixture's datasets differ in window
    length T, rate or an embedding width.
    """
    manifests = [data.read_manifest(source.dataset_dir) for source in sources]
    first = sources[0]
    for source, manifest in zip(sources[1:], manifests[1:]):
        for field in MIXTURE_FIELDS:
            if float(manifest[field]) != float(manifests[0][field]):
                raise ConfigError(
                    f"data.mixture: datasets {first.name!r} and {source.name!r} differ in {field} "
                    f"({manifests[0][field]} and {manifest[field]}); a mixture's datasets must agree on "
                    f"{', '.join(MIXTURE_FIELDS)}")
    return manifests, DataDims.from_manifest(manifests[0])


def check_splits(config: ml_collections.ConfigDict, sources: list[data.MixtureSource], manifests: list[dict],
                 train_batch_sizes: list[int]) -> None:
    """ConfigError unless each dataset's train split holds its share of a global batch and its val
    split (if any) a whole global batch.

    Checked up front, so a missing or too small validation split fails before training, not at the
    first evaluation.
    """
    g = config.train.global_batch_size
    for source, manifest, share in zip(sources, manifests, train_batch_sizes):
        for role, needed in (("train", share), ("val", g)):
            split = config.data[f"{role}_split"]
            if not split and role == "val":
                continue
            if split not in manifest["splits"]:
                raise ConfigError(f"data.{role}_split={split!r} is not a split of {source.dataset_dir} "
                                  f"(splits: {sorted(manifest['splits'])})")
            records = manifest["splits"][split]["records"]
            if records < needed:
                what = "one global batch" if needed == g else "its share of a global batch"
                raise ConfigError(f"data.{role}_split={split!r} of {source.dataset_dir} has {records} records, "
                                  f"fewer than {what} of {needed}")


def make_train_iterator(config: ml_collections.ConfigDict, sources: list[data.MixtureSource]):
    """The training batches: a BatchIterator over data.dir, or a MixtureIterator over data.mixture."""
    options = dict(shuffle=config.data.shuffle, prefetch=config.data.prefetch, workers=data_workers(config),
                   skip_corrupt=config.data.skip_corrupt)
    if not config.data.mixture:
        return data.BatchIterator(sources[0].dataset_dir, config.data.train_split, config.train.global_batch_size,
                                  seed=config.seed, **options)
    return data.MixtureIterator(sources, config.data.train_split, config.train.global_batch_size,
                                seed=config.seed, **options)


def mixture_batch_sizes(config: ml_collections.ConfigDict, sources: list[data.MixtureSource]) -> list[int]:
    """Records of each dataset in a global batch (data.mixture.allocate); ConfigError if one gets none."""
    if not config.data.mixture:
        return [config.train.global_batch_size]
    try:
        return data.mixture.allocate([s.weight for s in sources], config.train.global_batch_size,
                                     jax.process_count())
    except ValueError as error:
        raise ConfigError(str(error)) from None
