"""functional_mm.optim: transformations, optimizers, schedules, routing, donation and compile."""

import math

import pytest
import torch

from functional_mm import optim, pytree

# ------------------------------------------------------------------------------------------------ helpers


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    layer = lambda: {"attn": {"weight": r(4, 4), "bias": r(4)}, "norm": {"scale": r(4)}}
    return {
        "embed": {"weight": r(5, 4)},
        "layers": [layer(), layer()],
        "head": {"weight": r(4, 3), "bias": r(3)},
    }


def quad_grads(params, target):
    return pytree.tree_map(lambda p, t: 2 * (p - t.to(p.dtype)), params, target)


def quad_loss(params, target):
    return sum(
        ((p.float() - t.float()) ** 2).sum() for p, t in zip(pytree.leaves(params), pytree.leaves(target))
    )


def clone(tree):
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def assert_trees_equal(a, b):
    """Same structure, dtypes and bits; ``None`` leaves in the same places."""
    la, da = pytree.flatten(a, is_leaf=pytree.is_leaf_none)
    lb, db = pytree.flatten(b, is_leaf=pytree.is_leaf_none)
    assert da == db
    for path, x, y in zip(pytree.paths(a, is_leaf=pytree.is_leaf_none), la, lb):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), path
        else:
            assert x is y or x == y, path


def state_paths_with_tensors(state):
    return [p for p, x in pytree.flatten_with_paths(state)[0] if isinstance(x, torch.Tensor)]


LAYER_RULES = [(r"^embed/", "embed"), (r".*", "rest")]

# name -> (factory, paths expected to stay exactly unchanged)
CASES = {
    "scale": (lambda: optim.scale(-0.1), ()),
    "identity": (lambda: optim.chain(optim.identity(), optim.scale(-0.1)), ()),
    "scale_by_learning_rate": (lambda: optim.scale_by_learning_rate(0.1), ()),
    "scale_by_learning_rate_schedule": (
        lambda: optim.scale_by_learning_rate(optim.linear_schedule(0.2, 0.05, 50)),
        (),
    ),
    "scale_by_adam": (lambda: optim.chain(optim.scale_by_adam(), optim.scale(-0.05)), ()),
    "scale_by_adam_eps_root": (
        lambda: optim.chain(optim.scale_by_adam(b1=0.5, eps_root=1e-8), optim.scale(-0.05)),
        (),
    ),
    "add_decayed_weights": (lambda: optim.chain(optim.add_decayed_weights(1e-3), optim.scale(-0.1)), ()),
    "add_decayed_weights_masked": (
        lambda: optim.chain(optim.add_decayed_weights(1e-2, mask=r"weight$"), optim.sgd(0.1)),
        (),
    ),
    "trace": (lambda: optim.chain(optim.trace(0.5), optim.scale_by_learning_rate(0.1)), ()),
    "trace_nesterov": (lambda: optim.chain(optim.trace(0.5, nesterov=True), optim.scale(-0.1)), ()),
    "clip_by_global_norm": (lambda: optim.chain(optim.clip_by_global_norm(2.0), optim.sgd(0.3)), ()),
    "masked": (
        lambda: optim.chain(optim.masked(optim.scale(0.5), [r"bias$", r"scale$"]), optim.sgd(0.2)),
        (),
    ),
    "freeze": (
        lambda: optim.multi_transform({"embed": optim.freeze(), "rest": optim.adam(0.05)}, LAYER_RULES),
        ("embed/weight",),
    ),
    "set_to_zero": (
        lambda: optim.multi_transform({"embed": optim.set_to_zero(), "rest": optim.sgd(0.1)}, LAYER_RULES),
        ("embed/weight",),
    ),
    "multi_transform": (
        lambda: optim.multi_transform(
            {"head": optim.sgd(0.1, momentum=0.5), "body": optim.adam(0.05)},
            lambda params: pytree.map_with_path(
                lambda p, _: "head" if p.startswith("head") else "body", params
            ),
        ),
        (),
    ),
    "sgd": (lambda: optim.sgd(0.1), ()),
    "sgd_momentum": (lambda: optim.sgd(0.05, momentum=0.9), ()),
    "sgd_nesterov": (lambda: optim.sgd(0.05, momentum=0.9, nesterov=True), ()),
    "adam": (lambda: optim.adam(0.05), ()),
    "adamw": (lambda: optim.adamw(0.05, weight_decay=1e-3), ()),
    "adamw_schedule_masked": (
        lambda: optim.adamw(
            optim.warmup_cosine_decay_schedule(0.0, 0.1, 10, 100, 0.01), weight_decay=1e-2, mask=r"weight$"
        ),
        (),
    ),
}


