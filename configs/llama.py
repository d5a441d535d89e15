"""Pretrain (or finetune / LoRA-tune) a Llama-style decoder on the embedded byte-level text corpus.

Command::

    python -m functional_mm.train --config configs/llama.py:tiny --workdir runs/llama_tiny

``ARG`` (after the colon): a variant and ``key=value`` items, e.g. ``:llama3_8b,mesh=fsdp8``:

- ``tiny`` (CPU, a few minutes), ``llama2_7b``, ``llama3_8b``, ``qwen2_7b`` (published sizes; the text task
  still feeds byte tokens, so these are for layout / memory / throughput checks or finetuning with
  ``--config.mode.init_from=HF_DIR``);
- ``mesh=``: axes and sizes, e.g. ``fsdp8``, ``dp2fsdp4``, ``fsdp4tp2`` (default: one process, or FSDP over
  every process of a torchrun job);
- ``lora``: LoRA-tune instead of pretraining (set ``--config.mode.init_from``).

Any field can also be overridden, e.g. ``--config.optim.lr=1e-3 --config.train.num_steps=100``. Several
processes::

    torchrun --nproc_per_node 2 -m functional_mm.train --config configs/llama.py:tiny,mesh=fsdp2 \\
        --workdir runs/fsdp2
"""

from functional_mm.train.config_lib import base_config, mesh_axes, parse_arg

# A byte-level tiny model: vocab = 256 bytes + bos/eos/pad, rounded up to a multiple of 8.
TINY = dict(vocab_size=264, dim=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=352, max_seq_len=128)


def get_config(arg: str = "tiny"):
    a = parse_arg(arg, variant="tiny", mesh="", lora=False)
    known = ("tiny", "llama2_7b", "llama3_8b", "qwen2_7b")
    if a.variant not in known:
        raise ValueError(f"configs/llama.py: unknown variant {a.variant!r} (known: {', '.join(known)})")
    tiny = a.variant == "tiny"
    c = base_config(
        family="qwen2" if a.variant.startswith("qwen2") else "llama",
        variant=a.variant,
        overrides=TINY if tiny else {},
        data=dict(seq_len=128 if tiny else 4096, batch_size=16 if tiny else 8),
        mesh=dict(axes=mesh_axes(a.mesh)),
        train=dict() if tiny else dict(mixed_precision="bf16", remat="selective", eval_every=1000),
        sample=dict(prompt="alice has"),
    )
    if a.lora:
        c.mode.kind = "lora"
    return c
