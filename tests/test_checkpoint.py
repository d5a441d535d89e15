"""functional_mm.checkpoint in one process: round trips, manager policies, async saves, corruption, mismatches."""

import json
import os
from typing import NamedTuple

import pytest
import tensorstore as ts
import torch

from functional_mm import checkpoint, optim, pytree, random
from functional_mm.checkpoint import _item, _layout
from functional_mm.checkpoint._manager import TMP_SUFFIX
from functional_mm.train import TrainState

Options = checkpoint.CheckpointManagerOptions


class Pair(NamedTuple):
    a: torch.Tensor
    b: object


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so that equality is exact for NaNs and fp8 alike."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


def _exact(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(_bits(a), _bits(b))
        )
    return a == b and type(a) is type(b)


def _state():
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(6, 5, generator=g)
    return {
        "f32": f32,
        "f32_nan": torch.tensor([float("nan"), float("inf"), -0.0]),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(3, generator=g).half(),
        "e4m3": torch.linspace(-400, 400, 33).to(torch.float8_e4m3fn),
        "e5m2": torch.linspace(-5e4, 5e4, 33).to(torch.float8_e5m2),
        "i64": torch.tensor([2**62, -(2**62), 7]),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "zero_d": torch.tensor(3.5),
        "zeros": torch.zeros(4, 4),  # all equal to the fill value: still stored
        "empty": torch.zeros(0, 3),
        "pair": Pair(torch.ones(2), None),
        "seq": [torch.tensor([1, 2]), (torch.tensor(3.0),)],
        "none": None,
        "empty_tuple": (),
        "scalars": {"lr": 0.5, "count": 3, "flag": True},
    }


def test_round_trip_is_exact_for_every_dtype(tmp_path):
    state = _state()
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        assert mgr.save(1, {"state": state, "config": {"name": "x", "sizes": [1, 2]}})
        mgr.wait_until_finished()
        out = mgr.restore(1, targets={"state": state, "config": None})
    assert out["config"] == {"name": "x", "sizes": [1, 2]}
    got = out["state"]
    assert pytree.same_structure(got, state) and isinstance(got["pair"], Pair)
    for (path, a), b in zip(pytree.flatten_with_paths(got)[0], pytree.leaves(state)):
        assert _exact(a, b), path


def test_restore_without_target_gives_orbax_structure(tmp_path):
    state = _state()
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"state": state, "n": 5})
        mgr.wait_until_finished()
        out = mgr.restore()
    assert out["n"] == 5
    got = out["state"]
    assert set(got["pair"]) == {"a", "b"} and got["pair"]["b"] is None  # NamedTuple fields become a dict
    assert isinstance(got["seq"], list) and isinstance(got["seq"][1], list)
    assert got["empty_tuple"] == () and got["none"] is None
    assert got["scalars"] == {"lr": 0.5, "count": 3, "flag": True}
    assert _exact(got["bf16"], state["bf16"]) and _exact(got["e4m3"], state["e4m3"])


def test_train_state_round_trip_with_abstract_target(tmp_path):
    params = {"w": torch.randn(4, 3), "frozen": torch.randn(3)}
    tx = optim.multi_transform(
        {"train": optim.adamw(1e-2), "freeze": optim.set_to_zero()}, {"w": "train", "frozen": "freeze"}
    )
    state = TrainState.create(params, tx, random.key(1))
    assert any(x is None for x in pytree.leaves(state.opt_state))  # the frozen parameter's moments
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        mgr.save(10, {"state": state})
        mgr.wait_until_finished()
        abstract = pytree.tree_map(lambda x: x if x is None else torch.empty_like(x, device="meta"), state)
        got = mgr.restore(targets={"state": abstract})["state"]
    assert isinstance(got, TrainState) and got.loss_scale is None
    assert pytree.same_structure(got, state)
    for a, b in zip(pytree.leaves(got), pytree.leaves(state)):
        assert (a is None and b is None) or (_exact(a, b) and a.device.type == "cpu")


