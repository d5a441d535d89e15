"""Meshes, logical axis rules and DTensor placement of parameter pytrees (GSPMD-style).

Every parameter and activation is a DTensor on one named mesh; DTensor's sharding propagation inserts the
collectives. Parameters get their placements from their logical axis names through an ordered rule list
(flax semantics, see ``_rules.py``); activations are pinned with :func:`constrain`. FSDP is a rule that shards
weights over ``fsdp``; a weight all-gathered at use through a differentiable redistribute gets its gradient
back reduce-scattered.

A session (``run_local`` spawns processes, so the function lives in an importable module)::

    # demo.py
    from functional_mm import nn, random
    from functional_mm.parallelism import describe, make_mesh, shard

    RULES = [("vocab", ("fsdp", "tp")), ("embed", "fsdp"), ("mlp", "tp"), ("norm", None)]

    def main():
        mesh = make_mesh({"fsdp": 2, "tp": -1})
        boxed = {"embed": nn.embedding.init(random.key(0), 64, 8),
                 "up": nn.linear.init(random.key(1), 8, 16, axes=("embed", "mlp")),
                 "norm": nn.norms.init_rms_norm(8)}
        params, axes = nn.unbox(boxed)
        return describe(shard(params, axes, mesh, RULES), axes)

    >>> import demo  # doctest: +SKIP
    >>> from functional_mm.parallelism import run_local
    >>> print(run_local(demo.main, 4))  # 4 gloo processes, a 2x2 (fsdp, tp) mesh  # doctest: +SKIP
    path          shape    dtype    axes            sharding      local    bytes/rank
    embed/weight  (64, 8)  float32  (vocab, embed)  (fsdp+tp, -)  (16, 8)         512
    up/weight     (16, 8)  float32  (mlp, embed)    (tp, fsdp)    (8, 4)          128
    norm/scale    (8,)     float32  (norm)          replicated    (8,)             32
    total: 648 params, 2,592 bytes (2.5 KiB); per rank (max): 672 bytes (672 B); mesh (fsdp=2, tp=2)

The vocab rule comes first, so it takes both mesh axes and the embedding's ``embed`` dim finds ``fsdp``
used and stays whole; in ``up`` the same ``embed`` rule applies. FSDP at use: a weight that is used as is
gets gathered by DTensor's op propagation, but its gradient then stays ``Partial`` over ``fsdp``; gather it
with an explicit ``w.redistribute(...)`` (differentiable) and the gradient comes back reduce-scattered in the
weight's own layout (tests/test_parallelism_dist.py checks both).

Training a model on a mesh (``functional_mm.models.llama`` is the worked example): ``shard`` the params with the
model's rules (``llama.default_rules()``: FSDP, Megatron TP with sequence parallelism, DP, HSDP); inside the
model, :func:`use_param` / :func:`use_params` bring each layer's weights to their compute layout (gathered over
the data axes ``dp``/``fsdp``, still split over ``tp``; gradients come back reduce-scattered / all-reduced;
``use_params`` moves a whole layer's weights in one all-gather and its gradients in one reduce-scatter, as
FSDP2's flat buffer per layer does, see ``_bucket.py``) and :func:`constrain` pins activations. Under FSDP / DP /
HSDP alone (only the batch split), :func:`local_rows` runs a layer on each rank's own rows as plain tensors,
without DTensor's per-op dispatch (``shard_map``); :func:`rows_like` splits per-sample randomness drawn for the
global batch the same way; :func:`cross_entropy` is vocab-parallel on logits split over the
vocabulary; :func:`shard_batch` places a batch. Run the step inside ``use_mesh(mesh, rules)``. Optimizer
state built from sharded params keeps their placements (DTensor foreach ops), so under FSDP no rank holds a
full replica of params or optimizer state outside a layer's use. Within a step, autograd keeps each layer's
gathered weights from its forward to its backward (FSDP2's ``reshard_after_forward=False``); with
``remat_policy="full"`` or ``"selective"`` the gathers are redone in the backward instead, so one layer's full
weights are alive at a time. CPU attention needs a DTensor rule that torch 2.13 lacks; importing this package
registers it (``_ops.py``).

Single-process tools: :func:`logical_to_spec` / :func:`logical_to_placements` and :func:`describe` accept an
ordered ``{axis: size}`` dict in place of a mesh, to check rules and plan memory without launching anything.
"""

from functional_mm.parallelism import _ops  # noqa: F401  (registers DTensor rules for CPU attention)
from functional_mm.parallelism._compute import (
    DATA_AXES,
    cross_entropy,
    local_rows,
    rows_like,
    shard_batch,
    use_param,
    use_params,
)
from functional_mm.parallelism._describe import describe, visualize
from functional_mm.parallelism._launch import RankError, run_local
from functional_mm.parallelism._mesh import current, make_mesh, use_mesh
from functional_mm.parallelism._rules import Rules, logical_to_placements, logical_to_spec
from functional_mm.parallelism._shard import abstract_init, constrain, gather, shard, sharded_init, unshard

__all__ = [
    "Rules",
    "make_mesh",
    "use_mesh",
    "current",
    "logical_to_spec",
    "logical_to_placements",
    "shard",
    "constrain",
    "use_param",
    "use_params",
    "local_rows",
    "rows_like",
    "shard_batch",
    "cross_entropy",
    "DATA_AXES",
    "gather",
    "unshard",
    "abstract_init",
    "sharded_init",
    "describe",
    "visualize",
    "run_local",
    "RankError",
]
