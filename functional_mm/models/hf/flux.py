"""diffusers adapter for Flux.1 (``FluxTransformer2DModel``, the ``transformer/`` folder of a Flux pipeline).

Example::

    >>> from functional_mm.models.hf import flux as hf_flux
    >>> cfg, params = hf_flux.load_pretrained("FLUX.1-dev/transformer", dtype="bfloat16")   # doctest: +SKIP
    >>> hf_flux.save_pretrained(params, cfg, "export/transformer")                        # doctest: +SKIP
    >>> # diffusers.FluxTransformer2DModel.from_pretrained("export/transformer") loads it with no missing keys
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from functional_mm.models import flux
from functional_mm.models.hf import io
from functional_mm.models.hf import mmdit as hf_mmdit

__all__ = [
    "WEIGHTS_NAME",
    "hf_name",
    "config_from_hf",
    "config_to_hf",
    "from_hf_state_dict",
    "to_hf_state_dict",
    "load_pretrained",
    "save_pretrained",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "FluxTransformer2DModel"

_TOP = {
    "x_embed": "x_embedder",
    "context_embed": "context_embedder",
    "time_embed/fc1": "time_text_embed.timestep_embedder.linear_1",
    "time_embed/fc2": "time_text_embed.timestep_embedder.linear_2",
    "guidance_embed/fc1": "time_text_embed.guidance_embedder.linear_1",
    "guidance_embed/fc2": "time_text_embed.guidance_embedder.linear_2",
    "text_embed/fc1": "time_text_embed.text_embedder.linear_1",
    "text_embed/fc2": "time_text_embed.text_embedder.linear_2",
    "final_mod": "norm_out.linear",
    "proj_out": "proj_out",
}
_DOUBLE = hf_mmdit.JOINT_BLOCK
_SINGLE = {
    "mod": "norm.linear",
    "attn/q": "attn.to_q",
    "attn/k": "attn.to_k",
    "attn/v": "attn.to_v",
    "attn/q_norm": "attn.norm_q",
    "attn/k_norm": "attn.norm_k",
    "mlp_in": "proj_mlp",
    "proj_out": "proj_out",
}
_LEAF = {"weight": "weight", "bias": "bias", "scale": "weight"}
_BLOCK_PATH = re.compile(r"^(double|single)/(\d+)/(.+)/(weight|bias|scale)$")
_TOP_PATH = re.compile(r"^(.+)/(weight|bias|scale)$")


def hf_name(path: str) -> str:
    """The diffusers state-dict name of one of our parameter paths.

    Example::

        >>> hf_name("single/5/mlp_in/weight"), hf_name("double/0/c_attn/k_norm/scale")
        ('single_transformer_blocks.5.proj_mlp.weight', 'transformer_blocks.0.attn.norm_added_k.weight')
    """
    m = _BLOCK_PATH.match(path)
    if m:
        table, prefix = (
            (_DOUBLE, "transformer_blocks")
            if m.group(1) == "double"
            else (_SINGLE, "single_transformer_blocks")
        )
        if m.group(3) in table:
            return f"{prefix}.{m.group(2)}.{table[m.group(3)]}.{_LEAF[m.group(4)]}"
    m = _TOP_PATH.match(path)
    if m and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{_LEAF[m.group(2)]}"
    raise KeyError(f"no diffusers name for Flux parameter {path!r}")


# ----------------------------------------------------------------------------------------------------------------
# config

_SAME = (
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "num_single_layers",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
)


def config_from_hf(d: Mapping[str, Any]) -> flux.FluxConfig:
    """A :class:`~functional_mm.models.flux.FluxConfig` from a diffusers ``config.json`` dict.

    Example::

        >>> config_from_hf({"_class_name": "FluxTransformer2DModel", "num_attention_heads": 2,
        ...     "attention_head_dim": 16, "axes_dims_rope": [4, 6, 6]}).dim
        32
    """
    hf_mmdit.check_class_name(d, CLASS_NAME)
    fields = {k: d[k] for k in _SAME if k in d}
    fields["num_heads"] = d.get("num_attention_heads", 24)
    fields["head_dim"] = d.get("attention_head_dim", 128)
    fields["axes_dims_rope"] = tuple(d.get("axes_dims_rope", (16, 56, 56)))
    return flux.FluxConfig.from_dict(fields)


def config_to_hf(cfg: flux.FluxConfig) -> dict[str, Any]:
    """A diffusers ``config.json`` dict (``_class_name`` included)."""
    return hf_mmdit.diffusers_config(cfg, _SAME, CLASS_NAME, axes_dims_rope=list(cfg.axes_dims_rope))


# ----------------------------------------------------------------------------------------------------------------
# weights


def _shapes(cfg: flux.FluxConfig):
    return flux.abstract(cfg)[0]


def from_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: flux.FluxConfig, *, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Our parameter tree from a diffusers ``state_dict()`` (strict; the tensors are copied)."""
    return io.load_params(dict(state_dict), _shapes(cfg), hf_name, dtype=dtype)


def to_hf_state_dict(params: dict[str, Any], cfg: flux.FluxConfig) -> dict[str, torch.Tensor]:
    """``{diffusers name: tensor}`` (CPU, contiguous), checked against ``cfg``."""
    return hf_mmdit.export_checked(params, _shapes(cfg), hf_name)


def load_pretrained(
    directory: str | os.PathLike, *, dtype: str | None = None
) -> tuple[flux.FluxConfig, dict[str, Any]]:
    """``(cfg, params)`` from a diffusers directory; strict (one error naming every missing, unexpected or
    mis-shaped tensor). ``dtype`` is the parameter dtype (default float32: diffusers' config.json records
    none).

    Example::

        >>> cfg, params = load_pretrained("FLUX.1-schnell/transformer")   # doctest: +SKIP
    """
    cfg = config_from_hf(io.read_config(directory))
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    return cfg, io.load_params(directory, _shapes(cfg), hf_name, weights_name=WEIGHTS_NAME)


def save_pretrained(
    params: dict[str, Any],
    cfg: flux.FluxConfig,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` (sharded with an index above
    ``max_shard_bytes``) that ``diffusers.FluxTransformer2DModel.from_pretrained`` loads with no missing or
    unexpected keys. Returns the written file names."""
    return hf_mmdit.write_pretrained(
        directory, to_hf_state_dict(params, cfg), config_to_hf(cfg), max_shard_bytes
    )
