"""2:4 sparse linear: pyaccel Sparse24Linear vs dense torch F.linear on the same
masked weights (fp32 and bf16), hot and (M = 1) streamed from memory; 2:4 int8
vs pyaccel's dense int8, hot and (M = 1, 4) streamed."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from pyaccel.bench.common import Row, make_linear, measure_layer
from pyaccel.formats import sparse24 as s24
from pyaccel.nn import Int8Linear, Sparse24Int8Linear, Sparse24Linear

SHAPES = ((4096, 4096), (1024, 4096), (1536, 384), (384, 1536))  # the last two: MiniLM's FFN


def _candidates(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, copies: int):
    mods = [Sparse24Linear.from_dense(w, b) for _ in range(copies)]
    dense = [w.clone() for _ in range(copies)]
    xb, bb = x.to(torch.bfloat16), b.to(torch.bfloat16)
    dense_bf = [d.to(torch.bfloat16) for d in dense]
    return {
        "pyaccel 2:4 fp32": [lambda m=m: m(x) for m in mods],
        "torch fp32 dense (masked)": [lambda d=d: F.linear(x, d, b) for d in dense],
        "torch bf16 dense (masked)": [lambda d=d: F.linear(xb, d, bb) for d in dense_bf],
    }, mods[0]._packed.numel()


def _int8_candidates(lin: nn.Linear, x: torch.Tensor, copies: int):
    sparse = [Sparse24Int8Linear.from_float(lin) for _ in range(copies)]
    dense = [Int8Linear.from_float(lin) for _ in range(copies)]
    return {"pyaccel 2:4 int8": [lambda m=m: m(x) for m in sparse],
            "pyaccel int8 (dense)": [lambda m=m: m(x) for m in dense]}, sparse[0]._packed.numel()


INT8_MS = (1, 4, 8, 32, 128)
INT8_STREAMED_MS = (1, 4)  # 4: the AVX2 kernels' k-blocked row path, whose weights stream from DRAM in big models


def run_int8(shapes=SHAPES, ms=INT8_MS, budget_s: float = 2.0, streamed: bool = True,
             log=print, weights: str = "normal", streamed_ms=INT8_STREAMED_MS) -> List[Row]:
    """2:4 + int8 against pyaccel's own dense int8 on the same (pruned) layer,
    streamed from memory too at the M in streamed_ms; weights: common.WEIGHTS."""
    torch.manual_seed(0)
    rows: List[Row] = []
    for n, k in shapes:
        lin = make_linear(k, n, weights)
        with torch.no_grad():
            lin.weight.mul_(s24.mask_24(lin.weight))

        def make(x, copies, lin=lin, n=n, k=k):
            cands, nbytes = _int8_candidates(lin, x, copies)
            return cands, {"pyaccel 2:4 int8": nbytes, "pyaccel int8 (dense)": n * k}
        rows += measure_layer("2:4 int8", lin.weight.detach(), lin.bias.detach(), ms, streamed, n * k, make,
                              "pyaccel 2:4 int8", {"×int8 dense": "pyaccel int8 (dense)"}, budget_s, log,
                              streamed_ms)
    return rows


def run(shapes=SHAPES, ms=(1, 8, 32, 128), budget_s: float = 2.0, streamed: bool = True, log=print,
        weights: str = "normal") -> List[Row]:
    """2:4 fp32 against dense torch on the same (pruned) layer; weights: common.WEIGHTS."""
    torch.manual_seed(0)
    rows: List[Row] = []
    ratio_to = {"×fp32 dense": "torch fp32 dense (masked)", "×bf16 dense": "torch bf16 dense (masked)"}
    for n, k in shapes:
        lin = make_linear(k, n, weights)
        w = (lin.weight * s24.mask_24(lin.weight)).detach()
        b = lin.bias.detach()

        def make(x, copies, w=w, b=b, n=n, k=k):
            cands, nbytes = _candidates(w, b, x, copies)
            return cands, {"pyaccel 2:4 fp32": nbytes, "torch fp32 dense (masked)": 4 * n * k}
        rows += measure_layer("2:4", w, b, ms, streamed, 4 * n * k, make, "pyaccel 2:4 fp32", ratio_to,
                              budget_s, log)
    return rows
