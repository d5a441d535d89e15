"""Fixed sinusoidal embeddings: diffusion timesteps and 2-D positions (SD3's patch grid).

Both follow diffusers bit for bit (same op order and dtypes), because diffusion checkpoints were trained on
exactly these tables.

Example::

    >>> import torch
    >>> timestep_embedding(torch.tensor([0.0, 500.0]), 256).shape       # [B, 256], cos first
    torch.Size([2, 256])
    >>> sincos_2d(64, torch.arange(4.0), torch.arange(6.0)).shape       # [4 * 6, 64]
    torch.Size([24, 64])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """``t: [B]`` (may be fractional) -> ``[B, dim]`` float32 (DDPM / diffusers ``get_timestep_embedding``).

    The defaults are SD3's and Flux's (``flip_sin_to_cos=True``, ``downscale_freq_shift=0``): ``[cos, sin]``.
    """
    if t.dim() != 1:
        raise ValueError(f"timestep_embedding: t must be 1-D [B], got shape {list(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))  # [half]
    args = scale * (t[:, None].float() * freqs[None, :])  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``pos: [M]`` -> ``[M, dim]`` = ``[sin(pos * w), cos(pos * w)]`` with ``w_i = 10000^(-i / (dim/2))``,
    computed in float64 (as diffusers does off MPS) and returned in float64."""
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    out = torch.outer(pos.reshape(-1).to(torch.float64), omega)  # [M, dim/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """2-D table ``[len(rows) * len(cols), dim]`` in row-major order (float64).

    The first half of the channels encodes the *column* coordinate and the second half the row, which is
    what diffusers' ``get_2d_sincos_pos_embed`` (and so every SD3 checkpoint) does: its meshgrid puts ``w``
    first.
    """
    if dim % 2:
        raise ValueError(f"sincos_2d: dim must be even, got {dim}")
    h, w = rows.numel(), cols.numel()
    emb_c = sincos_1d(dim // 2, cols.reshape(1, w).expand(h, w))  # [h * w, dim/2]
    emb_r = sincos_1d(dim // 2, rows.reshape(h, 1).expand(h, w))
    return torch.cat([emb_c, emb_r], dim=1)
