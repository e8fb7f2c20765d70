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


def test_torch_peer_is_the_default_peer_and_is_the_reference_sized_model():
    import torch

    from benchmarks import torch_peer

    assert train_step.build_parser().parse_args(["--torch-peer"]).torch_peer == train_step.TORCH_PEER
    assert train_step.build_parser().parse_args([]).torch_peer == ""
    assert os.path.isfile(train_step.TORCH_PEER)
    assert sum(p.numel() for p in torch_peer.Encoder().parameters()) == 1_376_204
    # every row of the augmented view is a permutation of its time steps made of 5 contiguous runs
    x = torch.arange(3 * 6 * 40, dtype=torch.float32).reshape(3, 6, 40)
    y = torch_peer.segment_permutation(x, torch.Generator().manual_seed(0))
    for b in range(3):
        assert torch.equal(torch.sort(y[b, 0]).values, x[b, 0])
        assert torch.equal(y[b] - y[b, :1], x[b] - x[b, :1])  # the same gather for all six channels
        assert int((y[b, 0].diff() != 1).sum()) <= 4


def test_torch_peer_runs_a_step_and_records_its_line(tmp_path, capsys):
    from benchmarks import torch_peer

    assert torch_peer.main(["--batch-size", "4", "--steps", "1", "--warmup-steps", "1", "--record", str(tmp_path)]) == 0
    result = final_json(capsys)
    assert result["batch_size"] == 4 and result["samples_per_s"] > 0 and np.isfinite(result["final_loss"])
    (line,) = (tmp_path / "torch_peer.jsonl").read_text().splitlines()
    assert json.loads(line)["result"] == result


def test_record_appends_the_result_with_command_commit_machine_and_load(tmp_path):
    from tests.train_fixtures import repo_root

    head = subprocess.run(["git", "-C", repo_root(), "rev-parse", "HEAD"], capture_output=True, text=True)
    expected_commit = head.stdout.strip() if head.returncode == 0 else "unknown"
    for value in (1, 2):
        path = common.record_result(str(tmp_path / "records"), "main_loop", {"ratio": value}, ["--steps", "6"])
    lines = [json.loads(line) for line in open(path)]
    assert path.endswith("main_loop.jsonl") and [line["result"] for line in lines] == [{"ratio": 1}, {"ratio": 2}]
    first = lines[0]
    assert first["command"] == "python -m benchmarks.main_loop --steps 6" and first["commit"] == expected_commit
    assert first["machine"] == {"cpu": common.cpu_model(), "cores": os.cpu_count()}
    assert first["load_avg_1min"] >= 0 and first["date"].endswith("Z") and isinstance(first["dirty"], bool)


