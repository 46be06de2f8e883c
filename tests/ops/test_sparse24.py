"""2:4 format (lossless round trips, pruning rule) and pyaccel::sparse24_linear
(native kernels, every ISA) against the dense reference.

Tile facts (csrc/sparse24): 16-channel panels, groups of 4 inputs in blocks
of 4 groups (16 inputs); AVX-512 tile 6 rows x 32 channels, AVX2 4 x 8,
portable 1 x 16. From 16 rows (when >= 70 % of the 16-row slabs are real rows)
the AVX-512 path runs the column kernel: x transposed into 16-row slabs,
tiles of 8 channels x 1 - 3 slabs, K in blocks of ~128 groups beyond 512 groups. fp32 sums run in a different order than the dense
reference, so the tolerance is derived from K: |err| <= c * eps * sum_k |x w|.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import num_threads
from pyaccel import _native, reference
from pyaccel.formats import sparse24 as s24

M_GRID = [1, 2, 3, 4, 5, 6, 7, 13, 40]  # around the row path (2 rows) and the 4- and 6-row tiles
NK_GRID = [(1, 1), (3, 4), (16, 16), (17, 7), (31, 33), (32, 64), (33, 65), (70, 130), (64, 1000)]


def _sparse_weight(n, k, gen, zero_groups=True):
    w = torch.randn(n, k, generator=gen)
    w = w * s24.mask_24(w)
    if zero_groups and k >= 8:
        w[:, 0:4] = 0          # a group with no non-zero
        w[:, 4:8] *= torch.tensor([0.0, 1.0, 0.0, 0.0])  # a group with one
    return w


def assert_close_k(y, x, w, bias=None):
    """Tolerance from K: a few ulps of sum |x||w| per output."""
    scale = x.float().abs() @ w.float().abs().t()
    if bias is not None:
        scale = scale + bias.abs()
    eps = torch.finfo(y.dtype).eps
    ref = reference.sparse24_linear(x, *_canon(w), w.shape[1], bias)
    tol = 4 * eps * scale + 1e-30
    bad = (y.float() - ref.float()).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} outputs off, first at {bad.nonzero()[0].tolist()}"


def _canon(w):
    sw = s24.compress(w)
    return sw.values.float(), sw.meta


def _layer(n, k, gen):
    """A random 2:4 layer: dense w, canonical values / meta, bias, packing."""
    w = _sparse_weight(n, k, gen)
    vals, meta = _canon(w)
    b = torch.randn(n, generator=gen)
    return w, vals, meta, b, s24.pack_sparse24(s24.Sparse24Weight(vals, meta, k))


# ---- format -------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", NK_GRID)
def test_round_trip_lossless(gen, n, k):
    w = _sparse_weight(n, k, gen)
    sw = s24.compress(w)
    assert sw.values.shape == (n, 2 * ((k + 3) // 4))
    assert sw.meta.dtype == torch.uint8 and sw.meta.shape == (n, ((k + 3) // 4 + 1) // 2)
    assert torch.equal(s24.decompress(sw), w)
    assert torch.equal(s24.decompress(s24.compress(w.to(torch.bfloat16))), w.to(torch.bfloat16))


def test_mask_keeps_two_largest_with_lower_index_on_ties():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.1, -5.0, 3.0, 0.2, 2.0, 2.0, 0.0, 0.0, 7.0]])
    m = s24.mask_24(w)
    assert m.int().tolist() == [[1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1]]
    assert s24.is_24(w * m) and not s24.is_24(w)


def test_compress_rejects_dense_naming_the_group():
    w = torch.zeros(3, 12)
    w[2, 4:7] = 1.0
    with pytest.raises(ValueError, match=r"weight: not 2:4 sparse: row 2, columns 4..7 hold 3 non-zeros"):
        s24.compress(w)
    with pytest.raises(ValueError, match=r"weight: expected a 2-D floating-point"):
        s24.compress(torch.zeros(3, 4, dtype=torch.int32))


# ---- kernels ------------------------------------------------------------------------
@pytest.mark.parametrize("m", M_GRID)
@pytest.mark.parametrize("n,k", NK_GRID)
def test_kernel_matches_reference(isa, gen, m, n, k):
    w = _sparse_weight(n, k, gen)
    vals, meta = _canon(w)
    b = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    packed = s24.pack_sparse24(s24.Sparse24Weight(vals, meta, k))
    y = torch.ops.pyaccel.sparse24_linear(x, vals, meta, k, b, packed)
    assert y.shape == (m, n)
    assert_close_k(y, x, w, b)



@pytest.mark.parametrize("m", [2, 3, 5, 9, 15])
def test_a_row_is_the_same_alone_or_in_a_batch(isa, gen, m):
    """Below the column kernel (16 rows on AVX-512, 32 on AVX2) every row gets
    the same bits whichever row path or tile height it takes, so the result
    cannot move with the thread split (which changes with machine load)."""
    n, k = 40, 300
    w, vals, meta, b, packed = _layer(n, k, gen)
    x = torch.randn(m, k, generator=gen)
    y = torch.ops.pyaccel.sparse24_linear(x, vals, meta, k, b, packed)
    for i in range(m):
        assert torch.equal(torch.ops.pyaccel.sparse24_linear(x[i:i + 1], vals, meta, k, b, packed), y[i:i + 1]), i
    for r0, r1 in ((0, m // 2), (m // 2, m)):
        assert torch.equal(torch.ops.pyaccel.sparse24_linear(x[r0:r1], vals, meta, k, b, packed), y[r0:r1])

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_strided_batched_and_empty(isa, gen, dtype):
    n, k = 40, 70
    w = _sparse_weight(n, k, gen)
    vals, meta = _canon(w)
    p = s24.pack_sparse24(s24.Sparse24Weight(vals, meta, k))
    big = torch.randn(3, 9, 100, generator=gen)
    for x in [torch.randn(2, 5, k, generator=gen), big[:, :, 10:80], torch.randn(k, 6, generator=gen).t(),
              torch.randn(0, k), torch.randn(k, generator=gen)]:
        x = x.to(dtype)
        y = torch.ops.pyaccel.sparse24_linear(x, vals, meta, k, None, p)
        assert y.dtype == dtype and y.shape == (*x.shape[:-1], n)
        ref = reference.sparse24_linear(x, vals, meta, k, None)
        # bf16 output: one bf16 rounding of the fp32 result
        tol = (torch.finfo(dtype).eps * ref.float().abs() + 1e-4) if dtype == torch.bfloat16 else 1e-4
        assert ((y.float() - ref.float()).abs() <= tol).all()


# the column kernel: slab counts 1 - 14, a partial last slab, row tiles of
# 1 / 2 / 3 slabs (AVX2 on Intel: 1 - 6 half slabs as 2-channel tiles, 7 - 10
# as 1-channel tiles, either starting at an odd half: 56 rows -> 7 halves,
# 100 -> 13 = 7 + 6, 112 -> 7 + 7, 136 -> 9 + 8, 145 -> 10 + 9, 216 -> 9 + 9 + 9;
# with 2 threads from 96 rows, the row split's chunks of 48 - 112 rows),
# channels not a multiple of 8 (a tile past n; odd n: a 2-channel tile with one
# channel; n = 150: the Intel tile's rows leave 8 channels at a time, from items
# of channel tiles that start and end off those 8-channel steps), K past one
# k-block (partial sums between blocks, an uneven last block: AVX2 blocks K at
# <= 40 groups on AMD, so k = 333 (84 groups) runs 44 + 40, and in the k-blocks
# of 32 groups of its k-blocked x on Intel, 32 + 32 + 20; AVX-512 at 128 from
# 512, k = 2100); both core families' variants (tuning)
@pytest.mark.parametrize("m", [16, 23, 24, 32, 40, 47, 48, 56, 64, 100, 112, 136, 145, 216])
@pytest.mark.parametrize("n,k", [(8, 16), (9, 100), (44, 333), (24, 2100), (150, 260)])
@pytest.mark.parametrize("threads", [1, 2])
def test_many_rows_column_kernel(isa, tuning, gen, m, n, k, threads):
    with num_threads(threads):
        _check_many_rows(gen, m, n, k)


def _check_many_rows(gen, m, n, k):
    w, vals, meta, b, packed = _layer(n, k, gen)
    x = torch.randn(m, k + 3, generator=gen)[:, 2:k + 2]  # strided rows
    y = torch.ops.pyaccel.sparse24_linear(x, vals, meta, k, b, packed)
    assert_close_k(y, x, w, b)
    xb = x.to(torch.bfloat16)
    yb = torch.ops.pyaccel.sparse24_linear(xb, vals, meta, k, b, packed)
    assert yb.dtype == torch.bfloat16
    ref = reference.sparse24_linear(xb, vals, meta, k, b).float()
    scale = xb.float().abs() @ w.abs().t() + b.abs()
    # one bf16 rounding of a result that is fp32-accurate
    tol = torch.finfo(torch.bfloat16).eps * ref.abs() + 4 * torch.finfo(torch.float32).eps * scale + 1e-30
    assert ((yb.float() - ref).abs() <= tol).all()


def test_avx2_column_kernel_follows_the_tuning():
    """At the avx2 level the column kernel is the 2 x 48 tile for Intel cores and
    the 4 x 24 tile for AMD ones, whatever the CPU; the choice follows changes."""
    if not _native.isa_supported("avx2"):
        pytest.skip("this CPU lacks avx2")
    with _native.isa_cap("avx2"):
        for tuning, name in (("intel", "s24_gemm_cols_2x48_avx2"), ("amd", "s24_gemm_cols_4x24_avx2"),
                             ("intel", "s24_gemm_cols_2x48_avx2")):
            with _native.cpu_tuning(tuning):
                assert _native.lib().kernel_params()["sparse24"]["cols_name"] == name
    with pytest.raises(ValueError, match="tuning"):
        _native.set_cpu_tuning("zen")


def test_column_kernel_short_passes(tuning, gen):
    """K past ~63k inputs (8 MiB of transposed x per 16 rows): the driver's
    passes hold <= 16 rows, so the Intel AVX2 column tile runs row tiles of 1
    and 2 half slabs (24 rows -> 16 + 8)."""
    if not _native.isa_supported("avx2"):
        pytest.skip("this CPU lacks avx2")
    n, k = 6, 140001
    w = _sparse_weight(n, k, gen)
    vals, meta = _canon(w)
    b = torch.randn(n, generator=gen)
    packed = s24.pack_sparse24(s24.Sparse24Weight(vals, meta, k))
    for m in (24, 40):
        x = torch.randn(m, k, generator=gen)
        with _native.isa_cap("avx2"):
            y = torch.ops.pyaccel.sparse24_linear(x, vals, meta, k, b, packed)
        assert_close_k(y, x, w, b)


def _poison_scratch(threads):
    """Leave NaN in every thread's transposed-x and partial-sum scratch: a batch
    of NaN rows through the column kernel (a full pass of 8 MiB of x)."""
    n, k = 16, 4096
    w = torch.zeros(n, k)
    w[:, 0::4] = 1.0
    vals, meta = _canon(w)
    p = s24.pack_sparse24(s24.Sparse24Weight(vals, meta, k))
    x = torch.full((512, k), float("nan"))
    for t in sorted({1, threads}):
        with num_threads(t):
            torch.ops.pyaccel.sparse24_linear(x, vals, meta, k, None, p)


# The column kernel reads only the x it packed: every call runs on scratch left
# full of NaN, so a read past the packed lines (the rest of a last k-block, the
# pad between slabs, rows past m) would show. K around the AVX2 8-input blocks
# and Intel's 128-input k-blocks (1, 3, 127, 128, 256, 333); odd-half row tiles
# (56: 7, 145: 10 + 9); 2 threads split rows from 96.
@pytest.mark.parametrize("k", [1, 3, 127, 128, 256, 333])
@pytest.mark.parametrize("m,threads", [(24, 1), (56, 2), (145, 1), (145, 2)])
def test_column_kernel_reads_only_what_it_packed(isa, tuning, gen, k, m, threads):
    w, vals, meta, b, packed = _layer(9, k, gen)
    x = torch.randn(m, k, generator=gen)
    _poison_scratch(threads)
    with num_threads(threads):
        y = torch.ops.pyaccel.sparse24_linear(x, vals, meta, k, b, packed)
    assert not torch.isnan(y).any()
    assert_close_k(y, x, w, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_column_kernel_in_several_passes(isa, tuning, gen, threads):
    """Batches past ~8 MiB of x run the column kernel in balanced passes of rows:
    K = 4100, passes of <= 496 rows (480 with Intel's k-blocked x) (one thread,
    1000 rows: 336 + 336 + 328;
    two threads: the row split in passes of the same rows, each pass in two
    chunks of whole 16-row slabs); K = 40000, passes of <= 48 rows (one
    thread, 200 rows: 4 x 48 + 8; two threads: the same passes, each split
    in two chunks)."""
    with num_threads(threads):
        for n, k, m in ((20, 4100, 1000), (12, 40000, 200)):
            w, vals, meta, b, packed = _layer(n, k, gen)
            x = torch.randn(m, k, generator=gen)
            y = torch.ops.pyaccel.sparse24_linear(x, vals, meta, k, b, packed)
            assert_close_k(y, x, w, b)


@pytest.mark.parametrize("n", [150, 9])
@pytest.mark.parametrize("m", [96, 97, 100, 191, 200, 383, 777])
def test_column_kernel_row_split_same_bits(isa, tuning, gen, m, n):
    """From 48 rows per thread (packed weights <= 16 MiB) the driver splits the
    rows over the threads -- a chunk of whole 16-row slabs a thread, which it
    transposes, in up to 4 items of channel tiles that the other thread may
    take over (n = 9: one tile, one item a chunk) -- instead of the channels:
    the bits of every output must not change (one thread never splits). Odd
    row counts leave a partial slab in the last chunk; bf16 in and out;
    strided rows."""
    k = 333
    w, vals, meta, b, packed = _layer(n, k, gen)
    x = torch.randn(m, k + 5, generator=gen)[:, 3:k + 3]
    out = {}
    for threads in (1, 2):
        with num_threads(threads):
            out[threads] = (torch.ops.pyaccel.sparse24_linear(x, vals, meta, k, b, packed),
                            torch.ops.pyaccel.sparse24_linear(x.to(torch.bfloat16), vals, meta, k, b, packed))
    assert torch.equal(out[1][0], out[2][0]) and torch.equal(out[1][1], out[2][1])
    assert_close_k(out[2][0], x, w, b)


_FRESH_PROCESS_CASES = """
import sys, torch
from pyaccel import _native, reference
from pyaccel.formats import sparse24 as s24
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
for m, n, k in ((96, 4, 16), (1000, 12, 333), (100, 20, 256), (145, 44, 333)):
    w = torch.randn(n, k, generator=g)
    w = w * s24.mask_24(w)
    sw = s24.compress(w)
    x = torch.randn(m, k, generator=g)
    y = torch.ops.pyaccel.sparse24_linear(x, sw.values, sw.meta, k, None, s24.pack_sparse24(sw))
    ref = reference.sparse24_linear(x, sw.values, sw.meta, k, None)
    tol = 4 * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().t()) + 1e-30
    assert ((y - ref).abs() <= tol).all(), (m, n, k)
