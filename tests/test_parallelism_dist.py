"""functional_mm.parallelism on real gloo process groups (2 and 4 CPU processes, tiny tensors).

Spawning processes is the expensive part on a 2-core machine, so one 4-process run does all the checks that
need a healthy group and returns a report; the tests below assert on parts of it. Failure modes (exceptions,
hangs, bad meshes) get their own short 2-process runs.
"""

import contextlib
import os
import re
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode

from functional_mm import nn, pytree, random
from functional_mm.parallelism import (
    RankError,
    abstract_init,
    constrain,
    cross_entropy,
    current,
    describe,
    gather,
    local_rows,
    make_mesh,
    run_local,
    shard,
    sharded_init,
    use_mesh,
    use_param,
    use_params,
    visualize,
)
from functional_mm.parallelism._describe import shard_ranges

R, S = Replicate(), Shard
RULES_2D = [
    ("vocab", ("fsdp", "tp")),
    ("heads", "tp"),
    ("kv_heads", "tp"),
    ("mlp", "tp"),
    ("embed", "fsdp"),
    ("norm", None),
    ("act_batch", "fsdp"),
    ("act_seq", None),
    ("act_embed", "tp"),
    ("act_mlp", "tp"),
]
RULES_FSDP = [(name, "fsdp") for name in ("vocab", "heads", "kv_heads", "mlp", "embed", "norm")]


def _block(key):
    ka, km, ke = random.split(key, 3)
    return {
        "embed": nn.embedding.init(ke, 24, 8),  # [vocab, embed]
        "attn": nn.attention.init(ka, 8, 4, 2),  # q/o [8, 8], k/v [4, 8]
        "mlp": nn.mlp.init_gated(km, 8, 16),  # gate/up [16, 8], down [8, 16]
        "norm": nn.norms.init_rms_norm(8),
    }


def _equal_trees(a, b) -> bool:
    return pytree.same_structure(a, b) and all(
        torch.equal(x, y) for x, y in zip(pytree.leaves(a), pytree.leaves(b))
    )


def _locals_match_ranges(tree, full) -> bool:
    """Every local shard equals the slice of the full tensor that ``shard_ranges`` predicts for this rank."""
    for x, f in zip(pytree.leaves(tree), pytree.leaves(full)):
        mesh = x.device_mesh
        ranges = shard_ranges(x.shape, x.placements, mesh.shape, mesh.get_coordinate())
        expected = f[tuple(slice(s, s + n) for s, n in ranges)]
        if not torch.equal(x.to_local(), expected):
            return False
    return True


def _per_rank_bytes(table: str) -> tuple[int, int]:
    m = re.search(r"total: [\d,]+ params, ([\d,]+) bytes .*per rank \(max\): ([\d,]+) bytes", table)
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


def _use_params_report(mesh, rules, tree, tree_axes) -> dict:
    """``use_params`` (bucketed) against ``use_param`` on every leaf: forward values and placements, gradients
    (through a batch-split loss, so they arrive Partial over the data axes), and the collectives of each."""
    sharded = shard(tree, tree_axes, mesh, rules, allow_uneven=True)
    runs = {}
    for how in ("bucket", "leaf"):
        ws = [x.detach().requires_grad_() for x in pytree.leaves(sharded)]
        with use_mesh(mesh, rules), CommDebugMode() as comms:
            tree_in = pytree.unflatten(pytree.structure(sharded), ws)
            used = use_params(tree_in) if how == "bucket" else pytree.tree_map(use_param, tree_in)
            us = pytree.leaves(used)
            loss = 0.0
            for j, u in enumerate(us[1:], 1):  # leaf 0 unused: its gradient is zero
                coef = random.normal(random.fold_in(random.key(7), j), (4, *u.shape))  # [B, *w.shape]
                loss = loss + (constrain(coef, ("act_batch",) + (None,) * u.dim()) * u).sum()
            grads = torch.autograd.grad(loss.full_tensor(), ws, allow_unused=True)
        runs[how] = {
            "values": [u.full_tensor() for u in us],
            "placements": [tuple(u.placements) for u in us],
            "grads": [torch.zeros(w.shape) if g is None else g.full_tensor() for g, w in zip(grads, ws)],
            "grad_placements_kept": all(g is None or g.placements == w.placements for g, w in zip(grads, ws)),
            "comms": {str(k).split(".")[-1]: v for k, v in comms.get_comm_counts().items()},
        }
    bucket, leaf = runs["bucket"], runs["leaf"]
    return {
        "values_equal": all(torch.equal(a, b) for a, b in zip(bucket["values"], leaf["values"])),
        "placements_equal": bucket["placements"] == leaf["placements"],
        "grads_close": all(torch.allclose(a, b, atol=1e-5) for a, b in zip(bucket["grads"], leaf["grads"])),
        "grads_nonzero": sum(bool(g.abs().sum() > 0) for g in bucket["grads"]),
        "grad_placements_kept": bucket["grad_placements_kept"] and leaf["grad_placements_kept"],
        "leaves": len(bucket["values"]),
        "comms": {"bucket": bucket["comms"], "leaf": leaf["comms"]},
    }


