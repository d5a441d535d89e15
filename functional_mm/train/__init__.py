"""Training: the state pytree and the pure, compiled train step.

Example::

    >>> import torch
    >>> from functional_mm import optim, random, train
    >>> tx = optim.adamw(1e-2)
    >>> state = train.TrainState.create({"w": torch.zeros(4)}, tx, random.key(0))
    >>> step = train.make_train_step(lambda p, b, k: ((p["w"] - b) ** 2).mean(), tx, compile=False)
    >>> state, metrics = step(state, torch.ones(4))
    >>> int(state.step), metrics["loss"].item()
    (1, 1.0)
"""

from functional_mm.train.state import LossScale, MixedPrecision, TrainState, resolve_mixed_precision
from functional_mm.train.step import make_train_step

__all__ = ["TrainState", "LossScale", "MixedPrecision", "resolve_mixed_precision", "make_train_step"]
