"""diffusers adapter for ``AutoencoderKL`` (the ``vae/`` folder of an SD / SDXL / SD3 / Flux pipeline).

Older diffusers exports name the mid-block attention ``query/key/value/proj_attn``; diffusers renames them on
load and so do we (:data:`LEGACY_ATTENTION`).

Example::

    >>> from functional_mm.models.hf import vae as hf_vae
    >>> cfg, params = hf_vae.load_pretrained("stable-diffusion-3-medium/vae")   # doctest: +SKIP
    >>> hf_vae.save_pretrained(params, cfg, "export/vae")                       # doctest: +SKIP
    >>> # diffusers.AutoencoderKL.from_pretrained("export/vae") loads it with no missing keys
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from functional_mm.models import vae
from functional_mm.models.hf import io
from functional_mm.models.hf import mmdit as hf_mmdit

__all__ = [
    "WEIGHTS_NAME",
    "LEGACY_ATTENTION",
    "hf_name",
    "config_from_hf",
    "config_to_hf",
    "from_hf_state_dict",
    "to_hf_state_dict",
    "load_pretrained",
    "save_pretrained",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "AutoencoderKL"
# Pre-0.14 diffusers attention names -> current ones (diffusers' _fix_state_dict_keys_on_load).
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_MODULE = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "shortcut": "conv_shortcut",
}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
_LEAF = {"weight": "weight", "bias": "bias", "scale": "weight"}
_PATTERNS = [
    (re.compile(r"^(encoder|decoder)/(conv_in|conv_out)$"), lambda m: f"{m[1]}.{m[2]}"),
    (re.compile(r"^(encoder|decoder)/norm_out$"), lambda m: f"{m[1]}.conv_norm_out"),
    (re.compile(r"^(quant_conv|post_quant_conv)$"), lambda m: m[1]),
    (
        re.compile(r"^encoder/down/(\d+)/res/(\d+)/(\w+)$"),
        lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_MODULE[m[3]]}",
    ),
    (
        re.compile(r"^encoder/down/(\d+)/downsample$"),
        lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv",
    ),
    (
        re.compile(r"^decoder/up/(\d+)/res/(\d+)/(\w+)$"),
        lambda m: f"decoder.up_blocks.{m[1]}.resnets.{m[2]}.{_MODULE[m[3]]}",
    ),
    (re.compile(r"^decoder/up/(\d+)/upsample$"), lambda m: f"decoder.up_blocks.{m[1]}.upsamplers.0.conv"),
    (
        re.compile(r"^(encoder|decoder)/mid/res/(\d+)/(\w+)$"),
        lambda m: f"{m[1]}.mid_block.resnets.{m[2]}.{_MODULE[m[3]]}",
    ),
    (
        re.compile(r"^(encoder|decoder)/mid/attn/(\w+)$"),
        lambda m: f"{m[1]}.mid_block.attentions.0.{_ATTN[m[2]]}",
    ),
]


def hf_name(path: str) -> str:
    """The diffusers state-dict name of one of our parameter paths.

    Example::

        >>> hf_name("decoder/up/1/res/0/shortcut/weight")
        'decoder.up_blocks.1.resnets.0.conv_shortcut.weight'
        >>> hf_name("encoder/mid/attn/norm/scale")
        'encoder.mid_block.attentions.0.group_norm.weight'
    """
    module, _, leaf = path.rpartition("/")
    if leaf in _LEAF:
        for pattern, fmt in _PATTERNS:
            m = pattern.match(module)
            if m:
                try:
                    return f"{fmt(m)}.{_LEAF[leaf]}"
                except KeyError:
                    break
    raise KeyError(f"no diffusers name for AutoencoderKL parameter {path!r}")


_LEGACY = re.compile(r"^(.*\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)$")


def _rename_legacy(name: str) -> str:
    m = _LEGACY.match(name)
    return f"{m[1]}.{LEGACY_ATTENTION[m[2]]}.{m[3]}" if m else name


# ----------------------------------------------------------------------------------------------------------------
# config

_SAME = (
    "in_channels",
    "out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "sample_size",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
    "force_upcast",
)


def config_from_hf(d: Mapping[str, Any]) -> vae.AutoencoderKLConfig:
    """An :class:`~functional_mm.models.vae.AutoencoderKLConfig` from a diffusers ``config.json`` dict.
    Block types other than ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` and activations other than SiLU are
    rejected, not ignored.

    Example::

        >>> config_from_hf({"_class_name": "AutoencoderKL", "block_out_channels": [8, 16],
        ...     "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
        ...     "norm_num_groups": 4}).downsample_factor
        2
    """
    cls = d.get("_class_name", CLASS_NAME)
    if cls != CLASS_NAME:
        raise ValueError(f"config_from_hf: _class_name {cls!r} is not {CLASS_NAME!r}")
    channels = tuple(d.get("block_out_channels", (64,)))
    problems = []
    down = tuple(d.get("down_block_types", ("DownEncoderBlock2D",)))
    up = tuple(d.get("up_block_types", ("UpDecoderBlock2D",)))
    if down != ("DownEncoderBlock2D",) * len(channels):
        problems.append(f"down_block_types={list(down)}")
    if up != ("UpDecoderBlock2D",) * len(channels):
        problems.append(f"up_block_types={list(up)}")
    if d.get("act_fn", "silu") not in ("silu", "swish"):
        problems.append(f"act_fn={d['act_fn']!r}")
    if problems:
        raise ValueError(
            "config_from_hf: unsupported AutoencoderKL feature(s): " + ", ".join(problems) + " (one "
            "DownEncoderBlock2D / UpDecoderBlock2D per block_out_channels entry, SiLU)"
        )
    fields = {k: d[k] for k in _SAME if k in d}
    fields["block_out_channels"] = channels
    for k in ("latents_mean", "latents_std"):
        if fields.get(k) is not None:
            fields[k] = tuple(fields[k])
    return vae.AutoencoderKLConfig.from_dict(fields)


def config_to_hf(cfg: vae.AutoencoderKLConfig) -> dict[str, Any]:
    """A diffusers ``config.json`` dict (``_class_name`` included)."""
    import diffusers  # only for the version stamp

    d = {k: getattr(cfg, k) for k in _SAME}
    n = len(cfg.block_out_channels)
    d.update(
        _class_name=CLASS_NAME,
        _diffusers_version=diffusers.__version__,
        block_out_channels=list(cfg.block_out_channels),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        act_fn="silu",
    )
    for k in ("latents_mean", "latents_std", "sample_size"):
        if isinstance(d[k], tuple):
            d[k] = list(d[k])
    return d


# ----------------------------------------------------------------------------------------------------------------
# weights


def _shapes(cfg: vae.AutoencoderKLConfig):
    return vae.abstract(cfg)[0]


def from_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: vae.AutoencoderKLConfig, *, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Our parameter tree from a diffusers ``state_dict()`` (strict; legacy attention names accepted)."""
    sd = {_rename_legacy(k): v for k, v in state_dict.items()}
    return io.load_params(sd, _shapes(cfg), hf_name, dtype=dtype)


def to_hf_state_dict(params: dict[str, Any], cfg: vae.AutoencoderKLConfig) -> dict[str, torch.Tensor]:
    """``{diffusers name: tensor}`` (CPU, contiguous), checked against ``cfg``."""
    return hf_mmdit.export_checked(params, _shapes(cfg), hf_name)


def load_pretrained(
    directory: str | os.PathLike, *, dtype: str | None = None
) -> tuple[vae.AutoencoderKLConfig, dict[str, Any]]:
    """``(cfg, params)`` from a diffusers ``AutoencoderKL`` directory; strict (one error naming every missing,
    unexpected or mis-shaped tensor). ``dtype`` is the parameter dtype (default float32: diffusers'
    config.json records none).

    Example::

        >>> cfg, params = load_pretrained("FLUX.1-dev/vae", dtype="float32")   # doctest: +SKIP
    """
    cfg = config_from_hf(io.read_config(directory))
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    params = io.load_params(
        directory, _shapes(cfg), hf_name, weights_name=WEIGHTS_NAME, rename=_rename_legacy
    )
    return cfg, params


def save_pretrained(
    params: dict[str, Any],
    cfg: vae.AutoencoderKLConfig,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` that
    ``diffusers.AutoencoderKL.from_pretrained`` loads with no missing or unexpected keys."""
    return hf_mmdit.write_pretrained(
        directory, to_hf_state_dict(params, cfg), config_to_hf(cfg), max_shard_bytes
    )
