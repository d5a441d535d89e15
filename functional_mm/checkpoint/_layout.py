"""Where a tensor's shards lie (boxes), who writes them, and the zarr chunk grid that follows them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from functional_mm.parallelism._describe import shard_ranges

__all__ = ["Box", "LocalShard", "local_shard", "target_box", "chunk_shapes"]

# A zarr shard (one file) holds at most ~64 MiB and an inner chunk (the unit of reads and of the crc32c
# checksum) at most ~8 MiB. The sharding codec assembles a whole file in memory before writing it, so the file
# size bounds the writer's extra memory; smaller inner chunks keep resharded partial reads close to the bytes
# actually needed. Both are split along the leading dims, so a chunk stays a contiguous run of the tensor.
SHARD_FILE_BYTES = 64 * 2**20
INNER_CHUNK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Box:
    """A hyper-rectangle of a global array: ``start`` and ``size`` per dim."""

    start: tuple[int, ...]
    size: tuple[int, ...]

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.size))


@dataclass(frozen=True)
class LocalShard:
    """This process's part of one tensor: its box, whether this process writes it, and the host data."""

    box: Box
    owner: bool
    tensor: torch.Tensor | None  # the local data (DTensor.to_local() or the plain tensor); None if not owner


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _check_placements(name: str, placements) -> None:
    for p in placements:
        if isinstance(p, Partial):
            raise ValueError(f"{name!r} has a Partial placement (pending reduction); reduce it before saving")
        if type(p) not in (Shard, Replicate):  # e.g. _StridedShard: its layout is not a plain box
            raise NotImplementedError(f"{name!r}: placement {p} is not supported by checkpoints")


def local_shard(name: str, x: torch.Tensor) -> LocalShard:
    """This process's box of ``x`` and whether it writes it: one replica of each shard writes (the one at mesh
    coordinate 0 on every replicated mesh dim); a plain tensor counts as replicated over all processes, so only
    rank 0 writes it."""
    if not isinstance(x, DTensor):
        full = Box((0,) * x.dim(), tuple(x.shape))
        owner = _rank() == 0
        return LocalShard(full, owner, x if owner else None)
    _check_placements(name, x.placements)
    mesh = x.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:  # this process is not part of the tensor's mesh
        return LocalShard(Box((0,) * x.dim(), (0,) * x.dim()), False, None)
    ranges = shard_ranges(x.shape, x.placements, mesh.shape, coord)
    box = Box(tuple(s for s, _ in ranges), tuple(n for _, n in ranges))
    local = x.to_local()
    if (
        tuple(local.shape) != box.size
    ):  # DTensor's split changed under us: better to fail than to misplace data
        raise RuntimeError(
            f"{name!r}: local shard {tuple(local.shape)} does not match the expected {box.size}"
        )
    owner = all(c == 0 for c, p in zip(coord, x.placements) if isinstance(p, Replicate))
    return LocalShard(box, owner, local if owner else None)


def target_box(x: torch.Tensor) -> Box:
    """The region of the global array that a restore target leaf needs on this process."""
    if not isinstance(x, DTensor):
        return Box((0,) * x.dim(), tuple(x.shape))
    _check_placements("target", x.placements)
    coord = x.device_mesh.get_coordinate()
    if coord is None:
        return Box((0,) * x.dim(), (0,) * x.dim())
    ranges = shard_ranges(x.shape, x.placements, x.device_mesh.shape, coord)
    return Box(tuple(s for s, _ in ranges), tuple(n for _, n in ranges))


def _split_points(n: int, ways: Sequence[int]) -> set[int]:
    """Boundaries of ``torch.chunk``-style nested splits of ``[0, n)`` over mesh dims of sizes ``ways``."""
    intervals = [(0, n)]
    for k in ways:
        nxt = []
        for lo, hi in intervals:
            size = hi - lo
            step = -(-size // k) if size else 0
            for i in range(k):
                a = min(lo + i * step, hi)
                nxt.append((a, min(a + step, hi)))
        intervals = nxt
    return {p for iv in intervals for p in iv}


def _largest_divisor_at_most(n: int, cap: int) -> int:
    cap = max(1, min(n, cap))
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for c in (d, n // d):
                if best < c <= cap:
                    best = c
    return best


def _shrink(shape: Sequence[int], itemsize: int, limit: int) -> tuple[int, ...]:
    """Divide ``shape`` dim by dim from the front (each new size divides the old) until it holds <= limit
    bytes; the leading dims go first so a chunk is one contiguous run of the row-major array."""
    chunk = list(shape)
    for d in range(len(chunk)):
        if math.prod(chunk) * itemsize <= limit:
            break
        rest = math.prod(chunk[d + 1 :]) * itemsize
        chunk[d] = _largest_divisor_at_most(chunk[d], limit // max(rest, 1))
    return tuple(chunk)


def chunk_shapes(
    x: torch.Tensor, *, file_bytes: int | None = None, inner_bytes: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(shard_file_shape, inner_chunk_shape)`` for the zarr grid of ``x``.

    Every shard boundary of ``x`` (over all processes) is a multiple of the file shape, so each file lies in
    exactly one process's shard and no two processes ever write the same file. Even splits give files equal to
    the shards (as orbax does), split further when a shard exceeds ``file_bytes``.
    """
    shape = tuple(int(s) for s in x.shape)
    grid = list(shape)
    if isinstance(x, DTensor):
        mesh_shape = x.device_mesh.shape
        for d in range(len(shape)):
            ways = [
                mesh_shape[i]
                for i, p in enumerate(x.placements)
                if isinstance(p, Shard) and p.dim % len(shape) == d
            ]
            if ways:
                grid[d] = math.gcd(*_split_points(shape[d], ways))
    grid = [max(g, 1) for g in grid]  # zero-size dims still need a positive chunk extent
    size = x.element_size()
    outer = _shrink(grid, size, file_bytes or SHARD_FILE_BYTES)
    return outer, _shrink(outer, size, inner_bytes or INNER_CHUNK_BYTES)
