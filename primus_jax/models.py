"""The PRIMUS IMU encoder (the reference's MW2StackRNNPoolingMultihead) in Flax linen.

Shapes are channels-last: an IMU batch x is (B, T, 6) float32, acc x,y,z (m/s^2) then gyro x,y,z
(rad/s). With the defaults the encoder is, layer by layer (L_k are the lengths of
`conv_stack_lengths`):

    GroupNorm(2 groups, 6 ch)         (B, T, 6)       per-sample standardisation of each triplet
    Conv1d 6->32, k10, dil 2, VALID   (B, L_1, 32)    L_1 = T - 18
    MaxPool(3, 3), floor              (B, L_2, 32)    L_2 = floor(L_1 / 3)
    Conv1d 32->32, k5, dil 2          (B, L_3, 32)    L_3 = L_2 - 8
    MaxPool(3, 3)                     (B, L_4, 32)    L_4 = floor(L_3 / 3)
    Conv1d 32->32, k5, dil 2          (B, L_5, 32)    L_5 = L_4 - 8
    AdaptiveAvgPool(32)               (B, 32, 32)     torch's windows, see `adaptive_avg_pool_matrix`
    GroupNorm(4 groups, 32 ch)        (B, 32, 32)
    GRU(512), h_0 = 0                 emb (B, 512)    final hidden state
    ssl = Dense(512)(emb), mmcl = Dense(512)(emb)

No activations sit between the layers (the max-pools are the only nonlinearity before the GRU),
no dropout, no BatchNorm. The convolutions have no bias.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from primus_jax import ops

INPUT_CHANNELS = 6
"""acc x,y,z then gyro x,y,z."""

CONV_KERNELS = (10, 5, 5)
CONV_DILATION = 2
POOL_SIZE = 3
POOLED_LENGTH = 32
"""Output length of the adaptive average pool in the reference."""
GRU_OVER_CHOICES = ("channels", "time")
CONV_IMPL_CHOICES = ("auto", "xla", "matmul")
GRU_UNROLL_BY_BACKEND = {"cpu": 1}
"""Default lax.scan unroll of the GRU loops per backend; other backends unroll fully (True)."""


def torch_uniform(bound: float):
    """Initializer drawing U(-bound, bound), the shape of torch's default layer initialisation."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv_output_length(length: int, kernel: int) -> int:
    return length - CONV_DILATION * (kernel - 1)


def conv_stack_lengths(T: int) -> list[int]:
    """Sequence lengths after conv1, pool1, conv2, pool2, conv3 and the adaptive pool.

    A dilated VALID conv of kernel k shortens L to L - 2(k - 1); MaxPool(3, 3) maps L to
    floor(L / 3); the adaptive pool always gives 32. T=250 gives [232, 77, 69, 23, 15, 32].
    """
    conv1 = _conv_output_length(T, CONV_KERNELS[0])
    pool1 = conv1 // POOL_SIZE
    conv2 = _conv_output_length(pool1, CONV_KERNELS[1])
    pool2 = conv2 // POOL_SIZE
    conv3 = _conv_output_length(pool2, CONV_KERNELS[2])
    return [conv1, pool1, conv2, pool2, conv3, POOLED_LENGTH]


def min_input_length() -> int:
    """Smallest T for which every conv and pool length of `conv_stack_lengths(T)` is >= 1 (123)."""
    length = 1
    for kernel in reversed(CONV_KERNELS[1:]):
        length = POOL_SIZE * (length + CONV_DILATION * (kernel - 1))
    return length + CONV_DILATION * (CONV_KERNELS[0] - 1)


