"""Pytree <-> orbax tree metadata (the item's ``_METADATA`` file, as orbax-checkpoint 0.12 writes it).

Orbax names an array by its key path joined with ``"."`` (``params.layers.0.w``: also the array's folder) and
records every leaf under ``str(tuple(keys))`` with each key's type (1: sequence index, 2: dict key or attribute,
so a NamedTuple's fields look like dict keys) and its value type: ``jax.Array`` (a tensor), ``scalar`` (a
Python number), ``None`` and the empty containers ``Dict``/``List``/``Tuple`` (an empty NamedTuple is ``None``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from functional_mm import pytree

__all__ = ["Leaf", "flatten", "metadata_json", "read_metadata", "unflatten_saved"]

SEQUENCE, DICT = 1, 2
ARRAY, SCALAR, NONE = "jax.Array", "scalar", "None"
_EMPTY = {"Dict": dict, "List": list, "Tuple": tuple, NONE: lambda: None}
# Orbax's other array-like value types: a checkpoint written by orbax may hold them.
_ARRAY_TYPES = {ARRAY, "np.ndarray"}


@dataclass
class Leaf:
    path: str  # "/"-joined, our naming ("params/layers/0/w")
    keys: tuple[str, ...]
    key_types: tuple[int, ...]
    value: Any

    @property
    def name(self) -> str:
        """Orbax's parameter name: the array's folder inside the item."""
        return ".".join(self.keys)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _is_empty_container(x: Any) -> bool:
    return isinstance(x, dict | list | tuple) and len(x) == 0


def _child(node: Any, part: str) -> tuple[int, Any]:
    """Key type and child of ``node`` under the path component ``part``."""
    if isinstance(node, dict):
        for k, v in node.items():
            if str(k) == part:
                return DICT, v
        raise ValueError(f"checkpoint keys must be free of '/': a key of {sorted(map(str, node))} has one")
    elif _is_namedtuple(node):
        return DICT, getattr(node, part)
    elif isinstance(node, list | tuple):
        return SEQUENCE, node[int(part)]
    raise TypeError(
        f"checkpoints support trees of dict / list / tuple / NamedTuple; found {type(node).__name__} at {part!r}"
    )


def flatten(tree: Any) -> tuple[list[Leaf], Any]:
    """Leaves of ``tree`` in :mod:`functional_mm.pytree` order (empty containers count as leaves, as in
    orbax) and the treedef that :func:`functional_mm.pytree.unflatten` takes back."""
    flat, treedef = pytree.flatten_with_paths(tree, is_leaf=_is_empty_container)
    leaves = []
    for path, value in flat:
        parts = tuple(path.split("/")) if path else ()
        node, types = tree, []
        for part in parts:
            kt, node = _child(node, part)
            types.append(kt)
        if any(not part for part in parts):
            raise ValueError(f"checkpoint keys must be non-empty strings, got the path {path!r}")
        leaves.append(Leaf(path, parts, tuple(types), value))
    return leaves, treedef


def value_type(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return ARRAY
    if x is None or _is_namedtuple(x) and not x:
        return NONE
    if isinstance(x, bool | int | float):
        return SCALAR
    if isinstance(x, dict):
        return "Dict"
    if isinstance(x, list):
        return "List"
    if isinstance(x, tuple):
        return "Tuple"
    raise TypeError(
        f"cannot checkpoint a leaf of type {type(x).__name__} (tensors, Python numbers and None only)"
    )


def metadata_json(leaves: list[Leaf], write_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The item's ``_METADATA`` content. ``write_shapes`` maps array paths to the shard shape (orbax records the
    primary process's local shape)."""
    tree = {}
    for leaf in leaves:
        vt = value_type(leaf.value)
        value = {"value_type": vt, "skip_deserialize": vt not in (ARRAY, SCALAR)}
        if vt == ARRAY:
            value["write_shape"] = list(write_shapes[leaf.path])
        tree[str(leaf.keys)] = {
            "key_metadata": [{"key": k, "key_type": t} for k, t in zip(leaf.keys, leaf.key_types)],
            "value_metadata": value,
        }
    return {
        "tree_metadata": tree,
        "use_ocdbt": False,
        "use_zarr3": True,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }


@dataclass
class Saved:
    """One leaf as recorded in ``_METADATA``."""

    keys: tuple[str, ...]
    key_types: tuple[int, ...]
    value_type: str

    @property
    def path(self) -> str:
        return "/".join(self.keys)

    @property
    def name(self) -> str:
        return ".".join(self.keys)

    @property
    def is_array(self) -> bool:
        return self.value_type in _ARRAY_TYPES or self.value_type == SCALAR


def read_metadata(item_dir: str | os.PathLike) -> tuple[dict[str, Saved], dict[str, Any]]:
    """``({path: Saved}, raw json)`` from an item's ``_METADATA``."""
    with open(os.path.join(item_dir, "_METADATA")) as f:
        raw = json.load(f)
    saved = {}
    for entry in raw["tree_metadata"].values():
        keys = tuple(str(k["key"]) for k in entry["key_metadata"])
        types = tuple(int(k["key_type"]) for k in entry["key_metadata"])
        s = Saved(keys, types, entry["value_metadata"]["value_type"])
        saved[s.path] = s
    return saved, raw


def unflatten_saved(saved: dict[str, Saved], values: dict[str, Any]) -> Any:
    """Rebuild the saved structure from metadata alone: dict keys and attributes become dicts, sequence
    indices lists (as orbax does without a target); ``values`` maps array paths to restored values."""
    root: dict[str, Any] = {}
    types: dict[int, int] = {}  # id(container) -> key type of its children

    for s in saved.values():
        if not s.keys:  # the whole item is one leaf
            return values.get(s.path, _EMPTY.get(s.value_type, lambda: None)())
        node = root
        for i, (k, kt) in enumerate(zip(s.keys, s.key_types)):
            types[id(node)] = kt
            last = i == len(s.keys) - 1
            if last:
                node[k] = values[s.path] if s.path in values else _EMPTY.get(s.value_type, lambda: None)()
            else:
                node = node.setdefault(k, {})

    def convert(node: Any) -> Any:
        if not isinstance(node, dict) or not node and id(node) not in types:
            return node
        out = {k: convert(v) for k, v in node.items()}
        if types.get(id(node)) == SEQUENCE:
            return [out[k] for k in sorted(out, key=int)]
        return out

    return convert(root)
