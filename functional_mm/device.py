"""Accelerator selection: Ascend NPU (if ``torch_npu`` imports) > CUDA > CPU, with no hard dependency on
``torch_npu``.

Example::

    >>> from functional_mm import device
    >>> device.default_device().type in ("npu", "cuda", "cpu")
    True
"""

from __future__ import annotations

import functools
import importlib

import torch

_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


@functools.cache
def npu_available() -> bool:
    """True when torch_npu is installed and sees a device (importing it registers the ``npu`` device)."""
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def default_device_type() -> str:
    if npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def default_device() -> torch.device:
    """The device to compute on (the current local device for accelerators)."""
    kind = default_device_type()
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, getattr(torch, kind).current_device())


def distributed_backend(device_type: str | None = None) -> str:
    """The torch.distributed backend for a device type: hccl (npu), nccl (cuda), gloo (cpu)."""
    kind = device_type or default_device_type()
    if kind not in _BACKENDS:
        raise ValueError(f"unknown device type {kind!r}; expected one of {sorted(_BACKENDS)}")
    return _BACKENDS[kind]
