"""transformers adapters for the conditioning text encoders: ``CLIPTextModel`` /
``CLIPTextModelWithProjection`` and ``T5EncoderModel`` (the ``text_encoder*/`` folders of SD3 and Flux).

Accepted spellings beyond what transformers 5 writes: a ``CLIPTextModel`` checkpoint whose names carry the
``text_model.`` prefix (transformers 4.x and the hub's Flux / SD checkpoints) and the non-parameter
``position_ids`` buffer older exports contain; a T5 checkpoint holding the tied embedding as ``shared.weight``,
``encoder.embed_tokens.weight`` or both (then they must be equal). Exports use transformers 5's layout.

Example::

    >>> from functional_mm.models.hf import text_encoders as hf_te
    >>> cfg, params = hf_te.load_pretrained("sd3-medium/text_encoder_2")   # CLIP-G   # doctest: +SKIP
    >>> cfg, params = hf_te.load_pretrained("sd3-medium/text_encoder_3")   # T5-XXL  # doctest: +SKIP
    >>> hf_te.save_pretrained(params, cfg, "export/text_encoder_3")                   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from functional_mm import pytree
from functional_mm.models import text_encoders as te
from functional_mm.models.hf import io

__all__ = [
    "clip_hf_name",
    "t5_hf_name",
    "clip_config_from_hf",
    "clip_config_to_hf",
    "t5_config_from_hf",
    "t5_config_to_hf",
    "config_from_hf",
    "from_hf_state_dict",
    "to_hf_state_dict",
    "load_pretrained",
    "save_pretrained",
]

Config = te.CLIPTextConfig | te.T5EncoderConfig

# ----------------------------------------------------------------------------------------------------------------
# names

_CLIP_TOP = {
    "token_embed/weight": "embeddings.token_embedding.weight",
    "pos_embed/weight": "embeddings.position_embedding.weight",
    "final_norm/scale": "final_layer_norm.weight",
    "final_norm/bias": "final_layer_norm.bias",
}
_CLIP_LAYER = {
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
    "attn/q": "self_attn.q_proj",
    "attn/k": "self_attn.k_proj",
    "attn/v": "self_attn.v_proj",
    "attn/o": "self_attn.out_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_LEAF = {"weight": "weight", "bias": "bias", "scale": "weight"}
_LAYER_PATH = re.compile(r"^layers/(\d+)/(.+)/(weight|bias|scale)$")
CLIP_IGNORE = (r"(^|\.)embeddings\.position_ids$",)  # a non-persistent buffer some exports still contain


def clip_hf_name(path: str, with_projection: bool = True) -> str:
    """The transformers name of a CLIP text parameter (``text_model.`` prefixed with projection, as
    ``CLIPTextModelWithProjection`` stores it; bare for ``CLIPTextModel`` in transformers 5).

    Example::

        >>> clip_hf_name("layers/1/attn/o/bias")
        'text_model.encoder.layers.1.self_attn.out_proj.bias'
        >>> clip_hf_name("final_norm/scale", with_projection=False)
        'final_layer_norm.weight'
    """
    prefix = "text_model." if with_projection else ""
    if path == "projection/weight":
        if not with_projection:
            raise KeyError("a CLIPTextModel (with_projection=False) has no projection")
        return "text_projection.weight"
    if path in _CLIP_TOP:
        return prefix + _CLIP_TOP[path]
    m = _LAYER_PATH.match(path)
    if m and m.group(2) in _CLIP_LAYER:
        return f"{prefix}encoder.layers.{m.group(1)}.{_CLIP_LAYER[m.group(2)]}.{_LEAF[m.group(3)]}"
    raise KeyError(f"no transformers name for CLIP text parameter {path!r}")


_T5_TOP = {
    "embed/weight": "shared.weight",
    "rel_bias/weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "final_norm/scale": "encoder.final_layer_norm.weight",
}
_T5_LAYER = {
    "attn_norm/scale": "layer.0.layer_norm.weight",
    "attn/q/weight": "layer.0.SelfAttention.q.weight",
    "attn/k/weight": "layer.0.SelfAttention.k.weight",
    "attn/v/weight": "layer.0.SelfAttention.v.weight",
    "attn/o/weight": "layer.0.SelfAttention.o.weight",
    "mlp_norm/scale": "layer.1.layer_norm.weight",
    "mlp/gate/weight": "layer.1.DenseReluDense.wi_0.weight",
    "mlp/up/weight": "layer.1.DenseReluDense.wi_1.weight",
    "mlp/down/weight": "layer.1.DenseReluDense.wo.weight",
    "mlp/fc1/weight": "layer.1.DenseReluDense.wi.weight",
    "mlp/fc2/weight": "layer.1.DenseReluDense.wo.weight",
}
_T5_LAYER_PATH = re.compile(r"^layers/(\d+)/(.+)$")
T5_EMBED_ALIAS = "encoder.embed_tokens.weight"  # the same (tied) table under the encoder's own name


def t5_hf_name(path: str) -> str:
    """The transformers name of a T5 encoder parameter.

    Example::

        >>> t5_hf_name("layers/2/mlp/gate/weight")
        'encoder.block.2.layer.1.DenseReluDense.wi_0.weight'
    """
    if path in _T5_TOP:
        return _T5_TOP[path]
    m = _T5_LAYER_PATH.match(path)
    if m and m.group(2) in _T5_LAYER:
        return f"encoder.block.{m.group(1)}.{_T5_LAYER[m.group(2)]}"
    raise KeyError(f"no transformers name for T5 encoder parameter {path!r}")


def _namer(cfg: Config):
    if isinstance(cfg, te.CLIPTextConfig):
        return lambda p: clip_hf_name(p, cfg.with_projection)
    return t5_hf_name


# ----------------------------------------------------------------------------------------------------------------
# configs

_CLIP_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_new"}


def clip_config_from_hf(d: Mapping[str, Any], *, with_projection: bool | None = None) -> te.CLIPTextConfig:
    """A :class:`~functional_mm.models.text_encoders.CLIPTextConfig` from a ``config.json`` dict (``model_type``
    ``clip_text_model``, or a full ``clip`` config whose ``text_config`` is used). ``with_projection``
    defaults to what ``architectures`` says (``CLIPTextModelWithProjection``).

    Example::

        >>> clip_config_from_hf({"model_type": "clip_text_model", "architectures": ["CLIPTextModel"],
        ...     "hidden_size": 32, "num_attention_heads": 4}).with_projection
        False
    """
    if d.get("model_type") == "clip":
        d = {**d.get("text_config", {}), "architectures": d.get("architectures")}
    elif d.get("model_type", "clip_text_model") != "clip_text_model":
        raise ValueError(f"clip_config_from_hf: model_type {d.get('model_type')!r} is not a CLIP text config")
    act = d.get("hidden_act", "quick_gelu")
    if act not in _CLIP_ACT:
        raise ValueError(
            f"clip_config_from_hf: unsupported hidden_act {act!r} (supported: {sorted(_CLIP_ACT)})"
        )
    if with_projection is None:
        with_projection = "CLIPTextModelWithProjection" in (d.get("architectures") or [])
    dtype = str(d.get("dtype") or d.get("torch_dtype") or "float32").removeprefix("torch.")
    return te.CLIPTextConfig(
        vocab_size=d.get("vocab_size", 49408),
        hidden_size=d.get("hidden_size", 512),
        intermediate_size=d.get("intermediate_size", 2048),
        num_layers=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 8),
        max_position_embeddings=d.get("max_position_embeddings", 77),
        hidden_act=_CLIP_ACT[act],
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
        projection_dim=d.get("projection_dim", 512),
        with_projection=with_projection,
        bos_token_id=d.get("bos_token_id", 49406),
        eos_token_id=d.get("eos_token_id", 49407),
        pad_token_id=d.get("pad_token_id", 1),
        dtype=dtype,
    )


def clip_config_to_hf(cfg: te.CLIPTextConfig) -> dict[str, Any]:
    """A transformers ``config.json`` dict for ``CLIPTextModel(WithProjection)``."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if cfg.with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "projection_dim": cfg.projection_dim,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "attention_dropout": 0.0,
        "dtype": cfg.dtype,
    }