# ------------------------------------------------------------------------------------- generic contract


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_transform_contract(name, dtype):
    factory, frozen = CASES[name]
    tx = factory()
    params = make_params(dtype)
    # Frozen parameters start at their optimum so the loss can still go to ~0.
    target = pytree.map_with_path(
        lambda p, x, t: x.float() if p in frozen else t, params, make_params(seed=1)
    )
    loss0 = quad_loss(params, target)
    state = tx.init(params)

    donated_params, donated_state = clone(params), tx.init(clone(params))
    for step in range(100):
        grads = quad_grads(params, target)
        before = clone((grads, state, params))
        updates, new_state = tx.update(grads, state, params)
        if step < 5:
            assert_trees_equal(before, (grads, state, params))  # the pure path mutated nothing
            g = quad_grads(donated_params, target)
            u, donated_state = tx.update(g, donated_state, donated_params, donate=True)
            donated_params = optim.apply_updates(donated_params, u, donate=True)
        for path, u, p in zip(
            pytree.paths(params), pytree.leaves(updates, is_leaf=pytree.is_leaf_none), pytree.leaves(params)
        ):
            if u is None:
                assert name == "freeze" and path in frozen
                continue
            assert u.shape == p.shape and u.dtype == p.dtype and torch.isfinite(u).all(), path
        params, state = optim.apply_updates(params, updates), new_state
        if step == 4:
            assert_trees_equal((params, state), (donated_params, donated_state))

    assert quad_loss(params, target) < 0.02 * loss0
    initial = pytree.to_flat_dict(make_params(dtype))
    for path, p in pytree.to_flat_dict(params).items():
        assert torch.equal(p, initial[path]) == (path in frozen), path


def test_donated_update_reuses_buffers():
    params = make_params()
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(0.1, weight_decay=0.1))
    state = tx.init(params)
    grads = quad_grads(params, make_params(seed=1))
    updates, new_state = tx.update(grads, state, params, donate=True)
    adam_state = new_state[1][0]
    assert adam_state.count is state[1][0].count and adam_state.count.item() == 1
    for old, new in zip(
        pytree.leaves((state[1][0].mu, state[1][0].nu)), pytree.leaves((adam_state.mu, adam_state.nu))
    ):
        assert new is old
    assert optim.apply_updates(params, updates, donate=True) is params


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_scalars_are_not_rounded_to_bf16(donate):
    # x * 0.1 on a bf16 tensor computes with the float scalar; rounding 0.1 to bf16 first is off by 0.1%.
    g = {"w": torch.randn(64, generator=torch.Generator().manual_seed(0)).bfloat16()}
    want = g["w"] * 0.1
    tx = optim.scale(0.1)
    assert torch.equal(tx.update(clone(g), tx.init(g), donate=donate)[0]["w"], want)


# ------------------------------------------------------------------------------ torch.optim equivalence

