"""Device-resident nearest-neighbour queue for the L_NN terms.

Three index-aligned ring buffers of S slots hold, per past sample, its IMU ssl feature
(detached), its frozen text embedding and its frozen video embedding, all L2-normalised,
with flags saying which slots are filled and which have text / video. The queue lives in
the train state: lookup and enqueue are pure, jittable functions of it.

Each step the train step first looks up every sample's nearest neighbour among the stored
slots, then enqueues the batch (the reference's order).
"""
import jax
import jax.numpy as jnp
from flax import struct

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
