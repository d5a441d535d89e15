"""The train step: ``state, metrics = step(state, batch)``, a pure function compiled with ``torch.compile``.

Example::

    >>> import torch
    >>> from functional_mm import optim, random
    >>> from functional_mm.train import TrainState, make_train_step
    >>> loss_fn = lambda p, batch, key: ((batch["x"] @ p["w"] - batch["y"]) ** 2).mean()
    >>> state = TrainState.create({"w": torch.zeros(3)}, optim.sgd(0.1), random.key(0))
    >>> step = make_train_step(loss_fn, optim.sgd(0.1), compile=False)
    >>> batch = {"x": torch.eye(3), "y": torch.ones(3)}
    >>> state, metrics = step(state, batch)
    >>> int(state.step), round(metrics["loss"].item(), 4), sorted(metrics)
    (1, 1.0, ['grad_norm', 'loss', 'nonfinite', 'update_norm'])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed._functional_collectives import AsyncCollectiveTensor

from functional_mm import optim, pytree, random
from functional_mm.autodiff import value_and_grad
from functional_mm.train.state import LossScale, MixedPrecision, TrainState, resolve_mixed_precision

__all__ = ["make_train_step"]

PyTree = Any
_BUILTIN_METRICS = ("loss", "grad_norm", "update_norm", "lr", "nonfinite")


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optim.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    compile: bool = True,
    mixed_precision: str | MixedPrecision | dict | None = None,
    donate: bool = False,
    lr_schedule: Callable[[torch.Tensor], Any] | None = None,
) -> Callable[[TrainState, PyTree], tuple[TrainState, dict[str, torch.Tensor]]]:
    """Build ``step(state, batch) -> (new_state, metrics)``.

    ``loss_fn(params, batch, key)`` returns a scalar loss or ``(loss, {name: 0-d tensor})``; the dict is
    averaged over microbatches and merged into the metrics.

    The step splits ``state.key`` into the next state's key and a per-step key (microbatch ``i`` gets
    ``fold_in(step_key, i)``), cuts every batch leaf into ``grad_accum_steps`` equal microbatches along dim 0,
    averages loss and gradients over them, applies ``optimizer`` and counts the step. Metrics (0-d tensors):
    ``loss``, ``grad_norm`` (global, before any clipping in ``optimizer``), ``update_norm``, ``lr`` (only with
    ``lr_schedule``, evaluated at ``state.step``), ``nonfinite`` (1.0 when the loss or the gradient norm is
    NaN/Inf; reported only, the update is applied anyway, except under fp16 loss scaling) and the aux metrics.

    ``mixed_precision``: ``None`` (as stored), ``"bf16"`` or ``"fp16"`` or a :class:`MixedPrecision`. Params
    and floating-point batch leaves are cast to the compute dtype inside the differentiated function, so
    gradients come back in the master dtype (fp32). With loss scaling (fp16) the loss is multiplied by
    ``state.loss_scale.scale`` and the gradients divided by it; a step with non-finite gradients keeps params
    and optimizer state (chosen with ``torch.where``, no host sync) and halves the scale.

    ``donate=True`` updates the optimizer state and params in place (JAX's donation contract): **the input
    ``state`` must not be used after the call** (its tensors are the new state's tensors, already overwritten).
    It cannot be combined with loss scaling, whose skipped steps need the old values.

    ``compile=True`` compiles the two halves of the step with ``torch.compile(dynamic=False)``: the
    microbatch gradient (forward + backward, one graph reused by every microbatch) and the update (mean,
    optimizer, metrics, one graph); the microbatch loop stays in Python. So a step is two graphs whatever
    ``grad_accum_steps`` is, compiled once per distinct batch shape (e.g. per bucket), which ``dynamic=False``
    makes explicit and which keeps DTensor tracing working (DESIGN.md §3). Why not one graph: dynamo's default
    graph-breaks at ``torch.autograd.grad`` (one small graph per frame on the stack: 14 graphs for a step with
    two microbatches), and
    with autograd.grad traced, inductor's remat pass accepts only one backward region per graph, so an
    unrolled accumulation loop over checkpointed blocks fails to compile. Each shape is a recompile of the
    same code, so more than ``torch._dynamo.config.recompile_limit`` (8) shapes fall back to eager: raise it
    for many buckets.

    Example::

        >>> import torch
        >>> from functional_mm import optim
        >>> from functional_mm.train import make_train_step
        >>> step = make_train_step(
        ...     lambda p, b, k: (p["w"] * b).sum() ** 2, optim.adamw(1e-3), grad_accum_steps=2, compile=False
        ... )
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    mp = resolve_mixed_precision(mixed_precision)
    scaling = mp is not None and mp.loss_scaling
    if donate and scaling:
        raise ValueError(
            "donate=True cannot be combined with loss scaling: a skipped step must return the old state"
        )

    def scaled_loss(params, batch, key, scale):
        if mp is not None:
            params, batch = _cast(params, mp.compute_dtype), _cast(batch, mp.compute_dtype)
        out = loss_fn(params, batch, key)
        loss, aux = out if isinstance(out, tuple) else (out, {})
        loss = loss.float()  # metrics and the loss scale live in fp32 whatever the compute dtype
        return (loss * scale if scale is not None else loss), (loss, aux)

    grad_fn = value_and_grad(scaled_loss, has_aux=True)
    n = grad_accum_steps

    def micro_grads(params, batch, key, index, scale):
        """Loss, aux and (scaled) grads of microbatch ``index`` (a 0-d tensor, so one graph serves all)."""
        step_key = random.split(key)[1]
        (_, (loss, aux)), grads = grad_fn(params, batch, random.fold_in(step_key, index), scale)
        return loss, _check_aux(aux), grads

    def apply_grads(state, loss, aux, grads):
        """Mean over microbatches, optimizer update, loss-scale bookkeeping, metrics."""
        if n > 1 or scaling:
            div = n * state.loss_scale.scale if scaling else n
            loss, aux, grads = (
                loss / n,
                pytree.tree_map(lambda a: a / n, aux),
                pytree.tree_map(lambda g: g / div, grads),
            )
        grad_norm = optim.global_norm(grads)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, donate=donate)
        update_norm = optim.global_norm(updates)
        params = optim.apply_updates(state.params, updates, donate=donate)
        loss_scale = state.loss_scale
        if scaling:  # skip a non-finite step: keep the old params / optimizer state, halve the scale
            params, opt_state = _where(finite, (params, opt_state), (state.params, state.opt_state))
            loss_scale = _next_loss_scale(state.loss_scale, finite, mp)

        metrics = {"loss": loss, "grad_norm": grad_norm, "update_norm": update_norm}
        if lr_schedule is not None:
            metrics["lr"] = torch.as_tensor(lr_schedule(state.step), dtype=torch.float32)
        metrics["nonfinite"] = (~finite).float()
        metrics.update(aux)
        next_key = random.split(state.key)[0]
        return TrainState(state.step + 1, params, opt_state, next_key, loss_scale), metrics

    if compile:
        micro_grads, apply_grads = _compile(micro_grads), _compile(apply_grads)

    def step(state: TrainState, batch: PyTree):
        if scaling and state.loss_scale is None:
            raise ValueError(
                "loss scaling needs a loss scale in the state: TrainState.create(..., mixed_precision=...)"
            )
        scale = state.loss_scale.scale if scaling else None
        for i, mb in enumerate(_split_batch(batch, n)):
            index = torch.tensor(i, device=state.key.device)
            loss_i, aux_i, grads_i = micro_grads(state.params, mb, state.key, index, scale)
            if i == 0:
                loss, aux, grads = loss_i, aux_i, grads_i
            else:
                loss, aux = loss + loss_i, {k: v + aux_i[k] for k, v in aux.items()}
                grads = _add(grads, grads_i, inplace=i > 1)
        if donate:
            grads = _unalias(grads)
        return apply_grads(state, loss, aux, grads)

    return step


def _compile(fn):
    compiled = torch.compile(fn, dynamic=False)
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):  # older torch (e.g. behind torch_npu)
        return compiled

    @functools.wraps(fn)
    def traced(*args):
        # Dynamo graph-breaks at torch.autograd.grad by default, which splits the step into many small graphs
        # (one per frame on the stack). Tracing it gives forward + backward in one graph; dynamo itself
        # still breaks the graph where tracing would be unsafe.
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(*args)

    return traced


