"""2-D convolution with a PyTorch-layout weight ``[out, in, kh, kw]`` (so diffusers checkpoints map 1:1).

Example::

    >>> import torch
    >>> from functional_mm import nn, random
    >>> p, axes = nn.unbox(nn.conv.init(random.key(0), 3, 8, 3))
    >>> axes["weight"]
    ('embed', 'channels', None, None)
    >>> nn.conv.apply(p, torch.ones(1, 3, 16, 16), padding=1).shape
    torch.Size([1, 8, 16, 16])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from functional_mm import random
from functional_mm.nn._param import Param, param


def init(
    key: torch.Tensor,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    *,
    bias: bool = True,
    axes: tuple[str | None, str | None] = ("channels", "embed"),
    std: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Param]:
    """``axes`` names ``(in, out)`` like :func:`functional_mm.nn.linear.init`; the kernel dims are unnamed.
    ``std`` defaults to ``1/sqrt(fan_in)`` (LeCun normal); the bias starts at zero."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    std = 1.0 / math.sqrt(in_channels * kh * kw) if std is None else std
    in_axis, out_axis = axes
    w = random.normal(key, (out_channels, in_channels, kh, kw), dtype) * std
    p = {"weight": param(w, (out_axis, in_axis, None, None))}
    if bias:
        p["bias"] = param(torch.zeros(out_channels, dtype=dtype), (out_axis,))
    return p


def apply(
    p: dict[str, torch.Tensor],
    x: torch.Tensor,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """``x: [B, C_in, H, W] -> [B, C_out, H', W']``."""
    w = p["weight"]
    if x.dim() != 4 or x.shape[1] != w.shape[1]:
        raise ValueError(f"conv: expected [B, {w.shape[1]}, H, W], got {list(x.shape)}")
    return F.conv2d(x, w, p.get("bias"), stride=stride, padding=padding)
