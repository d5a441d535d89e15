"""Pure layers. Each layer is a pair of functions: ``init(key, ...)`` returns a tree of :class:`Param`
(tensor + logical axis names) and an apply function takes the unboxed tensors.

Example::

    >>> import torch
    >>> from functional_mm import nn, random
    >>> boxed = {"proj": nn.linear.init(random.key(0), 16, 32, axes=("embed", "mlp"))}
    >>> params, axes = nn.unbox(boxed)
    >>> axes["proj"]["weight"]
    ('mlp', 'embed')
    >>> nn.linear.apply(params["proj"], torch.ones(2, 16)).shape
    torch.Size([2, 32])
"""

import torch

from functional_mm import random as _random
from functional_mm.nn import (
    attention,
    conv,
    embedding,
    linear,
    mlp,
    modulation,
    norms,
    patch_embed,
    rope,
    sincos,
)
from functional_mm.nn._param import Param, abstract, is_param, param, unbox


def dropout(key: torch.Tensor, x: torch.Tensor, rate: float, *, deterministic: bool = False) -> torch.Tensor:
    """Inverted dropout driven by an explicit key (no global RNG)."""
    if deterministic or rate == 0.0:
        return x
    keep = _random.bernoulli(key, 1.0 - rate, x.shape, device=x.device)
    return torch.where(keep, x / (1.0 - rate), torch.zeros((), dtype=x.dtype, device=x.device))


__all__ = [
    "Param",
    "param",
    "is_param",
    "unbox",
    "abstract",
    "dropout",
    "attention",
    "conv",
    "embedding",
    "linear",
    "mlp",
    "modulation",
    "norms",
    "patch_embed",
    "rope",
    "sincos",
]
