"""Tests of primus_jax.evaluate on small synthetic tasks whose answers are known."""
import json
import math

import jax
import numpy as np
import pytest

from primus_jax import evaluate, logistic, report
from primus_jax.models import IMUEncoder
from tests.numerics import assert_close_to_scale

NUM_CLASSES = 4
DIM = 16
PROBE = evaluate.LinearProbeConfig()
SEPARABLE = evaluate.FewShotProtocol((1, 5), NUM_CLASSES, trials=3, seed=7)


def gaussian_clusters(per_class: int, rng: np.random.Generator, spread: float = 1.0):
    """Class c is N(4 q_c, spread^2 I) in DIM dimensions, q_c orthonormal: well separated directions.

    The q_c are rotated off the axes (a fixed random orthogonal matrix), so every dimension carries
    class signal and the probe's per-dimension standardisation rescales them alike.
    """
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    means = 4.0 * np.linalg.qr(np.random.default_rng(99).standard_normal((DIM, DIM)))[0][:NUM_CLASSES]
    feats = means[labels] + spread * rng.standard_normal((labels.size, DIM))
    return feats.astype(np.float32), labels


@pytest.fixture(scope="module")
def clusters():
    rng = np.random.default_rng(0)
    return gaussian_clusters(30, rng) + gaussian_clusters(100, rng)


@pytest.fixture(scope="module")
def separable_probe(clusters):
    return evaluate.few_shot_probe(*clusters, SEPARABLE, config=PROBE, progress=False)


def test_separable_clusters_are_learned_from_five_shots(separable_probe):
    assert separable_probe[5]["mean"] > 0.9
    assert all(acc > 0.9 for acc in separable_probe[5]["accuracies"])


def test_shuffled_labels_give_chance_accuracy(clusters):
    train_feats, _, test_feats, _ = clusters
    rng = np.random.default_rng(1)
    random_train = rng.integers(0, NUM_CLASSES, train_feats.shape[0])
    random_test = rng.integers(0, NUM_CLASSES, test_feats.shape[0])
    result = evaluate.few_shot_probe(
        train_feats, random_train, test_feats, random_test, evaluate.FewShotProtocol((5,), NUM_CLASSES, trials=3), config=PROBE, progress=False
    )
    # Test labels are iid uniform and independent of the classifier, so each trial's number
    # of hits is exactly Binomial(N, 1/C): 4 standard deviations bound it with p > 0.9999.
    p, n = 1 / NUM_CLASSES, test_feats.shape[0]
    bound = 4 * math.sqrt(p * (1 - p) / n)
    assert all(abs(acc - p) < bound for acc in result[5]["accuracies"])


def test_standard_error_is_std_over_sqrt_trials(separable_probe):
    for stats in separable_probe.values():
        acc = np.asarray(stats["accuracies"])
        assert len(acc) == 3
        assert stats["mean"] == pytest.approx(acc.mean())
        assert stats["se"] == pytest.approx(acc.std(ddof=1) / math.sqrt(3))


def test_trial_seeds_are_independent_and_reproducible(clusters, separable_probe):
    train_labels = clusters[1]
    seeds = [s for stats in separable_probe.values() for s in stats["seeds"]]
    assert len(set(seeds)) == len(seeds)
    subsets = {
        (k, t): frozenset(evaluate.sample_shots(train_labels, k, NUM_CLASSES, np.random.default_rng(s))[0])
        for k, stats in separable_probe.items()
        for t, s in enumerate(stats["seeds"])
    }
    assert len({subsets[(5, t)] for t in range(3)}) == 3
    assert len({subsets[(1, t)] for t in range(3)}) == 3
    assert all(len(subsets[(5, t)]) == 5 * NUM_CLASSES for t in range(3))
    again = evaluate.few_shot_probe(*clusters, SEPARABLE, config=PROBE, progress=False)
    assert again == separable_probe
    other = evaluate.few_shot_probe(*clusters, evaluate.FewShotProtocol((1,), NUM_CLASSES, trials=3, seed=8), config=PROBE, progress=False)
    assert set(other[1]["seeds"]).isdisjoint(separable_probe[1]["seeds"])


def test_small_class_uses_all_its_windows_and_is_recorded():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    indices, short = evaluate.sample_shots(labels, 4, 2, np.random.default_rng(0))
    assert short == {1: 2}
    assert sorted(indices[labels[indices] == 1]) == [6, 7]
    assert np.sum(labels[indices] == 0) == 4 and len(set(indices)) == 6


