"""Batch plans: which samples form each batch of an epoch, on every data-parallel rank.

A batcher's ``plan(epoch, seed, dp_rank, dp_size)`` returns this rank's list of :class:`PlannedBatch`. Every
rank computes the same *global* plan from ``(seed, epoch)`` and the samples' metadata, and takes its slice of
each global batch, so all ranks run the same number of steps and — with buckets — the same bucket, hence the
same tensor shapes, in every step. Nothing is communicated.

Batchers:

- :class:`ShuffleBatcher`: a global permutation, cut into batches.
- :class:`BucketBatcher`: OpenSora-style buckets by resolution (area), frame count and nearest aspect ratio,
  each with its own batch size and keep probability (:class:`Bucketing`).
- :class:`LengthGroupedBatcher`: shuffled, then sorted by length within mega-batches, so a batch pads little.
- :class:`PackingBatcher`: samples first-fit into ``rows x seq_len`` token budgets for :func:`pack_sequences`.

Why one bucket per step for all ranks: with per-rank buckets, ranks would hold different shapes in the same
step (different compiled graphs, different step times, and the fastest rank waits at every collective). The
price is that a bucket contributes only whole global batches (``batch_size * dp_size`` samples) per epoch;
its remainder serves as spares (replacements for corrupt samples) and is reshuffled next epoch.

Example::

    >>> b = ShuffleBatcher(num_samples=10, batch_size=2)
    >>> [p.indices for p in b.plan(epoch=0, seed=0, dp_rank=1, dp_size=2)]
    [(2, 3), (5, 8)]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from functional_mm import random

# fold_in tags, so every random stream of a plan is distinct and documented
_PERM, _KEEP, _ORDER, _BUCKET = 1, 2, 3, 4


def epoch_key(seed: int, epoch: int, tag: int) -> torch.Tensor:
    """The key of one random stream (``tag``) of one epoch's plan."""
    return random.fold_in(random.fold_in(random.key(seed), epoch), tag)


def _perm(seed: int, epoch: int, tag: int, n: int, sub: int = 0) -> np.ndarray:
    return random.permutation(random.fold_in(epoch_key(seed, epoch, tag), sub), n).numpy()


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    """One rank's share of one step: sample ``indices``, the ``bucket`` they share (None without buckets), and
    ``spares``, replacement samples (same bucket) for samples that turn out corrupt."""

    indices: tuple[int, ...]
    bucket: Any = None
    spares: tuple[int, ...] = ()