def t5_config_from_hf(d: Mapping[str, Any]) -> te.T5EncoderConfig:
    """A :class:`~functional_mm.models.text_encoders.T5EncoderConfig` from a T5 / UMT5-free ``config.json``.

    Example::

        >>> t5_config_from_hf({"model_type": "t5", "d_model": 32, "d_kv": 8, "num_heads": 4,
        ...     "feed_forward_proj": "gated-gelu"}).is_gated
        True
    """
    if d.get("model_type", "t5") != "t5":
        raise ValueError(f"t5_config_from_hf: model_type {d.get('model_type')!r} is not 't5'")
    dtype = str(d.get("dtype") or d.get("torch_dtype") or "float32").removeprefix("torch.")
    return te.T5EncoderConfig(
        vocab_size=d.get("vocab_size", 32128),
        d_model=d.get("d_model", 512),
        d_kv=d.get("d_kv", 64),
        d_ff=d.get("d_ff", 2048),
        num_layers=d.get("num_layers", 6),
        num_heads=d.get("num_heads", 8),
        relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
        feed_forward_proj=d.get("feed_forward_proj", "relu"),
        layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
        dtype=dtype,
    )


def t5_config_to_hf(cfg: te.T5EncoderConfig) -> dict[str, Any]:
    """A transformers ``config.json`` dict for ``T5EncoderModel``."""
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "feed_forward_proj": cfg.feed_forward_proj,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "is_encoder_decoder": False,
        "use_cache": False,
        "tie_word_embeddings": True,
        "dropout_rate": 0.0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "dtype": cfg.dtype,
    }


