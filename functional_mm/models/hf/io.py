"""Family-independent Hugging Face checkpoint I/O: strict loading of (sharded) safetensors into a parameter
tree through a name-mapping function, and writing a tree back in the layout transformers/diffusers read.

A model family supplies ``to_hf(path) -> hf_name`` for every leaf path of its parameter tree (``"layers/0/attn/
q/weight"`` -> ``"model.layers.0.self_attn.q_proj.weight"``) and the abstract tree (shapes, from
``nn.abstract``). Loading is strict, unlike transformers: every expected tensor must be present with the
expected shape and nothing else may be there except names matching ``ignore`` (non-parameter buffers); all
offending names are reported in one :class:`CheckpointMismatchError`. Only safetensors are read (never
pickle / ``torch.load``).

Sharded models: when a leaf of ``shapes`` is a DTensor (real or meta, e.g. from ``parallelism.abstract_init``),
:func:`load_params` reads only this process's slice of it (``safe_open(...).get_slice``) and returns a DTensor
with the same placements; :func:`write_tensors` / :func:`save_params` given DTensors have every process write
its own (owned) slices into the safetensors files in place, so no process ever holds a full tensor.

Example::

    >>> flat = read_tensors("ckpt_dir", {"model.norm.weight": (64,)})            # doctest: +SKIP
    >>> params = load_params("ckpt_dir", shapes, to_hf=lambda p: NAMES[p])       # doctest: +SKIP
    >>> save_params("out_dir", params, to_hf=lambda p: NAMES[p], config=cfg_dict)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from functional_mm import pytree
from functional_mm.checkpoint import _dtypes
from functional_mm.checkpoint._layout import local_shard, target_box

__all__ = [
    "CheckpointMismatchError",
    "DEFAULT_MAX_SHARD_BYTES",
    "read_config",
    "write_config",
    "tensor_files",
    "check_names",
    "read_tensors",
    "convert_state_dict",
    "load_params",
    "export_params",
    "write_tensors",
    "save_params",
]

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size (5 GB)


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the model: lists every missing, unexpected and mis-shaped name."""


def _dir(directory: str | os.PathLike) -> Path:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(d)!r} does not exist (or is not a directory)")
    return d


def read_config(directory: str | os.PathLike, filename: str = "config.json") -> dict[str, Any]:
    """The JSON config of a HF directory, with an error naming the directory and file when it is missing."""
    path = _dir(directory) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no {filename} (expected {str(path)!r})")
    with open(path) as f:
        return json.load(f)


def write_config(
    directory: str | os.PathLike, config: Mapping[str, Any], filename: str = "config.json"
) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    # Write-then-rename: every rank of a sharded export writes the same config, and a plain "w" open would
    # let one rank truncate the file while another reads it.
    tmp = Path(directory) / f".{filename}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, Path(directory) / filename)


def _index_name(weights_name: str) -> str:
    return weights_name + ".index.json"  # model.safetensors -> model.safetensors.index.json


