"""optax-style optimizers on PyTorch: pure ``(init, update)`` gradient transformations over pytrees.

A transformation maps gradients to parameter updates and threads its own state (NamedTuples of tensors);
optimizers are chains of small transformations and :func:`apply_updates` adds the result to the params.
``update(..., donate=True)`` updates the gradients and state in place instead of copying them.

Example::

    >>> import torch
    >>> from functional_mm import optim
    >>> params = {"head": {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}, "body": {"weight": torch.ones(2)}}
    >>> lr = optim.warmup_cosine_decay_schedule(0.0, 1e-3, warmup_steps=10, decay_steps=100)
    >>> tx = optim.chain(
    ...     optim.clip_by_global_norm(1.0),
    ...     optim.multi_transform(
    ...         {"train": optim.adamw(lr, weight_decay=0.1, mask=r"weight$"), "frozen": optim.freeze()},
    ...         [(r"^head/", "train"), (r".*", "frozen")],
    ...     ),
    ... )
    >>> state = tx.init(params)
    >>> grads = {"head": {"weight": torch.ones(2, 2), "bias": torch.ones(2)}, "body": {"weight": torch.ones(2)}}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optim.apply_updates(params, updates)
    >>> params["body"]["weight"].tolist()  # frozen: no update, no optimizer state
    [1.0, 1.0]
"""

from functional_mm.optim._aliases import adam, adamw, sgd
from functional_mm.optim._base import EmptyState, GradientTransformation, apply_updates, chain
from functional_mm.optim._combine import MaskedState, MultiTransformState, masked, multi_transform
from functional_mm.optim._schedules import (
    Schedule,
    constant_schedule,
    cosine_decay_schedule,
    join_schedules,
    linear_schedule,
    warmup_cosine_decay_schedule,
    warmup_stable_decay_schedule,
)
from functional_mm.optim._transforms import (
    ScaleByAdamState,
    ScaleByScheduleState,
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    freeze,
    global_norm,
    identity,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    set_to_zero,
    trace,
)

__all__ = [
    # core
    "GradientTransformation",
    "EmptyState",
    "chain",
    "apply_updates",
    # transformations
    "identity",
    "scale",
    "scale_by_learning_rate",
    "scale_by_adam",
    "add_decayed_weights",
    "trace",
    "clip_by_global_norm",
    "global_norm",
    "freeze",
    "set_to_zero",
    "masked",
    "multi_transform",
    # optimizers
    "sgd",
    "adam",
    "adamw",
    # schedules
    "Schedule",
    "constant_schedule",
    "linear_schedule",
    "cosine_decay_schedule",
    "join_schedules",
    "warmup_cosine_decay_schedule",
    "warmup_stable_decay_schedule",
    # states
    "ScaleByAdamState",
    "TraceState",
    "ScaleByScheduleState",
    "MaskedState",
    "MultiTransformState",
]
