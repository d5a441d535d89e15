"""AutoencoderKL (the latent-diffusion VAE of SD 1.x/XL, SD3 and Flux) as pure functions.

The encoder maps images ``[B, 3, H, W]`` in [-1, 1] to a diagonal Gaussian over latents
``[B, latent_channels, H/f, W/f]`` (``f = 2^(len(block_out_channels) - 1)``); the decoder maps latents back.
Diffusion models train on *normalised* latents ``(z - shift_factor) * scaling_factor``
(:func:`scale_latents`; SD3: 1.5305 / 0.0609, Flux: 0.3611 / 0.1159) and :func:`unscale_latents` undoes it
before decoding.

Sampling the posterior takes an explicit key (:func:`sample`), so encoding a dataset is reproducible per
(seed, step, rank) and never touches a global RNG.

Parameter tree (conv weights ``[out, in, k, k]`` with axes ``("embed", "channels", None, None)``)::

    encoder/conv_in, encoder/down/{i}/res/{j}/{norm1,conv1,norm2,conv2[,shortcut]}, encoder/down/{i}/downsample
    encoder/mid/res/{0,1}, encoder/mid/attn/{norm,q,k,v,o}, encoder/norm_out, encoder/conv_out
    quant_conv, post_quant_conv                    (1x1 convs; absent in SD3/Flux VAEs)
    decoder/conv_in, decoder/mid/..., decoder/up/{i}/res/{j}/..., decoder/up/{i}/upsample, decoder/norm_out,
    decoder/conv_out

Example::

    >>> import torch
    >>> from functional_mm import random
    >>> from functional_mm.models import vae
    >>> cfg = vae.AutoencoderKLConfig.variant("tiny")
    >>> params = vae.init(random.key(0), cfg)
    >>> dist = vae.encode(params, cfg, torch.rand(2, 3, 16, 16) * 2 - 1)
    >>> z = vae.scale_latents(cfg, vae.sample(dist, random.key(1)))    # [B, 4, 8, 8], what a DiT trains on
    >>> vae.decode(params, cfg, vae.unscale_latents(cfg, z)).shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from functional_mm import nn, parallelism, pytree, random

__all__ = [
    "AutoencoderKLConfig",
    "VARIANTS",
    "LatentDist",
    "init_boxed",
    "init",
    "abstract",
    "logical_axes",
    "num_params",
    "encode",
    "decode",
    "sample",
    "mode",
    "kl",
    "scale_latents",
    "unscale_latents",
]

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
EPS = 1e-6  # every GroupNorm in the VAE


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Hyperparameters of an AutoencoderKL (diffusers' config fields; every block is a plain
    ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``, the only kind latent-diffusion VAEs use).

    ``latents_mean`` / ``latents_std`` (per channel, optional) refine :func:`scale_latents` the way SDXL-style
    pipelines do; ``force_upcast`` is pipeline metadata kept for round trips.

    Example::

        >>> cfg = AutoencoderKLConfig.variant("sd3")
        >>> cfg.latent_channels, cfg.downsample_factor
        (16, 8)
        >>> AutoencoderKLConfig.variant("tiny", norm_num_groups=3)
        Traceback (most recent call last):
        ...
        ValueError: AutoencoderKLConfig.norm_num_groups=3 must divide every entry of block_out_channels (8, 16)
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"AutoencoderKLConfig.{name} must be an int >= 1, got {v!r}")
        if isinstance(self.sample_size, (list, tuple)):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        ch = self.block_out_channels
        if (
            not isinstance(ch, (tuple, list))
            or not ch
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in ch)
        ):
            raise ValueError(
                f"AutoencoderKLConfig.block_out_channels must be a non-empty tuple of ints, got {ch!r}"
            )
        object.__setattr__(self, "block_out_channels", tuple(ch))
        if any(c % self.norm_num_groups for c in ch):
            raise ValueError(
                f"AutoencoderKLConfig.norm_num_groups={self.norm_num_groups} must divide every entry of "
                f"block_out_channels {tuple(ch)}"
            )
        if (
            not isinstance(self.scaling_factor, (int, float))
            or isinstance(self.scaling_factor, bool)
            or not (self.scaling_factor > 0)
        ):
            raise ValueError(
                f"AutoencoderKLConfig.scaling_factor must be a positive number, got {self.scaling_factor!r}"
            )
        if self.shift_factor is not None and not isinstance(self.shift_factor, (int, float)):
            raise ValueError(
                f"AutoencoderKLConfig.shift_factor must be a number or None, got {self.shift_factor!r}"
            )
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, (tuple, list)) or len(v) != self.latent_channels:
                    raise ValueError(
                        f"AutoencoderKLConfig.{name} must be None or {self.latent_channels} numbers, got {v!r}"
                    )
                object.__setattr__(self, name, tuple(float(x) for x in v))
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("AutoencoderKLConfig.latents_mean and latents_std must be given together")
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "force_upcast"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AutoencoderKLConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"AutoencoderKLConfig.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AutoencoderKLConfig:
        """Build from a plain dict, rejecting unknown fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"AutoencoderKLConfig.from_dict: unknown field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> AutoencoderKLConfig:
        """A named configuration from :data:`VARIANTS`, with field overrides."""
        if name not in VARIANTS:
            raise ValueError(f"unknown AutoencoderKL variant {name!r}; known: {sorted(VARIANTS)}")
        return cls.from_dict({**VARIANTS[name], **overrides})


