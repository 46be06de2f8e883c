"""pyaccel::int8_linear: native CPU kernels (every ISA) against the reference.

Tile facts the grid is built from (csrc/int8_gemm/README.md): rows per tile
MR = 6 (VNNI), 4 (AVX-512 BW), 1 (portable); AVX-VNNI: the k-blocked row path
up to 4 rows (8 on >= 4 Mi weights: test_int8_avxvnni.py), above that 6 rows x
16 channels (a quarter panel); AVX2: the k-blocked row path up to 4 rows, above that a 6-row x 8-channel int16 tile over blocks of widened rows
(90 rows a block at K = 1030, 18 at K = 4096); 64-channel panels; k in groups
of 4; the VNNI kernel blocks K by 256. Integer accumulators must match exactly; the fp32 epilogue computes the
same expression as the reference, so outputs agree to an ulp.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import on_threads_unguarded
from pyaccel import _native, reference
from pyaccel.formats.int8 import pack_int8_weight, quantize_weight_per_channel

M_GRID = [1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 16, 17, 18, 23, 50, 97]
N_GRID = [1, 15, 16, 17, 63, 64, 65, 130]
K_GRID = [1, 3, 4, 5, 255, 256, 257, 1030]


def _rand_int8(shape, gen):
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)


def native_acc(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int32 accumulators from the native kernel (unit scales, no bias)."""
    C = _native.lib()
    m, k = q.shape
    n = w.shape[0]
    packed = pack_int8_weight(w)
    ones_m, ones_n = torch.ones(m), torch.ones(n)
    y = torch.empty(m, n)
    C.int8_gemm_prequantized(q.data_ptr(), q.stride(0), ones_m.data_ptr(), m, k, packed.data_ptr(),
                             packed.numel(), n, ones_n.data_ptr(), 0, y.data_ptr(), n, False, 2)
    return y


def assert_close_epilogue(y, yr):
    """Same fp32 expression on both sides: allow one rounding step of |y|."""
    tol = torch.finfo(y.dtype).eps * yr.abs().float().clamp_min(1e-30)
    bad = ((y.float() - yr.float()).abs() > tol)
    assert not bad.any(), f"{int(bad.sum())} mismatches, first at {bad.nonzero()[0].tolist()}: " \
        f"{y[tuple(bad.nonzero()[0])]} vs {yr[tuple(bad.nonzero()[0])]}"


@pytest.mark.parametrize("m", M_GRID)
@pytest.mark.parametrize("n", N_GRID)
def test_accumulators_exact_grid(isa, gen, m, n):
    for k in K_GRID:
        q, w = _rand_int8((m, k), gen), _rand_int8((n, k), gen)
        # |acc| <= 127*127*1030 < 2**24: the fp32 output is the exact integer
        acc = native_acc(q, w)
        ref = reference.int8_matmul_exact(q, w).float()
        diff = (acc - ref).abs()
        assert torch.equal(acc, ref), f"k={k}: first mismatch at {diff.nonzero()[0].tolist()}"


def test_empty_k_gives_the_bias(isa, gen):
    """K = 0 (the raw op accepts [N, 0] weights): every sum is empty, y = bias
    (or 0) on every ISA, in fp32 and bf16 -- never the unwritten output."""
    w = torch.zeros(9, 0, dtype=torch.int8)
    b = torch.arange(9.0)
    for m in (1, 7, 20):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, 0).to(dtype)
            for bias, want in ((b, b.expand(m, 9)), (None, torch.zeros(m, 9))):
                y = torch.ops.pyaccel.int8_linear(x, w, torch.ones(9), bias, None)
                assert torch.equal(y.float(), want.to(dtype).float()), (m, dtype, bias is None)


