"""Model families: what the train loop needs to know about a model, behind one name.

A family bundles its config class, boxed init, apply, loss, analytic FLOPs, default logical-axis rules and
Hugging Face adapter. The loop looks a family up by ``config.model.family`` and never imports a model itself,
so a new family plugs in by adding one entry to ``_FAMILIES`` (loaded lazily: importing the registry does not
import every model).

Example::

    >>> from functional_mm.models import registry
    >>> fam = registry.get("llama")
    >>> cfg = fam.make_config("tiny", {"num_layers": 1})
    >>> cfg.num_layers
    1
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelFamily:
    """What the loop needs from a model family.

    - ``loss(params, cfg, batch, *, key, remat_policy) -> scalar`` (``key``: per-step randomness, e.g. the
      noise of a diffusion loss; LMs ignore it);
    - ``inputs``: what the batches hold: ``"text"`` (token windows), ``"image_text"`` (an image and its
      caption, for VLMs) or ``"text_to_image"`` (a prompt and its image, for generators);
    - ``image_inputs(cfg, image) -> (tensors, num_tokens)``: a VLM's preprocessing of one PIL image (tensors
      with a leading per-image dim, concatenated along it into a batch) and its placeholder token count;
    - ``special_tokens``: tokenizer strings for the placeholders (``image_token`` is the one repeated);
    - ``generate(params, cfg, tokens, inputs, *, max_new_tokens, stop_tokens, pad_token)`` greedy decoding;
    - ``flops_per_token(cfg, seq_len)`` (None: no MFU), ``default_rules()``, ``check_layout(cfg, mesh,
      rules)``, and the Hugging Face adapter ``hf_load(dir) -> (cfg, params)``, ``hf_save(params, cfg, dir)``,
      ``hf_name(path) -> str``.
    """

    name: str
    config_cls: type
    init_boxed: Callable[..., Any]
    loss: Callable[..., Any]
    inputs: str = "text"
    flops_per_token: Callable[[Any, int], float] | None = None
    default_rules: Callable[[], list] | None = None
    check_layout: Callable[..., None] | None = None
    hf_load: Callable[..., Any] | None = None
    hf_save: Callable[..., Any] | None = None
    hf_name: Callable[[str], str] | None = None
    generate: Callable[..., Any] | None = None
    image_inputs: Callable[..., Any] | None = None
    special_tokens: tuple[str, ...] = ()
    image_token: str = ""

    def make_config(self, variant: str, overrides: Mapping[str, Any] | None = None) -> Any:
        """The named variant with ``overrides`` applied (unknown fields are an error naming them)."""
        return self.config_cls.variant(variant, **dict(overrides or {}))


def _keyless(loss):
    """A deterministic loss in the family signature (the per-step ``key`` is not needed)."""
    return lambda params, cfg, batch, *, key, remat_policy=None: loss(
        params, cfg, batch, remat_policy=remat_policy
    )


def _llama() -> ModelFamily:
    from functional_mm.models import llama
    from functional_mm.models.hf import llama as hf

    return ModelFamily(
        name="llama",
        config_cls=llama.LlamaConfig,
        init_boxed=llama.init_boxed,
        loss=_keyless(llama.loss),
        flops_per_token=llama.flops_per_token,
        default_rules=llama.default_rules,
        check_layout=llama.check_layout,
        hf_load=hf.load_pretrained,
        hf_save=hf.save_pretrained,
        hf_name=hf.hf_name,
        generate=lambda p, cfg, tokens, inputs, **kw: llama.generate(p, cfg, tokens, **kw),
    )


def _square(img, size: int, mean_std):
    """Resize a PIL image to the tower's square input and normalise: ``[1, C, size, size]``."""
    from functional_mm.data import image as image_lib

    img = image_lib.resize(image_lib.to_rgb(img), (size, size))
    return image_lib.normalize(image_lib.to_tensor(img), *mean_std)[None]


def _decoder_flops(cfg, seq_len: int) -> float:
    from functional_mm.models import llama

    return llama.flops_per_token(cfg.text, seq_len)  # the decoder dominates; the tower is not counted


