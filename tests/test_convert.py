"""Tests of primus_jax.convert against a plain numpy re-implementation of the torch forward pass.

The numpy reference below works in torch's layout (B, C, T) with torch's weight shapes, so it
checks the layout conversion, the GroupNorm grouping, the pooling windows and the GRU gate order
independently of the Flax code. It needs no torch.
"""
import math
import sys
import types

import jax
import numpy as np
import pytest

from primus_jax.convert import load_reference_checkpoint, params_from_torch_state_dict
from primus_jax.models import IMUEncoder

HIDDEN = 512


def torch_shapes() -> dict:
    """Key -> shape of the reference MW2StackRNNPoolingMultihead(32, 512) state dict."""
    return {
        "backbone.0.weight": (6,),
        "backbone.0.bias": (6,),
        "backbone.1.net.0.weight": (32, 6, 10),
        "backbone.2.net.0.weight": (32, 32, 5),
        "backbone.3.net.0.weight": (32, 32, 5),
        "backbone.4.weight": (32,),
        "backbone.4.bias": (32,),
        "backbone.5.weight_ih_l0": (3 * HIDDEN, 32),
        "backbone.5.weight_hh_l0": (3 * HIDDEN, HIDDEN),
        "backbone.5.bias_ih_l0": (3 * HIDDEN,),
        "backbone.5.bias_hh_l0": (3 * HIDDEN,),
        "ssl_head.weight": (HIDDEN, HIDDEN),
        "ssl_head.bias": (HIDDEN,),
        "mmcl_head.weight": (HIDDEN, HIDDEN),
        "mmcl_head.bias": (HIDDEN,),
    }


