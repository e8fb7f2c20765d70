"""Device-resident nearest-neighbour queue for the L_NN terms.

Three index-aligned ring buffers of S slots hold, per past sample, its IMU ssl feature
(detached), its frozen text embedding and its frozen video embedding, all L2-normalised,
with flags saying which slots are filled and which have text / video. The queue lives in
the train state: lookup and enqueue are pure, jittable functions of it.

Each step the train step first looks up every sample's nearest neighbour among the stored
slots, then enqueues the batch (the reference's order).

On a mesh of n > 1 devices whose size divides S (`shards_over`), the train step keeps the slots
sharded along the mesh's 'data' axis instead of replicated: device c holds its own ring of S/n
slots, written with its own B/n samples of each global batch (`enqueue_sharded`), and the look-up
is a sharded matmul against every device's slots followed by a global arg-max (`lookup_sharded`).
The queue then costs S/n slots per device, and S may be smaller than the global batch: a device
whose B/n samples outnumber its S/n slots keeps its last S/n, as a ring of S/n would after writing
all B/n. When S is a multiple of B the stored set is the same as the replicated ring's (the last
S/B global batches), so the neighbours are too.
"""
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from primus_jax.losses import l2_normalize

RETRIEVAL_MODES = ("auto", "imu")


class NNQueue(struct.PyTreeNode):
    """Ring buffers of S slots; slot j holds one past sample.

    imu (S, Di), text (S, Dt), video (S, Dv): float32 L2-normalised features.
    has_text, has_video, filled: (S,) bool. ptr: int32 scalar, the next slot to write.
    """

    imu: jax.Array
    text: jax.Array
    video: jax.Array
    has_text: jax.Array
    has_video: jax.Array
    filled: jax.Array
    ptr: jax.Array

    @property
    def size(self) -> int:
        """Number of slots S."""
        return self.filled.shape[0]


def init_queue(size: int = 8192, imu_dim: int = 512, text_dim: int = 512, video_dim: int = 512) -> NNQueue:
    """An empty queue: zero features, nothing filled, ptr = 0."""
    if size < 1:
        raise ValueError(f"queue size must be at least 1, got {size}.")
    return NNQueue(
        imu=jnp.zeros((size, imu_dim), jnp.float32),
        text=jnp.zeros((size, text_dim), jnp.float32),
        video=jnp.zeros((size, video_dim), jnp.float32),
        has_text=jnp.zeros((size,), bool),
        has_video=jnp.zeros((size,), bool),
        filled=jnp.zeros((size,), bool),
        ptr=jnp.zeros((), jnp.int32),
    )


def _require_batch(queue: NNQueue, imu, text, video, has_text, has_video, function: str) -> None:
    """Raise ValueError naming the first argument whose shape does not fit the queue."""
    batch = imu.shape[0] if imu.ndim == 2 else None
    expected = {
        "imu": (batch, queue.imu.shape[1]),
        "text": (batch, queue.text.shape[1]),
        "video": (batch, queue.video.shape[1]),
        "has_text": (batch,),
        "has_video": (batch,),
    }
    given = {"imu": imu, "text": text, "video": video, "has_text": has_text, "has_video": has_video}
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(
                f"{function}: {name} has shape {tuple(given[name].shape)}, expected {shape} "
                f"for this queue and a batch of {batch}."
            )


