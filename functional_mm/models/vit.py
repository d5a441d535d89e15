"""Vision transformers as pure functions: CLIP ViT, SigLIP ViT and InternViT (one pre-norm ViT with flags), plus
the transformer block the Qwen2-VL vision tower reuses.

The three families share the architecture ``patch conv -> (+ CLS) -> + position table -> L x [norm -> attention ->
norm -> MLP] -> (norm)``; they differ in flags (:class:`ViTConfig`):

- CLIP: no patch bias, a CLS token, a ``pre_norm`` before the blocks, QuickGELU, and a ``post_norm`` applied only
  to the pooled CLS vector (``post_norm="cls"``, ``pool="cls"``).
- SigLIP: patch bias, no CLS, tanh-GELU, ``post_norm="all"`` and an optional multi-head attention pooling head
  (``pool="map"``: a learned probe attends over the tokens).
- InternViT: patch bias, a CLS token, layer scale (``ls1``/``ls2`` per block), optional RMSNorm and q/k-norm
  (the 6B tower), no post norm when the checkpoint mean-pools.

Parameter tree (``/``-joined paths; logical axes in brackets)::

    patch_embed/weight [D, C, P, P] ("embed", "channels", None, None), patch_embed/bias [D]
    cls [D] ("embed",)                          (class_token)
    pos_embed [N (+1), D] (None, "embed")
    pre_norm/{scale,bias} [D] ("norm",)         (CLIP)
    layers/{i}/attn_norm, layers/{i}/mlp_norm   LayerNorm (or RMSNorm: scale only)
    layers/{i}/attn/q/weight [D, D] ("heads", "embed"), attn/{k,v}/weight ("kv_heads", "embed"),
    layers/{i}/attn/o/weight ("embed", "heads"), and their biases
    layers/{i}/attn/{q,k}_norm/scale [D] ("heads",)      (qk_norm)
    layers/{i}/ls1, ls2 [D] ("norm",)           (layer_scale)
    layers/{i}/mlp/fc1/weight [M, D] ("mlp", "embed"), mlp/fc2/weight [D, M] ("embed", "mlp")
    post_norm/{scale,bias}                      (post_norm != "none")
    head/probe [D], head/attn/{q,k,v,o}, head/norm, head/mlp/{fc1,fc2}   (pool == "map")

Hidden states use the Hugging Face indexing: ``hidden_states(...)[0]`` is the embedding output (after
``pre_norm``), ``[i]`` the output of block ``i``; negative indices count from the end (``-1`` = last block, before
any post norm). LLaVA takes ``-2``.

Example::

    >>> import torch
    >>> from functional_mm import random
    >>> from functional_mm.models import vit
    >>> cfg = vit.ViTConfig.variant("clip_tiny")
    >>> params = vit.init(random.key(0), cfg)
    >>> pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    >>> out = vit.apply(params, cfg, pixels)
    >>> out["last_hidden_state"].shape, out["pooled"].shape     # [B, 1 + N, D], [B, D]
    (torch.Size([2, 17, 32]), torch.Size([2, 32]))
    >>> vit.hidden_states(params, cfg, pixels, [-2])[0].shape   # LLaVA's feature layer
    torch.Size([2, 17, 32])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from functional_mm import autodiff, nn, parallelism, pytree, random
from functional_mm.parallelism import constrain

__all__ = [
    "ViTConfig",
    "VARIANTS",
    "BlockSpec",
    "init_block",
    "block",
    "init_boxed",
    "init",
    "abstract",
    "logical_axes",
    "default_rules",
    "check_layout",
    "activation_names",
    "embed",
    "hidden_states",
    "apply",
    "num_params",
]

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_NORMS = ("layer", "rms")
_POST_NORMS = ("none", "cls", "all")
_POOLS = ("none", "cls", "map")


def check_positive_int(owner: str, name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``owner.name`` unless ``value`` is a positive int (bools are not ints here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


def check_number(owner: str, name: str, value: Any, *, positive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (positive and not value > 0) or (not positive and value < 0):
        kind = "a positive number" if positive else "a number >= 0"
        raise ValueError(f"{owner}.{name} must be {kind}, got {value!r}")


def from_dict(cls, d: Mapping[str, Any]):
    """``cls(**d)`` for a config dataclass, rejecting unknown fields (a typo must not become a default)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(
            f"{cls.__name__}.from_dict: unknown field(s) {unknown}; known fields: {sorted(known)}"
        )
    return cls(**dict(d))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyperparameters of a CLIP / SigLIP / InternViT vision tower.

    ``family`` (``"clip"``, ``"siglip"``, ``"internvit"``) only selects the Hugging Face naming in the adapters;
    the architecture follows the flags. ``act`` is a name from :data:`functional_mm.nn.mlp.ACTIVATIONS`.
    ``layer_scale`` is the initial value of the per-block scales (``None``: no layer scale).

    Example::

        >>> cfg = ViTConfig.variant("clip_vit_l14_336")
        >>> cfg.num_patches, cfg.seq_len, cfg.head_dim
        (576, 577, 64)
        >>> ViTConfig.variant("clip_tiny", num_layers=1).num_layers
        1
    """

    family: str
    image_size: int
    patch_size: int
    dim: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    num_channels: int = 3
    act: str = "quick_gelu"
    norm: str = "layer"
    norm_eps: float = 1e-5
    class_token: bool = True
    patch_bias: bool = False
    qkv_bias: bool = True
    qk_norm: bool = False
    layer_scale: float | None = None
    pre_norm: bool = False
    post_norm: str = "cls"
    pool: str = "cls"
    init_std: float = 0.02
    dtype: str = "float32"

    def __post_init__(self):
        owner = "ViTConfig"
        if self.family not in ("clip", "siglip", "internvit"):
            raise ValueError(f"ViTConfig.family={self.family!r} is not one of 'clip', 'siglip', 'internvit'")
        for name in ("image_size", "patch_size", "dim", "num_layers", "num_heads", "mlp_dim", "num_channels"):
            check_positive_int(owner, name, getattr(self, name))
        if self.patch_size > self.image_size:
            raise ValueError(f"ViTConfig.patch_size={self.patch_size} exceeds image_size={self.image_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"ViTConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        nn.mlp.activation(self.act)  # raises, naming the known activations
        if self.norm not in _NORMS:
            raise ValueError(f"ViTConfig.norm={self.norm!r} is not one of {_NORMS}")
        if self.post_norm not in _POST_NORMS:
            raise ValueError(f"ViTConfig.post_norm={self.post_norm!r} is not one of {_POST_NORMS}")
        if self.pool not in _POOLS:
            raise ValueError(f"ViTConfig.pool={self.pool!r} is not one of {_POOLS}")
        # CLIP normalises only the pooled CLS vector; both halves of that contract must hold together.
        if (self.pool == "cls") != (self.post_norm == "cls"):
            raise ValueError(
                f"ViTConfig.pool={self.pool!r} / post_norm={self.post_norm!r}: CLS pooling goes with "
                "post_norm='cls' (CLIP) and post_norm='cls' only with pool='cls'"
            )
        if self.pool == "cls" and not self.class_token:
            raise ValueError("ViTConfig.pool='cls' needs class_token=True")
        check_number(owner, "norm_eps", self.norm_eps)
        check_number(owner, "init_std", self.init_std, positive=False)
        if self.layer_scale is not None:
            check_number(owner, "layer_scale", self.layer_scale, positive=False)
        for name in ("class_token", "patch_bias", "qkv_bias", "qk_norm", "pre_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ViTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ViTConfig.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side (the conv drops a remainder, e.g. 384 // 14 = 27 for SigLIP-so400m)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def seq_len(self) -> int:
        """Tokens per image: the patches plus the CLS token when there is one."""
        return self.num_patches + int(self.class_token)

    @property
    def block_spec(self) -> BlockSpec:
        return BlockSpec(self.num_heads, self.head_dim, self.act, self.norm, self.norm_eps)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ViTConfig:
        """Build from a plain dict, rejecting unknown fields.

        Example::

            >>> ViTConfig.from_dict({"family": "clip", "image_size": 8, "patch_size": 4, "dim": 8,
            ...                      "num_layers": 1, "num_heads": 2, "mlp_dim": 16, "sise": 3})
            Traceback (most recent call last):
            ...
            ValueError: ViTConfig.from_dict: unknown field(s) ['sise']; ...
        """
        return from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> ViTConfig:
        """A named size from :data:`VARIANTS`, with field overrides."""
        if name not in VARIANTS:
            raise ValueError(f"unknown ViT variant {name!r}; known: {sorted(VARIANTS)}")
        return cls.from_dict({**VARIANTS[name], **overrides})


_CLIP = dict(
    family="clip",
    act="quick_gelu",
    norm_eps=1e-5,
    class_token=True,
    patch_bias=False,
    pre_norm=True,
    post_norm="cls",
    pool="cls",
)
_SIGLIP = dict(
    family="siglip",
    act="gelu_tanh",
    norm_eps=1e-6,
    class_token=False,
    patch_bias=True,
    post_norm="all",
    pool="map",
)
_INTERNVIT = dict(
    family="internvit",
    act="gelu",
    norm_eps=1e-6,
    class_token=True,
    patch_bias=True,
    layer_scale=0.1,
    post_norm="none",
    pool="none",
)

# Published hyperparameters (the checkpoints' config.json).
VARIANTS: dict[str, dict[str, Any]] = {
    "clip_tiny": dict(_CLIP, image_size=16, patch_size=4, dim=32, num_layers=2, num_heads=4, mlp_dim=64),
    "siglip_tiny": dict(_SIGLIP, image_size=16, patch_size=4, dim=32, num_layers=2, num_heads=4, mlp_dim=64),
    "internvit_tiny": dict(
        _INTERNVIT, image_size=16, patch_size=2, dim=32, num_layers=2, num_heads=4, mlp_dim=64
    ),
    # openai/clip-vit-large-patch14-336: LLaVA 1.5's tower.
    "clip_vit_l14_336": dict(
        _CLIP, image_size=336, patch_size=14, dim=1024, num_layers=24, num_heads=16, mlp_dim=4096
    ),
    # google/siglip-so400m-patch14-384.
    "siglip_so400m_14_384": dict(
        _SIGLIP, image_size=384, patch_size=14, dim=1152, num_layers=27, num_heads=16, mlp_dim=4304
    ),
    # OpenGVLab/InternViT-300M-448px (InternVL2 2B / 8B).
    "internvit_300m_448": dict(
        _INTERNVIT,
        image_size=448,
        patch_size=14,
        dim=1024,
        num_layers=24,
        num_heads=16,
        mlp_dim=4096,
        qkv_bias=True,
    ),
    # OpenGVLab/InternViT-6B-448px-V1-5 (InternVL2-Llama3-76B): 45 blocks, RMSNorm, q/k RMSNorm, no qkv bias.
    "internvit_6b_448_v1_5": dict(
        _INTERNVIT,
        image_size=448,
        patch_size=14,
        dim=3200,
        num_layers=45,
        num_heads=25,
        mlp_dim=12800,
        norm="rms",
        qkv_bias=False,
        qk_norm=True,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# the block


class BlockSpec(NamedTuple):
    """What a pre-norm ViT block needs besides its weights (shared with the Qwen2-VL tower)."""

    num_heads: int
    head_dim: int
    act: str
    norm: str  # "layer" or "rms"
    norm_eps: float


def activation_names(
    batch: str | None = "act_batch",
) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
    """Logical names of a tower's ``[B, T, D]`` activations: ``(residual, block_in)``.

    As in the Llama decoder, the residual stream between blocks (and the norms) may be split along the
    sequence (``act_norm_seq``: over ``tp`` with sequence parallelism), while attention and the MLP take the
    whole sequence (``act_seq``) and split heads / hidden units instead. ``batch`` names dim 0: ``act_batch``
    (split over the data axes) for a batch of images, ``None`` (whole on every rank) for a packed sequence
    whose dim 0 is not a batch of examples (the Qwen2-VL tower packs all images into one row).

    Example::

        >>> activation_names(None)
        ((None, 'act_norm_seq', 'act_embed'), (None, 'act_seq', 'act_embed'))
    """
    return (batch, "act_norm_seq", "act_embed"), (batch, "act_seq", "act_embed")


def _init_norm(norm: str, dim: int, dtype, axes=("norm",)):
    if norm == "rms":
        return nn.norms.init_rms_norm(dim, axes=axes, dtype=dtype)
    return nn.norms.init_layer_norm(dim, axes=axes, dtype=dtype)


def _norm(norm: str, p, x: torch.Tensor, eps: float) -> torch.Tensor:
    return nn.norms.rms_norm(p, x, eps) if norm == "rms" else nn.norms.layer_norm(p, x, eps)


def init_block(
    key: torch.Tensor,
    dim: int,
    mlp_dim: int,
    spec: BlockSpec,
    *,
    qkv_bias: bool = True,
    qk_norm: bool = False,
    layer_scale: float | None = None,
    std: float = 0.02,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Boxed parameters of one block (see the module docstring for the tree)."""
    k_attn, k_mlp = random.split(key)
    attn = nn.attention.init(
        k_attn,
        dim,
        spec.num_heads,
        head_dim=spec.head_dim,
        qkv_bias=qkv_bias,
        out_bias=True,
        std=std,
        dtype=dtype,
    )
    if qk_norm:  # InternViT-6B: RMSNorm over all heads at once, before the split into heads
        attn["q_norm"] = nn.norms.init_rms_norm(dim, axes=("heads",), dtype=dtype)
        attn["k_norm"] = nn.norms.init_rms_norm(dim, axes=("heads",), dtype=dtype)
    p = {
        "attn_norm": _init_norm(spec.norm, dim, dtype),
        "attn": attn,
        "mlp_norm": _init_norm(spec.norm, dim, dtype),
        "mlp": nn.mlp.init_mlp(k_mlp, dim, mlp_dim, std=std, dtype=dtype),
    }
    if layer_scale is not None:
        p["ls1"] = nn.param(torch.full((dim,), float(layer_scale), dtype=dtype), ("norm",))
        p["ls2"] = nn.param(torch.full((dim,), float(layer_scale), dtype=dtype), ("norm",))
    return p


