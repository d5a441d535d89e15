"""InternVL (2 / 2.5 / 3) as a pure function, as transformers' ``InternVLForConditionalGeneration`` has it:
InternViT, pixel shuffle, an MLP projector and a Llama-architecture decoder (Qwen2, or InternLM2 converted to
Llama layout).

Each 448px tile goes through InternViT; the patch features (CLS dropped) form a ``g x g`` grid that pixel
shuffle (``downsample_ratio=0.5``) folds into ``g/2 x g/2`` tokens of 4x the width, and the projector
(LayerNorm -> Linear -> GELU -> Linear) maps them to the decoder width. A 448px tile with 14px patches gives
``32 * 32 / 4 = 256`` tokens, written over the ``<IMG_CONTEXT>`` placeholders (``image_token_id``). Tiling an
image into several crops is preprocessing: the model takes the crops as a batch of tiles.

Parameter tree::

    vision/...                         the InternViT tree (functional_mm.models.vit)
    projector/norm/{scale,bias} [Dv * 4]
    projector/fc1/{weight,bias} [Dt, Dv * 4]   ("mlp", "embed")
    projector/fc2/{weight,bias} [Dt, Dt]       ("embed", "mlp")
    text/...                           the Llama / Qwen2 tree (functional_mm.models.llama)

Example::

    >>> import torch
    >>> from functional_mm import random
    >>> from functional_mm.models import internvl
    >>> cfg = internvl.InternVLConfig.variant("tiny")
    >>> params = internvl.init(random.key(0), cfg)
    >>> tokens = torch.tensor([[1, 2] + [cfg.image_token_id] * cfg.num_image_tokens + [3]])
    >>> internvl.apply(params, cfg, tokens, torch.randn(1, 3, 16, 16)).shape   # 8x8 patches -> 16 tokens
    torch.Size([1, 19, 128])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from functional_mm import nn, pytree, random
from functional_mm.models import llama, vit
from functional_mm.models.llava import (
    apply_with,
    batch_loss,
    check_sub,
    check_token_id,
    embed_with_images,
    generate_with,
    merge_overrides,
    nested_from_dict,
    nested_to_dict,
    project,
)

__all__ = [
    "InternVLConfig",
    "VARIANTS",
    "init_boxed",
    "init",
    "abstract",
    "logical_axes",
    "default_rules",
    "pixel_shuffle",
    "image_features",
    "embed_inputs",
    "apply",
    "loss",
    "generate",
    "num_params",
]


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    """InternVL: an InternViT ``vision`` tower, ``text`` decoder and the pixel-shuffle projector between them.

    ``feature_layer`` is HF-indexed (``-1``: the tower's output, after its post norm if it has one);
    ``feature_select`` ``"default"`` drops the CLS token (``"full"`` is rejected: the grid would not be square).

    Example::

        >>> cfg = InternVLConfig.variant("internvl2_8b")
        >>> cfg.num_image_tokens, cfg.projector_in_dim
        (256, 4096)
    """

    vision: vit.ViTConfig
    text: llama.LlamaConfig
    image_token_id: int
    downsample_ratio: float = 0.5
    feature_layer: int = -1
    feature_select: str = "default"
    projector_act: str = "gelu"

    def __post_init__(self):
        owner = "InternVLConfig"
        check_sub(owner, "vision", self.vision, vit.ViTConfig)
        check_sub(owner, "text", self.text, llama.LlamaConfig)
        check_token_id(owner, "image_token_id", self.image_token_id, self.text.vocab_size)
        r = self.downsample_ratio
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 < r <= 1 or (1 / r) != int(1 / r):
            raise ValueError(
                f"{owner}.downsample_ratio={r!r} must be 1/k for an integer k >= 1 (0.5 folds 2x2)"
            )
        if self.vision.grid % self.scale:
            raise ValueError(
                f"{owner}: the {self.vision.grid}x{self.vision.grid} patch grid is not divisible by 1/downsample_ratio"
                f"={self.scale}"
            )
        if (
            not isinstance(self.feature_layer, int)
            or isinstance(self.feature_layer, bool)
            or not (-(self.vision.num_layers + 1) <= self.feature_layer <= self.vision.num_layers)
        ):
            raise ValueError(f"{owner}.feature_layer={self.feature_layer!r} is out of range for the tower")
        if self.feature_select != "default" or not self.vision.class_token:
            raise ValueError(
                f"{owner}.feature_select must be 'default' with a CLS-token tower (the grid is square)"
            )
        nn.mlp.activation(self.projector_act)

    @property
    def scale(self) -> int:
        """Patches folded per side by pixel shuffle (2 for ``downsample_ratio=0.5``)."""
        return int(round(1 / self.downsample_ratio))

    @property
    def num_image_tokens(self) -> int:
        return (self.vision.grid // self.scale) ** 2

    @property
    def projector_in_dim(self) -> int:
        return self.vision.dim * self.scale**2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InternVLConfig:
        return nested_from_dict(cls, d, {"vision": vit.ViTConfig, "text": llama.LlamaConfig})

    def to_dict(self) -> dict[str, Any]:
        return nested_to_dict(self)

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> InternVLConfig:
        """A named size from :data:`VARIANTS`; dict overrides of ``vision`` / ``text`` update those fields."""
        if name not in VARIANTS:
            raise ValueError(f"unknown InternVL variant {name!r}; known: {sorted(VARIANTS)}")
        return cls.from_dict(merge_overrides(VARIANTS[name], overrides))


def _internlm2(**kw) -> dict[str, Any]:
    # InternLM2 is Llama-architecture (GQA, SwiGLU, RMSNorm, no biases) once its fused wqkv is split.
    return dict(norm_eps=1e-5, rope_theta=1000000.0, max_seq_len=32768, dtype="bfloat16", **kw)


_VIT300 = dict(vit.VARIANTS["internvit_300m_448"], dtype="bfloat16")

# Published hyperparameters (OpenGVLab/InternVL2-{2B,8B,Llama3-76B}: vision_config / llm_config).
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vision=vit.VARIANTS["internvit_tiny"],
        text=dict(llama.VARIANTS["tiny"], qkv_bias=True),
        image_token_id=120,
    ),
    # InternViT-300M-448px + internlm2-chat-1_8b.
    "internvl2_2b": dict(
        vision=_VIT300,
        text=_internlm2(
            vocab_size=92553, dim=2048, num_layers=24, num_heads=16, num_kv_heads=8, mlp_dim=8192
        ),
        image_token_id=92546,
    ),
    # InternViT-300M-448px + internlm2_5-7b-chat.
    "internvl2_8b": dict(
        vision=_VIT300,
        text=_internlm2(
            vocab_size=92553, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_dim=14336
        ),
        image_token_id=92546,
    ),
    # InternViT-6B-448px-V1-5 + Hermes-2-Theta-Llama-3-70B.
    "internvl2_76b": dict(
        vision=dict(vit.VARIANTS["internvit_6b_448_v1_5"], dtype="bfloat16"),
        text=dict(
            vocab_size=128265,
            dim=8192,
            num_layers=80,
            num_heads=64,
            num_kv_heads=8,
            mlp_dim=28672,
            norm_eps=1e-5,
            rope_theta=500000.0,
            max_seq_len=8192,
            dtype="bfloat16",
        ),
        image_token_id=128258,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# init


def init_boxed(key: torch.Tensor, cfg: InternVLConfig) -> dict[str, Any]:
    """The parameter tree with every leaf boxed as ``nn.Param(value, logical_axes)``."""
    k_vis, k_fc1, k_fc2, k_text = random.split(key, 4)
    din, dt, dtype, std = cfg.projector_in_dim, cfg.text.dim, cfg.text.torch_dtype, cfg.text.init_std
    return {
        "vision": vit.init_boxed(k_vis, cfg.vision),
        "projector": {
            "norm": nn.norms.init_layer_norm(din, dtype=dtype),
            "fc1": nn.linear.init(k_fc1, din, dt, axes=("embed", "mlp"), bias=True, std=std, dtype=dtype),
            "fc2": nn.linear.init(k_fc2, dt, dt, axes=("mlp", "embed"), bias=True, std=std, dtype=dtype),
        },
        "text": llama.init_boxed(k_text, cfg.text),
    }


def init(key: torch.Tensor, cfg: InternVLConfig) -> dict[str, Any]:
    return nn.unbox(init_boxed(key, cfg))[0]


def abstract(cfg: InternVLConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shapes, axes)`` on the meta device (no memory)."""
    return nn.abstract(init_boxed, random.key(0), cfg)


def logical_axes(cfg: InternVLConfig) -> dict[str, Any]:
    return abstract(cfg)[1]


def default_rules(*, sequence_parallel: bool = True) -> list[tuple[str, Any]]:
    """Llama's rules plus the vision-only names (the patch conv's input channels are never split)."""
    return [*llama.default_rules(sequence_parallel=sequence_parallel), ("channels", None)]


def num_params(cfg: InternVLConfig) -> int:
    """Total parameter count from the abstract tree.

    Example::

        >>> round(num_params(InternVLConfig.variant("internvl2_8b")) / 1e9, 2)   # published: 8.08B
        8.08
    """
    return pytree.leaf_count(abstract(cfg)[0])


# ----------------------------------------------------------------------------------------------------------------
# forward


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Fold ``scale x scale`` neighbourhoods into channels: ``[B, H, W, C] -> [B, H/s, W/s, C * s * s]``, in the
    channel order of InternVL's ``pixel_shuffle`` (``ps_version="v2"``), which the projector weights expect.

    Example::

        >>> pixel_shuffle(torch.zeros(1, 4, 4, 8), 2).shape
        torch.Size([1, 2, 2, 32])
    """
    b, h, w, c = x.shape
    if h % scale or w % scale:
        raise ValueError(f"pixel_shuffle: a {h}x{w} grid is not divisible by {scale}")
    x = x.reshape(b, h, w // scale, c * scale).transpose(1, 2)  # [B, W/s, H, C s]
    x = x.reshape(b, w // scale, h // scale, c * scale * scale).transpose(1, 2)  # [B, H/s, W/s, C s^2]
    return x


def image_features(
    params: dict[str, Any], cfg: InternVLConfig, pixel_values: torch.Tensor, *, remat_policy: Any = None
) -> torch.Tensor:
    """``pixel_values: [n, C, H, W]`` (tiles) -> ``[n, num_image_tokens, D_text]``. On a mesh the tiles are split
    over the data axes (:func:`functional_mm.models.vit.apply`) and the projector is ``llava.project``'s."""
    v = cfg.vision
    if cfg.feature_layer == -1:
        x = vit.apply(params["vision"], v, pixel_values, remat_policy=remat_policy)["last_hidden_state"]
    else:
        x = vit.hidden_states(
            params["vision"], v, pixel_values, [cfg.feature_layer], remat_policy=remat_policy
        )[0]
    x = x[:, 1:]  # drop CLS: [n, g*g, Dv]
    n = x.shape[0]
    x = pixel_shuffle(x.reshape(n, v.grid, v.grid, v.dim), cfg.scale).reshape(n, -1, cfg.projector_in_dim)
    return project(params["projector"], cfg.projector_act, x)  # LayerNorm, fc1, act, fc2


def embed_inputs(
    params: dict[str, Any],
    cfg: InternVLConfig,
    tokens: torch.Tensor,
    pixel_values,
    *,
    remat_policy: Any = None,
) -> torch.Tensor:
    """Text embeddings with the tile features written over the ``<IMG_CONTEXT>`` placeholders."""
    return embed_with_images(params, cfg, tokens, pixel_values, image_features, remat_policy=remat_policy)


def apply(
    params: dict[str, Any],
    cfg: InternVLConfig,
    tokens: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    remat_policy: Any = None,
    return_hidden: bool = False,
) -> torch.Tensor:
    """Logits ``[B, T, V]``; ``tokens`` hold ``num_image_tokens`` placeholders per tile, tiles in row order.
    ``return_hidden`` as in :func:`functional_mm.models.llama.apply`."""
    return apply_with(
        embed_inputs,
        params,
        cfg,
        tokens,
        pixel_values,
        attention_mask=attention_mask,
        positions=positions,
        remat_policy=remat_policy,
        return_hidden=return_hidden,
    )


_BATCH_KEYS = ("tokens", "pixel_values", "loss_mask", "attention_mask", "positions")


def loss(
    params: dict[str, Any], cfg: InternVLConfig, batch: Mapping[str, torch.Tensor], *, remat_policy=None
):
    """Mean next-token cross entropy over the text targets (image placeholders are never targets)."""
    return batch_loss(
        apply, params, cfg, batch, _BATCH_KEYS, (cfg.image_token_id,), remat_policy=remat_policy
    )


def generate(
    params: dict[str, Any],
    cfg: InternVLConfig,
    tokens: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
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
    """Generation with a fixed-size KV cache: ``[B, T] -> [B, T + n]``; greedy by default, sampling and streaming
    as in :func:`llava.generate`."""
    return generate_with(
        embed_inputs,
        params,
        cfg,
        tokens,
        pixel_values,
        max_new_tokens=max_new_tokens,
        attention_mask=attention_mask,
        key=key,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
        pad_token=pad_token,
        on_token=on_token,
    )