def test_on_disk_layout_is_orbax(tmp_path):
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        mgr.save(3, {"state": {"params": {"w": torch.ones(2, 3)}, "opt": [torch.zeros(2)]}, "cfg": {"a": 1}},
                 metrics={"loss": torch.tensor(0.25)})  # fmt: skip
    step = tmp_path / "3"
    assert sorted(os.listdir(step)) == ["_CHECKPOINT_METADATA", "cfg", "commit_success.txt", "state"]
    meta = json.loads((step / "_CHECKPOINT_METADATA").read_text())
    assert meta["metrics"] == {"loss": 0.25}
    assert meta["item_handlers"]["state"].endswith("StandardCheckpointHandler")
    assert meta["item_handlers"]["cfg"].endswith("JsonCheckpointHandler")
    assert json.loads((step / "cfg" / "metadata").read_text()) == {"a": 1}
    state = step / "state"
    assert {"_METADATA", "_sharding", "array_metadatas", "params.w", "opt.0"} <= set(os.listdir(state))
    tree = json.loads((state / "_METADATA").read_text())["tree_metadata"]
    assert tree["('opt', '0')"]["key_metadata"] == [
        {"key": "opt", "key_type": 2},
        {"key": "0", "key_type": 1},
    ]
    zarr = json.loads((state / "params.w" / "zarr.json").read_text())
    assert zarr["zarr_format"] == 3 and zarr["data_type"] == "float32" and zarr["shape"] == [2, 3]
    codec = zarr["codecs"][0]
    assert codec["name"] == "sharding_indexed" and {"name": "crc32c"} in codec["configuration"]["codecs"]
    assert os.path.isfile(state / "params.w" / "c" / "0" / "0")


def test_large_tensor_spans_several_files_and_partial_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(_layout, "SHARD_FILE_BYTES", 4096)
    monkeypatch.setattr(_layout, "INNER_CHUNK_BYTES", 1024)
    w = torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32)  # 8 KiB -> 2 files of 4 inner chunks
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"s": {"w": w}})
        mgr.wait_until_finished()
        zarr = json.loads((tmp_path / "1" / "s" / "w" / "zarr.json").read_text())
        assert zarr["chunk_grid"]["configuration"]["chunk_shape"] == [32, 32]
        assert zarr["codecs"][0]["configuration"]["chunk_shape"] == [8, 32]
        assert sorted(os.listdir(tmp_path / "1" / "s" / "w" / "c")) == ["0", "1"]
        assert torch.equal(mgr.restore(1, targets={"s": {"w": torch.empty(64, 32)}})["s"]["w"], w)


@pytest.mark.parametrize("mode", ["memmap", "default"])
def test_restore_reads_in_chunk_aligned_pieces(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(_layout, "SHARD_FILE_BYTES", 4096)
    monkeypatch.setattr(_layout, "INNER_CHUNK_BYTES", 1024)  # [64, 32] f32: inner chunks of 8 rows
    monkeypatch.setattr(_item, "READ_PIECE_BYTES", 2048)  # two chunks a piece
    monkeypatch.setattr(_item, "MAX_READ_INFLIGHT_BYTES", 3000)  # at most one piece in flight
    monkeypatch.setattr(_item, "FILE_IO_MODE", mode)
    w = torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32)
    with checkpoint.CheckpointManager(tmp_path, Options(async_save=False)) as mgr:
        mgr.save(1, {"s": {"w": w, "v": torch.arange(5.0)}})
        got = mgr.restore(1, targets={"s": {"w": torch.empty(64, 32), "v": torch.empty(5)}})["s"]
        assert torch.equal(got["w"], w) and torch.equal(got["v"], torch.arange(5.0))
    store = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "1" / "s" / "w")}}
    ).result()
    region = store[5:43, 3:30]  # an unaligned box, as a resharded DTensor target has
    pieces = _item._read_pieces(region, 4)
    rows = [p[0] for p in pieces]
    assert all(p[1] == slice(0, 27) for p in pieces)  # cut along the leading dim only
    # cut at the global multiples of 16 rows (2 chunks of 8): 5..16, 16..32, 32..43
    assert rows == [slice(0, 11), slice(11, 27), slice(27, 38)]
    monkeypatch.setattr(_item, "READ_PIECE_BYTES", 100)  # smaller than a chunk row: cut the next dim too
    pieces = _item._read_pieces(region, 4)
    covered = torch.zeros(38, 27, dtype=torch.int32)
    for p in pieces:
        covered[p] += 1
        assert all((s.start + o) % 8 == 0 or s.start == 0 for s, o in zip(p[:1], (5,)))
    assert bool((covered == 1).all())  # the pieces tile the region exactly


def test_chunk_grid_follows_uneven_and_nested_splits():
    assert _layout._split_points(10, [4]) == {0, 3, 6, 9, 10}
    assert _layout._split_points(10, [2, 2]) == {0, 3, 5, 8, 10}  # nested torch.chunk: 3, 2, 3, 2
    assert _layout._shrink((1024, 1024), 4, 2**20) == (256, 1024)  # leading dim split: contiguous chunks
    assert _layout._shrink((7, 1024), 4, 4096) == (1, 1024)  # a prime extent falls back to 1
    assert _layout._shrink((3, 5, 4096), 4, 4096) == (1, 1, 1024)