def _attention(p, x: torch.Tensor, spec: BlockSpec, cos_sin=None, mask=None) -> torch.Tensor:
    """Bidirectional self-attention ``[B, T, D] -> [B, T, D]`` with optional q/k-norm, rotary tables and mask."""
    b, t, _ = x.shape
    q, k, v = (nn.linear.apply(p[n], x) for n in ("q", "k", "v"))  # [B, T, H * Dh]
    if "q_norm" in p:
        q, k = nn.norms.rms_norm(p["q_norm"], q), nn.norms.rms_norm(p["k_norm"], k)
    q, k, v = (
        y.view(b, t, spec.num_heads, spec.head_dim).transpose(1, 2) for y in (q, k, v)
    )  # [B, H, T, Dh]
    if cos_sin is not None:
        q, k = nn.rope.apply(q, *cos_sin), nn.rope.apply(k, *cos_sin)
    out = nn.attention.dot_product_attention(q, k, v, mask=mask)  # [B, H, T, Dh]
    return nn.linear.apply(p["o"], out.transpose(1, 2).reshape(b, t, -1))


@parallelism.local_rows  # FSDP / DP: each rank's own rows as plain tensors
def block(
    p, x: torch.Tensor, spec: BlockSpec, *, cos_sin=None, mask=None, batch: str | None = "act_batch"
) -> torch.Tensor:
    """One pre-norm block ``x: [B, T, D] -> [B, T, D]``. Layer scale and q/k-norm apply when their weights are
    present; ``cos_sin`` (``[B, T, Dh]`` each) adds rotary embeddings, ``mask`` (bool ``[B, 1, T, T]``) limits
    attention (Qwen2-VL keeps each image to itself).

    On a mesh (:func:`functional_mm.parallelism.use_mesh`) the weights are gathered over the data axes at use
    and the activations pinned to :func:`activation_names` (``batch`` names dim 0): Megatron column/row
    parallel attention and MLP, the residual stream split along the sequence under sequence parallelism.
    ``cos_sin`` and ``mask`` must then be placed too (whole along the sequence). Without a mesh both are
    no-ops."""
    residual, block_in = activation_names(batch)
    p = parallelism.use_params(p)  # this block's weights, gathered over the data axes (no-op unsharded)
    x = constrain(x, residual)
    h = _attention(
        p["attn"],
        constrain(_norm(spec.norm, p["attn_norm"], x, spec.norm_eps), block_in),
        spec,
        cos_sin,
        mask,
    )
    h = constrain(h, residual)  # row-parallel output: reduce-scatter (sequence parallel) or all-reduce
    x = x + (p["ls1"] * h if "ls1" in p else h)
    h = nn.mlp.mlp(
        p["mlp"], constrain(_norm(spec.norm, p["mlp_norm"], x, spec.norm_eps), block_in), act=spec.act
    )
    h = constrain(h, residual)
    return x + (p["ls2"] * h if "ls2" in p else h)


