"""backend_info, ISA dispatch and overrides (in fresh processes where the
choice is made at start-up)."""
import os
import subprocess
import sys

import pytest

import pyaccel
from pyaccel import _native


def _run(code, tmp_path, **env):
    e = dict(os.environ, **env)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                       cwd=tmp_path, timeout=300)  # cwd: not the source tree
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_backend_info_fields():
    info = pyaccel.backend_info()
    assert info.native_loaded, info.native_error
    assert info.cpu_isa in _native.ISA_LADDER
    assert info.threads >= 1
    text = str(info)
    assert "CPU ISA in use" in text and "Triton" in text and "CUDA device" in text
    assert not any(k.endswith("_built") for k in info.cpu_features), info.cpu_features  # CPUID flags only


@pytest.mark.parametrize("name", _native.ISA_LADDER)
def test_env_override_lowers_choice(tmp_path, name):
    out = _run("import pyaccel; i = pyaccel.backend_info(); print(i.cpu_isa, i.int8_kernel)",
               tmp_path, PYACCEL_CPU_ISA=name)
    isa, kernel = out.split()
    # an override never raises the choice above what the CPU can run: the best
    # usable level at or below the cap (avx_vnni on Skylake-X -> avx2)
    ladder = _native.ISA_LADDER
    assert isa == next(lv for lv in ladder[ladder.index(name):] if _native.isa_supported(lv))
    if not _native.isa_supported(name) and name != "avx_vnni":
        assert isa == pyaccel.backend_info().cpu_isa_detected
    suffix = {"avx512_amx": "amx", "avx512_icl": "avx512vnni", "avx512_vnni": "avx512vnni", "avx512": "avx512bw", "avx_vnni": "avxvnni",
              "avx2": "avx2", "portable": "scalar"}
    assert kernel.endswith("_" + suffix[isa]), kernel


def test_unknown_override_warns_and_is_ignored(tmp_path):
    out = _run("import warnings; warnings.simplefilter('always')\n"
               "import pyaccel; print(pyaccel.backend_info().cpu_isa)", tmp_path, PYACCEL_CPU_ISA="sse9")
    assert out == pyaccel.backend_info().cpu_isa_detected  # (this process may run capped)


def test_reference_backend_override(tmp_path):
    code = ("import torch, pyaccel\n"
            "i = pyaccel.backend_info(); assert not i.native_loaded, i\n"
            "m = torch.nn.Sequential(torch.nn.Linear(16, 8)); r = pyaccel.patch(m, quantize='int8')\n"
            "print(r.swapped[0].backend, m(torch.randn(2, 16)).shape)")
    out = _run(code, tmp_path, PYACCEL_BACKEND="reference")
    assert out == "cpu/reference torch.Size([2, 8])"


def test_set_isa_cap_rejects_unknown():
    with pytest.raises(ValueError, match="isa: expected one of"):
        _native.set_isa_cap("sse2")


_PEAK_MIX = {"avx512_amx": "tdpbusd (AMX)", "avx512_icl": "vpdpbusd zmm", "avx512_vnni": "vpdpbusd zmm",
             "avx512": "vpmaddubsw+vpmaddwd+vpaddd zmm", "avx2": "vpmaddubsw+vpmaddwd+vpaddd ymm",
             # the encoding the AVX-VNNI level's kernel runs: VEX with AVX-VNNI, else EVEX
             "avx_vnni": "vpdpbusd ymm" if _native.available() and _native.lib().cpu_info()["avx_vnni"]
             and _native.lib().cpu_info()["avx_vnni_vex_built"] else "vpdpbusd ymm (EVEX)"}


def test_measure_peak_follows_the_selected_isa(isa):
    """The bench's %-of-peak figures come from the running machine at the ISA
    pyaccel runs at: the probe picks that level's instruction mix."""
    lib = _native.lib()
    g8, mix8 = lib.measure_peak("int8", 1, 0.005, 1)
    g32, mix32 = lib.measure_peak("fp32", 1, 0.005, 1)
    if isa == "portable":
        assert (g8, mix8, g32, mix32) == (0.0, "", 0.0, "")
        return
    assert mix8 == _PEAK_MIX[isa] and mix32 == ("vfmadd231ps ymm" if isa in ("avx2", "avx_vnni") else "vfmadd231ps zmm")
    # GOP/s of a real SIMD loop (a loaded machine may slice it, hence the loose bound)
    assert g8 > 1 and g32 > 1
    ge, mixe = lib.measure_peak("int8_exact", 1, 0.005, 1)
    exact = {"avx2": "vpmaddwd+vpaddd ymm (int16)", "avx512": "vpmaddwd+vpaddd zmm (int16)"}
    assert ge > 1 and mixe == exact.get(isa, _PEAK_MIX[isa])


