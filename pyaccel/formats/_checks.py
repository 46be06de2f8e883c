"""Checks of canonical compressed weights (what a state_dict holds), shared by
the modules, so that every kernel path sees only values it computes exactly:
the same checkpoint gives the same answer on every ISA.

Each function returns None for a valid tensor, else a message naming the
buffer and what was expected. Value checks are skipped on the meta device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from pyaccel.reference import QMAX

# 2:4 position nibbles i0 | i1 << 2 with i0 < i1
VALID_24_NIBBLES = (0 | 1 << 2, 0 | 2 << 2, 0 | 3 << 2, 1 | 2 << 2, 1 | 3 << 2, 2 | 3 << 2)


def _desc(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def tensor_error(name: str, t, dtype: torch.dtype, shape: Sequence[int]) -> Optional[str]:
    if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
        return f"{name}: expected {dtype} of shape {tuple(shape)}, got {_desc(t)}"
    return None


def int8_values_error(name: str, t: Tensor) -> Optional[str]:
    """int8 weights must lie in [-127, 127]: the AVX2 kernels negate them (sign trick)."""
    if t.device.type != "meta" and t.numel() and int(t.min()) < -QMAX:
        where = (t == -128).nonzero()[0].tolist()
        return (f"{name}: expected int8 values in [-{QMAX}, {QMAX}], found -128 at index {tuple(where)} "
                "(quantize symmetrically, or clamp to -127)")
    return None


def require_int8_values(name: str, t: Tensor) -> None:
    """ValueError (int8_values_error's message) when t holds -128."""
    err = int8_values_error(name, t)
    if err:
        raise ValueError(err)


def scale_error(name: str, t: Tensor) -> Optional[str]:
    if t.device.type != "meta" and t.numel() and not bool(torch.isfinite(t).all()):
        i = int((~torch.isfinite(t)).nonzero()[0])
        return f"{name}: expected finite scales, found {float(t[i])} at index {i}"
    return None


def sparse24_meta_error(name: str, meta: Tensor, groups: int) -> Optional[str]:
    """Every group's nibble must hold two distinct positions i0 < i1."""
    if meta.device.type == "meta" or not meta.numel():
        return None
    m = meta.to(torch.int64)
    nib = torch.stack([m & 0xF, m >> 4], dim=-1).reshape(meta.shape[0], -1)[:, :groups]
    ok = torch.zeros_like(nib, dtype=torch.bool)
    for v in VALID_24_NIBBLES:
        ok |= nib == v
    if not bool(ok.all()):
        row, grp = (~ok).nonzero()[0].tolist()
        v = int(nib[row, grp])
        return (f"{name}: group {grp} of row {row} has positions ({v & 3}, {v >> 2}); expected two "
                "distinct positions i0 < i1 in 0..3")
    return None


def sparse24_padding_error(name: str, values: Tensor, meta: Tensor, k: int) -> Optional[str]:
    """The last group's kept values at positions >= k (padding) must be zero:
    otherwise the weights belong to a wider layer."""
    if k % 4 == 0 or values.device.type == "meta" or not values.numel():
        return None
    g = (k + 3) // 4 - 1
    byte = meta[:, g // 2].to(torch.int64)
    nib = (byte >> 4) if g % 2 else (byte & 0xF)
    pos = torch.stack([nib & 3, nib >> 2], dim=-1)  # [N, 2]
    bad = (pos >= k % 4) & (values[:, 2 * g: 2 * g + 2] != 0)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        return f"{name}: row {row} holds a non-zero weight past in_features = {k} (a weight of another shape?)"
    return None


def sparse24_shape_error(values, meta, k, values_name: str = "values", meta_name: str = "meta",
                         min_k: int = 1) -> Optional[str]:
    """The canonical 2:4 shapes for k inputs (G = ceil(k / 4) groups): values
    [N, 2G], meta uint8 [N, ceil(G / 2)], k an int >= min_k."""
    if isinstance(k, bool) or not isinstance(k, int) or k < min_k:
        return f"k: expected an int >= {min_k} (the dense weight's inputs), got {k!r}"
    g = (k + 3) // 4
    if not isinstance(values, Tensor) or values.dim() != 2 or values.shape[1] != 2 * g:
        return f"{values_name}: expected [N, {2 * g}] (2 kept of every 4 of k={k} inputs), got {_desc(values)}"
    n = values.shape[0]
    err = tensor_error(meta_name, meta, torch.uint8, (n, (g + 1) // 2))
    return f"{err} (one nibble per group of 4 inputs)" if err else None


def require_sparse24_format(values: Tensor, meta: Tensor, k: int, values_name: str = "values",
                            meta_name: str = "meta") -> None:
    """ValueError naming the argument when values / meta are not the canonical
    shapes for k (sparse24_shape_error), meta holds a group without two
    distinct positions, or values a non-zero weight past k (see
    sparse24_meta_error, sparse24_padding_error)."""
    err = (sparse24_shape_error(values, meta, k, values_name, meta_name)
           or sparse24_meta_error(meta_name, meta, (k + 3) // 4)
           or sparse24_padding_error(values_name, values, meta, k))
    if err:
        raise ValueError(err)


def same_device_error(tensors: dict) -> Optional[str]:
    ts = {k: t for k, t in tensors.items() if isinstance(t, Tensor)}
    devs = {t.device for t in ts.values()}
    if len(devs) > 1:
        return "buffers on different devices: " + ", ".join(f"{k} on {t.device}" for k, t in ts.items())
    return None
