"""Export a trained encoder for PyTorch code or for ONNX runtimes.

    python -m primus_jax.export --encoder runs/x/export --to reference --out primus.ckpt
    python -m primus_jax.export --encoder runs/x/export --to onnx --out primus.onnx

--encoder is an export directory (`checkpoint.export_encoder`, local or gs://); --out a file.

- reference: a PyTorch checkpoint with the keys, shapes and layout of the reference's released
  file (`convert.save_reference_checkpoint`); only the reference architecture fits it.
- onnx: the encoder as an ONNX graph, traced from `torch_encoder.TorchIMUEncoder` by
  torch.onnx.export (the TorchScript exporter; the GRU becomes one ONNX GRU node). Input "imu"
  (N, T, 6) float32 with N dynamic and T the export's window length; outputs "ssl" (N, ssl_dim),
  "mmcl" (N, mm_dim) and "finite" (N,) bool, False for a window holding a NaN or an infinity,
  whose ssl and mmcl rows are then NaN. The export's metadata (window length, rate, channels,
  units) is stored in the model's metadata_props.

Both need torch (primus_jax[torch]); onnx also needs the onnx package (primus_jax[onnx]).
Errors are one sentence on stderr with exit status 1; --out is written atomically.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from typing import Sequence

from primus_jax import checkpoint, convert, paths

TARGETS = ("reference", "onnx")
ONNX_OPSET = 17
GRU_FORMS = ("loop", "unrolled")
METADATA_KEYS = ("window_length", "rate_hz", "channels", "units", "feature", "text_tower")


def export_metadata(export: checkpoint.Export) -> dict:
    """The export's facts a user of the exported file needs (window length, rate, channels, units)."""
    return {key: export.meta.get(key) for key in METADATA_KEYS}


def export_reference(encoder_dir, out) -> None:
    """Write the export at encoder_dir as the reference's PyTorch checkpoint `out`.

    Raises ValueError naming the model field when the architecture is not the reference's.
    """
    export = checkpoint.read_export(encoder_dir)
    problem = convert.reference_architecture_problem(export.meta["model"])
    if problem is not None:
        raise ValueError(f"{encoder_dir} cannot be written in the reference's format: {problem}")
    convert.save_reference_checkpoint(export.params, out, export_metadata(export))


def onnx_model_bytes(export: checkpoint.Export, opset: int = ONNX_OPSET, gru: str = "loop") -> bytes:
    """The serialised ONNX model of `export` (see the module docstring for its inputs and outputs).

    gru: "loop" (one ONNX GRU node, what the command writes) or "unrolled" (its steps written
    out, `TorchIMUEncoder`), which benchmarks.onnx_export compares.
    """
    if gru not in GRU_FORMS:
        raise ValueError(f"gru must be one of {GRU_FORMS}, got {gru!r}")
    torch = convert.require_torch("the ONNX export")
    try:
        import onnx
    except ImportError as error:
        raise ImportError("the ONNX export needs onnx: pip install 'primus_jax[onnx]'") from error
    from primus_jax.torch_encoder import TorchIMUEncoder

    window_length = export.meta["window_length"]
    module = TorchIMUEncoder(export.model, window_length, unroll_gru=gru == "unrolled")
    module.load_params(export.params).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and its note on batch-first GRUs.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (torch.zeros(2, window_length, 6),), buffer, dynamo=False, opset_version=opset,
            input_names=["imu"], output_names=["ssl", "mmcl", "finite"],
            dynamic_axes={name: {0: "N"} for name in ("imu", "ssl", "mmcl", "finite")},
        )
    model = onnx.load_from_string(buffer.getvalue())
    for key, value in export_metadata(export).items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def export_onnx(encoder_dir, out, opset: int = ONNX_OPSET) -> None:
    """Write the export at encoder_dir as the ONNX model `out` (`onnx_model_bytes`)."""
    paths.atomic_write(out, onnx_model_bytes(checkpoint.read_export(encoder_dir), opset))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m primus_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, help="exported encoder directory (local or gs://)")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the format to write")
    parser.add_argument("--out", required=True, help="file to write (local or gs://)")
    args = parser.parse_args(argv)
    try:
        (export_reference if args.to == "reference" else export_onnx)(args.encoder, args.out)
    except (ValueError, ImportError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
