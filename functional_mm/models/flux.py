"""Flux.1 (Black Forest Labs) rectified-flow transformer as pure functions.

``num_layers`` double-stream blocks (MMDiT-style: separate image/text weights, joint attention, text tokens
*first*) are followed by ``num_single_layers`` single-stream blocks over the concatenated sequence, where
attention and a parallel MLP share one input modulation and one output projection. Queries and keys are
RMS-normalised and rotated by a 3-axis RoPE whose positions are ``ids: [T, 3]`` = (index, row, col); the
axes own ``axes_dims_rope`` channels of each head. Flux-dev is guidance-distilled: the guidance scale is
embedded like a timestep (``guidance_embeds``).

Latents are *packed*: a VAE latent ``[B, C, H, W]`` becomes ``[B, (H/2)(W/2), 4C]`` (2x2 patches folded into
channels, :func:`pack_latents`), with :func:`image_ids` giving each token its (0, row, col). ``timestep`` is
``sigma`` in [0, 1] and ``guidance`` the raw guidance scale (e.g. 3.5): the model multiplies both by 1000
itself (diffusers' convention for Flux, unlike SD3 whose transformer takes 0..1000).

Parameter tree (``D = num_heads * head_dim``; axes name ``(in, out)`` of ``[out, in]`` weights)::

    x_embed [D, C_in], context_embed [D, J]        (None, "embed")
    time_embed/, guidance_embed/, text_embed/      {fc1: (None, "mlp"), fc2: ("mlp", "embed")}
    double/{i}/x_mod, c_mod [6D, D]                ("embed", "mlp")   adaLN-Zero
    double/{i}/attn, c_attn/{q,k,v,o}              q/k/v: ("embed", "heads"), o: ("heads", "embed")
    double/{i}/attn, c_attn/{q_norm,k_norm}/scale  ("norm",)
    double/{i}/mlp, c_mlp/{fc1,fc2}                GELU(tanh), hidden 4D
    single/{i}/mod [3D, D]                         shift, scale, gate
    single/{i}/attn/{q,k,v,q_norm,k_norm}          (no output projection: proj_out takes its place)
    single/{i}/mlp_in [4D, D]                      ("embed", "mlp")
    single/{i}/proj_out [D, D + 4D]                ("mlp", "embed")  over concat(attention, mlp)
    final_mod [2D, D]                              scale, shift
    proj_out [p*p*C_out, D]                        ("embed", None)

Example::

    >>> import torch
    >>> from functional_mm import random
    >>> from functional_mm.models import flux
    >>> cfg = flux.FluxConfig.variant("tiny")
    >>> params = flux.init(random.key(0), cfg)
    >>> latents = torch.randn(2, 4, 8, 8)                              # [B, C, H, W] from the VAE
    >>> x = flux.pack_latents(latents)                                 # [B, 16, 16]
    >>> ctx, pooled = torch.randn(2, 5, cfg.joint_attention_dim), torch.randn(2, cfg.pooled_projection_dim)
    >>> v = flux.apply(params, cfg, x, torch.tensor([1.0, 0.5]), ctx, pooled, flux.image_ids(4, 4),
    ...                flux.text_ids(5), guidance=torch.tensor([3.5, 3.5]))
    >>> flux.unpack_latents(v, 8, 8).shape
    torch.Size([2, 4, 8, 8])
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import einops
import torch
import torch.nn.functional as F

from functional_mm import autodiff, nn, parallelism, pytree, random
from functional_mm.models.mmdit import _attention, _check_int, _embed_mlp, _heads, _merge, _mlp
from functional_mm.models.vit import from_dict as _from_dict
from functional_mm.nn.modulation import layer_norm, modulate
from functional_mm.parallelism import constrain

__all__ = [
    "FluxConfig",
    "VARIANTS",
    "init_boxed",
    "init",
    "abstract",
    "logical_axes",
    "num_params",
    "pack_latents",
    "unpack_latents",
    "image_ids",
    "text_ids",
    "apply",
]

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
TIMESTEP_DIM = 256
MLP_RATIO = 4
EPS = 1e-6
ROPE_THETA = 10000.0
_RESIDUAL = ("act_batch", "act_seq", "act_embed")


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Hyperparameters of a Flux transformer (the fields of diffusers' ``FluxTransformer2DModel`` config).

    ``axes_dims_rope`` splits ``head_dim`` between the (index, row, col) position axes and must sum to it.

    Example::

        >>> FluxConfig.variant("flux_dev").guidance_embeds
        True
        >>> FluxConfig.variant("tiny", axes_dims_rope=(2, 2, 2))
        Traceback (most recent call last):
        ...
        ValueError: FluxConfig.axes_dims_rope=(2, 2, 2) must be even entries summing to head_dim=16
    """

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    num_heads: int = 24
    head_dim: int = 128
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    dtype: str = "float32"

    def __post_init__(self):
        for name in (
            "patch_size",
            "in_channels",
            "num_heads",
            "head_dim",
            "joint_attention_dim",
            "pooled_projection_dim",
        ):
            _check_int("FluxConfig", name, getattr(self, name))
        _check_int("FluxConfig", "num_layers", self.num_layers, 0)
        _check_int("FluxConfig", "num_single_layers", self.num_single_layers, 0)
        if self.num_layers + self.num_single_layers == 0:
            raise ValueError("FluxConfig.num_layers + num_single_layers must be >= 1")
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        _check_int("FluxConfig", "out_channels", self.out_channels)
        if not isinstance(self.guidance_embeds, bool):
            raise ValueError(f"FluxConfig.guidance_embeds must be a bool, got {self.guidance_embeds!r}")
        axes = self.axes_dims_rope
        if (
            not isinstance(axes, (tuple, list))
            or not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 and a % 2 == 0 for a in axes)
            or sum(axes) != self.head_dim
        ):
            raise ValueError(
                f"FluxConfig.axes_dims_rope={axes!r} must be even entries summing to head_dim={self.head_dim}"
            )
        object.__setattr__(self, "axes_dims_rope", tuple(axes))
        if self.dtype not in DTYPES:
            raise ValueError(f"FluxConfig.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FluxConfig:
        """Build from a plain dict, rejecting unknown fields."""
        d = dict(d)
        if isinstance(d.get("axes_dims_rope"), list):
            d["axes_dims_rope"] = tuple(d["axes_dims_rope"])
        return _from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> FluxConfig:
        """A named size from :data:`VARIANTS`, with field overrides."""
        if name not in VARIANTS:
            raise ValueError(f"unknown Flux variant {name!r}; known: {sorted(VARIANTS)}")
        return cls.from_dict({**VARIANTS[name], **overrides})


_FLUX_1 = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    num_heads=24,
    head_dim=128,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
    dtype="bfloat16",
)
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        num_heads=2,
        head_dim=16,
        joint_attention_dim=24,
        pooled_projection_dim=20,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    # black-forest-labs/FLUX.1-dev: 11.90B parameters, guidance-distilled.
    "flux_dev": dict(_FLUX_1, guidance_embeds=True),
    # black-forest-labs/FLUX.1-schnell: 11.90B parameters, timestep-distilled (no guidance input).
    "flux_schnell": dict(_FLUX_1, guidance_embeds=False),
}