_LDM = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=1.5,
        shift_factor=0.1,
    ),
    # The vae/ folder of stable-diffusion-3(.5): 83.8M parameters, 16 latent channels, no quant convs.
    "sd3": dict(
        _LDM,
        latent_channels=16,
        sample_size=1024,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    # FLUX.1 vae/: same architecture as SD3's, its own latent statistics.
    "flux": dict(
        _LDM,
        latent_channels=16,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    # SD 1.x / 2.x: 83.7M parameters, 4 latent channels.
    "sd": dict(_LDM, latent_channels=4, sample_size=512, scaling_factor=0.18215),
    # SDXL (force_upcast: the fp16 decoder overflows).
    "sdxl": dict(_LDM, latent_channels=4, sample_size=1024, scaling_factor=0.13025),
}


# ----------------------------------------------------------------------------------------------------------------
# init


def _resnet(key, cin: int, cout: int, dtype) -> dict[str, Any]:
    k1, k2, k3 = random.split(key, 3)
    p = {
        "norm1": nn.norms.init_group_norm(cin, dtype=dtype),
        "conv1": nn.conv.init(k1, cin, cout, 3, dtype=dtype),
        "norm2": nn.norms.init_group_norm(cout, dtype=dtype),
        "conv2": nn.conv.init(k2, cout, cout, 3, dtype=dtype),
    }
    if cin != cout:
        p["shortcut"] = nn.conv.init(k3, cin, cout, 1, dtype=dtype)
    return p


def _mid(key, ch: int, attention: bool, dtype) -> dict[str, Any]:
    k0, k1, ka = random.split(key, 3)
    p = {"res": [_resnet(k0, ch, ch, dtype), _resnet(k1, ch, ch, dtype)]}
    if attention:
        kq, kk, kv, ko = random.split(ka, 4)
        lin = dict(bias=True, dtype=dtype)
        p["attn"] = {
            "norm": nn.norms.init_group_norm(ch, dtype=dtype),
            "q": nn.linear.init(kq, ch, ch, axes=("embed", "heads"), **lin),
            "k": nn.linear.init(kk, ch, ch, axes=("embed", "heads"), **lin),
            "v": nn.linear.init(kv, ch, ch, axes=("embed", "heads"), **lin),
            "o": nn.linear.init(ko, ch, ch, axes=("heads", "embed"), **lin),
        }
    return p


def init_boxed(key: torch.Tensor, cfg: AutoencoderKLConfig) -> dict[str, Any]:
    """The parameter tree with every leaf boxed as ``nn.Param(value, logical_axes)`` (LeCun-normal convs,
    unit GroupNorm scales).

    Example::

        >>> boxed = init_boxed(random.key(0), AutoencoderKLConfig.variant("tiny"))
        >>> boxed["encoder"]["conv_in"]["weight"].axes
        ('embed', 'channels', None, None)
    """
    dtype, ch = cfg.torch_dtype, cfg.block_out_channels
    ke, kd, kq, kpq = random.split(key, 4)

    ks = random.split(ke, 4)
    down, cin = [], ch[0]
    for i, (k, cout) in enumerate(zip(random.split(ks[0], len(ch)), ch)):
        kr, kds = random.split(k)
        block = {
            "res": [
                _resnet(kj, cin if j == 0 else cout, cout, dtype)
                for j, kj in enumerate(random.split(kr, cfg.layers_per_block))
            ]
        }
        if i < len(ch) - 1:
            block["downsample"] = nn.conv.init(kds, cout, cout, 3, dtype=dtype)
        down.append(block)
        cin = cout
    encoder = {
        "conv_in": nn.conv.init(ks[1], cfg.in_channels, ch[0], 3, dtype=dtype),
        "down": down,
        "mid": _mid(ks[2], ch[-1], cfg.mid_block_add_attention, dtype),
        "norm_out": nn.norms.init_group_norm(ch[-1], dtype=dtype),
        "conv_out": nn.conv.init(ks[3], ch[-1], 2 * cfg.latent_channels, 3, dtype=dtype),
    }

    ks = random.split(kd, 4)
    up, rev = [], list(reversed(ch))
    cin = rev[0]
    for i, (k, cout) in enumerate(zip(random.split(ks[0], len(ch)), rev)):
        kr, kus = random.split(k)
        block = {
            "res": [
                _resnet(kj, cin if j == 0 else cout, cout, dtype)
                for j, kj in enumerate(random.split(kr, cfg.layers_per_block + 1))
            ]
        }
        if i < len(ch) - 1:
            block["upsample"] = nn.conv.init(kus, cout, cout, 3, dtype=dtype)
        up.append(block)
        cin = cout
    decoder = {
        "conv_in": nn.conv.init(ks[1], cfg.latent_channels, ch[-1], 3, dtype=dtype),
        "mid": _mid(ks[2], ch[-1], cfg.mid_block_add_attention, dtype),
        "up": up,
        "norm_out": nn.norms.init_group_norm(ch[0], dtype=dtype),
        "conv_out": nn.conv.init(ks[3], ch[0], cfg.out_channels, 3, dtype=dtype),
    }
    tree: dict[str, Any] = {"encoder": encoder, "decoder": decoder}
    if cfg.use_quant_conv:
        z2 = 2 * cfg.latent_channels
        tree["quant_conv"] = nn.conv.init(kq, z2, z2, 1, dtype=dtype)
    if cfg.use_post_quant_conv:
        z = cfg.latent_channels
        tree["post_quant_conv"] = nn.conv.init(kpq, z, z, 1, dtype=dtype)
    return tree


def init(key: torch.Tensor, cfg: AutoencoderKLConfig) -> dict[str, Any]:
    """Plain parameter pytree (tensors only)."""
    return nn.unbox(init_boxed(key, cfg))[0]


def abstract(cfg: AutoencoderKLConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shapes, axes)``: the tree as meta tensors (no memory) and its logical axis names."""
    return nn.abstract(init_boxed, random.key(0), cfg)


def logical_axes(cfg: AutoencoderKLConfig) -> dict[str, Any]:
    """The tree of logical axis names (computed on the meta device)."""
    return abstract(cfg)[1]


def num_params(cfg: AutoencoderKLConfig) -> int:
    """Parameter count.

    Example::

        >>> round(num_params(AutoencoderKLConfig.variant("sd3")) / 1e6, 1)
        83.8
    """
    return pytree.leaf_count(abstract(cfg)[0])


# ----------------------------------------------------------------------------------------------------------------
# forward


class LatentDist(NamedTuple):
    """The encoder's diagonal Gaussian: ``mean`` and ``logvar`` (clamped to [-30, 20]), each ``[B, z, h, w]``."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)


def _resnet_apply(p, x: torch.Tensor, groups: int) -> torch.Tensor:
    h = F.silu(nn.norms.group_norm(p["norm1"], x, groups, EPS))
    h = nn.conv.apply(p["conv1"], h, padding=1)
    h = F.silu(nn.norms.group_norm(p["norm2"], h, groups, EPS))
    h = nn.conv.apply(p["conv2"], h, padding=1)
    if "shortcut" in p:
        x = nn.conv.apply(p["shortcut"], x)
    return x + h


def _attn_apply(p, x: torch.Tensor, groups: int) -> torch.Tensor:
    """Single-head self-attention over the ``H*W`` positions, with a residual (head dim = channels)."""
    b, c, hh, ww = x.shape
    h = nn.norms.group_norm(p["norm"], x, groups, EPS).view(b, c, hh * ww).transpose(1, 2)  # [B, HW, C]
    q, k, v = (nn.linear.apply(p[n], h)[:, None] for n in ("q", "k", "v"))  # [B, 1, HW, C]
    o = nn.attention.dot_product_attention(q, k, v)[:, 0]
    o = nn.linear.apply(p["o"], o)  # [B, HW, C]
    return x + o.transpose(1, 2).reshape(b, c, hh, ww)


def _mid_apply(p, x: torch.Tensor, groups: int) -> torch.Tensor:
    x = _resnet_apply(p["res"][0], x, groups)
    if "attn" in p:
        x = _attn_apply(p["attn"], x, groups)
    return _resnet_apply(p["res"][1], x, groups)


def _check_image(x: Any, channels: int, factor: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"AutoencoderKL: {what} must be [B, {channels}, H, W], got {got}")
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(
            f"AutoencoderKL: {what} size {x.shape[2]}x{x.shape[3]} must be divisible by {factor} (the "
            "encoder halves it at every down block)"
        )


def encode(params: dict[str, Any], cfg: AutoencoderKLConfig, images: torch.Tensor) -> LatentDist:
    """``images: [B, C, H, W]`` (in [-1, 1]) -> the posterior over latents ``[B, z, H/f, W/f]``."""
    _check_image(images, cfg.in_channels, cfg.downsample_factor, "images")
    g = cfg.norm_num_groups
    p = parallelism.use_params(params["encoder"])
    x = nn.conv.apply(p["conv_in"], images, padding=1)
    for block in p["down"]:
        for r in block["res"]:
            x = _resnet_apply(r, x, g)
        if "downsample" in block:
            # Asymmetric padding (right/bottom only) then a stride-2 valid conv, as in the LDM VAE.
            x = nn.conv.apply(block["downsample"], F.pad(x, (0, 1, 0, 1)), stride=2)
    x = _mid_apply(p["mid"], x, g)
    x = nn.conv.apply(p["conv_out"], F.silu(nn.norms.group_norm(p["norm_out"], x, g, EPS)), padding=1)
    if "quant_conv" in params:
        x = nn.conv.apply(parallelism.use_params(params["quant_conv"]), x)
    mean, logvar = x.chunk(2, dim=1)
    return LatentDist(mean, logvar.clamp(-30.0, 20.0))


def decode(params: dict[str, Any], cfg: AutoencoderKLConfig, latents: torch.Tensor) -> torch.Tensor:
    """Raw (un-normalised) ``latents: [B, z, h, w]`` -> images ``[B, C_out, h*f, w*f]``."""
    _check_image(latents, cfg.latent_channels, 1, "latents")
    g = cfg.norm_num_groups
    z = latents
    if "post_quant_conv" in params:
        z = nn.conv.apply(parallelism.use_params(params["post_quant_conv"]), z)
    p = parallelism.use_params(params["decoder"])
    x = nn.conv.apply(p["conv_in"], z, padding=1)
    x = _mid_apply(p["mid"], x, g)
    for block in p["up"]:
        for r in block["res"]:
            x = _resnet_apply(r, x, g)
        if "upsample" in block:
            x = nn.conv.apply(
                block["upsample"], F.interpolate(x, scale_factor=2.0, mode="nearest"), padding=1
            )
    return nn.conv.apply(p["conv_out"], F.silu(nn.norms.group_norm(p["norm_out"], x, g, EPS)), padding=1)


def sample(dist: LatentDist, key: torch.Tensor) -> torch.Tensor:
    """A posterior sample ``mean + std * eps`` with ``eps ~ N(0, 1)`` drawn from ``key``."""
    eps = random.normal(key, dist.mean.shape, dtype=dist.mean.dtype, device=dist.mean.device)
    return dist.mean + dist.std * eps


def mode(dist: LatentDist) -> torch.Tensor:
    """The posterior mode (its mean): deterministic latents."""
    return dist.mean


def kl(dist: LatentDist) -> torch.Tensor:
    """``KL(q(z|x) || N(0, I))`` per sample ``[B]`` (summed over latent dims)."""
    var = torch.exp(dist.logvar)
    return 0.5 * torch.sum(dist.mean.pow(2) + var - 1.0 - dist.logvar, dim=[1, 2, 3])


def _channel_stats(cfg: AutoencoderKLConfig, z: torch.Tensor):
    mean = torch.tensor(cfg.latents_mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
    return mean, std


def scale_latents(cfg: AutoencoderKLConfig, z: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the normalised latents a diffusion model sees: ``(z - shift_factor) * scaling_factor``
    (or ``(z - mean_c) * scaling_factor / std_c`` per channel when ``latents_mean/std`` are set)."""
    if cfg.latents_mean is not None:
        mean, std = _channel_stats(cfg, z)
        return (z - mean) * cfg.scaling_factor / std
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def unscale_latents(cfg: AutoencoderKLConfig, z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`scale_latents` (what pipelines apply before :func:`decode`)."""
    if cfg.latents_mean is not None:
        mean, std = _channel_stats(cfg, z)
        return z * std / cfg.scaling_factor + mean
    return z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