REFERENCES = {
    "adamw": (
        lambda: optim.adamw(1e-2, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1),
        torch.optim.AdamW,
        dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1),
    ),
    "adamw_default_betas": (
        lambda: optim.adamw(3e-3, weight_decay=1e-2),
        torch.optim.AdamW,
        dict(lr=3e-3, weight_decay=1e-2),
    ),
    "adam": (lambda: optim.adam(1e-2), torch.optim.Adam, dict(lr=1e-2)),
    "sgd": (lambda: optim.sgd(0.05), torch.optim.SGD, dict(lr=0.05)),
    "sgd_momentum": (lambda: optim.sgd(0.05, momentum=0.9), torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "sgd_nesterov": (
        lambda: optim.sgd(0.05, momentum=0.9, nesterov=True),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, nesterov=True),
    ),
    "sgd_coupled_weight_decay": (
        lambda: optim.chain(optim.add_decayed_weights(0.01), optim.sgd(0.05, momentum=0.9)),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    ),
}


# float64 shows the math is identical. In float32 the two drift apart by rounding alone: torch.optim.AdamW
# multiplies by fp32(1 - lr * wd), off by ~3e-8 in the same direction every step, and ends ~4e-6 away from
# the float64 trajectory after 100 steps (this implementation stays within ~7e-7).
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_matches_torch_optim(name, dtype):
    factory, torch_cls, kwargs = REFERENCES[name]
    tx = factory()
    params, target = make_params(dtype), make_params(dtype, seed=1)
    ref = [p.clone().requires_grad_() for p in pytree.leaves(params)]
    ref_opt = torch_cls(ref, **kwargs)
    state = tx.init(params)
    noise = torch.Generator().manual_seed(2)
    for _ in range(100):
        grads = pytree.tree_map(
            lambda g: g + 0.3 * torch.randn(g.shape, generator=noise, dtype=dtype), quad_grads(params, target)
        )
        for r, g in zip(ref, pytree.leaves(grads)):
            r.grad = g.clone()
        ref_opt.step()
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    for p, r in zip(pytree.leaves(params), ref):
        assert p.dtype == dtype
        torch.testing.assert_close(p, r.detach(), **TOLERANCES[dtype])


def test_schedule_matches_torch_lambda_lr():
    sched = optim.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=5, decay_steps=30, end_value=1e-3)
    tx = optim.adamw(sched, weight_decay=0.1)
    params = make_params()
    ref = [p.clone().requires_grad_() for p in pytree.leaves(params)]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda step: float(sched(step)) / 1e-2)
    state = tx.init(params)
    for _ in range(40):
        grads = quad_grads(params, make_params(seed=1))
        for r, g in zip(ref, pytree.leaves(grads)):
            r.grad = g.clone()
        ref_opt.step()
        lr_sched.step()
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    for p, r in zip(pytree.leaves(params), ref):
        torch.testing.assert_close(p, r.detach(), **TOLERANCES[torch.float32])


# ------------------------------------------------------------------------------------------- schedules


def optax_linear(init, end, steps, begin, t):
    frac = 1 - min(max(t - begin, 0), steps) / steps
    return (init - end) * frac + end


def optax_cosine(init, decay_steps, alpha, exponent, t):
    cosine = 0.5 * (1 + math.cos(math.pi * min(t, decay_steps) / decay_steps))
    return init * ((1 - alpha) * cosine**exponent + alpha)


