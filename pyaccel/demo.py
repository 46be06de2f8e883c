"""python -m pyaccel.demo: patch a small built-in model, print speed and accuracy
before and after. No network, no downloads."""
from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch import nn

import pyaccel
import pyaccel.prune
from pyaccel.bench.baselines import cap_baselines
from pyaccel.bench.timing import interleaved


class MLPBlock(nn.Module):
    """A transformer feed-forward block: LayerNorm(x + W2 gelu(W1 x))."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.down(nn.functional.gelu(self.up(x))))


def build_model(d: int = 768, hidden: int = 3072, blocks: int = 4) -> nn.Module:
    """The demo's model, weights N(0, 0.02) (BERT / GPT-2 checkpoints' initialization, bell-shaped as
    trained layers are; see pyaccel.bench.common.WEIGHTS)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[MLPBlock(d, hidden) for _ in range(blocks)], nn.Linear(d, 256)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.02)
    return model


def mobilenet_v1(width: float = 1.0, classes: int = 1000) -> nn.Sequential:
    """MobileNetV1 (Howard et al., 2017) in plain torch: a 3x3 stem and 13
    depthwise-separable blocks (dw 3x3 -> BN -> ReLU -> 1x1 -> BN -> ReLU), each
    an nn.Sequential; BN statistics randomized so folding them is visible."""
    cfg = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    c = int(32 * width)
    layers = [nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
    for co, s in cfg:
        co = int(co * width)
        layers.append(nn.Sequential(nn.Conv2d(c, c, 3, s, 1, groups=c, bias=False), nn.BatchNorm2d(c),
                                    nn.ReLU(inplace=True), nn.Conv2d(c, co, 1, bias=False), nn.BatchNorm2d(co),
                                    nn.ReLU(inplace=True)))
        c = co
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _sqnr(ref, out):
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


def _compare(title, cands, x, ref, budget):
    """Time the models interleaved; print time, speed-up over the first, SQNR and cosine vs ref."""
    t = interleaved({k: (lambda m=m: m(x)) for k, m in cands.items()}, budget_s=budget)
    first = next(iter(cands))
    print(f"{title:<40} {'median ms':>10} {'speed-up':>9} {'SQNR dB':>8} {'cosine':>8}")
    for name, m in cands.items():
        y = m(x)
        cos = float(nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0))
        snr = "-" if name == first else f"{_sqnr(ref, y):.1f}"
        print(f"{name:<40} {t[name].median_s * 1e3:>10.3f} {t[first].median_s / t[name].median_s:>8.2f}x "
              f"{snr:>8} {cos:>8.5f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyaccel.demo", description=__doc__)
    ap.add_argument("--tokens", type=int, default=16, help="rows per forward (batch x sequence)")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing")
    ap.add_argument("--image", type=int, default=224, help="MobileNetV1 input size")
    ap.add_argument("--mobilenet-width", type=float, default=1.0, help="MobileNetV1 width multiplier")
    ap.add_argument("--no-binary", action="store_true", help="skip the binary network (digits BNN) part")
    ap.add_argument("--baselines-native-isa", action="store_true",
                    help="when pyaccel runs below the CPU's ISA (PYACCEL_CPU_ISA=avx2 on an AVX-512 CPU, ...), "
                         "leave torch (torch.ao's FBGEMM, MKL, oneDNN) at the CPU's full ISA; by default it is "
                         "capped at pyaccel's level, as in python -m pyaccel.bench")
    args = ap.parse_args(argv)

    info = pyaccel.backend_info()
    print(info, "\n")
    # before torch's first quantized op, convolution or matmul: each library reads its cap once
    print(f"baselines: {cap_baselines(info, native=args.baselines_native_isa)}\n")
    model = build_model()
    print(f"model: 4 transformer MLP blocks (768 -> 3072 -> 768) and a 768 -> 256 head, weights N(0, 0.02); "
          f"{args.tokens} tokens\n")
    x = torch.randn(args.tokens, 768)
    with torch.inference_mode():
        ref = model(x)
        ours = copy.deepcopy(model)
        report = pyaccel.patch(ours, quantize="int8")
        print("pyaccel.patch(model, quantize='int8'):")
        print(report, "\n")
        # the opt-in 7-bit activation mode: torch.ao's activation precision; on
        # AVX2-only CPUs its kernel issues 3 instructions per 32 products, not 4
        ours7 = pyaccel.patch(copy.deepcopy(model), quantize="int8", act_bits=7).model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        ao_patched = pyaccel.patch(copy.deepcopy(ao)).model
        cands = {"torch fp32": model, "torch.ao int8 (quantize_dynamic)": ao,
                 "pyaccel int8 (patch quantize='int8')": ours,
                 "pyaccel int8, act_bits=7": ours7, "pyaccel on the torch.ao model": ao_patched}
        _compare("model", cands, x, ref, args.budget)

        # 2:4 sparsity: prune (here without fine-tuning), then patch; accuracy is
        # judged against the pruned model, whose outputs the kernels must reproduce
        pruned = copy.deepcopy(model)
        pyaccel.prune.prune_24(pruned)
        pyaccel.prune.make_permanent(pruned)
        sparse = pyaccel.patch(copy.deepcopy(pruned)).model
        sparse_q = pyaccel.patch(copy.deepcopy(pruned), quantize="int8").model
        print()
        _compare("2:4-pruned model", {"2:4 pruned, dense torch fp32": pruned, "2:4 pyaccel (Sparse24Linear)": sparse,
                                      "2:4 + int8 pyaccel (Sparse24Int8Linear)": sparse_q}, x, pruned(x), args.budget)

        # depthwise-separable convolutions: MobileNetV1, BN folded, one kernel per block
        mnet = mobilenet_v1(width=args.mobilenet_width)
        mnet_cl = copy.deepcopy(mnet).to(memory_format=torch.channels_last)
        xi = torch.randn(1, 3, args.image, args.image).contiguous(memory_format=torch.channels_last)
        mreport = pyaccel.patch(copy.deepcopy(mnet))
        print(f"\npyaccel.patch(MobileNetV1): {len(mreport.swapped)} depthwise-separable blocks fused")
        _compare(f"MobileNetV1 x{args.mobilenet_width}, 1x3x{args.image}x{args.image}",
                 {"torch fp32 eager (NCHW)": mnet, "torch fp32 eager (channels_last)": mnet_cl,
                  "pyaccel FusedDWSeparableConv2d": mreport.model}, xi, mnet(xi), args.budget)
    if not args.no_binary:
        _binary_section(args.budget)
    return 0


def _binary_section(budget: float) -> None:
    """A small BNN on scikit-learn's digits: train (~10 s), patch, compare."""
    print()
    try:
        from pyaccel.binary_digits import train
        model, info = train()
    except ImportError as exc:
        print(f"binary network demo skipped: {exc} (pip install scikit-learn)")
        return
    xte, yte = info["x_test"], info["y_test"]
    with torch.inference_mode():
        float_out = model(xte)
        patched = copy.deepcopy(model)
        report = pyaccel.patch(patched)
        print(f"binary CNN on digits (float first/last layers), trained in {info['train_seconds']:.1f} s; "
              "pyaccel.patch(model):")
        print(report, "\n")
        _compare("binary CNN (360 digits)", {"BinaryConv2d/BinaryLinear (torch)": model,
                                             "pyaccel XnorConv2d/XnorLinear": patched}, xte, float_out, budget)
        pred, pred_p = float_out.argmax(1), patched(xte).argmax(1)
    print(f"test accuracy {(pred == yte).float().mean():.3f} unpatched, {(pred_p == yte).float().mean():.3f} "
          f"patched; identical predictions: {bool(torch.equal(pred, pred_p))}")


if __name__ == "__main__":
    raise SystemExit(main())
