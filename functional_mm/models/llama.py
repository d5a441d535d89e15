"""Llama 2 / Llama 3 and Qwen2 decoder-only language models as pure functions over a parameter pytree.

The three families share one architecture: pre-norm blocks of RMSNorm -> GQA attention with RoPE -> RMSNorm ->
SwiGLU MLP. Qwen2 adds biases to the q/k/v projections (``qkv_bias=True``); Llama 3.1 adds ``llama3`` RoPE
scaling; small Qwen2 models tie the output head to the embedding (``tie_embeddings=True``).

Parameter tree (``/``-joined paths are checkpoint keys and rule targets)::

    embed/weight                       [V, D]      ("vocab", "embed")
    layers/{i}/attn_norm/scale         [D]         ("norm",)
    layers/{i}/attn/{q,k,v,o}/weight   [out, in]   q: ("heads", "embed"), k/v: ("kv_heads", "embed"), o: ("embed", "heads")
    layers/{i}/attn/{q,k,v}/bias       [out]       (Qwen2 only)
    layers/{i}/mlp_norm/scale          [D]
    layers/{i}/mlp/{gate,up,down}/weight           gate/up: ("mlp", "embed"), down: ("embed", "mlp")
    final_norm/scale                   [D]
    lm_head/weight                     [V, D]      ("vocab", "embed"); absent when tie_embeddings

Example::

    >>> import torch
    >>> from functional_mm import random
    >>> from functional_mm.models import llama
    >>> cfg = llama.LlamaConfig.variant("tiny")
    >>> params = llama.init(random.key(0), cfg)
    >>> tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    >>> llama.apply(params, cfg, tokens).shape          # [B, T, V]
    torch.Size([2, 16, 128])
    >>> loss = llama.loss(params, cfg, {"tokens": tokens})
    >>> out = llama.generate(params, cfg, tokens[:, :4], max_new_tokens=3)   # greedy, [B, 4 + 3]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from functional_mm import autodiff, nn, parallelism, pytree, random
from functional_mm.parallelism import constrain

__all__ = [
    "LlamaConfig",
    "VARIANTS",
    "init_boxed",
    "init",
    "abstract",
    "logical_axes",
    "default_rules",
    "check_layout",
    "apply",
    "decode",
    "loss",
    "next_token_targets",
    "target_loss",
    "num_params",
    "flops_per_token",
    "init_cache",
    "generate",
    "decode_loop",
    "check_sampling",
]

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
# Required keys per RoPE scaling type (the ones nn.rope.frequencies implements).
_ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama / Qwen2 model.

    ``num_kv_heads`` defaults to ``num_heads`` (plain multi-head attention) and ``head_dim`` to
    ``dim // num_heads``. ``rope_scaling`` is ``None`` or a dict such as ``{"rope_type": "llama3", "factor": 8.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}``. ``dtype`` is
    the name of the parameter dtype (``"float32"``, ``"bfloat16"``, ...).

    Example::

        >>> cfg = LlamaConfig.variant("llama3_8b")
        >>> cfg.head_dim, cfg.num_kv_heads
        (128, 8)
        >>> LlamaConfig.variant("tiny", num_layers=1).num_layers
        1
    """

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_seq_len: int = 2048
    init_std: float = 0.02
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "mlp_dim", "max_seq_len"):
            _check_positive_int(name, getattr(self, name))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        _check_positive_int("num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} "
                "(each key/value head serves a whole group of query heads)"
            )
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(
                    f"LlamaConfig.head_dim: dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                    "pass head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.dim // self.num_heads)
        _check_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig.head_dim={self.head_dim} must be even (rotary embeddings rotate pairs)"
            )
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}")
        if not isinstance(self.init_std, (int, float)) or self.init_std < 0:
            raise ValueError(f"LlamaConfig.init_std must be a number >= 0, got {self.init_std!r}")
        for name in ("tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LlamaConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"LlamaConfig.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        object.__setattr__(self, "rope_scaling", _normalize_rope_scaling(self.rope_scaling))

    # A dict field makes the generated __hash__ fail; hash its items instead so configs can be dict keys or
    # static arguments.
    def __hash__(self):
        items = tuple(
            tuple(sorted(v.items())) if isinstance(v, Mapping) else v for v in dataclasses.astuple(self)
        )
        return hash(items)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Build from a plain dict, rejecting unknown fields (a typo must not silently become a default).

        Example::

            >>> LlamaConfig.from_dict({"vocab_size": 8, "dim": 8, "num_layers": 1, "num_heads": 2, "mlp_dim": 16})
            ... # doctest: +ELLIPSIS
            LlamaConfig(vocab_size=8, ...)
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"LlamaConfig.from_dict: unknown field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling is not None else None
        return d

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named size from :data:`VARIANTS`, with field overrides.

        Example::

            >>> LlamaConfig.variant("qwen2_0.5b").tie_embeddings
            True
        """
        if name not in VARIANTS:
            raise ValueError(f"unknown Llama variant {name!r}; known: {sorted(VARIANTS)}")
        return cls.from_dict({**VARIANTS[name], **overrides})


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")


def _normalize_rope_scaling(s: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if s is None:
        return None
    if not isinstance(s, Mapping):
        raise ValueError(f"LlamaConfig.rope_scaling must be a dict or None, got {type(s).__name__}")
    s = dict(s)
    kind = s.pop("rope_type", s.pop("type", "default"))  # transformers 4.x configs spell it "type"
    s.pop("rope_theta", None)  # lives in its own field
    if kind == "default":
        if s:
            raise ValueError(f"LlamaConfig.rope_scaling: default RoPE takes no parameters, got {sorted(s)}")
        return None
    if kind not in _ROPE_SCALING_KEYS:
        raise ValueError(
            f"LlamaConfig.rope_scaling: rope_type {kind!r} is not supported (supported: default, "
            f"{', '.join(_ROPE_SCALING_KEYS)})"
        )
    required = _ROPE_SCALING_KEYS[kind]
    missing, unknown = sorted(set(required) - set(s)), sorted(set(s) - set(required))
    if missing or unknown:
        raise ValueError(
            f"LlamaConfig.rope_scaling ({kind}): missing keys {missing}, unknown keys {unknown}; "
            f"expected exactly {list(required)}"
        )
    return {"rope_type": kind, **s}


# Published hyperparameters (the Hugging Face config.json of each checkpoint).
VARIANTS: dict[str, dict[str, Any]] = {
    # CPU test size: runs forward + backward in milliseconds.
    "tiny": dict(
        vocab_size=128, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, max_seq_len=128
    ),
    "llama2_7b": dict(
        vocab_size=32000,
        dim=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        mlp_dim=11008,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_seq_len=4096,
        dtype="bfloat16",
    ),
    "llama3_8b": dict(
        vocab_size=128256,
        dim=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=8192,
        dtype="bfloat16",
    ),
    "qwen2_0.5b": dict(
        vocab_size=151936,
        dim=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        mlp_dim=4864,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        max_seq_len=131072,
        tie_embeddings=True,
        qkv_bias=True,
        dtype="bfloat16",
    ),
    "qwen2_1.5b": dict(
        vocab_size=151936,
        dim=1536,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        mlp_dim=8960,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        max_seq_len=131072,
        tie_embeddings=True,
        qkv_bias=True,
        dtype="bfloat16",
    ),
    "qwen2_7b": dict(
        vocab_size=152064,
        dim=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        mlp_dim=18944,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        max_seq_len=131072,
        qkv_bias=True,
        dtype="bfloat16",
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# init


def init_boxed(key: torch.Tensor, cfg: LlamaConfig) -> dict[str, Any]:
    """The parameter tree with every leaf boxed as ``nn.Param(value, logical_axes)``.

    Example::

        >>> boxed = init_boxed(random.key(0), LlamaConfig.variant("tiny"))
        >>> boxed["embed"]["weight"].axes
        ('vocab', 'embed')
    """
    dtype = cfg.torch_dtype
    k_embed, k_layers, k_head = random.split(key, 3)
    layers = []
    for k_layer in random.split(k_layers, cfg.num_layers):
        k_attn, k_mlp = random.split(k_layer)
        layers.append(
            {
                "attn_norm": nn.norms.init_rms_norm(cfg.dim, dtype=dtype),
                "attn": nn.attention.init(
                    k_attn,
                    cfg.dim,
                    cfg.num_heads,
                    cfg.num_kv_heads,
                    cfg.head_dim,
                    qkv_bias=cfg.qkv_bias,
                    std=cfg.init_std,
                    dtype=dtype,
                ),
                "mlp_norm": nn.norms.init_rms_norm(cfg.dim, dtype=dtype),
                "mlp": nn.mlp.init_gated(k_mlp, cfg.dim, cfg.mlp_dim, std=cfg.init_std, dtype=dtype),
            }
        )
    tree = {
        "embed": nn.embedding.init(k_embed, cfg.vocab_size, cfg.dim, std=cfg.init_std, dtype=dtype),
        "layers": layers,
        "final_norm": nn.norms.init_rms_norm(cfg.dim, dtype=dtype),
    }
    if not cfg.tie_embeddings:
        tree["lm_head"] = nn.linear.init(
            k_head, cfg.dim, cfg.vocab_size, axes=("embed", "vocab"), std=cfg.init_std, dtype=dtype
        )
    return tree


def init(key: torch.Tensor, cfg: LlamaConfig) -> dict[str, Any]:
    """Plain parameter pytree (tensors only).

    Example::

        >>> params = init(random.key(0), LlamaConfig.variant("tiny"))
        >>> params["layers"][0]["attn"]["k"]["weight"].shape   # [kv_heads * head_dim, dim]
        torch.Size([32, 64])
    """
    return nn.unbox(init_boxed(key, cfg))[0]


def abstract(cfg: LlamaConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shapes, axes)``: the parameter tree as meta tensors (shapes/dtypes, no memory) and its logical axes.

    Example::

        >>> shapes, axes = abstract(LlamaConfig.variant("llama3_8b"))
        >>> shapes["lm_head"]["weight"].shape, shapes["lm_head"]["weight"].device
        (torch.Size([128256, 4096]), device(type='meta'))
    """
    return nn.abstract(init_boxed, random.key(0), cfg)


def logical_axes(cfg: LlamaConfig) -> dict[str, Any]:
    """The tree of logical axis names, computed on the meta device (allocates no parameter memory).

    Example::

        >>> logical_axes(LlamaConfig.variant("llama3_8b"))["layers"][0]["mlp"]["down"]["weight"]
        ('embed', 'mlp')
    """
    return abstract(cfg)[1]


# ----------------------------------------------------------------------------------------------------------------
# sharding

# Activation layouts (logical names; the rules map them to mesh axes). Between blocks the residual stream and
# its norms may be split along the sequence (Megatron sequence parallelism: "act_norm_seq" on tp); attention
# and the MLP take the whole sequence and split heads / hidden units instead.
_RESIDUAL = ("act_batch", "act_norm_seq", "act_embed")
_BLOCK_IN = ("act_batch", "act_seq", "act_embed")


def default_rules(*, sequence_parallel: bool = True) -> list[tuple[str, Any]]:
    """Logical-axis rules for Llama on any mesh made of ``dp``, ``fsdp`` and ``tp`` (absent axes are skipped).

    - ``fsdp``: every weight is split over ``fsdp`` along ``embed`` (norm scales along their only dim), so
      parameters and optimizer state take 1/fsdp of the memory on each rank (ZeRO-3); gathered at use.
    - ``tp``: Megatron column/row split: ``heads``, ``kv_heads``, ``mlp`` and ``vocab`` on ``tp`` (q/k/v,
      gate/up and the output head split their outputs, o/down their inputs; the embedding is vocab-parallel),
      the loss is vocab-parallel (:func:`functional_mm.parallelism.cross_entropy`). With
      ``sequence_parallel`` the residual stream and the norms between blocks are split along the sequence
      over ``tp`` (all-gather before attention/MLP, reduce-scatter after), instead of being replicated.
    - ``dp``: replicas; the batch is split over ``dp`` x ``fsdp`` (HSDP when both are > 1).

    Example::

        >>> from functional_mm.parallelism import logical_to_spec
        >>> rules = default_rules()
        >>> logical_to_spec(("heads", "embed"), rules, {"dp": 1, "fsdp": 2, "tp": 2})   # q/k/v: column split
        ('tp', 'fsdp')
        >>> logical_to_spec(_RESIDUAL, rules, {"dp": 2, "fsdp": 2, "tp": 2})
        (('dp', 'fsdp'), 'tp', None)
    """
    return [
        ("vocab", "tp"),
        ("heads", "tp"),
        ("kv_heads", "tp"),
        ("mlp", "tp"),
        ("embed", "fsdp"),
        ("norm", "fsdp"),
        ("act_batch", ("dp", "fsdp")),
        ("act_seq", None),
        ("act_norm_seq", "tp" if sequence_parallel else None),
        ("act_embed", None),
        ("act_vocab", "tp"),
    ]


def check_layout(cfg: LlamaConfig, mesh: Any, rules: Sequence[tuple[str, Any]]) -> None:
    """Fail (before any collective) when the layout would cut through an attention head: the mesh axes that
    split ``heads`` / ``kv_heads`` at compute time (all but the data axes, which are gathered) must divide the
    head counts. ``mesh`` is a ``DeviceMesh`` or a ``{axis: size}`` dict.

    Example::

        >>> check_layout(LlamaConfig.variant("tiny", num_kv_heads=1), {"tp": 2}, default_rules())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Llama layout: num_kv_heads=1 is not divisible by the mesh axes ('tp',) of size 2 that split the 'kv_heads' dim ...
    """
    from functional_mm.parallelism._rules import mesh_sizes

    sizes = mesh_sizes(mesh)
    for name, count in (("heads", cfg.num_heads), ("kv_heads", cfg.num_kv_heads)):
        entry = parallelism.logical_to_spec((name,), rules, mesh)[0]
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        axes = tuple(a for a in axes if a not in parallelism.DATA_AXES)
        n = 1
        for a in axes:
            n *= sizes[a]
        if count % n:
            raise ValueError(
                f"Llama layout: num_{name}={count} is not divisible by the mesh axes {axes} of size {n} that "
                f"split the {name!r} dim (a head would be cut in two); change the mesh or the rules"
            )


# ----------------------------------------------------------------------------------------------------------------
# forward


def _check_int_bt(x: Any, name: str, shape: tuple[int, int] | None = None) -> None:
    """``x`` must be an integer tensor ``[B, T]`` (of ``shape`` when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor [B, T], got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor [B, T], got dtype {x.dtype}")
    if x.dim() != 2 or (shape is not None and tuple(x.shape) != tuple(shape)):
        want = f"[B, T] = {list(shape)}" if shape is not None else "[B, T]"
        raise ValueError(f"{name} must have shape {want}, got {list(x.shape)}")


def _check_mask(x: Any, name: str, shape: tuple[int, int]) -> torch.Tensor:
    """A 0/1 (bool, int or float) ``[B, T]`` mask, returned as bool."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, T] of 0/1, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [B, T] = {list(shape)}, got {list(x.shape)}")
    return x if x.dtype == torch.bool else x != 0


