import collections

import numpy as np
import pytest
import torch

from functional_mm import random
from functional_mm.data import (
    Bucket,
    BucketBatcher,
    Bucketing,
    LengthGroupedBatcher,
    PackingBatcher,
    ShuffleBatcher,
    pack_sequences,
    pad_sequences,
)
from functional_mm.models import llama


def _all_ranks(batcher, epoch, seed, dp):
    return [batcher.plan(epoch, seed, r, dp) for r in range(dp)]


def test_shuffle_batcher_partitions_and_depends_only_on_seed_epoch():
    b = ShuffleBatcher(23, 3)
    plans = _all_ranks(b, 0, 7, 2)
    assert len(plans[0]) == len(plans[1]) == 23 // 6
    flat = [i for p in plans for pb in p for i in pb.indices]
    assert len(flat) == len(set(flat)) == 18  # disjoint across ranks and steps
    assert plans == _all_ranks(b, 0, 7, 2)
    assert plans != _all_ranks(b, 1, 7, 2) and plans != _all_ranks(b, 0, 8, 2)
    # the spares are real samples and differ between the ranks of a step
    assert set(plans[0][0].spares).isdisjoint(plans[1][0].spares)
    # global batch k is the same samples for (2 ranks x 3) and (1 rank x 6): the order is global
    assert sorted(plans[0][1].indices + plans[1][1].indices) == sorted(
        ShuffleBatcher(23, 6).plan(0, 7)[1].indices
    )
    tail = ShuffleBatcher(7, 2, shuffle=False, drop_last=False).plan(0, 0, 1, 2)
    assert [p.indices for p in tail] == [(2, 3), (6,)]


BUCKETS = {
    "256px": {1: (1.0, 4), 16: (1.0, 2), 8: (0.5, 3)},
    "144p": {1: (1.0, 8), 8: (1.0, 6)},
}


def test_bucketing_rules():
    b = Bucketing(BUCKETS, multiple=16)
    never = [1.0, 1.0]  # draws >= every keep probability
    always = [0.0, 0.0]
    # an image large enough for 256px goes there, its aspect ratio snapped to 1:1
    assert b.assign({"height": 300, "width": 280}, always) == Bucket("256px", 1, 256, 256, 4)
    # too small for 256px (area < 0.8 x 256^2) -> 144p, landscape ratio 9:16
    assert b.assign({"height": 144, "width": 256}, always) == Bucket("144p", 1, 144, 256, 8)
    # a 20-frame video takes the largest frame count it fills (16)
    assert b.assign({"height": 256, "width": 256, "frames": 20}, always).frames == 16
    # a 10-frame video: 16 does not fit, 8 does, kept with p=0.5 -> a draw of 0.6 drops to 144p, 8 frames
    assert b.assign({"height": 256, "width": 256, "frames": 10}, [0.6, 0.0]) == Bucket("144p", 8, 192, 192, 6)
    assert b.assign({"height": 256, "width": 256, "frames": 10}, [0.4, 0.0]).resolution == "256px"
    # nothing fits: too few frames for any video bucket, or not kept anywhere
    assert b.assign({"height": 256, "width": 256, "frames": 4}, always) is None
    assert b.assign({"height": 300, "width": 300, "frames": 40}, never) is None
    assert (
        Bucketing(BUCKETS, frame_interval=2)
        .assign({"height": 256, "width": 256, "frames": 20}, always)
        .frames
        == 8
    )
    with pytest.raises(ValueError, match="height"):
        b.assign({"width": 3}, always)
    with pytest.raises(ValueError, match="unknown resolutions"):
        Bucketing({"17p": {1: (1.0, 1)}})


def test_bucket_batcher_same_bucket_on_all_ranks_and_keep_probability():
    rng = np.random.default_rng(0)
    meta = []
    for _ in range(600):
        h, w = rng.choice([144, 256, 300]), rng.choice([256, 300, 400])
        meta.append({"height": int(h), "width": int(w), "frames": int(rng.choice([1, 10, 20]))})
    bb = BucketBatcher(Bucketing(BUCKETS), meta)
    plans = _all_ranks(bb, 3, 0, 2)
    assert len(plans[0]) == len(plans[1]) > 10
    assigned = bb.assign(3, 0)
    for a, b in zip(*plans):
        assert a.bucket == b.bucket and len(a.indices) == len(b.indices) == a.bucket.batch_size
        for i in a.indices + b.indices + a.spares:
            assert assigned[i] == a.bucket  # every sample (and spare) really belongs to the bucket
    assert len({p.bucket for p in plans[0]}) >= 4  # buckets interleave
    # keep probability 0.5 for 256px/8 frames: about half of the eligible samples land there
    eligible = [
        i for i, m in enumerate(meta) if m["frames"] == 10 and m["height"] * m["width"] >= 0.8 * 256 * 256
    ]
    per_epoch = [bb.assign(e, 0) for e in range(4)]
    kept = np.mean([a[i].resolution == "256px" for a in per_epoch for i in eligible])
    assert 0.35 < kept < 0.65


