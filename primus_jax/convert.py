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
blocks keep torch's (r, z, n) order along the 3H axis, which `gru_recurrence` uses as is.
In the released Lightning checkpoint these keys carry the prefix "imu_encoder.".
"""
import os
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

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
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"reading the PyTorch checkpoint {path} needs torch: pip install 'primus_jax[torch]'"
        ) from error
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
