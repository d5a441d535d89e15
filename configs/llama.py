"""Pretrain (or finetune / LoRA-tune) a Llama-style decoder on the embedded text corpus.

Command (the README's main job)::

    python -m functional_mm.train --config configs/llama.py:tiny --workdir runs/llama_tiny

Variants: ``tiny`` (CPU, a few minutes). Any field can be overridden on the command line, e.g.
``--config.optim.lr=1e-3 --config.train.num_steps=100 --config.mode.kind=lora``. Several processes::

    torchrun --nproc_per_node 2 -m functional_mm.train --config configs/llama.py:tiny --workdir runs/fsdp2 \\
        --config.mesh.axes='{"fsdp": 2}'
"""

from ml_collections import ConfigDict


def get_config(arg: str = "tiny") -> ConfigDict:
    if arg != "tiny":
        raise ValueError(f"configs/llama.py: unknown variant {arg!r} (known: tiny)")
    c = ConfigDict()
    c.seed = 0
    # A byte-level model: vocab = 256 bytes + bos/eos/pad, rounded up to a multiple of 8.
    tiny = dict(
        vocab_size=264, dim=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=352, max_seq_len=128
    )
    c.model = ConfigDict(dict(family="llama", variant="tiny", overrides=ConfigDict(tiny)))
    c.data = ConfigDict(dict(seed=0, train_docs=4000, eval_docs=200, seq_len=128, batch_size=16))
    c.optim = ConfigDict(
        dict(
            lr=3e-3, end_lr_fraction=0.1, warmup_steps=30, decay_steps=0,  # 0: decay over train.num_steps
            b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0,
            decay_mask=r"^(?!.*norm).*$",  # no weight decay on norm scales
        )
    )  # fmt: skip
    # Empty axes: one process, no sharding (several processes without axes: FSDP over all of them).
    # Empty rules: the model family's default logical-axis rules.
    c.mesh = ConfigDict(dict(axes={}, rules=[]))
    c.train = ConfigDict(
        dict(
            num_steps=600, log_every=10, eval_every=200, eval_batches=8, compile=True, mixed_precision="",
            grad_accum_steps=1, remat="", nan_policy="skip", peak_tflops=0.0,
        )
    )  # fmt: skip
    # kind: pretrain | finetune (init_from a HF directory or one of our workdirs) | lora.
    # freeze: a regex over parameter paths (e.g. "^embed/") trained with no update and no optimizer state.
    c.mode = ConfigDict(
        dict(
            kind="pretrain",
            init_from="",
            freeze="",
            lora=ConfigDict(dict(rank=8, alpha=16.0, targets=[r"attn/(q|v)/weight$"])),
        )
    )
    c.checkpoint = ConfigDict(dict(every_steps=200, max_to_keep=2, async_save=True))
    # Static profiling window (start_step -1: off); dynamic profiling: see functional_mm/train/profiling.py.
    c.profile = ConfigDict(dict(start_step=-1, num_steps=2, ranks=[0]))
    c.sample = ConfigDict(dict(prompt="alice has", max_new_tokens=48))
    return c
