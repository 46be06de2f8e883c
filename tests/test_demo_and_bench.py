"""The README's main job (the demo) and the benchmark CLI run end to end (smoke
runs with tiny budgets: they check that everything works, not the speed)."""
from pyaccel import demo
from pyaccel.bench import __main__ as bench_main


def test_demo_runs(capsys):
    assert demo.main(["--budget", "0.05", "--tokens", "2", "--image", "64", "--mobilenet-width", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "pyaccel int8" in out and "2:4 pyaccel (Sparse24Linear)" in out
    assert "13 depthwise-separable blocks fused" in out
    assert "identical predictions: True" in out or "binary network demo skipped" in out


def test_bench_quick_runs(tmp_path, capsys):
    md = tmp_path / "r.md"
    assert bench_main.main(["--quick", "--no-ort", "--budget", "0.02", "--suite", "int8,sparse24",
                            "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "### int8" in text and "### 2:4" in text and "pyaccel int8" in text


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
    assert bench_main.baseline_isa_caps("avx512_icl", "avx512_icl", {}) == {}
    assert bench_main.baseline_isa_caps("portable", "avx512_icl", {}) == {}  # no cap for that level
    assert bench_main.baseline_isa_caps("avx2", "avx512_icl", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}) == {}
