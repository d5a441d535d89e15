"""Ready-made sample processors: ``processor(sample, ctx) -> dict`` for the Loader, one per common task.

They are small picklable dataclasses composed of the modality functions, meant as working defaults and as
examples of writing one's own:

- :class:`ImageCaption` — image + caption for image generation / encoders: ``{"pixels": [C, H, W], "caption"}``;
- :class:`VideoClip` — clip + caption for video generation: ``{"video": [T, C, H, W], "caption"}``;
- :class:`ChatVLM` — image/video + conversation for VLM training (Qwen2-VL patches or InternVL tiles,
  placeholders expanded, prompt masked): ``{"tokens", "loss_mask", "pixel_values", ["image_grid_thw"]}``;
- :class:`AudioTranscript` — speech + text for Whisper-style models: ``{"input_features", "tokens", "loss_mask"}``.

With a :class:`~functional_mm.data.BucketBatcher`, ``ctx.bucket`` overrides the output size (and frame count),
so every sample of a batch has the bucket's shape.

Example::

    >>> proc = ImageCaption(size=(64, 64))
    >>> sample = {"image": "a.png", "caption": "a red circle"}                  # doctest: +SKIP
    >>> proc(sample, SampleContext(index=0, epoch=0, seed=0))["pixels"].shape    # doctest: +SKIP
    torch.Size([3, 64, 64])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from functional_mm.data import audio, chat, image, video
from functional_mm.data.loader import SampleContext
from functional_mm.data.sources import SkipSample


def _fit(img: Image.Image, size: tuple[int, int], crop: str, ctx: SampleContext) -> Image.Image:
    img = image.resize_cover(img, size)
    return image.random_crop(img, size, ctx.rng()) if crop == "random" else image.center_crop(img, size)


def _media(sample: dict, key: str) -> list[str]:
    v = sample.get(key) or sample.get(key + "s") or []
    return [v] if isinstance(v, str) else list(v)


@dataclasses.dataclass
class ImageCaption:
    """Cover-resize and crop to ``size`` (or the bucket's), normalise with ``mean_std`` (default [-1, 1])."""

    size: tuple[int, int] | None = None
    crop: str = "center"
    mean_std: tuple[Sequence[float], Sequence[float]] = image.HALF
    text_key: str = "caption"

    def __call__(self, sample: dict, ctx: SampleContext) -> dict:
        size = (ctx.bucket.height, ctx.bucket.width) if ctx.bucket is not None else self.size
        img = image.load_image(_media(sample, "image")[0])
        if size is not None:
            img = _fit(img, size, self.crop, ctx)
        return {
            "pixels": image.normalize(image.to_tensor(img), *self.mean_std),
            "caption": sample.get(self.text_key, ""),
        }


@dataclasses.dataclass
class VideoClip:
    """``num_frames`` frames every ``interval`` at a random (keyed) start, or the bucket's frame count;
    frames cover-resized and cropped to ``size`` / the bucket's; float ``[T, C, H, W]`` normalised."""

    num_frames: int = 16
    interval: int = 1
    size: tuple[int, int] | None = None
    crop: str = "center"
    mean_std: tuple[Sequence[float], Sequence[float]] = image.HALF
    text_key: str = "caption"

    def __call__(self, sample: dict, ctx: SampleContext) -> dict:
        b = ctx.bucket
        frames, size = (b.frames, (b.height, b.width)) if b is not None else (self.num_frames, self.size)
        clip = video.load_video(
            _media(sample, "video")[0],
            num_frames=frames,
            interval=self.interval,
            rng=ctx.rng(),
            transform=None if size is None else (lambda f: _fit(f, size, self.crop, ctx)),
            meta=sample,
        )
        return {"video": image.normalize(clip, *self.mean_std), "caption": sample.get(self.text_key, "")}


@dataclasses.dataclass
class ChatVLM:
    """A conversation with images (or one video) as VLM input.

    ``vision="qwen2_vl"``: patches + ``image_grid_thw``, ``grid.prod() // merge_size**2`` tokens per image
    (videos: frames at ``video_fps`` up to ``max_frames``). ``vision="internvl"``: ``tiles x
    tokens_per_tile`` tokens per image. A sample with ``caption`` but no ``conversations`` becomes
    ``[user: <image>, assistant: caption]``. Samples longer than ``max_len`` tokens are skipped (counted).
    """

    tokenizer: Any
    template: chat.ChatTemplate = chat.CHATML
    vision: str = "qwen2_vl"
    max_len: int | None = None
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 256
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    video_fps: float = 2.0
    max_frames: int = 16
    tile_size: int = 448
    max_tiles: int = 12
    tokens_per_tile: int = 256

    def conversation(self, sample: dict) -> list[dict]:
        if "conversations" in sample:
            return sample["conversations"]
        tag = "<video>" if _media(sample, "video") else "<image>" * len(_media(sample, "image"))
        return [{"role": "user", "content": tag}, {"role": "assistant", "content": sample.get("caption", "")}]

    def _image(self, img: Image.Image) -> tuple[dict, int]:
        if self.vision == "qwen2_vl":
            p, g = image.qwen2_vl_patches(
                img,
                patch_size=self.patch_size,
                merge_size=self.merge_size,
                temporal_patch_size=self.temporal_patch_size,
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
            )
            return {"pixel_values": p, "image_grid_thw": g[None]}, int(g.prod()) // self.merge_size**2
        if self.vision == "internvl":
            tiles = image.internvl_tiles(img, self.tile_size, max_tiles=self.max_tiles)
            return {"pixel_values": image.normalize(image.to_tensor(tiles), *image.IMAGENET)}, len(
                tiles
            ) * self.tokens_per_tile
        raise ValueError(f"vision must be 'qwen2_vl' or 'internvl', got {self.vision!r}")

    def __call__(self, sample: dict, ctx: SampleContext) -> dict:
        parts, img_tokens, vid_tokens = [], [], []
        for path in _media(sample, "image"):
            feats, n = self._image(image.load_image(path))
            parts.append(feats)
            img_tokens.append(n)
        for path in _media(sample, "video"):
            if self.vision != "qwen2_vl":
                raise ValueError("ChatVLM: videos are supported with vision='qwen2_vl'")
            clip = video.load_video(path, target_fps=self.video_fps, num_frames=self.max_frames, meta=sample)
            frames = [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in clip]
            p, g = image.qwen2_vl_patches(
                frames, patch_size=self.patch_size, merge_size=self.merge_size,
                temporal_patch_size=self.temporal_patch_size, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
            )  # fmt: skip
            parts.append({"pixel_values_videos": p, "video_grid_thw": g[None]})
            vid_tokens.append(int(g.prod()) // self.merge_size**2)
        out = chat.encode_conversation(
            self.tokenizer,
            self.template,
            self.conversation(sample),
            image_tokens=img_tokens,
            video_tokens=vid_tokens,
        )
        if self.max_len is not None and len(out["tokens"]) > self.max_len:
            raise SkipSample(f"{len(out['tokens'])} tokens > max_len={self.max_len}")
        for k in {k for p in parts for k in p}:
            out[k] = torch.cat([p[k] for p in parts if k in p])
        return out

    def num_tokens(self, sample: dict) -> int:
        """The sample's token count from its metadata (``width``/``height``), without decoding the image: exact
        lengths for :class:`~functional_mm.data.PackingBatcher` / ``LengthGroupedBatcher``."""
        n_img = len(_media(sample, "image"))
        if _media(sample, "video") or (n_img and not sample.get("width")):
            raise ValueError("num_tokens needs images with width/height metadata (videos: process to count)")
        if self.vision == "qwen2_vl":
            f = self.patch_size * self.merge_size
            h, w = image.smart_resize(
                int(sample.get("height", f)), int(sample.get("width", f)), f, self.min_pixels, self.max_pixels
            )
            per = (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2
        else:
            cols, rows = image._tile_grid(
                int(sample.get("height", 1)), int(sample.get("width", 1)), self.tile_size, 1, self.max_tiles
            )
            per = (cols * rows + (cols * rows > 1)) * self.tokens_per_tile
        out = chat.encode_conversation(
            self.tokenizer, self.template, self.conversation(sample), image_tokens=[per] * n_img
        )
        return len(out["tokens"])


@dataclasses.dataclass
class AudioTranscript:
    """Whisper log-mel features of the (resampled) audio and the transcript as ``bos text eos`` labels."""

    tokenizer: Any
    sampling_rate: int = 16000
    n_mels: int = 80
    num_samples: int | None = 30 * 16000
    text_key: str = "text"

    def __call__(self, sample: dict, ctx: SampleContext) -> dict:
        wave, _ = audio.load_audio(_media(sample, "audio")[0], self.sampling_rate)
        feats = audio.log_mel_spectrogram(
            wave, n_mels=self.n_mels, sampling_rate=self.sampling_rate, num_samples=self.num_samples
        )
        ids = self.tokenizer.encode(sample.get(self.text_key, ""), bos=True, eos=True)
        tokens = torch.tensor(ids, dtype=torch.int64)
        return {"input_features": feats, "tokens": tokens, "loss_mask": (torch.arange(len(ids)) > 0).long()}
