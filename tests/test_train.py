"""Training: sharding equivalence (1 vs 4 devices, 1 vs 2 hosts) and the export round trip.

Resuming after SIGKILL / SIGTERM is tested in tests/test_reliability.py.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from primus_jax import checkpoint, data, train, trainconfig
from tests.numerics import assert_close_to_scale
from tests.train_fixtures import free_port, run_main, tiny_config, tiny_overrides, write_tiny_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("tiny") / "ds"))


def _losses_on(devices, config, dims, batches):
    mesh = train.make_mesh(devices)
    state = train.place_state(train.create_train_state(config, dims), mesh)
    train_step, _ = train.make_steps(config, dims, mesh)
    losses = []
    for local in batches:
        state, metrics = train_step(state, train.prepare_batch(local, dims, config.model.mm_dim, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params)


def test_one_device_and_four_devices_give_the_same_losses(dataset):
    config = tiny_config(dataset)
    dims = trainconfig.DataDims.from_manifest(data.read_manifest(dataset))
    iterator = data.BatchIterator(dataset, "train", 8, seed=0, process_index=0, process_count=1)
    batches = [next(iterator) for _ in range(5)]
    iterator.close()
    assert len(jax.devices()) == 4
    one, params_one = _losses_on(jax.devices()[:1], config, dims, batches)
    four, params_four = _losses_on(jax.devices(), config, dims, batches)
    assert np.all(np.isfinite(one))
    np.testing.assert_allclose(one, four, rtol=2e-5, atol=2e-5)
    assert one[0] != one[-1]  # the model is training, so the comparison is not of constants
    flat_one = jax.tree_util.tree_leaves(params_one)
    flat_four = jax.tree_util.tree_leaves(params_four)
    # Adam divides each gradient by its own running magnitude, so a weight whose gradient is ~0 can
    # step by +-lr on rounding noise alone; compare each tensor as a whole instead of elementwise.
    for a, b in zip(flat_one, flat_four):
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(a) + 1e-6


def _train_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return np.array([r["loss"] for r in rows if r["split"] == "train"])


def _finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"
    return out, err


def test_two_hosts_match_one_host(dataset, tmp_path):
    single = str(tmp_path / "single")
    _finish(run_main(single, tiny_overrides(dataset, train__num_steps=4), devices=4))
    multi = str(tmp_path / "multi")
    port = free_port()
    procs = [
        run_main(multi, tiny_overrides(
            dataset, train__num_steps=4, distributed__coordinator_address=f"127.0.0.1:{port}",
            distributed__num_processes=2, distributed__process_id=i), devices=2)
        for i in range(2)
    ]
    for p in procs:
        _finish(p)
    expected, got = _train_losses(single), _train_losses(multi)
    assert len(expected) == 4
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_export_and_load_encoder_match_the_in_memory_model(dataset, tmp_path):
    config = tiny_config(dataset, train__num_steps=2, train__eval_every=100, train__checkpoint_every=100,
                         model__matmul_precision="highest")
    summary = train.train_and_evaluate(config, str(tmp_path / "w"))
    encoder = checkpoint.load_encoder(str(tmp_path / "w" / "export"), batch_size=8)
    assert encoder.matmul_precision == "highest"  # carried by the export
    windows = data.load_split(dataset, "val")["imu"][:13]  # 13: one full batch and a padded one
    with jax.default_matmul_precision("highest"):
        expected = trainconfig.build_model(config.model).apply(
            {"params": jax.device_get(summary["state"].params["encoder"])}, windows)
    got = encoder(windows)
    assert got.shape == (13, config.model.mm_dim) and got.dtype == np.float32
    # Two differently compiled programs (batch 8 + padding, jitted, against batch 13 op by op). Each
    # output ends a 32-step GRU recurrence and a head, ~2,000 sequential float32 multiply-adds, whose
    # reordered roundings add up like a random walk: sqrt(2000) x 6e-8 ~ 3e-6 of the output scale
    # (measured 4.6e-6 on an Intel Xeon, 7.9e-6 on an AMD EPYC). 5e-5 of the scale leaves 6x margin;
    # a wrong parameter or head would be off by the order of the scale itself.
    assert_close_to_scale(got, expected["mmcl"], 5e-5)
    ssl = checkpoint.load_encoder(str(tmp_path / "w" / "export"), head="ssl")(windows)
    assert_close_to_scale(ssl, expected["ssl"], 5e-5)
    with pytest.raises(ValueError, match=r"\(N, 128, 6\)"):
        encoder(windows[:, :100])
