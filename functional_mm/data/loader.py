"""A deterministic, data-parallel sharded, resumable loader with background workers and prefetch.

What each step of each rank sees is a pure function of ``(seed, epoch, step, dp_rank, dp_size)`` and the
batcher (see :mod:`functional_mm.data.batching`); workers only execute that plan. Hence:

- the batches do not depend on ``num_workers`` or timing (results are reassembled in plan order);
- ``state()`` is a few integers (epoch, step within it, skip counters) and ``restore(state)`` continues
  exactly: N batches, save, restore into a fresh loader, M batches == the first N + M batches;
- per-sample randomness (random crops, clip offsets) comes from ``ctx.rng()``, a numpy Generator seeded from
  ``(seed, epoch, sample index)``: the same augmentation whichever worker runs it, and after a restore.

Corrupt or missing media: a processor raises :class:`~functional_mm.data.SkipSample` (decoders raise its
subclass ``MediaError``; ``OSError`` counts too). The sample is skipped, logged with its path and reason,
counted, and replaced by one of the batch's spares (same bucket), so batch shapes hold. When more than
``max_skip_fraction`` of the samples tried so far were skipped (checked once ``skip_check_after`` samples
were tried), the loader raises :class:`~functional_mm.data.TooManySkipsError` listing the recent reasons. Any
other exception from a processor is a bug and propagates at once, naming the sample.

Workers: ``worker_type="process"`` (default; a fork-started pool, tensors come back through shared memory,
one torch thread per worker) or ``"thread"`` (decoders release the GIL; no fork, no pickling). Each worker
builds whole batches; ``prefetch`` batches per worker are kept in flight.

Example::

    >>> src = JsonlSource("data/images.jsonl")                                    # doctest: +SKIP
    >>> loader = Loader(src, ImageCaption(size=64), ShuffleBatcher(len(src), 8), seed=0,
    ...                 dp_rank=rank, dp_size=world, num_workers=2)              # doctest: +SKIP
    >>> for step, batch in zip(range(100), loader): ...                          # doctest: +SKIP
    >>> ckpt["data"] = loader.state()                                            # doctest: +SKIP
    >>> loader2 = Loader(...same arguments...); loader2.restore(ckpt["data"])     # doctest: +SKIP
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from functional_mm.data.batching import PlannedBatch
from functional_mm.data.packing import default_collate
from functional_mm.data.sources import SkipSample, TooManySkipsError, sample_path

log = logging.getLogger("functional_mm.data")


@dataclasses.dataclass(frozen=True)
class SampleContext:
    """What a processor may know about the sample besides its dict: where it sits in the plan."""

    index: int
    epoch: int
    seed: int
    bucket: Any = None

    def rng(self) -> np.random.Generator:
        """The sample's own generator, from ``(seed, epoch, index)``: reproducible anywhere."""
        return np.random.default_rng([self.seed, self.epoch, self.index])


@dataclasses.dataclass
class _Built:
    batch: Any
    seen: int
    skips: list[tuple[int, str, str]]


def build_batch(source, process, collate, plan: PlannedBatch, epoch: int, seed: int) -> _Built:
    """Process a planned batch, replacing skipped samples by spares; the unit of work of a worker."""
    out, skips, seen = [], [], 0
    want = len(plan.indices)
    for i in (*plan.indices, *plan.spares):
        if len(out) == want:
            break
        seen += 1
        sample = source[i]
        try:
            out.append(process(sample, SampleContext(i, epoch, seed, plan.bucket)) if process else sample)
        except (SkipSample, OSError) as e:
            skips.append((i, sample_path(sample), f"{type(e).__name__}: {e}"))
        except Exception as e:
            raise RuntimeError(
                f"processing sample {i} ({sample_path(sample) or 'no media'}) failed: {e!r}"
            ) from e
    return _Built(collate(out) if out else None, seen, skips)


_WORKER: dict[str, Any] = {}


