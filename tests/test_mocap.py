"""data_prep.bvh and data_prep.mocap: BVH reading on real Bandai-Namco clips, synthetic IMU with known
answers on BVH files written here, seeds, the local and Beam drivers, and bad input."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from data_prep import bvh, common, mocap, virtual_imu
from primus_jax.data import load_split, read_manifest
from test_data_prep_parallel import assert_same_dataset, dataset_content

G = common.STANDARD_GRAVITY
REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("PRIMUS_FIXTURES") or REPO_ROOT.parent / "shared" / "fixtures") / "mocap"
BANDAI_JOINTS = ["joint_Root", "Hips", "Spine", "Chest", "Neck", "Head", "Shoulder_L", "UpperArm_L", "LowerArm_L",
                 "Hand_L", "Shoulder_R", "UpperArm_R", "LowerArm_R", "Hand_R", "UpperLeg_L", "LowerLeg_L", "Foot_L",
                 "Toes_L", "UpperLeg_R", "LowerLeg_R", "Foot_R", "Toes_R"]
ROOT_CHANNELS = ("Xposition", "Yposition", "Zposition", "Zrotation", "Xrotation", "Yrotation")
# A small skeleton in metres with Bandai-Namco joint names: (name, parent, offset, channels).
SKELETON = [
    ("Hips", None, (0.0, 0.9, 0.0), ROOT_CHANNELS),
    ("UpperLeg_R", "Hips", (-0.1, 0.0, 0.0), ("Zrotation", "Xrotation", "Yrotation")),
    ("LowerLeg_R", "UpperLeg_R", (0.0, -0.45, 0.0), ("Zrotation", "Xrotation", "Yrotation")),
    ("LowerArm_L", "Hips", (0.2, 0.5, 0.0), ("Zrotation", "Xrotation", "Yrotation")),
    ("Hand_L", "LowerArm_L", (0.25, 0.0, 0.0), ("Zrotation", "Xrotation", "Yrotation")),
    ("Head", "Hips", (0.0, 0.7, 0.0), ("Zrotation", "Xrotation", "Yrotation")),
]
STATIC = virtual_imu.Synthesis(sites=("waist", "thigh_r", "wrist_l"), units="m", up="+y", mount="none", short="drop")


def write_bvh(path, root_values, *, skeleton=SKELETON, frame_time=1 / 30, header_frames=None, channels=None):
    """Writes a BVH file: the root's channel values per frame (F, 6), every other joint at zero rotation."""
    lines, depth = ["HIERARCHY"], {}
    for i, (name, parent, offset, joint_channels) in enumerate(skeleton):
        joint_channels = channels if (channels and i == 0) else joint_channels
        depth[name] = 0 if parent is None else depth[parent] + 1
        if i > 0:
            closing = depth[skeleton[i - 1][0]] - depth[name] + 1
            lines += ["}"] * closing
        lines += [("ROOT " if parent is None else "JOINT ") + name, "{", "OFFSET " + " ".join(map(str, offset)),
                  f"CHANNELS {len(joint_channels)} " + " ".join(joint_channels)]
    lines += ["}"] * (depth[skeleton[-1][0]] + 1)
    root_values = np.asarray(root_values, np.float64)
    n_other = sum(len(c) for _, _, _, c in skeleton[1:])
    frames = np.concatenate([root_values, np.zeros((len(root_values), n_other))], axis=1)
    lines += ["MOTION", f"Frames: {header_frames or len(frames)}", f"Frame Time: {frame_time}"]
    lines += [" ".join(f"{v:.10g}" for v in row) for row in frames]
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)


def root_motion(n, position=(0.0, 0.9, 0.0), rotation_zxy_deg=(0.0, 0.0, 0.0)):
    """(n, 6) root channel values: positions (n, 3) or a constant, Z X Y rotations in degrees."""
    position = np.broadcast_to(np.asarray(position, np.float64), (n, 3))
    return np.concatenate([position, np.broadcast_to(np.asarray(rotation_zxy_deg, np.float64), (n, 3))], axis=1)


# ------------------------------------------------------------------------------ real clips


