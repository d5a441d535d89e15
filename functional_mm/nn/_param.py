"""Boxed parameters: a tensor plus the logical name of each of its dimensions.

Layer ``init`` functions return trees of :class:`Param`; :func:`unbox` splits such a tree into the plain
parameter pytree every ``apply`` takes and a parallel tree of logical axis names that the sharding rules
(``functional_mm.parallelism``) map onto mesh axes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functional_mm import pytree


class Param(NamedTuple):
    """``value`` is the tensor; ``axes`` has one logical name (or ``None``) per dimension."""

    value: torch.Tensor
    axes: tuple[str | None, ...]


def param(value: torch.Tensor, axes: tuple[str | None, ...]) -> Param:
    """Box ``value`` with its logical axes, checking there is one name per dimension."""
    axes = tuple(axes)
    if len(axes) != value.dim():
        raise ValueError(f"parameter of shape {tuple(value.shape)} got {len(axes)} axis names {axes}")
    return Param(value, axes)


def is_param(x: Any) -> bool:
    return isinstance(x, Param)


def unbox(boxed: Any) -> tuple[Any, Any]:
    """Split a tree of :class:`Param` into ``(params, axes)``: two trees with the same structure."""
    params = pytree.tree_map(lambda p: p.value, boxed, is_leaf=is_param)
    axes = pytree.tree_map(lambda p: p.axes, boxed, is_leaf=is_param)
    return params, axes


def abstract(init_fn, *args, **kwargs) -> tuple[Any, Any]:
    """Run a boxed ``init_fn`` on the meta device: shapes, dtypes and logical axes without allocating memory.

    Example::

        >>> from functional_mm import nn, random
        >>> shapes, axes = nn.abstract(nn.linear.init, random.key(0), 4, 8, axes=("embed", "mlp"))
        >>> shapes["weight"].shape, axes["weight"]
        (torch.Size([8, 4]), ('mlp', 'embed'))
    """
    with torch.device("meta"):
        return unbox(init_fn(*args, **kwargs))
