"""Placing parameter pytrees and activations on a mesh: shard, constrain, gather, abstract and sharded init."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, distribute_tensor

from functional_mm import pytree
from functional_mm.parallelism._mesh import current
from functional_mm.parallelism._rules import (
    Rules,
    check_rules,
    logical_to_placements,
    logical_to_spec,
    mesh_sizes,
    spec_to_placements,
)

__all__ = ["shard", "constrain", "gather", "unshard", "abstract_init", "sharded_init"]

PyTree = Any


def is_axes(x: Any) -> bool:
    """A leaf of an axes tree: a tuple of logical names (str or None)."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def axes_by_path(params: PyTree, axes: PyTree) -> dict[str, tuple[str | None, ...]]:
    """``{path: logical axes}`` for every tensor leaf of ``params``; any mismatch between the trees is an error."""
    flat_axes = dict(pytree.flatten_with_paths(axes, is_leaf=is_axes)[0])
    tensor_paths = {p for p, x in pytree.flatten_with_paths(params)[0] if isinstance(x, torch.Tensor)}
    missing = sorted(tensor_paths - flat_axes.keys())
    extra = sorted(flat_axes.keys() - tensor_paths)
    if missing or extra:
        raise ValueError(
            f"params and axes trees differ: no axes for {missing}; axes without a tensor: {extra}"
        )
    return flat_axes


def _placements(path: str, shape: Sequence[int], axes, rules: Rules, mesh, allow_uneven: bool):
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise ValueError(f"{path!r}: shape {tuple(shape)} has {len(shape)} dims but logical axes {axes}")
    spec = logical_to_spec(axes, rules, mesh, path=path)
    if not allow_uneven:
        sizes = mesh_sizes(mesh)
        for d, entry in enumerate(spec):
            mesh_axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            n = math.prod(sizes[a] for a in mesh_axes)
            if shape[d] % n:
                over = " x ".join(f"{a!r} ({sizes[a]})" for a in mesh_axes)
                raise ValueError(
                    f"{path!r}: dim {d} ({axes[d]!r}) has size {shape[d]}, not divisible by mesh axis {over}; "
                    "change the rules or the model size, or pass allow_uneven=True (torch.chunk split: the "
                    "last ranks get smaller or empty shards). For a fused heads*head_dim dim, the head count "
                    "must be divisible by the axis size as well"
                )
    return spec_to_placements(spec, mesh)


def shard(
    params: PyTree, axes: PyTree, mesh: DeviceMesh, rules: Rules, *, allow_uneven: bool = False
) -> PyTree:
    """Place every tensor of ``params`` on ``mesh`` as a DTensor, with placements from ``axes`` and ``rules``.

    Plain tensors are the full value and are scattered from rank 0 (``distribute_tensor``), so ranks need not
    agree on the values; DTensors are redistributed to the new layout (resharding). A dim that the mesh axes
    do not divide is an error naming the parameter, unless ``allow_uneven=True`` accepts DTensor's
    ``torch.chunk`` split. Parameters come back as plain data (``requires_grad=False``): gradients are taken
    by ``autodiff.value_and_grad``.

    Example::

        >>> params, axes = nn.unbox(nn.linear.init(key, 8, 16, axes=("embed", "mlp")))  # doctest: +SKIP
        >>> mesh = make_mesh({"fsdp": 2, "tp": 2})  # doctest: +SKIP
        >>> sharded = shard(params, axes, mesh, [("embed", "fsdp"), ("mlp", "tp")])  # doctest: +SKIP
        >>> sharded["weight"].placements, sharded["weight"].to_local().shape  # doctest: +SKIP
        ((Shard(dim=1), Shard(dim=0)), torch.Size([8, 4]))
    """
    check_rules(rules, mesh)
    by_path = axes_by_path(params, axes)

    def place(path: str, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        placements = _placements(path, x.shape, by_path[path], rules, mesh, allow_uneven)
        if isinstance(x, DTensor):
            if x.device_mesh != mesh:
                raise ValueError(f"{path!r} lives on another mesh ({x.device_mesh}); gather it first")
            return x if tuple(x.placements) == placements else x.redistribute(mesh, placements)
        return distribute_tensor(x.detach(), mesh, placements)

    return pytree.map_with_path(place, params)


def constrain(
    x: torch.Tensor,
    logical_names: Sequence[str | None],
    mesh: DeviceMesh | None = None,
    rules: Rules | None = None,
) -> torch.Tensor:
    """Pin an activation's layout (``with_sharding_constraint``): redistribute ``x`` to what ``rules`` give.

    ``mesh``/``rules`` default to those of :func:`use_mesh`; with no mesh at all ``x`` comes back unchanged, so
    model code runs as is in one process. A DTensor is redistributed (a no-op when already in place); a plain
    tensor is taken as the *full* value, identical on every rank, and sliced to its shards without
    communication. Both paths are differentiable: the backward redistributes gradients the other way (a plain
    input gets its full gradient back), and the gradient is itself constrained to the same layout first (JAX's
    rule). Uneven dims are allowed here: activation shapes vary per batch.

    Example::

        >>> with use_mesh(mesh, [("act_batch", "fsdp"), ("act_seq", None), ("act_embed", "tp")]):  # doctest: +SKIP
        ...     h = constrain(h, ("act_batch", "act_seq", "act_embed"))  # [B, T, D] -> Shard(0), Shard(2)
    """
    ctx = current()
    if mesh is None:
        if ctx is None:
            return x
        mesh = ctx[0]
    if rules is None:
        if ctx is None:
            raise ValueError("constrain: pass rules, or call it inside use_mesh(mesh, rules)")
        rules = ctx[1]
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"constrain needs a DeviceMesh, got {type(mesh).__name__}")
    if len(logical_names) != x.dim():
        raise ValueError(
            f"constrain: {x.dim()}-d tensor {tuple(x.shape)} but logical names {tuple(logical_names)}"
        )
    placements = logical_to_placements(logical_names, rules, mesh, path="activation")
    if isinstance(x, DTensor):
        if x.device_mesh != mesh:
            raise ValueError(f"constrain: the tensor lives on another mesh ({x.device_mesh}) than {mesh}")
        if tuple(x.placements) != placements:
            x = x.redistribute(mesh, placements)
        # The gradient is constrained too (as in JAX): this redistribute moves nothing forward, and backward it
        # brings the incoming gradient (e.g. Partial from a column-parallel matmul) to `placements` before the
        # one above sends it on. Without it a Partial gradient would meet an input that was itself Partial of
        # another kind (a vocab-parallel embedding's masked sum) and DTensor cannot convert between the two.
        return x.redistribute(mesh, placements)
    # Replicate -> Shard is a local slice, so a full plain tensor reaches its layout without a collective.
    replicated = DTensor.from_local(x, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, placements)


