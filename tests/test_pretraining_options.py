"""The pod-scale options of the pretraining job: evaluators, a profile window, dataset mixtures,
learning-rate schedules and clipping (configs/pod.py), alone and together, and exact resume with
all of them on."""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from primus_jax import data, evaluators, optimizer, profiling, train, trainconfig
from tests.train_fixtures import TINY_DIM, TINY_T, export_params, run_main, tiny_config, tiny_overrides, write_tiny_dataset

CLASSES = ["walk", "run", "sit", "stand"]


def write_labelled_dataset(out_dir: str, per_class: dict[str, int], seed: int = 0) -> str:
    """A labelled dataset as data_prep.har writes one: class names, prompts, text = class prototype."""
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((len(CLASSES), TINY_DIM)).astype(np.float32)
    prompts = {c: [f"a person {c}ing", f"someone is {c}ing"] for c in CLASSES}
    with data.DatasetWriter(out_dir, T=TINY_T, rate_hz=50.0, text_dim=TINY_DIM, video_dim=0, class_names=CLASSES,
                            extra={"prompts": prompts}) as writer:
        for split, n in per_class.items():
            for i in range(n * len(CLASSES)):
                label = i % len(CLASSES)
                t = np.linspace(0, 2 * np.pi * (1 + 2 * label), TINY_T)[:, None]
                imu = (np.sin(t * np.arange(1, 7)) + 0.2 * rng.standard_normal((TINY_T, 6))).astype(np.float32)
                writer.add(split, data.Window(
                    imu=imu, rate_hz=50.0, text=prompts[CLASSES[label]][0], text_emb=prototypes[label],
                    label=label, source="test", recording_id=f"r{i}", subject=f"s{i % 2}",
                    start_s=0.0, end_s=TINY_T / 50.0))
    return out_dir


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """<root>/egoexo4d (48 train windows) and <root>/ego4d (24, other content), and a labelled eval set."""
    root = tmp_path_factory.mktemp("prepared")
    write_tiny_dataset(str(root / "egoexo4d"), n_train=48, n_val=16, seed=0)
    write_tiny_dataset(str(root / "ego4d"), n_train=24, n_val=16, seed=1)
    write_labelled_dataset(str(root / "downstream"), {"train": 4, "test": 3})
    return str(root)


# --------------------------------------------------------------------------- mixtures

def test_mixture_spec_and_allocation():
    assert data.parse_mixture("egoexo4d:0.7, ego4d:0.3", "gs://b/prepared") == [
        data.MixtureSource("egoexo4d", "gs://b/prepared/egoexo4d", 0.7),
        data.MixtureSource("ego4d", "gs://b/prepared/ego4d", 0.3)]
    listed = data.parse_mixture(("/abs/a:2", ("gs://b/c", 1)), "/root")
    assert [(s.dataset_dir, s.weight) for s in listed] == [("/abs/a", 2.0), ("gs://b/c", 1.0)]
    for bad, problem in (("a", "must be 'name:weight'"), ("a:x", "is not a number"), ("a:-1", "positive"),
                         ("a:1,a:2", "twice")):
        with pytest.raises(ValueError, match=problem):
            data.parse_mixture(bad)
    allocate = data.mixture.allocate
    assert allocate([0.7, 0.3], 64) == [45, 19]  # 44.8 / 19.2: largest remainder
    assert allocate([0.7, 0.3], 64, process_count=4) == [44, 20]  # 16 units of 4: 11.2 / 4.8
    assert allocate([1, 1, 1], 8) == [3, 3, 2]
    with pytest.raises(ValueError, match="gives it no record"):
        allocate([0.99, 0.01], 16)


def _row_owner(datasets: str) -> dict[bytes, str]:
    return {imu.tobytes(): name for name in ("egoexo4d", "ego4d")
            for imu in data.load_split(os.path.join(datasets, name), "train")["imu"]}


