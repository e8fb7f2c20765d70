"""Downstream evaluation of IMU encoders: few-shot probes, zero-shot, retrieval (reports: primus_jax.report).

Features are the encoder's ``mmcl`` head output (the reference's downstream feature). All
accuracies are top-1, micro-averaged over the *whole* test set (the reference's
``drop_last=True``, which drops up to 255 test windows, is deliberately not reproduced).

Few-shot protocol (shared by :func:`few_shot_probe` and :func:`fine_tune_probe`):

* for each shot count k and trial t a seed s(k, t) is drawn from
  ``np.random.SeedSequence(seed, spawn_key=(k, t))``, so every (k, t) pair has its own
  independent, reproducible stream;
* k training windows per class are sampled without replacement with that seed; a class
  with n_c < k windows contributes all n_c and is listed in ``short_classes``;
* a classifier is trained on the shots and scored on the full test set;
* per k the report holds ``mean``, the standard error
  ``se = std(accuracies, ddof=1) / sqrt(trials)`` (``None`` for a single trial), the
  per-trial ``accuracies`` and ``seeds``.

Shapes: features (N, D) float, labels (N,) int in [0, C), IMU windows (N, T, 6) float32,
class text embeddings (C, D) or (C, P, D) for P prompts per class.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import threadpoolctl
from tqdm import tqdm

from primus_jax import precision
from primus_jax.logistic import LinearProbeConfig, choose_c, fit_logistic_regression, head_accuracy

_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class FewShotProtocol:
    """The trial protocol of the module docstring: which shot counts, how many trials, which seed.

    ``shots`` are windows per class (each >= 1), ``num_classes`` C (labels lie in [0, C)).
    """

    shots: tuple[int, ...]
    num_classes: int
    trials: int = 5
    seed: int = 0

    def __post_init__(self):
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"FewShotProtocol.shots must be a non-empty list of positive integers, got {self.shots}.")
        if self.trials < 1 or self.num_classes < 2:
            raise ValueError(f"FewShotProtocol needs trials >= 1 and num_classes >= 2, got {self.trials} and {self.num_classes}.")
        object.__setattr__(self, "shots", tuple(int(k) for k in self.shots))


@dataclasses.dataclass(frozen=True)
class FineTuneConfig:
    """End-to-end training of encoder + linear head (the reference's defaults, docs/design.md §6).

    AdamW(lr, weight_decay) with linear warm-up over ``warmup_steps`` then cosine decay to 0
    at ``steps``; minibatches of ``batch_size`` windows cycle through shuffled epochs of the
    shot set (smaller shot sets form one masked full batch). ``normalize_features`` L2-
    normalises the head's input (pretrained encoders); the reference's scratch baseline
    uses raw features (``False``).
    """

    steps: int = 200
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    batch_size: int = 256
    normalize_features: bool = True


def l2_normalize(x, axis: int = -1):
    """x / max(||x||_2, 1e-12) along ``axis`` (works on numpy and jax arrays)."""
    xp = jnp if isinstance(x, jax.Array) else np
    return x / xp.maximum(xp.linalg.norm(x, axis=axis, keepdims=True), _EPS)


def class_prototypes(class_text_embs) -> np.ndarray:
    """(C, D) class weights from text embeddings: mean of the L2-normalised prompts.

    ``class_text_embs`` is (C, D) (one prompt per class) or (C, P, D). As in the reference
    head initialisation the mean is not renormalised.
    """
    embs = np.asarray(class_text_embs, dtype=np.float32)
    if embs.ndim == 2:
        embs = embs[:, None, :]
    if embs.ndim != 3:
        raise ValueError(f"class_text_embs must have shape (C, D) or (C, P, D), got {embs.shape}.")
    return l2_normalize(embs).mean(axis=1)


def _check_labelled(name: str, feats, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (feats, int labels) as numpy after checking their shapes and label range."""
    feats = np.asarray(feats)
    labels = np.asarray(labels)
    if labels.ndim != 1 or feats.shape[:1] != labels.shape:
        raise ValueError(f"{name}: {feats.shape[0] if feats.ndim else 0} rows but labels have shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: labels must be integers, got dtype {labels.dtype}.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}].")
    return feats, labels.astype(np.int32)


def trial_seed(seed: int, shots: int, trial: int) -> int:
    """The seed of trial ``trial`` at ``shots`` shots: SeedSequence(seed, spawn_key=(shots, trial))."""
    return int(np.random.SeedSequence(seed, spawn_key=(shots, trial)).generate_state(1)[0])


def sample_shots(labels: np.ndarray, shots: int, num_classes: int, rng: np.random.Generator):
    """Indices of ``shots`` windows per class, drawn without replacement.

    Returns (indices (n,) sorted by class, short_classes {class: available count} for the
    classes that have fewer than ``shots`` windows, all of which are then used).
    """
    chosen, short = [], {}
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if members.size < shots:
            short[c] = int(members.size)
        chosen.append(rng.choice(members, size=min(shots, members.size), replace=False))
    return np.concatenate(chosen).astype(np.int64), short


def _padded_size(labels: np.ndarray, protocol: FewShotProtocol) -> int:
    """Largest shot-set size: sum_c min(max(shots), n_c); one compiled shape fits every k."""
    counts = np.bincount(labels, minlength=protocol.num_classes)
    return int(np.minimum(counts, max(protocol.shots)).sum())


def _run_trials(
    protocol: FewShotProtocol,
    train_labels: np.ndarray,
    fit_and_score: Callable[[np.ndarray, int], float | tuple[float, dict[str, Any]]],
    desc: str,
    progress: bool,
) -> dict[int, dict[str, Any]]:
    """Runs ``protocol`` (module docstring); ``fit_and_score(shot indices, trial seed)`` returns the
    accuracy, or (accuracy, {field: value}) whose fields are listed per trial in the stats."""
    trials = protocol.trials
    results = {}
    bar = tqdm(total=len(protocol.shots) * trials, desc=desc, disable=not progress, leave=False)
    for k in protocol.shots:
        accuracies, seeds, short, fields = [], [], {}, {}
        for t in range(trials):
            s = trial_seed(protocol.seed, k, t)
            indices, short = sample_shots(train_labels, k, protocol.num_classes, np.random.default_rng(s))
            outcome = fit_and_score(indices, s)
            accuracy, extra = outcome if isinstance(outcome, tuple) else (outcome, {})
            accuracies.append(float(accuracy))
            for name, value in extra.items():
                fields.setdefault(name, []).append(value)
            seeds.append(s)
            bar.update()
        acc = np.asarray(accuracies)
        results[int(k)] = {
            "shots": int(k),
            "mean": float(acc.mean()),
            "se": float(acc.std(ddof=1) / math.sqrt(trials)) if trials > 1 else None,
            "accuracies": accuracies,
            "seeds": seeds,
            "short_classes": short,
            **fields,
        }
    bar.close()
    return results


def _pad_rows(x: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pads the leading axis of x to ``size`` rows; returns (padded, mask (size,) float32)."""
    n = x.shape[0]
    padded = np.zeros((size,) + x.shape[1:], dtype=x.dtype)
    padded[:n] = x
    mask = np.zeros((size,), np.float32)
    mask[:n] = 1.0
    return padded, mask


def _masked_cross_entropy(logits, labels, mask):
    """sum_i mask_i * CE(logits_i, labels_i) / sum_i mask_i."""
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _initial_head(num_classes: int, dim: int, class_text_embs) -> dict[str, np.ndarray]:
    """W = class_prototypes(class_text_embs) (a zero-shot classifier) or zeros; b = 0."""
    if class_text_embs is None:
        w = np.zeros((num_classes, dim), np.float32)
    else:
        w = class_prototypes(class_text_embs)
        if w.shape != (num_classes, dim):
            raise ValueError(f"class_text_embs give a head of shape {w.shape}, expected ({num_classes}, {dim}).")
    return {"w": w, "b": np.zeros((num_classes,), np.float32)}


def few_shot_probe(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    protocol: FewShotProtocol,
    *,
    class_text_embs=None,
    config: LinearProbeConfig = LinearProbeConfig(),
    desc: str = "linear probe",
    progress: bool = True,
) -> dict[int, dict[str, Any]]:
    """Linear probe on frozen features (N, D), run over ``protocol`` (module docstring).

    Features are standardised, (f - mu) / sigma with mu, sigma (D,) from the whole training pool
    ``train_feats`` (never the test split), and the head starts at W_0 = 0. With
    ``class_text_embs`` (the text-prior start) the features are instead L2-normalised (the text
    space's geometry) and the penalty pulls W toward W_0 = ``class_prototypes(class_text_embs)``,
    the zero-shot classifier. Each trial chooses C (:func:`choose_c`, the fold split drawn from
    the trial seed), fits :func:`fit_logistic_regression` on all its shots and scores the test set.
    Returns {k: {"shots", "mean", "se", "accuracies", "seeds", "short_classes", "c",
    "c_selection", "converged", "iterations"}}, the last four one entry per trial.

    The fits run with one BLAS thread: their matrices are at most (n, n) x (n, C), and a
    multi-threaded BLAS spends more time waking threads than multiplying them.
    """
    train_feats, train_labels = _check_labelled("train", train_feats, train_labels, protocol.num_classes)
    test_feats, test_labels = _check_labelled("test", test_feats, test_labels, protocol.num_classes)
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train/test features must be (N, D) with equal D, got {train_feats.shape} and {test_feats.shape}.")
    if class_text_embs is None:
        train_feats, test_feats = standardize(train_feats, test_feats)
        w_0 = None
    else:
        train_feats, test_feats = l2_normalize(train_feats.astype(np.float32)), l2_normalize(test_feats.astype(np.float32))
        w_0 = _initial_head(protocol.num_classes, train_feats.shape[1], class_text_embs)["w"]

    def fit_and_score(indices, seed):
        feats, labels = train_feats[indices], train_labels[indices]
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):  # see the docstring
            c, how = choose_c(feats, labels, protocol.num_classes, np.random.default_rng(seed), w_0=w_0, config=config)
            fit = fit_logistic_regression(feats, labels, protocol.num_classes, c, w_0=w_0, config=config)
        accuracy = head_accuracy({"w": fit.w, "b": fit.b}, test_feats, test_labels)
        return accuracy, {"c": c, "c_selection": how, "converged": fit.converged, "iterations": fit.iterations}

    return _run_trials(protocol, train_labels, fit_and_score, desc, progress)


@functools.partial(jax.jit, static_argnames=("model", "head_name"))
def _apply_head(model: nn.Module, params, windows, head_name: str):
    return model.apply({"params": params}, windows)[head_name]


def encode(model: nn.Module, params, windows, batch_size: int = 256, head_name: str = "mmcl",
           matmul_precision: str = "default") -> np.ndarray:
    """Features (N, D) numpy of ``model.apply({"params": params}, x)[head_name]`` for windows (N, T, 6).

    Runs in batches of min(batch_size, N); the last batch is zero-padded to that size so
    one compiled function serves every batch. float32 matmuls run at ``matmul_precision``
    (``primus_jax.precision``; pass the training config's ``model.matmul_precision``).
    """
    apply_head = precision.with_matmul_precision(_apply_head, matmul_precision)
    windows = np.asarray(windows, dtype=np.float32)
    if windows.ndim != 3 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty (N, T, 6) array, got shape {windows.shape}.")
    n = windows.shape[0]
    batch = min(batch_size, n)
    outputs = []
    for start in range(0, n, batch):
        chunk, _ = _pad_rows(windows[start : start + batch], batch)
        outputs.append(np.asarray(apply_head(model, params, chunk, head_name))[: n - start])
    return np.concatenate(outputs, axis=0)


def _batch_schedule(n: int, steps: int, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(steps, batch) row indices into a shot set of n windows, and their (steps, batch) mask.

    n >= batch: consecutive batches cut from a stream of shuffled epochs; n < batch: every
    step is the whole set, padded with masked rows.
    """
    if n >= batch:
        epochs = -(-steps * batch // n)
        stream = np.concatenate([rng.permutation(n) for _ in range(epochs)])
        return stream[: steps * batch].reshape(steps, batch), np.ones((steps, batch), np.float32)
    rows, mask = _pad_rows(np.arange(n), batch)
    return np.tile(rows, (steps, 1)), np.tile(mask, (steps, 1))


@functools.partial(jax.jit, static_argnames=("model", "config"))
def _fine_tune(model: nn.Module, variables, windows, labels, batch_rows, batch_mask, config: FineTuneConfig):
    """Trains {"encoder", "head"} on windows (N, T, 6) along the (steps, B) batch schedule."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(config.steps, config.warmup_steps + 1)
    )
    optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)

    def loss_fn(v, rows, mask):
        logits = _fine_tuned_logits(model, v, windows[rows], config.normalize_features)
        return _masked_cross_entropy(logits, labels[rows], mask)

    def step(carry, batch):
        v, opt_state = carry
        grads = jax.grad(loss_fn)(v, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, v)
        return (optax.apply_updates(v, updates), opt_state), None

    (variables, _), _ = jax.lax.scan(step, (variables, optimizer.init(variables)), (batch_rows, batch_mask))
    return variables


def _fine_tuned_logits(model, variables, windows, normalize_features: bool):
    """head(mmcl(windows)), the feature L2-normalised when ``normalize_features``."""
    feats = model.apply({"params": variables["encoder"]}, windows)["mmcl"]
    if normalize_features:
        feats = l2_normalize(feats)
    return feats @ variables["head"]["w"].T + variables["head"]["b"]


def fine_tune_probe(
    model: nn.Module,
    params,
    train_windows,
    train_labels,
    test_windows,
    test_labels,
    protocol: FewShotProtocol,
    *,
    class_text_embs=None,
    config: FineTuneConfig = FineTuneConfig(),
    desc: str = "fine-tune",
    progress: bool = True,
    matmul_precision: str = "default",
) -> dict[int, dict[str, Any]]:
    """Encoder ``params`` and a linear head trained end to end on the shots, same trial protocol.

    Head on the mmcl feature: W, b initialised as in :func:`few_shot_probe` (text prototypes
    or zeros). For the "standard training" baseline pass freshly initialised ``params`` and
    ``FineTuneConfig(normalize_features=False)``. The batch order comes from the trial seed.
    Shot sets are padded to one size and minibatches to min(batch_size, next power of two
    >= shot-set size), so training compiles at most once per power of two (padding wastes
    under half of a step). Training and encoding run at ``matmul_precision`` (see :func:`encode`).
    Returns the same structure as :func:`few_shot_probe`.
    """
    fine_tune = precision.with_matmul_precision(_fine_tune, matmul_precision)
    train_windows, train_labels = _check_labelled("train", train_windows, train_labels, protocol.num_classes)
    test_windows, test_labels = _check_labelled("test", test_windows, test_labels, protocol.num_classes)
    for name, w in (("train", train_windows), ("test", test_windows)):
        if w.ndim != 3 or w.shape[2] != 6:
            raise ValueError(f"{name}: windows must have shape (N, T, 6), got {w.shape}.")
    train_windows = train_windows.astype(np.float32)
    feature_dim = jax.eval_shape(lambda x: _apply_head(model, params, x, "mmcl"), train_windows[:1]).shape[-1]
    head0 = _initial_head(protocol.num_classes, feature_dim, class_text_embs)
    size = _padded_size(train_labels, protocol)

    def fit_and_score(indices, s):
        windows, _ = _pad_rows(train_windows[indices], size)
        labels, _ = _pad_rows(train_labels[indices], size)
        batch = min(config.batch_size, 1 << (indices.size - 1).bit_length())
        rows, mask = _batch_schedule(indices.size, config.steps, batch, np.random.default_rng(s))
        tuned = fine_tune(model, {"encoder": params, "head": head0}, windows, labels, rows, mask, config)
        feats = encode(model, tuned["encoder"], test_windows, matmul_precision=matmul_precision)
        if config.normalize_features:
            feats = l2_normalize(feats)
        return head_accuracy(tuned["head"], feats, test_labels)

    return _run_trials(protocol, train_labels, fit_and_score, desc, progress)


CHANNEL_STATISTICS = ("mean", "std", "min", "max", "p10", "p50", "p90")


def channel_statistics(windows) -> np.ndarray:
    """Per-channel summary statistics of IMU windows: the hand-crafted floor of the evaluation.

    windows (N, T, 6) -> (N, 6 * 7) float32: for each channel c (ax, ay, az, gx, gy, gz) its
    mean, standard deviation, minimum, maximum and 10th / 50th / 90th percentiles over time,
    ordered statistic-major ([mean_ax .. mean_gz, std_ax, ...]). Unlike the encoder's first
    GroupNorm, nothing is standardised per window, so gravity's direction (the accelerometer
    means) and the signal's magnitude stay in the features.
    """
    x = np.asarray(windows, np.float64)
    if x.ndim != 3 or x.shape[2] != 6 or x.shape[1] < 1:
        raise ValueError(f"channel_statistics: windows must have shape (N, T, 6), got {x.shape}.")
    p10, p50, p90 = np.percentile(x, (10, 50, 90), axis=1)
    stats = (x.mean(axis=1), x.std(axis=1), x.min(axis=1), x.max(axis=1), p10, p50, p90)
    return np.concatenate(stats, axis=1).astype(np.float32)


def standardize(train_feats, test_feats) -> tuple[np.ndarray, np.ndarray]:
    """(f - mu) / sigma with mu, sigma (D,) the per-dimension mean and std of ``train_feats``.

    Dimensions with sigma = 0 are only centred. :func:`few_shot_probe` applies it with the
    training pool's features as ``train_feats``, so the test features never shape mu, sigma.
    """
    train_feats = np.asarray(train_feats, np.float32)
    mu = train_feats.mean(axis=0)
    sigma = train_feats.std(axis=0)
    sigma = np.where(sigma > 0, sigma, 1.0)
    return (train_feats - mu) / sigma, (np.asarray(test_feats, np.float32) - mu) / sigma


def zero_shot(feats, labels, class_text_embs) -> float:
    """Zero-shot top-1 accuracy: argmax_c cos(feature_i, class_prototypes(class_text_embs)_c).

    feats (N, D), labels (N,) in [0, C), class_text_embs (C, D) or (C, P, D).
    """
    prototypes = class_prototypes(class_text_embs)
    feats, labels = _check_labelled("zero-shot", feats, labels, prototypes.shape[0])
    if feats.ndim != 2 or feats.shape[1] != prototypes.shape[1]:
        raise ValueError(f"zero-shot: features {feats.shape} do not match class embeddings of width {prototypes.shape[1]}.")
    return head_accuracy({"w": l2_normalize(prototypes), "b": 0.0}, l2_normalize(feats.astype(np.float32)), labels)


def retrieval_recall(
    imu_feats, text_embs, ks: Sequence[int] = (1, 5, 10), imu_labels=None, text_labels=None
) -> dict[str, float]:
    """IMU→text recall@k by cosine similarity, imu_feats (N, D), text_embs (M, D).

    Without labels the pairs are aligned (M = N) and row i's only positive is text i. With
    ``imu_labels`` (N,) and ``text_labels`` (M,) (e.g. texts are class prompts) every text
    of the query's label is a positive. Query i's rank is the number of texts scoring
    strictly above its best positive; recall@k = mean_i [rank_i < k] (ties count in the
    query's favour). Returns {"R@k": value}.
    """
    imu = l2_normalize(np.asarray(imu_feats, np.float32))
    text = l2_normalize(np.asarray(text_embs, np.float32))
    if imu.ndim != 2 or text.ndim != 2 or imu.shape[1] != text.shape[1]:
        raise ValueError(f"retrieval: IMU features {imu.shape} and text embeddings {text.shape} must be (N, D) and (M, D).")
    if (imu_labels is None) != (text_labels is None):
        raise ValueError("retrieval: give both imu_labels and text_labels, or neither.")
    if imu_labels is None:
        if imu.shape[0] != text.shape[0]:
            raise ValueError(f"retrieval: paired mode needs as many texts as IMU rows, got {text.shape[0]} and {imu.shape[0]}.")
        positive = np.eye(imu.shape[0], dtype=bool)
    else:
        imu_labels, text_labels = np.asarray(imu_labels), np.asarray(text_labels)
        if imu_labels.shape != (imu.shape[0],) or text_labels.shape != (text.shape[0],):
            raise ValueError(f"retrieval: label shapes {imu_labels.shape}, {text_labels.shape} do not match {imu.shape[0]} IMU rows and {text.shape[0]} texts.")
        positive = imu_labels[:, None] == text_labels[None, :]
        if not positive.any(axis=1).all():
            raise ValueError("retrieval: some IMU rows have a label that no text carries.")
    sims = imu @ text.T
    best_positive = np.where(positive, sims, -np.inf).max(axis=1)
    ranks = (sims > best_positive[:, None]).sum(axis=1)
    return {f"R@{k}": float(np.mean(ranks < k)) for k in ks}