def test_reader_on_real_clips_matches_headers_units_and_up_axis():
    walk = bvh.read(str(FIXTURES / "dataset-1_walk_normal_001.bvh"))
    assert walk.skeleton.names == BANDAI_JOINTS
    assert walk.n_frames == 195 and walk.values.shape == (195, 22 * 6) and abs(walk.rate_hz - 30.0) < 1e-3
    for path in sorted(FIXTURES.glob("*.bvh")):
        clip = bvh.read(str(path))
        positions, rotations = bvh.forward_kinematics(clip)
        body = positions[:, bvh.body_joints(clip.skeleton, positions)]
        assert bvh.infer_units(body) == "cm" and bvh.detect_up(body) == "+y", path.name
        np.testing.assert_allclose(rotations @ np.swapaxes(rotations, -1, -2), np.broadcast_to(np.eye(3), rotations.shape),
                                   atol=1e-9)
    # The hips sit above the knees, the knees above the feet, the head highest, in every frame.
    names = walk.skeleton.names
    positions, _ = bvh.forward_kinematics(walk)
    height = positions[..., 1]
    assert (height[:, names.index("Head")] > height[:, names.index("Hips")]).all()
    assert (height[:, names.index("Hips")] > height[:, names.index("LowerLeg_R")]).all()
    assert (height[:, names.index("LowerLeg_R")] > height[:, names.index("Foot_R")]).all()


def test_real_clips_read_about_g_at_rest():
    medians = []
    for path in sorted(FIXTURES.glob("*.bvh")):
        imus, rate_hz = virtual_imu.synthesize(bvh.read(str(path)), virtual_imu.Synthesis(), path.name)
        assert abs(rate_hz - 30.0) < 1e-9
        for imu in imus.values():
            assert imu.shape[1] == 6 and np.isfinite(imu).all()
            turning = np.linalg.norm(imu[:, 3:], axis=1)
            rest = ndimage.maximum_filter1d(turning, 15, mode="nearest") < virtual_imu.REST_TURN
            if rest.sum() >= 15:
                medians.append(np.median(np.linalg.norm(imu[rest, :3], axis=1)))
    assert len(medians) >= 20
    assert abs(np.median(medians) - G) < 0.05 and np.abs(np.asarray(medians) - G).max() < 0.5


# ------------------------------------------------------------------------------ known answers


@pytest.mark.parametrize("tilt_deg", [0.0, 30.0])
def test_constant_rotation_rate_reads_on_the_gyroscope(tmp_path, tilt_deg):
    rate = 1.3  # rad/s about the hips' own y axis; tilted by Rz(tilt) it is a fixed world axis
    t = np.arange(90) / 30
    path = write_bvh(tmp_path / "turn.bvh", root_motion(90, rotation_zxy_deg=np.stack(
        [np.full_like(t, tilt_deg), 0 * t, np.rad2deg(rate * t)], 1)))
    imus, _ = virtual_imu.synthesize(bvh.read(path), STATIC, "turn")
    np.testing.assert_allclose(imus["waist"][:, 3:], np.tile([0.0, rate, 0.0], (90, 1)), atol=1e-9)
    mounted, _ = virtual_imu.synthesize(bvh.read(path), virtual_imu.Synthesis(sites=("waist",), units="m", up="+y", short="drop"), "turn")
    np.testing.assert_allclose(np.linalg.norm(mounted["waist"][:, 3:], axis=1), rate, atol=1e-9)


def test_constant_acceleration_reads_a_minus_g(tmp_path):
    a = np.array([1.5, -0.4, 0.8])  # m/s^2, written in centimetres
    t = np.arange(75) / 30
    position = np.array([0.0, 0.9, 0.0]) + 0.5 * a * t[:, None] ** 2
    path = write_bvh(tmp_path / "push.bvh", root_motion(75, position=100 * position))
    cm = virtual_imu.Synthesis(sites=("waist", "thigh_r", "wrist_l"), units="cm", up="+y", mount="none", short="drop")
    imus, _ = virtual_imu.synthesize(bvh.read(path), cm, "push")
    for site in cm.sites:  # the figure does not turn: every site feels a - g, g = (0, -9.80665, 0)
        np.testing.assert_allclose(imus[site][:, :3], np.tile(a + [0, G, 0], (75, 1)), atol=1e-6)
        np.testing.assert_allclose(imus[site][:, 3:], 0, atol=1e-9)


