"""Smoke test of benchmarks/encoder_parts.py: runs end to end on a narrow encoder, one JSON line.

No timing is asserted; only that every part was timed (ours, and torch's where torch is installed).
"""
import importlib.util
import json

from benchmarks import encoder_parts


def test_encoder_parts_times_every_part_and_torch_in_the_same_run(capsys):
    code = encoder_parts.main(["--batch-windows", "4", "--repeats", "1", "--hidden-dim", "16",
                               "--window-length", "130", "--gru-unroll", "2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with_torch = importlib.util.find_spec("torch") is not None
    for part in ("conv_stack", "gru", "encoder"):
        assert result[f"{part}_ms"] > 0
        assert (result.get(f"torch_{part}_ms", 0) > 0) == with_torch, part
    assert result["batch_windows"] == 4 and result["hidden_dim"] == 16 and result["backend"] == "cpu"


def test_encoder_parts_rejects_a_non_positive_batch(capsys):
    assert encoder_parts.main(["--batch-windows", "0"]) == 1
    assert "--batch-windows and --repeats must be positive" in capsys.readouterr().err
