"""Train state, jitted train / validation steps over a device mesh, and the pretraining loop.

Parallelism is plain data parallelism with `jax.jit` and `NamedSharding` on a 1-D mesh with axis
'data' over every device of every process: the global batch (G, T, 6) is split along its first
axis, while parameters, optimizer state and temperatures are replicated. The NN queue is sharded
along 'data' when the mesh has several devices and their number divides queue.size (`queue.py`),
else replicated. The encoder's formulation (convolutions, GRU unroll) follows the platform of the
mesh's devices, not of the machine that compiles (`with_formulation`). Because the
losses are written over the *global* batch, XLA inserts the collectives and contrastive negatives
come from all G samples (the reference only saw its per-GPU 16). The same step therefore runs
unchanged on one CPU, on N simulated CPU devices, on a GPU node and on a TPU slice.

One step, for a global batch x of shape (G, T, 6):

    x1 = aug(k, x)                                  (view1; view0 = x, unaugmented, SPEC §2.2)
    out = encoder(concat[x, x1])                    (one call over 2G windows)
    nb  = lookup(queue, ssl(x), text, video)        (nearest neighbours, SPEC §2.4)
    L   = primus_objective(out[:G], out[G:], targets, nb, tau)
    params, opt = adam(clip(grad L), lr(n))          (skipped if L or a gradient is not finite;
                                                     optimizer.py: schedule, clipping)
    queue = enqueue(queue, ssl(x), text, video)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from primus_jax import (augment, data, losses, models, multitask, optimizer, paths, precision, profiling,
                        queue as nn_queue)

log = logging.getLogger(__name__)

EVAL_KEY_INDEX = 0xFFFFFFFF  # fold_in index of the validation key; training steps never reach it
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# "primus": the PRIMUS objective (losses.py) with its switches; "multitask_ssl": the MultitaskSSL
# baseline (multitask.py), transformation recognition, which ignores the PRIMUS switches.
OBJECTIVE_METHODS = ("primus", "multitask_ssl")


class TrainState(flax.struct.PyTreeNode):
    """Everything a resumed run needs, as one pytree.

    params: {"encoder": IMUEncoder params, "temperature": {"log_mm", "log_ss"}}
    opt_state: optax state of Adam over all of params.
    queue: the NN ring buffers (`queue.NNQueue`).
    rng: base PRNG key (uint32[2]); step t uses fold_in(rng, t), so resuming replays the same keys.
    step: int32 scalar, number of updates attempted.
    nonfinite_streak / nonfinite_total: int32 counters of skipped non-finite updates.
    nonfinite_peak: int32, the longest streak since the loop last checked it (the loop only reads
        the state every log_every steps, so a streak that ends between two reads is still seen).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    queue: nn_queue.NNQueue
    rng: jax.Array
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array
    nonfinite_peak: jax.Array


@dataclasses.dataclass(frozen=True)
class DataDims:
    """Shapes that come from the dataset manifest rather than from the config."""

    window_length: int
    rate_hz: float
    text_dim: int
    video_dim: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> "DataDims":
        return cls(
            window_length=int(manifest["T"]),
            rate_hz=float(manifest["rate_hz"]),
            text_dim=int(manifest["text_dim"]),
            video_dim=int(manifest["video_dim"]),
        )


def build_model(model_config: ml_collections.ConfigDict) -> models.IMUEncoder:
    """The encoder described by `config.model`."""
    return models.IMUEncoder(
        hidden_dim=model_config.hidden_dim,
        conv_channels=model_config.conv_channels,
        pooled_length=model_config.pooled_length,
        ssl_dim=model_config.ssl_dim,
        mm_dim=model_config.mm_dim,
        gru_over=model_config.gru_over,
        dtype=DTYPES[model_config.dtype],
        conv_impl=model_config.get("conv_impl", "auto"),
        gru_unroll=model_config.get("gru_unroll") or None,
    )


def mesh_platform(mesh: Mesh) -> str:
    """The platform ("cpu", "gpu", "tpu") of the mesh's devices."""
    return mesh.devices.flat[0].platform