def test_text_prior_start_is_pulled_to_the_zero_shot_classifier(clusters):
    train_feats, train_labels, test_feats, test_labels = clusters
    text = 4.0 * np.linalg.qr(np.random.default_rng(99).standard_normal((DIM, DIM)))[0][:NUM_CLASSES, None, :] + np.random.default_rng(2).normal(0, 0.1, (NUM_CLASSES, 3, DIM))
    prototypes = evaluate.class_prototypes(text)
    # A vanishing C pins W to the prototypes: the head is the zero-shot classifier plus a bias.
    shots = evaluate.l2_normalize(train_feats[:8])
    fit = logistic.fit_logistic_regression(shots, train_labels[:8], NUM_CLASSES, 1e-9, w_0=prototypes)
    np.testing.assert_allclose(fit.w, prototypes, atol=1e-6)
    result = evaluate.few_shot_probe(
        train_feats, train_labels, test_feats, test_labels, evaluate.FewShotProtocol((1,), NUM_CLASSES, trials=2),
        class_text_embs=text, config=evaluate.LinearProbeConfig(inverse_regularization=1e-9), progress=False,
    )
    zero_shot = evaluate.zero_shot(test_feats, test_labels, text)
    assert zero_shot > 0.9 and all(abs(acc - zero_shot) < 0.02 for acc in result[1]["accuracies"])


