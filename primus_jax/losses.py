"""Contrastive losses and the PRIMUS objective (SS + MM + NN terms).

info_nce is the symmetric in-batch InfoNCE of the reference; primus_objective combines
the augmentation-invariance term L_SS, the multimodal alignment terms L_MM (IMU<->text,
IMU<->video) and the nearest-neighbour terms L_NN with the weight alpha:

    L = (1-alpha)(L_MM,t + L_MM,v) + alpha L_SS + (1-alpha)(L_NN,t + L_NN,v) + alpha L_NN,ss.

Two learnable temperatures: tau_mm for every IMU<->text/video term (NN ones included) and
tau_ss for L_SS and L_NN,ss.
"""
import dataclasses
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

INITIAL_TEMPERATURE = 0.1


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Rows scaled to unit L2 norm: x / max(||x||, eps), along the last axis.

    Zero rows stay zero, and the gradient is finite there (the max selects the constant eps).
    """
    squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(w * v) / sum(w), and 0 when sum(w) = 0 (with zero, finite gradients)."""
    total_weight = jnp.sum(weights)
    safe_total = jnp.where(total_weight > 0, total_weight, 1.0)
    return jnp.sum(weights * values) / safe_total


def info_nce(
    query: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    mask: Optional[jax.Array] = None,
    groups: int = 1,
) -> jax.Array:
    """Symmetric InfoNCE with in-batch negatives, a scalar.

    query, key: (B, D), L2-normalised here. S = q k^T / tau, (B, B); the positive of row i
    (and of column i) is the diagonal entry S_ii. With
        row_i = logsumexp_j S_ij - S_ii   and   col_j = logsumexp_i S_ij - S_jj,
    loss = sum_i m_i row_i / sum_i m_i + sum_j m_j col_j / sum_j m_j,
    the sum of both cross-entropy directions, each averaged over the unmasked samples
    (mask m: (B,) bool or float, default all ones). Masked samples still appear in every
    logsumexp, i.e. they remain negatives for the others. A fully masked batch gives 0 with
    zero (finite) gradients. For unrelated inputs the loss is about 2 ln B (chance level).

    groups > 1 bounds the negatives: the batch is cut into `groups` consecutive blocks of
    m = B / groups rows, S becomes (groups, m, m) block-diagonal logits, and each sample's
    negatives are the m - 1 others of its block; the two masked means are still over all B
    samples. On a mesh of n devices, groups = n gives each device its own rows as negatives (the
    reference's per-GPU batches), and the logits cost B m instead of B^2.
    """
    if query.ndim != 2 or query.shape != key.shape:
        raise ValueError(
            f"info_nce needs query and key of the same shape (B, D), got {tuple(query.shape)} "
            f"and {tuple(key.shape)}."
        )
    if groups < 1 or query.shape[0] % groups:
        raise ValueError(f"info_nce: a batch of {query.shape[0]} does not split into {groups} groups of negatives.")
    if groups == 1:
        logits = l2_normalize(query) @ l2_normalize(key).T / temperature
        positives = jnp.diagonal(logits)
        row_losses = jax.nn.logsumexp(logits, axis=1) - positives
        column_losses = jax.nn.logsumexp(logits, axis=0) - positives
    else:
        blocks = lambda x: l2_normalize(x).reshape(groups, -1, x.shape[-1])
        logits = jnp.einsum("gid,gjd->gij", blocks(query), blocks(key)) / temperature
        positives = jnp.diagonal(logits, axis1=1, axis2=2)
        row_losses = (jax.nn.logsumexp(logits, axis=2) - positives).reshape(-1)
        column_losses = (jax.nn.logsumexp(logits, axis=1) - positives).reshape(-1)
    weights = jnp.ones(query.shape[0], logits.dtype) if mask is None else mask.astype(logits.dtype)
    return _masked_mean(row_losses, weights) + _masked_mean(column_losses, weights)


def init_temperature_params(init: float = INITIAL_TEMPERATURE) -> dict[str, jax.Array]:
    """Learnable temperatures as logs: {"log_mm": log(init), "log_ss": log(init)}, float32 scalars.

    The reference divides the logits by a raw, unconstrained tau that Adam may push through 0;
    we learn log tau instead so that tau = exp(log tau) > 0 always (a deliberate fix).
    """
    if init <= 0:
        raise ValueError(f"initial temperature must be positive, got {init}.")
    log_init = jnp.log(jnp.asarray(init, jnp.float32))
    return {"log_mm": log_init, "log_ss": log_init}


