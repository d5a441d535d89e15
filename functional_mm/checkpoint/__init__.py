"""Checkpoints in orbax-checkpoint's on-disk layout, written and read through tensorstore.

A step is a folder ``<directory>/<step>/`` holding ``_CHECKPOINT_METADATA`` (JSON: item handlers, metrics,
timestamps) and one folder per item. A pytree item has orbax's ``_METADATA`` (tree structure) and one zarr3
array per tensor (``params.layers.0.w/``: ``zarr.json`` plus sharding-codec files under ``c/``); a JSON item has
a ``metadata`` file. orbax-checkpoint restores what we write, and we restore what orbax writes (per-array
zarr3, or its default OCDBT database).

- Each process writes only the shards it owns; a replicated shard is written by one replica. The zarr grid
  follows the shards (files <= 64 MiB, crc32c-checked inner chunks <= 8 MiB), so no file has two writers and a
  restore onto another layout reads only the chunks it needs.
- A step is written into ``<step>.orbax-checkpoint-tmp`` and renamed once every process has finished: a listed
  step is always complete, and temporaries left by a crash are deleted when the next manager starts.
- Async by default: ``save`` returns once the data is on the host and a background thread writes and commits;
  errors surface at the next ``save`` / ``wait_until_finished``. The host copy goes into the previous save's
  buffers when they fit, so a training run's saves after the first block only for a memcpy.
- Restores memory-map the files and let tensorstore check every chunk's crc32c and copy it straight into the
  output tensor, in chunk-aligned pieces of all arrays at once (bounded bytes in flight).

Why one folder per array rather than orbax's default OCDBT database: processes write disjoint files directly,
so there is nothing to merge at commit and no single manifest to contend on; a restore opens exactly the
arrays and chunks it needs; and the files are plain zarr3 that any zarr reader opens. The cost is file count
(about two files per array plus one per 64 MiB of shard), which OCDBT would pack into a few large files: worth
revisiting for trees of many thousands of small arrays on a filesystem with slow metadata operations.

Example::

    >>> import torch
    >>> from functional_mm import checkpoint
    >>> state = {"params": {"w": torch.arange(6.0).reshape(2, 3)}, "step": torch.tensor(7)}
    >>> import tempfile; d = tempfile.mkdtemp()
    >>> with checkpoint.CheckpointManager(d, checkpoint.CheckpointManagerOptions(max_to_keep=2)) as mgr:
    ...     mgr.save(7, {"state": state, "config": {"lr": 0.1}})
    ...     mgr.wait_until_finished()
    ...     out = mgr.restore(targets={"state": state, "config": None})
    True
    >>> out["state"]["params"]["w"].tolist(), out["config"]
    ([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], {'lr': 0.1})

Restoring onto another mesh: pass targets whose leaves are DTensors with the new placements (real, or meta
ones from ``parallelism.abstract_init``); each process then reads only its own regions.
"""

from functional_mm.checkpoint._item import CheckpointCorruptError, TargetMismatchError
from functional_mm.checkpoint._manager import CheckpointManager, CheckpointManagerOptions, CheckpointSaveError

__all__ = [
    "CheckpointManager",
    "CheckpointManagerOptions",
    "CheckpointSaveError",
    "CheckpointCorruptError",
    "TargetMismatchError",
]