def _full_or_zeros(g, like) -> torch.Tensor:
    if g is None:
        return torch.zeros(like.shape)
    return g.full_tensor() if isinstance(g, DTensor) else g


def _local_rows_report(mesh, rules, tree, tree_axes, rows: int) -> dict:
    """A pre-norm attention + MLP layer through ``local_rows`` against the same layer in one process: which
    path ran (plain local rows or DTensors), the outputs, and the gradients of the weights, the rows and a
    replicated input (7 rows split unevenly: 2, 2, 2, 1 over fsdp=4)."""
    dtensor_path = []

    def layer(p, x, table):  # x: [B, T, D], table: [T, D] (whole)
        dtensor_path.append(isinstance(x, DTensor) or current() is not None)
        p = use_params(p)
        h, _ = nn.attention.apply(
            p["attn"], nn.norms.rms_norm(p["norm"], x, 1e-6), head_dim=2, is_causal=True
        )
        x = x + constrain(h, ("act_batch", "act_seq", "act_embed")) + table
        x = x + nn.mlp.gated(p["mlp"], x)
        return x, x.mean(-1)  # [B, T, D], [B, T]

    def loss_and_grads(ws, x, table, wrap):
        with wrap:
            out, mean = layer_fn(pytree.unflatten(pytree.structure(tree), ws), x, table)
            loss = (out**2).sum() + mean.sum()
        loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
        return out, torch.autograd.grad(loss, [x_in, t_in, *ws], allow_unused=True)

    x, table = random.normal(random.key(5), (rows, 3, 8)), random.normal(random.key(6), (3, 8))
    x_in, t_in = x.clone().requires_grad_(), table.clone().requires_grad_()
    layer_fn = layer
    ref_out, ref_grads = loss_and_grads([w.clone().requires_grad_() for w in pytree.leaves(tree)], x_in, t_in,
                                        contextlib.nullcontext())  # fmt: skip
    dtensor_path.clear()
    x_in, t_in = x.clone().requires_grad_(), table.clone().requires_grad_()
    layer_fn = local_rows(layer)
    ws = [w.detach().requires_grad_() for w in pytree.leaves(shard(tree, tree_axes, mesh, rules))]
    with use_mesh(mesh, rules):
        x_rows, t_whole = (
            constrain(x_in, ("act_batch", "act_seq", "act_embed")),
            constrain(t_in, (None, None)),
        )
    out, grads = loss_and_grads(ws, x_rows, t_whole, use_mesh(mesh, rules))
    return {
        "dtensor_path": dtensor_path,
        "out": (tuple(out.placements), torch.allclose(out.full_tensor(), ref_out, atol=1e-5)),
        "grads_close": [  # the unused embedding: None in one process, zeros from a bucket
            torch.allclose(_full_or_zeros(g, w), _full_or_zeros(r, w), atol=1e-5)
            for g, r, w in zip(grads, ref_grads, [x_in, t_in, *ws])
        ],
        "grad_placements_kept": all(g is None or g.placements == w.placements for g, w in zip(grads[2:], ws)),
    }


