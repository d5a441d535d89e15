"""pytree, random and device helpers."""

import pytest
import torch

from functional_mm import device, pytree, random


def test_pytree_paths_flatten_roundtrip():
    tree = {
        "w": torch.ones(2, 3),
        "layers": [{"b": torch.zeros(3)}, {"b": torch.ones(3)}],
        "t": (torch.ones(1),),
    }
    assert pytree.paths(tree) == ["w", "layers/0/b", "layers/1/b", "t/0"]
    leaves, treedef = pytree.flatten(tree)
    back = pytree.unflatten(treedef, leaves)
    assert pytree.same_structure(tree, back) and back["layers"][1]["b"] is tree["layers"][1]["b"]
    assert pytree.leaf_count(tree) == 6 + 3 + 3 + 1
    assert pytree.leaf_bytes(tree) == 13 * 4
    doubled = pytree.map_with_path(lambda p, x: x * 2 if p.startswith("layers") else x, tree)
    assert doubled["layers"][1]["b"].sum() == 6 and doubled["w"].sum() == 6
    assert not pytree.same_structure(tree, {"w": torch.ones(1)})


def test_flat_dict_roundtrip_rebuilds_lists():
    tree = {"embed": {"weight": torch.ones(1)}, "layers": [{"a": torch.zeros(1)}, {"a": torch.ones(1)}]}
    back = pytree.from_flat_dict(pytree.to_flat_dict(tree))
    assert isinstance(back["layers"], list) and pytree.same_structure(tree, back)
    for bad in ({"a/b/c": 1, "a/b": 2}, {"a": 1, "a/b": 2}):
        with pytest.raises(ValueError, match="both a leaf and a subtree"):
            pytree.from_flat_dict(bad)


def test_threefry_known_answers():
    # Random123 known-answer vectors for threefry2x32_20.
    cases = [
        ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ]
    for k, (c0, c1), expected in cases:
        y0, y1 = random._threefry2x32(torch.tensor(k), torch.tensor([c0]), torch.tensor([c1]))
        assert (int(y0), int(y1)) == expected


def test_split_matches_jax():
    # jax.random.split(jax.random.PRNGKey(0)) is the well-known pair below.
    assert random.split(random.key(0)).tolist() == [[4146024105, 967050713], [2718843009, 1272950319]]


def test_keys_are_deterministic_and_independent():
    k = random.key(42)
    a, b = random.split(k)
    assert torch.equal(random.normal(a, (64,)), random.normal(a, (64,)))
    assert not torch.equal(random.normal(a, (64,)), random.normal(b, (64,)))
    assert torch.equal(random.fold_in(k, 7), random.fold_in(k, torch.tensor(7)))
    assert not torch.equal(random.fold_in(k, 7), random.fold_in(k, 8))
    with pytest.raises(TypeError, match="PRNG key"):
        random.normal(torch.tensor([1.0, 2.0]), (3,))


def test_samplers_never_touch_global_rng():
    state = torch.random.get_rng_state()
    k = random.key(1)
    (
        random.normal(k, (10,)),
        random.uniform(k, (10,)),
        random.permutation(k, 10),
        random.randint(k, (3,), 0, 5),
    )
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sampler_statistics(dtype):
    k = random.key(3)
    n = 200_000
    x = random.normal(k, (n,), dtype).double()
    assert x.dtype == torch.float64 and abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    u = random.uniform(k, (n,), dtype, minval=-2, maxval=3).double()
    assert u.min() >= -2 and u.max() <= 3 and abs(u.mean() - 0.5) < 0.02
    t = random.truncated_normal(k, -1.5, 0.5, (n,), dtype).double()
    assert t.min() >= -1.5 and t.max() <= 0.5
    assert abs(random.bernoulli(k, 0.3, (n,)).double().mean() - 0.3) < 0.01
    r = random.randint(k, (n,), 2, 7)
    assert r.min() == 2 and r.max() == 6 and torch.bincount(r - 2).min() > n / 5 * 0.95
    p = random.permutation(k, 1000)
    assert sorted(p.tolist()) == list(range(1000)) and p.tolist() != list(range(1000))
    assert torch.equal(random.permutation(k, torch.arange(1000) * 2), p * 2)


def test_meta_device_allocates_nothing():
    with torch.device("meta"):
        x = random.normal(random.key(0), (100_000, 100_000))
    assert x.is_meta and x.shape == (100_000, 100_000)


def test_sampling_traces_under_compile():
    fn = torch.compile(lambda k: random.normal(random.fold_in(k, 3), (8,)), dynamic=False, fullgraph=True)
    k = random.key(5)
    torch.testing.assert_close(fn(k), random.normal(random.fold_in(k, 3), (8,)))


def test_device_helpers():
    assert device.default_device_type() in ("npu", "cuda", "cpu")
    assert device.distributed_backend("cpu") == "gloo"
    assert device.distributed_backend("npu") == "hccl"
    with pytest.raises(ValueError, match="unknown device type"):
        device.distributed_backend("tpu")
