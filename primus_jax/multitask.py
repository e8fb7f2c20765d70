"""The MultitaskSSL baseline (Saeed, Ozcelebi and Lukkien, IMWUT 2019): recognise the transformation.

A shared encoder learns by telling, for each of eight signal transformations, an original window
from a transformed one. The tasks are the eight transformations of ``TASKS`` (``primus_jax.augment``):
noise, scaling, rotation, negation, time flip, segment permutation, time warp and axis shuffle.
Each task has its own binary head, a linear map of the encoder's ``ssl`` output
(``w_j``: (D,), ``b_j``), so the ssl feature is the one the pretext tasks shape.

One step on a batch x of shape (B, T, 6) (balanced pairs, one task per window):

    j_b ~ U{0..7}                                  (the task of window b)
    x'_b = t_{j_b}(x_b)                            (its transformed copy)
    f = ssl(encoder(concat[x, x']))                (2B, D), one call
    z_i = f_i . w_{j_i} + b_{j_i}                  (each row scored by its own task's head)
    L = mean_i BCE(z_i, y_i),  y = [0]*B + [1]*B   (original = 0, transformed = 1)

Saeed et al. feed every task head its own originals and transformed copies; drawing one task per
window keeps the encoder's work at 2B windows per step (the cost of the two views of SimCLR and
PRIMUS) while every head still sees as many originals as transformed windows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from primus_jax import augment

TASKS = ("noise", "scaling", "rotation", "negate", "time_flip", "permute", "time_warp", "channel_shuffle")


def init_task_heads(key: jax.Array, feature_dim: int) -> dict[str, jax.Array]:
    """Task heads {"w": (D, 8), "b": (8,)}: w ~ N(0, 1/D) (LeCun normal), b = 0."""
    w = jax.random.normal(key, (feature_dim, len(TASKS)), jnp.float32) / jnp.sqrt(feature_dim)
    return {"w": w, "b": jnp.zeros((len(TASKS),), jnp.float32)}


def transformed_views(key: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(tasks (B,) int32, x' (B, T, 6)): one task per window and the window transformed by it.

    Every transformation runs on the whole batch (elementwise work, small beside the encoder)
    and each window keeps the copy of its task.
    """
    task_key, *transform_keys = jax.random.split(key, len(TASKS) + 1)
    tasks = jax.random.randint(task_key, (x.shape[0],), 0, len(TASKS))
    every = jnp.stack([augment.TRANSFORMS[name](k, x) for name, k in zip(TASKS, transform_keys)])  # (8, B, T, 6)
    return tasks, every[tasks, jnp.arange(x.shape[0])]


def multitask_loss(ssl_fn, heads: dict, key: jax.Array, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The module docstring's L and its metrics.

    ssl_fn maps windows (N, T, 6) to ssl features (N, D); heads is :func:`init_task_heads`' tree.
    Metrics: "loss", "task_accuracy" (sign of z_i against y_i over all 2B rows), and
    "accuracy_<task>" per task (0 for a task no window of the batch drew).
    """
    tasks, x1 = transformed_views(key, x)
    feats = ssl_fn(jnp.concatenate([x, x1], axis=0)).astype(jnp.float32)
    row_tasks = jnp.concatenate([tasks, tasks])
    logits = jnp.take_along_axis(feats @ heads["w"] + heads["b"], row_tasks[:, None], axis=1)[:, 0]
    labels = jnp.concatenate([jnp.zeros_like(tasks), jnp.ones_like(tasks)]).astype(jnp.float32)
    loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
    correct = ((logits > 0) == (labels > 0.5)).astype(jnp.float32)
    metrics = {"loss": loss, "task_accuracy": jnp.mean(correct)}
    for j, name in enumerate(TASKS):
        rows = (row_tasks == j).astype(jnp.float32)
        metrics[f"accuracy_{name}"] = jnp.sum(correct * rows) / jnp.maximum(jnp.sum(rows), 1.0)
    return loss, metrics
