"""The train step against a hand-written torch.autograd + torch.optim reference, accumulation, donation,
mixed precision, loss scaling, compilation (without recompiles) and keys."""

import pytest
import torch
from torch._dynamo.utils import counters

from functional_mm import autodiff, nn, optim, pytree, random
from functional_mm.train import MixedPrecision, TrainState, make_train_step

D, H, B = 4, 16, 8


def _init(seed=0):
    k1, k2 = random.split(random.key(seed))
    boxed = {
        "mlp": nn.mlp.init_mlp(k1, D, H),
        "head": nn.linear.init(k2, D, 1, axes=("embed", None), bias=True),
    }
    return nn.unbox(boxed)[0]


def _forward(p, x, remat=None):  # x: [B, D] -> [B]
    h = autodiff.remat(nn.mlp.mlp, remat)(p["mlp"], x)  # [B, D]
    return nn.linear.apply(p["head"], h)[..., 0]


def _loss(p, batch, key):
    err = _forward(p, batch["x"]) - batch["y"]  # [B]
    return (err.float() ** 2).mean(), {"max_err": err.abs().max().float()}


def _batch(seed=1, n=B):
    kx, ky = random.split(random.key(seed))
    x = random.normal(kx, (n, D))
    return {"x": x, "y": torch.sin(x.sum(-1)) + 0.1 * random.normal(ky, (n,))}


def _clone(tree):
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def _assert_trees_close(a, b, **tol):
    assert pytree.same_structure(a, b)
    for x, y in zip(pytree.leaves(a), pytree.leaves(b)):
        torch.testing.assert_close(x, y, **tol)


def test_eager_step_matches_torch_adamw():
    sched = optim.linear_schedule(1e-2, 5e-3, 3)
    tx = optim.adamw(sched, weight_decay=0.1)
    state = TrainState.create(_init(), tx, random.key(0))
    step = make_train_step(_loss, tx, compile=False, lr_schedule=sched)

    ref = pytree.tree_map(lambda t: t.clone().requires_grad_(), _init())
    torch_opt = torch.optim.AdamW(pytree.leaves(ref), lr=1e-2, weight_decay=0.1)
    for i in range(3):
        batch = _batch(seed=10 + i)
        before = _clone(state.params)
        state, m = step(state, batch)

        torch_opt.param_groups[0]["lr"] = float(sched(i))
        torch_opt.zero_grad()
        ref_loss, ref_aux = _loss(ref, batch, None)
        ref_loss.backward()
        ref_gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pytree.leaves(ref)]))
        torch_opt.step()

        torch.testing.assert_close(m["loss"], ref_loss.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m["max_err"], ref_aux["max_err"].detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m["grad_norm"], ref_gnorm, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m["lr"], torch.tensor(float(sched(i))))
        delta = pytree.tree_map(torch.sub, state.params, before)
        torch.testing.assert_close(m["update_norm"], optim.global_norm(delta), rtol=1e-5, atol=1e-7)
        assert m["nonfinite"].item() == 0.0 and all(v.dim() == 0 for v in m.values())
        _assert_trees_close(state.params, pytree.tree_map(torch.Tensor.detach, ref), rtol=1e-6, atol=1e-6)
    assert int(state.step) == 3 and state.step.dtype == torch.int64


def test_grad_accum_equals_full_batch_and_names_bad_leaf():
    tx = optim.adamw(1e-2)
    batch = _batch()
    full, m_full = make_train_step(_loss, tx, compile=False)(
        TrainState.create(_init(), tx, random.key(0)), batch
    )
    acc, m_acc = make_train_step(_loss, tx, compile=False, grad_accum_steps=2)(
        TrainState.create(_init(), tx, random.key(0)), batch
    )
    _assert_trees_close(acc.params, full.params, rtol=1e-6, atol=1e-6)
    _assert_trees_close(acc.opt_state, full.opt_state, rtol=1e-6, atol=1e-7)
    for name in ("loss", "grad_norm", "update_norm"):
        torch.testing.assert_close(m_acc[name], m_full[name], rtol=1e-6, atol=1e-7)

    bad = {"x": batch["x"], "y": batch["y"][:7]}
    with pytest.raises(ValueError, match=r"does not divide dim 0 of batch leaf 'y' \(shape \(7,\)\)"):
        make_train_step(_loss, tx, compile=False, grad_accum_steps=2)(
            TrainState.create(_init(), tx, random.key(0)), bad
        )


def test_keys_split_per_step_and_fold_in_per_microbatch():
    def loss_fn(p, batch, key):  # the aux metric exposes the key the step handed to this microbatch
        return (p["w"] * batch).sum(), {"u": random.uniform(key, ())}

    tx = optim.sgd(0.1)
    state = TrainState.create({"w": torch.ones(2)}, tx, random.key(7))
    state1, m = make_train_step(loss_fn, tx, compile=False, grad_accum_steps=2)(state, torch.ones(4, 2))
    next_key, step_key = random.split(random.key(7))
    expected = (
        random.uniform(random.fold_in(step_key, 0), ()) + random.uniform(random.fold_in(step_key, 1), ())
    ) / 2
    torch.testing.assert_close(m["u"], expected)
    assert torch.equal(state1.key, next_key)


