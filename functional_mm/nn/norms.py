"""LayerNorm and RMSNorm.

RMSNorm computes in float32 and casts back, as Hugging Face Llama/Qwen2 do; that is what makes bf16 parity
possible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from functional_mm.nn._param import Param, param


def init_layer_norm(
    dim: int, *, axes: tuple[str | None] = ("norm",), bias: bool = True, dtype: torch.dtype = torch.float32
) -> dict[str, Param]:
    p = {"scale": param(torch.ones(dim, dtype=dtype), axes)}
    if bias:
        p["bias"] = param(torch.zeros(dim, dtype=dtype), axes)
    return p


def layer_norm(p: dict[str, torch.Tensor], x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``x: [..., dim]``; normalises the last dimension."""
    return F.layer_norm(x, (x.shape[-1],), p.get("scale"), p.get("bias"), eps)


def init_rms_norm(
    dim: int, *, axes: tuple[str | None] = ("norm",), dtype: torch.dtype = torch.float32
) -> dict[str, Param]:
    return {"scale": param(torch.ones(dim, dtype=dtype), axes)}


def rms_norm(p: dict[str, torch.Tensor], x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * scale`` over the last dimension, computed in float32."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return p["scale"] * x32.to(dtype)


def init_group_norm(
    channels: int, *, axes: tuple[str | None] = ("norm",), dtype: torch.dtype = torch.float32
) -> dict[str, Param]:
    return {
        "scale": param(torch.ones(channels, dtype=dtype), axes),
        "bias": param(torch.zeros(channels, dtype=dtype), axes),
    }


def group_norm(p: dict[str, torch.Tensor], x: torch.Tensor, groups: int, eps: float = 1e-6) -> torch.Tensor:
    """``x: [B, C, ...]``; normalises each of ``groups`` channel groups over its channels and spatial dims."""
    if x.shape[1] % groups:
        raise ValueError(f"group_norm: {x.shape[1]} channels are not divisible into {groups} groups")
    return F.group_norm(x, groups, p.get("scale"), p.get("bias"), eps)
