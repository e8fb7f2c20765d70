"""data_prep.video.read_clip on a tiny mp4 whose frame colour encodes the frame index."""
import av
import numpy as np
import pytest

from data_prep.video import VideoError, read_clip
from primus_jax.towers import sample_frame_indices

FPS = 10
SECONDS = 8
WIDTH, HEIGHT = 64, 48
LEVEL_STEP = 3  # grey level of frame i is LEVEL_STEP * i (mod 252, so unique for the first 84 frames)


def write_index_video(path, fps=FPS, seconds=SECONDS, codec="libx264"):
    """Writes a (HEIGHT, WIDTH) video whose frame i is uniformly grey at level LEVEL_STEP * i mod 252."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.bit_rate = 4_000_000  # near-lossless, so grey levels survive mpeg4 too
        for index in range(fps * seconds):
            image = np.full((HEIGHT, WIDTH, 3), LEVEL_STEP * index % 252, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_indices(clip):
    return np.rint(clip.reshape(len(clip), -1).mean(axis=1) / LEVEL_STEP).astype(int)


@pytest.fixture(scope="module")
def index_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "index.mp4"
    write_index_video(path)
    return path


def test_window_frames_are_the_linspace_choice_of_frames_in_range(index_video):
    clip = read_clip(index_video, 2.0, 4.0, k=5)
    assert clip.shape == (5, HEIGHT, WIDTH, 3) and clip.dtype == np.uint8
    in_range = np.arange(20, 40)  # frames at 2.0, 2.1, ..., 3.9 s
    np.testing.assert_array_equal(frame_indices(clip), in_range[sample_frame_indices(20, 5)])


def test_more_frames_than_the_window_holds_repeats_frames(index_video):
    clip = read_clip(index_video, 7.5, 8.0, k=8)
    assert clip.shape[0] == 8
    assert set(frame_indices(clip)) == {75, 76, 77, 78, 79}
    assert np.all(np.diff(frame_indices(clip)) >= 0)


def test_mpeg4_with_fractional_window_bounds(tmp_path):
    path = tmp_path / "mpeg4.mp4"
    write_index_video(path, seconds=3, codec="mpeg4")
    clip = read_clip(path, 0.25, 1.05, k=3)
    np.testing.assert_array_equal(frame_indices(clip), np.arange(3, 11)[sample_frame_indices(8, 3)])


@pytest.mark.parametrize(
    "make, start, end, message",
    [
        (lambda p: None, 0.0, 1.0, "does not exist"),
        (lambda p: p.write_bytes(b"\x00\x01 this is not a video" * 50), 0.0, 1.0, "cannot be decoded"),
        ("index", 9.0, 10.0, "no frame lies in the window"),
        ("index", 3.0, 3.0, "window is empty"),
    ],
)
def test_errors_name_the_file_and_the_window(tmp_path, index_video, make, start, end, message):
    if make == "index":
        path = index_video
    else:
        path = tmp_path / "broken.mp4"
        make(path)
    with pytest.raises(VideoError, match=message) as error:
        read_clip(path, start, end)
    assert str(path) in str(error.value) and f"[{start:.3f}, {end:.3f})" in str(error.value)


def test_truncated_mp4_raises_video_error(tmp_path, index_video):
    path = tmp_path / "truncated.mp4"
    path.write_bytes(index_video.read_bytes()[: 2000])
    with pytest.raises(VideoError, match="truncated.mp4"):
        read_clip(path, 1.0, 6.0)