def test_measure_peak_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be 'int8', 'int8_exact' or 'fp32'"):
        _native.lib().measure_peak("int4", 1)


def test_backend_info_names_every_op_familys_kernel():
    info = pyaccel.backend_info()
    if not info.native_loaded:
        pytest.skip("native library not loaded")
    assert set(info.kernels) >= {"int8", "sparse24", "block_sparse", "dws", "binary"}
    assert info.kernels["int8"] == info.int8_kernel
    text = str(info)
    assert f"binary kernel            : {info.kernels['binary']}" in text and "dws kernel" in text


def test_tune_malloc_in_a_subprocess(tmp_path):
    out = _run("import pyaccel; print(pyaccel.tune_malloc(), pyaccel.tune_malloc(1 << 20, 2 << 20))", tmp_path)
    assert out in ("True True", "False False")
    with pytest.raises(ValueError, match="mmap_threshold"):
        pyaccel.tune_malloc(-1)


def test_isa_names_are_case_insensitive(tmp_path):
    out = _run("import pyaccel; print(pyaccel.backend_info().cpu_isa)", tmp_path, PYACCEL_CPU_ISA="AVX2")
    assert out == ("avx2" if _native.isa_supported("avx2") else pyaccel.backend_info().cpu_isa_detected)


def test_backend_info_says_when_the_override_is_not_in_effect(monkeypatch):
    """PYACCEL_CPU_ISA is read once, at the native library's first use: set
    later (or unknown), backend_info says so instead of showing it as in use."""
    if not _native.available():
        pytest.skip(f"native library not loaded: {_native.load_error()}")
    _native.selected_isa()  # the library has been used
    monkeypatch.setenv("PYACCEL_CPU_ISA", "portable")
    text = str(pyaccel.backend_info())
    assert "PYACCEL_CPU_ISA=portable: not in effect" in text, text
    monkeypatch.setenv("PYACCEL_CPU_ISA", "sse9")
    assert "PYACCEL_CPU_ISA=sse9: ignored" in str(pyaccel.backend_info())


def test_unknown_backend_override_warns(tmp_path):
    e = dict(os.environ, PYACCEL_BACKEND="bogus")
    r = subprocess.run([sys.executable, "-c", "import pyaccel; print(pyaccel.backend_info().native_loaded)"],
                       capture_output=True, text=True, env=e, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and "PYACCEL_BACKEND='bogus' is not 'reference'" in r.stderr, r.stderr[-2000:]
    assert r.stdout.strip() == str(_native.available())


def test_amx_permission_is_asked_only_where_the_level_may_run(tmp_path):
    """Linux grants the AMX tile state per process, on request, and the grant
    raises every thread's minimum signal stack size: pyaccel asks only when
    the avx512_amx level is selected, never under a lower cap."""
    if pyaccel.backend_info().cpu_isa_detected != "avx512_amx":
        pytest.skip("this CPU (or OS, or build) has no AMX-INT8")
    code = ("import torch, pyaccel; from pyaccel.nn import Int8Linear\n"
            "m = Int8Linear.from_float(torch.nn.Linear(64, 64)); m(torch.randn(16, 64))\n"
            "i = pyaccel.backend_info(); print(i.cpu_isa, i.amx_permission)")
    assert _run(code, tmp_path, PYACCEL_CPU_ISA="avx512_icl") == "avx512_icl not asked"
    # (an OS without the request, e.g. Linux < 5.16, refuses: the level then falls back)
    assert _run(code, tmp_path, PYACCEL_CPU_ISA="avx512_amx") in ("avx512_amx granted", "avx512_icl refused")


@pytest.mark.parametrize("env,expected", [("amd", "amd"), ("INTEL", "intel"), ("zen9", None)])
def test_cpu_tuning_env_override(tmp_path, env, expected):
    """PYACCEL_CPU_TUNING picks the core family's kernel variants (an unknown
    value warns and leaves the vendor's); the AVX2 2:4 column kernel follows it."""
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import pyaccel; from pyaccel import _native\n"
            "i = pyaccel.backend_info(); print(i.cpu_tuning, i.cpu_intel)\n"
            "print(_native.lib().kernel_params()['sparse24']['cols_name'])")
    e = dict(os.environ, PYACCEL_CPU_TUNING=env, PYACCEL_CPU_ISA="avx2")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (tuning, intel), cols = r.stdout.split("\n")[0].split(), r.stdout.split("\n")[1]
    vendor = "intel" if intel == "True" else "amd"
    assert tuning == (expected or vendor)
    assert intel == str(_native.lib().cpu_info()["intel"])
    if expected is None:
        assert "PYACCEL_CPU_TUNING='zen9' is not one of" in r.stderr
    if _native.isa_supported("avx2"):
        assert cols == {"intel": "s24_gemm_cols_2x48_avx2", "amd": "s24_gemm_cols_4x24_avx2"}[tuning]


