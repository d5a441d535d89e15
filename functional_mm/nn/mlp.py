"""Feed-forward blocks: gated (SwiGLU and friends, as in Llama/Qwen2) and plain two-layer (GELU, as in ViTs)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from functional_mm import random
from functional_mm.nn import linear
from functional_mm.nn._param import Param

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    # The same tanh approximation written out, op for op as transformers' "gelu_new" (T5 v1.1): ~1e-7 from
    # the fused kernel, which matters for exact parity.
    "gelu_new": lambda x: (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    ),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def init_gated(
    key: torch.Tensor, dim: int, hidden: int, *, bias: bool = False, std=None, dtype=torch.float32
) -> dict[str, dict[str, Param]]:
    kg, ku, kd = random.split(key, 3)
    kw = dict(bias=bias, std=std, dtype=dtype)
    return {
        "gate": linear.init(kg, dim, hidden, axes=("embed", "mlp"), **kw),
        "up": linear.init(ku, dim, hidden, axes=("embed", "mlp"), **kw),
        "down": linear.init(kd, hidden, dim, axes=("mlp", "embed"), **kw),
    }


def gated(p, x: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """``down(act(gate(x)) * up(x))``; ``x: [..., D] -> [..., D]``."""
    return linear.apply(p["down"], activation(act)(linear.apply(p["gate"], x)) * linear.apply(p["up"], x))


def init_mlp(
    key: torch.Tensor, dim: int, hidden: int, *, bias: bool = True, std=None, dtype=torch.float32
) -> dict[str, dict[str, Param]]:
    k1, k2 = random.split(key)
    kw = dict(bias=bias, std=std, dtype=dtype)
    return {
        "fc1": linear.init(k1, dim, hidden, axes=("embed", "mlp"), **kw),
        "fc2": linear.init(k2, hidden, dim, axes=("mlp", "embed"), **kw),
    }


def mlp(p, x: torch.Tensor, act: str = "gelu") -> torch.Tensor:
    """``fc2(act(fc1(x)))``; ``x: [..., D] -> [..., D]``."""
    return linear.apply(p["fc2"], activation(act)(linear.apply(p["fc1"], x)))