def with_formulation(config: ml_collections.ConfigDict, mesh: Mesh) -> ml_collections.ConfigDict:
    """A copy of config whose model.conv_impl and model.gru_unroll are those of the mesh's platform
    (`models.formulation_for_platform`) where they are unset or "auto"; a set value is kept.

    make_steps traces the model of this config, and the run exports its model config, so the train
    step, the exported encoder and `checkpoint.load_encoder` use one formulation, also when the step
    is compiled on a CPU for TPU devices (`primus_jax.compile`).
    """
    resolved = copy.deepcopy(config)
    chosen = models.formulation_for_platform(mesh_platform(mesh))
    with resolved.unlocked():
        if resolved.model.get("conv_impl", "auto") == "auto":
            resolved.model.conv_impl = chosen["conv_impl"]
        if not resolved.model.get("gru_unroll"):
            resolved.model.gru_unroll = chosen["gru_unroll"]
    return resolved


def objective_config(config: ml_collections.ConfigDict, dims: DataDims) -> losses.ObjectiveConfig:
    """The objective's switches; a modality the dataset lacks is switched off."""
    obj = config.objective
    return losses.ObjectiveConfig(
        alpha=obj.alpha,
        use_ss=obj.use_ss,
        use_mm_text=obj.use_mm_text and dims.text_dim > 0,
        use_mm_video=obj.use_mm_video and dims.video_dim > 0,
        use_nn=obj.use_nn,
        negative_groups=obj.get("negative_groups", 1),
    )


