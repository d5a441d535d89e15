"""Text encoders that condition SD3 and Flux, as pure functions: the CLIP text transformer (with or without
its projection head) and the T5 encoder.

SD3 uses two CLIPs with projection (CLIP-L and OpenCLIP bigG: the *penultimate* hidden states as tokens and
the projected EOS state as the pooled vector) plus T5-XXL tokens; Flux uses CLIP-L's pooled output (no
projection) and T5-XXL tokens. :func:`clip_apply` returns every piece those pipelines read.

Parameter trees::

    CLIP  token_embed/weight [V, D] ("vocab", "embed"), pos_embed/weight [P, D] (None, "embed"),
          layers/{i}/{ln1, ln2}/{scale, bias} ("norm",), layers/{i}/attn/{q,k,v,o} (biases),
          layers/{i}/mlp/{fc1, fc2}, final_norm/{scale, bias}, projection/weight [P', D] ("embed", None)
    T5    embed/weight [V, D], rel_bias/weight [buckets, H] (None, "heads"), layers/{i}/{attn_norm, mlp_norm},
          layers/{i}/attn/{q,k,v,o} (no biases), layers/{i}/mlp/{gate, up, down} (gated) or {fc1, fc2},
          final_norm/scale

Example::

    >>> import torch
    >>> from functional_mm import random
    >>> from functional_mm.models import text_encoders as te
    >>> cfg = te.CLIPTextConfig.variant("tiny")
    >>> params = te.clip_init(random.key(0), cfg)
    >>> tokens = torch.tensor([[cfg.bos_token_id, 5, 6, cfg.eos_token_id, cfg.eos_token_id]])
    >>> out = te.clip_apply(params, cfg, tokens, output_hidden_states=True)
    >>> out.last_hidden_state.shape, out.text_embeds.shape, len(out.hidden_states)
    (torch.Size([1, 5, 32]), torch.Size([1, 24]), 3)
    >>> t5 = te.T5EncoderConfig.variant("tiny")
    >>> te.t5_apply(te.t5_init(random.key(1), t5), t5, tokens).shape      # [B, T, d_model]
    torch.Size([1, 5, 32])
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from functional_mm import nn, parallelism, pytree, random
from functional_mm.models.vit import from_dict as _from_dict

__all__ = [
    "CLIPTextConfig",
    "CLIP_VARIANTS",
    "CLIPTextOutput",
    "clip_init_boxed",
    "clip_init",
    "clip_abstract",
    "clip_apply",
    "T5EncoderConfig",
    "T5_VARIANTS",
    "t5_init_boxed",
    "t5_init",
    "t5_abstract",
    "t5_apply",
    "relative_position_bucket",
    "num_params",
    "sd3_conditioning",
    "flux_conditioning",
]

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def _positive_int(cls: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{cls}.{name} must be an int >= 1, got {value!r}")


# ================================================================================================================
# CLIP text

CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyperparameters of a CLIP text transformer (transformers' ``CLIPTextConfig`` fields).

    ``with_projection`` selects ``CLIPTextModelWithProjection`` (adds ``text_projection``: pooled ->
    ``projection_dim``) over ``CLIPTextModel``. ``eos_token_id`` picks the pooled token: 2 is the legacy value
    of many exported configs and means "the position of the largest token id" (the EOS of CLIP's tokenizer);
    any other id means "the first position holding that id" (transformers' rule).

    Example::

        >>> CLIPTextConfig.variant("clip_g").hidden_act
        'gelu'
        >>> CLIPTextConfig.variant("tiny", hidden_act="relu")
        Traceback (most recent call last):
        ...
        ValueError: CLIPTextConfig.hidden_act='relu' is not one of ('quick_gelu', 'gelu', 'gelu_new')
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    with_projection: bool = True
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    dtype: str = "float32"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "max_position_embeddings",
            "projection_dim",
        ):
            _positive_int("CLIPTextConfig", name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"CLIPTextConfig.num_heads={self.num_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig.hidden_act={self.hidden_act!r} is not one of {CLIP_ACTIVATIONS}"
            )
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ValueError(
                f"CLIPTextConfig.layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}"
            )
        if not isinstance(self.with_projection, bool):
            raise ValueError(f"CLIPTextConfig.with_projection must be a bool, got {self.with_projection!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"CLIPTextConfig.{name} must be an int >= 0, got {v!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"CLIPTextConfig.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """Build from a plain dict, rejecting unknown fields."""
        return _from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> CLIPTextConfig:
        """A named configuration from :data:`CLIP_VARIANTS`, with field overrides."""
        if name not in CLIP_VARIANTS:
            raise ValueError(f"unknown CLIP text variant {name!r}; known: {sorted(CLIP_VARIANTS)}")
        return cls.from_dict({**CLIP_VARIANTS[name], **overrides})


CLIP_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=16,
        projection_dim=24,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    # openai/clip-vit-large-patch14 text tower (SD3 text_encoder, with projection): 123.7M parameters.
    "clip_l": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_layers=12,
        num_heads=12,
        projection_dim=768,
        eos_token_id=2,
        dtype="float16",
    ),
    # The same tower without projection, as Flux's text_encoder (CLIPTextModel): 123.1M parameters.
    "clip_l_no_projection": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_layers=12,
        num_heads=12,
        projection_dim=768,
        with_projection=False,
        eos_token_id=2,
        dtype="bfloat16",
    ),
    # laion CLIP-ViT-bigG-14 text tower (SD3 text_encoder_2): 694.7M parameters.
    "clip_g": dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_layers=32,
        num_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
        eos_token_id=2,
        dtype="float16",
    ),
}


def clip_init_boxed(key: torch.Tensor, cfg: CLIPTextConfig) -> dict[str, Any]:
    """The CLIP text parameter tree, boxed with logical axes (embeddings N(0, 0.02), linears LeCun-normal).

    Example::

        >>> clip_init_boxed(random.key(0), CLIPTextConfig.variant("tiny"))["pos_embed"]["weight"].axes
        (None, 'embed')
    """
    dtype, d = cfg.torch_dtype, cfg.hidden_size
    k_tok, k_pos, k_layers, k_proj = random.split(key, 4)
    layers = []
    for k in random.split(k_layers, cfg.num_layers):
        ka, km = random.split(k)
        layers.append(
            {
                "ln1": nn.norms.init_layer_norm(d, dtype=dtype),
                "attn": nn.attention.init(ka, d, cfg.num_heads, qkv_bias=True, out_bias=True, dtype=dtype),
                "ln2": nn.norms.init_layer_norm(d, dtype=dtype),
                "mlp": nn.mlp.init_mlp(km, d, cfg.intermediate_size, dtype=dtype),
            }
        )
    tree = {
        "token_embed": nn.embedding.init(k_tok, cfg.vocab_size, d, std=0.02, dtype=dtype),
        "pos_embed": nn.embedding.init(
            k_pos, cfg.max_position_embeddings, d, axes=(None, "embed"), std=0.01, dtype=dtype
        ),
        "layers": layers,
        "final_norm": nn.norms.init_layer_norm(d, dtype=dtype),
    }
    if cfg.with_projection:
        tree["projection"] = nn.linear.init(k_proj, d, cfg.projection_dim, axes=("embed", None), dtype=dtype)
    return tree


def clip_init(key: torch.Tensor, cfg: CLIPTextConfig) -> dict[str, Any]:
    """Plain CLIP text parameter pytree."""
    return nn.unbox(clip_init_boxed(key, cfg))[0]


def clip_abstract(cfg: CLIPTextConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shapes, axes)`` of the CLIP text tree on the meta device."""
    return nn.abstract(clip_init_boxed, random.key(0), cfg)


