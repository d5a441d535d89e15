"""Hugging Face adapter for InternVL (``InternVLForConditionalGeneration``, the ``-hf`` checkpoints).

The same spellings as LLaVA load (``model.language_model.*`` / ``language_model.model.*``, ``model.vision_tower.*``
/ ``vision_tower.*``, ...); we export what transformers 5.x ``save_pretrained`` writes (``language_model.model.*``,
``vision_tower.*``, ``multi_modal_projector.*``). The original trust-remote-code InternVL repos (``vision_model.*``,
``mlp1.*``, InternLM2's fused ``wqkv``) are a different format: convert them with transformers'
``convert_internvl_weights_to_hf`` first.

Note that ``InternVLConfig.tie_word_embeddings`` defaults to True, and that flag (not the text config's) decides
whether transformers ties the output head.

Example::

    >>> from functional_mm.models.hf import internvl as hf_internvl
    >>> cfg, params = hf_internvl.load_pretrained("InternVL3-1B-hf")       # doctest: +SKIP
    >>> hf_internvl.save_pretrained(params, cfg, "export/internvl")         # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from functional_mm import pytree
from functional_mm.models import internvl
from functional_mm.models.hf import io
from functional_mm.models.hf import llava as hf_llava
from functional_mm.models.hf import vit as hf_vit

__all__ = [
    "config_from_hf",
    "config_to_hf",
    "disk_name",
    "name_map",
    "from_hf_state_dict",
    "to_hf_state_dict",
    "load_pretrained",
    "save_pretrained",
]

canonical_name = hf_llava.canonical_name  # the same stored spellings map to the same in-memory names

_TEXT_DEFAULTS = {
    # transformers' Qwen2Config defaults, for fields a config.json leaves out.
    "qwen2": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    ),
}


def config_from_hf(d: Mapping[str, Any], *, dtype: str | None = None) -> internvl.InternVLConfig:
    """A :class:`~functional_mm.models.internvl.InternVLConfig` from a ``model_type: internvl`` config dict.

    Example::

        >>> cfg = config_from_hf({"model_type": "internvl", "image_token_id": 60,
        ...     "text_config": {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
        ...                     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48},
        ...     "vision_config": {"model_type": "internvl_vision", "hidden_size": 16, "intermediate_size": 32,
        ...                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 16, "patch_size": 4}})
        >>> cfg.num_image_tokens, cfg.text.tie_embeddings
        (4, True)
    """
    if d.get("model_type") != "internvl":
        raise ValueError(f"config_from_hf: model_type {d.get('model_type')!r} is not 'internvl'")
    text = dict(d.get("text_config") or {"model_type": "qwen2"})
    mt = text.get("model_type", "qwen2")
    text = {**_TEXT_DEFAULTS.get(mt, {}), **text}
    text_cfg = hf_vit.replace_dtype(
        hf_llava.text_config_from_hf(text, bool(d.get("tie_word_embeddings", True))), dtype
    )
    vision_cfg = hf_vit.config_from_hf(
        {"model_type": "internvl_vision", **(d.get("vision_config") or {})}, dtype=dtype
    )
    act = d.get("projector_hidden_act", "gelu")
    if act not in hf_vit.ACT_FROM_HF:
        raise ValueError(f"config_from_hf: unsupported projector_hidden_act={act!r}")
    layer = d.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ValueError(
            f"config_from_hf: vision_feature_layer={layer!r} (a list) is not supported by InternVL"
        )
    return internvl.InternVLConfig(
        vision=vision_cfg,
        text=text_cfg,
        image_token_id=d.get("image_token_id", 151667),
        downsample_ratio=float(d.get("downsample_ratio", 0.5)),
        feature_layer=layer,
        feature_select=d.get("vision_feature_select_strategy", "default"),
        projector_act=hf_vit.ACT_FROM_HF[act],
    )


def config_to_hf(cfg: internvl.InternVLConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` dict of an ``InternVLForConditionalGeneration``."""
    vision = hf_vit.config_to_hf(cfg.vision)
    vision.pop("architectures", None)
    d = {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "vision_config": vision,
        "text_config": hf_llava.text_config_to_hf(cfg.text),
        "image_token_id": cfg.image_token_id,
        "image_seq_length": cfg.num_image_tokens,
        "downsample_ratio": cfg.downsample_ratio,
        "projector_hidden_act": hf_vit.ACT_TO_HF[cfg.projector_act],
        "vision_feature_layer": cfg.feature_layer,
        "vision_feature_select_strategy": cfg.feature_select,
        "tie_word_embeddings": cfg.text.tie_embeddings,
        "dtype": cfg.text.dtype,
    }
    d.update(extra or {})
    return d