def create_train_state(config: ml_collections.ConfigDict, dims: DataDims) -> TrainState:
    """A fresh state: initialised encoder, temperatures at config.objective.temperature_init, empty queue."""
    model = build_model(config.model)
    rng = jax.random.PRNGKey(config.seed)
    init_key, base_key = jax.random.split(rng)
    dummy = jnp.zeros((1, dims.window_length, 6), jnp.float32)
    params = {
        "encoder": model.init(init_key, dummy)["params"],
        "temperature": losses.init_temperature_params(config.objective.temperature_init),
    }
    if config.objective.method == "multitask_ssl":
        params["tasks"] = multitask.init_task_heads(jax.random.fold_in(init_key, 1), config.model.ssl_dim)
    mm_dim = config.model.mm_dim
    queue = nn_queue.init_queue(
        size=config.queue.size,
        imu_dim=config.model.ssl_dim,
        text_dim=mm_dim,
        video_dim=mm_dim,
    )
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero, params=params, opt_state=optimizer.init_state(config.optim, params), queue=queue, rng=base_key,
        nonfinite_streak=zero, nonfinite_total=zero, nonfinite_peak=zero,
    )


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: every device of every process).

    Devices of several TPU slices (multi-slice jobs) are ordered slice by slice, as
    `mesh_utils.create_hybrid_device_mesh` lays out its two levels (chips on a slice's fast
    interconnect, then slices over the data-centre network), so the batch's neighbouring shards
    share a slice.
    """
    devices = jax.devices() if devices is None else list(devices)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        from jax.experimental import mesh_utils

        ordered = mesh_utils.create_hybrid_device_mesh((len(devices) // num_slices,), (num_slices,), devices)
        return Mesh(ordered, ("data",))
    return Mesh(np.asarray(devices), ("data",))


def _targets(batch: dict) -> dict:
    return {k: batch[k] for k in ("text_emb", "has_text", "video_emb", "has_video")}


def _global_norm(tree) -> jax.Array:
    """sqrt(sum of squares of every leaf): the norm optim.clip_norm clips."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def make_steps(config: ml_collections.ConfigDict, dims: DataDims, mesh: Mesh, num_steps: int | None = None):
    """Jitted `train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> metrics`.

    Both take the *global* batch sharded along 'data'; the state is replicated and donated.
    Both are traced under `config.model.matmul_precision` (see `primus_jax.precision`).
    `num_steps` (default config.train.num_steps) is the run's length, over which a decaying
    learning-rate schedule decays unless optim.decay_steps sets it. The train metrics include
    `learning_rate` (the rate of this update) and `grad_norm` (the global gradient norm, before
    clipping). The model takes the formulation of the mesh's platform (`with_formulation`), and the
    state's layout is `state_shardings` (place it with `place_state`).
    """
    config = with_formulation(config, mesh)
    model = build_model(config.model)
    sharded_queue = config.objective.use_nn and nn_queue.shards_over(config.queue.size, mesh.size)
    num_steps = config.train.num_steps if num_steps is None else num_steps
    tx = optimizer.make_optimizer(config.optim, num_steps)
    rate = optimizer.learning_rate_schedule(config.optim, num_steps)
    augment_fn = augment.make_augmentation(tuple(config.objective.augmentations))
    obj_cfg = objective_config(config, dims)
    retrieve_by = config.objective.nn_retrieve_by

    def forward_and_loss(params, state_queue, batch, aug_key):
        if config.objective.method == "multitask_ssl":
            ssl_fn = lambda x: model.apply({"params": params["encoder"]}, x)["ssl"]
            loss, metrics = multitask.multitask_loss(ssl_fn, params["tasks"], aug_key, batch["imu"])
            return loss, (metrics, None)
        x0 = batch["imu"]
        x1 = augment_fn(aug_key, x0)
        out = model.apply({"params": params["encoder"]}, jnp.concatenate([x0, x1], axis=0))
        g = x0.shape[0]
        view0 = {k: v[:g] for k, v in out.items()}
        view1 = {k: v[g:] for k, v in out.items()}
        ssl0 = jax.lax.stop_gradient(view0["ssl"])
        neighbours = None
        if obj_cfg.use_nn:
            look_up = (lambda *a, **k: nn_queue.lookup_sharded(*a, mesh=mesh, **k)) if sharded_queue else nn_queue.lookup
            neighbours = look_up(
                state_queue, ssl0, batch["text_emb"], batch["video_emb"],
                batch["has_text"], batch["has_video"], retrieve_by=retrieve_by,
            )
        temps = losses.temperatures(params["temperature"])
        loss, metrics = losses.primus_objective(view0, view1, _targets(batch), neighbours, temps, obj_cfg)
        return loss, (metrics, ssl0)

    def train_step(state: TrainState, batch: dict):
        aug_key = jax.random.fold_in(state.rng, state.step)
        (loss, (metrics, ssl0)), grads = jax.value_and_grad(forward_and_loss, has_aux=True)(
            state.params, state.queue, batch, aug_key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
        queue = state.queue
        if obj_cfg.use_nn:  # a skipped update writes nothing (and selects B rows, not the queue)
            put = (lambda *a, **k: nn_queue.enqueue_sharded(*a, mesh=mesh, **k)) if sharded_queue else nn_queue.enqueue
            queue = put(queue, ssl0, batch["text_emb"], batch["video_emb"],
                        batch["has_text"], batch["has_video"], write=finite)
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            queue=queue,
            nonfinite_streak=streak,
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
            nonfinite_peak=jnp.maximum(state.nonfinite_peak, streak),
        )
        # The optimiser counts only applied updates: n = step - skipped so far.
        learning_rate = optimizer.learning_rate_at(rate, state.step - state.nonfinite_total)
        metrics = dict(metrics, skipped=(~finite).astype(jnp.float32), learning_rate=learning_rate,
                       grad_norm=_global_norm(grads))
        return new_state, metrics

    def eval_step(state: TrainState, batch: dict):
        # Deterministic: one fixed augmentation key, queue read but never written.
        aug_key = jax.random.fold_in(state.rng, EVAL_KEY_INDEX)
        _, (metrics, _) = forward_and_loss(state.params, state.queue, batch, aug_key)
        return metrics

    matmul_precision = config.model.matmul_precision
    train_step = precision.with_matmul_precision(train_step, matmul_precision)
    eval_step = precision.with_matmul_precision(eval_step, matmul_precision)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    state_layout = state_shardings(jax.eval_shape(lambda: create_train_state(config, dims)), mesh)
    train_step = jax.jit(
        train_step, in_shardings=(state_layout, sharded), out_shardings=(state_layout, replicated),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(eval_step, in_shardings=(state_layout, sharded), out_shardings=replicated)
    return train_step, eval_step


def prepare_batch(local_batch: dict, dims: DataDims, mm_dim: int, mesh: Mesh) -> dict:
    """This process's numpy batch -> global jax arrays sharded along 'data'.

    A modality the dataset lacks (dimension 0) becomes zeros of width mm_dim, flagged absent, so the
    step has one shape whatever the dataset.
    """
    b = local_batch["imu"].shape[0]
    out = {"imu": local_batch["imu"].astype(np.float32)}
    for name, dim in (("text", dims.text_dim), ("video", dims.video_dim)):
        if dim == 0:
            out[f"{name}_emb"] = np.zeros((b, mm_dim), np.float32)
            out[f"has_{name}"] = np.zeros((b,), bool)
        else:
            out[f"{name}_emb"] = local_batch[f"{name}_emb"].astype(np.float32)
            out[f"has_{name}"] = local_batch[f"has_{name}"].astype(bool)
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in out.items()}


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings of a TrainState (or of its ShapeDtypeStructs) on mesh: the queue's
    (`queue.shardings`: slots along 'data' when `queue.shards_over`), everything else replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    layout = jax.tree_util.tree_map(lambda _: replicated, state)
    return layout.replace(queue=nn_queue.shardings(state.queue, mesh))


