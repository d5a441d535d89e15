"""Convolutional patch embedding for images ``[B, C, H, W]`` and videos ``[B, C, F, H, W]``
(kernel = stride = patch size), as in ViT / Qwen2-VL / video DiTs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from functional_mm import random
from functional_mm.nn._param import Param, param


def init(
    key: torch.Tensor,
    in_channels: int,
    dim: int,
    patch: tuple[int, ...],
    *,
    bias: bool = True,
    axes: tuple[str | None, str | None] = ("channels", "embed"),
    dtype: torch.dtype = torch.float32,
) -> dict[str, Param]:
    """``patch`` has 2 entries (image) or 3 (video: frames, height, width)."""
    if len(patch) not in (2, 3):
        raise ValueError(f"patch must have 2 (image) or 3 (video) entries, got {patch}")
    fan_in = in_channels * math.prod(patch)
    w = random.normal(key, (dim, in_channels, *patch), dtype) / math.sqrt(fan_in)
    in_axis, out_axis = axes
    p = {"weight": param(w, (out_axis, in_axis) + (None,) * len(patch))}
    if bias:
        p["bias"] = param(torch.zeros(dim, dtype=dtype), (out_axis,))
    return p


def apply(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``[B, C, (F,) H, W] -> [B, N, D]`` with ``N`` the number of patches in (F,) H, W order."""
    w = p["weight"]
    patch = tuple(w.shape[2:])
    if x.dim() != 2 + len(patch):
        raise ValueError(
            f"patch_embed: expected a {2 + len(patch)}-D input for patch {patch}, got {x.dim()}-D"
        )
    conv = F.conv2d if len(patch) == 2 else F.conv3d
    y = conv(x, w, p.get("bias"), stride=patch)  # [B, D, (F',) H', W']
    return y.flatten(2).transpose(1, 2)
