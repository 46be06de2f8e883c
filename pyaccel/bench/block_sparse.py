"""Block-sparse linear: pyaccel BlockSparseLinear against dense torch F.linear
and torch's own sparse matmul on the same weights (BSR for square blocks, in
its fastest form ``torch.mm(W_bsr, x.T).T``; CSR where torch's CPU BSR refuses
the block: "MKL Sparse doesn't support matrices with non-square blocks"), and
BlockSparseInt8Linear against pyaccel's dense Int8Linear. GOP/s counts the
kept blocks' multiply-adds only (2 · M · nnz)."""
from __future__ import annotations

import warnings
from typing import List

import torch
import torch.nn.functional as F

from pyaccel.bench.common import Row, measure
from pyaccel.formats import block_sparse as bsf
from pyaccel.formats.int8 import quantize_weight_per_channel
from pyaccel.nn import BlockSparseInt8Linear, BlockSparseLinear, Int8Linear

SHAPES = ((4096, 4096), (1024, 4096))
BLOCKS = ((32, 32), (16, 16), (1, 4))
SPARSITIES = (0.75, 0.9, 0.95)


def _weight(n: int, k: int, block, sparsity: float) -> torch.Tensor:
    w = torch.randn(n, k) / k ** 0.5
    return w * bsf.block_mask(w, block, sparsity)


def _torch_sparse(w: torch.Tensor, block):
    """torch's sparse matmul on w: (label, callable(x))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if block[0] == block[1]:
            wb = w.to_sparse_bsr(block)
            return "torch BSR mm", lambda x: torch.mm(wb, x.t()).t()
        wc = w.to_sparse_csr()
        return "torch CSR mm", lambda x: torch.mm(wc, x.t()).t()


def run(shapes=SHAPES, blocks=BLOCKS, sparsities=SPARSITIES, ms=(1, 8, 32, 128), budget_s: float = 1.0,
        log=print) -> List[Row]:
    torch.manual_seed(0)
    rows: List[Row] = []
    for n, k in shapes:
        for block in blocks:
            for sp in sparsities:
                w = _weight(n, k, block, sp)
                mod = BlockSparseLinear.from_dense(w, None, block)
                nnz = mod.values.numel()
                label, sparse = _torch_sparse(w, block)
                suite = f"bsr {block[0]}x{block[1]} {round(sp * 100)}%"
                for m in ms:
                    x = torch.randn(m, k)
                    with torch.no_grad():
                        ref = F.linear(x.double(), w.double())
                        cands = {"pyaccel BSR fp32": [lambda: mod(x)], "torch fp32 dense": [lambda: F.linear(x, w)],
                                 label: [lambda: sparse(x)]}
                        rows += measure(suite, f"{n}x{k}", m, nnz, 1, "hot", cands, ref, "pyaccel BSR fp32",
                                        {"pyaccel BSR fp32": mod._packed.numel()},
                                        {"×dense": "torch fp32 dense", "×torch sparse": label}, budget_s, log)
    return rows


def run_int8(shapes=SHAPES, blocks=BLOCKS, sparsity=0.9, ms=(1, 8, 32, 128), budget_s: float = 1.0,
             log=print) -> List[Row]:
    """BlockSparseInt8Linear against pyaccel's dense Int8Linear on the same pruned weight."""
    torch.manual_seed(0)
    rows: List[Row] = []
    for n, k in shapes:
        for block in blocks:
            w = _weight(n, k, block, sparsity)
            sparse = BlockSparseInt8Linear.from_dense(w, None, block)
            dense = Int8Linear.from_weights(quantize_weight_per_channel(w))
            nnz = sparse.values.numel()
            suite = f"bsr int8 {block[0]}x{block[1]} {round(sparsity * 100)}%"
            for m in ms:
                x = torch.randn(m, k)
                with torch.no_grad():
                    ref = F.linear(x.double(), w.double())
                    cands = {"pyaccel BSR int8": [lambda: sparse(x)], "pyaccel int8 (dense)": [lambda: dense(x)]}
                    rows += measure(suite, f"{n}x{k}", m, nnz, 1, "hot", cands, ref, "pyaccel BSR int8",
                                    {"pyaccel BSR int8": sparse._packed.numel()},
                                    {"×int8 dense": "pyaccel int8 (dense)"}, budget_s, log)
    return rows


def patch_decisions(shape=(4096, 4096), sparsities=(0.5, 0.6), block=(32, 32), m: int = 128,
                    budget_s: float = 1.0, log=print) -> List[dict]:
    """What patch decides for moderately sparse layers, and whether a layer it
    swapped is at least as fast as dense at M = m (interleaved check)."""
    import pyaccel
    from pyaccel.bench.timing import interleaved

    torch.manual_seed(0)
    out = []
    for sp in sparsities:
        lin = torch.nn.Linear(shape[1], shape[0], bias=False)
        with torch.no_grad():
            lin.weight.mul_(bsf.block_mask(lin.weight, block, sp))
        w = lin.weight.detach().clone()
        report = pyaccel.patch(torch.nn.Sequential(lin).eval(), inplace=False)
        e = report.entries[0]
        res = {"sparsity": sp, "swapped": e.swapped, "what": e.backend if e.swapped else e.reason}
        if e.swapped:
            mod = report.model[0]
            x = torch.randn(m, shape[1])
            with torch.no_grad():
                t = interleaved({"swapped": lambda: mod(x), "dense": lambda: F.linear(x, w)}, budget_s=budget_s)
            res["speedup_at_m"] = t["dense"].median_s / t["swapped"].median_s
        log(f"patch, {shape[0]}x{shape[1]} with {sp:.0%} zero {block[0]}x{block[1]} blocks: "
            + (f"swapped ({res['what']}); at M={m}: x{res['speedup_at_m']:.2f} over dense" if e.swapped
               else f"kept dense ({res['what']})"))
        out.append(res)
    return out