def temperatures(params: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """{"mm": exp(log_mm), "ss": exp(log_ss)} from init_temperature_params-shaped params."""
    return {"mm": jnp.exp(params["log_mm"]), "ss": jnp.exp(params["log_ss"])}


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Weights and switches of the PRIMUS objective.

    alpha weights the IMU-only terms (L_SS, L_NN,ss) and 1 - alpha the multimodal ones.
    A switched-off term is not computed and contributes 0. use_nn gates the three NN terms,
    and each NN term also follows its base switch: L_NN,t needs use_mm_text, L_NN,v needs
    use_mm_video, L_NN,ss needs use_ss. Examples: PRIMUS = defaults; SimCLR-like =
    alpha 1, use_mm_text = use_mm_video = use_nn = False; IMU2CLIP-like = alpha 0,
    use_ss = use_nn = False. negative_groups: `info_nce`'s groups for every term (1: the negatives
    are the whole global batch).
    """

    alpha: float = 0.5
    use_ss: bool = True
    use_mm_text: bool = True
    use_mm_video: bool = True
    use_nn: bool = True
    negative_groups: int = 1


TERM_NAMES = ("ss", "mm_text", "mm_video", "nn_text", "nn_video", "nn_ss")


def _require_keys(mapping: Optional[Mapping], keys: tuple, argument: str) -> None:
    """Raise ValueError naming the argument and the first missing key."""
    if mapping is None:
        raise ValueError(f"primus_objective: {argument} is None but the config needs it.")
    for name in keys:
        if name not in mapping:
            raise ValueError(f"primus_objective: {argument} has no key {name!r} (keys: {sorted(mapping)}).")


def primus_objective(
    view0: Mapping[str, jax.Array],
    view1: Mapping[str, jax.Array],
    targets: Mapping[str, jax.Array],
    neighbours: Optional[Mapping[str, jax.Array]],
    temperatures: Mapping[str, jax.Array],
    cfg: ObjectiveConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The PRIMUS loss and its unweighted terms.

    view0, view1: encoder outputs {"emb", "ssl", "mmcl"}, each (B, .); view0 encodes the raw
    window, view1 its augmentation. targets: {"text_emb": (B, Dt), "has_text": (B,) bool,
    "video_emb": (B, Dv), "has_video": (B,) bool}, frozen embeddings. neighbours: the dict of
    queue.lookup ({"imu", "text", "video", "has_text", "has_video", "valid", ...}), or None when
    cfg.use_nn is False. temperatures: {"mm": tau_mm, "ss": tau_ss}.

        L_SS    = NCE_ss(ssl0, ssl1)
        L_MM,t  = NCE_mm(mmcl0, text,         mask = has_text)
        L_MM,v  = NCE_mm(mmcl0, video,        mask = has_video)
        L_NN,t  = NCE_mm(mmcl0, nn.text,      mask = nn.valid & nn.has_text)
        L_NN,v  = NCE_mm(mmcl0, nn.video,     mask = nn.valid & nn.has_video)
        L_NN,ss = NCE_ss(ssl0,  nn.imu,       mask = nn.valid)
        L = (1-a)(L_MM,t + L_MM,v) + a L_SS + (1-a)(L_NN,t + L_NN,v) + a L_NN,ss

    Returns (L, metrics) with metrics {"loss", "ss", "mm_text", "mm_video", "nn_text",
    "nn_video", "nn_ss", "tau_mm", "tau_ss"}; switched-off terms read 0.
    """
    alpha = cfg.alpha
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ObjectiveConfig.alpha must lie in [0, 1], got {alpha}.")
    use_nn_text = cfg.use_nn and cfg.use_mm_text
    use_nn_video = cfg.use_nn and cfg.use_mm_video
    use_nn_ss = cfg.use_nn and cfg.use_ss
    _require_keys(view0, ("ssl", "mmcl"), "view0")
    if cfg.use_ss:
        _require_keys(view1, ("ssl",), "view1")
    target_keys = ()
    if cfg.use_mm_text:
        target_keys += ("text_emb", "has_text")
    if cfg.use_mm_video:
        target_keys += ("video_emb", "has_video")
    if target_keys:
        _require_keys(targets, target_keys, "targets")
    if cfg.use_nn:
        _require_keys(neighbours, ("imu", "text", "video", "has_text", "has_video", "valid"), "neighbours")
    _require_keys(temperatures, ("mm", "ss"), "temperatures")

    tau_mm, tau_ss = temperatures["mm"], temperatures["ss"]
    groups = cfg.negative_groups
    ssl0, mmcl0 = view0["ssl"], view0["mmcl"]
    zero = jnp.zeros((), jnp.float32)
    terms = dict.fromkeys(TERM_NAMES, zero)
    if cfg.use_ss:
        terms["ss"] = info_nce(ssl0, view1["ssl"], tau_ss, groups=groups)
    if cfg.use_mm_text:
        terms["mm_text"] = info_nce(mmcl0, targets["text_emb"], tau_mm, targets["has_text"], groups=groups)
    if cfg.use_mm_video:
        terms["mm_video"] = info_nce(mmcl0, targets["video_emb"], tau_mm, targets["has_video"], groups=groups)
    if use_nn_text:
        nn_text_mask = neighbours["valid"] & neighbours["has_text"]
        terms["nn_text"] = info_nce(mmcl0, neighbours["text"], tau_mm, nn_text_mask, groups=groups)
    if use_nn_video:
        nn_video_mask = neighbours["valid"] & neighbours["has_video"]
        terms["nn_video"] = info_nce(mmcl0, neighbours["video"], tau_mm, nn_video_mask, groups=groups)
    if use_nn_ss:
        terms["nn_ss"] = info_nce(ssl0, neighbours["imu"], tau_ss, neighbours["valid"], groups=groups)

    multimodal = terms["mm_text"] + terms["mm_video"] + terms["nn_text"] + terms["nn_video"]
    loss = (1.0 - alpha) * multimodal + alpha * (terms["ss"] + terms["nn_ss"])
    metrics = {"loss": loss, **terms, "tau_mm": tau_mm, "tau_ss": tau_ss}
    return loss, metrics
