"""Binary (XNOR) layers: pyaccel XnorConv2d / XnorLinear against what a user
would run instead, interleaved in one process.

Convolutions: 3x3, stride 1, pad 1, C_in = C_out, N = 1 and 8, against torch
fp32 nn.Conv2d (NCHW and channels_last; the ratio uses the faster) and
torch.ao's int8 static convolution (x86 engine, eager prepare/convert, timed
on a quint8 input, as in ANCHORS.md). pyaccel's time includes the sign +
bit-packing of the fp32 activations and the fused epilogue (alpha scale).
pyaccel's input is channels_last (its output then stays channels_last).
Throughput is counted in binary multiply-adds (N·OH·OW·OC·C·9) per second,
to compare with the machine's xor + popcount peak (shared/tools/peaks).

Each round runs every candidate 4 times in a row (candidates in a shuffled
order): the last 3 calls are the "hot" times (the convention of the int8 and
2:4 suites: the layer's input and weights as a model's previous layer leaves
them), the first call the "cold" time (right after another candidate's
multi-MB convolution evicted the caches). Ratios are given for both.

Linear: XnorLinear vs fp32 F.linear at 4096 x 4096.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyaccel import _native
from pyaccel.bench.timing import interleaved
from pyaccel.nn import BinaryConv2d, BinaryLinear, XnorConv2d, XnorLinear

CONV_SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))


@dataclasses.dataclass
class BinRow:
    what: str
    n: int
    times_us: Dict[str, float]
    spread: Dict[str, float]
    bmacs: float  # binary multiply-adds per call
    ratios: Dict[str, float]
    kernel_gbmac: Optional[float] = None  # the bare native call's rate (preallocated output)
    inner_gbmac: Optional[float] = None  # the tiles phase alone (the inner loop), warm, median
    inner_share: Optional[float] = None  # the tiles phase's share of the native call's time

    @property
    def gbmac(self) -> float:
        return self.bmacs / self.times_us["pyaccel binary"] / 1e3


def _ao_int8_conv(conv: nn.Conv2d, x: torch.Tensor):
    """torch.ao static int8 conv (x86 engine) and its quint8 input; None with the reason if unavailable."""
    try:
        import torch.ao.quantization as tq

        engines = torch.backends.quantized.supported_engines
        torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
        m = nn.Sequential(tq.QuantStub(), conv, tq.DeQuantStub()).eval()
        m.qconfig = tq.get_default_qconfig(torch.backends.quantized.engine)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tq.prepare(m, inplace=True)
            m(x)
            tq.convert(m, inplace=True)
        qx = m[0](x)
        return m[1], qx
    except Exception as exc:  # pragma: no cover
        return None, f"{type(exc).__name__}: {exc}"


def _bare_kernel(xm: XnorConv2d, x: torch.Tensor):
    """The native call alone into a preallocated output (activation packing
    included; no allocation, no module). Called with timed=True it returns the
    phase times (packing, correction table, tiles)."""
    if not _native.available():
        return lambda: xm(x)
    n, c, h, w = x.shape
    y = xm(x)
    oc, oh, ow = y.shape[1:]
    b = xm._buffers
    args = (x.data_ptr(), n, c, h, w, *x.stride(), xm.groups, b["weight_bits"].data_ptr(), oc, *xm.kernel_size,
            *xm.stride, *xm.padding, *xm.dilation, 0, xm.wsum.data_ptr(), b["scale"].data_ptr(), 0, 0, 0.0, 0.0,
            0, y.data_ptr(), oh, ow, torch.get_num_threads())
    lib = _native.lib()
    return lambda y=y, timed=False: (lib.binary_conv(*args, timed=timed), y)[0]  # the closure keeps y alive


def _inner_loop(kernel, calls: int = 15):
    """(tiles seconds, tiles share of the call): medians over `calls` warm native calls timed phase by phase
    inside the kernel (packing, correction table, tiles)."""
    kernel()
    phases = sorted((kernel(timed=True) for _ in range(calls)), key=lambda p: p[2])
    tiles = phases[len(phases) // 2]
    return tiles[2], tiles[2] / sum(tiles)


def conv_rows(shapes=CONV_SHAPES, ns=(1, 8), budget_s: float = 1.5, log=print) -> List[BinRow]:
    torch.manual_seed(0)
    rows = []
    for c, hw in shapes:
        for n in ns:
            conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
            b = BinaryConv2d.from_float(conv).eval()
            xm = XnorConv2d.from_binary(b)
            x = torch.randn(n, c, hw, hw)
            xcl = x.contiguous(memory_format=torch.channels_last)
            conv_cl = nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
            with torch.no_grad():
                conv_cl.weight.copy_(conv.weight)
                want = b(x)
                got = xm(xcl)
            exact = torch.equal(got, want)
            q, qx = _ao_int8_conv(nn.Conv2d(c, c, 3, padding=1, bias=False), x)
            kernel = _bare_kernel(xm, xcl)
            cands = {"pyaccel binary": lambda: xm(xcl),
                     "pyaccel kernel only": kernel,
                     "torch fp32 NCHW": lambda: conv(x),
                     "torch fp32 channels_last": lambda: conv_cl(xcl)}
            if q is not None:
                cands["torch.ao int8 static"] = lambda: q(qx)
            with torch.inference_mode():
                t = interleaved(cands, budget_s=budget_s, max_rounds=200, min_rounds=9, inner=4, first=True)
            us = {k: v.median_s * 1e6 for k, v in t.items()}
            ratios = {}
            for tag, sfx in (("", ""), (" cold", " [first]")):
                fp32 = min(us["torch fp32 NCHW" + sfx], us["torch fp32 channels_last" + sfx])
                ratios["×fp32" + tag] = fp32 / us["pyaccel binary" + sfx]
                if "torch.ao int8 static" in us:
                    ratios["×int8" + tag] = us["torch.ao int8 static" + sfx] / us["pyaccel binary" + sfx]
            row = BinRow(f"{c}@{hw}", n, us, {k: v.spread for k, v in t.items()}, n * hw * hw * c * c * 9, ratios)
            row.kernel_gbmac = row.bmacs / us["pyaccel kernel only"] / 1e3
            if _native.available():
                tiles_s, row.inner_share = _inner_loop(kernel)
                row.inner_gbmac = row.bmacs / tiles_s / 1e9
            rows.append(row)
            log(f"{row.what:>7} N={n}  " + "  ".join(f"{k} {v:8.1f} µs" for k, v in us.items() if "[first]" not in k)
                + f"  | {row.gbmac:7.0f} G bMAC/s  " + "  ".join(f"{k} {v:.1f}" for k, v in ratios.items())
                + f"  (cold: module {us['pyaccel binary [first]']:.1f} µs)"
                + ("" if exact else "  (NOT equal to BinaryConv2d!)"))
    return rows


def linear_rows(n_k=(4096, 4096), ms=(1, 8, 32, 128), budget_s: float = 1.5, log=print) -> List[BinRow]:
    torch.manual_seed(0)
    n, k = n_k
    lin = nn.Linear(k, n)
    xm = XnorLinear.from_binary(BinaryLinear.from_float(lin).eval())
    w, bias = lin.weight.detach(), lin.bias.detach()
    rows = []
    for m in ms:
        x = torch.randn(m, k)
        with torch.inference_mode():
            t = interleaved({"pyaccel binary": lambda: xm(x), "torch fp32 F.linear": lambda: F.linear(x, w, bias)},
                            budget_s=budget_s, max_rounds=300, min_rounds=9, inner=4, first=True)
        us = {kk: v.median_s * 1e6 for kk, v in t.items()}
        row = BinRow(f"{n}x{k}", m, us, {kk: v.spread for kk, v in t.items()}, m * n * k,
                     {"×fp32": us["torch fp32 F.linear"] / us["pyaccel binary"],
                      "×fp32 cold": us["torch fp32 F.linear [first]"] / us["pyaccel binary [first]"]})
        rows.append(row)
        log(f"{row.what:>9} M={m:<4} " + "  ".join(f"{kk} {v:9.1f} µs" for kk, v in us.items() if "[first]" not in kk)
            + f"  | {row.gbmac:7.0f} G bMAC/s  ×fp32 {row.ratios['×fp32']:.1f}  (cold {row.ratios['×fp32 cold']:.1f})")
    return rows


def to_markdown(conv: List[BinRow], lin: List[BinRow], peak: Optional[float]) -> str:
    out = ["| conv 3×3 s1 p1 | N | pyaccel binary µs | torch fp32 NCHW µs | torch fp32 CL µs | torch.ao int8 µs | "
           "G bMAC/s | % xor+popcnt peak | kernel only µs (G bMAC/s, % peak) | inner loop G bMAC/s (% peak, "
           "share of the kernel) | × fp32 (best) | × int8 | cold: pyaccel µs | cold × fp32 | cold × int8 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in conv:
        t = r.times_us
        pk = f"{100 * r.gbmac / peak:.0f}" if peak else ""
        kpk = f", {100 * r.kernel_gbmac / peak:.0f} %" if peak else ""
        kern = f"{t['pyaccel kernel only']:.1f} ({r.kernel_gbmac:.0f}{kpk})"
        inner = "" if r.inner_gbmac is None else (
            f"{r.inner_gbmac:.0f} ({f'{100 * r.inner_gbmac / peak:.0f} %, ' if peak else ''}"
            f"{100 * r.inner_share:.0f} %)")
        out.append(f"| {r.what} | {r.n} | {t['pyaccel binary']:.1f} (±{100 * r.spread['pyaccel binary']:.0f}%) | "
                   f"{t['torch fp32 NCHW']:.1f} | {t['torch fp32 channels_last']:.1f} | "
                   f"{t.get('torch.ao int8 static', float('nan')):.1f} | {r.gbmac:.0f} | {pk} | {kern} | {inner} | "
                   f"**{r.ratios['×fp32']:.1f}** | {r.ratios.get('×int8', float('nan')):.1f} | "
                   f"{t['pyaccel binary [first]']:.1f} | {r.ratios['×fp32 cold']:.1f} | "
                   f"{r.ratios.get('×int8 cold', float('nan')):.1f} |")
    out += ["", "| linear | M | pyaccel binary µs | torch fp32 F.linear µs | G bMAC/s | × fp32 | cold × fp32 |",
            "|---|---|---|---|---|---|---|"]
    for r in lin:
        t = r.times_us
        out.append(f"| {r.what} | {r.n} | {t['pyaccel binary']:.1f} | {t['torch fp32 F.linear']:.1f} | "
                   f"{r.gbmac:.0f} | **{r.ratios['×fp32']:.1f}** | {r.ratios['×fp32 cold']:.1f} |")
    return "\n".join(out)


def run(quick: bool = False, peak: Optional[float] = None, log=print):
    name = _native.lib().binary_kernel_name() if _native.available() else "reference"
    log(f"binary kernel: {name}")
    shapes = CONV_SHAPES[2:3] if quick else CONV_SHAPES
    conv = conv_rows(shapes, (1,) if quick else (1, 8), budget_s=0.3 if quick else 1.5, log=log)
    lin = linear_rows((1024, 1024) if quick else (4096, 4096), (1, 8) if quick else (1, 8, 32, 128),
                      budget_s=0.3 if quick else 1.5, log=log)
    return conv, lin, name
