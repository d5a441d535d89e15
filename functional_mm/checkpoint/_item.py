"""One pytree item on disk: plan and snapshot a save, write this process's shards, restore onto any layout."""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorstore as ts
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from functional_mm import pytree
from functional_mm.checkpoint import _dtypes, _layout, _tree

__all__ = [
    "CheckpointCorruptError",
    "TargetMismatchError",
    "ItemSave",
    "plan_save",
    "write_shards",
    "write_array_metadatas",
    "write_item_metadata",
    "check_unmodified",
    "sync_paths",
    "ItemRestore",
    "plan_restore",
    "read_all",
    "read_json_item",
    "is_pytree_item",
]

# Bytes of array data handed to tensorstore and not yet committed: the sharding codec holds each encoded file
# in memory until it is written, so this bounds a save's extra memory (with the 64 MiB file limit).
MAX_INFLIGHT_BYTES = 256 * 2**20
# Reads: tensorstore decodes each inner chunk into a buffer of its own before copying it into the output, so
# the bytes of reads in flight are extra memory on top of the restored state.
MAX_READ_INFLIGHT_BYTES = 128 * 2**20
# A restore reads a region in pieces of about this size, aligned to the stored inner chunks: each piece is one
# tensorstore operation (pieces of all arrays run concurrently, within MAX_READ_INFLIGHT_BYTES), and reading
# whole shard files at once would make tensorstore hold a whole file's chunks at a time.
READ_PIECE_BYTES = 8 * 2**20
# How restores open files (tensorstore's ``file_io_mode``): "memmap" (see read_context) or "default" (pread).
FILE_IO_MODE = "memmap"
# Above this many file-grid cells in one shard (uneven nested splits make the grid fine), write it in one call.
_MAX_PIECES = 4096


class CheckpointCorruptError(RuntimeError):
    """Stored data failed its checksum, is truncated or missing; the message names the step, item and array."""


class TargetMismatchError(ValueError):
    """The restore target does not match the checkpoint; the message lists every mismatching leaf."""


def file_context() -> ts.Context:
    """Context for writes. No chunk cache: every byte is read or written once, and a cache would only hold a
    second copy. No fsync per file inside tensorstore: each process fsyncs the files it wrote all at once
    afterwards (sync_paths), which lets the filesystem batch the flushes (several times faster than one by one
    here)."""
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_sync": False})


def read_context() -> ts.Context:
    """Context for restores: as :func:`file_context`, and files are memory-mapped instead of ``pread`` into a
    fresh buffer per read (``FILE_IO_MODE``). The sharding codec then checks each inner chunk's crc32c
    straight from the page cache: a read buffer is new anonymous memory each time, and its page faults cost
    about as much CPU as the copy itself (1 GiB restore on the 2-core dev VM: ~1.2 s CPU mapped vs ~1.45 s
    with pread; tensorstore's crc32c and the copy out of its decode buffer are the rest, with the output's own
    page faults). A file truncated *while* it is mapped would raise SIGBUS; committed steps are never
    rewritten in place."""
    return ts.Context(
        {
            "cache_pool": {"total_bytes_limit": 0},
            "file_io_sync": False,
            "file_io_mode": {"mode": FILE_IO_MODE},
        }
    )


def sync_paths(paths: list[str]) -> None:
    """fsync files and directories concurrently: ext4 and most filesystems then share journal commits.

    Plain threads, not a ThreadPoolExecutor: a save may still be finishing while the interpreter exits, and
    executors refuse new work once shutdown has begun."""
    todo = list(paths)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not todo or errors:
                    return
                path = todo.pop()
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                with lock:
                    errors.append(e)

    threads = [threading.Thread(target=work, name="checkpoint-fsync") for _ in range(min(32, len(todo)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _chunk_files(item_dir: str, a: ArraySave) -> list[str]:
    """The zarr shard files that ``a.box`` covers (``c/i/j`` under the array's folder; ``c`` when 0-d)."""
    base = os.path.join(item_dir, a.name, "c")
    if not a.box.size:
        return [base]
    if any(n == 0 for n in a.box.size):
        return []
    ranges = [range(s // c, -(-(s + n) // c)) for s, n, c in zip(a.box.start, a.box.size, a.file_chunk)]
    return [os.path.join(base, *map(str, idx)) for idx in itertools.product(*ranges)]


def _zarr3_metadata(shape, dtype: torch.dtype, file_chunk, inner_chunk) -> dict[str, Any]:
    # As orbax writes zarr3 (sharding_indexed codec, crc32c over the index), plus a crc32c over every inner
    # chunk: orbax leaves data unchecked (zstd without checksum), and a flipped bit must not restore silently.
    # No compression: zstd gains ~8% on fp32 weights for several times the write time (DESIGN.md §5).
    data_bytes = {"name": "bytes"}
    if torch.empty((), dtype=dtype).element_size() > 1:
        data_bytes["configuration"] = {"endian": "little"}
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": _dtypes.zarr_name(dtype),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(file_chunk)}},
        "chunk_key_encoding": {"name": "default"},
        "fill_value": False if dtype == torch.bool else 0,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": list(inner_chunk),
                    "codecs": [data_bytes, {"name": "crc32c"}],
                    "index_codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "crc32c"},
                    ],
                    "index_location": "end",
                },
            }
        ],
    }


