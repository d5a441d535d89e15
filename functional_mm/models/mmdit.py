"""SD3 / SD3.5 MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers") as pure functions.

An MMDiT runs two token streams — image patches ``x`` and text tokens ``c`` — with separate weights but one
*joint* attention over their concatenation. Every block is modulated by adaLN-Zero from ``temb`` = timestep
embedding + pooled-text embedding. The last block updates only ``x`` (its text half would never be read).
SD3.5 adds RMS-normalised queries/keys (``qk_norm="rms_norm"``) and, in SD3.5 Medium, a second image-only
self-attention in the first blocks (``dual_attention_layers``, "MMDiT-X").

Positions: a fixed 2-D sin-cos table over a ``pos_embed_max_size``^2 grid, centre-cropped to the latent size
(diffusers' ``PatchEmbed`` with ``pos_embed_max_size``). The table is not a parameter: :func:`pos_embed`
recomputes exactly the values diffusers stores as the ``pos_embed.pos_embed`` buffer.

Parameter tree (``D = num_heads * head_dim``; axes name ``(in, out)`` dims of ``[out, in]`` weights)::

    patch_embed/{weight [D, C, p, p], bias}       ("channels", "embed")
    time_embed/fc1 [D, 256], fc2 [D, D]           (None, "mlp"), ("mlp", "embed")   sinusoidal timestep MLP
    text_embed/fc1 [D, P], fc2 [D, D]             (None, "mlp"), ("mlp", "embed")   pooled text MLP
    context_embed [D, J]                          (None, "embed")
    blocks/{i}/x_mod  [6D or 9D, D]               ("embed", "mlp")   adaLN-Zero of the image stream (9: dual)
    blocks/{i}/c_mod  [6D, D] ([2D, D] in the last block: scale/shift only)
    blocks/{i}/attn/{q,k,v,o}                     q/k/v: ("embed", "heads"), o: ("heads", "embed"); biases
    blocks/{i}/attn/{q_norm,k_norm}/scale [Dh]    ("norm",)  (qk_norm only)
    blocks/{i}/c_attn/{q,k,v,o,q_norm,k_norm}     text-stream projections (no ``o`` in the last block, whose
                                                  ``q``/``q_norm`` are kept for checkpoints but never used)
    blocks/{i}/attn2/{q,k,v,o,q_norm,k_norm}      image-only self-attention (dual layers only)
    blocks/{i}/mlp/{fc1,fc2}, c_mlp/{fc1,fc2}     GELU(tanh) MLP, hidden 4D (no c_mlp in the last block)
    final_mod [2D, D]                             AdaLayerNormContinuous: scale, shift
    proj_out [p*p*C_out, D]                       ("embed", None)

Example::

    >>> import torch
    >>> from functional_mm import random
    >>> from functional_mm.models import mmdit
    >>> cfg = mmdit.MMDiTConfig.variant("tiny")
    >>> params = mmdit.init(random.key(0), cfg)
    >>> x = torch.randn(2, cfg.in_channels, 16, 16)                       # [B, C, H, W] latents
    >>> ctx, pooled = torch.randn(2, 7, cfg.joint_attention_dim), torch.randn(2, cfg.pooled_projection_dim)
    >>> mmdit.apply(params, cfg, x, torch.tensor([999.0, 10.0]), ctx, pooled).shape   # velocity
    torch.Size([2, 4, 16, 16])
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from functional_mm import autodiff, nn, parallelism, pytree, random
from functional_mm.models.vit import from_dict as _from_dict
from functional_mm.nn.modulation import layer_norm, modulate
from functional_mm.parallelism import constrain

__all__ = [
    "MMDiTConfig",
    "VARIANTS",
    "init_boxed",
    "init",
    "abstract",
    "logical_axes",
    "num_params",
    "pos_embed",
    "apply",
]

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
QK_NORMS = (None, "rms_norm")
TIMESTEP_DIM = 256  # width of the sinusoidal timestep features (fixed in SD3 and Flux)
MLP_RATIO = 4
EPS = 1e-6  # every LayerNorm / RMSNorm in SD3 uses 1e-6
_RESIDUAL = ("act_batch", "act_seq", "act_embed")


def _check_int(cls: str, name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{cls}.{name} must be an int >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """Hyperparameters of an SD3-family MMDiT (the fields of diffusers' ``SD3Transformer2DModel`` config).

    ``sample_size`` is the latent height/width the position table is centred for (``base_size = sample_size
    // patch_size``); ``caption_projection_dim`` must equal ``num_heads * head_dim`` (diffusers keeps it as a
    separate field, but blocks only work when they agree). ``dual_attention_layers`` lists the block indices
    with the extra image self-attention.

    Example::

        >>> cfg = MMDiTConfig.variant("sd3.5_large")
        >>> cfg.dim, cfg.qk_norm
        (2432, 'rms_norm')
        >>> MMDiTConfig.from_dict({"num_layers": 0})
        Traceback (most recent call last):
        ...
        ValueError: MMDiTConfig.num_layers must be an int >= 1, got 0
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = None
    num_layers: int = 18
    num_heads: int = 18
    head_dim: int = 64
    joint_attention_dim: int = 4096
    caption_projection_dim: int | None = None
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        for name in (
            "sample_size",
            "patch_size",
            "in_channels",
            "num_layers",
            "num_heads",
            "head_dim",
            "joint_attention_dim",
            "pooled_projection_dim",
            "pos_embed_max_size",
        ):
            _check_int("MMDiTConfig", name, getattr(self, name))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        _check_int("MMDiTConfig", "out_channels", self.out_channels)
        if self.caption_projection_dim is None:
            object.__setattr__(self, "caption_projection_dim", self.dim)
        if self.caption_projection_dim != self.dim:
            raise ValueError(
                f"MMDiTConfig.caption_projection_dim={self.caption_projection_dim!r} must equal num_heads * "
                f"head_dim = {self.dim} (the text stream shares the block width)"
            )
        if self.dim % 4:
            raise ValueError(
                f"MMDiTConfig.num_heads * head_dim = {self.dim} must be divisible by 4 (2-D sincos)"
            )
        layers = self.dual_attention_layers
        if not isinstance(layers, (tuple, list)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers
        ):
            raise ValueError(f"MMDiTConfig.dual_attention_layers must be a tuple of ints, got {layers!r}")
        bad = sorted(i for i in layers if not 0 <= i < self.num_layers)
        if bad or len(set(layers)) != len(layers):
            raise ValueError(
                f"MMDiTConfig.dual_attention_layers={tuple(layers)} must be distinct block indices in "
                f"[0, num_layers={self.num_layers})"
            )
        object.__setattr__(self, "dual_attention_layers", tuple(sorted(layers)))
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"MMDiTConfig.qk_norm={self.qk_norm!r} is not one of {QK_NORMS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"MMDiTConfig.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MMDiTConfig:
        """Build from a plain dict, rejecting unknown fields (a typo must not silently become a default)."""
        d = dict(d)
        if isinstance(d.get("dual_attention_layers"), list):
            d["dual_attention_layers"] = tuple(d["dual_attention_layers"])
        return _from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> MMDiTConfig:
        """A named size from :data:`VARIANTS`, with field overrides.

        Example::

            >>> MMDiTConfig.variant("sd3_medium").num_layers
            24
        """
        if name not in VARIANTS:
            raise ValueError(f"unknown MMDiT variant {name!r}; known: {sorted(VARIANTS)}")
        return cls.from_dict({**VARIANTS[name], **overrides})


# The transformer/config.json of each Stability AI release.
VARIANTS: dict[str, dict[str, Any]] = {
    # CPU test size; exercises the dual attention and qk norm paths.
    "tiny": dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        num_heads=2,
        head_dim=16,
        joint_attention_dim=24,
        pooled_projection_dim=20,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ),
    # stabilityai/stable-diffusion-3-medium-diffusers: 2.03B parameters.
    "sd3_medium": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        num_heads=24,
        head_dim=64,
        joint_attention_dim=4096,
        pooled_projection_dim=2048,
        pos_embed_max_size=192,
        dtype="float16",
    ),
    # stabilityai/stable-diffusion-3.5-medium: MMDiT-X, 2.24B parameters.
    "sd3.5_medium": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        num_heads=24,
        head_dim=64,
        joint_attention_dim=4096,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
        dtype="bfloat16",
    ),
    # stabilityai/stable-diffusion-3.5-large: 8.06B parameters.
    "sd3.5_large": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=38,
        num_heads=38,
        head_dim=64,
        joint_attention_dim=4096,
        pooled_projection_dim=2048,
        pos_embed_max_size=192,
        qk_norm="rms_norm",
        dtype="bfloat16",
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# init


