"""Orbax checkpoints of the whole train state, the exported encoder, and `load_encoder`.

Layout of a workdir:

    checkpoints/<step>/   latest train states (params, Adam, temperatures, NN queue, rng, step)
                          plus the input iterator's position, as JSON
    best/<step>/          the state with the lowest validation loss seen so far
    export/               params.msgpack + encoder.json: what `load_encoder` reads

The workdir and the export may be local or gs:// (`primus_jax.paths`). Orbax finalises every
checkpoint atomically, so an interrupted or failed save never damages the previous one: locally
it writes a temporary directory and renames it; on GCS, where a directory cannot be renamed, it
writes the step's objects and then a commit marker, and ignores a step without one.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from primus_jax import models, paths, precision

ENCODER_CONFIG_FILE = "encoder.json"
PARAMS_FILE = "params.msgpack"
EXPORT_FORMAT = "primus_jax.encoder/1"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit the current configuration."""


def _leaf_name(path) -> str:
    """'params/encoder/Dense_0/kernel' for a key path, whether its nodes are dicts, dataclass fields
    or sequences (Orbax metadata stores every node as a dict, the live state has dataclasses)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shape_mismatches(saved_tree, abstract_tree) -> list[str]:
    """Paths whose saved shape differs from the one the current configuration builds."""
    saved = {_leaf_name(p): getattr(v, "shape", None)
             for p, v in jax.tree_util.tree_leaves_with_path(saved_tree)}
    problems = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_tree):
        key = _leaf_name(path)
        if key not in saved:
            problems.append(f"{key} is missing")
        elif saved[key] is not None and tuple(saved[key]) != tuple(leaf.shape):
            problems.append(f"{key} has shape {tuple(saved[key])} in the checkpoint but {tuple(leaf.shape)} in this config")
    return problems


class Checkpointer:
    """Latest-N checkpoints for resuming and the best-by-validation-loss one, in `workdir`."""

    def __init__(self, workdir, keep: int = 2):
        self.workdir = paths.resolve(workdir)
        # cleanup_tmp_directories: a step a killed run left unfinished (a temporary directory locally,
        # a step without its commit marker on GCS) is deleted, not written into again.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        # Named handlers let item_metadata read the saved shapes before a restore is attempted.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self._latest = ocp.CheckpointManager(
            self.workdir / "checkpoints", options=options, item_handlers=handlers)
        best_options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True,
            best_fn=lambda metrics: metrics["val_loss"], best_mode="min",
            keep_checkpoints_without_metrics=False,
        )
        self._best = ocp.CheckpointManager(self.workdir / "best", options=best_options)
        self._best_loss = self._read_best_loss()

    def _read_best_loss(self) -> float:
        step = self._best.best_step()
        if step is None:
            return float("inf")
        return float(self._best.metrics(step)["val_loss"])

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def save(self, step: int, state, data_state: dict, val_loss: float | None = None) -> None:
        """Save `state` and the iterator position as step `step`; also as best if val_loss improved.

        An OSError (full disk, unwritable workdir) becomes a CheckpointError that says the previous
        checkpoint is intact.
        """
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        try:
            if step not in self._latest.all_steps():
                self._latest.save(step, args=args, force=True)
                self._latest.wait_until_finished()
            if val_loss is not None and np.isfinite(val_loss) and val_loss < self._best_loss:
                self._best.save(step, args=args, metrics={"val_loss": float(val_loss)}, force=True)
                self._best.wait_until_finished()
                self._best_loss = float(val_loss)
        except (OSError, ValueError) as err:
            previous = [s for s in self._latest.all_steps() if s != step]
            kept = f"the checkpoint of step {max(previous)} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointError(f"could not write the checkpoint of step {step} under {self.workdir}: {err}; {kept}") from err

    def restore_latest(self, abstract_state) -> tuple[Any, dict] | None:
        """(state, data_state) of the latest checkpoint, or None if there is none.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct (with shardings) built from the current
        config; a checkpoint written with other dimensions raises CheckpointError naming them.
        """
        step = self._latest.latest_step()
        if step is None:
            return None
        saved = self._latest.item_metadata(step)
        saved_state = saved["state"] if saved is not None and "state" in saved else None
        if saved_state is not None:
            problems = _shape_mismatches(saved_state, abstract_state)
            if problems:
                raise CheckpointError(
                    f"the checkpoint of step {step} in {self._latest.directory} was written with a different "
                    f"configuration: {'; '.join(problems[:3])}; use another --workdir or the original config")
        restored = self._latest.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def close(self) -> None:
        self._latest.close()
        self._best.close()


def export_encoder(export_dir, encoder_params, model_config: dict, window_length: int, rate_hz: float,
                   text_tower: dict | None = None) -> None:
    """Write params.msgpack, then encoder.json, to export_dir (local or gs://), each atomically.

    text_tower: the manifest's description ({"name", "dim", "source"}) of the text tower whose
    space the mmcl head was trained into, or None when the encoder learnt no text; evaluation
    runs zero-shot only against class prompts embedded by the same tower.

    encoder.json names the SHA-256 of the params it belongs to, and is written last: a reader
    that meets an export half replaced (new params, old encoder.json) gets an error from
    `load_encoder`, never a model built from mismatched files.
    """
    export_dir = paths.resolve(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    host_params = jax.tree_util.tree_map(np.asarray, jax.device_get(encoder_params))
    params_bytes = flax.serialization.msgpack_serialize(host_params)
    meta = {"format": EXPORT_FORMAT, "model": dict(model_config), "window_length": int(window_length),
            "rate_hz": float(rate_hz), "channels": ["ax", "ay", "az", "gx", "gy", "gz"],
            "units": "m/s^2 and rad/s", "feature": "mmcl", "text_tower": text_tower,
            "params_sha256": hashlib.sha256(params_bytes).hexdigest()}
    paths.atomic_write(export_dir / PARAMS_FILE, params_bytes)
    paths.atomic_write(export_dir / ENCODER_CONFIG_FILE, json.dumps(meta, indent=2))


FEATURE_HEADS = ("mmcl", "ssl", "emb")


class EncoderFn:
    """Maps float32 windows (N, T, 6) in SI units to (N, D) numpy features of one head.

    head "mmcl" (default, D = mm_dim): the text/video-aligned space, the reference's downstream
    feature; "ssl" (D = ssl_dim): the augmentation-invariant head; "emb" (D = hidden_dim): the GRU state.
    matmul_precision: the float32 matmul precision the encoder is compiled with (`primus_jax.precision`).
    Windows holding a NaN or an infinity are refused with a ValueError naming the first such
    window (`first_nonfinite_window`): the encoder would turn each into a row of NaN features.
    """

    def __init__(self, model: models.IMUEncoder, params, window_length: int, rate_hz: float, batch_size: int,
                 head: str = "mmcl", matmul_precision: str = "default"):
        if head not in FEATURE_HEADS:
            raise ValueError(f"head must be one of {FEATURE_HEADS}, got {head!r}")
        self.head = head
        self.matmul_precision = precision.check_matmul_precision(matmul_precision)
        self.model = model
        self.params = params
        self.window_length = window_length
        self.rate_hz = rate_hz
        self.batch_size = batch_size
        self._apply = jax.jit(precision.with_matmul_precision(
            lambda p, x: model.apply({"params": p}, x)[head], matmul_precision))

    def __call__(self, windows) -> np.ndarray:
        x = np.asarray(windows, np.float32)
        if x.ndim != 3 or x.shape[1:] != (self.window_length, 6):
            raise ValueError(
                f"expected windows of shape (N, {self.window_length}, 6) at {self.rate_hz:g} Hz, got {x.shape}")
        problem = first_nonfinite_window(x)
        if problem is not None:
            raise ValueError(problem)
        n = x.shape[0]
        out = []
        for start in range(0, n, self.batch_size):
            chunk = x[start:start + self.batch_size]
            pad = self.batch_size - chunk.shape[0] if n > self.batch_size else 0
            if pad:  # keep one compiled shape for every chunk
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
            feats = np.asarray(self._apply(self.params, chunk))
            out.append(feats[:feats.shape[0] - pad])
        if not out:
            dims = {"mmcl": self.model.mm_dim, "ssl": self.model.ssl_dim, "emb": self.model.hidden_dim}
            return np.zeros((0, dims[self.head]), np.float32)
        return np.concatenate(out).astype(np.float32)


def first_nonfinite_window(x: np.ndarray) -> str | None:
    """None when every value of the windows x (N, T, C) is finite, else one sentence naming the
    first window (its index), time step and channel that holds a NaN or an infinity."""
    finite = np.isfinite(x)
    if finite.all():
        return None
    window, step, channel = (int(i[0]) for i in np.nonzero(~finite))
    return (f"window {window} of {x.shape[0]} holds {x[window, step, channel]} at time step {step}, channel {channel}; "
            f"the encoder maps such a window to NaN features, so drop or repair it first")


class Export(NamedTuple):
    """What an export directory holds: the model it builds, its params and its encoder.json."""

    model: models.IMUEncoder
    params: dict
    meta: dict
    matmul_precision: str


def read_export(export_dir) -> Export:
    """Read and check an exported encoder (local or gs://): encoder.json, then params.msgpack.

    Raises FileNotFoundError without encoder.json, ValueError for an unknown format or precision,
    params that do not match the params_sha256 of encoder.json or do not fit its model.
    """
    export_dir = paths.check_access(export_dir)
    meta_path = export_dir / ENCODER_CONFIG_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{export_dir} is not an exported encoder: {ENCODER_CONFIG_FILE} is missing")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{meta_path}: unknown export format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
    model_cfg = dict(meta["model"])
    try:
        matmul_precision = precision.check_matmul_precision(model_cfg.pop("matmul_precision", "default"))
    except ValueError as error:
        raise ValueError(f"{meta_path}: {error}") from None
    model_cfg["dtype"] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_cfg.get("dtype", "float32")]
    model = models.IMUEncoder(**model_cfg)
    params_bytes = (export_dir / PARAMS_FILE).read_bytes()
    expected_sha = meta.get("params_sha256")  # absent in exports written before it was added
    if expected_sha is not None and hashlib.sha256(params_bytes).hexdigest() != expected_sha:
        raise ValueError(f"{export_dir / PARAMS_FILE}: does not match the params_sha256 of {ENCODER_CONFIG_FILE} "
                         f"(the export is being replaced or is damaged)")
    params = flax.serialization.msgpack_restore(params_bytes)
    expected = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, meta["window_length"], 6)))["params"])
    problems = _shape_mismatches(params, expected)
    if problems:
        raise ValueError(f"{export_dir}: params do not fit {ENCODER_CONFIG_FILE}: {'; '.join(problems[:3])}")
    return Export(model, params, meta, matmul_precision)


def load_encoder(export_dir, batch_size: int = 256, head: str = "mmcl") -> EncoderFn:
    """Load an exported encoder (local or gs://) in one call: `features = load_encoder(dir)(windows)`.

    `head` picks the feature: "mmcl" (default), "ssl" or "emb" (see EncoderFn). The encoder runs at the
    `matmul_precision` stored in the export's model config ("default" for exports that predate it).
    """
    export = read_export(export_dir)
    return EncoderFn(export.model, export.params, export.meta["window_length"], export.meta["rate_hz"],
                     batch_size, head, export.matmul_precision)
