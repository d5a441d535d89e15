"""``run_local``: run a function on N local processes (gloo), for tests and notebooks."""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["run_local", "RankError"]


class RankError(RuntimeError):
    """An exception raised in one rank of :func:`run_local`; ``rank`` says which, the message holds its
    traceback."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, nprocs: int, port: int, threads: int, fn, args, kwargs, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
    )
    # N processes on a few cores: intra-op threads per process would only oversubscribe the CPU.
    torch.set_num_threads(threads)
    faulthandler.enable()  # a rank that crashes in native code (exit -11) leaves its Python stack on stderr
    try:
        out = fn(*args, **kwargs)
        # Pickle here: an unpicklable result would otherwise fail silently in the queue's feeder thread and the
        # parent would wait for a message that never comes.
        results.put((rank, True, pickle.dumps(out) if rank == 0 else None))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent, KeyboardInterrupt too
        results.put((rank, False, f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn: Callable[..., Any], nprocs: int, *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on ``nprocs`` fresh local processes and return rank 0's result.

    Each process gets the torchrun environment (``MASTER_ADDR``, ``MASTER_PORT`` on a free port, ``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``), so :func:`make_mesh` inside ``fn`` sets up a gloo group on CPU. The process
    group is destroyed when ``fn`` returns. ``fn``, its arguments and rank 0's result must be picklable (``fn``
    defined at module level): processes are *spawned*, not forked, so this works from pytest and notebooks
    alike (a notebook's ``fn`` must live in an importable module).

    The first exception in any rank is re-raised here as :class:`RankError` carrying the rank and the remote
    traceback; the other ranks are then killed (they may be stuck in a collective waiting for the failed one).
    A run that has not finished after ``timeout`` seconds is killed and raises :class:`TimeoutError`, so a
    deadlock fails a test instead of blocking it forever.

    Example::

        >>> # in a module: def world(): return make_mesh({"fsdp": 2, "tp": 2}).shape
        >>> run_local(world, 4)  # doctest: +SKIP
        (2, 2)
    """
    if nprocs < 1:
        raise ValueError(f"run_local needs nprocs >= 1, got {nprocs}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, nprocs, port, threads, fn, args, kwargs, results),
            name=f"run_local-rank{r}",
        )
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    done: set[int] = set()
    result = None
    try:
        while len(done) < nprocs:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(nprocs)) - done)
                    raise TimeoutError(
                        f"run_local: ranks {missing} of {nprocs} did not finish within {timeout:.0f}s"
                    ) from None
                # A rank that died without reporting (segfault, os._exit, OOM kill) would never answer.
                for r, p in enumerate(procs):
                    if r not in done and p.exitcode is not None and p.exitcode != 0:
                        raise RankError(r, f"rank {r} of {nprocs} died with exit code {p.exitcode}") from None
                continue
            if not ok:
                raise RankError(rank, f"rank {rank} of {nprocs} raised {payload}")
            done.add(rank)
            if rank == 0:
                result = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5.0 if len(done) == nprocs else 0.0)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return result
