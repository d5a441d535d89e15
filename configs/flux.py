"""Flux (double- then single-stream blocks, 3-axis rotary ids, guidance embedding): train a tiny Flux on the
embedded shapes images, or set up the published 12B denoiser.

Command (CPU, a few minutes; writes ``WORKDIR/samples.png`` and the prompted-colour score)::

    python -m functional_mm.train --config configs/flux.py:tiny --workdir runs/flux_tiny

``ARG``: ``tiny`` (a tiny Flux on 32x32 RGB pixels packed 2x2, conditioned by a byte-level CLIP trained with
it) or ``flux_dev`` (12B, mesh ``fsdp8``: ~180 GiB of bf16 params + grads + fp32 AdamW moments, ~23 GiB per
rank; on precomputed CLIP + T5 features, resolution-dependent shift); ``mesh=``, ``lora`` as in
``configs/sd3.py``. Text-to-image models shard over the data axes only (``fsdp``, ``dp``, HSDP ``dp2fsdp8``).
"""

from functional_mm.train.config_lib import t2i_config


def get_config(arg: str = "tiny"):
    return t2i_config(arg, family="flux", variants={"tiny": "flux_tiny", "flux_dev": "flux_dev"})
