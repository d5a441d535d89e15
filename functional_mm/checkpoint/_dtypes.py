"""torch <-> numpy / zarr dtypes, exact for bf16 and fp8 (ml_dtypes gives numpy the types torch has natively)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

__all__ = ["zarr_name", "torch_dtype", "to_numpy", "from_numpy"]

# torch dtype -> (zarr3 data_type, numpy dtype). Zarr 3 names are numpy's / ml_dtypes' names, which is also what
# tensorstore reports as ``TensorStore.dtype.name``.
_TABLE: dict[torch.dtype, tuple[str, np.dtype]] = {
    torch.bool: ("bool", np.dtype(np.bool_)),
    torch.int8: ("int8", np.dtype(np.int8)),
    torch.int16: ("int16", np.dtype(np.int16)),
    torch.int32: ("int32", np.dtype(np.int32)),
    torch.int64: ("int64", np.dtype(np.int64)),
    torch.uint8: ("uint8", np.dtype(np.uint8)),
    torch.uint16: ("uint16", np.dtype(np.uint16)),
    torch.uint32: ("uint32", np.dtype(np.uint32)),
    torch.uint64: ("uint64", np.dtype(np.uint64)),
    torch.float16: ("float16", np.dtype(np.float16)),
    torch.float32: ("float32", np.dtype(np.float32)),
    torch.float64: ("float64", np.dtype(np.float64)),
    torch.complex64: ("complex64", np.dtype(np.complex64)),
    torch.complex128: ("complex128", np.dtype(np.complex128)),
    torch.bfloat16: ("bfloat16", np.dtype(ml_dtypes.bfloat16)),
    torch.float8_e4m3fn: ("float8_e4m3fn", np.dtype(ml_dtypes.float8_e4m3fn)),
    torch.float8_e5m2: ("float8_e5m2", np.dtype(ml_dtypes.float8_e5m2)),
    torch.float8_e4m3fnuz: ("float8_e4m3fnuz", np.dtype(ml_dtypes.float8_e4m3fnuz)),
    torch.float8_e5m2fnuz: ("float8_e5m2fnuz", np.dtype(ml_dtypes.float8_e5m2fnuz)),
}
_BY_NAME = {name: t for t, (name, _) in _TABLE.items()}
# numpy has no bf16/fp8: move the bits through the unsigned int of the same width (a view, no copy).
_BITS = {1: (torch.uint8, np.uint8), 2: (torch.uint16, np.uint16)}
_NATIVE = {
    torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32,
    torch.uint64, torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128,
}  # fmt: skip


def zarr_name(dtype: torch.dtype) -> str:
    """The zarr 3 ``data_type`` of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    try:
        return _TABLE[dtype][0]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be checkpointed (supported: {sorted(_BY_NAME)})") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a zarr/tensorstore dtype name; zarr 2's ``<f4``-style names are accepted too."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    try:
        canonical = np.dtype(name).name
    except TypeError:
        canonical = name
    if canonical in _BY_NAME:
        return _BY_NAME[canonical]
    raise TypeError(f"stored dtype {name!r} has no torch equivalent")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (contiguous copy only when ``t`` is not contiguous)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype in _NATIVE:
        return t.numpy()
    bits_t, bits_np = _BITS[t.element_size()]
    return t.view(bits_t).numpy().view(_TABLE[t.dtype][1])


def from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor sharing ``a``'s memory, reinterpreted as ``dtype`` (which must match ``a``'s dtype)."""
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    if dtype in _NATIVE:
        return torch.from_numpy(a)
    bits_t, bits_np = _BITS[a.dtype.itemsize]
    return torch.from_numpy(a.view(bits_np)).view(dtype)
