"""gs:// end to end on a real local GCS emulator (gcp-storage-emulator on 127.0.0.1).

data_prep writes a dataset to gs://, `python -m primus_jax.main` trains from it and checkpoints
to gs://, a SIGKILLed run resumes there, and `load_encoder("gs://...")` loads the export. Every
child process gets only STORAGE_EMULATOR_HOST, plus a sitecustomize audit hook that records any
Python socket connection or name lookup beyond the loopback address. Bad input: unsupported
schemes, a missing bucket (before anything compiles) and missing credentials.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from primus_jax import paths
from tests.train_fixtures import free_port, repo_root, run_main, tiny_overrides

BUCKET = "primus-test"
LOOPBACK = ("127.0.0.1", "::1", "localhost")

AUDIT_HOOK = textwrap.dedent('''
    import os, socket, sys
    _LOG = os.environ["NETWORK_AUDIT_LOG"]
    _LOOPBACK = {LOOPBACK!r}

    def _record(what):
        with open(_LOG, "a") as f:
            f.write(f"{{os.getpid()}} {{what}}\\n")

    def _audit(event, args):
        if event == "socket.connect":
            address = args[1]
            if isinstance(address, tuple) and address[0] not in _LOOPBACK:
                _record(f"connect {{address}}")
        elif event == "socket.getaddrinfo" and args[0] not in _LOOPBACK and args[0] is not None:
            _record(f"getaddrinfo {{args[0]!r}}")

    sys.addaudithook(_audit)
''').format(LOOPBACK=LOOPBACK)


# gcp-storage-emulator (2026.7.19) omits the x-goog-generation header that real GCS sends with
# every download. tensorstore needs it to update an object conditionally (Orbax's OCDBT
# manifest), and fails with "Malformed StorageGeneration" without it. The launcher adds the
# header, from the emulator's own object metadata, and then runs the emulator's usual CLI.
EMULATOR_LAUNCHER = textwrap.dedent('''
    import sys
    from gcp_storage_emulator.handlers import objects

    _download = objects.download

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
        except Exception:  # a missing object: the emulator's own download answers 404
            pass
        return _download(request, response, storage, *args, **kwargs)

    objects.download = download  # before the server module builds its route table
    from gcp_storage_emulator.__main__ import main
    sys.exit(main(sys.argv[1:]))
''')


class Emulator:
    """A gcp-storage-emulator process on a free loopback port, talked to over its JSON API."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-c", EMULATOR_LAUNCHER, "start", "--host", "127.0.0.1",
             "--port", str(self.port), "--in-memory", "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.request("GET", "/storage/v1/b")
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the GCS emulator did not start")
                time.sleep(0.2)

    def request(self, method: str, path: str, body: dict | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.read()

    def create_bucket(self, name: str) -> None:
        self.request("POST", "/storage/v1/b?project=test", {"name": name})

    def objects(self, prefix: str) -> dict[str, int]:
        """name -> size of the objects under prefix."""
        listing = json.loads(self.request("GET", f"/storage/v1/b/{BUCKET}/o?prefix={urllib.parse.quote(prefix)}"))
        return {item["name"]: int(item["size"]) for item in listing.get("items", [])}

    def upload(self, name: str, content: bytes) -> None:
        req = urllib.request.Request(
            f"{self.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={urllib.parse.quote(name, safe='')}",
            data=content, method="POST", headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=30) as response:
            response.read()

    def download(self, name: str) -> bytes:
        return self.request("GET", f"/download/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def emulator():
    server = Emulator()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture()
def audited_env(tmp_path):
    """Environment for a child process: the audit hook first on PYTHONPATH, no GCS settings inherited."""
    hook_dir = tmp_path / "audit"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_APPLICATION_CREDENTIALS")}
    env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), repo_root(), env.get("PYTHONPATH", "")])
    env["NETWORK_AUDIT_LOG"] = str(tmp_path / "network.log")
    return env


def network_log(env: dict) -> str:
    path = env["NETWORK_AUDIT_LOG"]
    return open(path).read() if os.path.exists(path) else ""


