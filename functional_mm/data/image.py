"""Image decoding and processing: resize / crop / normalise, InternVL dynamic tiling, Qwen2-VL patches.

Resizing is Pillow's (bicubic by default) on uint8 images and normalisation is float32 ``(x/255 - mean) / std``
with the same operation order as ``transformers``' image processors, so :func:`qwen2_vl_patches` and
:func:`internvl_tiles` + :func:`normalize` give bit-identical pixel values to ``Qwen2VLImageProcessorPil`` and
``GotOcr2ImageProcessorPil(crop_to_patches=True)`` (the processor transformers uses for InternVL); see
tests/test_data_image.py.

Example::

    >>> img = load_image("cat.jpg")                                           # doctest: +SKIP
    >>> x = normalize(to_tensor(center_crop(resize_short_side(img, 224), (224, 224))), *CLIP)  # doctest: +SKIP
    >>> x.shape                                                               # doctest: +SKIP
    torch.Size([3, 224, 224])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from functional_mm.data.sources import MediaError

BICUBIC = Image.Resampling.BICUBIC
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # (mean, std)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # SigLIP, and [-1, 1] for diffusion VAEs


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent pixels are composited on white (as transformers does) instead of turning black."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "P") and (img.mode != "P" or "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str) -> Image.Image:
    """Decode an image file fully (so truncated files fail here, not later) as RGB; failures are MediaError."""
    try:
        with Image.open(path) as f:
            f.load()
            return to_rgb(f)
    except FileNotFoundError:
        raise MediaError(path, "file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(path, f"cannot decode image ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------------
# resize and crop (PIL in, PIL out; sizes are (height, width) throughout)


def resize(img: Image.Image, size: tuple[int, int], resample=BICUBIC) -> Image.Image:
    """Exactly ``(height, width)``; a no-op when the size already matches."""
    h, w = size
    return img if img.size == (w, h) else img.resize((w, h), resample=resample)


def resize_short_side(
    img: Image.Image, short: int, max_long: int | None = None, resample=BICUBIC
) -> Image.Image:
    """Keep the aspect ratio, short side = ``short`` (then long side <= ``max_long`` if given)."""
    w, h = img.size
    scale = short / min(h, w)
    if max_long is not None and max(h, w) * scale > max_long:
        scale = max_long / max(h, w)
    return resize(img, (max(1, round(h * scale)), max(1, round(w * scale))), resample)


def resize_max_area(img: Image.Image, max_area: int, multiple: int = 1, resample=BICUBIC) -> Image.Image:
    """Keep the aspect ratio with ``h * w <= max_area``, both sides multiples of ``multiple`` (never upscales
    beyond rounding to the multiple)."""
    w, h = img.size
    scale = min(1.0, math.sqrt(max_area / (h * w)))
    nh = max(multiple, int(h * scale) // multiple * multiple)
    nw = max(multiple, int(w * scale) // multiple * multiple)
    return resize(img, (nh, nw), resample)


def resize_cover(img: Image.Image, size: tuple[int, int], resample=BICUBIC) -> Image.Image:
    """Keep the aspect ratio, scaled so the image covers ``size`` (crop it afterwards): the usual bucket resize."""
    w, h = img.size
    th, tw = size
    scale = max(th / h, tw / w)
    return resize(img, (max(th, math.ceil(h * scale - 1e-6)), max(tw, math.ceil(w * scale - 1e-6))), resample)


def crop(img: Image.Image, top: int, left: int, size: tuple[int, int]) -> Image.Image:
    h, w = size
    if top < 0 or left < 0 or top + h > img.size[1] or left + w > img.size[0]:
        raise ValueError(f"crop {size} at ({top}, {left}) does not fit an image of (h, w) = {img.size[::-1]}")
    return img.crop((left, top, left + w, top + h))


def center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    w, h = img.size
    return crop(img, (h - size[0]) // 2, (w - size[1]) // 2, size)


def random_crop(img: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A crop at an offset drawn from ``rng`` (pass the loader's per-sample generator: reproducible)."""
    w, h = img.size
    return crop(img, int(rng.integers(h - size[0] + 1)), int(rng.integers(w - size[1] + 1)), size)


def stride_crops(img: Image.Image, size: tuple[int, int], stride: tuple[int, int] | int) -> list[Image.Image]:
    """All crops of ``size`` on a ``stride`` grid, row-major; the last row/column is flush with the edge so
    the whole image is covered."""
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    w, h = img.size

    def starts(full, n, s):
        xs = list(range(0, max(full - n, 0) + 1, s))
        return xs if xs[-1] == full - n else [*xs, full - n]

    return [crop(img, t, l, size) for t in starts(h, size[0], sh) for l in starts(w, size[1], sw)]


