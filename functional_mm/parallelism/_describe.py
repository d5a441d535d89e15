"""Text views of a sharded pytree: a per-parameter memory table and a block picture of one DTensor."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from functional_mm import pytree
from functional_mm.parallelism._rules import Rules, check_rules, mesh_sizes
from functional_mm.parallelism._shard import _placements, axes_by_path

__all__ = ["describe", "visualize"]

PyTree = Any


def shard_ranges(
    shape: Sequence[int], placements: Sequence[Placement], mesh_shape: Sequence[int], coord: Sequence[int]
) -> list[tuple[int, int]]:
    """``[(start, size)]`` per tensor dim of the shard at mesh coordinate ``coord``, computed like DTensor:
    mesh dims split left to right, each with ``torch.chunk`` semantics (chunks of ``ceil(n / k)``; trailing
    ranks may get smaller or empty ones)."""
    ranges = [(0, int(s)) for s in shape]
    for i, p in enumerate(placements):
        if isinstance(p, Shard):
            d = p.dim % len(shape)
            start, size = ranges[d]
            chunk = -(-size // mesh_shape[i])
            lo = min(coord[i] * chunk, size)
            ranges[d] = (start + lo, min(lo + chunk, size) - lo)
        elif not isinstance(p, Replicate | Partial):
            raise NotImplementedError(f"placement {p} is not supported here")
    return ranges


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _sharding_text(ndim: int, names: Sequence[str], placements: Sequence[Placement] | None) -> str:
    if placements is None:
        return "unplaced"
    per_dim: list[list[str]] = [[] for _ in range(ndim)]
    partial = []
    for name, p in zip(names, placements):
        if isinstance(p, Shard):
            per_dim[p.dim % ndim].append(name)
        elif isinstance(p, Partial):
            partial.append(name)
        elif not isinstance(p, Replicate):
            per_dim[getattr(p, "dim", 0) % ndim].append(f"{name}:{p}")
    text = "(" + ", ".join("+".join(a) or "-" for a in per_dim) + ")" if any(per_dim) else "replicated"
    return text + (f" partial({','.join(partial)})" if partial else "")


def describe(params: PyTree, axes: PyTree = None, *, mesh: Any = None, rules: Rules | None = None) -> str:
    """A table of every tensor leaf: path, global shape, dtype, logical axes (when ``axes`` is given), sharding
    (mesh axes per tensor dim), local shape and bytes on the most loaded rank (rank 0's shard, the largest
    under ``torch.chunk`` splits), with totals on the last line.

    DTensors (real or meta, e.g. from :func:`abstract_init`) show their own placements. Plain tensors are
    "unplaced", unless ``axes``, ``mesh`` and ``rules`` are all given: then the layout the rules would produce
    is shown, and ``mesh`` may be a ``{axis: size}`` dict -- memory planning without any process.

    Example::

        >>> from functional_mm import nn, random
        >>> shapes, axes = nn.abstract(nn.linear.init, random.key(0), 8, 16, axes=("embed", "mlp"))
        >>> print(describe(shapes, axes, mesh={"fsdp": 2, "tp": 2}, rules=[("embed", "fsdp"), ("mlp", "tp")]))
        path    shape    dtype    axes          sharding    local   bytes/rank
        weight  (16, 8)  float32  (mlp, embed)  (tp, fsdp)  (8, 4)         128
        total: 128 params, 512 bytes (512 B); per rank (max): 128 bytes (128 B); mesh (fsdp=2, tp=2)
    """
    planning = axes is not None and mesh is not None and rules is not None
    if planning:
        check_rules(rules, mesh)
    by_path = axes_by_path(params, axes) if axes is not None else {}
    rows, meshes = [], set()
    n_params = global_bytes = rank_bytes = 0
    for path, x in pytree.flatten_with_paths(params)[0]:
        if not isinstance(x, torch.Tensor):
            continue
        shape, ndim = tuple(x.shape), x.dim()
        if isinstance(x, DTensor):
            sizes = mesh_sizes(x.device_mesh)
            placements = tuple(x.placements)
        elif planning:
            sizes = mesh_sizes(mesh)
            placements = _placements(path, shape, by_path[path], rules, mesh, allow_uneven=True)
        else:
            sizes, placements = {}, None
        if placements is None:
            local = shape
        else:
            try:
                local = tuple(
                    s for _, s in shard_ranges(shape, placements, list(sizes.values()), [0] * len(sizes))
                )
            except NotImplementedError:
                local = tuple(x.to_local().shape)
        if sizes:
            meshes.add(tuple(sizes.items()))
        size = x.element_size()
        n_params += math.prod(shape)
        global_bytes += math.prod(shape) * size
        rank_bytes += math.prod(local) * size
        rows.append(
            [
                path,
                str(shape),
                str(x.dtype).removeprefix("torch."),
                *(["(" + ", ".join(str(a) for a in by_path[path]) + ")"] if axes is not None else []),
                _sharding_text(ndim, list(sizes), placements),
                str(local),
                f"{math.prod(local) * size:,}",
            ]
        )
    header = [
        "path",
        "shape",
        "dtype",
        *(["axes"] if axes is not None else []),
        "sharding",
        "local",
        "bytes/rank",
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        *left, last = cells
        return "  ".join(c.ljust(w) for c, w in zip(left, widths)) + "  " + last.rjust(widths[-1])

    total = (
        f"total: {n_params:,} params, {global_bytes:,} bytes ({_human(global_bytes)}); "
        f"per rank (max): {rank_bytes:,} bytes ({_human(rank_bytes)})"
    )
    if len(meshes) == 1:
        total += "; mesh (" + ", ".join(f"{k}={v}" for k, v in next(iter(meshes))) + ")"
    return "\n".join([line(header), *(line(r) for r in rows), total])


def visualize(x: DTensor) -> str:
    """Draw how a 1-D or 2-D DTensor is laid over its mesh (like ``jax.debug.visualize_array_sharding``): a grid
    of the tensor's blocks, each labelled with the ranks that hold it. Needs no communication.

    Example (rank 0 of a 2x2 ``(fsdp, tp)`` mesh, an ``[8, 6]`` weight with placements ``(Shard(0), Shard(1))``)::

        >>> print(visualize(w))  # doctest: +SKIP
        (8, 6) float32 on mesh (fsdp=2, tp=2): (fsdp, tp)
        ┌─────┬─────┐
        │  0  │  1  │
        ├─────┼─────┤
        │  2  │  3  │
        └─────┴─────┘
    """
    if not isinstance(x, DTensor):
        raise TypeError(f"visualize needs a DTensor, got {type(x).__name__}")
    if x.dim() not in (1, 2):
        raise ValueError(f"visualize draws 1-D and 2-D tensors, got shape {tuple(x.shape)}")
    mesh = x.device_mesh
    sizes = mesh_sizes(mesh)
    ranks = mesh.mesh  # [*mesh.shape] global ranks
    blocks: dict[tuple, list[int]] = {}
    empty = []
    for coord in itertools.product(*(range(s) for s in ranks.shape)):
        block = tuple(shard_ranges(x.shape, x.placements, list(ranks.shape), coord))
        rank = int(ranks[coord])
        if any(size == 0 for _, size in block):
            empty.append(rank)
        else:
            blocks.setdefault(block, []).append(rank)
    if x.dim() == 1:  # a 1-D tensor is drawn as one row
        blocks = {((0, 1), b[0]): r for b, r in blocks.items()}
    rows = sorted({b[0] for b in blocks})
    cols = sorted({b[1] for b in blocks})
    labels = {b: ",".join(str(r) for r in sorted(rs)) for b, rs in blocks.items()}
    width = max(len(s) for s in labels.values()) + 4

    def rule(left: str, mid: str, right: str) -> str:
        return left + mid.join("─" * width for _ in cols) + right

    out = [
        f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} on mesh ("
        + ", ".join(f"{k}={v}" for k, v in sizes.items())
        + f"): {_sharding_text(x.dim(), list(sizes), x.placements)}",
        rule("┌", "┬", "┐"),
    ]
    for i, r in enumerate(rows):
        out.append("│" + "│".join(labels.get((r, c), "?").center(width) for c in cols) + "│")
        out.append(rule("├", "┼", "┤") if i < len(rows) - 1 else rule("└", "┴", "┘"))
    if empty:
        out.append(f"empty shards on ranks {','.join(str(r) for r in sorted(empty))}")
    return "\n".join(out)
