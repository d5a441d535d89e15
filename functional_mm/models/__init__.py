"""Model families as pure functions over parameter pytrees.

One module per family (``llama``: Llama 2/3 and Qwen2, ...); each offers ``Config``, ``init(key, cfg)``,
``apply(params, cfg, ...)``, ``loss(params, cfg, batch)`` and ``logical_axes(cfg)``. Hugging Face adapters
(``load_pretrained`` / ``save_pretrained``) live in ``functional_mm.models.hf``.

Import the family you need (``from functional_mm.models import llama``); this package imports nothing
eagerly so that importing one model never pulls in the others (or transformers).
"""
