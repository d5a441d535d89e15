"""Hugging Face adapter for Qwen2-VL (``Qwen2VLForConditionalGeneration``).

Spellings: the hub files (and transformers 5.x ``save_pretrained``) store ``visual.*``, ``model.*`` (the
decoder) and ``lm_head.weight``; transformers 5.x modules name them ``model.visual.*``,
``model.language_model.*``; both load. The vision attention's ``qkv`` tensor is split into our q/k/v on load and
fused again on export. Configs load from the flat 4.x layout (text fields at the top, ``rope_scaling: {type:
mrope, mrope_section}``) and the nested 5.x one (``text_config.rope_parameters.mrope_section``); we write 5.x.

Example::

    >>> from functional_mm.models.hf import qwen2_vl as hf_qwen2_vl
    >>> cfg, params = hf_qwen2_vl.load_pretrained("Qwen2-VL-2B-Instruct", dtype="bfloat16")   # doctest: +SKIP
    >>> hf_qwen2_vl.save_pretrained(params, cfg, "export/qwen2vl")                           # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from functional_mm import pytree
from functional_mm.models import qwen2_vl
from functional_mm.models.hf import io
from functional_mm.models.hf import llama as hf_llama
from functional_mm.models.hf import llava as hf_llava
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

# Qwen2VLTextConfig's defaults (what transformers assumes for fields a config.json leaves out).
_TEXT_DEFAULTS = dict(
    vocab_size=152064,
    hidden_size=8192,
    intermediate_size=29568,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    max_position_embeddings=32768,
    hidden_act="silu",
    rope_theta=1000000.0,
)
_TEXT_KEYS = (*_TEXT_DEFAULTS, "initializer_range", "use_sliding_window", "dtype", "torch_dtype")


def _mrope(rope: Mapping[str, Any] | None) -> tuple[float | None, list[int] | None]:
    rope = dict(rope or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ValueError(f"config_from_hf: Qwen2-VL rope type {kind!r} is not supported (plain M-RoPE only)")
    return rope.get("rope_theta"), rope.get("mrope_section")


def config_from_hf(d: Mapping[str, Any], *, dtype: str | None = None) -> qwen2_vl.Qwen2VLConfig:
    """A :class:`~functional_mm.models.qwen2_vl.Qwen2VLConfig` from a ``model_type: qwen2_vl`` config dict
    (flat 4.x or nested 5.x layout).

    Example::

        >>> cfg = config_from_hf({"model_type": "qwen2_vl", "vocab_size": 128, "hidden_size": 64,
        ...     "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        ...     "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]}, "image_token_id": 120,
        ...     "video_token_id": 121, "vision_start_token_id": 122, "vision_end_token_id": 123,
        ...     "vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "patch_size": 2}})
        >>> cfg.mrope_section, cfg.vision.mlp_dim
        ((4, 2, 2), 128)
    """
    if d.get("model_type") != "qwen2_vl":
        raise ValueError(f"config_from_hf: model_type {d.get('model_type')!r} is not 'qwen2_vl'")
    nested = d.get("text_config")
    text = dict(nested) if nested else {k: d[k] for k in _TEXT_KEYS if k in d}
    theta, section = _mrope(text.get("rope_parameters") or text.get("rope_scaling") or d.get("rope_scaling"))
    tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    if text.get("use_sliding_window"):
        raise ValueError("config_from_hf: use_sliding_window=True is not supported")
    full = {**_TEXT_DEFAULTS, **{k: v for k, v in text.items() if k in _TEXT_KEYS}}
    full.update(
        model_type="qwen2",
        tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": theta or full["rope_theta"]},
    )
    full.pop("use_sliding_window", None)
    text_cfg = hf_vit.replace_dtype(hf_llama.config_from_hf(full), dtype)

    v = dict(d.get("vision_config") or {})
    act = v.get("hidden_act", "quick_gelu")
    if act not in hf_vit.ACT_FROM_HF:
        raise ValueError(f"config_from_hf: unsupported vision hidden_act={act!r}")
    vtheta = (v.get("rope_parameters") or {}).get("rope_theta", v.get("rope_theta"))
    embed = v.get("embed_dim", 1280)
    vision = qwen2_vl.Qwen2VLVisionConfig(
        dim=embed,
        num_layers=v.get("depth", 32),
        num_heads=v.get("num_heads", 16),
        mlp_dim=int(embed * v.get("mlp_ratio", 4)),
        out_dim=v.get("hidden_size", text_cfg.dim),
        patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        in_channels=v.get("in_channels", v.get("in_chans", 3)),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        act=hf_vit.ACT_FROM_HF[act],
        rope_theta=float(vtheta or 10000.0),
        init_std=float(v.get("initializer_range", 0.02)),
        dtype=dtype or text_cfg.dtype,
    )
    return qwen2_vl.Qwen2VLConfig(
        vision=vision,
        text=text_cfg,
        mrope_section=tuple(section or (16, 24, 24)),
        **{
            k: d.get(k, getattr(qwen2_vl.Qwen2VLConfig, k))
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        },
    )


def config_to_hf(cfg: qwen2_vl.Qwen2VLConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The (5.x, nested) ``config.json`` dict of a ``Qwen2VLForConditionalGeneration``."""
    v, t = cfg.vision, cfg.text
    if v.mlp_dim % v.dim:
        raise ValueError(
            f"config_to_hf: vision mlp_dim={v.mlp_dim} is not a multiple of dim={v.dim} (mlp_ratio)"
        )
    if t.head_dim * t.num_heads != t.dim:
        raise ValueError(
            "config_to_hf: Qwen2-VL derives head_dim = hidden_size // num_heads; this config does not"
        )
    d = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "text_config": {
            "model_type": "qwen2_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.dim,
            "intermediate_size": t.mlp_dim,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": t.max_seq_len,
            "rms_norm_eps": t.norm_eps,
            "initializer_range": t.init_std,
            "use_sliding_window": False,
            "tie_word_embeddings": t.tie_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": list(cfg.mrope_section),
            },
            "dtype": t.dtype,
        },
        "vision_config": {
            "model_type": "qwen2_vl_vision",
            "depth": v.num_layers,
            "embed_dim": v.dim,
            "hidden_size": v.out_dim,
            "mlp_ratio": v.mlp_dim // v.dim,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "hidden_act": hf_vit.ACT_TO_HF[v.act],
            "initializer_range": v.init_std,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        },
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": t.tie_embeddings,
        "dtype": t.dtype,
    }
    d.update(extra or {})
    return d