def _worker_init(source, process, collate, seed):
    torch.set_num_threads(1)  # N workers x all cores each would oversubscribe the CPU
    _WORKER.update(source=source, process=process, collate=collate, seed=seed)


def _worker_task(plan: PlannedBatch, epoch: int) -> _Built:
    w = _WORKER
    return build_batch(w["source"], w["process"], w["collate"], plan, epoch, w["seed"])


class Loader:
    """Iterate batches of ``source`` planned by ``batcher`` and built by ``process`` + ``collate``.

    Args:
        source: ``Sequence[dict]`` (a JSONL manifest, a list, a FeatureSource).
        process: ``process(sample, ctx) -> dict`` (None: samples as they are). Must be picklable only for
            ``start_method="spawn"``.
        batcher: a batcher from :mod:`functional_mm.data.batching`.
        seed: data seed; the global order depends on ``(seed, epoch)`` only.
        dp_rank, dp_size: this process's data-parallel rank and the number of ranks.
        num_epochs: stop after that many epochs (None: forever).
        num_workers: 0 builds batches in the calling thread.
        worker_type: "process" (a pool started with ``start_method``, "fork" by default: nothing to pickle
            but the plans) or "thread".
        prefetch: batches in flight per worker.
        max_skip_fraction, skip_check_after: the skip budget (see the module docstring).
    """

    def __init__(
        self,
        source: Sequence[dict],
        process: Callable[[dict, SampleContext], dict] | None,
        batcher,
        *,
        seed: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        collate: Callable[[list[dict]], Any] = default_collate,
        num_epochs: int | None = None,
        num_workers: int = 0,
        worker_type: str = "process",
        prefetch: int = 2,
        start_method: str = "fork",
        max_skip_fraction: float = 0.01,
        skip_check_after: int = 100,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if worker_type not in ("process", "thread"):
            raise ValueError(f"worker_type must be 'process' or 'thread', got {worker_type!r}")
        self.source, self.process, self.batcher, self.collate = source, process, batcher, collate
        self.seed, self.dp_rank, self.dp_size, self.num_epochs = seed, dp_rank, dp_size, num_epochs
        self.num_workers, self.worker_type, self.prefetch = num_workers, worker_type, max(1, prefetch)
        self.start_method = start_method
        self.max_skip_fraction, self.skip_check_after = max_skip_fraction, skip_check_after
        self._epoch, self._step = 0, 0  # position of the next batch to return
        self._seen = self._skipped = 0
        self._recent_skips: collections.deque = collections.deque(maxlen=10)
        self._plans: dict[int, list[PlannedBatch]] = {}
        self._pool: cf.Executor | None = None
        self._inflight: collections.deque = collections.deque()  # ((epoch, step), future)
        self._wait_s = 0.0

    # -- plan -------------------------------------------------------------------------------------------------

    def plan(self, epoch: int) -> list[PlannedBatch]:
        """This rank's batches of ``epoch`` (cached for the current and the next epoch)."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = self.batcher.plan(epoch, self.seed, self.dp_rank, self.dp_size)
        return self._plans[epoch]

    def _positions(self, epoch: int, step: int):
        """Plan positions from (epoch, step) on, skipping empty epochs, until num_epochs."""
        empty = 0
        while self.num_epochs is None or epoch < self.num_epochs:
            n = len(self.plan(epoch))
            empty = 0 if n else empty + 1
            if empty > 1:  # two empty epochs in a row: the batcher will never produce a batch
                raise ValueError(
                    f"the batcher planned no batch for epochs {epoch - 1} and {epoch} (too little data for one global batch?)"
                )
            while step < n:
                yield epoch, step
                step += 1
            epoch, step = epoch + 1, 0

    # -- workers ----------------------------------------------------------------------------------------------

    def _executor(self) -> cf.Executor | None:
        if self.num_workers == 0:
            return None
        if self._pool is None:
            if self.worker_type == "thread":
                self._pool = cf.ThreadPoolExecutor(self.num_workers, thread_name_prefix="data")
            else:
                import torch.multiprocessing  # noqa: F401  (registers shared-memory pickling of tensors)

                self._pool = cf.ProcessPoolExecutor(
                    self.num_workers,
                    mp_context=multiprocessing.get_context(self.start_method),
                    initializer=_worker_init,
                    initargs=(self.source, self.process, self.collate, self.seed),
                )
        return self._pool

    def _submit(self, pool, epoch: int, step: int) -> cf.Future:
        plan = self.plan(epoch)[step]
        if self.worker_type == "thread":
            return pool.submit(build_batch, self.source, self.process, self.collate, plan, epoch, self.seed)
        return pool.submit(_worker_task, plan, epoch)

    def _fill(self, pool) -> None:
        want = self.prefetch * self.num_workers
        if len(self._inflight) >= want:
            return
        start = self._inflight[-1][0] if self._inflight else None
        it = self._positions(*(start or (self._epoch, self._step)))
        if start is not None:
            next(it, None)  # already in flight
        for pos in it:
            self._inflight.append((pos, self._submit(pool, *pos)))
            if len(self._inflight) >= want:
                break

    def _drop_inflight(self) -> None:
        for _, fut in self._inflight:
            fut.cancel()
        self._inflight.clear()

    def close(self) -> None:
        """Stop the workers (a later iteration starts them again)."""
        self._drop_inflight()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- iteration --------------------------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        while True:
            pos = next(self._positions(self._epoch, self._step), None)
            if pos is None:
                raise StopIteration
            pool = self._executor()
            if pool is None:
                built = build_batch(
                    self.source, self.process, self.collate, self.plan(pos[0])[pos[1]], pos[0], self.seed
                )
            else:
                self._fill(pool)
                got, fut = self._inflight.popleft()
                assert got == pos, (got, pos)
                built = fut.result()
            self._epoch, self._step = pos[0], pos[1] + 1
            self._account(built, pos)
            if built.batch is not None:
                self._wait_s += time.perf_counter() - t0
                return built.batch

    def _account(self, built: _Built, pos) -> None:
        self._seen += built.seen
        self._skipped += len(built.skips)
        for i, path, reason in built.skips:
            log.warning("skipped sample %d (%s): %s", i, path or "no media", reason)
            self._recent_skips.append(f"sample {i} ({path}): {reason}")
        over = self._skipped > self.max_skip_fraction * self._seen
        if built.batch is None or (self._seen >= self.skip_check_after and over):
            why = (
                f"every sample and spare of batch {pos} was skipped"
                if built.batch is None
                else f"{self._skipped} of {self._seen} samples skipped ({self._skipped / self._seen:.1%}), more "
                f"than max_skip_fraction={self.max_skip_fraction:.1%}"
            )
            raise TooManySkipsError(why + ". Recent:\n  " + "\n  ".join(self._recent_skips))

    # -- state ------------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """The position of the next batch and the skip counters (JSON-serialisable ints)."""
        return {
            "version": 1,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "epoch": self._epoch,
            "step": self._step,
            "samples_seen": self._seen,
            "samples_skipped": self._skipped,
        }

    def restore(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state` of a loader with the same source, batcher and layout)."""
        for k in ("seed", "dp_size"):
            if state[k] != getattr(self, k):
                raise ValueError(
                    f"cannot restore a loader state with {k}={state[k]} into a loader with {k}={getattr(self, k)}"
                )
        self._drop_inflight()
        self._epoch, self._step = int(state["epoch"]), int(state["step"])
        self._seen, self._skipped = int(state["samples_seen"]), int(state["samples_skipped"])

    def stats(self) -> dict:
        """``data_wait_s`` (time spent blocked in ``next``: report its share of step time), sample counters."""
        return {"data_wait_s": self._wait_s, "samples_seen": self._seen, "samples_skipped": self._skipped}
