import logging
import os

import pytest
import torch

from functional_mm.data import (
    CHATML,
    BucketBatcher,
    Bucketing,
    ChatVLM,
    ImageCaption,
    JsonlSource,
    Loader,
    Packer,
    PackingBatcher,
    ShuffleBatcher,
    SkipSample,
    TooManySkipsError,
    VideoClip,
    load_tokenizer,
    synthetic,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mm"))
    synthetic.make_images(d, 24)
    synthetic.make_videos(d, 12, frames=12)
    return d


def _images(d):
    return JsonlSource(os.path.join(d, "images.jsonl"))


def _take(loader, n):
    return [b for _, b in zip(range(n), loader)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["pixels"], y["pixels"]) and x["caption"] == y["caption"]


def _loader(d, **kw):
    src = _images(d)
    kw.setdefault("seed", 3)
    return Loader(src, ImageCaption(size=(32, 32), crop="random"), ShuffleBatcher(len(src), 4), **kw)


def test_resume_is_exact_across_epochs(data_dir):
    # 24 samples / 4 = 6 steps per epoch: 4 + 5 crosses an epoch boundary.
    ref = _take(_loader(data_dir), 9)
    first = _loader(data_dir)
    head = _take(first, 4)
    state = first.state()
    assert state["epoch"] == 0 and state["step"] == 4
    second = _loader(data_dir)
    second.restore(state)
    _same(head + _take(second, 5), ref)
    assert ref[0]["pixels"].shape == (4, 3, 32, 32)
    # epochs reshuffle; the random crops are keyed per (seed, epoch, sample), not per call
    assert ref[0]["caption"] != ref[6]["caption"]
    with pytest.raises(ValueError, match="dp_size"):
        _loader(data_dir, dp_size=2).restore(state)


@pytest.mark.parametrize("workers,kind", [(2, "process"), (2, "thread")])
def test_workers_do_not_change_batches_and_resume_works(data_dir, workers, kind):
    ref = _take(_loader(data_dir), 8)
    with _loader(data_dir, num_workers=workers, worker_type=kind, prefetch=2) as a:
        head = _take(a, 3)
        state = a.state()
        _same(head + _take(a, 5), ref)
    with _loader(data_dir, num_workers=workers, worker_type=kind) as b:
        b.restore(state)
        _same(head + _take(b, 5), ref)
        assert b.stats()["samples_seen"] == 32 and b.stats()["data_wait_s"] > 0


def test_dp_ranks_split_each_global_batch(data_dir):
    whole = _take(_loader(data_dir, num_epochs=1), 10)
    assert len(whole) == 6
    ranks = [_take(_loader(data_dir, num_epochs=1, dp_rank=r, dp_size=2), 10) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 24 / (4 x 2)
    caps = [c for r in ranks for b in r for c in b["caption"]]
    assert len(caps) == 24 and sorted(caps) == sorted(c for b in whole for c in b["caption"])


def test_corrupt_and_missing_media_are_skipped_counted_logged(data_dir, tmp_path, caplog):
    src = list(_images(data_dir))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    src[1] = {**src[1], "image": str(tmp_path / "bad.png")}
    src[2] = {**src[2], "image": str(tmp_path / "missing.png")}
    loader = Loader(
        src,
        ImageCaption(size=(16, 16)),
        ShuffleBatcher(len(src), 4, shuffle=False),
        num_epochs=1,
        max_skip_fraction=0.2,
        skip_check_after=8,
    )
    with caplog.at_level(logging.WARNING, logger="functional_mm.data"):
        batches = list(loader)
    assert all(b["pixels"].shape[0] == 4 for b in batches)  # spares filled the holes
    assert loader.stats()["samples_skipped"] == 2
    assert "bad.png" in caplog.text and "missing.png" in caplog.text and "file not found" in caplog.text
    # the same data with a 5% budget stops with a clear error listing the reasons
    strict = Loader(
        src,
        ImageCaption(size=(16, 16)),
        ShuffleBatcher(len(src), 4, shuffle=False),
        max_skip_fraction=0.05,
        skip_check_after=4,
    )
    with pytest.raises(TooManySkipsError, match=r"(?s)2 of \d+ samples skipped.*bad.png"):
        list(zip(range(6), strict))


def test_processor_bugs_propagate_with_the_sample(data_dir):
    def broken(sample, ctx):
        if ctx.index == 5:
            raise KeyError("oops")
        if ctx.index == 6:
            raise SkipSample("too long")
        return {"i": ctx.index}

    src = _images(data_dir)
    with pytest.raises(RuntimeError, match=r"sample 5 \(.*00005.png\).*oops"):
        list(
            Loader(
                src, broken, ShuffleBatcher(len(src), 2, shuffle=False), num_epochs=1, max_skip_fraction=1.0
            )
        )


def test_video_buckets_through_the_loader(data_dir):
    src = JsonlSource(os.path.join(data_dir, "videos.jsonl"))
    res = {"vid": (48, 64)}  # the synthetic clips are 48x64, 64x64 and 48x80
    cfg = {"vid": {8: (1.0, 2), 4: (1.0, 3)}}
    batchers = [
        BucketBatcher(Bucketing(cfg, resolutions=res, aspect_ratios=(0.75, 0.6)), src) for _ in range(2)
    ]
    loaders = [
        Loader(src, VideoClip(interval=1), batchers[r], seed=1, dp_rank=r, dp_size=2, num_epochs=1)
        for r in range(2)
    ]
    steps = list(zip(*loaders))
    assert steps
    for a, b in steps:
        assert a["video"].shape == b["video"].shape  # the same bucket on both ranks in every step
        t, c, h, w = a["video"].shape[1:]
        assert t == 8 and c == 3 and (h, w) in {(48, 64), (48, 80)}
        assert a["video"].min() >= -1 and a["video"].max() <= 1


def test_vlm_packing_through_the_loader(data_dir):
    src = _images(data_dir)
    tok = load_tokenizer(None, special_tokens=CHATML.special_tokens)
    proc = ChatVLM(tok, CHATML, min_pixels=28 * 28, max_pixels=56 * 56)
    lengths = [proc.num_tokens(s) for s in src]
    loader = Loader(
        src,
        proc,
        PackingBatcher(lengths, seq_len=320, rows=2),
        collate=Packer(320, 2, pad_id=tok.pad),
        num_epochs=1,
    )
    batches = list(loader)
    assert batches
    pad = tok.token_to_id("<|image_pad|>")
    for b in batches:
        assert b["tokens"].shape == b["segment_ids"].shape == (2, 320)
        # every image's patches are there: placeholder tokens x merge^2 == patch rows
        assert (
            int((b["tokens"] == pad).sum()) * 4
            == b["pixel_values"].shape[0]
            == int(b["image_grid_thw"].prod(-1).sum())
        )
        assert (b["loss_mask"].bool() & (b["segment_ids"] == 0)).sum() == 0
    # the metadata-based length is exact
    s0 = proc(src[0], None)
    assert len(s0["tokens"]) == lengths[0]
