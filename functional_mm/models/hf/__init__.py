"""Hugging Face adapters: read and write transformers / diffusers directories (config.json + safetensors).

``io`` holds the family-independent pieces (strict name/shape checking, sharded safetensors reading and
writing); one module per family (``llama``) maps its parameter paths to HF names and its config to HF's.

Example::

    >>> from functional_mm.models.hf import llama as hf_llama
    >>> cfg, params = hf_llama.load_pretrained("path/to/Qwen2-0.5B")        # doctest: +SKIP
    >>> hf_llama.save_pretrained(params, cfg, "out/qwen2", max_shard_bytes=2**30)  # doctest: +SKIP
"""