def write_csv_recordings(folder) -> str:
    """Six 12-s recordings of 6 subjects at 50 Hz in g units (header t,ax..gz) and labels.csv."""
    rng = np.random.default_rng(0)
    rows = ["file,label,subject"]
    for k, subject in enumerate("ABCDEF"):
        t = np.arange(600) / 50.0
        acc = rng.normal(0, 0.05, (600, 3)) + [0, 0, 1] + 0.2 * np.sin(2 * np.pi * (k + 1) * t)[:, None]
        imu = np.column_stack([t, acc, rng.normal(0, 0.3, (600, 3))])
        name = f"rec{k}.csv"
        with open(folder / name, "w") as f:
            f.write("t,ax,ay,az,gx,gy,gz\n")
            f.writelines(",".join(f"{v:.6f}" for v in row) + "\n" for row in imu)
        rows.append(f"{name},{'walking' if k % 2 else 'sitting'},{subject}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return str(folder)


def har_command(csv_dir: str, out: str) -> list[str]:
    return [sys.executable, "-m", "data_prep.har", "--dataset", "csv", "--csv-dir", csv_dir,
            "--labels", os.path.join(csv_dir, "labels.csv"), "--rate", "50", "--units", "g",
            "--heldout-subjects", "F", "--T", "128", "--hop", "64", "--text-tower", "none", "--out", out]


def wait_for_checkpoint(proc, emulator, prefix: str, timeout: float = 240) -> int:
    """The first step whose checkpoint is committed under prefix (Orbax's commit marker on GCS)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(name.split("/")[-2]) for name in emulator.objects(prefix)
                 if name.endswith("/commit_success.txt") and name.split("/")[-2].isdigit()]
        if steps:
            return min(steps)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError("no checkpoint appeared")


def test_prepare_train_kill_resume_and_load_encoder_on_gcs(emulator, audited_env, tmp_path):
    env = dict(audited_env, STORAGE_EMULATOR_HOST=emulator.url)
    csv_dir = write_csv_recordings(tmp_path)
    dataset = f"gs://{BUCKET}/route/data"

    prep = subprocess.run(har_command(csv_dir, dataset), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert prep.returncode == 0, prep.stderr[-3000:]
    written = emulator.objects("route/data/")
    assert {"route/data/manifest.json", "route/data/report.json", "route/data/dataset_info.json",
            "route/data/features.json", "route/data/label.labels.txt"} <= set(written)
    assert any(name.startswith("route/data/primus_imu_windows-train.tfrecord-") for name in written)
    assert not any(".partial" in name for name in written)
    assert not os.path.exists(tmp_path / "gs:")  # not taken as a local folder named "gs:"
    manifest = json.loads(emulator.download("route/data/manifest.json"))
    assert manifest["splits"]["train"]["records"] == 40 and manifest["splits"]["heldout"]["records"] == 8

    overrides = tiny_overrides(dataset, data__val_split="heldout", train__num_steps=6, train__eval_every=3,
                               train__profile_steps="(4,6)")
    # An uninterrupted run into a local workdir, from the same gs:// dataset, for comparison.
    straight = run_main(str(tmp_path / "straight"), overrides, env_extra=env)
    workdir = f"gs://{BUCKET}/route/run"
    killed = run_main(workdir, overrides, env_extra=env)
    first = wait_for_checkpoint(killed, emulator, "route/run/checkpoints/")
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL

    resumed = run_main(workdir, overrides, env_extra=env)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from step" in err
    resumed_from = int(err.split("resumed from step ")[1].split()[0])
    assert first <= resumed_from < 4  # killed ~0.1 s after its first checkpoint, before the profile window
    _, straight_err = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_err[-3000:]

    run_objects = emulator.objects("route/run/")
    assert {"route/run/metrics.jsonl", "route/run/export/params.msgpack", "route/run/export/encoder.json"} <= set(run_objects)
    assert any(name.startswith("route/run/tensorboard/events.out.tfevents") for name in run_objects)
    assert any(name.startswith("route/run/best/") for name in run_objects)
    profile = [name for name in run_objects if name.startswith("route/run/tensorboard/plugins/profile/")]
    assert any(name.endswith(".xplane.pb") for name in profile), profile  # copied from the local trace
    steps = [json.loads(line)["step"] for line in emulator.download("route/run/metrics.jsonl").decode().splitlines()]
    assert max(steps) == 6
    # The killed-and-resumed run on GCS ends bit for bit where the uninterrupted local one does.
    with open(tmp_path / "straight" / "export" / "params.msgpack", "rb") as f:
        assert emulator.download("route/run/export/params.msgpack") == f.read()

    load = textwrap.dedent(f'''
        import numpy as np, primus_jax
        windows = np.random.default_rng(1).normal(size=(5, 128, 6)).astype(np.float32)
        remote = primus_jax.load_encoder("{workdir}/export")(windows)
        local = primus_jax.load_encoder({str(tmp_path / "straight" / "export")!r})(windows)
        assert remote.shape == (5, 16) and np.isfinite(remote).all()
        np.testing.assert_array_equal(remote, local)
        print("loaded", remote.shape)
    ''')
    loaded = subprocess.run([sys.executable, "-c", load], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0 and "loaded (5, 16)" in loaded.stdout, loaded.stderr[-3000:]
    assert network_log(env) == ""


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_ego4d_from_gcs_to_gcs_with_two_workers_equals_the_local_run(emulator, audited_env, tmp_path,
                                                                     tiny_clip_spec):
    """Annotations, IMU CSVs and mp4s read from gs:// (videos copied locally per recording for
    PyAV) by two worker processes; the dataset equals the one prepared from the local copy."""
    from test_data_prep_parallel import EXACT_FIELDS
    from test_ego4d import NARRATIONS, make_ego4d_root

    from primus_jax.data import load_split, read_manifest

    root = make_ego4d_root(tmp_path / "root", {uid: NARRATIONS[uid] for uid in ("good", "novideo", "corrupt", "noimu")})
    for path in sorted(root.rglob("*")):
        if path.is_file():
            emulator.upload(f"ego4d/{path.relative_to(root)}", path.read_bytes())
    env = dict(audited_env, STORAGE_EMULATOR_HOST=emulator.url)
    common = ["--towers", tiny_clip_spec, "--splits", "train=0.5", "val=0.5", "--frames-per-clip", "4"]
    local = subprocess.run([sys.executable, "-m", "data_prep.ego4d", "--ego4d-root", str(root), "--out",
                            str(tmp_path / "local"), *common], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert local.returncode == 0, local.stderr[-3000:]
    remote = subprocess.run([sys.executable, "-m", "data_prep.ego4d", "--ego4d-root", f"gs://{BUCKET}/ego4d",
                             "--out", f"gs://{BUCKET}/ego4d_out", "--workers", "2", *common],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert network_log(env) == ""
    written = emulator.objects("ego4d_out/")
    assert not any(".staging" in name or ".partial" in name for name in written)
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name in written:
        (downloaded / name.split("/", 1)[1]).write_bytes(emulator.download(name))
    report, local_report = (json.loads((folder / "report.json").read_text()) for folder in (downloaded, tmp_path / "local"))
    for key in ("kept", "dropped", "kept_without_video"):
        assert report[key] == local_report[key]
    assert report["kept_without_video"] == {"missing video": 1, "unreadable video": 1}
    manifest = read_manifest(str(downloaded))
    assert manifest == read_manifest(str(tmp_path / "local"))
    for split in manifest["splits"]:
        ours, theirs = load_split(str(downloaded), split), load_split(str(tmp_path / "local"), split)
        for field in EXACT_FIELDS:
            np.testing.assert_array_equal(np.asarray(ours[field]), np.asarray(theirs[field]))
        for field in ("text_emb", "video_emb"):
            np.testing.assert_allclose(ours[field], theirs[field], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out", ["s3://bucket/ds", "foo://x/ds", "gs:/bucket/ds"])
def test_unsupported_scheme_is_refused_not_made_a_local_folder(out, tmp_path, audited_env):
    with pytest.raises(paths.PathError, match="is not supported"):
        paths.resolve(out)
    csv_dir = write_csv_recordings(tmp_path)
    proc = subprocess.run(har_command(csv_dir, out), cwd=tmp_path, env=audited_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert _one_error_line(proc.stderr) == (
        f"error: {out}: the scheme '{out.split(':')[0]}:' is not supported; use a local path or gs://bucket/path")
    assert not os.path.exists(tmp_path / out.split("/")[0])


def test_missing_bucket_fails_before_compiling(emulator, audited_env, tmp_path):
    env = dict(audited_env, STORAGE_EMULATOR_HOST=emulator.url, JAX_LOG_COMPILES="1")
    proc = run_main(f"gs://no-such-bucket-{os.getpid()}/run", tiny_overrides(f"gs://{BUCKET}/route/data"),
                    env_extra=env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert _one_error_line(err) == (
        f"error: gs://no-such-bucket-{os.getpid()}/run: the bucket gs://no-such-bucket-{os.getpid()} "
        f"does not exist or these credentials cannot see it")
    assert "Compiling" not in err
    assert network_log(env) == ""


def test_no_credentials_fails_with_one_sentence_without_network(audited_env, tmp_path):
    """Real gs:// (no emulator), no key file, no gcloud login, not on GCE: one sentence, no traffic."""
    gcloud_config = tmp_path / "gcloud"
    gcloud_config.mkdir()
    env = dict(audited_env, CLOUDSDK_CONFIG=str(gcloud_config), NO_GCE_CHECK="true")
    csv_dir = write_csv_recordings(tmp_path)
    proc = subprocess.run(har_command(csv_dir, "gs://some-bucket/ds"), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr)
    assert line == ("error: gs://some-bucket/ds: no Google Cloud credentials found; run gcloud auth "
                    "application-default login, set GOOGLE_APPLICATION_CREDENTIALS=key.json, or set "
                    "STORAGE_EMULATOR_HOST for an emulator")
    assert network_log(env) == ""


def test_resolve_keeps_gcs_paths_and_makes_local_ones_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.resolve("runs/a")) == str(tmp_path / "runs" / "a")
    assert str(paths.resolve("gs://bucket-1/runs/a/")) == "gs://bucket-1/runs/a"
    assert paths.is_gcs(paths.resolve("gs://bucket-1/runs/a"))
    with pytest.raises(paths.PathError, match="not a valid bucket name"):
        paths.resolve("gs://Bucket/x")


def test_demo_refuses_a_gcs_workdir_before_doing_anything():
    from configs import demo
    from primus_jax import main

    with pytest.raises(paths.PathError, match="gs://bucket-1/w: the demo's workdir .* is written to local disk only"):
        main.run(demo.get_config(), "gs://bucket-1/w")