# ----------------------------------------------------------------------------------------------------------------
# names

_DECODER_ON_DISK = re.compile(r"^model\.(?!visual\.|language_model\.)")


def canonical_name(name: str) -> str:
    """Hub / 5.x-file spelling -> the in-memory (5.x) name.

    Example::

        >>> canonical_name("visual.merger.ln_q.weight"), canonical_name("model.norm.weight")
        ('model.visual.merger.ln_q.weight', 'model.language_model.norm.weight')
    """
    if name.startswith("visual."):
        return "model." + name
    return _DECODER_ON_DISK.sub("model.language_model.", name, count=1)


def disk_name(name: str) -> str:
    """In-memory name -> the hub spelling we export."""
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


_BLOCK = {
    "attn_norm": "norm1",
    "mlp_norm": "norm2",
    "attn/o": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_MERGER = {"norm": "ln_q", "fc1": "mlp.0", "fc2": "mlp.2"}
_VLAYER = re.compile(r"^layers/(\d+)/(.+)/(weight|bias|scale)$")


def vision_target(path: str) -> hf_vit.Target:
    """The canonical name of a vision-tree path.

    Example::

        >>> vision_target("layers/0/attn/v/bias")
        Target(name='model.visual.blocks.0.attn.qkv.bias', part=2, parts=3, lead=0)
    """
    leaf_name = {"scale": "weight"}
    if path == "patch_embed/weight":
        return hf_vit.Target("model.visual.patch_embed.proj.weight")
    m = _VLAYER.match(path)
    if m:
        i, mod, leaf = m.groups()
        if mod in ("attn/q", "attn/k", "attn/v"):
            return hf_vit.Target(f"model.visual.blocks.{i}.attn.qkv.{leaf}", "qkv".index(mod[-1]), 3)
        if mod in _BLOCK:
            return hf_vit.Target(f"model.visual.blocks.{i}.{_BLOCK[mod]}.{leaf_name.get(leaf, leaf)}")
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "merger" and parts[1] in _MERGER:
        return hf_vit.Target(f"model.visual.merger.{_MERGER[parts[1]]}.{leaf_name.get(parts[2], parts[2])}")
    raise KeyError(f"no Hugging Face name for Qwen2-VL vision parameter {path!r}")


def _target(path: str) -> hf_vit.Target:
    head, _, rest = path.partition("/")
    if head == "vision":
        return vision_target(rest)
    if head == "text":
        return hf_llava.text_target(rest)
    raise KeyError(f"no Hugging Face name for Qwen2-VL parameter {path!r}")


def name_map(cfg: qwen2_vl.Qwen2VLConfig) -> hf_vit.NameMap:
    shapes = {p: tuple(x.shape) for p, x in pytree.flatten_with_paths(qwen2_vl.abstract(cfg)[0])[0]}
    return hf_vit.NameMap(shapes, _target)


# ----------------------------------------------------------------------------------------------------------------
# weights


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: qwen2_vl.Qwen2VLConfig, *, dtype=None):
    """Our tree from a transformers ``Qwen2VLForConditionalGeneration.state_dict()`` (strict; copied)."""
    return hf_llava.load(
        state_dict,
        cfg,
        qwen2_vl.abstract(cfg)[0],
        name_map(cfg),
        rename=canonical_name,
        where="state dict",
        dtype=dtype,
    )


def to_hf_state_dict(
    params, cfg: qwen2_vl.Qwen2VLConfig, *, spelling: str = "disk"
) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` in the hub spelling (``"disk"``) or the in-memory one (``"memory"``)."""
    return hf_llava.export(params, name_map(cfg), disk_name, spelling)


def load_pretrained(directory: str | os.PathLike, *, dtype: str | None = None):
    """``(cfg, params)`` from a transformers Qwen2-VL directory (either spelling; sharded or not). Strict."""
    cfg = config_from_hf(io.read_config(directory), dtype=dtype)
    params = hf_llava.load(
        directory,
        cfg,
        qwen2_vl.abstract(cfg)[0],
        name_map(cfg),
        rename=canonical_name,
        where=f"checkpoint {str(directory)!r}",
    )
    return cfg, params


def save_pretrained(
    params,
    cfg: qwen2_vl.Qwen2VLConfig,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
    extra_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``config.json`` + safetensors (hub spelling) that ``Qwen2VLForConditionalGeneration
    .from_pretrained`` loads with no missing or unexpected keys. Returns the written file names."""
    return hf_llava.write_pretrained(
        directory, to_hf_state_dict(params, cfg), config_to_hf(cfg, extra_config), max_shard_bytes
    )
