"""Hugging Face adapter for the vision towers (``CLIPVisionModel``, ``SiglipVisionModel``, ``InternVLVisionModel``),
and the name-mapping helpers the multimodal adapters (LLaVA, Qwen2-VL, InternVL) share.

A :class:`NameMap` ties each leaf of our parameter tree to a Hugging Face tensor, including the two layout
changes the VLM checkpoints need: fused tensors (SigLIP's pooling-head ``in_proj_weight`` and Qwen2-VL's vision
``qkv`` are ``cat([q, k, v])``; our trees keep q/k/v apart so the ``heads`` axis shards cleanly) and leading
singleton dims (InternViT stores its CLS token as ``[1, 1, D]``). Loading is strict: every expected tensor must
be there with the expected shape and nothing else (:class:`~functional_mm.models.hf.io.CheckpointMismatchError`
lists all offenders).

The canonical names are the ones transformers 5.x modules use in memory (``embeddings.patch_embedding.weight``);
older files prefix the tower with ``vision_model.``; both load. A full ``CLIPModel`` / ``SiglipModel`` directory
loads too: its text tower is skipped (it is not part of the vision model we build).

Example::

    >>> from functional_mm.models.hf import vit as hf_vit
    >>> cfg, params = hf_vit.load_pretrained("clip-vit-large-patch14-336")          # doctest: +SKIP
    >>> hf_vit.save_pretrained(params, cfg, "export/clip")                           # doctest: +SKIP
    >>> # transformers.CLIPVisionModel.from_pretrained("export/clip") loads it with no missing keys
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch

from functional_mm import pytree
from functional_mm.models import vit
from functional_mm.models.hf import io

__all__ = [
    "Target",
    "NameMap",
    "load_tree",
    "export_tree",
    "norm_names",
    "vit_target",
    "ACT_FROM_HF",
    "ACT_TO_HF",
    "config_from_hf",
    "config_to_hf",
    "name_map",
    "from_hf_state_dict",
    "to_hf_state_dict",
    "load_pretrained",
    "save_pretrained",
    "replace_dtype",
]

# ----------------------------------------------------------------------------------------------------------------
# generic name mapping


class Target(NamedTuple):
    """Where one of our leaves lives in a HF checkpoint: tensor ``name``; ``part`` of ``parts`` when the HF
    tensor concatenates several of ours along dim 0; ``lead`` extra leading size-1 dims on the HF side."""

    name: str
    part: int = 0
    parts: int = 1
    lead: int = 0


class NameMap:
    """The mapping between a flat ``{path: shape}`` of our tree and HF tensors, built from ``target(path)``.

    Example::

        >>> nm = NameMap({"q/w": (2, 3), "k/w": (2, 3)}, lambda p: Target("qkv", "qk".index(p[0]), 2))
        >>> nm.hf_shapes
        {'qkv': (4, 3)}
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], target: Callable[[str], Target]):
        self.shapes = {path: tuple(shape) for path, shape in shapes.items()}
        self.targets = {path: target(path) for path in shapes}
        groups: dict[str, dict[int, str]] = {}
        for path, t in self.targets.items():
            part = groups.setdefault(t.name, {})
            if t.part in part:
                raise ValueError(
                    f"NameMap: {part[t.part]!r} and {path!r} both map to {t.name!r} part {t.part}"
                )
            part[t.part] = path
        self.groups = {}
        self.hf_shapes: dict[str, tuple[int, ...]] = {}
        for name, parts in groups.items():
            paths = [parts[i] for i in sorted(parts)]
            t = self.targets[paths[0]]
            if sorted(parts) != list(range(t.parts)):
                raise ValueError(f"NameMap: {name!r} needs parts 0..{t.parts - 1}, got {sorted(parts)}")
            first = tuple(shapes[paths[0]])
            if t.parts > 1:
                rows = sum(int(shapes[p][0]) for p in paths)
                self.hf_shapes[name] = (rows, *first[1:])
            else:
                self.hf_shapes[name] = (1,) * t.lead + first
            self.groups[name] = paths

    def to_ours(self, hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{hf_name: tensor}`` (already checked against :attr:`hf_shapes`) -> ``{path: tensor}``."""
        out = {}
        for name, paths in self.groups.items():
            t = hf[name]
            if len(paths) > 1:
                rows = [self.shapes[p][0] for p in paths]
                for p, part in zip(paths, torch.split(t, rows)):
                    out[p] = part.clone()  # an independent tensor, not a view of the fused one
            else:
                lead = self.targets[paths[0]].lead
                out[paths[0]] = t.reshape(t.shape[lead:]) if lead else t
        return out

    def to_hf(self, flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{path: tensor}`` -> ``{hf_name: tensor}`` (detached, CPU, contiguous)."""
        out = {}
        for name, paths in self.groups.items():
            ts = [flat[p].detach().cpu() for p in paths]
            t = torch.cat(ts, dim=0) if len(ts) > 1 else ts[0].reshape(self.hf_shapes[name])
            out[name] = t.contiguous()
        return out


def _flat_shapes(shapes_tree: Any) -> dict[str, tuple[int, ...]]:
    return {p: tuple(x.shape) for p, x in pytree.flatten_with_paths(shapes_tree)[0]}


def load_tree(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    shapes_tree: Any,
    nm: NameMap,
    *,
    rename: Callable[[str], str] | None = None,
    ignore: Iterable[str] = (),
    dtype: torch.dtype | None = None,
) -> Any:
    """Strictly load a tree shaped like ``shapes_tree`` (meta tensors) from a HF directory or state dict.

    ``rename`` maps stored names (any spelling the family has used) to the canonical ones of ``nm``; names
    matching an ``ignore`` regex may be present and are skipped. ``dtype`` defaults to each leaf's dtype.
    """
    in_memory = isinstance(source, Mapping)
    if in_memory:
        sd = dict(source)
        if rename is not None:
            renamed: dict[str, torch.Tensor] = {}
            for k, v in sd.items():
                new = rename(k)
                if new in renamed:
                    raise io.CheckpointMismatchError(f"two state-dict entries map to {new!r} (second: {k!r})")
                renamed[new] = v
            sd = renamed
        hf = io.convert_state_dict(sd, nm.hf_shapes, ignore=ignore)
    else:
        hf = io.read_tensors(source, nm.hf_shapes, ignore=ignore, rename=rename)
    flat = nm.to_ours(hf)

    def cast(path: str, leaf: torch.Tensor) -> torch.Tensor:
        t, target = flat[path], dtype or leaf.dtype
        if t.dtype != target:
            return t.to(target)
        return t.clone() if in_memory else t  # never alias a live HF module's parameters

    return pytree.map_with_path(cast, shapes_tree)


def export_tree(params: Any, nm: NameMap) -> dict[str, torch.Tensor]:
    """``{hf_name: tensor}`` for a parameter tree; its leaves must be exactly the ones ``nm`` maps."""
    flat = {p: x for p, x in pytree.flatten_with_paths(params)[0]}
    io.check_names({p: tuple(x.shape) for p, x in flat.items()}, nm.shapes, where="params")
    return nm.to_hf(flat)


def norm_names(hf_prefix: str, leaf: str) -> str:
    """``scale``/``bias`` of one of our norms -> the HF ``weight``/``bias`` name under ``hf_prefix``."""
    return f"{hf_prefix}.{'weight' if leaf == 'scale' else leaf}"


# ----------------------------------------------------------------------------------------------------------------
# ViT naming

ACT_FROM_HF = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "silu": "silu",
    "relu": "relu",
}
ACT_TO_HF = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "silu": "silu",
    "relu": "relu",
}

