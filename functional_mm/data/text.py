"""The embedded text corpus, a byte-level tokenizer and keyed random-window batching.

The corpus is generated, not downloaded (the machines have no hub access): short English-like sentences
from a small grammar plus two-digit additions, deterministic in the seed. It is enough for a tiny Llama to
show a clearly falling loss within a few minutes on a CPU, and to produce readable text afterwards.

Example::

    >>> from functional_mm import random
    >>> from functional_mm.data import text
    >>> tok = text.ByteTokenizer()
    >>> tok.decode(tok.encode("hi"))
    'hi'
    >>> stream = text.token_stream(text.synthetic_corpus(seed=0, num_docs=10), tok)
    >>> batch = text.random_windows(random.key(0), stream, batch_size=2, seq_len=16)
    >>> batch["tokens"].shape
    torch.Size([2, 16])
"""

from __future__ import annotations

import numpy as np
import torch

from functional_mm import random


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus ``bos`` = 256, ``eos`` = 257, ``pad`` = 258 (vocab 259)."""

    bos, eos, pad = 256, 257, 258
    vocab_size = 259

    def encode(self, s: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos] * bos + list(s.encode("utf-8")) + [self.eos] * eos

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
_THINGS = ["apples", "pears", "books", "cups", "stones", "shells", "kites", "boxes"]
_PLACES = ["garden", "kitchen", "library", "market", "harbour", "forest"]
_VERBS = ["found", "bought", "painted", "counted", "carried", "hid"]


def _sentence(rng: np.random.Generator) -> str:
    pick = lambda xs: xs[rng.integers(len(xs))]
    kind = rng.integers(4)
    if kind == 0:
        return f"{pick(_NAMES)} has {rng.integers(2, 10)} {pick(_COLOURS)} {pick(_THINGS)}."
    if kind == 1:
        return f"in the {pick(_PLACES)}, {pick(_NAMES)} {pick(_VERBS)} the {pick(_COLOURS)} {pick(_THINGS)}."
    if kind == 2:
        a, b = rng.integers(10, 50, size=2)
        return f"{a} + {b} = {a + b}."
    return f"{pick(_NAMES)} and {pick(_NAMES)} went to the {pick(_PLACES)}."


def synthetic_corpus(seed: int, num_docs: int, sentences_per_doc: tuple[int, int] = (3, 8)) -> list[str]:
    """``num_docs`` documents of a few sentences each, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    lo, hi = sentences_per_doc
    return [" ".join(_sentence(rng) for _ in range(rng.integers(lo, hi + 1))) for _ in range(num_docs)]


def token_stream(docs: list[str], tokenizer: ByteTokenizer) -> torch.Tensor:
    """All documents as one int64 stream ``[N]``, each wrapped in bos ... eos."""
    ids: list[int] = []
    for d in docs:
        ids += tokenizer.encode(d, bos=True, eos=True)
    return torch.tensor(ids, dtype=torch.int64)


def random_windows(key: torch.Tensor, stream: torch.Tensor, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """``batch_size`` windows of ``seq_len`` tokens at keyed random offsets: ``{"tokens": [B, T]}``.

    The batch depends only on ``key``, so deriving the key from (seed, step) makes the data order exactly
    reproducible across restarts.
    """
    if stream.numel() <= seq_len:
        raise ValueError(f"token stream of {stream.numel()} tokens is too short for seq_len={seq_len}")
    starts = random.randint(key, (batch_size,), 0, stream.numel() - seq_len)  # [B]
    return {"tokens": stream[starts[:, None] + torch.arange(seq_len)]}
