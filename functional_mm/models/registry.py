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
    """``loss(params, cfg, batch) -> scalar``; ``flops_per_token(cfg, seq_len)``; ``hf_load(dir) -> (cfg,
    params)``; ``hf_save(params, cfg, dir)``; ``hf_name(path) -> str`` maps our paths to HF weight names."""

    name: str
    config_cls: type
    init_boxed: Callable[..., Any]
    apply: Callable[..., Any]
    loss: Callable[..., Any]
    flops_per_token: Callable[[Any, int], float] | None = None
    default_rules: Callable[[], list] | None = None
    check_layout: Callable[..., None] | None = None
    hf_load: Callable[..., Any] | None = None
    hf_save: Callable[..., Any] | None = None
    hf_name: Callable[[str], str] | None = None
    generate: Callable[..., Any] | None = None

    def make_config(self, variant: str, overrides: Mapping[str, Any] | None = None) -> Any:
        """The named variant with ``overrides`` applied (unknown fields are an error naming them)."""
        return self.config_cls.variant(variant, **dict(overrides or {}))


def _llama() -> ModelFamily:
    from functional_mm.models import llama
    from functional_mm.models.hf import llama as hf

    return ModelFamily(
        name="llama",
        config_cls=llama.LlamaConfig,
        init_boxed=llama.init_boxed,
        apply=llama.apply,
        loss=llama.loss,
        flops_per_token=llama.flops_per_token,
        default_rules=llama.default_rules,
        check_layout=llama.check_layout,
        hf_load=hf.load_pretrained,
        hf_save=hf.save_pretrained,
        hf_name=hf.hf_name,
        generate=llama.generate,
    )


_FAMILIES: dict[str, Callable[[], ModelFamily]] = {"llama": _llama, "qwen2": _llama}


def names() -> list[str]:
    return sorted(_FAMILIES)


def get(name: str) -> ModelFamily:
    """The family registered under ``name``; an unknown name is an error listing the known ones."""
    if name not in _FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {names()}")
    return _FAMILIES[name]()