def test_cpu_tuning_block_restores_the_vendor_default():
    """cpu_tuning() leaves no explicit setting behind where there was none."""
    info = _native.lib().cpu_info
    before = info()["tuning_override"]
    with _native.cpu_tuning("amd"), _native.cpu_tuning("intel"):
        assert info()["tuning"] == "intel" and info()["tuning_override"] == "intel"
    assert info()["tuning_override"] == before


def test_backend_info_names_run_time_caps_and_ignored_tunings(monkeypatch):
    """A cap set with isa_cap() and an unknown PYACCEL_CPU_TUNING are said so;
    non-str names are a TypeError; blanks around an environment value are dropped."""
    monkeypatch.delenv("PYACCEL_CPU_ISA", raising=False)
    with _native.isa_cap("portable"):
        assert "cap portable set at run time" in str(pyaccel.backend_info())
    monkeypatch.setenv("PYACCEL_CPU_TUNING", "zen3")
    assert "PYACCEL_CPU_TUNING=zen3: ignored" in str(pyaccel.backend_info())
    for fn in (_native.set_cpu_tuning, _native.set_isa_cap):
        with pytest.raises(TypeError, match="expected a str"):
            fn(None)


def test_blanks_around_environment_values(tmp_path):
    out = _run("import warnings; warnings.simplefilter('error')\n"
               "import pyaccel; print(pyaccel.backend_info().cpu_tuning)", tmp_path, PYACCEL_CPU_TUNING=" AMD ")
    assert out == "amd"


def test_reference_backend_refuses_what_the_native_packers_refuse(tmp_path):
    """Without the native library the CPU ops computed with -128 int8 weights
    and with repeated block columns (counted twice); the native packers refuse
    both: the reference path now does too, naming the argument."""
    code = ("import torch, pyaccel\n"
            "ops = torch.ops.pyaccel\n"
            "assert not pyaccel.backend_info().native_loaded\n"
            "x, w = torch.randn(2, 16), torch.ones(8, 16, dtype=torch.int8)\n"
            "v = torch.ones(2, 4, 4, dtype=torch.int8)\n"
            "crow, dup = torch.tensor([0, 2, 2], dtype=torch.int32), torch.tensor([1, 1], dtype=torch.int32)\n"
            "w[3, 5] = -128\n"
            "v128 = v.clone(); v128[1, 2, 3] = -128\n"
            "calls = [lambda: ops.int8_linear(x, w, torch.ones(8), None, None),\n"
            "         lambda: ops.block_sparse_int8_linear(x, v128, crow, torch.tensor([0, 1], dtype=torch.int32), 8, 16,"
            " torch.ones(8), None, None),\n"
            "         lambda: ops.block_sparse_linear(x, v.float(), crow, dup, 8, 16, None, None),\n"
            "         lambda: ops.block_sparse_int8_linear(x, v, crow, dup, 8, 16, torch.ones(8), None, None)]\n"
            "for f in calls:\n"
            "    try:\n"
            "        f(); print('computed')\n"
            "    except ValueError as e:\n"
            "        print(str(e).split(':')[0])\n")
    out = _run(code, tmp_path, PYACCEL_BACKEND="reference")
    assert out.split() == ["w_int8", "values", "col_indices", "col_indices"], out


def test_isa_names_are_case_insensitive_everywhere():
    """isa_supported('AVX2') was False where set_isa_cap('AVX2') capped at avx2:
    both take any case, and both refuse a name off the ladder."""
    for name in _native.ISA_LADDER:
        assert _native.isa_supported(name.upper()) == _native.isa_supported(name)
    assert _native.isa_supported("PORTABLE") == _native.available()
    with pytest.raises(ValueError, match="isa: expected one of"):
        _native.isa_supported("sse2")
    if _native.available():
        with _native.isa_cap("PORTABLE") as used:
            assert used == "portable"