class CLIPTextOutput(NamedTuple):
    """``last_hidden_state [B, T, D]`` (after the final LayerNorm), ``pooled [B, D]`` (the EOS state),
    ``text_embeds [B, projection_dim]`` (None without projection) and, when asked for, ``hidden_states``:
    the embeddings and every layer's output (``num_layers + 1`` tensors, before the final LayerNorm)."""

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    text_embeds: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None


def _check_tokens(tokens: Any, name: str = "tokens") -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        got = (
            f"{tokens.dtype} {list(tokens.shape)}"
            if isinstance(tokens, torch.Tensor)
            else type(tokens).__name__
        )
        raise ValueError(f"{name} must be an integer tensor [B, T], got {got}")


def _bool_mask(mask: Any, shape) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must be [B, T] = {list(shape)} of 0/1, got {got}")
    return mask if mask.dtype == torch.bool else mask != 0


@functools.partial(parallelism.local_rows, rows_arg=2)  # FSDP / DP: each rank's own rows
def clip_apply(
    params: dict[str, Any],
    cfg: CLIPTextConfig,
    tokens: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    output_hidden_states: bool = False,
) -> CLIPTextOutput:
    """Encode ``tokens: [B, T]`` (``T <= max_position_embeddings``) with causal self-attention.

    ``attention_mask: [B, T]`` (1 = real token) additionally hides padding keys. SD3 reads
    ``hidden_states[-2]`` and ``text_embeds``; Flux reads ``pooled``.
    """
    _check_tokens(tokens)
    b, t = tokens.shape
    if t > cfg.max_position_embeddings:
        raise ValueError(f"CLIP: {t} tokens exceed max_position_embeddings={cfg.max_position_embeddings}")
    x = F.embedding(tokens, parallelism.use_param(params["token_embed"]["weight"]))
    x = x + parallelism.use_param(params["pos_embed"]["weight"])[:t]  # [B, T, D]
    pos = torch.arange(t, device=tokens.device).expand(b, t)
    kv_valid = None if attention_mask is None else _bool_mask(attention_mask, (b, t))
    mask = nn.attention.make_mask(pos, pos, causal=True, kv_valid=kv_valid)  # [B, 1, T, T]
    act = nn.mlp.activation(cfg.hidden_act)
    eps = cfg.layer_norm_eps
    hidden = [x]
    for p in params["layers"]:
        p = parallelism.use_params(p)
        h, _ = nn.attention.apply(
            p["attn"], nn.norms.layer_norm(p["ln1"], x, eps), head_dim=cfg.head_dim, mask=mask
        )
        x = x + h
        x = x + nn.linear.apply(
            p["mlp"]["fc2"], act(nn.linear.apply(p["mlp"]["fc1"], nn.norms.layer_norm(p["ln2"], x, eps)))
        )
        hidden.append(x)
    last = nn.norms.layer_norm(parallelism.use_params(params["final_norm"]), x, eps)
    if cfg.eos_token_id == 2:  # legacy configs: EOS is the largest id in CLIP's vocabulary
        eos_pos = tokens.to(torch.int).argmax(dim=-1)
    else:
        eos_pos = (tokens.to(torch.int) == cfg.eos_token_id).int().argmax(dim=-1)
    pooled = last[torch.arange(b, device=last.device), eos_pos]  # [B, D]
    embeds = None
    if cfg.with_projection:
        embeds = nn.linear.apply(parallelism.use_params(params["projection"]), pooled)
    return CLIPTextOutput(last, pooled, embeds, tuple(hidden) if output_hidden_states else None)


