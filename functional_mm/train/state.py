"""The train state: one pytree holding everything a step reads and writes.

Example::

    >>> import torch
    >>> from functional_mm import optim, random
    >>> from functional_mm.train import TrainState
    >>> state = TrainState.create({"w": torch.zeros(3)}, optim.sgd(0.1), random.key(0))
    >>> int(state.step), state.loss_scale is None
    (0, True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch

from functional_mm import pytree

__all__ = ["TrainState", "LossScale", "MixedPrecision", "resolve_mixed_precision"]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class MixedPrecision:
    """How the forward/backward runs: ``compute_dtype`` for params and float batch leaves inside the loss
    (master params and grads stay in their own dtype, usually fp32); ``loss_scaling`` turns on dynamic loss
    scaling (needed for fp16, whose 5-bit exponent underflows small gradients; bf16 has fp32's range).

    The scale starts at ``init_scale``, halves on every step with non-finite grads (that step's update is
    skipped) and doubles after ``growth_interval`` consecutive finite steps (the torch GradScaler /
    flax DynamicScale rule).

    Example::

        >>> import torch
        >>> from functional_mm.train import MixedPrecision, resolve_mixed_precision
        >>> resolve_mixed_precision("fp16") == MixedPrecision(torch.float16, loss_scaling=True)
        True
    """

    compute_dtype: torch.dtype = torch.bfloat16
    loss_scaling: bool = False
    init_scale: float = 2.0**15
    growth_interval: int = 2000


_PRESETS = {
    "bf16": MixedPrecision(torch.bfloat16),
    "fp16": MixedPrecision(torch.float16, loss_scaling=True),
}


def resolve_mixed_precision(mp: str | MixedPrecision | dict | None) -> MixedPrecision | None:
    """``None``/"fp32" -> ``None`` (no casting), "bf16", "fp16", a :class:`MixedPrecision` or a dict of its
    fields."""
    if mp is None or mp == "fp32":
        return None
    if isinstance(mp, MixedPrecision):
        return mp
    if isinstance(mp, dict):
        return MixedPrecision(**mp)
    if isinstance(mp, str) and mp in _PRESETS:
        return _PRESETS[mp]
    raise ValueError(
        f"unknown mixed_precision {mp!r}; use None, 'fp32', 'bf16', 'fp16' or MixedPrecision(...)"
    )


class LossScale(NamedTuple):
    """Dynamic loss-scaling state: ``scale`` (0-d float32) and ``good_steps`` (0-d int64, consecutive
    steps with finite grads since the last change of scale)."""

    scale: torch.Tensor
    good_steps: torch.Tensor


class TrainState(NamedTuple):
    """Everything a train step reads and returns, as a pytree (so it checkpoints and compiles as one).

    - ``step``: 0-d int64, the number of steps taken (skipped fp16 steps count too: it numbers batches);
    - ``params``: the parameter pytree (master weights, usually fp32);
    - ``opt_state``: ``optimizer.init(params)``;
    - ``key``: the PRNG key the next step splits (``functional_mm.random``);
    - ``loss_scale``: ``None``, or a :class:`LossScale` when fp16 dynamic loss scaling is on.
    """

    step: torch.Tensor
    params: PyTree
    opt_state: PyTree
    key: torch.Tensor
    loss_scale: LossScale | None = None

    @classmethod
    def create(
        cls,
        params: PyTree,
        optimizer: Any,
        key: torch.Tensor,
        *,
        mixed_precision: str | MixedPrecision | dict | None = None,
    ) -> TrainState:
        """A fresh state at step 0: ``opt_state = optimizer.init(params)``; a loss scale when
        ``mixed_precision`` asks for loss scaling. Scalars live on the device of the first parameter so a
        compiled step does not mix devices.

        Example::

            >>> import torch
            >>> from functional_mm import optim, random
            >>> from functional_mm.train import TrainState
            >>> s = TrainState.create({"w": torch.zeros(2)}, optim.sgd(0.1), random.key(0), mixed_precision="fp16")
            >>> s.loss_scale.scale.item(), int(s.loss_scale.good_steps)
            (32768.0, 0)
        """
        mp = resolve_mixed_precision(mixed_precision)
        tensors = [x for x in pytree.leaves(params) if isinstance(x, torch.Tensor)]
        device = tensors[0].device if tensors else key.device
        loss_scale = None
        if mp is not None and mp.loss_scaling:
            loss_scale = LossScale(
                torch.tensor(mp.init_scale, dtype=torch.float32, device=device),
                torch.zeros((), dtype=torch.int64, device=device),
            )
        step = torch.zeros((), dtype=torch.int64, device=device)
        return cls(step, params, optimizer.init(params), key, loss_scale)
