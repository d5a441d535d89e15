"""Rotary position embeddings (RoFormer), in the Hugging Face "rotate half" layout.

``inv_freq`` depends only on the config; ``cos_sin`` turns positions into the tables ``apply`` multiplies in.
Scaling: ``None`` (default), ``linear`` and ``llama3`` (Llama 3.1's frequency-dependent smoothing).

Multi-axis variants for vision-language models: :func:`cos_sin_axial` (2-D rotary over patch rows and columns,
as in the Qwen2-VL vision tower) and :func:`cos_sin_mrope` (Qwen2-VL's multimodal RoPE: the frequency bands are
split into temporal / height / width sections, each driven by its own position id).

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


def cos_sin_axial(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Axial rotary tables: ``positions: [..., T, A]`` (one integer coordinate per axis, e.g. ``A = 2`` for
    (row, column)) -> ``(cos, sin)``, each ``[..., T, 2 * A * len(inv_freq)]``.

    Every axis uses the same frequencies; the angles are laid out ``[axis 0 | axis 1 | ...]`` and repeated
    for the two rotate-half halves, which is the Qwen2-VL vision layout (``inv_freq`` from
    ``frequencies(head_dim // A, theta)`` so the table spans the whole head).

    Example::

        >>> inv = frequencies(8, theta=10000.0)                       # head_dim 16, two axes
        >>> rows_cols = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])  # a 2x2 grid of patches
        >>> cos, sin = cos_sin_axial(rows_cols[None], inv)             # [1, 4, 16] each
    """
    angles = positions.float()[..., None] * inv_freq.to(positions.device)  # [..., T, A, F]
    angles = angles.flatten(-2)  # [..., T, A * F]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def cos_sin_mrope(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    sections: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
):
    """Multimodal RoPE tables: ``positions: [3, B, T]`` (temporal, height, width ids) -> ``(cos, sin)``, each
    ``[B, T, 2 * len(inv_freq)]``.

    The ``len(inv_freq)`` frequencies are cut into consecutive ``sections`` (``mrope_section``, summing to
    ``head_dim // 2``); section ``i`` rotates by the position of axis ``i % 3``. Text tokens have equal ids on
    the three axes, so for them this is plain 1-D RoPE.

    Example::

        >>> inv = frequencies(16, theta=1e6)                  # 8 frequencies
        >>> pos = torch.arange(5).expand(3, 1, 5)             # text only: three equal rows
        >>> cos, sin = cos_sin_mrope(pos, inv, (4, 2, 2))
        >>> torch.allclose(cos, cos_sin(pos[0], inv)[0])
        True
    """
    if sum(sections) != inv_freq.shape[0]:
        raise ValueError(f"mrope sections {tuple(sections)} must sum to head_dim // 2 = {inv_freq.shape[0]}")
    if positions.dim() != 3 or positions.shape[0] != 3:
        raise ValueError(f"mrope positions must be [3, B, T], got {list(positions.shape)}")
    angles = positions.float()[..., None] * inv_freq.to(positions.device)  # [3, B, T, F]
    # [F]: which of t/h/w drives each frequency (built from the Python ints: no data-dependent op to compile)
    axis = torch.tensor([i % 3 for i, n in enumerate(sections) for _ in range(n)], device=positions.device)
    angles = angles.gather(0, axis.view(1, 1, 1, -1).expand(1, *angles.shape[1:]))[0]  # [B, T, F]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x: [B, H, T, Dh]``, ``cos/sin: [B, T, Dh]`` -> rotated ``x``."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


def multi_axis_cos_sin(
    ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for positions with several coordinates (Flux: ``(index, row, col)``), interleaved layout.

    ``ids: [T, n_axes]`` -> ``(cos, sin)``, each ``[T, sum(axes_dim)]`` float32: axis ``i`` owns a slice of
    ``axes_dim[i]`` channels with its own frequencies ``theta^(-2j/axes_dim[i])``, each frequency repeated for
    the two channels of a pair. Angles are computed in float64 (as diffusers does) so large positions stay
    exact. Use with :func:`apply_interleaved`.
    """
    if ids.dim() != 2 or ids.shape[-1] != len(axes_dim):
        raise ValueError(f"multi_axis_cos_sin: ids must be [T, {len(axes_dim)}], got {list(ids.shape)}")
    pos = ids.float()
    cos, sin = [], []
    for i, d in enumerate(axes_dim):
        if d % 2:
            raise ValueError(f"multi_axis_cos_sin: axes_dim[{i}]={d} must be even")
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d))
        angles = torch.outer(pos[:, i], freqs)  # [T, d/2] float64
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2i, 2i+1)`` (the GPT-J / Flux layout, not "rotate half").

    ``x: [B, H, T, Dh]``, ``cos/sin: [T, Dh]``; computed in float32 and cast back to ``x.dtype``.
    """
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # [B, H, T, Dh/2]
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