@dataclass
class ArraySave:
    path: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file_chunk: tuple[int, ...]
    inner_chunk: tuple[int, ...]
    box: _layout.Box
    owner: bool
    data: np.ndarray | None = None  # host snapshot (or a view of the caller's CPU tensor)
    source: torch.Tensor | None = (
        None  # the caller's tensor when not copied: its version is checked at commit
    )
    version: int = 0
    buffer: torch.Tensor | None = None  # the host copy (``data`` is a view of it), reusable by the next save

    def spec(self, item_dir: str) -> dict[str, Any]:
        return {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": os.path.join(item_dir, self.name)},
            "metadata": _zarr3_metadata(self.shape, self.dtype, self.file_chunk, self.inner_chunk),
            # An all-zero chunk is still written: restores treat a missing chunk as an error, never as zeros.
            "store_data_equal_to_fill_value": True,
        }


@dataclass
class ItemSave:
    """Everything the background writer needs; built on the caller's thread (the only blocking part)."""

    leaves: list[_tree.Leaf]
    arrays: list[ArraySave] = field(default_factory=list)

    @property
    def write_shapes(self) -> dict[str, tuple[int, ...]]:
        return {a.path: a.box.size for a in self.arrays}

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        """The host copies this save made, by leaf path: ``plan_save(..., buffers=)`` of the next save reuses
        them (once this save has finished writing)."""
        return {a.path: a.buffer for a in self.arrays if a.buffer is not None}


def _fits(buffer: torch.Tensor | None, t: torch.Tensor) -> bool:
    return (
        buffer is not None
        and buffer.device.type == "cpu"
        and buffer.shape == t.shape
        and buffer.dtype == t.dtype
        and buffer.is_contiguous()
    )


def _snapshot(
    t: torch.Tensor, copy: bool, buffer: torch.Tensor | None
) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]:
    """``(host data, caller's tensor if not copied, host copy)`` of a local shard: accelerator tensors are
    copied to host (the device -> host copy); CPU tensors are copied only when ``copy`` (the caller may modify
    them in place, e.g. a donating step). The copy goes into ``buffer`` when it fits (a previous save's copy):
    copying into memory that is already mapped is several times cheaper than into new memory, whose first
    touch costs a page fault per 4 KiB (measured: 1 GiB in ~0.1 s vs ~0.8 s)."""
    t = t.detach()
    if t.device.type == "cpu" and not copy and t.is_contiguous():
        return _dtypes.to_numpy(t), t, None
    dst = buffer if _fits(buffer, t) else torch.empty(t.shape, dtype=t.dtype)
    # torch's copy uses every intra-op thread: 1 GiB in 0.075 s on the idle 2-core dev VM against 0.11 s for
    # one memcpy thread (the caller waits for this copy, so the cores are otherwise idle).
    dst.copy_(t)
    return _dtypes.to_numpy(dst), None, dst


