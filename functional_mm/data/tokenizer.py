"""Tokenizers from local Hugging Face tokenizer directories, behind the same small interface as ByteTokenizer.

The interface every tokenizer here offers (and all the data code relies on): ``encode(text, bos=, eos=)`` ->
``list[int]``, ``decode(ids)``, ``token_to_id(token)``, and the attributes ``bos``, ``eos``, ``pad`` (ids or
None) and ``vocab_size``. ``encode`` never adds special tokens on its own (the chat template decides), and
special tokens written in the text (``"<|im_start|>"``, ``"<|image_pad|>"``) become their single ids.

Only the ``tokenizers`` library is needed (no transformers, no hub): ``tokenizer.json`` holds the model, and
``tokenizer_config.json`` / ``special_tokens_map.json`` name the bos/eos/pad tokens.

Example::

    >>> tok = load_tokenizer(None)                 # the byte-level fallback for embedded data
    >>> tok.decode(tok.encode("hi"))
    'hi'
    >>> tok = load_tokenizer("/path/to/Qwen2-VL-2B-Instruct")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from typing import Any

from functional_mm.data.text import ByteTokenizer


def _token_str(v: Any) -> str | None:
    # tokenizer_config.json writes tokens as strings or as AddedToken dicts {"content": ...}.
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class HFTokenizer:
    """A ``tokenizer.json`` model (``tokenizers.Tokenizer``) with its bos/eos/pad ids."""

    def __init__(self, path: str):
        import tokenizers  # imported here: only needed by users of real tokenizers

        file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise FileNotFoundError(
                f"no tokenizer.json at {file!r} (a local Hugging Face tokenizer directory)"
            )
        self.path = path
        self._tok = tokenizers.Tokenizer.from_file(file)
        names: dict[str, Any] = {}
        folder = os.path.dirname(file)
        for meta in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
            mfile = os.path.join(folder, meta)
            if os.path.exists(mfile):
                with open(mfile) as f:
                    names.update(json.load(f))
        self.config = names
        self.bos = self._id(_token_str(names.get("bos_token")))
        self.eos = self._id(_token_str(names.get("eos_token")))
        self.pad = self._id(_token_str(names.get("pad_token")))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, s: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        for flag, tid, name in ((bos, self.bos, "bos"), (eos, self.eos, "eos")):
            if flag and tid is None:
                raise ValueError(f"tokenizer {self.path!r} has no {name} token")
        ids = self._tok.encode(s, add_special_tokens=False).ids
        return [self.bos] * bos + ids + [self.eos] * eos

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def load_tokenizer(path: str | None, special_tokens: tuple[str, ...] = ()) -> ByteTokenizer | HFTokenizer:
    """A local HF tokenizer directory (or ``tokenizer.json``), or ``ByteTokenizer(special_tokens)`` for None.

    ``special_tokens`` only applies to the byte fallback: a real tokenizer already knows its own.
    """
    return ByteTokenizer(special_tokens) if path is None else HFTokenizer(path)