def _rank_slices(members: np.ndarray, per_rank: int, dp_rank: int, dp_size: int, spares: int, bucket=None):
    """Cut ``members`` into global batches of ``per_rank * dp_size`` and return this rank's PlannedBatches; the
    spares of a batch are the members that follow it (cyclically), distinct per rank."""
    n, g = len(members), per_rank * dp_size
    out = []
    for j in range(n // g):
        lo = j * g + dp_rank * per_rank
        extra = tuple(int(members[(j * g + g + dp_rank * spares + s) % n]) for s in range(min(spares, n)))
        out.append(PlannedBatch(tuple(int(i) for i in members[lo : lo + per_rank]), bucket, extra))
    return out


class ShuffleBatcher:
    """Global shuffle from ``(seed, epoch)``, ``batch_size`` samples per rank per step.

    ``shuffle=False`` keeps manifest order; ``drop_last=False`` also plans the last, partial global batch,
    split as evenly as possible over the ranks (for inference and feature extraction: ranks may then run
    different step counts, so never with collectives in the loop).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        num_spares: int = 2,
    ):
        self.num_samples, self.batch_size, self.shuffle = num_samples, batch_size, shuffle
        self.drop_last, self.num_spares = drop_last, num_spares

    def plan(self, epoch: int, seed: int, dp_rank: int = 0, dp_size: int = 1) -> list[PlannedBatch]:
        order = _perm(seed, epoch, _PERM, self.num_samples) if self.shuffle else np.arange(self.num_samples)
        out = _rank_slices(order, self.batch_size, dp_rank, dp_size, self.num_spares)
        rest = order[len(out) * self.batch_size * dp_size :]
        if not self.drop_last and len(rest):
            mine = np.array_split(rest, dp_size)[dp_rank]
            out += [PlannedBatch(tuple(int(i) for i in mine))] if len(mine) else []
        return out


# -----------------------------------------------------------------------------------------------------------------
# buckets

# (height, width) of the named resolutions; a bucket's area is height * width.
RESOLUTIONS = {
    "144p": (144, 256),
    "240p": (240, 426),
    "256px": (256, 256),
    "360p": (360, 640),
    "480p": (480, 854),
    "512px": (512, 512),
    "720p": (720, 1280),
    "1024px": (1024, 1024),
    "1080p": (1080, 1920),
}
# height / width ratios: portrait 2:1 ... landscape 1:2.
ASPECT_RATIOS = (2.0, 16 / 9, 4 / 3, 1.0, 3 / 4, 9 / 16, 1 / 2)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A batch shape: ``frames x height x width`` and the per-rank ``batch_size`` used for it."""

    resolution: str
    frames: int
    height: int
    width: int
    batch_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.frames, self.height, self.width


class Bucketing:
    """OpenSora-style bucket assignment.

    ``config`` maps a resolution name to ``{num_frames: (keep_prob, batch_size)}``; ``num_frames == 1`` is the
    image bucket. A sample (``height``, ``width``, ``frames`` metadata) tries the resolutions from the largest
    down: a resolution is eligible when the sample's area is at least ``area_tolerance`` x the bucket's area
    (samples are only downscaled, give or take 20%); then the largest frame count the video can fill
    (``frames >= T * frame_interval``) is chosen and kept with its probability, otherwise the sample falls
    through to the next smaller resolution. Within the resolution, the nearest aspect ratio (h/w) sets the
    bucket's height and width (multiples of ``multiple``). A sample that fits nowhere is dropped this epoch.

    Example::

        >>> b = Bucketing({"256px": {1: (1.0, 8), 16: (1.0, 2)}, "144p": {1: (1.0, 16), 16: (0.5, 4)}})
        >>> b.assign({"height": 300, "width": 300, "frames": 40}, keep_draws=[0.1, 0.1])
        Bucket(resolution='256px', frames=16, height=256, width=256, batch_size=2)
    """

    def __init__(
        self,
        config: Mapping[str, Mapping[int, tuple[float, int]]],
        *,
        resolutions: Mapping[str, tuple[int, int]] = RESOLUTIONS,
        aspect_ratios: Sequence[float] = ASPECT_RATIOS,
        multiple: int = 16,
        area_tolerance: float = 0.8,
        frame_interval: int = 1,
    ):
        unknown = sorted(set(config) - set(resolutions))
        if unknown:
            raise ValueError(
                f"unknown resolutions {unknown}; known: {sorted(resolutions)} (or pass resolutions=)"
            )
        self.config = {r: dict(sorted(config[r].items(), reverse=True)) for r in config}
        self.areas = {r: resolutions[r][0] * resolutions[r][1] for r in config}
        self.order = sorted(config, key=lambda r: -self.areas[r])  # largest first
        self.aspect_ratios, self.multiple = tuple(aspect_ratios), multiple
        self.area_tolerance, self.frame_interval = area_tolerance, frame_interval

    def _hw(self, res: str, ratio: float) -> tuple[int, int]:
        a, m = self.areas[res], self.multiple
        return max(m, round(math.sqrt(a * ratio) / m) * m), max(m, round(math.sqrt(a / ratio) / m) * m)

    def assign(self, meta: Mapping[str, Any], keep_draws: Sequence[float]) -> Bucket | None:
        """The bucket of one sample; ``keep_draws[i]`` is its uniform draw for ``self.order[i]``."""
        try:
            h, w = int(meta["height"]), int(meta["width"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"bucketing needs integer 'height' and 'width' metadata, got sample {dict(meta)}"
            ) from None
        frames = int(meta.get("frames") or 1)
        for res, u in zip(self.order, keep_draws):
            if h * w < self.area_tolerance * self.areas[res]:
                continue
            fits = [
                t for t in self.config[res] if (t == 1) == (frames == 1) and t * self.frame_interval <= frames
            ]
            if not fits:
                continue
            keep, bs = self.config[res][fits[0]]
            if u >= keep:
                continue
            ratio = min(self.aspect_ratios, key=lambda r: abs(r - h / w))
            return Bucket(res, fits[0], *self._hw(res, ratio), bs)
        return None


class BucketBatcher:
    """Batches from :class:`Bucketing`: each global batch holds ``bucket.batch_size * dp_size`` samples of one
    bucket; batch order is shuffled across buckets every epoch. ``metadata[i]`` is sample i's dict (the source
    itself works: only ``height``/``width``/``frames`` are read)."""

    def __init__(self, bucketing: Bucketing, metadata: Sequence[Mapping[str, Any]], *, num_spares: int = 2):
        self.bucketing, self.num_spares = bucketing, num_spares
        self.meta = [{k: m.get(k) for k in ("height", "width", "frames")} for m in metadata]

    def assign(self, epoch: int, seed: int) -> list[Bucket | None]:
        """Every sample's bucket in this epoch (keep probabilities are drawn per (seed, epoch, sample))."""
        draws = random.uniform(
            epoch_key(seed, epoch, _KEEP), (len(self.meta), len(self.bucketing.order))
        ).tolist()
        return [self.bucketing.assign(m, u) for m, u in zip(self.meta, draws)]

    def plan(self, epoch: int, seed: int, dp_rank: int = 0, dp_size: int = 1) -> list[PlannedBatch]:
        groups: dict[Bucket, list[int]] = {}
        for i, b in enumerate(self.assign(epoch, seed)):
            if b is not None:
                groups.setdefault(b, []).append(i)
        batches = []
        for j, b in enumerate(sorted(groups, key=dataclasses.astuple)):  # a fixed bucket order on every rank
            members = np.asarray(groups[b])[_perm(seed, epoch, _BUCKET, len(groups[b]), sub=j)]
            batches += _rank_slices(members, b.batch_size, dp_rank, dp_size, self.num_spares, bucket=b)
        return [batches[i] for i in _perm(seed, epoch, _ORDER, len(batches))]


class LengthGroupedBatcher:
    """Shuffle, cut into mega-batches of ``megabatch`` global batches, sort each by length (longest first) and
    cut it into batches; the batch order is then shuffled. Batches pad little, the data order stays random."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, megabatch: int = 32, num_spares: int = 2):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.megabatch, self.num_spares = batch_size, megabatch, num_spares

    def plan(self, epoch: int, seed: int, dp_rank: int = 0, dp_size: int = 1) -> list[PlannedBatch]:
        order = _perm(seed, epoch, _PERM, len(self.lengths))
        g = self.batch_size * dp_size
        size = g * self.megabatch
        chunks = [order[i : i + size] for i in range(0, len(order), size)]
        # Stable sort on the negated length: ties keep the shuffled order.
        grouped = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = _rank_slices(grouped, self.batch_size, dp_rank, dp_size, 0)
        # Spares come from the shuffled epoch order (any sample will do: lengths vary within a batch anyway).
        k, n = self.num_spares, len(order)
        return [
            dataclasses.replace(
                batches[i], spares=tuple(int(order[((i * dp_size + dp_rank) * k + s) % n]) for s in range(k))
            )
            for i in _perm(seed, epoch, _ORDER, len(batches))
        ]


class PackingBatcher:
    """Samples first-fit, in shuffled order, into ``rows`` bins of ``seq_len`` tokens per rank; one global
    batch = ``rows * dp_size`` bins. ``lengths[i]`` must bound sample i's processed length; longer samples
    than ``seq_len`` are left out of the plan (:attr:`num_too_long`). Feed the batches to
    :func:`functional_mm.data.pack_sequences` (the per-rank order is bin by bin, which first-fit reproduces).
    """

    def __init__(self, lengths: Sequence[int], seq_len: int, rows: int):
        self.lengths = np.asarray(lengths)
        self.seq_len, self.rows = seq_len, rows
        self.num_too_long = int((self.lengths > seq_len).sum())

    def plan(self, epoch: int, seed: int, dp_rank: int = 0, dp_size: int = 1) -> list[PlannedBatch]:
        nbins = self.rows * dp_size
        out, bins, free = [], [[] for _ in range(nbins)], [self.seq_len] * nbins
        for i in _perm(seed, epoch, _PERM, len(self.lengths)).tolist():
            n = int(self.lengths[i])
            if n > self.seq_len:
                continue
            slot = next((b for b in range(nbins) if free[b] >= n), None)
            if slot is None:  # the batch is full: close it, open the next one
                out.append(bins)
                bins, free = [[] for _ in range(nbins)], [self.seq_len] * nbins
                slot = 0
            bins[slot].append(i)
            free[slot] -= n
        mine = slice(dp_rank * self.rows, (dp_rank + 1) * self.rows)
        return [PlannedBatch(tuple(i for b in batch[mine] for i in b)) for batch in out]
