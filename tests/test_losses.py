"""Tests for primus_jax.losses: info_nce against numpy, masks, chance level, the PRIMUS objective."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from primus_jax import losses

BATCH, DIM = 8, 16

# The float64 numpy reference needs float32 matmuls, not the TF32 / bfloat16 default of GPUs and TPUs.
pytestmark = pytest.mark.usefixtures("float32_matmuls")


def _numpy_info_nce(query, key, temperature, mask=None):
    """Plain float64 symmetric InfoNCE, written independently of the library."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    k = key / np.linalg.norm(key, axis=1, keepdims=True)
    logits = q @ k.T / temperature
    weights = np.ones(len(q)) if mask is None else np.asarray(mask, np.float64)
    total = 0.0
    for matrix in (logits, logits.T):
        log_softmax = matrix - np.log(np.exp(matrix).sum(axis=1, keepdims=True))
        total += -(weights * np.diag(log_softmax)).sum() / weights.sum()
    return total


def _random(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("temperature", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("with_mask", [False, True])
def test_info_nce_matches_numpy(temperature, with_mask):
    query, key = _random((BATCH, DIM), 0), _random((BATCH, DIM), 1)
    key = key + 0.5 * query  # correlated, so the diagonal matters
    mask = np.array([1, 0, 1, 1, 0, 1, 1, 1], bool) if with_mask else None
    got = losses.info_nce(jnp.asarray(query), jnp.asarray(key), temperature, None if mask is None else jnp.asarray(mask))
    np.testing.assert_allclose(float(got), _numpy_info_nce(query.astype(np.float64), key.astype(np.float64), temperature, mask), rtol=2e-5)


def test_negative_groups_take_each_samples_negatives_from_its_block():
    query, key = _random((BATCH, DIM), 2), _random((BATCH, DIM), 3)
    key = key + 0.5 * query
    mask = np.array([1, 0, 1, 1, 1, 1, 0, 1], bool)
    got = losses.info_nce(jnp.asarray(query), jnp.asarray(key), 0.1, jnp.asarray(mask), groups=2)
    # Each block of 4 is its own InfoNCE; the masked means run over all 8 samples, so the blocks'
    # means are weighted by their unmasked counts (3 and 3 here in each direction).
    blocks = [_numpy_info_nce(query[i:i + 4].astype(np.float64), key[i:i + 4].astype(np.float64), 0.1, mask[i:i + 4])
              for i in (0, 4)]
    counts = [mask[:4].sum(), mask[4:].sum()]
    np.testing.assert_allclose(float(got), np.dot(blocks, counts) / sum(counts), rtol=2e-5)
    assert abs(float(got) - _numpy_info_nce(query.astype(np.float64), key.astype(np.float64), 0.1, mask)) > 1e-3
    with pytest.raises(ValueError, match="batch of 8 does not split into 3 groups"):
        losses.info_nce(jnp.asarray(query), jnp.asarray(key), 0.1, groups=3)


def test_masked_samples_stay_negatives():
    query, key = _random((BATCH, DIM), 2), _random((BATCH, DIM), 3)
    mask = jnp.arange(BATCH) < 4
    masked = losses.info_nce(jnp.asarray(query), jnp.asarray(key), 0.1, mask)
    truncated = losses.info_nce(jnp.asarray(query[:4]), jnp.asarray(key[:4]), 0.1)
    # Dropping samples 4..7 entirely removes negatives, which lowers the loss.
    assert float(masked) > float(truncated)


def test_fully_masked_is_zero_with_finite_zero_gradients():
    query, key = jnp.asarray(_random((BATCH, DIM), 4)), jnp.asarray(_random((BATCH, DIM), 5))
    mask = jnp.zeros(BATCH, bool)
    value, grads = jax.value_and_grad(losses.info_nce, argnums=(0, 1, 2))(query, key, jnp.float32(0.1), mask)
    assert float(value) == 0.0
    for grad in grads:
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0.0)


def test_zero_rows_are_safe():
    x = jnp.zeros((3, 4)).at[0, 0].set(2.0)
    normalised, grad = jax.value_and_grad(lambda v: jnp.sum(losses.l2_normalize(v)))(x)
    np.testing.assert_array_equal(normalised, 1.0)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(losses.l2_normalize(x)[1:], 0.0)


def test_chance_level_is_two_ln_b():
    batch = 64
    query, key = _random((batch, 128), 6), _random((batch, 128), 7)
    value = float(losses.info_nce(jnp.asarray(query), jnp.asarray(key), 1.0))
    assert abs(value - 2 * np.log(batch)) < 0.05 * 2 * np.log(batch)


def test_temperatures_are_log_parametrised():
    params = losses.init_temperature_params()
    np.testing.assert_allclose(float(params["log_mm"]), np.log(0.1), rtol=1e-6)
    taus = losses.temperatures({"log_mm": jnp.float32(-20.0), "log_ss": jnp.float32(np.log(0.3))})
    assert float(taus["mm"]) > 0.0
    np.testing.assert_allclose(float(taus["ss"]), 0.3, rtol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        losses.init_temperature_params(0.0)


def _objective_inputs(seed=10):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    view0 = {"emb": normal(BATCH, DIM), "ssl": normal(BATCH, DIM), "mmcl": normal(BATCH, DIM)}
    view1 = {"emb": normal(BATCH, DIM), "ssl": normal(BATCH, DIM), "mmcl": normal(BATCH, DIM)}
    targets = {
        "text_emb": normal(BATCH, DIM), "has_text": jnp.asarray(rng.random(BATCH) < 0.7),
        "video_emb": normal(BATCH, DIM), "has_video": jnp.asarray(rng.random(BATCH) < 0.6),
    }
    targets["has_text"] = targets["has_text"].at[0].set(True)
    targets["has_video"] = targets["has_video"].at[0].set(True)
    neighbours = {
        "imu": normal(BATCH, DIM), "text": normal(BATCH, DIM), "video": normal(BATCH, DIM),
        "has_text": jnp.ones(BATCH, bool), "has_video": jnp.arange(BATCH) % 2 == 0,
        "valid": jnp.arange(BATCH) != 3, "index": jnp.arange(BATCH, dtype=jnp.int32),
    }
    return view0, view1, targets, neighbours


def _manual_terms(view0, view1, targets, neighbours, taus):
    mm, ss = taus["mm"], taus["ss"]
    return {
        "ss": losses.info_nce(view0["ssl"], view1["ssl"], ss),
        "mm_text": losses.info_nce(view0["mmcl"], targets["text_emb"], mm, targets["has_text"]),
        "mm_video": losses.info_nce(view0["mmcl"], targets["video_emb"], mm, targets["has_video"]),
        "nn_text": losses.info_nce(view0["mmcl"], neighbours["text"], mm, neighbours["valid"] & neighbours["has_text"]),
        "nn_video": losses.info_nce(view0["mmcl"], neighbours["video"], mm, neighbours["valid"] & neighbours["has_video"]),
        "nn_ss": losses.info_nce(view0["ssl"], neighbours["imu"], ss, neighbours["valid"]),
    }


def test_objective_combines_terms_with_alpha():
    view0, view1, targets, neighbours = _objective_inputs()
    taus = {"mm": jnp.float32(0.07), "ss": jnp.float32(0.2)}
    terms = {name: float(value) for name, value in _manual_terms(view0, view1, targets, neighbours, taus).items()}
    for alpha in (0.5, 0.3):
        loss, metrics = losses.primus_objective(view0, view1, targets, neighbours, taus, losses.ObjectiveConfig(alpha=alpha))
        expected = (1 - alpha) * (terms["mm_text"] + terms["mm_video"] + terms["nn_text"] + terms["nn_video"]) + alpha * (terms["ss"] + terms["nn_ss"])
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
        for name, value in terms.items():
            np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["tau_mm"]), 0.07)
        np.testing.assert_allclose(float(metrics["tau_ss"]), 0.2)


