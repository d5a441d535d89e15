"""Pytrees: nested dicts / lists / tuples / NamedTuples of tensors.

This is the only module that touches ``torch.utils._pytree``; everything else goes through these helpers so
the backing library can change in one place.

Leaf *paths* are "/"-joined keys (``"layers/0/attn/q/weight"``). They are stable names: checkpoint keys and
the targets of freeze / LoRA / weight-decay / sharding rules.

Example::

    >>> import torch
    >>> from functional_mm import pytree
    >>> params = {"w": torch.ones(2, 3), "layers": [{"b": torch.zeros(3)}]}
    >>> pytree.paths(params)
    ['w', 'layers/0/b']
    >>> pytree.tree_map(lambda x: x * 2, params)["w"].sum().item()
    12.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as _pt

PyTree = Any

__all__ = [
    "PyTree",
    "tree_map",
    "map_with_path",
    "leaves",
    "flatten",
    "unflatten",
    "flatten_with_paths",
    "paths",
    "structure",
    "same_structure",
    "leaf_count",
    "leaf_bytes",
    "to_flat_dict",
    "from_flat_dict",
    "is_leaf_none",
]


def is_leaf_none(x: Any) -> bool:
    return x is None


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree, is_leaf=None) -> PyTree:
    """Apply ``fn`` leaf-wise over one or more trees of the same structure."""
    return _pt.tree_map(fn, tree, *rest, is_leaf=is_leaf)


def _key_str(k: Any) -> str:
    if isinstance(k, _pt.SequenceKey):
        return str(k.idx)
    if isinstance(k, _pt.MappingKey):
        return str(k.key)
    if isinstance(k, _pt.GetAttrKey):
        return k.name
    return str(k)


def _path_str(keypath: tuple) -> str:
    return "/".join(_key_str(k) for k in keypath)


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree, is_leaf=None) -> PyTree:
    """Like :func:`tree_map` but ``fn(path, leaf, *others)`` also receives the "/"-joined leaf path."""
    return _pt.tree_map_with_path(lambda kp, *xs: fn(_path_str(kp), *xs), tree, *rest, is_leaf=is_leaf)


def flatten(tree: PyTree, is_leaf=None) -> tuple[list[Any], Any]:
    """Return ``(leaves, treedef)``; :func:`unflatten` inverts it."""
    return _pt.tree_flatten(tree, is_leaf=is_leaf)


def unflatten(treedef: Any, leaves_: list[Any]) -> PyTree:
    return _pt.tree_unflatten(list(leaves_), treedef)


def leaves(tree: PyTree, is_leaf=None) -> list[Any]:
    return _pt.tree_leaves(tree, is_leaf=is_leaf)


def flatten_with_paths(tree: PyTree, is_leaf=None) -> tuple[list[tuple[str, Any]], Any]:
    """Return ``([(path, leaf), ...], treedef)`` in flatten order."""
    flat, treedef = _pt.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(_path_str(kp), x) for kp, x in flat], treedef


def paths(tree: PyTree, is_leaf=None) -> list[str]:
    """The "/"-joined path of every leaf, in flatten order."""
    return [p for p, _ in flatten_with_paths(tree, is_leaf=is_leaf)[0]]


def structure(tree: PyTree, is_leaf=None) -> Any:
    return _pt.tree_structure(tree, is_leaf=is_leaf)


def same_structure(a: PyTree, b: PyTree) -> bool:
    """True when both trees have the same containers and keys (leaf values are not compared)."""
    return structure(a) == structure(b)


def leaf_count(tree: PyTree) -> int:
    """Total number of elements over all tensor leaves."""
    return sum(x.numel() for x in leaves(tree) if isinstance(x, torch.Tensor))


def leaf_bytes(tree: PyTree) -> int:
    """Total bytes over all tensor leaves (global size for DTensors)."""
    return sum(x.numel() * x.element_size() for x in leaves(tree) if isinstance(x, torch.Tensor))


def to_flat_dict(tree: PyTree) -> dict[str, Any]:
    """``{path: leaf}``; the inverse of :func:`from_flat_dict` for trees of nested dicts."""
    flat, _ = flatten_with_paths(tree)
    return dict(flat)


def from_flat_dict(flat: dict[str, Any]) -> dict[str, Any]:
    """Rebuild nested dicts from ``{"a/b/c": leaf}``. Integer-like keys stay strings unless the whole level
    is ``0..n-1``, in which case it becomes a list (so ``layers/0`` round-trips to a list of layers)."""
    root: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = root
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} is both a leaf and a subtree (at {part!r})")
        if last in node:
            raise ValueError(f"path {path!r} is both a leaf and a subtree")
        node[last] = leaf

    def listify(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node) and sorted(int(k) for k in node) == list(range(len(node))):
            return [node[str(i)] for i in range(len(node))]
        return node

    return listify(root)
