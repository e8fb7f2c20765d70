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

INPUT_CHANNELS = 6
"""acc x,y,z then gyro x,y,z."""

CONV_KERNELS = (10, 5, 5)
CONV_DILATION = 2
POOL_SIZE = 3
POOLED_LENGTH = 32
"""Output length of the adaptive average pool in the reference."""
GRU_OVER_CHOICES = ("channels", "time")


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


class GRUHiddenStep(nn.Module):
    """One GRU step given the precomputed input projection, with torch's gate equations.

    With x_proj = W_i x + b_i split into (x_r, x_z, x_n) and h_proj = W_h h + b_h into
    (h_r, h_z, h_n), all (B, H):
        r = sigmoid(x_r + h_r),  z = sigmoid(x_z + h_z),  n = tanh(x_n + r * h_n),
        h' = (1 - z) * n + z * h.
    The matmul runs in `dtype`; the gate arithmetic and the carried h stay float32 so that a
    bfloat16 run does not accumulate rounding over the recurrence.
    Params: kernel (H, 3H) = W_hh^T, bias (3H,) = b_hh, gate order (r, z, n) as in torch.
    """

    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, x_proj):
        bound = 1.0 / np.sqrt(self.hidden_dim)
        kernel = self.param("kernel", torch_uniform(bound), (self.hidden_dim, 3 * self.hidden_dim))
        bias = self.param("bias", torch_uniform(bound), (3 * self.hidden_dim,))
        h_proj = jnp.dot(h.astype(self.dtype), kernel.astype(self.dtype)).astype(jnp.float32) + bias
        x_r, x_z, x_n = jnp.split(x_proj.astype(jnp.float32), 3, axis=-1)
        h_r, h_z, h_n = jnp.split(h_proj, 3, axis=-1)
        reset = jax.nn.sigmoid(x_r + h_r)
        update = jax.nn.sigmoid(x_z + h_z)
        candidate = jnp.tanh(x_n + reset * h_n)
        return (1.0 - update) * candidate + update * h, None


class TorchGRU(nn.Module):
    """Single-layer unidirectional GRU, h_0 = 0, returning the final hidden state (B, H).

    Input (B, S, D). Speed choice: the input projection W_i x + b_i (params `input_proj`,
    kernel (D, 3H) = W_ih^T, bias (3H,) = b_ih) is one Dense over all S steps before the scan,
    so the scanned `GRUHiddenStep` (params `cell`) only does the (B, H) x (H, 3H) hidden matmul.
    The scan is fully unrolled (S is 32 in PRIMUS): on CPU this halves the step time against a
    rolled loop, and XLA's cost analysis then counts every step's FLOPs (it counts a loop body once).
    Keeping both bias vectors b_ih and b_hh (Flax's nn.GRUCell folds b_hr, b_hz into the input
    biases) gives exactly torch's parameter count, 3H(D + H + 2), and a one-to-one weight import.
    """

    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs):
        bound = 1.0 / np.sqrt(self.hidden_dim)
        x_proj = nn.Dense(
            3 * self.hidden_dim,
            dtype=self.dtype,
            kernel_init=torch_uniform(bound),
            bias_init=torch_uniform(bound),
            name="input_proj",
        )(inputs)
        scan_steps = nn.scan(
            GRUHiddenStep,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=1,
            out_axes=1,
            unroll=inputs.shape[1],
        )
        h0 = jnp.zeros((inputs.shape[0], self.hidden_dim), jnp.float32)
        h_final, _ = scan_steps(self.hidden_dim, self.dtype, name="cell")(h0, x_proj)
        return h_final


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
    """

    hidden_dim: int = 512
    conv_channels: int = 32
    pooled_length: int = POOLED_LENGTH
    ssl_dim: int = 512
    mm_dim: int = 512
    gru_over: str = "channels"
    dtype: Any = jnp.float32

    def _conv(self, x, kernel: int, name: str):
        fan_in = x.shape[-1] * kernel
        return nn.Conv(
            self.conv_channels,
            kernel_size=(kernel,),
            kernel_dilation=(CONV_DILATION,),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            kernel_init=torch_uniform(1.0 / np.sqrt(fan_in)),
            name=name,
        )(x)

    def _head(self, emb, features: int, name: str):
        bound = 1.0 / np.sqrt(self.hidden_dim)
        return nn.Dense(
            features,
            dtype=self.dtype,
            kernel_init=torch_uniform(bound),
            bias_init=torch_uniform(bound),
            name=name,
        )(emb)

    @nn.compact
    def __call__(self, x):
        if self.gru_over not in GRU_OVER_CHOICES:
            raise ValueError(f"IMUEncoder.gru_over must be one of {GRU_OVER_CHOICES}, got {self.gru_over!r}")
        if x.ndim != 3 or x.shape[-1] != INPUT_CHANNELS:
            raise ValueError(f"IMUEncoder expects IMU windows of shape (B, T, {INPUT_CHANNELS}), got {x.shape}")
        if x.shape[1] < min_input_length():
            raise ValueError(
                f"IMUEncoder needs at least {min_input_length()} time steps per window, got {x.shape[1]}"
            )
        # torch's GroupNorm on (B, C, T) normalises each group over (C/G x T): on channels-last
        # Flax's GroupNorm reduces over every non-batch axis within a channel group, the same set.
        x = nn.GroupNorm(num_groups=2, epsilon=1e-5, dtype=self.dtype, name="input_norm")(x)
        x = self._conv(x, CONV_KERNELS[0], "conv1")
        x = nn.max_pool(x, (POOL_SIZE,), strides=(POOL_SIZE,), padding="VALID")
        x = self._conv(x, CONV_KERNELS[1], "conv2")
        x = nn.max_pool(x, (POOL_SIZE,), strides=(POOL_SIZE,), padding="VALID")
        x = self._conv(x, CONV_KERNELS[2], "conv3")
        pool = jnp.asarray(adaptive_avg_pool_matrix(x.shape[1], self.pooled_length), self.dtype)
        x = jnp.einsum("blc,lp->bpc", x, pool)
        x = nn.GroupNorm(num_groups=4, epsilon=1e-5, dtype=self.dtype, name="feature_norm")(x)
        steps = jnp.swapaxes(x, 1, 2) if self.gru_over == "channels" else x
        emb = TorchGRU(self.hidden_dim, self.dtype, name="gru")(steps)
        return {
            "emb": emb.astype(jnp.float32),
            "ssl": self._head(emb, self.ssl_dim, "ssl_head").astype(jnp.float32),
            "mmcl": self._head(emb, self.mm_dim, "mmcl_head").astype(jnp.float32),
        }
