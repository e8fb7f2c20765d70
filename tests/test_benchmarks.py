"""Smoke tests: each benchmark runs end to end with tiny arguments and ends with one JSON line.

No timing is asserted; only that the reported numbers exist, are consistent and positive.
"""
import json
import sys

import pytest

from benchmarks import data_prep, input_pipeline, main_loop, peak_memory, train_step


def final_json(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def test_train_step_benchmark_reports_rates_and_flops(capsys):
    code = train_step.main([
        "--batch-size", "8", "--steps", "2", "--hidden-dim", "32", "--queue-size", "64",
        "--window-length", "128", "--matmul-size", "64"])
    assert code == 0
    result = final_json(capsys)
    for field in ("samples_per_s", "gflops_per_s", "matmul_ratio", "batch_size", "devices"):
        assert field in result
    assert result["batch_size"] == 8 and result["devices"] == 4
    assert result["samples_per_s"] > 0 and result["step_gflop"] > 0 and result["compile_s"] > 0
    assert result["matmul_ratio"] == pytest.approx(result["gflops_per_s"] / result["matmul_gflops_per_s"], rel=1e-2)


def test_train_step_benchmark_rejects_a_bad_override(capsys):
    code = train_step.main(["--batch-size", "8", "--steps", "1", "--config-override", "objective.no_such=1"])
    assert code == 1
    assert "objective.no_such" in capsys.readouterr().err


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


def test_peak_memory_sees_a_child_that_holds_80_mb(capsys):
    code = peak_memory.main(["--", sys.executable, "-c", "block = bytearray(80 * 2**20); block[::4096] = b'x' * 20480"])
    assert code == 0
    assert final_json(capsys)["peak_rss_mb"] >= 80


def test_peak_memory_reports_a_failing_command(capsys):
    assert peak_memory.main(["--", sys.executable, "-c", "raise SystemExit(3)"]) == 1
    assert "exited with status 3" in capsys.readouterr().err