def adaptive_avg_pool_matrix(in_length: int, out_length: int) -> np.ndarray:
    """(in_length, out_length) matrix A with x @ A equal to torch's AdaptiveAvgPool1d(out_length).

    Output bin i averages the inputs in [floor(i * L / n), ceil((i + 1) * L / n)), L = in_length,
    n = out_length. Windows overlap when L is not a multiple of n, and each input is repeated
    when L < n (upsampling: T=250 pools 15 -> 32).
    """
    matrix = np.zeros((in_length, out_length), np.float32)
    for i in range(out_length):
        start = (i * in_length) // out_length
        end = -((-(i + 1) * in_length) // out_length)
        matrix[start:end, i] = 1.0 / (end - start)
    return matrix


def count_params(params) -> int:
    """Total number of scalars in a pytree of parameters (e.g. the "params" collection)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def resolve_conv_impl(conv_impl: str, backend: str) -> str:
    """"xla" or "matmul" for `conv_impl` in CONV_IMPL_CHOICES; "auto" picks by backend.

    "auto" is "xla" (lax.conv_general_dilated, as nn.Conv) on CPU, where XLA's convolution was
    faster, and "matmul" (`ops.dilated_conv1d_matmul`) on GPU and TPU, where XLA's convolution path is
    slow for these narrow dilated 1-D convolutions (docs/design.md §1).
    """
    if conv_impl not in CONV_IMPL_CHOICES:
        raise ValueError(f"IMUEncoder.conv_impl must be one of {CONV_IMPL_CHOICES}, got {conv_impl!r}")
    if conv_impl == "auto":
        return "xla" if backend == "cpu" else "matmul"
    return conv_impl


def formulation_for_platform(platform: str) -> dict:
    """{"conv_impl", "gru_unroll"} of the encoder compiled for devices of `platform` ("cpu", "gpu", "tpu").

    The platform is that of the devices the step is compiled *for* (a mesh over TPU topology devices
    compiles the TPU formulation on a CPU-only machine): "xla" convolutions and a rolled GRU loop
    (unroll 1) on CPU; im2col matmuls and a fully unrolled GRU (True) on GPU and TPU. Both give the
    same numbers up to float rounding.
    """
    return {"conv_impl": resolve_conv_impl("auto", platform), "gru_unroll": GRU_UNROLL_BY_BACKEND.get(platform, True)}


class InputGroupNorm(nn.Module):
    """torch's GroupNorm(num_groups, C) on (B, T, C), split: returns (x_hat, (scale, bias)).

    x_hat is the float32 normalisation (each sample's channel group to mean 0, variance 1, with
    epsilon); the affine step x_hat * scale + bias is left to conv1 (`ops.affine_dilated_conv1d`), so
    that the backward pass needs no input gradient of conv1. Params `scale` (C,) = 1 and
    `bias` (C,) = 0 at init, named as nn.GroupNorm's.
    """

    num_groups: int
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        x_hat = nn.GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon, use_scale=False, use_bias=False)(x)
        return x_hat.astype(jnp.float32), (scale, bias)


class DilatedConv1D(nn.Module):
    """torch's Conv1d(C_in, features, kernel_size, dilation, bias=False) on channels-last (B, L, C_in).

    Param `kernel` (kernel_size, C_in, features), as nn.Conv's, initialised U(+-1/sqrt(C_in k)).
    impl: see `resolve_conv_impl`; both give the same numbers up to float rounding.
    """

    features: int
    kernel_size: int
    dilation: int
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, input_affine=None):
        """conv(x), or conv(x * scale + bias) for input_affine = (scale, bias) (`ops.affine_dilated_conv1d`)."""
        fan_in = x.shape[-1] * self.kernel_size
        kernel = self.param(
            "kernel", torch_uniform(1.0 / np.sqrt(fan_in)), (self.kernel_size, x.shape[-1], self.features)
        )
        impl = resolve_conv_impl(self.impl, jax.default_backend())
        if input_affine is not None:
            scale, bias = input_affine
            return ops.affine_dilated_conv1d(x, scale, bias, kernel, self.dilation, impl, jnp.dtype(self.dtype).name)
        return ops.dilated_conv1d(x.astype(self.dtype), kernel.astype(self.dtype), self.dilation, impl)


class GRUWeights(nn.Module):
    """One of torch's GRU weight pairs: kernel (in_features, 3 hidden_dim) and bias (3 hidden_dim,).

    Initialised U(+-1/sqrt(hidden_dim)) like torch's; `__call__(in_features)` returns (kernel, bias).
    """

    hidden_dim: int

    @nn.compact
    def __call__(self, in_features: int):
        init = torch_uniform(1.0 / np.sqrt(self.hidden_dim))
        kernel = self.param("kernel", init, (in_features, 3 * self.hidden_dim))
        return kernel, self.param("bias", init, (3 * self.hidden_dim,))


class TorchGRU(nn.Module):
    """Single-layer unidirectional GRU, h_0 = 0, returning the final hidden state (B, H) float32.

    Input time-major (S, B, D); `ops.gru_recurrence` runs it. Params `input_proj` (kernel (D, 3H) =
    W_ih^T, bias (3H,) = b_ih) and `cell` (kernel (H, 3H) = W_hh^T, bias (3H,) = b_hh). Keeping
    both bias vectors (Flax's nn.GRUCell folds b_hr, b_hz into the input biases) gives exactly
    torch's parameter count, 3H(D + H + 2), and a one-to-one weight import.
    unroll None takes GRU_UNROLL_BY_BACKEND for the backend at trace time: a rolled loop on CPU,
    where it measured faster per train step than a fully unrolled one (docs/design.md §1),
    full unrolling elsewhere. XLA's cost analysis counts a rolled loop's body once, so on CPU the
    compiled step's FLOP count includes one of the loop's S - 1 steps (forward and backward).
    """

    hidden_dim: int
    dtype: Any = jnp.float32
    unroll: int | None = None

    @nn.compact
    def __call__(self, inputs):
        input_kernel, input_bias = GRUWeights(self.hidden_dim, name="input_proj")(inputs.shape[-1])
        kernel, bias = GRUWeights(self.hidden_dim, name="cell")(self.hidden_dim)
        unroll = GRU_UNROLL_BY_BACKEND.get(jax.default_backend(), True) if self.unroll is None else self.unroll
        return ops.gru_recurrence(inputs, input_kernel, input_bias, kernel, bias, self.dtype, unroll)


class IMUEncoder(nn.Module):
    """PRIMUS IMU encoder; `IMUEncoder()` is the reference model (1,376,204 parameters).

    `__call__(x)` maps x (B, T, 6) float32 with T >= `min_input_length()` to float32
    {"emb": (B, hidden_dim), "ssl": (B, ssl_dim), "mmcl": (B, mm_dim)}.

    gru_over: "channels" reproduces the reference quirk: torch feeds the (B, C=32, L=32) conv
    output to a batch-first GRU without transposing, so the recurrence steps over the conv
    channels and step c sees channel c's pooled time bins (a pooled_length vector). "time" is the
    time-major variant: steps over the pooled time bins, each a conv_channels vector.
    dtype: compute dtype of the activations and matmuls (e.g. jnp.bfloat16); params are float32,
    normalisation statistics, GRU gates and the returned outputs are float32.
    Initialisation follows torch's defaults: conv U(+-1/sqrt(C_in k)); GRU weights and biases
    U(+-1/sqrt(hidden_dim)); head weights and biases U(+-1/sqrt(hidden_dim)) (their fan-in);
    GroupNorm scale 1, bias 0.
    conv_impl: how the three convolutions are computed: "auto" (by backend), "xla" or "matmul",
    see `resolve_conv_impl`; the params and the numbers are the same for each.
    gru_unroll: lax.scan unroll of the GRU's loops; None takes the backend's default (`TorchGRU`).
    Methods `conv_features` and `embed` give the two halves of the encoder (benchmarks time them).
    """

    hidden_dim: int = 512
    conv_channels: int = 32
    pooled_length: int = POOLED_LENGTH
    ssl_dim: int = 512
    mm_dim: int = 512
    gru_over: str = "channels"
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    gru_unroll: int | None = None

    def setup(self):
        # torch's GroupNorm on (B, C, T) normalises each group over (C/G x T): on channels-last
        # Flax's GroupNorm reduces over every non-batch axis within a channel group, the same set.
        self.input_norm = InputGroupNorm(num_groups=2, epsilon=1e-5)
        self.conv1, self.conv2, self.conv3 = (
            DilatedConv1D(self.conv_channels, kernel, CONV_DILATION, self.conv_impl, self.dtype)
            for kernel in CONV_KERNELS
        )
        self.feature_norm = nn.GroupNorm(num_groups=4, epsilon=1e-5, dtype=self.dtype)
        self.gru = TorchGRU(self.hidden_dim, self.dtype, self.gru_unroll)
        bound = 1.0 / np.sqrt(self.hidden_dim)
        self.ssl_head, self.mmcl_head = (
            nn.Dense(features, dtype=self.dtype, kernel_init=torch_uniform(bound), bias_init=torch_uniform(bound))
            for features in (self.ssl_dim, self.mm_dim)
        )

    def conv_features(self, x):
        """The convolutional stack, GroupNorm .. feature_norm: x (B, T, 6) -> (B, pooled_length, C)."""
        if x.ndim != 3 or x.shape[-1] != INPUT_CHANNELS:
            raise ValueError(f"IMUEncoder expects IMU windows of shape (B, T, {INPUT_CHANNELS}), got {x.shape}")
        if x.shape[1] < min_input_length():
            raise ValueError(
                f"IMUEncoder needs at least {min_input_length()} time steps per window, got {x.shape[1]}"
            )
        x_hat, input_affine = self.input_norm(x)
        x = ops.max_pool_floor(self.conv1(x_hat, input_affine), POOL_SIZE)
        x = ops.max_pool_floor(self.conv2(x), POOL_SIZE)
        x = self.conv3(x)
        pool = jnp.asarray(adaptive_avg_pool_matrix(x.shape[1], self.pooled_length), self.dtype)
        return self.feature_norm(jnp.einsum("blc,lp->bpc", x, pool))

    def embed(self, features):
        """The GRU's final hidden state (B, hidden_dim) of `conv_features`' output (B, L, C)."""
        if self.gru_over not in GRU_OVER_CHOICES:
            raise ValueError(f"IMUEncoder.gru_over must be one of {GRU_OVER_CHOICES}, got {self.gru_over!r}")
        # Time-major steps (S, B, D): over the channels, step c is channel c's pooled bins.
        return self.gru(jnp.transpose(features, (2, 0, 1) if self.gru_over == "channels" else (1, 0, 2)))

    def __call__(self, x):
        emb = self.embed(self.conv_features(x))
        return {
            "emb": emb.astype(jnp.float32),
            "ssl": self.ssl_head(emb).astype(jnp.float32),
            "mmcl": self.mmcl_head(emb).astype(jnp.float32),
        }
