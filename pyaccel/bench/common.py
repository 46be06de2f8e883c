"""Shared pieces of the benchmark suites: result rows, error, rotation over
weight copies, measuring one (shape, M, mode) case, and table formatting."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from pyaccel.bench.timing import Timing, interleaved, paired_ratio

# Rotated weight copies per streamed candidate: 6x a 32 MB L3. At 2 - 4x (96 MB)
# the L3 still served part of a rotation when two candidates alternated
# (dense int8 measured 44 GB/s "streamed" there, 28 - 29 GB/s from 134 MB up).
STREAM_BYTES = 192e6


# Weight distributions of the synthetic layers (--weights). "normal":
# N(0, 0.02), the initialization of BERT / GPT-2 style checkpoints and close to
# how trained layers' weights are distributed (bell-shaped); "uniform":
# nn.Linear's default U(-1/sqrt(K), 1/sqrt(K)), flat up to its edges as no
# trained layer is. The 8-bit AVX2 int8 path depends on it: its pair-safe
# split leaves ~0.4 - 1.4 % residual entries on normal weights and ~12 % on
# uniform ones, which then run the int16 tile (csrc/int8_gemm/README.md).
WEIGHTS = ("normal", "uniform")


def make_linear(k: int, n: int, weights: str = "normal") -> torch.nn.Linear:
    """A float nn.Linear(k, n) with weights drawn as WEIGHTS describes (bias: nn.Linear's default)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected one of {WEIGHTS}, got {weights!r}")
    lin = torch.nn.Linear(k, n)
    if weights == "normal":
        with torch.no_grad():
            lin.weight.normal_(0.0, 0.02)
    return lin


@dataclasses.dataclass
class Row:
    suite: str
    shape: str
    m: int
    mode: str  # "hot" or "streamed"
    name: str
    timing: Timing
    gops: Optional[float]  # dense-equivalent: 2*M*N*K / time (None for a memory floor)
    sqnr_db: Optional[float]
    weight_gbs: Optional[float] = None  # the candidate's own weight bytes / time
    # speed-ups: label -> median over the shared rounds of baseline time / this
    # time (timing.paired_ratio), and the quartiles of those per-round ratios
    ratios: Dict[str, float] = dataclasses.field(default_factory=dict)
    ratio_iqr: Dict[str, Tuple[float, float]] = dataclasses.field(default_factory=dict)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    err = (ref - out).norm()
    return float("inf") if err == 0 else float(20 * torch.log10(ref.norm() / err))


FLOOR = "memory floor: torch.sum"


def is_floor(name: str) -> bool:
    """A reference row that reads the same bytes as the candidate and computes
    nothing else (no GOP/s, no error)."""
    return name.startswith("memory floor")


def floor_copies(nbytes: int, copies: int) -> List[torch.Tensor]:
    """`copies` fp32 tensors of nbytes each, for torch.sum to stream like weights."""
    return [torch.randn(max(1, nbytes // 4)) for _ in range(copies)]


def rotating(fns: Sequence[Callable]) -> Callable:
    """A callable that calls fns[0], fns[1], ... in turn (one per weight copy)."""
    state = {"i": 0}

    def call():
        f = fns[state["i"] % len(fns)]
        state["i"] += 1
        return f()
    return call


def measure(suite: str, shape: str, m: int, n: int, k: int, mode: str, cands: Dict[str, List[Callable]],
            ref: Optional[torch.Tensor], ours: Union[str, Sequence[str]], weight_bytes: Dict[str, int],
            ratio_to: Dict[str, str], budget_s: float, log=print) -> List[Row]:
    """Time `cands` (name -> callables over weight copies) interleaved; rows for each.

    ours: the candidate name (or names) that get speed-ups. ratio_to: label ->
    baseline name; each of ours gets baseline_time / its_time under each label,
    paired round by round (timing.paired_ratio), with its quartiles.
    """
    ours = (ours,) if isinstance(ours, str) else tuple(ours)
    errs = {name: (sqnr_db(ref, fns[0]().float()) if ref is not None and not is_floor(name) else None)
            for name, fns in cands.items()}
    # every weight copy called once first: a fresh module's first call costs far
    # more than its weights' trip from DRAM (a KVM guest, 1536x384 int8 and 2:4
    # int8 modules: 180 - 200 us against 43 on the next rotation), and a small
    # layer's streamed rotation has more copies than the rounds it runs
    for fns in cands.values():
        for f in fns:
            f()
    t = interleaved({name: rotating(fns) for name, fns in cands.items()}, budget_s=budget_s,
                    max_rounds=400 if m <= 8 else 60, inner=1 if mode == "streamed" else 4)
    rows = []
    for name, tm in t.items():
        r = Row(suite, shape, m, mode, name, tm, None if is_floor(name) else 2 * m * n * k / tm.median_s / 1e9,
                errs[name])
        if name in weight_bytes:
            r.weight_gbs = weight_bytes[name] / tm.median_s / 1e9
        if name in ours:
            for label, b in ratio_to.items():
                if b in t:
                    med, q1, q3 = paired_ratio(t[b], tm)
                    r.ratios[label], r.ratio_iqr[label] = med, (q1, q3)
        rows.append(r)
        if suite != _logged_suite[0]:  # console rows name their suite (block shape, sparsity) once
            _logged_suite[0] = suite
            log(f"-- {suite}")
        log(format_row(r))
    return rows


_logged_suite = [None]  # the suite of the last row measure() logged


def cases(ms: Sequence[int], streamed: bool, weight_bytes: int, streamed_ms: Sequence[int] = (1,)):
    """(m, mode, copies) per M: "hot" with one weight copy and, at the M in
    streamed_ms, "streamed" with enough copies (of weight_bytes each) to
    overflow the caches."""
    for m in ms:
        yield m, "hot", 1
        if streamed and m in streamed_ms:
            yield m, "streamed", max(2, math.ceil(STREAM_BYTES / weight_bytes))


def measure_layer(suite: str, w: torch.Tensor, b: torch.Tensor, ms: Sequence[int], streamed: bool,
                  weight_bytes: int, make_cands: Callable, ours: Union[str, Sequence[str]], ratio_to: Dict[str, str],
                  budget_s: float, log=print, streamed_ms: Sequence[int] = (1,)) -> List[Row]:
    """Every case of one layer (weight w [N, K], bias b): fresh x, fp64 reference,
    candidates from make_cands(x, copies) -> (name -> callables, name -> weight bytes);
    streamed cases at the M in streamed_ms."""
    n, k = w.shape
    rows: List[Row] = []
    for m, mode, copies in cases(ms, streamed, weight_bytes, streamed_ms):
        x = torch.randn(m, k)
        with torch.inference_mode():
            ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
            cands, nbytes = make_cands(x, copies)
            rows += measure(suite, f"{n}x{k}", m, n, k, mode, cands, ref, ours, nbytes, ratio_to, budget_s, log)
        del cands
    return rows


def ratio_spread(r: Row, label: str) -> str:
    """The quartiles of the per-round ratios behind r.ratios[label], as
    ' (q1-q3)'; empty when they are one value (no per-round pairs)."""
    q1, q3 = r.ratio_iqr.get(label, (None, None))
    return "" if q1 is None or q1 == q3 else f" ({q1:.2f}-{q3:.2f})"


# The running machine's peaks at pyaccel's ISA level (GOP/s), set by the bench's
# main after it measures them (or takes --peak-gops / --fp32-peak): "int8", "fp32".
PEAKS: Dict[str, Optional[float]] = {"int8": None, "fp32": None}


def peak_for(suite: str, name: str) -> Optional[float]:
    """The peak candidate `name`'s GOP/s in `suite` are a share of, or None: in
    the int8 and block-sparse suites, int8 candidates (pyaccel's, torch.ao's,
    ONNX Runtime's) the int8 peak and fp32 ones (dense or sparse) the fp32 one;
    bf16 rows, memory floors and the 2:4 suites (dense-equivalent operations,
    which no peak bounds) none."""
    if not (suite == "int8" or suite.startswith("bsr ")):
        return None
    if "int8" in name or name.startswith("torch.ao"):
        return PEAKS["int8"]
    if "fp32" in name or name in ("torch BSR mm", "torch CSR mm"):
        return PEAKS["fp32"]
    return None


def pct_peak(r: Row) -> Optional[float]:
    """r's GOP/s as a % of its peak (peak_for), or None."""
    peak = peak_for(r.suite, r.name)
    return 100 * r.gops / peak if peak and r.gops is not None else None


def pct_text(r: Row, none: str) -> str:
    """pct_peak as text: one decimal below 10 %, whole percent above; `none` without one."""
    pct = pct_peak(r)
    return none if pct is None else f"{pct:.1f}" if pct < 10 else f"{pct:.0f}"


def format_row(r: Row) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    ratios = "  ".join(f"{k} {v:.2f}{ratio_spread(r, k)}" for k, v in r.ratios.items())
    return (f"{r.shape:>10} {r.m:>4} {r.mode:>8} {r.name:>26} {r.timing.median_s * 1e6:>10.1f} "
            f"±{r.timing.spread * 100:>4.0f}% {f(r.gops, '8.1f'):>8} {pct_text(r, '-'):>5} "
            f"{f(r.sqnr_db, '6.1f'):>6} {f(r.weight_gbs, '6.1f'):>6}  {ratios}")


HEADER = (f"{'W (NxK)':>10} {'M':>4} {'weights':>8} {'candidate':>26} {'median µs':>10} {'IQR':>6} "
          f"{'GOP/s':>8} {'%peak':>5} {'dB':>6} {'W GB/s':>6}  speed-ups of pyaccel: median (quartiles) of "
          "per-round ratios\n(%peak: of the int8 or fp32 peak in the bench's header, int8 and block-sparse suites; "
          "dB: SQNR against fp64 of the same layer)")


def to_markdown(rows: List[Row]) -> str:
    out = ["| W (N×K) | M | weights | candidate | median µs | IQR | GOP/s | % peak | SQNR dB | W GB/s | speed-ups: per-round median (quartiles) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    for r in rows:
        bold = "**" if r.ratios else ""
        pk = pct_text(r, "")
        ratios = ", ".join(f"{k} {v:.2f}{ratio_spread(r, k)}" for k, v in r.ratios.items())
        out.append(f"| {r.shape} | {r.m} | {r.mode} | {bold}{r.name}{bold} | {r.timing.median_s * 1e6:.1f} | "
                   f"±{r.timing.spread * 100:.0f}% | {f(r.gops, '.1f')} | {pk} | {f(r.sqnr_db, '.1f')} | "
                   f"{f(r.weight_gbs, '.1f')} | {ratios} |")
    return "\n".join(out)
