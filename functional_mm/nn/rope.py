"""Rotary position embeddings (RoFormer), in the Hugging Face "rotate half" layout.

``inv_freq`` depends only on the config; ``cos_sin`` turns positions into the tables ``apply`` multiplies in.
Scaling: ``None`` (default), ``linear`` and ``llama3`` (Llama 3.1's frequency-dependent smoothing).

Example::

    >>> inv = frequencies(64, theta=10000.0)
    >>> cos, sin = cos_sin(torch.arange(8)[None], inv)   # [1, 8, 64] each
    >>> q = apply(torch.randn(1, 4, 8, 64), cos, sin)    # [B, H, T, Dh]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        return _llama3(inv, scaling)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


def _llama3(inv: torch.Tensor, s: Mapping[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype = torch.float32):
    """``positions: [B, T]`` -> ``(cos, sin)``, each ``[B, T, 2 * len(inv_freq)]`` (angles in float32)."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)[None, None, :]  # [B, T, Dh/2]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x: [B, H, T, Dh]``, ``cos/sin: [B, T, Dh]`` -> rotated ``x``."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin
