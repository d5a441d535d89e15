"""What the single-process train-step benchmarks share: their common flags, our side's step, the interleaved
timing loop, memory probes and the result table."""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from functional_mm import random
from functional_mm.train import TrainState


def add_common_args(ap: argparse.ArgumentParser, sides: Sequence[str]) -> None:
    """``--steps``, ``--warmup``, ``--only SIDE`` (repeatable) and ``--threads``."""
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--only",
        action="append",
        choices=sides,
        help="run only this side (repeatable): peak RSS is a per-process high-water mark, so a side's own "
        "peak needs a process of its own",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def parse_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, and set the torch thread count when ``--threads`` asks for one."""
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def ours(step: Callable, params, tx) -> Callable:
    """Our side as ``run(batch, *_) -> loss``: ``step`` (from ``make_train_step``) on a state it carries
    (the extra arguments other sides take, such as precomputed noise, come from the state's key instead)."""
    state = TrainState.create(params, tx, random.key(2))

    def run(batch, *_):
        nonlocal state
        state, metrics = step(state, batch)
        return metrics["loss"]

    return run


def run_interleaved(
    runs: dict[str, Callable], args, inputs: Callable[[int], tuple]
) -> tuple[dict, dict, dict]:
    """``args.warmup + args.steps`` steps; at step ``i`` every side gets ``*inputs(i)``, a different side going
    first each step (none always follows the batch setup). The peak-memory mark restarts after the warm-up;
    the first-step losses must agree (same weights, same batch). Returns per side the timed steps' seconds,
    the first step's seconds and every loss."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    first_s: dict[str, float] = {}
    losses: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.warmup + args.steps):
        step_inputs = inputs(i)
        if i == args.warmup:
            reset_peak()
        names = list(runs)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            losses[name].append(float(runs[name](*step_inputs)))
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
            elif i == 0:
                first_s[name] = time.perf_counter() - t0
        if i == 0:
            print("first-step losses: " + ", ".join(f"{k} {v[0]:.6f}" for k, v in losses.items()), flush=True)
            l0 = [v[0] for v in losses.values()]
            assert all(abs(v - l0[0]) < 1e-4 * abs(l0[0]) for v in l0), "first-step losses differ"
    return times, first_s, losses


def rss_mib(field: str = "VmRSS") -> float:
    """Current (``VmRSS``) or peak (``VmHWM``) resident memory of this process."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak() -> None:
    """Hand freed heap back to the OS and restart the ``VmHWM`` high-water mark (glibc, Linux), so the timed
    steps' peak excludes what compilation used and freed."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def print_results(times: dict, first_s: dict, losses: dict, reference: str, rss_setup: float) -> None:
    """Peak memory, then per run: median / min ms per step and their ratios to ``reference`` (nan when it did
    not run), the first step's time and the loss at the first and last step."""
    peak, timed = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_mib("VmHWM")
    print(
        f"RSS after setup {rss_setup:.0f} MiB; peak {peak:.0f} MiB ({peak - rss_setup:+.0f}, compiles "
        f"included), during the timed steps {timed:.0f} MiB ({timed - rss_setup:+.0f})"
    )
    ref = times.get(reference)
    base, base_min = (statistics.median(ref), min(ref)) if ref else (float("nan"), float("nan"))
    width = max(map(len, times))
    for name, ts in times.items():
        med, best, first = statistics.median(ts), min(ts), first_s.get(name, float("nan"))
        print(
            f"{name:{width}s} median {med * 1e3:7.1f} ms/step (ratio {med / base:4.2f})  min {best * 1e3:7.1f} ms "
            f"(ratio {best / base_min:4.2f})  first step {first:5.1f} s  loss {losses[name][0]:.5f} -> "
            f"{losses[name][-1]:.5f}"
        )
