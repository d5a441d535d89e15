"""Checkpoint I/O: functional_mm.checkpoint vs torch.distributed.checkpoint (DCP) vs torch.save, with a raw-disk
reference (numpy buffers written with ``write`` + ``fsync``, read with ``readinto``).

Command (results in BENCHMARKS.md)::

    .venv/bin/python benchmarks/checkpoint_io.py --size-mib 1024 --reps 3 --dir /tmp/ckpt_bench

Single process: a ~1 GiB fp32 state (16 matrices of 64 MiB plus 64 small vectors, like a model's weights and
norms). Two processes (gloo, ``run_local``): the same global state sharded over ``fsdp=2`` as DTensors, each
rank saving and loading its half. Per method and repetition (methods interleaved, each in a fresh directory):

- write MB/s: bytes / wall time until the data is durable (files fsynced and, for ours, committed); for async
  saves, until the background write finished;
- blocking s: how long ``save`` kept the caller (async variants);
- read MB/s: a cold read (the files' pages are dropped from the page cache with ``posix_fadvise(DONTNEED)``
  first) into newly allocated tensors (DCP gets its target allocated inside the timed region, like the others);
- peak extra RSS: the process's RSS above its level before the call, sampled every 2 ms (for reads this
  includes the restored state itself, 1.0x).

``ours async, host_copy=True, 2nd save`` times a manager's second save (its first, untimed save is inside the
RSS measurement): the steady state of a training run, where the first save's host copies are reused. The
median over repetitions is printed. torch.save does not fsync (it has no option to), so its write figure
is flattered by the page cache; the raw reference fsyncs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from functional_mm import checkpoint

MiB = 2**20


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` is the most seen above the level at start."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.base = self.rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(self.every)

    def __exit__(self, *exc):
        self.peak = max(self.peak, self.rss() - self.base)
        self._stop.set()
        self._t.join()


def make_state(size_mib: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_big = 16
    rows = size_mib * MiB // 4 // n_big // 4096
    state = {f"layers.{i}.w": torch.randn(rows, 4096, generator=g) for i in range(n_big)}
    state.update({f"layers.{i}.norm": torch.randn(4096, generator=g) for i in range(64)})
    return state


def trim() -> None:
    """Collect garbage and hand freed heap memory back to the OS, so that one method's freed buffers do not
    hide the next method's allocations from the RSS measurement."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def nbytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def drop_cache(path: str) -> None:
    """Evict ``path``'s files from the page cache (they are clean after fsync), so reads go to the disk."""
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# methods: write(state, dir) -> (blocking_s, done_s); read(template, dir) -> state


def raw_write(state, d):
    os.makedirs(d)
    t0 = time.perf_counter()
    for k, t in state.items():
        with open(os.path.join(d, k), "wb") as f:
            f.write(memoryview(t.numpy()).cast("B"))
            f.flush()
            os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    return dt, dt


def raw_read(template, d):
    out = {}
    for k, t in template.items():
        x = torch.empty_like(t)
        with open(os.path.join(d, k), "rb") as f:
            f.readinto(memoryview(x.numpy()).cast("B"))
        out[k] = x
    return out


def torch_save_write(state, d):
    os.makedirs(d)
    t0 = time.perf_counter()
    torch.save(state, os.path.join(d, "state.pt"))
    dt = time.perf_counter() - t0
    return dt, dt


def torch_load_read(template, d):
    return torch.load(os.path.join(d, "state.pt"), weights_only=True)


def dcp_write(state, d):
    t0 = time.perf_counter()
    dcp.save(state, checkpoint_id=d)
    dt = time.perf_counter() - t0
    return dt, dt


def dcp_async_write(state, d):
    t0 = time.perf_counter()
    fut = dcp.async_save(state, checkpoint_id=d)
    blocking = time.perf_counter() - t0
    fut.result()
    return blocking, time.perf_counter() - t0


