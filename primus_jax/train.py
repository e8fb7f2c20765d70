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

    x1 = aug(k, x)                                  (view1; view0 = x, unaugmented, docs/design.md §2.2)
    out = encoder(concat[x, x1])                    (one call over 2G windows)
    nb  = lookup(queue, ssl(x), text, video)        (nearest neighbours, docs/design.md §2.4)
    L   = primus_objective(out[:G], out[G:], targets, nb, tau)
    params, opt = adam(clip(grad L), lr(n))          (skipped if L or a gradient is not finite;
                                                     optimizer.py: schedule, clipping)
    queue = enqueue(queue, ssl(x), text, video)
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from primus_jax import augment, data, losses, models, multitask, optimizer, paths, precision, profiling
from primus_jax import queue as nn_queue
from primus_jax.metrics_log import MetricsLog, StopSignal
from primus_jax.train_data import (check_splits, dataset_sources, make_train_iterator, mixture_batch_sizes,
                                   read_manifests)
from primus_jax.trainconfig import ConfigError, DataDims, build_model, objective_config, validate_config

log = logging.getLogger(__name__)

EVAL_KEY_INDEX = 0xFFFFFFFF  # fold_in index of the validation key; training steps never reach it


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


class TrainingError(RuntimeError):
    """Training stopped for a stated reason (e.g. repeated non-finite losses)."""


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
    stop = StopSignal()
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
