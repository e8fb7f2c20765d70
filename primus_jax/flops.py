"""Analytic FLOP count of the encoder and of the PRIMUS train step, the same on every backend.

XLA's cost analysis of a *compiled* program depends on the backend: on GPU it omits the matmuls
that run in cuBLAS/cuDNN, and on every backend a rolled loop's body is counted once, whatever its
trip count. The count here is written from the shapes instead. It counts matrix-multiply-like
work only (convolutions, dense layers, the pooling matmul, similarity matmuls), at 2 FLOPs per
multiply-add, which is the convention of model FLOP utilisation (MFU): the elementwise work
(normalisation, pools, GRU gates, Adam) is a few per cent of the step and runs at memory speed,
not at the matmul peak.

Encoder forward, per window, with T samples, C = conv_channels, k = (10, 5, 5), L_1..L_5 the
lengths of `models.conv_stack_lengths(T)`, P = pooled_length, H = hidden_dim:

    conv1          2 L_1 C (6 k_1)          (L_1, 6 k_1) x (6 k_1, C)
    conv2          2 L_3 C (C k_2)
    conv3          2 L_5 C (C k_3)
    adaptive pool  2 L_5 P C                (C, L_5) x (L_5, P), a constant matrix
    GRU input      2 S D (3H)               S steps of (1, D) x (D, 3H), the input projection
    GRU hidden     2 (S - 1) H (3H)         S - 1 steps of (1, H) x (H, 3H) (h_0 = 0: step 1 has none)
    heads          2 H (ssl_dim + mm_dim)

with (S, D) = (C, P) for gru_over="channels" (the reference steps over the conv channels) and
(P, C) for "time". GroupNorm and the max-pools have no matmul and count 0.

Backward: each matmul's reverse pass costs one forward-sized matmul per operand that needs a
cotangent. Every encoder matmul but conv1 has a weight and an input that depends on parameters,
so it costs 2x its forward; the adaptive pool's matrix is constant, so it costs 1x. conv1's
input is the normalised data times the input GroupNorm's trained scale plus its bias, and its
VJP (`ops.affine_dilated_conv1d`) gets those params' gradients from the kernel gradient
without a convolution into the input, so conv1 costs 1x too. The GRU's hidden backward
(the custom VJP of `ops.gru_recurrence`) is S - 1 matmuls for dh_{t-1}, t = 2..S (h_0 is a
constant), plus S - 1 (H, B) x (B, 3H) matmuls accumulating dW_hh: 2x its forward too.

Step, for a global batch B (the encoder runs on 2B windows, both views), D_e = embedding width:

    encoder        2B x (forward + backward) per window
    info_nce       2 B M D_e per term (q k^T), M = B / objective.negative_groups the keys each
                   query meets (B by default); backward 2x for L_SS (both sides are encoder
                   outputs), 1x for the other terms (the key is a fixed target or neighbour)
    NN look-up     2 B Q D per similarity matmul against a queue of Q slots; no backward
                   (stop_gradient). nn_retrieve_by="imu" runs one; "auto" runs one per modality
                   that some sample of the batch retrieves by (`queue.lookup`'s lax.cond): one
                   (video) when every sample has video, as in the benchmark's batches, at most
                   three, which is what XLA's cost analysis counts (a conditional costs its
                   costliest branch)
"""
from __future__ import annotations

import dataclasses

import ml_collections

from primus_jax import models

