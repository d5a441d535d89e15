"""Hugging Face adapter for Llama / Qwen2 (``LlamaForCausalLM``, ``Qwen2ForCausalLM``).

Example::

    >>> from functional_mm.models.hf import llama as hf_llama
    >>> cfg, params = hf_llama.load_pretrained("Qwen2-0.5B", dtype="float32")     # doctest: +SKIP
    >>> hf_llama.save_pretrained(params, cfg, "export/qwen2")                     # doctest: +SKIP
    >>> # transformers.AutoModelForCausalLM.from_pretrained("export/qwen2") now loads it with no missing keys
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from functional_mm import pytree, random
from functional_mm.models import llama
from functional_mm.models.hf import io

__all__ = [
    "hf_name",
    "config_from_hf",
    "config_to_hf",
    "from_hf_state_dict",
    "to_hf_state_dict",
    "load_pretrained",
    "save_pretrained",
]

# Non-parameter buffers some exports contain (older transformers saved the rotary table).
IGNORE = (r"(^|\.)rotary_emb\.inv_freq$",)

_LAYER_NAMES = {
    "attn_norm/scale": "input_layernorm.weight",
    "attn/q/weight": "self_attn.q_proj.weight",
    "attn/q/bias": "self_attn.q_proj.bias",
    "attn/k/weight": "self_attn.k_proj.weight",
    "attn/k/bias": "self_attn.k_proj.bias",
    "attn/v/weight": "self_attn.v_proj.weight",
    "attn/v/bias": "self_attn.v_proj.bias",
    "attn/o/weight": "self_attn.o_proj.weight",
    "mlp_norm/scale": "post_attention_layernorm.weight",
    "mlp/gate/weight": "mlp.gate_proj.weight",
    "mlp/up/weight": "mlp.up_proj.weight",
    "mlp/down/weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "embed/weight": "model.embed_tokens.weight",
    "final_norm/scale": "model.norm.weight",
    "lm_head/weight": "lm_head.weight",
}
_LAYER_PATH = re.compile(r"^layers/(\d+)/(.+)$")


def hf_name(path: str) -> str:
    """The transformers state-dict name of one of our parameter paths.

    Example::

        >>> hf_name("layers/3/attn/q/bias")
        'model.layers.3.self_attn.q_proj.bias'
    """
    if path in _TOP_NAMES:
        return _TOP_NAMES[path]
    m = _LAYER_PATH.match(path)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise KeyError(f"no Hugging Face name for Llama parameter {path!r}")


# ----------------------------------------------------------------------------------------------------------------
# config


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from a 5.x ``rope_parameters`` dict or 4.x ``rope_theta``/``rope_scaling``."""
    rp = d.get("rope_parameters") or {}
    if rp and all(isinstance(v, Mapping) for v in rp.values()):
        raise ValueError(f"config_from_hf: per-layer-type rope_parameters {sorted(rp)} are not supported")
    theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = (
        dict(rp) if rp.get("rope_type", rp.get("type", "default")) != "default" else d.get("rope_scaling")
    )
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3" and "original_max_position_embeddings" not in scaling:
            # transformers falls back to max_position_embeddings for llama3 RoPE.
            scaling["original_max_position_embeddings"] = d.get("max_position_embeddings")
        if kind == "default":
            scaling = None
    return float(theta), scaling


def config_from_hf(d: Mapping[str, Any]) -> llama.LlamaConfig:
    """A :class:`~functional_mm.models.llama.LlamaConfig` from a ``config.json`` dict (``model_type`` ``llama``
    or ``qwen2``; transformers 4.x or 5.x layout). Features we do not implement are rejected, not ignored.

    Example::

        >>> cfg = config_from_hf({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
        ...     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        ...     "intermediate_size": 64, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
        >>> cfg.qkv_bias, cfg.rope_theta
        (True, 1000000.0)
    """
    model_type = d.get("model_type")
    if model_type not in ("llama", "qwen2"):
        raise ValueError(
            f"config_from_hf: model_type {model_type!r} is not a Llama/Qwen2 config ('llama' or 'qwen2')"
        )
    problems = []
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={d['hidden_act']!r} (only 'silu')")
    if model_type == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                problems.append(f"{flag}=True")
    if model_type == "qwen2" and d.get("use_sliding_window"):
        problems.append("use_sliding_window=True")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={d['partial_rotary_factor']}")
    if problems:
        raise ValueError(f"config_from_hf: unsupported {model_type} feature(s): {', '.join(problems)}")
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        if k not in d
    ]
    if missing:
        raise ValueError(f"config_from_hf: config is missing required field(s) {missing}")
    theta, scaling = _rope_from_hf(d)
    dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
    return llama.LlamaConfig(
        vocab_size=d["vocab_size"],
        dim=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim") or None,
        mlp_dim=d["intermediate_size"],
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        max_seq_len=d.get("max_position_embeddings", 2048 if model_type == "llama" else 32768),
        init_std=float(d.get("initializer_range", 0.02)),
        dtype=str(dtype).removeprefix("torch."),
    )