def test_a_benchmark_given_record_appends_the_json_line_it_prints(tmp_path, capsys):
    assert peak_memory.main(["--record", str(tmp_path), "--", sys.executable, "-c", "pass"]) == 0
    printed = final_json(capsys)
    (line,) = (tmp_path / "peak_memory.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["result"] == printed and record["benchmark"] == "peak_memory"
    assert record["command"] == f"python -m benchmarks.peak_memory -- {sys.executable} -c pass"  # no --record DIR
    assert common.without_record_argument(["--a", "--record", "d", "--record=e", "b"]) == ["--a", "b"]


def _main_loop_record(date: str, command: str, loop_rate: float) -> dict:
    return {"benchmark": "main_loop", "command": command, "date": date, "commit": "0123456789abcdef", "dirty": False,
            "machine": {"cpu": "Some CPU", "cores": 2}, "load_avg_1min": 1.5,
            "result": {"batch_size": 64, "workers": 1, "loop_samples_per_s": loop_rate,
                       "step_samples_per_s": 300.0, "ratio": loop_rate / 300.0}}


def test_report_rewrites_only_the_marked_tables_with_the_newest_record_per_command(tmp_path, capsys):
    from benchmarks import report

    records = tmp_path / "records"
    records.mkdir()
    lines = [_main_loop_record("2026-01-02T00:00:00Z", "python -m benchmarks.main_loop", 250.0),
             _main_loop_record("2026-01-01T00:00:00Z", "python -m benchmarks.main_loop --steps 30", 111.0),
             _main_loop_record("2026-01-03T00:00:00Z", "python -m benchmarks.main_loop", 302.4)]
    (records / "main_loop.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nProse before.\n\n<!-- report: main_loop -->\nstale\n"
                   "<!-- end report: main_loop -->\n\nProse after.\n")
    arguments = ["--records", str(records), "--doc", str(doc)]
    assert report.main(arguments + ["--check"]) == 1
    assert report.main(arguments) == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nProse before.\n\n<!-- report: main_loop -->\n| date | commit |")
    assert text.endswith("<!-- end report: main_loop -->\n\nProse after.\n") and "stale" not in text
    rows = [line for line in text.splitlines() if line.startswith("| 2026")]
    # the rerun of a command replaces its row; the other command keeps its own; oldest first
    assert len(rows) == 2 and "| 111 |" in rows[0] and "| 302.4 |" in rows[1] and "250" not in text
    assert rows[1].startswith("| 2026-01-03 | 0123456 | Some CPU, 2 cores | 1.5 | 64 | 1 | 302.4 | 300 | 1.01 |")
    assert report.main(arguments + ["--check"]) == 0


def test_report_refuses_records_without_a_block_and_a_block_without_records(tmp_path, capsys):
    from benchmarks import report

    records = tmp_path / "records"
    records.mkdir()
    (records / "main_loop.jsonl").write_text(json.dumps(_main_loop_record("2026-01-01T00:00:00Z", "c", 1.0)) + "\n")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("no blocks\n")
    assert report.main(["--records", str(records), "--doc", str(doc)]) == 1
    assert "main_loop.jsonl has no block in" in capsys.readouterr().err
    doc.write_text("<!-- report: main_loop -->\n<!-- end report: main_loop -->\n"
                   "<!-- report: train_step -->\n<!-- end report: train_step -->\n")
    assert report.main(["--records", str(records), "--doc", str(doc)]) == 1
    assert "has a block for 'train_step' but" in capsys.readouterr().err
    assert doc.read_text().count("<!-- report:") == 2  # nothing written


def test_the_repository_benchmark_tables_are_generated_from_its_records():
    from benchmarks import report
    from tests.train_fixtures import repo_root

    docs = os.path.join(repo_root(), "docs")
    assert report.main(["--records", os.path.join(docs, "benchmarks"), "--doc", os.path.join(docs, "benchmarks.md"),
                        "--check"]) == 0


def test_torch_peer_info_nce_is_ours(float32_matmuls):
    import torch

    from benchmarks import torch_peer
    from primus_jax import losses

    rng = np.random.default_rng(0)
    query, key = rng.standard_normal((2, 8, 16)).astype(np.float32)
    for mask in (np.ones(8, np.float32), np.array([1, 0, 1, 1, 0, 1, 1, 1], np.float32), np.zeros(8, np.float32)):
        theirs = torch_peer.info_nce(torch.from_numpy(query), torch.from_numpy(key), torch.tensor(0.1),
                                     torch.from_numpy(mask))
        ours = losses.info_nce(query, key, np.float32(0.1), mask)
        np.testing.assert_allclose(float(theirs), float(ours), rtol=1e-5, atol=1e-6)


def test_input_normalisation_records_its_means_and_report_tabulates_them(capsys, tmp_path):
    from benchmarks import input_normalisation, report
    from tests.test_suite import write_labelled

    path = write_labelled(tmp_path / "d", per_class=(3, 3, 3))
    input_normalisation.main(["--dataset", f"d={path}", "--record", str(tmp_path / "records")])
    means = final_json(capsys)
    (record,) = report.read_records(str(tmp_path / "records" / "input_normalisation.jsonl"))
    assert record["result"] == {"benchmark": "input_normalisation", "mean_accuracy": means}
    table = report.table("input_normalisation", [record]).splitlines()
    assert table[0].startswith("| date | commit | machine | load | dataset, features | 1-shot | 2-shot | 5-shot |")
    assert len(table) == 4 and f"| {means['d, raw windows']['5']:.3f} |" in table[2]