INFO_NCE_TERMS = ("ss", "mm_text", "mm_video", "nn_text", "nn_video", "nn_ss")
LOOKUP_MODALITIES = ("video", "text", "imu")


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one train step (or eval step: backward terms are then 0), split by part."""

    encoder_forward: float
    encoder_backward: float
    loss_forward: float
    loss_backward: float
    lookup: float

    @property
    def total(self) -> float:
        return self.encoder_forward + self.encoder_backward + self.loss_forward + self.loss_backward + self.lookup


def encoder_layer_flops(model_config: ml_collections.ConfigDict, window_length: int) -> dict[str, tuple[float, int]]:
    """{layer: (forward FLOPs per window, backward multiplier)} of the encoder (module docstring)."""
    c, p, h = model_config.conv_channels, model_config.pooled_length, model_config.hidden_dim
    l1, _, l3, _, l5, _ = models.conv_stack_lengths(window_length)
    k1, k2, k3 = models.CONV_KERNELS
    steps, features = (c, p) if model_config.gru_over == "channels" else (p, c)
    return {
        "conv1": (2.0 * l1 * c * models.INPUT_CHANNELS * k1, 1),
        "conv2": (2.0 * l3 * c * c * k2, 2),
        "conv3": (2.0 * l5 * c * c * k3, 2),
        "adaptive_pool": (2.0 * l5 * p * c, 1),
        "gru_input": (2.0 * steps * features * 3 * h, 2),
        "gru_hidden": (2.0 * (steps - 1) * h * 3 * h, 2),
        "heads": (2.0 * h * (model_config.ssl_dim + model_config.mm_dim), 2),
    }


def encoder_flops(model_config: ml_collections.ConfigDict, window_length: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of the encoder per window."""
    layers = encoder_layer_flops(model_config, window_length).values()
    return sum(f for f, _ in layers), sum(f * m for f, m in layers)


def active_info_nce_terms(config: ml_collections.ConfigDict, text_dim: int, video_dim: int) -> tuple[str, ...]:
    """The info_nce terms the objective computes (`losses.primus_objective`'s switches)."""
    obj = config.objective
    use_text = obj.use_mm_text and text_dim > 0
    use_video = obj.use_mm_video and video_dim > 0
    active = {"ss": obj.use_ss, "mm_text": use_text, "mm_video": use_video, "nn_text": obj.use_nn and use_text,
              "nn_video": obj.use_nn and use_video, "nn_ss": obj.use_nn and obj.use_ss}
    return tuple(name for name in INFO_NCE_TERMS if active[name])


def step_flops(config: ml_collections.ConfigDict, window_length: int, text_dim: int, video_dim: int,
               backward: bool = True, lookup_modalities: tuple[str, ...] = LOOKUP_MODALITIES) -> StepFlops:
    """FLOPs of one train step (backward=True) or eval step at config.train.global_batch_size.

    lookup_modalities: the modalities whose similarity matmul nn_retrieve_by="auto" runs for the
    batch, i.e. those some sample retrieves by (default all three, the most a step runs; a batch
    in which every sample has video: ("video",)). nn_retrieve_by="imu" always runs the IMU one.
    """
    b = config.train.global_batch_size
    forward, reverse = encoder_flops(config.model, window_length)
    terms = active_info_nce_terms(config, text_dim, video_dim)
    # Every term's two sides have the head width: ssl_dim for the IMU-only terms, mm_dim otherwise.
    widths = {t: config.model.ssl_dim if t in ("ss", "nn_ss") else config.model.mm_dim for t in terms}
    negatives = b // config.objective.get("negative_groups", 1)  # keys each query meets
    loss_forward = sum(2.0 * b * negatives * widths[t] for t in terms)
    loss_backward = sum(2.0 * b * negatives * widths[t] * (2 if t == "ss" else 1) for t in terms)
    lookup = 0.0
    if config.objective.use_nn:
        unknown = set(lookup_modalities) - set(LOOKUP_MODALITIES)
        if unknown:
            raise ValueError(f"lookup_modalities must be among {LOOKUP_MODALITIES}, got {sorted(unknown)}")
        width = {"video": config.model.mm_dim, "text": config.model.mm_dim, "imu": config.model.ssl_dim}
        modalities = set(lookup_modalities) if config.objective.nn_retrieve_by == "auto" else {"imu"}
        lookup = sum(2.0 * b * config.queue.size * width[m] for m in modalities)
    return StepFlops(
        encoder_forward=2 * b * forward,
        encoder_backward=2 * b * reverse if backward else 0.0,
        loss_forward=loss_forward,
        loss_backward=loss_backward if backward else 0.0,
        lookup=lookup,
    )
