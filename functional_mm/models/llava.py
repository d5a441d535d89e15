"""LLaVA 1.5 as a pure function: a CLIP (or SigLIP) vision tower, a two-layer GELU projector and a Llama decoder.

The image goes through the tower; the hidden state of ``feature_layers`` (LLaVA 1.5: the second-to-last block)
minus the CLS token (``feature_select="default"``) is projected into the text embedding space and written over
the image placeholder tokens of the prompt; the decoder (:func:`functional_mm.models.llama.apply` with
``inputs_embeds``) does the rest. The prompt must already hold ``num_image_tokens`` placeholders per image
(:func:`expand_image_tokens` does what the HF processor does to a single ``<image>``).

This module also holds the glue the other VLMs reuse: :func:`merge_embeddings`, :func:`batch_loss` and the
nested-config helpers.

On a mesh (inside :func:`functional_mm.parallelism.use_mesh`, params placed with :func:`default_rules`) the
decoder runs as :func:`functional_mm.models.llama.apply` does (FSDP, Megatron TP with sequence parallelism, a
vocab-parallel embedding and loss) and the tower as :func:`functional_mm.models.vit.apply` does (images split
over the data axes); the projected features are then made whole on every rank and each rank writes those of
its own positions (:func:`merge_embeddings`).

Parameter tree::

    vision/...                       the ViT tree (functional_mm.models.vit)
    projector/fc1/{weight,bias}      [Dt, Dv * n_layers]   ("mlp", "embed")
    projector/fc2/{weight,bias}      [Dt, Dt]              ("embed", "mlp")
    text/...                         the Llama tree (functional_mm.models.llama)

Example::

    >>> import torch
    >>> from functional_mm import random
    >>> from functional_mm.models import llava
    >>> cfg = llava.LlavaConfig.variant("tiny")
    >>> params = llava.init(random.key(0), cfg)
    >>> prompt = [1, 5, cfg.image_token_id, 6, 7]                       # one <image> placeholder
    >>> tokens = torch.tensor([llava.expand_image_tokens(prompt, cfg)])  # [1, 4 + 16]
    >>> pixels = torch.randn(1, 3, 16, 16)
    >>> llava.apply(params, cfg, tokens, pixels).shape                  # [B, T, V]
    torch.Size([1, 20, 128])
    >>> out = llava.generate(params, cfg, tokens, pixels, max_new_tokens=3)   # greedy, [1, 20 + 3]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from functional_mm import nn, parallelism, pytree, random
from functional_mm.models import llama, vit
from functional_mm.parallelism import constrain

__all__ = [
    "LlavaConfig",
    "VARIANTS",
    "init_boxed",
    "init",
    "abstract",
    "logical_axes",
    "default_rules",
    "image_features",
    "project",
    "expand_image_tokens",
    "merge_embeddings",
    "embed_inputs",
    "apply",
    "loss",
    "generate",
    "generate_from_embeds",
    "num_params",
]


# ----------------------------------------------------------------------------------------------------------------
# shared VLM helpers


def nested_from_dict(cls, d: Mapping[str, Any], sub: Mapping[str, type]):
    """Build config ``cls`` from a dict whose ``sub`` fields are configs or dicts of them; unknown fields fail."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(
            f"{cls.__name__}.from_dict: unknown field(s) {unknown}; known fields: {sorted(known)}"
        )
    d = dict(d)
    for name, sub_cls in sub.items():
        if isinstance(d.get(name), Mapping):
            d[name] = sub_cls.from_dict(d[name])
    return cls(**d)


