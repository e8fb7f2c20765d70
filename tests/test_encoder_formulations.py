"""The encoder's fast formulations equal the plain ones: the GRU's custom VJP against autodiff
through a step loop (and float64 numpy), the im2col convolution against XLA's convolution, the
custom-VJP max-pool against nn.max_pool, the input GroupNorm's affine step fused into conv1
against nn.GroupNorm then a convolution; forward and gradients, and the param tree unchanged.

Matmuls run at "highest" precision so that float32 comparisons hold on CPU, GPU and TPU alike;
differently compiled float32 programs then agree to ~1e-6 relative, checked at 1e-5.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from primus_jax.models import IMUEncoder, resolve_conv_impl
from primus_jax.ops import affine_dilated_conv1d, dilated_conv1d_matmul, gru_recurrence, max_pool_floor

RTOL = 1e-5


def assert_close(actual, expected, rtol=RTOL, name=""):
    """max |actual - expected| <= rtol * max |expected|: a relative bound that tiny entries cannot break."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    error, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert error <= rtol * scale, f"{name}: max abs error {error:.3g} > {rtol} * {scale:.3g}"


def numpy_gru_final_state(inputs, input_kernel, input_bias, kernel, bias):
    """torch's GRU equations in float64 numpy over time-major inputs (S, B, D), h_0 = 0."""
    inputs, input_kernel, input_bias, kernel, bias = (
        np.asarray(a, np.float64) for a in (inputs, input_kernel, input_bias, kernel, bias))
    hidden = kernel.shape[0]
    h = np.zeros((inputs.shape[1], hidden))
    sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    for x_t in inputs:
        x_proj, h_proj = x_t @ input_kernel + input_bias, h @ kernel + bias
        r = sigmoid(x_proj[:, :hidden] + h_proj[:, :hidden])
        z = sigmoid(x_proj[:, hidden : 2 * hidden] + h_proj[:, hidden : 2 * hidden])
        n = np.tanh(x_proj[:, 2 * hidden :] + r * h_proj[:, 2 * hidden :])
        h = (1 - z) * n + z * h
    return h


def autodiff_gru_final_state(inputs, input_kernel, input_bias, kernel, bias):
    """The plain formulation: one input projection, then a step loop that jax differentiates itself."""
    hidden = kernel.shape[0]
    h = jnp.zeros((inputs.shape[1], hidden), jnp.float32)
    for x_proj in inputs @ input_kernel + input_bias:
        h_proj = h @ kernel + bias
        r = jax.nn.sigmoid(x_proj[:, :hidden] + h_proj[:, :hidden])
        z = jax.nn.sigmoid(x_proj[:, hidden : 2 * hidden] + h_proj[:, hidden : 2 * hidden])
        n = jnp.tanh(x_proj[:, 2 * hidden :] + r * h_proj[:, 2 * hidden :])
        h = (1 - z) * n + z * h
    return h


GRU_ARG_NAMES = ("inputs", "input_kernel", "input_bias", "kernel", "bias")


def gru_inputs(steps=7, batch=5, features=6, hidden=24, seed=0):
    """(inputs, input_kernel, input_bias, kernel, bias) as torch initialises a GRU, and a cotangent of h_S."""
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(hidden)
    inputs = rng.normal(0.0, 1.0, (steps, batch, features)).astype(np.float32)
    weights = [rng.uniform(-bound, bound, shape).astype(np.float32)
               for shape in ((features, 3 * hidden), (3 * hidden,), (hidden, 3 * hidden), (3 * hidden,))]
    cotangent = rng.normal(size=(batch, hidden)).astype(np.float32)
    return (inputs, *weights), cotangent


def cotangent_grads(function, cotangent, *args):
    """Gradients of sum(function(*args) * cotangent) with respect to every argument."""
    loss = lambda *a: jnp.vdot(function(*a), cotangent)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("unroll", [1, 3, 7])
def test_gru_recurrence_forward_matches_float64_numpy(unroll):
    args, _ = gru_inputs()
    with jax.default_matmul_precision("highest"):
        h = jax.jit(lambda *a: gru_recurrence(*a, unroll=unroll))(*args)
    assert h.dtype == jnp.float32
    assert_close(h, numpy_gru_final_state(*args))


@pytest.mark.parametrize("steps, unroll", [(1, 1), (2, 1), (7, 1), (7, 6)])
def test_gru_recurrence_gradients_match_autodiff(steps, unroll):
    """Step 1 (h_0 = 0, no hidden matmul) is handled outside the loop: S = 1 and 2 check its edges."""
    args, cotangent = gru_inputs(steps=steps)
    with jax.default_matmul_precision("highest"):
        custom = cotangent_grads(lambda *a: gru_recurrence(*a, unroll=unroll), cotangent, *args)
        reference = cotangent_grads(autodiff_gru_final_state, cotangent, *args)
    for name, got, expected in zip(GRU_ARG_NAMES, custom, reference):
        assert_close(got, expected, name=name)