_CLIP_BLOCK = {
    "attn_norm": "layer_norm1",
    "mlp_norm": "layer_norm2",
    "attn/q": "self_attn.q_proj",
    "attn/k": "self_attn.k_proj",
    "attn/v": "self_attn.v_proj",
    "attn/o": "self_attn.out_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_INTERN_BLOCK = {
    "attn_norm": "layernorm_before",
    "mlp_norm": "layernorm_after",
    "attn/q": "attention.q_proj",
    "attn/k": "attention.k_proj",
    "attn/v": "attention.v_proj",
    "attn/o": "attention.projection_layer",
    "attn/q_norm": "attention.q_norm",
    "attn/k_norm": "attention.k_norm",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_LAYER = re.compile(r"^layers/(\d+)/(.+)/(weight|bias|scale)$")
_LS = re.compile(r"^layers/(\d+)/ls([12])$")


def vit_target(path: str, family: str) -> Target:
    """Canonical HF name (transformers 5.x, no ``vision_model.`` prefix) of a ViT parameter path.

    Example::

        >>> vit_target("layers/0/attn/o/bias", "clip").name
        'encoder.layers.0.self_attn.out_proj.bias'
        >>> vit_target("cls", "internvit")
        Target(name='embeddings.cls_token', part=0, parts=1, lead=2)
    """
    intern = family == "internvit"
    m = _LAYER.match(path)
    if m:
        i, mod, leaf = m.groups()
        table = _INTERN_BLOCK if intern else _CLIP_BLOCK
        if mod in table:
            layer = f"encoder.layer.{i}" if intern else f"encoder.layers.{i}"
            return Target(norm_names(f"{layer}.{table[mod]}", leaf))
    m = _LS.match(path)
    if m and intern:
        return Target(f"encoder.layer.{m.group(1)}.lambda_{m.group(2)}")
    if intern:
        fixed = {
            "patch_embed/weight": Target("embeddings.patch_embeddings.projection.weight"),
            "patch_embed/bias": Target("embeddings.patch_embeddings.projection.bias"),
            "cls": Target("embeddings.cls_token", lead=2),
            "pos_embed": Target("embeddings.position_embeddings", lead=1),
            "post_norm/scale": Target("layernorm.weight"),
            "post_norm/bias": Target("layernorm.bias"),
        }
    else:
        fixed = {
            "patch_embed/weight": Target("embeddings.patch_embedding.weight"),
            "patch_embed/bias": Target("embeddings.patch_embedding.bias"),
            "cls": Target("embeddings.class_embedding"),
            "pos_embed": Target("embeddings.position_embedding.weight"),
            "pre_norm/scale": Target("pre_layrnorm.weight"),
            "pre_norm/bias": Target("pre_layrnorm.bias"),
            "post_norm/scale": Target("post_layernorm.weight"),
            "post_norm/bias": Target("post_layernorm.bias"),
            "head/probe": Target("head.probe", lead=2),
            "head/norm/scale": Target("head.layernorm.weight"),
            "head/norm/bias": Target("head.layernorm.bias"),
            "head/attn/o/weight": Target("head.attention.out_proj.weight"),
            "head/attn/o/bias": Target("head.attention.out_proj.bias"),
        }
        for j, n in enumerate("qkv"):  # nn.MultiheadAttention fuses the pooling head's q/k/v
            fixed[f"head/attn/{n}/weight"] = Target("head.attention.in_proj_weight", j, 3)
            fixed[f"head/attn/{n}/bias"] = Target("head.attention.in_proj_bias", j, 3)
        for fc in ("fc1", "fc2"):
            for leaf in ("weight", "bias"):
                fixed[f"head/mlp/{fc}/{leaf}"] = Target(f"head.mlp.{fc}.{leaf}")
    if path in fixed:
        return fixed[path]
    raise KeyError(f"no Hugging Face name for {family} ViT parameter {path!r}")


def name_map(cfg: vit.ViTConfig, prefix: str = "") -> NameMap:
    """The :class:`NameMap` of a tower, with ``prefix`` (e.g. ``"model.vision_tower."``) before every name."""
    return NameMap(
        _flat_shapes(vit.abstract(cfg)[0]),
        lambda p: (lambda t: t._replace(name=prefix + t.name))(vit_target(p, cfg.family)),
    )


# ----------------------------------------------------------------------------------------------------------------
# config

_VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip", "internvl_vision": "internvit"}
_FULL_TYPES = {"clip": "clip", "siglip": "siglip"}


def _square(v: Any, name: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"config_from_hf: only square {name} are supported, got {list(v)}")
        return int(v[0])
    return int(v)


def config_from_hf(d: Mapping[str, Any], *, dtype: str | None = None) -> vit.ViTConfig:
    """A :class:`~functional_mm.models.vit.ViTConfig` from a vision ``config.json`` dict (``clip_vision_model``,
    ``siglip_vision_model``, ``internvl_vision``, or a full ``clip`` / ``siglip`` config: its ``vision_config``).
    Features we do not implement are rejected, naming them.

    Example::

        >>> cfg = config_from_hf({"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
        ...     "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 16, "patch_size": 4})
        >>> cfg.family, cfg.act, cfg.pool
        ('siglip', 'gelu_tanh', 'map')
    """
    mt = d.get("model_type")
    if mt in _FULL_TYPES:
        d = {"model_type": f"{mt}_vision_model", **(d.get("vision_config") or {})}
        mt = d["model_type"]
    if mt not in _VISION_TYPES:
        raise ValueError(
            f"config_from_hf: model_type {mt!r} is not a supported vision tower ({sorted(_VISION_TYPES)})"
        )
    family = _VISION_TYPES[mt]
    defaults = {
        "clip": dict(hidden_act="quick_gelu", layer_norm_eps=1e-5),
        "siglip": dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        "internvit": dict(hidden_act="gelu", layer_norm_eps=1e-6),
    }[family]
    d = {**defaults, **d}
    missing = [
        k
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
        )
        if k not in d
    ]
    if missing:
        raise ValueError(f"config_from_hf: {mt} config is missing required field(s) {missing}")
    act = d["hidden_act"]
    problems = []
    if act not in ACT_FROM_HF:
        problems.append(f"hidden_act={act!r}")
    common = dict(
        family=family,
        image_size=_square(d["image_size"], "image_size"),
        patch_size=_square(d["patch_size"], "patch_size"),
        dim=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        mlp_dim=d["intermediate_size"],
        num_channels=d.get("num_channels", 3),
        act=ACT_FROM_HF.get(act, "gelu"),
        norm_eps=float(d["layer_norm_eps"]),
        init_std=float(d.get("initializer_range", 0.02)),
        dtype=dtype or str(d.get("dtype") or d.get("torch_dtype") or "float32").removeprefix("torch."),
    )
    if family == "clip":
        extra = dict(class_token=True, patch_bias=False, pre_norm=True, post_norm="cls", pool="cls")
    elif family == "siglip":
        use_head = d.get("vision_use_head", True)
        extra = dict(class_token=False, patch_bias=True, post_norm="all", pool="map" if use_head else "none")
    else:
        norm = {"layer_norm": "layer", "rms_norm": "rms"}.get(d.get("norm_type", "layer_norm"))
        mean_pool = d.get("use_mean_pooling", True)
        if norm is None:
            problems.append(f"norm_type={d['norm_type']!r}")
        if not d.get("use_absolute_position_embeddings", True):
            problems.append("use_absolute_position_embeddings=False")
        if d.get("use_mask_token", False):
            problems.append("use_mask_token=True")
        if norm == "rms" and not mean_pool:
            problems.append(
                "norm_type='rms_norm' with use_mean_pooling=False (a LayerNorm after RMSNorm blocks)"
            )
        extra = dict(
            class_token=True,
            patch_bias=True,
            qkv_bias=bool(d.get("attention_bias", False)),
            qk_norm=bool(d.get("use_qk_norm", False)),
            norm=norm or "layer",
            layer_scale=float(d.get("layer_scale_init_value", 0.1)),
            post_norm="none" if mean_pool else "all",
            pool="none",
        )
    if problems:
        raise ValueError(f"config_from_hf: unsupported {mt} feature(s): {', '.join(problems)}")
    return vit.ViTConfig(**common, **extra)