def test_mixture_iterator_draws_each_batch_in_proportion_and_resumes_exactly(datasets):
    sources = data.parse_mixture("egoexo4d:3,ego4d:1", datasets)
    owner = _row_owner(datasets)
    mix = data.MixtureIterator(sources, "train", 8, seed=3, process_index=0, process_count=1, prefetch=0)
    assert mix.batch_sizes == [6, 2] and mix.shares == {"egoexo4d": 0.75, "ego4d": 0.25}
    assert mix.steps_per_epoch == (48 + 24) // 8
    batches = [next(mix) for _ in range(14)]  # 1.75 epochs of egoexo4d (8 steps each), 1.17 of ego4d (12)
    for batch in batches:
        assert [owner[imu.tobytes()] for imu in batch["imu"]] == ["egoexo4d"] * 6 + ["ego4d"] * 2
    assert mix.epochs_seen() == {"egoexo4d": 14 / 8, "ego4d": 14 / 12}
    mix.close()

    again = data.MixtureIterator(sources, "train", 8, seed=3, process_index=0, process_count=1, prefetch=0)
    for _ in range(5):
        next(again)
    state = json.loads(json.dumps(again.get_state()))  # as the checkpoint stores it
    again.close()
    resumed = data.MixtureIterator(sources, "train", 8, seed=3, process_index=0, process_count=1, prefetch=0)
    resumed.set_state(state)
    for expected in batches[5:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    with pytest.raises(ValueError, match="this run mixes"):
        resumed.set_state({"epoch": 0, "batch": 1})  # a single dataset's position
    resumed.close()


def test_two_processes_read_the_halves_of_each_datasets_share(datasets):
    sources = data.parse_mixture("egoexo4d:3,ego4d:1", datasets)
    owner = _row_owner(datasets)
    one = data.MixtureIterator(sources, "train", 8, seed=5, process_index=0, process_count=1, prefetch=0)
    halves = [data.MixtureIterator(sources, "train", 8, seed=5, process_index=p, process_count=2, prefetch=0)
              for p in range(2)]
    for _ in range(3):
        whole = next(one)
        parts = [next(h) for h in halves]
        for part in parts:  # each process: 3 of egoexo4d's 6, 1 of ego4d's 2
            assert [owner[imu.tobytes()] for imu in part["imu"]] == ["egoexo4d"] * 3 + ["ego4d"]
        assert sorted(imu.tobytes() for part in parts for imu in part["imu"]) == sorted(
            imu.tobytes() for imu in whole["imu"])
    for it in (one, *halves):
        it.close()


def test_mixture_of_mismatched_datasets_fails_before_compiling(datasets, tmp_path):
    other = write_tiny_dataset(str(tmp_path / "wide"), n_train=16, n_val=8, text_dim=8)
    config = tiny_config(datasets, data__mixture=f"egoexo4d:1,{other}:1")
    with pytest.raises(trainconfig.ConfigError) as caught:
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert str(caught.value).startswith(
        f"data.mixture: datasets 'egoexo4d' and '{other}' differ in text_dim (16 and 8)")
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


# --------------------------------------------------------------------------- schedules and clipping

def _optim(**fields) -> ml_collections.ConfigDict:
    from configs import default

    optim = default.get_config().optim
    optim.update(fields)
    return optim


def test_schedules_follow_their_formulas():
    eta, w, d, f = 1e-3, 4, 20, 0.1
    cosine = optimizer.learning_rate_schedule(_optim(learning_rate=eta, schedule="cosine", warmup_steps=w,
                                                     end_learning_rate_factor=f), d)
    linear = optimizer.learning_rate_schedule(_optim(learning_rate=eta, schedule="linear", warmup_steps=w,
                                                     decay_steps=d, end_learning_rate_factor=f), 1000)
    warm = optimizer.learning_rate_schedule(_optim(learning_rate=eta, warmup_steps=w), 0)
    for n in (0, 1, 3, 4, 5, 12, 19, 20, 25):
        ramp = eta * n / w
        frac = min(n - w, d - w) / (d - w)
        want_cos = ramp if n < w else f * eta + (1 - f) * eta * (1 + math.cos(math.pi * frac)) / 2
        want_lin = ramp if n < w else eta + (f * eta - eta) * frac
        assert float(optimizer.learning_rate_at(cosine, n)) == pytest.approx(want_cos, rel=1e-5, abs=1e-12)
        assert float(optimizer.learning_rate_at(linear, n)) == pytest.approx(want_lin, rel=1e-5, abs=1e-12)
        assert float(optimizer.learning_rate_at(warm, n)) == pytest.approx(min(ramp, eta), rel=1e-5, abs=1e-12)
    assert optimizer.learning_rate_schedule(_optim(learning_rate=eta), 0) == eta  # the paper's: plain Adam
    with pytest.raises(ValueError, match="must exceed optim.warmup_steps=4"):
        optimizer.learning_rate_schedule(_optim(schedule="cosine", warmup_steps=4), 4)
    assert optimizer.schedule_problems(_optim(schedule="step", clip_norm=-1, warmup_steps=-2)) == [
        "optim.schedule must be one of ('constant', 'cosine', 'linear'), got 'step'",
        "optim.warmup_steps and optim.decay_steps must not be negative, got -2 and 0",
        "optim.clip_norm must be positive (or 0: no clipping), got -1.0"]


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(tree))))