def _four_ranks() -> dict:
    """Runs on 4 ranks; returns {check: [value on rank 0, 1, 2, 3]}."""
    out: dict = {}
    mesh2 = make_mesh({"fsdp": 2, "tp": 2})
    mesh1 = make_mesh({"fsdp": -1})
    params, axes = nn.unbox(_block(random.key(0)))

    # shard / gather round trips, and DTensor's layout equals ours (shard_ranges)
    s2 = shard(params, axes, mesh2, RULES_2D)
    s1 = shard(params, axes, mesh1, RULES_FSDP)
    out["roundtrip_2x2"] = _equal_trees(gather(s2), params)
    out["roundtrip_fsdp4"] = _equal_trees(gather(s1), params)
    out["locals_match"] = _locals_match_ranges(s2, params) and _locals_match_ranges(s1, params)
    out["placements"] = {p: tuple(x.placements) for p, x in pytree.flatten_with_paths(s2)[0]}
    out["vocab_block"] = torch.equal(
        s2["embed"]["weight"].to_local(), params["embed"]["weight"].chunk(4)[dist.get_rank()]
    )
    out["visualize"] = visualize(s2["attn"]["o"]["weight"])
    out["visualize_1d"] = visualize(s2["norm"]["scale"])

    # describe on fsdp=4, with one uneven leaf: per-rank bytes ~ total / 4
    odd = {**params, "odd": torch.arange(10 * 8, dtype=torch.float32).reshape(10, 8)}
    odd_axes = {**axes, "odd": ("vocab", "embed")}
    try:
        shard(odd, odd_axes, mesh1, RULES_FSDP)
    except ValueError as e:
        out["uneven_error"] = str(e)
    s_odd = shard(odd, odd_axes, mesh1, RULES_FSDP, allow_uneven=True)
    out["uneven_roundtrip"] = _equal_trees(gather(s_odd), odd)
    out["describe_fsdp4"] = describe(s_odd, odd_axes)
    out["local_bytes"] = sum(x.to_local().numel() * x.element_size() for x in pytree.leaves(s_odd))
    five = shard({"w": torch.arange(5.0)}, {"w": ("vocab",)}, mesh1, RULES_FSDP, allow_uneven=True)
    out["five_local"] = five["w"].to_local().tolist()
    out["five_roundtrip"] = torch.equal(gather(five)["w"], torch.arange(5.0))
    out["visualize_five"] = visualize(five["w"])

    # constrain: placements change, gradients equal the single-process ones
    x = random.normal(random.key(1), (4, 6, 8)).requires_grad_()
    with use_mesh(mesh2, RULES_2D):
        y = constrain(x, ("act_batch", "act_seq", "act_embed"))
        z = constrain(y, ("act_batch", "act_seq", None))
    out["constrain_placements"] = (tuple(y.placements), tuple(z.placements), tuple(y.to_local().shape))
    (gx,) = torch.autograd.grad((z.sin() * z).sum().full_tensor(), x)
    xr = x.detach().requires_grad_()
    (ref,) = torch.autograd.grad((xr.sin() * xr).sum(), xr)
    out["constrain_grad"] = (torch.allclose(gx, ref, atol=1e-6), gx.sum().item(), ref.sum().item())

    # an FSDP x TP matmul, the weight used as is (DTensor's op propagation gathers it) and all-gathered over
    # fsdp by an explicit redistribute: same numbers, but only the explicit, differentiable redistribute
    # brings the gradient back reduce-scattered; propagation leaves it Partial over fsdp
    wr = params["mlp"]["up"]["weight"].clone().requires_grad_()
    rx, rw = torch.autograd.grad((nn.linear.apply({"weight": wr}, xr) ** 2).sum(), [xr, wr])
    out["matmul_grads"] = {}
    for explicit in (False, True):
        w = s2["mlp"]["up"]["weight"].detach().requires_grad_()  # [16, 8] (mlp: tp, embed: fsdp)
        with use_mesh(mesh2, RULES_2D):
            wu = w.redistribute(mesh2, (R, S(0))) if explicit else w
            h = nn.linear.apply({"weight": wu}, constrain(x, ("act_batch", "act_seq", "act_embed")))
            h = constrain(h, ("act_batch", "act_seq", "act_mlp"))
        gx, gw = torch.autograd.grad((h * h).sum().full_tensor(), [x, w])
        out["matmul_grads"][explicit] = (
            tuple(gw.placements),
            torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gw.full_tensor(), rw, atol=1e-5),
        )

    # use_params buckets a tree's collectives: the values, placements and gradients of use_param leaf by leaf,
    # with fewer collectives (fsdp=4 with an uneven leaf and Shard(1) weights, fsdp x tp, dp x fsdp)
    hsdp = make_mesh({"dp": 2, "fsdp": 2})
    cases = {
        "fsdp4": (mesh1, [*RULES_FSDP, ("act_batch", "fsdp")], odd, odd_axes),
        "2x2": (mesh2, RULES_2D, params, axes),
        "hsdp": (hsdp, [*RULES_FSDP, ("act_batch", ("dp", "fsdp"))], params, axes),
    }
    out["use_params"] = {name: _use_params_report(*case) for name, case in cases.items()}

    # local_rows: plain local rows where only the batch is split (fsdp, dp x fsdp), DTensors otherwise
    act = [("act_seq", None), ("act_embed", None)]
    cases = {
        "fsdp4": (mesh1, [*RULES_FSDP, ("act_batch", "fsdp"), *act]),
        "hsdp": (hsdp, [*RULES_FSDP, ("act_batch", ("dp", "fsdp")), *act]),
        "2x2": (mesh2, RULES_2D),
        "fsdp4_whole_rows": (mesh1, [*RULES_FSDP, ("act_batch", None), *act]),
    }
    out["local_rows"] = {
        name: _local_rows_report(*case, params, axes, rows=8 if name == "2x2" else 7)  # DTensor: even rows
        for name, case in cases.items()
    }
    try:  # 5 rows over 4 ranks leave one without rows: not local (DTensor's uneven view fails, on every rank)
        _local_rows_report(*cases["fsdp4"], params, axes, rows=5)
    except RuntimeError as e:
        out["local_rows_5_over_4"] = str(e)
    try:
        with use_mesh(mesh1, cases["fsdp4"][1]):
            local_rows(lambda p, x: x.sum(0))({}, constrain(torch.ones(4, 2), ("act_batch", "act_seq")))
        out["local_rows_error"] = "no error"
    except ValueError as e:
        out["local_rows_error"] = str(e)

    # cross entropy on rows split over fsdp=4 (5 rows: 2, 2, 1, 0 per rank; the vocab whole): row-local
    logits, targets = random.normal(random.key(3), (5, 7)), torch.tensor([1, -100, 3, 6, 0])
    x = logits.clone().requires_grad_()
    with use_mesh(mesh1, [("act_batch", "fsdp")]):
        rows, t = constrain(x, ("act_batch", None)), constrain(targets, ("act_batch",))
        none, total = cross_entropy(rows, t, reduction="none"), cross_entropy(rows, t)
    (gx,) = torch.autograd.grad(total.full_tensor() * 2, x)
    xr = logits.clone().requires_grad_()
    ref = F.cross_entropy(xr, targets, reduction="none")
    (gr,) = torch.autograd.grad(ref.sum() * 2, xr)
    out["row_cross_entropy"] = (
        tuple(none.placements),
        torch.allclose(none.full_tensor(), ref, atol=1e-6),
        abs(float(total.full_tensor()) - float(ref.sum())) < 1e-5,
        torch.allclose(gx, gr, atol=1e-6),
    )

    # sharded init: equal to plain init, no full tensor kept alive, abstract init agrees on layout and memory
    for name, mesh, rules in (("2x2", mesh2, RULES_2D), ("fsdp4", mesh1, RULES_FSDP)):
        ours, ours_axes = sharded_init(_block, random.key(0), mesh=mesh, rules=rules)
        out[f"sharded_init_{name}"] = _equal_trees(gather(ours), params) and ours_axes == axes
        out[f"sharded_init_compact_{name}"] = all(
            x.to_local().untyped_storage().nbytes() == x.to_local().numel() * x.element_size()
            for x in pytree.leaves(ours)
        )
        shapes, _ = abstract_init(_block, random.key(0), mesh=mesh, rules=rules)
        out[f"abstract_{name}"] = (
            all(x.to_local().is_meta for x in pytree.leaves(shapes)),
            describe(shapes, axes) == describe(ours, axes),
        )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    return {k: [g[k] for g in gathered] for k in out}


