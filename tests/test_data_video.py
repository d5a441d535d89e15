import numpy as np
import pytest

from functional_mm.data import image, video
from functional_mm.data.sources import MediaError, SkipSample


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """20 frames, 32x48, frame i is a flat grey of value 10*i (so decoded frames identify their index)."""
    path = str(tmp_path_factory.mktemp("v") / "grey.mp4")
    frames = np.stack([np.full((32, 48, 3), 10 * i, np.uint8) for i in range(20)])
    video.write_video(path, frames, fps=10)
    return path


def _ids(x):  # [T, C, H, W] -> frame indices recovered from the grey level
    return [round(float(f.float().mean()) / 10) for f in x]


def test_probe_and_sampling_modes(clip):
    info = video.probe(clip)
    assert info["frames"] == 20 and info["fps"] == 10 and (info["height"], info["width"]) == (32, 48)
    assert _ids(video.load_video(clip, num_frames=5)) == [0, 5, 10, 14, 19]
    assert _ids(video.load_video(clip, num_frames=4, interval=3)) == [0, 3, 6, 9]
    rng = np.random.default_rng(1)
    ids = _ids(video.load_video(clip, num_frames=4, interval=3, rng=rng))
    assert np.diff(ids).tolist() == [3, 3, 3] and ids[-1] <= 19
    assert _ids(video.load_video(clip, target_fps=5)) == list(range(0, 20, 2))
    assert _ids(video.load_video(clip, target_fps=2.5, num_frames=2)) == [0, 4]


def test_transform_shape_and_errors(clip, tmp_path):
    x = video.load_video(
        clip, num_frames=3, transform=lambda f: image.center_crop(image.resize_cover(f, (16, 16)), (16, 16))
    )
    assert x.shape == (3, 3, 16, 16) and x.dtype.is_floating_point is False
    with pytest.raises(SkipSample, match="needs 31"):
        video.load_video(clip, num_frames=16, interval=2)
    with pytest.raises(MediaError, match="not found"):
        video.load_video(str(tmp_path / "nope.mp4"), num_frames=2)
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(MediaError, match="junk.mp4"):
        video.load_video(str(tmp_path / "junk.mp4"), num_frames=2)
    # A header that claims more frames than the stream has: the missing frames repeat the last real one.
    assert _ids(video.load_video(clip, num_frames=3, meta={"frames": 40, "fps": 10})) == [0, 19, 19]