# ----------------------------------------------------------------------------------------------------------------
# init


def init_boxed(key: torch.Tensor, cfg: FluxConfig) -> dict[str, Any]:
    """The parameter tree with every leaf boxed as ``nn.Param(value, logical_axes)``; adaLN modulations and
    the output projection start at zero (adaLN-Zero), everything else LeCun-normal.

    Example::

        >>> boxed = init_boxed(random.key(0), FluxConfig.variant("tiny"))
        >>> boxed["single"][0]["proj_out"]["weight"].axes
        ('embed', 'mlp')
    """
    dtype, d = cfg.torch_dtype, cfg.dim
    ks = random.split(key, 9)
    double = []
    for k in random.split(ks[0], max(cfg.num_layers, 1))[: cfg.num_layers]:
        kx, kc, ka, kca, km, kcm = random.split(k, 6)
        double.append(
            {
                "x_mod": nn.modulation.init(kx, d, d, 6, dtype=dtype),
                "c_mod": nn.modulation.init(kc, d, d, 6, dtype=dtype),
                "attn": _attention(ka, cfg, qk_norm=True),
                "c_attn": _attention(kca, cfg, qk_norm=True),
                "mlp": nn.mlp.init_mlp(km, d, MLP_RATIO * d, dtype=dtype),
                "c_mlp": nn.mlp.init_mlp(kcm, d, MLP_RATIO * d, dtype=dtype),
            }
        )
    single = []
    for k in random.split(ks[1], max(cfg.num_single_layers, 1))[: cfg.num_single_layers]:
        km, ka, ki, ko = random.split(k, 4)
        single.append(
            {
                "mod": nn.modulation.init(km, d, d, 3, dtype=dtype),
                "attn": _attention(ka, cfg, out=False, qk_norm=True),
                "mlp_in": nn.linear.init(ki, d, MLP_RATIO * d, axes=("embed", "mlp"), bias=True, dtype=dtype),
                "proj_out": nn.linear.init(
                    ko, d + MLP_RATIO * d, d, axes=("mlp", "embed"), bias=True, dtype=dtype
                ),
            }
        )
    out_dim = cfg.patch_size**2 * cfg.out_channels
    tree = {
        "x_embed": nn.linear.init(ks[2], cfg.in_channels, d, axes=(None, "embed"), bias=True, dtype=dtype),
        "context_embed": nn.linear.init(
            ks[3], cfg.joint_attention_dim, d, axes=(None, "embed"), bias=True, dtype=dtype
        ),
        "time_embed": _embed_mlp(ks[4], TIMESTEP_DIM, d, dtype),
        "text_embed": _embed_mlp(ks[5], cfg.pooled_projection_dim, d, dtype),
        "double": double,
        "single": single,
        "final_mod": nn.modulation.init(ks[6], d, d, 2, dtype=dtype),
        "proj_out": nn.linear.init(ks[7], d, out_dim, axes=("embed", None), bias=True, std=0.0, dtype=dtype),
    }
    if cfg.guidance_embeds:
        tree["guidance_embed"] = _embed_mlp(ks[8], TIMESTEP_DIM, d, dtype)
    return tree


def init(key: torch.Tensor, cfg: FluxConfig) -> dict[str, Any]:
    """Plain parameter pytree (tensors only)."""
    return nn.unbox(init_boxed(key, cfg))[0]


def abstract(cfg: FluxConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shapes, axes)``: the tree as meta tensors (no memory) and its logical axis names."""
    return nn.abstract(init_boxed, random.key(0), cfg)


def logical_axes(cfg: FluxConfig) -> dict[str, Any]:
    """The tree of logical axis names (computed on the meta device)."""
    return abstract(cfg)[1]


def num_params(cfg: FluxConfig) -> int:
    """Parameter count.

    Example::

        >>> round(num_params(FluxConfig.variant("flux_dev")) / 1e9, 2)
        11.9
    """
    return pytree.leaf_count(abstract(cfg)[0])


# ----------------------------------------------------------------------------------------------------------------
# packing and positions


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/2)(W/2), 4C]``: fold 2x2 patches into channels (diffusers' ``_pack_latents``)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_latents: latent size {h}x{w} must be even (2x2 packing)")
    return einops.rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (H/2)(W/2), 4C] -> [B, C, H, W]`` for latent ``height x width``."""
    b, n, c4 = x.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or c4 % 4:
        raise ValueError(f"unpack_latents: {list(x.shape)} does not pack a {height}x{width} latent")
    return einops.rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, ph=2, pw=2)


