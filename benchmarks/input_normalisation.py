"""What the encoder's first layer keeps: the statistics floor on raw windows vs GroupNorm-ed windows.

    python -m benchmarks.input_normalisation --dataset watch=DIR@heldout --dataset DIR ... [--record DIR]

The encoder's first layer is GroupNorm(2 groups) over (3 axes x T) per sensor (docs/design.md §1): per window
and sensor, x -> (x - m) / s with m, s the mean and standard deviation over the triplet's 3 x T
values (the affine part starts at the identity). What it removes: the common offset m (with gravity
g = (g_x, g_y, g_z) a window keeps g - mean(g) per axis, so gravity along (1, 1, 1) / sqrt(3)
vanishes entirely) and the scale s (a still window and a vigorous one end up with unit spread, so
the signal's magnitude is gone, kept only relative to gravity's spread over the axes).

For each dataset the script runs the suite's few-shot probe on evaluate.channel_statistics of
(a) the raw windows and (b) the same windows after that standardisation, and prints the mean
accuracy per shot count (mean ± s.e.), then one JSON line {"<dataset>, <variant>": {k: mean}}: the
gap is what any encoder behind GroupNorm must recover (or cannot).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks import common
from primus_jax import evaluate, suite, suite_specs


def group_standardize(windows: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """The encoder's input GroupNorm without affine: each (T, 3) sensor triplet to zero mean, unit variance."""
    x = windows.reshape(windows.shape[0], windows.shape[1], 2, 3).astype(np.float64)
    mean = x.mean(axis=(1, 3), keepdims=True)
    var = x.var(axis=(1, 3), keepdims=True)
    return ((x - mean) / np.sqrt(var + eps)).reshape(windows.shape).astype(np.float32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", action="append", required=True, metavar="[NAME=]DIR[@SPLIT,...]")
    common.add_record_argument(parser)
    args = parser.parse_args(argv)
    settings = suite_specs.SuiteSettings()
    means = {}
    for spec in args.dataset:
        dataset = suite_specs.load_dataset_spec(spec, settings)
        (train_x, train_y), (test_x, test_y) = dataset.train, dataset.test
        shots = suite.feasible_shots(settings, train_y, len(dataset.classes))
        protocol = evaluate.FewShotProtocol(shots=shots, num_classes=len(dataset.classes), trials=settings.trials)
        for label, transform in (("raw windows", lambda x: x), ("after input GroupNorm", group_standardize)):
            train_f, test_f = evaluate.standardize(evaluate.channel_statistics(transform(train_x)),
                                                   evaluate.channel_statistics(transform(test_x)))
            result = evaluate.few_shot_probe(train_f, train_y, test_f, test_y, protocol, progress=False)
            cells = ", ".join(f"{k}-shot {v['mean']:.3f} ± {v['se']:.3f}" for k, v in result.items())
            print(f"{dataset.name}, statistics of {label}: {cells}")
            means[f"{dataset.name}, {label}"] = {k: round(v["mean"], 4) for k, v in result.items()}
    print(json.dumps(means))
    if args.record:
        common.record_result(args.record, "input_normalisation", {"benchmark": "input_normalisation",
                                                                  "mean_accuracy": means}, argv)


if __name__ == "__main__":
    main()
