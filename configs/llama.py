"""Pretrain a Llama-style decoder on the embedded text corpus.

Command (the README's main job)::

    python -m functional_mm.train --config configs/llama.py:tiny --workdir runs/llama_tiny

Variants: ``tiny`` (CPU, a few minutes). Any field can be overridden on the command line, e.g.
``--config.optim.lr=1e-3 --config.train.num_steps=100``.
"""

from ml_collections import ConfigDict


def get_config(arg: str = "tiny") -> ConfigDict:
    if arg != "tiny":
        raise ValueError(f"configs/llama.py: unknown variant {arg!r} (known: tiny)")
    c = ConfigDict()
    c.seed = 0
    # A byte-level model: vocab = 256 bytes + bos/eos/pad, rounded up to a multiple of 8.
    c.model = ConfigDict(
        dict(
            family="llama",
            variant="tiny",
            overrides=ConfigDict(
                dict(
                    vocab_size=264,
                    dim=128,
                    num_layers=4,
                    num_heads=4,
                    num_kv_heads=2,
                    mlp_dim=352,
                    max_seq_len=128,
                )
            ),
        )
    )
    c.data = ConfigDict(dict(seed=0, train_docs=4000, eval_docs=200, seq_len=128, batch_size=16))
    c.optim = ConfigDict(
        dict(lr=3e-3, end_lr_fraction=0.1, warmup_steps=30, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0)
    )
    c.train = ConfigDict(
        dict(num_steps=600, log_every=10, eval_every=200, eval_batches=8, compile=True, mixed_precision="")
    )
    c.sample = ConfigDict(dict(prompt="alice has", max_new_tokens=48))
    return c