def plan_save(tree: Any, *, copy: bool, buffers: dict[str, torch.Tensor] | None = None) -> ItemSave:
    """Flatten ``tree``, lay out every array and take this process's host snapshot of the shards it writes
    (into ``buffers[path]``, the host copies of a finished earlier save, where they fit)."""
    leaves, _ = _tree.flatten(tree)
    plan = ItemSave(leaves)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0  # plain values are written by rank 0 only
    for leaf in leaves:
        x = leaf.value
        vt = _tree.value_type(x)
        if vt == _tree.SCALAR:
            x = torch.tensor(x, dtype=torch.bool if isinstance(x, bool) else None)
            if x.dtype == torch.float32:
                x = x.double()  # Python floats are doubles (orbax stores them as float64 too)
        elif vt != _tree.ARRAY:
            continue
        if x.device.type == "meta" or isinstance(x, DTensor) and x.to_local().device.type == "meta":
            raise ValueError(f"{leaf.path!r} is a meta tensor (no data); cannot save it")
        _dtypes.zarr_name(x.dtype)  # unsupported dtypes fail now, on the caller's thread
        shard = (
            _layout.local_shard(leaf.path, x)
            if vt == _tree.ARRAY
            else _layout.LocalShard(_layout.Box((), ()), rank0, x if rank0 else None)
        )
        file_chunk, inner_chunk = _layout.chunk_shapes(x)
        a = ArraySave(
            leaf.path, leaf.name, tuple(x.shape), x.dtype, file_chunk, inner_chunk, shard.box, shard.owner
        )
        if shard.owner and shard.tensor is not None:
            a.data, a.source, a.buffer = _snapshot(shard.tensor, copy, (buffers or {}).get(leaf.path))
            if a.source is not None:
                a.version = a.source._version
        plan.arrays.append(a)
    return plan


def _pieces(a: ArraySave) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(global slices, local slices) of every file-grid cell in this process's box, so that one write call
    covers one file and the in-flight bound means something."""
    box, chunk = a.box, a.file_chunk
    if not box.size or any(n == 0 for n in box.size):
        return [(box.slices(), tuple(slice(None) for _ in box.size))]
    counts = [-(-n // c) for n, c in zip(box.size, chunk)]
    if math.prod(counts) > _MAX_PIECES:
        return [(box.slices(), tuple(slice(None) for _ in box.size))]
    out = []
    for idx in np.ndindex(*counts):
        local = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, chunk, box.size))
        glob = tuple(slice(s.start + o, s.stop + o) for s, o in zip(local, box.start))
        out.append((glob, local))
    return out


def write_shards(
    item_dir: str, plan: ItemSave, *, metadata_share: tuple[int, int] = (0, 1), context: ts.Context
) -> list[str]:
    """Write this process's share of the zarr metadata (``metadata_share = (rank, world)``: array ``i`` when
    ``i % world == rank``, so that no process does it all while the others wait at the commit) and this
    process's owned shards. Blocks until tensorstore has written them; returns the paths written, for
    :func:`sync_paths`. Writers never wait for a ``zarr.json``: they open with the metadata they know."""
    rank, world = metadata_share
    mine = [a for i, a in enumerate(plan.arrays) if i % world == rank]
    opened = [ts.open(a.spec(item_dir), create=True, context=context) for a in mine]
    stores = {a.path: f.result() for a, f in zip(mine, opened)}
    files = [os.path.join(item_dir, a.name, "zarr.json") for a in mine]
    files += [os.path.join(item_dir, a.name) for a in mine]  # the new directory entries
    dirs: set[str] = set()
    inflight: deque[tuple[Any, int]] = deque()
    try:
        _write_owned(item_dir, plan, stores, files, dirs, inflight, context)
    except BaseException:
        # Nothing may still read the snapshot once this returns: its buffers are reused by the next save.
        for fut, _ in inflight:
            try:
                fut.result()
            except Exception:  # noqa: BLE001 - the first error is the one raised
                pass
        raise
    return files + sorted(dirs)


def _write_owned(
    item_dir: str,
    plan: ItemSave,
    stores: dict[str, Any],
    files: list[str],
    dirs: set[str],
    inflight: deque[tuple[Any, int]],
    context: ts.Context,
) -> None:
    """This process's owned shards, file-grid cell by cell, at most ``MAX_INFLIGHT_BYTES`` in flight; waits
    for every write (``inflight`` holds those not finished when an error is raised)."""
    pending = 0
    for a in plan.arrays:
        if not a.owner or a.data is None:
            continue
        chunks = _chunk_files(item_dir, a)
        files += chunks
        array_dir = os.path.join(item_dir, a.name)
        for f in chunks:  # their new directories (c/, c/0/, ...) must be durable too
            d = os.path.dirname(f)
            while d != array_dir:
                dirs.add(d)
                d = os.path.dirname(d)
        store = stores.get(a.path)
        if store is None:
            store = ts.open(a.spec(item_dir), open=True, assume_metadata=True, context=context).result()
        for glob, local in _pieces(a):
            piece = a.data[local]
            nbytes = piece.nbytes
            while inflight and pending + nbytes > MAX_INFLIGHT_BYTES:
                fut, n = inflight.popleft()
                fut.result()
                pending -= n
            # The snapshot stays untouched until every write has finished, so tensorstore reads it in place.
            target = store[glob] if glob else store
            inflight.append((target.write(piece, can_reference_source_data_indefinitely=True), nbytes))
            pending += nbytes
    while inflight:
        inflight[0][0].result()
        inflight.popleft()


def check_unmodified(plan: ItemSave) -> list[str]:
    """Paths of uncopied caller tensors that were modified in place since the save started."""
    return [a.path for a in plan.arrays if a.source is not None and a.source._version != a.version]


def write_array_metadatas(item_dir: str, plan: ItemSave, rank: int) -> str:
    # orbax's per-process record of local shard shapes (array_metadatas/process_<i>)
    entries = [
        {
            "array_metadata": {
                "param_name": a.name,
                "write_shape": list(a.box.size),
                "chunk_shape": list(a.file_chunk),
                "ext_metadata": None,
            }
        }
        for a in plan.arrays
    ]
    d = os.path.join(item_dir, "array_metadatas")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"process_{rank}")
    write_json(path, {"array_metadatas": entries})
    return path


def write_json(path: str, obj: Any) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def write_item_metadata(item_dir: str, plan: ItemSave) -> list[str]:
    """The item's ``_METADATA`` and ``_sharding`` (written once, after every process wrote its shards)."""
    meta = write_json(
        os.path.join(item_dir, "_METADATA"), _tree.metadata_json(plan.leaves, plan.write_shapes)
    )
    # orbax reads _sharding only when a restore names no sharding: one host device is the one layout a JAX
    # process can always build (our meshes are torch's, not JAX's).
    single = json.dumps({"sharding_type": "SingleDeviceSharding", "device_str": "cpu:0"})
    sharding = write_json(
        os.path.join(item_dir, "_sharding"),
        {base64.urlsafe_b64encode(a.name.encode()).decode(): single for a in plan.arrays},
    )
    return [meta, sharding]