# ----------------------------------------------------------------------------------------------------------------
# names

_TO_DISK = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]
_PROJECTOR = {"norm": "layer_norm", "fc1": "linear_1", "fc2": "linear_2"}


def disk_name(name: str) -> str:
    """In-memory name -> the spelling transformers 5.x ``save_pretrained`` writes.

    Example::

        >>> disk_name("model.multi_modal_projector.layer_norm.weight")
        'multi_modal_projector.layer_norm.weight'
    """
    for old, new in _TO_DISK:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _target(path: str, cfg: internvl.InternVLConfig) -> hf_vit.Target:
    head, _, rest = path.partition("/")
    if head == "vision":
        t = hf_vit.vit_target(rest, cfg.vision.family)
        return t._replace(name="model.vision_tower." + t.name)
    if head == "projector":
        mod, leaf = rest.split("/")
        return hf_vit.Target(hf_vit.norm_names(f"model.multi_modal_projector.{_PROJECTOR[mod]}", leaf))
    if head == "text":
        return hf_llava.text_target(rest)
    raise KeyError(f"no Hugging Face name for InternVL parameter {path!r}")


def name_map(cfg: internvl.InternVLConfig) -> hf_vit.NameMap:
    shapes = {p: tuple(x.shape) for p, x in pytree.flatten_with_paths(internvl.abstract(cfg)[0])[0]}
    return hf_vit.NameMap(shapes, lambda p: _target(p, cfg))


# ----------------------------------------------------------------------------------------------------------------
# weights


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: internvl.InternVLConfig, *, dtype=None):
    """Our tree from a transformers ``InternVLForConditionalGeneration.state_dict()`` (strict; copied)."""
    return hf_llava.load(
        state_dict,
        cfg,
        internvl.abstract(cfg)[0],
        name_map(cfg),
        rename=canonical_name,
        where="state dict",
        dtype=dtype,
    )


def to_hf_state_dict(
    params, cfg: internvl.InternVLConfig, *, spelling: str = "disk"
) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` in the 5.x file spelling (``"disk"``) or the in-memory one (``"memory"``)."""
    return hf_llava.export(params, name_map(cfg), disk_name, spelling)


def load_pretrained(directory: str | os.PathLike, *, dtype: str | None = None):
    """``(cfg, params)`` from a transformers InternVL directory (any spelling; sharded or not). Strict."""
    cfg = config_from_hf(io.read_config(directory), dtype=dtype)
    params = hf_llava.load(
        directory,
        cfg,
        internvl.abstract(cfg)[0],
        name_map(cfg),
        rename=canonical_name,
        where=f"checkpoint {str(directory)!r}",
    )
    return cfg, params


def save_pretrained(
    params,
    cfg: internvl.InternVLConfig,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
    extra_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``config.json`` + safetensors that ``InternVLForConditionalGeneration.from_pretrained`` loads with
    no missing or unexpected keys. Returns the written file names."""
    return hf_llava.write_pretrained(
        directory, to_hf_state_dict(params, cfg), config_to_hf(cfg, extra_config), max_shard_bytes
    )