# ---------------------------------------------------------------------------------------------------------------
# tensors


def to_tensor(img: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
    """uint8 ``[C, H, W]`` (or ``[T, C, H, W]`` for a list of same-size frames); a channels-last view, which
    :func:`normalize` reads as is (``.contiguous()`` it for anything else that needs it)."""
    if isinstance(img, Image.Image):
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return torch.from_numpy(np.stack([np.asarray(i) for i in img])).permute(0, 3, 1, 2)


def normalize(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], scale: float = 1 / 255
) -> torch.Tensor:
    """float32 ``(x * scale - mean) / std`` over the channel dim -3 of ``[..., C, H, W]``.

    The rescale runs in float64 and is rounded to float32 before the float32 subtract/divide: the operation
    order of transformers' image processors, which makes the result bit-identical to theirs. For uint8 input
    the 256 possible results per channel are computed that way once and gathered (3x faster than the
    arithmetic on every pixel, same bits).
    """
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    if x.dtype != torch.uint8:
        return ((x.to(torch.float64) * scale).to(torch.float32) - m) / s
    lut = (_rescaled(scale)[None, None, :] - m) / s  # [C, 1, 256]
    xn, lut = x.numpy(), lut[:, 0].numpy()
    out = np.empty(xn.shape, np.float32)
    for c in range(xn.shape[-3]):
        np.take(lut[c], xn[..., c, :, :], out=out[..., c, :, :], mode="clip")
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=8)
def _rescaled(scale: float) -> torch.Tensor:
    return (torch.arange(256, dtype=torch.float64) * scale).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Qwen2-VL


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of ``factor``, area within [min_pixels, max_pixels], aspect
    ratio kept as closely as rounding allows (the published algorithm, unchanged)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen2_vl_patches(
    frames: Image.Image | Sequence[Image.Image],
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    mean_std: tuple[Sequence[float], Sequence[float]] = CLIP,
    resample=BICUBIC,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An image (or a list of video frames) as Qwen2-VL vision input: ``(patches, grid_thw)``.

    ``patches: float32 [t*h*w, C * temporal_patch_size * patch_size**2]`` in the vision tower's order
    (merge_size x merge_size windows contiguous), ``grid_thw: int64 [3]``; the image costs
    ``grid_thw.prod() // merge_size**2`` LLM tokens. An image is repeated ``temporal_patch_size`` times; a
    video's frame count is padded to a multiple of it with the last frame.
    """
    frames = [frames] if isinstance(frames, Image.Image) else list(frames)
    w, h = frames[0].size
    rh, rw = smart_resize(h, w, patch_size * merge_size, min_pixels, max_pixels)
    x = normalize(to_tensor([resize(f, (rh, rw), resample) for f in frames]), *mean_std)  # [T, C, H, W]
    if x.shape[0] % temporal_patch_size:
        pad = temporal_patch_size - x.shape[0] % temporal_patch_size
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    t, c = x.shape[0] // temporal_patch_size, x.shape[1]
    gh, gw, m, p = rh // patch_size, rw // patch_size, merge_size, patch_size
    x = x.reshape(t, temporal_patch_size, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, gh/m, gw/m, m, m, C, tp, p, p]
    patches = x.reshape(t * gh * gw, c * temporal_patch_size * p * p)
    return patches, torch.tensor([t, gh, gw], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# InternVL


def _tile_grid(h: int, w: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) whose aspect ratio is closest to the image's; ties go to more tiles while the image
    area exceeds half the tiled area (InternVL's ``find_closest_aspect_ratio``)."""
    grids = sorted(
        (
            (c, r)
            for c in range(1, max_tiles + 1)
            for r in range(1, max_tiles + 1)
            if min_tiles <= c * r <= max_tiles
        ),
        key=lambda g: g[0] * g[1],
    )
    aspect, best, best_diff = w / h, (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and h * w > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best


def internvl_tiles(
    img: Image.Image,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    resample=BICUBIC,
) -> list[Image.Image]:
    """InternVL dynamic tiling: resize to the best ``columns x rows`` canvas of ``tile_size`` tiles, cut it
    row-major, and append a thumbnail of the whole image when there is more than one tile.

    Each tile costs ``num_image_token`` (256 for InternVL2.5/3 at 448 px) LLM tokens; normalise the stacked
    tiles with ``normalize(to_tensor(tiles), *IMAGENET)``.
    """
    w, h = img.size
    cols, rows = _tile_grid(h, w, tile_size, min_tiles, max_tiles)
    canvas = resize(img, (tile_size * rows, tile_size * cols), resample)
    tiles = [
        crop(canvas, r * tile_size, c * tile_size, (tile_size, tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(resize(img, (tile_size, tile_size), resample))
    return tiles
