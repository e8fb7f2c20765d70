"""model.matmul_precision reaches every compiled program: train and eval steps, load_encoder, evaluate.

The precision is visible in the lowered StableHLO as the `precision = [X, X]` attribute of each
float32 dot_general and convolution, on any backend, so these tests hold on CPU, GPU and TPU.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from primus_jax import checkpoint, evaluate, train, trainconfig
from tests.train_fixtures import TINY_T, tiny_config

DIMS = trainconfig.DataDims(window_length=TINY_T, rate_hz=50.0, text_dim=16, video_dim=16)


def precisions_in(hlo_text: str) -> set[str]:
    """The precision names of every dot_general / convolution in a StableHLO module."""
    return set(re.findall(r"precision = \[(\w+), \1\]", hlo_text))


def _lowered_steps(matmul_precision: str) -> tuple[str, str]:
    config = tiny_config("unused", model__matmul_precision=matmul_precision)
    mesh = train.make_mesh(jax.devices()[:1])
    state = train.create_train_state(config, DIMS)
    rng = np.random.default_rng(0)
    batch = {"imu": jnp.asarray(rng.standard_normal((8, TINY_T, 6)), jnp.float32),
             "text_emb": jnp.ones((8, 16)), "video_emb": jnp.ones((8, 16)),
             "has_text": jnp.ones(8, bool), "has_video": jnp.ones(8, bool)}
    train_step, eval_step = train.make_steps(config, DIMS, mesh)
    return train_step.lower(state, batch).as_text(), eval_step.lower(state, batch).as_text()


@pytest.mark.parametrize("name,hlo_name", [("highest", "HIGHEST"), ("high", "HIGH"), ("default", "DEFAULT")])
def test_train_and_eval_steps_are_traced_at_the_configured_precision(name, hlo_name):
    for text in _lowered_steps(name):
        # the encoder's convs and GRU, the heads, the losses and the queue look-up: all of them
        assert text.count("stablehlo.dot_general") + text.count("stablehlo.convolution") > 10
        assert precisions_in(text) == {hlo_name}


def test_a_caller_context_does_not_override_the_config():
    with jax.default_matmul_precision("highest"):
        train_text, _ = _lowered_steps("default")
    assert precisions_in(train_text) == {"DEFAULT"}


def test_validate_config_rejects_an_unknown_precision():
    config = tiny_config("unused", model__matmul_precision="tf32")
    with pytest.raises(trainconfig.ConfigError, match=r"model.matmul_precision must be one of .*'tf32'"):
        trainconfig.validate_config(config, DIMS, 1)


def _export(tmp_path, matmul_precision):
    config = tiny_config("unused", model__matmul_precision=matmul_precision)
    model = trainconfig.build_model(config.model)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, TINY_T, 6)))["params"]
    checkpoint.export_encoder(str(tmp_path / "export"), params, config.model.to_dict(), TINY_T, 50.0)
    return model, params


def test_load_encoder_compiles_at_the_exported_precision(tmp_path):
    _export(tmp_path, "highest")
    encoder = checkpoint.load_encoder(str(tmp_path / "export"), batch_size=4)
    assert encoder.matmul_precision == "highest"
    text = encoder._apply.lower(encoder.params, np.zeros((4, TINY_T, 6), np.float32)).as_text()
    assert precisions_in(text) == {"HIGHEST"}


def test_load_encoder_names_the_file_of_a_bad_precision(tmp_path):
    _export(tmp_path, "highest")
    meta_path = tmp_path / "export" / checkpoint.ENCODER_CONFIG_FILE
    meta_path.write_text(meta_path.read_text().replace('"highest"', '"fastest"'))
    with pytest.raises(ValueError, match=re.escape(str(meta_path)) + r".*'fastest'"):
        checkpoint.load_encoder(str(tmp_path / "export"))


def test_evaluate_encode_runs_at_the_given_precision(tmp_path):
    model, params = _export(tmp_path, "default")
    windows = np.random.default_rng(1).standard_normal((4, TINY_T, 6)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        expected = np.asarray(model.apply({"params": params}, windows)["mmcl"])
    got = evaluate.encode(model, params, windows, matmul_precision="highest")
    # Same precision, same XLA program up to jit boundaries: equal to float32 rounding of |x| ~ 1.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(ValueError, match="must be one of"):
        evaluate.encode(model, params, windows, matmul_precision="fp8")
