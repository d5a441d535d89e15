"""Sharded Llama training on real gloo process groups matches single-process training.

Layouts (``llama.default_rules()``): fsdp=2, tp=2 (with and without sequence parallelism), dp=2 on 2 ranks;
fsdp=2 x tp=2 and dp=2 x fsdp=2 (HSDP) on 4 ranks. Each trains the tiny Llama for 3 AdamW steps from the
same weights on the same batches and is compared, loss by loss and parameter by parameter (gathered), with
the same 3 steps in this (single) process. The compiled step is checked against the eager one on fsdp=2 and
fsdp=2 x tp=2, donation (in-place update) on fsdp=2, and a batch built from per-rank rows; the collectives of
one eager step are counted (one all-gather and one reduce-scatter per block under FSDP, not one per weight). Spawning and
compiling are the expensive parts on a 2-core machine, so one 2-rank and one 4-rank launch run every check and
return a report that the tests below assert on (about 2 minutes with a warm inductor cache, 3.5 cold).

Tolerances: fp32 everywhere; sharded runs sum partial products in another order (row-parallel matmuls,
reduce-scattered gradients), which moves gradients by ~1e-7 relative. Adam divides by sqrt(v) and so turns that
into ~1e-6 absolute on the parameters after 3 steps at lr 1e-3: ``ATOL = 2e-5`` on parameters, 1e-5 on losses.
"""

import re

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode

from functional_mm import optim, pytree, random
from functional_mm.models import llama
from functional_mm.parallelism import describe, gather, make_mesh, run_local, shard, shard_batch, use_mesh
from functional_mm.train import TrainState, make_train_step

CFG = llama.LlamaConfig.variant("tiny")  # 2 layers, d 64, 4 heads / 2 kv heads, vocab 128
CFG1 = llama.LlamaConfig.variant("tiny", num_layers=1)  # the compiled runs: half the graph to compile
TX = optim.adamw(1e-3, weight_decay=0.1)
STEPS, BATCH, SEQ = 3, 4, 16
ATOL = 2e-5

TWO_RANK = {
    "fsdp2": ({"fsdp": 2}, True),
    "tp2": ({"tp": 2}, True),
    "tp2_no_sp": ({"tp": 2}, False),
    "dp2": ({"dp": 2}, True),
}
FOUR_RANK = {
    "fsdp2xtp2": ({"fsdp": 2, "tp": 2}, True),
    "dp2xfsdp2": ({"dp": 2, "fsdp": 2}, True),
}


def _batch(i):
    return {"tokens": random.randint(random.fold_in(random.key(2), i), (BATCH, SEQ), 0, CFG.vocab_size)}


def _scalar(x) -> float:
    return float(x.full_tensor() if isinstance(x, DTensor) else x)


def _train(cfg, compile, mesh=None, rules=None, donate=False):
    """3 steps from the same weights: (losses, final state). Sharded when ``mesh`` is given."""
    params = llama.init(random.key(0), cfg)
    if mesh is not None:
        params = shard(params, llama.logical_axes(cfg), mesh, rules)
    state = TrainState.create(params, TX, random.key(1))
    step = make_train_step(lambda p, b, k: llama.loss(p, cfg, b), TX, compile=compile, donate=donate)
    losses = []
    for i in range(STEPS):
        if mesh is None:
            state, metrics = step(state, _batch(i))
        else:
            with use_mesh(mesh, rules):
                state, metrics = step(state, _batch(i))
        losses.append(_scalar(metrics["loss"]))
    return losses, state


