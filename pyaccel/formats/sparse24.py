"""2:4 semi-structured sparse weights: in every group of 4 consecutive
input-dim weights of a row, at most 2 are non-zero.

Canonical form (what a state_dict stores; machine independent):

    values  [N, G*2]  the two kept weights of each group, in position order
                      (fp32, bf16 or any float dtype of the source weight)
    meta    [N, ceil(G/2)] uint8: per group a nibble i0 | i1 << 2 with
                      positions i0 < i1 in 0..3; group g sits in the low nibble
                      of byte g//2 when g is even, the high nibble when odd
    k       the logical in_features; G = ceil(k / 4) groups, K padded with zeros

A group with fewer than 2 non-zeros keeps zeros at unused positions (the lowest
free ones), so every group has exactly two (position, value) slots and the
round trip to dense is lossless.
"""
from __future__ import annotations

import dataclasses

import torch

from pyaccel.formats._buffer import packed_buffer

GROUP = 4
KEEP = 2


@dataclasses.dataclass
class Sparse24Weight:
    values: torch.Tensor  # [N, 2G]
    meta: torch.Tensor  # uint8 [N, ceil(G/2)]
    k: int

    @property
    def shape(self):
        return (self.values.shape[0], self.k)


def _grouped(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N, G, 4], zero-padded along K."""
    n, k = weight.shape
    pad = (-k) % GROUP
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    return weight.reshape(n, (k + pad) // GROUP, GROUP)  # no -1: an empty weight has 0 rows


def mask_24(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4 mask: keep the 2 largest |w| of every group of 4 along K.

    Ties are broken deterministically toward the lower position (a stable
    descending sort), so equal magnitudes keep the first two positions.
    Returns a bool mask of weight's shape.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [N, K] tensor, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    g = _grouped(weight.detach().abs().float())
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :KEEP]
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(n, g.shape[1] * GROUP)[:, :k]


def is_24(weight: torch.Tensor) -> bool:
    """True when every group of 4 along K has at most 2 non-zeros."""
    if weight.dim() != 2:
        return False
    return bool(((_grouped(weight.detach()) != 0).sum(-1) <= KEEP).all())


def compress(weight: torch.Tensor) -> Sparse24Weight:
    """Dense [N, K] weight that follows 2:4 -> canonical compressed form.

    Raises ValueError naming the first group that has more than 2 non-zeros.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight: expected a 2-D floating-point tensor [N, K], got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    w = weight.detach()
    n, k = w.shape
    g = _grouped(w)
    nz = g != 0
    counts = nz.sum(-1)
    if bool((counts > KEEP).any()):
        row, grp = (counts > KEEP).nonzero()[0].tolist()
        raise ValueError(
            f"weight: not 2:4 sparse: row {row}, columns {4 * grp}..{4 * grp + 3} hold "
            f"{int(counts[row, grp])} non-zeros (at most 2 per group of 4 allowed)")
    # positions: the non-zeros first (in position order), then the lowest zero positions
    pos = torch.arange(GROUP, device=w.device).expand_as(g)
    key = torch.where(nz, pos, pos + GROUP)  # non-zeros sort first, each side in position order
    idx = torch.sort(key, dim=-1).indices[..., :KEEP]
    idx = torch.sort(idx, dim=-1).values  # i0 < i1
    vals = torch.gather(g, -1, idx).reshape(n, KEEP * g.shape[1])
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [N, G]
    if nib.shape[1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()
    return Sparse24Weight(vals.contiguous(), meta, k)


def positions(sw: Sparse24Weight) -> torch.Tensor:
    """Per group positions [N, G, 2] (int64) decoded from meta."""
    n = sw.values.shape[0]
    groups = sw.values.shape[1] // KEEP
    m = sw.meta.to(torch.int64)
    nib = torch.stack([m & 0xF, m >> 4], dim=-1).reshape(n, 2 * m.shape[1])[:, :groups]
    return torch.stack([nib & 3, nib >> 2], dim=-1)


def decompress(sw: Sparse24Weight) -> torch.Tensor:
    """Canonical form -> dense [N, K] (exact). ValueError naming the argument
    when values / meta are not the canonical shapes for k."""
    from pyaccel.formats._checks import sparse24_shape_error

    err = sparse24_shape_error(sw.values, sw.meta, sw.k, min_k=0)
    if err:
        raise ValueError(err)
    n = sw.values.shape[0]
    groups = sw.values.shape[1] // KEEP
    dense = torch.zeros(n, groups, GROUP, dtype=sw.values.dtype, device=sw.values.device)
    dense.scatter_(-1, positions(sw), sw.values.reshape(n, groups, KEEP))
    return dense.reshape(n, groups * GROUP)[:, :sw.k]


def position_bytes(sw: Sparse24Weight) -> torch.Tensor:
    """One byte per group, i0 | i1 << 2: the form the native kernels pack."""
    pos = positions(sw)
    return (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8).contiguous()


def pack_sparse24(sw: Sparse24Weight):
    """Pack for the native CPU kernels (fp32 values); None without the native library.
    ValueError when meta holds a group without two distinct positions, or the
    values a non-zero weight past k."""
    from pyaccel import _native
    from pyaccel.formats._checks import require_sparse24_format

    require_sparse24_format(sw.values.detach(), sw.meta.detach(), sw.shape[1])
    C = _native.lib()
    if C is None:
        return None
    n, k = sw.shape
    vals = sw.values.detach().to("cpu", torch.float32).contiguous()
    pb = position_bytes(Sparse24Weight(vals, sw.meta.detach().cpu(), k))
    nbytes = C.s24_packed_nbytes(n, k)
    out = packed_buffer(nbytes)
    C.s24_pack(vals.data_ptr(), vals.stride(0), pb.data_ptr(), pb.stride(0), n, k, out.data_ptr(), nbytes)
    return out


def pack_sparse24_int8(values: torch.Tensor, meta: torch.Tensor, k: int):
    """Pack int8 2:4 values for the native kernels; None without the native library.
    ValueError when values holds -128 (the packings hold [-127, 127] only), meta
    a group without two distinct positions, or the values a non-zero weight past k."""
    from pyaccel import _native
    from pyaccel.formats._checks import _desc, require_int8_values, require_sparse24_format

    if not isinstance(values, torch.Tensor) or values.dtype != torch.int8:
        raise TypeError(f"values: expected an int8 tensor, got {_desc(values)}")
    require_sparse24_format(values.detach(), meta.detach(), k)
    require_int8_values("values", values.detach())

    C = _native.lib()
    if C is None:
        return None
    vals = values.detach().to("cpu", torch.int8).contiguous()
    n = vals.shape[0]
    pb = position_bytes(Sparse24Weight(vals, meta.detach().cpu(), k))
    nbytes = C.s24i8_packed_nbytes_for(vals.data_ptr(), vals.stride(0), pb.data_ptr(), pb.stride(0), n, k)
    out = packed_buffer(nbytes)
    C.s24i8_pack(vals.data_ptr(), vals.stride(0), pb.data_ptr(), pb.stride(0), n, k, out.data_ptr(), nbytes)
    return out
