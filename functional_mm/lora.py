"""Functional LoRA: low-rank adapters kept in their own pytree and merged into the base weights on the fly.

``W' = W + (alpha / rank) * B @ A`` for every 2-D weight whose "/"-path matches one of ``targets``. The
adapters are the *only* thing the optimizer sees, so the frozen base carries no optimizer state and the base
tree is never modified; model code is unchanged (``apply(lora.merge(base, adapters, cfg), ...)``).

Dropout (``LoraConfig.dropout``, PEFT's ``lora_dropout``). PEFT drops input features of the LoRA branch
independently for every token: ``B @ A @ dropout(x)``. That depends on the activation, so merged weights
cannot express it. What merged weights can express is dropping input features *of the weight*:
``merge(..., key=k)`` draws, per adapted weight, one keep-mask ``m: [in]`` and merges
``W + scale * B @ (A * m[None, :] / (1 - p))`` (inverted dropout: the expected delta is the undropped one).
The difference from PEFT: the mask is shared by every token (and every example) of the step instead of
being drawn per token, so the regularising noise is coarser (one draw per step rather than one per token);
pass a fresh key every step (the key the train step hands the loss). ``key=None`` (eval, export, inference)
means no dropout, like PEFT in eval mode; so does ``dropout=0``.

Export: :func:`save_peft` writes a PEFT adapter directory for transformers models; :func:`save_diffusers`
writes the ``pytorch_lora_weights.safetensors`` that diffusers' ``load_lora_weights`` reads (SD3, Flux).

Example::

    >>> import torch
    >>> from functional_mm import lora, random
    >>> base = {"attn": {"q": {"weight": torch.randn(8, 4)}}, "norm": {"scale": torch.ones(4)}}
    >>> cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=(r"attn/q/weight$",), dropout=0.1)
    >>> adapters = lora.init(random.key(0), base, cfg)
    >>> adapters["attn"]["q"]["weight"]["b"].shape   # [out, rank]
    torch.Size([8, 2])
    >>> torch.equal(lora.merge(base, adapters, cfg)["attn"]["q"]["weight"], base["attn"]["q"]["weight"])  # B = 0
    True
    >>> train_params = lora.merge(base, adapters, cfg, key=random.key(1))   # with dropout: a new key each step
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
    """``rank`` and ``alpha`` (scale ``alpha / rank``), ``targets`` (regexes searched in parameter paths) and
    ``dropout`` (probability of dropping an input feature of each adapter per step; see the module notes)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = (r"attn/(q|k|v|o)/weight$",)
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("LoraConfig.targets must hold at least one regex over parameter paths")
        # Written as a negated range so that NaN is rejected too; p = 1 would divide by zero.
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")

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


def logical_axes(adapters: Any, base_axes: Any) -> Any:
    """Logical axis names for an adapter tree (to ``parallelism.shard`` it like its base): a weight with axes
    ``(out, in)`` gives ``a: (None, in)`` and ``b: (out, None)`` (the rank dim stays whole)."""
    axes = dict(pytree.flatten_with_paths(base_axes, is_leaf=lambda x: isinstance(x, tuple))[0])
    out = {}
    for path in by_path(adapters):
        o, i = axes[path]
        out[f"{path}/a"], out[f"{path}/b"] = (None, i), (o, None)
    return pytree.from_flat_dict(out)