# ----------------------------------------------------------------------------------------------------------------
# init


def init_boxed(key: torch.Tensor, cfg: ViTConfig) -> dict[str, Any]:
    """The parameter tree with every leaf boxed as ``nn.Param(value, logical_axes)``.

    Example::

        >>> boxed = init_boxed(random.key(0), ViTConfig.variant("siglip_tiny"))
        >>> boxed["layers"][0]["attn"]["q"]["weight"].axes, "cls" in boxed, "head" in boxed
        (('heads', 'embed'), False, True)
    """
    dtype, d, std = cfg.torch_dtype, cfg.dim, cfg.init_std
    k_patch, k_cls, k_pos, k_layers, k_head = random.split(key, 5)
    tree: dict[str, Any] = {
        "patch_embed": nn.patch_embed.init(
            k_patch, cfg.num_channels, d, (cfg.patch_size, cfg.patch_size), bias=cfg.patch_bias, dtype=dtype
        ),
        "pos_embed": nn.param(random.normal(k_pos, (cfg.seq_len, d), dtype) * std, (None, "embed")),
        "layers": [
            init_block(
                k,
                d,
                cfg.mlp_dim,
                cfg.block_spec,
                qkv_bias=cfg.qkv_bias,
                qk_norm=cfg.qk_norm,
                layer_scale=cfg.layer_scale,
                std=std,
                dtype=dtype,
            )
            for k in random.split(k_layers, cfg.num_layers)
        ],
    }
    if cfg.class_token:
        tree["cls"] = nn.param(random.normal(k_cls, (d,), dtype) * std, ("embed",))
    if cfg.pre_norm:
        tree["pre_norm"] = _init_norm(cfg.norm, d, dtype)
    if cfg.post_norm != "none":
        tree["post_norm"] = _init_norm(cfg.norm, d, dtype)
    if cfg.pool == "map":
        k_probe, k_attn, k_mlp = random.split(k_head, 3)
        tree["head"] = {
            "probe": nn.param(random.normal(k_probe, (d,), dtype) * std, ("embed",)),
            "attn": nn.attention.init(
                k_attn, d, cfg.num_heads, qkv_bias=True, out_bias=True, std=std, dtype=dtype
            ),
            "norm": _init_norm(cfg.norm, d, dtype),
            "mlp": nn.mlp.init_mlp(k_mlp, d, cfg.mlp_dim, std=std, dtype=dtype),
        }
    return tree


