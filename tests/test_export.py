"""primus_jax.export: the reference's PyTorch format and ONNX, checked in torch and onnxruntime.

The PyTorch side is the independent model of tests/reference_torch.py, loaded with
load_state_dict(strict=True); ONNX models run in onnxruntime. Both are compared with
`load_encoder` on the same windows. Tolerance: 1e-4 of the output's largest magnitude
(`numerics.assert_close_to_scale`). The two sides are float32 programs that sum the same terms in
another order (oneDNN or onnxruntime kernels against XLA's); each rounding is 6e-8 relative, and
through 32 GRU steps and a 512-wide head the gap measured on 37 windows was 0.9-1.05e-6 of the
scale (T = 250 and 1000, torch and onnxruntime), so 1e-4 leaves two orders of magnitude for other
CPUs' vector widths, while a wrong layout, gate order or pooling window gives unrelated numbers.
"""
import json
import sys

import jax
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from configs import default
from numerics import assert_close_to_scale
from primus_jax import checkpoint, export
from primus_jax.convert import load_reference_checkpoint, params_from_torch_state_dict, save_reference_checkpoint
from reference_torch import ReferenceEncoder
from test_convert import imu_windows, random_state_dict

RATE = 50.0


def write_export(directory, T: int, seed: int = 0, **model_overrides) -> str:
    """An export directory of random reference-scale params (or a model with the overrides)."""
    model_config = {**default.get_config().model.to_dict(), **model_overrides}
    if model_overrides:
        model = checkpoint.models.IMUEncoder(**{k: v for k, v in model_config.items()
                                                 if k not in ("dtype", "matmul_precision")})
        params = model.init(jax.random.key(seed), np.zeros((1, T, 6), np.float32))["params"]
    else:
        params = params_from_torch_state_dict(random_state_dict(seed))
    checkpoint.export_encoder(str(directory), params, model_config, T, RATE)
    return str(directory)


def moving_windows(n: int, T: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    acc = rng.normal(0.0, 3.0, (n, T, 3)) + np.array([0.0, 9.81, 0.0])
    return np.concatenate([acc, rng.normal(0.0, 1.0, (n, T, 3))], axis=-1).astype(np.float32)


def test_reference_checkpoint_round_trip_is_bit_exact(tmp_path):
    params = params_from_torch_state_dict(random_state_dict(seed=11))
    path = tmp_path / "primus.ckpt"
    save_reference_checkpoint(params, path, {"window_length": 250})
    loaded = load_reference_checkpoint(path)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32)),
                           loaded, params)
    stored = torch.load(path, weights_only=True)  # plain tensors and dicts: no code is unpickled
    assert stored["primus_jax"] == {"window_length": 250}
    assert all(key.startswith("imu_encoder.") for key in stored["state_dict"])


