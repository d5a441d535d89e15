"""Explicit, counter-based PRNG keys in the style of ``jax.random``.

A key is an ``int64`` tensor of shape ``[2]`` holding two uint32 words. Every sampler hashes
``(key, element index)`` with Threefry-2x32 (20 rounds, the Random123 generator JAX uses), written in plain
tensor ops. Consequences:

- no global RNG is read or advanced, anywhere;
- the same key gives the same numbers on every call, every process and every device (CPU, CUDA, NPU), because
  the bits come from integer arithmetic, not from a device generator;
- it traces under ``torch.compile`` (no ``.item()``, no generator objects), so dropout / diffusion noise can
  live inside a compiled train step;
- under ``torch.device("meta")`` it allocates nothing, which is what abstract init needs.

Example::

    >>> from functional_mm import random
    >>> k = random.key(0)
    >>> k1, k2 = random.split(k)
    >>> x = random.normal(k1, (2, 3))
    >>> bool((x == random.normal(k1, (2, 3))).all())
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "key",
    "split",
    "fold_in",
    "bits",
    "uniform",
    "normal",
    "truncated_normal",
    "bernoulli",
    "randint",
    "permutation",
]

_MASK = 0xFFFFFFFF
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
Shape = Sequence[int] | torch.Size | int


def _shape(shape: Shape) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)


def _check_key(k: torch.Tensor) -> None:
    if not isinstance(k, torch.Tensor) or k.shape != (2,) or k.dtype != torch.int64:
        got = f"{type(k).__name__} {getattr(k, 'dtype', '')} {tuple(getattr(k, 'shape', ()))}"
        raise TypeError(f"expected a PRNG key (int64 tensor of shape [2] from random.key/split), got {got}")


def key(seed: int) -> torch.Tensor:
    """A PRNG key from an integer seed (the 64-bit seed is split into two uint32 words, as in JAX)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return torch.tensor([seed >> 32, seed & _MASK], dtype=torch.int64)