def test_a_static_pose_turned_90_degrees_moves_gravity_to_the_expected_axis(tmp_path):
    upright = write_bvh(tmp_path / "upright.bvh", root_motion(30))
    on_side = write_bvh(tmp_path / "on_side.bvh", root_motion(30, rotation_zxy_deg=(90.0, 0.0, 0.0)))
    pitched = write_bvh(tmp_path / "pitched.bvh", root_motion(30, rotation_zxy_deg=(0.0, 90.0, 0.0)))
    expected = {upright: [0, G, 0], on_side: [G, 0, 0], pitched: [0, 0, -G]}
    for path, acc in expected.items():
        imus, _ = virtual_imu.synthesize(bvh.read(path), STATIC, "static")
        for imu in imus.values():
            np.testing.assert_allclose(imu, np.tile(acc + [0, 0, 0], (30, 1)), atol=1e-9)
    z_up, _ = virtual_imu.synthesize(bvh.read(upright), virtual_imu.Synthesis(sites=("waist",), units="m", up="+z", mount="none", short="drop"), "z")
    np.testing.assert_allclose(z_up["waist"][:, :3], np.tile([0, 0, G], (30, 1)), atol=1e-9)


def test_mounting_rotations_are_seeded_uniform_rotations():
    rotations = virtual_imu.random_rotations(np.random.default_rng(0), 2000)
    np.testing.assert_allclose(rotations @ np.swapaxes(rotations, 1, 2), np.broadcast_to(np.eye(3), rotations.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-12)
    assert np.abs(rotations.mean(axis=0)).max() < 0.05  # uniform on SO(3): E[R] = 0
    np.testing.assert_array_equal(rotations, virtual_imu.random_rotations(np.random.default_rng(0), 2000))
    angles = np.linspace(0.1, np.pi - 1e-3, 7)
    axis = np.array([2.0, -1.0, 0.5]) / np.linalg.norm([2.0, -1.0, 0.5])
    for angle in angles:  # rotation_log inverts Rodrigues' formula
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        r = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
        np.testing.assert_allclose(virtual_imu.rotation_log(r), angle * axis, atol=1e-9)


def test_narrations_from_templates_and_file_names():
    templates = mocap.read_templates()
    assert mocap.labels_from_name("dataset-1_walk-back_happy_003.bvh") == ("walk-back", "happy")
    assert mocap.labels_from_name("jump_12.bvh") == ("jump", "")
    assert mocap.narration(templates, "walk-back", "happy", None) == "a person walking backwards happily"
    assert mocap.narration(templates, "bow", "normal", "left wrist") == "a person bowing, with the sensor on the left wrist"
    assert mocap.narration(templates, "cartwheel", "sleepy", None) == "a person doing cartwheel in a sleepy way"


# ------------------------------------------------------------------------------ datasets


@pytest.fixture(scope="module")
def bvh_dir(tmp_path_factory):
    """Three real clips by link: walk (6.5 s, one window of 5 s every 2.5 s), bow (4.6 s, mirrored to one window)
    and dash (0.7 s, too short)."""
    folder = tmp_path_factory.mktemp("bvh")
    for name in ("walk", "bow", "dash"):
        (folder / f"dataset-1_{name}_normal_001.bvh").symlink_to(FIXTURES / f"dataset-1_{name}_normal_001.bvh")
    return folder


def prepare(bvh_dir, out, *args):
    assert mocap.main(["--bvh-dir", str(bvh_dir), "--out", str(out), "--towers", "none", *args]) == 0
    return dataset_content(out)


def test_seeded_records_and_the_local_and_beam_drivers(bvh_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    local = prepare(bvh_dir, tmp_path / "local")
    manifest, report, records = local
    assert manifest["class_names"] == ["bow", "dash", "walk"] and manifest["T"] == 250
    assert report["clips"] == {"kept": ["dataset-1_bow_normal_001.bvh", "dataset-1_walk_normal_001.bvh"],
                               "dropped": {"dataset-1_dash_normal_001.bvh": report["clips"]["dropped"]["dataset-1_dash_normal_001.bvh"]}}
    assert report["dropped"] == {"shorter than window": 4} and report["kept"] == {"train": 4 * (1 + 1)}
    assert set(records["train"]["text"]) == {"a person bowing", "a person walking"}
    assert_same_dataset(prepare(bvh_dir, tmp_path / "again"), local)
    assert_same_dataset(prepare(bvh_dir, tmp_path / "beam", "--runner", "DirectRunner"), local)
    other_seed = prepare(bvh_dir, tmp_path / "seed1", "--seed", "1")[2]["train"]["imu"]
    assert np.abs(other_seed - records["train"]["imu"]).max() > 1.0  # other mounting rotations
    np.testing.assert_allclose(np.linalg.norm(other_seed[..., :3], axis=-1),  # same specific force, turned
                               np.linalg.norm(records["train"]["imu"][..., :3], axis=-1), rtol=1e-4, atol=1e-4)
    dropped = prepare(bvh_dir, tmp_path / "drop", "--short", "drop", "--site-in-text", "--sites", "wrist_l")
    assert dropped[1]["kept"] == {"train": 1} and dropped[1]["clips"]["kept"] == ["dataset-1_walk_normal_001.bvh"]
    assert set(dropped[2]["train"]["text"]) == {"a person walking, with the sensor on the left wrist"}
    assert read_manifest(str(tmp_path / "drop"))["synthesis"]["short"] == "drop"


def test_bad_clips_are_dropped_with_one_sentence_and_the_run_goes_on(bvh_dir, tmp_path, capsys):
    folder = tmp_path / "bvh"
    folder.mkdir()
    (folder / "dataset-1_walk_normal_001.bvh").symlink_to(bvh_dir / "dataset-1_walk_normal_001.bvh")
    n = 40
    write_bvh(folder / "x_unknown-channel_normal_1.bvh", root_motion(n),
              channels=("Xposition", "Yposition", "Zposition", "Zrotation", "Xrotation", "Wrotation"))
    write_bvh(folder / "x_zero-frame-time_normal_1.bvh", root_motion(n), frame_time=0)
    write_bvh(folder / "x_few-frames_normal_1.bvh", root_motion(n), header_frames=n + 5)
    cmu_names = [("Hips", None, (0.0, 0.9, 0.0), ROOT_CHANNELS), ("Wrist", "Hips", (0.2, 0.5, 0.0), ("Zrotation",))]
    write_bvh(folder / "x_missing-joints_normal_1.bvh", root_motion(n), skeleton=cmu_names)
    t = np.arange(n) / 30  # the hips shake by 20 cm at 4 Hz without turning: |acc| ~ 130 m/s^2 at "rest"
    shaking = np.stack([0.2 * np.sin(2 * np.pi * 4 * t), 0.9 + 0 * t, 0 * t], 1)
    write_bvh(folder / "x_shaking_normal_1.bvh", root_motion(n, position=shaking))

    assert mocap.main(["--bvh-dir", str(folder), "--out", str(tmp_path / "out"), "--towers", "none",
                       "--sites", "waist,wrist_l"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    dropped = report["clips"]["dropped"]
    assert report["clips"]["kept"] == ["dataset-1_walk_normal_001.bvh"] and len(dropped) == 5
    assert report["dropped"] == {"bad bvh": 3, "missing joints": 1, "implausible acc at rest": 1}
    assert "missing or unknown channels" in dropped["x_unknown-channel_normal_1.bvh"]
    assert "frame time 0.0 s is not positive" in dropped["x_zero-frame-time_normal_1.bvh"]
    assert f"says {n + 5} frames but the file holds {n}" in dropped["x_few-frames_normal_1.bvh"]
    missing = dropped["x_missing-joints_normal_1.bvh"]
    assert "lacks joints for forearm_l, hand_l" in missing and "it has Hips, Wrist" in missing and "--joint-map" in missing
    assert "median |acc| at rest is" in dropped["x_shaking_normal_1.bvh"]
    for name, sentence in dropped.items():
        assert sentence.startswith(str(folder / name)) and sentence.count(". ") == 0, sentence
    assert len(load_split(str(tmp_path / "out"), "train")["imu"]) == 2  # one window per site of the walk

    # The flag that maps joints makes the skeleton usable.
    only = tmp_path / "mapped"
    only.mkdir()
    (only / "x_missing-joints_normal_1.bvh").symlink_to(folder / "x_missing-joints_normal_1.bvh")
    assert mocap.main(["--bvh-dir", str(only), "--out", str(tmp_path / "mapped_out"), "--towers", "none", "--units", "m",
                       "--up", "+y", "--sites", "wrist_l", "--short", "drop", "--joint-map", "hand_l=Wrist,forearm_l=Hips"]) == 1
    assert "shorter than window" in capsys.readouterr().err  # mapped and synthesised; 1.3 s is below one window


def test_demo_mocap_dir_mixes_the_prepared_mocap_into_every_batch(bvh_dir, tmp_path):
    from configs import demo as demo_config
    from data_prep import har
    from primus_jax import data, demo, train_data

    config = demo_config.get_config()
    assert config.demo.mocap_dir == ""  # the default demo trains on the watch windows alone
    assert demo.method_config(config, "primus", str(tmp_path / "watch")).data.mixture == ""
    har.write_har_dataset(har.basicmotions_source(), str(tmp_path / "watch"))  # a stand-in for the watch windows
    mocap_out = demo.prepare_mocap(str(bvh_dir), str(tmp_path / "mocap"), 250, 50.0, None)
    cfg = demo.method_config(config, "primus", str(tmp_path / "watch"), mocap_out)
    sources = data.parse_mixture(cfg.data.mixture, cfg.data.dir)
    assert [(s.dataset_dir, s.weight) for s in sources] == [(str(tmp_path / "watch"), 0.5), (mocap_out, 0.5)]
    manifests, _ = train_data.read_manifests(sources)  # the two datasets agree on T, rate and widths
    assert manifests[1]["splits"]["train"]["records"] == 8 and manifests[1]["source"] == "mocap"


def test_labels_from_a_csv(bvh_dir, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("file,action,style\ndataset-1_walk_normal_001.bvh,stroll,sad\ndataset-1_bow_normal_001.bvh,greet,\n")
    clips, problems = mocap.list_clips(str(bvh_dir), str(labels))
    assert [(name, action, style) for _, name, action, style in clips] == [
        ("dataset-1_bow_normal_001.bvh", "greet", ""), ("dataset-1_walk_normal_001.bvh", "stroll", "sad")]
    assert problems == [common.Problem("unlabelled clip", f"dataset-1_dash_normal_001.bvh: no action for it in {labels}")]
    (tmp_path / "bad.csv").write_text("name,label\nx,y\n")
    with pytest.raises(ValueError, match="needs a header file,action"):
        mocap.list_clips(str(bvh_dir), str(tmp_path / "bad.csv"))


def test_noise_model_is_seeded_bias_plus_white_noise(tmp_path):
    path = write_bvh(tmp_path / "still.bvh", root_motion(600))
    noisy = dict(sites=("waist",), units="m", up="+y", mount="none", short="drop", noise=True)
    clean, _ = virtual_imu.synthesize(bvh.read(path), STATIC, "still")
    imu, _ = virtual_imu.synthesize(bvh.read(path), virtual_imu.Synthesis(**noisy), "still")
    again, _ = virtual_imu.synthesize(bvh.read(path), virtual_imu.Synthesis(**noisy), "still")
    other, _ = virtual_imu.synthesize(bvh.read(path), virtual_imu.Synthesis(**noisy, seed=1), "still")
    np.testing.assert_array_equal(imu["waist"], again["waist"])
    assert not np.array_equal(imu["waist"], other["waist"])
    error = imu["waist"] - clean["waist"]
    residual = error - error.mean(axis=0)  # the bias is constant over the clip
    for columns, sigma in ((slice(0, 3), virtual_imu.NOISE["acc_noise"]), (slice(3, 6), virtual_imu.NOISE["gyro_noise"])):
        assert 0.85 * sigma < residual[:, columns].std() < 1.15 * sigma  # 1,800 samples: s.e. 1.7 %
