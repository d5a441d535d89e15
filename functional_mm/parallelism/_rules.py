"""Logical axis rules: map the logical names of a tensor's dims onto named mesh axes (flax semantics).

Rules are an ordered sequence of ``(logical_name, target)`` pairs; ``target`` is a mesh axis name, a tuple of
mesh axis names (one tensor dim split over several mesh axes, major to minor) or ``None`` (replicate). For
one tensor, the rules are walked *in order* and a rule claims the first still-unassigned dim with its logical
name if none of its mesh axes is already used by this tensor. As in flax, priority follows the rule order,
not the dim order, so a weight stored ``[out, in]`` resolves like the same weight stored ``[in, out]``.

Decisions beyond flax:

- A logical name that no rule mentions is an error (a typo must not silently replicate a 100 GiB table);
  write ``(name, None)`` to replicate on purpose. A name whose rules were all blocked is replicated.
- Mesh axes absent from the mesh are dropped from a rule (a rule left empty is skipped, so the next rule for
  that name gets its chance): one rule list serves meshes with and without, say, ``cp``.
- Mesh axes of size 1 are present: they claim the dim (as in flax) but give ``Replicate()`` placements.
- A tuple target must list its axes in mesh order. DTensor splits a dim sharded on several mesh dims left to
  right in mesh-dim order, so ``(Shard(d), Shard(d))`` on ``(fsdp, tp)`` puts block ``fsdp_idx * tp + tp_idx``
  on each rank: exactly JAX's ``P(("fsdp", "tp"))``. The reverse order would need DTensor's private
  ``_StridedShard``, so it is refused instead of being silently reordered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.distributed.tensor import Placement, Replicate, Shard

__all__ = ["Rules", "logical_to_spec", "logical_to_placements"]

Target = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, Target]]
Spec = tuple[str | tuple[str, ...] | None, ...]

_UNASSIGNED = object()


def mesh_sizes(mesh: Any) -> dict[str, int]:
    """``{axis: size}`` in mesh order, from a ``DeviceMesh`` or an ordered ``{axis: size}`` mapping (the
    latter lets rules be resolved and memory planned without any process group)."""
    if isinstance(mesh, Mapping):
        return {str(k): int(v) for k, v in mesh.items()}
    names = getattr(mesh, "mesh_dim_names", None)
    if names is None:
        raise ValueError(
            "the mesh needs named axes: build it with make_mesh({'fsdp': 2, 'tp': 2}) or pass a dict"
        )
    return dict(zip(names, mesh.shape))


def _targets(target: Target) -> tuple[str, ...]:
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def check_rules(rules: Rules, mesh: Any) -> None:
    """Validate the form of ``rules`` and the order of tuple targets against ``mesh``."""
    sizes = mesh_sizes(mesh)
    order = {name: i for i, name in enumerate(sizes)}
    if isinstance(rules, str | Mapping):
        raise TypeError(
            f"rules must be a sequence of (logical_name, mesh_axes) pairs, got {type(rules).__name__}"
        )
    for rule in rules:
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise TypeError(f"a rule must be a (logical_name, mesh_axis | tuple | None) pair, got {rule!r}")
        name, target = rule
        if not (target is None or isinstance(target, str) or isinstance(target, tuple | list)):
            raise TypeError(f"rule {rule!r}: the target must be a mesh axis name, a tuple of names or None")
        axes = _targets(target)
        if not all(isinstance(a, str) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"rule {rule!r}: a target must name distinct mesh axes")
        split = [a for a in axes if sizes.get(a, 1) > 1]
        if split != sorted(split, key=order.__getitem__):
            raise ValueError(
                f"rule {rule!r}: the mesh axes of a tuple must follow the mesh order {tuple(sizes)} "
                f"(write {tuple(sorted(split, key=order.__getitem__))}); DTensor nests the shards of one dim "
                "over mesh dims left to right"
            )


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Any, *, path: str = "") -> Spec:
    """Resolve logical dim names to mesh axes, one entry per tensor dim (a JAX ``PartitionSpec``).

    ``mesh`` is a ``DeviceMesh`` or an ordered ``{axis: size}`` dict. ``path`` only names the tensor in errors.

    Example::

        >>> rules = [("vocab", ("fsdp", "tp")), ("embed", "fsdp"), ("mlp", "tp"), ("norm", None)]
        >>> logical_to_spec(("mlp", "embed"), rules, {"fsdp": 2, "tp": 2})
        ('tp', 'fsdp')
        >>> logical_to_spec(("vocab", "embed"), rules, {"fsdp": 2, "tp": 2})  # vocab's rule came first
        (('fsdp', 'tp'), None)
    """
    check_rules(rules, mesh)
    if isinstance(axes, str):
        raise TypeError(
            f"axes must be a sequence of logical names, one per tensor dim, got the string {axes!r}"
        )
    axes = tuple(axes)
    sizes = mesh_sizes(mesh)
    known = {name for name, _ in rules}
    for name in axes:
        if name is not None and name not in known:
            where = f" of {path!r}" if path else ""
            raise KeyError(
                f"no logical-axis rule for {name!r} (axes {axes}{where}); add a rule such as "
                f"({name!r}, 'fsdp'), or ({name!r}, None) to replicate it"
            )
    result: list[Any] = [_UNASSIGNED] * len(axes)
    used: set[str] = set()
    for name, target in rules:
        for d, dim_name in enumerate(axes):
            if dim_name != name or result[d] is not _UNASSIGNED:
                continue
            if target is None:
                result[d] = None
                continue
            mesh_axes = tuple(a for a in _targets(target) if a in sizes)
            if not mesh_axes or used.intersection(mesh_axes):
                continue
            result[d] = mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
            used.update(mesh_axes)
    return tuple(None if r is _UNASSIGNED else r for r in result)


def spec_to_placements(spec: Spec, mesh: Any) -> tuple[Placement, ...]:
    sizes = mesh_sizes(mesh)
    index = {name: i for i, name in enumerate(sizes)}
    placements: list[Placement] = [Replicate()] * len(sizes)
    for d, entry in enumerate(spec):
        for axis in _targets(entry):
            if sizes[axis] > 1:  # Shard on a size-1 mesh dim equals Replicate; keep the canonical form
                placements[index[axis]] = Shard(d)
    return tuple(placements)


def logical_to_placements(
    axes: Sequence[str | None], rules: Rules, mesh: Any, *, path: str = ""
) -> tuple[Placement, ...]:
    """DTensor placements (one per *mesh* dim: ``Shard(tensor_dim)`` or ``Replicate()``) for logical axes.

    Example::

        >>> rules = [("embed", "fsdp"), ("mlp", "tp"), ("norm", None)]
        >>> logical_to_placements(("mlp", "embed"), rules, {"fsdp": 2, "tp": 2})
        (Shard(dim=1), Shard(dim=0))
        >>> logical_to_placements(("norm",), rules, {"fsdp": 2, "tp": 2})
        (Replicate(), Replicate())
    """
    return spec_to_placements(logical_to_spec(axes, rules, mesh, path=path), mesh)
