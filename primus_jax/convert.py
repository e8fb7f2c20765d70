"""Import of the PyTorch reference encoder's weights (MW2StackRNNPoolingMultihead) into Flax params.

The reference module holds `backbone`, a torch Sequential of GroupNorm(2, 6), three conv blocks
(each a Sequential `net` of Conv1d then a pool), GroupNorm(4, 32) and a GRU, plus the two Linear
heads `ssl_head` and `mmcl_head`. Its state-dict keys and their places in `IMUEncoder`'s params:

    backbone.0.weight / .bias            input_norm scale / bias          (6,)
    backbone.{1,2,3}.net.0.weight        conv{1,2,3} kernel               torch (out, in, k)
    backbone.4.weight / .bias            feature_norm scale / bias        (32,)
    backbone.5.weight_ih_l0, bias_ih_l0  gru/input_proj kernel / bias     torch (3H, D), (3H,)
    backbone.5.weight_hh_l0, bias_hh_l0  gru/cell kernel / bias           torch (3H, H), (3H,)
    {ssl,mmcl}_head.weight / .bias       {ssl,mmcl}_head kernel / bias    torch (out, in)

Every Flax array is the torch array with its axes reversed (numpy's `.T`): Linear (out, in) ->
kernel (in, out); Conv1d (out, in, k) -> kernel (k, in, out); 1-D vectors unchanged. The GRU gate
blocks keep torch's (r, z, n) order along the 3H axis, which `ops.gru_recurrence` uses as is.
In the released Lightning checkpoint these keys carry the prefix "imu_encoder.".

The GRU keeps torch's two bias vectors (b_ih and b_hh, none folded), so the map is one-to-one
both ways: `save_reference_checkpoint` writes the same keys, shapes and layout, and
`load_reference_checkpoint(save_reference_checkpoint(params))` returns `params` bit for bit.
"""
import io
import os
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from primus_jax import paths
from primus_jax.models import IMUEncoder, min_input_length

CHECKPOINT_PREFIX = "imu_encoder."

TORCH_KEY_OF_PARAM = {
    ("input_norm", "scale"): "backbone.0.weight",
    ("input_norm", "bias"): "backbone.0.bias",
    ("conv1", "kernel"): "backbone.1.net.0.weight",
    ("conv2", "kernel"): "backbone.2.net.0.weight",
    ("conv3", "kernel"): "backbone.3.net.0.weight",
    ("feature_norm", "scale"): "backbone.4.weight",
    ("feature_norm", "bias"): "backbone.4.bias",
    ("gru", "input_proj", "kernel"): "backbone.5.weight_ih_l0",
    ("gru", "input_proj", "bias"): "backbone.5.bias_ih_l0",
    ("gru", "cell", "kernel"): "backbone.5.weight_hh_l0",
    ("gru", "cell", "bias"): "backbone.5.bias_hh_l0",
    ("ssl_head", "kernel"): "ssl_head.weight",
    ("ssl_head", "bias"): "ssl_head.bias",
    ("mmcl_head", "kernel"): "mmcl_head.weight",
    ("mmcl_head", "bias"): "mmcl_head.bias",
}
"""Flax param path of `IMUEncoder` -> key in the reference encoder's state dict."""

REFERENCE_ARCHITECTURE = {"hidden_dim": 512, "conv_channels": 32, "pooled_length": 32, "ssl_dim": 512,
                          "mm_dim": 512, "gru_over": "channels"}
"""The `IMUEncoder` fields the reference module fixes; the others (dtype, conv_impl, gru_unroll,
matmul_precision) choose how the same function is computed, not which function it is."""


def reference_architecture_problem(model_config: Mapping) -> str | None:
    """None when an `IMUEncoder` with `model_config` fits the reference's module, else the first
    field that does not, as "model.<field> is <value>, the reference's module holds only <value>"."""
    for field, reference in REFERENCE_ARCHITECTURE.items():
        value = model_config.get(field, getattr(IMUEncoder, field))
        if value != reference:
            return f"model.{field} is {value!r}, the reference's module holds only {reference!r}"
    return None


