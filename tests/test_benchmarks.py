"""Smoke tests: each benchmark runs end to end with tiny arguments and ends with one JSON line.

No timing is asserted; only that the reported numbers exist, are consistent and positive.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import common, data_prep, data_prep_workers, input_pipeline, main_loop, peak_memory, train_step


def final_json(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


PEER_SCRIPT = """
import argparse, json
parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int)
parser.add_argument("--steps", type=int)
parser.add_argument("--device")
parser.add_argument("--amp", action="store_true")
args = parser.parse_args()
print("peer log line")
print(json.dumps({"batch_size": args.batch_size, "steps": args.steps, "device": args.device, "amp": args.amp,
                  "samples_per_s": 4.0}))
"""


def test_train_step_benchmark_reports_rates_flops_peaks_and_the_peer(capsys, tmp_path):
    peer = tmp_path / "peer_step.py"
    peer.write_text(PEER_SCRIPT)
    code = train_step.main([
        "--batch-size", "8", "--steps", "2", "--hidden-dim", "32", "--queue-size", "64",
        "--window-length", "128", "--matmul-size", "64", "--matmul-precision", "highest",
        "--torch-peer", str(peer), "--torch-peer-steps", "3"])
    assert code == 0
    result = final_json(capsys)
    assert result["batch_size"] == 8 and result["devices"] == 4 and result["matmul_precision"] == "highest"
    assert result["samples_per_s"] > 0 and result["step_gflop"] > 0 and result["compile_s"] > 0
    assert set(result["matmul_gflops_per_s"]) == {"float32_highest", "float32_default", "bfloat16"}
    for name, rate in result["matmul_gflops_per_s"].items():
        assert rate > 0
        assert result["ratio_to_matmul"][name] == pytest.approx(result["gflops_per_s"] / rate, rel=1e-2)
    assert result["mfu_peak"] == "float32_highest" and result["mfu"] == result["ratio_to_matmul"]["float32_highest"]
    assert result["gflops_per_s"] == pytest.approx(result["step_gflop"] * result["samples_per_s"] / 8, rel=1e-2)
    # the peer got our batch size, its own step count, this backend's device and no --amp for float32
    assert result["torch_peer"] == {"batch_size": 8, "steps": 3, "device": "cpu", "amp": False, "samples_per_s": 4.0}
    assert result["ratio_to_torch_peer"] == pytest.approx(result["samples_per_s"] / 4.0, rel=1e-3)
    assert result["torch_peer_same_model"] is False


def test_train_step_benchmark_interleaves_rounds_with_the_peer_and_reports_medians(capsys, tmp_path):
    peer = tmp_path / "peer_step.py"
    peer.write_text(PEER_SCRIPT)
    code = train_step.main([
        "--batch-size", "8", "--steps", "2", "--hidden-dim", "32", "--queue-size", "64", "--window-length", "128",
        "--matmul-size", "64", "--rounds", "3", "--torch-peer", str(peer)])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    rates = result["samples_per_s_by_round"]
    assert result["rounds"] == 3 and len(rates) == 3 and all(rate > 0 for rate in rates)
    assert result["samples_per_s"] == sorted(rates)[1]  # the median round's record
    assert result["torch_peer_samples_per_s_by_round"] == [4.0, 4.0, 4.0]
    assert result["ratio_to_torch_peer_by_round"] == [pytest.approx(rate / 4.0, rel=1e-3) for rate in rates]
    assert result["ratio_to_torch_peer"] == pytest.approx(sorted(rates)[1] / 4.0, rel=1e-3)
    assert "medians over 3 rounds" in out
    assert train_step.main(["--batch-size", "8", "--rounds", "0"]) == 1
    assert "--rounds must be positive" in capsys.readouterr().err


def test_train_step_benchmark_rejects_a_bad_override(capsys):
    code = train_step.main(["--batch-size", "8", "--steps", "1", "--config-override", "objective.no_such=1"])
    assert code == 1
    assert "objective.no_such" in capsys.readouterr().err
    assert train_step.main(["--batch-size", "8", "--torch-peer", "no/such/peer.py"]) == 1
    assert "no/such/peer.py: no such file" in capsys.readouterr().err


def test_input_pipeline_benchmark_reports_steady_state_rates_per_worker_count(capsys):
    code = input_pipeline.main(["--records", "64", "--batch-size", "8", "--records-per-shard", "20",
                                "--step-samples-per-s", "10", "--workers", "0,1", "--prefetch", "1",
                                "--warmup", "1", "--batches", "20", "--decode-rounds", "1"])
    assert code == 0
    result = final_json(capsys)
    assert result["step_rate_source"] == "given" and result["timed_batches"] == 20
    assert sorted(result["records_per_s_by_workers"]) == ["0", "1"]
    for workers, rate in result["records_per_s_by_workers"].items():
        assert rate > 0
        assert result["ratio_to_step_by_workers"][workers] == pytest.approx(rate / 10.0, rel=1e-2)
    assert result["decode_speedup"] == pytest.approx(
        result["decode_records_per_s"] / result["decode_protobuf_records_per_s"], rel=1e-2)


def test_input_pipeline_benchmark_refuses_too_few_timed_batches(capsys):
    assert input_pipeline.main(["--records", "64", "--batch-size", "8", "--workers", "1",
                                "--prefetch", "2", "--batches", "30"]) == 1
    assert "at least 10x the 4 batches buffered" in capsys.readouterr().err


def test_main_loop_benchmark_compares_the_loop_with_its_step(capsys):
    code = main_loop.main(["--records", "48", "--batch-size", "8", "--steps", "6", "--log-every", "2",
                           "--workers", "0", "--prefetch", "1", "--hidden-dim", "32", "--window-length", "128",
                           "--queue-size", "64", "--step-steps", "2"])
    assert code == 0
    result = final_json(capsys)
    assert result["steps"] == 6 and result["timed_loop_steps"] == 4 and result["workers"] == 0
    assert result["loop_samples_per_s"] > 0 and result["step_samples_per_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["loop_samples_per_s"] / result["step_samples_per_s"], rel=1e-2)


def test_data_prep_benchmark_measures_each_n_in_its_own_process(capsys):
    code = data_prep.main(["--recordings", "1,2", "--seconds", "6", "--rate", "100"])
    assert code == 0
    result = final_json(capsys)
    assert [row["recordings"] for row in result["rows"]] == [1, 2]
    # 6 s at 50 Hz = 300 samples: windows of 250 every 125 give one window per recording.
    assert [row["windows"] for row in result["rows"]] == [1, 2]
    assert all(row["peak_rss_mb"] >= row["rss_after_imports_mb"] > 0 for row in result["rows"])


def test_data_prep_benchmark_rejects_recordings_shorter_than_a_window(capsys):
    assert data_prep.main(["--recordings", "1", "--seconds", "2"]) == 1
    assert "shorter than one 5 s window" in capsys.readouterr().err


def test_data_prep_workers_benchmark_runs_each_worker_count_on_generated_videos(capsys):
    code = data_prep_workers.main(["--workers", "1,2", "--beam-workers", "0", "--recordings", "2", "--seconds", "8",
                                   "--narration-every", "2", "--width", "64", "--height", "48", "--towers", "none"])
    assert code == 0
    result = final_json(capsys)
    assert [row["run"] for row in result["rows"]] == ["local 1 worker", "local 2 workers"]
    # narrations at 2, 4 and 6 s of each 8 s recording, all with a whole 5 s window
    assert result["narrations"] == 6 and [row["windows"] for row in result["rows"]] == [6, 6]
    one, two = result["rows"]
    assert one["worker_peak_rss_mb"] == one["driver_peak_rss_mb"] > 0 and two["worker_peak_rss_mb"] > 0
    assert two["speedup"] == pytest.approx(one["seconds"] / two["seconds"], rel=0.05)  # same windows


def test_peak_memory_sees_a_child_that_holds_80_mb(capsys):
    code = peak_memory.main(["--", sys.executable, "-c", "block = bytearray(80 * 2**20); block[::4096] = b'x' * 20480"])
    assert code == 0
    assert final_json(capsys)["peak_rss_mb"] >= 80


def test_peak_memory_reports_a_failing_command(capsys):
    assert peak_memory.main(["--", sys.executable, "-c", "raise SystemExit(3)"]) == 1
    assert "exited with status 3" in capsys.readouterr().err


def test_accelerator_benchmark_runs_small_on_cpu_and_prints_one_table(tmp_path):
    """The one-command GPU/TPU benchmark at smoke sizes, in a subprocess with XLA's cheap compile flags."""
    from tests.train_fixtures import repo_root

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.accelerator", "--batch-sizes", "8", "--dtypes", "float32",
         "--steps", "1", "--parts-windows", "4", "--parts-repeats", "1", "--matmul-size", "128",
         "--hidden-dim", "32", "--queue-size", "64", "--window-length", "128"],
        cwd=repo_root(), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert [(s["batch_size"], s["compute_dtype"]) for s in result["steps"]] == [(8, "float32")]
    step = result["steps"][0]
    assert step["samples_per_s"] > 0 and step["mfu_peak"] == "float32_default"
    assert step["mfu"] == pytest.approx(step["gflops_per_s"] / result["matmul_gflops_per_s"]["float32_default"], rel=1e-2)
    assert set(result["matmul_gflops_per_s"]) == {"float32_highest", "float32_default", "bfloat16"}
    assert all(result["parts"]["float32"][part] > 0 for part in ("conv_stack_ms", "gru_ms", "gru_matmuls_ms", "encoder_ms"))
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| measurement | float32 | bfloat16 |"
    assert any(line.startswith("| step B=8: samples/s |") for line in table)
    assert any(line.startswith("| GRU fwd+bwd, 4 windows: ms |") for line in table)
    assert any(line.startswith("| GRU matmuls alone fwd+bwd, 4 windows: ms |") for line in table)
    assert any(line.startswith("| matmul peak 128^2: TFLOP/s |") for line in table)


