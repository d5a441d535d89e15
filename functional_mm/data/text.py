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

import re

import numpy as np
import torch

from functional_mm import random


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus ``bos`` = 256, ``eos`` = 257, ``pad`` = 258 (vocab 259).

    ``special_tokens`` (e.g. chat-template markers ``"<|im_start|>"`` or the image placeholder
    ``"<|image_pad|>"``) get ids 259, 260, ... and are recognised inside the text by :meth:`encode`, so the
    embedded VLM data can use the same templates as a real tokenizer.

    Example::

        >>> tok = ByteTokenizer(special_tokens=("<|image_pad|>",))
        >>> tok.encode("a<|image_pad|>")
        [97, 259]
    """

    bos, eos, pad = 256, 257, 258
    vocab_size = 259

    def __init__(self, special_tokens: tuple[str, ...] | list[str] = ()):
        self.special_tokens = {t: 259 + i for i, t in enumerate(dict.fromkeys(special_tokens))}
        self.vocab_size = 259 + len(self.special_tokens)
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        # Longest first, so a token that is a prefix of another never wins.
        alts = sorted(self.special_tokens, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alts)) + ")") if alts else None

    def encode(self, s: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        if self._split is None:
            body = list(s.encode("utf-8"))
        else:
            body = []
            for i, part in enumerate(self._split.split(s)):
                body += [self.special_tokens[part]] if i % 2 else list(part.encode("utf-8"))
        return [self.bos] * bos + body + [self.eos] * eos

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        out, run = [], []
        for i in ids:
            if i < 256:
                run.append(i)
            elif i in self._id_to_special:
                out += [bytes(run).decode("utf-8", errors="replace"), self._id_to_special[i]]
                run = []
        return "".join(out) + bytes(run).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        """The id of a special token (``None`` if unknown); the same call as on a Hugging Face tokenizer."""
        return self.special_tokens.get(token)


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


def random_windows(
    key: torch.Tensor, stream: torch.Tensor, batch_size: int, seq_len: int
) -> dict[str, torch.Tensor]:
    """``batch_size`` windows of ``seq_len`` tokens at keyed random offsets: ``{"tokens": [B, T]}``.

    The batch depends only on ``key``, so deriving the key from (seed, step) makes the data order exactly
    reproducible across restarts.
    """
    if stream.numel() <= seq_len:
        raise ValueError(f"token stream of {stream.numel()} tokens is too short for seq_len={seq_len}")
    starts = random.randint(key, (batch_size,), 0, stream.numel() - seq_len)  # [B]
    return {"tokens": stream[starts[:, None] + torch.arange(seq_len)]}
