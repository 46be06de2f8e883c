"""Block-sparse weights in torch's BSR layout (``Tensor.to_sparse_bsr``).

Canonical form (what a state_dict stores; machine independent):

    values        [nnzb, bh, bw]  the kept blocks, row-major inside a block
                                  (fp32 for BlockSparseLinear, int8 in [-127, 127]
                                  for BlockSparseInt8Linear)
    crow_indices  [n_pad / bh + 1] int32: blocks of block row r are
                                  values[crow[r]:crow[r+1]]
    col_indices   [nnzb] int32:   each kept block's block column, strictly
                                  increasing within a block row
    shape (n, k), block (bh, bw)  the logical weight [out, in]; n_pad and k_pad
                                  round n and k up to the block; entries of edge
                                  blocks past n or k must be zero (checked: a
                                  checkpoint of a larger layer is refused)

This is the layout of a ``torch.sparse_bsr`` tensor of shape (n_pad, k_pad)
(https://pytorch.org/docs/stable/sparse.html#sparse-bsr-tensor), so
:func:`from_torch_bsr` / :func:`to_torch_bsr` convert without copying blocks
around. Shapes that are not multiples of the block are padded, never rejected.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

Block = Tuple[int, int]


@dataclasses.dataclass
class BlockSparseWeight:
    values: Tensor  # [nnzb, bh, bw]
    crow_indices: Tensor  # int32 [n_pad / bh + 1]
    col_indices: Tensor  # int32 [nnzb]
    shape: Tuple[int, int]  # (n, k)

    @property
    def block(self) -> Block:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def nnzb(self) -> int:
        return int(self.values.shape[0])

    @property
    def padded_shape(self) -> Tuple[int, int]:
        (n, k), (bh, bw) = self.shape, self.block
        return -(-n // bh) * bh, -(-k // bw) * bw

    @property
    def density(self) -> float:
        """Kept blocks / all blocks of the padded weight."""
        n_pad, k_pad = self.padded_shape
        bh, bw = self.block
        return self.nnzb / max(1, (n_pad // bh) * (k_pad // bw))


def check_block(block) -> Block:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ValueError(f"block: expected (block_rows, block_cols), two ints >= 1, got {block!r}")
    return int(block[0]), int(block[1])


def _padded(weight: Tensor, block: Block) -> Tensor:
    n, k = weight.shape
    bh, bw = block
    pn, pk = (-n) % bh, (-k) % bw
    return torch.nn.functional.pad(weight, (0, pk, 0, pn)) if pn or pk else weight


def _blocks(weight: Tensor, block: Block) -> Tensor:
    """[N, K] -> [N_pad/bh, K_pad/bw, bh, bw] (zero-padded)."""
    bh, bw = block
    w = _padded(weight, block)
    nb, kb = w.shape[0] // bh, w.shape[1] // bw
    return w.reshape(nb, bh, kb, bw).transpose(1, 2)


def block_norms(weight: Tensor, block: Block) -> Tensor:
    """L2 (Frobenius) norm of every block, [N_pad/bh, K_pad/bw], in fp32."""
    return _blocks(weight.detach().float(), check_block(block)).pow(2).sum((-1, -2)).sqrt()


def kept_blocks(nonzero: Tensor, block: Block) -> Tensor:
    """bool [ceil(n / bh), ceil(k / bw)]: which blocks of the nonzero map
    `nonzero` (bool [n, k], weight != 0) hold a non-zero (edge blocks padded
    with zeros)."""
    (n, k), (bh, bw) = nonzero.shape, block
    nb, kb = -(-n // bh), -(-k // bw)
    if nb * bh != n or kb * bw != k:
        padded = torch.zeros(nb * bh, kb * bw, dtype=torch.bool, device=nonzero.device)
        padded[:n, :k] = nonzero
        nonzero = padded
    return nonzero.reshape(nb, bh, kb, bw).any(3).any(1)


def zero_block_fraction(weight: Tensor, block: Block) -> float:
    """Fraction of the (padded) weight's blocks that are all zero."""
    kept = kept_blocks(weight.detach() != 0, check_block(block))
    return 1.0 - float(kept.float().mean()) if kept.numel() else 0.0


def block_mask(weight: Tensor, block: Block, sparsity: float) -> Tensor:
    """Mask of weight's shape that zeroes the round(sparsity * blocks) blocks of
    lowest L2 norm (ties: the block that comes first in row-major block order
    is zeroed first). Edge blocks are scored on their real (unpadded) entries."""
    block = check_block(block)
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity: expected a fraction in [0, 1], got {sparsity!r}")
    norms = block_norms(weight, block)
    nb, kb = norms.shape
    drop = int(round(float(sparsity) * nb * kb))
    keep = torch.ones(nb * kb, dtype=torch.bool, device=weight.device)
    if drop:
        order = torch.sort(norms.flatten(), stable=True).indices[:drop]
        keep[order] = False
    bh, bw = block
    m = keep.reshape(nb, kb).repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return m[: weight.shape[0], : weight.shape[1]]