def config_to_hf(cfg: vit.ViTConfig) -> dict[str, Any]:
    """The vision ``config.json`` dict transformers builds the same tower from (``CLIPVisionModel``,
    ``SiglipVisionModel`` or ``InternVLVisionModel``). Flags a family's HF class cannot express are an error.

    Example::

        >>> config_to_hf(vit.ViTConfig.variant("clip_tiny"))["model_type"]
        'clip_vision_model'
    """
    want = {
        "clip": dict(
            class_token=True,
            patch_bias=False,
            pre_norm=True,
            post_norm="cls",
            pool="cls",
            norm="layer",
            qk_norm=False,
            layer_scale=None,
            qkv_bias=True,
        ),
        "siglip": dict(
            class_token=False,
            patch_bias=True,
            pre_norm=False,
            post_norm="all",
            norm="layer",
            qk_norm=False,
            layer_scale=None,
            qkv_bias=True,
        ),
        "internvit": dict(class_token=True, patch_bias=True, pre_norm=False, pool="none"),
    }[cfg.family]
    bad = [f"{k}={getattr(cfg, k)!r} (HF needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
    if cfg.family == "internvit" and cfg.layer_scale is None:
        bad.append("layer_scale=None (InternViT always has lambda_1/lambda_2)")
    if cfg.family == "internvit" and cfg.norm == "rms" and cfg.post_norm != "none":
        bad.append("post_norm with norm='rms'")
    if cfg.act not in ACT_TO_HF:
        bad.append(f"act={cfg.act!r}")
    if bad:
        raise ValueError(f"config_to_hf: {cfg.family} ViT config cannot be written for transformers: {bad}")
    d: dict[str, Any] = {
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_channels": cfg.num_channels,
        "hidden_act": ACT_TO_HF[cfg.act],
        "layer_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "dtype": cfg.dtype,
    }
    if cfg.family == "clip":
        d.update(
            model_type="clip_vision_model",
            architectures=["CLIPVisionModel"],
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
        )
    elif cfg.family == "siglip":
        d.update(
            model_type="siglip_vision_model",
            architectures=["SiglipVisionModel"],
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            vision_use_head=cfg.pool == "map",
        )
    else:
        d.update(
            model_type="internvl_vision",
            architectures=["InternVLVisionModel"],
            image_size=[cfg.image_size] * 2,
            patch_size=[cfg.patch_size] * 2,
            attention_bias=cfg.qkv_bias,
            use_qk_norm=cfg.qk_norm,
            norm_type="rms_norm" if cfg.norm == "rms" else "layer_norm",
            layer_scale_init_value=cfg.layer_scale,
            use_mean_pooling=cfg.post_norm == "none",
            use_absolute_position_embeddings=True,
            use_mask_token=False,
            hidden_dropout_prob=0.0,
            projection_dropout=0.0,
        )
    return d


# ----------------------------------------------------------------------------------------------------------------
# weights

# A full CLIPModel / SiglipModel directory holds a text tower and projections next to the vision tower.
_FULL_MODEL_EXTRAS = (r"^text_model\.", r"^(visual|text)_projection\.", r"^logit_(scale|bias)$")


def _rename_tower(name: str) -> str:
    return name.removeprefix("vision_model.")


def from_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: vit.ViTConfig, *, dtype=None
) -> dict[str, Any]:
    """Our tree from a transformers vision model's ``state_dict()`` (strict; tensors are copied)."""
    return load_tree(state_dict, vit.abstract(cfg)[0], name_map(cfg), rename=_rename_tower, dtype=dtype)