# ----------------------------------------------------------------------------------------------------------------
# restore


def _read_spec(item_dir: str, name: str, raw: dict[str, Any]) -> dict[str, Any]:
    driver = "zarr3" if raw.get("use_zarr3", False) else "zarr"
    if raw.get("use_ocdbt", False):  # orbax's default: one key-value database per item
        kvstore = {"driver": "ocdbt", "base": f"file://{os.path.abspath(item_dir)}/", "path": name}
    else:
        kvstore = {"driver": "file", "path": os.path.join(item_dir, name)}
    # A missing chunk must be an error, not zeros: orbax (and we) store chunks even when they equal the fill.
    return {"driver": driver, "kvstore": kvstore, "fill_missing_data_reads": False}


def _device_of(x: torch.Tensor) -> torch.device:
    if isinstance(x, DTensor):
        local = x.to_local()
        if local.device.type != "meta":
            return local.device
        kind = x.device_mesh.device_type
        if kind == "cpu":
            return torch.device("cpu")
        return torch.device(kind, getattr(torch, kind).current_device())
    return torch.device("cpu") if x.device.type == "meta" else x.device


@dataclass
class _Read:
    path: str
    name: str
    target: Any
    box: _layout.Box | None = None
    store: Any = None
    value: Any = None
    dest: torch.Tensor | None = None  # the restored data (CPU), filled in place by tensorstore
    pending: int = 0  # pieces not finished yet

    def region(self):
        return self.store[self.box.slices()] if self.box is not None and self.box.size else self.store


