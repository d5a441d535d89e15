"""Step profiling with torch.profiler (torch_npu.profiler on Ascend), in two modes.

- static: ``config.profile.start_step`` / ``num_steps`` / ``ranks`` fix a window when the run starts;
- dynamic: while a run goes, write ``WORKDIR/profile_request.json`` (e.g. ``{"num_steps": 3, "ranks": [0]}``,
  plus optional ``record_shapes`` / ``profile_memory`` / ``with_stack``); profiling starts at the next step and
  the file is renamed to ``profile_request.json.done``.

Traces are Chrome trace files in ``WORKDIR/profile/``: open them in https://ui.perfetto.dev or
chrome://tracing (TensorBoard's profiler plugin reads the same files).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from absl import logging

REQUEST_FILE = "profile_request.json"


@dataclass
class Window:
    start_step: int
    num_steps: int
    ranks: list[int] = field(default_factory=lambda: [0])
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False


def _profiler_module(device_type: str):
    if device_type == "npu":
        import torch_npu

        return torch_npu.profiler
    return torch.profiler


class StepProfiler:
    """Call :meth:`step_begin` before and :meth:`step_end` after every train step."""

    def __init__(self, workdir: str, rank: int, device_type: str, static: Window | None = None):
        self.workdir, self.rank, self.device_type = workdir, rank, device_type
        self.window = static
        self._prof = None
        self.traces: list[str] = []

    def _poll_request(self, step: int) -> None:
        path = os.path.join(self.workdir, REQUEST_FILE)
        if self._prof is not None or not os.path.exists(path):
            return
        try:
            with open(path) as f:
                req = json.load(f)
            self.window = Window(start_step=step, **req)
        except (ValueError, TypeError) as e:
            logging.error("ignoring %s: %s", path, e)
        if self.rank == 0:
            os.replace(path, path + ".done")

    def step_begin(self, step: int) -> None:
        self._poll_request(step)
        w = self.window
        if self._prof is None and w is not None and w.start_step == step and self.rank in w.ranks:
            mod = _profiler_module(self.device_type)
            activities = [mod.ProfilerActivity.CPU]
            if self.device_type in ("cuda", "npu"):
                activities.append(getattr(mod.ProfilerActivity, self.device_type.upper()))
            self._prof = mod.profile(
                activities=activities,
                record_shapes=w.record_shapes,
                profile_memory=w.profile_memory,
                with_stack=w.with_stack,
            )
            self._prof.__enter__()
            logging.info("profiling steps %d..%d", step, step + w.num_steps - 1)

    def step_end(self, step: int) -> None:
        w = self.window
        if self._prof is None or step < w.start_step + w.num_steps - 1:
            return
        self._prof.__exit__(None, None, None)
        out = os.path.join(self.workdir, "profile", f"trace_rank{self.rank}_steps{w.start_step}-{step}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        self._prof.export_chrome_trace(out)
        self.traces.append(out)
        logging.info("wrote profiler trace %s", out)
        self._prof, self.window = None, None