def dcp_read(template, d):
    out = {
        k: (torch.empty_like(v) if not hasattr(v, "to_local") else _empty_dtensor(v))
        for k, v in template.items()
    }
    dcp.load(out, checkpoint_id=d)
    return out


def _empty_dtensor(v):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(torch.empty_like(v.to_local()), v.device_mesh, v.placements, run_check=False,
                              shape=v.shape, stride=v.stride())  # fmt: skip


def ours_writer(async_save: bool, host_copy: bool = True, second_save: bool = False):
    """``second_save``: time the manager's second save (a training run's steady state: the host copies of
    the first save are reused); the first one runs untimed but inside the RSS measurement."""

    def write(state, d):
        mgr = checkpoint.CheckpointManager(
            d, checkpoint.CheckpointManagerOptions(async_save=async_save, host_copy=host_copy)
        )
        step = 1
        if second_save:
            mgr.save(step, {"state": state})
            mgr.wait_until_finished()
            step = 2
        t0 = time.perf_counter()
        mgr.save(step, {"state": state})
        blocking = time.perf_counter() - t0
        mgr.wait_until_finished()
        done = time.perf_counter() - t0
        mgr.close()
        return blocking, done

    return write


def ours_read(template, d):
    mgr = checkpoint.CheckpointManager(d)
    out = mgr.restore(mgr.latest_step(), targets={"state": template})["state"]
    mgr.close()
    return out


WRITERS: dict[str, tuple[Callable, Callable]] = {
    "raw numpy (write+fsync / readinto)": (raw_write, raw_read),
    "torch.save / torch.load (no fsync)": (torch_save_write, torch_load_read),
    "DCP save / load": (dcp_write, dcp_read),
    "DCP async_save": (dcp_async_write, None),
    "ours sync save / restore": (ours_writer(False), ours_read),
    "ours async, host_copy=True (default)": (ours_writer(True, True), None),
    "ours async, host_copy=False (pure step)": (ours_writer(True, False), None),
    "ours async, host_copy=True, 2nd save (copies reused)": (ours_writer(True, True, second_save=True), None),
}