def optax_warmup_cosine(init, peak, warmup, decay_steps, end, t):
    if t < warmup:
        return optax_linear(init, peak, warmup, 0, t)
    return optax_cosine(peak, decay_steps - warmup, end / peak, 1.0, t - warmup)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (optim.constant_schedule(0.3), {0: 0.3, 7: 0.3, 10**6: 0.3}),
        (optim.linear_schedule(1.0, 0.1, 10), {0: 1.0, 5: 0.55, 10: 0.1, 20: 0.1}),
        (optim.linear_schedule(1.0, 0.0, 10, transition_begin=5), {0: 1.0, 5: 1.0, 10: 0.5, 15: 0.0}),
        (optim.linear_schedule(0.5, 0.0, 0), {0: 0.5, 3: 0.5}),
        (optim.cosine_decay_schedule(2.0, 10, alpha=0.1), {0: 2.0, 5: 1.1, 10: 0.2, 15: 0.2}),
        (optim.cosine_decay_schedule(1.0, 4, exponent=2.0), {2: 0.25}),
        (
            optim.warmup_cosine_decay_schedule(0.0, 1.0, 10, 110, end_value=0.1),
            {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1, 500: 0.1},
        ),
        (optim.warmup_cosine_decay_schedule(0.2, 1.0, 0, 10), {0: 1.0, 5: 0.5, 10: 0.0}),
        (
            optim.join_schedules([optim.constant_schedule(1.0), optim.linear_schedule(1.0, 0.0, 4)], [2]),
            {0: 1.0, 1: 1.0, 2: 1.0, 4: 0.5, 6: 0.0},
        ),
    ],
)
def test_schedule_hand_computed(schedule, expected):
    for step, value in expected.items():
        got = schedule(torch.tensor(step))
        assert got.dtype == torch.float32 and got.ndim == 0
        assert got.item() == pytest.approx(value, abs=1e-6), step
        assert schedule(step).item() == got.item()  # Python ints work too


