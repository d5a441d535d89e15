"""Routing parts of a parameter tree to different transformations: :func:`masked`, :func:`multi_transform`.

An inner transformation sees the full tree with every leaf outside its group replaced by ``None``. Its
``init`` therefore allocates no state for those leaves, and its ``update`` skips them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

from functional_mm import pytree
from functional_mm.optim import _util
from functional_mm.optim._base import GradientTransformation

PyTree = Any


class MaskedState(NamedTuple):
    inner_state: PyTree


class MultiTransformState(NamedTuple):
    inner_states: dict[Hashable, PyTree]


def _is_regexes(x: Any) -> bool:
    if isinstance(x, (str, re.Pattern)):
        return True
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(r, (str, re.Pattern)) for r in x)


def _is_rules(x: Any) -> bool:
    return (
        isinstance(x, (list, tuple))
        and bool(x)
        and all(isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], (str, re.Pattern)) for r in x)
    )


def _per_leaf(where: str, spec: PyTree, tree: PyTree) -> list[Any]:
    """Flatten a mask / label tree that must mirror ``tree``."""
    flat, treedef = _util.flatten(spec)
    if treedef != _util.flatten(tree)[1]:
        raise _util.structure_error(where, tree, spec, "the mask/labels")
    return flat


def _resolve_mask(mask: Any, tree: PyTree) -> list[bool]:
    if _is_regexes(mask):
        regexes = [mask] if isinstance(mask, (str, re.Pattern)) else list(mask)
        paths = pytree.paths(tree, is_leaf=pytree.is_leaf_none)
        return [any(re.search(r, p) for r in regexes) for p in paths]
    return [bool(m) for m in _per_leaf("masked", mask(tree) if callable(mask) else mask, tree)]


def _resolve_labels(labels: Any, tree: PyTree, known: dict) -> list[Hashable]:
    if _is_rules(labels):
        flat = []
        for path in pytree.paths(tree, is_leaf=pytree.is_leaf_none):
            label = next((lab for r, lab in labels if re.search(r, path)), _NO_MATCH)
            if label is _NO_MATCH:
                raise ValueError(f"multi_transform: no label rule matches parameter path {path!r}")
            flat.append(label)
    else:
        flat = _per_leaf("multi_transform", labels(tree) if callable(labels) else labels, tree)
    unknown = sorted({repr(lab) for lab in flat if lab not in known})
    if unknown:
        raise ValueError(f"multi_transform: labels {unknown} have no transformation (known: {list(known)})")
    return flat


_NO_MATCH = object()


def _select(tree: PyTree, keep: list[bool]) -> PyTree:
    """``tree`` with the leaves where ``keep`` is False replaced by ``None``."""
    if tree is None:
        return None
    flat, treedef = _util.flatten(tree)
    return pytree.unflatten(treedef, [x if k else None for x, k in zip(flat, keep)])


def _merge(where: str, out: list[Any], treedef: Any, new: PyTree, keep: list[bool]) -> None:
    flat_new, new_def = _util.flatten(new)
    if new_def != treedef:
        raise ValueError(f"{where}: the inner transformation changed the tree structure of the updates")
    for i, k in enumerate(keep):
        if k:
            out[i] = flat_new[i]


def masked(inner: GradientTransformation, mask: Any) -> GradientTransformation:
    """Apply ``inner`` only to the leaves selected by ``mask``; the other updates pass through unchanged.

    ``mask`` is a pytree of bools mirroring the parameters, a callable ``params -> bool pytree`` (called with
    ``params`` when given, else with the updates), or a regex / list of regexes matched with ``re.search``
    against leaf paths such as ``"layers/0/mlp/weight"``. ``inner`` holds no state for unselected leaves.

    Example::

        >>> from functional_mm import optim
        >>> decay_matrices = optim.masked(optim.add_decayed_weights(0.1), r"weight$")
    """

    def init(params):
        return MaskedState(inner.init(_select(params, _resolve_mask(mask, params))))

    def update(updates, state, params=None, *, donate=False):
        keep = _resolve_mask(mask, params if params is not None else updates)
        flat_u, treedef = _util.flatten(updates)
        new, inner_state = inner.update(
            _select(updates, keep), state.inner_state, _select(params, keep), donate=donate
        )
        out = list(flat_u)
        _merge("masked", out, treedef, new, keep)
        return pytree.unflatten(treedef, out), MaskedState(inner_state)

    return GradientTransformation(init, update)


def multi_transform(
    transforms: dict[Hashable, GradientTransformation],
    labels: PyTree | Callable[[PyTree], PyTree] | list[tuple[str, Hashable]],
) -> GradientTransformation:
    """Route each parameter to the transformation of its label.

    ``labels`` is one of:

    * a pytree of labels mirroring the parameters;
    * a callable ``params -> labels pytree``;
    * an ordered list of ``(regex, label)`` pairs matched with ``re.search`` against leaf paths; the first
      match wins and a path matching no rule is an error. (A list of 2-tuples is always read as rules; pass a
      callable to label a parameter tree that is itself a list of pairs.)

    Give a group :func:`freeze` to train nothing there: its parameters get ``None`` updates and no optimizer
    state. Per-group learning rates are just different transformations.

    Example::

        >>> from functional_mm import optim
        >>> tx = optim.multi_transform(
        ...     {"head": optim.adamw(1e-2), "body": optim.adamw(1e-3), "frozen": optim.freeze()},
        ...     [(r"^vision/", "frozen"), (r"^head/", "head"), (r".*", "body")],
        ... )
    """
    if not transforms:
        raise ValueError("multi_transform: transforms must not be empty")

    def init(params):
        flat = _resolve_labels(labels, params, transforms)
        return MultiTransformState(
            {name: tx.init(_select(params, [lab == name for lab in flat])) for name, tx in transforms.items()}
        )

    def update(updates, state, params=None, *, donate=False):
        if set(state.inner_states) != set(transforms):
            raise ValueError(
                f"multi_transform: state has groups {list(state.inner_states)}, expected {list(transforms)}"
            )
        flat = _resolve_labels(labels, params if params is not None else updates, transforms)
        flat_u, treedef = _util.flatten(updates)
        out = list(flat_u)
        new_states = {}
        for name, tx in transforms.items():
            keep = [lab == name for lab in flat]
            new, new_states[name] = tx.update(
                _select(updates, keep), state.inner_states[name], _select(params, keep), donate=donate
            )
            _merge("multi_transform", out, treedef, new, keep)
        return pytree.unflatten(treedef, out), MultiTransformState(new_states)

    return GradientTransformation(init, update)