def test_switches_zero_their_terms():
    view0, view1, targets, neighbours = _objective_inputs(seed=11)
    taus = {"mm": jnp.float32(0.1), "ss": jnp.float32(0.1)}
    terms = {name: float(value) for name, value in _manual_terms(view0, view1, targets, neighbours, taus).items()}
    simclr = losses.ObjectiveConfig(alpha=1.0, use_mm_text=False, use_mm_video=False, use_nn=False)
    loss, metrics = losses.primus_objective(view0, view1, {}, None, taus, simclr)
    np.testing.assert_allclose(float(loss), terms["ss"], rtol=1e-5)
    assert all(float(metrics[name]) == 0.0 for name in ("mm_text", "mm_video", "nn_text", "nn_video", "nn_ss"))
    imu2clip = losses.ObjectiveConfig(alpha=0.0, use_ss=False, use_nn=False)
    loss, metrics = losses.primus_objective(view0, {}, targets, None, taus, imu2clip)
    np.testing.assert_allclose(float(loss), terms["mm_text"] + terms["mm_video"], rtol=1e-5)
    assert float(metrics["ss"]) == 0.0
    no_video = losses.ObjectiveConfig(use_mm_video=False)
    loss, metrics = losses.primus_objective(view0, view1, targets, neighbours, taus, no_video)
    expected = 0.5 * (terms["mm_text"] + terms["nn_text"] + terms["ss"] + terms["nn_ss"])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["nn_video"]) == 0.0 and float(metrics["mm_video"]) == 0.0