def test_clip_norm_scales_the_gradient_before_adam():
    params = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
    grads = {"a": jnp.array([30.0, -40.0, 0.0]), "b": jnp.full((2, 2), 1e-3)}  # global norm ~50
    norm = _norm(grads)
    clipped = optimizer.make_optimizer(_optim(learning_rate=0.1, clip_norm=2.0), 10)
    plain = optax.adam(0.1)
    state_c, state_p = clipped.init(params), plain.init(params)
    scaled = jax.tree_util.tree_map(lambda g: g * 2.0 / norm, grads)
    for _ in range(3):  # Adam's later steps depend on the gradients' scale, so clipping shows
        up_c, state_c = clipped.update(grads, state_c, params)
        up_p, state_p = plain.update(scaled, state_p, params)
        for x, y in zip(jax.tree_util.tree_leaves(up_c), jax.tree_util.tree_leaves(up_p)):
            np.testing.assert_allclose(x, y, rtol=1e-6)
        grads = jax.tree_util.tree_map(lambda g: g * 0.5, grads)
        norm = _norm(grads)
        scaled = jax.tree_util.tree_map(lambda g: g * 2.0 / norm if norm > 2.0 else g, grads)


def test_profile_window_and_evaluator_config_errors(datasets, tmp_path):
    off = profiling.StepProfiler((), str(tmp_path / "tb"))
    assert off.step(0) is off.step(1) and isinstance(off.step(2), type(contextlib.nullcontext()))
    assert profiling.profile_window_problem(()) is None
    assert profiling.profile_window_problem((3, 5)) is None
    for bad in ((5, 3), (1,), (-1, 2)):
        assert "train.profile_steps must be () or (start, stop)" in profiling.profile_window_problem(bad)
    config = tiny_config(datasets)
    config.evals.knn = dict(type="knn", every=10, data_dir=datasets)
    with pytest.raises(trainconfig.ConfigError, match=r"evals.knn: unknown evaluator type 'knn'; choose from "
                                                 r"\['fewshot', 'retrieval', 'zeroshot'\]"):
        evaluators.Evaluators(config)
    config.evals.knn = dict(type="fewshot", every=10, data_dir=datasets, shotz=(1,))
    with pytest.raises(trainconfig.ConfigError, match=r"evals.knn \(fewshot\) has unknown fields \['shotz'\]"):
        evaluators.Evaluators(config)
    config.evals.knn = dict(type="retrieval", every=0, data_dir="")
    with pytest.raises(trainconfig.ConfigError, match="every must be a positive number of steps, got 0; data_dir is empty"):
        evaluators.Evaluators(config)