def tensor_files(directory: str | os.PathLike, weights_name: str = "model.safetensors") -> dict[str, Path]:
    """``{tensor name: file}`` from ``<weights_name>.index.json`` (sharded) or ``<weights_name>``.

    ``weights_name`` is ``model.safetensors`` for transformers, ``diffusion_pytorch_model.safetensors`` for
    diffusers.
    """
    d = _dir(directory)
    index, single = d / _index_name(weights_name), d / weights_name
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{str(index)!r} has no 'weight_map' object")
        files = {name: d / fname for name, fname in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{str(index)!r} names shard file(s) missing from {str(d)!r}: {missing}")
        return files
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(
        f"{str(d)!r} has no weights: expected {weights_name} or {_index_name(weights_name)} (sharded)"
    )


def _shapes_in_files(files: Mapping[str, Path]) -> dict[str, tuple[int, ...]]:
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    shapes = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointMismatchError(
                        f"index maps {name!r} to {path.name}, which does not contain it"
                    )
                shapes[name] = tuple(f.get_slice(name).get_shape())  # header only, no tensor data read
    return shapes


def check_names(
    available: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    ignore: Iterable[str] = (),
    where: str = "checkpoint",
) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``available`` (name -> shape) has exactly the ``expected``
    names with the expected shapes, apart from names matching an ``ignore`` regex (``re.search``)."""
    patterns = [re.compile(p) for p in ignore]
    missing = sorted(set(expected) - set(available))
    unexpected = sorted(n for n in set(available) - set(expected) if not any(p.search(n) for p in patterns))
    mismatched = sorted(
        f"{n}: checkpoint {list(available[n])} vs model {list(expected[n])}"
        for n in set(expected) & set(available)
        if tuple(available[n]) != tuple(expected[n])
    )
    if missing or unexpected or mismatched:
        parts = [f"{where} does not match the model:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                parts.append(f"  {label} ({len(items)}): " + ", ".join(items))
        raise CheckpointMismatchError("\n".join(parts))


def read_tensors(
    directory: str | os.PathLike,
    expected: Mapping[str, tuple[int, ...]],
    *,
    ignore: Iterable[str] = (),
    dtype: torch.dtype | None = None,
    weights_name: str = "model.safetensors",
    rename: Callable[[str], str] | None = None,
    regions: Mapping[str, tuple[slice, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """Strictly read the ``expected`` tensors (HF name -> shape) from a (sharded) safetensors directory.

    ``rename`` maps a name as stored to the name ``expected`` uses (e.g. an older spelling of the same
    checkpoint); two stored names that rename to one are an error. ``dtype`` casts on read. ``regions`` maps
    names to slices: only those bytes of the tensor are read (``get_slice``), for sharded loading.
    """
    regions = regions or {}
    files = tensor_files(directory, weights_name)
    if rename is not None:
        renamed: dict[str, tuple[str, Path]] = {}
        for name, path in files.items():
            new = rename(name)
            if new in renamed:
                raise CheckpointMismatchError(f"{renamed[new][0]!r} and {name!r} both map to {new!r}")
            renamed[new] = (name, path)
    else:
        renamed = {name: (name, path) for name, path in files.items()}
    shapes = _shapes_in_files(files)
    check_names(
        {new: shapes[old] for new, (old, _) in renamed.items()},
        expected,
        ignore=ignore,
        where=f"checkpoint {str(directory)!r}",
    )
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(renamed[name][1], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                if name in regions:
                    t = (
                        f.get_slice(renamed[name][0])[regions[name]]
                        if regions[name]
                        else f.get_tensor(renamed[name][0])
                    )
                else:
                    t = f.get_tensor(renamed[name][0])
                out[name] = t if dtype is None else t.to(dtype)
    return out


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    ignore: Iterable[str] = (),
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Like :func:`read_tensors` for an in-memory state dict (e.g. a transformers module's ``state_dict()``).
    Tensors are detached (and cast/copied when ``dtype`` differs)."""
    check_names(
        {k: tuple(v.shape) for k, v in state_dict.items()}, expected, ignore=ignore, where="state dict"
    )
    return {
        k: (state_dict[k].detach() if dtype is None else state_dict[k].detach().to(dtype)) for k in expected
    }


def load_params(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    shapes: Any,
    to_hf: Callable[[str], str],
    *,
    ignore: Iterable[str] = (),
    dtype: torch.dtype | None = None,
    weights_name: str = "model.safetensors",
    rename: Callable[[str], str] | None = None,
) -> Any:
    """Load a parameter tree shaped like ``shapes`` (e.g. the meta tree from ``nn.abstract``) from a HF
    directory or an in-memory state dict; ``to_hf`` maps each leaf path to its HF tensor name.

    ``dtype`` defaults to each leaf's dtype in ``shapes``. A DTensor leaf (real or meta) is read as this
    process's slice only and returned as a DTensor with the same mesh and placements.

    Example::

        >>> shapes, _ = nn.abstract(model.init_boxed, random.key(0), cfg)               # doctest: +SKIP
        >>> params = load_params("Qwen2-0.5B", shapes, to_hf=hf_name, ignore=[r"inv_freq$"])  # doctest: +SKIP
    """
    flat_shapes, _ = pytree.flatten_with_paths(shapes)
    names = {path: to_hf(path) for path, _ in flat_shapes}
    dups = sorted(n for n, c in Counter(names.values()).items() if c > 1)
    if dups:
        raise ValueError(f"load_params: several parameters map to the same HF name(s) {dups}")
    expected = {names[path]: tuple(leaf.shape) for path, leaf in flat_shapes}
    regions = {names[p]: target_box(leaf).slices() for p, leaf in flat_shapes if isinstance(leaf, DTensor)}
    in_memory = isinstance(source, Mapping)
    if in_memory:
        tensors = convert_state_dict(source, expected, ignore=ignore)
        tensors = {k: (v[regions[k]] if regions.get(k) else v) for k, v in tensors.items()}
    else:
        tensors = read_tensors(
            source, expected, ignore=ignore, weights_name=weights_name, rename=rename, regions=regions
        )

    def cast(path: str, leaf: torch.Tensor) -> torch.Tensor:
        t, target = tensors[names[path]], dtype or leaf.dtype
        if t.dtype != target:
            t = t.to(target)
        elif in_memory:  # a live HF module or a tied embedding must not be aliased by our tree
            t = t.clone()
        if isinstance(leaf, DTensor):
            device = torch.device(leaf.device_mesh.device_type)
            if device.type != "cpu":
                device = torch.device(device.type, getattr(torch, device.type).current_device())
            return DTensor.from_local(
                t.contiguous().to(device), leaf.device_mesh, leaf.placements, run_check=False,
                shape=leaf.shape, stride=leaf.stride(),
            )  # fmt: skip
        return t

    return pytree.map_with_path(cast, shapes)


def export_params(params: Any, to_hf: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """``{hf_name: tensor}`` for every leaf of ``params`` (detached, on CPU, contiguous). DTensors stay
    DTensors (their local shards moved to CPU), for :func:`write_tensors` to write in place."""
    out: dict[str, torch.Tensor] = {}
    for path, leaf in pytree.flatten_with_paths(params)[0]:
        name = to_hf(path)
        if name in out:
            raise ValueError(f"export_params: two parameters map to the HF name {name!r} (second: {path!r})")
        out[name] = leaf.detach().cpu().contiguous()
    return out


def _shard_names(weights_name: str, n: int) -> list[str]:
    stem, ext = weights_name.rsplit(".", 1)
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)]


