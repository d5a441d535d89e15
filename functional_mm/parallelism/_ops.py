"""DTensor sharding rules for the ops that DTensor on torch 2.13 lacks and our models need.

CPU attention: ``F.scaled_dot_product_attention`` on CPU runs ``aten._scaled_dot_product_flash_attention_for_cpu``
(and its backward), for which DTensor registers no strategy. DTensor then propagates sharding through the
op's decomposition, which on a [B, H, T, Dh] input takes minutes per call (it explores every placement of
every intermediate): a training step effectively hangs. Attention is independent per batch row and per head,
so the rule is the one DTensor already has for the CUDA flash kernel: everything replicated, or q/k/v/out/
logsumexp all sharded on the batch dim, or all on the heads dim (Megatron TP). The mask, when there is one,
follows q on the batch dim when it has a real batch dim and is replicated otherwise (its head dim is 1).

Registered with the public experimental ``register_sharding``, once, at import of
``functional_mm.parallelism``; an op that DTensor learns to shard itself (a later torch) is left alone.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

aten = torch.ops.aten


def _mask_placement(mask, dim: int, q_shape) -> object:
    if mask is None:
        return None
    shape = mask.tensor_meta.shape if hasattr(mask, "tensor_meta") else mask.shape
    # A mask dim of size 1 broadcasts: it stays whole while q is split along that dim.
    return Shard(dim) if len(shape) == 4 and shape[dim] == q_shape[dim] and shape[dim] > 1 else Replicate()


def _shape(x):
    return x.tensor_meta.shape if hasattr(x, "tensor_meta") else x.shape


def _cpu_sdpa_forward(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    shardings = [
        (
            [Replicate(), Replicate()],
            [Replicate()] * 3 + [None, None] + ([Replicate()] if attn_mask is not None else []),
        )
    ]
    for dim in (0, 1):  # batch, heads
        mask = [_mask_placement(attn_mask, dim, _shape(query))] if attn_mask is not None else []
        shardings.append(([Shard(dim), Shard(dim)], [Shard(dim)] * 3 + [None, None] + mask))
    return shardings


def _cpu_sdpa_backward(
    grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None, scale=None
):
    shardings = []
    for p in (Replicate(), Shard(0), Shard(1)):
        if attn_mask is None:
            mask = []
        elif isinstance(p, Replicate):
            mask = [Replicate()]
        else:
            mask = [_mask_placement(attn_mask, p.dim, _shape(query))]
        shardings.append(([p] * 3, [p] * 6 + [None, None] + mask))
    return shardings


def _register() -> None:
    prop = DTensor._op_dispatcher.sharding_propagator
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is None or bwd is None:
        return
    for op, rule in ((fwd.default, _cpu_sdpa_forward), (bwd.default, _cpu_sdpa_backward)):
        if op not in prop.op_strategy_funcs:
            register_sharding(op)(rule)


_register()
