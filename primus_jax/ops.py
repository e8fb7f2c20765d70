"""The encoder's array kernels: the dilated convolutions (XLA or im2col matmul) and three with a
custom VJP, the floor-mode max-pool, the input GroupNorm's affine step fused with conv1, and the
GRU recurrence.

Pure functions of arrays on channels-last (B, L, C) or time-major (S, B, D) inputs; the Flax
modules of `primus_jax.models` own the parameters and call these. Each kernel's docstring gives
its maths and shapes, and those with a custom VJP give the backward pass they compute.
"""
import functools

import jax
import jax.numpy as jnp


def dilated_conv1d_matmul(x, kernel, dilation: int):
    """VALID dilated 1-D convolution (cross-correlation, as torch's Conv1d) as one matmul.

    x (B, L, C_in), kernel (k, C_in, C_out) -> y (B, L - d(k-1), C_out) with
        y[b, l, o] = sum_j sum_c x[b, l + d j, c] kernel[j, c, o].
    The k shifted slices x[:, d j : d j + L_out] are stacked to (B, L_out, k, C_in) (im2col) and
    contracted with the kernel in one einsum; autodiff's backward is two matmuls and a sum of
    k shifted slices.
    """
    taps, out_length = kernel.shape[0], x.shape[1] - dilation * (kernel.shape[0] - 1)
    patches = jnp.stack([x[:, dilation * j : dilation * j + out_length] for j in range(taps)], axis=2)
    return jnp.einsum("blkc,kco->blo", patches, kernel)