def test_length_grouped_batches_have_similar_lengths():
    lengths = np.random.default_rng(0).integers(1, 1000, 512)
    b = LengthGroupedBatcher(lengths, 8, megabatch=8)
    plans = _all_ranks(b, 0, 0, 2)
    spread = np.mean([np.ptp(lengths[list(p.indices)]) for p in plans[0]])
    random_spread = np.mean([np.ptp(lengths[list(p.indices)]) for p in ShuffleBatcher(512, 8).plan(0, 0)])
    assert spread < 0.2 * random_spread
    flat = [i for p in plans for pb in p for i in pb.indices]
    assert len(flat) == len(set(flat)) == 512


def test_packing_batcher_fits_and_pack_sequences_layout():
    lengths = np.random.default_rng(1).integers(3, 40, 300).tolist() + [100]  # one too long for seq_len
    b = PackingBatcher(lengths, seq_len=64, rows=2)
    assert b.num_too_long == 1
    used = []
    for rank in range(2):
        for p in b.plan(0, 0, rank, 2):
            samples = [{"tokens": torch.full((lengths[i],), i + 1)} for i in p.indices]
            out = pack_sequences(samples, 64, 2)  # first-fit reproduces the plan: never raises
            assert (out["tokens"] > 0).sum() == sum(lengths[i] for i in p.indices)
            used += p.indices
    assert len(used) == len(set(used)) and len(used) > 250  # dense: few samples left in the last open batch
    out = pack_sequences(
        [
            {"tokens": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([0, 1, 1])},
            {"tokens": torch.tensor([8, 9])},
        ],
        4,
        2,
    )
    assert out["tokens"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert out["segment_ids"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert out["loss_mask"].tolist() == [[0, 1, 1, 0], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="fits no row"):
        pack_sequences([{"tokens": torch.zeros(5)}], 4, 1)


def test_packed_row_equals_samples_run_alone_in_llama():
    """Packing must not leak attention or positions across samples: logits and loss match separate runs."""
    cfg = llama.LlamaConfig.variant("tiny", num_layers=2)
    params = llama.init(random.key(0), cfg)
    gen = torch.Generator().manual_seed(0)
    samples = [
        {
            "tokens": torch.randint(0, cfg.vocab_size, (n,), generator=gen),
            "loss_mask": torch.ones(n, dtype=torch.int64),
        }
        for n in (5, 9, 4)
    ]
    samples[1]["loss_mask"][:4] = 0  # a prompt
    packed = pack_sequences(samples, 24, 1)
    with torch.no_grad():
        logits = llama.apply(
            params, cfg, packed["tokens"], segment_ids=packed["segment_ids"], positions=packed["positions"]
        )
        start = 0
        for s in samples:
            n = len(s["tokens"])
            alone = llama.apply(params, cfg, s["tokens"][None])
            torch.testing.assert_close(logits[0, start : start + n], alone[0], atol=1e-5, rtol=1e-5)
            start += n
        # the loss over the packed row is the token-weighted mean of the per-sample losses
        loss = llama.loss(params, cfg, packed)
        per = [
            (
                llama.loss(params, cfg, {"tokens": s["tokens"][None], "loss_mask": s["loss_mask"][None]}),
                int(s["loss_mask"][1:].sum()),
            )
            for s in samples
        ]
        ref = sum(v * n for v, n in per) / sum(n for _, n in per)
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    padded = pad_sequences(samples, pad_id=0, pad_to_multiple=8)
    assert padded["tokens"].shape == (3, 16) and padded["attention_mask"].sum().item() == 18
    assert collections.Counter(padded["loss_mask"].sum(1).tolist()) == collections.Counter([5, 5, 4])
