"""Text-to-image as one trainable model: a flow-matching denoiser (SD3's MMDiT or Flux) plus, optionally, the
CLIP text encoder that conditions it. The train loop runs it as the ``sd3`` / ``flux`` families.

``params = {"denoiser": ..., "text": ...}``. With a ``text`` encoder the batch carries prompt token ids and
the encoder is part of the model (trained, or frozen with ``config.mode.freeze="^text/"``); with
``text=None`` the batch carries precomputed ``context`` / ``pooled`` features (the data pipeline's feature
pre-extraction, how real SD3 / Flux runs keep three frozen encoders out of the step). The denoiser works on
whatever ``[B, C, H, W]`` it is given: VAE latents, or pixels in [-1, 1] for the embedded shapes proof.

Conditioning from one CLIP: SD3 reads the penultimate hidden states (zero-padded to
``joint_attention_dim``) and the projected EOS vector; Flux reads the last hidden states as its token
context and the unprojected EOS vector as ``pooled`` (T5's role is played by CLIP here).

Example::

    >>> import torch
    >>> from functional_mm import random
    >>> cfg = TextToImageConfig.variant("sd3_tiny")
    >>> params = init(random.key(0), cfg)
    >>> batch = {"pixels": torch.zeros(2, 3, 32, 32), "prompt": torch.full((2, 8), 5)}
    >>> float(loss(params, cfg, batch, key=random.key(1))) > 0
    True
    >>> sample(params, cfg, batch["prompt"], key=random.key(2), num_steps=2).shape
    torch.Size([2, 3, 32, 32])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from functional_mm import diffusion, nn, parallelism, random
from functional_mm.models import flux, mmdit
from functional_mm.models import text_encoders as te
from functional_mm.models.llava import merge_overrides

KINDS = {"mmdit": mmdit.MMDiTConfig, "flux": flux.FluxConfig}


@dataclasses.dataclass(frozen=True)
class TextToImageConfig:
    """``kind``: "mmdit" or "flux"; ``denoiser``: its config; ``text``: a CLIP text config or None (features
    come precomputed); ``channels`` / ``image_size``: what the denoiser sees (latent or pixel grid);
    ``flow``: :class:`functional_mm.diffusion.FlowMatchingConfig` fields (timestep density, shift, weighting,
    conditioning dropout); ``guidance``: Flux's distilled guidance value used in training."""

    kind: str
    denoiser: Any
    text: te.CLIPTextConfig | None
    channels: int = 3
    image_size: int = 32
    flow: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    guidance: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TextToImageConfig.kind={self.kind!r} is not one of {sorted(KINDS)}")
        if not isinstance(self.denoiser, KINDS[self.kind]):
            raise ValueError(f"TextToImageConfig.denoiser must be a {KINDS[self.kind].__name__}")
        object.__setattr__(self, "flow", dict(self.flow))
        diffusion.FlowMatchingConfig(**self.flow)  # validate the flow fields now, naming a bad one
        d = self.denoiser
        want = d.in_channels if self.kind == "mmdit" else d.in_channels // 4  # Flux packs 2x2 patches
        if want != self.channels:
            raise ValueError(f"TextToImageConfig.channels={self.channels} but the denoiser expects {want}")
        if self.image_size % (d.patch_size if self.kind == "mmdit" else 2):
            raise ValueError(f"TextToImageConfig.image_size={self.image_size} is not a multiple of the patch")

    @property
    def flow_config(self) -> diffusion.FlowMatchingConfig:
        return diffusion.FlowMatchingConfig(**self.flow)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TextToImageConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"TextToImageConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("denoiser"), Mapping):
            d["denoiser"] = (
                KINDS[d.get("kind", "")].from_dict(d["denoiser"]) if d.get("kind") in KINDS else None
            )
        if isinstance(d.get("text"), Mapping):
            d["text"] = te.CLIPTextConfig.from_dict(d["text"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["denoiser"], out["text"] = self.denoiser.to_dict(), self.text.to_dict() if self.text else None
        return out

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> TextToImageConfig:
        if name not in VARIANTS:
            raise ValueError(f"unknown text-to-image variant {name!r}; known: {sorted(VARIANTS)}")
        return cls.from_dict(merge_overrides(VARIANTS[name], overrides))


# A byte-level CLIP (ids 0..258 from functional_mm.data.text.ByteTokenizer, EOS = 257 pools the prompt).
_BYTE_CLIP = dict(
    te.CLIP_VARIANTS["tiny"], vocab_size=264, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    projection_dim=64, max_position_embeddings=32, bos_token_id=256, eos_token_id=257, pad_token_id=258,
)  # fmt: skip
_FLOW_TINY = dict(timestep_sampling="logit_normal", cond_dropout=0.1)

VARIANTS: dict[str, dict[str, Any]] = {
    # 32x32 RGB pixels in [-1, 1], 4x4 patches: 64 image tokens (the embedded shapes proof on a CPU).
    "sd3_tiny": dict(
        kind="mmdit",
        denoiser=dict(
            sample_size=32, patch_size=4, in_channels=3, num_layers=4, num_heads=4, head_dim=24,
            joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=8,
        ),
        text=_BYTE_CLIP, channels=3, image_size=32, flow=_FLOW_TINY,
    ),
    "flux_tiny": dict(
        kind="flux",
        denoiser=dict(flux.VARIANTS["tiny"], in_channels=12, joint_attention_dim=64, pooled_projection_dim=64),
        text=_BYTE_CLIP, channels=3, image_size=32, flow=_FLOW_TINY,
    ),
    # Published denoisers on 16-channel VAE latents of 1024x1024 images, conditioned by precomputed features.
    "sd3_medium": dict(
        kind="mmdit", denoiser=mmdit.VARIANTS["sd3_medium"], text=None, channels=16, image_size=128,
        flow=dict(shift=3.0),
    ),
    "sd3.5_large": dict(
        kind="mmdit", denoiser=mmdit.VARIANTS["sd3.5_large"], text=None, channels=16, image_size=128,
        flow=dict(shift=3.0),
    ),
    "flux_dev": dict(
        kind="flux", denoiser=flux.VARIANTS["flux_dev"], text=None, channels=16, image_size=128,
        flow=dict(dynamic_shift=True), guidance=3.5,
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# init


def init_boxed(key: torch.Tensor, cfg: TextToImageConfig) -> dict[str, Any]:
    """The parameter tree with every leaf boxed as ``nn.Param(value, logical_axes)``."""
    k_den, k_text = random.split(key)
    module = mmdit if cfg.kind == "mmdit" else flux
    params = {"denoiser": module.init_boxed(k_den, cfg.denoiser)}
    if cfg.text is not None:
        params["text"] = te.clip_init_boxed(k_text, cfg.text)
    return params


def init(key: torch.Tensor, cfg: TextToImageConfig) -> dict[str, Any]:
    return nn.unbox(init_boxed(key, cfg))[0]


def default_rules() -> list[tuple[str, Any]]:
    """Llama's plan without sequence parallelism: weights split over ``fsdp`` along ``embed``, heads / MLP
    over ``tp``; patch-embedding channels stay whole."""
    from functional_mm.models import llama

    return llama.default_rules(sequence_parallel=False) + [("channels", None)]


def check_layout(cfg: TextToImageConfig, mesh: Any, rules: Any) -> None:
    """Raise (before any collective) unless ``mesh`` splits only the batch: the denoiser and text encoder run
    each rank's rows as plain tensors under ``dp`` / ``fsdp`` / HSDP (``parallelism.local_rows``); tensor /
    context parallelism of these models is not built."""
    names, sizes = mesh.mesh_dim_names or (), mesh.shape
    other = {n: s for n, s in zip(names, sizes) if s > 1 and n not in parallelism.DATA_AXES}
    if other:
        raise ValueError(
            f"{cfg.kind} text-to-image training supports the data axes {parallelism.DATA_AXES} only (FSDP, DP, "
            f"HSDP); the mesh also splits {other}"
        )


# ----------------------------------------------------------------------------------------------------------------
# forward


def encode_prompt(params, cfg: TextToImageConfig, batch: Mapping[str, torch.Tensor]):
    """``(context [B, T, joint_dim], pooled [B, pooled_dim])`` from ``batch["prompt"]`` token ids (with the
    text encoder) or from precomputed ``batch["context"]`` / ``batch["pooled"]``."""
    if cfg.text is None:
        return batch["context"], batch["pooled"]
    tokens = batch["prompt"]
    out = te.clip_apply(params["text"], cfg.text, tokens, output_hidden_states=cfg.kind == "mmdit")
    if cfg.kind == "flux":
        return out.last_hidden_state, out.pooled
    hidden = out.hidden_states[-2]  # SD3 reads the penultimate layer
    joint = cfg.denoiser.joint_attention_dim
    if hidden.shape[-1] > joint:
        raise ValueError(f"CLIP width {hidden.shape[-1]} exceeds the denoiser's joint_attention_dim {joint}")
    return F.pad(hidden, (0, joint - hidden.shape[-1])), out.text_embeds


def velocity(params, cfg: TextToImageConfig, x, timestep, context, pooled, *, remat_policy=None):
    """The denoiser's velocity for ``x: [B, C, H, W]`` at ``timestep: [B]`` on the 0..1000 scale."""
    if cfg.kind == "mmdit":
        return mmdit.apply(
            params["denoiser"], cfg.denoiser, x, timestep, context, pooled, remat_policy=remat_policy
        )
    b, _, h, w = x.shape
    guidance = None
    if cfg.denoiser.guidance_embeds:
        guidance = parallelism.rows_like(torch.full((b,), cfg.guidance, dtype=x.dtype, device=x.device), x)
    v = flux.apply(
        params["denoiser"], cfg.denoiser, flux.pack_latents(x), timestep / 1000.0, context, pooled,
        flux.image_ids(h // 2, w // 2, device=x.device), flux.text_ids(context.shape[1], device=x.device),
        guidance=guidance, remat_policy=remat_policy,
    )  # fmt: skip
    return flux.unpack_latents(v, h, w)


def loss(params, cfg: TextToImageConfig, batch: Mapping[str, torch.Tensor], *, key, remat_policy=None):
    """Flow-matching loss of denoising ``batch["pixels"]`` (or ``batch["latents"]``) given the prompt, with the
    config's conditioning dropout (dropped samples see zero conditioning, the unconditional input of CFG)."""
    ctx = parallelism.current()
    if ctx is not None:
        check_layout(cfg, *ctx)
    x0 = batch["latents"] if "latents" in batch else batch["pixels"]
    k_drop, k_flow = random.split(key)
    context, pooled = encode_prompt(params, cfg, batch)
    fm = cfg.flow_config
    cond = diffusion.drop_conditioning(k_drop, {"context": context, "pooled": pooled}, fm.cond_dropout)
    seq_len = (x0.shape[-2] // 2) * (x0.shape[-1] // 2)
    value, _ = diffusion.flow_matching_loss(
        lambda x, t: velocity(params, cfg, x, t, cond["context"], cond["pooled"], remat_policy=remat_policy),
        x0, k_flow, fm, image_seq_len=seq_len,
    )  # fmt: skip
    return value


@torch.no_grad()
def sample(
    params,
    cfg: TextToImageConfig,
    prompt: torch.Tensor,
    *,
    key,
    num_steps: int = 20,
    guidance_scale: float = 1.0,
    callback=None,
) -> torch.Tensor:
    """Images ``[B, C, H, W]`` (the training space: [-1, 1] pixels or latents) for ``prompt: [B, L]`` token ids,
    by the flow-match Euler sampler with classifier-free guidance against zero conditioning."""
    context, pooled = encode_prompt(params, cfg, {"prompt": prompt})
    b, size = prompt.shape[0], cfg.image_size
    fm = cfg.flow_config
    mu = diffusion.resolution_mu(
        (size // 2) ** 2, fm.base_seq_len, fm.max_seq_len, fm.base_shift, fm.max_shift
    )
    schedule = diffusion.flow_match_schedule(
        num_steps, shift=fm.shift, use_dynamic_shifting=fm.dynamic_shift, mu=mu if fm.dynamic_shift else None,
        device=context.device,
    )  # fmt: skip
    noise = random.normal(key, (b, cfg.channels, size, size), dtype=context.dtype, device=context.device)
    cond = {"context": context, "pooled": pooled}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    v = lambda x, t, c: velocity(params, cfg, x, t, c["context"], c["pooled"])
    return diffusion.sample(
        v, noise, schedule, cond=cond, uncond=uncond, guidance_scale=guidance_scale, callback=callback
    )