def _nearest(query: jax.Array, buffer: jax.Array, eligible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(index, valid), each (B,): j*_b = argmax_j {C_bj : E_j} of the cosines C = norm(query) buffer^T
    of B query rows with S stored unit rows, among the eligible slots E (S,) bool; valid is whether
    any slot is eligible (index 0 where not)."""
    similarity = l2_normalize(query) @ buffer.T
    index = jnp.argmax(jnp.where(eligible[None, :], similarity, -jnp.inf), axis=1)
    valid = jnp.broadcast_to(jnp.any(eligible), index.shape)
    return jnp.where(valid, index, 0).astype(jnp.int32), valid


def _nearest_if_needed(needed: jax.Array, query: jax.Array, buffer: jax.Array, eligible: jax.Array):
    """`_nearest`, or (0, False) for every row (skipping the matmul) when no entry of `needed` (B,) is True."""
    batch = query.shape[0]
    return jax.lax.cond(
        jnp.any(needed),
        lambda: _nearest(query, buffer, eligible),
        lambda: (jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool)),
    )


def lookup(
    queue: NNQueue,
    imu: jax.Array,
    text: jax.Array,
    video: jax.Array,
    has_text: jax.Array,
    has_video: jax.Array,
    retrieve_by: str = "auto",
) -> dict[str, jax.Array]:
    """Nearest stored slot of each of B samples, by cosine similarity.

    imu (B, Di) ssl features, text (B, Dt), video (B, Dv), has_text / has_video (B,) bool.
    retrieve_by="auto": a sample with video is matched by video against filled slots with
    video; else, with text, by text against filled slots with text; else by IMU against all
    filled slots. retrieve_by="imu": every sample by IMU (the reference does so at alpha = 1).

    Per modality m, a (B, S) similarity matmul C_m = norm(q_m) Q_m^T and the masked argmax
    j*_m,b = argmax_j {C_m,bj : E_m,j} over its eligible slots E_m (S,); each sample then takes
    the (B,) index of the modality it retrieves by. A modality's matmul and argmax run only when
    some sample of the batch retrieves by it (a lax.cond whose other branch returns (B,) fills,
    so no (B, S) array is built for a skipped modality): with retrieve_by="auto" a batch in which
    every sample has video computes one matmul, not three.
    Returns {"imu", "text", "video": (B, .) neighbour rows, "has_text", "has_video": (B,) its
    flags, "valid": (B,) at least one eligible slot, "index": (B,) int32 j*}. Where valid is
    False the rows are zero, the flags False and the index 0 (an empty queue gives no neighbours).
    """
    if retrieve_by not in RETRIEVAL_MODES:
        raise ValueError(f"retrieve_by must be one of {RETRIEVAL_MODES}, got {retrieve_by!r}.")
    _require_batch(queue, imu, text, video, has_text, has_video, "lookup")
    if retrieve_by == "imu":
        index, valid = _nearest(imu, queue.imu, queue.filled)
    else:
        by_video = has_video
        by_text = has_text & ~has_video
        by_imu = ~(by_video | by_text)
        video_index, video_valid = _nearest_if_needed(by_video, video, queue.video, queue.filled & queue.has_video)
        text_index, text_valid = _nearest_if_needed(by_text, text, queue.text, queue.filled & queue.has_text)
        imu_index, imu_valid = _nearest_if_needed(by_imu, imu, queue.imu, queue.filled)
        index = jnp.where(by_video, video_index, jnp.where(by_text, text_index, imu_index))
        valid = jnp.where(by_video, video_valid, jnp.where(by_text, text_valid, imu_valid))

    def gather(rows):
        picked = rows[index]
        return jnp.where(valid.reshape((-1,) + (1,) * (picked.ndim - 1)), picked, jnp.zeros_like(picked))

    return {
        "imu": gather(queue.imu),
        "text": gather(queue.text),
        "video": gather(queue.video),
        "has_text": gather(queue.has_text),
        "has_video": gather(queue.has_video),
        "valid": valid,
        "index": index,
    }


def enqueue(
    queue: NNQueue,
    imu: jax.Array,
    text: jax.Array,
    video: jax.Array,
    has_text: jax.Array,
    has_video: jax.Array,
    write: jax.Array | bool = True,
) -> NNQueue:
    """Write B samples into slots (ptr + i) mod S, i = 0..B-1, and advance ptr by B (mod S).

    Features are stored L2-normalised as float32; the IMU features are stop_gradient'ed
    (the queue is a constant for the loss). Requires B <= S so a batch never overwrites itself.
    write: a traced bool; where it is False the queue comes back unchanged (the train step skips
    a non-finite update this way). Only the B written rows are selected, so the update stays an
    in-place write of B rows rather than a select over the whole (S, D) buffers.
    """
    _require_batch(queue, imu, text, video, has_text, has_video, "enqueue")
    batch, size = imu.shape[0], queue.size
    if batch > size:
        raise ValueError(f"enqueue: a batch of {batch} does not fit a queue of {size} slots (need B <= S).")
    slots = (queue.ptr + jnp.arange(batch, dtype=jnp.int32)) % size

    def put(buffer, rows):
        return buffer.at[slots].set(jnp.where(write, rows, buffer[slots]))

    def store(features):
        return l2_normalize(jax.lax.stop_gradient(features).astype(jnp.float32))

    return queue.replace(
        imu=put(queue.imu, store(imu)),
        text=put(queue.text, store(text)),
        video=put(queue.video, store(video)),
        has_text=put(queue.has_text, has_text.astype(bool)),
        has_video=put(queue.has_video, has_video.astype(bool)),
        filled=put(queue.filled, jnp.ones((batch,), bool)),
        ptr=jnp.where(write, (queue.ptr + batch) % size, queue.ptr).astype(jnp.int32),
    )


def shards_over(size: int, num_devices: int) -> bool:
    """Whether a queue of `size` slots is sharded over a mesh of `num_devices` (n > 1 dividing S)."""
    return num_devices > 1 and size % num_devices == 0


def partition_specs(axis: str = "data") -> NNQueue:
    """PartitionSpecs of a sharded queue: every slot array split along `axis`, ptr replicated."""
    slots = PartitionSpec(axis)
    return NNQueue(imu=slots, text=slots, video=slots, has_text=slots, has_video=slots, filled=slots,
                   ptr=PartitionSpec())


def shardings(queue: NNQueue, mesh: Mesh, axis: str = "data") -> NNQueue:
    """NamedShardings of `queue` on `mesh`: `partition_specs` when `shards_over`, else replicated."""
    if shards_over(queue.size, mesh.shape[axis]):
        return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), partition_specs(axis))
    return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, PartitionSpec()), queue)


def _nearest_scored(query: jax.Array, buffer: jax.Array, eligible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(score, index), each (B,): the best eligible cosine of each of B query rows against S stored
    unit rows and its slot, argmax_j {C_bj : E_j}; score -inf (index 0) where no slot is eligible."""
    similarity = jnp.where(eligible[None, :], l2_normalize(query) @ buffer.T, -jnp.inf)
    return jnp.max(similarity, axis=1), jnp.argmax(similarity, axis=1).astype(jnp.int32)


def _scored_if_needed(needed: jax.Array, query: jax.Array, buffer: jax.Array, eligible: jax.Array):
    """`_nearest_scored`, or (-inf, 0) for every row (skipping the matmul) when no entry of `needed` is True."""
    rows = query.shape[0]
    return jax.lax.cond(
        jnp.any(needed),
        lambda: _nearest_scored(query, buffer, eligible),
        lambda: (jnp.full((rows,), -jnp.inf, query.dtype), jnp.zeros((rows,), jnp.int32)),
    )


def lookup_sharded(queue: NNQueue, imu, text, video, has_text, has_video, mesh: Mesh,
                   retrieve_by: str = "auto", axis: str = "data") -> dict[str, jax.Array]:
    """`lookup` for a queue sharded along `axis` (`partition_specs`) and a batch sharded along it.

    Each of the n devices holds s = S/n slots and b = B/n query rows. Device c gathers the B query
    rows of every modality it needs, (B, D), and finds each row's best eligible local slot, its
    cosine m_c and slot j_c (a (B, s) matmul: the look-up's FLOPs split n ways, its memory B x s).
    The global arg-max is then M = pmax_c m_c and the winner c* = min{c : m_c = M} (so ties go to
    the lowest global slot c s + j, as `lookup`'s arg-max over the concatenated shards would). The
    winner contributes its row, the others zeros, and a reduce-scatter sums them into each device's
    own b rows. Returns `lookup`'s dict, sharded along `axis`, with "index" the global slot c* s + j.
    """
    if retrieve_by not in RETRIEVAL_MODES:
        raise ValueError(f"retrieve_by must be one of {RETRIEVAL_MODES}, got {retrieve_by!r}.")
    num_devices = mesh.shape[axis]
    if not shards_over(queue.size, num_devices):
        raise ValueError(f"lookup_sharded: a queue of {queue.size} slots does not shard over {num_devices} devices.")
    if imu.shape[0] % num_devices:
        raise ValueError(f"lookup_sharded: a batch of {imu.shape[0]} does not split over {num_devices} devices.")
    _require_batch(queue, imu, text, video, has_text, has_video, "lookup")
    slots = queue.size // num_devices

    def local(q: NNQueue, imu, text, video, has_text, has_video):
        gather = lambda x: jax.lax.all_gather(x, axis, tiled=True)
        if retrieve_by == "imu":
            score, index = _nearest_scored(gather(imu), q.imu, q.filled)
        else:
            all_text, all_video = gather(has_text), gather(has_video)
            by_video = all_video
            by_text = all_text & ~all_video
            by_imu = ~(by_video | by_text)
            video_score, video_index = _scored_if_needed(by_video, gather(video), q.video, q.filled & q.has_video)
            text_score, text_index = _scored_if_needed(by_text, gather(text), q.text, q.filled & q.has_text)
            imu_score, imu_index = _scored_if_needed(by_imu, gather(imu), q.imu, q.filled)
            score = jnp.where(by_video, video_score, jnp.where(by_text, text_score, imu_score))
            index = jnp.where(by_video, video_index, jnp.where(by_text, text_index, imu_index))
        device = jax.lax.axis_index(axis)
        best = jax.lax.pmax(score, axis)
        winner = jax.lax.pmin(jnp.where(score == best, device, num_devices), axis)
        mine = (best > -jnp.inf) & (winner == device)

        def own(values):  # (B, ...) values of the winners -> this device's (b, ...) rows
            values = jnp.where(mine.reshape((-1,) + (1,) * (values.ndim - 1)), values, jnp.zeros_like(values))
            return jax.lax.psum_scatter(values, axis, scatter_dimension=0, tiled=True)

        own_rows = lambda slot_rows: own(slot_rows[index])

        batch = imu.shape[0]
        return {
            "imu": own_rows(q.imu),
            "text": own_rows(q.text),
            "video": own_rows(q.video),
            "has_text": own_rows(q.has_text.astype(jnp.int32)) > 0,
            "has_video": own_rows(q.has_video.astype(jnp.int32)) > 0,
            "valid": jax.lax.dynamic_slice_in_dim(best > -jnp.inf, device * batch, batch),
            "index": own(winner * slots + index),
        }

    rows = PartitionSpec(axis)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(partition_specs(axis), rows, rows, rows, rows, rows),
        out_specs={k: rows for k in ("imu", "text", "video", "has_text", "has_video", "valid", "index")},
        check_vma=False,
    )(queue, *(jax.lax.stop_gradient(x) for x in (imu, text, video)), has_text, has_video)


