"""InternVL2: train a tiny InternVL2 on the embedded shapes captions, or set up the published 2B / 8B / 76B
recipes.

Command (CPU)::

    python -m functional_mm.train --config configs/internvl2.py:tiny --workdir runs/internvl2_tiny

``ARG`` (see ``functional_mm.train.config_lib.vlm_config``):

- ``tiny``: InternViT-style tower (32x32 tile, 4x4 patches, pixel shuffle 0.5: 16 image tokens) + MLP
  projector + a byte-level decoder, from scratch;
- ``internvl2_2b`` (mesh ``fsdp8``), ``internvl2_8b`` (``fsdp8``), ``internvl2_76b`` (``fsdp16tp4``), from
  ``--config.mode.init_from``; ``stage=`` pretrain (projector only) | finetune (default) | full | lora.
"""

from functional_mm.train.config_lib import vlm_config

TINY = dict(
    vision=dict(image_size=32, patch_size=4, dim=64, num_layers=2, num_heads=4, mlp_dim=128),
    text=dict(
        vocab_size=264, dim=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=352, max_seq_len=64,
        qkv_bias=True,
    ),
    image_token_id=259,
)  # fmt: skip


def get_config(arg: str = "tiny"):
    meshes = {"internvl2_2b": "fsdp8", "internvl2_8b": "fsdp8", "internvl2_76b": "fsdp16tp4"}
    return vlm_config(arg, family="internvl", tiny=TINY, meshes=meshes)