print("ok")
"""


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("level,tuning_name", [("avx2", "intel"), ("avx2", "amd"), ("avx512", "intel")])
def test_column_kernel_scratch_in_a_fresh_process(level, tuning_name, threads, tmp_path):
    """The column kernels' partial-sum scratch is sized per call (it grows and
    never shrinks per thread, so earlier tests can hide an undersized one):
    odd channel-tile counts past 48 rows, in a process of their own (the
    column kernels: AVX2 per tuning, AVX-512)."""
    import os
    import subprocess
    import sys

    if not _native.isa_supported(level):
        pytest.skip(f"this CPU lacks {level}")
    env = dict(os.environ, PYACCEL_CPU_ISA=level, PYACCEL_CPU_TUNING=tuning_name, MALLOC_CHECK_="3")
    r = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_CASES, str(threads)], env=env, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout[-2000:], r.stderr[-2000:])


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 70), n=st.integers(1, 80), k=st.integers(1, 300),
       isa_name=st.sampled_from(_native.ISA_LADDER), tuning=st.sampled_from(_native.TUNINGS),
       seed=st.integers(0, 2**31 - 1))
def test_property_random_shapes(m, n, k, isa_name, tuning, seed):
    if not _native.isa_supported(isa_name):
        isa_name = "portable"
    g = torch.Generator().manual_seed(seed)
    w = _sparse_weight(n, k, g, zero_groups=bool(seed % 2))
    vals, meta = _canon(w)
    x = torch.randn(m, k, generator=g)
    with _native.isa_cap(isa_name), _native.cpu_tuning(tuning):
        y = torch.ops.pyaccel.sparse24_linear(x, vals, meta, k, None, None)
    assert_close_k(y, x, w)


def test_opcheck_and_errors(gen):
    w = _sparse_weight(24, 40, gen)
    vals, meta = _canon(w)
    p = s24.pack_sparse24(s24.Sparse24Weight(vals, meta, 40))
    x = torch.randn(3, 40, generator=gen)
    torch.library.opcheck(torch.ops.pyaccel.sparse24_linear.default, (x, vals, meta, 40, None, p))
    # packed=None: the CPU op packs (and validates meta) at run time; the fake
    # kernel checks shapes only (no data-dependent guard under tracing)
    torch.library.opcheck(torch.ops.pyaccel.sparse24_linear.default, (x, vals, meta, 40, None, None))
    compiled = torch.compile(lambda x, v, m: torch.ops.pyaccel.sparse24_linear(x, v, m, 40, None, None),
                             fullgraph=True)
    assert torch.equal(compiled(x, vals, meta), torch.ops.pyaccel.sparse24_linear(x, vals, meta, 40, None, p))
    op = torch.ops.pyaccel.sparse24_linear
    with pytest.raises(ValueError, match=r"x: expected last dimension K=40"):
        op(torch.randn(3, 41), vals, meta, 40, None, p)
    with pytest.raises(ValueError, match=r"values: expected torch.float32 \[N, 20\]"):
        op(x, vals[:, :10], meta, 40, None, p)
    with pytest.raises(ValueError, match=r"meta: expected uint8 of shape \(24, 5\)"):
        op(x, vals, meta[:, :2], 40, None, p)
    with pytest.raises(ValueError, match=r"packed_weight: .*magic"):
        op(x, vals, meta, 40, None, torch.zeros_like(p))


@pytest.mark.parametrize("int8", [False, True])
def test_malformed_canonical_form_is_refused_by_the_ops_and_packers(gen, int8):
    """A group of meta without two distinct positions (the kernels would add
    both values where the reference keeps one) or a non-zero value past k: the
    ops (packed=None) and the packers raise ValueError naming the argument."""
    k = 38  # the last group has 2 real inputs: positions 2, 3 are padding
    w = _sparse_weight(24, k, gen)
    vals, meta = _canon(w)
    x = torch.randn(3, k, generator=gen)
    if int8:
        _, vals, meta, scale = _int8_24(24, k, gen)
    vals[vals == 0] = 1  # every kept value non-zero (padding edits below must show)

    def run(v, m):
        if int8:
            torch.ops.pyaccel.sparse24_int8_linear(x, v, m, k, scale, None, None)
        else:
            torch.ops.pyaccel.sparse24_linear(x, v, m, k, None, None)

    def pack(v, m):
        return s24.pack_sparse24_int8(v, m, k) if int8 else s24.pack_sparse24(s24.Sparse24Weight(v, m, k))

    vals_ok = vals.clone()
    g = (k + 3) // 4 - 1
    last = meta[:, g // 2].clone()
    vals_ok[:, 2 * g: 2 * g + 2] = 0  # the last group: values at padding positions would be refused
    run(vals_ok, meta)
    for byte, what in ((0x00, r"meta: group 0 of row 5 has positions \(0, 0\)"),
                       (0x0F, r"meta: group 0 of row 5 has positions \(3, 3\)"),
                       (0x01, r"meta: group 0 of row 5 has positions \(1, 0\)")):
        bad = meta.clone()
        bad[5, 0] = (bad[5, 0] & 0xF0) | byte
        with pytest.raises(ValueError, match=what):
            run(vals_ok, bad)
        with pytest.raises(ValueError, match=what):
            pack(vals_ok, bad)
    # a non-zero value at a padding position of the last group: positions (2, 3) there
    pad = meta.clone()
    pad[:, g // 2] = (last & 0x0F) | (0xE << 4) if g % 2 else (last & 0xF0) | 0xE
    vals_pad = vals_ok.clone()
    vals_pad[7, 2 * g] = 1
    with pytest.raises(ValueError, match=r"values: row 7 holds a non-zero weight past in_features = 38"):
        run(vals_pad, pad)
    with pytest.raises(ValueError, match=r"values: row 7"):
        pack(vals_pad, pad)


def test_packed_buffers_of_older_layouts_are_rejected(gen):
    """A packed buffer of a previous layout (fp32: 2, values before positions;
    int8: 3, positions after the values) is refused by name, never misread."""
    w = _sparse_weight(24, 40, gen)
    vals, meta = _canon(w)
    x = torch.randn(3, 40, generator=gen)
    p = s24.pack_sparse24(s24.Sparse24Weight(vals, meta, 40))
    p[4:8] = torch.tensor([2], dtype=torch.int32).view(torch.uint8)  # header: magic u32, layout i32
    with pytest.raises(ValueError, match=r"packed_weight: .*layout this build does not know"):
        torch.ops.pyaccel.sparse24_linear(x, vals, meta, 40, None, p)
    _, v8, m8, scale = _int8_24(24, 40, gen)
    p8 = s24.pack_sparse24_int8(v8, m8, 40)
    p8[4:8] = torch.tensor([3], dtype=torch.int32).view(torch.uint8)
    with pytest.raises(ValueError, match=r"packed_weight: .*layout this build does not know"):
        torch.ops.pyaccel.sparse24_int8_linear(x, v8, m8, 40, scale, None, p8)


def test_packed_layouts_are_the_documented_ones(gen):
    """The byte order the kernels and sparse24.h / sparse24_int8.h document:
    fp32 blocks = pos[4][16] then v0[16], v1[16] per group; int8 quads =
    pos[32] u32 then vals[4 pairs][32][4]."""
    w = _sparse_weight(16, 16, gen, zero_groups=False)
    vals, meta = _canon(w)
    pb = s24.position_bytes(s24.Sparse24Weight(vals, meta, 16))
    p = s24.pack_sparse24(s24.Sparse24Weight(vals, meta, 16))
    blk = p[int(p[40:48].view(torch.int64)):][:576]  # header: data_offset at byte 40
    for j in range(4):
        i0, i1 = pb[:, j] & 3, pb[:, j] >> 2
        assert torch.equal(blk[16 * j:16 * j + 16], i0 | i1 << 2 | i1 << 4 | i0 << 6)
        v = blk[64 + 128 * j:64 + 128 * (j + 1)].view(torch.float32)
        assert torch.equal(v[:16], vals[:, 2 * j]) and torch.equal(v[16:], vals[:, 2 * j + 1])

    _, v8, m8, _ = _int8_24(32, 32, gen)
    pb8 = s24.position_bytes(s24.Sparse24Weight(v8, m8, 32))
    p8 = s24.pack_sparse24_int8(v8, m8, 32)
    quad = p8[int(p8[48:56].view(torch.int64)):][:640]  # header: data_offset at byte 48
    pos = quad[:128].view(32, 4)
    for j in range(4):
        g = 2 * j
        assert torch.equal(pos[:, j], pb8[:, g] | pb8[:, g + 1] << 4)
        v = quad[128 + 128 * j:128 + 128 * (j + 1)].view(torch.int8).view(32, 4)
        assert torch.equal(v, v8[:, 2 * g:2 * g + 4])


# ---- 2:4 + int8 ---------------------------------------------------------------------
def _int8_24(n, k, gen):
    from pyaccel.formats.int8 import quantize_weight_per_channel

    q = quantize_weight_per_channel(_sparse_weight(n, k, gen))
    sw = s24.compress(q.values.float())
    return q.values, sw.values.to(torch.int8), sw.meta, q.scale


@pytest.mark.parametrize("m", [1, 8, 40])
def test_int8_minus_128_is_refused(isa, gen, m):
    """The AVX2 kernels negate weights, so the 2:4 int8 packing refuses -128
    (it gave wrong sums at every row count there); the op names `values` when
    it packs per call."""
    dense, vals, meta, scale = _int8_24(16, 64, gen)
    vals = vals.clone()
    vals[3, 9] = -128
    x = torch.randn(m, 64, generator=gen)
    with pytest.raises(ValueError, match=r"values: expected int8 values in \[-127, 127\], found -128 at index \(3, 9\)"):
        torch.ops.pyaccel.sparse24_int8_linear(x, vals, meta, 64, scale, None, None)
    with pytest.raises(ValueError, match=r"values: expected int8 values in \[-127, 127\]"):
        s24.pack_sparse24_int8(vals, meta, 64)


# rows around the one-row path, the k-blocked row path (2 - 4 rows at avx2, 2 - 6
# at avx_vnni: passes of 2 rows and one of 1 at odd counts), the 4- and 6-row
# tiles and the AVX-VNNI 12 x 8 tile (from 12 rows; one call of 13 rows runs 7 + 6,
# of 25 9 + 8 + 8, of 35 12 + 12 + 11; with 2 threads rows go in chunks of 12 and
# the rest, 25 -> 12 + 12 + 1)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 25, 35, 40])
@pytest.mark.parametrize("n,k", NK_GRID)
def test_int8_kernel_exact(isa, gen, m, n, k):
    """Integer accumulators exact: outputs equal the dense int8 reference to an ulp."""
    dense, vals, meta, scale = _int8_24(n, k, gen)
    b = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    y = torch.ops.pyaccel.sparse24_int8_linear(x, vals, meta, k, scale, b, s24.pack_sparse24_int8(vals, meta, k))
    ref = reference.int8_linear(x, dense, scale, b)
    tol = torch.finfo(torch.float32).eps * ref.abs()
    assert ((y - ref).abs() <= tol).all()


def test_int8_tiny_activation_rows(isa, gen):
    """Rows whose 127 / max|x| overflows fp32 (and subnormal rows): the 2:4 int8
    path quantizes them like the reference."""
    n, k = 70, 128
    dense, vals, meta, scale = _int8_24(n, k, gen)
    amaxes = [1.0, 2e-37, 1e-38, 1e-40, 1e-30, 3.0]
    x = torch.randn(len(amaxes), k, generator=gen, dtype=torch.float64)
    x = (x / x.abs().amax(dim=1, keepdim=True) * torch.tensor(amaxes, dtype=torch.float64)[:, None]).float()
    y = torch.ops.pyaccel.sparse24_int8_linear(x, vals, meta, k, scale, None, s24.pack_sparse24_int8(vals, meta, k))
    assert torch.equal(y, reference.int8_linear(x, dense, scale, None))


def test_int8_bf16_batched_opcheck_errors(isa, gen):
    dense, vals, meta, scale = _int8_24(24, 40, gen)
    p = s24.pack_sparse24_int8(vals, meta, 40)
    x = torch.randn(2, 3, 40, generator=gen).to(torch.bfloat16)
    y = torch.ops.pyaccel.sparse24_int8_linear(x, vals, meta, 40, scale, None, p)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 24)
    assert torch.equal(y, reference.int8_linear(x, dense, scale, None))
    for packed in (p, None):  # None: packed (and validated) at run time, shapes only when faked
        torch.library.opcheck(torch.ops.pyaccel.sparse24_int8_linear.default,
                              (x.float(), vals, meta, 40, scale, None, packed))
    with pytest.raises(TypeError, match="values: expected a torch.int8 tensor"):
        torch.ops.pyaccel.sparse24_int8_linear(x, vals.float(), meta, 40, scale, None, p)
    with pytest.raises(ValueError, match=r"w_scale: expected float32 of shape \(24,\)"):
        torch.ops.pyaccel.sparse24_int8_linear(x, vals, meta, 40, scale[:3], None, p)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 20), n=st.integers(1, 100), k=st.integers(1, 300), pad=st.integers(0, 9),
       bf16=st.booleans(), isa_name=st.sampled_from(_native.ISA_LADDER), seed=st.integers(0, 2**31 - 1))
def test_int8_property_random_shapes_strides_dtypes(m, n, k, pad, bf16, isa_name, seed):
    """2:4 int8 kernels on random shapes (panel/quad edges included), row strides
    and activation dtypes, on a random ISA path: equal to the dense int8 reference."""
    if not _native.isa_supported(isa_name):
        isa_name = "portable"
    g = torch.Generator().manual_seed(seed)
    dense, vals, meta, scale = _int8_24(n, k, g)
    x = torch.randn(m, k + pad, generator=g)[:, :k]  # row stride k + pad
    if bf16:
        x = x.to(torch.bfloat16)
    with _native.isa_cap(isa_name):
        y = torch.ops.pyaccel.sparse24_int8_linear(x, vals, meta, k, scale, None, s24.pack_sparse24_int8(vals, meta, k))
    ref = reference.int8_linear(x, dense, scale, None)
    assert y.dtype == x.dtype and y.shape == (m, n)
    tol = torch.finfo(y.dtype).eps * ref.float().abs()
    assert ((y.float() - ref.float()).abs() <= tol).all()


def test_row_path_copies_x_in_passes(gen):
    """The row-tile path copies bf16 / odd-K x into fp32 scratch <= ~8 MiB at a
    time; a batch past that (portable ISA: the row path at any M) runs in
    passes with results identical to sliced calls."""
    n, k, m = 24, 1001, 2300  # kp 1008: <= 2080 rows per pass
    w = _sparse_weight(n, k, gen)
    vals, meta = _canon(w)
    p = s24.pack_sparse24(s24.Sparse24Weight(vals, meta, k))
    x = torch.randn(m, k, generator=gen)
    with _native.isa_cap("portable"):
        for xx in (x, x.to(torch.bfloat16)):
            y = torch.ops.pyaccel.sparse24_linear(xx, vals, meta, k, None, p)
            parts = [torch.ops.pyaccel.sparse24_linear(xx[i:i + 500], vals, meta, k, None, p) for i in range(0, m, 500)]
            assert torch.equal(y, torch.cat(parts))
        assert_close_k(torch.ops.pyaccel.sparse24_linear(x, vals, meta, k, None, p), x, w)