def _remove_stale(d: Path, weights_name: str) -> None:
    # A leftover single file next to a new index (or old shards) would make loaders see two checkpoints.
    stem, ext = weights_name.rsplit(".", 1)
    pattern = re.compile(rf"^{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.{re.escape(ext)}(\.index\.json)?$")
    for p in d.iterdir():
        if p.is_file() and pattern.match(p.name):
            p.unlink()


def write_tensors(
    directory: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    weights_name: str = "model.safetensors",
) -> list[str]:
    """Write ``{name: tensor}`` as ``<weights_name>``, or as numbered shards plus ``<weights_name>.index.json``
    when the total exceeds ``max_shard_bytes`` (a tensor larger than the limit gets a shard of its own).
    Earlier weight files of the same ``weights_name`` in ``directory`` are removed. Returns the file names.

    With DTensor values every process of the job must call this: the files are laid out from global shapes
    (the same on every process), rank 0 creates them, and each process writes the slices it owns (one replica
    of a replicated shard; plain tensors come from rank 0) at their byte offsets."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if any(isinstance(v, DTensor) for v in tensors.values()):
        return _write_sharded(Path(directory), tensors, max_shard_bytes, weights_name)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _remove_stale(d, weights_name)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without a known format
    if len(shards) == 1:
        save_file(shards[0], str(d / weights_name), metadata=metadata)
        return [weights_name]
    names = _shard_names(weights_name, len(shards))
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(d / fname), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(d / _index_name(weights_name), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")
    return [*names, _index_name(weights_name)]


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


def _group_files(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _header(tensors: Mapping[str, torch.Tensor], names: list[str]) -> tuple[bytes, dict[str, int]]:
    """A safetensors header (8-byte length + JSON padded to 8 bytes) and each tensor's data offset."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets, pos = {}, 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name!r}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        meta[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [pos, pos + nbytes],
        }
        offsets[name] = pos
        pos += nbytes
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body, offsets