def _gaussian_classes(per_class: int, rng: np.random.Generator, classes: int = 5, dim: int = 24):
    """Class c is N(m_c, I) with m_c ~ N(0, 0.6^2 I): overlapping classes, well-conditioned features."""
    means = np.random.default_rng(11).normal(0.0, 0.6, (classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return (means[labels] + rng.standard_normal((labels.size, dim))).astype(np.float32), labels


@pytest.mark.parametrize("c", [0.01, 1.0, 100.0])
def test_probe_agrees_with_scikit_learn_logistic_regression_at_the_same_c(c):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(5)
    (train_x, train_y), (test_x, test_y) = _gaussian_classes(40, rng), _gaussian_classes(200, rng)
    protocol = evaluate.FewShotProtocol((2, 5, 10, 20), 5, trials=2, seed=3)
    ours = evaluate.few_shot_probe(train_x, train_y, test_x, test_y, protocol,
                                   config=evaluate.LinearProbeConfig(inverse_regularization=c), progress=False)
    scaler = StandardScaler().fit(train_x)  # statistics of the training pool, as the probe's
    for k, stats in ours.items():
        assert stats["c"] == [c, c] and all(stats["converged"])
        for seed, accuracy in zip(stats["seeds"], stats["accuracies"]):
            shots, _ = evaluate.sample_shots(train_y, k, 5, np.random.default_rng(seed))
            reference = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(
                scaler.transform(train_x[shots]), train_y[shots])
            assert abs(accuracy - reference.score(scaler.transform(test_x), test_y)) <= 0.01, (k, c)


def test_c_is_the_grid_value_with_the_best_cross_validated_accuracy():
    rng = np.random.default_rng(6)
    feats, labels = _gaussian_classes(6, rng)
    # Tight tolerance: warm-started and cold-started fits then reach the same optimum.
    config = evaluate.LinearProbeConfig(c_grid=(1e-3, 1e-1, 10.0), gradient_tolerance=1e-9)
    c, how = logistic.choose_c(feats, labels, 5, np.random.default_rng(1), config=config)
    assert how == "3-fold cross-validation" and c in config.c_grid
    folds = logistic.stratified_folds(labels, 3, np.random.default_rng(1))
    assert all(np.bincount(folds[labels == k], minlength=3).tolist() == [2, 2, 2] for k in range(5))
    scores = {}
    for grid_c in config.c_grid:  # cold-started refits: the warm starts change no optimum
        hits = []
        for f in range(3):
            fit = logistic.fit_logistic_regression(feats[folds != f], labels[folds != f], 5, grid_c, config=config)
            hits.append(np.mean(np.argmax(fit.logits(feats[folds == f]), axis=1) == labels[folds == f]))
        scores[grid_c] = np.mean(hits)
    assert scores[c] == max(scores.values())
    assert logistic.choose_c(feats[::6], labels[::6], 5, rng, config=config) == (1.0, "fixed (1 shot per class: none to hold out)")


def test_probe_records_c_and_convergence_per_trial(clusters):
    result = evaluate.few_shot_probe(*clusters, evaluate.FewShotProtocol((1, 5), NUM_CLASSES, trials=2),
                                     config=evaluate.LinearProbeConfig(max_iterations=1), progress=False)
    for k, stats in result.items():
        assert len(stats["c"]) == len(stats["converged"]) == len(stats["iterations"]) == 2
        assert stats["converged"] == [False, False] and stats["iterations"] == [1, 1]
    assert result[1]["c_selection"] == ["fixed (1 shot per class: none to hold out)"] * 2
    assert result[5]["c_selection"] == ["3-fold cross-validation"] * 2


def test_zero_shot_finds_the_class_of_constructed_features():
    rng = np.random.default_rng(3)
    prompts = rng.standard_normal((5, 4, 32))  # (C, P, D)
    labels = rng.integers(0, 5, 60)
    feats = evaluate.class_prototypes(prompts)[labels] * 3.0 + 0.02 * rng.standard_normal((60, 32))
    assert evaluate.zero_shot(feats, labels, prompts) == 1.0
    assert evaluate.zero_shot(feats, (labels + 1) % 5, prompts) == 0.0


def test_retrieval_recall_on_known_ranks():
    def unit(deg):
        return np.stack([np.cos(np.radians(deg)), np.sin(np.radians(deg))], axis=1)

    imu, text = unit(np.array([0.0, 30.0, 60.0])), unit(np.array([0.0, 90.0, 180.0]))
    # Paired: the positive text of queries 0, 1, 2 ranks 1st, 2nd, 3rd.
    assert evaluate.retrieval_recall(imu, text, ks=(1, 2, 3)) == pytest.approx({"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0})
    # Class prompts: texts of classes (0, 0, 1); query 0 (class 1) ranks its text last, the others first.
    recalls = evaluate.retrieval_recall(imu, text, ks=(1, 3), imu_labels=[1, 0, 0], text_labels=[0, 0, 1])
    assert recalls == pytest.approx({"R@1": 2 / 3, "R@3": 1.0})


def test_bad_input_is_named():
    feats = np.zeros((4, DIM), np.float32)
    with pytest.raises(ValueError, match=r"train: labels must lie in \[0, 4\)"):
        evaluate.few_shot_probe(feats, np.array([0, 1, 2, 9]), feats, np.zeros(4, int), evaluate.FewShotProtocol((1,), 4))
    with pytest.raises(ValueError, match="positive integers"):
        evaluate.FewShotProtocol((0, 5), 4)
    with pytest.raises(ValueError, match="paired mode"):
        evaluate.retrieval_recall(feats, feats[:3])


TIME_STEPS = 128
TINY_MODEL = IMUEncoder(hidden_dim=16, ssl_dim=8, mm_dim=8)


def frequency_windows(per_class: int, rng: np.random.Generator):
    """Class c is a 50 Hz sinusoid of frequency (1, 4, 10)[c] Hz on all six channels, plus noise."""
    labels = np.repeat(np.arange(3), per_class)
    t = np.arange(TIME_STEPS) / 50.0
    phase = rng.uniform(0, 2 * np.pi, (labels.size, 1, 6))
    freq = np.array([1.0, 4.0, 10.0])[labels][:, None, None]
    windows = np.sin(2 * np.pi * freq * t[None, :, None] + phase) + 0.3 * rng.standard_normal((labels.size, TIME_STEPS, 6))
    return windows.astype(np.float32), labels


@pytest.fixture(scope="module")
def tiny_params():
    return jax.jit(TINY_MODEL.init)(jax.random.PRNGKey(0), np.zeros((1, TIME_STEPS, 6), np.float32))["params"]


def test_encode_pads_the_last_batch_and_matches_apply(tiny_params, float32_matmuls):
    windows, _ = frequency_windows(2, np.random.default_rng(4))  # 6 windows, batches of 4
    feats = evaluate.encode(TINY_MODEL, tiny_params, windows, batch_size=4, matmul_precision="highest")
    expected = jax.jit(TINY_MODEL.apply)({"params": tiny_params}, windows)["mmcl"]
    assert feats.shape == (6, 8)
    # Batch 4 + padding against batch 6: differently compiled; see tests/numerics.py and the export test.
    assert_close_to_scale(feats, expected, 5e-5)


def test_fine_tune_learns_frequency_classes_beyond_chance(tiny_params):
    rng = np.random.default_rng(5)
    train_windows, train_labels = frequency_windows(12, rng)
    test_windows, test_labels = frequency_windows(20, rng)
    config = evaluate.FineTuneConfig(steps=60, learning_rate=1e-2, warmup_steps=5)
    result = evaluate.fine_tune_probe(
        TINY_MODEL, tiny_params, train_windows, train_labels, test_windows, test_labels,
        evaluate.FewShotProtocol((8,), 3, trials=2), config=config, progress=False,
    )
    # Chance is 1/3; with 60 test windows 0.7 is more than 5 binomial standard deviations above it.
    assert result[8]["mean"] > 0.7
    assert len(result[8]["seeds"]) == 2 and result[8]["se"] is not None


def test_results_markdown_and_plot(separable_probe):
    stats = {1: {"shots": 1, "mean": 0.8123, "se": 0.0134, "accuracies": [0.8, 0.82], "seeds": [1, 2], "short_classes": {}}}
    results = {
        "in-domain (held-out subjects)": {
            "num_classes": NUM_CLASSES,
            "methods": {
                "PRIMUS": {"few_shot": separable_probe, "zero_shot": 0.41, "retrieval": {"R@1": 0.25, "R@5": 0.5}},
                "SimCLR": {"few_shot": stats},
            },
        },
        "out-of-domain (BasicMotions)": {"num_classes": 4, "methods": {"PRIMUS": {"few_shot": stats}}},
    }
    markdown = report.results_markdown(results)
    assert "## out-of-domain (BasicMotions)" in markdown
    assert "| SimCLR | 0.812 ± 0.013 | n/a | — |" in markdown  # shot count not run: n/a
    primus = separable_probe[5]
    assert f"| PRIMUS | {separable_probe[1]['mean']:.3f} ± {separable_probe[1]['se']:.3f} | {primus['mean']:.3f} ± {primus['se']:.3f} | 0.410 |" in markdown
    assert "| PRIMUS | 0.250 | 0.500 |" in markdown
    assert report.results_markdown(json.loads(json.dumps(results))) == markdown  # string shot keys, as in suite.json
    png = report.plot_accuracy_vs_shots(results)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
