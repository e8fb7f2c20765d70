"""A tiny random CLIP for tests: in memory, or saved as a real checkpoint folder for `clip:<folder>`.

The model is a FlaxCLIPModel of width 32 (2 layers, 2 heads, MLP 64) for text and for 32 px
images in 8 px patches, projected to 16 dimensions. Its tokenizer is a byte-level BPE of the 256
byte symbols, the same with the end-of-word mark "</w>", ten merges and <|startoftext|>,
<|endoftext|>. Parameters are drawn with numpy (no XLA compile): biases 0, LayerNorm scales 1,
logit_scale log(1 / 0.07) as in CLIP, every other array N(0, 0.02^2).

`save_tiny_clip(parent)` writes the checkpoint (config.json, flax_model.msgpack and the
tokenizer files) to <parent>/tiny-random-clip and returns the tower spec "clip:<that folder>",
which command lines load through `towers.CLIPTowers.from_pretrained`, the path real checkpoints
take.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from primus_jax import towers

FOLDER_NAME = "tiny-random-clip"
IMAGE_SIZE = 32


def write_tiny_bpe(folder: str) -> tuple[str, str]:
    """Writes the tiny byte-level BPE vocabulary (vocab.json, merges.txt) for CLIPTokenizer."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = ["t h", "i n", "a n", "e r", "o n", "in g</w>", "th e</w>", "e d</w>", "a l", "o r"]
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def random_params(shapes, seed: int) -> dict:
    """Random parameters for a tree of ShapeDtypeStructs (see the module docstring)."""
    rng = np.random.default_rng(seed)
    params = {}
    for path, spec in traverse_util.flatten_dict(shapes).items():
        if path[-1] == "bias":
            value = np.zeros(spec.shape)
        elif path[-1] == "scale":
            value = np.ones(spec.shape)
        elif path[-1] == "logit_scale":
            value = np.full(spec.shape, np.log(1 / 0.07))
        else:
            value = rng.normal(0.0, 0.02, spec.shape)
        params[path] = jnp.asarray(value, spec.dtype)
    return traverse_util.unflatten_dict(params)


def tiny_clip(seed: int = 0):
    """(FlaxCLIPModel, params, CLIPTokenizer) of the tiny random CLIP drawn with `seed`."""
    from transformers import CLIPConfig, CLIPTokenizer, FlaxCLIPModel

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = CLIPTokenizer(*write_tiny_bpe(folder))
    shared = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=towers.CLIP_TEXT_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **shared,
        ),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, **shared),
        projection_dim=16,
    )
    model = FlaxCLIPModel(config, _do_init=False)
    input_shape = ((1, towers.CLIP_TEXT_LENGTH), (1, IMAGE_SIZE, IMAGE_SIZE, 3))
    shapes = jax.eval_shape(lambda rng: model.init_weights(rng, input_shape), jax.random.PRNGKey(0))
    return model, random_params(shapes, seed), tokenizer


@functools.lru_cache(maxsize=None)
def tiny_clip_towers(seed: int = 0) -> tuple[towers.CLIPTextTower, towers.CLIPVideoTower]:
    """The (text, video) towers of `tiny_clip(seed)`, built once per seed and process."""
    model, params, tokenizer = tiny_clip(seed)
    name, source = FOLDER_NAME, f"random init, seed {seed}"
    return (towers.CLIPTextTower(model, params, tokenizer, name, source),
            towers.CLIPVideoTower(model, params, name, source))


def save_tiny_clip(parent, seed: int = 0) -> str:
    """Saves `tiny_clip(seed)` as a checkpoint folder <parent>/tiny-random-clip; returns "clip:<folder>"."""
    model, params, tokenizer = tiny_clip(seed)
    folder = os.path.join(os.fspath(parent), FOLDER_NAME)
    model.save_pretrained(folder, params=params)
    tokenizer.save_pretrained(folder)
    return f"clip:{folder}"