def _add(acc: PyTree, new: PyTree, inplace: bool) -> PyTree:
    """``acc + new`` leaf-wise. In place only into buffers a previous out-of-place sum created: autograd may
    hand back expanded views (the grad of a sum), which cannot be written in place."""
    flat, treedef = pytree.flatten(acc, is_leaf=pytree.is_leaf_none)
    flat_new = pytree.flatten(new, is_leaf=pytree.is_leaf_none)[0]
    idx = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
    xs, ys = [flat[i] for i in idx], [flat_new[i] for i in idx]
    if inplace:
        torch._foreach_add_(xs, ys)
        return acc
    for i, x in zip(idx, torch._foreach_add(xs, ys) if xs else []):
        flat[i] = x
    return pytree.unflatten(treedef, flat)


def _unalias(grads: PyTree) -> PyTree:
    """Copy the gradients that share memory with an earlier one or overlap themselves: autograd returns the
    same tensor for both inputs of an add and a stride-0 view for the gradient of a sum (in eager and
    compiled code alike), and donation updates them in place. Eager Python over leaves: no graph, no copies
    in the common case."""
    flat, treedef = pytree.flatten(grads, is_leaf=pytree.is_leaf_none)
    seen = set()
    for i, g in enumerate(flat):
        if not isinstance(g, torch.Tensor):
            continue
        local = getattr(g, "_local_tensor", g)  # a DTensor's memory is its local shard
        if isinstance(local, AsyncCollectiveTensor):  # a reduce-scatter still in flight (use_param)
            local = local.wait()
        ptr = local.untyped_storage().data_ptr()
        if ptr in seen or torch._debug_has_internal_overlap(local) != 0:
            flat[i] = g = g.clone(memory_format=torch.contiguous_format)
            ptr = getattr(g, "_local_tensor", g).untyped_storage().data_ptr()
        seen.add(ptr)
    return pytree.unflatten(treedef, flat)