def test_donate_matches_pure_path():
    tx = optim.adamw(1e-2, weight_decay=0.1)
    pure_step = make_train_step(_loss, tx, compile=False)
    donate_step = make_train_step(_loss, tx, compile=False, donate=True)
    pure = TrainState.create(_init(), tx, random.key(0))
    donated = TrainState.create(_init(), tx, random.key(0))
    for i in range(3):
        batch = _batch(seed=20 + i)
        w_before = donated.params["head"]["weight"]
        pure, m_pure = pure_step(pure, batch)
        donated, m_don = donate_step(donated, batch)
        assert donated.params["head"]["weight"] is w_before  # updated in place: the old state is consumed
        _assert_trees_close(donated.params, pure.params, rtol=0, atol=0)
        _assert_trees_close(donated.opt_state, pure.opt_state, rtol=0, atol=0)
        for name in m_pure:
            torch.testing.assert_close(m_don[name], m_pure[name], rtol=0, atol=0)
    # autograd hands back one tensor for both inputs of an add and a stride-0 view for the grad of a sum:
    # the donated (in-place) update must not apply twice or write into an expanded view.
    sgd = optim.sgd(0.1, momentum=0.9)
    for loss_fn in (
        lambda p, b, k: ((p["a"] + p["b"]) * b).square().sum(),  # grads of a and b: one tensor object
        lambda p, b, k: (p["a"] * b).square().sum() + p["c"].sum(),  # grad of c: ones expanded, stride 0
    ):
        params = {"a": torch.ones(3), "b": torch.full((3,), 2.0), "c": torch.ones(3)}
        pure, _ = make_train_step(loss_fn, sgd, compile=False)(
            TrainState.create(params, sgd, random.key(0)), 1.0
        )
        donated, _ = make_train_step(loss_fn, sgd, compile=False, donate=True)(
            TrainState.create(_clone(params), sgd, random.key(0)), 1.0
        )
        _assert_trees_close(donated.params, pure.params, rtol=0, atol=0)
    with pytest.raises(ValueError, match="donate=True cannot be combined with loss scaling"):
        make_train_step(_loss, tx, donate=True, mixed_precision="fp16")


def test_bf16_keeps_fp32_master_params():
    seen = []

    def loss_fn(p, batch, key):
        seen.append((p["head"]["weight"].dtype, batch["x"].dtype))
        return _loss(p, batch, key)

    tx = optim.adamw(1e-2)
    state = TrainState.create(_init(), tx, random.key(0))
    fp32_state, m32 = make_train_step(_loss, tx, compile=False)(state, _batch())
    state, m = make_train_step(loss_fn, tx, compile=False, mixed_precision="bf16")(state, _batch())
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert all(
        t.dtype == torch.float32 for t in pytree.leaves(state.params) + pytree.leaves(state.opt_state[0].mu)
    )
    assert m["loss"].dtype == torch.float32 and state.loss_scale is None
    # bf16 forward: ~3 significant digits
    torch.testing.assert_close(m["loss"], m32["loss"], rtol=2e-2, atol=0)
    assert not torch.equal(state.params["head"]["weight"], _init()["head"]["weight"])


def test_fp16_loss_scaling_skips_nonfinite_step_and_adapts_scale():
    mp = MixedPrecision(torch.float16, loss_scaling=True, init_scale=2.0**10, growth_interval=2)
    tx = optim.adamw(1e-2)
    step = make_train_step(_loss, tx, compile=False, mixed_precision=mp)
    state = TrainState.create(_init(), tx, random.key(0), mixed_precision=mp)

    bad = _batch()
    bad["x"][0, 0] = float("inf")
    skipped, m = step(state, bad)
    assert m["nonfinite"].item() == 1.0 and int(skipped.step) == 1
    _assert_trees_close(skipped.params, state.params, rtol=0, atol=0)
    _assert_trees_close(skipped.opt_state, state.opt_state, rtol=0, atol=0)  # Adam's count did not advance
    assert skipped.loss_scale.scale.item() == 2.0**9 and int(skipped.loss_scale.good_steps) == 0
    assert not torch.equal(skipped.key, state.key)

    s1, m1 = step(skipped, _batch())
    assert m1["nonfinite"].item() == 0.0 and int(s1.opt_state[0].count) == 1
    assert not torch.equal(s1.params["head"]["weight"], state.params["head"]["weight"])
    assert s1.loss_scale.scale.item() == 2.0**9 and int(s1.loss_scale.good_steps) == 1
    s2, _ = step(s1, _batch())  # growth_interval=2 finite steps: the scale doubles and the counter restarts
    assert s2.loss_scale.scale.item() == 2.0**10 and int(s2.loss_scale.good_steps) == 0
    # The unscaled fp16 gradients drive the same update as fp32 up to fp16 rounding.
    ref, m_ref = make_train_step(_loss, tx, compile=False)(
        TrainState.create(_init(), tx, random.key(0)), _batch()
    )
    torch.testing.assert_close(m1["grad_norm"], m_ref["grad_norm"], rtol=1e-2, atol=0)
    with pytest.raises(ValueError, match=r"TrainState.create\(\.\.\., mixed_precision=\.\.\.\)"):
        step(TrainState.create(_init(), tx, random.key(0)), _batch())


