"""Ahead-of-time compilation for TPU topologies on the CPU (libtpu describes the devices).

The steps compile with a narrow encoder (8 conv channels, so 7 GRU steps) to keep XLA's TPU
compile to seconds; the formulation test lowers the default encoder.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from configs import default
from primus_jax import compile as aot
from primus_jax import topology, train, trainconfig

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = {"conv_channels": 8, "hidden_dim": 48, "ssl_dim": 40, "mm_dim": 24}


def _small_config(queue_size: int = 128):
    config = default.get_config()
    config.model.update(SMALL_MODEL)
    config.queue.size = queue_size
    return config


@pytest.fixture(scope="module")
def single_host():
    """v5e:2x2 (4 chips, 1 host), 4 windows per chip: the train and eval steps compiled."""
    topo = topology.describe("v5e:2x2")
    config, steps, refusal = aot.compile_for_topology(_small_config(), topo, window_length=250, per_chip_batch=4)
    return topo, config, steps, refusal


def test_single_host_topology_compiles_within_the_chips_hbm(single_host):
    topo, config, steps, refusal = single_host
    assert (topo.chips, topo.hosts, len(topo.devices), topo.generation) == (4, 1, 4, "v5e")
    assert refusal is None and set(steps) == {"train", "eval"}
    assert topo.hbm_bytes_per_device == 16 * 2**30
    for report, _ in steps.values():
        parts = report.state_bytes + report.queue_bytes + report.batch_bytes
        assert 0 < parts <= report.total_bytes <= topo.hbm_bytes_per_device
        assert report.temp_bytes > 0 and report.code_bytes > 0
        # XLA counts elementwise work too; flops.py counts the matmuls, which dominate.
        assert 0.9 * report.analytic_flops <= report.xla_flops <= 1.5 * report.analytic_flops
    # The queue's 128 slots are split over the 4 devices: 32 slots of (40 + 24 + 24) float32 + 3 flags.
    assert steps["train"][0].queue_bytes == 32 * ((40 + 24 + 24) * 4 + 3) + 4
    table = aot.format_table(topo, config, steps)
    assert "total per device" in table and "not step times" in table
    line = json.loads(json.dumps(aot.summary(topo, config, steps, refusal)))
    assert line["chips"] == 4 and line["fits"] and line["steps"]["train"]["total_bytes"] > 0


def test_no_device_builds_a_global_batch_by_global_batch_logits_matrix(single_host):
    _, config, steps, _ = single_host
    g = config.train.global_batch_size
    assert g == 16
    hlo = steps["train"][1]
    assert re.search(rf"\[4,{g}\]", hlo)  # each device's 4 rows against the 16 gathered embeddings
    assert not re.search(rf"\[{g},{g}\]", hlo)
    assert re.search(rf"\[{g},32\]", hlo)  # the look-up: the 16 gathered queries against the 32 local slots
    collectives = steps["train"][0].collectives
    assert collectives["all-gather"]["count"] > 0 and collectives["all-gather"]["bytes"] > 0


def test_multi_host_topology_compiles():
    topo = topology.describe("v5e:4x4")
    assert (topo.chips, topo.hosts) == (16, 4)
    config, steps, refusal = aot.compile_for_topology(_small_config(), topo, per_chip_batch=2, steps=("train",))
    report = steps["train"][0]
    assert refusal is None and config.train.global_batch_size == 32
    assert report.total_bytes <= topo.hbm_bytes_per_device
    assert report.collectives["all-reduce"]["count"] > 0  # the gradients


def _lowered_text(devices):
    config = default.get_config()
    config.train.global_batch_size = 8
    config.queue.size = 8
    mesh = train.make_mesh(devices)
    dims = trainconfig.DataDims(window_length=250, rate_hz=50.0, text_dim=512, video_dim=512)
    train_step, _ = train.make_steps(config, dims, mesh, 10)
    state, batch = aot.abstract_inputs(config, dims, mesh)
    return train_step.lower(state, batch).as_text()


def test_the_formulation_follows_the_platform_of_the_mesh_not_of_the_machine():
    assert jax.default_backend() == "cpu"
    tpu = _lowered_text(topology.describe("v5e:2x2").devices)
    cpu = _lowered_text(jax.devices())
    # TPU: the 31 GRU steps unrolled (no loop) and the convolutions as im2col matmuls.
    assert "stablehlo.while" not in tpu and "stablehlo.convolution" not in tpu
    assert "stablehlo.while" in cpu and "stablehlo.convolution" in cpu
    mesh = train.make_mesh(topology.describe("v5e:2x2").devices)
    model = train.with_formulation(default.get_config(), mesh).model
    assert (model.conv_impl, model.gru_unroll) == ("matmul", True)
    # A chosen formulation is kept, and the exported model config builds the same encoder.
    chosen = default.get_config()
    with chosen.unlocked():
        chosen.model.gru_unroll = 4
    assert train.with_formulation(chosen, mesh).model.gru_unroll == 4
    assert trainconfig.build_model(model).gru_unroll is True and trainconfig.build_model(model).conv_impl == "matmul"


def _run_compile(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "primus_jax.compile", "--config", str(REPO / "configs/default.py"),
                           *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_a_step_over_the_hbm_is_refused_with_one_sentence():
    # 4,500,001 slots do not divide over 4 devices, so the queue is replicated: 17.5 GiB per v5e chip.
    overrides = [f"--config.model.{k}={v}" for k, v in SMALL_MODEL.items() if k != "mm_dim"]
    done = _run_compile("--topology", "v5e:2x2", "--per_chip_batch", "2", "--config.model.mm_dim=512",
                        "--config.queue.size=4500001", *overrides)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    # XLA itself refuses to compile it (it allots a v5e device 15.75 of its 16 GiB), with both numbers.
    assert re.fullmatch(r"error: the train step needs 1\d\.\d\d GiB per device, more than the 1\d\.\d\d GiB of HBM "
                        r"of a v5e device; reduce it with .*queue\.size \(a multiple of the 4 devices is sharded\).*",
                        last), last
    assert not json.loads(done.stdout.strip().splitlines()[-1])["fits"]


def test_bad_topologies_and_batches_get_one_sentence_before_any_compile():
    with pytest.raises(topology.TopologyError, match=r"^unknown TPU topology 'v5x:2x2'; accepted: GENERATION:SHAPE .*"
                                                      r"v5e:16x16 \(v5e-256\)"):
        topology.describe("v5x:2x2")
    with pytest.raises(topology.TopologyError, match="a job needs at least one slice of v5e:2x2"):
        topology.describe("v5e:2x2", num_slices=0)
    with pytest.raises(topology.TopologyError, match=r"^libtpu cannot form 1 slice\(s\) of v5e:3x3: .*not divisible"):
        topology.describe("v5e:3x3")
    config = _small_config()
    config.train.global_batch_size = 30
    with pytest.raises(trainconfig.ConfigError, match="global_batch_size=30 is not divisible by the 4 devices"):
        aot.compile_for_topology(config, topology.describe("v5e:2x2"))


def test_two_slices_form_one_data_axis_ordered_slice_by_slice():
    topo = topology.describe("v5e:2x2", num_slices=2)
    assert (topo.chips, topo.hosts, topo.num_slices) == (8, 2, 2)
    mesh = train.make_mesh(topo.devices)
    assert mesh.shape == {"data": 8}
    assert [d.slice_index for d in mesh.devices.flat] == [0] * 4 + [1] * 4


def test_collectives_are_counted_with_their_result_bytes():
    hlo = """
      %ag = bf16[64,512]{1,0} all-gather(bf16[16,512]{1,0} %x), dimensions={0}
      %ars = (f32[8]{0}, s32[4]{0}) all-reduce-start(f32[8]{0} %a, s32[4]{0} %b), to_apply=%add
      %ard = (f32[8]{0}, s32[4]{0}) all-reduce-done((f32[8]{0}, s32[4]{0}) %ars)
      %cps = (f32[16,512]{1,0}, f32[16,512]{1,0}, u32[], u32[]) collective-permute-start(f32[16,512]{1,0} %y)
    """
    assert aot.collectives(hlo) == {"all-gather": {"count": 1, "bytes": 64 * 512 * 2},
                                    "all-reduce": {"count": 1, "bytes": 8 * 4 + 4 * 4},
                                    "collective-permute": {"count": 1, "bytes": 16 * 512 * 4}}


def test_the_two_commands_import_into_one_process_and_define_no_flags():
    """main and compile both take --config; importing either (as this file and test_gcs do in one
    pytest worker) must define no absl flag, or absl refuses the second definition."""
    from absl import flags

    from primus_jax import main

    assert "config" not in flags.FLAGS and "topology" not in flags.FLAGS
    assert callable(main.define_flags) and callable(aot.define_flags)
