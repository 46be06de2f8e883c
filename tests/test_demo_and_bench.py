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
