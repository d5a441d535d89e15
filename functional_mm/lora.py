"""Functional LoRA: low-rank adapters kept in their own pytree and merged into the base weights on the fly.

``W' = W + (alpha / rank) * B @ A`` for every 2-D weight whose "/"-path matches one of ``targets``. The
adapters are the *only* thing the optimizer sees, so the frozen base carries no optimizer state and the base
tree is never modified; model code is unchanged (``apply(lora.merge(base, adapters, cfg), ...)``).

Dropout on the adapter input (PEFT's ``lora_dropout``) cannot be expressed on merged weights, so it is not
offered: ``LoraConfig`` keeps ``rank``, ``alpha`` and ``targets``.

Example::

    >>> import torch
    >>> from functional_mm import lora, random
    >>> base = {"attn": {"q": {"weight": torch.randn(8, 4)}}, "norm": {"scale": torch.ones(4)}}
    >>> cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=(r"attn/q/weight$",))
    >>> adapters = lora.init(random.key(0), base, cfg)
    >>> adapters["attn"]["q"]["weight"]["b"].shape   # [out, rank]
    torch.Size([8, 2])
    >>> torch.equal(lora.merge(base, adapters, cfg)["attn"]["q"]["weight"], base["attn"]["q"]["weight"])  # B = 0
    True
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file

from functional_mm import pytree, random


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = (r"attn/(q|k|v|o)/weight$",)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("LoraConfig.targets must hold at least one regex over parameter paths")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init(key: torch.Tensor, base: Any, cfg: LoraConfig) -> Any:
    """Adapters for every matching 2-D weight, as a tree shaped like the base: the weight at path ``P`` gets
    ``P/a: [r, in]`` (Kaiming-uniform) and ``P/b: [out, r]`` (zero, PEFT's default), so the merged model starts
    equal to the base."""
    patterns = [re.compile(t) for t in cfg.targets]
    adapters = {}
    flat = pytree.to_flat_dict(base)
    for i, (path, w) in enumerate(flat.items()):
        if not any(p.search(path) for p in patterns):
            continue
        if w.dim() != 2:
            raise ValueError(
                f"LoRA target {path!r} has shape {tuple(w.shape)}; only 2-D weights can be adapted"
            )
        out_dim, in_dim = w.shape
        bound = 1.0 / math.sqrt(in_dim)
        a = random.uniform(
            random.fold_in(key, i), (cfg.rank, in_dim), w.dtype, -bound, bound, device=w.device
        )
        adapters[f"{path}/a"] = a
        adapters[f"{path}/b"] = torch.zeros(out_dim, cfg.rank, dtype=w.dtype, device=w.device)
    if not adapters:
        raise ValueError(
            f"LoRA targets {list(cfg.targets)} match no parameter; paths look like {list(flat)[:5]}"
        )
    return pytree.from_flat_dict(adapters)


def by_path(adapters: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{weight path: (a, b)}`` for an adapter tree from :func:`init`."""
    flat = pytree.to_flat_dict(adapters)
    return {p[:-2]: (a, flat[p[:-2] + "/b"]) for p, a in flat.items() if p.endswith("/a")}


def merge(base: Any, adapters: Any, cfg: LoraConfig) -> Any:
    """The base tree with ``W + scale * B @ A`` at every adapted path (differentiable in the adapters)."""
    ab = by_path(adapters)
    return pytree.map_with_path(lambda p, w: w + cfg.scale * (ab[p][1] @ ab[p][0]) if p in ab else w, base)


def save_peft(
    adapters: Any,
    cfg: LoraConfig,
    directory: str,
    hf_name: Callable[[str], str],
    *,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in the PEFT format.

    ``hf_name`` maps our parameter path to the Hugging Face weight name (e.g. ``models.hf.llama.hf_name``).
    """
    os.makedirs(directory, exist_ok=True)
    tensors, modules = {}, set()
    for path, (a, b) in by_path(adapters).items():
        module = hf_name(path).removesuffix(".weight")
        modules.add(module.removeprefix("model."))  # full names: PEFT adapts exactly these modules
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.detach().contiguous().cpu()
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(modules),
        "base_model_name_or_path": base_model_name_or_path,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