@pytest.fixture(scope="module")
def four():
    return run_local(_four_ranks, 4, timeout=150)


def test_shard_gather_roundtrip_on_2x2_and_fsdp4(four):
    assert all(four["roundtrip_2x2"]) and all(four["roundtrip_fsdp4"])
    assert all(four["locals_match"])  # DTensor's shards are where shard_ranges/describe/visualize say
    placements = four["placements"][0]
    assert placements["attn/q/weight"] == (S(1), S(0))
    assert placements["attn/o/weight"] == (S(0), S(1))
    assert placements["norm/scale"] == (R, R)


def test_tuple_rule_gives_jax_block_order(four):
    # ("vocab", ("fsdp", "tp")) -> (Shard(0), Shard(0)): rank fsdp*2+tp holds block fsdp*2+tp, as P(("fsdp","tp"))
    assert four["placements"][0]["embed/weight"] == (S(0), S(0))
    assert all(four["vocab_block"])


def test_visualize(four):
    assert four["visualize"][3].splitlines() == [
        "(8, 8) float32 on mesh (fsdp=2, tp=2): (fsdp, tp)",
        "┌─────┬─────┐",
        "│  0  │  1  │",
        "├─────┼─────┤",
        "│  2  │  3  │",
        "└─────┴─────┘",
    ]
    assert "│  0,1,2,3  │" in four["visualize_1d"][0]


