"""Qwen2-VL: train a tiny Qwen2-VL on the embedded shapes captions, or set up the published 2B / 7B / 72B
recipes.

Command (CPU)::

    python -m functional_mm.train --config configs/qwen2_vl.py:tiny --workdir runs/qwen2_vl_tiny

``ARG`` (see ``functional_mm.train.config_lib.vlm_config``):

- ``tiny``: Qwen2-VL vision tower (4x4 patches over 2 frames, 2x2 merger: 16 image tokens for a 32x32 image,
  M-RoPE) + a byte-level Qwen2 decoder, from scratch;
- ``qwen2_vl_2b`` (mesh ``fsdp8``), ``qwen2_vl_7b`` (``fsdp8``), ``qwen2_vl_72b`` (``fsdp16tp4``: 64 chips,
  ~820 GiB of bf16 params + grads + fp32 AdamW moments, ~13 GiB per chip before activations), from
  ``--config.mode.init_from=/path/Qwen2-VL-7B-Instruct``; ``stage=`` pretrain (merger only) | finetune
  (default: merger + LLM) | full | lora.
"""

from functional_mm.train.config_lib import vlm_config

TINY = dict(
    vision=dict(dim=64, num_layers=2, num_heads=4, mlp_dim=128, out_dim=128, patch_size=4),
    text=dict(vocab_size=264, dim=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=352, max_seq_len=64),
    mrope_section=(8, 4, 4),
    # the byte tokenizer's special ids, in the order the qwen2_vl family declares them
    image_token_id=259, vision_start_token_id=260, vision_end_token_id=261, video_token_id=262,
)  # fmt: skip


def get_config(arg: str = "tiny"):
    meshes = {"qwen2_vl_2b": "fsdp8", "qwen2_vl_7b": "fsdp8", "qwen2_vl_72b": "fsdp16tp4"}
    return vlm_config(arg, family="qwen2_vl", tiny=TINY, meshes=meshes)