def test_accumulator_overflow_boundary(isa):
    # largest |acc| that fits int32: 127*127*k < 2**31 for k = 133_000. The
    # VNNI kernel's uint8 trick wraps in between and must still come out exact.
    # 20 rows: the AVX2 int16 tile (2 rows take its k-blocked row path).
    k = 133_000
    for m in (2, 20):
        q = torch.full((m, k), 127, dtype=torch.int8)
        q[1::2] = -127
        w = torch.full((3, k), 127, dtype=torch.int8)
        w[1] = -127
        w[2, ::2] = -127
        acc = native_acc(q, w)
        ref = reference.int8_matmul_exact(q, w).float()
        assert abs(float(ref[0, 0])) > 2**31 * 0.99
        assert torch.equal(acc, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(isa, gen, dtype, bias):
    # K = 2048: the quantized rows' stride (k_pad + 64) and the widened ones' (k_pad + 32) differ
    # (2 - 4, *, > 256): the AVX2 row path's k-blocks, the last one partial
    for m, n, k in [(1, 64, 64), (7, 65, 257), (13, 130, 1030), (50, 17, 5), (31, 72, 300), (9, 70, 2048),
                    (3, 65, 300), (2, 130, 1030), (4, 9, 259)]:
        w = quantize_weight_per_channel(torch.randn(n, k, generator=gen))
        b = torch.randn(n, generator=gen) if bias else None
        x = torch.randn(m, k, generator=gen).to(dtype)
        y = torch.ops.pyaccel.int8_linear(x, w.values, w.scale, b, pack_int8_weight(w.values))
        yr = reference.int8_linear(x, w.values, w.scale, b)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_close_epilogue(y, yr)


def test_batch_dims_strides_zero_size(isa, gen):
    n, k = 40, 70
    w = quantize_weight_per_channel(torch.randn(n, k, generator=gen))
    p = pack_int8_weight(w.values)
    b = torch.randn(n, generator=gen)
    big = torch.randn(3, 9, 100, generator=gen)
    cases = {
        "3-D": torch.randn(2, 5, k, generator=gen),
        "4-D": torch.randn(2, 1, 3, k, generator=gen),
        "row-strided": big[:, :, 5:75],
        "column-strided": torch.randn(k, 6, generator=gen).t(),
        "every-other-row": torch.randn(10, k, generator=gen)[::2],
        "zero-batch": torch.randn(0, k),
        "zero-batch-3d": torch.randn(2, 0, k),
        "1-D": torch.randn(k, generator=gen),
    }
    for name, x in cases.items():
        y = torch.ops.pyaccel.int8_linear(x, w.values, w.scale, b, p)
        yr = reference.int8_linear(x, w.values, w.scale, b)
        assert y.shape == (*x.shape[:-1], n), name
        assert_close_epilogue(y, yr)


def test_unpacked_weight_is_packed_on_the_fly(gen):
    w = quantize_weight_per_channel(torch.randn(33, 20, generator=gen))
    x = torch.randn(4, 20, generator=gen)
    y = torch.ops.pyaccel.int8_linear(x, w.values, w.scale, None, None)
    assert_close_epilogue(y, reference.int8_linear(x, w.values, w.scale, None))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 20), n=st.integers(1, 150), k=st.integers(1, 600),
       bf16=st.booleans(), bias=st.booleans(), transposed=st.booleans(),
       isa_name=st.sampled_from(_native.ISA_LADDER), seed=st.integers(0, 2**31 - 1))
