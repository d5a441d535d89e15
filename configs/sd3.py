"""SD3 / SD3.5 (MMDiT, rectified flow): train a tiny text-conditioned MMDiT on the embedded shapes images, or
set up the published denoisers.

Command (CPU, a few minutes; writes ``WORKDIR/samples.png`` and prints how often the prompted colour
dominates the 32 samples)::

    python -m functional_mm.train --config configs/sd3.py:tiny --workdir runs/sd3_tiny

``ARG``: a variant and ``key=value`` items:

- ``tiny``: a 4-block MMDiT on 32x32 RGB pixels (4x4 patches) conditioned by a byte-level CLIP text encoder
  trained with it, logit-normal timesteps, 10% conditioning dropout (for classifier-free guidance);
- ``sd3_medium`` (2B, mesh ``fsdp8``), ``sd3.5_large`` (8.1B, ``fsdp8``): the denoiser on 16-channel VAE
  latents of 1024px images (128x128), conditioned by precomputed CLIP-L/G + T5 features (the VAE and text
  encoders stay out of the step: ``--config.data.path=DIR`` with ``train/`` and ``eval/`` feature sets of
  ``latents`` / ``context`` / ``pooled`` written by ``functional_mm.data.extract_features``); full finetune from ``--config.mode.init_from=/path/transformer`` or
  ``lora`` (LoRA on the attention projections; export with ``functional_mm.lora.save_diffusers``).
- ``mesh=`` e.g. ``fsdp8`` or ``dp2fsdp8`` (the data axes only: the model runs each rank's rows, no tensor
  parallelism); ``lora``: LoRA-tune instead of full finetuning.
"""

from functional_mm.train.config_lib import t2i_config


def get_config(arg: str = "tiny"):
    return t2i_config(arg, family="sd3", variants={"tiny": "sd3_tiny", "sd3_medium": "sd3_medium",
                                                   "sd3.5_large": "sd3.5_large"})  # fmt: skip
