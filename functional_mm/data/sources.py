"""Sample sources: JSONL manifests and in-memory lists, and the errors that mark a sample as skippable.

A source is any ``Sequence[dict]`` (``len`` + integer indexing); a sample is a plain dict. In a JSONL manifest
each line is one sample, and media paths (keys ``image``, ``images``, ``video``, ``videos``, ``audio``,
``audios``; a string or a list of strings) are relative to the manifest's directory. Everything else is kept
as is: ``text``/``caption``, ``conversations``, and metadata the batchers read before any decoding
(``width``, ``height``, ``frames``, ``fps``, ``duration``, ``num_tokens``, ...).

Example::

    >>> src = JsonlSource("data/train.jsonl")                       # doctest: +SKIP
    >>> src[0]                                                      # doctest: +SKIP
    {'image': '/abs/data/images/0.png', 'width': 64, 'height': 48, 'caption': 'a red circle ...'}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

MEDIA_KEYS = ("image", "images", "video", "videos", "audio", "audios")


class SkipSample(Exception):
    """Raised by a sample processor for a sample that must be skipped (counted and logged, not fatal)."""


class MediaError(SkipSample):
    """A media file is missing, truncated or undecodable. ``str(e)`` names the path and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class TooManySkipsError(RuntimeError):
    """More samples were skipped than the loader's ``max_skip_fraction`` allows."""


def resolve_paths(sample: dict, root: str) -> dict:
    """A copy of ``sample`` with its media paths joined to ``root`` (absolute paths are kept)."""
    out = dict(sample)
    for k in MEDIA_KEYS:
        v = out.get(k)
        if isinstance(v, str):
            out[k] = os.path.join(root, v)
        elif isinstance(v, list):
            out[k] = [os.path.join(root, p) for p in v]
    return out


def read_jsonl(path: str) -> list[dict]:
    """All samples of a JSONL manifest, media paths resolved; a malformed line is an error naming the line."""
    root = os.path.dirname(os.path.abspath(path))
    samples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                s = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(s, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object, got {type(s).__name__}")
            samples.append(resolve_paths(s, root))
    return samples


def write_jsonl(path: str, samples: Sequence[dict]) -> None:
    """Write samples one per line (paths are written as given: make them relative to ``path``'s folder)."""
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")


class JsonlSource(Sequence):
    """A JSONL manifest as a ``Sequence[dict]`` (read once, kept in memory: a line is ~100 bytes)."""

    def __init__(self, path: str):
        self.path = path
        self._samples = read_jsonl(path)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i):
        return self._samples[i]


def sample_path(sample: dict) -> str:
    """The sample's first media path, for log lines ("" when it has none)."""
    for k in MEDIA_KEYS:
        v = sample.get(k)
        if v:
            return v if isinstance(v, str) else v[0]
    return ""
