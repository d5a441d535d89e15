"""``make_mesh`` and the current (mesh, rules) context that ``constrain`` reads."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from functional_mm import device as _device
from functional_mm.parallelism._rules import Rules, check_rules

__all__ = ["make_mesh", "use_mesh", "current"]


def _world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _resolve_sizes(axes: Mapping[str, int], world: int) -> tuple[int, ...]:
    if not axes:
        raise ValueError("make_mesh needs at least one axis, e.g. {'fsdp': -1}")
    for name, size in axes.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"mesh axis names must be non-empty strings, got {name!r}")
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} has size {size!r}; sizes are positive ints, or -1 to fill")
    fill = [name for name, size in axes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fill} in {dict(axes)}")
    known = math.prod(size for size in axes.values() if size != -1)
    if fill:
        if world % known:
            raise ValueError(
                f"mesh {dict(axes)}: the world size {world} is not divisible by the other axes' product {known}"
            )
        return tuple(world // known if size == -1 else size for size in axes.values())
    if known != world:
        raise ValueError(f"mesh {dict(axes)} has {known} devices but the world size is {world}")
    return tuple(axes.values())


def _init_process_group(device_type: str) -> None:
    if dist.is_initialized():
        return
    if device_type != "cpu" and "LOCAL_RANK" in os.environ:  # one accelerator per local process
        getattr(torch, device_type).set_device(int(os.environ["LOCAL_RANK"]))
    backend = _device.distributed_backend(device_type)
    if "MASTER_ADDR" in os.environ:  # launched by torchrun / run_local: rank and world come from env://
        dist.init_process_group(backend)
    else:  # a plain single process (notebook, script): an in-memory store needs no port
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def make_mesh(axes: Mapping[str, int], device_type: str | None = None) -> DeviceMesh:
    """A named ``DeviceMesh`` over all processes; one ``-1`` size takes what the others leave.

    Sizes are checked against the world size (``WORLD_SIZE`` from the launcher, or the initialised group)
    *before* any collective, so a wrong layout fails fast on every rank instead of hanging. The device type
    defaults to npu > cuda > cpu with backend hccl / nccl / gloo; the default process group is initialised
    from the torchrun environment if needed (a bare single process gets a 1-rank group). With several
    processes it turns off torch's AOTAutograd cache for this process (see ``_disable_aot_autograd_cache``:
    on torch 2.13 its entries are not safe to share between the ranks of a mesh).

    Example::

        >>> # under torchrun --nproc-per-node 8
        >>> mesh = make_mesh({"fsdp": -1, "tp": 2})  # doctest: +SKIP
        >>> mesh.mesh_dim_names, mesh.shape  # doctest: +SKIP
        (('fsdp', 'tp'), (4, 2))
    """
    world = _world_size()
    sizes = _resolve_sizes(axes, world)
    device_type = device_type or _device.default_device_type()
    _device.distributed_backend(device_type)  # unknown device types fail here, before any process group
    _init_process_group(device_type)
    if world > 1:
        _disable_aot_autograd_cache()
    return init_device_mesh(device_type, sizes, mesh_dim_names=tuple(axes))


def _disable_aot_autograd_cache() -> None:
    # torch 2.13: AOTAutograd's on-disk cache keys a DTensor by its mesh's *type* only, while the compiled
    # code names the process groups of its collectives literally ('1', '3', ...). Group names differ between
    # ranks (rank 0's tp group is rank 2's unknown one), so a rank that loads another rank's entry (from an
    # earlier run sharing /tmp/torchinductor_*) fails with "Could not resolve the process group registered
    # under the name 3", or talks to the wrong group. Inductor's own FX-graph cache keys on the generated
    # code, group names included, so compiled kernels are still reused.
    import torch._functorch.config

    torch._functorch.config.enable_autograd_cache = False


# A plain global rather than a ContextVar: model code reads it inside torch.compile, and dynamo guards on
# globals but does not trace ContextVar.get.
_STACK: list[tuple[DeviceMesh, Rules] | None] = []  # None: a local_rows region


@contextlib.contextmanager
def use_mesh(mesh: DeviceMesh, rules: Rules) -> Iterator[DeviceMesh]:
    """Make ``(mesh, rules)`` current so model code can call ``constrain(x, names)`` without plumbing.

    Example::

        >>> with use_mesh(mesh, rules):  # doctest: +SKIP
        ...     logits = model.apply(params, cfg, tokens)  # its constrain() calls use mesh and rules
    """
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"use_mesh needs a DeviceMesh (from make_mesh), got {type(mesh).__name__}")
    check_rules(rules, mesh)
    _STACK.append((mesh, tuple(tuple(r) for r in rules)))
    try:
        yield mesh
    finally:
        _STACK.pop()


def current() -> tuple[DeviceMesh, Rules] | None:
    """The innermost ``(mesh, rules)`` set by :func:`use_mesh`, or None outside any (single-process code) and
    inside a ``local_rows`` function (each rank's own rows, plain tensors)."""
    return _STACK[-1] if _STACK else None


@contextlib.contextmanager
def local_region() -> Iterator[None]:
    """Inside: no current mesh (model code runs its single-process path on a rank's local tensors) and
    ``use_params`` hands out plain local weights. Used by ``local_rows``."""
    _STACK.append(None)  # type: ignore[arg-type]
    try:
        yield
    finally:
        _STACK.pop()


def in_local_region() -> bool:
    return bool(_STACK) and _STACK[-1] is None
