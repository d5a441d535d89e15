"""Hugging Face adapter for LLaVA (``LlavaForConditionalGeneration``).

LLaVA checkpoints exist in several spellings of the same tensors, and all of them load:

- in memory (transformers >= 4.52) and some newer files: ``model.language_model.*``, ``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``lm_head.weight``;
- on disk (llava-hf hub repos, and what transformers 5.x ``save_pretrained`` still writes):
  ``language_model.model.*``, ``language_model.lm_head.weight``, ``multi_modal_projector.*`` and the tower as
  ``vision_tower.vision_model.*`` (hub) or ``vision_tower.*`` (5.x).

We export the hub spelling (``vision_tower.vision_model.*``), which every transformers version since LLaVA's
introduction loads with no missing or unexpected keys.

Example::

    >>> from functional_mm.models.hf import llava as hf_llava
    >>> cfg, params = hf_llava.load_pretrained("llava-1.5-7b-hf", dtype="bfloat16")   # doctest: +SKIP
    >>> hf_llava.save_pretrained(params, cfg, "export/llava")                        # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors import safe_open

from functional_mm import pytree
from functional_mm.models import llava
from functional_mm.models.hf import io
from functional_mm.models.hf import llama as hf_llama
from functional_mm.models.hf import vit as hf_vit

__all__ = [
    "config_from_hf",
    "config_to_hf",
    "canonical_name",
    "disk_name",
    "name_map",
    "from_hf_state_dict",
    "to_hf_state_dict",
    "load_pretrained",
    "save_pretrained",
]

# What transformers fills in when a LLaVA config.json leaves sub-config fields out (llava-1.5-7b-hf's
# text_config, for one, lists only the fields that differ from LlamaConfig's defaults).
TEXT_DEFAULTS = {
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
    ),
}
VISION_DEFAULTS = dict(
    model_type="clip_vision_model",
    intermediate_size=4096,
    hidden_size=1024,
    patch_size=14,
    image_size=336,
    num_hidden_layers=24,
    num_attention_heads=16,
)


def text_config_from_hf(d: Mapping[str, Any], tie: bool) -> Any:
    """A :class:`LlamaConfig` from a multimodal config's ``text_config`` (Llama or Qwen2), with transformers'
    defaults for the fields it omits and the model-level ``tie`` flag (which is what transformers 5.x obeys)."""
    mt = d.get("model_type", "llama")
    full = {**TEXT_DEFAULTS.get(mt, {}), **d, "model_type": mt, "tie_word_embeddings": tie}
    return hf_llama.config_from_hf(full)


def text_config_to_hf(cfg) -> dict[str, Any]:
    d = hf_llama.config_to_hf(cfg)
    d.pop("architectures", None)
    return d


def config_from_hf(d: Mapping[str, Any], *, dtype: str | None = None) -> llava.LlavaConfig:
    """A :class:`~functional_mm.models.llava.LlavaConfig` from a ``model_type: llava`` config dict.

    Example::

        >>> cfg = config_from_hf({"model_type": "llava", "text_config": {"model_type": "llama", "vocab_size": 64,
        ...     "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 48},
        ...     "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        ...     "num_attention_heads": 2, "image_size": 8, "patch_size": 4}, "image_token_index": 60})
        >>> cfg.num_image_tokens, cfg.feature_layers
        (4, (-2,))
    """
    if d.get("model_type") != "llava":
        raise ValueError(f"config_from_hf: model_type {d.get('model_type')!r} is not 'llava'")
    text = d.get("text_config") or {}
    tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    text_cfg = hf_vit.replace_dtype(text_config_from_hf(text, tie), dtype)
    vision_cfg = hf_vit.config_from_hf({**VISION_DEFAULTS, **(d.get("vision_config") or {})}, dtype=dtype)
    if vision_cfg.family == "internvit":
        raise ValueError("config_from_hf: a LLaVA vision tower must be CLIP or SigLIP")
    # The pooling head and post norm are never used by LLaVA but are part of the tower's checkpoint.
    layer = d.get("vision_feature_layer", -2)
    act = d.get("projector_hidden_act", "gelu")
    if act not in hf_vit.ACT_FROM_HF:
        raise ValueError(f"config_from_hf: unsupported projector_hidden_act={act!r}")
    return llava.LlavaConfig(
        vision=vision_cfg,
        text=text_cfg,
        image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
        feature_layers=(layer,) if isinstance(layer, int) else tuple(layer),
        feature_select=d.get("vision_feature_select_strategy", "default"),
        projector_act=hf_vit.ACT_FROM_HF[act],
        projector_bias=bool(d.get("multimodal_projector_bias", True)),
    )


def config_to_hf(cfg: llava.LlavaConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` dict of a ``LlavaForConditionalGeneration``; ``extra`` is merged last."""
    vision = hf_vit.config_to_hf(cfg.vision)
    vision.pop("architectures", None)
    if cfg.projector_act not in hf_vit.ACT_TO_HF:
        raise ValueError(f"config_to_hf: projector_act={cfg.projector_act!r} has no transformers name")
    layers = list(cfg.feature_layers)
    d = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": text_config_to_hf(cfg.text),
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.num_image_tokens,
        "projector_hidden_act": hf_vit.ACT_TO_HF[cfg.projector_act],
        "vision_feature_layer": layers[0] if len(layers) == 1 else layers,
        "vision_feature_select_strategy": cfg.feature_select,
        "multimodal_projector_bias": cfg.projector_bias,
        "tie_word_embeddings": cfg.text.tie_embeddings,
        "dtype": cfg.text.dtype,
    }
    d.update(extra or {})
    return d


# ----------------------------------------------------------------------------------------------------------------
# names

_TO_CANONICAL = [
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
]
_TO_DISK = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


def canonical_name(name: str) -> str:
    """Any stored LLaVA spelling -> the in-memory (transformers 5.x) name.

    Example::

        >>> canonical_name("vision_tower.vision_model.post_layernorm.weight")
        'model.vision_tower.post_layernorm.weight'
        >>> canonical_name("language_model.lm_head.weight")
        'lm_head.weight'
    """
    for pattern, repl in _TO_CANONICAL:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    return name


def disk_name(name: str) -> str:
    """Canonical name -> the llava-hf hub spelling we export."""
    for old, new in _TO_DISK:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def text_target(path: str, prefix: str = "model.language_model.") -> hf_vit.Target:
    """The canonical name of a Llama-tree path inside a VLM (``model.`` -> ``model.language_model.``)."""
    name = hf_llama.hf_name(path)
    return hf_vit.Target(prefix + name.removeprefix("model.") if name.startswith("model.") else name)


def _target(path: str, cfg: llava.LlavaConfig) -> hf_vit.Target:
    head, _, rest = path.partition("/")
    if head == "vision":
        t = hf_vit.vit_target(rest, cfg.vision.family)
        return t._replace(name="model.vision_tower." + t.name)
    if head == "projector":
        fc, leaf = rest.split("/")
        return hf_vit.Target(f"model.multi_modal_projector.linear_{fc[-1]}.{leaf}")
    if head == "text":
        return text_target(rest)
    raise KeyError(f"no Hugging Face name for LLaVA parameter {path!r}")


def name_map(cfg: llava.LlavaConfig) -> hf_vit.NameMap:
    shapes = {p: tuple(x.shape) for p, x in pytree.flatten_with_paths(llava.abstract(cfg)[0])[0]}
    return hf_vit.NameMap(shapes, lambda p: _target(p, cfg))


# ----------------------------------------------------------------------------------------------------------------
# weights


def tied_head_check(tensors: Mapping[str, torch.Tensor], embed_name: str, where: str) -> None:
    """A tied checkpoint may still store ``lm_head.weight``; it may only be a copy of the embedding."""
    head = tensors.get("lm_head.weight")
    if head is not None and not torch.equal(head.to(tensors[embed_name].dtype), tensors[embed_name]):
        raise io.CheckpointMismatchError(
            f"{where}: tie_word_embeddings is set but lm_head.weight differs from {embed_name}"
        )


_EMBED = "model.language_model.embed_tokens.weight"


def load(source, cfg, shapes, nm, *, rename, where: str, embed_name: str = _EMBED, dtype=None):
    """Strict load shared by the VLM adapters: a tied ``lm_head.weight`` copy is allowed (and checked)."""
    ignore = ()
    if cfg.text.tie_embeddings:
        ignore = (r"^lm_head\.weight$",)
        stored = dict(source) if isinstance(source, Mapping) else None
        if stored is not None:
            renamed = {rename(k): v for k, v in stored.items()}
            if "lm_head.weight" in renamed:
                tied_head_check(renamed, embed_name, where)
        else:
            files = io.tensor_files(source)
            stored = {rename(k): k for k in files}
            if "lm_head.weight" in stored and embed_name in stored:
                pair = {}
                for new in ("lm_head.weight", embed_name):
                    with safe_open(str(files[stored[new]]), framework="pt") as f:
                        pair[new] = f.get_tensor(stored[new])
                tied_head_check(pair, embed_name, where)
    return hf_vit.load_tree(source, shapes, nm, rename=rename, ignore=ignore, dtype=dtype)


def from_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: llava.LlavaConfig, *, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Our tree from a transformers ``LlavaForConditionalGeneration.state_dict()`` (any spelling; strict)."""
    return load(
        state_dict,
        cfg,
        llava.abstract(cfg)[0],
        name_map(cfg),
        rename=canonical_name,
        where="state dict",
        dtype=dtype,
    )


def to_hf_state_dict(
    params: dict[str, Any], cfg: llava.LlavaConfig, *, spelling: str = "disk"
) -> dict[str, Any]:
    """``{name: tensor}`` in the hub spelling (``spelling="disk"``) or the in-memory one (``"memory"``)."""
    return export(params, name_map(cfg), disk_name, spelling)


def export(
    params: dict[str, Any], nm: hf_vit.NameMap, to_disk: Callable[[str], str], spelling: str
) -> dict[str, Any]:
    """``{name: tensor}`` of ``params`` under ``nm``, renamed by ``to_disk`` when ``spelling == "disk"``
    (``"memory"`` keeps the in-memory names). Shared by the VLM adapters' ``to_hf_state_dict``."""
    if spelling not in ("disk", "memory"):
        raise ValueError(f"spelling must be 'disk' or 'memory', got {spelling!r}")
    out = hf_vit.export_tree(params, nm)
    return {to_disk(k): v for k, v in out.items()} if spelling == "disk" else out


def load_pretrained(
    directory: str | os.PathLike, *, dtype: str | None = None
) -> tuple[llava.LlavaConfig, dict]:
    """``(cfg, params)`` from a transformers LLaVA directory (any key spelling; sharded or not). Strict: every
    missing, unexpected or mis-shaped tensor is named in one error.

    Example::

        >>> cfg, params = load_pretrained("llava-1.5-7b-hf")   # doctest: +SKIP
    """
    cfg = config_from_hf(io.read_config(directory), dtype=dtype)
    params = load(
        directory,
        cfg,
        llava.abstract(cfg)[0],
        name_map(cfg),
        rename=canonical_name,
        where=f"checkpoint {str(directory)!r}",
    )
    return cfg, params


def save_pretrained(
    params: dict[str, Any],
    cfg: llava.LlavaConfig,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
    extra_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``config.json`` + safetensors (hub spelling) that ``LlavaForConditionalGeneration.from_pretrained``
    loads with no missing or unexpected keys. Returns the written file names."""
    return write_pretrained(
        directory, to_hf_state_dict(params, cfg), config_to_hf(cfg, extra_config), max_shard_bytes
    )


def write_pretrained(
    directory: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``state_dict`` as safetensors (sharded above ``max_shard_bytes``) and ``config`` as
    ``config.json``; returns the written file names. Shared by the VLM adapters' ``save_pretrained``."""
    files = io.write_tensors(directory, state_dict, max_shard_bytes=max_shard_bytes)
    io.write_config(directory, config)
    return [*files, "config.json"]
