"""Elementary gradient transformations (optax semantics) over pytrees of tensors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functional_mm import pytree
from functional_mm.optim import _util
from functional_mm.optim._base import EmptyState, GradientTransformation

PyTree = Any
ScalarOrSchedule = float | Callable[[torch.Tensor], torch.Tensor]


class ScaleByAdamState(NamedTuple):
    count: torch.Tensor  # 0-d int64: number of updates applied so far
    mu: PyTree
    nu: PyTree


class TraceState(NamedTuple):
    trace: PyTree


class ScaleByScheduleState(NamedTuple):
    count: torch.Tensor


def _stateless(where: str, fn: Callable) -> GradientTransformation:
    """A stateless transformation; ``fn(leaves, donate)`` maps the list of non-``None`` update leaves."""

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, *, donate=False):
        flat_u, treedef, _, idx = _util.align(where, updates)
        if not idx:
            return updates, state
        return pytree.unflatten(treedef, _util.put(flat_u, idx, fn(_util.pick(flat_u, idx), donate))), state

    return GradientTransformation(init, update)


def identity() -> GradientTransformation:
    """Pass updates through unchanged (a placeholder in :func:`multi_transform` or :func:`chain`)."""
    return GradientTransformation(
        lambda params: EmptyState(), lambda u, s, params=None, *, donate=False: (u, s)
    )


def scale(factor: float) -> GradientTransformation:
    """Multiply updates by a constant ``factor``."""
    return _stateless("scale", lambda g, donate: _util.mul(g, factor, donate))


def scale_by_learning_rate(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """Multiply updates by ``-learning_rate``, turning a descent direction into a parameter step.

    ``learning_rate`` is a number or a schedule: a callable of the 0-d int64 step count (0 on the first
    update) returning a 0-d float tensor.
    """
    if not callable(learning_rate):
        if not isinstance(learning_rate, torch.Tensor):
            _util.require(
                learning_rate >= 0, "scale_by_learning_rate", "learning_rate", learning_rate, ">= 0"
            )
        return scale(-learning_rate)

    def init(params):
        return ScaleByScheduleState(count=_util.zero_count(params))

    def update(updates, state, params=None, *, donate=False):
        flat_u, treedef, _, idx = _util.align("scale_by_learning_rate", updates)
        step_size = -learning_rate(state.count)  # evaluated before the increment: step 0 uses schedule(0)
        count = _util.increment(state.count, donate)
        if idx:
            updates = pytree.unflatten(
                treedef, _util.put(flat_u, idx, _util.mul(_util.pick(flat_u, idx), step_size, donate))
            )
        return updates, ScaleByScheduleState(count)

    return GradientTransformation(init, update)


def _one_minus_pow(decay: float, count: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # 1 - decay**t computed as -expm1(t*log(decay)): float32 pow loses ~1e-4 relative accuracy when decay is
    # close to 1 (1 - 0.999 is tiny), expm1 keeps it at ~1e-7 without needing float64 on the device.
    # float64 states still get float64, so a float64 run reproduces torch.optim to rounding.
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if decay == 0:
        return torch.ones((), dtype=dtype, device=count.device)
    return -torch.expm1(count.to(dtype) * math.log(decay))


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0
) -> GradientTransformation:
    """Adam's preconditioning: ``m_hat / (sqrt(v_hat + eps_root) + eps)`` with bias-corrected moments.

    The moments ``mu`` and ``nu`` have the parameters' dtypes (like ``torch.optim.Adam``).
    """
    for name, value in (("b1", b1), ("b2", b2)):
        _util.require(0 <= value < 1, "scale_by_adam", name, value, "in [0, 1)")
    for name, value in (("eps", eps), ("eps_root", eps_root)):
        _util.require(value >= 0, "scale_by_adam", name, value, ">= 0")

    def init(params):
        zeros = _util.zeros_like
        return ScaleByAdamState(count=_util.zero_count(params), mu=zeros(params), nu=zeros(params))

    def update(updates, state, params=None, *, donate=False):
        flat_u, treedef, (flat_mu, flat_nu), idx = _util.align("scale_by_adam", updates, state.mu, state.nu)
        count = _util.increment(state.count, donate)
        if not idx:
            return updates, ScaleByAdamState(count, state.mu, state.nu)
        g = _util.pick(flat_u, idx)
        mu = _util.lerp(_util.pick(flat_mu, idx), g, 1 - b1, donate)
        nu = _util.mul(_util.pick(flat_nu, idx), b2, donate)
        torch._foreach_addcmul_(nu, g, g, 1 - b2)
        if eps_root == 0:
            # Same op order as torch.optim.Adam: sqrt(v) / sqrt(1 - b2^t) + eps.
            denom = torch._foreach_sqrt(nu)
            torch._foreach_div_(denom, torch.sqrt(_one_minus_pow(b2, count, nu[0].dtype)))
        else:
            denom = torch._foreach_div(nu, _one_minus_pow(b2, count, nu[0].dtype))
            torch._foreach_add_(denom, eps_root)
            torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        new = torch._foreach_div(mu, denom)
        torch._foreach_div_(new, _one_minus_pow(b1, count, nu[0].dtype))
        return pytree.unflatten(treedef, _util.put(flat_u, idx, new)), ScaleByAdamState(
            count,
            pytree.unflatten(treedef, _util.put(flat_mu, idx, mu)),
            pytree.unflatten(treedef, _util.put(flat_nu, idx, nu)),
        )

    return GradientTransformation(init, update)


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Momentum: ``t = g + decay * t``; the update is ``t`` (or ``g + decay * t`` with ``nesterov``).

    Matches ``torch.optim.SGD(momentum=decay, dampening=0, nesterov=nesterov)``.
    """
    _util.require(0 <= decay < 1, "trace", "decay", decay, "in [0, 1)")

    def init(params):
        return TraceState(trace=_util.zeros_like(params))

    def update(updates, state, params=None, *, donate=False):
        flat_u, treedef, (flat_t,), idx = _util.align("trace", updates, state.trace)
        if not idx:
            return updates, state
        g = _util.pick(flat_u, idx)
        t = _util.mul(_util.pick(flat_t, idx), decay, donate)
        torch._foreach_add_(t, g)
        if nesterov:
            new = _util.add(g, t, decay, donate)
        elif donate:
            # Returned updates must not alias the state: a later donated transform scales them in place.
            torch._foreach_copy_(g, t)
            new = g
        else:
            new = t  # the pure path never writes to its outputs, so sharing is safe
        return pytree.unflatten(treedef, _util.put(flat_u, idx, new)), TraceState(
            pytree.unflatten(treedef, _util.put(flat_t, idx, t))
        )

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float, mask: Any = None) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates (decoupled weight decay when placed before the lr).

    ``mask`` selects the parameters to decay, as in :func:`masked`: a bool pytree, a callable
    ``params -> bool pytree``, or a regex / list of regexes over parameter paths (``re.search``).
    """
    _util.require(weight_decay >= 0, "add_decayed_weights", "weight_decay", weight_decay, ">= 0")
    if mask is not None:
        from functional_mm.optim._combine import masked

        return masked(add_decayed_weights(weight_decay), mask)

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, *, donate=False):
        if params is None:
            raise ValueError("add_decayed_weights: update() needs params")
        flat_u, treedef, (flat_p,), idx = _util.align("add_decayed_weights", updates, params, what="params")
        if not idx or weight_decay == 0:
            return updates, state
        new = _util.add(_util.pick(flat_u, idx), _util.pick(flat_p, idx), weight_decay, donate)
        return pytree.unflatten(treedef, _util.put(flat_u, idx, new)), state

    return GradientTransformation(init, update)


def global_norm(tree: PyTree) -> torch.Tensor:
    """The L2 norm of all tensor leaves together, as a 0-d float32 tensor (``None`` leaves are skipped)."""
    xs = [x for x in _util.flatten(tree)[0] if isinstance(x, torch.Tensor)]
    if not xs:
        return torch.zeros(())
    # float32 accumulation: a bf16 per-leaf norm would round before the squares are summed.
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(xs, 2, dtype=torch.float32)))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale updates by ``max_norm / global_norm`` when the global norm exceeds ``max_norm``."""
    _util.require(max_norm > 0, "clip_by_global_norm", "max_norm", max_norm, "> 0")

    def clip(g, donate):
        # max_norm / max(norm, max_norm) is branch-free (no .item()) and is exactly 1 below the threshold.
        return _util.mul(g, max_norm / torch.clamp(global_norm(g), min=max_norm), donate)

    return _stateless("clip_by_global_norm", clip)


def freeze() -> GradientTransformation:
    """Replace every update by ``None``: :func:`apply_updates` then leaves those parameters untouched.

    Use it as a :func:`multi_transform` group; it has no state, so frozen parameters cost no optimizer
    memory.
    """

    def update(updates, state, params=None, *, donate=False):
        return pytree.tree_map(lambda _: None, updates, is_leaf=pytree.is_leaf_none), state

    return GradientTransformation(lambda params: EmptyState(), update)


def set_to_zero() -> GradientTransformation:
    """Replace every update by zeros (optax's ``set_to_zero``); prefer :func:`freeze`, which skips the add."""

    def zero(g, donate):
        if donate:
            torch._foreach_zero_(g)
            return g
        return [torch.zeros_like(x) for x in g]

    return _stateless("set_to_zero", zero)