def _layout_report(layout, sp, compile_too) -> dict:
    mesh = make_mesh(layout)
    rules = llama.default_rules(sequence_parallel=sp)
    out: dict = {}
    losses, state = _train(CFG, False, mesh, rules)
    out["losses"], out["params"] = losses, gather(state.params)
    out["placements"] = {p: tuple(x.placements) for p, x in pytree.flatten_with_paths(state.params)[0]}
    out["opt_placements"] = [
        (tuple(x.placements) if isinstance(x, DTensor) else None, tuple(x.shape))
        for x in pytree.leaves(state.opt_state)
    ]
    out["describe"] = describe({"params": state.params, "opt_state": state.opt_state})
    out["local_bytes"] = sum(
        (x.to_local() if isinstance(x, DTensor) else x).numel() * x.element_size()
        for x in pytree.leaves((state.params, state.opt_state))
    )
    # The update reads and writes shards only: clipping all-reduces one scalar, nothing is gathered.
    tx = optim.chain(optim.clip_by_global_norm(1.0), TX)
    with CommDebugMode() as comms:
        tx.update(state.params, tx.init(state.params), state.params)
    out["update_comms"] = {str(k): v for k, v in comms.get_comm_counts().items()}
    # Forward collectives of one loss: under tp, logits stay vocab-split (no gather of [B, T, V]).
    params = shard(llama.init(random.key(0), CFG), llama.logical_axes(CFG), mesh, rules)
    with use_mesh(mesh, rules), CommDebugMode() as comms, torch.no_grad():
        llama.loss(params, CFG, _batch(0))
    out["forward_comms"] = {str(k).split(".")[-1]: v for k, v in comms.get_comm_counts().items()}
    # Collectives of one whole eager train step (forward, backward, update, metrics).
    step = make_train_step(lambda p, b, k: llama.loss(p, CFG, b), TX, compile=False)
    with use_mesh(mesh, rules), CommDebugMode() as comms:
        step(state, _batch(0))
    out["step_comms"] = {str(k).split(".")[-1]: v for k, v in comms.get_comm_counts().items()}
    if compile_too:
        eager_losses, eager = _train(CFG1, False, mesh, rules)
        compiled_losses, compiled = _train(CFG1, True, mesh, rules)
        out["compiled"] = {
            "eager_losses": eager_losses,
            "compiled_losses": compiled_losses,
            "eager": gather(eager.params),
            "compiled": gather(compiled.params),
            "placements_kept": all(
                a.placements == b.placements
                for a, b in zip(pytree.leaves(eager.params), pytree.leaves(compiled.params))
            ),
        }
    return out


def _bad_heads() -> str:
    """A layout that would cut a kv head in two must fail on every rank before any collective."""
    mesh = make_mesh({"tp": 2})
    cfg = llama.LlamaConfig.variant("tiny", num_heads=4, num_kv_heads=1)
    try:
        with use_mesh(mesh, llama.default_rules()):
            llama.loss(llama.init(random.key(0), cfg), cfg, _batch(0))
    except ValueError as e:
        return str(e)
    return "no error"


def _run(layouts: dict, compiled: str) -> dict:
    # Compile in-process: a pool of compile workers per rank (each importing torch) costs more than it saves
    # with 2-4 ranks on 2 cores.
    torch._inductor.config.compile_threads = 1
    report = {name: _layout_report(layout, sp, name == compiled) for name, (layout, sp) in layouts.items()}
    if dist.get_world_size() == 2:
        report["bad_heads"] = _bad_heads()
        # donation (in-place update) with gradients whose reduce-scatter may still be in flight
        mesh = make_mesh({"fsdp": 2})
        losses, state = _train(CFG, False, mesh, llama.default_rules(), donate=True)
        report["fsdp2_donate"] = {"losses": losses, "params": gather(state.params)}
        # a per-rank data loader: each rank brings its own rows, the loss is the global batch's
        params = shard(llama.init(random.key(0), CFG), llama.logical_axes(CFG), mesh, llama.default_rules())
        with use_mesh(mesh, llama.default_rules()), torch.no_grad():
            rows = _batch(0)["tokens"].chunk(2)[dist.get_rank()]
            batch = shard_batch({"tokens": rows}, local=True)
            report["local_batch"] = (tuple(batch["tokens"].shape), _scalar(llama.loss(params, CFG, batch)))
    return report


@pytest.fixture(scope="module")
def reference():
    return {"CFG": _train(CFG, False), "CFG1": _train(CFG1, False)}


@pytest.fixture(scope="module")
def two():
    return run_local(_run, 2, TWO_RANK, "fsdp2", timeout=600)


@pytest.fixture(scope="module")
def four():
    return run_local(_run, 4, FOUR_RANK, "fsdp2xtp2", timeout=600)


