"""Feature pre-extraction binary: ``python -m functional_mm.data.extract_features --config CFG.py[:arg]``.

Runs a frozen encoder over a dataset once and writes sharded features + an index (see
:mod:`functional_mm.data.features`); train on them with ``Loader(FeatureSource(out_dir), None, ...)``.
Launched with ``torchrun``, each process takes the ``RANK``-th of ``WORLD_SIZE`` shares of the dataset and
writes its own shards (no communication). Config fields (override any as ``--config.batch_size=16``)::

    manifest          JSONL manifest of the dataset
    output_dir        where shards and index go
    processor         "module:attr" of a processor factory (e.g. "functional_mm.data.processors:ImageCaption")
                      or a callable; called with **processor_kwargs
    processor_kwargs  dict
    encoder           "module:attr" or callable: encoder factory, called with **encoder_kwargs, returning
                      ``encode(batch) -> {name: tensor [B, ...]}`` (a pure function of the batch)
    encoder_kwargs    dict
    batch_size, num_workers, shard_size, seed, max_skip_fraction

Example config (``configs/extract_latents.py``)::

    import ml_collections
    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.manifest, c.output_dir = "data/images.jsonl", "data/latents"
        c.processor = "functional_mm.data.processors:ImageCaption"
        c.processor_kwargs = {"size": (64, 64)}
        c.encoder, c.encoder_kwargs = "my_project.vae:make_encoder", {"checkpoint": "vae/"}
        c.batch_size, c.num_workers, c.shard_size, c.seed, c.max_skip_fraction = 16, 2, 1024, 0, 0.01
        return c
"""

from __future__ import annotations

import importlib
import os

from absl import app, logging
from ml_collections import config_flags

from functional_mm.data.features import write_features
from functional_mm.data.sources import JsonlSource

_CONFIG = config_flags.DEFINE_config_file("config", None, "Extraction config file.", lock_config=True)


def resolve(spec):
    """``"package.module:attr"`` -> the attribute; a callable is returned as is."""
    if callable(spec):
        return spec
    module, _, attr = str(spec).partition(":")
    if not attr:
        raise ValueError(f"expected 'module:attr', got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def _kwargs(c, name: str) -> dict:
    v = c.get(name)
    return {} if v is None else (v.to_dict() if hasattr(v, "to_dict") else dict(v))


def run(c) -> dict:
    """Extract with config ``c`` on this process's share (``RANK`` / ``WORLD_SIZE`` from the environment)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    process = resolve(c.processor)(**_kwargs(c, "processor_kwargs")) if c.get("processor") else None
    encode = resolve(c.encoder)(**_kwargs(c, "encoder_kwargs"))
    out = write_features(
        JsonlSource(c.manifest),
        process,
        encode,
        c.output_dir,
        batch_size=c.get("batch_size", 8),
        rank=rank,
        world_size=world,
        num_workers=c.get("num_workers", 0),
        shard_size=c.get("shard_size", 1024),
        seed=c.get("seed", 0),
        max_skip_fraction=c.get("max_skip_fraction", 0.01),
    )
    logging.info("extracted %s", out)
    print(f"rank {rank}/{world}: {out['samples']} samples, {out['skipped']} skipped -> {out['index']}")
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every option is a --config.* override")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