def place_state(state: TrainState, mesh: Mesh) -> TrainState:
    """Put a state on the mesh in the layout the steps take (`state_shardings`), every leaf in its
    own buffer (the train step donates the state)."""
    host = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(state))
    return jax.device_put(host, state_shardings(state, mesh))


def replicate(tree, mesh: Mesh):
    """Place a pytree on every device of the mesh (identical on every process).

    Every leaf gets its own buffer (equal constants may share one), because the train step
    donates the state.
    """
    host = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(tree))
    return jax.device_put(host, NamedSharding(mesh, PartitionSpec()))


def validate_config(config: ml_collections.ConfigDict, dims: DataDims, num_devices: int) -> None:
    """One clear sentence for each configuration error, before anything compiles."""
    problems = []
    g = config.train.global_batch_size
    if g <= 0:
        problems.append(f"train.global_batch_size must be positive, got {g}")
    elif g % num_devices:
        problems.append(
            f"train.global_batch_size={g} is not divisible by the {num_devices} devices; "
            f"use a multiple of {num_devices}")
    if not 0.0 <= config.objective.alpha <= 1.0:
        problems.append(f"objective.alpha must lie in [0, 1], got {config.objective.alpha}")
    groups = config.objective.get("negative_groups", 1)
    if groups < 1 or (g > 0 and g % groups):
        problems.append(f"objective.negative_groups={groups} must be at least 1 and divide train.global_batch_size={g}")
    if config.objective.temperature_init <= 0:
        problems.append(f"objective.temperature_init must be positive, got {config.objective.temperature_init}")
    if config.model.dtype not in DTYPES:
        problems.append(f"model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}")
    if config.model.matmul_precision not in precision.MATMUL_PRECISIONS:
        problems.append(f"model.matmul_precision must be one of {precision.MATMUL_PRECISIONS}, "
                        f"got {config.model.matmul_precision!r}")
    if config.model.gru_over not in ("channels", "time"):
        problems.append(f"model.gru_over must be 'channels' or 'time', got {config.model.gru_over!r}")
    if config.objective.method not in OBJECTIVE_METHODS:
        problems.append(f"objective.method must be one of {OBJECTIVE_METHODS}, got {config.objective.method!r}")
    elif config.objective.method == "multitask_ssl" and config.objective.use_nn:
        problems.append("objective.method='multitask_ssl' has no nearest-neighbour terms: set objective.use_nn=False")
    if config.objective.nn_retrieve_by not in ("auto", "imu"):
        problems.append(f"objective.nn_retrieve_by must be 'auto' or 'imu', got {config.objective.nn_retrieve_by!r}")
    unknown = [n for n in config.objective.augmentations if n not in augment.TRANSFORMS]
    if unknown:
        problems.append(f"objective.augmentations has unknown transforms {unknown}; valid: {sorted(augment.TRANSFORMS)}")
    if config.queue.size < g and config.objective.use_nn and not nn_queue.shards_over(config.queue.size, num_devices):
        problems.append(f"queue.size={config.queue.size} must be at least train.global_batch_size={g} (or a "
                        f"multiple of the {num_devices} devices, which shards it)")
    if config.optim.learning_rate <= 0:
        problems.append(f"optim.learning_rate must be positive, got {config.optim.learning_rate}")
    problems += optimizer.schedule_problems(config.optim)
    profile_problem = profiling.profile_window_problem(config.train.profile_steps)
    if profile_problem:
        problems.append(profile_problem)
    if config.data.get("workers", -1) < -1 or config.data.prefetch < 0:
        problems.append(f"data.workers (-1: automatic) and data.prefetch must not be negative, got "
                        f"{config.data.get('workers', -1)} and {config.data.prefetch}")
    min_t = models.min_input_length()
    if dims.window_length < min_t:
        problems.append(
            f"the dataset's windows have T={dims.window_length} samples, but the encoder needs at least {min_t}")
    for name, dim in (("text", dims.text_dim), ("video", dims.video_dim)):
        if dim and dim != config.model.mm_dim:
            problems.append(
                f"model.mm_dim={config.model.mm_dim} must equal the dataset's {name} embedding dimension {dim}")
    if problems:
        raise ConfigError("; ".join(problems))