def _attention(key, cfg: Any, *, out: bool = True, qk_norm: bool | None = None) -> dict[str, Any]:
    """q/k/v(/o) projections with biases, plus q/k RMSNorm scales when ``qk_norm`` (default: as ``cfg.qk_norm``
    says). Shared with :mod:`functional_mm.models.flux`."""
    if qk_norm is None:
        qk_norm = cfg.qk_norm == "rms_norm"
    dtype = cfg.torch_dtype
    p = nn.attention.init(
        key, cfg.dim, cfg.num_heads, head_dim=cfg.head_dim, qkv_bias=True, out_bias=True, dtype=dtype
    )
    if not out:
        del p["o"]
    if qk_norm:
        p["q_norm"] = nn.norms.init_rms_norm(cfg.head_dim, dtype=dtype)
        p["k_norm"] = nn.norms.init_rms_norm(cfg.head_dim, dtype=dtype)
    return p


def _embed_mlp(key, in_dim: int, dim: int, dtype) -> dict[str, Any]:
    k1, k2 = random.split(key)
    return {
        "fc1": nn.linear.init(k1, in_dim, dim, axes=(None, "mlp"), bias=True, dtype=dtype),
        "fc2": nn.linear.init(k2, dim, dim, axes=("mlp", "embed"), bias=True, dtype=dtype),
    }