def require_torch(purpose: str):
    """The torch module, or ImportError naming the extra that installs it."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"{purpose} needs torch: pip install 'primus_jax[torch]'") from error
    return torch


def torch_state_dict(params: Mapping) -> dict:
    """The reference encoder's state dict (torch key -> float32 numpy array in torch's layout) of
    Flax `params` of any `IMUEncoder` width: each array is the param with its axes reversed."""
    flat = flax.traverse_util.flatten_dict(dict(params))
    unknown = sorted("/".join(path) for path in flat.keys() - TORCH_KEY_OF_PARAM.keys())
    missing = sorted("/".join(path) for path in TORCH_KEY_OF_PARAM.keys() - flat.keys())
    if unknown or missing:
        raise ValueError(f"params are not an IMUEncoder's: unknown {unknown or 'none'}, missing {missing or 'none'}")
    return {TORCH_KEY_OF_PARAM[path]: np.array(np.asarray(value, np.float32).T, order="C")  # a writable copy
            for path, value in flat.items()}


def params_from_torch_state_dict(state_dict: Mapping, model: IMUEncoder | None = None) -> dict:
    """Flax "params" for `model` (default `IMUEncoder()`) from the reference encoder's state dict.

    state_dict maps torch key -> array (numpy, or anything np.asarray accepts). Keys are looked up
    with the "imu_encoder." prefix first, then without it; all other keys (the checkpoint's CLIP
    tower, temperatures, ...) are ignored. Returns nested dicts of float32 numpy arrays with which
    `model.apply({"params": params}, x)` reproduces the torch module to float32 rounding.
    Raises ValueError naming the key when one is missing or has the wrong shape.
    """
    model = IMUEncoder() if model is None else model
    dummy = jnp.zeros((1, min_input_length(), 6), jnp.float32)
    expected = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
    flat_params = {}
    for path, leaf in flax.traverse_util.flatten_dict(expected).items():
        torch_key = TORCH_KEY_OF_PARAM[path]
        torch_shape = tuple(reversed(leaf.shape))
        found_key = next((k for k in (CHECKPOINT_PREFIX + torch_key, torch_key) if k in state_dict), None)
        if found_key is None:
            raise ValueError(
                f"torch state dict has no key {torch_key!r} (nor {CHECKPOINT_PREFIX + torch_key!r}); "
                f"expected an array of shape {torch_shape}"
            )
        value = np.asarray(state_dict[found_key], dtype=np.float32)
        if value.shape != torch_shape:
            raise ValueError(
                f"torch state dict key {found_key!r} has shape {value.shape}, expected {torch_shape}"
            )
        flat_params[path] = np.ascontiguousarray(value.T)
    return flax.traverse_util.unflatten_dict(flat_params)


def load_reference_checkpoint(path, model: IMUEncoder | None = None) -> dict:
    """Flax "params" from the released PRIMUS Lightning checkpoint (`best_model.ckpt`).

    The file is a torch zip pickle whose "state_dict" holds the encoder under "imu_encoder.".
    Reading it needs PyTorch (the optional extra primus_jax[torch]) and unpickles arbitrary
    objects (Lightning stores its hyper-parameters that way), so load only files you trust.
    Raises FileNotFoundError for a missing file, ImportError without torch, ValueError for a file
    without a "state_dict" or with missing or mis-shaped encoder keys.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PRIMUS checkpoint {path} does not exist")
    torch = require_torch(f"reading the PyTorch checkpoint {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict' entry")
    encoder_keys = set(TORCH_KEY_OF_PARAM.values())
    state_dict = {
        key: tensor.detach().cpu().float().numpy()
        for key, tensor in checkpoint["state_dict"].items()
        if key.removeprefix(CHECKPOINT_PREFIX) in encoder_keys and isinstance(tensor, torch.Tensor)
    }
    return params_from_torch_state_dict(state_dict, model)


def save_reference_checkpoint(params: Mapping, path, metadata: Mapping | None = None) -> None:
    """Write Flax `params` of the reference `IMUEncoder()` as a checkpoint shaped like the released one.

    The file (local or gs://, written atomically) is a torch zip pickle of plain dicts and float32
    tensors, readable with `torch.load(path, weights_only=True)`:
        {"state_dict": {"imu_encoder.<key>": tensor}, "primus_jax": metadata or {}}
    with the keys, shapes and layout of the module docstring's table, so the reference's encoder
    loads `{k.removeprefix("imu_encoder."): v}` with `load_state_dict(strict=True)` and
    `load_reference_checkpoint(path)` returns `params` bit for bit. metadata (e.g. window_length,
    rate_hz, channels) must hold only str, int, float, bool, None, lists and dicts.
    Raises ImportError without torch and ValueError naming the param whose shape the reference's
    module cannot hold.
    """
    torch = require_torch(f"writing the PyTorch checkpoint {path}")
    dummy = jnp.zeros((1, min_input_length(), 6), jnp.float32)
    expected = jax.eval_shape(IMUEncoder().init, jax.random.key(0), dummy)["params"]
    flat = flax.traverse_util.flatten_dict(dict(params))
    for param_path, leaf in flax.traverse_util.flatten_dict(expected).items():
        shape = tuple(np.shape(flat.get(param_path, ())))
        if param_path in flat and shape != leaf.shape:
            raise ValueError(f"param {'/'.join(param_path)} has shape {shape}, but the reference's "
                             f"{TORCH_KEY_OF_PARAM[param_path]} holds {tuple(reversed(leaf.shape))}")
    state_dict = {CHECKPOINT_PREFIX + key: torch.from_numpy(value) for key, value in torch_state_dict(params).items()}
    buffer = io.BytesIO()
    torch.save({"state_dict": state_dict, "primus_jax": dict(metadata or {})}, buffer)
    paths.atomic_write(path, buffer.getvalue())