def test_profiler_traces_its_window_only_and_a_bad_destination_is_one_warning(tmp_path, caplog):
    logdir = tmp_path / "tb"
    profiler = profiling.StepProfiler((1, 3), str(logdir))
    active = []
    for step in range(5):
        with profiler.step(step, lambda: jnp.ones(2)):
            jnp.ones(3).block_until_ready()
        active.append(profiler.active)
    assert active == [False, True, False, False, False]
    assert len(glob.glob(str(logdir / "plugins" / "profile" / "*" / "*.xplane.pb"))) == 1
    bad = profiling.StepProfiler((0, 1), "s3://bucket/tb")
    with caplog.at_level("WARNING", logger="primus_jax.profiling"):
        with bad.step(0, lambda: jnp.ones(2)):
            jnp.ones(3).block_until_ready()
    assert [r.getMessage() for r in caplog.records] == [
        "could not write the profile to s3://bucket/tb (s3://bucket/tb: the scheme 's3:' is not supported; use a "
        "local path or gs://bucket/path); training goes on"]


def test_a_failing_evaluator_is_reported_once_and_switched_off(datasets, caplog):
    downstream = os.path.join(datasets, "downstream")  # 4 train windows per class
    config = tiny_config(datasets)
    config.evals.few = dict(type="fewshot", every=1, data_dir=downstream, shots=(2, 5))
    config.evals.text = dict(type="retrieval", every=1, data_dir=downstream, head="emb")
    evals = evaluators.Evaluators(config)
    dims = trainconfig.DataDims.from_manifest(data.read_manifest(downstream))
    params = None  # both fail while loading their data, before any encoding
    with caplog.at_level("WARNING", logger="primus_jax.evaluators"):
        assert evals.run(1, 10, params, dims) == {}
        assert evals.run(2, 10, params, dims) == {} and len(evals) == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"evaluator 'few' (fewshot) failed at step 1 and is switched off: class 'walk' has 4 windows in split "
        f"'train' of {downstream}, fewer than k=5 shots",
        f"evaluator 'text' (retrieval) failed at step 1 and is switched off: {downstream} has 16-d text "
        f"embeddings, but the emb features are 32-d"]


# --------------------------------------------------------------------------- everything together

def _pod_config_file(tmp_path, datasets) -> str:
    """configs/pod.py plus an evaluator whose dataset does not exist."""
    path = tmp_path / "pod_test.py"
    path.write_text(
        "from configs import pod\n\n"
        "def get_config():\n"
        "    config = pod.get_config()\n"
        f"    config.evals.broken = dict(type='fewshot', every=2, data_dir={os.path.join(datasets, 'missing')!r})\n"
        "    return config\n")
    return str(path)


def _pod_overrides(datasets, text_tower, **extra) -> list[str]:
    downstream = os.path.join(datasets, "downstream")
    return tiny_overrides(
        datasets, data__mixture="egoexo4d:3,ego4d:1", optim__warmup_steps=2, train__profile_steps="(4,5)",
        data__workers=0, train__checkpoint_every=3,  # decoding workers are tested elsewhere
        evals__fewshot__every=3, evals__fewshot__data_dir=downstream, evals__fewshot__shots="(1,2)",
        evals__fewshot__trials=2,
        evals__zeroshot__every=3, evals__zeroshot__data_dir=downstream, evals__zeroshot__text_tower=text_tower,
        evals__retrieval__every=3, evals__retrieval__data_dir=downstream, **extra)


def _rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _tensorboard_tags(workdir) -> set[str]:
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
        with data.TFRecordIndex(path) as index:
            for i in range(len(index)):
                tags.update(v.tag for v in event_pb2.Event.FromString(index.read(i)).summary.value)
    return tags


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-4000:]}"
    return err


