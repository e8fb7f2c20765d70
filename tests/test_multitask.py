"""MultitaskSSL: its two new transformations, the pretext loss, and training + export by the same loop."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ablations
from primus_jax import augment, multitask, train, trainconfig
from tests.train_fixtures import export_params, tiny_config, write_tiny_dataset


def _batch(batch=8, length=40, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, 6)), jnp.float32)


def test_time_warp_is_a_monotone_resampling_that_keeps_the_ends():
    positions = np.asarray(augment.time_warp_positions(jax.random.key(0), 16, 50))
    assert np.all(np.diff(positions, axis=1) > 0)
    np.testing.assert_allclose(positions[:, [0, -1]], [[0.0, 49.0]] * 16, atol=1e-4)
    assert np.abs(positions - np.arange(50)).max() > 0.5  # really warped
    ramp = jnp.broadcast_to(jnp.arange(50, dtype=jnp.float32)[None, :, None], (16, 50, 6))
    np.testing.assert_allclose(augment.time_warp(jax.random.key(0), ramp)[..., 0], positions, rtol=1e-5, atol=1e-4)


def test_channel_shuffle_permutes_axes_alike_for_both_sensors_never_identity():
    x = jnp.broadcast_to(jnp.arange(6, dtype=jnp.float32), (64, 3, 6))
    y = np.asarray(augment.channel_shuffle(jax.random.key(1), x))[:, 0]
    np.testing.assert_array_equal(y[:, 3:], y[:, :3] + 3)
    assert all(sorted(row) == [0, 1, 2] and list(row) != [0, 1, 2] for row in y[:, :3].astype(int))
    assert len({tuple(row) for row in y[:, :3]}) == 5


def test_each_window_gets_the_copy_of_its_own_task():
    x = _batch(batch=64)
    tasks, x1 = multitask.transformed_views(jax.random.key(2), x)
    tasks, x1 = np.asarray(tasks), np.asarray(x1)
    assert set(tasks) == set(range(len(multitask.TASKS)))
    for j, name in enumerate(multitask.TASKS):
        rows = tasks == j
        if name == "negate":
            np.testing.assert_array_equal(x1[rows], -np.asarray(x)[rows])
        elif name == "time_flip":
            np.testing.assert_array_equal(x1[rows], np.asarray(x)[rows][:, ::-1])
        else:
            assert not np.allclose(x1[rows], np.asarray(x)[rows])


def test_loss_scores_each_row_with_its_task_head():
    x = _batch(batch=16)
    tasks, _ = multitask.transformed_views(jax.random.key(3), x)
    heads = {"w": jnp.zeros((4, 8)), "b": jnp.zeros((8,))}
    loss, metrics = multitask.multitask_loss(lambda v: v[:, 0, :4], heads, jax.random.key(3), x)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)  # z = 0 everywhere
    # A bias of +5 on the negation head alone: its originals are wrong, its transformed copies right.
    biased = {"w": heads["w"], "b": heads["b"].at[multitask.TASKS.index("negate")].set(5.0)}
    _, metrics = multitask.multitask_loss(lambda v: v[:, 0, :4], biased, jax.random.key(3), x)
    assert float(metrics["accuracy_negate"]) == pytest.approx(0.5)
    assert int(np.sum(np.asarray(tasks) == multitask.TASKS.index("negate"))) > 0


def test_multitask_ssl_config_trains_and_exports(tmp_path):
    config = tiny_config(write_tiny_dataset(str(tmp_path / "data")), train__num_steps=4, data__val_split="")
    config.objective.update(ablations.ABLATIONS["multitask_ssl"])
    assert ablations.get_config("multitask_ssl").objective.method == "multitask_ssl"
    summary = train.train_and_evaluate(config, str(tmp_path / "w"))
    heads = summary["state"].params["tasks"]
    assert heads["w"].shape == (config.model.ssl_dim, 8)
    assert np.isfinite(summary["train"]["loss"]) and 0.0 <= summary["train"]["task_accuracy"] <= 1.0
    assert float(jnp.abs(heads["b"]).max()) > 0  # the heads were trained
    meta = json.load(open(os.path.join(tmp_path, "w", "export", "encoder.json")))
    assert meta["text_tower"] is None  # learnt no text: the suite runs no zero-shot for it
    assert set(export_params(str(tmp_path / "w"))) == set(summary["state"].params["encoder"])


def test_multitask_ssl_with_nn_terms_is_a_config_error(tmp_path):
    config = tiny_config(write_tiny_dataset(str(tmp_path / "data")))
    config.objective.method = "multitask_ssl"
    with pytest.raises(trainconfig.ConfigError, match="set objective.use_nn=False"):
        train.train_and_evaluate(config, str(tmp_path / "w"))