def init_boxed(key: torch.Tensor, cfg: MMDiTConfig) -> dict[str, Any]:
    """The parameter tree with every leaf boxed as ``nn.Param(value, logical_axes)``.

    Linear weights are LeCun-normal; every adaLN modulation and the output projection start at zero
    (adaLN-Zero: each block is the identity and the prediction is 0 at step 0, as in DiT).

    Example::

        >>> boxed = init_boxed(random.key(0), MMDiTConfig.variant("tiny"))
        >>> boxed["blocks"][0]["x_mod"]["weight"].axes
        ('mlp', 'embed')
    """
    dtype, d = cfg.torch_dtype, cfg.dim
    k_patch, k_time, k_text, k_ctx, k_blocks, k_final, k_out = random.split(key, 7)
    blocks = []
    for i, k in enumerate(random.split(k_blocks, cfg.num_layers)):
        last, dual = i == cfg.num_layers - 1, i in cfg.dual_attention_layers
        kx, kc, ka, kca, ka2, km, kcm = random.split(k, 7)
        block = {
            "x_mod": nn.modulation.init(kx, d, d, 9 if dual else 6, dtype=dtype),
            "c_mod": nn.modulation.init(kc, d, d, 2 if last else 6, dtype=dtype),
            "attn": _attention(ka, cfg),
            "c_attn": _attention(kca, cfg, out=not last),
            "mlp": nn.mlp.init_mlp(km, d, MLP_RATIO * d, dtype=dtype),
        }
        if dual:
            block["attn2"] = _attention(ka2, cfg)
        if not last:
            block["c_mlp"] = nn.mlp.init_mlp(kcm, d, MLP_RATIO * d, dtype=dtype)
        blocks.append(block)
    p = cfg.patch_size
    out_dim = p * p * cfg.out_channels
    return {
        "patch_embed": nn.patch_embed.init(k_patch, cfg.in_channels, d, (p, p), dtype=dtype),
        "time_embed": _embed_mlp(k_time, TIMESTEP_DIM, d, dtype),
        "text_embed": _embed_mlp(k_text, cfg.pooled_projection_dim, d, dtype),
        "context_embed": nn.linear.init(
            k_ctx, cfg.joint_attention_dim, d, axes=(None, "embed"), bias=True, dtype=dtype
        ),
        "blocks": blocks,
        "final_mod": nn.modulation.init(k_final, d, d, 2, dtype=dtype),
        "proj_out": nn.linear.init(k_out, d, out_dim, axes=("embed", None), bias=True, std=0.0, dtype=dtype),
    }


def init(key: torch.Tensor, cfg: MMDiTConfig) -> dict[str, Any]:
    """Plain parameter pytree (tensors only).

    Example::

        >>> params = init(random.key(0), MMDiTConfig.variant("tiny"))
        >>> params["blocks"][0]["attn"]["q"]["weight"].shape    # [H * Dh, D]
        torch.Size([32, 32])
    """
    return nn.unbox(init_boxed(key, cfg))[0]


