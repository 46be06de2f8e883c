"""The AMX level (avx512_amx): the int8 GEMM's tdpbusd kernel (qs8_gemm_32x64c4_amx.cpp).

Tile facts the grid is built from: row blocks of 16 (a short last block is
read from a copy padded to 16 rows), two row blocks and 32 channels per tile
pass, 64-channel panels in calls that take ranges of panels; k in steps of 64
bytes, with the k groups past the last whole step (k_pad % 64) added by zmm
vpdpbusd; calls of fewer than 8 rows run the AVX-512 VNNI kernel; activations
stay in L2 in groups of 256 rows. Integer accumulators must match exactly,
and the outputs must be bit-identical to the avx512_icl level's (one
checkpoint, one answer on every ISA).

Skipped where the CPU, the OS or the build lacks AMX-INT8 (everything but
Sapphire Rapids and later Xeons); the `isa` fixture runs every other int8 test
at this level there too.
"""
import pytest
import torch

import pyaccel
from pyaccel import _native, reference
from pyaccel.nn import Int8Linear

from .test_int8_linear import _rand_int8, native_acc

M_GRID = [8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 49, 64, 65, 100, 255, 256, 257, 300]
K_GRID = [4, 60, 64, 68, 124, 128, 132, 1024, 1028, 4100]
N_GRID = [1, 17, 64, 65, 200]


@pytest.fixture
def amx():
    if not _native.available():
        pytest.skip(f"native library not loaded: {_native.load_error()}")
    if not _native.isa_supported("avx512_amx"):
        info = _native.lib().cpu_info()
        pytest.skip(f"no usable AMX-INT8 here (CPU/OS/permission: {info.get('amx_int8')}, "
                    f"built: {info.get('amx_built')}; detected {info['detected_isa']})")
    with _native.isa_cap("avx512_amx") as used:
        if used != "avx512_amx":
            pytest.skip(f"AMX tile state {_native.lib().cpu_info()['amx_permission']} by the OS")
        assert pyaccel.backend_info().int8_kernel == "qs8_gemm_32x64c4_amx"
        yield


def _operands(m, k, n, gen):
    """Random int8 operands whose sums stay below 2**24 in magnitude, so the
    kernel's fp32 output (float of the int32 sum) is the exact integer:
    full-range values up to k = 1040, [-63, 63] beyond (63 * 63 * 4100 < 2**24)."""
    if k <= 1040:
        return _rand_int8((m, k), gen), _rand_int8((n, k), gen)
    lo = lambda shape: torch.randint(-63, 64, shape, generator=gen, dtype=torch.int8)  # noqa: E731
    return lo((m, k)), lo((n, k))


@pytest.mark.parametrize("m", M_GRID)
def test_accumulators_exact_grid(amx, gen, m):
    for k in K_GRID:
        for n in N_GRID:
            q, w = _operands(m, k, n, gen)
            acc = native_acc(q, w)
            ref = reference.int8_matmul_exact(q, w)
            assert torch.equal(acc, ref.float()), f"m={m} k={k} n={n}"


@pytest.mark.parametrize("k", [4, 60, 68, 132, 1028])
@pytest.mark.parametrize("m", [8, 40, 300])
def test_panel_ranges_with_k_tails(amx, gen, m, k):
    """N = 1100 (18 panels): with 2 threads each call takes a range of 4 panels
    (the last a shorter one); k below one step and with tails of 1 - 15 groups."""
    q, w = _operands(m, k, 1100, gen)
    assert torch.equal(native_acc(q, w), reference.int8_matmul_exact(q, w).float())


def test_extreme_values_exact(amx):
    """u8 activations 0x01 / 0xFF (q = -127 / 127) against w = -127 / 127, k
    past many steps, sums up to 127 * 127 * 1028 < 2**24 (exact in fp32)."""
    for m, k, n in [(33, 1028, 65), (16, 132, 64), (300, 1024, 130)]:
        for qv, wv in [(127, 127), (-127, 127), (127, -127), (-127, -127)]:
            q = torch.full((m, k), qv, dtype=torch.int8)
            w = torch.full((n, k), wv, dtype=torch.int8)
            q[::3, ::5] = -qv  # mixed signs, not one constant
            acc = native_acc(q, w)
            ref = reference.int8_matmul_exact(q, w)
            assert torch.equal(acc, ref.float())


@pytest.mark.parametrize("m,k,n", [(8, 256, 64), (40, 1000, 130), (300, 4096, 512), (700, 384, 1536)])
@pytest.mark.parametrize("threads", [1, 2])
def test_outputs_equal_the_vnni_level_bitwise(amx, gen, m, k, n, threads):
    lin = torch.nn.Linear(k, n)
    mod = Int8Linear.from_float(lin)
    x = torch.randn(m, k, generator=gen)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _native.isa_cap("avx512_amx"):
            y_amx = mod(x)
        with _native.isa_cap("avx512_icl"):
            y_vnni = mod(x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y_amx, y_vnni)
    for bits in (7,):
        mod7 = Int8Linear.from_float(lin, act_bits=bits)
        with _native.isa_cap("avx512_amx"):
            a = mod7(x)
        with _native.isa_cap("avx512_icl"):
            b = mod7(x)
        assert torch.equal(a, b)


def test_strided_bf16_and_batched_inputs(amx, gen):
    lin = torch.nn.Linear(200, 100)
    mod = Int8Linear.from_float(lin)
    x = torch.randn(3, 40, 400, generator=gen)[..., ::2]  # strided rows, 3-D
    y = mod(x)
    with _native.isa_cap("avx512_icl"):
        assert torch.equal(y, mod(x))
    xb = x.to(torch.bfloat16)
    yb = mod(xb)
    assert yb.dtype == torch.bfloat16
    with _native.isa_cap("avx512_icl"):
        assert torch.equal(yb, mod(xb))


def test_other_amx_code_on_the_same_threads(amx, gen):
    """oneDNN's bf16 matmul (AMX-BF16 on these CPUs) loads its own tile
    configuration on the same threads between pyaccel's calls: each pyaccel
    call loads its own and releases the tiles, so both keep their results."""
    mod = Int8Linear.from_float(torch.nn.Linear(512, 256))
    x = torch.randn(64, 512, generator=gen)
    ref = mod(x)
    a = torch.randn(256, 512, generator=gen).to(torch.bfloat16)
    ref_bf16 = a @ a.T
    for _ in range(3):
        assert torch.equal(a @ a.T, ref_bf16)
        assert torch.equal(mod(x), ref)
        assert torch.equal(a @ a.T, ref_bf16)


@pytest.mark.parametrize("n_batch,hw", [(1, 7), (2, 13), (3, 10)])
def test_fused_dws_int8_stage_equals_the_vnni_level(amx, gen, n_batch, hw):
    """The fused depthwise-separable conv's int8 pointwise stage runs the AMX
    kernel per panel over bands of pixels (short row blocks included): the
    same outputs, bit for bit, as at avx512_icl."""
    import pyaccel

    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Conv2d(72, 72, 3, 1, 1, groups=72), torch.nn.BatchNorm2d(72),
                            torch.nn.ReLU(), torch.nn.Conv2d(72, 136, 1), torch.nn.BatchNorm2d(136),
                            torch.nn.ReLU()).eval()
    fused = pyaccel.patch(m, quantize="int8").model
    x = torch.randn(n_batch, 72, hw, hw, generator=gen).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y_amx = fused(x)
        with _native.isa_cap("avx512_icl"):
            y_icl = fused(x)
    assert torch.equal(y_amx, y_icl)