def test_gru_recurrence_bfloat16_keeps_float32_state_and_gradients():
    """bfloat16 matmuls, float32 gates and state: output and gradients float32 and near float32's."""
    (inputs, *weights), cotangent = gru_inputs()
    inputs_bf16 = jnp.asarray(inputs, jnp.bfloat16)
    bf16_gru = lambda *a: gru_recurrence(*a, dtype=jnp.bfloat16)  # noqa: E731
    h = jax.jit(bf16_gru)(inputs_bf16, *weights)
    assert h.dtype == jnp.float32
    assert_close(h, numpy_gru_final_state(inputs, *weights), rtol=3e-2)
    grads = cotangent_grads(bf16_gru, cotangent, inputs_bf16, *weights)
    assert [g.dtype for g in grads] == [jnp.bfloat16] + [jnp.float32] * 4
    with jax.default_matmul_precision("highest"):
        reference = cotangent_grads(autodiff_gru_final_state, cotangent, inputs, *weights)
    for name, got, expected in zip(GRU_ARG_NAMES, grads, reference):
        assert_close(got, expected, rtol=5e-2, name=name)


@pytest.mark.parametrize("length, kernel_size, channels_in", [(40, 10, 6), (25, 5, 8)])
def test_matmul_convolution_equals_xla_convolution(length, kernel_size, channels_in):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, length, channels_in)).astype(np.float32)
    kernel = rng.normal(size=(kernel_size, channels_in, 4)).astype(np.float32)
    out_length = length - 2 * (kernel_size - 1)
    direct = sum(np.einsum("blc,co->blo", x[:, 2 * j : 2 * j + out_length], kernel[j]) for j in range(kernel_size))
    cotangent = rng.normal(size=(3, out_length, 4)).astype(np.float32)

    def xla(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1,), "VALID", rhs_dilation=(2,),
                                            dimension_numbers=("NWC", "WIO", "NWC"))

    def matmul(x, kernel):
        return dilated_conv1d_matmul(x, kernel, 2)

    with jax.default_matmul_precision("highest"):
        assert_close(jax.jit(matmul)(x, kernel), direct)
        assert_close(jax.jit(xla)(x, kernel), direct)
        for name, got, expected in zip(("x", "kernel"), cotangent_grads(matmul, cotangent, x, kernel),
                                       cotangent_grads(xla, cotangent, x, kernel)):
            assert_close(got, expected, name=name)


@pytest.mark.parametrize("impl", ["xla", "matmul"])
def test_affine_conv_vjp_equals_autodiff_of_groupnorm_then_conv(impl):
    """Params' gradients without conv1's input gradient; the input's gradient when it is asked for."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 40, 6)).astype(np.float32) + np.float32(9.81) * (np.arange(6) == 2)
    scale, bias = rng.normal(1.0, 0.3, 6).astype(np.float32), rng.normal(0.0, 0.3, 6).astype(np.float32)
    kernel = rng.normal(size=(10, 6, 4)).astype(np.float32)
    cotangent = rng.normal(size=(3, 22, 4)).astype(np.float32)
    norm = nn.GroupNorm(num_groups=2, epsilon=1e-5, use_scale=False, use_bias=False)

    def fused(x, scale, bias, kernel):
        return affine_dilated_conv1d(norm.apply({}, x), scale, bias, kernel, 2, impl, "float32")

    def plain(x, scale, bias, kernel):
        y = nn.GroupNorm(num_groups=2, epsilon=1e-5).apply({"params": {"scale": scale, "bias": bias}}, x)
        return jax.lax.conv_general_dilated(y, kernel, (1,), "VALID", rhs_dilation=(2,),
                                            dimension_numbers=("NWC", "WIO", "NWC"))

    names = ("x", "scale", "bias", "kernel")
    with jax.default_matmul_precision("highest"):
        assert_close(jax.jit(fused)(x, scale, bias, kernel), jax.jit(plain)(x, scale, bias, kernel))
        for name, got, expected in zip(names, cotangent_grads(fused, cotangent, x, scale, bias, kernel),
                                       cotangent_grads(plain, cotangent, x, scale, bias, kernel)):
            assert_close(got, expected, name=name)  # x perturbed: its gradient is computed
        params_only = [jax.jit(jax.grad(lambda *p, f=f: jnp.vdot(f(x, *p), cotangent), argnums=(0, 1, 2)))(
            scale, bias, kernel) for f in (fused, plain)]
        for name, got, expected in zip(names[1:], *params_only):
            assert_close(got, expected, name=name)


def test_affine_conv_skips_conv1s_input_gradient_when_only_params_are_differentiated():
    """The point of the fused VJP: a training step's backward has no convolution into the input."""
    x = jnp.zeros((2, 40, 6), jnp.float32)
    kernel, affine = jnp.ones((10, 6, 4)), jnp.ones(6)

    def loss(scale, bias, kernel, x):
        return affine_dilated_conv1d(x, scale, bias, kernel, 2, "xla", "float32").sum()

    params_only = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(affine, affine, kernel, x).as_text()
    with_input = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(affine, affine, kernel, x).as_text()
    assert params_only.count("stablehlo.convolution") == 2  # forward, kernel gradient
    assert with_input.count("stablehlo.convolution") == 3  # and the input gradient