def test_describe_bytes_per_rank_is_total_over_n(four):
    table = four["describe_fsdp4"][0]
    total, per_rank = _per_rank_bytes(table)
    row = 8 * 4  # the uneven leaf has rows of 8 float32
    assert total / 4 <= per_rank <= total / 4 + row
    assert per_rank == max(four["local_bytes"])  # the "max" column is the most loaded rank's real footprint
    assert re.search(r"odd\s+\(10, 8\)\s+float32\s+\(vocab, embed\)\s+\(fsdp, -\)\s+\(3, 8\)\s+96", table)


def test_uneven_dims(four):
    err = four["uneven_error"][0]
    assert "'odd'" in err and "size 10" in err and "'fsdp' (4)" in err and "allow_uneven" in err
    assert all(four["uneven_roundtrip"]) and all(four["five_roundtrip"])
    assert four["five_local"] == [[0.0, 1.0], [2.0, 3.0], [4.0], []]  # torch.chunk: the last rank is empty
    assert "empty shards on ranks 3" in four["visualize_five"][0]


def test_constrain_changes_placements_and_passes_gradients(four):
    assert four["constrain_placements"][0] == ((S(0), S(2)), (S(0), R), (2, 6, 4))
    for ok, got, ref in four["constrain_grad"]:
        assert ok and got == pytest.approx(ref, rel=1e-6)
    for by_rank in four["matmul_grads"]:
        assert by_rank[False] == ((Partial(), S(0)), True)  # implicit gather: the fsdp gradient stays Partial
        assert by_rank[True] == (
            (S(1), S(0)),
            True,
        )  # explicit redistribute: reduce-scattered, like the weight


def test_sharded_and_abstract_init(four):
    for name in ("2x2", "fsdp4"):
        assert all(four[f"sharded_init_{name}"]), name
        assert all(four[f"sharded_init_compact_{name}"]), name
        assert all(all(checks) for checks in four[f"abstract_{name}"]), name