def _max_err(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(pytree.leaves(a), pytree.leaves(b)))


def _check_matches_reference(report, reference):
    ref_losses, ref_state = reference["CFG"]
    assert report["losses"] == pytest.approx(ref_losses, abs=1e-5)
    assert pytree.same_structure(report["params"], ref_state.params)
    assert _max_err(report["params"], ref_state.params) < ATOL
    # the params moved (a test that cannot fail otherwise): 3 steps of lr 1e-3 change them by ~3e-3
    assert _max_err(report["params"], llama.init(random.key(0), CFG)) > 1e-3


@pytest.mark.parametrize("name", list(TWO_RANK))
def test_two_rank_layouts_match_single_process(two, reference, name):
    _check_matches_reference(two[name], reference)


def test_fsdp_with_donation_matches_single_process(two, reference):
    _check_matches_reference(two["fsdp2_donate"], reference)


def test_per_rank_rows_make_the_global_batch(two, reference):
    shape, loss = two["local_batch"]
    assert shape == (BATCH, SEQ)
    assert loss == pytest.approx(reference["CFG"][0][0], abs=1e-5)


@pytest.mark.parametrize("name", list(FOUR_RANK))
def test_four_rank_layouts_match_single_process(four, reference, name):
    _check_matches_reference(four[name], reference)


def test_default_rules_give_the_expected_layouts(two, four):
    R, S = Replicate(), Shard
    fsdp, tp, fsdp_tp, hsdp = (
        two["fsdp2"]["placements"],
        two["tp2"]["placements"],
        four["fsdp2xtp2"]["placements"],
        four["dp2xfsdp2"]["placements"],
    )
    assert fsdp["layers/0/attn/q/weight"] == (S(1),)  # (heads, embed): embed over fsdp
    assert fsdp["layers/0/mlp/down/weight"] == (S(0),)  # (embed, mlp)
    assert fsdp["final_norm/scale"] == (S(0),)  # even the norms: no replica anywhere
    assert tp["layers/0/attn/q/weight"] == (S(0),)  # column parallel
    assert tp["layers/0/attn/o/weight"] == (S(1),)  # row parallel
    assert tp["embed/weight"] == tp["lm_head/weight"] == (S(0),)  # vocab parallel
    assert tp["final_norm/scale"] == (R,)
    assert fsdp_tp["layers/1/mlp/up/weight"] == (S(1), S(0))
    assert hsdp["layers/1/mlp/up/weight"] == (R, S(1))  # replicated over dp, split over fsdp
    assert all(p == (R,) for p in two["dp2"]["placements"].values())


def test_optimizer_state_keeps_the_param_placements(two, four):
    for report in (two["fsdp2"], two["tp2"], four["fsdp2xtp2"], four["dp2xfsdp2"]):
        params = list(report["placements"].values())
        # adamw state: (count, mu, nu) for scale_by_adam, then the lr schedule's count
        placed = [p for p, _ in report["opt_placements"] if p is not None]
        assert placed == params + params
        assert all(shape == () for p, shape in report["opt_placements"] if p is None)


def _bytes(table: str) -> tuple[int, int]:
    m = re.search(r"total: [\d,]+ params, ([\d,]+) bytes .*per rank \(max\): ([\d,]+) bytes", table)
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


def test_fsdp_params_and_optimizer_state_take_one_nth_per_rank(two, reference):
    report = two["fsdp2"]
    total, per_rank = _bytes(report["describe"])
    _, ref_state = reference["CFG"]
    state_bytes = sum(
        x.numel() * x.element_size() for x in pytree.leaves((ref_state.params, ref_state.opt_state))
    )
    assert total == state_bytes
    # one row of padding per sharded tensor at most; the 0-d step counters (8 bytes each) are whole on each rank
    rows = sum(
        x.numel() // x.shape[d] * x.element_size()
        for x, places in zip(pytree.leaves(ref_state.params), report["placements"].values())
        for d in [places[0].dim]
    )
    counters = sum(8 for p, _ in report["opt_placements"] if p is None)
    assert total / 2 <= per_rank <= total / 2 + 3 * rows + counters
    assert per_rank == report["local_bytes"]  # describe's per-rank figure is what the rank really holds
    assert per_rank <= total / 2 + counters  # even shapes here: exactly half plus the counters


