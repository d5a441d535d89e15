"""Memory probes and the result table shared by the single-process train-step benchmarks."""

from __future__ import annotations

import ctypes
import resource
import statistics


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