def to_hf_state_dict(params: dict[str, Any], cfg: vit.ViTConfig) -> dict[str, torch.Tensor]:
    """``{hf_name: tensor}`` in the transformers 5.x spelling (what ``save_pretrained`` writes)."""
    return export_tree(params, name_map(cfg))


def load_pretrained(
    directory: str | os.PathLike, *, dtype: str | None = None
) -> tuple[vit.ViTConfig, dict[str, Any]]:
    """``(cfg, params)`` from a transformers vision-tower directory (or a full CLIP / SigLIP one, whose text
    tower is skipped). Strict about every vision tensor.

    Example::

        >>> cfg, params = load_pretrained("siglip-so400m-patch14-384")   # doctest: +SKIP
    """
    raw = io.read_config(directory)
    cfg = config_from_hf(raw, dtype=dtype)
    ignore = _FULL_MODEL_EXTRAS if raw.get("model_type") in _FULL_TYPES else ()
    params = load_tree(directory, vit.abstract(cfg)[0], name_map(cfg), rename=_rename_tower, ignore=ignore)
    return cfg, params


def save_pretrained(
    params: dict[str, Any],
    cfg: vit.ViTConfig,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``config.json`` + safetensors that the matching transformers vision model loads with no missing or
    unexpected keys. Returns the written file names."""
    files = io.write_tensors(directory, to_hf_state_dict(params, cfg), max_shard_bytes=max_shard_bytes)
    io.write_config(directory, config_to_hf(cfg))
    return [*files, "config.json"]


def replace_dtype(cfg, dtype: str | None):
    """``cfg`` with ``dtype`` replaced when given (a helper the multimodal adapters share)."""
    return cfg if dtype is None else dataclasses.replace(cfg, dtype=dtype)