def _intervals(start: int, size: int, step: int | None, origin: int) -> list[slice]:
    """``[start, start + size)`` cut at the multiples of ``step`` (from the chunk grid's ``origin``), in
    coordinates relative to ``start``; uncut when ``step`` is None."""
    if step is None:
        return [slice(0, size)]
    out, a, stop = [], start, start + size
    while a < stop:
        b = min(origin + ((a - origin) // step + 1) * step, stop)
        out.append(slice(a - start, b - start))
        a = b
    return out


def _read_pieces(region, itemsize: int) -> list[tuple[slice, ...]] | None:
    """Slices (relative to the region) of pieces of about ``READ_PIECE_BYTES`` aligned to the stored chunk grid,
    so that no chunk is decoded twice; ``None``: read the region in one piece. Pieces are cut along the leading
    dims first (a piece is then a contiguous run of the output), grouping whole chunks of the last cut dim."""
    shape = tuple(region.shape)
    if not shape or math.prod(shape) * itemsize <= READ_PIECE_BYTES:
        return None
    try:
        layout = region.chunk_layout
        chunk, origin = layout.read_chunk.shape, layout.grid_origin
    except Exception:  # noqa: BLE001 - a driver without a chunk layout: read the region whole
        return None
    if chunk is None or origin is None or any(c is None or c <= 0 for c in chunk):
        return None
    start = tuple(region.domain.inclusive_min)
    steps: list[int | None] = [None] * len(shape)
    for d in range(len(shape)):
        unit = (
            math.prod(min(c, n) for c, n in zip(chunk[: d + 1], shape)) * math.prod(shape[d + 1 :]) * itemsize
        )
        if unit <= READ_PIECE_BYTES or d == len(shape) - 1:
            steps[:d] = chunk[:d]
            steps[d] = chunk[d] * max(1, READ_PIECE_BYTES // max(unit, 1))
            break
    per_dim = [_intervals(s, n, st, o) for s, n, st, o in zip(start, shape, steps, origin)]
    if math.prod(len(p) for p in per_dim) > _MAX_PIECES:
        return None
    return list(itertools.product(*per_dim))


def read_all(restores: list[ItemRestore]) -> None:
    """Read every planned region straight into its output array (allocated here, one per region), in pieces,
    keeping at most ``MAX_READ_INFLIGHT_BYTES`` of pieces in flight: tensorstore holds each chunk's decoded
    bytes until it is copied into the output, so this bounds a restore's extra memory. Pieces of all arrays
    run concurrently in tensorstore's thread pools (reads, crc32c checks and copies in C++)."""
    inflight: deque[tuple[ItemRestore, _Read, Any, int]] = deque()
    pending = 0

    def finish() -> None:
        nonlocal pending
        rs, r, fut, n = inflight.popleft()
        pending -= n
        try:
            fut.result()
        except Exception as e:  # noqa: BLE001 - tensorstore reports checksum / truncation / missing chunks
            raise CheckpointCorruptError(
                f"{rs.where}: array {r.path!r} ({os.path.join(rs.item_dir, r.name)}) is corrupt or incomplete: {e}"
            ) from e
        r.pending -= 1
        if r.pending == 0:
            r.value = rs._to_value(r, r.dest)

    for rs in restores:
        for r in rs.reads:
            region = r.region()
            dtype = region.dtype.numpy_dtype
            # torch's allocator, not numpy's: numpy asks for transparent huge pages on large arrays, which on
            # this project's VMs made first touches several times slower (fresh huge pages are backed lazily
            # by the host), and a plain tensor is what the caller gets back anyway.
            r.dest = torch.empty(tuple(region.shape), dtype=_dtypes.torch_dtype(dtype.name))
            if r.dest.numel() == 0:
                r.value = rs._to_value(r, r.dest)
                continue
            out = ts.array(_dtypes.to_numpy(r.dest), copy=False, write=True)
            pieces = _read_pieces(region, dtype.itemsize)
            src = region.translate_to[0]  # the output's domain starts at 0
            if pieces is None:
                jobs = [(out, src, r.dest.numel() * dtype.itemsize)]
            else:
                jobs = [
                    (out[p], src[p], math.prod(s.stop - s.start for s in p) * dtype.itemsize) for p in pieces
                ]
            r.pending = len(jobs)
            for dst, piece, n in jobs:
                while inflight and pending + n > MAX_READ_INFLIGHT_BYTES:
                    finish()
                inflight.append((rs, r, dst.write(piece), n))
                pending += n
    while inflight:
        finish()


class ItemRestore:
    """Phase one of a restore: metadata read, stores opened and checked against the target; :func:`read_all`
    then fetches only the regions the target needs and :meth:`result` assembles the tree."""

    def __init__(self, item_dir: str, target: Any, where: str, context: ts.Context):
        self.item_dir, self.where, self.context = item_dir, where, context
        try:
            self.saved, self.raw = _tree.read_metadata(item_dir)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointCorruptError(
                f"{where}: cannot read {os.path.join(item_dir, '_METADATA')}: {e}"
            ) from e
        self.mismatches: list[str] = []
        self.reads: list[_Read] = []
        if target is None:
            self.treedef = None
            self.leaves = []
            for s in self.saved.values():
                if s.is_array:
                    self.reads.append(_Read(s.path, s.name, None))
        else:
            self.leaves, self.treedef = _tree.flatten(target)
            for leaf in self.leaves:
                self._plan_leaf(leaf)
        futures = [
            ts.open(_read_spec(item_dir, r.name, self.raw), open=True, context=context) for r in self.reads
        ]
        for r, f in zip(self.reads, futures):
            try:
                r.store = f.result()
            except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/others with the reason
                raise CheckpointCorruptError(f"{where}: array {r.path!r} cannot be opened: {e}") from e
            self._check(r)
        if self.mismatches:
            shown = "\n  ".join(self.mismatches)
            raise TargetMismatchError(
                f"{where}: the target does not match the checkpoint ({len(self.mismatches)} mismatch(es)):\n  {shown}"
            )

    def _plan_leaf(self, leaf: _tree.Leaf) -> None:
        x, s = leaf.value, self.saved.get(leaf.path)
        vt = _tree.value_type(x)
        if vt not in (_tree.ARRAY, _tree.SCALAR):
            return  # None and empty containers are structure: the target's own value is kept
        if s is None:
            self.mismatches.append(f"{leaf.path}: missing from the checkpoint")
        elif not s.is_array:
            self.mismatches.append(f"{leaf.path}: checkpoint has {s.value_type}, target has {vt}")
        else:
            self.reads.append(
                _Read(leaf.path, s.name, x, _layout.target_box(x) if vt == _tree.ARRAY else None)
            )

    def _check(self, r: _Read) -> None:
        if r.target is None:
            return
        shape, dtype = tuple(r.store.shape), r.store.dtype.name
        if isinstance(r.target, torch.Tensor):
            want_shape, want_dtype = tuple(r.target.shape), _dtypes.zarr_name(r.target.dtype)
            problems = []
            if shape != want_shape:
                problems.append(f"shape {list(shape)} in checkpoint vs {list(want_shape)} in target")
            if _dtypes.zarr_name(_dtypes.torch_dtype(dtype)) != want_dtype:
                problems.append(f"dtype {dtype} in checkpoint vs {want_dtype} in target")
            if problems:
                self.mismatches.append(f"{r.path}: " + "; ".join(problems))
        elif shape != ():
            self.mismatches.append(f"{r.path}: checkpoint has shape {list(shape)}, target is a Python scalar")

    def result(self) -> Any:
        """The restored tree, once :func:`read_all` has read every region."""
        values = {r.path: r.value for r in self.reads}
        if self.treedef is None:
            return _tree.unflatten_saved(self.saved, values)
        return pytree.unflatten(self.treedef, [values.get(leaf.path, leaf.value) for leaf in self.leaves])

    def _to_value(self, r: _Read, data: torch.Tensor) -> Any:
        t = r.target
        if t is None:
            saved = self.saved[r.path]
            return data.item() if saved.value_type == _tree.SCALAR else data
        if not isinstance(t, torch.Tensor):
            return type(t)(data.item())
        local = data.to(_device_of(t))
        if isinstance(t, DTensor):
            return DTensor.from_local(
                local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
            )
        return local


def read_json_item(item_dir: str, where: str) -> Any:
    path = os.path.join(item_dir, "metadata")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(f"{where}: cannot read JSON item {path}: {e}") from e


def is_pytree_item(item_dir: str) -> bool:
    return os.path.exists(os.path.join(item_dir, "_METADATA"))


def plan_restore(item_dir: str, target: Any, where: str, context: ts.Context) -> ItemRestore:
    return ItemRestore(item_dir, target, where, context)