def gather(tree: PyTree) -> PyTree:
    """Full plain tensors on every rank (an all-gather per DTensor leaf); other leaves pass through. For export
    and tests: it materialises the whole tree on each rank.

    Example::

        >>> full = gather(shard(params, axes, mesh, rules))  # doctest: +SKIP
        >>> all(torch.equal(a, b) for a, b in zip(pytree.leaves(full), pytree.leaves(params)))  # doctest: +SKIP
        True
    """
    return pytree.tree_map(_whole_and_waited, tree)


def _whole_and_waited(x: Any) -> Any:
    # Bucketed gradients are views of an in-flight async collective: wait, so the result owns real storage
    # (it may be pickled, saved or handed to another thread).
    x = x.full_tensor() if isinstance(x, DTensor) else x
    return x.wait() if isinstance(x, funcol.AsyncCollectiveTensor) else x


unshard = gather


def abstract_init(
    init_boxed_fn: Callable[..., Any],
    *args: Any,
    mesh: DeviceMesh,
    rules: Rules,
    allow_uneven: bool = False,
    **kwargs: Any,
) -> tuple[PyTree, PyTree]:
    """``(abstract_params, axes)``: the boxed init run on the meta device, placed on ``mesh``, allocating nothing.

    The leaves are meta DTensors: global ``shape``, ``dtype``, ``placements`` and ``to_local().shape`` are all
    there, so :func:`describe` gives the per-rank memory of a model before it exists. (To plan for a mesh
    without launching processes, pass ``nn.abstract``'s shapes to ``describe`` with a ``{axis: size}`` dict.)

    Example::

        >>> shapes, axes = abstract_init(nn.linear.init, key, 4096, 11008, axes=("embed", "mlp"),
        ...                              mesh=mesh, rules=rules)  # doctest: +SKIP
        >>> print(describe(shapes, axes))  # doctest: +SKIP
    """
    from functional_mm import nn  # imported late: layers may come to import parallelism (constrain)

    shapes, axes = nn.abstract(init_boxed_fn, *args, **kwargs)
    check_rules(rules, mesh)
    by_path = axes_by_path(shapes, axes)

    def place(path: str, x: torch.Tensor) -> DTensor:
        placements = _placements(path, x.shape, by_path[path], rules, mesh, allow_uneven)
        return distribute_tensor(x, mesh, placements, src_data_rank=None)

    return pytree.map_with_path(place, shapes), axes