def config_to_hf(cfg: llama.LlamaConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ``config.json`` dict for transformers: Qwen2 when ``qkv_bias`` (the only architectural difference),
    else Llama. RoPE is written both as 5.x ``rope_parameters`` and as 4.x ``rope_theta``/``rope_scaling``.
    ``extra`` (e.g. ``bos_token_id``/``eos_token_id``) is merged last.

    Example::

        >>> config_to_hf(llama.LlamaConfig.variant("qwen2_0.5b"))["architectures"]
        ['Qwen2ForCausalLM']
    """
    qwen2 = cfg.qkv_bias
    d: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
        "dtype": cfg.dtype,
        "use_cache": True,
    }
    if qwen2:
        d.update(use_sliding_window=False, sliding_window=None)
    else:
        d.update(attention_bias=False, mlp_bias=False)
    d.update(extra or {})
    return d


# ----------------------------------------------------------------------------------------------------------------
# weights


def _shapes(cfg: llama.LlamaConfig):
    return llama.abstract(cfg)[0]  # meta tensors: shapes and dtypes, no memory


def _check_tied_head(lm_head: torch.Tensor | None, embed: torch.Tensor, where: str) -> None:
    # Tied checkpoints sometimes still store lm_head.weight; it may only be a copy of the embedding.
    if lm_head is not None and not torch.equal(lm_head.to(embed.dtype), embed):
        raise io.CheckpointMismatchError(
            f"{where}: tie_word_embeddings is set but lm_head.weight differs from model.embed_tokens.weight"
        )


def from_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: llama.LlamaConfig, *, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Our parameter tree from a transformers ``state_dict()`` (strict; the tensors are copied).

    Example::

        >>> params = from_hf_state_dict(hf_model.state_dict(), config_from_hf(hf_model.config.to_dict()))
        ... # doctest: +SKIP
    """
    sd = dict(state_dict)
    if cfg.tie_embeddings and "lm_head.weight" in sd:
        _check_tied_head(sd.pop("lm_head.weight"), sd.get("model.embed_tokens.weight"), "state dict")
    return io.load_params(sd, _shapes(cfg), hf_name, ignore=IGNORE, dtype=dtype)


def to_hf_state_dict(params: dict[str, Any], cfg: llama.LlamaConfig) -> dict[str, torch.Tensor]:
    """``{hf_name: tensor}`` (CPU, contiguous), checked against ``cfg`` (no lm_head when tied)."""
    shapes = {hf_name(p): tuple(x.shape) for p, x in pytree.flatten_with_paths(_shapes(cfg))[0]}
    out = io.export_params(params, hf_name)
    io.check_names({k: tuple(v.shape) for k, v in out.items()}, shapes, where="params")
    return out


def load_pretrained(
    directory: str | os.PathLike,
    *,
    dtype: str | None = None,
    mesh: Any = None,
    rules: Any = None,
) -> tuple[llama.LlamaConfig, dict[str, Any]]:
    """``(cfg, params)`` from a transformers directory: ``config.json`` plus ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``. Strict: any missing, unexpected or mis-shaped tensor raises one
    :class:`~functional_mm.models.hf.io.CheckpointMismatchError` naming them all. ``dtype`` (a name such as
    ``"float32"``) overrides the checkpoint's dtype. With ``mesh`` and logical-axis ``rules`` the parameters come
    back as DTensors placed by the rules, each process reading only its own slices of the files.

    Example::

        >>> cfg, params = load_pretrained("Meta-Llama-3-8B", dtype="bfloat16")   # doctest: +SKIP
        >>> cfg, sharded = load_pretrained("Meta-Llama-3-8B", mesh=mesh, rules=rules)  # doctest: +SKIP
    """
    cfg = config_from_hf(io.read_config(directory))
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    if (mesh is None) != (rules is None):
        raise ValueError("load_pretrained: pass both mesh and rules (sharded) or neither")
    shapes = _shapes(cfg)
    if mesh is not None:
        from functional_mm.parallelism import abstract_init

        shapes = abstract_init(llama.init_boxed, random.key(0), cfg, mesh=mesh, rules=rules)[0]
    ignore = IGNORE
    if cfg.tie_embeddings and "lm_head.weight" in io.tensor_files(directory):
        ignore = (*IGNORE, r"^lm_head\.weight$")
    params = io.load_params(directory, shapes, hf_name, ignore=ignore)
    if ignore is not IGNORE:
        # the stored head must be a copy of the embedding: compare this process's slices of both
        embed = shapes["embed"]["weight"]
        head = io.load_params(directory, {"w": embed}, lambda _: "lm_head.weight", ignore=[".*"])["w"]
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t
        _check_tied_head(local(head), local(params["embed"]["weight"]), f"checkpoint {str(directory)!r}")
    return cfg, params


def save_pretrained(
    params: dict[str, Any],
    cfg: llama.LlamaConfig,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
    extra_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``config.json`` and safetensors (sharded with an index above ``max_shard_bytes``) that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads with no missing or unexpected keys.
    ``extra_config`` adds fields such as token ids. Returns the written file names.

    Example::

        >>> save_pretrained(params, cfg, "out", extra_config={"eos_token_id": 2})   # doctest: +SKIP
    """
    tensors = to_hf_state_dict(params, cfg)
    files = io.write_tensors(directory, tensors, max_shard_bytes=max_shard_bytes)
    io.write_config(directory, config_to_hf(cfg, extra_config))
    return [*files, "config.json"]