def test_schedules_match_optax_formulas():
    cases = [
        (optim.linear_schedule(3e-4, 1e-5, 37, 11), lambda t: optax_linear(3e-4, 1e-5, 37, 11, t)),
        (optim.cosine_decay_schedule(1e-3, 50, 0.05, 1.5), lambda t: optax_cosine(1e-3, 50, 0.05, 1.5, t)),
        (
            optim.warmup_cosine_decay_schedule(1e-5, 1e-3, 13, 80, 2e-5),
            lambda t: optax_warmup_cosine(1e-5, 1e-3, 13, 80, 2e-5, t),
        ),
    ]
    steps = torch.arange(120)
    for schedule, formula in cases:
        got = torch.stack([schedule(s) for s in steps])
        want = torch.tensor([formula(t) for t in range(120)], dtype=torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("decay_type", ["linear", "cosine"])
def test_warmup_stable_decay_shape(decay_type):
    peak, end, init = 1e-3, 1e-5, 1e-4
    sched = optim.warmup_stable_decay_schedule(
        peak, 10, 20, 30, end_value=end, init_value=init, decay_type=decay_type
    )
    lr = torch.stack([sched(torch.tensor(t)) for t in range(80)])
    assert lr[0].item() == pytest.approx(init)
    assert (lr[1:11] > lr[:10]).all()  # warmup rises
    torch.testing.assert_close(lr[10:31], torch.full((21,), peak))  # stable at peak
    assert (lr[31:61] < lr[30:60]).all()  # decay falls
    torch.testing.assert_close(lr[60:], torch.full((20,), end))
    assert lr[45].item() == pytest.approx((peak + end) / 2, rel=1e-5)  # both tails are symmetric halfway
    if decay_type == "linear":
        torch.testing.assert_close(lr[30:61], torch.linspace(peak, end, 31), rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------ routing and masks


def test_multi_transform_regex_groups():
    lr, params = 1e-2, make_params()
    grads = pytree.tree_map(torch.ones_like, params)  # fixed grads: Adam steps then scale exactly with lr
    tx = optim.multi_transform(
        {
            "head": optim.adamw(10 * lr, weight_decay=0.0),
            "body": optim.adamw(lr, weight_decay=0.0),
            "frozen": optim.freeze(),
        },
        [(r"^head/", "head"), (r"^embed/", "frozen"), (r".*", "body")],
    )
    single = optim.adamw(lr, weight_decay=0.0)
    state, single_state = tx.init(params), single.init(params)

    assert state.inner_states["frozen"] == optim.EmptyState()
    tensor_paths = state_paths_with_tensors(state)
    assert not [p for p in tensor_paths if "embed" in p]  # no Adam moments for the frozen group
    assert len(tensor_paths) == 2 * (len(pytree.leaves(params)) - 1) + 2  # mu, nu per trained leaf + 2 counts

    new, ref = params, params
    for _ in range(3):
        updates, state = tx.update(grads, state, new)
        single_updates, single_state = single.update(grads, single_state, ref)
        assert updates["embed"]["weight"] is None
        new, ref = optim.apply_updates(new, updates), optim.apply_updates(ref, single_updates)
    assert new["embed"]["weight"] is params["embed"]["weight"]
    for path, p in pytree.to_flat_dict(new).items():
        p0, r = pytree.to_flat_dict(params)[path], pytree.to_flat_dict(ref)[path]
        if path.startswith("head/"):
            torch.testing.assert_close(p - p0, 10 * (r - p0), rtol=1e-5, atol=0)
        elif not path.startswith("embed/"):
            assert torch.equal(p, r), path


def test_multi_transform_label_forms_agree_and_errors():
    params, grads = make_params(), quad_grads(make_params(), make_params(seed=1))
    txs = {"a": optim.sgd(0.1), "b": optim.adam(0.1)}
    label = lambda path: "a" if "attn" in path else "b"
    forms = [
        [(r"attn", "a"), (r"", "b")],
        lambda p: pytree.map_with_path(lambda path, _: label(path), p),
        pytree.map_with_path(lambda path, _: label(path), params),
    ]
    results = []
    for labels in forms:
        tx = optim.multi_transform(txs, labels)
        results.append(tx.update(grads, tx.init(params), params))
    for other in results[1:]:
        assert_trees_equal(results[0], other)

    with pytest.raises(ValueError, match="no label rule matches parameter path 'embed/weight'"):
        optim.multi_transform({"head": optim.sgd(0.1)}, [(r"^head/", "head")]).init(params)
    with pytest.raises(ValueError, match="'nope'"):
        optim.multi_transform(txs, [(r"", "nope")]).init(params)
    with pytest.raises(ValueError, match="different tree structures"):
        optim.multi_transform(txs, {"embed": "a"}).init(params)


@pytest.mark.parametrize(
    "mask",
    [
        r"weight$",
        [r"attn/weight$", r"^(embed|head)/weight$"],
        lambda p: pytree.map_with_path(lambda path, _: path.endswith("weight"), p),
        pytree.map_with_path(lambda path, _: path.endswith("weight"), make_params()),
    ],
    ids=["regex", "regex_list", "callable", "bool_tree"],
)
def test_masked_weight_decay(mask):
    params = make_params()
    tx = optim.adamw(0.1, weight_decay=0.5, mask=mask)
    zero_grads = pytree.tree_map(torch.zeros_like, params)  # Adam's step is 0: only decay moves params
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optim.apply_updates(params, updates)
    for path, p in pytree.to_flat_dict(new).items():
        p0 = pytree.to_flat_dict(params)[path]
        if path.endswith("weight"):
            torch.testing.assert_close(p, p0 * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p, p0), path  # biases and norm scales are not decayed


def test_masked_inner_has_no_state_outside_mask():
    params = make_params()
    tx = optim.masked(optim.scale_by_adam(), r"^head/")
    state = tx.init(params)
    assert sorted(state_paths_with_tensors(state)) == sorted(
        ["inner_state/count"]
        + [f"inner_state/{m}/head/{n}" for m in ("mu", "nu") for n in ("weight", "bias")]
    )
    grads = quad_grads(params, make_params(seed=1))
    updates, _ = tx.update(grads, state, params)
    assert updates["embed"]["weight"] is grads["embed"]["weight"]  # passed through untouched
    assert not torch.equal(updates["head"]["weight"], grads["head"]["weight"])


def test_frozen_upstream_leaves_skip_stateful_transforms():
    params = make_params()
    tx = optim.chain(
        optim.multi_transform({"embed": optim.freeze(), "rest": optim.identity()}, LAYER_RULES),
        optim.adam(0.1),
    )
    updates, state = tx.update(pytree.tree_map(torch.ones_like, params), tx.init(params), params)
    assert updates["embed"]["weight"] is None and updates["head"]["bias"] is not None
    assert torch.equal(state[1][0].mu["embed"]["weight"], torch.zeros(5, 4))  # untouched, not NaN


# ------------------------------------------------------------------------------------- norms and errors


def test_global_norm_and_clipping():
    tree = {"a": torch.tensor([3.0]), "b": [torch.tensor([4.0], dtype=torch.bfloat16), None]}
    norm = optim.global_norm(tree)
    assert norm.dtype == torch.float32 and norm.item() == 5.0
    clip = optim.clip_by_global_norm(1.0)
    clipped, _ = clip.update(tree, clip.init(tree))
    assert clipped["b"][1] is None and clipped["b"][0].dtype == torch.bfloat16
    assert optim.global_norm(clipped).item() == pytest.approx(1.0, rel=1e-2)
    small = {"a": torch.tensor([0.3, 0.4])}
    assert torch.equal(clip.update(small, clip.init(small))[0]["a"], small["a"])


def test_structure_mismatch_is_a_clear_error():
    params = make_params()
    tx = optim.adam(0.1)
    state = tx.init(params)
    grads = quad_grads(params, make_params(seed=1))
    del grads["head"]["bias"]
    with pytest.raises(ValueError, match=r"scale_by_adam: .*different tree structures.*head/bias"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match="params"):
        optim.adamw(0.1).update(quad_grads(params, params), optim.adamw(0.1).init(params), None)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: optim.adam(-1e-3), "learning_rate"),
        (lambda: optim.scale_by_adam(b1=1.0), "b1"),
        (lambda: optim.scale_by_adam(b1=-0.1), "b1"),
        (lambda: optim.adamw(1e-3, b2=1.5), "b2"),
        (lambda: optim.scale_by_adam(eps=-1.0), "eps"),
        (lambda: optim.adamw(1e-3, weight_decay=-0.1), "weight_decay"),
        (lambda: optim.trace(1.0), "decay"),
        (lambda: optim.sgd(0.1, nesterov=True), "nesterov"),
        (lambda: optim.clip_by_global_norm(0.0), "max_norm"),
        (lambda: optim.linear_schedule(1.0, 0.0, -1), "transition_steps"),
        (lambda: optim.cosine_decay_schedule(1.0, 0), "decay_steps"),
        (lambda: optim.warmup_cosine_decay_schedule(0.0, 1.0, 10, 10), "decay_steps"),
        (lambda: optim.warmup_stable_decay_schedule(1.0, 1, 1, 1, decay_type="exp"), "decay_type"),
        (lambda: optim.join_schedules([optim.constant_schedule(1.0)], [3]), "boundaries"),
    ],
)
def test_bad_hyperparameters(make, name):
    with pytest.raises(ValueError, match=name):
        make()


# -------------------------------------------------------------------------------------------- compile


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_adamw_compiles_once(donate):
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    tx = optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10), weight_decay=0.1, mask=r"weight$")

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params, donate=donate)
        return optim.apply_updates(params, updates, donate=donate), state

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=counting_backend, dynamic=False)
    params, target = make_params(), make_params(seed=1)
    eager_params, eager_state = clone(params), tx.init(params)
    state = tx.init(params)
    for i in range(3):
        grads = quad_grads(params, target)
        params, state = compiled(params, state, grads)
        assert len(compiles) == 1, f"recompiled (or graph break) at call {i}"
        eager_params, eager_state = step(eager_params, eager_state, quad_grads(eager_params, target))
        for a, b in zip(pytree.leaves((params, state)), pytree.leaves((eager_params, eager_state))):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
    assert state[0].count.item() == 3
