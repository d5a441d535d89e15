"""Adaptive LayerNorm modulation (adaLN / adaLN-Zero, as in DiT, SD3 and Flux).

A conditioning vector ``c: [B, Dc]`` (timestep + pooled text) is turned into ``n`` per-channel vectors by
``linear(silu(c))``; they shift, scale and gate the residual branches. adaLN-Zero initialises that linear to
zero, so every block starts as the identity and the network trains from a stable point.

Example::

    >>> import torch
    >>> from functional_mm import nn, random
    >>> p, _ = nn.unbox(nn.modulation.init(random.key(0), 16, 8, 6))
    >>> shift, scale, gate, *_ = nn.modulation.apply(p, torch.randn(2, 16), 6)   # each [B, D]
    >>> y = nn.modulation.modulate(nn.modulation.layer_norm(torch.randn(2, 5, 8)), shift, scale)
    >>> bool((gate == 0).all())   # adaLN-Zero
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from functional_mm.nn import linear
from functional_mm.nn._param import Param


def init(
    key: torch.Tensor,
    cond_dim: int,
    dim: int,
    num_chunks: int,
    *,
    zero: bool = True,
    axes: tuple[str | None, str | None] = ("embed", "mlp"),
    dtype: torch.dtype = torch.float32,
) -> dict[str, Param]:
    """``linear`` ``[num_chunks * dim, cond_dim]`` with bias. ``axes`` names ``(in, out)``: the output is a
    wide column projection like an MLP up-projection, hence ``"mlp"``. ``zero`` gives adaLN-Zero."""
    return linear.init(
        key, cond_dim, num_chunks * dim, axes=axes, bias=True, std=0.0 if zero else None, dtype=dtype
    )


def apply(p: dict[str, torch.Tensor], cond: torch.Tensor, num_chunks: int) -> tuple[torch.Tensor, ...]:
    """``cond: [B, Dc]`` -> ``num_chunks`` tensors ``[B, D]`` (in the order the weight rows are stored)."""
    return linear.apply(p, F.silu(cond)).chunk(num_chunks, dim=-1)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim without affine parameters (the modulation supplies them)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with ``x: [B, T, D]`` and ``shift/scale: [B, D]``."""
    return x * (1 + scale[:, None]) + shift[:, None]
