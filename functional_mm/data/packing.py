"""Collate functions: stacking, padding to the longest sequence, and sequence packing.

Packed rows carry ``segment_ids`` (1, 2, ... per sample in a row, 0 on padding) and ``positions`` (restarting
at 0 in each sample), which is what ``functional_mm.models.llama.apply/loss`` take: attention is blocked
across segments (``nn.attention.make_mask(q_segments=, kv_segments=)``), rotary positions restart per
sample, and the loss never predicts one sample's first token from the previous sample. A packed row thus
gives the same logits as its samples run one by one (tests/test_data_batching.py checks this on a tiny Llama).

Example::

    >>> a = {"tokens": torch.tensor([1, 2, 3]), "loss_mask": torch.tensor([0, 1, 1])}
    >>> b = {"tokens": torch.tensor([4, 5])}
    >>> out = pack_sequences([a, b], seq_len=6, num_rows=1)
    >>> out["segment_ids"].tolist(), out["positions"].tolist()
    ([[1, 1, 1, 2, 2, 0]], [[0, 1, 2, 0, 1, 0]])
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Number

import torch

_SEQ_KEYS = ("tokens", "loss_mask")


def _extras(samples: Sequence[dict], skip: tuple[str, ...]) -> dict:
    """Non-sequence keys: tensors concatenated along dim 0 in sample order (vision patches, grid_thw: the
    model scatters them into the placeholder tokens in that order), numbers as a tensor, the rest as lists."""
    out = {}
    for k in samples[0] if samples else ():
        if k in skip:
            continue
        vals = [s[k] for s in samples if k in s]
        if all(isinstance(v, torch.Tensor) for v in vals):
            out[k] = torch.cat([v if v.dim() else v[None] for v in vals])
        elif all(isinstance(v, Number) for v in vals):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


def default_collate(samples: Sequence[dict]) -> dict:
    """Stack same-shape tensors (``[B, ...]``), numbers to a tensor, everything else as a list; tensors of
    different shapes become a list too (pad or pack those with the functions below)."""
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in vals):
            same = all(v.shape == vals[0].shape for v in vals)
            out[k] = torch.stack(vals) if same else vals
        elif all(isinstance(v, Number) for v in vals):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


def pad_sequences(
    samples: Sequence[dict], *, pad_id: int = 0, pad_to_multiple: int = 1, max_len: int | None = None
) -> dict:
    """Right-pad ``tokens`` (and ``loss_mask``) to the longest sample (rounded up to ``pad_to_multiple``, which
    bounds the number of distinct shapes a compiled step sees): ``tokens, loss_mask, attention_mask: [B, T]``;
    other keys as in :func:`pack_sequences`."""
    n = max(len(s["tokens"]) for s in samples)
    n = -(-n // pad_to_multiple) * pad_to_multiple
    if max_len is not None and n > max_len:
        raise ValueError(f"pad_sequences: a sample has {n} tokens > max_len={max_len}")
    tokens = torch.full((len(samples), n), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros(len(samples), n, dtype=torch.int64)
    attn = torch.zeros(len(samples), n, dtype=torch.int64)
    for r, s in enumerate(samples):
        t = len(s["tokens"])
        tokens[r, :t] = s["tokens"]
        loss_mask[r, :t] = s["loss_mask"] if "loss_mask" in s else 1
        attn[r, :t] = 1
    return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attn, **_extras(samples, _SEQ_KEYS)}


def pack_sequences(samples: Sequence[dict], seq_len: int, num_rows: int, *, pad_id: int = 0) -> dict:
    """First-fit ``samples`` (``tokens [n]``, optional ``loss_mask [n]``) into ``num_rows`` rows of ``seq_len``.

    Returns ``tokens, segment_ids, positions, loss_mask: int64 [num_rows, seq_len]`` plus the other keys
    concatenated in packing order (row by row, left to right): exactly the batch keys
    ``llama.loss`` accepts when the samples carry nothing else. A sample that
    fits no row is a ValueError (plan batches with :class:`~functional_mm.data.PackingBatcher`, whose lengths
    bound the real ones, and it cannot happen).
    """
    tokens = torch.full((num_rows, seq_len), pad_id, dtype=torch.int64)
    seg = torch.zeros(num_rows, seq_len, dtype=torch.int64)
    pos = torch.zeros(num_rows, seq_len, dtype=torch.int64)
    loss_mask = torch.zeros(num_rows, seq_len, dtype=torch.int64)
    fill = [0] * num_rows
    rows: list[list[dict]] = [[] for _ in range(num_rows)]
    for s in samples:
        n = len(s["tokens"])
        r = next((r for r in range(num_rows) if fill[r] + n <= seq_len), None)
        if r is None:
            raise ValueError(
                f"pack_sequences: a sample of {n} tokens fits no row ({num_rows} rows of {seq_len}, filled {fill})"
            )
        a = fill[r]
        tokens[r, a : a + n] = s["tokens"]
        seg[r, a : a + n] = len(rows[r]) + 1
        pos[r, a : a + n] = torch.arange(n)
        loss_mask[r, a : a + n] = s["loss_mask"] if "loss_mask" in s else 1
        fill[r] += n
        rows[r].append(s)
    ordered = [s for row in rows for s in row]
    return {
        "tokens": tokens,
        "segment_ids": seg,
        "positions": pos,
        "loss_mask": loss_mask,
        **_extras(ordered, _SEQ_KEYS),
    }


class Packer:
    """``pack_sequences`` with fixed arguments, as a picklable collate function for the Loader."""

    def __init__(self, seq_len: int, num_rows: int, pad_id: int = 0):
        self.seq_len, self.num_rows, self.pad_id = seq_len, num_rows, pad_id

    def __call__(self, samples: Sequence[dict]) -> dict:
        return pack_sequences(samples, self.seq_len, self.num_rows, pad_id=self.pad_id)


class Padder:
    """``pad_sequences`` with fixed arguments, as a picklable collate function for the Loader."""

    def __init__(self, pad_id: int = 0, pad_to_multiple: int = 1, max_len: int | None = None):
        self.pad_id, self.pad_to_multiple, self.max_len = pad_id, pad_to_multiple, max_len

    def __call__(self, samples: Sequence[dict]) -> dict:
        return pad_sequences(
            samples, pad_id=self.pad_id, pad_to_multiple=self.pad_to_multiple, max_len=self.max_len
        )
