"""Video decoding with PyAV and frame sampling by count, by interval (a clip with a stride) or by target fps.

Frames come out as PIL images so the image resize/crop functions apply unchanged, then stack to
``uint8 [T, C, H, W]`` (normalise with :func:`functional_mm.data.image.normalize` for float).

Example::

    >>> clip = load_video("v.mp4", num_frames=16, interval=2, rng=np.random.default_rng(0),
    ...                   transform=lambda f: image.center_crop(image.resize_cover(f, (64, 64)), (64, 64)))  # doctest: +SKIP
    >>> clip.shape                                                                           # doctest: +SKIP
    torch.Size([16, 3, 64, 64])
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from functional_mm.data import image
from functional_mm.data.sources import MediaError, SkipSample


def _open(path: str):
    import av

    if not os.path.exists(path):
        raise MediaError(path, "file not found")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(path, f"cannot open video ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(path, "no video stream")
    return container


def probe(path: str) -> dict:
    """``{"frames", "fps", "duration", "height", "width"}`` from the container header (no decoding). ``frames``
    is estimated from duration x fps when the container does not store it."""
    with _open(path) as c:
        s = c.streams.video[0]
        fps = float(s.average_rate or s.guessed_rate or 0) or 25.0
        duration = float(s.duration * s.time_base) if s.duration else (c.duration or 0) / 1e6
        frames = s.frames or round(duration * fps)
        return {"frames": int(frames), "fps": fps, "duration": duration, "height": s.height, "width": s.width}


def sample_indices(
    total: int,
    fps: float,
    *,
    num_frames: int | None = None,
    interval: int | None = None,
    target_fps: float | None = None,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Frame indices to decode from a video of ``total`` frames at ``fps``.

    - ``num_frames`` alone: evenly spread over the whole video;
    - ``interval`` (+ ``num_frames``): a clip of ``num_frames`` frames taken every ``interval`` frames (the
      OpenSora ``frame_interval``), starting at a random offset from ``rng`` or at 0; too short a video is a
      :class:`SkipSample`;
    - ``target_fps`` (+ optional ``num_frames`` cap): resample the timeline to that rate.
    """
    if total <= 0:
        raise SkipSample("video has no frames")
    if target_fps is not None:
        step = fps / target_fps
        idx = [min(total - 1, round(i * step)) for i in range(max(1, math.floor((total - 1) / step) + 1))]
        if num_frames is not None and len(idx) > num_frames:
            start = int(rng.integers(len(idx) - num_frames + 1)) if rng is not None else 0
            idx = idx[start : start + num_frames]
        return idx
    if num_frames is None:
        raise ValueError("sample_indices: give num_frames, interval (+ num_frames) or target_fps")
    if interval is None:
        return np.linspace(0, total - 1, num_frames).round().astype(int).tolist()
    span = (num_frames - 1) * interval + 1
    if span > total:
        raise SkipSample(f"video has {total} frames, a clip of {num_frames} every {interval} needs {span}")
    start = int(rng.integers(total - span + 1)) if rng is not None else 0
    return list(range(start, start + span, interval))


def decode_frames(path: str, indices: list[int]) -> list[Image.Image]:
    """The frames at ``indices`` (any order, repeats allowed) as RGB PIL images.

    Decoding is sequential from the start (exact frame indices for any codec); frames past the real end (a
    header that overstates the length) repeat the last decoded frame.
    """
    import av

    wanted = sorted(set(indices))
    got: dict[int, Image.Image] = {}
    last = None
    with _open(path) as c:
        stream = c.streams.video[0]
        # No frame threading: it buffers a frame per thread before the first output (latency on short clips)
        # and oversubscribes the CPU when several loader workers decode at once.
        try:
            for i, frame in enumerate(c.decode(stream)):
                if i in wanted:
                    got[i] = frame.to_image()
                last = i, frame
                if i >= wanted[-1]:
                    break
        except (av.FFmpegError, OSError, ValueError) as e:
            raise MediaError(path, f"cannot decode video ({type(e).__name__}: {e})") from None
    if last is None:
        raise MediaError(path, "no decodable frames")
    if len(got) < len(wanted):
        fill = got.get(last[0]) or last[1].to_image()
        for i in wanted:
            got.setdefault(i, fill)
    return [got[i] for i in indices]


def load_video(
    path: str,
    *,
    num_frames: int | None = None,
    interval: int | None = None,
    target_fps: float | None = None,
    rng: np.random.Generator | None = None,
    transform: Callable[[Image.Image], Image.Image] | None = None,
    meta: dict | None = None,
) -> torch.Tensor:
    """Decode, sample (see :func:`sample_indices`) and ``transform`` each frame: ``uint8 [T, C, H, W]``.

    ``meta`` (``frames``/``fps`` from a manifest) saves opening the file twice.
    """
    info = meta if meta and meta.get("frames") and meta.get("fps") else probe(path)
    idx = sample_indices(
        int(info["frames"]),
        float(info["fps"]),
        num_frames=num_frames,
        interval=interval,
        target_fps=target_fps,
        rng=rng,
    )
    frames = decode_frames(path, idx)
    if transform is not None:
        frames = [transform(f) for f in frames]
    return image.to_tensor(frames)


def write_video(path: str, frames: np.ndarray, fps: int = 8, codec: str = "mpeg4") -> None:
    """Encode ``uint8 [T, H, W, 3]`` frames (even H and W) to a video file; used by the synthetic datasets."""
    import av

    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        s.options = {"qscale": "3"} if codec == "mpeg4" else {}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(s.encode())
