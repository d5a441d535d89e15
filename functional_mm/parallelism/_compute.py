"""Bringing sharded parameters and batches to their compute layout, and the vocab-parallel cross entropy.

The execution model is GSPMD's: parameters live sharded (over ``fsdp`` for memory, over ``tp`` for compute);
at use, :func:`use_param` gathers the *data* mesh axes (``dp``, ``fsdp``) and keeps the ``tp`` split, so a
matmul runs on whole-in-fsdp, tp-split weights against batch-sharded activations. The gather is an explicit
``redistribute``, whose backward sends the weight's gradient back to the weight's own placements: Partial
over ``fsdp`` becomes a reduce-scatter (ZeRO-3), Partial over ``dp`` an all-reduce (DDP), one collective per
weight. :func:`use_params` does the same for a whole layer with one collective per layer (its weights packed
in one buffer, ``_bucket.py``). Without a mesh every function here returns its input unchanged.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from functional_mm import pytree
from functional_mm.parallelism._bucket import bucket_key, gather_bucket
from functional_mm.parallelism._mesh import current, in_local_region, local_region
from functional_mm.parallelism._rules import Rules, logical_to_placements
from functional_mm.parallelism._shard import constrain

__all__ = ["DATA_AXES", "use_param", "use_params", "local_rows", "rows_like", "shard_batch", "cross_entropy"]

PyTree = Any

#: Mesh axes over which parameters are gathered at use (the batch is split over them).
DATA_AXES: tuple[str, ...] = ("dp", "fsdp")


def use_param(w: torch.Tensor, gather: Sequence[str] = DATA_AXES) -> torch.Tensor:
    """``w`` in its compute layout: whole over the mesh axes in ``gather`` (default ``dp`` and ``fsdp``),
    still split over the others (``tp``). Plain tensors come back unchanged.

    Always a ``redistribute`` (even when nothing moves), so the gradient arrives in ``w``'s own placements:
    reduce-scattered over ``fsdp``, all-reduced over ``dp``. (Used as is, a ``Shard`` weight would be gathered
    by DTensor's op propagation and its gradient left ``Partial``; see the package docstring.) The collectives
    are asynchronous in eager mode on accelerators: the gathered weight and the gradient are waited for at
    their first use (a gradient that is never used leaves torch's "wait_tensor() is not invoked" warning at
    exit). On CPU meshes (gloo) they are synchronous: DTensor's asynchronous redistribute corrupts the heap
    there (torch 2.13).

    Example::

        >>> w = shard(params, axes, mesh, rules)["mlp"]["up"]["weight"]  # (Shard(1) on fsdp, Shard(0) on tp)  # doctest: +SKIP
        >>> use_param(w).placements  # doctest: +SKIP
        (Replicate(), Shard(dim=0))
    """
    if not isinstance(w, DTensor):
        return w
    mesh = w.device_mesh
    names = mesh.mesh_dim_names or ()
    placements = tuple(
        Replicate() if name in gather else p for name, p in zip(names, w.placements, strict=True)
    )
    # async: the all-gathers of a layer's weights are all in flight before the first one is waited for (at its
    # first use), and the reduce-scatters of the gradients overlap the rest of the backward. Not on gloo (CPU
    # meshes): there DTensor's async redistribute corrupts the heap now and then (torch 2.13: 3 of 3 four-rank
    # runs of 60 gather / reduce-scatter rounds aborted, "malloc(): unaligned tcache chunk detected" or
    # SIGSEGV; 0 of 3 synchronous, and 0 of 3 through _bucket.py's functional collectives).
    w = w.redistribute(mesh, placements, async_op=mesh.device_type != "cpu")
    if in_local_region():  # the local rows' gradient is this rank's part of the sum over the gathered axes
        return w.to_local(
            grad_placements=[Partial() if name in gather else p for name, p in zip(names, placements)]
        )
    return w


def use_params(tree: PyTree, gather: Sequence[str] = DATA_AXES) -> PyTree:
    """:func:`use_param` on every tensor leaf of ``tree`` (one layer's parameters, say), with the collectives
    bucketed: the leaves laid out alike (e.g. every weight of a block split over ``fsdp``) are all-gathered in
    one collective and their gradients reduce-scattered in one (plus one all-reduce per replicated data axis:
    ``dp`` under HSDP, or the whole bucket under plain DP), as FSDP2's per-layer flat buffer does. The values
    and gradients are those of :func:`use_param`; only the number of collectives changes (see ``_bucket.py``
    for the layout and for the leaves that keep the per-leaf path). Under ``torch.compile`` every leaf takes
    the per-leaf path (the compiler schedules and may fuse those collectives itself), except inside a
    :func:`local_rows` region, where the bucketed collectives run eagerly at a graph break between the
    compiled layers (a few large collectives beat many small ones on gloo: 1.12 -> 1.03 of FSDP2's step).

    Example::

        >>> p = use_params(shard(params, axes, mesh, rules)["layers"][0])  # one all-gather for the block  # doctest: +SKIP
    """
    compiling = torch.compiler.is_compiling()
    if compiling and in_local_region():
        return _use_params_eagerly(tree, gather)
    leaves, treedef = pytree.flatten(tree)
    out = list(leaves)
    buckets: dict[tuple, list[int]] = {}
    for i, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor):
            continue
        key = None if compiling or not isinstance(x, DTensor) else bucket_key(x, gather)
        if key is None:
            out[i] = use_param(x, gather)
        else:
            buckets.setdefault(key, []).append(i)  # insertion order: the same bucket order on every rank
    for key, idx in buckets.items():
        if len(idx) == 1:  # one collective either way
            out[idx[0]] = use_param(leaves[idx[0]], gather)
            continue
        for i, x in zip(idx, gather_bucket([leaves[i] for i in idx], key[0], local=in_local_region())):
            out[i] = x
    return pytree.unflatten(treedef, out)


def local_rows(fn: Callable[..., Any] | None = None, *, rows_arg: int = 1) -> Callable[..., Any]:
    """``fn(params, ..., x, ...)`` (``x = args[rows_arg]``: ``[B, ...]`` rows in, rows out) run on each rank's
    own rows as plain tensors whenever that is exact: the current mesh splits nothing but the batch (every
    mesh axis of size > 1 is a data axis, ``dp`` / ``fsdp``), ``x`` is split over dim 0 on each of them, every
    rank has rows, and the other DTensor arguments are split like ``x`` or replicated. This is ``shard_map``
    for FSDP / DP / HSDP: inside, :func:`use_params` hands out the gathered weights as plain tensors (their
    gradients still reduce-scattered / all-reduced), :func:`constrain` and :func:`current` see no mesh, and
    the code runs its single-process path with none of DTensor's per-op dispatch; tensor outputs come back as
    DTensors laid out like ``x`` (each must keep ``x``'s rows in dim 0). Anything else (tensor or context
    parallelism, a partial or unsplit ``x``) runs ``fn`` unchanged, on DTensors. Use as ``@local_rows`` or
    ``@functools.partial(local_rows, rows_arg=2)``; nested calls run plainly inside the outer region.

    ``fn`` must treat rows independently (no batch statistics; random draws made outside and split with
    :func:`rows_like`), reach every sharded weight through ``use_params`` / ``use_param``, and take no plain
    tensor with the global batch's rows.

    Example::

        >>> block = local_rows(_block)  # def _block(p, x, cos_sin): p = use_params(p); ...  # doctest: +SKIP
        >>> with use_mesh(make_mesh({"fsdp": 4}), rules):  # doctest: +SKIP
        ...     x = block(params["layers"][0], x, cos_sin)  # x: DTensor [B, T, D], Shard(0)
    """
    if fn is None:
        return functools.partial(local_rows, rows_arg=rows_arg)

    rows_name = list(inspect.signature(fn).parameters)[rows_arg]

    def rows_of(args: tuple, kwargs: dict) -> Any:
        return args[rows_arg - 1] if len(args) >= rows_arg else kwargs.get(rows_name)

    @functools.wraps(fn)
    def run(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        ctx = current()
        x = rows_of(args, kwargs)
        if ctx is None or not isinstance(x, DTensor):
            return fn(params, *args, **kwargs)
        mesh = ctx[0]
        names = mesh.mesh_dim_names or ()
        split = [i for i in range(mesh.ndim) if mesh.size(i) > 1]
        rows = [x.placements[i] for i in split]
        # x's rows split over every mesh axis in play (a replicated x would count each row's gradient once
        # per rank), those axes all data axes; the other inputs split like x or whole
        if any(names[i] not in DATA_AXES for i in split) or not all(
            type(p) is Shard and p.dim == 0 for p in rows
        ):
            return fn(params, *args, **kwargs)
        if not _every_rank_has_rows(x.shape[0], [mesh.size(i) for i in split]):
            return fn(params, *args, **kwargs)  # model code reshapes with -1, which 0 rows make ambiguous
        inputs = [t for t in pytree.leaves((args, kwargs)) if isinstance(t, DTensor)]  # x included
        if not all(_split_like(t, split, rows) for t in inputs):
            return fn(params, *args, **kwargs)
        local_args, local_kwargs = pytree.tree_map(_to_local_rows, (args, kwargs))
        with local_region():
            out = fn(params, *local_args, **local_kwargs)
        local, n = rows_of(local_args, local_kwargs).shape[0], x.shape[0]
        return pytree.tree_map(lambda y: _from_local_rows(y, local, n, x.placements, mesh), out)

    return run


def rows_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (plain, ``[B, ...]``: the global batch's rows, the same on every rank, e.g. noise drawn from a
    shared key) split over dim 0 as DTensor ``ref``'s rows are (each rank slices its own; no communication),
    whole along its other dims. A plain ``ref``: ``t`` unchanged. So per-sample randomness is drawn once for
    the global batch and a sharded run sees the same numbers as one process.

    Example::

        >>> noise = rows_like(random.normal(key, x0.shape), x0)  # x0: DTensor [B, C, H, W], Shard(0)  # doctest: +SKIP
    """
    if not isinstance(ref, DTensor) or isinstance(t, DTensor):
        return t
    if t.dim() == 0 or t.shape[0] != ref.shape[0]:
        raise ValueError(f"rows_like: {tuple(t.shape)} has not the {ref.shape[0]} rows of the reference")
    mesh = ref.device_mesh
    placements = [p if type(p) is Shard and p.dim == 0 else Replicate() for p in ref.placements]
    # Replicate -> Shard is a local slice
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(
        mesh, placements
    )


def _every_rank_has_rows(n: int, sizes: list[int]) -> bool:
    """Whether ``n`` rows split over mesh dims of ``sizes`` in turn (``torch.chunk``, as DTensor's nested
    ``Shard(0)``) leave at least one row on every rank (5 over 4 do not: 2, 2, 1, 0). The same answer on
    every rank, so all take the same path."""
    parts = [n]
    for k in sizes:
        parts = [max(0, min(-(-m // k), m - i * -(-m // k))) for m in parts for i in range(k)]
    return min(parts) > 0


def _split_like(t: DTensor, split: list[int], rows: list[Placement]) -> bool:
    mine = [t.placements[i] for i in split]
    return mine == rows or all(p.is_replicate() for p in mine)


def _to_local_rows(t: Any) -> Any:
    if not isinstance(t, DTensor):
        return t
    # a replicated input's gradient from this rank's rows is this rank's part of the sum over the rows
    return t.to_local(grad_placements=[Partial() if p.is_replicate() else p for p in t.placements])


def _from_local_rows(y: Any, local: int, rows: int, placements, mesh: DeviceMesh) -> Any:
    if not isinstance(y, torch.Tensor):
        return y
    if y.dim() == 0 or y.shape[0] != local:
        raise ValueError(
            f"local_rows: an output of shape {tuple(y.shape)} does not keep the input's {local} local rows "
            "in dim 0"
        )
    shape = (rows, *y.shape[1:])
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(y.contiguous(), mesh, placements, run_check=False, shape=shape, stride=stride)


@torch.compiler.disable
def _use_params_eagerly(tree: PyTree, gather: Sequence[str]) -> PyTree:
    # a graph break: the bucketed collectives run eagerly between compiled regions (per-layer compilation)
    return use_params(tree, gather)


def shard_batch(
    batch: PyTree,
    mesh: DeviceMesh | None = None,
    rules: Rules | None = None,
    *,
    names: Sequence[str | None] = ("act_batch", "act_seq"),
    local: bool = False,
) -> PyTree:
    """Place every tensor leaf of ``batch`` on the mesh: dim 0 over the batch's mesh axes (rule ``act_batch``,
    by default ``dp`` x ``fsdp``), the other dims as ``names`` say (missing names: replicated).

    ``local=False``: the leaves are the *global* batch, identical on every rank; each rank keeps its slice
    (no communication). ``local=True``: the leaves are this rank's own rows (what a per-rank data loader
    yields); the global batch is their concatenation in rank order (``DTensor.from_local``, no
    communication either). ``mesh`` / ``rules`` default to :func:`use_mesh`'s; without a mesh the batch comes
    back unchanged.

    Example::

        >>> with use_mesh(mesh, rules):  # doctest: +SKIP
        ...     batch = shard_batch({"tokens": my_rows}, local=True)  # [B_local, T] per rank -> DTensor [B, T]
    """
    ctx = current()
    mesh = mesh if mesh is not None else (ctx[0] if ctx else None)
    rules = rules if rules is not None else (ctx[1] if ctx else None)
    if mesh is None:
        return batch
    if rules is None:
        raise ValueError("shard_batch: pass rules, or call it inside use_mesh(mesh, rules)")

    def place(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
            return x
        dims = tuple(names[: x.dim()]) + (None,) * max(0, x.dim() - len(names))
        if not local:
            return constrain(x, dims, mesh, rules)
        placements = logical_to_placements(dims, rules, mesh, path="batch")
        if any(isinstance(p, Shard) and p.dim != 0 for p in placements):
            raise ValueError(
                f"shard_batch(local=True) splits only dim 0 of a rank's rows; the rules shard another dim: "
                f"{placements}"
            )
        return DTensor.from_local(x, mesh, placements, run_check=False)

    return pytree.tree_map(place, batch)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100, reduction: str = "sum"
) -> torch.Tensor:
    """Cross entropy of ``logits: [N, V]`` against class ids ``targets: [N]`` (``reduction`` "sum" or "none").

    Plain tensors: ``F.cross_entropy``. DTensors: computed on the shards, so logits split over the vocab
    (``tp``, Megatron's vocab-parallel loss) are never gathered: each rank takes the max, the sum of
    exponentials and the target logit over its own slice of the vocabulary and only ``[N]``-sized vectors are
    all-reduced. Rows may be split too (data axes); ``targets`` must be a DTensor split like the rows of
    ``logits`` and whole over the vocab's axis. With ``"sum"`` the result is a replicated 0-d DTensor. When
    only the rows are split (FSDP / DP: the vocab whole on every rank), each rank runs ``F.cross_entropy`` on
    its own rows (one fused kernel, as in a single process) and only the ``"sum"`` is all-reduced.

    Example::

        >>> cross_entropy(torch.zeros(2, 4), torch.tensor([1, -100]))  # log(4), the second row ignored
        tensor(1.3863)
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'sum' or 'none', got {reduction!r}")
    if not isinstance(logits, DTensor):
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)
    if not isinstance(targets, DTensor):
        raise TypeError("cross_entropy: DTensor logits need DTensor targets (constrain them like the rows)")
    logits = logits.float()
    mesh = logits.device_mesh
    if _rows_only(logits, targets):
        return _local_cross_entropy(logits, targets, ignore_index, reduction)
    valid = targets != ignore_index  # [N]
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    # The max only stabilises exp(): no gradient through it (it cancels), and reduce it explicitly
    # (Partial(max) -> Replicate: one all-reduce of [N]) before it meets the vocab-split logits.
    m = logits.detach().amax(-1, keepdim=True)  # [N, 1]
    m = m.redistribute(mesh, [_unpartial(p) for p in m.placements])
    z = logits - m  # [N, V], same placements as logits
    lse = z.exp().sum(-1).log()  # sum over the vocab slice is Partial; log() all-reduces it: [N]
    # A gather on the vocab-split dim masks the ids outside each rank's slice (DTensor's _MaskPartial); the
    # reduction sums the picks. Reduce while still [N, 1]: the mask has the index's shape.
    picked = z.gather(-1, safe[:, None])
    picked = picked.redistribute(mesh, [_unpartial(p) for p in picked.placements]).squeeze(-1)  # [N]
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse))
    if reduction == "none":
        return loss
    total = loss.sum()
    return total.redistribute(mesh, [Replicate()] * mesh.ndim)


def _rows_only(logits: DTensor, targets: DTensor) -> bool:
    """True when ``logits`` are split over rows only (whole over the vocab) and ``targets`` split alike."""
    return tuple(targets.placements) == tuple(logits.placements) and all(
        p.is_replicate() or (type(p) is Shard and p.dim == 0) for p in logits.placements
    )


def _local_cross_entropy(logits: DTensor, targets: DTensor, ignore_index: int, reduction: str) -> DTensor:
    # to_local / from_local are differentiable: the gradient of the local logits comes back in their placements
    mesh = logits.device_mesh
    loss = F.cross_entropy(
        logits.to_local(), targets.to_local(), ignore_index=ignore_index, reduction=reduction
    )  # [N_local] or 0-d
    if reduction == "none":
        return DTensor.from_local(
            loss, mesh, targets.placements, run_check=False, shape=targets.shape, stride=targets.stride()
        )
    # each rank's sum over its rows: Partial over the row-splitting axes, then one all-reduce of a scalar
    partial = [Partial() if p.is_shard() else Replicate() for p in logits.placements]
    return DTensor.from_local(loss, mesh, partial, run_check=False).redistribute(
        mesh, [Replicate()] * mesh.ndim
    )


def _unpartial(p):
    return Replicate() if p.is_partial() else p