def random_state_dict(seed: int = 0) -> dict:
    """Random float32 weights of torch-default-like scale (norm scales around 1)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in torch_shapes().items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else HIDDEN
        bound = 1.0 / math.sqrt(fan_in if "backbone.5" not in key else HIDDEN)
        state[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
    for norm in ("backbone.0", "backbone.4"):
        state[f"{norm}.weight"] = 1.0 + state[f"{norm}.weight"]
    return state


def group_norm(x, groups, weight, bias):
    """torch GroupNorm on (B, C, T): each group of C/G channels is standardised over (C/G x T)."""
    B, C, T = x.shape
    grouped = x.reshape(B, groups, -1)
    grouped = (grouped - grouped.mean(-1, keepdims=True)) / np.sqrt(grouped.var(-1, keepdims=True) + 1e-5)
    return grouped.reshape(B, C, T) * weight[None, :, None] + bias[None, :, None]


def conv1d(x, weight, dilation=2):
    """torch Conv1d, VALID, no bias: x (B, C_in, T), weight (C_out, C_in, k)."""
    kernel = weight.shape[2]
    out_length = x.shape[2] - dilation * (kernel - 1)
    return sum(
        np.einsum("oc,bct->bot", weight[:, :, tap], x[:, :, tap * dilation : tap * dilation + out_length])
        for tap in range(kernel)
    )


def max_pool(x, size=3):
    B, C, T = x.shape
    kept = (T // size) * size
    return x[:, :, :kept].reshape(B, C, T // size, size).max(-1)


def adaptive_avg_pool(x, out_length=32):
    T = x.shape[2]
    windows = [(math.floor(i * T / out_length), math.ceil((i + 1) * T / out_length)) for i in range(out_length)]
    return np.stack([x[:, :, start:end].mean(-1) for start, end in windows], axis=-1)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def gru_final_state(sequence, w_ih, w_hh, b_ih, b_hh):
    """torch batch-first GRU, h_0 = 0, gate order (r, z, n): sequence (B, S, D) -> h_S (B, H)."""
    h = np.zeros((sequence.shape[0], w_hh.shape[1]))
    for step in range(sequence.shape[1]):
        i_r, i_z, i_n = np.split(sequence[:, step] @ w_ih.T + b_ih, 3, axis=-1)
        h_r, h_z, h_n = np.split(h @ w_hh.T + b_hh, 3, axis=-1)
        r, z = sigmoid(i_r + h_r), sigmoid(i_z + h_z)
        n = np.tanh(i_n + r * h_n)
        h = (1 - z) * n + z * h
    return h


def torch_forward(state, x):
    """The reference forward in float64 numpy; x (B, T, 6) channels-last like our batches."""
    s = {key: value.astype(np.float64) for key, value in state.items()}
    h = group_norm(np.transpose(x, (0, 2, 1)).astype(np.float64), 2, s["backbone.0.weight"], s["backbone.0.bias"])
    h = max_pool(conv1d(h, s["backbone.1.net.0.weight"]))
    h = max_pool(conv1d(h, s["backbone.2.net.0.weight"]))
    h = adaptive_avg_pool(conv1d(h, s["backbone.3.net.0.weight"]))
    h = group_norm(h, 4, s["backbone.4.weight"], s["backbone.4.bias"])
    # (B, C=32, L=32) goes to the batch-first GRU untransposed: steps over channels.
    gru = [s[f"backbone.5.{name}_l0"] for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    emb = gru_final_state(h, *gru)
    return {
        "emb": emb,
        "ssl": emb @ s["ssl_head.weight"].T + s["ssl_head.bias"],
        "mmcl": emb @ s["mmcl_head.weight"].T + s["mmcl_head.bias"],
    }


def imu_windows(T: int, seed: int, acc_std: float, gyro_std: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    acc = rng.normal(0.0, acc_std, (2, T, 3)) + np.array([0.0, 9.81, 0.0])
    gyro = rng.normal(0.0, gyro_std, (2, T, 3))
    return np.concatenate([acc, gyro], axis=-1).astype(np.float32)


@pytest.fixture(scope="module")
def encoder_apply():
    return jax.jit(IMUEncoder().apply)


@pytest.mark.usefixtures("float32_matmuls")  # the numpy reference is float64
@pytest.mark.parametrize(
    "T, acc_std, gyro_std",
    [(250, 3.0, 1.0), (1000, 0.02, 0.003)],  # moving; resting (gyro variance near GroupNorm's eps)
)
def test_converted_params_reproduce_torch_forward(encoder_apply, T, acc_std, gyro_std):
    state = random_state_dict(seed=T)
    params = params_from_torch_state_dict(state)
    x = imu_windows(T, seed=T + 1, acc_std=acc_std, gyro_std=gyro_std)
    ours = encoder_apply({"params": params}, x)
    reference = torch_forward(state, x)
    for name in ("emb", "ssl", "mmcl"):
        np.testing.assert_allclose(ours[name], reference[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_checkpoint_prefix_is_stripped_and_other_keys_ignored():
    state = random_state_dict(seed=3)
    checkpoint_state = {f"imu_encoder.{key}": value for key, value in state.items()}
    checkpoint_state["clip_model.text_projection.weight"] = np.zeros((512, 512), np.float32)
    checkpoint_state["temperature_mm"] = np.float32(0.1)
    from_checkpoint = params_from_torch_state_dict(checkpoint_state)
    plain = params_from_torch_state_dict(state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_checkpoint, plain)
    np.testing.assert_array_equal(plain["conv1"]["kernel"], state["backbone.1.net.0.weight"].transpose(2, 1, 0))
    np.testing.assert_array_equal(plain["gru"]["cell"]["kernel"], state["backbone.5.weight_hh_l0"].T)


def test_missing_key_is_named():
    state = random_state_dict()
    del state["backbone.5.weight_hh_l0"]
    with pytest.raises(ValueError, match=r"no key 'backbone.5.weight_hh_l0'.*shape \(1536, 512\)"):
        params_from_torch_state_dict(state)


def test_wrong_shape_is_named():
    state = random_state_dict()
    state["ssl_head.weight"] = np.zeros((384, 512), np.float32)
    with pytest.raises(ValueError, match=r"'ssl_head.weight' has shape \(384, 512\), expected \(512, 512\)"):
        params_from_torch_state_dict(state)


def test_state_dict_checked_against_the_given_model():
    with pytest.raises(ValueError, match=r"'mmcl_head.bias' has shape \(512,\), expected \(384,\)"):
        params_from_torch_state_dict(random_state_dict(), IMUEncoder(mm_dim=384))


def test_missing_checkpoint_file_is_named(tmp_path):
    missing = tmp_path / "best_model.ckpt"
    with pytest.raises(FileNotFoundError, match="best_model.ckpt does not exist"):
        load_reference_checkpoint(missing)


def test_checkpoint_without_torch_says_how_to_install(tmp_path, monkeypatch):
    checkpoint = tmp_path / "best_model.ckpt"
    checkpoint.write_bytes(b"not read without torch")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'primus_jax\[torch\]'"):
        load_reference_checkpoint(checkpoint)


class FakeTensor:
    """The few torch.Tensor methods load_reference_checkpoint calls, over a numpy array."""

    def __init__(self, array):
        self.array = array

    def detach(self):
        return self

    def cpu(self):
        return self

    def float(self):
        return FakeTensor(self.array.astype(np.float32))

    def numpy(self):
        return self.array


def fake_torch_reading_npz() -> types.ModuleType:
    """A stand-in torch whose `load` reads an .npz file as a Lightning checkpoint (keys with
    "state_dict/" go under "state_dict"), so the tests need no torch."""
    fake = types.ModuleType("torch")
    fake.Tensor = FakeTensor

    def load(path, map_location, weights_only):
        assert map_location == "cpu"
        with np.load(path) as stored:
            state = {
                key.removeprefix("state_dict/"): FakeTensor(stored[key])
                for key in stored
                if key.startswith("state_dict/")
            }
        return {"state_dict": state, "epoch": 14} if state else {"epoch": 14}

    fake.load = load
    return fake


def test_checkpoint_state_dict_is_read_and_converted(tmp_path, monkeypatch):
    state = random_state_dict(seed=5)
    stored = {f"state_dict/imu_encoder.{key}": value.astype(np.float64) for key, value in state.items()}
    stored["state_dict/clip_model.logit_scale"] = np.array(4.6)
    checkpoint = tmp_path / "best_model.ckpt"
    with open(checkpoint, "wb") as file:
        np.savez(file, **stored)
    monkeypatch.setitem(sys.modules, "torch", fake_torch_reading_npz())
    params = load_reference_checkpoint(checkpoint)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_from_torch_state_dict(state))
    assert params["ssl_head"]["kernel"].dtype == np.float32


def test_checkpoint_without_state_dict_is_rejected(tmp_path, monkeypatch):
    checkpoint = tmp_path / "weights.ckpt"
    with open(checkpoint, "wb") as file:
        np.savez(file, epoch=np.array(14))
    monkeypatch.setitem(sys.modules, "torch", fake_torch_reading_npz())
    with pytest.raises(ValueError, match="weights.ckpt is not a Lightning checkpoint: it has no 'state_dict' entry"):
        load_reference_checkpoint(checkpoint)