def test_property_random_shapes(m, n, k, bf16, bias, transposed, isa_name, seed):
    if not _native.isa_supported(isa_name):
        isa_name = "portable"
    g = torch.Generator().manual_seed(seed)
    w = quantize_weight_per_channel(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(k, m, generator=g).t() if transposed else torch.randn(m, k, generator=g)
    if bf16:
        x = x.to(torch.bfloat16)
    with _native.isa_cap(isa_name):
        y = torch.ops.pyaccel.int8_linear(x, w.values, w.scale, b, pack_int8_weight(w.values))
    assert_close_epilogue(y, reference.int8_linear(x, w.values, w.scale, b))


def test_opcheck(gen):
    w = quantize_weight_per_channel(torch.randn(24, 40, generator=gen))
    p = pack_int8_weight(w.values)
    for x, b in [(torch.randn(3, 40, generator=gen), torch.randn(24, generator=gen)),
                 (torch.randn(2, 2, 40, generator=gen).to(torch.bfloat16), None)]:
        torch.library.opcheck(torch.ops.pyaccel.int8_linear.default, (x, w.values, w.scale, b, p))
    torch.library.opcheck(torch.ops.pyaccel.quantize_per_row.default, (torch.randn(3, 40, generator=gen),))


def test_bad_input_names_the_argument(gen):
    w = quantize_weight_per_channel(torch.randn(8, 16, generator=gen))
    x = torch.randn(2, 16, generator=gen)
    op = torch.ops.pyaccel.int8_linear
    with pytest.raises(ValueError, match=r"x: expected last dimension K=16"):
        op(torch.randn(2, 15), w.values, w.scale, None, None)
    with pytest.raises(TypeError, match=r"x: expected float32 or bfloat16.*float64"):
        op(x.double(), w.values, w.scale, None, None)
    with pytest.raises(TypeError, match=r"w_int8: expected a 2-D int8"):
        op(x, w.values.float(), w.scale, None, None)
    with pytest.raises(ValueError, match=r"w_scale: expected float32 of shape \(8,\)"):
        op(x, w.values, w.scale[:4], None, None)
    with pytest.raises(ValueError, match=r"bias: expected float32 of shape \(8,\)"):
        op(x, w.values, w.scale, torch.zeros(7), None)
    with pytest.raises(ValueError, match=r"packed_weight: packed weight shape does not match"):
        other = pack_int8_weight(torch.zeros(9, 16, dtype=torch.int8))
        op(x, w.values, w.scale, None, other)
    with pytest.raises(ValueError, match=r"packed_weight: .*magic"):
        op(x, w.values, w.scale, None, torch.zeros_like(pack_int8_weight(w.values)))
    with pytest.raises(TypeError, match=r"packed: expected a 1-D uint8"):
        op(x, w.values, w.scale, None, torch.zeros(3, 3))


@pytest.mark.parametrize("m", [1, 2, 7, 40])
def test_minus_128_weight_is_refused(isa, gen, m):
    """-128 has no int8 negation (the AVX2 sign trick computed rows 1 - 2 wrong
    with it): packing refuses it, and so does the op when it packs per call;
    the same weight clamped to -127 matches the reference at every ISA."""
    w = quantize_weight_per_channel(torch.randn(24, 40, generator=gen))
    vals = w.values.clone()
    vals[5, 17] = -128
    x = torch.randn(m, 40, generator=gen)
    with pytest.raises(ValueError, match=r"w_int8: expected int8 values in \[-127, 127\], found -128 at index \(5, 17\)"):
        torch.ops.pyaccel.int8_linear(x, vals, w.scale, None, None)
    with pytest.raises(ValueError, match=r"values: expected int8 values in \[-127, 127\], found -128"):
        pack_int8_weight(vals)
    vals[5, 17] = -127
    y = torch.ops.pyaccel.int8_linear(x, vals, w.scale, None, None)
    assert torch.allclose(y, reference.int8_linear(x, vals, w.scale, None), rtol=1e-6, atol=1e-6)


# From 64 rows a thread each thread quantizes its own chunk of whole row tiles
# (the kernel's mr rows) and multiplies it (row_chunk_passes; the AMX level
# keeps its panel ranges):
# rows around 64 x 2 threads, chunks that are no multiple of 16, both ladders.
@pytest.mark.serial
@pytest.mark.parametrize("act_bits", [8, 7])
@pytest.mark.parametrize("m", [127, 128, 129, 192, 240, 257, 390])
def test_row_chunks_per_thread_are_exact(isa, gen, m, act_bits):
    qmax = 127 if act_bits == 8 else 63
    n, k = 130, 1030
    w = _rand_int8((n, k), gen)
    packed = pack_int8_weight(w, pair_safe=act_bits == 8)
    # integer rows whose max |x| is qmax: quantization is the identity, the output the exact integer
    x = torch.randint(-qmax, qmax + 1, (m, k), generator=gen).float()
    x[:, 0] = qmax
    y = on_threads_unguarded(2, lambda: torch.ops.pyaccel.int8_linear(x, w, torch.ones(n), None, packed, act_bits))
    ref = reference.int8_matmul_exact(x.to(torch.int8), w).float()
    assert torch.equal(y, ref), f"first mismatch at {(y - ref).nonzero()[0].tolist()}"


def test_k_past_int32_safe_limit_is_refused():
    from pyaccel.reference import INT8_MAX_K

    k = INT8_MAX_K + 4
    w = torch.ones(1, k, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"w_int8: K=131076 exceeds 131072"):
        torch.ops.pyaccel.int8_linear(torch.ones(1, k), w, torch.ones(1), None, None)
    from pyaccel.nn import Int8Linear

    with pytest.raises(ValueError, match="in_features: 131076 exceeds"):
        Int8Linear(k, 1)


def test_large_batches_run_in_row_passes(isa, gen):
    """Quantized activations are kept per thread for <= ~8 MiB of rows at a
    time: larger batches run in passes (K = 4096: <= 2016 rows each; <= 648
    at avx2, whose int16 copy of the activations counts too), with
    results identical to calling the layer on slices (integer arithmetic and a
    per-row epilogue)."""
    from torch import nn

    from pyaccel.formats import sparse24 as s24
    from pyaccel.nn import Int8Linear, Sparse24Int8Linear

    lin = nn.Linear(4096, 40)
    with torch.no_grad():
        lin.weight.mul_(s24.mask_24(lin.weight))
    for mod in (Int8Linear.from_float(lin), Sparse24Int8Linear.from_float(lin)):
        for m in (2100, 4500):
            x = torch.randn(m, 4096, generator=gen)
            y = mod(x)
            assert torch.equal(y, torch.cat([mod(x[i:i + 700]) for i in range(0, m, 700)]))


def test_prequantized_gemm_in_row_passes_is_exact(isa, gen):
    """The prequantized entry point re-encodes rows in passes too (K = 4096:
    <= 2016 rows each): its int32 accumulators stay exact across passes."""
    q = _rand_int8((2100, 4096), gen)
    w = _rand_int8((24, 4096), gen)
    assert torch.equal(native_acc(q, w), (q.double() @ w.double().t()).float())


@pytest.mark.parametrize("k", [17, 64, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_activation_rows_match_reference(isa, gen, k, dtype):
    """Rows whose 127 / max|x| overflows fp32 (and subnormal rows) next to normal
    rows, through the whole native int8_linear: equal to the reference. 24
    rows: the AVX2 int16 tile's epilogue too."""
    amaxes = [1.0, 2e-37, 3.7e-37, 1e-38, 1e-40, 1e-30, 2.0 ** -64, 5.0] * 3
    x = torch.randn(len(amaxes), k, generator=gen, dtype=torch.float64)
    x = (x / x.abs().amax(dim=1, keepdim=True) * torch.tensor(amaxes, dtype=torch.float64)[:, None]).float()
    x = x.to(dtype)
    w = quantize_weight_per_channel(torch.randn(65, k, generator=gen))
    b = torch.randn(65, generator=gen) * 1e-38
    for bias in (None, b):
        y = torch.ops.pyaccel.int8_linear(x, w.values, w.scale, bias, pack_int8_weight(w.values))
        yr = reference.int8_linear(x, w.values, w.scale, bias)
        assert torch.equal(y, yr)


@pytest.mark.parametrize("amax", [1e-30, 2e-37, 1e-38, 1e-40, 1.0, 1e30, 1e36])
def test_tiny_and_huge_activations_are_accurate(isa, gen, amax):
    """The epilogue's scale product keeps a tiny (subnormal) sx's precision and
    does not overflow for huge activations: y within ~1e-2 of the float64 product."""
    k, n = 257, 40
    w_f = torch.randn(n, k, generator=gen) * 0.05
    w = quantize_weight_per_channel(w_f)
    x = torch.randn(20, k, generator=gen, dtype=torch.float64)  # 20 rows: the AVX2 int16 tile
    x = (x / x.abs().amax(dim=1, keepdim=True) * amax).float()
    y = torch.ops.pyaccel.int8_linear(x, w.values, w.scale, None, pack_int8_weight(w.values))
    assert torch.equal(y, reference.int8_linear(x, w.values, w.scale, None))
    y64 = x.double() @ w_f.double().t()
    err = (y.double() - y64).norm(dim=1) / y64.norm(dim=1)
    assert (err < 2e-2).all(), err.tolist()
