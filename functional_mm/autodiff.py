"""Gradients and rematerialisation for pure functions over pytrees.

``value_and_grad`` is JAX's, built on ``torch.autograd.grad`` over the flattened leaves rather than on
``torch.func``: ``torch.func.grad`` breaks on DTensor's ``from_local``/``redistribute`` and torch_npu supports
only a subset of torch.func (DESIGN.md §3). ``torch.autograd.grad`` works with DTensors, with activation
checkpointing and under ``torch.compile``.

``remat`` is ``jax.checkpoint``: activation checkpointing as a pure wrapper, with a "full" policy (save only
the inputs, recompute everything) and a "selective" one (save matmul and attention outputs, recompute the
cheap elementwise ops in between).

Example::

    >>> import torch
    >>> from functional_mm import autodiff
    >>> params = {"w": torch.ones(3), "b": torch.tensor(2.0)}
    >>> loss, grads = autodiff.value_and_grad(lambda p, x: (p["w"] @ x + p["b"]) ** 2)(params, torch.ones(3))
    >>> loss.item(), grads["b"].item(), grads["w"].tolist()
    (25.0, 10.0, [10.0, 10.0, 10.0])
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from functional_mm import pytree

__all__ = ["value_and_grad", "grad", "remat", "save_matmuls_policy", "SAVE_MATMUL_OPS"]

PyTree = Any


def _is_diff_leaf(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _detach_tree(tree: PyTree) -> PyTree:
    return pytree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def value_and_grad(
    fn: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
    """Return ``f(*args, **kwargs) -> (value, grads)`` (``((value, aux), grads)`` with ``has_aux``).

    ``fn`` must return a 0-d floating-point tensor (or ``(scalar, aux)`` with ``has_aux=True``). ``grads`` has
    the structure of ``args[argnums]`` (a tuple of such trees when ``argnums`` is a sequence). Floating-point
    leaves that ``fn`` does not use get zero gradients (like JAX); integer, boolean and non-tensor leaves get
    ``None``. The caller's tensors are not modified: gradients are taken with respect to detached aliases, so
    inputs that already carry an autograd history are cut from it (a pure function, not a node in an outer
    graph). ``value`` and ``aux`` come back detached. As with ``torch.autograd.grad``, two gradients may be
    the same tensor (the inputs of an add) or a stride-0 view (the gradient of a sum): treat them as read-only
    values, as in JAX, or copy before writing in place (the train step's donation path does).

    Example::

        >>> import torch
        >>> from functional_mm import autodiff
        >>> def loss_fn(p, x):
        ...     y = x @ p["w"]  # [B, 2]
        ...     return (y ** 2).mean(), {"y_max": y.max()}
        >>> p = {"w": torch.ones(3, 2), "step": torch.tensor(0)}
        >>> (loss, aux), g = autodiff.value_and_grad(loss_fn, has_aux=True)(p, torch.ones(4, 3))
        >>> loss.item(), aux["y_max"].item(), g["w"].shape, g["step"]
        (9.0, 3.0, torch.Size([3, 2]), None)
    """
    multi = not isinstance(argnums, int)
    nums = tuple(argnums) if multi else (argnums,)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        for n in nums:
            if not -len(args) <= n < len(args):
                raise ValueError(
                    f"value_and_grad: argnums={argnums} but fn was called with {len(args)} arguments"
                )
        args = list(args)
        # One flat list over every differentiated argument, so a single autograd.grad call walks the graph once.
        treedefs, flat_all, diff_idx = [], [], []
        for n in nums:
            leaves, treedef = pytree.flatten(args[n])
            treedefs.append((n, treedef, len(leaves)))
            for leaf in leaves:
                if _is_diff_leaf(leaf):
                    # detach() is an alias (no copy); requires_grad on the alias leaves the caller's tensor alone.
                    leaf = leaf.detach().requires_grad_(True)
                    diff_idx.append(len(flat_all))
                flat_all.append(leaf)
        start = 0
        for n, treedef, count in treedefs:
            args[n] = pytree.unflatten(treedef, flat_all[start : start + count])
            start += count

        # enable_grad: a step may be called under no_grad / inference code paths and must still differentiate.
        with torch.enable_grad():
            out = fn(*args, **kwargs)
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        f"value_and_grad(has_aux=True): fn must return (value, aux), got {type(out).__name__}"
                    )
                value, aux = out
            else:
                value, aux = out, None
            _check_scalar(value, has_aux)
            inputs = [flat_all[i] for i in diff_idx]
            if value.requires_grad and inputs:
                # materialize_grads: unused float leaves get zeros (JAX semantics) instead of None.
                gs = torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True)
            else:  # value does not depend on any differentiated leaf
                gs = [torch.zeros_like(x) for x in inputs]

        flat_g: list[Any] = [None] * len(flat_all)
        for i, g in zip(diff_idx, gs):
            flat_g[i] = g
        grads, start = [], 0
        for _, treedef, count in treedefs:
            grads.append(pytree.unflatten(treedef, flat_g[start : start + count]))
            start += count
        grads = tuple(grads) if multi else grads[0]
        value = value.detach()
        return ((value, _detach_tree(aux)) if has_aux else value), grads

    return wrapped


def _check_scalar(value: Any, has_aux: bool) -> None:
    what = "the first output of fn" if has_aux else "fn"
    if not isinstance(value, torch.Tensor):
        hint = (
            " (returning (loss, aux)? pass has_aux=True)" if isinstance(value, tuple) and not has_aux else ""
        )
        raise TypeError(
            f"value_and_grad: {what} must return a scalar tensor, got {type(value).__name__}{hint}"
        )
    if value.dim() != 0:
        raise TypeError(
            f"value_and_grad: {what} must return a scalar (0-d) tensor, got shape {tuple(value.shape)}; "
            "reduce it first (e.g. .mean() or .sum())"
        )
    if not value.is_floating_point():
        raise TypeError(f"value_and_grad: {what} must return a floating-point scalar, got {value.dtype}")


def grad(
    fn: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """Like :func:`value_and_grad` but returns only ``grads`` (``(grads, aux)`` with ``has_aux``, as in JAX).

    Example::

        >>> import torch
        >>> from functional_mm import autodiff
        >>> autodiff.grad(lambda x: (x ** 2).sum())(torch.tensor([1.0, 2.0])).tolist()
        [2.0, 4.0]
    """
    vg = value_and_grad(fn, argnums=argnums, has_aux=has_aux)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out, g = vg(*args, **kwargs)
        return (g, out[1]) if has_aux else g

    return wrapped


# --------------------------------------------------------------------------------------------------------------
# remat


def _ops(names: Iterable[str]) -> frozenset:
    # Not every build has every attention kernel (e.g. cudnn / NPU-only ones); keep the ones this torch knows.
    return frozenset(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


# F.linear / torch.matmul / einsum are composite: at dispatch level they are mm/addmm/bmm/baddbmm, which is
# where selective checkpointing sees them. The math SDPA path decomposes into bmm + softmax, so its bmm outputs
# are saved and the softmax recomputed; the fused kernels are saved whole (their outputs include the logsumexp
# the backward needs).
SAVE_MATMUL_OPS = _ops(
    [
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    ]
)


def save_matmuls_policy(ctx: Any, op: Any, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: keep matmul/attention outputs (expensive to recompute, O(B·T·D) memory),
    recompute everything else (elementwise ops, norms, activations: cheap FLOPs, most of the memory)."""
    return CheckpointPolicy.MUST_SAVE if op in SAVE_MATMUL_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def remat(fn: Callable[..., Any], policy: str | Callable[..., Any] | Sequence[Any] | None = "full"):
    """Activation checkpointing (``jax.checkpoint``) as a pure wrapper around ``fn``.

    ``policy``:

    - ``"full"``: save only ``fn``'s inputs; recompute the whole forward of ``fn`` during backward.
    - ``"selective"`` (alias ``"save_matmuls"``): save the outputs of matmuls and attention kernels, recompute
      the cheap ops in between (:func:`save_matmuls_policy`).
    - a callable ``policy(ctx, op, *args, **kwargs) -> CheckpointPolicy`` or a list of aten ops to save, as
      ``torch.utils.checkpoint.create_selective_checkpoint_contexts`` takes them.
    - ``None`` / ``"none"``: ``fn`` itself, unchanged.

    Uses ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, which works with pytree (dict) arguments,
    ``torch.autograd.grad`` (so :func:`value_and_grad`) and ``torch.compile``. ``fn`` must be pure: the
    recomputation calls it again with the same inputs, so draw randomness from an explicit key argument.

    Example::

        >>> import torch
        >>> from functional_mm import autodiff
        >>> block = autodiff.remat(lambda p, x: torch.tanh(x @ p["w"]), policy="selective")
        >>> g = autodiff.grad(lambda p: block(p, torch.ones(2, 3)).sum())({"w": torch.zeros(3, 3)})
        >>> g["w"].tolist()[0]
        [2.0, 2.0, 2.0]
    """
    if policy is None or policy == "none":
        return fn
    if policy == "full":
        context_fn = None
    elif policy in ("selective", "save_matmuls"):
        context_fn = functools.partial(create_selective_checkpoint_contexts, save_matmuls_policy)
    elif callable(policy) or isinstance(policy, (list, tuple)):
        context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    else:
        raise ValueError(
            f"remat: unknown policy {policy!r}; use 'full', 'selective'/'save_matmuls', 'none', a callable or a "
            "list of ops"
        )
    extra = {} if context_fn is None else {"context_fn": context_fn}

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return checkpoint(fn, *args, use_reentrant=False, **extra, **kwargs)

    return wrapped