def _byte_runs(shape: tuple[int, ...], start: tuple[int, ...], size: tuple[int, ...], itemsize: int):
    """``(file offset, local byte offset, nbytes)`` of the contiguous runs of a box in a row-major array."""
    if not shape:
        yield 0, 0, itemsize
        return
    if any(n == 0 for n in size):
        return
    k = len(shape) - 1  # the innermost dim that is not whole: everything after it is contiguous
    while k > 0 and size[k] == shape[k] and start[k] == 0:
        k -= 1
    strides = [int(np.prod(shape[d + 1 :])) for d in range(len(shape))]
    run = size[k] * strides[k] * itemsize
    for i, idx in enumerate(np.ndindex(*size[:k])):
        elem = sum((start[d] + idx[d]) * strides[d] for d in range(k)) + start[k] * strides[k]
        yield elem * itemsize, i * run, run


def _write_sharded(
    d: Path, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int, weights_name: str
) -> list[str]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    groups = _group_files(tensors, max_shard_bytes)
    files = [weights_name] if len(groups) == 1 else _shard_names(weights_name, len(groups))
    headers = [_header(tensors, names) for names in groups]
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        _remove_stale(d, weights_name)
        for fname, names, (head, _) in zip(files, groups, headers):
            total = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
            with open(d / fname, "wb") as f:
                f.write(head)
                f.truncate(len(head) + total)  # sized up front: every process writes into it in place
    if dist.is_initialized():
        dist.barrier()
    for fname, names, (head, offsets) in zip(files, groups, headers):
        fd = os.open(d / fname, os.O_WRONLY)
        try:
            for name in names:
                shard = local_shard(name, tensors[name])
                if not shard.owner or shard.tensor is None:
                    continue
                t = tensors[name]
                data = _dtypes.to_numpy(shard.tensor.detach().cpu()).reshape(-1).view(np.uint8)
                base = len(head) + offsets[name]
                for at, local, n in _byte_runs(
                    tuple(t.shape), shard.box.start, shard.box.size, t.element_size()
                ):
                    os.pwrite(fd, memoryview(data[local : local + n]), base + at)
            os.fsync(fd)
        finally:
            os.close(fd)
    if dist.is_initialized():
        dist.barrier()  # every slice is in place before anyone reads the files or the index
    if len(groups) > 1 and rank == 0:
        weight_map = {n: fname for fname, names in zip(files, groups) for n in names}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(d / _index_name(weights_name), "w") as f:
            json.dump(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True
            )
            f.write("\n")
    return files if len(groups) == 1 else [*files, _index_name(weights_name)]


def save_params(
    directory: str | os.PathLike,
    params: Any,
    to_hf: Callable[[str], str],
    *,
    config: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    weights_name: str = "model.safetensors",
    config_name: str = "config.json",
) -> list[str]:
    """Write ``params`` (renamed with ``to_hf``) and, when given, the ``config`` JSON. Returns the files."""
    files = write_tensors(
        directory, export_params(params, to_hf), max_shard_bytes=max_shard_bytes, weights_name=weights_name
    )
    if config is not None:
        write_config(directory, config, config_name)
        files.append(config_name)
    return files
