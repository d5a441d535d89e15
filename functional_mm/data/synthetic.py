"""Embedded multimodal datasets, generated (no downloads): real files + JSONL manifests in a directory.

- ``images.jsonl``: PNGs of one coloured shape on a light background, in several sizes and aspect ratios,
  with a caption ("a red circle at the top left") and a question/answer conversation;
- ``videos.jsonl``: short MPEG-4 clips of a shape moving across the frame, with a caption
  ("a green square moving from left to right");
- ``audio.jsonl``: WAV files of tone sequences (notes of the C major scale) with the note names as transcript
  ("C E G").

Everything is deterministic in ``seed`` and goes through the same readers as user data (manifests with
relative paths, width/height/frames/fps/duration metadata for bucketing). Captions are a function of the
content, so a model can actually learn them.

Example::

    >>> paths = make_all("/tmp/mm_data", num_images=32, num_videos=8, num_audio=8)   # doctest: +SKIP
    >>> JsonlSource(paths["images"])[0]["caption"]                                    # doctest: +SKIP
    'a red circle at the top left'

Command line: ``python -m functional_mm.data.synthetic --out DIR [--images 256 --videos 64 --audio 64]``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

from functional_mm.data.sources import write_jsonl

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
PLACES = {  # name -> (row, col) of the shape's centre as a fraction of the frame
    "top left": (0.25, 0.25),
    "top right": (0.25, 0.75),
    "bottom left": (0.75, 0.25),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
IMAGE_SIZES = ((64, 64), (48, 80), (80, 48), (64, 96))  # (height, width)
VIDEO_SIZES = ((48, 64), (64, 64), (48, 80))
NOTES = {"C": 261.63, "D": 293.66, "E": 329.63, "F": 349.23, "G": 392.0, "A": 440.0, "B": 493.88}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _draw(draw: ImageDraw.ImageDraw, shape: str, cy: float, cx: float, r: float, colour) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def _frame(h: int, w: int, shape: str, colour: str, cy: float, cx: float, background: int) -> np.ndarray:
    img = Image.new("RGB", (w, h), (background,) * 3)
    _draw(ImageDraw.Draw(img), shape, cy, cx, 0.18 * min(h, w), COLOURS[colour])
    return np.asarray(img)


def make_images(
    out_dir: str, num: int = 64, seed: int = 0, sizes: tuple[tuple[int, int], ...] = IMAGE_SIZES
) -> str:
    """``num`` shape images under ``out_dir/images`` and ``out_dir/images.jsonl``; returns the manifest path.

    ``sizes``: the ``(height, width)`` choices (one fixed size for a model with a fixed input). Each row has
    ``caption`` ("a red circle at the top left"), ``label`` ("a red circle": the text-to-image prompt) and a
    two-turn ``conversations``."""
    rng = np.random.default_rng([seed, 1])
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rows = []
    for i in range(num):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        place = rng.choice(list(PLACES))
        h, w = sizes[rng.integers(len(sizes))]
        fy, fx = PLACES[place]
        pixels = _frame(h, w, shape, colour, fy * h, fx * w, int(rng.integers(200, 250)))
        rel = f"images/{i:05d}.png"
        Image.fromarray(pixels).save(os.path.join(out_dir, rel))
        where = "in the center" if place == "center" else f"at the {place}"
        rows.append(
            {
                "image": rel,
                "width": int(w),
                "height": int(h),
                "caption": f"{_a(colour)} {shape} {where}",
                "label": f"{_a(colour)} {shape}",
                "conversations": [
                    {"role": "user", "content": f"<image>What colour is the {shape}?"},
                    {"role": "assistant", "content": str(colour)},
                    {"role": "user", "content": "Where is it?"},
                    {"role": "assistant", "content": where},
                ],
            }
        )
    path = os.path.join(out_dir, "images.jsonl")
    write_jsonl(path, rows)
    return path


def make_videos(out_dir: str, num: int = 16, seed: int = 0, frames: int = 16, fps: int = 8) -> str:
    """``num`` clips of ``frames`` frames of a shape moving left/right/up/down; returns the manifest path."""
    from functional_mm.data.video import write_video

    rng = np.random.default_rng([seed, 2])
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    moves = {
        "from left to right": ((0.5, 0.2), (0.5, 0.8)),
        "from right to left": ((0.5, 0.8), (0.5, 0.2)),
        "from top to bottom": ((0.2, 0.5), (0.8, 0.5)),
        "from bottom to top": ((0.8, 0.5), (0.2, 0.5)),
    }
    rows = []
    for i in range(num):
        colour, shape, move = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(moves))
        h, w = VIDEO_SIZES[rng.integers(len(VIDEO_SIZES))]
        (y0, x0), (y1, x1) = moves[move]
        bg = int(rng.integers(200, 250))
        clip = np.stack(
            [
                _frame(h, w, shape, colour, h * (y0 + (y1 - y0) * t), w * (x0 + (x1 - x0) * t), bg)
                for t in np.linspace(0, 1, frames)
            ]
        )
        rel = f"videos/{i:05d}.mp4"
        write_video(os.path.join(out_dir, rel), clip, fps=fps)
        rows.append(
            {"video": rel, "width": int(w), "height": int(h), "frames": frames, "fps": fps,
             "duration": frames / fps, "caption": f"{_a(colour)} {shape} moving {move}"}
        )  # fmt: skip
    path = os.path.join(out_dir, "videos.jsonl")
    write_jsonl(path, rows)
    return path


def make_audio(out_dir: str, num: int = 16, seed: int = 0, sampling_rate: int = 16000) -> str:
    """``num`` WAVs of 2-5 notes (0.25 s each, 0.05 s gaps, soft noise), transcript = the note names."""
    import soundfile as sf

    rng = np.random.default_rng([seed, 3])
    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    rows = []
    note_len, gap = int(0.25 * sampling_rate), np.zeros(int(0.05 * sampling_rate), np.float32)
    t = np.arange(note_len) / sampling_rate
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms ramps: no clicks
    for i in range(num):
        names = [str(n) for n in rng.choice(list(NOTES), size=int(rng.integers(2, 6)))]
        pieces = []
        for n in names:
            pieces += [(0.4 * np.sin(2 * np.pi * NOTES[n] * t) * fade).astype(np.float32), gap]
        wave = np.concatenate(pieces)
        wave = wave + 0.003 * rng.standard_normal(len(wave)).astype(np.float32)
        rel = f"audio/{i:05d}.wav"
        sf.write(os.path.join(out_dir, rel), wave, sampling_rate)
        rows.append(
            {
                "audio": rel,
                "sampling_rate": sampling_rate,
                "duration": len(wave) / sampling_rate,
                "text": " ".join(names),
            }
        )
    path = os.path.join(out_dir, "audio.jsonl")
    write_jsonl(path, rows)
    return path


def make_all(
    out_dir: str, *, num_images: int = 64, num_videos: int = 16, num_audio: int = 16, seed: int = 0
) -> dict[str, str]:
    """All three datasets in ``out_dir``: ``{"images": ..., "videos": ..., "audio": ...}`` manifest paths."""
    return {
        "images": make_images(out_dir, num_images, seed),
        "videos": make_videos(out_dir, num_videos, seed),
        "audio": make_audio(out_dir, num_audio, seed),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write the embedded multimodal datasets.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--audio", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for name, path in make_all(
        a.out, num_images=a.images, num_videos=a.videos, num_audio=a.audio, seed=a.seed
    ).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