def compress(weight: Tensor, block: Block) -> BlockSparseWeight:
    """Dense [N, K] weight -> canonical form, keeping every block that holds a
    non-zero (values in the weight's dtype)."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor [N, K], got {_desc(weight)}")
    block = check_block(block)
    w = weight.detach()
    blocks = _blocks(w, block)  # [nb, kb, bh, bw]
    keep = (blocks != 0).flatten(-2).any(-1)  # [nb, kb]
    rows, cols = keep.nonzero(as_tuple=True)
    values = blocks[rows, cols].contiguous()
    counts = keep.sum(1)
    crow = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=w.device)
    crow[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return BlockSparseWeight(values, crow, cols.to(torch.int32).contiguous(), (int(w.shape[0]), int(w.shape[1])))


def decompress(bsw: BlockSparseWeight) -> Tensor:
    """Canonical form -> dense [N, K] (exact)."""
    (n, k), (bh, bw) = bsw.shape, bsw.block
    n_pad, k_pad = bsw.padded_shape
    nb, kb = n_pad // bh, k_pad // bw
    crow = bsw.crow_indices.long()
    rows = torch.repeat_interleave(torch.arange(nb, device=crow.device), crow[1:] - crow[:-1])
    dense = torch.zeros(nb, kb, bh, bw, dtype=bsw.values.dtype, device=bsw.values.device)
    dense[rows, bsw.col_indices.long()] = bsw.values
    return dense.transpose(1, 2).reshape(n_pad, k_pad)[:n, :k]


def from_torch_bsr(t: Tensor, shape: Optional[Tuple[int, int]] = None) -> BlockSparseWeight:
    """From a ``torch.sparse_bsr`` tensor [N_pad, K_pad]; `shape` gives the
    logical (n, k), two ints, when it is smaller than the tensor's (padding).
    ValueError naming `weight` or `shape`."""
    if not isinstance(t, Tensor) or t.layout != torch.sparse_bsr:
        raise ValueError(f"weight: expected a torch.sparse_bsr tensor, got {_desc(t)}")
    if t.dim() != 2:
        raise ValueError(f"weight: expected a 2-D BSR tensor, got shape {tuple(t.shape)}")
    vals = t.values()
    bh, bw = int(vals.shape[1]), int(vals.shape[2])
    if shape is not None and not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in shape)):
        raise ValueError(f"shape: expected (out_features, in_features), two ints, got {shape!r}")
    n, k = (int(shape[0]), int(shape[1])) if shape is not None else tuple(t.shape)
    if not (t.shape[0] - bh < n <= t.shape[0] and t.shape[1] - bw < k <= t.shape[1]):
        raise ValueError(f"shape: {tuple((n, k))} does not pad to the BSR tensor's {tuple(t.shape)} "
                         f"with blocks of {(bh, bw)}")
    bsw = BlockSparseWeight(vals.contiguous(), t.crow_indices().to(torch.int32).contiguous(),
                            t.col_indices().to(torch.int32).contiguous(), (int(n), int(k)))
    err = canonical_error(bsw)
    if err:
        raise ValueError(f"weight: {err}")
    return bsw


def to_torch_bsr(bsw: BlockSparseWeight) -> Tensor:
    """The canonical form as a ``torch.sparse_bsr`` tensor of the padded shape."""
    return torch.sparse_bsr_tensor(bsw.crow_indices.long(), bsw.col_indices.long(), bsw.values,
                                   size=bsw.padded_shape)


def canonical_error(bsw: BlockSparseWeight, values_name: str = "values", padding: bool = True) -> Optional[str]:
    """Why `bsw` is not a valid canonical form (naming the tensor), or None.
    Checks shapes, dtypes, index ranges and order, and (padding=True) that the
    edge blocks hold zeros past n and k; index checks run on the CPU copy of the
    indices (they are small) and are skipped on the meta device."""
    v, crow, col = bsw.values, bsw.crow_indices, bsw.col_indices
    n, k = bsw.shape
    if not isinstance(v, Tensor) or v.dim() != 3:
        return f"{values_name}: expected a 3-D tensor [nnzb, block_rows, block_cols], got {_desc(v)}"
    bh, bw = bsw.block
    if bh < 1 or bw < 1:
        return f"{values_name}: blocks must be at least 1 x 1, got {bh} x {bw}"
    nb = -(-n // bh)
    kb = -(-k // bw)
    if not isinstance(crow, Tensor) or crow.dtype != torch.int32 or tuple(crow.shape) != (nb + 1,):
        return f"crow_indices: expected int32 of shape ({nb + 1},), got {_desc(crow)}"
    if not isinstance(col, Tensor) or col.dtype != torch.int32 or tuple(col.shape) != (v.shape[0],):
        return f"col_indices: expected int32 of shape ({v.shape[0]},) (one per block), got {_desc(col)}"
    if crow.device.type == "meta" or col.device.type == "meta":
        return None
    c, cl = crow.cpu().long(), col.cpu().long()
    if int(c[0]) != 0 or int(c[-1]) != v.shape[0]:
        return f"crow_indices: expected to start at 0 and end at nnzb = {v.shape[0]}, got {int(c[0])} ... {int(c[-1])}"
    steps = c[1:] - c[:-1]
    if bool((steps < 0).any()):
        r = int((steps < 0).nonzero()[0])
        return f"crow_indices: must not decrease, but crow_indices[{r + 1}] < crow_indices[{r}]"
    if cl.numel():
        if int(cl.min()) < 0 or int(cl.max()) >= kb:
            i = int(((cl < 0) | (cl >= kb)).nonzero()[0])
            return f"col_indices: index {int(cl[i])} at position {i} is out of range [0, {kb})"
        rows = torch.repeat_interleave(torch.arange(nb), steps)
        same_row = rows[1:] == rows[:-1]
        bad = same_row & (cl[1:] <= cl[:-1])
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            return (f"col_indices: block row {int(rows[i])} has columns {int(cl[i])}, {int(cl[i + 1])} "
                    "(expected strictly increasing: unsorted or duplicate)")
        if padding and v.device.type != "meta" and (n % bh or k % bw):
            vals = v.detach().cpu()
            if n % bh:
                last = (rows == nb - 1).nonzero().flatten()
                if last.numel() and bool((vals[last][:, n % bh:, :] != 0).any()):
                    return (f"{values_name}: block row {nb - 1} holds non-zero weights past out_features = {n} "
                            "(a weight of another shape?)")
            if k % bw:
                last = (cl == kb - 1).nonzero().flatten()
                if last.numel() and bool((vals[last][:, :, k % bw:] != 0).any()):
                    return (f"{values_name}: block column {kb - 1} holds non-zero weights past in_features = {k} "
                            "(a weight of another shape?)")
    return None


def _desc(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"{t.dtype} {t.layout} tensor of shape {tuple(t.shape)} on {t.device}"


def _pack(bsw: BlockSparseWeight, dtype: torch.dtype, nbytes_fn: str, pack_fn: str):
    from pyaccel import _native
    from pyaccel.formats._buffer import packed_buffer

    v = bsw.values
    if dtype == torch.int8 and (not isinstance(v, Tensor) or v.dtype != torch.int8):
        raise TypeError(f"values: expected int8 blocks (quantize_blocks makes them), got {_desc(v)}")
    if dtype == torch.float32 and (not isinstance(v, Tensor) or not v.is_floating_point()):
        raise TypeError(f"values: expected floating-point blocks, got {_desc(v)}")
    # the native packer reads int32 indices within their declared lengths: check them first
    # (values past n and k in edge blocks are packed as zeros)
    err = canonical_error(bsw, padding=False)
    if err:
        raise ValueError(err)
    C = _native.lib()
    if C is None:
        return None
    vals = bsw.values.detach().to("cpu", dtype).contiguous()
    crow = bsw.crow_indices.detach().cpu().contiguous()
    col = bsw.col_indices.detach().cpu().contiguous()
    (n, k), (bh, bw) = bsw.shape, bsw.block
    nbytes = getattr(C, nbytes_fn)(n, k, bh, bw, bsw.nnzb)
    out = packed_buffer(nbytes)
    getattr(C, pack_fn)(vals.data_ptr(), crow.data_ptr(), col.data_ptr(), n, k, bh, bw, bsw.nnzb, out.data_ptr(),
                        nbytes)
    return out


def pack_block_sparse(bsw: BlockSparseWeight):
    """Pack fp32 blocks for the native CPU kernels (layouts 1 and 2, see
    csrc/block_sparse/pack.cpp); None without the native library. The
    packer refuses bad indices (ValueError naming them)."""
    return _pack(bsw, torch.float32, "bsr_packed_nbytes", "bsr_pack")


def pack_block_sparse_int8(bsw: BlockSparseWeight):
    """Pack int8 blocks (values in [-127, 127]) for the native CPU kernels
    ("BSR_I8_K4", see csrc/block_sparse/block_sparse.h); None without the
    native library. The packer refuses bad indices."""
    return _pack(bsw, torch.int8, "bsr_int8_packed_nbytes", "bsr_int8_pack")


def quantize_blocks(bsw: BlockSparseWeight):
    """fp BSR weight -> (int8 BSR weight, fp32 scale [n]): symmetric per output
    channel over the kept blocks (pyaccel.formats.int8.quantize_weight_per_channel
    on the dense weight, whose zeros stay zeros), same block structure."""
    from pyaccel.formats.int8 import quantize_weight_per_channel

    n, k = bsw.shape
    q = quantize_weight_per_channel(decompress(bsw).float())
    (bh, bw), (n_pad, k_pad) = bsw.block, bsw.padded_shape
    dense = torch.nn.functional.pad(q.values, (0, k_pad - k, 0, n_pad - n))
    blocks = dense.reshape(n_pad // bh, bh, k_pad // bw, bw).transpose(1, 2)
    crow = bsw.crow_indices.long()
    rows = torch.repeat_interleave(torch.arange(n_pad // bh, device=crow.device), crow[1:] - crow[:-1])
    values = blocks[rows, bsw.col_indices.long()].contiguous()
    return BlockSparseWeight(values, bsw.crow_indices, bsw.col_indices, bsw.shape), q.scale