def test_pod_config_with_everything_on_writes_each_part_and_resumes_exactly(datasets, tmp_path, tiny_clip_spec):
    config_file = _pod_config_file(tmp_path, datasets)
    overrides = _pod_overrides(datasets, tiny_clip_spec)
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight = run_main(straight_dir, overrides, config=config_file)
    err = _finish(straight)
    assert "finished at step 6" in err
    # The evaluator without a dataset: one sentence, once, then off; the others and training went on.
    failures = [line for line in err.splitlines() if "evaluator 'broken'" in line]
    assert len(failures) == 1 and "failed at step 2 and is switched off: " in failures[0], failures
    assert "missing/manifest.json: no manifest found" in failures[0]

    rows = _rows(straight_dir)
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    # Cosine over the run's 6 updates after 2 of warm-up (learning_rate 1e-3, end 0); the row of
    # step s holds the rate of update n = s - 1.
    expected_lr = [0.0, 5e-4, 1e-3, 1e-3 * (1 + math.cos(math.pi / 4)) / 2, 5e-4, 1e-3 * (1 + math.cos(3 * math.pi / 4)) / 2]
    np.testing.assert_allclose([r["learning_rate"] for r in train_rows], expected_lr, rtol=1e-5, atol=1e-12)
    assert all(r["share_egoexo4d"] == 0.75 and r["share_ego4d"] == 0.25 for r in train_rows)
    assert [r["epochs_egoexo4d"] for r in train_rows] == pytest.approx([s / 8 for s in range(1, 7)])
    assert [r["epochs_ego4d"] for r in train_rows] == pytest.approx([s / 12 for s in range(1, 7)])
    assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in train_rows)

    by_name = {}
    for r in rows:
        by_name.setdefault(r["split"], []).append(r)
    assert set(by_name) == {"train", "val", "fewshot", "zeroshot", "retrieval"}
    for name in ("fewshot", "zeroshot", "retrieval"):
        assert [r["step"] for r in by_name[name]] == [3, 6]
    for r in by_name["fewshot"]:
        assert set(r) == {"step", "split", "1shot", "1shot_se", "1shot_converged", "2shot", "2shot_se", "2shot_converged",
                          "seconds"}
        assert all(0.0 <= r[k] <= 1.0 for k in ("1shot", "2shot"))
    for r in by_name["zeroshot"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["accuracy"] * 12 == pytest.approx(round(r["accuracy"] * 12))
    for r in by_name["retrieval"]:
        assert 0.0 <= r["recall_at_1"] <= r["recall_at_5"] <= 1.0 and r["recall_at_1"] * 12 == pytest.approx(round(r["recall_at_1"] * 12))

    tags = _tensorboard_tags(straight_dir)
    assert {"fewshot/1shot", "zeroshot/accuracy", "retrieval/recall_at_5", "train/learning_rate", "train/grad_norm",
            "train/share_ego4d", "val/loss"} <= tags

    traces = glob.glob(os.path.join(straight_dir, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1
    with open(traces[0], "rb") as f:
        assert b"jit_train_step" in f.read()  # the compiled step ran inside the window

    # Exact resume: the workdir as a run killed after its checkpoint of step 3 leaves it (the
    # checkpoint of step 6, the metrics lines after step 3 and the export never written), rerun.
    shutil.copytree(straight_dir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "6"))
    shutil.rmtree(os.path.join(resumed_dir, "export"))
    with open(os.path.join(resumed_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= 3)
    assert "resumed from step 3" in _finish(run_main(resumed_dir, overrides, config=config_file))
    a, b = export_params(straight_dir), export_params(resumed_dir)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    resumed_rows = _rows(resumed_dir)
    assert [(r["step"], r["split"]) for r in resumed_rows] == [(r["step"], r["split"]) for r in rows]
    for got, want in zip(resumed_rows, rows):
        for key in set(want) - {"seconds", "samples_per_s"}:
            assert got[key] == want[key], (want["step"], want["split"], key)


def test_unknown_evaluator_exits_2_before_anything_runs(datasets, tmp_path, tiny_clip_spec):
    proc = run_main(str(tmp_path / "w"), _pod_overrides(datasets, tiny_clip_spec, evals__zeroshot__type="knn"),
                    config="configs/pod.py")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: evals.zeroshot: unknown evaluator type 'knn'; choose from "
                      "['fewshot', 'retrieval', 'zeroshot']"], err[-3000:]
    assert not os.path.exists(tmp_path / "w")
