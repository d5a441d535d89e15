"""Logical-axis rule resolution, mesh validation and the single-process paths of functional_mm.parallelism."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from functional_mm import nn, pytree, random
from functional_mm.parallelism import (
    constrain,
    describe,
    gather,
    logical_to_placements,
    logical_to_spec,
    make_mesh,
    shard,
    sharded_init,
    use_mesh,
)
from functional_mm.parallelism._describe import shard_ranges
from functional_mm.parallelism._shard import _placements

R, S = Replicate(), Shard
MESH = {"dp": 1, "fsdp": 2, "tp": 2}
RULES = [
    ("vocab", "tp"),
    ("heads", "tp"),
    ("kv_heads", "tp"),
    ("mlp", "tp"),
    ("embed", "fsdp"),
    ("norm", None),
    ("act_batch", ("dp", "fsdp")),
    ("act_seq", None),
    ("act_embed", "tp"),
]


def _block(key=None):
    key = random.key(0) if key is None else key
    ka, km, ke = random.split(key, 3)
    return {
        "embed": nn.embedding.init(ke, 24, 8),
        "attn": nn.attention.init(ka, 8, 4, 2),
        "mlp": nn.mlp.init_gated(km, 8, 16),
        "norm": nn.norms.init_rms_norm(8),
    }


def test_fsdp_tp_rules_on_attention_mlp_embedding():
    shapes, axes = nn.abstract(_block)
    flat = pytree.flatten_with_paths(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    got = {p: logical_to_placements(a, RULES, MESH, path=p) for p, a in flat}
    assert got == {
        "embed/weight": (R, S(1), S(0)),  # (vocab, embed): vocab over tp, embed over fsdp
        "attn/q/weight": (R, S(1), S(0)),  # (heads, embed): Megatron column split
        "attn/k/weight": (R, S(1), S(0)),
        "attn/v/weight": (R, S(1), S(0)),
        "attn/o/weight": (R, S(0), S(1)),  # (embed, heads): row split
        "mlp/gate/weight": (R, S(1), S(0)),
        "mlp/up/weight": (R, S(1), S(0)),
        "mlp/down/weight": (R, S(0), S(1)),
        "norm/scale": (R, R, R),
    }
    assert logical_to_spec(axes["attn"]["o"]["weight"], RULES, MESH) == ("fsdp", "tp")
    # dp has size 1: it claims the batch dim (as in flax) but only fsdp actually splits it
    names = ("act_batch", "act_seq", "act_embed")
    assert logical_to_spec(names, RULES, MESH) == (("dp", "fsdp"), None, "tp")
    assert logical_to_placements(names, RULES, MESH) == (R, S(0), S(2))


def test_tuple_rule_shards_one_dim_over_several_mesh_axes():
    rules = [("vocab", ("fsdp", "tp")), ("embed", "fsdp")]
    assert logical_to_spec(("vocab", "embed"), rules, MESH) == (("fsdp", "tp"), None)
    assert logical_to_placements(("vocab", "embed"), rules, MESH) == (R, S(0), S(0))
    # DTensor nests the shards of one dim over mesh dims left to right, so the tuple must follow mesh order
    with pytest.raises(ValueError, match=r"mesh order \('dp', 'fsdp', 'tp'\).*\('fsdp', 'tp'\)"):
        logical_to_placements(("vocab",), [("vocab", ("tp", "fsdp"))], MESH)
    # ... unless one of them has size 1 (then the order means nothing)
    assert logical_to_placements(("vocab",), [("vocab", ("fsdp", "dp"))], MESH) == (R, S(0), R)


def test_first_rule_with_unused_axes_wins_and_falls_back():
    rules = [("embed", "fsdp"), ("vocab", "fsdp"), ("vocab", "tp")]
    assert logical_to_spec(("vocab", "embed"), rules, MESH) == ("tp", "fsdp")
    assert logical_to_spec(("vocab",), rules, MESH) == ("fsdp",)  # alone, the first vocab rule applies


def test_priority_follows_rule_order_not_dim_order():
    rules = [("mlp", "tp"), ("embed", "tp"), ("embed", "fsdp")]
    assert logical_to_spec(("mlp", "embed"), rules, MESH) == ("tp", "fsdp")
    assert logical_to_spec(("embed", "mlp"), rules, MESH) == ("fsdp", "tp")  # same weight, transposed


def test_mesh_axis_is_used_at_most_once_per_tensor():
    rules = [("embed", "fsdp"), ("mlp", "fsdp")]
    assert logical_to_spec(("embed", "mlp"), rules, MESH) == ("fsdp", None)
    assert logical_to_placements(("mlp", "embed"), rules, MESH) == (R, S(1), R)
    # a name repeated in one tensor takes successive rules
    assert logical_to_spec(("embed", "embed"), [("embed", "fsdp"), ("embed", "tp")], MESH) == ("fsdp", "tp")
    tuple_rules = [("vocab", ("fsdp", "tp")), ("embed", "tp")]
    assert logical_to_spec(("vocab", "embed"), tuple_rules, MESH) == (("fsdp", "tp"), None)


def test_missing_rule_is_an_error_naming_axis_and_parameter():
    shapes, axes = nn.abstract(_block)
    rules = [r for r in RULES if r[0] != "kv_heads"]
    with pytest.raises(KeyError, match=r"'kv_heads'.*'attn/k/weight'.*\('kv_heads', None\)"):
        describe(shapes, axes, mesh=MESH, rules=rules)


def test_indivisible_dim_is_an_error_naming_parameter_size_and_axis():
    # 3 heads of 2 dims fused into 6 rows cannot be split over tp=4 (and 6 = 4 * 1.5 rows would cut heads)
    with pytest.raises(
        ValueError, match=r"'attn/q/weight': dim 0 \('heads'\) has size 6.*'tp' \(4\).*head count"
    ):
        _placements(
            "attn/q/weight", (6, 8), ("heads", "embed"), RULES, {"fsdp": 2, "tp": 4}, allow_uneven=False
        )
    with pytest.raises(ValueError, match=r"size 6, not divisible by mesh axis 'fsdp' \(2\) x 'tp' \(4\)"):
        _placements(
            "v", (6,), ("vocab",), [("vocab", ("fsdp", "tp"))], {"fsdp": 2, "tp": 4}, allow_uneven=False
        )
    assert _placements("v", (6,), ("vocab",), [("vocab", "tp")], {"tp": 4}, allow_uneven=True) == (S(0),)


def test_replicate_rule_and_none_names():
    assert logical_to_placements(("norm",), RULES, MESH) == (R, R, R)
    # an explicit None rule claims the dim: later rules for that name no longer apply
    assert logical_to_spec(("embed",), [("embed", None), ("embed", "fsdp")], MESH) == (None,)
    assert logical_to_spec((None, "embed"), [("embed", "fsdp")], MESH) == (None, "fsdp")


def test_absent_mesh_axes_are_dropped_and_size_one_axes_replicate():
    rules = [("act_batch", ("dp", "fsdp")), ("mlp", "cp"), ("mlp", "tp")]
    assert logical_to_spec(("act_batch", "mlp"), rules, {"fsdp": 4, "tp": 2}) == ("fsdp", "tp")
    assert logical_to_spec(("mlp",), rules, {"fsdp": 4}) == (None,)  # every mlp rule left empty: replicated
    assert logical_to_placements(
        ("mlp", "act_batch"), [("mlp", "tp"), ("act_batch", "fsdp")], {"fsdp": 4, "tp": 1}
    ) == (
        S(1),
        R,
    )


@pytest.mark.parametrize(
    "rules, match",
    [
        ([("embed",)], "pair"),
        ([("embed", 3)], "target"),
        ([("embed", ("fsdp", "fsdp"))], "distinct"),
        ({"embed": "fsdp"}, "sequence"),
    ],
)
def test_malformed_rules(rules, match):
    with pytest.raises((TypeError, ValueError), match=match):
        logical_to_placements(("embed",), rules, MESH)


@pytest.mark.parametrize(
    "axes, match",
    [
        ({"fsdp": 3}, "3 devices but the world size is 4"),
        ({"fsdp": -1, "tp": 3}, "not divisible"),
        ({"fsdp": -1, "tp": -1}, "only one mesh axis may be -1"),
        ({"fsdp": 0, "tp": 4}, "size 0"),
        ({"fsdp": True}, "size True"),
        ({}, "at least one axis"),
    ],
)
def test_make_mesh_validates_before_any_process_group(monkeypatch, axes, match):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=match):
        make_mesh(axes)
    assert not dist.is_initialized()


def test_describe_plans_memory_without_processes():
    shapes, axes = nn.abstract(
        lambda: {"up": nn.linear.init(random.key(0), 8, 16, axes=("embed", "mlp"), bias=True)}
    )
    table = describe(shapes, axes, mesh={"fsdp": 2, "tp": 2}, rules=[("embed", "fsdp"), ("mlp", "tp")])
    assert table.splitlines() == [
        "path       shape    dtype    axes          sharding    local   bytes/rank",
        "up/weight  (16, 8)  float32  (mlp, embed)  (tp, fsdp)  (8, 4)         128",
        "up/bias    (16,)    float32  (mlp)         (tp)        (8,)            32",
        "total: 144 params, 576 bytes (576 B); per rank (max): 160 bytes (160 B); mesh (fsdp=2, tp=2)",
    ]
    plain = describe({"w": torch.ones(2, 3)})
    assert "unplaced" in plain and "per rank (max): 24 bytes" in plain


def test_shard_ranges_follow_torch_chunk_nested_left_to_right():
    # 5 rows over (fsdp=2, tp=2): torch.chunk gives fsdp blocks [0:3], [3:5]; tp splits each again
    got = [shard_ranges((5,), (S(0), S(0)), (2, 2), c) for c in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    assert got == [[(0, 2)], [(2, 1)], [(3, 1)], [(4, 1)]]
    full = torch.arange(5)
    for (start, size), c in zip([g[0] for g in got], [(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert torch.equal(full[start : start + size], full.chunk(2)[c[0]].chunk(2)[c[1]])
    assert shard_ranges((5, 4), (S(0), R), (4, 1), (3, 0)) == [(5, 0), (0, 4)]  # empty trailing shard


def test_constrain_is_identity_without_a_mesh():
    x = torch.ones(2, 3)
    assert constrain(x, ("act_batch", "act_embed")) is x


def test_single_process_mesh_shard_constrain_and_sharded_init(monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()
    try:
        mesh = make_mesh({"fsdp": -1, "tp": 1})  # a bare process gets a 1-rank gloo group
        assert mesh.mesh_dim_names == ("fsdp", "tp") and tuple(mesh.shape) == (1, 1)
        params, axes = nn.unbox(_block())
        sharded = shard(params, axes, mesh, RULES)
        leaf = sharded["attn"]["q"]["weight"]
        assert isinstance(leaf, DTensor) and leaf.placements == (R, R)
        for a, b in zip(pytree.leaves(gather(sharded)), pytree.leaves(params)):
            assert torch.equal(a, b)
        ours, ours_axes = sharded_init(_block, random.key(0), mesh=mesh, rules=RULES)
        assert ours_axes == axes
        for a, b in zip(pytree.leaves(gather(ours)), pytree.leaves(params)):
            assert torch.equal(a, b)
        with use_mesh(mesh, RULES):
            y = constrain(torch.ones(2, 3, 8), ("act_batch", "act_seq", "act_embed"))
        assert isinstance(y, DTensor) and y.placements == (R, R)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