def test_use_params_buckets_the_collectives(four):
    for name in four["use_params"][0]:
        for report in (r[name] for r in four["use_params"]):
            assert report["values_equal"] and report["placements_equal"], name
            assert report["grads_close"] and report["grad_placements_kept"], name
            assert report["grads_nonzero"] == report["leaves"] - 1, name  # every leaf but the unused one
    c = {name: four["use_params"][0][name]["comms"] for name in four["use_params"][0]}
    ag, rs, ar = "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"
    # fsdp=4: all 10 leaves (one uneven, some split on dim 1) in one all-gather, 9 gradients in one reduce-scatter
    assert c["fsdp4"]["leaf"][ag] == 10 and c["fsdp4"]["leaf"][rs] == 9
    assert c["fsdp4"]["bucket"] == {ag: 1, rs: 1, ar: c["fsdp4"]["leaf"][ar]}  # ar: the loss only
    # fsdp x tp: the 7 weights split over fsdp and tp share one buffer; the embedding (vocab over fsdp x tp:
    # nested chunks) keeps its own 2 all-gathers, the replicated norm none; tp all-reduces are unchanged
    assert c["2x2"]["bucket"] == {ag: 1 + 2, rs: 1, ar: c["2x2"]["leaf"][ar]}
    # dp x fsdp: one all-gather, one reduce-scatter over fsdp and one all-reduce over dp for the whole tree
    assert c["hsdp"]["bucket"][ag] == c["hsdp"]["bucket"][rs] == 1
    assert c["hsdp"]["leaf"][ar] - c["hsdp"]["bucket"][ar] == 8 - 1


def test_local_rows_runs_plain_tensors_only_where_the_batch_alone_is_split(four):
    for rank in four["local_rows"]:
        for name, report in rank.items():
            assert report["out"][1], name
            assert all(report["grads_close"]) and len(report["grads_close"]) > 2, name
            assert report["grad_placements_kept"], name
        # fsdp and dp x fsdp: the layer saw plain tensors and no mesh; its output is laid out like its rows
        assert rank["fsdp4"]["dtensor_path"] == rank["hsdp"]["dtensor_path"] == [False]
        assert rank["fsdp4"]["out"][0] == (S(0),) and rank["hsdp"]["out"][0] == (S(0), S(0))
        # tensor parallelism, or rows not split (each rank would count every row): the DTensor path
        assert rank["2x2"]["dtensor_path"] == rank["fsdp4_whole_rows"]["dtensor_path"] == [True]
    # a rank without rows (5 over 4: 2, 2, 1, 0) takes the DTensor path too, whose view of uneven rows fails
    assert all("not evenly divisible" in e for e in four["local_rows_5_over_4"])
    assert all("does not keep the input's" in e for e in four["local_rows_error"])


def test_cross_entropy_on_split_rows(four):
    # the rows' losses stay split like the rows; the sum and the gradient are the single-process ones
    assert all(r == ((S(0),), True, True, True) for r in four["row_cross_entropy"])


def _bad_mesh():
    try:
        make_mesh({"fsdp": 3})
    except ValueError as e:
        return str(e), dist.is_initialized()
    return None, dist.is_initialized()


def _fail_on_rank_one():
    make_mesh({"fsdp": 2})
    if dist.get_rank() == 1:
        raise ValueError("boom")
    dist.barrier()  # rank 0 would wait here forever: run_local must kill it


def _hang():
    time.sleep(600)


def _die_on_rank_one():
    if int(os.environ["RANK"]) == 1:
        os._exit(3)  # no exception, no report: a crash
    time.sleep(600)


def test_bad_mesh_size_fails_before_any_collective():
    message, initialised = run_local(_bad_mesh, 2, timeout=60)
    assert "3 devices but the world size is 2" in message and not initialised


def test_exception_in_one_rank_propagates_with_rank():
    with pytest.raises(
        RankError, match=r"rank 1 of 2 raised ValueError: boom(.|\n)*_fail_on_rank_one"
    ) as info:
        run_local(_fail_on_rank_one, 2, timeout=60)
    assert info.value.rank == 1


def test_hang_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 did not finish within 8s"):
        run_local(_hang, 2, timeout=8)
    assert time.monotonic() - start < 20


def test_a_rank_that_dies_silently_is_reported():
    with pytest.raises(RankError, match="rank 1 of 2 died with exit code 3"):
        run_local(_die_on_rank_one, 2, timeout=60)