def abstract(cfg: MMDiTConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shapes, axes)``: the tree as meta tensors (no memory) and its logical axis names."""
    return nn.abstract(init_boxed, random.key(0), cfg)


def logical_axes(cfg: MMDiTConfig) -> dict[str, Any]:
    """The tree of logical axis names (computed on the meta device).

    Example::

        >>> logical_axes(MMDiTConfig.variant("sd3_medium"))["blocks"][0]["mlp"]["fc1"]["weight"]
        ('mlp', 'embed')
    """
    return abstract(cfg)[1]


def num_params(cfg: MMDiTConfig) -> int:
    """Parameter count (the fixed position table is not a parameter).

    Example::

        >>> round(num_params(MMDiTConfig.variant("sd3_medium")) / 1e9, 2)
        2.03
    """
    return pytree.leaf_count(abstract(cfg)[0])


# ----------------------------------------------------------------------------------------------------------------
# forward


def pos_embed(
    cfg: MMDiTConfig, height: int, width: int, *, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """The fixed position table for a ``height x width`` patch grid: ``[1, height * width, D]``.

    The centre crop of diffusers' ``pos_embed_max_size``^2 table, computed directly for the cropped rows and
    columns (SD3.5 Medium's full table would be 147k x 1536 entries).
    """
    m = cfg.pos_embed_max_size
    if height > m or width > m:
        raise ValueError(
            f"MMDiT: a {height}x{width} patch grid exceeds pos_embed_max_size={m} (latents at most "
            f"{m * cfg.patch_size} pixels a side)"
        )
    base = cfg.sample_size // cfg.patch_size
    # Same float32 arithmetic as diffusers' grid (arange / (grid / base_size) / interpolation_scale).
    grid = torch.arange(m, dtype=torch.float32, device=device) / (m / base) / 1.0
    top, left = (m - height) // 2, (m - width) // 2
    table = nn.sincos.sincos_2d(cfg.dim, grid[top : top + height], grid[left : left + width])
    return table.float().to(dtype)[None]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, -1, head_dim).transpose(1, 2)  # [B, H, T, Dh]


def _qkv(p, x: torch.Tensor, cfg: MMDiTConfig, *, queries: bool = True):
    """``(q, k, v)``, each ``[B, H, T, Dh]`` (``q`` is None when ``queries`` is False)."""
    q = _heads(nn.linear.apply(p["q"], x), cfg.head_dim) if queries else None
    k = _heads(nn.linear.apply(p["k"], x), cfg.head_dim)
    v = _heads(nn.linear.apply(p["v"], x), cfg.head_dim)
    if "q_norm" in p:
        k = nn.norms.rms_norm(p["k_norm"], k, EPS)
        q = nn.norms.rms_norm(p["q_norm"], q, EPS) if queries else None
    return q, k, v


def _merge(o: torch.Tensor) -> torch.Tensor:
    b, h, t, dh = o.shape
    return o.transpose(1, 2).reshape(b, t, h * dh)  # [B, T, D]


def _mlp(p, x: torch.Tensor) -> torch.Tensor:
    return nn.mlp.mlp(p, x, act="gelu_tanh")


def _block(p, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, cfg: MMDiTConfig):
    """One joint block: ``x: [B, N, D]`` image tokens, ``c: [B, T, D]`` text tokens -> ``(x, c)`` (``c`` is
    ``None`` after the last block, which has no text-side output)."""
    p = parallelism.use_params(p)  # this block's weights, gathered over the data axes (no-op unsharded)
    dual, last = "attn2" in p, "c_mlp" not in p
    mods = nn.modulation.apply(p["x_mod"], temb, 9 if dual else 6)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    x_norm = layer_norm(x, EPS)
    x_in = modulate(x_norm, shift_msa, scale_msa)
    if last:
        c_scale, c_shift = nn.modulation.apply(p["c_mod"], temb, 2)  # AdaLayerNormContinuous: scale first
        c_in = modulate(layer_norm(c, EPS), c_shift, c_scale)
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = nn.modulation.apply(
            p["c_mod"], temb, 6
        )
        c_in = modulate(layer_norm(c, EPS), c_shift_msa, c_scale_msa)

    # Joint attention: image tokens first, then text, as diffusers' JointAttnProcessor concatenates them.
    # The last block's text outputs are never read, so its text queries are skipped: the checkpoint still
    # holds that projection (diffusers computes and discards it), but it gets no gradient either way.
    qx, kx, vx = _qkv(p["attn"], x_in, cfg)
    qc, kc, vc = _qkv(p["c_attn"], c_in, cfg, queries=not last)
    n = x.shape[1]
    q = qx if last else torch.cat([qx, qc], 2)
    out = nn.attention.dot_product_attention(q, torch.cat([kx, kc], 2), torch.cat([vx, vc], 2))
    out = _merge(out)  # [B, N (+ T), D]
    x = x + constrain(gate_msa[:, None] * nn.linear.apply(p["attn"]["o"], out[:, :n]), _RESIDUAL)
    if dual:  # MMDiT-X: image-only self-attention on its own modulation of the same normalised x
        shift2, scale2, gate2 = mods[6:]
        q, k, v = _qkv(p["attn2"], modulate(x_norm, shift2, scale2), cfg)
        h = nn.linear.apply(p["attn2"]["o"], _merge(nn.attention.dot_product_attention(q, k, v)))
        x = x + constrain(gate2[:, None] * h, _RESIDUAL)
    h = _mlp(p["mlp"], modulate(layer_norm(x, EPS), shift_mlp, scale_mlp))
    x = x + constrain(gate_mlp[:, None] * h, _RESIDUAL)
    if last:
        return x, None
    c = c + constrain(c_gate_msa[:, None] * nn.linear.apply(p["c_attn"]["o"], out[:, n:]), _RESIDUAL)
    h = _mlp(p["c_mlp"], modulate(layer_norm(c, EPS), c_shift_mlp, c_scale_mlp))
    return x, c + constrain(c_gate_mlp[:, None] * h, _RESIDUAL)


def _embed_mlp_apply(p, x: torch.Tensor) -> torch.Tensor:
    return nn.linear.apply(p["fc2"], F.silu(nn.linear.apply(p["fc1"], x)))


def _check_inputs(cfg: MMDiTConfig, latents, timestep, context, pooled) -> None:
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != cfg.in_channels:
        got = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"MMDiT: latents must be [B, C={cfg.in_channels}, H, W], got {got}")
    b, _, h, w = latents.shape
    if h % cfg.patch_size or w % cfg.patch_size:
        raise ValueError(f"MMDiT: latent size {h}x{w} is not divisible by patch_size={cfg.patch_size}")
    if not isinstance(timestep, torch.Tensor) or tuple(timestep.shape) != (b,):
        raise ValueError(f"MMDiT: timestep must be a tensor [B={b}] (0..1000 scale)")
    if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.joint_attention_dim:
        raise ValueError(
            f"MMDiT: context must be [B={b}, T, {cfg.joint_attention_dim}], got {list(context.shape)}"
        )
    if tuple(pooled.shape) != (b, cfg.pooled_projection_dim):
        raise ValueError(
            f"MMDiT: pooled must be [B={b}, {cfg.pooled_projection_dim}], got {list(pooled.shape)}"
        )


@functools.partial(parallelism.local_rows, rows_arg=2)  # FSDP / DP: each rank's own rows, plainly
def apply(
    params: dict[str, Any],
    cfg: MMDiTConfig,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    *,
    remat_policy: Any = None,
) -> torch.Tensor:
    """The velocity prediction ``[B, C_out, H, W]`` for ``latents: [B, C, H, W]``.

    ``timestep: [B]`` is on the 0..1000 scale (``1000 * sigma``, what diffusers' scheduler hands the model);
    ``context: [B, T, joint_attention_dim]`` are the text tokens (CLIP-L/G penultimate states zero-padded
    to 4096 and concatenated with T5's along T); ``pooled: [B, pooled_projection_dim]`` is the pooled text
    vector. ``remat_policy`` wraps each block in :func:`functional_mm.autodiff.remat`.
    """
    _check_inputs(cfg, latents, timestep, context, pooled)
    b, _, height, width = latents.shape
    ps = cfg.patch_size
    gh, gw = height // ps, width // ps
    x = nn.patch_embed.apply(parallelism.use_params(params["patch_embed"]), latents)  # [B, N, D]
    x = (x + pos_embed(cfg, gh, gw, device=x.device)).to(x.dtype)
    x = constrain(x, _RESIDUAL)

    t_feat = nn.sincos.timestep_embedding(timestep, TIMESTEP_DIM).to(pooled.dtype)  # [B, 256]
    temb = _embed_mlp_apply(parallelism.use_params(params["time_embed"]), t_feat)
    temb = temb + _embed_mlp_apply(parallelism.use_params(params["text_embed"]), pooled)  # [B, D]
    c = nn.linear.apply(parallelism.use_params(params["context_embed"]), context)  # [B, T, D]
    c = constrain(c, _RESIDUAL)

    block = autodiff.remat(_block, remat_policy)
    for p in params["blocks"]:
        x, c = block(p, x, c, temb, cfg)

    scale, shift = nn.modulation.apply(parallelism.use_params(params["final_mod"]), temb, 2)
    x = modulate(layer_norm(x, EPS), shift, scale)
    x = nn.linear.apply(parallelism.use_params(params["proj_out"]), x)  # [B, N, p * p * C_out]
    # Unpatchify: token (i, j) holds a p x p x C patch in (p, q, c) order.
    x = x.reshape(b, gh, gw, ps, ps, cfg.out_channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, cfg.out_channels, gh * ps, gw * ps)
