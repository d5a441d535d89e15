"""One collective per layer for FSDP/DDP at use: the weights of a ``use_params`` call travel in one flat buffer.

Per-leaf ``redistribute`` (``use_param``) issues one all-gather per weight forward and one reduce-scatter per
weight backward; on a slow transport (gloo, a few cores) the collective count, not the bytes, sets the step
time. Here the leaves of one ``use_params`` call that are laid out alike (same mesh, dtype, the same mesh axis
among the data axes sharding them, the other data axes replicated) share one buffer: each rank concatenates
its local shards, one ``all_gather_into_tensor`` brings every rank's block, and each full weight is copied out
of it (FSDP2's flat-parameter all-gather, without flat parameters: params stay DTensors). Backward, the
gradients (``Partial`` sums over the data axes) are packed in the same layout, one ``reduce_scatter_tensor``
(sum) returns this rank's shards, and an ``all_reduce`` over each replicated data axis (``dp`` in HSDP) ends
the reduction: the same sums as per-leaf ``redistribute``, in one collective per layer and data axis.

Layout of a bucket over mesh axis ``s`` of size ``k``: a leaf sharded on tensor dim ``d`` (global size ``n``)
has chunk ``c = ceil(n / k)`` (``torch.chunk``, as DTensor splits); each rank's block holds every leaf's
local shard padded to ``c`` along ``d`` and flattened, so block ``r`` is rank ``r``'s shards and the gathered
``[k, block]`` buffer viewed per leaf as ``[k, *shard]`` is the full weight with the rank axis in front of
``d``. A bucket with no sharded axis (all data axes replicated: DDP) has nothing to gather and all-reduces its
gradients in one buffer.

Leaves outside this pattern (split over two data axes, or over ``tp`` on the same dim as ``fsdp``, or with
placements other than ``Shard``/``Replicate``), a bucket of one leaf, and code being traced by
``torch.compile`` take the per-leaf path. The collectives are asynchronous: the reduced gradients are views
of an in-flight ``AsyncCollectiveTensor``, waited for at first use (as ``use_param``'s are).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

__all__ = ["bucket_key", "gather_bucket"]

# torch 2.13 renamed the functional collectives (the old names warn); older torch (torch_npu) has only these
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


class _Plan(NamedTuple):
    """What a bucket's leaves share: the mesh, the mesh dim they are sharded over among the data axes (``None``:
    replicated over all of them) and the data axes' mesh dims."""

    mesh: DeviceMesh
    shard_dim: int | None
    data_dims: tuple[int, ...]


def bucket_key(w: DTensor, gather: Sequence[str]) -> tuple | None:
    """The bucket ``w`` goes into (leaves with equal keys share collectives), or ``None`` for the per-leaf path."""
    mesh = w.device_mesh
    names = mesh.mesh_dim_names or ()
    data_dims = tuple(i for i, name in enumerate(names) if name in gather)
    if not data_dims:
        return None  # nothing to gather or reduce over: use_param's redistribute is a no-op forward
    placements = w.placements
    # exact types: _StridedShard (a Shard subclass) and Partial params have layouts this packing does not know
    if not all(type(p) is Shard or p.is_replicate() for p in placements):
        return None
    sharded = [i for i in data_dims if type(placements[i]) is Shard]
    if len(sharded) > 1:
        return None
    shard_dim = sharded[0] if sharded else None
    if shard_dim is not None:
        d = placements[shard_dim].dim
        # another mesh dim splitting the same tensor dim (vocab over fsdp x tp) nests the chunks: per leaf
        if any(isinstance(p, Shard) and p.dim == d for i, p in enumerate(placements) if i != shard_dim):
            return None
    return (_Plan(mesh, shard_dim, data_dims), w.dtype, w.device, w.requires_grad)


def gather_bucket(leaves: list[DTensor], plan: _Plan, local: bool = False) -> tuple[torch.Tensor, ...]:
    """``leaves`` (sharing ``plan``, from :func:`bucket_key`) whole over the data axes, split as before over the
    others; differentiable, the gradients reduced in one collective per data axis. ``local=True`` (every other
    mesh axis of size 1): plain tensors, whose gradients are taken as this rank's part of the sum over the
    data axes (a ``local_rows`` region computes on its own rows)."""
    return _GatherBucket.apply(plan, local, *leaves)


