"""The pretraining optimiser: Adam(W) with an optional learning-rate schedule and gradient clipping.

`config.optim` fields (configs/default.py):

    learning_rate   peak rate eta (the paper: 2e-4, constant)
    schedule        "constant" (the paper's, default), "cosine" or "linear"
    warmup_steps    w >= 0: the rate rises linearly from 0 to eta over the first w updates
    decay_steps     D: the update at which a decaying schedule reaches its end value
                    (0: the run's length, train.num_steps or num_epochs x steps per epoch)
    end_learning_rate_factor  f: the end value is f * eta (cosine and linear; default 0)
    clip_norm       c > 0: gradients are scaled by min(1, c / ||g||_2) over all of params
                    (global norm, before Adam); 0 turns clipping off (the paper's)
    b1, b2, eps, weight_decay   Adam's (AdamW's when weight_decay > 0)

The rate at update n (n = 0, 1, ...; counted by the optimiser, so a skipped non-finite update
does not advance it):

    n < w:             eta * n / w
    constant:          eta
    cosine:            f*eta + (1 - f) * eta * (1 + cos(pi * min(n - w, D - w) / (D - w))) / 2
    linear:            eta + (f*eta - eta) * min(n - w, D - w) / (D - w)

Every part is optax (`optax.join_schedules`, `optax.warmup_cosine_decay_schedule`,
`optax.linear_schedule`, `optax.clip_by_global_norm`, `optax.adam` / `optax.adamw`). With the
defaults (constant, no warm-up, no clipping) the transformation is exactly `optax.adam(eta, ...)`,
so checkpoints written before these options existed still restore.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("constant", "cosine", "linear")


def schedule_problems(optim_config: ml_collections.ConfigDict) -> list[str]:
    """One sentence per invalid schedule or clipping field (empty when the fields are valid)."""
    optim = optim_config
    problems = []
    if optim.schedule not in SCHEDULES:
        problems.append(f"optim.schedule must be one of {SCHEDULES}, got {optim.schedule!r}")
    if optim.warmup_steps < 0 or optim.decay_steps < 0:
        problems.append(f"optim.warmup_steps and optim.decay_steps must not be negative, got "
                        f"{optim.warmup_steps} and {optim.decay_steps}")
    if not 0.0 <= optim.end_learning_rate_factor <= 1.0:
        problems.append(f"optim.end_learning_rate_factor must lie in [0, 1], got {optim.end_learning_rate_factor}")
    if optim.clip_norm < 0:
        problems.append(f"optim.clip_norm must be positive (or 0: no clipping), got {optim.clip_norm}")
    return problems


def decay_length(optim_config: ml_collections.ConfigDict, num_steps: int) -> int:
    """D: optim.decay_steps, or the run's `num_steps` when it is 0."""
    return int(optim_config.decay_steps or num_steps)


def learning_rate_schedule(optim_config: ml_collections.ConfigDict, num_steps: int) -> Callable | float:
    """The rate as a function of the update count (module docstring); a float for a constant rate
    without warm-up, so that the default optimiser is plain `optax.adam(eta)`.

    Raises ValueError when a decaying schedule has no room to decay (D <= w).
    """
    peak, warmup = float(optim_config.learning_rate), int(optim_config.warmup_steps)
    kind = optim_config.schedule
    if kind == "constant":
        if warmup == 0:
            return peak
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
    decay = decay_length(optim_config, num_steps)
    if decay <= warmup:
        raise ValueError(f"optim.schedule={kind!r} decays over optim.decay_steps={decay} (0: the run's "
                         f"train steps) updates, which must exceed optim.warmup_steps={warmup}")
    end = peak * float(optim_config.end_learning_rate_factor)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, decay, end_value=end)
    if kind == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.linear_schedule(peak, end, decay - warmup)],
            [warmup])
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {kind!r}")


def learning_rate_at(schedule: Callable | float, update_count) -> jnp.ndarray:
    """The rate the optimiser applies at update `update_count` (a float32 scalar)."""
    if callable(schedule):
        return jnp.asarray(schedule(update_count), jnp.float32)
    return jnp.asarray(schedule, jnp.float32)


def make_optimizer(optim_config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(c) (if c > 0), then Adam(schedule) (AdamW when weight_decay > 0).

    `num_steps` is the run's length, the decay length when optim.decay_steps is 0.
    """
    rate = learning_rate_schedule(optim_config, num_steps)
    if optim_config.weight_decay > 0:
        adam = optax.adamw(rate, optim_config.b1, optim_config.b2, optim_config.eps,
                           weight_decay=optim_config.weight_decay)
    else:
        adam = optax.adam(rate, optim_config.b1, optim_config.b2, optim_config.eps)
    if optim_config.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim_config.clip_norm), adam)
    return adam


def init_state(optim_config: ml_collections.ConfigDict, params) -> optax.OptState:
    """The optimiser state of `params` before the first update.

    Its structure (Adam's moments, the update counts) does not depend on the schedule's length,
    which need not be known yet: any valid length gives the same state.
    """
    return make_optimizer(optim_config, int(optim_config.warmup_steps) + 1).init(params)
