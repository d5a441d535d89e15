"""Data loading throughput: our Loader (0/1/2 workers) vs a plain PIL / PyAV loop, images/s and clips/s.

Both sides decode the same files and do the same work per sample: images (JPEG, 512x384 and 384x512) are
decoded, cover-resized and centre-cropped to 224x224, normalised to float32 and stacked into batches of 16;
video clips (MPEG-4, 256x256, 48 frames) have 16 frames decoded, each resized/cropped to 128x128, normalised
and stacked into batches of 4. The runs are interleaved (one timed block of each per round) so machine noise
hits all alike; the median over rounds is reported. Each run starts fresh, its first batches (worker
start-up, the prefetch queue) are untimed: the figures are steady state.

    .venv/bin/python benchmarks/dataloader.py [--rounds 5] [--images 192] [--videos 24]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import av
import numpy as np
import torch
from PIL import Image

from functional_mm.data import ImageCaption, Loader, ShuffleBatcher, VideoClip, image, video

IMG, CLIP, FRAMES = 224, 128, 16


def make_images(d: str, n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        h, w = (384, 512) if i % 2 else (512, 384)
        # smooth gradients + noise: compresses like a photo, not like a flat synthetic image
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * 3) % 256, (xx + yy) % 256], -1)
        px = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        path = os.path.join(d, f"{i:05d}.jpg")
        Image.fromarray(px).save(path, quality=90)
        rows.append({"image": path, "width": w, "height": h, "caption": f"image {i}"})
    return rows


def make_videos(d: str, n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        t = np.arange(48)[:, None, None, None]
        yy, xx = np.mgrid[0:256, 0:256]
        frames = (
            ((xx[None, :, :, None] + 4 * t + yy[None, :, :, None] * (i % 3)) % 256)
            .astype(np.uint8)
            .repeat(3, -1)
        )
        frames = np.clip(frames + rng.normal(0, 8, frames.shape), 0, 255).astype(np.uint8)
        path = os.path.join(d, f"{i:05d}.mp4")
        video.write_video(path, frames, fps=24)
        rows.append(
            {"video": path, "width": 256, "height": 256, "frames": 48, "fps": 24, "caption": f"clip {i}"}
        )
    return rows


def plain_images(rows, batch):
    """What one would write without a loader: PIL decode, resize, crop, numpy -> torch, in a loop."""
    mean = torch.tensor([0.5, 0.5, 0.5])[:, None, None]
    i = 0
    while True:
        xs = []
        for _ in range(batch):
            img = Image.open(rows[i % len(rows)]["image"]).convert("RGB")
            w, h = img.size
            s = IMG / min(w, h)
            img = img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
            l, t = (img.size[0] - IMG) // 2, (img.size[1] - IMG) // 2
            img = img.crop((l, t, l + IMG, t + IMG))
            xs.append((torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - mean) / 0.5)
            i += 1
        yield torch.stack(xs)


def plain_videos(rows, batch):
    """PyAV decode of the first 16 frames, PIL resize/crop per frame, stacked."""
    i = 0
    while True:
        clips = []
        for _ in range(batch):
            frames = []
            with av.open(rows[i % len(rows)]["video"]) as c:
                for k, f in enumerate(c.decode(video=0)):
                    img = f.to_image().resize((CLIP, CLIP), Image.Resampling.BICUBIC)
                    frames.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
                    if k + 1 == FRAMES:
                        break
            clips.append((torch.stack(frames).float() / 255 - 0.5) / 0.5)
            i += 1
        yield torch.stack(clips)


def bench(factories: dict, warm: int, timed: int, rounds: int, per_batch: int) -> dict[str, float]:
    """Steady-state rate of each run: a fresh iterator per run and round (runs never overlap, so no loader
    prefetches while another is timed); the first ``warm`` batches (worker start, the prefetch queue filled
    before the clock starts) are consumed untimed, the next ``timed`` ones are timed back to back."""
    times: dict[str, list[float]] = {k: [] for k in factories}
    for _ in range(rounds):
        for name, make in factories.items():
            it = make()
            for _ in range(warm):
                next(it)
            t0 = time.perf_counter()
            for _ in range(timed):
                next(it)
            times[name].append(time.perf_counter() - t0)
            if hasattr(it, "close"):
                it.close()  # stop its workers before the next run is timed
    return {k: timed * per_batch / statistics.median(v) for k, v in times.items()}


def report(title: str, unit: str, rates: dict[str, float], base: str) -> None:
    print(f"\n{title}")
    print(f"| run | {unit} (median) | ratio vs {base} |")
    print("|---|---|---|")
    for k, v in rates.items():
        print(f"| {k} | {v:.1f} | {v / rates[base]:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument(
        "--warm", type=int, default=5, help="untimed batches per run per round (> prefetch depth)"
    )
    ap.add_argument("--batches", type=int, default=8, help="timed batches per run per round")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the loaders' work is decoding, not torch ops: keep the main process comparable
    print(f"cpus: {os.cpu_count()}, torch threads: {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as d:
        imgs, vids = make_images(d, args.images), make_videos(d, args.videos)
        ib, vb = 16, 4
        img_proc = ImageCaption(size=(IMG, IMG), mean_std=image.HALF)
        vid_proc = VideoClip(num_frames=FRAMES, interval=1, size=(CLIP, CLIP))

        def loader(rows, proc, bs, workers, kind="process"):
            return lambda: Loader(
                rows, proc, ShuffleBatcher(len(rows), bs), num_workers=workers, worker_type=kind, prefetch=2
            )

        img_runs = {
            "plain PIL loop": lambda: plain_images(imgs, ib),
            "Loader, 0 workers": loader(imgs, img_proc, ib, 0),
            "Loader, 1 worker": loader(imgs, img_proc, ib, 1),
            "Loader, 2 workers": loader(imgs, img_proc, ib, 2),
            "Loader, 2 threads": loader(imgs, img_proc, ib, 2, "thread"),
        }
        report(
            "images 512x384 JPEG -> 224x224 float, batch 16",
            "images/s",
            bench(img_runs, args.warm, args.batches, args.rounds, ib),
            "plain PIL loop",
        )
        vid_runs = {
            "plain PyAV loop": lambda: plain_videos(vids, vb),
            "Loader, 0 workers": loader(vids, vid_proc, vb, 0),
            "Loader, 1 worker": loader(vids, vid_proc, vb, 1),
            "Loader, 2 workers": loader(vids, vid_proc, vb, 2),
            "Loader, 2 threads": loader(vids, vid_proc, vb, 2, "thread"),
        }
        report(
            "video 256x256 MPEG-4, 16 frames -> 16x128x128 float, batch 4",
            "clips/s",
            bench(vid_runs, args.warm, args.batches, args.rounds, vb),
            "plain PyAV loop",
        )


if __name__ == "__main__":
    main()
