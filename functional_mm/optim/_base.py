"""The optax-style core: a transformation is a pure ``(init, update)`` pair over pytrees.

``update(updates, state, params=None, *, donate=False) -> (new_updates, new_state)``.

Donation follows JAX's contract: with ``donate=True`` a transformation may overwrite ``updates`` and ``state``
in place (``torch._foreach_*_``) and return them; the caller must not read the donated inputs afterwards.
The pure path (``donate=False``, the default) never mutates its inputs, at the price of a second copy of
the optimizer state during the update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functional_mm import pytree

PyTree = Any


class GradientTransformation(NamedTuple):
    """``init(params) -> state``; ``update(updates, state, params=None, *, donate=False) -> (updates, state)``."""

    init: Callable[[PyTree], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]


class EmptyState(NamedTuple):
    pass


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states.

    Example::

        >>> from functional_mm import optim
        >>> tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3, weight_decay=0.1))
    """

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None, *, donate=False):
        if len(state) != len(transforms):
            raise ValueError(f"chain: state has {len(state)} entries for {len(transforms)} transforms")
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, donate=donate)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def apply_updates(params: PyTree, updates: PyTree, *, donate: bool = False) -> PyTree:
    """``params + updates`` leaf-wise, keeping each parameter's dtype. ``None`` updates leave the parameter
    unchanged (frozen). With ``donate=True`` the parameters are updated in place and returned."""
    flat_p, treedef = pytree.flatten(params)
    flat_u = pytree.flatten(updates, is_leaf=pytree.is_leaf_none)[0]
    if len(flat_p) != len(flat_u):
        raise ValueError(f"apply_updates: {len(flat_p)} params but {len(flat_u)} updates")
    idx = [i for i, u in enumerate(flat_u) if u is not None]
    ps = [flat_p[i] for i in idx]
    us = [flat_u[i].to(flat_p[i].dtype) for i in idx]
    if donate:
        with torch.no_grad():
            torch._foreach_add_(ps, us)
        return params
    out = list(flat_p)
    for i, new in zip(idx, torch._foreach_add(ps, us) if ps else []):
        out[i] = new
    return pytree.unflatten(treedef, out)
