import filecmp

import numpy as np
import pytest

from functional_mm.data import (
    AudioTranscript,
    ByteTokenizer,
    JsonlSource,
    SampleContext,
    audio,
    image,
    synthetic,
    video,
)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return synthetic.make_all(
        str(tmp_path_factory.mktemp("a")), num_images=12, num_videos=4, num_audio=4, seed=5
    )


def test_deterministic_in_seed(paths, tmp_path):
    again = synthetic.make_all(str(tmp_path), num_images=12, num_videos=4, num_audio=4, seed=5)
    for k in paths:
        a, b = JsonlSource(paths[k]), JsonlSource(again[k])
        key = {"images": "image", "videos": "video", "audio": "audio"}[k]
        assert [dict(s, **{key: ""}) for s in a] == [dict(s, **{key: ""}) for s in b]
        assert all(filecmp.cmp(x[key], y[key], shallow=False) for x, y in zip(a, b))
    other = synthetic.make_images(str(tmp_path / "o"), 12, seed=6)
    assert [s["caption"] for s in JsonlSource(other)] != [s["caption"] for s in JsonlSource(paths["images"])]


def test_images_show_what_the_caption_says(paths):
    src = JsonlSource(paths["images"])
    assert len({s["caption"] for s in src}) > 6 and len({(s["height"], s["width"]) for s in src}) > 1
    for s in src:
        img = np.asarray(image.load_image(s["image"]))
        assert img.shape == (s["height"], s["width"], 3)
        colour = next(c for c in synthetic.COLOURS if f" {c} " in f" {s['caption']} ")
        place = next(p for p in synthetic.PLACES if p in s["caption"])
        fy, fx = synthetic.PLACES[place]
        assert tuple(img[int(fy * s["height"]), int(fx * s["width"])]) == synthetic.COLOURS[colour]
        assert s["conversations"][1]["content"] == colour


def test_videos_move_as_captioned(paths):
    for s in JsonlSource(paths["videos"]):
        clip = (
            video.load_video(s["video"], num_frames=2).permute(0, 2, 3, 1).numpy().astype(int)
        )  # first, last
        assert (
            clip.shape[1:3] == (s["height"], s["width"]) and video.probe(s["video"])["frames"] == s["frames"]
        )
        colour = np.array(next(v for c, v in synthetic.COLOURS.items() if f" {c} " in f" {s['caption']} "))
        mask = [np.abs(f - colour).sum(-1) < 60 for f in clip]  # the shape's pixels (lossy codec)
        (y0, x0), (y1, x1) = (np.argwhere(m).mean(0) for m in mask)
        if "left to right" in s["caption"]:
            assert x1 - x0 > 0.3 * s["width"]
        elif "right to left" in s["caption"]:
            assert x0 - x1 > 0.3 * s["width"]
        elif "top to bottom" in s["caption"]:
            assert y1 - y0 > 0.3 * s["height"]
        else:
            assert y0 - y1 > 0.3 * s["height"]


def test_audio_notes_match_transcript_and_processor(paths):
    tok = ByteTokenizer()
    proc = AudioTranscript(tok, num_samples=None)
    for s in JsonlSource(paths["audio"]):
        wave, sr = audio.load_audio(s["audio"])
        step = int(0.3 * sr)
        for k, note in enumerate(s["text"].split()):
            seg = wave[k * step : k * step + int(0.25 * sr)].numpy()
            peak = np.argmax(np.abs(np.fft.rfft(seg))) * sr / len(seg)
            assert abs(peak - synthetic.NOTES[note]) < 8
        out = proc(s, SampleContext(0, 0, 0))
        assert out["input_features"].shape == (80, len(wave) // 160)
        assert tok.decode(out["tokens"]) == s["text"] and out["loss_mask"][0] == 0