def test_max_pool_equals_nn_max_pool_and_routes_gradients_to_the_first_max():
    x = np.random.default_rng(2).normal(size=(2, 232, 5)).astype(np.float32)  # 232 = 3 * 77 + 1: floor mode
    x[0, 3:6, 0] = 7.0  # a window with a three-way tie: its gradient goes to the first entry only
    x[1, 10, 2] = x[1, 11, 2] = 9.0  # a two-way tie
    cotangent = np.random.default_rng(3).normal(size=(2, 77, 5)).astype(np.float32)
    reference = lambda v: nn.max_pool(v, (3,), strides=(3,), padding="VALID")  # noqa: E731
    np.testing.assert_array_equal(jax.jit(lambda v: max_pool_floor(v, 3))(x), reference(x))
    (grad,) = cotangent_grads(lambda v: max_pool_floor(v, 3), cotangent, x)
    (expected,) = cotangent_grads(reference, cotangent, x)
    np.testing.assert_array_equal(grad, expected)
    assert grad[0, 3, 0] == cotangent[0, 1, 0] and grad[0, 4, 0] == grad[0, 5, 0] == 0.0
    assert grad[1, 10, 2] == cotangent[1, 3, 2] and grad[1, 11, 2] == 0.0
    assert np.all(grad[:, 231] == 0.0)  # the dropped tail sample


def test_conv_impl_auto_picks_xla_on_cpu_and_matmul_elsewhere():
    assert resolve_conv_impl("auto", "cpu") == "xla"
    assert resolve_conv_impl("auto", "gpu") == "matmul"
    assert resolve_conv_impl("auto", "tpu") == "matmul"
    assert resolve_conv_impl("xla", "gpu") == "xla"
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        resolve_conv_impl("cudnn", "cpu")


@pytest.fixture(scope="module")
def small_encoder_case():
    """A narrow encoder (hidden 32) and T=130 windows, with params and a loss cotangent."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 130, 6)).astype(np.float32)
    x[..., 2] += 9.81
    params = IMUEncoder(hidden_dim=32, ssl_dim=16, mm_dim=16).init(jax.random.key(0), x)["params"]
    return x, params


def encoder_outputs_and_grads(model, params, x):
    def loss(p):
        out = model.apply({"params": p}, x)
        return sum(jnp.sum(v * jnp.cos(jnp.arange(v.size).reshape(v.shape))) for v in out.values()), out

    with jax.default_matmul_precision("highest"):
        return jax.jit(jax.grad(loss, has_aux=True))(params)


def test_encoder_conv_impls_give_equal_outputs_and_gradients(small_encoder_case):
    x, params = small_encoder_case
    models = {impl: IMUEncoder(hidden_dim=32, ssl_dim=16, mm_dim=16, conv_impl=impl, gru_unroll=1)
              for impl in ("xla", "matmul")}
    results = {impl: encoder_outputs_and_grads(model, params, x) for impl, model in models.items()}
    (grads_xla, out_xla), (grads_matmul, out_matmul) = results["xla"], results["matmul"]
    for name in out_xla:
        assert_close(out_matmul[name], out_xla[name], name=name)
    flat_xla = flax.traverse_util.flatten_dict(grads_xla)
    for path, grad in flax.traverse_util.flatten_dict(grads_matmul).items():
        assert_close(grad, flat_xla[path], name="/".join(path))


def test_encoder_param_tree_is_unchanged_by_the_formulations():
    """The names and shapes that checkpoints and the torch weight import rely on."""
    x = np.zeros((1, 250, 6), np.float32)
    expected = {
        ("input_norm", "scale"): (6,), ("input_norm", "bias"): (6,),
        ("conv1", "kernel"): (10, 6, 32), ("conv2", "kernel"): (5, 32, 32), ("conv3", "kernel"): (5, 32, 32),
        ("feature_norm", "scale"): (32,), ("feature_norm", "bias"): (32,),
        ("gru", "input_proj", "kernel"): (32, 1536), ("gru", "input_proj", "bias"): (1536,),
        ("gru", "cell", "kernel"): (512, 1536), ("gru", "cell", "bias"): (1536,),
        ("ssl_head", "kernel"): (512, 512), ("ssl_head", "bias"): (512,),
        ("mmcl_head", "kernel"): (512, 512), ("mmcl_head", "bias"): (512,),
    }
    for impl in ("auto", "xla", "matmul"):
        shapes = jax.eval_shape(IMUEncoder(conv_impl=impl).init, jax.random.key(0), x)["params"]
        flat = {path: leaf.shape for path, leaf in flax.traverse_util.flatten_dict(shapes).items()}
        assert flat == expected, impl


def test_encoder_rejects_an_unknown_conv_impl(small_encoder_case):
    x, params = small_encoder_case
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        IMUEncoder(hidden_dim=32, ssl_dim=16, mm_dim=16, conv_impl="cudnn").apply({"params": params}, x)
