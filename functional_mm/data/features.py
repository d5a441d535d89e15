"""Pre-extracted features: sharded safetensors files + a JSON index, written once, read by the Loader.

Frozen encoders (a VAE, a text encoder) cost the same every epoch; running them once over the dataset and
training on their outputs removes that cost. Layout of an output directory::

    index-r00000.json                        one per writing rank: {"version", "shards", "samples"}
    features-r00000-s00000.safetensors       tensors named "<sample index>/<feature name>"
    ...

Each rank writes its own shards and index, so ranks need no coordination and a crashed rank can be rerun
alone. A sample's entry holds its source index, shard, feature names and JSON metadata (e.g. the caption).
:class:`FeatureSource` merges the indexes and is a ``Sequence[dict]`` like any source, ordered by sample
index, opening shards lazily (memory-mapped, per process, so fork-started workers never share a handle).

Example::

    >>> write_features(src, ImageCaption(size=(64, 64)), encode, "feats/", batch_size=8)  # doctest: +SKIP
    >>> feats = FeatureSource("feats/")                                                     # doctest: +SKIP
    >>> feats[0]["latent"].shape, feats[0]["caption"]                                       # doctest: +SKIP
    (torch.Size([4, 8, 8]), 'a red circle at the top left')
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from functional_mm.data.batching import ShuffleBatcher
from functional_mm.data.loader import Loader, SampleContext

log = logging.getLogger("functional_mm.data")


class FeatureWriter:
    """Collects per-sample feature dicts and writes a shard every ``shard_size`` samples (+ the index on close)."""

    def __init__(self, out_dir: str, rank: int = 0, shard_size: int = 1024):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.rank, self.shard_size = out_dir, rank, shard_size
        self.shards: list[str] = []
        self.samples: list[dict] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_n = 0

    def add(self, index: int, features: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        for k, v in features.items():
            # contiguous + own storage: safetensors refuses views sharing memory with other tensors
            self._pending[f"{index}/{k}"] = v.detach().cpu().contiguous().clone()
        self.samples.append(
            {"index": int(index), "shard": len(self.shards), "features": sorted(features), "meta": meta or {}}
        )
        self._pending_n += 1
        if self._pending_n >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending_n:
            return
        name = f"features-r{self.rank:05d}-s{len(self.shards):05d}.safetensors"
        save_file(self._pending, os.path.join(self.out_dir, name))
        self.shards.append(name)
        self._pending, self._pending_n = {}, 0

    def close(self) -> str:
        """Write the last shard and the index (atomically: a reader never sees half an index)."""
        self._flush()
        path = os.path.join(self.out_dir, f"index-r{self.rank:05d}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"version": 1, "shards": self.shards, "samples": self.samples}, f)
        os.replace(path + ".tmp", path)
        return path


class FeatureSource(Sequence):
    """All samples of a feature directory as dicts ``{**meta, feature: tensor, "index": source index}``."""

    def __init__(self, path: str):
        indexes = sorted(glob.glob(os.path.join(path, "index-r*.json")))
        if not indexes:
            raise FileNotFoundError(
                f"no index-r*.json in {path!r}: run functional_mm.data.extract_features first"
            )
        self.path = path
        self._entries: list[tuple[str, dict]] = []
        for ipath in indexes:
            with open(ipath) as f:
                idx = json.load(f)
            self._entries += [(idx["shards"][s["shard"]], s) for s in idx["samples"]]
        self._entries.sort(key=lambda e: e[1]["index"])
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._entries)

    def _open(self, shard: str):
        if self._pid != os.getpid():  # a forked worker: open its own handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(os.path.join(self.path, shard), framework="pt")
        return self._handles[shard]

    def __getitem__(self, i: int) -> dict:
        shard, e = self._entries[i]
        f = self._open(shard)
        out = dict(e["meta"])
        out.update({k: f.get_tensor(f"{e['index']}/{k}") for k in e["features"]})
        out["index"] = e["index"]
        return out

    def __getstate__(self):  # spawn-started workers: handles are reopened, not pickled
        return {**self.__dict__, "_handles": {}}


class _WithIndex:
    """Wraps a processor so each processed sample remembers its source index (picklable)."""

    def __init__(self, process):
        self.process = process

    def __call__(self, sample: dict, ctx: SampleContext) -> dict:
        out = self.process(sample, ctx) if self.process is not None else dict(sample)
        return {**out, "_index": ctx.index}


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def write_features(
    source: Sequence[dict],
    process: Callable | None,
    encode: Callable[[dict], dict[str, torch.Tensor]],
    out_dir: str,
    *,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shard_size: int = 1024,
    seed: int = 0,
    max_skip_fraction: float = 0.01,
) -> dict:
    """Run ``encode(batch) -> {name: [B, ...]}`` over this rank's share of ``source`` (in order) and store
    the features; per-sample scalars/strings of the batch (captions, ids) go to the index as metadata.

    Returns ``{"index": path, "samples": n, "skipped": n}``. Corrupt samples are skipped as in the Loader.
    """
    loader = Loader(
        source,
        _WithIndex(process),
        ShuffleBatcher(len(source), batch_size, shuffle=False, drop_last=False, num_spares=0),
        seed=seed,
        dp_rank=rank,
        dp_size=world_size,
        num_epochs=1,
        num_workers=num_workers,
        max_skip_fraction=max_skip_fraction,
    )
    writer = FeatureWriter(out_dir, rank, shard_size)
    with loader, torch.no_grad():
        for batch in loader:
            idx = batch.pop("_index").tolist()
            feats = encode(batch)
            for j, i in enumerate(idx):
                meta = {
                    k: v[j]
                    for k, v in batch.items()
                    if isinstance(v, list) and len(v) == len(idx) and _jsonable(v[j])
                }
                writer.add(i, {k: v[j] for k, v in feats.items()}, meta)
        stats = loader.stats()
    path = writer.close()
    log.info(
        "rank %d: %d samples -> %s (%d skipped)", rank, len(writer.samples), out_dir, stats["samples_skipped"]
    )
    return {"index": path, "samples": len(writer.samples), "skipped": stats["samples_skipped"]}
