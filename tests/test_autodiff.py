"""value_and_grad / grad against torch.autograd; remat gradients and honestly measured activation memory."""

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from functional_mm import autodiff, nn, pytree, random


def _mlp_params():
    k1, k2 = random.split(random.key(0))
    return {
        "mlp": nn.unbox(nn.mlp.init_mlp(k1, 6, 16))[0],
        "head": nn.unbox(nn.linear.init(k2, 6, 1, axes=("embed", None), bias=True))[0],
        "count": torch.tensor(3),  # integer leaf: no gradient
        "unused": torch.ones(2),  # float leaf the loss ignores: zero gradient
    }


def _mlp_loss(p, x, y):
    pred = nn.linear.apply(p["head"], nn.mlp.mlp(p["mlp"], x))[..., 0]  # [B]
    return ((pred - y) ** 2).mean()


def test_value_and_grad_matches_torch_autograd_on_mlp():
    params = _mlp_params()
    x, y = random.normal(random.key(1), (8, 6)), random.normal(random.key(2), (8,))
    loss, grads = autodiff.value_and_grad(_mlp_loss)(params, x, y)

    ref = pytree.tree_map(lambda t: t.clone().requires_grad_(t.is_floating_point()), params)
    ref_loss = _mlp_loss(ref, x, y)
    ref_loss.backward()
    assert torch.equal(loss, ref_loss.detach()) and not loss.requires_grad
    assert pytree.same_structure(grads, params)
    for path, g in pytree.flatten_with_paths(grads)[0]:
        if path == "count":
            assert g is None
        elif path == "unused":
            assert torch.equal(g, torch.zeros(2))
        else:
            r = pytree.to_flat_dict(ref)[path].grad
            torch.testing.assert_close(g, r, rtol=0, atol=0)
    # The caller's tensors are untouched: no requires_grad flag, no .grad.
    assert all(not t.requires_grad and t.grad is None for t in pytree.leaves(params))
    # grad() is the second half of value_and_grad().
    g2 = autodiff.grad(_mlp_loss)(params, x, y)
    assert torch.equal(g2["mlp"]["fc1"]["weight"], grads["mlp"]["fc1"]["weight"])


def test_has_aux_argnums_and_no_grad_context():
    def f(a, b, scale):
        out = (a["w"] * b).sum() * scale
        return out, {"b_sum": b.sum() * a["w"].sum()}

    a, b = {"w": torch.tensor([1.0, 2.0])}, torch.tensor([3.0, 4.0])
    with torch.no_grad():  # value_and_grad must differentiate regardless of the caller's grad mode
        (v, aux), (ga, gb) = autodiff.value_and_grad(f, argnums=(0, 1), has_aux=True)(a, b, 2.0)
    assert v.item() == 22.0 and aux["b_sum"].item() == 21.0 and not aux["b_sum"].requires_grad
    assert ga["w"].tolist() == [6.0, 8.0] and gb.tolist() == [2.0, 4.0]
    gb_only, aux2 = autodiff.grad(f, argnums=1, has_aux=True)(a, b, 2.0)
    assert torch.equal(gb_only, gb) and torch.equal(aux2["b_sum"], aux["b_sum"])
    # A loss that does not depend on the argument at all: zero gradients, not an autograd error.
    assert autodiff.grad(lambda p: torch.tensor(1.0))({"w": torch.ones(2)})["w"].tolist() == [0.0, 0.0]


def test_errors_are_clear():
    with pytest.raises(TypeError, match=r"scalar \(0-d\) tensor, got shape \(3,\)"):
        autodiff.value_and_grad(lambda x: x * 2)(torch.ones(3))
    with pytest.raises(TypeError, match="pass has_aux=True"):
        autodiff.value_and_grad(lambda x: (x.sum(), {}))(torch.ones(3))
    with pytest.raises(TypeError, match="must return \\(value, aux\\)"):
        autodiff.value_and_grad(lambda x: x.sum(), has_aux=True)(torch.ones(3))
    with pytest.raises(ValueError, match="argnums=2"):
        autodiff.value_and_grad(lambda x: x.sum(), argnums=2)(torch.ones(3))
    with pytest.raises(ValueError, match="unknown policy"):
        autodiff.remat(lambda x: x, policy="some")