def _embed_inputs(params, cfg: LlamaConfig, tokens, inputs_embeds) -> torch.Tensor:
    """Validate ``tokens`` (or ``inputs_embeds``) and return the embeddings ``[B, T, D]``."""
    if (tokens is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of tokens [B, T] or inputs_embeds [B, T, D]")
    if tokens is not None:
        _check_int_bt(tokens, "tokens")
        # F.embedding (not table[ids]): DTensor splits it over a vocab-parallel table (masked lookup + sum).
        tokens = constrain(tokens, ("act_batch", "act_seq"))
        x = F.embedding(tokens, parallelism.use_param(params["embed"]["weight"]))  # [B, T, D]
    else:
        x = inputs_embeds
        if (
            not isinstance(x, torch.Tensor)
            or not x.is_floating_point()
            or x.dim() != 3
            or x.shape[-1] != cfg.dim
        ):
            got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"inputs_embeds must be a float tensor [B, T, D={cfg.dim}], got {got}")
    name = "tokens" if tokens is not None else "inputs_embeds"
    if x.shape[1] == 0:
        raise ValueError(f"{name}: the sequence is empty (T=0)")
    if x.shape[1] > cfg.max_seq_len:
        raise ValueError(f"{name}: sequence length T={x.shape[1]} exceeds max_seq_len={cfg.max_seq_len}")
    return constrain(x, _RESIDUAL)