def by_path(adapters: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{weight path: (a, b)}`` for an adapter tree from :func:`init`."""
    flat = pytree.to_flat_dict(adapters)
    return {p[:-2]: (a, flat[p[:-2] + "/b"]) for p, a in flat.items() if p.endswith("/a")}


def merge(base: Any, adapters: Any, cfg: LoraConfig, *, key: torch.Tensor | None = None) -> Any:
    """The base tree with ``W + scale * B @ A`` at every adapted path (differentiable in the adapters).

    With ``key`` and ``cfg.dropout = p > 0`` (training), each adapted weight's delta becomes
    ``scale * B @ (A * m[None, :] / (1 - p))`` with a keep-mask ``m: [in]`` ~ Bernoulli(1 - p) drawn from
    ``random.fold_in(key, i)`` (``i``: the weight's position among the adapters), so the dropped input
    features contribute exactly nothing and the expectation over keys is the undropped delta. ``key=None``
    (eval/export) or ``p = 0`` gives the plain merge.
    """
    ab = by_path(adapters)
    p = cfg.dropout if key is not None else 0.0
    index = {path: i for i, path in enumerate(ab)}

    def delta(path: str) -> torch.Tensor:  # [out, in]
        a, b = ab[path]  # a: [r, in], b: [out, r]
        if p > 0.0:
            keep = random.bernoulli(random.fold_in(key, index[path]), 1.0 - p, (a.shape[1],), device=a.device)
            a = a * (keep.to(a.dtype) / (1.0 - p))[None, :]  # masking A's columns = dropping input features
        return cfg.scale * (b @ a)

    return pytree.map_with_path(lambda path, w: w + delta(path) if path in ab else w, base)


def _export(
    adapters: Any, hf_name: Callable[[str], str], key_prefix: str, b_scale: float
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """``({f"{key_prefix}{module}.lora_A.weight": A, ...lora_B...: b_scale * B}, {module names})`` in the
    Hugging Face module naming ``hf_name`` gives (CPU, contiguous, detached)."""
    tensors, modules = {}, set()
    for path, (a, b) in by_path(adapters).items():
        module = hf_name(path).removesuffix(".weight")
        modules.add(module)
        tensors[f"{key_prefix}{module}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{key_prefix}{module}.lora_B.weight"] = (b.detach() * b_scale).contiguous().cpu()
    return tensors, modules


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
    ``r``, ``lora_alpha`` and ``lora_dropout`` are written as configured, so PEFT applies the same scale (and
    per-token dropout if the adapter is trained further in PEFT).
    """
    os.makedirs(directory, exist_ok=True)
    tensors, modules = _export(adapters, hf_name, "base_model.model.", 1.0)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "bias": "none",
        # Full names without the "model." root: PEFT adapts exactly these modules.
        "target_modules": sorted(m.removeprefix("model.") for m in modules),
        "base_model_name_or_path": base_model_name_or_path,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def save_diffusers(
    adapters: Any,
    cfg: LoraConfig,
    directory: str,
    hf_name: Callable[[str], str],
    *,
    prefix: str = "transformer",
) -> str:
    """Write ``directory/pytorch_lora_weights.safetensors`` in the diffusers LoRA format; returns its path.

    Keys are ``{prefix}.{module}.lora_A.weight: [r, in]`` and ``{prefix}.{module}.lora_B.weight: [out, r]``
    with ``module`` from ``hf_name`` (``models.hf.mmdit.hf_name`` for SD3/SD3.5, ``models.hf.flux.hf_name``
    for Flux), which is what ``StableDiffusion3Pipeline.load_lora_weights`` / ``FluxPipeline.load_lora_weights``
    and ``transformer.load_lora_adapter(directory, prefix="transformer")`` read.

    Scale: a diffusers LoRA file without alphas is applied as ``W + B @ A`` (diffusers sets
    ``lora_alpha = r``), and SD3's loader accepts no ``.alpha`` keys, so ``alpha / rank`` is folded into the
    written ``lora_B``. The file therefore gives the same merged weights in every loader; its ``lora_B`` is
    ``scale * B``, not our ``B``. Dropout is a training-time setting and is not written.

    Example::

        >>> from functional_mm.models.hf import mmdit as hf_mmdit
        >>> save_diffusers(adapters, cfg, "out/sd3_lora", hf_mmdit.hf_name)   # doctest: +SKIP
        >>> # pipe.load_lora_weights("out/sd3_lora")
    """
    os.makedirs(directory, exist_ok=True)
    tensors, _ = _export(adapters, hf_name, f"{prefix}." if prefix else "", cfg.scale)
    path = os.path.join(directory, DIFFUSERS_WEIGHTS_NAME)
    save_file(tensors, path, metadata={"format": "pt"})
    return path
