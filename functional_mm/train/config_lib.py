"""Helpers for the config files under ``configs/``: the ``:arg`` grammar and the sections every run shares.

A config file's ``get_config(arg)`` receives what follows the colon in ``--config configs/x.py:ARG``::

    >>> a = parse_arg("7b,mesh=fsdp8,runlocal", variant="tiny", mesh="", runlocal=False, steps=100)
    >>> a.variant, a.mesh, a.runlocal, a.steps
    ('7b', 'fsdp8', True, 100)
    >>> mesh_axes("fsdp4tp2"), mesh_axes("dp2fsdp-1"), mesh_axes("")
    ({'fsdp': 4, 'tp': 2}, {'dp': 2, 'fsdp': -1}, {})

Grammar: comma-separated items; ``key=value`` sets a declared key (parsed as the default's type); a bare word
names a declared boolean flag (set True) or, otherwise, the ``variant``. Unknown keys are errors listing the
known ones.
"""

from __future__ import annotations

import re
from typing import Any

from ml_collections import ConfigDict

_MESH_AXIS = re.compile(r"(dp|fsdp|tp|cp|pp)(-1|\d+)")


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
    """``defaults`` updated from ``arg`` (see the module docstring)."""
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            if isinstance(defaults.get(key), bool):
                out[key] = True
                continue
            key, value = "variant", item
        if key not in defaults:
            raise ValueError(f"config arg {item!r}: unknown key {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config arg {key}={value!r}: expected true/false")
            out[key] = value.lower() in ("true", "1")
        elif isinstance(default, (int, float)):
            try:
                out[key] = type(default)(value)
            except ValueError:
                raise ValueError(f"config arg {key}={value!r}: expected a {type(default).__name__}") from None
        else:
            out[key] = value
    return ConfigDict(out)


def mesh_axes(spec: str) -> dict[str, int]:
    """``"fsdp4tp2"`` -> ``{"fsdp": 4, "tp": 2}`` (``-1``: the rest of the world); ``""`` -> ``{}``."""
    if not spec:
        return {}
    parts = _MESH_AXIS.findall(spec)
    if "".join(a + n for a, n in parts) != spec:
        raise ValueError(f"mesh spec {spec!r}: expected axis names with sizes, e.g. 'fsdp8' or 'dp2fsdp4tp2'")
    return {a: int(n) for a, n in parts}


def base_config(
    *, family: str, variant: str, overrides: dict | None = None, data: dict | None = None, **sections: dict
) -> ConfigDict:
    """The sections every run has, with the defaults of a small CPU run; ``data`` and ``sections``
    (``optim=``, ``train=``, ``mode=``, ``checkpoint=``, ``profile=``, ``sample=``, ``mesh=``) update them.

    - ``model``: ``family`` (see :mod:`functional_mm.models.registry`), ``variant`` and field ``overrides``;
    - ``data``: the embedded text corpus (``train_docs`` / ``eval_docs``) or images (``path``, empty: generate
      into the workdir; ``image_size``, ``train_images`` / ``eval_images``), ``seq_len``, ``batch_size``;
    - ``optim``: AdamW with warmup + cosine decay (``decay_steps`` 0: over ``train.num_steps``), global-norm
      clipping, ``decay_mask`` (a regex of the parameters that get weight decay);
    - ``mesh``: ``axes`` (empty: one process, or FSDP over all when several) and ``rules`` (empty: the family's);
    - ``train``: steps, logging / eval cadence, ``compile``, ``mixed_precision`` ("" | "bf16" | "fp16"),
      ``grad_accum_steps``, ``remat`` ("" | "full" | "selective"), ``nan_policy`` ("skip" | "stop"),
      ``peak_tflops`` (0: look the device up);
    - ``mode``: ``kind`` pretrain | finetune | lora, ``init_from`` (a HF directory or one of our workdirs),
      ``freeze`` (a regex of parameters trained with no update and no optimizer state), ``lora`` settings;
    - ``checkpoint``, ``profile`` (a static window; dynamic: see :mod:`functional_mm.train.profiling`),
      ``sample`` (what the run shows at the end).
    """
    c = ConfigDict()
    c.seed = 0
    c.model = ConfigDict(dict(family=family, variant=variant, overrides=ConfigDict(overrides or {})))
    c.data = ConfigDict(
        dict(
            seed=0, train_docs=4000, eval_docs=200, path="", image_size=32, train_images=2048,
            eval_images=128, num_workers=0, seq_len=128, batch_size=16,
        )
    )  # fmt: skip
    c.optim = ConfigDict(
        dict(
            lr=3e-3, end_lr_fraction=0.1, warmup_steps=30, decay_steps=0, b1=0.9, b2=0.95, weight_decay=0.1,
            clip_norm=1.0, decay_mask=r"^(?!.*norm).*$",
        )
    )  # fmt: skip
    c.mesh = ConfigDict(dict(axes={}, rules=[]))
    c.train = ConfigDict(
        dict(
            num_steps=600, log_every=10, eval_every=200, eval_batches=8, compile=True, mixed_precision="",
            grad_accum_steps=1, remat="", nan_policy="skip", peak_tflops=0.0,
        )
    )  # fmt: skip
    c.mode = ConfigDict(
        dict(
            kind="pretrain", init_from="", freeze="",
            lora=ConfigDict(dict(rank=8, alpha=16.0, dropout=0.0, targets=[r"attn/(q|v)/weight$"])),
        )
    )  # fmt: skip
    c.checkpoint = ConfigDict(dict(every_steps=200, max_to_keep=2, async_save=True))
    c.profile = ConfigDict(dict(start_step=-1, num_steps=2, ranks=[0]))
    c.sample = ConfigDict(
        dict(
            prompt="", max_new_tokens=48, num_images=32, prompts=[], num_steps=20, guidance_scale=1.0, seed=0
        )
    )  # fmt: skip
    c.data.update(data or {})
    for name, values in sections.items():
        if name not in c:
            raise ValueError(f"base_config: unknown section {name!r}")
        c[name].update(values)
    return c