def run(
    state, base: str, reps: int, names=None, barrier=lambda: None, raw_state=None, raw_base=None
) -> dict[str, dict[str, list[float]]]:
    """Every method ``reps`` times, interleaved (rep 0 of each method, then rep 1, ...), the order rotated by
    one each rep: on this VM the first write into memory that was just freed (the previous method's host
    copies, dropped pages) is several times slower than a write into recycled page cache, so a fixed order
    charges that to whichever method always follows the same neighbour. ``raw_state`` /
    ``raw_base``: what the raw reference writes instead (with several processes: each rank its local shards,
    in a folder of its own)."""
    total = nbytes(state)
    results: dict[str, dict[str, list[float]]] = {}
    order = list(names or WRITERS)
    for rep in range(reps):
        for name in order[rep % len(order) :] + order[: rep % len(order)]:
            write, read = WRITERS[name]
            raw = name.startswith("raw") and raw_state is not None
            state_m = raw_state if raw else state
            template = dict(state_m)
            d = os.path.join(
                raw_base if raw else base, f"m{list(WRITERS).index(name)}_{rep}"
            )  # same on all ranks
            shutil.rmtree(d, ignore_errors=True)
            barrier()
            trim()
            with PeakRSS() as mem:
                blocking, done = write(state_m, d)
            barrier()
            r = results.setdefault(name, {})
            r.setdefault("write_MBps", []).append(total / done / 1e6)
            r.setdefault("blocking_s", []).append(blocking)
            r.setdefault("done_s", []).append(done)
            r.setdefault("write_rss_x", []).append(mem.peak / total)
            if read is not None:
                drop_cache(d)
                barrier()
                trim()
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    out = read(template, d)
                    dt = time.perf_counter() - t0
                barrier()
                bad = [k for k in state_m if not torch.equal(_local(out[k]), _local(state_m[k]))]
                assert not bad, f"{name}: wrong values for {bad[:3]}"
                del out
                trim()
                r.setdefault("read_MBps", []).append(total / dt / 1e6)
                r.setdefault("read_rss_x", []).append(mem.peak / total)
            shutil.rmtree(d, ignore_errors=True)
            barrier()
    return results


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def table(results, title: str) -> str:
    ref = results.get("DCP save / load", {})
    lines = [f"### {title}", "", "| method | write MB/s | blocking s | write+commit s | write extra RSS | read MB/s | read extra RSS |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        w = f"{med['write_MBps']:.0f}"
        if ref and name != "DCP save / load" and "DCP" not in name:
            w += f" ({med['write_MBps'] / statistics.median(ref['write_MBps']):.2f}x DCP)"
        rd = f"{med['read_MBps']:.0f}" if "read_MBps" in med else "-"
        if ref and "read_MBps" in med and "DCP" not in name:
            rd += f" ({med['read_MBps'] / statistics.median(ref['read_MBps']):.2f}x DCP)"
        rss = f"{med['read_rss_x']:.2f}x" if "read_rss_x" in med else "-"
        lines.append(
            f"| {name} | {w} | {med['blocking_s']:.3f} | {med['done_s']:.3f} | {med['write_rss_x']:.2f}x | {rd} | {rss} |"
        )
    return "\n".join(lines)


def _sharded_rank(size_mib: int, base: str, reps: int):
    from torch.distributed.tensor import Shard, distribute_tensor

    from functional_mm.parallelism import make_mesh

    mesh = make_mesh({"fsdp": 2})
    full = make_state(size_mib)
    # shard dim 0 of every tensor over fsdp=2 without communication, then drop the full copies
    state = {k: distribute_tensor(v, mesh, [Shard(0)], src_data_rank=None) for k, v in full.items()}
    state = {k: type(v).from_local(v.to_local().clone(), mesh, v.placements, run_check=False, shape=v.shape,
                                   stride=v.stride()) for k, v in state.items()}  # fmt: skip
    del full
    gc.collect()
    names = ["raw numpy (write+fsync / readinto)", "DCP save / load", "DCP async_save", "ours sync save / restore",
             "ours async, host_copy=False (pure step)", "ours async, host_copy=True (default)",
             "ours async, host_copy=True, 2nd save (copies reused)"]  # fmt: skip

    local = {k: v.to_local() for k, v in state.items()}
    # the raw reference: each rank writes its own half, the disk limit for two writers
    results = run(state, base, reps, names, dist.barrier, local, os.path.join(base, f"rank{dist.get_rank()}"))
    # throughput of the job: global bytes (also for the raw reference) over rank 0's wall time (ranks are
    # synchronised by barriers)
    gathered = [None, None]
    dist.all_gather_object(
        gathered, {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    )
    return results, gathered


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default="/tmp/ckpt_bench")
    p.add_argument("--skip-sharded", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    import platform
    import warnings

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"state {args.size_mib} MiB fp32, {args.reps} reps, dir {args.dir}")  # fmt: skip
    state = make_state(args.size_mib)
    print(f"# state: {len(state)} tensors, {nbytes(state) / MiB:.0f} MiB")
    results = run(state, os.path.join(args.dir, "single"), args.reps)
    print(table(results, f"one process, {nbytes(state) / MiB:.0f} MiB"))
    del state
    gc.collect()
    if not args.skip_sharded:
        from functional_mm.parallelism import run_local

        results2, per_rank = run_local(
            _sharded_rank, 2, args.size_mib, os.path.join(args.dir, "sharded"), args.reps, timeout=1800
        )
        print()
        print(
            table(
                results2,
                f"two processes (fsdp=2), {args.size_mib} MiB global; MB/s = global bytes / wall time",
            )
        )
        for name in results2:
            if name.startswith("raw"):
                continue
            rss = [f"{pr[name]['write_rss_x']:.2f}x" for pr in per_rank]
            print(f"#   {name}: write extra RSS per rank (of the global state) {rss}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