def enqueue_sharded(queue: NNQueue, imu, text, video, has_text, has_video, mesh: Mesh,
                    write: jax.Array | bool = True, axis: str = "data") -> NNQueue:
    """`enqueue` for a queue and a batch sharded along `axis`: each of the n devices writes its own
    b = B/n rows into its own ring of s = S/n slots, all at the same ptr (advanced by min(b, s) mod s).
    Where b > s a device writes its last s rows (the first b - s would be overwritten in the same write).
    """
    num_devices = mesh.shape[axis]
    if not shards_over(queue.size, num_devices):
        raise ValueError(f"enqueue_sharded: a queue of {queue.size} slots does not shard over {num_devices} devices.")
    if imu.shape[0] % num_devices:
        raise ValueError(f"enqueue_sharded: a batch of {imu.shape[0]} does not split over {num_devices} devices.")
    _require_batch(queue, imu, text, video, has_text, has_video, "enqueue")
    kept = min(imu.shape[0], queue.size) // num_devices

    def local(q: NNQueue, write, *rows):
        return enqueue(q, *(r[-kept:] for r in rows), write=write)

    rows = PartitionSpec(axis)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(partition_specs(axis), PartitionSpec()) + (rows,) * 5,
        out_specs=partition_specs(axis), check_vma=False,
    )(queue, jnp.asarray(write), imu, text, video, has_text, has_video)
