"""Ready-made optimizers built from the elementary transformations."""

from __future__ import annotations

from typing import Any

from functional_mm.optim._base import GradientTransformation, chain
from functional_mm.optim._transforms import (
    ScalarOrSchedule,
    add_decayed_weights,
    identity,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)


def sgd(
    learning_rate: ScalarOrSchedule, momentum: float | None = None, nesterov: bool = False
) -> GradientTransformation:
    """SGD with optional (Nesterov) momentum; matches ``torch.optim.SGD`` with ``dampening=0``.

    Coupled weight decay (torch's ``SGD(weight_decay=wd)``) is ``chain(add_decayed_weights(wd), sgd(...))``.
    """
    if nesterov and momentum is None:
        raise ValueError("sgd: nesterov=True needs a momentum")
    return chain(
        identity() if momentum is None else trace(momentum, nesterov),
        scale_by_learning_rate(learning_rate),
    )


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> GradientTransformation:
    """Adam; matches ``torch.optim.Adam(lr, betas=(b1, b2), eps=eps)``."""
    return chain(scale_by_adam(b1, b2, eps, eps_root), scale_by_learning_rate(learning_rate))


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    mask: Any = None,
) -> GradientTransformation:
    """AdamW with decoupled weight decay, ``p -= lr * (adam_update + weight_decay * p)``, which is what
    ``torch.optim.AdamW`` does. ``mask`` (see :func:`masked`) picks the parameters to decay, e.g.
    ``mask=r"weight$"`` to skip biases and norm scales.
    """
    return chain(
        scale_by_adam(b1, b2, eps, eps_root),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
