"""Interop with the real tools: orbax-checkpoint (JAX, CPU) restores our checkpoints and we restore its own.

Needs the ``interop`` extra (``jax[cpu]``, ``orbax-checkpoint``); skipped with that reason when it is missing.
"""

import os

import pytest

# Four host devices, so that orbax writes a genuinely sharded array (one chunk per device). Only effective if
# nothing imported jax before this module, which is the case in this test suite.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

jax = pytest.importorskip("jax", reason="the interop extra (jax[cpu] + orbax-checkpoint) is not installed")
ocp = pytest.importorskip("orbax.checkpoint", reason="the interop extra (orbax-checkpoint) is not installed")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from functional_mm import checkpoint, optim, pytree, random  # noqa: E402
from functional_mm.checkpoint import _dtypes  # noqa: E402
from functional_mm.train import TrainState  # noqa: E402


@pytest.fixture
def x64():
    # int64 leaves (step, PRNG key) stay int64 only with x64 on; restore JAX's default afterwards
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def _np(t: torch.Tensor) -> np.ndarray:
    return _dtypes.to_numpy(t)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _jax_target(x, sharding):
    """The JAX abstract tree for our saved tree: NamedTuples as dicts (orbax records fields as dict keys),
    an empty NamedTuple as None, tensors as ShapeDtypeStructs."""
    if isinstance(x, torch.Tensor):
        return jax.ShapeDtypeStruct(tuple(x.shape), _np(x).dtype, sharding=sharding)
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return None if not x else {k: _jax_target(getattr(x, k), sharding) for k in x._fields}
    if isinstance(x, dict):
        return {k: _jax_target(v, sharding) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_jax_target(v, sharding) for v in x)
    return x


def _our_state():
    g = torch.Generator().manual_seed(0)
    params = {
        "w": torch.randn(8, 6, generator=g),
        "emb": torch.randn(5, 4, generator=g).to(torch.bfloat16),
        "scale": torch.linspace(-3, 3, 16).to(torch.float8_e4m3fn),
        "frozen": torch.randn(3, generator=g),
    }
    tx = optim.multi_transform(
        {"train": optim.adamw(1e-2), "freeze": optim.set_to_zero()},
        {"w": "train", "emb": "train", "scale": "train", "frozen": "freeze"},
    )
    state = TrainState.create(params, tx, random.key(7))
    # non-zero moments, so that a mix-up between leaves would show
    bump = lambda x: x if x is None else (x.float() + 1).to(x.dtype)
    state = state._replace(opt_state=pytree.tree_map(bump, state.opt_state))
    assert any(x is None for x in pytree.leaves(state.opt_state))
    return state


def test_orbax_restores_our_checkpoint(tmp_path, x64):
    state = _our_state()
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        mgr.save(3, {"state": state, "config": {"lr": 0.01, "name": "tiny"}})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = _jax_target(mgr.restore(3, targets={"state": None})["state"], device)

    with ocp.CheckpointManager(tmp_path) as omgr:
        assert omgr.all_steps() == [3]
        out = omgr.restore(
            3,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), config=ocp.args.JsonRestore()),
        )
    assert out["config"] == {"lr": 0.01, "name": "tiny"}
    flat_ours = pytree.flatten_with_paths(state)[0]
    flat_jax = {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp): v
        for kp, v in jax.tree_util.tree_flatten_with_path(out["state"])[0]
    }
    tensors = [(p, t) for p, t in flat_ours if isinstance(t, torch.Tensor)]
    assert len(flat_jax) == len(tensors)
    dtypes = set()
    for path, t in tensors:
        got = np.asarray(flat_jax[path])
        want = _np(t)
        assert _same_bits(got, want), (path, got.dtype, want.dtype)  # bit-exact, bf16 / fp8 included
        dtypes.add(got.dtype)
    assert {np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(np.int64)} <= dtypes


@pytest.mark.parametrize("layout", ["default", "zarr3_per_array"])
def test_we_restore_an_orbax_checkpoint(tmp_path, x64, layout):
    devices = jax.devices()
    assert len(devices) == 4, "XLA_FLAGS was set too late: jax was imported before this module"
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2), ("fsdp", "tp"))
    P = jax.sharding.PartitionSpec
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    state = {
        "params": {
            "w": jax.device_put(w, jax.sharding.NamedSharding(mesh, P("fsdp", "tp"))),  # 4 chunks
            "emb": jax.numpy.asarray(rng.standard_normal((4, 3)), dtype=jax.numpy.bfloat16),
            "f8": jax.numpy.asarray(np.linspace(-2, 2, 8), dtype=jax.numpy.float8_e5m2),
        },
        "opt": [{"count": jax.numpy.asarray(5, dtype=jax.numpy.int64)}, None],
        "key": jax.numpy.asarray([0, 42], dtype=jax.numpy.uint32),
    }
    handler = (
        ocp.StandardCheckpointHandler()  # orbax's default: OCDBT database per item
        if layout == "default"
        else ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True)
    )
    save_args = ocp.args.StandardSave(state) if layout == "default" else ocp.args.PyTreeSave(state)
    with ocp.CheckpointManager(
        tmp_path, item_handlers={"state": handler, "meta": ocp.JsonCheckpointHandler()}
    ) as m:
        m.save(9, args=ocp.args.Composite(state=save_args, meta=ocp.args.JsonSave({"epoch": 2})))
        m.wait_until_finished()

    target = {
        "params": {
            "w": torch.empty(8, 6),
            "emb": torch.empty(4, 3, dtype=torch.bfloat16),
            "f8": torch.empty(8, dtype=torch.float8_e5m2),
        },
        "opt": [{"count": torch.empty((), dtype=torch.int64)}, None],
        "key": torch.empty(2, dtype=torch.uint32),
    }
    mgr = checkpoint.CheckpointManager(tmp_path)
    assert mgr.all_steps() == [9]
    out = mgr.restore(targets={"state": target, "meta": None})
    assert out["meta"] == {"epoch": 2}
    got = out["state"]
    assert pytree.same_structure(got, target)
    refs = [
        state["params"]["w"],
        state["params"]["emb"],
        state["params"]["f8"],
        state["opt"][0]["count"],
        state["key"],
    ]
    tensors = [(p, t) for p, t in pytree.flatten_with_paths(got)[0] if t is not None]
    assert len(tensors) == len(refs)
    for (path, t), ref in zip(tensors, refs):
        ref = np.asarray(ref)
        assert _same_bits(_np(t), ref), (path, _np(t).dtype, ref.dtype)
    # no target: the stored structure, as orbax itself would return it
    bare = mgr.restore(9, targets={"state": None})["state"]
    assert bare["opt"][1] is None and torch.equal(bare["params"]["w"], torch.from_numpy(w))
