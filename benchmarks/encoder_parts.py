"""Forward + backward time of the encoder's parts: the conv stack, the GRU and the whole encoder.

    python -m benchmarks.encoder_parts --batch-windows 128 [--dtype bfloat16] [--precision highest]

Each part is jitted as the gradient of sum(output * c) for a fixed random cotangent c, with
respect to its params and (for the GRU, whose input carries gradients in training) its input:
- conv stack: `IMUEncoder.conv_features`, GroupNorm .. feature_norm, (N, T, 6) -> (N, 32, 32);
- GRU: `IMUEncoder.embed`, input projection and recurrence, (N, 32, 32) -> (N, hidden_dim);
- encoder: the whole `IMUEncoder` with its ssl and mmcl heads;
- GRU matmuls alone (`gru_matmul_floor`): the GRU's forward and backward matmuls in the same
  loops, shapes and dtype, with the gate arithmetic and the residual writes taken out. It is the
  floor under the GRU's time on this backend; gru_matmul_share = gru_matmuls_ms / gru_ms says how
  much of the GRU is its matmuls and how much the rest.
N windows is `--batch-windows` (a train step at batch B encodes 2B windows: two views). Times
are the best of `--repeats` calls after a warm-up call, in ms. On CPU, when torch is importable
and the dtype is float32, the same parts of a torch encoder (GroupNorm, Conv1d, MaxPool1d,
AdaptiveAvgPool1d, nn.GRU, Linear) are timed in the same run, so their ratio is meaningful on
a shared machine. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import sys
import time

from benchmarks import common

PRECISIONS = ("default", "high", "highest")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encoder_parts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-windows", type=int, default=128, help="windows per call N (2B for a step at B)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--precision", choices=PRECISIONS, default="default",
                        help="jax.default_matmul_precision while tracing")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per part (the best is reported)")
    parser.add_argument("--window-length", type=int, default=250, help="T, samples per window")
    parser.add_argument("--hidden-dim", type=int, default=512, help="GRU and head width, default model 512")
    parser.add_argument("--conv-impl", choices=("auto", "xla", "matmul"), default="auto",
                        help="IMUEncoder.conv_impl")
    parser.add_argument("--gru-unroll", type=int, default=0, help="GRU scan unroll; 0 (default) takes the backend's default")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch parts")
    return parser


def _best_ms(call, repeats: int) -> float:
    call()  # warm-up (and compilation for a jitted call)
    return round(1e3 * min(common.time_calls(call, repeats)), 3)


def gru_matmul_floor(inputs, input_kernel, kernel, hidden_t, gate_grads, dtype, unroll=1):
    """The matmuls of `ops.gru_recurrence`'s forward and backward, alone: the GRU's floor.

    inputs (S, N, D) time-major, input_kernel (D, 3H) = W_ih^T, kernel (H, 3H) = W_hh^T;
    hidden_t (S - 1, H, N) and gate_grads (S - 1, N, 3H) stand in for what the real GRU computes
    and stores per step (h_{t-1}^T and the gate gradients g_t), so that only matmuls remain:
        forward   p_1 = x_1 W_ih^T;  t = 2..S:  p_t = x_t W_ih^T + h_{t-1} W_hh^T,  h_t = p_t[:, :H]
        backward  t = S..2:  dW_ih^T += x_t^T g_t,  dW_hh^T += h_{t-1}^T g_t,
                             dh_{t-1} = dh_t + g_t W_hh,  dx_t = g_t W_ih;
                  then dW_ih^T += x_1^T g_2 and dx_1 = g_2 W_ih for step 1
    in the same loops (lax.scan with `unroll`), operand layouts and `dtype` (accumulated in
    float32) as the custom VJP: S matmuls (N, D) x (D, 3H) and S - 1 (N, H) x (H, 3H) forward, twice that backward, the
    count of `flops.encoder_layer_flops`' GRU rows. The first H columns of p_t carry the recurrence
    (one (N, H) slice per step). Returns (h_S, dh_1, dW_ih^T, dW_hh^T, dx (S, N, D)), float32.
    """
    import jax
    import jax.numpy as jnp

    hidden = kernel.shape[0]
    input_kernel, kernel = input_kernel.astype(dtype), kernel.astype(dtype)

    def matmul(a, b):
        return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)

    def matmul_transposed(a, b):  # a @ b^T
        return jax.lax.dot_general(a.astype(dtype), b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def forward_step(h, x_t):
        return (matmul(x_t, input_kernel) + matmul(h, kernel))[:, :hidden], None

    h_first = matmul(inputs[0], input_kernel)[:, :hidden]
    h_last, _ = jax.lax.scan(forward_step, h_first, inputs[1:], unroll=unroll)

    def backward_step(carry, step):
        dh, grad_input_kernel, grad_kernel = carry
        x_t, h_prev_t, g = step
        carry = (dh + matmul_transposed(g, kernel), grad_input_kernel + matmul(x_t, g),
                 grad_kernel + matmul(h_prev_t, g))
        return carry, matmul_transposed(g, input_kernel)

    zeros = (jnp.zeros(h_last.shape, jnp.float32), jnp.zeros(input_kernel.shape, jnp.float32),
             jnp.zeros(kernel.shape, jnp.float32))
    (dh, grad_input_kernel, grad_kernel), grad_inputs = jax.lax.scan(
        backward_step, zeros, (jnp.swapaxes(inputs[1:], 1, 2), hidden_t, gate_grads), reverse=True, unroll=unroll)
    grad_input_kernel = grad_input_kernel + matmul(inputs[0].T, gate_grads[0])
    grad_first_input = matmul_transposed(gate_grads[0], input_kernel)
    return h_last, dh, grad_input_kernel, grad_kernel, jnp.concatenate([grad_first_input[None], grad_inputs])


def _jax_part_times(batch_windows, dtype, precision, repeats, window_length, hidden_dim, conv_impl, gru_unroll) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from primus_jax import models

    model = models.IMUEncoder(hidden_dim=hidden_dim, ssl_dim=hidden_dim, mm_dim=hidden_dim, dtype=jnp.dtype(dtype),
                              conv_impl=conv_impl, gru_unroll=gru_unroll or None)
    rng = np.random.default_rng(0)
    imu = jnp.asarray(rng.standard_normal((batch_windows, window_length, 6)), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), imu)["params"]
    features = jax.jit(lambda p, x: model.apply({"params": p}, x, method="conv_features"))(params, imu)
    features = features.astype(jnp.float32)

    def cotangent_loss(method):
        def loss(p, x):
            out = model.apply({"params": p}, x, method=method)
            leaves = jax.tree_util.tree_leaves(out)
            return sum(jnp.vdot(leaf.astype(jnp.float32), jnp.cos(jnp.arange(leaf.size)).reshape(leaf.shape))
                       for leaf in leaves)
        return loss

    parts = {
        "conv_stack_ms": (jax.grad(cotangent_loss("conv_features")), imu),
        "gru_ms": (jax.grad(cotangent_loss("embed"), argnums=(0, 1)), features),
        "encoder_ms": (jax.grad(cotangent_loss("__call__")), imu),
    }
    times = {}
    with jax.default_matmul_precision(None if precision == "default" else precision):
        for name, (grad, x) in parts.items():
            compiled = jax.jit(grad).lower(params, x).compile()
            times[name] = _best_ms(lambda: jax.block_until_ready(compiled(params, x)), repeats)
        gru_params = params["gru"]
        steps = jnp.transpose(features, (2, 0, 1) if model.gru_over == "channels" else (1, 0, 2)).astype(dtype)
        hidden_t = jnp.asarray(rng.standard_normal((steps.shape[0] - 1, hidden_dim, batch_windows)), jnp.float32)
        gate_grads = jnp.asarray(rng.standard_normal((steps.shape[0] - 1, batch_windows, 3 * hidden_dim)), jnp.float32)
        floor_args = (steps, gru_params["input_proj"]["kernel"], gru_params["cell"]["kernel"], hidden_t, gate_grads)
        unroll = gru_unroll or models.GRU_UNROLL_BY_BACKEND.get(jax.default_backend(), True)
        floor = jax.jit(gru_matmul_floor, static_argnums=(5, 6)).lower(*floor_args, jnp.dtype(dtype), unroll).compile()
        times["gru_matmuls_ms"] = _best_ms(lambda: jax.block_until_ready(floor(*floor_args)), repeats)
    times["gru_matmul_share"] = common.significant(times["gru_matmuls_ms"] / times["gru_ms"])
    return times


def _torch_part_times(batch_windows, repeats, window_length, hidden_dim) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(0)
    conv_stack = nn.Sequential(
        nn.GroupNorm(2, 6), nn.Conv1d(6, 32, 10, dilation=2, bias=False), nn.MaxPool1d(3),
        nn.Conv1d(32, 32, 5, dilation=2, bias=False), nn.MaxPool1d(3),
        nn.Conv1d(32, 32, 5, dilation=2, bias=False), nn.AdaptiveAvgPool1d(32), nn.GroupNorm(4, 32))
    gru = nn.GRU(32, hidden_dim, batch_first=True)
    heads = nn.ModuleList([nn.Linear(hidden_dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim)])
    imu = torch.randn(batch_windows, 6, window_length)
    features = torch.randn(batch_windows, 32, 32, requires_grad=True)

    def backward(outputs):
        sum(out.sum() for out in outputs).backward()

    def encoder():
        emb = gru(conv_stack(imu))[1][0]
        return [head(emb) for head in heads]

    calls = {
        "torch_conv_stack_ms": lambda: backward([conv_stack(imu)]),
        "torch_gru_ms": lambda: backward([gru(features)[1][0]]),
        "torch_encoder_ms": lambda: backward(encoder()),
    }
    return {name: _best_ms(call, repeats) for name, call in calls.items()}


def time_encoder_parts(batch_windows: int, dtype: str = "float32", precision: str = "default", repeats: int = 5,
                       window_length: int = 250, hidden_dim: int = 512, conv_impl: str = "auto",
                       gru_unroll: int = 0, with_torch: bool = True) -> dict:
    """ms of forward + backward for the conv stack, the GRU and the whole encoder over N windows.

    Returns {"conv_stack_ms", "gru_ms", "encoder_ms", "gru_matmuls_ms", "gru_matmul_share"} for
    ours (see `gru_matmul_floor`) and, on CPU with torch importable
    and dtype float32 (unless with_torch is False), {"torch_conv_stack_ms", "torch_gru_ms",
    "torch_encoder_ms"} timed in the same process. dtype "float32" or "bfloat16"; precision one
    of "default", "high", "highest" (jax.default_matmul_precision while tracing); conv_impl is
    IMUEncoder.conv_impl; gru_unroll the GRU loops' unroll, 0 for the backend's default.
    """
    import jax

    if batch_windows < 1 or repeats < 1:
        raise ValueError(f"--batch-windows and --repeats must be positive, got {batch_windows} and {repeats}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    times = _jax_part_times(batch_windows, dtype, precision, repeats, window_length, hidden_dim, conv_impl, gru_unroll)
    if with_torch and dtype == "float32" and jax.default_backend() == "cpu":
        try:
            import torch  # noqa: F401
        except ImportError:
            return times
        times.update(_torch_part_times(batch_windows, repeats, window_length, hidden_dim))
    return times


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    times = time_encoder_parts(args.batch_windows, args.dtype, args.precision, args.repeats, args.window_length,
                               args.hidden_dim, args.conv_impl, args.gru_unroll, not args.no_torch)
    return {
        "benchmark": "encoder_parts",
        "batch_windows": args.batch_windows,
        "dtype": args.dtype,
        "precision": args.precision,
        "conv_impl": args.conv_impl,
        "gru_unroll": args.gru_unroll,
        "window_length": args.window_length,
        "hidden_dim": args.hidden_dim,
        "repeats": args.repeats,
        **times,
        "wall_s": round(time.perf_counter() - start, 2),
        **common.machine_description(),
    }


def summary(result: dict) -> list[str]:
    lines = [f"{result['batch_windows']} windows, {result['dtype']}, precision {result['precision']}, "
             f"forward + backward, best of {result['repeats']}:"]
    for part in ("conv_stack", "gru", "encoder"):
        line = f"  {part:<10} ours {result[part + '_ms']:9.3f} ms"
        if f"torch_{part}_ms" in result:
            line += f"   torch {result[f'torch_{part}_ms']:9.3f} ms"
        lines.append(line)
    lines.append(f"  GRU matmuls alone {result['gru_matmuls_ms']:9.3f} ms, {result['gru_matmul_share']:.3g} of the GRU's time")
    return lines


def main(argv=None) -> int:
    return common.run_cli(build_parser(), run, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