# Freezing stages of the VLM recipes, as regexes over parameter paths ("vision/...", "projector/..." or
# "vision/merger/..." for Qwen2-VL, "text/...").
VLM_STAGES = {
    "pretrain": r"^(vision/(?!merger/)|text/)",  # align: only the projector (Qwen2-VL's merger) learns
    "finetune": r"^vision/(?!merger/)",  # instruction tuning: projector + LLM, the vision tower frozen
    "full": "",  # everything learns
}


def vlm_stage(c: ConfigDict, stage: str) -> ConfigDict:
    """Apply a VLM training stage to ``c``: ``pretrain`` (projector only), ``finetune`` (projector + LLM),
    ``full``, or ``lora`` (adapters on the LLM's attention and MLP, everything else frozen)."""
    if stage == "lora":
        c.mode.kind = "lora"
        c.mode.lora.targets = [r"^text/.*(attn/(q|k|v|o)|mlp/(gate|up|down))/weight$"]
        return c
    if stage not in VLM_STAGES:
        raise ValueError(f"config arg stage={stage!r}: expected one of {[*VLM_STAGES, 'lora']}")
    c.mode.freeze = VLM_STAGES[stage]
    return c


def vlm_config(arg: str | None, *, family: str, tiny: dict, meshes: dict[str, str]) -> ConfigDict:
    """A VLM run from ``ARG`` = ``variant[,mesh=...][,stage=...]``: ``tiny`` (``tiny`` model overrides, a
    byte-level decoder, trained from scratch on the embedded shapes captions: ``stage=full``) or a published
    size from ``meshes`` (variant -> recommended mesh), started from a HF directory
    (``--config.mode.init_from``) with bf16, selective remat and ``stage=finetune`` by default."""
    a = parse_arg(arg, variant="tiny", mesh="", stage="")
    known = ["tiny", *meshes]
    if a.variant not in known:
        raise ValueError(f"configs/{family}: unknown variant {a.variant!r} (known: {', '.join(known)})")
    is_tiny = a.variant == "tiny"
    c = base_config(
        family=family,
        variant=a.variant,
        overrides=tiny if is_tiny else {},
        data=dict(image_size=32, seq_len=64, batch_size=32) if is_tiny else dict(seq_len=2048, batch_size=8),
        optim=dict(lr=2e-3) if is_tiny else dict(lr=2e-5, warmup_steps=100, weight_decay=0.0),
        mesh=dict(axes=mesh_axes(a.mesh or meshes.get(a.variant, ""))),
        train=dict(num_steps=300, log_every=25, eval_every=100, eval_batches=2)
        if is_tiny
        else dict(num_steps=5000, mixed_precision="bf16", remat="selective", eval_every=500),
        checkpoint=dict(every_steps=100 if is_tiny else 500),
        sample=dict(num_images=128, max_new_tokens=40),
    )
    return vlm_stage(c, a.stage or ("full" if is_tiny else "finetune"))


# The embedded proof's prompts: 8 colour / shape pairs, 4 samples each.
SHAPE_PROMPTS = [
    "a red circle", "a blue square", "a green triangle", "a yellow circle",
    "a purple square", "an orange triangle", "a red square", "a blue triangle",
]  # fmt: skip


def t2i_config(arg: str | None, *, family: str, variants: dict[str, str]) -> ConfigDict:
    """A text-to-image run from ``ARG`` = ``variant[,mesh=...][,lora]``; ``variants`` maps the config's
    variant names to :data:`functional_mm.models.t2i.VARIANTS`."""
    a = parse_arg(arg, variant="tiny", mesh="", lora=False)
    if a.variant not in variants:
        raise ValueError(f"configs/{family}: unknown variant {a.variant!r} (known: {', '.join(variants)})")
    is_tiny = a.variant == "tiny"
    c = base_config(
        family=family,
        variant=variants[a.variant],
        data=dict(image_size=32, batch_size=32) if is_tiny else dict(batch_size=4),
        optim=dict(lr=1e-3, warmup_steps=30, weight_decay=0.0)
        if is_tiny
        else dict(lr=1e-5, weight_decay=0.0),
        mesh=dict(axes=mesh_axes(a.mesh or ("" if is_tiny else "fsdp8"))),
        train=dict(num_steps=400, log_every=25, eval_every=100, eval_batches=2)
        if is_tiny
        else dict(num_steps=10000, mixed_precision="bf16", remat="full", eval_every=1000),
        checkpoint=dict(every_steps=100 if is_tiny else 1000),
        sample=dict(num_images=32, prompts=SHAPE_PROMPTS, num_steps=20, guidance_scale=3.0),
    )
    if a.lora:
        c.mode.kind = "lora"
        c.mode.lora.targets = [r"^denoiser/.*attn/(q|k|v|o)/weight$"]
    return c