def init(key: torch.Tensor, cfg: ViTConfig) -> dict[str, Any]:
    """Plain parameter pytree (tensors only)."""
    return nn.unbox(init_boxed(key, cfg))[0]


def abstract(cfg: ViTConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shapes, axes)`` on the meta device (no memory)."""
    return nn.abstract(init_boxed, random.key(0), cfg)


def logical_axes(cfg: ViTConfig) -> dict[str, Any]:
    return abstract(cfg)[1]


def default_rules(*, sequence_parallel: bool = True) -> list[tuple[str, Any]]:
    """Logical-axis rules for a vision tower on a ``dp`` / ``fsdp`` / ``tp`` mesh: Megatron column/row split of
    heads and MLP over ``tp``, weights split along ``embed`` over ``fsdp``; the patch-conv input channels (3)
    stay whole. Images are split over ``dp`` x ``fsdp``; with ``sequence_parallel`` the residual stream between
    blocks is split along the tokens over ``tp`` (the activation names of :func:`activation_names`).

    Example::

        >>> from functional_mm.parallelism import logical_to_spec
        >>> logical_to_spec(("embed", "channels", None, None), default_rules(), {"fsdp": 2, "tp": 2})
        ('fsdp', None, None, None)
        >>> logical_to_spec(activation_names()[0], default_rules(), {"fsdp": 2, "tp": 2})
        ('fsdp', 'tp', None)
    """
    return [
        ("heads", "tp"),
        ("kv_heads", "tp"),
        ("mlp", "tp"),
        ("vocab", "tp"),
        ("embed", "fsdp"),
        ("norm", "fsdp"),
        ("channels", None),
        ("act_batch", ("dp", "fsdp")),
        ("act_seq", None),
        ("act_norm_seq", "tp" if sequence_parallel else None),
        ("act_embed", None),
    ]


def check_layout(cfg: Any, mesh: Any, rules: Sequence[tuple[str, Any]], what: str = "ViT") -> None:
    """Fail (before any collective) when the layout would cut through an attention head of a tower with
    ``cfg.num_heads`` heads (a :class:`ViTConfig` or the Qwen2-VL vision config): the mesh axes that split the
    ``heads`` / ``kv_heads`` dims at compute time (all but the data axes, which are gathered at use) must
    divide the head count. ``mesh`` is a ``DeviceMesh`` or a ``{axis: size}`` dict.

    Example::

        >>> check_layout(ViTConfig.variant("clip_tiny"), {"tp": 8}, default_rules())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ViT layout: num_heads=4 is not divisible by the mesh axes ('tp',) of size 8 ...
    """
    from functional_mm.parallelism._rules import mesh_sizes

    sizes = mesh_sizes(mesh)
    for name in ("heads", "kv_heads"):
        entry = parallelism.logical_to_spec((name,), rules, mesh)[0]
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        axes = tuple(a for a in axes if a not in parallelism.DATA_AXES)
        n = 1
        for a in axes:
            n *= sizes[a]
        if cfg.num_heads % n:
            raise ValueError(
                f"{what} layout: num_heads={cfg.num_heads} is not divisible by the mesh axes {axes} of size {n} "
                f"that split the {name!r} dim (a head would be cut in two); change the mesh or the rules"
            )


# ----------------------------------------------------------------------------------------------------------------
# forward


def embed(params: dict[str, Any], cfg: ViTConfig, pixel_values: torch.Tensor) -> torch.Tensor:
    """``pixel_values: [B, C, H, W] -> [B, T, D]``: patches (+ CLS) + position table (+ CLIP's pre norm).

    Example::

        >>> cfg = ViTConfig.variant("internvit_tiny")
        >>> embed(init(random.key(0), cfg), cfg, torch.zeros(1, 3, 16, 16)).shape   # 8 x 8 patches + CLS
        torch.Size([1, 65, 32])
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        got = (
            list(pixel_values.shape)
            if isinstance(pixel_values, torch.Tensor)
            else type(pixel_values).__name__
        )
        raise ValueError(f"pixel_values must be a float tensor [B, C, H, W], got {got}")
    _, c, h, w = pixel_values.shape
    if (c, h, w) != (cfg.num_channels, cfg.image_size, cfg.image_size):
        # Position tables are learned for one grid; interpolating them is a preprocessing decision, not ours.
        raise ValueError(
            f"pixel_values must be [B, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}], got {list(pixel_values.shape)}"
        )
    residual, block_in = activation_names()
    # the weights gathered over the data axes (no-op unsharded), the images split like the batch
    patch_embed = parallelism.use_params(params["patch_embed"])
    pixels = constrain(pixel_values.to(patch_embed["weight"].dtype), (block_in[0], None, None, None))
    x = nn.patch_embed.apply(patch_embed, pixels)  # [B, N, D]
    x = constrain(x, block_in)
    if cfg.class_token:
        cls = parallelism.use_param(params["cls"]).expand(x.shape[0], 1, -1)
        x = torch.cat([constrain(cls, block_in), x], dim=1)  # [B, 1 + N, D]
    x = x + parallelism.use_param(params["pos_embed"])
    if cfg.pre_norm:
        x = _norm(cfg.norm, parallelism.use_params(params["pre_norm"]), x, cfg.norm_eps)
    return constrain(x, residual)


def _layer_index(i: int, num_layers: int) -> int:
    j = i + num_layers + 1 if i < 0 else i
    if not 0 <= j <= num_layers:
        raise ValueError(
            f"hidden state index {i} is out of range for {num_layers} layers (0..{num_layers}, or negative)"
        )
    return j


def hidden_states(
    params: dict[str, Any],
    cfg: ViTConfig,
    pixel_values: torch.Tensor,
    layers: Sequence[int],
    *,
    remat_policy: Any = None,
) -> list[torch.Tensor]:
    """The hidden states ``[B, T, D]`` at the (HF-indexed) ``layers``, running only the blocks they need.
    ``remat_policy`` checkpoints each block (:func:`functional_mm.autodiff.remat`).

    Example::

        >>> cfg = ViTConfig.variant("clip_tiny")
        >>> h0, h2 = hidden_states(init(random.key(0), cfg), cfg, torch.zeros(1, 3, 16, 16), [0, -1])
    """
    wanted = [_layer_index(i, cfg.num_layers) for i in layers]
    ctx = parallelism.current()
    if ctx is not None:
        check_layout(cfg, *ctx)
    x = embed(params, cfg, pixel_values)
    states = {0: x}
    run = autodiff.remat(block, remat_policy)
    for i in range(max(wanted, default=0)):
        x = run(params["layers"][i], x, cfg.block_spec)
        states[i + 1] = x
    block_in = activation_names()[1]
    return [constrain(states[j], block_in) for j in wanted]  # whole along the tokens (gathered under tp)


def _map_head(p, x: torch.Tensor, cfg: ViTConfig) -> torch.Tensor:
    """SigLIP's attention pooling: a learned probe attends over ``x: [B, T, D]`` -> ``[B, D]``."""
    b, t, _ = x.shape
    h, dh = cfg.num_heads, cfg.head_dim
    names = activation_names()[1]
    p = parallelism.use_params(p)
    probe = constrain(p["probe"].expand(b, 1, -1), names)
    q = nn.linear.apply(p["attn"]["q"], probe).view(b, 1, h, dh).transpose(1, 2)
    k = nn.linear.apply(p["attn"]["k"], x).view(b, t, h, dh).transpose(1, 2)
    v = nn.linear.apply(p["attn"]["v"], x).view(b, t, h, dh).transpose(1, 2)
    y = nn.attention.dot_product_attention(q, k, v)  # [B, H, 1, Dh]
    y = constrain(nn.linear.apply(p["attn"]["o"], y.transpose(1, 2).reshape(b, 1, -1)), names)  # [B, 1, D]
    y = y + constrain(nn.mlp.mlp(p["mlp"], _norm(cfg.norm, p["norm"], y, cfg.norm_eps), act=cfg.act), names)
    return y[:, 0]


def apply(
    params: dict[str, Any], cfg: ViTConfig, pixel_values: torch.Tensor, *, remat_policy: Any = None
) -> dict[str, torch.Tensor | None]:
    """Run the tower: ``{"last_hidden_state": [B, T, D], "pooled": [B, D] or None}``, as Hugging Face's
    ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``InternVLVisionModel`` return them (``last_hidden_state``
    includes the post norm only for ``post_norm="all"``; CLIP normalises just the pooled CLS vector).

    Example::

        >>> cfg = ViTConfig.variant("siglip_tiny")
        >>> out = apply(init(random.key(0), cfg), cfg, torch.zeros(2, 3, 16, 16))
        >>> out["last_hidden_state"].shape, out["pooled"].shape
        (torch.Size([2, 16, 32]), torch.Size([2, 32]))
    """
    x = hidden_states(params, cfg, pixel_values, [-1], remat_policy=remat_policy)[0]
    pooled = None
    post_norm = parallelism.use_params(params.get("post_norm"))
    if cfg.post_norm == "all":
        x = _norm(cfg.norm, post_norm, x, cfg.norm_eps)
    if cfg.pool == "cls":
        pooled = _norm(cfg.norm, post_norm, x[:, 0], cfg.norm_eps)
    elif cfg.pool == "map":
        pooled = _map_head(params["head"], x, cfg)
    return {"last_hidden_state": x, "pooled": pooled}


def num_params(cfg: ViTConfig) -> int:
    """Total parameter count, from the abstract tree (no memory).

    Example::

        >>> num_params(ViTConfig.variant("clip_vit_l14_336"))   # the CLIP ViT-L/14-336 vision tower
        303507456
    """
    return pytree.leaf_count(abstract(cfg)[0])
