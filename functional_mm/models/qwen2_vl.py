"""Qwen2-VL as a pure function: a native-resolution ViT (3-D patch conv over 2 frames, 2-D rotary, per-image
attention, 2x2 patch merger) feeding a Qwen2 decoder with multimodal RoPE (M-RoPE).

Inputs follow the Qwen2-VL processor: an image or video becomes a ``(t, h, w)`` grid of patches
(``grid_thw``; ``t`` counts pairs of frames, an image is one frame repeated), flattened into ``pixel_values:
[sum(t*h*w), C * 2 * P * P]`` with every 2x2 merge block contiguous. The tower turns each 2x2 block into one
token, so an image takes ``t*h*w / 4`` placeholder tokens (``image_token_id``; videos ``video_token_id``) in the
prompt. Position ids are 3-D (temporal, height, width): text tokens advance all three together, vision tokens
take their grid coordinates (:func:`rope_index`); each third of the rotary frequencies (``mrope_section``) turns
with one of the three ids.

Parameter tree::

    vision/patch_embed/weight [Dv, C, 2, P, P]      ("embed", "channels", None, None, None)   (no bias)
    vision/layers/{i}/...                           the ViT block (functional_mm.models.vit.block)
    vision/merger/norm/{scale,bias} [Dv]
    vision/merger/fc1/{weight,bias} [4Dv, 4Dv]       ("mlp", "embed")
    vision/merger/fc2/{weight,bias} [D, 4Dv]         ("embed", "mlp")
    text/...                                        the Qwen2 tree (functional_mm.models.llama, qkv_bias=True)

Example::

    >>> import torch
    >>> from functional_mm import random
    >>> from functional_mm.models import qwen2_vl
    >>> cfg = qwen2_vl.Qwen2VLConfig.variant("tiny")
    >>> params = qwen2_vl.init(random.key(0), cfg)
    >>> grid = torch.tensor([[1, 4, 4]])                                   # one image, 4 x 4 patches
    >>> pixels = torch.randn(16, cfg.vision.patch_dim)
    >>> img = [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
    >>> tokens = torch.tensor([[1, 2] + img + [3]])
    >>> qwen2_vl.apply(params, cfg, tokens, pixel_values=pixels, image_grid_thw=grid).shape
    torch.Size([1, 9, 128])
    >>> qwen2_vl.rope_index(tokens, cfg, image_grid_thw=grid)[0][:, 0].tolist()   # [3, T]: t, h, w ids
    [[0, 1, 2, 3, 3, 3, 3, 5, 6], [0, 1, 2, 3, 3, 4, 4, 5, 6], [0, 1, 2, 3, 4, 3, 4, 5, 6]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from functional_mm import autodiff, nn, parallelism, pytree, random
from functional_mm.models import llama, vit
from functional_mm.models.llava import (
    batch_loss,
    check_sub,
    check_token_id,
    check_tokens,
    merge_embeddings,
    merge_overrides,
    nested_from_dict,
    nested_to_dict,
)
from functional_mm.models.vit import check_number, check_positive_int
from functional_mm.parallelism import constrain

__all__ = [
    "Qwen2VLVisionConfig",
    "Qwen2VLConfig",
    "VARIANTS",
    "init_boxed",
    "init",
    "abstract",
    "logical_axes",
    "default_rules",
    "vision_apply",
    "vision_positions",
    "rope_index",
    "embed_inputs",
    "apply",
    "loss",
    "init_cache",
    "decode",
    "generate",
    "num_params",
]


@dataclasses.dataclass(frozen=True)
class Qwen2VLVisionConfig:
    """The Qwen2-VL vision tower. ``out_dim`` is the decoder width the merger projects to.

    Example::

        >>> v = Qwen2VLVisionConfig(dim=32, num_layers=1, num_heads=4, mlp_dim=128, out_dim=64, patch_size=2)
        >>> v.patch_dim, v.merge_dim
        (24, 128)
    """

    dim: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    out_dim: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    act: str = "quick_gelu"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    dtype: str = "float32"

    def __post_init__(self):
        owner = "Qwen2VLVisionConfig"
        for name in (
            "dim",
            "num_layers",
            "num_heads",
            "mlp_dim",
            "out_dim",
            "patch_size",
            "temporal_patch_size",
            "in_channels",
            "spatial_merge_size",
        ):
            check_positive_int(owner, name, getattr(self, name))
        if self.dim % self.num_heads:
            raise ValueError(f"{owner}.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if (self.dim // self.num_heads) % 4:
            raise ValueError(
                f"{owner}: head_dim={self.dim // self.num_heads} must be a multiple of 4 (2-D rotary rotates "
                "pairs on each of the two axes)"
            )
        nn.mlp.activation(self.act)
        for name in ("norm_eps", "rope_theta"):
            check_number(owner, name, getattr(self, name))
        check_number(owner, "init_std", self.init_std, positive=False)
        if self.dtype not in vit.DTYPES:
            raise ValueError(f"{owner}.dtype={self.dtype!r} is not one of {sorted(vit.DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return vit.DTYPES[self.dtype]

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: ``C * temporal_patch_size * P * P``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_dim(self) -> int:
        return self.dim * self.spatial_merge_size**2

    @property
    def block_spec(self) -> vit.BlockSpec:
        return vit.BlockSpec(self.num_heads, self.head_dim, self.act, "layer", self.norm_eps)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Qwen2VLVisionConfig:
        return vit.from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """Qwen2-VL: ``vision`` tower, Qwen2 ``text`` decoder (``qkv_bias=True``), M-RoPE ``mrope_section`` (sums to
    ``text.head_dim // 2``) and the special token ids.

    Example::

        >>> cfg = Qwen2VLConfig.variant("qwen2_vl_7b")
        >>> cfg.mrope_section, cfg.text.head_dim
        ((16, 24, 24), 128)
        >>> Qwen2VLConfig.variant("tiny", mrope_section=(2, 2, 2))
        Traceback (most recent call last):
        ...
        ValueError: Qwen2VLConfig.mrope_section=(2, 2, 2) must sum to text.head_dim // 2 = 8
    """

    vision: Qwen2VLVisionConfig
    text: llama.LlamaConfig
    mrope_section: tuple[int, ...] = (16, 24, 24)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        owner = "Qwen2VLConfig"
        check_sub(owner, "vision", self.vision, Qwen2VLVisionConfig)
        check_sub(owner, "text", self.text, llama.LlamaConfig)
        sections = tuple(self.mrope_section)
        if not sections or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sections
        ):
            raise ValueError(f"{owner}.mrope_section must be positive ints, got {self.mrope_section!r}")
        if sum(sections) != self.text.head_dim // 2:
            raise ValueError(
                f"{owner}.mrope_section={sections} must sum to text.head_dim // 2 = {self.text.head_dim // 2}"
            )
        object.__setattr__(self, "mrope_section", sections)
        if self.vision.out_dim != self.text.dim:
            raise ValueError(
                f"{owner}: vision.out_dim={self.vision.out_dim} must equal text.dim={self.text.dim}"
            )
        if self.text.rope_scaling is not None:
            raise ValueError(f"{owner}.text.rope_scaling must be None (M-RoPE uses plain frequencies)")
        ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        for name in ids:
            check_token_id(owner, name, getattr(self, name), self.text.vocab_size)
        if len({getattr(self, n) for n in ids}) != len(ids):
            raise ValueError(
                f"{owner}: the special token ids {[getattr(self, n) for n in ids]} must be distinct"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Qwen2VLConfig:
        return nested_from_dict(cls, d, {"vision": Qwen2VLVisionConfig, "text": llama.LlamaConfig})

    def to_dict(self) -> dict[str, Any]:
        return nested_to_dict(self)

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> Qwen2VLConfig:
        """A named size from :data:`VARIANTS`; dict overrides of ``vision`` / ``text`` update those fields."""
        if name not in VARIANTS:
            raise ValueError(f"unknown Qwen2-VL variant {name!r}; known: {sorted(VARIANTS)}")
        return cls.from_dict(merge_overrides(VARIANTS[name], overrides))


def _vision(out_dim: int, **kw) -> dict[str, Any]:
    # Every released Qwen2-VL shares the 675M-parameter tower; only the merger's output width changes.
    base = dict(dim=1280, num_layers=32, num_heads=16, mlp_dim=5120, patch_size=14, dtype="bfloat16")
    return {**base, "out_dim": out_dim, **kw}


_TOKENS = dict(
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653
)
_QWEN2 = dict(norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, qkv_bias=True, dtype="bfloat16")

# Published hyperparameters (Qwen/Qwen2-VL-{2B,7B,72B}-Instruct config.json).
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vision=dict(dim=32, num_layers=2, num_heads=4, mlp_dim=128, out_dim=64, patch_size=2),
        text=dict(llama.VARIANTS["tiny"], qkv_bias=True),
        mrope_section=(4, 2, 2),
        image_token_id=120,
        video_token_id=121,
        vision_start_token_id=122,
        vision_end_token_id=123,
    ),
    "qwen2_vl_2b": dict(
        vision=_vision(1536),
        text=dict(
            _QWEN2,
            vocab_size=151936,
            dim=1536,
            num_layers=28,
            num_heads=12,
            num_kv_heads=2,
            mlp_dim=8960,
            tie_embeddings=True,
        ),
        mrope_section=(16, 24, 24),
        **_TOKENS,
    ),
    "qwen2_vl_7b": dict(
        vision=_vision(3584),
        text=dict(
            _QWEN2, vocab_size=152064, dim=3584, num_layers=28, num_heads=28, num_kv_heads=4, mlp_dim=18944
        ),
        mrope_section=(16, 24, 24),
        **_TOKENS,
    ),
    "qwen2_vl_72b": dict(
        vision=_vision(8192),
        text=dict(
            _QWEN2,
            vocab_size=152064,
            dim=8192,
            num_layers=80,
            num_heads=64,
            num_kv_heads=8,
            mlp_dim=29568,
            norm_eps=1e-6,
        ),
        mrope_section=(16, 24, 24),
        **_TOKENS,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# init


def init_boxed(key: torch.Tensor, cfg: Qwen2VLConfig) -> dict[str, Any]:
    """The parameter tree with every leaf boxed as ``nn.Param(value, logical_axes)``."""
    v = cfg.vision
    dtype, std = v.torch_dtype, v.init_std
    k_patch, k_layers, k_fc1, k_fc2, k_text = random.split(key, 5)
    w = random.normal(
        k_patch, (v.dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), dtype
    )
    vision = {
        "patch_embed": {"weight": nn.param(w * std, ("embed", "channels", None, None, None))},
        "layers": [
            vit.init_block(k, v.dim, v.mlp_dim, v.block_spec, qkv_bias=True, std=std, dtype=dtype)
            for k in random.split(k_layers, v.num_layers)
        ],
        "merger": {
            "norm": nn.norms.init_layer_norm(v.dim, dtype=dtype),
            "fc1": nn.linear.init(
                k_fc1, v.merge_dim, v.merge_dim, axes=("embed", "mlp"), bias=True, std=std, dtype=dtype
            ),
            "fc2": nn.linear.init(
                k_fc2, v.merge_dim, v.out_dim, axes=("mlp", "embed"), bias=True, std=std, dtype=dtype
            ),
        },
    }
    return {"vision": vision, "text": llama.init_boxed(k_text, cfg.text)}


def init(key: torch.Tensor, cfg: Qwen2VLConfig) -> dict[str, Any]:
    return nn.unbox(init_boxed(key, cfg))[0]


def abstract(cfg: Qwen2VLConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shapes, axes)`` on the meta device (no memory)."""
    return nn.abstract(init_boxed, random.key(0), cfg)


def logical_axes(cfg: Qwen2VLConfig) -> dict[str, Any]:
    return abstract(cfg)[1]


def default_rules(*, sequence_parallel: bool = True) -> list[tuple[str, Any]]:
    """Llama's rules plus the vision-only names (the patch conv's input channels are never split)."""
    return [*llama.default_rules(sequence_parallel=sequence_parallel), ("channels", None)]


def num_params(cfg: Qwen2VLConfig) -> int:
    """Total parameter count from the abstract tree.

    Example::

        >>> num_params(Qwen2VLConfig.variant("qwen2_vl_7b"))   # Qwen/Qwen2-VL-7B-Instruct
        8291375616
    """
    return pytree.leaf_count(abstract(cfg)[0])


# ----------------------------------------------------------------------------------------------------------------
# vision tower


def _grids(grid_thw: torch.Tensor | Sequence[Sequence[int]], what: str) -> list[tuple[int, int, int]]:
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else [list(r) for r in grid_thw]
    if not all(len(r) == 3 and all(isinstance(x, int) and x > 0 for x in r) for r in rows):
        raise ValueError(f"{what} must be [n, 3] positive ints (t, h, w), got {rows}")
    return [tuple(r) for r in rows]


def vision_positions(grid_thw, spatial_merge_size: int) -> torch.Tensor:
    """``(row, col)`` of every patch in processor order (merge blocks contiguous, frames repeated): ``[N, 2]``.

    Example::

        >>> vision_positions([[1, 2, 4]], 2).tolist()   # two 2x2 blocks side by side
        [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    """
    m = spatial_merge_size
    out = []
    for t, h, w in _grids(grid_thw, "grid_thw"):
        if h % m or w % m:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) is not divisible by spatial_merge_size={m}")
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        # [h/m, m, w/m, m] -> [h/m, w/m, m, m]: the order the processor flattens patches in
        rows, cols = (x.reshape(h // m, m, w // m, m).transpose(1, 2).flatten() for x in (rows, cols))
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


# The tower packs every image of the batch into one sequence [1, N, D] (attention kept per frame by a mask), so
# its dim 0 is not a batch of examples: it stays whole on every rank (the data-parallel ranks each run the tower
# on all the batch's images) and only tensor parallelism splits the work (heads / MLP, and the patches of the
# residual stream under sequence parallelism).
_V_RESIDUAL, _V_BLOCK_IN = vit.activation_names(None)


def _whole(x: Any) -> Any:
    """A DTensor's full value as a plain tensor; anything else unchanged."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def _vision_block(p, x, spec, cos_sin, mask):
    return vit.block(p, x, spec, cos_sin=cos_sin, mask=mask, batch=None)


def vision_apply(
    params: dict[str, Any],
    cfg: Qwen2VLVisionConfig,
    pixel_values: torch.Tensor,
    grid_thw,
    *,
    remat_policy: Any = None,
) -> torch.Tensor:
    """``pixel_values: [N, patch_dim]`` of the images/videos in ``grid_thw: [n, 3]`` -> merged tokens
    ``[N / merge**2, out_dim]``. Attention stays within each frame of each image (transformers' ``cu_seqlens``);
    ``remat_policy`` checkpoints each block (:func:`functional_mm.autodiff.remat`).

    On a mesh the patches of all images form one sequence that is whole on every data-parallel rank (sharded
    ``pixel_values`` / ``grid_thw`` are gathered first); ``tp`` splits the heads and the MLP (and the patches of
    the residual stream under sequence parallelism). The merged tokens come back replicated."""
    pixel_values, grid_thw = _whole(pixel_values), _whole(grid_thw)
    grids = _grids(grid_thw, "grid_thw")
    n = sum(t * h * w for t, h, w in grids)
    if pixel_values.dim() != 2 or pixel_values.shape != (n, cfg.patch_dim):
        raise ValueError(
            f"pixel_values must be [sum(t*h*w)={n}, patch_dim={cfg.patch_dim}] for grid_thw {grids}, "
            f"got {list(pixel_values.shape)}"
        )
    ctx = parallelism.current()
    if ctx is not None:
        vit.check_layout(cfg, *ctx, what="Qwen2-VL vision")
    w = parallelism.use_param(params["patch_embed"]["weight"])  # gathered over the data axes at use
    # The 3-D conv with kernel = stride = patch is a matmul over the flattened (C, T, P, P) patch.
    px = constrain(pixel_values.to(w.dtype), ("act_seq", None))
    x = constrain(F.linear(px, w.reshape(w.shape[0], -1))[None], _V_RESIDUAL)  # [1, N, D]
    pos = vision_positions(grids, cfg.spatial_merge_size).to(x.device)
    inv = nn.rope.frequencies(cfg.head_dim // 2, cfg.rope_theta)
    # [1, N, Dh] each; whole along the patches, like the attention's input
    cos_sin = tuple(
        constrain(c, (None, "act_seq", None)) for c in nn.rope.cos_sin_axial(pos[None], inv, x.dtype)
    )
    mask = None
    lengths = [h * w for t, h, w in grids for _ in range(t)]
    if len(lengths) > 1 and ctx is None and len(set(lengths)) == 1:
        # Frames of one size (fixed-size images, one bucket): a batch of F frames with no mask, F times less
        # attention work than one masked [N, N] sequence. The mesh path keeps the single sequence (its layout
        # splits the patch dim).
        f, d = len(lengths), x.shape[-1]
        x = x.reshape(f, lengths[0], d)  # [F, L, D]: frames are contiguous in processor order
        cos_sin = tuple(c.reshape(f, lengths[0], -1) for c in cos_sin)
        lengths = [n]
    if len(lengths) > 1:  # one segment per frame; a full [N, N] mask is the price of a single sdpa call
        seg = torch.repeat_interleave(
            torch.arange(len(lengths), device=x.device), torch.tensor(lengths, device=x.device)
        )
        mask = (seg[:, None] == seg[None, :])[None, None]  # [1, 1, N, N]
        mask = constrain(mask, (None, None, "act_seq", None))
    block = autodiff.remat(_vision_block, remat_policy)
    for p in params["layers"]:
        x = block(p, x, cfg.block_spec, cos_sin, mask)
    m = parallelism.use_params(params["merger"])
    # The merger groups m x m neighbouring patches: it needs them all (gathered along the patches under tp).
    x = constrain(x, _V_BLOCK_IN).reshape(n, -1)
    x = nn.norms.layer_norm(m["norm"], x, cfg.norm_eps).reshape(-1, cfg.merge_dim)  # [N / m^2, m^2 D]
    x = nn.linear.apply(m["fc2"], F.gelu(nn.linear.apply(m["fc1"], x)))  # column- then row-parallel
    return constrain(x, _V_BLOCK_IN[1:])  # replicated: every rank's rows pick their images' tokens


# ----------------------------------------------------------------------------------------------------------------
# position ids


def rope_index(
    tokens: torch.Tensor,
    cfg: Qwen2VLConfig,
    *,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids ``[3, B, T]`` and the per-row offset ``[B, 1]`` generation continues from
    (``max position + 1 - number of real tokens``).

    Text advances all three ids by one per token. A vision item starting at position ``s`` gives its tokens
    ``(s + frame, s + row, s + col)`` in merged-grid units, and the text after it starts at one past the largest
    id it used. Images and videos are consumed in prompt order from ``image_grid_thw`` / ``video_grid_thw``
    (a run of placeholders may hold several items back to back). Padding (``attention_mask == 0``) gets 0.

    This is the original Qwen2-VL rule (and transformers 4.x). transformers 5.x resumes text after a video at
    ``s + max(h, w) / merge`` instead, which overlaps the video's temporal ids when it has more temporal patches
    than merged rows/columns; both agree in every other case (all images).
    """
    check_tokens(tokens)
    b, t = tokens.shape
    m = cfg.vision.spatial_merge_size
    queues = {
        cfg.image_token_id: list(_grids(image_grid_thw, "image_grid_thw"))
        if image_grid_thw is not None
        else [],
        cfg.video_token_id: list(_grids(video_grid_thw, "video_grid_thw"))
        if video_grid_thw is not None
        else [],
    }
    names = {cfg.image_token_id: "image", cfg.video_token_id: "video"}
    positions = torch.zeros(3, b, t, dtype=torch.long)
    deltas = torch.zeros(b, 1, dtype=torch.long)
    valid_all = None if attention_mask is None else (attention_mask != 0).cpu()
    for row in range(b):
        valid = torch.ones(t, dtype=torch.bool) if valid_all is None else valid_all[row]
        ids = tokens[row].cpu()[valid].tolist()
        parts, start, i = [], 0, 0
        while i < len(ids):
            tok = ids[i]
            if tok in queues:
                if not queues[tok]:
                    raise ValueError(
                        f"the prompt has more {names[tok]} placeholders than {names[tok]}_grid_thw rows"
                    )
                gt, gh, gw = queues[tok].pop(0)
                gh, gw = gh // m, gw // m
                count = gt * gh * gw
                if ids[i : i + count] != [tok] * count:
                    raise ValueError(
                        f"row {row}: a {names[tok]} with grid ({gt}, {gh * m}, {gw * m}) needs {count} consecutive "
                        f"placeholder tokens at position {i}"
                    )
                tt, hh, ww = torch.meshgrid(
                    torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij"
                )
                block = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + start  # [3, count]
                parts.append(block)
                start = int(block.max()) + 1
                i += count
            else:
                j = i
                while j < len(ids) and ids[j] not in queues:
                    j += 1
                parts.append(torch.arange(start, start + j - i).expand(3, -1))
                start += j - i
                i = j
        pos = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        positions[:, row, valid] = pos
        deltas[row, 0] = (int(pos.max()) + 1 if pos.numel() else 0) - len(ids)
    left = {names[k]: len(q) for k, q in queues.items() if q}
    if left:
        raise ValueError(f"grid_thw rows without placeholders in the prompt: {left}")
    return positions.to(tokens.device), deltas.to(tokens.device)


# ----------------------------------------------------------------------------------------------------------------
# decoder


def _mrope(cfg: Qwen2VLConfig, positions: torch.Tensor, dtype: torch.dtype):
    inv = nn.rope.frequencies(cfg.text.head_dim, cfg.text.rope_theta)
    return nn.rope.cos_sin_mrope(positions, inv, cfg.mrope_section, dtype)  # [B, T, Dh] each


def _block(p, x, cfg: llama.LlamaConfig, cos_sin, mask, is_causal, cache=None, cache_index=None):
    """A Qwen2 block (pre-norm RMSNorm, GQA attention with biases, SwiGLU): ``[B, T, D] -> [B, T, D]``."""
    h, new_cache = nn.attention.apply(
        p["attn"],
        nn.norms.rms_norm(p["attn_norm"], x, cfg.norm_eps),
        head_dim=cfg.head_dim,
        cos_sin=cos_sin,
        mask=mask,
        is_causal=is_causal,
        cache=cache,
        cache_index=cache_index,
    )
    x = x + h
    return x + nn.mlp.gated(p["mlp"], nn.norms.rms_norm(p["mlp_norm"], x, cfg.norm_eps)), new_cache


def _head(params, cfg: llama.LlamaConfig, x: torch.Tensor) -> torch.Tensor:
    x = nn.norms.rms_norm(params["final_norm"], x, cfg.norm_eps)
    if cfg.tie_embeddings:
        return nn.embedding.attend(params["embed"], x)
    return nn.linear.apply(params["lm_head"], x)


def _features(params, cfg: Qwen2VLConfig, pixel_values, grid_thw, what: str, remat_policy):
    if pixel_values is None:
        return None
    if grid_thw is None:
        raise ValueError(f"{what} pixel values need {what}_grid_thw")
    return vision_apply(params["vision"], cfg.vision, pixel_values, grid_thw, remat_policy=remat_policy)


def embed_inputs(
    params: dict[str, Any],
    cfg: Qwen2VLConfig,
    tokens: torch.Tensor,
    *,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw=None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw=None,
    remat_policy: Any = None,
) -> torch.Tensor:
    """Token embeddings with image and video features written over their placeholders: ``[B, T, D]``.

    On a mesh the result is laid out like the decoder's residual stream (rows over the data axes, the sequence
    over ``tp`` under sequence parallelism; the embedding is vocab-parallel) and each rank writes the features
    of its own positions."""
    check_tokens(tokens)
    whole = _whole(tokens)  # the placeholder positions are read on the host: the ids stay whole
    # F.embedding (not table[ids]): DTensor splits it over a vocab-parallel table (masked lookup + sum).
    x = F.embedding(
        constrain(whole, ("act_batch", "act_seq")), parallelism.use_param(params["text"]["embed"]["weight"])
    )
    x = constrain(x, llama._RESIDUAL)  # [B, T, D]
    for token_id, px, grid, what in (
        (cfg.image_token_id, pixel_values, image_grid_thw, "image"),
        (cfg.video_token_id, pixel_values_videos, video_grid_thw, "video"),
    ):
        feats = _features(params, cfg, px, grid, what, remat_policy)
        if feats is not None:
            x = merge_embeddings(x, whole, token_id, feats, what)
    # A host check (a sync, a graph break under torch.compile, where apply has made it before any tensor math)
    if not torch.compiler.is_compiling():
        _check_pixels_given(cfg, whole, pixel_values, pixel_values_videos)
    return x


def _check_pixels_given(cfg: Qwen2VLConfig, tokens: torch.Tensor, pixel_values, pixel_values_videos) -> None:
    for token_id, px, what in (
        (cfg.image_token_id, pixel_values, "image"),
        (cfg.video_token_id, pixel_values_videos, "video"),
    ):
        if px is None and bool((tokens == token_id).any()):
            raise ValueError(f"tokens hold {what} placeholders but no {what} pixel values were given")


def _positions(cfg, tokens, positions, attention_mask, image_grid_thw, video_grid_thw):
    if positions is None:
        return rope_index(
            tokens,
            cfg,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
        )[0]
    if positions.dim() == 2:  # plain 1-D positions: the same id on all three axes
        positions = positions[None].expand(3, -1, -1)
    if positions.dim() != 3 or positions.shape[0] != 3 or positions.shape[1:] != tokens.shape:
        raise ValueError(
            f"positions must be [3, B, T] or [B, T] for tokens {list(tokens.shape)}, "
            f"got {list(positions.shape)}"
        )
    return positions


def apply(
    params: dict[str, Any],
    cfg: Qwen2VLConfig,
    tokens: torch.Tensor,
    *,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw=None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw=None,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    remat_policy: Any = None,
    return_hidden: bool = False,
) -> torch.Tensor:
    """Logits ``[B, T, V]``. ``positions`` default to :func:`rope_index` (pass ``[3, B, T]`` to override);
    ``attention_mask: [B, T]`` hides padding keys (left or right); ``remat_policy`` (see
    :func:`functional_mm.autodiff.remat`) checkpoints each decoder and vision block; ``return_hidden`` as in
    :func:`functional_mm.models.llama.apply`.

    On a mesh (inside :func:`functional_mm.parallelism.use_mesh`, params placed with :func:`default_rules`)
    the decoder runs like :func:`functional_mm.models.llama.apply` (FSDP, Megatron TP with sequence
    parallelism, vocab-parallel logits) and the vision tower as :func:`vision_apply` says. The batch may be
    plain (the global batch, identical on every rank) or placed by ``shard_batch``: the inputs that only
    shape the computation (ids, masks, positions, grids, pixels) are read whole."""
    ctx = parallelism.current()
    if ctx is not None:
        llama.check_layout(cfg.text, *ctx)
    elif isinstance(params["text"]["embed"]["weight"], DTensor):
        raise ValueError(
            "qwen2_vl.apply: the parameters are sharded (DTensors); call it inside "
            "parallelism.use_mesh(mesh, rules) so activations get their layouts"
        )
    tokens, attention_mask, positions, image_grid_thw, video_grid_thw = (
        _whole(v) for v in (tokens, attention_mask, positions, image_grid_thw, video_grid_thw)
    )
    # The host work first (grids read as ints, the M-RoPE ids walked in Python): under torch.compile these are
    # graph breaks, and with none after them the tower and the decoder compile as one graph.
    if image_grid_thw is not None:
        image_grid_thw = _grids(image_grid_thw, "image_grid_thw")
    if video_grid_thw is not None:
        video_grid_thw = _grids(video_grid_thw, "video_grid_thw")
    positions = _positions(cfg, tokens, positions, attention_mask, image_grid_thw, video_grid_thw)
    _check_pixels_given(cfg, tokens, pixel_values, pixel_values_videos)
    x = embed_inputs(
        params,
        cfg,
        tokens,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
        remat_policy=remat_policy,
    )
    b, t = tokens.shape
    mask, is_causal = None, True
    if attention_mask is not None:
        slots = torch.arange(t, device=x.device).expand(b, t)
        mask, is_causal = nn.attention.make_mask(slots, slots, kv_valid=attention_mask != 0), False
        mask = constrain(mask, ("act_batch", None, "act_seq", None))
    cos_sin = tuple(constrain(c, ("act_batch", "act_seq", None)) for c in _mrope(cfg, positions, x.dtype))
    # llama's block and head: Qwen2's (qkv_bias is in the weights), with the weights gathered at use and the
    # activations pinned (no-ops without a mesh).
    block = autodiff.remat(llama._block_no_cache, remat_policy)
    for p in params["text"]["layers"]:
        x = block(p, x, cfg.text, cos_sin, mask, is_causal)
    return x if return_hidden else llama._head(params["text"], x, cfg.text)


_BATCH_KEYS = (
    "tokens",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "loss_mask",
    "attention_mask",
    "positions",
)


def loss(
    params: dict[str, Any], cfg: Qwen2VLConfig, batch: Mapping[str, Any], *, remat_policy: Any = None
) -> torch.Tensor:
    """Mean next-token cross entropy over the text targets (vision placeholders are never targets).

    ``batch``: ``tokens`` and optionally the image/video inputs of :func:`apply`, ``loss_mask``,
    ``attention_mask`` and ``positions``. Token ``t+1`` is a target when its loss mask is set, both it and
    token ``t`` are real (``attention_mask``) and it is not a placeholder
    (:func:`functional_mm.models.llama.next_token_targets`). The loss is
    :func:`functional_mm.models.llama.target_loss`: only the target positions reach the head; under ``tp``
    the cross entropy is vocab-parallel and the ``[B, T, V]`` logits are never gathered."""
    # Every input is read whole (gathered once here if shard_batch placed it): apply slices what it splits.
    whole = {k: _whole(v) for k, v in batch.items()}
    ignore = (cfg.image_token_id, cfg.video_token_id)
    return batch_loss(apply, params, cfg, whole, _BATCH_KEYS, ignore, remat_policy=remat_policy)


# ----------------------------------------------------------------------------------------------------------------
# cached decoding


def init_cache(cfg: Qwen2VLConfig, batch: int, max_len: int, dtype=None, device=None) -> dict[str, Any]:
    """An empty fixed-size KV cache (the layout of :func:`functional_mm.models.llama.init_cache`)."""
    return llama.init_cache(cfg.text, batch, max_len, dtype=dtype, device=device)


def decode(
    params: dict[str, Any],
    cfg: Qwen2VLConfig,
    inputs_embeds: torch.Tensor,
    cache: dict[str, Any],
    positions: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run ``inputs_embeds: [B, T, D]`` at M-RoPE ``positions: [3, B, T]`` on top of ``cache``:
    ``-> (logits [B, T, V], new_cache)``. The new keys/values go to slots ``cache["index"] .. + T``."""
    b, t, _ = inputs_embeds.shape
    s = cache["valid"].shape[1]
    if not torch.compiler.is_compiling() and int(cache["index"]) + t > s:
        raise ValueError(f"cache is full: {int(cache['index'])} slots used + {t} new tokens > max_len {s}")
    new_valid = (
        torch.ones(b, t, dtype=torch.bool, device=inputs_embeds.device)
        if attention_mask is None
        else attention_mask != 0
    )
    slots = cache["index"] + torch.arange(t, device=inputs_embeds.device)  # [T]
    valid = cache["valid"].index_copy(1, slots, new_valid)  # [B, S]
    mask = nn.attention.make_mask(
        slots.expand(b, t), torch.arange(s, device=inputs_embeds.device).expand(b, s), kv_valid=valid
    )  # [B, 1, T, S]
    cos_sin = _mrope(cfg, positions, inputs_embeds.dtype)
    x, layers = inputs_embeds, []
    for p, layer_cache in zip(params["text"]["layers"], cache["layers"]):
        x, new_layer_cache = _block(p, x, cfg.text, cos_sin, mask, False, layer_cache, slots)
        layers.append(new_layer_cache)
    return _head(params["text"], cfg.text, x), {"layers": layers, "valid": valid, "index": cache["index"] + t}


def generate(
    params: dict[str, Any],
    cfg: Qwen2VLConfig,
    tokens: torch.Tensor,
    *,
    max_new_tokens: int,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw=None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw=None,
    attention_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    pad_token: int = 0,
    on_token: Callable[[torch.Tensor], Any] | None = None,
) -> torch.Tensor:
    """Generation with a fixed-size KV cache: ``[B, T] -> [B, T + n]``, ``n <= max_new_tokens``.

    The prompt is prefilled at its :func:`rope_index` positions; each generated token then takes the next id
    (``max prompt id + 1 + step``) on all three axes, as HF ``generate`` does. ``temperature=0`` is greedy;
    sampling (``key``, ``temperature``, ``top_k``, ``top_p``), ``stop_tokens`` / ``pad_token`` and the
    streaming callback ``on_token`` are those of :func:`functional_mm.models.llava.generate`.
    """
    llama.check_sampling(max_new_tokens, key, temperature, top_k, top_p, on_token)
    b, t = tokens.shape
    with torch.no_grad():
        x = embed_inputs(
            params,
            cfg,
            tokens,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
        )
        positions, deltas = rope_index(
            tokens,
            cfg,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
        )
        n_real = (
            (attention_mask != 0).sum(-1, keepdim=True)
            if attention_mask is not None
            else torch.full_like(deltas, t)
        )
        cache = init_cache(cfg, b, t + max_new_tokens, dtype=x.dtype, device=tokens.device)
        logits, cache = decode(params, cfg, x, cache, positions, attention_mask=attention_mask)
        state = {"cache": cache, "next": n_real + deltas}  # [B, 1]: the id the next token takes

        def step(nxt: torch.Tensor) -> torch.Tensor:
            e = F.embedding(nxt.to(tokens.dtype), params["text"]["embed"]["weight"])
            pos = state["next"][None].expand(3, -1, -1)  # [3, B, 1]
            out, state["cache"] = decode(params, cfg, e, state["cache"], pos)
            state["next"] = state["next"] + 1
            return out

        new = llama.decode_loop(
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
    return torch.cat([tokens, new.to(tokens.dtype)], dim=1)
