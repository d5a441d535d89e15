"""Leaf-list plumbing shared by the transformations.

Transformations work on flat leaf lists so every update is a handful of ``torch._foreach_*`` calls. ``None``
leaves mean "no update for this parameter" (frozen, or outside a mask) and are skipped; torch's pytree treats
``None`` as a leaf, so flattening keeps their positions and update / state trees always line up.
"""

from __future__ import annotations

from typing import Any

import torch

from functional_mm import pytree

PyTree = Any


def flatten(tree: PyTree) -> tuple[list[Any], Any]:
    return pytree.flatten(tree, is_leaf=pytree.is_leaf_none)


def require(ok: bool, where: str, name: str, value: Any, expected: str) -> None:
    """Raise ``ValueError`` naming the offending hyperparameter."""
    if not ok:
        raise ValueError(f"{where}: {name} must be {expected}, got {value!r}")


def zeros_like(params: PyTree) -> PyTree:
    return pytree.tree_map(lambda x: None if x is None else torch.zeros_like(x), params)


def zero_count(params: PyTree) -> torch.Tensor:
    """A 0-d int64 step counter on the parameters' device: a tensor (not a Python int) so a compiled update
    sees the same graph every step instead of specializing on the step number."""
    tensors = [x for x in flatten(params)[0] if isinstance(x, torch.Tensor)]
    return torch.zeros((), dtype=torch.int64, device=tensors[0].device if tensors else None)


def structure_error(where: str, updates: PyTree, other: PyTree, what: str) -> ValueError:
    u_paths = pytree.paths(updates, is_leaf=pytree.is_leaf_none)
    o_paths = pytree.paths(other, is_leaf=pytree.is_leaf_none)
    only_u = [p for p in u_paths if p not in set(o_paths)][:5]
    only_o = [p for p in o_paths if p not in set(u_paths)][:5]
    detail = (
        f"only in updates: {only_u}, only in {what}: {only_o}"
        if only_u or only_o
        else "same paths but different container types"
    )
    return ValueError(f"{where}: updates and {what} have different tree structures ({detail})")


def align(where: str, updates: PyTree, *state_trees: PyTree, what: str = "optimizer state"):
    """Flatten ``updates`` and per-leaf trees (state, params) that must share its structure.

    Returns ``(flat_updates, treedef, [flat_state, ...], idx)`` where ``idx`` lists the positions that carry
    an update. A ``None`` update with a tensor state is a leaf frozen upstream: its state is left untouched.
    """
    flat_u, treedef = flatten(updates)
    flats = []
    for tree in state_trees:
        flat, tdef = flatten(tree)
        if tdef != treedef:
            raise structure_error(where, updates, tree, what)
        flats.append(flat)
    idx = []
    for i, u in enumerate(flat_u):
        if u is None:
            continue
        if any(flat[i] is None for flat in flats):
            path = pytree.paths(updates, is_leaf=pytree.is_leaf_none)[i]
            raise ValueError(f"{where}: no {what} for parameter {path!r} (was it masked out at init?)")
        idx.append(i)
    return flat_u, treedef, flats, idx


def pick(flat: list[Any], idx: list[int]) -> list[Any]:
    return [flat[i] for i in idx]


def put(flat: list[Any], idx: list[int], values: list[Any]) -> list[Any]:
    out = list(flat)
    for i, v in zip(idx, values):
        out[i] = v
    return out


# The first op applied to a donated buffer runs in place; on the pure path it allocates the result, and
# later ops may then run in place on that fresh result. Both paths run the same kernels, so they agree
# bitwise.


def mul(xs: list[torch.Tensor], scalar: Any, donate: bool) -> list[torch.Tensor]:
    if not isinstance(scalar, torch.Tensor):
        # On CPU the in-place scalar kernel rounds the scalar to the tensors' dtype (bf16!) while the
        # out-of-place one does not; a float32 0-d tensor takes the same path in both. torch.full launches
        # a fill kernel: no host-to-device copy, no sync.
        dtype = torch.promote_types(xs[0].dtype, torch.float32)
        scalar = torch.full((), scalar, dtype=dtype, device=xs[0].device)
    if donate:
        torch._foreach_mul_(xs, scalar)
        return xs
    return list(torch._foreach_mul(xs, scalar))


def add(xs: list[torch.Tensor], ys: list[torch.Tensor], alpha: float, donate: bool) -> list[torch.Tensor]:
    if donate:
        torch._foreach_add_(xs, ys, alpha=alpha)
        return xs
    return list(torch._foreach_add(xs, ys, alpha=alpha))


def lerp(xs: list[torch.Tensor], ys: list[torch.Tensor], weight: float, donate: bool) -> list[torch.Tensor]:
    if donate:
        torch._foreach_lerp_(xs, ys, weight)
        return xs
    return list(torch._foreach_lerp(xs, ys, weight))


def increment(count: torch.Tensor, donate: bool) -> torch.Tensor:
    if donate:
        return count.add_(1)
    return count + 1
