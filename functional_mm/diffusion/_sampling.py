"""Flow-match Euler sampling, equal step for step to diffusers' ``FlowMatchEulerDiscreteScheduler``.

:func:`flow_match_schedule` reproduces ``set_timesteps`` (same numpy/torch ops and dtypes, so the sigmas are
bit-identical): ``num_steps`` sigmas from ``sigma_max`` down to ``sigma_min`` of the training schedule, shifted
statically (SD3) or by ``mu`` (Flux: ``sigmas=linspace(1, 1/n, n)`` and ``mu=resolution_mu(tokens)``), then a
final 0. :func:`euler_step` is ``x + (sigma_next - sigma) * v`` in float32; :func:`sample` runs the loop with
classifier-free guidance by batching the unconditional and conditional halves (``[uncond, cond]``, the SD3
pipeline's order).

A quirk kept for exactness: with a static shift diffusers shifts the *training* sigmas at construction and
then shifts the inference sigmas again in ``set_timesteps``, so the smallest non-zero sigma is shifted twice
(for SD3's shift 3: 0.0089 instead of 0.0030). Pipelines sample that way, so we do too.

Example::

    >>> import torch
    >>> from functional_mm import random
    >>> from functional_mm.diffusion import flow_match_schedule, sample
    >>> sched = flow_match_schedule(4, shift=3.0)
    >>> [round(float(s), 4) for s in sched.sigmas]
    [1.0, 0.8577, 0.6022, 0.0089, 0.0]
    >>> x1 = random.normal(random.key(0), (2, 4, 8, 8))
    >>> x0 = sample(lambda x, t, c: -x, x1, sched)        # a toy velocity field
    >>> x0.shape
    torch.Size([2, 4, 8, 8])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from functional_mm import pytree

__all__ = ["FlowMatchSchedule", "flow_match_schedule", "euler_step", "guided", "sample"]


class FlowMatchSchedule(NamedTuple):
    """``timesteps [n]`` (0..N scale, what the model is given) and ``sigmas [n + 1]`` (ending in 0), float32."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor


def _time_shift(kind: str, mu: float, t: np.ndarray) -> np.ndarray:
    # diffusers' _time_shift_exponential / _time_shift_linear with sigma (the power) = 1.0, op for op.
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    if kind == "linear":
        return mu / (mu + (1 / t - 1) ** 1.0)
    raise ValueError(f"flow_match_schedule: time_shift_type must be 'exponential' or 'linear', got {kind!r}")


def flow_match_schedule(
    num_steps: int | None = None,
    *,
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
    use_dynamic_shifting: bool = False,
    mu: float | None = None,
    sigmas: Any = None,
    time_shift_type: str = "exponential",
    device=None,
) -> FlowMatchSchedule:
    """The inference schedule of ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift,
    use_dynamic_shifting, time_shift_type).set_timesteps(num_steps, sigmas=sigmas, mu=mu)``.

    Example::

        >>> s = flow_match_schedule(3, use_dynamic_shifting=True, mu=1.15, sigmas=np.linspace(1.0, 1 / 3, 3))
        >>> s.timesteps.shape, s.sigmas.shape
        (torch.Size([3]), torch.Size([4]))
    """
    n_train = num_train_timesteps
    if use_dynamic_shifting and mu is None:
        raise ValueError("flow_match_schedule: use_dynamic_shifting needs mu (see diffusion.resolution_mu)")
    if not use_dynamic_shifting and mu is not None:
        raise ValueError("flow_match_schedule: mu is only used with use_dynamic_shifting=True")
    if sigmas is None:
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"flow_match_schedule: num_steps must be an int >= 1, got {num_steps!r}")
        # The training schedule the scheduler is constructed with (float32 torch, shifted unless dynamic).
        train = torch.from_numpy(np.linspace(1, n_train, n_train, dtype=np.float32)[::-1].copy()) / n_train
        if not use_dynamic_shifting:
            train = shift * train / (1 + (shift - 1) * train)
        sigma_max, sigma_min = train[0].item(), train[-1].item()
        s = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps) / n_train
    else:
        s = np.array(sigmas).astype(np.float32)
        if num_steps is not None and len(s) != num_steps:
            raise ValueError(f"flow_match_schedule: {len(s)} sigmas given for num_steps={num_steps}")
    s = _time_shift(time_shift_type, mu, s) if use_dynamic_shifting else shift * s / (1 + (shift - 1) * s)
    s = torch.from_numpy(np.asarray(s)).to(dtype=torch.float32, device=device)
    timesteps = s * n_train
    return FlowMatchSchedule(timesteps, torch.cat([s, torch.zeros(1, device=s.device)]))


def euler_step(
    x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One Euler step of ``dx/dsigma = v`` from ``sigma`` to ``sigma_next``, computed in float32 and returned in
    the velocity's dtype (diffusers' ``step``)."""
    return (x.to(torch.float32) + (sigma_next - sigma) * velocity).to(velocity.dtype)


def guided(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``v_uncond + scale * (v_cond - v_uncond)``."""
    return v_uncond + scale * (v_cond - v_uncond)


def sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    noise: torch.Tensor,
    schedule: FlowMatchSchedule,
    *,
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: float = 1.0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` (``sigma = 1``) to a sample (``sigma = 0``) with Euler steps.

    ``velocity_fn(x, t, cond)`` gets ``t: [B]`` on the 0..N scale (the schedule's timesteps). With
    ``uncond`` given and ``guidance_scale > 1``, each step evaluates ``[uncond, cond]`` in one batch of
    ``2B`` (``cond`` / ``uncond`` are trees of tensors with batch dim 0, concatenated leafwise) and combines
    them with :func:`guided`. ``callback(i, x)`` sees the state after each step. Runs under ``no_grad``.
    """
    x = noise
    b = x.shape[0]
    do_cfg = uncond is not None and guidance_scale > 1.0
    both = pytree.tree_map(lambda u, c: torch.cat([u, c]), uncond, cond) if do_cfg else None
    with torch.no_grad():
        for i, t in enumerate(schedule.timesteps):
            if do_cfg:
                v = velocity_fn(torch.cat([x, x]), t.expand(2 * b), both)
                v_uncond, v_cond = v.chunk(2)
                v = guided(v_uncond, v_cond, guidance_scale)
            else:
                v = velocity_fn(x, t.expand(b), cond)
            x = euler_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])
            if callback is not None:
                callback(i, x)
    return x
