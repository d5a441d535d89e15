"""Run metrics: MFU from an analytic FLOPs count, peak memory, recompile count, JSONL + TensorBoard writers.

MFU divides achieved model FLOPs by the device's dense bf16/fp16 peak. The peak comes from a table of
vendor headline figures keyed by device name; an unknown device gives no MFU rather than a guess (set
``config.train.peak_tflops`` to supply one).
"""

from __future__ import annotations

import json
import os
import resource

import torch

# Dense (no sparsity) bf16/fp16 peak TFLOP/s per device, matched as lower-case substrings of the device name
# (most specific first). Ascend figures are Huawei's published per-chip numbers (910C: two 910B-class dies).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("ascend910c", 752.0),
    ("ascend910b1", 414.0),
    ("ascend910b2", 376.0),
    ("ascend910b3", 313.0),
    ("ascend910b4", 280.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("a100", 312.0),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return torch.npu.get_device_name(device)
    return device.type


def peak_tflops(name: str) -> float | None:
    """The table's peak for a device name, or None when the device is not in the table."""
    key = name.lower().replace(" ", "").replace("-", "")
    for pattern, tflops in PEAK_TFLOPS:
        if pattern.replace(" ", "") in key:
            return tflops
    return None


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None without a known peak."""
    if peak is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (num_devices * peak * 1e12)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "npu":
        return torch.npu.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far: a count that rises after warm-up means recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class MetricWriter:
    """Writes scalar metrics to ``workdir/metrics.jsonl`` and to TensorBoard (``workdir/tb``); rank 0 only."""

    def __init__(self, workdir: str, *, enabled: bool = True, append: bool = False):
        self.enabled = enabled
        self._jsonl = self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a" if append else "w")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