# ------------------------------------------------------------------------------------------------------------
# manager policies


def _tiny(v):
    return {"w": torch.full((2,), float(v))}


def test_intervals_max_to_keep_and_keep_period(tmp_path):
    mgr = checkpoint.CheckpointManager(tmp_path, Options(save_interval_steps=2, max_to_keep=2, keep_period=4))
    saved = [s for s in range(1, 11) if mgr.save(s, {"s": _tiny(s)})]
    mgr.close()
    assert saved == [2, 4, 6, 8, 10]
    assert mgr.all_steps() == [4, 8, 10] and mgr.latest_step() == 10  # 4 and 8 kept by keep_period
    assert not mgr.should_save(10) and not mgr.should_save(9) and mgr.should_save(12)
    assert mgr.save(11, {"s": _tiny(11)}, force=True)  # force skips the interval
    with pytest.raises(ValueError, match="already exists"):
        mgr.save(11, {"s": _tiny(11)}, force=True)
    mgr.close()


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_fn_keeps_the_best(tmp_path, mode):
    opts = Options(max_to_keep=2, best_fn=lambda m: m["loss"], best_mode=mode, async_save=False)
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0}
    with checkpoint.CheckpointManager(tmp_path, opts) as mgr:
        for s, loss in losses.items():
            mgr.save(s, {"s": _tiny(s)}, metrics={"loss": loss})
        mgr.save(5, {"s": _tiny(5)})  # no metrics: never deleted by the best policy (orbax's default)
        kept, best = ([2, 3], 2) if mode == "min" else ([1, 4], 4)
        assert mgr.all_steps() == [*kept, 5]
        assert mgr.best_step() == best
        assert mgr.metrics(best) == {"loss": losses[best]} and mgr.metrics(5) is None


def test_uncommitted_steps_are_not_listed_and_are_cleaned(tmp_path):
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"s": _tiny(1)})
    (tmp_path / f"2{TMP_SUFFIX}" / "s").mkdir(parents=True)  # a crashed save
    (tmp_path / f"1{TMP_SUFFIX}-deleted-5").mkdir()  # a crashed delete
    assert checkpoint.CheckpointManager.all_steps(type("M", (), {"directory": str(tmp_path)})()) == [1]
    mgr = checkpoint.CheckpointManager(tmp_path)
    assert mgr.all_steps() == [1] and sorted(os.listdir(tmp_path)) == ["1"]
    assert mgr.should_save(2)


# ------------------------------------------------------------------------------------------------------------
# async


def test_async_save_snapshots_before_returning(tmp_path):
    w = torch.zeros(256, 256)
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"s": {"w": w}})
        w.add_(1.0)  # a donating step right after save: the checkpoint keeps the values at save time
        mgr.wait_until_finished()
        assert torch.equal(mgr.restore(1)["s"]["w"], torch.zeros(256, 256))


def test_async_host_copies_are_reused_by_the_next_save(tmp_path, monkeypatch):
    w, h = torch.zeros(256, 256), torch.zeros(8, dtype=torch.bfloat16)
    real = _item.write_shards

    def slow(*a, **kw):  # the donating step below lands while each save is still writing
        import time

        time.sleep(0.2)
        return real(*a, **kw)

    monkeypatch.setattr(_item, "write_shards", slow)
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        ptrs = []
        for step in (1, 2, 3):
            mgr.save(step, {"s": {"w": w, "h": h}})
            ptrs.append(mgr._host_buffers["s"]["w"].data_ptr())
            w.add_(1.0)  # in place, while the save is in flight
            h.add_(1.0)
        mgr.wait_until_finished()
        assert ptrs[0] == ptrs[1] == ptrs[2]  # one host copy, reused
        for step in (1, 2, 3):
            got = mgr.restore(step)["s"]
            assert torch.equal(got["w"], torch.full((256, 256), step - 1.0)), step
            assert torch.equal(got["h"], torch.full((8,), step - 1.0, dtype=torch.bfloat16)), step
        mgr.save(4, {"s": {"w": torch.zeros(3, 3)}})  # another shape: a new copy, the old one dropped
        assert list(mgr._host_buffers["s"]) == ["w"] and mgr._host_buffers["s"]["w"].shape == (3, 3)
    assert mgr._host_buffers == {}
    with checkpoint.CheckpointManager(tmp_path, Options(reuse_host_buffers=False)) as mgr:
        mgr.save(5, {"s": {"w": w}})
        assert mgr._host_buffers == {}
        mgr.wait_until_finished()


