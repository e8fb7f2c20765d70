"""The few-shot linear probe's classifier: multinomial logistic regression fitted to convergence.

:class:`LinearProbeConfig` states the objective and how C is chosen; :func:`fit_logistic_regression`
fits one head by L-BFGS, :func:`choose_c` picks C by stratified cross-validation on the shots, and
:func:`head_accuracy` scores a head. `primus_jax.evaluate.few_shot_probe` runs them over the trials.

Shapes: features (n, D) float, labels (n,) int in [0, C), a head W (C, D), b (C,).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LinearProbeConfig:
    """Multinomial logistic regression on frozen, standardised features, fitted to convergence.

    On the n shots x_i (D,) with labels y_i, the head W (C, D), b (C,) minimises

        loss(W, b) = mean_i CE(W x_i + b, y_i) + ||W - W_0||^2 / (2 C n)

    (scikit-learn's ``LogisticRegression(C)`` objective, bias unpenalised) by L-BFGS
    (``scipy.optimize.minimize``, float64, in :func:`fit_logistic_regression`'s scaled row-space
    coordinates) until the gradient's largest entry falls below ``gradient_tolerance``
    (scikit-learn's default ``tol``, which it too hands to L-BFGS as ``gtol``) or the relative
    loss change below ``loss_tolerance``; a fit that stops at ``max_iterations`` is recorded as
    not converged. W_0 is zero, or the text
    prototypes for the text-prior start (:func:`few_shot_probe`).

    C: with ``inverse_regularization`` set, that fixed value; otherwise chosen per trial from
    ``c_grid`` by stratified ``cv_folds``-fold cross-validation on the shots (folds =
    min(cv_folds, shots per class); the highest mean held-out accuracy, ties to the smallest C, as
    scikit-learn's ``LogisticRegressionCV``). At 1 shot per class no shot can be held out, and C = ``single_shot_c``.
    """

    c_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
    cv_folds: int = 3
    inverse_regularization: float | None = None
    single_shot_c: float = 1.0
    gradient_tolerance: float = 1e-4
    loss_tolerance: float = 1e-12
    max_iterations: int = 1000

    def __post_init__(self):
        grid = (self.inverse_regularization,) if self.inverse_regularization is not None else self.c_grid
        if not grid or min(grid) <= 0 or self.single_shot_c <= 0:
            raise ValueError(f"LinearProbeConfig: every C must be positive, got grid {self.c_grid}, "
                             f"inverse_regularization {self.inverse_regularization}, single_shot_c {self.single_shot_c}.")
        if self.cv_folds < 2 or self.max_iterations < 1:
            raise ValueError(f"LinearProbeConfig needs cv_folds >= 2 and max_iterations >= 1, got {self.cv_folds} "
                             f"and {self.max_iterations}.")
        object.__setattr__(self, "c_grid", tuple(float(c) for c in self.c_grid))

    def describe(self) -> str:
        """One sentence naming the probe and its C selection, for reports."""
        if self.inverse_regularization is not None:
            c_rule = f"C = {self.inverse_regularization:g} fixed"
        else:
            c_rule = (f"C chosen per trial by stratified {self.cv_folds}-fold cross-validation on the shots "
                      f"(folds = min({self.cv_folds}, shots per class)) over C in "
                      f"{{{', '.join(f'{c:g}' for c in self.c_grid)}}}; C = {self.single_shot_c:g} at 1 shot")
        return (f"multinomial logistic regression (L2 penalty ||W||^2 / 2C, bias free) fitted by L-BFGS to "
                f"gradient tolerance {self.gradient_tolerance:g} (at most {self.max_iterations} iterations); {c_rule}")


def head_accuracy(head, feats: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of argmax(feats @ W^T + b) over all rows."""
    logits = feats @ np.asarray(head["w"]).T + np.asarray(head["b"])
    return float(np.mean(np.argmax(logits, axis=1) == labels))


@dataclasses.dataclass(frozen=True)
class LogisticFit:
    """A fitted head W (C, D), b (C,) float64, whether L-BFGS converged, and its iterations."""

    w: np.ndarray
    b: np.ndarray
    converged: bool
    iterations: int

    def logits(self, feats) -> np.ndarray:
        """(N, C) logits W x + b of features (N, D)."""
        return np.asarray(feats, np.float64) @ self.w.T + self.b


def fit_logistic_regression(feats, labels, num_classes: int, c: float, *, w_0=None, start: LogisticFit | None = None,
                            config: LinearProbeConfig = LinearProbeConfig()) -> LogisticFit:
    """Minimises :class:`LinearProbeConfig`'s loss at inverse regularisation ``c`` by L-BFGS.

    feats X (n, D), labels (n,) in [0, num_classes); ``w_0`` (C, D) the penalty's centre (zeros when
    None); ``start`` a previous fit to warm-start from (e.g. the neighbouring C of a grid).

    The fit runs in the row space of X: with the thin SVD X = U S V^T (V: D x r, r = min(n, D)),
    W = W_0 + A V^T, A (C, r), so X W^T = X W_0^T + (U S) A^T and ||W - W_0||^2 = ||A||^2. The
    loss's gradient in W, (P - Y)^T X / n + (W - W_0) / (C n) with P = softmax(X W^T + b) and Y
    one-hot, lies in that space, so the minimiser does too, and a step costs r / D of a step in
    all D dimensions (n << D for few shots). L-BFGS runs on A' = A diag(g), g_i =
    sqrt(s_i^2 q / n + 1 / (C n)), q = (1 / C)(1 - 1 / C): the curvature along direction i at
    uniform predictions, so every direction starts equally curved (a diagonal preconditioner).
    Gradients: dL/dA = (P - Y)^T (U S) / n + A / (C n), dL/db = sum_i (P - Y)_i / n.
    """
    from scipy import optimize

    x = np.asarray(feats, np.float64)
    n, dim = x.shape
    y = np.eye(num_classes)[np.asarray(labels)]
    centre = np.zeros((num_classes, dim)) if w_0 is None else np.asarray(w_0, np.float64)
    u, singular, v_t = np.linalg.svd(x, full_matrices=False)
    strength = 1.0 / (c * n)
    # A = A' / g (docstring): each direction's curvature at uniform predictions becomes about 1 in A'.
    q = (1.0 / num_classes) * (1.0 - 1.0 / num_classes)
    scale = np.sqrt(singular ** 2 * q / n + strength)
    z = u * (singular / scale)  # (n, r): X V diag(1 / scale)
    offset = x @ centre.T  # (n, C)
    split = num_classes * z.shape[1]

    def loss_and_grad(theta):
        a, b = theta[:split].reshape(num_classes, -1), theta[split:]
        logits = offset + z @ a.T + b
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        residual = (np.exp(log_p) - y) / n
        penalised = a / scale ** 2
        loss = -np.sum(y * log_p) / n + 0.5 * strength * np.sum(a * penalised)
        return loss, np.concatenate([(residual.T @ z + strength * penalised).ravel(), residual.sum(axis=0)])

    a_0 = np.zeros((num_classes, z.shape[1])) if start is None else (start.w - centre) @ v_t.T * scale
    b_0 = np.zeros(num_classes) if start is None else start.b
    result = optimize.minimize(loss_and_grad, np.concatenate([a_0.ravel(), b_0]), jac=True, method="L-BFGS-B",
                               options={"maxiter": config.max_iterations, "gtol": config.gradient_tolerance,
                                        "ftol": config.loss_tolerance})
    w = centre + (result.x[:split].reshape(num_classes, -1) / scale) @ v_t
    return LogisticFit(w, result.x[split:], bool(result.success), int(result.nit))


def stratified_folds(labels: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) fold index in [0, folds): each class's members shuffled by ``rng`` and dealt round-robin,
    so a class with m >= folds members has m // folds or m // folds + 1 in every fold."""
    fold = np.empty(labels.shape, np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = np.arange(members.size) % folds
    return fold


def choose_c(feats, labels, num_classes: int, rng: np.random.Generator, *, w_0=None,
             config: LinearProbeConfig = LinearProbeConfig()) -> tuple[float, str]:
    """(C, how it was chosen) for shots feats (n, D), labels (n,): :class:`LinearProbeConfig`'s rule.

    Each fold fits the grid in increasing C, each fit warm-started from the previous one.
    """
    if config.inverse_regularization is not None:
        return config.inverse_regularization, "fixed"
    per_class = int(np.bincount(labels, minlength=num_classes)[np.unique(labels)].min())
    folds = min(config.cv_folds, per_class)
    if folds < 2:
        return config.single_shot_c, "fixed (1 shot per class: none to hold out)"
    fold = stratified_folds(labels, folds, rng)
    grid = sorted(config.c_grid)
    accuracy = np.zeros(len(grid))
    for f in range(folds):
        train, held = fold != f, fold == f
        fit = None
        for i, c in enumerate(grid):
            fit = fit_logistic_regression(feats[train], labels[train], num_classes, c, w_0=w_0, start=fit,
                                          config=config)
            accuracy[i] += head_accuracy({"w": fit.w, "b": fit.b}, feats[held], labels[held]) / folds
    best = int(np.argmax(np.round(accuracy, 12)))  # the first maximum: the smallest C among ties
    return grid[best], f"{folds}-fold cross-validation"