def _llava_like(name: str, module_name: str, config_cls: str, mean_std_name: str) -> ModelFamily:
    import importlib

    from functional_mm.data import image as image_lib
    from functional_mm.models import llama

    module = importlib.import_module(f"functional_mm.models.{module_name}")
    hf = importlib.import_module(f"functional_mm.models.hf.{module_name}")
    mean_std = getattr(image_lib, mean_std_name)

    def image_inputs(cfg, img):
        return {"pixel_values": _square(img, cfg.vision.image_size, mean_std)}, cfg.num_image_tokens

    return ModelFamily(
        name=name,
        config_cls=getattr(module, config_cls),
        init_boxed=module.init_boxed,
        loss=_keyless(module.loss),
        inputs="image_text",
        flops_per_token=_decoder_flops,
        default_rules=module.default_rules,
        check_layout=lambda cfg, mesh, rules: llama.check_layout(cfg.text, mesh, rules),
        hf_load=getattr(hf, "load_pretrained", None),
        hf_save=getattr(hf, "save_pretrained", None),
        hf_name=getattr(hf, "hf_name", None),
        generate=lambda p, cfg, tokens, inputs, **kw: module.generate(
            p, cfg, tokens, inputs.get("pixel_values"), **kw
        ),
        image_inputs=image_inputs,
        special_tokens=("<image>",),
        image_token="<image>",
    )


def _qwen2_vl() -> ModelFamily:
    from functional_mm.data import image as image_lib
    from functional_mm.models import llama, qwen2_vl, vit
    from functional_mm.models.hf import qwen2_vl as hf

    def image_inputs(cfg, img):
        v = cfg.vision
        side = v.patch_size * v.spatial_merge_size
        patches, grid = image_lib.qwen2_vl_patches(
            image_lib.to_rgb(img), patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
            merge_size=v.spatial_merge_size, min_pixels=side * side, max_pixels=max(img.size) ** 2,
        )  # fmt: skip
        return {"pixel_values": patches, "image_grid_thw": grid[None]}, int(
            grid.prod()
        ) // v.spatial_merge_size**2

    def check_layout(cfg, mesh, rules):  # the tower and the decoder, before any collective can hang
        llama.check_layout(cfg.text, mesh, rules)
        vit.check_layout(cfg.vision, mesh, rules, what="Qwen2-VL vision")

    return ModelFamily(
        name="qwen2_vl",
        config_cls=qwen2_vl.Qwen2VLConfig,
        init_boxed=qwen2_vl.init_boxed,
        loss=_keyless(qwen2_vl.loss),
        inputs="image_text",
        flops_per_token=_decoder_flops,
        default_rules=qwen2_vl.default_rules,
        check_layout=check_layout,
        hf_load=hf.load_pretrained,
        hf_save=hf.save_pretrained,
        hf_name=getattr(hf, "hf_name", None),
        generate=lambda p, cfg, tokens, inputs, **kw: qwen2_vl.generate(p, cfg, tokens, **inputs, **kw),
        image_inputs=image_inputs,
        special_tokens=("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"),
        image_token="<|image_pad|>",
    )


def _t2i(name: str) -> ModelFamily:
    from functional_mm.models import t2i

    return ModelFamily(
        name=name,
        config_cls=t2i.TextToImageConfig,
        init_boxed=t2i.init_boxed,
        loss=t2i.loss,
        inputs="text_to_image",
        default_rules=t2i.default_rules,
        check_layout=t2i.check_layout,
    )


_FAMILIES: dict[str, Callable[[], ModelFamily]] = {
    "llama": _llama,
    "qwen2": _llama,
    "llava": lambda: _llava_like("llava", "llava", "LlavaConfig", "CLIP"),
    "internvl": lambda: _llava_like("internvl", "internvl", "InternVLConfig", "IMAGENET"),
    "qwen2_vl": _qwen2_vl,
    "sd3": lambda: _t2i("sd3"),
    "flux": lambda: _t2i("flux"),
}


def names() -> list[str]:
    return sorted(_FAMILIES)


def get(name: str) -> ModelFamily:
    """The family registered under ``name``; an unknown name is an error listing the known ones."""
    if name not in _FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {names()}")
    return _FAMILIES[name]()
