"""diffusers adapter for SD3 / SD3.5 (``SD3Transformer2DModel``, the ``transformer/`` folder of a pipeline).

The fixed ``pos_embed.pos_embed`` buffer that diffusers saves is not one of our parameters: on load it must
match the table :func:`functional_mm.models.mmdit.pos_embed` computes (to the precision of the checkpoint
dtype), which catches a checkpoint with a different position scheme; on export it is written so that
``from_pretrained`` finds every key.

Example::

    >>> from functional_mm.models.hf import mmdit as hf_mmdit
    >>> cfg, params = hf_mmdit.load_pretrained("sd3-medium/transformer", dtype="float32")   # doctest: +SKIP
    >>> hf_mmdit.save_pretrained(params, cfg, "export/transformer")                       # doctest: +SKIP
    >>> # diffusers.SD3Transformer2DModel.from_pretrained("export/transformer") loads it with no missing keys
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from functional_mm import nn, pytree
from functional_mm.models import mmdit
from functional_mm.models.hf import io

__all__ = [
    "WEIGHTS_NAME",
    "POS_EMBED",
    "hf_name",
    "config_from_hf",
    "config_to_hf",
    "from_hf_state_dict",
    "to_hf_state_dict",
    "load_pretrained",
    "save_pretrained",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
POS_EMBED = "pos_embed.pos_embed"
CLASS_NAME = "SD3Transformer2DModel"

_TOP = {
    "patch_embed": "pos_embed.proj",
    "time_embed/fc1": "time_text_embed.timestep_embedder.linear_1",
    "time_embed/fc2": "time_text_embed.timestep_embedder.linear_2",
    "text_embed/fc1": "time_text_embed.text_embedder.linear_1",
    "text_embed/fc2": "time_text_embed.text_embedder.linear_2",
    "context_embed": "context_embedder",
    "final_mod": "norm_out.linear",
    "proj_out": "proj_out",
}
# diffusers' joint (image + text) transformer block, shared with Flux's double blocks.
JOINT_BLOCK = {
    "x_mod": "norm1.linear",
    "c_mod": "norm1_context.linear",
    "attn/q": "attn.to_q",
    "attn/k": "attn.to_k",
    "attn/v": "attn.to_v",
    "attn/o": "attn.to_out.0",
    "attn/q_norm": "attn.norm_q",
    "attn/k_norm": "attn.norm_k",
    "c_attn/q": "attn.add_q_proj",
    "c_attn/k": "attn.add_k_proj",
    "c_attn/v": "attn.add_v_proj",
    "c_attn/o": "attn.to_add_out",
    "c_attn/q_norm": "attn.norm_added_q",
    "c_attn/k_norm": "attn.norm_added_k",
    "mlp/fc1": "ff.net.0.proj",
    "mlp/fc2": "ff.net.2",
    "c_mlp/fc1": "ff_context.net.0.proj",
    "c_mlp/fc2": "ff_context.net.2",
}
_BLOCK = {
    **JOINT_BLOCK,
    "attn2/q": "attn2.to_q",
    "attn2/k": "attn2.to_k",
    "attn2/v": "attn2.to_v",
    "attn2/o": "attn2.to_out.0",
    "attn2/q_norm": "attn2.norm_q",
    "attn2/k_norm": "attn2.norm_k",
}
_LEAF = {"weight": "weight", "bias": "bias", "scale": "weight"}
_BLOCK_PATH = re.compile(r"^blocks/(\d+)/(.+)/(weight|bias|scale)$")
_TOP_PATH = re.compile(r"^(.+)/(weight|bias|scale)$")


def hf_name(path: str) -> str:
    """The diffusers state-dict name of one of our parameter paths.

    Example::

        >>> hf_name("blocks/3/c_attn/o/bias")
        'transformer_blocks.3.attn.to_add_out.bias'
    """
    m = _BLOCK_PATH.match(path)
    if m and m.group(2) in _BLOCK:
        return f"transformer_blocks.{m.group(1)}.{_BLOCK[m.group(2)]}.{_LEAF[m.group(3)]}"
    m = _TOP_PATH.match(path)
    if m and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{_LEAF[m.group(2)]}"
    raise KeyError(f"no diffusers name for MMDiT parameter {path!r}")


# ----------------------------------------------------------------------------------------------------------------
# config

_SAME = (
    "sample_size",
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "pos_embed_max_size",
    "qk_norm",
)


def config_from_hf(d: Mapping[str, Any]) -> mmdit.MMDiTConfig:
    """An :class:`~functional_mm.models.mmdit.MMDiTConfig` from a diffusers ``config.json`` dict.

    Example::

        >>> cfg = config_from_hf({"_class_name": "SD3Transformer2DModel", "num_layers": 2,
        ...     "num_attention_heads": 2, "attention_head_dim": 8, "caption_projection_dim": 16,
        ...     "qk_norm": "rms_norm", "dual_attention_layers": [0]})
        >>> cfg.dim, cfg.dual_attention_layers
        (16, (0,))
    """
    check_class_name(d, CLASS_NAME)
    if d.get("pos_embed_max_size", 96) is None:
        raise ValueError(
            "config_from_hf: pos_embed_max_size=None (an uncropped position table) is not supported"
        )
    fields = {k: d[k] for k in _SAME if k in d}
    fields["num_heads"] = d.get("num_attention_heads", 18)
    fields["head_dim"] = d.get("attention_head_dim", 64)
    fields["dual_attention_layers"] = tuple(d.get("dual_attention_layers") or ())
    return mmdit.MMDiTConfig.from_dict(fields)


def config_to_hf(cfg: mmdit.MMDiTConfig) -> dict[str, Any]:
    """A diffusers ``config.json`` dict (``_class_name`` included)."""
    return diffusers_config(cfg, _SAME, CLASS_NAME, dual_attention_layers=list(cfg.dual_attention_layers))


def check_class_name(d: Mapping[str, Any], class_name: str) -> None:
    """Reject a diffusers config dict whose ``_class_name`` (when given) is not ``class_name``."""
    cls = d.get("_class_name", class_name)
    if cls != class_name:
        raise ValueError(f"config_from_hf: _class_name {cls!r} is not {class_name!r}")


def diffusers_config(cfg: Any, same: tuple[str, ...], class_name: str, **extra: Any) -> dict[str, Any]:
    """A diffusers transformer ``config.json`` dict: the ``same`` fields of ``cfg``, the class and version
    stamp, the head layout and ``extra``. Shared with :mod:`functional_mm.models.hf.flux`."""
    import diffusers  # only for the version stamp

    d = {k: getattr(cfg, k) for k in same}
    d.update(
        _class_name=class_name,
        _diffusers_version=diffusers.__version__,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        **extra,
    )
    return d


# ----------------------------------------------------------------------------------------------------------------
# weights


def _shapes(cfg: mmdit.MMDiTConfig):
    return mmdit.abstract(cfg)[0]


def _pos_rows(cfg: mmdit.MMDiTConfig, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``r0:r1`` of the full ``pos_embed_max_size``^2 table, ``[(r1 - r0) * m, D]``."""
    m = cfg.pos_embed_max_size
    grid = torch.arange(m, dtype=torch.float32) / (m / (cfg.sample_size // cfg.patch_size))
    return nn.sincos.sincos_2d(cfg.dim, grid[r0:r1], grid).float().to(dtype)


_ROWS = 16  # rows of the grid per chunk: SD3.5 Medium's full float64 table would take ~1.8 GB at once


def _pos_table(cfg: mmdit.MMDiTConfig, dtype: torch.dtype) -> torch.Tensor:
    m = cfg.pos_embed_max_size
    chunks = [_pos_rows(cfg, r, min(r + _ROWS, m), dtype) for r in range(0, m, _ROWS)]
    return torch.cat(chunks)[None]  # [1, m * m, D]: the full (uncropped) table diffusers stores


def _check_pos_table(table: torch.Tensor, cfg: mmdit.MMDiTConfig, where: str) -> None:
    m = cfg.pos_embed_max_size
    want = (1, m * m, cfg.dim)
    if tuple(table.shape) != want:
        raise io.CheckpointMismatchError(
            f"{where}: {POS_EMBED} has shape {list(table.shape)}, expected {list(want)}"
        )
    # The table was computed in float64 and stored in the checkpoint dtype: allow that dtype's rounding.
    tol = max(2 * torch.finfo(table.dtype).eps, 1e-6) if table.dtype.is_floating_point else 0.0
    err = 0.0
    for r in range(0, m, _ROWS):
        r1 = min(r + _ROWS, m)
        ours = _pos_rows(cfg, r, r1, torch.float32)
        err = max(err, (table[0, r * m : r1 * m].float() - ours).abs().max().item())
    if err > tol:
        raise io.CheckpointMismatchError(
            f"{where}: {POS_EMBED} differs from the 2-D sincos table for this config (max |diff| {err:.3g}); "
            "a checkpoint with learned or differently built positions is not supported"
        )


def from_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: mmdit.MMDiTConfig, *, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Our parameter tree from a diffusers ``state_dict()`` (strict; the tensors are copied).

    Example::

        >>> params = from_hf_state_dict(model.state_dict(), config_from_hf(model.config))   # doctest: +SKIP
    """
    sd = dict(state_dict)
    if POS_EMBED not in sd:
        raise io.CheckpointMismatchError(f"state dict does not match the model:\n  missing (1): {POS_EMBED}")
    _check_pos_table(sd.pop(POS_EMBED), cfg, "state dict")
    return io.load_params(sd, _shapes(cfg), hf_name, dtype=dtype)


def to_hf_state_dict(params: dict[str, Any], cfg: mmdit.MMDiTConfig) -> dict[str, torch.Tensor]:
    """``{diffusers name: tensor}`` (CPU, contiguous) including the position table, checked against ``cfg``."""
    out = export_checked(params, _shapes(cfg), hf_name)
    dtype = params["proj_out"]["weight"].dtype
    out[POS_EMBED] = _pos_table(cfg, dtype)
    return out


def load_pretrained(
    directory: str | os.PathLike, *, dtype: str | None = None
) -> tuple[mmdit.MMDiTConfig, dict[str, Any]]:
    """``(cfg, params)`` from a diffusers directory (``config.json`` plus ``diffusion_pytorch_model.safetensors``
    or its sharded index). Strict: missing, unexpected or mis-shaped tensors raise one
    :class:`~functional_mm.models.hf.io.CheckpointMismatchError` naming them all. ``dtype`` is the
    parameter dtype (default float32: diffusers' config.json records none).

    Example::

        >>> cfg, params = load_pretrained("stable-diffusion-3.5-large/transformer", dtype="bfloat16")  # doctest: +SKIP
    """
    cfg = config_from_hf(io.read_config(directory))
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    # Every parameter strictly (one error naming all problems), then the fixed table: present, right shape
    # (read_tensors is strict about the one name it is asked for) and equal to the 2-D sincos table.
    params = io.load_params(
        directory, _shapes(cfg), hf_name, ignore=[rf"^{re.escape(POS_EMBED)}$"], weights_name=WEIGHTS_NAME
    )
    m = cfg.pos_embed_max_size
    table = io.read_tensors(
        directory, {POS_EMBED: (1, m * m, cfg.dim)}, ignore=[".*"], weights_name=WEIGHTS_NAME
    )
    _check_pos_table(table[POS_EMBED], cfg, f"checkpoint {str(directory)!r}")
    return cfg, params


def save_pretrained(
    params: dict[str, Any],
    cfg: mmdit.MMDiTConfig,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` (sharded with an index above
    ``max_shard_bytes``) that ``diffusers.SD3Transformer2DModel.from_pretrained`` loads with no missing or
    unexpected keys. Returns the written file names.

    Example::

        >>> save_pretrained(params, cfg, "out/transformer")   # doctest: +SKIP
    """
    return write_pretrained(directory, to_hf_state_dict(params, cfg), config_to_hf(cfg), max_shard_bytes)


def export_checked(params: dict[str, Any], shapes: dict[str, Any], name_fn) -> dict[str, torch.Tensor]:
    """``{diffusers name: tensor}`` of ``params``, checked name by name and shape by shape against the
    abstract tree ``shapes``. Shared with the Flux and VAE adapters."""
    want = {name_fn(p): tuple(x.shape) for p, x in pytree.flatten_with_paths(shapes)[0]}
    out = io.export_params(params, name_fn)
    io.check_names({k: tuple(v.shape) for k, v in out.items()}, want, where="params")
    return out


def write_pretrained(
    directory: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``state_dict`` as ``diffusion_pytorch_model.safetensors`` (sharded above ``max_shard_bytes``) and
    ``config`` as ``config.json``; returns the written file names. Shared with the Flux
    and VAE adapters."""
    files = io.write_tensors(
        directory, state_dict, max_shard_bytes=max_shard_bytes, weights_name=WEIGHTS_NAME
    )
    io.write_config(directory, config)
    return [*files, "config.json"]