def test_value_and_grad_on_dtensor_leaves(tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = torch.arange(6.0).reshape(3, 2)
        p = {"w": distribute_tensor(w, mesh, [Shard(0)])}

        def f(p, x):  # redistribute inside the differentiated function: the case torch.func.grad breaks on
            return (x @ p["w"].redistribute(mesh, [Replicate()]).to_local()).square().sum()

        x = torch.ones(4, 3)
        loss, g = autodiff.value_and_grad(f)(p, x)
        ref = w.clone().requires_grad_()
        (x @ ref).square().sum().backward()
        assert loss.item() == pytest.approx((x @ w).square().sum().item())
        assert g["w"].placements == (Shard(0),)
        torch.testing.assert_close(g["w"].full_tensor(), ref.grad)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# remat


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by ops under this mode that are still alive when asked: after a forward,
    that is exactly the activation memory held for backward (autograd saved tensors, checkpoint inputs,
    selective-checkpoint caches), whoever holds it."""

    def __init__(self):
        super().__init__()
        self.storages = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.storages.setdefault(s._cdata, (StorageWeakRef(s), s.nbytes()))
        return out

    def live(self) -> int:
        return sum(n for ref, n in self.storages.values() if not ref.expired())


def _block(p, x):  # [N, D] -> [N, D]; one matmul, then elementwise ops that each save an [N, D] tensor
    h = x @ p["w"]
    h = F.gelu(h) * torch.sigmoid(h)
    h = torch.tanh(h) * 0.5 + h.exp().clamp(max=3.0)
    return x + h * p["s"]


def _deep_loss(policy):
    block = autodiff.remat(_block, policy)

    def loss(params, x):
        for p in params:
            x = block(p, x)
        return x.square().mean()

    return loss


def test_remat_policies_same_grads_less_memory():
    D, L, N = 32, 6, 256  # activations (L * ~7 * N * D floats) dominate params (L * D * D)
    keys = random.split(random.key(3), L)
    params = [{"w": random.normal(k, (D, D)) / D**0.5, "s": torch.full((D,), 0.1)} for k in keys]
    x = random.normal(random.key(4), (N, D))
    act = N * D * 4  # bytes of one [N, D] fp32 activation

    results = {}
    for policy in ("none", "selective", "full"):
        fn = _deep_loss(policy)
        live = {}

        def measured(params, x, fn=fn, live=live):
            with _LiveBytes() as m:
                loss = fn(params, x)
            live["bytes"] = m.live()  # measured between forward and backward: the peak of saved activations
            return loss

        results[policy] = (*autodiff.value_and_grad(measured)(params, x), live["bytes"])

    loss0, g0, mem_none = results["none"]
    for policy in ("selective", "full"):
        loss, g, _ = results[policy]
        assert torch.equal(loss, loss0)
        for a, b in zip(pytree.leaves(g), pytree.leaves(g0)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    mem_sel, mem_full = results["selective"][2], results["full"][2]
    assert mem_full < mem_sel < mem_none
    # Per block: full keeps the block input; selective adds the matmul output; none keeps ~7 tensors.
    assert mem_full == pytest.approx(L * act, rel=0.01)
    assert mem_sel == pytest.approx(2 * L * act, rel=0.01)
    assert mem_none > 5 * L * act


def test_remat_callable_policy_and_pytree_kwargs():
    from torch.utils.checkpoint import CheckpointPolicy

    seen = set()

    def save_nothing(ctx, op, *args, **kwargs):
        seen.add(op)
        return CheckpointPolicy.PREFER_RECOMPUTE

    p = {"w": random.normal(random.key(5), (4, 4)), "s": torch.ones(4)}
    x = random.normal(random.key(6), (3, 4))
    ref = autodiff.grad(lambda p: _block(p, x=x).sum())(p)
    for policy in (save_nothing, [torch.ops.aten.mm.default], None, "none"):
        g = autodiff.grad(lambda p, policy=policy: autodiff.remat(_block, policy)(p, x=x).sum())(p)
        torch.testing.assert_close(g["w"], ref["w"], rtol=1e-6, atol=1e-7)
    assert torch.ops.aten.mm.default in seen
    assert autodiff.remat(_block, None) is _block