def test_async_without_copy_refuses_torn_data(tmp_path, monkeypatch):
    w = torch.zeros(256, 256)
    real = _item.write_shards

    def slow(*a, **kw):  # make sure the in-place change below lands while the save is in flight
        import time

        time.sleep(0.2)
        return real(*a, **kw)

    monkeypatch.setattr(_item, "write_shards", slow)
    with checkpoint.CheckpointManager(tmp_path, Options(host_copy=False)) as mgr:
        mgr.save(1, {"s": {"w": w}})
        w.add_(1.0)
        with pytest.raises(checkpoint.CheckpointSaveError, match="modified in place"):
            mgr.wait_until_finished()
        assert mgr.all_steps() == [] and os.listdir(tmp_path) == []
        mgr.save(2, {"s": {"w": w}})  # untouched this time: commits, without a copy
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2]


def test_async_errors_surface_at_next_save_and_wait(tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise OSError("no space left (injected)")

    with checkpoint.CheckpointManager(tmp_path) as mgr:
        monkeypatch.setattr(_item, "write_shards", broken)
        assert mgr.save(1, {"s": _tiny(1)})  # returns: the failure happens in the background
        with pytest.raises(checkpoint.CheckpointSaveError, match="no space left"):
            mgr.save(2, {"s": _tiny(2)})
        mgr.save(3, {"s": _tiny(3)})
        with pytest.raises(checkpoint.CheckpointSaveError, match="step 3"):
            mgr.wait_until_finished()
        monkeypatch.undo()
        mgr.save(4, {"s": _tiny(4)})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [4] and os.listdir(tmp_path) == ["4"]


# ------------------------------------------------------------------------------------------------------------
# corruption and mismatches


def _saved(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {"params": {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}}
    with checkpoint.CheckpointManager(tmp_path, Options(async_save=False)) as mgr:
        mgr.save(5, {"state": state})
    return state, tmp_path / "5" / "state" / "params.w" / "c" / "0" / "0"


@pytest.mark.parametrize("damage", ["flip_data", "flip_index", "truncate", "delete"])
def test_corrupt_chunk_names_array_and_step(tmp_path, damage):
    state, chunk = _saved(tmp_path)
    data = bytearray(chunk.read_bytes())
    if damage == "flip_data":
        data[100] ^= 0x10
        chunk.write_bytes(bytes(data))
    elif damage == "flip_index":
        data[-10] ^= 0x01
        chunk.write_bytes(bytes(data))
    elif damage == "truncate":
        chunk.write_bytes(bytes(data[: len(data) // 2]))
    else:
        chunk.unlink()
    mgr = checkpoint.CheckpointManager(tmp_path)
    with pytest.raises(checkpoint.CheckpointCorruptError, match=r"step 5, item 'state': array 'params/w'"):
        mgr.restore(5, targets={"state": state})
    got = mgr.restore(
        5, targets={"state": {"params": {"b": state["params"]["b"]}}}
    )  # other arrays still read
    assert torch.equal(got["state"]["params"]["b"], state["params"]["b"])


def test_corrupt_metadata_names_step(tmp_path):
    state, _ = _saved(tmp_path)
    (tmp_path / "5" / "state" / "_METADATA").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointCorruptError, match="step 5, item 'state'"):
        checkpoint.CheckpointManager(tmp_path).restore(5, targets={"state": state})


def test_mismatched_target_lists_every_difference(tmp_path):
    state, _ = _saved(tmp_path)
    target = {
        "params": {
            "w": torch.empty(64, 32),
            "b": torch.empty(64, dtype=torch.bfloat16),
            "extra": torch.empty(2),
        },
        "lr": 0.1,
    }
    with pytest.raises(checkpoint.TargetMismatchError) as err:
        checkpoint.CheckpointManager(tmp_path).restore(5, targets={"state": target})
    msg = str(err.value)
    assert "4 mismatch(es)" in msg, msg
    assert "params/w: shape [64, 64] in checkpoint vs [64, 32] in target" in msg
    assert "params/b: dtype float32 in checkpoint vs bfloat16 in target" in msg
    assert "params/extra: missing from the checkpoint" in msg and "lr: missing from the checkpoint" in msg


def test_restore_errors_name_steps_and_items(tmp_path):
    mgr = checkpoint.CheckpointManager(tmp_path)
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        mgr.restore()
    mgr.save(1, {"s": _tiny(1)})
    mgr.wait_until_finished()
    with pytest.raises(FileNotFoundError, match="no committed step 2"):
        mgr.restore(2)
    with pytest.raises(KeyError, match="no item"):
        mgr.restore(1, targets={"nope": None})
    with pytest.raises(ValueError, match="meta tensor"):
        mgr.save(2, {"s": {"w": torch.empty(2, device="meta")}})
    mgr.close()
