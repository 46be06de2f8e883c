"""int8 linear: pyaccel vs torch fp32 / bf16 / torch.ao dynamic int8 / ONNX Runtime.

Rows: each weight shape x M, weights hot in cache (the same module called
again and again) and, at M = 1, streamed from memory (calls rotate over
enough weight copies that none stays in the last-level cache).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyaccel.bench import baselines
from pyaccel.bench.common import FLOOR, Row, floor_copies, make_linear, measure_layer
from pyaccel.bench.timing import interleaved
from pyaccel.nn import Int8Linear

A7 = "pyaccel int8 a7"


def _candidates(lin: nn.Linear, x: torch.Tensor, threads: int, copies: int, with_ort: bool):
    """name -> (list of callables over weight copies, output for error, weight bytes)."""
    out = {}
    mods = [Int8Linear.from_float(lin)] + [Int8Linear.from_float(lin) for _ in range(copies - 1)]
    out["pyaccel int8"] = [lambda m=m: m(x) for m in mods]
    # the opt-in 7-bit activation mode (Int8Linear act_bits=7): its SQNR column states its accuracy
    mods7 = [Int8Linear.from_float(lin, act_bits=7) for _ in range(copies)]
    out[A7] = [lambda m=m: m(x) for m in mods7]
    w32 = [lin.weight.detach().clone() for _ in range(copies)]
    b32 = lin.bias.detach()
    out["torch fp32"] = [lambda w=w: F.linear(x, w, b32) for w in w32]
    xb = x.to(torch.bfloat16)
    wb = [w.to(torch.bfloat16) for w in w32]
    bb = b32.to(torch.bfloat16)
    out["torch bf16"] = [lambda w=w: F.linear(xb, w, bb) for w in wb]
    aos = [baselines.torch_ao_dynamic(copy.deepcopy(lin)) for _ in range(copies)]
    out["torch.ao int8"] = [lambda a=a: a(x) for a in aos]
    if copies > 1:  # streamed: torch.sum over the same bytes, interleaved, is the memory floor
        sums = floor_copies(lin.in_features * lin.out_features, copies)
        out[FLOOR] = [lambda t=t: t.sum() for t in sums]
    if with_ort:
        runs = []
        for _ in range(copies):
            r, why = baselines.onnxruntime_dynamic(lin, threads)
            if r is None:
                break
            runs.append(r)
        if runs:
            out["onnxruntime int8"] = [lambda r=r: r(x) for r in runs]
    return out


def run(shapes=((4096, 4096), (1024, 4096)), ms=(1, 8, 32, 128, 512), threads: Optional[int] = None,
        budget_s: float = 2.0, with_ort: bool = True, streamed: bool = True, log=print,
        weights: str = "normal") -> List[Row]:
    """Rows of the int8 suite; weights: common.WEIGHTS."""
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    rows: List[Row] = []
    ratio_to = {"×fp32": "torch fp32", "×torch.ao": "torch.ao int8", "×ORT": "onnxruntime int8",
                "×floor": FLOOR}  # floor time / ours: the share of the floor's read rate we reach
    for n, k in shapes:
        lin = make_linear(k, n, weights).eval()
        rows += measure_layer(
            "int8", lin.weight.detach(), lin.bias.detach(), ms, streamed, n * k,
            lambda x, copies, lin=lin, nk=n * k: (_candidates(lin, x, threads, copies, with_ort),
                                                  {"pyaccel int8": nk, A7: nk, FLOOR: nk}),
            ("pyaccel int8", A7), ratio_to, budget_s, log)
    return rows


def memory_read_gbs(nbytes: int = 256 << 20, reps: int = 7) -> float:
    """DRAM read bandwidth seen by torch (a sum over a buffer 8x the L3), GB/s."""
    buf = torch.ones(nbytes // 4)
    t = interleaved({"sum": lambda: buf.sum()}, min_rounds=reps, max_rounds=reps, budget_s=0)["sum"]
    return nbytes / t.median_s / 1e9


def eager_overhead(n: int = 256, k: int = 256, budget_s: float = 1.0) -> Dict[str, float]:
    """Module call vs its bare native plan call (preallocated output), M = 1."""
    mod = Int8Linear.from_float(nn.Linear(k, n))
    x = torch.randn(1, k)
    y = torch.empty(1, n)
    plan, xp, yp, threads = mod._plan, x.data_ptr(), y.data_ptr(), torch.get_num_threads()
    with torch.inference_mode():
        t = interleaved({"module": lambda: mod(x), "bare kernel": lambda: plan(xp, k, False, 1, yp, threads)},
                        budget_s=budget_s, min_rounds=2000, max_rounds=20000)
    return {"module_us": t["module"].median_s * 1e6, "bare_us": t["bare kernel"].median_s * 1e6,
            "overhead_us": (t["module"].median_s - t["bare kernel"].median_s) * 1e6}


def thread_interference(n: int = 512, k: int = 512, m: int = 256, budget_s: float = 1.5) -> Dict[str, float]:
    """torch fp32 F.linear and pyaccel int8, each alone and then alternating
    call by call. Weights are small (1 MB fp32, 256 KB int8) so that what is
    measured is the thread pools, not one op evicting the other's weights from
    cache. Ratios near 1: neither slows the other (one shared OpenMP pool)."""
    lin = nn.Linear(k, n)
    mod = Int8Linear.from_float(lin)
    x = torch.randn(m, k)
    with torch.inference_mode():
        def f_torch():
            return F.linear(x, lin.weight, lin.bias)

        def f_pa():
            return mod(x)
        alone_t = interleaved({"t": f_torch}, budget_s=budget_s / 3, max_rounds=1000)["t"].median_s
        alone_p = interleaved({"p": f_pa}, budget_s=budget_s / 3, max_rounds=1000)["p"].median_s
        both = interleaved({"t": f_torch, "p": f_pa}, budget_s=budget_s / 3, max_rounds=1000)
    return {"torch_alone_us": alone_t * 1e6, "torch_alternating_us": both["t"].median_s * 1e6,
            "pyaccel_alone_us": alone_p * 1e6, "pyaccel_alternating_us": both["p"].median_s * 1e6}