@pytest.mark.usefixtures("float32_matmuls")
@pytest.mark.parametrize("T", [250, 1000])
def test_reference_model_loads_export_and_matches_load_encoder(tmp_path, capsys, T):
    encoder_dir = write_export(tmp_path / "export", T, seed=T)
    out = tmp_path / "primus.ckpt"
    assert export.main(["--encoder", encoder_dir, "--to", "reference", "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)["state_dict"]
    reference = ReferenceEncoder()
    reference.load_state_dict({key.removeprefix("imu_encoder."): value for key, value in state.items()}, strict=True)
    x = moving_windows(5, T, seed=T + 1)
    with torch.no_grad():
        ssl, mmcl = reference(torch.from_numpy(x).transpose(1, 2))
    assert_close_to_scale(ssl.numpy(), checkpoint.load_encoder(encoder_dir, head="ssl")(x), 1e-4)
    assert_close_to_scale(mmcl.numpy(), checkpoint.load_encoder(encoder_dir, head="mmcl")(x), 1e-4)


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    encoder_dir = write_export(root / "export", 250, seed=3)
    out = root / "primus.onnx"
    assert export.main(["--encoder", encoder_dir, "--to", "onnx", "--out", str(out)]) == 0
    return encoder_dir, out


@pytest.mark.usefixtures("float32_matmuls")
@pytest.mark.parametrize("n", [1, 37])
def test_onnx_model_matches_load_encoder(onnx_export, n):
    encoder_dir, out = onnx_export
    check_onnx_against_load_encoder(encoder_dir, out, n)


def check_onnx_against_load_encoder(encoder_dir, out, n):
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = moving_windows(n, 250, seed=n)
    ssl, mmcl, finite = session.run(None, {"imu": x})
    assert finite.tolist() == [True] * n
    assert_close_to_scale(ssl, checkpoint.load_encoder(encoder_dir, head="ssl")(x), 1e-4)
    assert_close_to_scale(mmcl, checkpoint.load_encoder(encoder_dir, head="mmcl")(x), 1e-4)


def test_onnx_graph_keeps_the_gru_a_loop_and_carries_the_metadata(onnx_export):
    model = onnx.load(str(onnx_export[1]))
    op_types = [node.op_type for node in model.graph.node]
    assert op_types.count("GRU") == 1 and op_types.count("MatMul") <= 4  # pool matrix and two heads, no unrolled cells
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert metadata["window_length"] == "250" and metadata["rate_hz"] == "50.0"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_onnx_model_marks_windows_with_nan_or_inf(onnx_export):
    session = onnxruntime.InferenceSession(str(onnx_export[1]), providers=["CPUExecutionProvider"])
    x = moving_windows(6, 250, seed=5)
    clean_ssl, clean_mmcl, _ = session.run(None, {"imu": x})
    x[2, 100, 4], x[4, 0, 0] = np.nan, np.inf
    ssl, mmcl, finite = session.run(None, {"imu": x})
    assert finite.tolist() == [True, True, False, True, False, True]
    assert np.isnan(ssl[[2, 4]]).all() and np.isnan(mmcl[[2, 4]]).all()
    np.testing.assert_array_equal(ssl[finite], clean_ssl[finite])
    np.testing.assert_array_equal(mmcl[finite], clean_mmcl[finite])


@pytest.mark.usefixtures("float32_matmuls")
def test_onnx_export_of_another_architecture(tmp_path):
    """Widths other than the reference's and the time-major GRU export to ONNX too."""
    encoder_dir = write_export(tmp_path / "export", 200, seed=1, hidden_dim=24, conv_channels=8, ssl_dim=12,
                               mm_dim=10, gru_over="time")
    out = tmp_path / "small.onnx"
    assert export.main(["--encoder", encoder_dir, "--to", "onnx", "--out", str(out)]) == 0
    x = moving_windows(3, 200, seed=2)
    ssl, mmcl, _ = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"imu": x})
    assert ssl.shape == (3, 12) and mmcl.shape == (3, 10)
    assert_close_to_scale(mmcl, checkpoint.load_encoder(encoder_dir)(x), 1e-4)


def test_load_encoder_names_the_first_nonfinite_window(tmp_path):
    encoder_fn = checkpoint.load_encoder(write_export(tmp_path / "export", 250))
    x = moving_windows(10, 250, seed=0)
    x[7, 3, 1] = np.inf
    x[3, 17, 4] = np.nan
    with pytest.raises(ValueError, match=r"^window 3 of 10 holds nan at time step 17, channel 4; "):
        encoder_fn(x)


def test_architecture_the_reference_cannot_hold_is_refused(tmp_path, capsys):
    encoder_dir = write_export(tmp_path / "export", 250, hidden_dim=64)
    out = tmp_path / "primus.ckpt"
    assert export.main(["--encoder", encoder_dir, "--to", "reference", "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert "model.hidden_dim is 64, the reference's module holds only 512" in error
    assert error.count("\n") == 1 and not out.exists()


def test_unknown_target_lists_the_accepted_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--encoder", str(tmp_path), "--to", "tflite", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'tflite'" in error and "reference" in error.split("choose from")[-1]
    assert "onnx" in error.split("choose from")[-1]


@pytest.mark.parametrize("target", ["reference", "onnx"])
def test_export_without_torch_names_the_extra(tmp_path, capsys, monkeypatch, target):
    encoder_dir = write_export(tmp_path / "export", 250)
    monkeypatch.setitem(sys.modules, "torch", None)
    out = tmp_path / "out"
    assert export.main(["--encoder", encoder_dir, "--to", target, "--out", str(out)]) == 1
    assert "needs torch: pip install 'primus_jax[torch]'" in capsys.readouterr().err
    assert not out.exists()


def test_onnx_benchmark_reports_sizes_and_latencies_of_both_gru_forms(tmp_path, capsys):
    from benchmarks import onnx_export

    encoder_dir = write_export(tmp_path / "export", 150, hidden_dim=16, conv_channels=8, ssl_dim=8, mm_dim=8)
    assert onnx_export.main(["--encoder", encoder_dir, "--batch-sizes", "1", "3", "--repeats", "1", "--no-jax2onnx"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loop, unrolled = result["models"]["loop"], result["models"]["unrolled"]
    assert result["window_length"] == 150 and loop["nodes"] < unrolled["nodes"]
    for record in (loop, unrolled, result["models"]["jax_load_encoder"]):
        assert set(record["ms_per_window"]) == {"1", "3"} and min(record["ms_per_window"].values()) > 0
    assert loop["size_bytes"] > 0 and unrolled["size_bytes"] > 0