def _split_batch(batch: PyTree, n: int) -> list[PyTree]:
    if n == 1:
        return [batch]
    flat, treedef = pytree.flatten_with_paths(batch)
    cols = []
    for path, x in flat:
        if not isinstance(x, torch.Tensor):
            cols.append([x] * n)  # static leaves (e.g. flags) go to every microbatch
            continue
        if x.dim() == 0 or x.shape[0] % n:
            raise ValueError(
                f"grad_accum_steps={n} does not divide dim 0 of batch leaf {path!r} (shape {tuple(x.shape)})"
            )
        cols.append(x.chunk(n))
    return [pytree.unflatten(treedef, [c[i] for c in cols]) for i in range(n)]


def _cast(tree: PyTree, dtype: torch.dtype) -> PyTree:
    return pytree.tree_map(
        lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree
    )


def _where(cond: torch.Tensor, new: PyTree, old: PyTree) -> PyTree:
    return pytree.tree_map(
        lambda a, b: torch.where(cond, a, b) if isinstance(a, torch.Tensor) else a, new, old
    )


def _next_loss_scale(ls: LossScale, finite: torch.Tensor, mp: MixedPrecision) -> LossScale:
    good = torch.where(finite, ls.good_steps + 1, torch.zeros_like(ls.good_steps))
    grow = good >= mp.growth_interval
    scale = torch.where(finite, torch.where(grow, ls.scale * 2, ls.scale), ls.scale / 2)
    return LossScale(scale, torch.where(grow, torch.zeros_like(good), good))


def _check_aux(aux: Any) -> dict[str, torch.Tensor]:
    if not isinstance(aux, dict):
        raise TypeError(
            f"loss_fn must return loss or (loss, dict of metrics), got aux of type {type(aux).__name__}"
        )
    clash = sorted(set(aux) & set(_BUILTIN_METRICS))
    if clash:
        raise ValueError(f"loss_fn aux metrics {clash} clash with the step's own metrics {_BUILTIN_METRICS}")
    return aux