def test_input_normalisation_benchmark_probes_statistics_before_and_after_groupnorm(capsys, tmp_path, monkeypatch):
    from benchmarks import input_normalisation
    from tests.test_suite import write_labelled

    x = np.random.default_rng(0).normal(3.0, 2.0, (4, 50, 6)).astype(np.float32)
    standardized = input_normalisation.group_standardize(x).reshape(4, 50, 2, 3)
    np.testing.assert_allclose(standardized.mean(axis=(1, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(standardized.std(axis=(1, 3)), 1.0, rtol=1e-4)
    path = write_labelled(tmp_path / "d", per_class=(3, 3, 3))
    monkeypatch.setattr(sys, "argv", ["input_normalisation", "--dataset", f"d={path}"])
    input_normalisation.main()
    means = final_json(capsys)
    assert set(means) == {"d, raw windows", "d, after input GroupNorm"}
    assert all(set(m) == {"1", "2", "5"} and all(0 <= a <= 1 for a in m.values()) for m in means.values())


def test_records_keep_four_significant_figures_of_small_and_large_values():
    # a fixed count of decimals turned a speed-up of 0.0095 into 0.01 (CI failed on that once)
    assert common.significant(0.009499683) == 0.0095
    assert common.significant(123456.7) == 123500.0
    assert common.significant(2.0 / 3.0, 6) == 0.666667