def test_the_update_never_gathers(two, four):
    for report in (two["fsdp2"], two["tp2"], four["fsdp2xtp2"], four["dp2xfsdp2"]):
        comms = report["update_comms"]
        assert set(comms) <= {"c10d_functional.all_reduce"}, comms  # the clipping norm only
    assert two["dp2"]["update_comms"] == {}  # replicated grads: the norm is local


def test_tensor_parallel_forward_collectives(two):
    layers = CFG.num_layers
    # sequence parallel: all-gather before attention, the MLP and the head; reduce-scatter after the
    # embedding and after each attention / MLP; 3 all-reduces of [N] vectors in the vocab-parallel loss. No
    # collective is left for the [B, T, V] logits.
    assert two["tp2"]["forward_comms"] == {
        "all_gather_into_tensor": 2 * layers + 1,
        "reduce_scatter_tensor": 2 * layers + 1,
        "all_reduce": 3,
    }
    # without sequence parallelism the row-parallel outputs are all-reduced instead
    assert two["tp2_no_sp"]["forward_comms"] == {"all_reduce": 2 * layers + 1 + 3}
    # fsdp: one all-gather per block (its weights in one buffer), one for the embedding and one for the head
    # (final norm + output projection); nothing else but the loss's sum (the rows' cross entropy is local)
    assert two["fsdp2"]["forward_comms"] == {"all_gather_into_tensor": layers + 2, "all_reduce": 1}


def test_fsdp_and_dp_move_one_buffer_per_layer(two, four):
    """Bucketed collectives (``use_params``): a whole train step issues one all-gather and one reduce-scatter
    per decoder block, as FSDP2's flat buffer per layer does, not one per weight (9 per block here)."""
    layers = CFG.num_layers
    # + embedding + head; all-reduces: the loss sum and the grad / update norm metrics (one vector each)
    metrics = 3
    assert two["fsdp2"]["step_comms"] == {
        "all_gather_into_tensor": layers + 2,
        "reduce_scatter_tensor": layers + 2,
        "all_reduce": metrics,
    }
    # DP (replicated weights): each block's gradients all-reduced in one buffer, as DDP's buckets; the norms
    # of replicated gradients are local, only the loss sum remains
    assert two["dp2"]["step_comms"] == {"all_reduce": layers + 2 + 1}
    # HSDP: per bucket a reduce-scatter over fsdp, then an all-reduce of the shard over dp
    hsdp = four["dp2xfsdp2"]["step_comms"]
    assert hsdp["all_gather_into_tensor"] == hsdp["reduce_scatter_tensor"] == layers + 2, hsdp


@pytest.mark.parametrize("which", ["two", "four"])
def test_compiled_sharded_step_matches_eager(two, four, reference, which):
    report = {"two": two["fsdp2"], "four": four["fsdp2xtp2"]}[which]["compiled"]
    assert report["compiled_losses"] == pytest.approx(report["eager_losses"], abs=1e-5)
    assert _max_err(report["compiled"], report["eager"]) < ATOL
    assert report["placements_kept"]
    ref_losses, ref_state = reference["CFG1"]
    assert report["eager_losses"] == pytest.approx(ref_losses, abs=1e-5)
    assert _max_err(report["eager"], ref_state.params) < ATOL


def test_heads_not_divisible_by_tp_fail_before_any_collective(two):
    assert "num_kv_heads=1 is not divisible by the mesh axes ('tp',) of size 2" in two["bad_heads"]


def test_check_layout_without_processes():
    rules = llama.default_rules()
    llama.check_layout(CFG, {"fsdp": 4, "tp": 2}, rules)  # 4 heads / 2 kv heads over tp=2: fine
    with pytest.raises(ValueError, match=r"num_heads=4 is not divisible .*\('tp',\) of size 8"):
        llama.check_layout(CFG, {"tp": 8}, rules)
    # fsdp is gathered before compute: it may split the heads' dim without cutting a head at compute time
    llama.check_layout(CFG, {"fsdp": 8}, [("heads", "fsdp"), ("kv_heads", "fsdp")])
