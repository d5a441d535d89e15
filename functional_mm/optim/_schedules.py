"""Learning-rate schedules (optax formulas): callables of the step count returning a 0-d float32 tensor.

The step is the 0-d int64 count kept in the optimizer state (a Python int also works). Everything is tensor
arithmetic without branches on the step, so a compiled train step does not recompile as the step advances.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from functional_mm.optim._util import require

Schedule = Callable[[torch.Tensor | int], torch.Tensor]


def _float_step(count: torch.Tensor | int) -> torch.Tensor:
    return torch.as_tensor(count).to(torch.float32)


def constant_schedule(value: float) -> Schedule:
    """``value`` at every step."""
    return lambda count: torch.full_like(_float_step(count), value)


def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """Hold ``init_value`` until ``transition_begin``, move linearly to ``end_value`` over
    ``transition_steps``, then hold ``end_value``. With ``transition_steps == 0`` it is constant
    ``init_value`` (as in optax)."""
    require(transition_steps >= 0, "linear_schedule", "transition_steps", transition_steps, ">= 0")
    require(transition_begin >= 0, "linear_schedule", "transition_begin", transition_begin, ">= 0")
    if transition_steps == 0:
        return constant_schedule(init_value)

    def schedule(count):
        done = torch.clamp(_float_step(count) - transition_begin, 0, transition_steps) / transition_steps
        return (init_value - end_value) * (1 - done) + end_value

    return schedule


def cosine_decay_schedule(
    init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0
) -> Schedule:
    """``init_value * ((1 - alpha) * (0.5 * (1 + cos(pi * t / decay_steps))) ** exponent + alpha)`` with
    ``t = min(step, decay_steps)``: from ``init_value`` down to ``alpha * init_value``."""
    require(decay_steps > 0, "cosine_decay_schedule", "decay_steps", decay_steps, "> 0")

    def schedule(count):
        t = torch.clamp(_float_step(count), max=decay_steps)
        cosine = 0.5 * (1 + torch.cos(math.pi * t / decay_steps))
        return init_value * ((1 - alpha) * cosine**exponent + alpha)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``schedules[i]`` from ``boundaries[i - 1]`` on, each called with the steps since its boundary."""
    require(
        len(boundaries) == len(schedules) - 1,
        "join_schedules",
        "boundaries",
        boundaries,
        f"{len(schedules) - 1} long (one fewer than schedules)",
    )

    def schedule(count):
        step = torch.as_tensor(count)
        out = schedules[0](step)
        for boundary, fn in zip(boundaries, schedules[1:]):
            out = torch.where(step < boundary, out, fn(step - boundary))
        return out

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup ``init_value -> peak_value`` over ``warmup_steps``, then cosine decay to ``end_value``
    at step ``decay_steps`` (which counts the warmup, as in optax)."""
    require(warmup_steps >= 0, "warmup_cosine_decay_schedule", "warmup_steps", warmup_steps, ">= 0")
    require(
        decay_steps > warmup_steps,
        "warmup_cosine_decay_schedule",
        "decay_steps",
        decay_steps,
        f"> warmup_steps ({warmup_steps})",
    )
    alpha = 0.0 if peak_value == 0 else end_value / peak_value
    return join_schedules(
        [
            linear_schedule(init_value, peak_value, warmup_steps),
            cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent),
        ],
        [warmup_steps],
    )


def warmup_stable_decay_schedule(
    peak_value: float,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    init_value: float = 0.0,
    decay_type: str = "linear",
) -> Schedule:
    """WSD: linear warmup ``init_value -> peak_value``, ``peak_value`` for ``stable_steps``, then a
    ``"linear"`` or ``"cosine"`` decay to ``end_value`` over ``decay_steps``, and ``end_value`` after."""
    where = "warmup_stable_decay_schedule"
    require(warmup_steps >= 0, where, "warmup_steps", warmup_steps, ">= 0")
    require(stable_steps >= 0, where, "stable_steps", stable_steps, ">= 0")
    require(decay_steps > 0, where, "decay_steps", decay_steps, "> 0")
    require(decay_type in ("linear", "cosine"), where, "decay_type", decay_type, "'linear' or 'cosine'")
    if decay_type == "linear":
        decay = linear_schedule(peak_value, end_value, decay_steps)
    else:
        decay = cosine_decay_schedule(
            peak_value, decay_steps, 0.0 if peak_value == 0 else end_value / peak_value
        )
    return join_schedules(
        [linear_schedule(init_value, peak_value, warmup_steps), constant_schedule(peak_value), decay],
        [warmup_steps, warmup_steps + stable_steps],
    )
