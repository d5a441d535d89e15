"""functional_mm.checkpoint across processes: sharded saves, resharding restores, HF sharded import/export.

One 4-process gloo run (spawning is the expensive part on a 2-core machine) does every multi-process step and
returns a report; the parent process prepares the inputs (a single-process checkpoint, a transformers
directory) and checks what the ranks wrote (files on disk, a single-process restore, transformers loading the
sharded export). The tests below assert on parts of that report.
"""

import contextlib
import json
import os
from pathlib import Path

import pytest
import tensorstore as ts
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from functional_mm import checkpoint, nn, pytree, random
from functional_mm.checkpoint import _item, _layout
from functional_mm.models.hf import io as hf_io
from functional_mm.models.hf import llama as hf_llama
from functional_mm.optim._base import EmptyState
from functional_mm.optim._transforms import ScaleByAdamState
from functional_mm.parallelism import abstract_init, make_mesh, run_local, shard
from functional_mm.parallelism._describe import shard_ranges
from functional_mm.train import TrainState

RULES_2D = [("vocab", ("fsdp", "tp")), ("heads", "tp"), ("kv_heads", "tp"), ("mlp", "tp"), ("embed", "fsdp"),
            ("norm", None)]  # fmt: skip
RULES_FSDP = [(n, "fsdp") for n in ("vocab", "heads", "kv_heads", "mlp", "embed")] + [("norm", None)]
HF_CFG = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48, max_seq_len=64)


def _boxed(key):
    ka, km, ke, kb, kg = random.split(key, 5)
    return {
        "embed": nn.embedding.init(ke, 24, 8),  # [vocab, embed]
        "attn": nn.attention.init(ka, 8, 4, 2),
        "mlp": nn.mlp.init_gated(km, 8, 16),
        "norm": nn.norms.init_rms_norm(8),  # replicated under both rule sets
        "half": nn.param(random.normal(kb, (16, 8)).to(torch.bfloat16), ("mlp", "embed")),
        "odd": nn.param(
            torch.arange(10 * 8, dtype=torch.float32).reshape(10, 8), ("vocab", "embed")
        ),  # uneven
        # large enough (x3 with the moments: 1.5 MiB) that bytes read per rank are not just zarr.json reads
        "big": nn.param(random.normal(kg, (1024, 128)), ("vocab", "embed")),
    }


def _full_state():
    """The train state every process builds identically: NamedTuples, None and an empty state included."""
    params, axes = nn.unbox(_boxed(random.key(0)))
    params["norm"]["scale"] = torch.linspace(0.5, 1.5, 8)
    mu = pytree.tree_map(lambda x: x * 2, params)
    nu = pytree.tree_map(lambda x: x * x, params)
    opt = (ScaleByAdamState(torch.tensor(5), mu, nu), EmptyState())
    fp8 = torch.linspace(-2, 2, 8).to(torch.float8_e4m3fn)
    state = TrainState(torch.tensor(5), params, opt, random.key(3), None)
    return {"train": state, "fp8": fp8, "frozen": None}, axes


def _sharded(full, axes, mesh, rules):
    """Place ``full`` on ``mesh``: params and moments sharded by ``rules``, scalars and keys as plain tensors."""

    def place(tree):
        return shard(tree, axes, mesh, rules, allow_uneven=True)

    s = full["train"]
    adam = s.opt_state[0]
    opt = (ScaleByAdamState(adam.count, place(adam.mu), place(adam.nu)), EmptyState())
    return {**full, "train": s._replace(params=place(s.params), opt_state=opt)}


def _local_equal(x, full) -> bool:
    if not isinstance(x, DTensor):
        return torch.equal(x, full)
    mesh = x.device_mesh
    ranges = shard_ranges(x.shape, x.placements, mesh.shape, mesh.get_coordinate())
    return torch.equal(x.to_local(), full[tuple(slice(s, s + n) for s, n in ranges)])