def image_ids(rows: int, cols: int, *, device=None) -> torch.Tensor:
    """Position ids ``[rows * cols, 3]`` = (0, row, col) of a packed ``rows x cols`` token grid."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).float()


def text_ids(length: int, *, device=None) -> torch.Tensor:
    """Position ids ``[length, 3]`` of text tokens: all zero (text carries no 2-D position in Flux)."""
    return torch.zeros(length, 3, device=device)


# ----------------------------------------------------------------------------------------------------------------
# forward


def _qkv(p, x: torch.Tensor, cfg: FluxConfig):
    q = _heads(nn.linear.apply(p["q"], x), cfg.head_dim)  # [B, H, T, Dh]
    k = _heads(nn.linear.apply(p["k"], x), cfg.head_dim)
    v = _heads(nn.linear.apply(p["v"], x), cfg.head_dim)
    # torch.nn.RMSNorm (F.rms_norm), as diffusers' FluxAttention uses.
    q = F.rms_norm(q, (cfg.head_dim,), p["q_norm"]["scale"], EPS)
    k = F.rms_norm(k, (cfg.head_dim,), p["k_norm"]["scale"], EPS)
    return q, k, v


def _attend(q, k, v, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    q, k = nn.rope.apply_interleaved(q, *rope), nn.rope.apply_interleaved(k, *rope)
    return _merge(nn.attention.dot_product_attention(q, k, v))  # [B, T, D]


def _double_block(p, x, c, temb, rope, cfg: FluxConfig):
    """``x: [B, N, D]`` image, ``c: [B, T, D]`` text -> ``(x, c)``; joint attention over ``[c, x]``."""
    p = parallelism.use_params(p)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = nn.modulation.apply(p["x_mod"], temb, 6)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = nn.modulation.apply(
        p["c_mod"], temb, 6
    )
    qx, kx, vx = _qkv(p["attn"], modulate(layer_norm(x, EPS), shift_msa, scale_msa), cfg)
    qc, kc, vc = _qkv(p["c_attn"], modulate(layer_norm(c, EPS), c_shift_msa, c_scale_msa), cfg)
    t = c.shape[1]
    out = _attend(torch.cat([qc, qx], 2), torch.cat([kc, kx], 2), torch.cat([vc, vx], 2), rope)
    x = x + constrain(gate_msa[:, None] * nn.linear.apply(p["attn"]["o"], out[:, t:]), _RESIDUAL)
    h = _mlp(p["mlp"], modulate(layer_norm(x, EPS), shift_mlp, scale_mlp))
    x = x + constrain(gate_mlp[:, None] * h, _RESIDUAL)
    c = c + constrain(c_gate_msa[:, None] * nn.linear.apply(p["c_attn"]["o"], out[:, :t]), _RESIDUAL)
    h = _mlp(p["c_mlp"], modulate(layer_norm(c, EPS), c_shift_mlp, c_scale_mlp))
    return x, c + constrain(c_gate_mlp[:, None] * h, _RESIDUAL)


def _single_block(p, h, temb, rope, cfg: FluxConfig):
    """``h: [B, T + N, D]`` (text then image) -> same shape."""
    p = parallelism.use_params(p)
    shift, scale, gate = nn.modulation.apply(p["mod"], temb, 3)
    hn = modulate(layer_norm(h, EPS), shift, scale)
    mlp = F.gelu(nn.linear.apply(p["mlp_in"], hn), approximate="tanh")  # [B, T + N, 4D]
    attn = _attend(*_qkv(p["attn"], hn, cfg), rope)  # [B, T + N, D]
    out = nn.linear.apply(p["proj_out"], torch.cat([attn, mlp], dim=2))
    return h + constrain(gate[:, None] * out, _RESIDUAL)


def _embed_mlp_apply(p, x):
    p = parallelism.use_params(p)
    return nn.linear.apply(p["fc2"], F.silu(nn.linear.apply(p["fc1"], x)))


@functools.partial(parallelism.local_rows, rows_arg=2)  # FSDP / DP: each rank's own rows, plainly
def apply(
    params: dict[str, Any],
    cfg: FluxConfig,
    x: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    *,
    guidance: torch.Tensor | None = None,
    remat_policy: Any = None,
) -> torch.Tensor:
    """The velocity prediction ``[B, N, p*p*C_out]`` for packed latents ``x: [B, N, C_in]``.

    ``timestep: [B]`` is ``sigma`` in [0, 1] (diffusers' pipeline passes ``t / 1000``) and ``guidance: [B]``
    the raw guidance scale (e.g. 3.5); the model multiplies both by 1000. ``context: [B, T,
    joint_attention_dim]`` are T5 tokens, ``pooled: [B, pooled_projection_dim]`` CLIP's pooled output;
    ``img_ids: [N, 3]`` and ``txt_ids: [T, 3]`` the RoPE positions. ``guidance`` is required exactly when
    ``cfg.guidance_embeds``. ``remat_policy`` wraps each block in :func:`functional_mm.autodiff.remat`.
    """
    b, n, cin = x.shape
    if cin != cfg.in_channels:
        raise ValueError(f"Flux: x must be packed latents [B, N, {cfg.in_channels}], got {list(x.shape)}")
    if tuple(timestep.shape) != (b,):
        raise ValueError(f"Flux: timestep must be [B={b}], got {list(timestep.shape)}")
    if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.joint_attention_dim:
        raise ValueError(
            f"Flux: context must be [B={b}, T, {cfg.joint_attention_dim}], got {list(context.shape)}"
        )
    t = context.shape[1]
    if tuple(pooled.shape) != (b, cfg.pooled_projection_dim):
        raise ValueError(
            f"Flux: pooled must be [B={b}, {cfg.pooled_projection_dim}], got {list(pooled.shape)}"
        )
    if tuple(img_ids.shape) != (n, 3) or tuple(txt_ids.shape) != (t, 3):
        raise ValueError(
            f"Flux: img_ids must be [N={n}, 3] and txt_ids [T={t}, 3], got {list(img_ids.shape)} and "
            f"{list(txt_ids.shape)}"
        )
    if (guidance is None) == cfg.guidance_embeds:
        raise ValueError(
            "Flux: pass guidance [B] exactly when the model embeds it (guidance_embeds="
            f"{cfg.guidance_embeds})"
        )

    h = nn.linear.apply(parallelism.use_params(params["x_embed"]), x)  # [B, N, D]
    dtype = h.dtype
    t_feat = nn.sincos.timestep_embedding(timestep.to(dtype) * 1000, TIMESTEP_DIM).to(pooled.dtype)
    temb = _embed_mlp_apply(params["time_embed"], t_feat)
    if guidance is not None:
        g_feat = nn.sincos.timestep_embedding(guidance.to(dtype) * 1000, TIMESTEP_DIM).to(pooled.dtype)
        temb = temb + _embed_mlp_apply(params["guidance_embed"], g_feat)
    temb = temb + _embed_mlp_apply(params["text_embed"], pooled)  # [B, D]
    c = nn.linear.apply(parallelism.use_params(params["context_embed"]), context)  # [B, T, D]
    rope = nn.rope.multi_axis_cos_sin(torch.cat([txt_ids, img_ids], 0), cfg.axes_dims_rope, ROPE_THETA)
    rope = tuple(r.to(x.device) for r in rope)  # [T + N, Dh] each

    h, c = constrain(h, _RESIDUAL), constrain(c, _RESIDUAL)
    double = autodiff.remat(_double_block, remat_policy)
    for p in params["double"]:
        h, c = double(p, h, c, temb, rope, cfg)
    hc = torch.cat([c, h], dim=1)
    single = autodiff.remat(_single_block, remat_policy)
    for p in params["single"]:
        hc = single(p, hc, temb, rope, cfg)
    h = hc[:, t:]

    scale, shift = nn.modulation.apply(parallelism.use_params(params["final_mod"]), temb, 2)
    h = modulate(layer_norm(h, EPS), shift, scale)
    return nn.linear.apply(parallelism.use_params(params["proj_out"]), h)
