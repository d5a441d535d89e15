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
# Reads: tensorstore reads a shard file's chunks into buffers of its own before copying them into the output,
# so the bytes of reads in flight are extra memory on top of the restored state.
MAX_READ_INFLIGHT_BYTES = 128 * 2**20
# Above this many file-grid cells in one shard (uneven nested splits make the grid fine), write it in one call.
_MAX_PIECES = 4096


class CheckpointCorruptError(RuntimeError):
    """Stored data failed its checksum, is truncated or missing; the message names the step, item and array."""


class TargetMismatchError(ValueError):
    """The restore target does not match the checkpoint; the message lists every mismatching leaf."""


def file_context() -> ts.Context:
    # No chunk cache: every byte is read or written once, and a cache would only hold a second copy.
    # No fsync per file inside tensorstore: each process fsyncs the files it wrote all at once afterwards
    # (sync_paths), which lets the filesystem batch the flushes (several times faster than one by one here).
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_sync": False})


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


def _snapshot(t: torch.Tensor, copy: bool) -> tuple[np.ndarray, torch.Tensor | None]:
    """Host data of a local shard: accelerator tensors are copied to host (the device -> host copy); CPU
    tensors are copied only when ``copy`` (the caller may modify them in place, e.g. a donating step)."""
    t = t.detach()
    if t.device.type != "cpu":
        return _dtypes.to_numpy(t.to("cpu")), None
    if copy or not t.is_contiguous():
        return _dtypes.to_numpy(t.clone(memory_format=torch.contiguous_format)), None
    return _dtypes.to_numpy(t), t


def plan_save(tree: Any, *, copy: bool) -> ItemSave:
    """Flatten ``tree``, lay out every array and take this process's host snapshot of the shards it writes."""
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
            a.data, a.source = _snapshot(shard.tensor, copy)
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


def write_shards(item_dir: str, plan: ItemSave, *, create_metadata: bool, context: ts.Context) -> list[str]:
    """Write the zarr metadata (``create_metadata``: one process does it) and this process's owned shards.
    Blocks until tensorstore has written them; returns the paths written, for :func:`sync_paths`."""
    files = []
    if create_metadata:
        opened = [ts.open(a.spec(item_dir), create=True, context=context) for a in plan.arrays]
        stores = {a.path: f.result() for a, f in zip(plan.arrays, opened)}
        files += [os.path.join(item_dir, a.name, "zarr.json") for a in plan.arrays]
        files += [os.path.join(item_dir, a.name) for a in plan.arrays]  # the new directory entries
    else:
        stores = {}
    dirs: set[str] = set()
    inflight: deque[tuple[Any, int]] = deque()
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
            # The metadata is known, so a writer need not wait for zarr.json to exist.
            store = ts.open(a.spec(item_dir), open=True, assume_metadata=True, context=context).result()
        for glob, local in _pieces(a):
            piece = a.data[local]
            nbytes = piece.nbytes
            while inflight and pending + nbytes > MAX_INFLIGHT_BYTES:
                fut, n = inflight.popleft()
                fut.result()
                pending -= n
            # The snapshot stays untouched until the commit below, so tensorstore may read it in place.
            target = store[glob] if glob else store
            inflight.append((target.write(piece, can_reference_source_data_indefinitely=True), nbytes))
            pending += nbytes
    for fut, _ in inflight:
        fut.result()
    return files + sorted(dirs)


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

    def region(self):
        return self.store[self.box.slices()] if self.box is not None and self.box.size else self.store


def read_all(restores: list[ItemRestore]) -> None:
    """Read every planned region, keeping at most ``MAX_READ_INFLIGHT_BYTES`` of reads in flight: tensorstore
    holds each chunk's file bytes until it is decoded into the output, so this bounds a restore's extra memory."""
    inflight: deque[tuple[ItemRestore, _Read, Any, int]] = deque()
    pending = 0

    def finish() -> None:
        nonlocal pending
        rs, r, fut, n = inflight.popleft()
        pending -= n
        try:
            data = fut.result()
        except Exception as e:  # noqa: BLE001 - tensorstore reports checksum / truncation / missing chunks
            raise CheckpointCorruptError(
                f"{rs.where}: array {r.path!r} ({os.path.join(rs.item_dir, r.name)}) is corrupt or incomplete: {e}"
            ) from e
        r.value = rs._to_value(r, data)

    for rs in restores:
        for r in rs.reads:
            region = r.region()
            n = math.prod(region.shape) * region.dtype.numpy_dtype.itemsize
            while inflight and pending + n > MAX_READ_INFLIGHT_BYTES:
                finish()
            inflight.append((rs, r, region.read(), n))
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

    def _to_value(self, r: _Read, data: np.ndarray) -> Any:
        dtype = _dtypes.torch_dtype(data.dtype.name)
        t = r.target
        if t is None:
            saved = self.saved[r.path]
            return data.item() if saved.value_type == _tree.SCALAR else _dtypes.from_numpy(data, dtype)
        if not isinstance(t, torch.Tensor):
            return type(t)(data.item())
        local = _dtypes.from_numpy(data, dtype).to(_device_of(t))
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
