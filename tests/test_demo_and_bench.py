"""The README's main job (the demo) and the benchmark CLI run end to end (smoke
runs with tiny budgets: they check that everything works, not the speed)."""
import re

from pyaccel import demo
from pyaccel.bench import __main__ as bench_main


def test_demo_runs(capsys):
    assert demo.main(["--budget", "0.05", "--tokens", "2", "--image", "64", "--mobilenet-width", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "pyaccel int8" in out and "2:4 pyaccel (Sparse24Linear)" in out
    assert "baselines: torch " in out  # capped, as the environment sets it, or at the CPU's full ISA
    assert "13 depthwise-separable blocks fused" in out
    assert "identical predictions: True" in out or "binary network demo skipped" in out


def test_bench_quick_runs(tmp_path, capsys):
    md = tmp_path / "r.md"
    assert bench_main.main(["--quick", "--no-ort", "--budget", "0.02", "--suite", "int8,sparse24",
                            "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "### int8" in text and "### 2:4" in text and "pyaccel int8" in text
    assert re.search(r"late-team guard: (fired \d+ times in this run \(int8 \d+, sparse24 \d+\)|off)", text)
    # the console rows give % of the header's peak too: int8 rows a number, 2:4 rows (dense-equivalent) none
    out = capsys.readouterr().out
    assert "%peak" in out
    assert re.search(r"pyaccel int8 +[\d.]+ ±.*?[\d.]+ +[\d.]+ +[\d.]+ ", out)
    assert re.search(r"pyaccel 2:4 fp32 +[\d.]+ ±.*?[\d.]+ +- +[\d.]+ ", out)


def test_percent_of_peak_per_row():
    """Each row against its own arithmetic's peak: int8 candidates the int8
    peak, fp32 ones (dense or sparse) the fp32 peak, bf16 rows and the 2:4
    suites (dense-equivalent operations) none; one decimal below 10 %."""
    from pyaccel.bench import common
    row = lambda suite, name, gops: common.Row(suite, "8x8", 1, "hot", name, None, gops, None)  # noqa: E731
    saved = dict(common.PEAKS)
    try:
        common.PEAKS.update(int8=400.0, fp32=100.0)
        assert common.pct_text(row("int8", "pyaccel int8", 200.0), "-") == "50"
        assert common.pct_text(row("int8", "torch.ao int8", 20.0), "-") == "5.0"
        assert common.pct_text(row("int8", "torch fp32", 50.0), "-") == "50"
        assert common.pct_text(row("int8", "torch bf16", 50.0), "-") == "-"
        assert common.pct_text(row("bsr 32x32 90%", "torch BSR mm", 10.0), "-") == "10"
        assert common.pct_text(row("bsr int8 32x32 90%", "pyaccel BSR int8", 40.0), "-") == "10"
        assert common.pct_text(row("2:4", "pyaccel 2:4 fp32", 50.0), "-") == "-"
    finally:
        common.PEAKS.update(saved)


def test_int8_bench_gives_the_7_bit_row_paired_speed_ups_too():
    from pyaccel.bench import int8

    rows = int8.run(shapes=((64, 96),), ms=(8,), threads=1, budget_s=0.01, with_ort=False, streamed=False,
                    log=lambda *a: None)
    by_name = {r.name: r for r in rows}
    for name in ("pyaccel int8", int8.A7):
        r = by_name[name]
        assert set(r.ratios) == {"×fp32", "×torch.ao"}, name
        for label, v in r.ratios.items():
            q1, q3 = r.ratio_iqr[label]
            assert 0 < q1 <= v <= q3, (name, label)
    assert not by_name["torch.ao int8"].ratios  # baselines get none


def test_bench_dwconv_quick_runs(tmp_path):
    from pyaccel.bench import dwconv

    rows = dwconv.run(ns=(1,), budget_s=0.02, with_ort=False, quick=True, log=lambda *a: None)
    assert rows and all(r.sqnr_db > 100 for r in rows)
    assert dwconv.to_markdown(rows, 224.0).startswith("| block |")


def test_bench_caps_baselines_at_pyaccels_isa():
    caps = bench_main.baseline_isa_caps("avx2", "avx512_icl", {})
    assert caps == {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    assert bench_main.baseline_isa_caps("avx2", "avx2", {}) == {}  # a real AVX2 CPU: nothing to cap
    # an AVX-VNNI machine's baselines: oneDNN at its AVX2 + VNNI level, the others at AVX2
    assert bench_main.baseline_isa_caps("avx_vnni", "avx512_icl", {})["ONEDNN_MAX_CPU_ISA"] == "AVX2_VNNI"
    assert bench_main.baseline_isa_caps("avx_vnni", "avx_vnni", {}) == {}
    assert bench_main.baseline_isa_caps("avx512_icl", "avx512_icl", {}) == {}
    # pyaccel below its AMX level on an AMX CPU: oneDNN's AMX paths go too
    assert bench_main.baseline_isa_caps("avx512_icl", "avx512_amx", {}) == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    assert bench_main.baseline_isa_caps("portable", "avx512_icl", {}) == {}  # no cap for that level
    assert bench_main.baseline_isa_caps("avx2", "avx512_icl", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}) == {}


def test_cap_baselines_sets_the_caps_and_names_them():
    """The bench and the demo cap torch at pyaccel's level through cap_baselines:
    PYACCEL_CPU_ISA=avx2 on an AVX-512 CPU must not time torch.ao's AVX-512 FBGEMM."""
    from types import SimpleNamespace

    from pyaccel.bench.baselines import cap_baselines

    env = {}
    text = cap_baselines(SimpleNamespace(cpu_isa="avx2", cpu_isa_detected="avx512_icl"), environ=env)
    assert env["FBGEMM_ENABLE_INSTRUCTIONS"] == "AVX2" and env["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    assert text.startswith("torch capped at avx2 (") and "FBGEMM_ENABLE_INSTRUCTIONS=AVX2" in text
    env = {}
    text = cap_baselines(SimpleNamespace(cpu_isa="avx2", cpu_isa_detected="avx512_icl"), native=True, environ=env)
    assert env == {} and text == "torch at the CPU's full ISA (avx512_icl)"
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2"}  # the user's caps win and are named
    text = cap_baselines(SimpleNamespace(cpu_isa="avx2", cpu_isa_detected="avx512_icl"), environ=env)
    assert env == {"ONEDNN_MAX_CPU_ISA": "AVX2"} and text == "torch as your environment sets it (ONEDNN_MAX_CPU_ISA=AVX2)"
    env = {}
    assert cap_baselines(SimpleNamespace(cpu_isa="avx2", cpu_isa_detected="avx2"), environ=env).endswith("(avx2)")
    assert env == {}


def test_bench_header_names_the_core_behind_a_generic_model_name():
    """A VM's /proc/cpuinfo may say only "AMD EPYC" for both project machines
    (Zen 3 and Zen 4): the header adds family / model / stepping and the Zen core."""
    def info(vendor, fam, mod, name):
        return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {fam}\nmodel\t\t: {mod}\n"
                f"model name\t: {name}\nstepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 99\n")
    assert bench_main._cpu_model(info("AuthenticAMD", 25, 17, "AMD EPYC")) == \
        "AMD EPYC (family 25, model 17, stepping 1, Zen 4)"
    assert bench_main._cpu_model(info("AuthenticAMD", 25, 1, "AMD EPYC")).endswith("Zen 3)")
    assert bench_main._cpu_model(info("AuthenticAMD", 23, 49, "AMD EPYC 7B12")).endswith("Zen 2)")
    # other vendors: the numbers only
    assert bench_main._cpu_model(info("GenuineIntel", 6, 151, "Intel(R) Core(TM) i7-12700")) == \
        "Intel(R) Core(TM) i7-12700 (family 6, model 151, stepping 1)"


def test_interleaved_keeps_each_rounds_times():
    from pyaccel.bench.timing import interleaved

    calls = {"a": 0, "b": 0}

    def f(name):
        def g():
            calls[name] += 1
        return g
    t = interleaved({"a": f("a"), "b": f("b")}, min_rounds=5, max_rounds=5, budget_s=0, warmup=1, inner=4,
                    first=True)
    assert calls == {"a": 1 + 5 * 4, "b": 1 + 5 * 4}
    for name in ("a", "b"):
        assert t[name].n == 15 and len(t[name].rounds) == 5  # 3 timed calls a round, one median each
        assert len(t[name + " [first]"].rounds) == 5


def test_paired_ratio_pairs_rounds_not_medians():
    from pyaccel.bench.timing import Timing, paired_ratio

    def timing(rounds):
        s = sorted(rounds)
        return Timing(s[len(s) // 2], s[0], s[-1], len(s), tuple(rounds))
    # the machine turned 3x slower during round 3 (after ours ran, before the
    # baseline did): ours is 2x faster in every other round
    base, ours = timing([2.0, 2.0, 6.0, 6.0, 6.0]), timing([1.0, 1.0, 1.0, 3.0, 3.0])
    med, q1, q3 = paired_ratio(base, ours)
    assert (med, q1) == (2.0, 2.0) and q3 > 2.0
    assert base.median_s / ours.median_s == 6.0  # the ratio of medians pairs a slow phase with a fast one
    med, q1, q3 = paired_ratio(timing([1.0, 2.0, 3.0, 4.0]), timing([1.0, 1.0, 1.0, 1.0]))
    assert med == 2.5 and q1 < med < q3
    # no per-round times (or a different count): the ratio of the medians, no spread
    assert paired_ratio(Timing(4.0, 3.0, 5.0, 9), Timing(2.0, 1.0, 3.0, 9)) == (2.0, 2.0, 2.0)
    assert paired_ratio(timing([4.0, 4.0]), timing([2.0, 2.0, 2.0])) == (2.0, 2.0, 2.0)


def test_measure_calls_every_weight_copy_before_timing():
    """A streamed rotation can hold more weight copies than the rounds it runs
    (small layers: 192 MB of ~1 MB copies); measure() calls each copy once
    before timing, so no timed call is a fresh module's first call."""
    import torch
    from pyaccel.bench.common import measure

    calls = {}

    def copy(name, i):
        def f():
            calls[(name, i)] = calls.get((name, i), 0) + 1
            return torch.ones(1, 4)
        return f
    copies = 40  # more than the rounds (min_rounds 7, budget 0) and warm-up calls run
    cands = {name: [copy(name, i) for i in range(copies)] for name in ("ours", "base")}
    rows = measure("t", "4x4", 1, 4, 4, "streamed", cands, None, "ours", {}, {"x base": "base"}, budget_s=0.0,
                   log=lambda *_: None)
    assert len(rows) == 2
    assert all(calls.get((name, i), 0) >= 1 for name in cands for i in range(copies))


def test_bench_cli_refuses_bad_arguments_before_running(tmp_path, capsys):
    """Unknown suite names ran nothing and exited 0; --threads 0 / --budget 0 fell
    back to the defaults, --budget -1 was taken, --threads -3 ended in a traceback;
    an unwritable --markdown path failed only after every run."""
    import pytest

    for argv, what in ((["--suite", "foo"], "--suite"), (["--suite", "int8,,binary"], "--suite"),
                       (["--threads", "0"], "--threads"), (["--threads", "-3"], "--threads"),
                       (["--budget", "0"], "--budget"), (["--budget", "-1"], "--budget"),
                       (["--peak-gops", "0"], "--peak-gops"),
                       (["--markdown", str(tmp_path / "missing" / "r.md")], "--markdown")):
        with pytest.raises(SystemExit) as exc:
            bench_main.main(["--quick", "--no-ort"] + argv)
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert what in err and "Traceback" not in err, (argv, err)
    # spaces around names are fine
    assert bench_main.SUITES and " int8" not in bench_main.SUITES