def _compute_placements(plan: _Plan, placements: tuple[Placement, ...]) -> tuple[Placement, ...]:
    return tuple(Replicate() if i in plan.data_dims else p for i, p in enumerate(placements))


class _Slot(NamedTuple):
    """One leaf in a bucket over mesh dim ``s``: its offset and size in a rank's block, its tensor dim ``d``
    split over ``s`` (global size ``n``, chunk ``c``), this rank's shard size along ``d`` and the padded shard
    shape (``c`` along ``d``)."""

    offset: int
    numel: int
    d: int
    n: int
    c: int
    own: int
    padded: tuple[int, ...]


def _slots(leaves: Sequence[DTensor], plan: _Plan) -> list[_Slot]:
    k = plan.mesh.size(plan.shard_dim)
    slots, offset = [], 0
    for w in leaves:
        d = w.placements[plan.shard_dim].dim
        n = w.shape[d]
        c = -(-n // k)
        local = w.to_local().shape
        padded = tuple(c if i == d else s for i, s in enumerate(local))
        numel = math.prod(padded)
        slots.append(_Slot(offset, numel, d, n, c, local[d], padded))
        offset += numel
    return slots


def _pad(x: torch.Tensor, d: int, size: int) -> torch.Tensor:
    """``x`` zero-padded at the end of dim ``d`` to ``size``."""
    if x.shape[d] == size:
        return x
    out = x.new_zeros(tuple(size if i == d else s for i, s in enumerate(x.shape)))
    out.narrow(d, 0, x.shape[d]).copy_(x)
    return out


def _gather(leaves: Sequence[DTensor], plan: _Plan) -> tuple[list[torch.Tensor], list[_Slot] | None]:
    """Forward: the compute-layout local tensors of ``leaves`` (plain tensors) and the bucket's slots."""
    locals_ = [w.to_local() for w in leaves]
    if plan.shard_dim is None:
        return [x.view_as(x) for x in locals_], None
    mesh, s = plan.mesh, plan.shard_dim
    k = mesh.size(s)
    slots = _slots(leaves, plan)
    block = torch.cat([_pad(x, slot.d, slot.c).reshape(-1) for x, slot in zip(locals_, slots)])  # [P]
    gathered = _all_gather(block, 0, (mesh, s)).view(k, -1)  # [k, P]: rank r's block in row r
    out = []
    for slot in slots:
        d = slot.d
        pre, post = slot.padded[:d], slot.padded[d + 1 :]
        src = gathered[:, slot.offset : slot.offset + slot.numel].view(k, *slot.padded)  # [k, *shard]
        full = torch.empty(
            (*pre, k * slot.c, *post), dtype=block.dtype, device=block.device
        )  # [..., k*c, ...]
        full.view(*pre, k, slot.c, *post).copy_(src.movedim(0, d))  # waits for the all-gather
        if k * slot.c != slot.n:
            full = full.narrow(d, 0, slot.n)
            full = full if d == 0 else full.contiguous()
        out.append(full)
    return out, slots


def _reduce(
    grads: Sequence[torch.Tensor | None], leaves_meta: Sequence[tuple], plan: _Plan, slots: list[_Slot] | None
) -> list[torch.Tensor]:
    """Backward: each gradient (plain, the local part of a ``Partial`` sum over the data axes, compute layout)
    reduced to this rank's shard, in one reduce-scatter plus one all-reduce per replicated data axis."""
    mesh = plan.mesh
    if slots is None:
        shapes = [shape for shape, _ in leaves_meta]
        sizes = [math.prod(s) for s in shapes]
        parts = [
            torch.zeros(sz, dtype=dtype, device=dev) if g is None else g.reshape(-1)
            for g, sz, (_, (dtype, dev)) in zip(grads, sizes, leaves_meta)
        ]
        flat = torch.cat(parts)
        for i in plan.data_dims:
            flat = funcol.all_reduce(flat, "sum", (mesh, i))
        return [x.view(shape) for x, shape in zip(flat.split(sizes), shapes)]
    s = plan.shard_dim
    k = mesh.size(s)
    total = slots[-1].offset + slots[-1].numel
    dtype, dev = leaves_meta[0][1]
    fill = any(g is None for g in grads) or any(k * slot.c != slot.n for slot in slots)
    buf = (torch.zeros if fill else torch.empty)((k, total), dtype=dtype, device=dev)  # [k, P]
    for g, slot in zip(grads, slots):
        if g is None:
            continue
        d = slot.d
        pre, post = slot.padded[:d], slot.padded[d + 1 :]
        g = _pad(g, d, k * slot.c).reshape(*pre, k, slot.c, *post)
        buf[:, slot.offset : slot.offset + slot.numel].view(k, *slot.padded).copy_(g.movedim(d, 0))
    flat = _reduce_scatter(buf.view(-1), "sum", 0, (mesh, s))  # [P]: this rank's block
    for i in plan.data_dims:
        if i != s:  # replicated over this data axis (HSDP's dp): sum its replicas' shards
            flat = funcol.all_reduce(flat, "sum", (mesh, i))
    out = []
    for slot in slots:
        g = flat[slot.offset : slot.offset + slot.numel].view(slot.padded)
        if slot.own != slot.c:
            g = g.narrow(slot.d, 0, slot.own).contiguous()
        out.append(g)
    return out


def _is_sum(p: Placement) -> bool:
    return type(p) is Partial and p.reduce_op == "sum"


class _GatherBucket(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, local: bool, *leaves: DTensor):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        out, slots = _gather(leaves, plan)
        ctx.plan, ctx.slots, ctx.local = plan, slots, local
        ctx.meta = [(w.shape, w.stride(), tuple(w.placements)) for w in leaves]
        ctx.local_meta = [(tuple(x.shape), (x.dtype, x.device)) for x in out]
        if local:
            return tuple(out)
        mesh = plan.mesh
        return tuple(
            DTensor.from_local(
                x, mesh, _compute_placements(plan, p), run_check=False, shape=shape, stride=stride
            )
            for x, (shape, stride, p) in zip(out, ctx.meta)
        )

    @staticmethod
    def backward(ctx, *grads: DTensor | None):  # type: ignore[override]
        plan: _Plan = ctx.plan
        mesh = plan.mesh
        packed: list[torch.Tensor | None] = []
        alone: dict[int, DTensor] = {}
        for j, (g, (_, _, placements)) in enumerate(zip(grads, ctx.meta)):
            if g is None or ctx.local:  # local: g is already this rank's part of the sum, in the whole layout
                packed.append(g)
                continue
            computed = _compute_placements(plan, placements)
            if not isinstance(g, DTensor):  # the local part of a gradient in the output's layout
                g = DTensor.from_local(g, mesh, computed, run_check=False)
            if not all(_is_sum(g.placements[i]) for i in plan.data_dims):
                # not a sum over the data axes (e.g. already replicated): its own exact redistribute, and a
                # zero slot in the buffer (every rank takes the same decision: placements are SPMD)
                alone[j] = g.redistribute(mesh, placements)
                packed.append(None)
                continue
            pending = tuple(Partial() if i in plan.data_dims else p for i, p in enumerate(placements))
            if tuple(g.placements) != pending:  # the non-data axes (tp) first, as they are in the weight
                g = g.redistribute(mesh, pending)
            packed.append(g.to_local())
        reduced = _reduce(packed, ctx.local_meta, plan, ctx.slots)
        out = []
        for j, (x, (shape, stride, placements)) in enumerate(zip(reduced, ctx.meta)):
            if j in alone:
                out.append(alone[j])
            elif not ctx.needs_input_grad[j + 2]:
                out.append(None)
            else:
                out.append(
                    DTensor.from_local(x, mesh, placements, run_check=False, shape=shape, stride=stride)
                )
        return (None, None, *out)