def nested_to_dict(cfg) -> dict[str, Any]:
    """A plain dict (sub-configs as dicts) that :func:`nested_from_dict` reads back."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = v.to_dict() if hasattr(v, "to_dict") else (list(v) if isinstance(v, tuple) else v)
    return out


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overrides``; a dict override of a dict field updates it (``text={"num_layers": 1}``)."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = {**out[k], **v} if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def check_sub(owner: str, name: str, value: Any, cls: type) -> None:
    if not isinstance(value, cls):
        raise ValueError(
            f"{owner}.{name} must be a {cls.__name__} (or a dict of one), got {type(value).__name__}"
        )


def check_token_id(owner: str, name: str, value: Any, vocab_size: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise ValueError(f"{owner}.{name}={value!r} must be an int in [0, vocab_size={vocab_size})")


def check_tokens(tokens: Any, name: str = "tokens") -> None:
    """``tokens`` must be an integer tensor ``[B, T]`` with ``T >= 1``."""
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.dtype == torch.bool:
        got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise TypeError(f"{name} must be an integer torch.Tensor [B, T], got {got}")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"{name} must have shape [B, T] with T >= 1, got {list(tokens.shape)}")


def merge_embeddings(
    embeds: torch.Tensor, tokens: torch.Tensor, token_id: int, features: torch.Tensor, what: str = "image"
) -> torch.Tensor:
    """Write ``features: [n, D]`` (in order) over the positions of ``embeds: [B, T, D]`` where ``tokens == token_id``.

    Out of place and differentiable in both ``embeds`` and ``features``, with the values and gradients of
    ``masked_scatter`` (what transformers does), but written as a gather, which also works on DTensors: each
    position picks the feature row given by the running count of placeholders before it, and ``torch.where``
    keeps the text embedding elsewhere. On a mesh ``embeds`` is laid out like the decoder's residual stream
    (rows over the data axes, the sequence over ``tp`` under sequence parallelism), ``tokens`` are read whole and
    ``features`` (any leading shape, e.g. ``[n_images, N, D]`` split over the images) are made whole on every
    rank: a row may hold images another rank's tower ran. Each rank then fills its own slice of ``embeds``.

    Example::

        >>> e = torch.zeros(1, 4, 2)
        >>> merge_embeddings(e, torch.tensor([[0, 9, 9, 0]]), 9, torch.ones(2, 2))[0, :, 0].tolist()
        [0.0, 1.0, 1.0, 0.0]
    """
    tokens = llama._whole(tokens)  # the placeholder positions are read on the host: the ids stay whole
    slots = tokens == token_id  # [B, T]
    features = constrain(features, (None,) * features.dim())  # whole (all-gathered if split over images)
    features = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)  # [n, D]
    # The count check syncs with the host, which a compiled step must not do; eager calls keep it.
    if not torch.compiler.is_compiling() and (n := int(slots.sum())) != features.shape[0]:
        raise ValueError(
            f"the prompt has {n} {what} placeholder tokens (id {token_id}) but there are {features.shape[0]} "
            f"{what} feature vectors; expand each placeholder to the {what}'s token count first"
        )
    if features.shape[0] == 0:
        return embeds
    # The feature row of each slot; positions that are not slots pick row 0 and are dropped by the where (their
    # zero gradient adds nothing to row 0).
    index = (slots.flatten().long().cumsum(0) - 1).clamp(min=0).view_as(slots)  # [B, T]
    names = llama._RESIDUAL[:2]  # split like the rows and positions of embeds
    picked = F.embedding(constrain(index, names), features)  # [B, T, D]
    return torch.where(constrain(slots, names)[..., None], picked, embeds)


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """A LLaVA model: ``vision`` tower, ``text`` decoder and the glue between them.

    ``feature_layers`` are HF-indexed vision hidden states (``(-2,)`` for LLaVA 1.5; several are concatenated
    along features); ``feature_select`` is ``"default"`` (drop the CLS token) or ``"full"``.

    Example::

        >>> cfg = LlavaConfig.variant("llava1.5_7b")
        >>> cfg.num_image_tokens, cfg.text.vocab_size
        (576, 32064)
        >>> LlavaConfig.variant("tiny", text={"num_layers": 1}).text.num_layers
        1
    """

    vision: vit.ViTConfig
    text: llama.LlamaConfig
    image_token_id: int
    feature_layers: tuple[int, ...] = (-2,)
    feature_select: str = "default"
    projector_act: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self):
        check_sub("LlavaConfig", "vision", self.vision, vit.ViTConfig)
        check_sub("LlavaConfig", "text", self.text, llama.LlamaConfig)
        check_token_id("LlavaConfig", "image_token_id", self.image_token_id, self.text.vocab_size)
        layers = self.feature_layers
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(
                f"LlavaConfig.feature_layers must be a non-empty sequence of ints, got {layers!r}"
            )
        for i in layers:
            if not -(self.vision.num_layers + 1) <= i <= self.vision.num_layers:
                raise ValueError(
                    f"LlavaConfig.feature_layers: {i} is out of range for a {self.vision.num_layers}-layer tower"
                )
        object.__setattr__(self, "feature_layers", layers)
        if self.feature_select not in ("default", "full"):
            raise ValueError(f"LlavaConfig.feature_select={self.feature_select!r} is not 'default' or 'full'")
        if self.feature_select == "default" and not self.vision.class_token:
            raise ValueError("LlavaConfig.feature_select='default' drops the CLS token; this tower has none")
        nn.mlp.activation(self.projector_act)
        if not isinstance(self.projector_bias, bool):
            raise ValueError(f"LlavaConfig.projector_bias must be a bool, got {self.projector_bias!r}")

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image in the expanded prompt."""
        drop = int(self.feature_select == "default" and self.vision.class_token)
        return self.vision.seq_len - drop

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlavaConfig:
        return nested_from_dict(cls, d, {"vision": vit.ViTConfig, "text": llama.LlamaConfig})

    def to_dict(self) -> dict[str, Any]:
        return nested_to_dict(self)

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> LlavaConfig:
        """A named size from :data:`VARIANTS`; dict overrides of ``vision`` / ``text`` update those fields."""
        if name not in VARIANTS:
            raise ValueError(f"unknown LLaVA variant {name!r}; known: {sorted(VARIANTS)}")
        return cls.from_dict(merge_overrides(VARIANTS[name], overrides))


VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(vision=vit.VARIANTS["clip_tiny"], text=llama.VARIANTS["tiny"], image_token_id=127),
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B v1.5 (Llama 2 7B, vocab 32064 with <image> = 32000).
    "llava1.5_7b": dict(
        vision=dict(vit.VARIANTS["clip_vit_l14_336"], dtype="bfloat16"),
        text=dict(llama.VARIANTS["llama2_7b"], vocab_size=32064, norm_eps=1e-5),
        image_token_id=32000,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# init


def init_boxed(key: torch.Tensor, cfg: LlavaConfig) -> dict[str, Any]:
    """The parameter tree with every leaf boxed as ``nn.Param(value, logical_axes)``."""
    k_vis, k_fc1, k_fc2, k_text = random.split(key, 4)
    dv = cfg.vision.dim * len(cfg.feature_layers)
    dt, dtype, std = cfg.text.dim, cfg.text.torch_dtype, cfg.text.init_std
    kw = dict(bias=cfg.projector_bias, std=std, dtype=dtype)
    return {
        "vision": vit.init_boxed(k_vis, cfg.vision),
        "projector": {
            "fc1": nn.linear.init(k_fc1, dv, dt, axes=("embed", "mlp"), **kw),
            "fc2": nn.linear.init(k_fc2, dt, dt, axes=("mlp", "embed"), **kw),
        },
        "text": llama.init_boxed(k_text, cfg.text),
    }


def init(key: torch.Tensor, cfg: LlavaConfig) -> dict[str, Any]:
    return nn.unbox(init_boxed(key, cfg))[0]


def abstract(cfg: LlavaConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shapes, axes)`` on the meta device (no memory)."""
    return nn.abstract(init_boxed, random.key(0), cfg)


def logical_axes(cfg: LlavaConfig) -> dict[str, Any]:
    return abstract(cfg)[1]


def default_rules(*, sequence_parallel: bool = True) -> list[tuple[str, Any]]:
    """Llama's rules plus the vision-only names (the patch conv's input channels are never split)."""
    return [*llama.default_rules(sequence_parallel=sequence_parallel), ("channels", None)]


def num_params(cfg: LlavaConfig) -> int:
    """Total parameter count from the abstract tree.

    Example::

        >>> num_params(LlavaConfig.variant("llava1.5_7b"))   # llava-hf/llava-1.5-7b-hf
        7063427072
    """
    return pytree.leaf_count(abstract(cfg)[0])


# ----------------------------------------------------------------------------------------------------------------
# forward


def image_features(
    params: dict[str, Any], cfg: LlavaConfig, pixel_values: torch.Tensor, *, remat_policy: Any = None
) -> torch.Tensor:
    """``pixel_values: [n, C, H, W] -> [n, num_image_tokens, D_text]`` (tower, layer selection, projector)."""
    states = vit.hidden_states(
        params["vision"], cfg.vision, pixel_values, cfg.feature_layers, remat_policy=remat_policy
    )
    if cfg.feature_select == "default":
        states = [s[:, 1:] for s in states]  # drop CLS
    x = torch.cat(states, dim=-1) if len(states) > 1 else states[0]  # [n, N, Dv * n_layers]
    return project(params["projector"], cfg.projector_act, x)


# Layout of the projected image features ``[n, N, D]``: the images split like the batch, the rest whole.
_FEATURES = vit.activation_names()[1]


def project(p: dict[str, Any], act: str, x: torch.Tensor) -> torch.Tensor:
    """The two-layer projector ``fc2(act(fc1(x)))`` (``p`` may hold a ``norm`` applied first, InternVL's):
    ``[n, N, Dv] -> [n, N, D]``. On a mesh the weights are gathered over the data axes at use and split over
    ``tp`` (fc1 column-, fc2 row-parallel); the output keeps the images split like the batch and is whole
    otherwise (all-reduced under tp)."""
    p = parallelism.use_params(p)
    if "norm" in p:
        x = nn.norms.layer_norm(p["norm"], x)  # nn.LayerNorm's default eps (1e-5), as in transformers
    x = nn.linear.apply(p["fc2"], nn.mlp.activation(act)(nn.linear.apply(p["fc1"], x)))
    return constrain(x, _FEATURES)


def expand_image_tokens(tokens: Sequence[int], cfg: LlavaConfig) -> list[int]:
    """Repeat every image placeholder ``num_image_tokens`` times (what ``LlavaProcessor`` does to ``<image>``).

    Example::

        >>> cfg = LlavaConfig.variant("tiny")
        >>> len(expand_image_tokens([1, cfg.image_token_id, 2], cfg))
        18
    """
    out: list[int] = []
    for t in tokens:
        t = int(t)
        out.extend([t] * cfg.num_image_tokens if t == cfg.image_token_id else [t])
    return out


def embed_inputs(
    params: dict[str, Any],
    cfg: LlavaConfig,
    tokens: torch.Tensor,
    pixel_values: torch.Tensor | None,
    *,
    remat_policy: Any = None,
) -> torch.Tensor:
    """Text embeddings with the image features written over the placeholders: ``[B, T, D_text]``."""
    return embed_with_images(params, cfg, tokens, pixel_values, image_features, remat_policy=remat_policy)


def embed_with_images(
    params: dict[str, Any],
    cfg: Any,
    tokens: torch.Tensor,
    pixel_values: torch.Tensor | None,
    features_fn: Callable[..., torch.Tensor],
    *,
    remat_policy: Any = None,
) -> torch.Tensor:
    """Embed ``tokens`` with ``params["text"]["embed"]`` and write ``features_fn(params, cfg, pixel_values)`` over
    the ``cfg.image_token_id`` placeholders. Shared by the LLaVA-style VLMs' ``embed_inputs``.

    On a mesh the embedding is Llama's (vocab-parallel under ``tp``, laid out like the residual stream);
    ``tokens`` may come plain or placed by ``shard_batch`` (read whole), ``pixel_values`` too (the tower splits
    the images over the data axes)."""
    check_tokens(tokens)
    _check_mesh(params, "embed_with_images")
    tokens = llama._whole(tokens)
    x = llama._embed_inputs(params["text"], cfg.text, tokens, None)  # [B, T, D]
    if pixel_values is None:
        if bool((tokens == cfg.image_token_id).any()):
            raise ValueError("tokens hold image placeholders but no pixel_values were given")
        return x
    return merge_embeddings(
        x, tokens, cfg.image_token_id, features_fn(params, cfg, pixel_values, remat_policy=remat_policy)
    )


def _check_mesh(params: dict[str, Any], who: str) -> None:
    if parallelism.current() is None and isinstance(params["text"]["embed"]["weight"], DTensor):
        raise ValueError(
            f"{who}: the parameters are sharded (DTensors); call it inside parallelism.use_mesh(mesh, rules) so "
            "activations get their layouts"
        )


def apply(
    params: dict[str, Any],
    cfg: LlavaConfig,
    tokens: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    remat_policy: Any = None,
    return_hidden: bool = False,
) -> torch.Tensor:
    """Logits ``[B, T, V]``. ``tokens: [B, T]`` hold ``num_image_tokens`` placeholders per image, images in row
    order; ``pixel_values: [n_images, C, H, W]``. ``attention_mask`` / ``positions`` / ``return_hidden`` as in
    :func:`functional_mm.models.llama.apply` (padding-aware positions by default)."""
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


def apply_with(
    embed_fn: Callable[..., torch.Tensor],
    params: dict[str, Any],
    cfg: Any,
    tokens: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    remat_policy: Any = None,
    return_hidden: bool = False,
) -> torch.Tensor:
    """Logits of the Llama decoder ``params["text"]`` run on ``embed_fn(params, cfg, tokens, pixel_values)``.
    Shared by the LLaVA-style VLMs' ``apply``. On a mesh the decoder runs as
    :func:`functional_mm.models.llama.apply` does (logits vocab-parallel under ``tp``)."""
    _check_mesh(params, "apply")
    ctx = parallelism.current()
    if ctx is not None:  # before any collective: a head cut in two fails here, on every rank alike
        llama.check_layout(cfg.text, *ctx)
    x = embed_fn(params, cfg, tokens, pixel_values, remat_policy=remat_policy)
    return llama.apply(
        params["text"],
        cfg.text,
        None,
        inputs_embeds=x,
        attention_mask=attention_mask,
        positions=positions,
        remat_policy=remat_policy,
        return_hidden=return_hidden,
    )


_BATCH_KEYS = ("tokens", "pixel_values", "loss_mask", "attention_mask", "positions")


def loss(
    params: dict[str, Any], cfg: LlavaConfig, batch: Mapping[str, torch.Tensor], *, remat_policy: Any = None
):
    """Mean next-token cross entropy over the text targets (image placeholders are never targets).

    ``batch``: ``tokens`` and optionally ``pixel_values``, ``loss_mask``, ``attention_mask``, ``positions``.
    """
    return batch_loss(
        apply, params, cfg, batch, _BATCH_KEYS, (cfg.image_token_id,), remat_policy=remat_policy
    )


def batch_loss(
    apply_fn: Callable[..., torch.Tensor],
    params: dict[str, Any],
    cfg: Any,
    batch: Mapping[str, Any],
    keys: Sequence[str],
    ignore_ids: Sequence[int],
    *,
    remat_policy: Any = None,
) -> torch.Tensor:
    """Next-token loss of ``apply_fn(params, cfg, batch["tokens"], **inputs)``: ``keys`` are the allowed batch
    keys (``"tokens"`` first); every key but ``loss_mask`` goes to ``apply_fn``. ``ignore_ids`` are never
    targets. Shared by the VLMs' ``loss``.

    On a mesh the batch may be plain (the global batch, identical on every rank) or placed by ``shard_batch``:
    ids, masks and positions are read whole (gathered once here), ``pixel_values`` go to the tower as they are
    and the loss is :func:`functional_mm.models.llama.target_loss` (only the target positions reach the head;
    vocab-parallel under ``tp``)."""
    unknown = sorted(set(batch) - set(keys))
    if unknown or "tokens" not in batch:
        raise ValueError(f"loss: batch needs 'tokens' and may hold {list(keys[1:])}; unknown keys {unknown}")
    batch = {k: v if k == "pixel_values" else llama._whole(v) for k, v in batch.items()}
    targets = llama.next_token_targets(
        batch["tokens"],
        loss_mask=batch.get("loss_mask"),
        attention_mask=batch.get("attention_mask"),
        ignore_ids=tuple(ignore_ids),
    )
    kw = {k: batch.get(k) for k in keys[1:] if k != "loss_mask"}
    h = apply_fn(params, cfg, batch["tokens"], remat_policy=remat_policy, return_hidden=True, **kw)
    return llama.target_loss(params["text"], cfg.text, h, targets)


def generate(
    params: dict[str, Any],
    cfg: LlavaConfig,
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
    """Generation with a fixed-size KV cache (:func:`functional_mm.models.llama.decode`):
    ``[B, T] -> [B, T + n]``, ``n <= max_new_tokens``. ``attention_mask`` marks left padding; rows that emit a
    ``stop_tokens`` id are finished and padded with ``pad_token``. ``temperature=0`` (the default) is greedy and
    equal to HF ``generate(do_sample=False)``; otherwise tokens are sampled after optional ``top_k`` / ``top_p``
    filtering with keys ``random.fold_in(key, step)``. ``on_token(new_tokens: LongTensor[B])`` streams each step's
    tokens (:func:`functional_mm.models.llama.decode_loop`).
    """
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


def generate_with(
    embed_fn: Callable[..., torch.Tensor],
    params: dict[str, Any],
    cfg: Any,
    tokens: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    **decoding: Any,
) -> torch.Tensor:
    """Generation from ``embed_fn(params, cfg, tokens, pixel_values)`` with the decoder ``params["text"]``
    (:func:`generate_from_embeds`); ``decoding``: the decoding arguments of :func:`generate`. Shared by the
    LLaVA-style VLMs' ``generate``."""
    llama.check_sampling(**decoding)  # before the vision tower runs
    with torch.no_grad():
        x = embed_fn(params, cfg, tokens, pixel_values)
    return generate_from_embeds(
        params["text"], cfg.text, tokens, x, attention_mask=attention_mask, **decoding
    )


def generate_from_embeds(
    text_params: dict[str, Any],
    text_cfg: llama.LlamaConfig,
    tokens: torch.Tensor,
    inputs_embeds: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    **decoding: Any,
) -> torch.Tensor:
    """Decoding of a Llama/Qwen2 decoder from a prompt given as embeddings (``inputs_embeds: [B, T, D]``,
    ``tokens: [B, T]`` its ids): ``-> [B, T + n]``; ``decoding``: the decoding arguments of :func:`generate`
    (those of :func:`functional_mm.models.llama.decode_loop`). Shared by the LLaVA-style VLMs."""
    llama.check_sampling(**decoding)
    b, t = tokens.shape
    with torch.no_grad():
        cache = llama.init_cache(
            text_cfg, b, t + decoding["max_new_tokens"], dtype=inputs_embeds.dtype, device=tokens.device
        )
        logits, cache = llama.decode(
            text_params, text_cfg, None, cache, attention_mask=attention_mask, inputs_embeds=inputs_embeds
        )
        state = {"cache": cache}

        def step(nxt: torch.Tensor) -> torch.Tensor:
            out, state["cache"] = llama.decode(text_params, text_cfg, nxt.to(tokens.dtype), state["cache"])
            return out

        new = llama.decode_loop(step, logits, **decoding)
    return torch.cat([tokens, new.to(tokens.dtype)], dim=1)
