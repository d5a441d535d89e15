"""LLaVA 1.5: train a tiny LLaVA to caption the embedded shapes images (the README's main job), or set up the
published 7B recipe.

Command (CPU, a few minutes; prints held-out captions next to the truth and the exact-match accuracy)::

    python -m functional_mm.train --config configs/llava.py:tiny --workdir runs/llava_tiny

``ARG``: a variant and ``key=value`` items (see ``functional_mm.train.config_lib.vlm_config``):

- ``tiny``: CLIP-style ViT (32x32 input, 8x8 patches: 16 image tokens) + 2-layer GELU projector + a byte-level
  Llama decoder, trained from scratch on the embedded shapes captions;
- ``llava1.5_7b``: CLIP ViT-L/14-336 + Vicuna-7B from ``--config.mode.init_from=/path/llava-1.5-7b-hf``;
  ``stage=pretrain`` (projector only: LLaVA's feature alignment), ``stage=finetune`` (default: projector + LLM,
  tower frozen), ``stage=full`` or ``stage=lora``. Recommended mesh ``fsdp8`` (one 8-chip node: bf16 params +
  grads + fp32 AdamW moments are ~79 GiB, ~10 GiB per chip); ``mesh=fsdp4tp2`` for longer sequences.
"""

from functional_mm.train.config_lib import vlm_config

BYTE_LLAMA = dict(
    vocab_size=264, dim=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=352, max_seq_len=64
)
TINY = dict(
    vision=dict(image_size=32, patch_size=8, dim=64, num_layers=2, num_heads=4, mlp_dim=128),
    text=BYTE_LLAMA,
    image_token_id=259,  # the byte tokenizer's first special id: "<image>"
)


def get_config(arg: str = "tiny"):
    return vlm_config(arg, family="llava", tiny=TINY, meshes={"llava1.5_7b": "fsdp8"})