def test_nan_loss_is_reported_not_hidden():
    tx = optim.sgd(0.1)
    batch = _batch()
    batch["y"][3] = float("nan")
    state, m = make_train_step(_loss, tx, compile=False)(TrainState.create(_init(), tx, random.key(0)), batch)
    assert m["nonfinite"].item() == 1.0 and torch.isnan(m["loss"])
    assert torch.isnan(state.params["head"]["bias"]).all()  # fp32: reported only, the update is applied


def test_aux_metric_names_may_not_clash():
    tx = optim.sgd(0.1)
    step = make_train_step(lambda p, b, k: ((p["w"] * b).sum(), {"loss": b.sum()}), tx, compile=False)
    with pytest.raises(ValueError, match=r"aux metrics \['loss'\] clash"):
        step(TrainState.create({"w": torch.ones(2)}, tx, random.key(0)), torch.ones(2))


def test_loss_decreases_on_toy_regression():
    tx = optim.adamw(3e-2, weight_decay=0.0)
    step = make_train_step(_loss, tx, compile=False)
    state, batch = TrainState.create(_init(), tx, random.key(0)), _batch(n=64)
    losses = []
    for _ in range(60):
        state, m = step(state, batch)
        losses.append(m["loss"].item())
    assert losses[-1] < 0.25 * losses[0]


def test_compiled_step_matches_eager_and_does_not_recompile():
    torch._dynamo.reset()
    # Selective remat inside the compiled microbatch graph: checkpoint + traced autograd.grad.
    loss_fn = lambda p, batch, key: ((_forward(p, batch["x"], remat="selective") - batch["y"]) ** 2).mean()
    tx = optim.adamw(1e-2, weight_decay=0.1)
    eager = make_train_step(loss_fn, tx, compile=False, grad_accum_steps=2)
    compiled = make_train_step(loss_fn, tx, compile=True, grad_accum_steps=2)
    s_eager = s_comp = TrainState.create(_init(), tx, random.key(0))
    graphs, breaks = [], []
    graphs0, breaks0 = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    for i in range(3):
        batch = _batch(seed=30 + i)
        s_eager, m_eager = eager(s_eager, batch)
        s_comp, m_comp = compiled(s_comp, batch)
        graphs.append(counters["stats"]["unique_graphs"] - graphs0)
        breaks.append(sum(counters["graph_break"].values()) - breaks0)
        _assert_trees_close(s_comp.params, s_eager.params, rtol=1e-5, atol=1e-5)
        _assert_trees_close(s_comp.opt_state, s_eager.opt_state, rtol=1e-5, atol=1e-5)
        for name in m_eager:
            torch.testing.assert_close(m_comp[name], m_eager[name], rtol=1e-5, atol=1e-5)
    assert int(s_comp.step) == 3
    # Two graphs (microbatch grads, reused by both microbatches; update), compiled on the first call only.
    assert graphs == [2, 2, 2] and breaks == [0, 0, 0]


def test_compiled_fp16_skip_and_donation_match_eager():
    mp = MixedPrecision(torch.float16, loss_scaling=True, init_scale=2.0**10)
    bad = _batch()
    bad["x"][0, 0] = float("inf")
    # fp16: inductor computes fp16 elementwise ops in fp32 and rounds once, eager rounds after every op, so the
    # two differ at fp16 resolution (~1e-3 relative in grads). SGD keeps that difference linear in the params
    # (Adam's normalisation would blow it up for near-zero grads).
    cases = [
        (
            optim.sgd(0.1),
            dict(mixed_precision=mp),
            [bad, _batch(seed=40), _batch(seed=41)],
            dict(rtol=2e-3, atol=1e-4),
        ),
        (
            optim.adamw(1e-2, weight_decay=0.1),
            dict(donate=True),
            [_batch(), _batch(2)],
            dict(rtol=1e-5, atol=1e-5),
        ),
    ]
    for tx, kw, batches, tol in cases:
        eager = make_train_step(_loss, tx, compile=False, **kw)
        compiled = make_train_step(_loss, tx, compile=True, **kw)
        s_eager = TrainState.create(_init(), tx, random.key(0), mixed_precision=kw.get("mixed_precision"))
        s_comp = _clone(s_eager)
        for i, batch in enumerate(batches):
            s_eager, m_eager = eager(s_eager, batch)
            s_comp, m_comp = compiled(s_comp, batch)
            _assert_trees_close(s_comp, s_eager, **tol)
            for name in m_eager:  # the skipped fp16 step reports a NaN/inf loss and grad norm
                torch.testing.assert_close(m_comp[name], m_eager[name], **tol, equal_nan=True)
            if i == 0 and "mixed_precision" in kw:  # the inf step was skipped under compile too
                _assert_trees_close(s_comp.params, _init(), rtol=0, atol=0)
                assert m_comp["nonfinite"].item() == 1.0 and s_comp.loss_scale.scale.item() == 2.0**9
