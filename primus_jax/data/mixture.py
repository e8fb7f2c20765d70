"""Dataset mixtures: several prepared datasets drawn with weights into every global batch.

A mixture is given as "name:weight,name:weight" (or a sequence of "name:weight" strings or
(name, weight) pairs). A name is a dataset folder; a relative one is taken under a root folder
(config.data.dir), an absolute or gs:// one as it is. Weights are positive and need not sum to 1.

Every global batch of G records holds exactly g_i records of dataset i. With P processes the
batch is cut into G / P units of P records (one per process), and dataset i gets u_i units,
the largest-remainder rounding of (G / P) * w_i / sum(w), so g_i = P * u_i, sum g_i = G and
every process reads g_i / P records of dataset i. Each dataset runs its own `BatchIterator` at
global batch g_i over its own epochs (seed derived from (seed, i)); the local batch is the
datasets' local batches concatenated in mixture order. The iterator's state is the list of the
datasets' states, so resuming continues every dataset exactly where it was.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from primus_jax.data.loader import BatchIterator


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One dataset of a mixture: its name as given, its folder and its (unnormalised) weight."""

    name: str
    dataset_dir: str
    weight: float


def parse_mixture(spec, root: str = "") -> list[MixtureSource]:
    """The sources of a mixture spec (module docstring); ValueError with one sentence if malformed."""
    if isinstance(spec, str):
        items = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        items = [part.strip() if isinstance(part, str) else part for part in spec]
    sources = []
    for item in items:
        if isinstance(item, str):
            name, sep, weight = item.rpartition(":")
            if not sep or not name:
                raise ValueError(f"data.mixture entry {item!r} must be 'name:weight'")
        elif len(item) == 2:
            name, weight = item
        else:
            raise ValueError(f"data.mixture entry {item!r} must be 'name:weight' or a (name, weight) pair")
        try:
            weight = float(weight)
        except ValueError:
            raise ValueError(f"data.mixture entry {item!r}: the weight {weight!r} is not a number") from None
        if not weight > 0 or not np.isfinite(weight):
            raise ValueError(f"data.mixture entry {item!r}: the weight must be a positive number")
        folder = name if ("://" in name or name.startswith("/") or not root) else f"{str(root).rstrip('/')}/{name}"
        sources.append(MixtureSource(str(name), folder, weight))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data.mixture names a dataset twice: {names}")
    return sources


def allocate(weights: Sequence[float], global_batch_size: int, process_count: int = 1) -> list[int]:
    """Records g_i of each dataset in a global batch (module docstring); sum g_i = global_batch_size.

    ValueError if a dataset would get no record.
    """
    units = global_batch_size // process_count
    shares = np.asarray(weights, np.float64) / np.sum(weights) * units
    counts = np.floor(shares).astype(int)
    remainders = shares - counts
    for i in np.argsort(-remainders, kind="stable")[: units - counts.sum()]:
        counts[i] += 1
    if (counts == 0).any():
        empty = int(np.flatnonzero(counts == 0)[0])
        raise ValueError(f"data.mixture: the weight {weights[empty]} of dataset {empty + 1} gives it no record of a "
                         f"global batch of {global_batch_size} (in units of {process_count} processes)")
    return [int(c) * process_count for c in counts]


def source_seed(seed: int, index: int) -> int:
    """The shuffling seed of the mixture's dataset `index`: SeedSequence([seed, index])."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


class MixtureIterator:
    """Local batches of a mixture, with BatchIterator's interface (next, get_state, set_state, close).

    Each `next()` returns this process's local batch: the concatenation, in mixture order, of the
    datasets' local batches of g_i / P records (same fields and shapes as BatchIterator's; the
    datasets must agree on T and embedding widths). `steps_per_epoch` is floor(sum_i N_i / G):
    an epoch of the mixture sees as many records as the datasets hold together.
    """

    def __init__(self, sources: Sequence[MixtureSource], split: str, global_batch_size: int, *, seed: int = 0,
                 process_index: int | None = None, process_count: int | None = None, **loader_options):
        if process_count is None:
            import jax  # deferred, as in BatchIterator

            process_count = jax.process_count()
        self.sources = list(sources)
        self.batch_sizes = allocate([s.weight for s in self.sources], global_batch_size, process_count)
        self.global_batch_size = int(global_batch_size)
        self._iterators: list[BatchIterator] = []
        try:
            for i, (source, size) in enumerate(zip(self.sources, self.batch_sizes)):
                self._iterators.append(BatchIterator(
                    source.dataset_dir, split, size, seed=source_seed(seed, i), process_index=process_index,
                    process_count=process_count, **loader_options))
        except BaseException:
            self.close()
            raise
        total = sum(it.num_records for it in self._iterators)
        self._steps_per_epoch = max(1, total // self.global_batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    @property
    def shares(self) -> dict[str, float]:
        """{name: g_i / G}, the fraction of every global batch drawn from each dataset."""
        return {s.name: g / self.global_batch_size for s, g in zip(self.sources, self.batch_sizes)}

    def epochs_seen(self) -> dict[str, float]:
        """{name: passes over that dataset's split so far} (epoch + batch / its steps per epoch)."""
        out = {}
        for source, it in zip(self.sources, self._iterators):
            state = it.get_state()
            out[source.name] = state["epoch"] + state["batch"] / it.steps_per_epoch
        return out

    @property
    def stats(self) -> dict:
        totals: dict[str, int] = {}
        for it in self._iterators:
            for key, value in it.stats.items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def get_state(self) -> dict:
        return {"mixture": [it.get_state() for it in self._iterators],
                "names": [s.name for s in self.sources]}

    def set_state(self, state: dict) -> None:
        names = [s.name for s in self.sources]
        if "mixture" not in state or state.get("names") != names:
            raise ValueError(f"MixtureIterator.set_state: the checkpoint's input position is for datasets "
                             f"{state.get('names', 'not a mixture')}, this run mixes {names}")
        for it, sub_state in zip(self._iterators, state["mixture"]):
            it.set_state(sub_state)

    def __iter__(self) -> "MixtureIterator":
        return self

    def __next__(self) -> dict:
        parts = [next(it) for it in self._iterators]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def close(self) -> None:
        for it in self._iterators:
            it.close()