def data_workers(config: ml_collections.ConfigDict) -> int:
    """config.data.workers, with -1 resolved to the host's usable cores minus one."""
    workers = config.data.get("workers", -1)
    return data.default_workers() if workers == -1 else workers


def dataset_sources(config: ml_collections.ConfigDict) -> list[data.MixtureSource]:
    """The datasets the run trains on: config.data.mixture's (names under data.dir), else data.dir alone."""
    if not config.data.mixture:
        if not config.data.dir:
            raise ConfigError("data.dir is empty: set --config.data.dir to a dataset prepared by data_prep")
        return [data.MixtureSource(str(config.data.dir), str(config.data.dir), 1.0)]
    try:
        sources = data.parse_mixture(config.data.mixture, config.data.dir)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not sources:
        raise ConfigError(f"data.mixture={config.data.mixture!r} names no dataset")
    return sources


MIXTURE_FIELDS = ("T", "rate_hz", "text_dim", "video_dim")


def read_manifests(sources: list[data.MixtureSource]) -> tuple[list[dict], DataDims]:
    """Each source's manifest and the DataDims they share.

    ConfigError naming two datasets and the field when a mixture's datasets differ in window
    length T, rate or an embedding width.
    """
    manifests = [data.read_manifest(source.dataset_dir) for source in sources]
    first = sources[0]
    for source, manifest in zip(sources[1:], manifests[1:]):
        for field in MIXTURE_FIELDS:
            if float(manifest[field]) != float(manifests[0][field]):
                raise ConfigError(
                    f"data.mixture: datasets {first.name!r} and {source.name!r} differ in {field} "
                    f"({manifests[0][field]} and {manifest[field]}); a mixture's datasets must agree on "
                    f"{', '.join(MIXTURE_FIELDS)}")
    return manifests, DataDims.from_manifest(manifests[0])


def check_splits(config: ml_collections.ConfigDict, sources: list[data.MixtureSource], manifests: list[dict],
                 train_batch_sizes: list[int]) -> None:
    """ConfigError unless each dataset's train split holds its share of a global batch and its val
    split (if any) a whole global batch.

    Checked up front, so a missing or too small validation split fails before training, not at the
    first evaluation.
    """
    g = config.train.global_batch_size
    for source, manifest, share in zip(sources, manifests, train_batch_sizes):
        for role, needed in (("train", share), ("val", g)):
            split = config.data[f"{role}_split"]
            if not split and role == "val":
                continue
            if split not in manifest["splits"]:
                raise ConfigError(f"data.{role}_split={split!r} is not a split of {source.dataset_dir} "
                                  f"(splits: {sorted(manifest['splits'])})")
            records = manifest["splits"][split]["records"]
            if records < needed:
                what = "one global batch" if needed == g else "its share of a global batch"
                raise ConfigError(f"data.{role}_split={split!r} of {source.dataset_dir} has {records} records, "
                                  f"fewer than {what} of {needed}")


class ConfigError(ValueError):
    """A configuration that cannot run, described in one sentence."""


class TrainingError(RuntimeError):
    """Training stopped for a stated reason (e.g. repeated non-finite losses)."""


class MetricsLog:
    """metrics.jsonl and TensorBoard scalars in the workdir, local or gs:// (process 0 only).

    A GCS object cannot be appended to, so metrics.jsonl is held in memory (the lines an earlier
    run of this workdir wrote, then each new one) and rewritten whole with `paths.atomic_write`:
    the file always holds complete lines, locally and on GCS alike. It is rewritten at most every
    `flush_every_s` seconds, at every checkpoint (so no line a resumed run will not replay is
    lost to a kill) and on close, so a long run does not upload it at every log step.
    TensorBoard events go through tensorboardX, which writes gs:// itself.
    """

    def __init__(self, workdir, flush_every_s: float = 10.0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        workdir = paths.resolve(workdir)
        self._path = workdir / "metrics.jsonl"
        self._text = self._path.read_text() if self._path.exists() else ""
        self._flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        self._text += json.dumps(record) + "\n"
        if time.monotonic() - self._last_flush >= self._flush_every_s:
            self.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def flush(self) -> None:
        """Rewrite metrics.jsonl with every line so far."""
        if self.enabled:
            paths.atomic_write(self._path, self._text)
            self._last_flush = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self._tb.close()


class _StopSignal:
    """Turns SIGTERM (preemption) into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def evaluate_loss(eval_step, state, config, dims: DataDims, mesh: Mesh,
                  sources: list[data.MixtureSource] | None = None) -> dict | None:
    """Mean validation metrics over the val split of every dataset (deterministic), or None without one.

    The mean is over all global batches of all the datasets' val splits.
    """
    split = config.data.val_split
    if not split:
        return None
    totals, count = {}, 0
    for source in sources or dataset_sources(config):
        iterator = data.BatchIterator(
            source.dataset_dir, split, config.train.global_batch_size, shuffle=False, num_epochs=1,
            drop_remainder=True, prefetch=config.data.prefetch, workers=0,  # small, read now and then
            skip_corrupt=config.data.skip_corrupt)
        try:
            for local in iterator:
                metrics = jax.device_get(eval_step(state, prepare_batch(local, dims, config.model.mm_dim, mesh)))
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                count += 1
        finally:
            iterator.close()
    if count == 0:
        log.warning("validation split %r has fewer records than one global batch; skipping validation", split)
        return None
    return {k: v / count for k, v in totals.items()}


def make_train_iterator(config: ml_collections.ConfigDict, sources: list[data.MixtureSource]):
    """The training batches: a BatchIterator over data.dir, or a MixtureIterator over data.mixture."""
    options = dict(shuffle=config.data.shuffle, prefetch=config.data.prefetch, workers=data_workers(config),
                   skip_corrupt=config.data.skip_corrupt)
    if not config.data.mixture:
        return data.BatchIterator(sources[0].dataset_dir, config.data.train_split, config.train.global_batch_size,
                                  seed=config.seed, **options)
    return data.MixtureIterator(sources, config.data.train_split, config.train.global_batch_size,
                                seed=config.seed, **options)


def mixture_batch_sizes(config: ml_collections.ConfigDict, sources: list[data.MixtureSource]) -> list[int]:
    """Records of each dataset in a global batch (data.mixture.allocate); ConfigError if one gets none."""
    if not config.data.mixture:
        return [config.train.global_batch_size]
    try:
        return data.mixture.allocate([s.weight for s in sources], config.train.global_batch_size,
                                     jax.process_count())
    except ValueError as error:
        raise ConfigError(str(error)) from None


def abstract_state(state, mesh: Mesh):
    """ShapeDtypeStructs of a state in the layout of `state_shardings`, for Orbax restore."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  state, state_shardings(state, mesh))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, evaluators=None) -> dict:
    """Pretrain on config.data.dir (or config.data.mixture) into workdir; resumes from the latest
    checkpoint there.

    `evaluators`: a `primus_jax.evaluators.Evaluators` built from config.evals (main.py builds it
    before anything compiles); required when config.evals is not empty. Its metrics are written
    under each evaluator's name. `config.train.profile_steps` traces those steps (primus_jax.profiling).

    Returns a summary dict: final step, last train metrics, last validation metrics, whether the run
    was preempted, the number of skipped (non-finite) updates and of skipped corrupt records.
    """
    from tqdm import tqdm

    from primus_jax import checkpoint as ckpt

    if config.get("evals") and evaluators is None:
        raise ConfigError("config.evals names evaluators but none were passed to train_and_evaluate; build them "
                          "with primus_jax.evaluators.Evaluators(config) (python -m primus_jax.main does)")
    sources = dataset_sources(config)
    for source in sources:
        paths.check_access(source.dataset_dir)
    workdir = paths.check_access(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    manifests, dims = read_manifests(sources)
    mesh = make_mesh()
    config = with_formulation(config, mesh)
    validate_config(config, dims, mesh.size)
    batch_sizes = mixture_batch_sizes(config, sources)
    check_splits(config, sources, manifests, batch_sizes)

    iterator = make_train_iterator(config, sources)
    try:
        num_steps = config.train.num_steps or config.train.num_epochs * iterator.steps_per_epoch
        if num_steps <= 0:
            raise ConfigError(
                f"train.num_steps={config.train.num_steps} and train.num_epochs={config.train.num_epochs} "
                f"leave nothing to train")
        try:
            optimizer.learning_rate_schedule(config.optim, num_steps)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    except ConfigError:
        iterator.close()
        raise
    if config.data.mixture:
        log.info("mixture: %s of every global batch of %d", ", ".join(
            f"{s.name} {g} ({g / config.train.global_batch_size:.3f})" for s, g in zip(sources, batch_sizes)),
            config.train.global_batch_size)

    state = place_state(create_train_state(config, dims), mesh)
    checkpointer = ckpt.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    restored = checkpointer.restore_latest(abstract_state(state, mesh))
    if restored is not None:
        state, data_state = restored
        try:
            iterator.set_state(data_state)
        except (ValueError, KeyError) as error:
            iterator.close()
            checkpointer.close()
            raise ckpt.CheckpointError(
                f"the input position saved in {workdir} does not fit this run's data ({error}); use another "
                f"--workdir or the original data settings") from None
        log.info("resumed from step %d in %s", int(state.step), workdir)
    train_step, eval_step = make_steps(config, dims, mesh, num_steps)
    metrics_log = MetricsLog(workdir)
    profiler = profiling.StepProfiler(config.train.profile_steps, workdir / "tensorboard")
    stop = _StopSignal()
    step = int(state.step)
    last_train, last_val, preempted = {}, None, False
    progress = tqdm(total=num_steps, initial=step, desc="pretrain", unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < num_steps:
            with profiler.step(step, lambda: state):
                batch = prepare_batch(next(iterator), dims, config.model.mm_dim, mesh)
                state, metrics = train_step(state, batch)
            step += 1
            window_steps += 1
            progress.update(1)
            if step % config.train.log_every == 0 or step == num_steps:
                last_train = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                last_train["samples_per_s"] = window_steps * config.train.global_batch_size / max(elapsed, 1e-9)
                last_train["skipped_updates"] = int(state.nonfinite_total)
                last_train["skipped_records"] = iterator.stats["skipped_records"]
                if isinstance(iterator, data.MixtureIterator):
                    last_train.update({f"share_{name}": v for name, v in iterator.shares.items()})
                    last_train.update({f"epochs_{name}": v for name, v in iterator.epochs_seen().items()})
                window_start, window_steps = time.perf_counter(), 0
                metrics_log.write(step, "train", last_train)
                progress.set_postfix(loss=f"{last_train['loss']:.3f}", samples_s=f"{last_train['samples_per_s']:.0f}")
                peak = int(state.nonfinite_peak)
                if peak >= config.train.max_nonfinite_in_a_row:
                    latest = checkpointer.latest_step()
                    raise TrainingError(
                        f"{peak} non-finite losses in a row before step {step} (train.max_nonfinite_in_a_row="
                        f"{config.train.max_nonfinite_in_a_row}): stopping; the last good checkpoint "
                        f"({'step ' + str(latest) if latest is not None else 'none yet'}) in {workdir} is intact")
                if peak:
                    state = state.replace(nonfinite_peak=replicate(np.zeros((), np.int32), mesh))
            val_now = step % config.train.eval_every == 0 or step == num_steps
            if val_now:
                last_val = evaluate_loss(eval_step, state, config, dims, mesh, sources)
                if last_val is not None:
                    metrics_log.write(step, "val", last_val)
            if evaluators and jax.process_index() == 0 and evaluators.due(step, num_steps):
                encoder_params = jax.device_get(state.params["encoder"])
                for name, metrics_of_eval in evaluators.run(step, num_steps, encoder_params, dims).items():
                    metrics_log.write(step, name, metrics_of_eval)
            if stop.requested or val_now or step % config.train.checkpoint_every == 0:
                checkpointer.save(step, state, iterator.get_state(),
                                  val_loss=last_val["loss"] if (val_now and last_val) else None)
                metrics_log.flush()  # a resumed run replays only the steps after this checkpoint
            if stop.requested:
                preempted = True
                break
        if not preempted and config.train.export and jax.process_index() == 0:
            learnt_text = objective_config(config, dims).use_mm_text and config.objective.method == "primus"
            ckpt.export_encoder(
                workdir / "export", state.params["encoder"], config.model.to_dict(),
                dims.window_length, dims.rate_hz,
                text_tower=manifests[0].get("towers", {}).get("text") if learnt_text else None)
    finally:
        profiler.close()
        progress.close()
        stop.restore()
        iterator.close()
        metrics_log.close()
        checkpointer.close()
    return {"step": step, "train": last_train, "val": last_val, "preempted": preempted,
            "skipped_updates": int(state.nonfinite_total),
            "skipped_records": iterator.stats["skipped_records"], "state": state}