# ================================================================================================================
# T5 encoder

T5_FEED_FORWARD = {  # feed_forward_proj -> (gated, activation)
    "relu": (False, "relu"),
    "gelu": (False, "gelu"),
    "gated-gelu": (True, "gelu_new"),  # transformers maps gated-gelu to the tanh "gelu_new"
    "gated-silu": (True, "silu"),
}


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """Hyperparameters of a T5 encoder (transformers' ``T5Config`` fields the encoder uses).

    Example::

        >>> T5EncoderConfig.variant("t5_v1_1_xxl").d_model
        4096
        >>> T5EncoderConfig.variant("tiny", feed_forward_proj="swish")
        Traceback (most recent call last):
        ...
        ValueError: T5EncoderConfig.feed_forward_proj='swish' is not one of ['gated-gelu', 'gated-silu', 'gelu', 'relu']
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_heads",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        ):
            _positive_int("T5EncoderConfig", name, getattr(self, name))
        if self.relative_attention_num_buckets < 4:
            raise ValueError(
                "T5EncoderConfig.relative_attention_num_buckets must be >= 4 (two exact per side)"
            )
        if self.feed_forward_proj not in T5_FEED_FORWARD:
            raise ValueError(
                f"T5EncoderConfig.feed_forward_proj={self.feed_forward_proj!r} is not one of "
                f"{sorted(T5_FEED_FORWARD)}"
            )
        if not isinstance(self.layer_norm_epsilon, (int, float)) or not self.layer_norm_epsilon > 0:
            raise ValueError(
                f"T5EncoderConfig.layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"T5EncoderConfig.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def is_gated(self) -> bool:
        return T5_FEED_FORWARD[self.feed_forward_proj][0]

    @property
    def activation(self) -> str:
        return T5_FEED_FORWARD[self.feed_forward_proj][1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> T5EncoderConfig:
        """Build from a plain dict, rejecting unknown fields."""
        return _from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> T5EncoderConfig:
        """A named configuration from :data:`T5_VARIANTS`, with field overrides."""
        if name not in T5_VARIANTS:
            raise ValueError(f"unknown T5 encoder variant {name!r}; known: {sorted(T5_VARIANTS)}")
        return cls.from_dict({**T5_VARIANTS[name], **overrides})


T5_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"
    ),
    # google/t5-v1_1-xxl encoder (SD3 text_encoder_3, Flux text_encoder_2): 4.76B parameters.
    "t5_v1_1_xxl": dict(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        dtype="bfloat16",
    ),
}


def t5_init_boxed(key: torch.Tensor, cfg: T5EncoderConfig) -> dict[str, Any]:
    """The T5 encoder parameter tree, boxed with logical axes.

    Example::

        >>> t5_init_boxed(random.key(0), T5EncoderConfig.variant("tiny"))["rel_bias"]["weight"].axes
        (None, 'heads')
    """
    dtype, d = cfg.torch_dtype, cfg.d_model
    k_emb, k_rel, k_layers = random.split(key, 3)
    layers = []
    for k in random.split(k_layers, cfg.num_layers):
        ka, km = random.split(k)
        attn = nn.attention.init(ka, d, cfg.num_heads, head_dim=cfg.d_kv, dtype=dtype)
        if cfg.is_gated:
            mlp = nn.mlp.init_gated(km, d, cfg.d_ff, dtype=dtype)
        else:
            mlp = nn.mlp.init_mlp(km, d, cfg.d_ff, bias=False, dtype=dtype)
        layers.append(
            {
                "attn_norm": nn.norms.init_rms_norm(d, dtype=dtype),
                "attn": attn,
                "mlp_norm": nn.norms.init_rms_norm(d, dtype=dtype),
                "mlp": mlp,
            }
        )
    rel = random.normal(k_rel, (cfg.relative_attention_num_buckets, cfg.num_heads), dtype) * 0.02
    return {
        "embed": nn.embedding.init(k_emb, cfg.vocab_size, d, dtype=dtype),
        "rel_bias": {"weight": nn.param(rel, (None, "heads"))},
        "layers": layers,
        "final_norm": nn.norms.init_rms_norm(d, dtype=dtype),
    }


def t5_init(key: torch.Tensor, cfg: T5EncoderConfig) -> dict[str, Any]:
    """Plain T5 encoder parameter pytree."""
    return nn.unbox(t5_init_boxed(key, cfg))[0]


def t5_abstract(cfg: T5EncoderConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shapes, axes)`` of the T5 encoder tree on the meta device."""
    return nn.abstract(t5_init_boxed, random.key(0), cfg)


def relative_position_bucket(
    relative_position: torch.Tensor, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bidirectional bucketing of ``key_pos - query_pos``: half the buckets per direction, the first half
    of those exact, the rest logarithmic up to ``max_distance`` (Mesh TensorFlow's rule)."""
    num_buckets //= 2
    buckets = (relative_position > 0).to(torch.long) * num_buckets
    rel = torch.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, rel, large)


@functools.partial(parallelism.local_rows, rows_arg=2)  # FSDP / DP: each rank's own rows
def t5_apply(
    params: dict[str, Any],
    cfg: T5EncoderConfig,
    tokens: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Encode ``tokens: [B, T]`` -> ``[B, T, d_model]`` (after the final RMSNorm).

    Attention is bidirectional and unscaled (T5 folds ``1/sqrt(d_kv)`` into its initialisation), biased by
    the learned relative-position table shared by all layers; ``attention_mask: [B, T]`` hides padding keys.
    """
    _check_tokens(tokens)
    b, t = tokens.shape
    x = F.embedding(tokens, parallelism.use_param(params["embed"]["weight"]))  # [B, T, D]
    dtype = x.dtype
    pos = torch.arange(t, dtype=torch.long, device=tokens.device)
    buckets = relative_position_bucket(
        pos[None, :] - pos[:, None], cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
    )  # [T, T]
    bias = F.embedding(buckets, parallelism.use_param(params["rel_bias"]["weight"]))  # [T, T, H]
    bias = bias.permute(2, 0, 1)[None]  # [1, H, T, T]
    if attention_mask is not None:
        keep = _bool_mask(attention_mask, (b, t))[:, None, None, :]  # [B, 1, 1, T]
        bias = bias + torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
    eps = cfg.layer_norm_epsilon
    act = cfg.activation
    for p in params["layers"]:
        p = parallelism.use_params(p)
        h = nn.norms.rms_norm(p["attn_norm"], x, eps)
        q, k, v = (nn.linear.apply(p["attn"][n], h).view(b, t, -1, cfg.d_kv).transpose(1, 2) for n in "qkv")
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # [B, H, T, Dh]
        x = x + nn.linear.apply(p["attn"]["o"], o.transpose(1, 2).reshape(b, t, -1))
        h = nn.norms.rms_norm(p["mlp_norm"], x, eps)
        x = x + (nn.mlp.gated(p["mlp"], h, act) if cfg.is_gated else nn.mlp.mlp(p["mlp"], h, act))
    return nn.norms.rms_norm(parallelism.use_params(params["final_norm"]), x, eps)


def num_params(cfg: CLIPTextConfig | T5EncoderConfig) -> int:
    """Parameter count of either encoder.

    Example::

        >>> round(num_params(T5EncoderConfig.variant("t5_v1_1_xxl")) / 1e9, 2)
        4.76
        >>> round(num_params(CLIPTextConfig.variant("clip_g")) / 1e6, 1)
        694.7
    """
    tree = clip_abstract(cfg)[0] if isinstance(cfg, CLIPTextConfig) else t5_abstract(cfg)[0]
    return pytree.leaf_count(tree)


# ================================================================================================================
# pipeline conditioning


def sd3_conditioning(
    clip_l: CLIPTextOutput, clip_g: CLIPTextOutput, t5: torch.Tensor, *, clip_skip: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's ``(context [B, 77 + T5_len, 4096], pooled [B, 768 + 1280])`` from its three encoders, as the
    diffusers pipeline's ``encode_prompt`` builds them.

    The CLIP tokens are the hidden states ``clip_skip + 1`` layers before the last (default: the penultimate
    layer) of CLIP-L and CLIP-G concatenated on channels, zero-padded to T5's width and put before T5's
    tokens; ``pooled`` concatenates the two projected EOS vectors. Without T5, pass zeros
    ``[B, 256, 4096]`` (the pipeline's stand-in). Both CLIP outputs need ``output_hidden_states=True``.

    Example::

        >>> l, g = CLIPTextConfig.variant("tiny"), CLIPTextConfig.variant("tiny", hidden_size=16, num_heads=2)
        >>> tok = torch.tensor([[1, 5, 2]])
        >>> out_l = clip_apply(clip_init(random.key(0), l), l, tok, output_hidden_states=True)
        >>> out_g = clip_apply(clip_init(random.key(1), g), g, tok, output_hidden_states=True)
        >>> ctx, pooled = sd3_conditioning(out_l, out_g, torch.zeros(1, 4, 64))
        >>> ctx.shape, pooled.shape
        (torch.Size([1, 7, 64]), torch.Size([1, 48]))
    """
    if clip_l.hidden_states is None or clip_g.hidden_states is None:
        raise ValueError("sd3_conditioning: run clip_apply with output_hidden_states=True for both CLIPs")
    if clip_l.text_embeds is None or clip_g.text_embeds is None:
        raise ValueError("sd3_conditioning: SD3's CLIPs have projections (with_projection=True)")
    k = -2 if clip_skip is None else -(clip_skip + 2)
    clip = torch.cat([clip_l.hidden_states[k], clip_g.hidden_states[k]], dim=-1)  # [B, 77, 768 + 1280]
    if clip.shape[-1] > t5.shape[-1]:
        raise ValueError(f"sd3_conditioning: CLIP width {clip.shape[-1]} exceeds T5's {t5.shape[-1]}")
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    context = torch.cat([clip.to(t5.dtype), t5], dim=-2)
    return context, torch.cat([clip_l.text_embeds, clip_g.text_embeds], dim=-1)


def flux_conditioning(clip: CLIPTextOutput, t5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's ``(context, pooled)``: T5's tokens ``[B, T, 4096]`` and CLIP-L's pooled (unprojected) EOS state
    ``[B, 768]`` (the pipeline's ``encode_prompt``); the text position ids are :func:`flux.text_ids`."""
    return t5, clip.pooled
