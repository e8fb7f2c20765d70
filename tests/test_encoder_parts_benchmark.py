"""benchmarks/encoder_parts.py: runs end to end on a narrow encoder, one JSON line; and its GRU
matmul floor computes exactly the GRU's matmuls.

No timing is asserted; only that every part was timed (ours, and torch's where torch is installed).
"""
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import encoder_parts


def test_encoder_parts_times_every_part_and_torch_in_the_same_run(capsys):
    code = encoder_parts.main(["--batch-windows", "4", "--repeats", "1", "--hidden-dim", "16",
                               "--window-length", "130", "--gru-unroll", "2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with_torch = importlib.util.find_spec("torch") is not None
    for part in ("conv_stack", "gru", "encoder"):
        assert result[f"{part}_ms"] > 0
        assert (result.get(f"torch_{part}_ms", 0) > 0) == with_torch, part
    assert result["gru_matmuls_ms"] > 0
    assert result["gru_matmul_share"] == pytest.approx(result["gru_matmuls_ms"] / result["gru_ms"], rel=1e-3)
    assert result["batch_windows"] == 4 and result["hidden_dim"] == 16 and result["backend"] == "cpu"


def test_encoder_parts_rejects_a_non_positive_batch(capsys):
    assert encoder_parts.main(["--batch-windows", "0"]) == 1
    assert "--batch-windows and --repeats must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("unroll", [1, True])
def test_gru_matmul_floor_is_the_grus_matmuls_against_float64_numpy(unroll):
    steps, windows, features, hidden = 5, 3, 4, 6
    rng = np.random.default_rng(0)
    x, w_ih, w_hh = (rng.standard_normal(shape) for shape in
                     ((steps, windows, features), (features, 3 * hidden), (hidden, 3 * hidden)))
    h_t = rng.standard_normal((steps - 1, hidden, windows))
    g = rng.standard_normal((steps - 1, windows, 3 * hidden))
    with jax.default_matmul_precision("highest"):
        out = jax.jit(encoder_parts.gru_matmul_floor, static_argnums=(5, 6))(
            *(jnp.asarray(a, jnp.float32) for a in (x, w_ih, w_hh, h_t, g)), jnp.float32, unroll)
    h = (x[0] @ w_ih)[:, :hidden]
    for t in range(1, steps):
        h = (x[t] @ w_ih + h @ w_hh)[:, :hidden]
    expected = (
        h,
        sum(g[t] @ w_hh.T for t in range(steps - 1)),
        sum(x[t + 1].T @ g[t] for t in range(steps - 1)) + x[0].T @ g[0],
        sum(h_t[t] @ g[t] for t in range(steps - 1)),
        np.stack([g[0] @ w_ih.T] + [g[t] @ w_ih.T for t in range(steps - 1)]),
    )
    for got, want in zip(out, expected):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