def _pool_taps(x, size: int) -> list:
    """The `size` strided views x[:, j : P size : size] (each (B, P, C), P = floor(L / size)) of x (B, L, C).

    Tap j holds sample j of every window; the window max is their elementwise max, one loop that
    reads x in place (a reshape to (B, P, size, C) made XLA's CPU backend copy x first).
    """
    end = (x.shape[1] // size) * size
    return [x[:, j:end:size] for j in range(size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_floor(x, size: int):
    """MaxPool1d(size, stride size), floor mode: (B, L, C) -> (B, floor(L / size), C).

    y[b, p, c] = max_j x[b, p size + j, c], j < size; the last L mod size samples are dropped.
    The gradient (a custom VJP) sends dy[b, p, c] to the first j that attains the max, as torch's
    MaxPool1d and XLA's select-and-scatter do, and 0 elsewhere. It is a few elementwise selects on
    the window taps; XLA's CPU select-and-scatter lowering builds index arrays and a scatter
    instead, and autodiff of a reshaped max splits dy among tied entries.
    """
    return functools.reduce(jnp.maximum, _pool_taps(x, size))


def _max_pool_floor_fwd(x, size):
    pooled = max_pool_floor(x, size)
    return pooled, (x, pooled)


def _max_pool_floor_bwd(size, saved, grad_pooled):
    """dx[b, p size + j, c] = dy[b, p, c] where j is the window's first argmax, else 0.

    The first argmax (B, P, C) comes from one elementwise pass over the taps; dx is then a
    single elementwise select over (B, P, size, C) whose operands are broadcasts of (B, P, C)
    arrays, reshaped (a bitcast) to (B, P size, C) and padded with the dropped tail's zeros.
    Stacking per-tap gradients instead made XLA's CPU backend emit a slow concatenate, twice.
    """
    x, pooled = saved
    first_argmax = jnp.full(pooled.shape, -1, jnp.int32)  # -1: no tap (a NaN window gets no gradient)
    for j, tap in reversed(list(enumerate(_pool_taps(x, size)))):
        first_argmax = jnp.where(tap == pooled, j, first_argmax)
    batch, windows, channels = pooled.shape
    tap_index = jax.lax.broadcasted_iota(jnp.int32, (batch, windows, size, channels), 2)
    grad = jnp.where(tap_index == first_argmax[:, :, None], grad_pooled[:, :, None], 0.0).astype(x.dtype)
    grad = grad.reshape(batch, windows * size, channels)
    return (jnp.pad(grad, ((0, 0), (0, x.shape[1] - grad.shape[1]), (0, 0))),)


max_pool_floor.defvjp(_max_pool_floor_fwd, _max_pool_floor_bwd)


def dilated_conv1d(x, kernel, dilation: int, impl: str):
    """VALID dilated 1-D convolution x (B, L, C_in), kernel (k, C_in, C_out) -> (B, L - d(k-1), C_out).

    impl "matmul" is `dilated_conv1d_matmul`, "xla" lax.conv_general_dilated (as nn.Conv);
    `models.resolve_conv_impl` picks one per backend.
    """
    if impl == "matmul":
        return dilated_conv1d_matmul(x, kernel, dilation)
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1,), padding="VALID", rhs_dilation=(dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def affine_dilated_conv1d(x_hat, scale, bias, kernel, dilation: int, impl: str, dtype_name: str):
    """conv(x_hat * scale + bias, kernel): a per-channel affine map, then `dilated_conv1d`.

    x_hat (B, L, C_in) float32, scale and bias (C_in,), kernel (k, C_in, C_out), float32; the
    affine output and the convolution are in `dtype_name`. This is the input GroupNorm's affine
    step fused with conv1, for a VJP that skips the convolution's input gradient when x_hat is
    not being differentiated (in training x_hat is the normalised data). With g = dL/dout,
    G[j, c, o] = sum_{b, l} x_hat[b, l + d j, c] g[b, l, o] (the kernel gradient of conv(x_hat))
    and s[o] = sum_{b, l} g[b, l, o], the VALID convolution gives
        dkernel[j, c, o] = scale[c] G[j, c, o] + bias[c] s[o],
        dscale[c] = sum_{j, o} kernel[j, c, o] G[j, c, o],
        dbias[c] = sum_{j, o} kernel[j, c, o] s[o],
    and dx_hat = scale * conv^T(g) only when x_hat is perturbed.
    """
    y = (x_hat * scale + bias).astype(dtype_name)
    return dilated_conv1d(y, kernel.astype(dtype_name), dilation, impl)


def _affine_dilated_conv1d_fwd(x_hat, scale, bias, kernel, dilation, impl, dtype_name):
    out = affine_dilated_conv1d(x_hat.value, scale.value, bias.value, kernel.value, dilation, impl, dtype_name)
    return out, ((x_hat.value, scale.value, bias.value, kernel.value), x_hat.perturbed)


def _affine_dilated_conv1d_bwd(dilation, impl, dtype_name, saved, grad_out):
    (x_hat, scale, bias, kernel), x_hat_perturbed = saved
    kernel_low = kernel.astype(dtype_name)
    _, kernel_vjp = jax.vjp(lambda k: dilated_conv1d(x_hat.astype(dtype_name), k, dilation, impl), kernel_low)
    g_x_hat = kernel_vjp(grad_out.astype(dtype_name))[0].astype(jnp.float32)  # G (k, C_in, C_out)
    g_sum = grad_out.astype(jnp.float32).sum(axis=(0, 1))  # s (C_out,)
    grad_kernel = scale[None, :, None] * g_x_hat + bias[None, :, None] * g_sum
    grad_scale = jnp.einsum("jco,jco->c", kernel, g_x_hat)
    grad_bias = jnp.einsum("jco,o->c", kernel, g_sum)
    grad_x_hat = None
    if x_hat_perturbed:
        y = (x_hat * scale + bias).astype(dtype_name)
        _, input_vjp = jax.vjp(lambda v: dilated_conv1d(v, kernel_low, dilation, impl), y)
        grad_x_hat = (input_vjp(grad_out.astype(dtype_name))[0].astype(jnp.float32) * scale).astype(x_hat.dtype)
    return grad_x_hat, grad_scale, grad_bias, grad_kernel.astype(kernel.dtype)


affine_dilated_conv1d.defvjp(_affine_dilated_conv1d_fwd, _affine_dilated_conv1d_bwd, symbolic_zeros=True)


def _gru_gates(x_proj, h_proj, h):
    """torch's GRU gates for one step: x_proj, h_proj (B, 3H) float32 in (r, z, n) order, h (B, H).

    r = sigmoid(x_r + h_r),  z = sigmoid(x_z + h_z),  n = tanh(x_n + r * h_n),
    h' = (1 - z) * n + z * h = n + z * (h - n).  Returns (r, z, n, h_n, h').
    """
    hidden = h.shape[-1]
    reset = jax.nn.sigmoid(x_proj[:, :hidden] + h_proj[:, :hidden])
    update = jax.nn.sigmoid(x_proj[:, hidden : 2 * hidden] + h_proj[:, hidden : 2 * hidden])
    h_n = h_proj[:, 2 * hidden :]
    candidate = jnp.tanh(x_proj[:, 2 * hidden :] + reset * h_n)
    return reset, update, candidate, h_n, candidate + update * (h - candidate)


def _matmul(a, b, dtype):
    """a @ b with both operands in `dtype`, accumulated and returned in float32."""
    return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _batch_outer_sum(a, b, dtype):
    """a^T b = sum over the batch rows of outer(a_i, b_i): a (B, M), b (B, N) -> (M, N) float32."""
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _gru_forward(inputs, input_kernel, input_bias, kernel, bias, dtype, unroll):
    """The recurrence from h_0 = 0: returns (h_S, residuals for `_gru_recurrence_bwd`).

    Step t projects its own input, x_t W_ih^T + b_ih, inside the loop, so no (S, B, 3H) array of
    projections is ever written. Step 1 runs outside the loop without the hidden matmul
    (h_0 W_hh^T = 0, so h_proj = b_hh). The residuals are step 1's (r, z, n, h_n), each (B, H),
    and steps 2..S's h_{t-1}^T, (S - 1, H, B), and (r, z, n, h_n), each (S - 1, B, H). h is saved
    feature-major because the backward pass contracts it over the batch (dW_hh^T += h_{t-1}^T g_h):
    with h^T stored, that is a plain (H, B) x (B, 3H) matmul, which XLA's CPU backend runs through
    its fast matmul library, where a batch-major h made it a transposed-operand dot on a slower path.
    """
    batch = inputs.shape[1]
    input_kernel, kernel = input_kernel.astype(dtype), kernel.astype(dtype)  # cast once, not per step

    def step(h, x_t):
        x_proj = _matmul(x_t, input_kernel, dtype) + input_bias
        h_proj = _matmul(h, kernel, dtype) + bias
        reset, update, candidate, h_n, h_next = _gru_gates(x_proj, h_proj, h)
        return h_next, (h.T, reset, update, candidate, h_n)

    h0 = jnp.zeros((batch, kernel.shape[0]), jnp.float32)
    first_x_proj = _matmul(inputs[0], input_kernel, dtype) + input_bias
    *first_gates, h1 = _gru_gates(first_x_proj, jnp.broadcast_to(bias, first_x_proj.shape), h0)
    h_final, loop_residuals = jax.lax.scan(step, h1, inputs[1:], unroll=unroll)
    return h_final, (first_gates, loop_residuals)


def gru_recurrence(inputs, input_kernel, input_bias, kernel, bias, dtype=jnp.float32, unroll: int | bool = 1):
    """Final hidden state (B, H) float32 of torch's single-layer GRU over time-major inputs, h_0 = 0.

    inputs (S, B, D) in `dtype` (time-major, so that step t reads one contiguous slice);
    input_kernel (D, 3H) = W_ih^T, input_bias (3H,) = b_ih, kernel (H, 3H) = W_hh^T and
    bias (3H,) = b_hh, float32, gate order (r, z, n). Step t computes x_t W_ih^T + b_ih and
    h_{t-1} W_hh^T + b_hh, two matmuls in `dtype` accumulated in float32 (no hidden matmul for
    step 1, where h_0 = 0), then `_gru_gates` in float32 (the carried h stays float32 in a
    bfloat16 run). `unroll` is lax.scan's unroll of the forward and backward loops (True: fully).

    The VJP is written out (a custom VJP) rather than differentiated through the loop. The forward
    pass saves h_{t-1}^T, r, z, n and h_n = (h_{t-1} W_hh^T + b_hh)_n, 5 (S, B, H)-sized float32
    arrays (h transposed, see `_gru_forward`).
    The backward pass runs the reverse recurrence with the cotangent dh_t of h_t:
        da_n = dh (1 - z)(1 - n^2),  da_r = da_n h_n r (1 - r),  da_z = dh (h_{t-1} - n) z (1 - z),
        g_x = [da_r, da_z, da_n] = d(x_t W_ih^T),  g_h = [da_r, da_z, da_n r] = d(h_{t-1} W_hh^T),
        dh_{t-1} = dh z + g_h W_hh,   dx_t = g_x W_ih,
    and accumulates the weight gradients in the loop's carry,
        dW_ih^T += x_t^T g_x,  db_ih += sum_b g_x,  dW_hh^T += h_{t-1}^T g_h,  db_hh += sum_b g_h,
    so that, like the forward pass, it writes no (S, B, 3H) array: per step it reads the five
    residuals and writes dx_t (B, D). h_0 = 0 adds nothing to dW_hh and dh_0 is not needed.
    """
    params = (jnp.asarray(a, jnp.float32) for a in (input_kernel, input_bias, kernel, bias))
    return _gru_recurrence(jnp.asarray(inputs, dtype), *params, jnp.dtype(dtype).name, unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gru_recurrence(inputs, input_kernel, input_bias, kernel, bias, dtype_name: str, unroll: int | bool):
    return _gru_forward(inputs, input_kernel, input_bias, kernel, bias, dtype_name, unroll)[0]


def _gru_recurrence_fwd(inputs, input_kernel, input_bias, kernel, bias, dtype, unroll):
    h_final, residuals = _gru_forward(inputs, input_kernel, input_bias, kernel, bias, dtype, unroll)
    return h_final, (residuals, inputs, input_kernel, kernel)


def _gru_gate_grads(dh, h, reset, update, candidate, h_n):
    """(g_x, g_h) of one step from dh_t and its residuals, as in `gru_recurrence`'s docstring."""
    da_n = dh * (1.0 - update) * (1.0 - candidate * candidate)
    da_r = da_n * h_n * reset * (1.0 - reset)
    da_z = dh * (h - candidate) * update * (1.0 - update)
    return jnp.concatenate([da_r, da_z, da_n], axis=-1), jnp.concatenate([da_r, da_z, da_n * reset], axis=-1)


def _gru_recurrence_bwd(dtype, unroll, saved, dh_final):
    (first_gates, loop_residuals), inputs, input_kernel, kernel = saved
    input_kernel_t, kernel_t = input_kernel.astype(dtype).T, kernel.astype(dtype).T
    # x_t^T (D, B) per step, for dW_ih^T += x_t^T g_x as a plain matmul (see `_gru_forward`)
    inputs_t = jnp.swapaxes(inputs[1:], 1, 2)

    def step(carry, step_inputs):
        dh, (grad_input_kernel, grad_input_bias, grad_kernel, grad_bias) = carry
        x_transposed, (h_prev_transposed, reset, update, candidate, h_n) = step_inputs
        grad_x_proj, grad_h_proj = _gru_gate_grads(dh, h_prev_transposed.T, reset, update, candidate, h_n)
        grads = (
            grad_input_kernel + _matmul(x_transposed, grad_x_proj, dtype),
            grad_input_bias + grad_x_proj.sum(axis=0),
            grad_kernel + _matmul(h_prev_transposed, grad_h_proj, dtype),
            grad_bias + grad_h_proj.sum(axis=0),
        )
        dh_prev = dh * update + _matmul(grad_h_proj, kernel_t, dtype)
        return (dh_prev, grads), _matmul(grad_x_proj, input_kernel_t, dtype).astype(inputs.dtype)

    zero_grads = tuple(jnp.zeros_like(p) for p in (input_kernel, input_kernel[0], kernel, kernel[0]))
    (dh1, grads), grad_inputs = jax.lax.scan(
        step, (dh_final, zero_grads), (inputs_t, loop_residuals), reverse=True, unroll=unroll
    )
    grad_input_kernel, grad_input_bias, grad_kernel, grad_bias = grads
    first_grad_x_proj, first_grad_h_proj = _gru_gate_grads(dh1, jnp.zeros_like(dh1), *first_gates)
    first_grad_input = _matmul(first_grad_x_proj, input_kernel_t, dtype).astype(inputs.dtype)
    return (
        jnp.concatenate([first_grad_input[None], grad_inputs]),
        grad_input_kernel + _batch_outer_sum(inputs[0], first_grad_x_proj, dtype),
        grad_input_bias + first_grad_x_proj.sum(axis=0),
        grad_kernel,
        grad_bias + first_grad_h_proj.sum(axis=0),
    )


_gru_recurrence.defvjp(_gru_recurrence_fwd, _gru_recurrence_bwd)