def _trees_equal(got, want) -> bool:
    if not pytree.same_structure(got, want):
        return False
    return all(
        (g is None and w is None) or _local_equal(g, w)
        for g, w in zip(pytree.leaves(got), pytree.leaves(want))
    )


@contextlib.contextmanager
def _pread_reads():
    """Restores read files with pread inside: tensorstore's byte counters do not see memory-mapped reads."""
    mode, _item.FILE_IO_MODE = _item.FILE_IO_MODE, "default"
    try:
        yield
    finally:
        _item.FILE_IO_MODE = mode


def _file_bytes(kind: str) -> int:
    for m in ts.experimental_collect_matching_metrics(f"/tensorstore/kvstore/file/bytes_{kind}"):
        return sum(v["value"] for v in m["values"])
    return 0


class _SliceSpy:
    """Wraps safetensors.safe_open to record which tensors were read whole and which as slices."""

    def __init__(self, real):
        self.real, self.whole, self.sliced = real, [], 0

    def __call__(self, *a, **kw):
        spy = self

        class Handle:
            def __init__(self):
                self.h = spy.real(*a, **kw)

            def __enter__(self):
                self.f = self.h.__enter__()
                return self

            def __exit__(self, *exc):
                return self.h.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_slice(self, name):
                s = self.f.get_slice(name)

                class Slice:
                    def get_shape(self):
                        return s.get_shape()

                    def __getitem__(self, idx):
                        out = s[idx]
                        spy.sliced += out.numel()
                        return out

                return Slice()

            def get_tensor(self, name):
                spy.whole.append(name)
                return self.f.get_tensor(name)

        return Handle()