def _whole(x: Any) -> Any:
    """A DTensor's full value as a plain tensor; anything else unchanged."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def _segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the segment id changes: ``[B, T] -> [B, T]``."""
    t = segment_ids.shape[1]
    idx = torch.arange(t, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # start index of own segment
    return idx - first


def _block(p, x, cfg: LlamaConfig, cos_sin, mask, is_causal, cache=None, cache_index=None):
    """One pre-norm decoder block: ``x: [B, T, D] -> ([B, T, D], new_layer_cache)``."""
    p = parallelism.use_params(p)  # this layer's weights, gathered over the data axes (no-op unsharded)
    h, new_cache = nn.attention.apply(
        p["attn"],
        constrain(nn.norms.rms_norm(p["attn_norm"], x, cfg.norm_eps), _BLOCK_IN),
        head_dim=cfg.head_dim,
        cos_sin=cos_sin,
        mask=mask,
        is_causal=is_causal,
        cache=cache,
        cache_index=cache_index,
    )
    x = x + constrain(h, _RESIDUAL)  # row-parallel output: reduce-scatter (sequence parallel) or all-reduce
    h = nn.mlp.gated(p["mlp"], constrain(nn.norms.rms_norm(p["mlp_norm"], x, cfg.norm_eps), _BLOCK_IN))
    return x + constrain(h, _RESIDUAL), new_cache


@parallelism.local_rows  # FSDP / DP: the block on each rank's own rows, without DTensor dispatch
def _block_no_cache(p, x, cfg, cos_sin, mask, is_causal):
    return _block(p, x, cfg, cos_sin, mask, is_causal)[0]


@parallelism.local_rows
def _head(params, h: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """Final norm and output projection: ``[B, T, D] -> [B, T, V]``."""
    out = "embed" if cfg.tie_embeddings else "lm_head"
    # one use_params call: under FSDP the norm and the output projection share one all-gather / reduce-scatter
    p = parallelism.use_params({"final_norm": params["final_norm"], out: params[out]})
    h = nn.norms.rms_norm(p["final_norm"], h, cfg.norm_eps)
    h = constrain(h, _BLOCK_IN)
    if cfg.tie_embeddings:
        logits = nn.embedding.attend(p[out], h)
    else:
        logits = nn.linear.apply(p[out], h)
    return constrain(logits, ("act_batch", "act_seq", "act_vocab"))  # vocab-parallel under tp


def _rope(cfg: LlamaConfig, positions: torch.Tensor, dtype: torch.dtype):
    inv_freq = nn.rope.frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return nn.rope.cos_sin(positions, inv_freq, dtype)  # each [B, T, Dh]


def apply(
    params: dict[str, Any],
    cfg: LlamaConfig,
    tokens: torch.Tensor | None,
    *,
    positions: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    remat_policy: Any = None,
    return_hidden: bool = False,
) -> torch.Tensor:
    """Logits ``[B, T, V]`` for integer ``tokens: [B, T]`` (full causal forward, no cache; see :func:`decode`).

    - ``attention_mask: [B, T]`` (1 = real token, 0 = padding, left or right): padding keys are hidden and,
      unless ``positions`` is given, positions count real tokens only (``cumsum - 1``, as HF ``generate``
      does), so a left-padded row gives the same logits as the unpadded sequence.
    - ``segment_ids: [B, T]`` (packed sequences): tokens attend only within their own segment and positions
      restart at 0 where the id changes.
    - ``inputs_embeds: [B, T, D]`` replaces ``tokens`` (pass ``tokens=None``), e.g. for multimodal inputs.
    - ``remat_policy``: ``None`` or a policy of :func:`functional_mm.autodiff.remat` (``"full"``,
      ``"selective"``, ...), applied per decoder block.
    - ``return_hidden=True`` returns the last block's output ``[B, T, D]`` (before the final norm) instead of
      the logits, for :func:`target_loss`.

    Example::

        >>> cfg = LlamaConfig.variant("tiny")
        >>> params = init(random.key(0), cfg)
        >>> tokens = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
        >>> mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])   # left padding
        >>> apply(params, cfg, tokens, attention_mask=mask).shape
        torch.Size([2, 4, 128])
    """
    ctx = parallelism.current()
    if ctx is not None:
        check_layout(cfg, *ctx)
    elif isinstance(params["embed"]["weight"], DTensor):
        raise ValueError(
            "llama.apply: the parameters are sharded (DTensors); call it inside "
            "parallelism.use_mesh(mesh, rules) so activations get their layouts"
        )
    # Masks and positions only shape the computation: they stay whole (gathered if sharded, small ints);
    # the tables built from them are split like the activations below.
    attention_mask, segment_ids, positions = (_whole(v) for v in (attention_mask, segment_ids, positions))
    x = _embed_inputs(params, cfg, tokens, inputs_embeds)  # [B, T, D]
    b, t = x.shape[:2]
    valid = None if attention_mask is None else _check_mask(attention_mask, "attention_mask", (b, t))
    if segment_ids is not None:
        _check_int_bt(segment_ids, "segment_ids", (b, t))
    if positions is not None:
        _check_int_bt(positions, "positions", (b, t))
    elif segment_ids is not None:
        positions = _segment_positions(segment_ids)
    elif valid is not None:
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(t, device=x.device).expand(b, t)

    mask, is_causal = None, True
    if valid is not None or segment_ids is not None:
        # Causality follows the slot index, not `positions`: positions restart per segment and may be user-given.
        slots = torch.arange(t, device=x.device).expand(b, t)
        mask = nn.attention.make_mask(
            slots, slots, kv_valid=valid, q_segments=segment_ids, kv_segments=segment_ids
        )  # [B, 1, T, T]
        mask = constrain(mask, ("act_batch", None, "act_seq", None))
        is_causal = False
    cos_sin = tuple(constrain(c, ("act_batch", "act_seq", None)) for c in _rope(cfg, positions, x.dtype))
    block = autodiff.remat(_block_no_cache, remat_policy)
    for p in params["layers"]:
        x = block(p, x, cfg, cos_sin, mask, is_causal)
    return x if return_hidden else _head(params, x, cfg)


def init_cache(
    cfg: LlamaConfig,
    batch: int,
    max_len: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """An empty fixed-size KV cache for :func:`decode`.

    ``{"layers": [{"k": [B, Hkv, S, Dh], "v": ...}] * L, "valid": bool [B, S], "index": int64 []}``:
    ``valid`` marks slots holding a real (non-padding) token, ``index`` is the next slot to write. Static
    shapes, so a compiled decode step never recompiles as the sequence grows.

    Example::

        >>> cache = init_cache(LlamaConfig.variant("tiny"), batch=2, max_len=32)
        >>> cache["layers"][0]["k"].shape
        torch.Size([2, 2, 32, 16])
    """
    if max_len > cfg.max_seq_len:
        raise ValueError(f"init_cache: max_len={max_len} exceeds max_seq_len={cfg.max_seq_len}")
    dtype = dtype or cfg.torch_dtype
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return {
        "layers": [
            {
                "k": torch.zeros(shape, dtype=dtype, device=device),
                "v": torch.zeros(shape, dtype=dtype, device=device),
            }
            for _ in range(cfg.num_layers)
        ],
        "valid": torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        "index": torch.zeros((), dtype=torch.int64, device=device),
    }


def decode(
    params: dict[str, Any],
    cfg: LlamaConfig,
    tokens: torch.Tensor | None,
    cache: dict[str, Any],
    *,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run ``tokens: [B, T]`` through the model on top of ``cache``: ``-> (logits [B, T, V], new_cache)``.

    The new keys/values go to slots ``cache["index"] .. + T``; the input cache is not modified. Use it for the
    prefill (the whole prompt, with ``attention_mask`` for left padding) and then one token per step.
    Positions continue from the number of real tokens already cached, matching HF generation.

    Example::

        >>> cfg = LlamaConfig.variant("tiny")
        >>> params = init(random.key(0), cfg)
        >>> cache = init_cache(cfg, 1, 8)
        >>> logits, cache = decode(params, cfg, torch.tensor([[1, 2, 3]]), cache)   # prefill
        >>> logits, cache = decode(params, cfg, logits[:, -1:].argmax(-1), cache)    # one step
        >>> int(cache["index"])
        4
    """
    x = _embed_inputs(params, cfg, tokens, inputs_embeds)  # [B, T, D]
    b, t = x.shape[:2]
    if not isinstance(cache, Mapping) or set(cache) != {"layers", "valid", "index"}:
        raise ValueError("cache must come from init_cache (a dict with 'layers', 'valid' and 'index')")
    cache_b, s = cache["valid"].shape
    if cache_b != b:
        raise ValueError(f"cache was built for batch {cache_b}, got tokens with batch {b}")
    if len(cache["layers"]) != cfg.num_layers:
        raise ValueError(f"cache has {len(cache['layers'])} layers, the model has {cfg.num_layers}")
    # A host check would break torch.compile (it syncs); outside compile an overflow must not be silent
    # (index_copy would fail with an opaque error, or assert on device).
    if not torch.compiler.is_compiling() and int(cache["index"]) + t > s:
        raise ValueError(f"cache is full: {int(cache['index'])} slots used + {t} new tokens > max_len {s}")
    new_valid = (
        torch.ones(b, t, dtype=torch.bool, device=x.device)
        if attention_mask is None
        else _check_mask(attention_mask, "attention_mask", (b, t))
    )
    if positions is None:
        seen = cache["valid"].sum(-1, keepdim=True)  # [B, 1] real tokens already cached
        positions = seen + (new_valid.long().cumsum(-1) - 1).clamp(min=0)
    else:
        _check_int_bt(positions, "positions", (b, t))

    slots = cache["index"] + torch.arange(t, device=x.device)  # [T]
    valid = cache["valid"].index_copy(1, slots, new_valid)  # [B, S]
    mask = nn.attention.make_mask(
        slots.expand(b, t), torch.arange(s, device=x.device).expand(b, s), kv_valid=valid
    )  # [B, 1, T, S]: causal over slots, unwritten slots hidden by `valid`
    cos_sin = _rope(cfg, positions, x.dtype)
    new_layers = []
    for p, layer_cache in zip(params["layers"], cache["layers"]):
        x, new_layer_cache = _block(p, x, cfg, cos_sin, mask, False, layer_cache, slots)
        new_layers.append(new_layer_cache)
    logits = _head(params, x, cfg)
    return logits, {"layers": new_layers, "valid": valid, "index": cache["index"] + t}


# ----------------------------------------------------------------------------------------------------------------
# loss, FLOPs


_BATCH_KEYS = ("tokens", "loss_mask", "attention_mask", "segment_ids", "positions")


def loss(
    params: dict[str, Any], cfg: LlamaConfig, batch: Mapping[str, torch.Tensor], *, remat_policy: Any = None
):
    """Mean next-token cross entropy (float32) over the valid targets.

    ``batch``: ``"tokens": [B, T]`` and optionally ``"loss_mask": [B, T]`` (1 where token ``t`` counts as a
    target), ``"attention_mask"``, ``"segment_ids"``, ``"positions"`` (as in :func:`apply`). Token ``t+1`` is a
    target when its loss mask is set, both it and its context token ``t`` are real (not padding) and both are in
    the same segment. With no valid target the loss is 0.

    Example::

        >>> cfg = LlamaConfig.variant("tiny")
        >>> params = init(random.key(0), cfg)
        >>> tokens = torch.randint(0, cfg.vocab_size, (2, 8))
        >>> float(loss(params, cfg, {"tokens": tokens})) > 0
        True
    """
    unknown = sorted(set(batch) - set(_BATCH_KEYS))
    if unknown or "tokens" not in batch:
        raise ValueError(
            f"loss: batch needs 'tokens' and may hold {list(_BATCH_KEYS[1:])}; unknown keys {unknown}"
        )
    whole = {k: _whole(v) for k, v in batch.items()}  # the targets below are built from whole (int) tensors
    targets = next_token_targets(  # validates the tokens and masks
        whole["tokens"],
        loss_mask=whole.get("loss_mask"),
        attention_mask=whole.get("attention_mask"),
        segment_ids=whole.get("segment_ids"),
    )
    h = apply(
        params,
        cfg,
        batch["tokens"],
        positions=whole.get("positions"),
        attention_mask=whole.get("attention_mask"),
        segment_ids=whole.get("segment_ids"),
        remat_policy=remat_policy,
        return_hidden=True,
    )  # [B, T, D]
    # Without masks only the last position of a row is not a target: nothing worth a host sync to skip.
    masked = "loss_mask" in batch or "attention_mask" in batch
    return target_loss(params, cfg, h, targets, only_targets=masked)


def next_token_targets(
    tokens: torch.Tensor,
    *,
    loss_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    ignore_ids: Sequence[int] = (),
) -> torch.Tensor:
    """The next-token targets of ``tokens: [B, T]``: ``targets[:, t]`` is ``tokens[:, t+1]`` where it counts,
    else -100 (so the last position is always -100).

    Token ``t+1`` counts when ``loss_mask`` (if given) is set at ``t+1``, both it and token ``t`` are real
    (``attention_mask``), both are in the same segment (``segment_ids``: never predict the next sample's first
    token) and it is not one of ``ignore_ids`` (e.g. image placeholders, which carry no text to predict).

    Example::

        >>> next_token_targets(torch.tensor([[5, 6, 7]]), loss_mask=torch.tensor([[1, 0, 1]]))
        tensor([[-100,    7, -100]])
    """
    _check_int_bt(tokens, "batch['tokens']")
    b, t = tokens.shape
    if t < 2:
        raise ValueError(f"batch['tokens'] needs at least 2 tokens per row for next-token loss, got T={t}")
    valid = torch.ones(b, t - 1, dtype=torch.bool, device=tokens.device)
    if loss_mask is not None:
        valid = valid & _check_mask(loss_mask, "batch['loss_mask']", (b, t))[:, 1:]
    if attention_mask is not None:
        real = _check_mask(attention_mask, "batch['attention_mask']", (b, t))
        valid = valid & real[:, 1:] & real[:, :-1]
    if segment_ids is not None:
        _check_int_bt(segment_ids, "batch['segment_ids']", (b, t))
        valid = valid & (segment_ids[:, 1:] == segment_ids[:, :-1])
    for i in ignore_ids:
        valid = valid & (tokens[:, 1:] != i)
    return F.pad(torch.where(valid, tokens[:, 1:], -100), (0, 1), value=-100)  # [B, T]


@torch.compiler.disable  # the host read is a graph break; the compiled code after it guards on rows' shape only
def _target_rows(targets: torch.Tensor) -> torch.Tensor:
    """Indices of the target positions of ``targets: [N]`` (in order), then non-targets up to a multiple of
    ``N / 4`` (at least one quarter): ``-> [rows]``."""
    n, quarter = targets.shape[0], -(-targets.shape[0] // 4)
    rows = min(n, max(1, -(-int((targets != -100).sum()) // quarter)) * quarter)
    # a stable sort on "is not a target" puts the targets first, in order
    return torch.argsort((targets == -100).to(torch.uint8), stable=True)[:rows]


def target_loss(
    params: dict[str, Any],
    cfg: LlamaConfig,
    h: torch.Tensor,
    targets: torch.Tensor,
    *,
    only_targets: bool = True,
) -> torch.Tensor:
    """Mean cross entropy (float32) of the head's logits at ``h: [B, T, D]`` (``apply(...,
    return_hidden=True)``) against ``targets: [B, T]`` (-100: not a target); 0 when nothing is a target.

    With ``only_targets``, without a mesh or on a data-parallel one (FSDP / DP, each rank on its own rows),
    only the target positions reach the head (padding, prompts and image placeholders are often a quarter or
    more of the positions). Their count is read on the host (one sync; a graph break under ``torch.compile``)
    and rounded up to a quarter of the rows' positions, so a compiled step sees at most four head shapes; the
    rounding's extra positions are non-targets and are ignored. Otherwise all positions go through the head;
    under ``tp`` the cross entropy is vocab-parallel (:func:`functional_mm.parallelism.cross_entropy`): the
    ``[B, T, V]`` logits are never gathered.
    """
    count = (targets != -100).sum()
    # split like h's rows (the global batch's targets are the same on every rank)
    total = _row_losses(params, h, parallelism.rows_like(targets, h), cfg, only_targets).sum()
    return constrain(total, ()) / constrain(count.clamp(min=1).to(total.dtype), ())


@parallelism.local_rows
def _row_losses(params, h: torch.Tensor, targets: torch.Tensor, cfg: LlamaConfig, only_targets: bool):
    """Each row's summed cross entropy ``[B]`` on plain tensors (no mesh, or each rank's own rows); on
    DTensors (``tp`` / ``cp``) the sum over every position, a 0-d tensor (vocab-parallel)."""
    b, t, d = h.shape
    targets = targets.reshape(b * t)
    if parallelism.current() is not None:
        targets = constrain(targets.view(b, t), ("act_batch", "act_seq")).view(b * t)  # split like the logits
        logits = _head(params, h, cfg).view(b * t, -1)
        return parallelism.cross_entropy(logits.float(), targets, reduction="sum")
    if not only_targets:
        logits = _head(params, h, cfg).view(b * t, -1)
        return F.cross_entropy(logits.float(), targets, reduction="none").view(b, t).sum(1)
    keep = _target_rows(targets)  # [rows]
    logits = _head(params, h.reshape(b * t, d).index_select(0, keep)[None], cfg)[0]  # [rows, V]
    ce = F.cross_entropy(logits.float(), targets.index_select(0, keep), reduction="none")
    return ce.new_zeros(b).index_add(0, keep // t, ce)  # [B]


def num_params(cfg: LlamaConfig) -> int:
    """Total parameter count, from the abstract tree (no memory).

    Example::

        >>> num_params(LlamaConfig.variant("llama2_7b"))
        6738415616
    """
    return pytree.leaf_count(abstract(cfg)[0])


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) in the PaLM convention: ``6 * N + 12 * L * H * Dh * T``.

    ``N`` counts the weights of every matmul (attention and MLP projections and the output head, tied or not);
    the embedding lookup and norms do no matmul FLOPs. The attention term counts the full ``T x T`` score and
    value matmuls (no causal halving), as PaLM's MFU does.

    Example::

        >>> flops_per_token(LlamaConfig.variant("llama2_7b"), 4096) / 1e9   # ~ 6 * 6.5e9 + attention
        ... # doctest: +ELLIPSIS
        46.0...
    """
    d, h, hkv, dh = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = d * h * dh + 2 * d * hkv * dh + h * dh * d  # q, k, v, o
    mlp = 3 * d * cfg.mlp_dim  # gate, up, down
    n_matmul = cfg.num_layers * (attn + mlp) + d * cfg.vocab_size
    return 6 * n_matmul + 12 * cfg.num_layers * h * dh * seq_len


# ----------------------------------------------------------------------------------------------------------------
# generation


def _select(
    logits: torch.Tensor, key, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """Next token ``[B]`` from last-position logits ``[B, V]``: argmax, or a sample via the Gumbel-max trick."""
    logits = logits.float()
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = torch.where(logits < kth, neg_inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the top one always stays).
        drop_sorted = probs.cumsum(-1) - probs > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = torch.where(drop, neg_inf, logits)
    u = random.uniform(key, logits.shape, device=logits.device)  # open interval (0, 1): log(log) is finite
    return (logits - torch.log(-torch.log(u))).argmax(-1)


def check_sampling(
    max_new_tokens: Any,
    key: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    on_token: Callable[[torch.Tensor], Any] | None = None,
    stop_tokens: Sequence[int] = (),
    pad_token: int = 0,
) -> None:
    """Check the decoding arguments of ``generate`` (llama and the VLMs); raises ``ValueError`` naming the bad one.
    Takes every argument of :func:`decode_loop` after ``first_logits``, so a dict of them can be passed whole."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"generate: temperature must be a number >= 0, got {temperature!r}")
    if temperature > 0 and key is None:
        raise ValueError(
            "generate: sampling (temperature > 0) needs an explicit PRNG key (key=random.key(seed))"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")
    if on_token is not None and not callable(on_token):
        raise ValueError(f"generate: on_token must be a callable or None, got {on_token!r}")
    if isinstance(pad_token, bool) or not isinstance(pad_token, int):
        raise ValueError(f"generate: pad_token must be an int, got {pad_token!r}")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_tokens):
        raise ValueError(f"generate: stop_tokens must be ints, got {stop_tokens!r}")


def decode_loop(
    step: Callable[[torch.Tensor], torch.Tensor],
    first_logits: torch.Tensor,
    *,
    max_new_tokens: int,
    key: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    pad_token: int = 0,
    on_token: Callable[[torch.Tensor], Any] | None = None,
) -> torch.Tensor:
    """The decoding loop shared by :func:`generate` and the VLMs' ``generate``: returns the new tokens ``[B, n]``
    (int64), ``n <= max_new_tokens``.

    ``first_logits: [B, T, V]`` are the prefill logits (only the last position is read) and
    ``step(next_tokens: LongTensor[B, 1]) -> logits [B, 1, V]`` runs one cached decoding step. Each token is
    chosen by :func:`_select` (``temperature=0``: argmax, bit-identical to greedy decoding; otherwise a sample
    after optional ``top_k`` / ``top_p`` filtering, with key ``random.fold_in(key, step)``). A row that emits a
    token of ``stop_tokens`` is finished: its later tokens are ``pad_token``; the loop ends once every row is
    finished (HF ``generate`` semantics). ``on_token(new_tokens: LongTensor[B])`` is called once per step, as soon
    as the step's tokens are chosen and before the next forward pass (finished rows get ``pad_token``), so the
    concatenation of its arguments along dim 1 is the returned tensor.
    """
    check_sampling(max_new_tokens, key, temperature, top_k, top_p, on_token)
    b = first_logits.shape[0]
    device = first_logits.device
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    logits, out = first_logits, []
    for i in range(max_new_tokens):
        step_key = random.fold_in(key, i) if temperature > 0 else None
        nxt = _select(logits[:, -1], step_key, temperature, top_k, top_p).long()  # [B]
        nxt = torch.where(done, torch.full_like(nxt, pad_token), nxt)
        out.append(nxt[:, None])
        if on_token is not None:
            on_token(nxt)
        done = done | torch.isin(nxt, stop)
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        logits = step(nxt[:, None])
    return torch.cat(out, dim=1)


def generate(
    params: dict[str, Any],
    cfg: LlamaConfig,
    prompt_tokens: torch.Tensor,
    *,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    pad_token: int = 0,
    on_token: Callable[[torch.Tensor], Any] | None = None,
) -> torch.Tensor:
    """Autoregressive generation with a fixed-size KV cache: ``[B, T] -> [B, T + n]``, ``n <= max_new_tokens``.

    ``attention_mask`` marks left padding of the prompt. ``temperature=0`` is greedy; otherwise tokens are
    sampled (after optional ``top_k`` / ``top_p`` filtering) with keys ``random.fold_in(key, step)``, so the same
    key gives the same text. A row that emits a token of ``stop_tokens`` is finished: its later tokens are
    ``pad_token``; generation ends early once every row is finished (HF ``generate`` semantics).
    ``on_token(new_tokens: LongTensor[B])`` is called once per step as soon as its tokens are chosen (streaming);
    see :func:`decode_loop`.

    Example::

        >>> cfg = LlamaConfig.variant("tiny")
        >>> params = init(random.key(0), cfg)
        >>> prompt = torch.tensor([[0, 7, 8], [4, 5, 6]])
        >>> out = generate(params, cfg, prompt, max_new_tokens=4, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        ...                key=random.key(1), temperature=0.8, top_k=20)
        >>> out.shape
        torch.Size([2, 7])
    """
    _check_int_bt(prompt_tokens, "prompt_tokens")
    check_sampling(max_new_tokens, key, temperature, top_k, top_p, on_token)
    b, t = prompt_tokens.shape
    if t + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"generate: prompt length {t} + max_new_tokens {max_new_tokens} exceeds max_seq_len={cfg.max_seq_len}"
        )

    weight = params["embed"]["weight"]
    device = prompt_tokens.device
    with torch.no_grad():
        cache = init_cache(cfg, b, t + max_new_tokens, dtype=weight.dtype, device=device)
        logits, cache = decode(params, cfg, prompt_tokens, cache, attention_mask=attention_mask)
        state = {"cache": cache}

        def step(nxt: torch.Tensor) -> torch.Tensor:
            out, state["cache"] = decode(params, cfg, nxt.to(prompt_tokens.dtype), state["cache"])
            return out

        new = decode_loop(
            step,
            logits,
            max_new_tokens=max_new_tokens,
            key=key,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_tokens=stop_tokens,
            pad_token=pad_token,
            on_token=on_token,
        )
    return torch.cat([prompt_tokens, new.to(prompt_tokens.dtype)], dim=1)
