"""Token embedding table ``[vocab, embed]`` with lookup and tied-output ("attend") projection."""

from __future__ import annotations

import torch

from functional_mm import random
from functional_mm.nn._param import Param, param


def init(
    key: torch.Tensor,
    num_embeddings: int,
    dim: int,
    *,
    axes: tuple[str | None, str | None] = ("vocab", "embed"),
    std: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Param]:
    return {"weight": param(random.normal(key, (num_embeddings, dim), dtype) * std, axes)}


def apply(p: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """``ids: [...] (integer) -> [..., dim]``."""
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"embedding: ids must be int32/int64, got {ids.dtype}")
    return p["weight"][ids]


def attend(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Project ``x: [..., dim]`` onto the table: logits ``[..., vocab]`` (tied output head)."""
    return x @ p["weight"].t()
