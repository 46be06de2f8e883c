"""int8 linear: pyaccel vs torch fp32 / bf16 / torch.ao dynamic int8 / ONNX Runtime.

Rows: each weight shape x M, weights hot in cache (the same module called
again and again) and, at M = 1, streamed from memory (calls rotate over
enough weight copies that none stays in the last-level cache).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyaccel import _native
from pyaccel.bench import baselines
from pyaccel.bench.timing import Timing, interleaved
from pyaccel.nn import Int8Linear

STREAM_BYTES = 96e6  # > 2x a 32 MB L3: rotated weights come from DRAM


@dataclasses.dataclass
class Row:
    shape: str
    m: int
    mode: str  # "hot" or "streamed"
    name: str
    timing: Timing
    gops: float
    sqnr_db: Optional[float]
    weight_gbs: Optional[float] = None
    vs_fp32: Optional[float] = None
    vs_ao: Optional[float] = None
    vs_ort: Optional[float] = None


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    err = (ref - out).norm()
    return float("inf") if err == 0 else float(20 * torch.log10(ref.norm() / err))


def _rotating(fns):
    state = {"i": 0}

    def call():
        f = fns[state["i"] % len(fns)]
        state["i"] += 1
        return f()
    return call


def _candidates(lin: nn.Linear, x: torch.Tensor, threads: int, copies: int, with_ort: bool):
    """name -> (list of callables over weight copies, output for error, weight bytes)."""
    out = {}
    mods = [Int8Linear.from_float(lin)] + [Int8Linear.from_float(lin) for _ in range(copies - 1)]
    out["pyaccel int8"] = [lambda m=m: m(x) for m in mods]
    w32 = [lin.weight.detach().clone() for _ in range(copies)]
    b32 = lin.bias.detach()
    out["torch fp32"] = [lambda w=w: F.linear(x, w, b32) for w in w32]
    xb = x.to(torch.bfloat16)
    wb = [w.to(torch.bfloat16) for w in w32]
    bb = b32.to(torch.bfloat16)
    out["torch bf16"] = [lambda w=w: F.linear(xb, w, bb) for w in wb]
    aos = [baselines.torch_ao_dynamic(copy.deepcopy(lin)) for _ in range(copies)]
    out["torch.ao int8"] = [lambda a=a: a(x) for a in aos]
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
        budget_s: float = 2.0, with_ort: bool = True, streamed: bool = True, log=print) -> List[Row]:
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    rows: List[Row] = []
    for n, k in shapes:
        lin = nn.Linear(k, n).eval()
        shape = f"{n}x{k}"
        for m in ms:
            modes = ["hot"] + (["streamed"] if streamed and m == 1 else [])
            for mode in modes:
                copies = max(2, math.ceil(STREAM_BYTES / (n * k))) if mode == "streamed" else 1
                x = torch.randn(m, k)
                with torch.inference_mode():
                    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
                    cands = _candidates(lin, x, threads, copies, with_ort)
                    errs = {name: sqnr_db(ref, fns[0]().float()) for name, fns in cands.items()}
                    t = interleaved({name: _rotating(fns) for name, fns in cands.items()},
                                    budget_s=budget_s, max_rounds=400 if m <= 8 else 60,
                                    inner=1 if mode == "streamed" else 4)
                base = {name: t[name].median_s for name in t}
                for name, tm in t.items():
                    r = Row(shape, m, mode, name, tm, 2 * m * n * k / tm.median_s / 1e9,
                            errs[name] if name != "torch fp32" else None)
                    if name == "pyaccel int8":
                        r.weight_gbs = n * k / tm.median_s / 1e9
                        r.vs_fp32 = base["torch fp32"] / tm.median_s
                        r.vs_ao = base["torch.ao int8"] / tm.median_s
                        if "onnxruntime int8" in base:
                            r.vs_ort = base["onnxruntime int8"] / tm.median_s
                    rows.append(r)
                    log(format_row(r))
                del cands
    return rows


def memory_read_gbs(nbytes: int = 256 << 20, reps: int = 7) -> float:
    """DRAM read bandwidth seen by torch (a sum over a buffer 8x the L3), GB/s."""
    buf = torch.ones(nbytes // 4)
    t = interleaved({"sum": lambda: buf.sum()}, min_rounds=reps, max_rounds=reps, budget_s=0)["sum"]
    return nbytes / t.median_s / 1e9


def eager_overhead(n: int = 256, k: int = 256, budget_s: float = 1.0) -> Dict[str, float]:
    """Module forward vs the bare native call (preallocated output), M = 1."""
    C = _native.lib()
    mod = Int8Linear.from_float(nn.Linear(k, n))
    x = torch.randn(1, k)
    y = torch.empty(1, n)
    p, ws, b = mod._packed, mod.weight_scale, mod.bias
    args = (x.data_ptr(), k, False, 1, k, p.data_ptr(), p.numel(), n, ws.data_ptr(), b.data_ptr(),
            y.data_ptr(), n, False, torch.get_num_threads())
    with torch.inference_mode():
        t = interleaved({"module": lambda: mod(x), "bare kernel": lambda: C.int8_linear(*args)},
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


def format_row(r: Row) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    return (f"{r.shape:>10} {r.m:>4} {r.mode:>8} {r.name:>17} {r.timing.median_s * 1e6:>10.1f} "
            f"±{r.timing.spread * 100:>4.0f}% {r.gops:>8.1f} {f(r.sqnr_db, '6.1f'):>6} "
            f"{f(r.weight_gbs, '6.1f'):>6} {f(r.vs_fp32, '6.2f'):>6} {f(r.vs_ao, '5.2f'):>5} {f(r.vs_ort, '5.2f'):>5}")


HEADER = (f"{'W (NxK)':>10} {'M':>4} {'weights':>8} {'candidate':>17} {'median µs':>10} {'IQR':>6} "
          f"{'GOP/s':>8} {'dB':>6} {'W GB/s':>6} {'×fp32':>6} {'×ao':>5} {'×ort':>5}")
