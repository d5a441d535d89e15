"""Dense layer. The weight is stored PyTorch-style as ``[out, in]`` so Hugging Face checkpoints map 1:1.

Example::

    >>> from functional_mm import nn, random
    >>> p, axes = nn.unbox(nn.linear.init(random.key(0), 4, 8, axes=("embed", "mlp"), bias=True))
    >>> nn.linear.apply(p, torch.ones(2, 4)).shape
    torch.Size([2, 8])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from functional_mm import random
from functional_mm.nn._param import Param, param


def init(
    key: torch.Tensor,
    in_dim: int,
    out_dim: int,
    *,
    axes: tuple[str | None, str | None],
    bias: bool = False,
    std: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Param]:
    """``axes`` are the logical names of ``(in, out)``; the weight's own axes are ``(out, in)``.
    ``std`` defaults to ``1/sqrt(in_dim)`` (LeCun normal); the bias starts at zero."""
    std = 1.0 / math.sqrt(in_dim) if std is None else std
    in_axis, out_axis = axes
    p = {"weight": param(random.normal(key, (out_dim, in_dim), dtype) * std, (out_axis, in_axis))}
    if bias:
        p["bias"] = param(torch.zeros(out_dim, dtype=dtype), (out_axis,))
    return p


def apply(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``x: [..., in] -> [..., out]``."""
    w = p["weight"]
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: input feature size {x.shape[-1]} does not match weight {tuple(w.shape)}")
    return F.linear(x, w, p.get("bias"))