def config_from_hf(d: Mapping[str, Any]) -> Config:
    """Dispatch on ``model_type``: CLIP text or T5 encoder config."""
    mt = d.get("model_type")
    if mt in ("clip_text_model", "clip"):
        return clip_config_from_hf(d)
    if mt == "t5":
        return t5_config_from_hf(d)
    raise ValueError(f"config_from_hf: model_type {mt!r} is neither a CLIP text model nor T5")


# ----------------------------------------------------------------------------------------------------------------
# weights


def _shapes(cfg: Config):
    return (te.clip_abstract(cfg) if isinstance(cfg, te.CLIPTextConfig) else te.t5_abstract(cfg))[0]


def _t5_embedding(names: set[str], get, where: str) -> str | None:
    """Which stored name holds T5's tied table; checks a duplicate copy is equal. Returns the alias to ignore."""
    shared, alias = _T5_TOP["embed/weight"], T5_EMBED_ALIAS
    if shared in names and alias in names:
        if not torch.equal(get(shared), get(alias)):
            raise io.CheckpointMismatchError(f"{where}: {shared} and {alias} are both present but differ")
        return alias
    return None


def from_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: Config, *, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Our parameter tree from a transformers ``state_dict()`` of a ``CLIPTextModel(WithProjection)`` or
    ``T5EncoderModel`` (strict; the tensors are copied).

    Example::

        >>> params = from_hf_state_dict(model.state_dict(), config_from_hf(model.config.to_dict()))  # doctest: +SKIP
    """
    sd = dict(state_dict)
    if isinstance(cfg, te.CLIPTextConfig):
        if not cfg.with_projection:
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        return io.load_params(sd, _shapes(cfg), _namer(cfg), ignore=CLIP_IGNORE, dtype=dtype)
    alias = _t5_embedding(set(sd), sd.__getitem__, "state dict")
    if alias is not None:
        del sd[alias]
    elif T5_EMBED_ALIAS in sd:
        sd[_T5_TOP["embed/weight"]] = sd.pop(T5_EMBED_ALIAS)
    return io.load_params(sd, _shapes(cfg), t5_hf_name, dtype=dtype)


def to_hf_state_dict(params: dict[str, Any], cfg: Config) -> dict[str, torch.Tensor]:
    """``{transformers name: tensor}`` (CPU, contiguous), checked against ``cfg``."""
    name = _namer(cfg)
    shapes = {name(p): tuple(x.shape) for p, x in pytree.flatten_with_paths(_shapes(cfg))[0]}
    out = io.export_params(params, name)
    io.check_names({k: tuple(v.shape) for k, v in out.items()}, shapes, where="params")
    return out


def load_pretrained(
    directory: str | os.PathLike, *, dtype: str | None = None
) -> tuple[Config, dict[str, Any]]:
    """``(cfg, params)`` from a transformers directory of a ``CLIPTextModel``, ``CLIPTextModelWithProjection``
    or ``T5EncoderModel``. Strict: missing, unexpected or mis-shaped tensors raise one
    :class:`~functional_mm.models.hf.io.CheckpointMismatchError` naming them all.

    Example::

        >>> cfg, params = load_pretrained("FLUX.1-dev/text_encoder_2", dtype="bfloat16")   # doctest: +SKIP
    """
    d = io.read_config(directory)
    names = set(io.tensor_files(directory))
    if d.get("model_type") in ("clip_text_model", "clip") and not d.get("architectures"):
        cfg = clip_config_from_hf(d, with_projection="text_projection.weight" in names)
    else:
        cfg = config_from_hf(d)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    if isinstance(cfg, te.CLIPTextConfig):
        rename = None if cfg.with_projection else (lambda n: n.removeprefix("text_model."))
        params = io.load_params(directory, _shapes(cfg), _namer(cfg), ignore=CLIP_IGNORE, rename=rename)
        return cfg, params

    def get(name: str) -> torch.Tensor:
        return io.read_tensors(directory, {name: (cfg.vocab_size, cfg.d_model)}, ignore=[".*"])[name]

    alias = _t5_embedding(names, get, f"checkpoint {str(directory)!r}")
    ignore = [rf"^{re.escape(alias)}$"] if alias else []
    rename = None
    if alias is None and T5_EMBED_ALIAS in names:
        shared = _T5_TOP["embed/weight"]
        rename = lambda n: shared if n == T5_EMBED_ALIAS else n  # noqa: E731
    return cfg, io.load_params(directory, _shapes(cfg), t5_hf_name, ignore=ignore, rename=rename)


def save_pretrained(
    params: dict[str, Any],
    cfg: Config,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``config.json`` and ``model.safetensors`` (sharded with an index above ``max_shard_bytes``) that
    transformers' ``from_pretrained`` loads with no missing or unexpected keys. Returns the written files.

    Example::

        >>> save_pretrained(params, cfg, "out/text_encoder")   # doctest: +SKIP
    """
    files = io.write_tensors(directory, to_hf_state_dict(params, cfg), max_shard_bytes=max_shard_bytes)
    d = clip_config_to_hf(cfg) if isinstance(cfg, te.CLIPTextConfig) else t5_config_to_hf(cfg)
    io.write_config(directory, d)
    return [*files, "config.json"]