def _rotl(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _MASK


def _threefry2x32(k: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Threefry-2x32, 20 rounds, on int64 tensors holding uint32 values (masking keeps them in range)."""
    k0, k1 = k[0].to(x0.device), k[1].to(x0.device)
    ks = (k0, k1, k0 ^ k1 ^ 0x1BD11BDA)
    x0 = (x0 + ks[0]) & _MASK
    x1 = (x1 + ks[1]) & _MASK
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = (x0 + x1) & _MASK
            x1 = _rotl(x1, r) ^ x0
        x0 = (x0 + ks[(i + 1) % 3]) & _MASK
        x1 = (x1 + ks[(i + 2) % 3] + (i + 1)) & _MASK
    return x0, x1


def _hash_counts(k: torch.Tensor, n: int, device: torch.device | None) -> torch.Tensor:
    """``n`` uint32 words (int64 tensor ``[n]``) from counters ``0..n-1``: the counter array is cut in two
    halves that form the two Threefry lanes (JAX's layout)."""
    half = (n + 1) // 2
    counts = torch.arange(2 * half, dtype=torch.int64, device=device if device is not None else k.device)
    y0, y1 = _threefry2x32(k, counts[:half], counts[half:])
    return torch.cat([y0, y1])[:n]


def split(k: torch.Tensor, num: int = 2) -> torch.Tensor:
    """``num`` new independent keys, as a ``[num, 2]`` tensor (unpack it: ``k1, k2 = split(k)``)."""
    _check_key(k)
    return _hash_counts(k, 2 * num, k.device).reshape(num, 2)


def fold_in(k: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """A new key that mixes ``data`` (e.g. a step or rank) into ``k``; the same inputs give the same key."""
    _check_key(k)
    if isinstance(data, torch.Tensor):
        d = data.to(torch.int64).reshape(())
        hi, lo = (d >> 32) & _MASK, d & _MASK
        x0, x1 = hi.reshape(1).to(k.device), lo.reshape(1).to(k.device)
    else:
        d = int(data) & 0xFFFFFFFFFFFFFFFF
        x0 = torch.tensor([d >> 32], dtype=torch.int64, device=k.device)
        x1 = torch.tensor([d & _MASK], dtype=torch.int64, device=k.device)
    y0, y1 = _threefry2x32(k, x0, x1)
    return torch.cat([y0, y1])


def bits(k: torch.Tensor, shape: Shape, device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform random uint32 words as an int64 tensor of ``shape`` (values in ``[0, 2**32)``)."""
    _check_key(k)
    shape, dev = _shape(shape), _device(k, device)
    if dev.type == "meta":  # abstract init: skip ~150 meta kernels per sample, only the shape matters
        return torch.empty(shape, dtype=torch.int64, device=dev)
    return _hash_counts(k, math.prod(shape), dev).reshape(shape)


def _device(k: torch.Tensor, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.compiler.is_compiling():  # dynamo cannot trace get_default_device; meta init never compiles
        return k.device
    default = torch.get_default_device()
    return default if default.type == "meta" else k.device


def _unit_open(k: torch.Tensor, shape: Shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Uniform in the open interval (0, 1): float32 from 23 random bits, float64 from 52."""
    shape = _shape(shape)
    if dtype == torch.float64:
        w = bits(k, (2, *shape), device)
        m = ((w[0] >> 6) << 26) | (w[1] >> 6)  # 26 + 26 = 52 random bits
        return (m.to(torch.float64) + 0.5) * 2.0**-52
    return ((bits(k, shape, device) >> 9).to(torch.float32) + 0.5) * 2.0**-23


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def uniform(
    k: torch.Tensor,
    shape: Shape,
    dtype: torch.dtype = torch.float32,
    minval: float = 0.0,
    maxval: float = 1.0,
    device=None,
) -> torch.Tensor:
    """Uniform samples in ``[minval, maxval)``."""
    u = _unit_open(k, shape, _compute_dtype(dtype), device)
    return (minval + (maxval - minval) * u).to(dtype)


def normal(k: torch.Tensor, shape: Shape, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Standard normal samples (inverse-CDF of a uniform, as JAX does)."""
    u = _unit_open(k, shape, _compute_dtype(dtype), device)
    return (math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)).to(dtype)


def truncated_normal(
    k: torch.Tensor,
    lower: float,
    upper: float,
    shape: Shape,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Standard normal samples conditioned on ``lower <= x <= upper``."""
    if not lower < upper:
        raise ValueError(f"truncated_normal needs lower < upper, got lower={lower}, upper={upper}")
    a, b = math.erf(lower / math.sqrt(2.0)), math.erf(upper / math.sqrt(2.0))
    u = _unit_open(k, shape, _compute_dtype(dtype), device)
    x = math.sqrt(2.0) * torch.erfinv(a + (b - a) * u)
    return x.clamp(lower, upper).to(dtype)


def bernoulli(k: torch.Tensor, p: float | torch.Tensor, shape: Shape, device=None) -> torch.Tensor:
    """Boolean samples, True with probability ``p``."""
    return _unit_open(k, shape, torch.float32, device) < p


def _bits63(k: torch.Tensor, shape: Shape, device) -> torch.Tensor:
    w = bits(k, (2, *_shape(shape)), device)
    return ((w[0] & 0x7FFFFFFF) << 32) | w[1]


def randint(
    k: torch.Tensor, shape: Shape, minval: int, maxval: int, dtype: torch.dtype = torch.int64, device=None
) -> torch.Tensor:
    """Integers uniform in ``[minval, maxval)`` (63 random bits reduced modulo the span: bias < 2**-31)."""
    if not maxval > minval:
        raise ValueError(f"randint needs maxval > minval, got minval={minval}, maxval={maxval}")
    return (minval + _bits63(k, shape, device) % (maxval - minval)).to(dtype)


def permutation(k: torch.Tensor, x: int | torch.Tensor, device=None) -> torch.Tensor:
    """A random permutation of ``range(x)`` or of the first dimension of tensor ``x``."""
    n = x if isinstance(x, int) else x.shape[0]
    order = torch.argsort(_bits63(k, (n,), device if isinstance(x, int) else x.device), stable=True)
    return order if isinstance(x, int) else x[order]