def _four_ranks(root: str, hf_dir: str) -> dict:
    out: dict = {}
    mesh_f = make_mesh({"fsdp": 4})
    rank = dist.get_rank()
    mesh_2 = make_mesh({"fsdp": 2, "tp": 2})
    full, axes = _full_state()
    total = sum(x.numel() * x.element_size() for x in pytree.leaves(full) if isinstance(x, torch.Tensor))

    # 1 -> 4 ranks: a single-process checkpoint (written by the parent) onto fsdp=4, read in regions
    target_f = _sharded(full, axes, mesh_f, RULES_FSDP)
    with checkpoint.CheckpointManager(os.path.join(root, "single")) as mgr:
        before = _file_bytes("read")
        with _pread_reads():
            got = mgr.restore(1, targets={"state": target_f})["state"]
        out["read_1to4"] = _file_bytes("read") - before
    out["restore_1to4"] = _trees_equal(got, full) and isinstance(
        got["train"].params["embed"]["weight"], DTensor
    )
    out["restore_1to4_types"] = (type(got["train"]).__name__, type(got["train"].opt_state[0]).__name__)
    out["total_bytes"] = total

    # sharded save (fsdp=4, async), each rank writing only what it owns
    mgr = checkpoint.CheckpointManager(
        os.path.join(root, "dist"), checkpoint.CheckpointManagerOptions(max_to_keep=2)
    )
    before = _file_bytes("written")
    assert mgr.save(2, {"state": target_f, "meta": {"rank_count": 4}}, metrics={"loss": 1.0})
    mgr.wait_until_finished()
    out["written"] = _file_bytes("written") - before
    out["steps_after_save"] = mgr.all_steps()

    # fsdp=4 -> fsdp=2 x tp=2, with a meta (abstract) target for the params
    target_2 = _sharded(full, axes, mesh_2, RULES_2D)
    abstract_params, _ = abstract_init(_boxed, random.key(0), mesh=mesh_2, rules=RULES_2D, allow_uneven=True)
    meta_target = {**target_2, "train": target_2["train"]._replace(params=abstract_params)}
    before = _file_bytes("read")
    with _pread_reads():
        got2 = mgr.restore(2, targets={"state": meta_target, "meta": None})
    out["read_4to2x2"] = _file_bytes("read") - before
    out["restore_4to2x2"] = _trees_equal(got2["state"], full)
    out["meta_item"] = got2["meta"]
    out["placements_2x2"] = tuple(got2["state"]["train"].params["mlp"]["up"]["weight"].placements)

    # partial restore: params only, as a plain dict subtree of the saved TrainState
    part = mgr.restore(2, targets={"state": {"train": {"params": target_2["train"].params}}})["state"]
    out["partial"] = _trees_equal(part["train"]["params"], full["train"].params) and list(part["train"]) == [
        "params"
    ]

    # a failing rank: nothing is committed, every rank sees the error at wait_until_finished
    real = _item.write_shards
    if rank == 1:

        def broken(*a, **kw):
            raise OSError("disk full (injected)")

        _item.write_shards = broken
    try:
        mgr.save(3, {"state": target_f})
        try:
            mgr.wait_until_finished()
            out["failure"] = "no error"
        except checkpoint.CheckpointSaveError as e:
            out["failure"] = str(e)
    finally:
        _item.write_shards = real
    out["steps_after_failure"] = mgr.all_steps()
    out["leftovers"] = sorted(n for n in os.listdir(os.path.join(root, "dist")) if not n.isdigit())
    dist.barrier()  # nobody starts the next save while rank 0 is still listing the directory

    # a second sharded save (2x2 layout) exercises max_to_keep across processes
    mgr.save(4, {"state": target_2})
    mgr.save(5, {"state": target_2})  # waits for step 4 first
    mgr.close()
    with checkpoint.CheckpointManager(os.path.join(root, "dist")) as fresh:
        out["steps_final"] = fresh.all_steps()

    # HF: load straight into the 2x2 layout reading slices only, then export the sharded tree in place
    spy = _SliceSpy(hf_io.safe_open)
    hf_io.safe_open = spy
    try:
        cfg, sharded = hf_llama.load_pretrained(hf_dir, mesh=mesh_2, rules=RULES_2D)
    finally:
        hf_io.safe_open = spy.real
    _, ref = hf_llama.load_pretrained(hf_dir)
    out["hf_whole_reads"] = spy.whole
    out["hf_sliced_elems"] = spy.sliced
    out["hf_total_elems"] = sum(x.numel() for x in pytree.leaves(ref))
    out["hf_load"] = _trees_equal(sharded, ref) and all(
        isinstance(x, DTensor) for x in pytree.leaves(sharded)
    )
    export = os.path.join(root, "hf_export")
    out["hf_files"] = hf_llama.save_pretrained(sharded, cfg, export, max_shard_bytes=20_000)
    out["hf_roundtrip"] = _trees_equal(hf_llama.load_pretrained(export, mesh=mesh_2, rules=RULES_2D)[1], ref)

    per_rank = [None] * 4
    dist.all_gather_object(
        per_rank, {k: out[k] for k in ("read_1to4", "read_4to2x2", "written", "hf_sliced_elems")}
    )
    out["per_rank"] = per_rank
    for k in ("restore_1to4", "restore_4to2x2", "partial", "hf_load", "hf_roundtrip"):
        flags = [None] * 4
        dist.all_gather_object(flags, out[k])
        out[k] = flags
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("ckpt_dist")
    full, _ = _full_state()
    # Reads happen in whole inner chunks (<= 8 MiB); at test sizes a single-process checkpoint would be one
    # chunk per tensor, so this one uses 32 KiB chunks to make "each rank reads its quarter" observable.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_layout, "INNER_CHUNK_BYTES", 32 * 2**10)
        with checkpoint.CheckpointManager(
            root / "single", checkpoint.CheckpointManagerOptions(async_save=False)
        ) as m:
            m.save(1, {"state": full})
    hf_cfg = transformers.LlamaConfig(
        vocab_size=HF_CFG["vocab_size"], hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(root / "hf", max_shard_size="20KB")  # several files plus an index
    out = run_local(_four_ranks, 4, str(root), str(root / "hf"), timeout=240)
    out["root"], out["full"], out["model"] = root, full, model
    return out


def test_restore_single_process_checkpoint_onto_four_ranks(report):
    assert report["restore_1to4"] == [True] * 4
    assert report["restore_1to4_types"] == ("TrainState", "ScaleByAdamState")


def test_each_rank_reads_about_its_share(report):
    total = report["total_bytes"]
    for r in report["per_rank"]:
        # a quarter of the sharded arrays, the replicated ones whole, plus zarr.json / index reads
        assert 0.15 * total < r["read_1to4"] < 0.35 * total, (r, total)
        assert r["read_4to2x2"] < 0.35 * total, (r, total)
    assert sum(r["read_1to4"] for r in report["per_rank"]) < 1.2 * total


def test_sharded_save_writes_each_shard_once(report):
    total = report["total_bytes"]
    written = [r["written"] for r in report["per_rank"]]
    assert 0.95 * total < sum(written) < 1.25 * total, (written, total)  # no duplicate replicas (+ metadata)
    assert all(w > 0.1 * total for w in written), written  # everyone wrote its own shards
    assert report["steps_after_save"] == [2]
    state = Path(report["root"]) / "dist" / "5" / "state"  # saved from the fsdp=2 x tp=2 layout

    def files(name):
        return sorted(
            str(p.relative_to(state / name / "c")) for p in (state / name / "c").rglob("*") if p.is_file()
        )

    assert files("train.params.embed.weight") == ["0/0", "1/0", "2/0", "3/0"]  # [24, 8] over fsdp x tp
    assert files("train.params.mlp.up.weight") == ["0/0", "0/1", "1/0", "1/1"]  # [16, 8]: (tp, fsdp)
    assert files("train.params.norm.scale") == ["0"]  # replicated: one file, written once
    procs = sorted(os.listdir(state / "array_metadatas"))
    assert procs == [f"process_{i}" for i in range(4)]
    meta = json.loads((state / "_METADATA").read_text())
    assert meta["use_zarr3"] is True and meta["use_ocdbt"] is False
    assert meta["tree_metadata"]["('frozen',)"]["value_metadata"]["value_type"] == "None"


def test_reshard_fsdp4_to_fsdp2_tp2_with_meta_target(report):
    assert report["restore_4to2x2"] == [True] * 4
    assert report["meta_item"] == {"rank_count": 4}
    from torch.distributed.tensor import Shard

    assert report["placements_2x2"] == (Shard(1), Shard(0))  # up: [mlp, embed] -> (tp, fsdp)


def test_sharded_checkpoint_restores_in_one_process(report):
    mgr = checkpoint.CheckpointManager(Path(report["root"]) / "dist")
    got = mgr.restore(5, targets={"state": report["full"]})["state"]
    assert _trees_equal(got, report["full"])
    assert got["fp8"].dtype == torch.float8_e4m3fn
    assert got["train"].params["half"].dtype == torch.bfloat16


def test_partial_restore_params_only(report):
    assert report["partial"] == [True] * 4


def test_failed_rank_commits_nothing(report):
    assert "disk full (injected)" in report["failure"] and "rank 1" in report["failure"]
    assert report["steps_after_failure"] == [2]
    assert report["leftovers"] == []
    assert report["steps_final"] == [4, 5]  # max_to_keep=2


def test_hf_sharded_load_reads_slices_only(report):
    assert report["hf_load"] == [True] * 4
    # every tensor was sharded on the 2x2 mesh or replicated (norms, read whole by get_slice[:]): never
    # get_tensor, and the ranks together read far less than 4 full copies
    for r in report["per_rank"]:
        assert r["hf_sliced_elems"] < 0.5 * report["hf_total_elems"]
    assert report["hf_whole_reads"] == []


def test_hf_sharded_export_loads_in_transformers(report):
    transformers = pytest.importorskip("transformers")
    export = Path(report["root"]) / "hf_export"
    assert "model.safetensors.index.json" in report["hf_files"]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        export, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref = report["model"]
    for (n, p), (n2, p2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    assert report["hf_roundtrip"] == [True] * 4