def _trace_init(init_boxed_fn: Callable[..., Any], args: tuple, kwargs: dict):
    """Trace the boxed init into one FX graph with fake tensors (no memory); returns the graph, its tensor
    inputs and the treedef / axes of the unboxed params."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from functional_mm import nn

    flat_in, in_def = pytree.flatten((args, kwargs))
    where = [i for i, v in enumerate(flat_in) if isinstance(v, torch.Tensor)]
    found: dict[str, Any] = {}

    def flat_init(*tensors: torch.Tensor) -> list[torch.Tensor]:
        values = list(flat_in)
        for i, t in zip(where, tensors):
            values[i] = t
        a, kw = pytree.unflatten(in_def, values)
        params, axes = nn.unbox(init_boxed_fn(*a, **kw))
        leaves, found["treedef"] = pytree.flatten(params)
        found["axes"], found["paths"] = axes, pytree.paths(params)
        return leaves

    inputs = [flat_in[i] for i in where]
    try:
        gm = make_fx(flat_init, tracing_mode="fake")(*inputs)
    except Exception as e:
        raise RuntimeError(
            "sharded_init could not trace the init function with fake tensors; it must be a pure function of "
            "its tensor arguments without data-dependent Python control flow (.item(), if on values)"
        ) from e
    return gm, inputs, found


def _run_one(
    gm: torch.fx.GraphModule, out: torch.fx.Node, inputs: dict[torch.fx.Node, torch.Tensor], index: dict
) -> torch.Tensor:
    """Evaluate only the nodes that ``out`` depends on, freeing each value after its last use, so one leaf's
    intermediates are alive at a time. ``index`` is each node's position in the graph (a topological order)."""
    needed, todo = set(), [out]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(n.all_input_nodes)
    order = sorted(needed, key=index.__getitem__)
    last_use = {a: i for i, n in enumerate(order) for a in n.all_input_nodes}
    env: dict[torch.fx.Node, Any] = {}
    for i, n in enumerate(order):
        if n.op == "placeholder":
            env[n] = inputs[n]
        elif n.op == "get_attr":
            env[n] = getattr(gm, n.target)
        elif n.op == "call_function":
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
            env[n] = n.target(*args, **kwargs)
        else:
            raise RuntimeError(f"sharded_init: unexpected node {n.op} in the traced init")
        for a in n.all_input_nodes:
            if last_use[a] == i and a is not out:
                del env[a]
    return env[out]


def sharded_init(
    init_boxed_fn: Callable[..., Any],
    *args: Any,
    mesh: DeviceMesh,
    rules: Rules,
    allow_uneven: bool = False,
    **kwargs: Any,
) -> tuple[PyTree, PyTree]:
    """``(params, axes)`` equal to ``shard(*nn.unbox(init_boxed_fn(*args, **kwargs)), mesh, rules)``, holding at
    most one full parameter (plus its intermediates) at a time.

    The init is traced once with fake tensors into an FX graph; then each leaf's sub-graph alone is evaluated,
    sliced to this rank's shard (a copy, so the full tensor is freed) and dropped. Counter-based keys make the
    values identical on every rank, so slicing needs no communication. Limitations: every rank computes every
    full parameter (compute, not memory, scales with model size; the counter-based sampler could produce only
    the local slice, which is not done yet); the sub-graphs run where they were traced, on the CPU, and the
    shard is then copied to the mesh device; the init must be traceable (no ``.item()`` or branching on values).

    Example::

        >>> params, axes = sharded_init(llama.init, key, cfg, mesh=mesh, rules=cfg.rules)  # doctest: +SKIP
    """
    check_rules(rules, mesh)
    gm, inputs, found = _trace_init(init_boxed_fn, args, kwargs)
    outputs = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    placeholders = dict(zip(gm.graph.find_nodes(op="placeholder"), inputs))
    by_path = dict(pytree.flatten_with_paths(found["axes"], is_leaf=is_axes)[0])
    placed = []
    for path, out in zip(found["paths"], outputs):
        meta = out.meta["val"]
        placements = _placements(path, meta.shape, by_path[path], rules, mesh, allow_uneven)
        full = _run_one(gm, out, placeholders, index)
        placed.append(_local_copy(full, mesh, placements))
        del full
    return pytree.unflatten(found["treedef"], placed), found["axes"]


def _local_copy(full: torch.Tensor, mesh: DeviceMesh, placements: tuple[Placement, ...]) -> DTensor:
    dt = distribute_tensor(full, mesh, placements, src_data_rank=None)  # every rank has the same full value
    local = dt.to_local()
    shares = local.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
    if shares and local.numel() < full.numel():  # a view of a shard would keep the whole `full` alive
        dt = DTensor.from_local(
            local.clone(), mesh, placements, run_check=False, shape=dt.shape, stride=dt.stride()
        )
    return dt