def test_missing_inputs_are_named():
    view0, view1, targets, neighbours = _objective_inputs()
    taus = {"mm": 0.1, "ss": 0.1}
    with pytest.raises(ValueError, match="neighbours is None"):
        losses.primus_objective(view0, view1, targets, None, taus, losses.ObjectiveConfig())
    with pytest.raises(ValueError, match="targets has no key 'has_video'"):
        partial_targets = {k: v for k, v in targets.items() if k != "has_video"}
        losses.primus_objective(view0, view1, partial_targets, neighbours, taus, losses.ObjectiveConfig())
    with pytest.raises(ValueError, match="alpha must lie in"):
        losses.primus_objective(view0, view1, targets, neighbours, taus, losses.ObjectiveConfig(alpha=1.5))


class _StandInEncoder(nn.Module):
    """Two linear heads on a linear trunk: the shape of the encoder's output dict."""

    @nn.compact
    def __call__(self, x):
        emb = nn.Dense(DIM, name="trunk")(x)
        return {"emb": emb, "ssl": nn.Dense(DIM, name="ssl")(emb), "mmcl": nn.Dense(DIM, name="mmcl")(emb)}


def test_objective_gradient_reaches_every_parameter_and_both_temperatures():
    _, _, targets, neighbours = _objective_inputs(seed=12)
    encoder = _StandInEncoder()
    raw = jnp.asarray(_random((BATCH, 10), 13))
    augmented = raw + 0.3 * jnp.asarray(_random((BATCH, 10), 14))
    params = {"encoder": encoder.init(jax.random.key(0), raw), "temperature": losses.init_temperature_params()}

    def loss_fn(p):
        taus = losses.temperatures(p["temperature"])
        view0, view1 = encoder.apply(p["encoder"], raw), encoder.apply(p["encoder"], augmented)
        return losses.primus_objective(view0, view1, targets, neighbours, taus, losses.ObjectiveConfig())[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert np.isfinite(float(loss))
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(grad)), path
        assert np.any(np.asarray(grad) != 0.0), path


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        losses.ObjectiveConfig().alpha = 0.2
