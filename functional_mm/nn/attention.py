"""Multi-head attention with grouped-query heads (GQA), rotary embeddings, masks and a functional KV cache.

Masks are boolean ``[B, 1, T, S]`` tensors, True where a query may attend a key; they become additive
float masks (``finfo.min``, not ``-inf``) so a fully masked row (a left-padding query) gives finite output
instead of NaN. ``scaled_dot_product_attention`` does the work underneath.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from functional_mm import random
from functional_mm.nn import linear, rope
from functional_mm.nn._param import Param


def make_mask(
    q_positions: torch.Tensor,
    kv_positions: torch.Tensor,
    *,
    causal: bool = True,
    kv_valid: torch.Tensor | None = None,
    q_segments: torch.Tensor | None = None,
    kv_segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask ``[B, 1, T, S]``.

    ``q_positions: [B, T]`` and ``kv_positions: [B, S]`` drive the causal rule (key position <= query
    position); ``kv_valid: [B, S]`` masks padding or unfilled cache slots; ``*_segments`` (packed sequences)
    forbid attention across samples.
    """
    b, t, s = q_positions.shape[0], q_positions.shape[1], kv_positions.shape[1]
    allowed = torch.ones(b, t, s, dtype=torch.bool, device=q_positions.device)
    if causal:
        allowed = allowed & (kv_positions[:, None, :] <= q_positions[:, :, None])
    if kv_valid is not None:
        allowed = allowed & kv_valid[:, None, :].bool()
    if q_segments is not None or kv_segments is not None:
        if q_segments is None or kv_segments is None:
            raise ValueError("make_mask: pass both q_segments and kv_segments, or neither")
        allowed = allowed & (q_segments[:, :, None] == kv_segments[:, None, :])
    return allowed[:, None]


def dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """``q: [B, H, T, Dh]``, ``k/v: [B, Hkv, S, Dh]`` with ``H % Hkv == 0`` -> ``[B, H, T, Dh]``."""
    h, hkv = q.shape[1], k.shape[1]
    if h % hkv:
        raise ValueError(f"attention: {h} query heads are not a multiple of {hkv} key/value heads")
    if h != hkv:  # each kv head serves h/hkv consecutive query heads
        rep = h // hkv
        k = k[:, :, None].expand(-1, -1, rep, -1, -1).reshape(k.shape[0], h, *k.shape[2:])
        v = v[:, :, None].expand(-1, -1, rep, -1, -1).reshape(v.shape[0], h, *v.shape[2:])
    attn_mask = None
    if mask is not None:
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        attn_mask = torch.where(mask, zero, torch.finfo(q.dtype).min)
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def init(
    key: torch.Tensor,
    dim: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    *,
    qkv_bias: bool = False,
    out_bias: bool = False,
    std: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, dict[str, Param]]:
    """Projections ``q, k, v, o``. Weight axes: q ``(heads, embed)``, k/v ``(kv_heads, embed)``, o
    ``(embed, heads)`` — the head dimension is folded into the heads axis, so a ``tp`` split of ``heads``
    cuts on head boundaries whenever ``tp`` divides the head count."""
    num_kv_heads = num_kv_heads or num_heads
    head_dim = head_dim or dim // num_heads
    kq, kk, kv, ko = random.split(key, 4)
    kw = dict(std=std, dtype=dtype)
    return {
        "q": linear.init(kq, dim, num_heads * head_dim, axes=("embed", "heads"), bias=qkv_bias, **kw),
        "k": linear.init(kk, dim, num_kv_heads * head_dim, axes=("embed", "kv_heads"), bias=qkv_bias, **kw),
        "v": linear.init(kv, dim, num_kv_heads * head_dim, axes=("embed", "kv_heads"), bias=qkv_bias, **kw),
        "o": linear.init(ko, num_heads * head_dim, dim, axes=("heads", "embed"), bias=out_bias, **kw),
    }


def apply(
    p: dict[str, dict[str, torch.Tensor]],
    x: torch.Tensor,
    *,
    head_dim: int,
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    cache: dict[str, torch.Tensor] | None = None,
    cache_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """``x: [B, T, D] -> ([B, T, D], new_cache)``.

    ``cache`` is ``{"k": [B, Hkv, S_max, Dh], "v": ...}``; the new keys/values are written at
    ``cache_index: [T]`` (out of place, static shapes) and attention runs over the whole cache, so ``mask``
    must hide the slots not yet written. Without a cache, ``new_cache`` is None.
    """
    b, t, _ = x.shape
    q = linear.apply(p["q"], x).view(b, t, -1, head_dim).transpose(1, 2)  # [B, H, T, Dh]
    k = linear.apply(p["k"], x).view(b, t, -1, head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
    v = linear.apply(p["v"], x).view(b, t, -1, head_dim).transpose(1, 2)
    if cos_sin is not None:
        q, k = rope.apply(q, *cos_sin), rope.apply(k, *cos_sin)
    new_cache = None
    if cache is not None:
        k = cache["k"].index_copy(2, cache_index, k.to(cache["k"].dtype))
        v = cache["v"].index_copy(2, cache_index, v.to(cache["v"].dtype))
        new_cache = {"k": k, "v": v}
    out = dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)  # [B, H, T, Dh]
    return linear.apply(p["o"], out.transpose(1, 2).reshape(b, t, -1)), new_cache
