"""Block-sparse (BSR) format and pyaccel::block_sparse_linear: native CPU
kernels on every ISA against the reference.

Tile facts the grid is built from (csrc/block_sparse/README.md, and
_C.kernel_params()["block_sparse"]): block rows are padded to 16 channels and
computed in chunks of 64/48/32/16 channels (AVX-512 tiles of 6/8/8/12 rows;
AVX2 6 x 16; portable 1 x 16); the last block column may be cut by k; rows
of x go in L2-sized chunks (12+ rows at K = 4096); threads split block rows
by kept blocks, or the rows of x when there are fewer than 2 block rows a
thread. fp32 sums differ from the reference only in order: the tolerance is
4 eps sum_k |x w|.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyaccel import _native, reference
from pyaccel.formats import block_sparse as bsf

needs_native = pytest.mark.skipif(not _native.available(), reason="native library not loaded")


def _weight(n, k, block, sparsity, gen):
    w = torch.randn(n, k, generator=gen)
    return w * bsf.block_mask(w, block, sparsity)


def _run(x, bsw, bias=None):
    return torch.ops.pyaccel.block_sparse_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, bsw.shape[0],
                                                 bsw.shape[1], bias, bsf.pack_block_sparse(bsw))


def assert_close(y, x, w, bias=None, what=""):
    ref = x.float() @ w.float().t() + (0 if bias is None else bias)
    scale = x.float().abs() @ w.float().abs().t() + (0 if bias is None else bias.abs())
    tol = 4 * torch.finfo(torch.float32).eps * scale + torch.finfo(y.dtype).eps * ref.abs() + 1e-30
    bad = (y.float() - ref).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} off, first at {bad.nonzero()[0].tolist()}"


# ---- format ------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [(1, 4), (16, 16), (32, 8), (5, 7)])
def test_round_trips(gen, block):
    w = _weight(45, 70, block, 0.6, gen)
    bsw = bsf.compress(w, block)
    assert bsf.canonical_error(bsw) is None
    assert torch.equal(bsf.decompress(bsw), w)
    t = bsf.to_torch_bsr(bsw)
    assert t.layout == torch.sparse_bsr and tuple(t.shape) == bsw.padded_shape
    assert torch.equal(bsf.decompress(bsf.from_torch_bsr(t, (45, 70))), w)
    assert torch.equal(t.to_dense()[:45, :70], w)


def test_torch_bsr_made_by_torch(gen):
    w = _weight(64, 96, (32, 32), 0.5, gen)
    bsw = bsf.from_torch_bsr(w.to_sparse_bsr((32, 32)))
    assert bsw.block == (32, 32) and torch.equal(bsf.decompress(bsw), w)


def test_block_mask_counts_and_ties(gen):
    w = torch.randn(64, 64, generator=gen)
    m = bsf.block_mask(w, (16, 16), 0.75)
    assert bsf.zero_block_fraction(w * m, (16, 16)) == 0.75
    assert bsf.block_mask(w, (16, 16), 0.0).all() and not bsf.block_mask(w, (16, 16), 1.0).any()
    eq = torch.ones(32, 32)  # equal norms: the first blocks in row-major order go first
    assert bsf.block_mask(eq, (16, 16), 0.5).int()[::16, ::16].tolist() == [[0, 0], [1, 1]]
    with pytest.raises(ValueError, match="sparsity"):
        bsf.block_mask(w, (16, 16), 1.5)
    with pytest.raises(ValueError, match="block"):
        bsf.block_mask(w, (0, 16), 0.5)


def test_canonical_errors_name_the_index(gen):
    bsw = bsf.compress(_weight(64, 64, (16, 16), 0.5, gen), (16, 16))

    def with_(**kw):
        d = dict(values=bsw.values, crow_indices=bsw.crow_indices, col_indices=bsw.col_indices, shape=bsw.shape)
        d.update(kw)
        return bsf.canonical_error(bsf.BlockSparseWeight(**d))

    col = bsw.col_indices.clone()
    col[0] = 4
    assert "out of range" in with_(col_indices=col)
    row0 = int(bsw.crow_indices[1])
    assert row0 >= 2
    col = bsw.col_indices.clone()
    col[1] = col[0]
    assert "duplicate" in with_(col_indices=col)
    col = bsw.col_indices.clone()
    col[0], col[1] = bsw.col_indices[1], bsw.col_indices[0]
    assert "unsorted" in with_(col_indices=col)
    crow = bsw.crow_indices.clone()
    crow[0] = 1
    assert "start at 0" in with_(crow_indices=crow)
    crow = bsw.crow_indices.clone()
    crow[2] = crow[1] - 1
    assert "decrease" in with_(crow_indices=crow)
    assert "int32" in with_(col_indices=bsw.col_indices.long())
    assert "3-D" in with_(values=bsw.values[0])


# ---- kernels -----------------------------------------------------------------------------
BLOCKS = [(1, 4), (4, 1), (16, 16), (17, 3), (32, 32), (48, 16), (64, 64), (80, 8)]


@needs_native
@pytest.mark.parametrize("block", BLOCKS)
def test_kernels_match_reference(isa, gen, block):
    bh, bw = block
    mr = _native.lib().kernel_params()["block_sparse"]["mr"]
    for n, k in [(bh * 3 + 1, bw * 5 + 2), (2 * bh, 4 * bw), (33, 50)]:
        w = _weight(n, k, block, 0.6, gen)
        w[:, : bw] = 0  # an empty block column
        bsw = bsf.compress(w, block)
        bias = torch.randn(n, generator=gen)
        for m in sorted({1, 2, mr - 1, mr, mr + 1, 13, 40}):
            x = torch.randn(m, k, generator=gen)
            assert_close(_run(x, bsw, bias), x, w, bias, f"{block} n={n} k={k} m={m}")


@needs_native
def test_all_zero_dense_and_empty_rows(isa, gen):
    n, k = 70, 90
    bias = torch.randn(n, generator=gen)
    x = torch.randn(9, k, generator=gen)
    zero = bsf.compress(torch.zeros(n, k), (16, 16))
    assert zero.nnzb == 0
    assert torch.equal(_run(x, zero, bias), bias.expand(9, n))
    dense = torch.randn(n, k, generator=gen)
    assert_close(_run(x, bsf.compress(dense, (16, 16)), bias), x, dense, bias, "dense")
    w = _weight(n, k, (16, 16), 0.3, gen)
    w[16:48] = 0
    assert_close(_run(x, bsf.compress(w, (16, 16)), bias), x, w, bias, "empty block rows")
    assert_close(_run(x[:0], bsf.compress(w, (16, 16)), bias), x[:0], w, bias, "no rows")


@needs_native
def test_strided_bf16_and_nd_inputs(isa, gen):
    w = _weight(40, 64, (16, 16), 0.5, gen)
    bsw = bsf.compress(w, (16, 16))
    base = torch.randn(7, 130, generator=gen)
    for what, x in [("row stride", base[:, :64]), ("column stride", base[:, ::2][:, :64]),
                    ("3-D", torch.randn(2, 3, 64, generator=gen))]:
        assert_close(_run(x, bsw).reshape(-1, 40), x.reshape(-1, 64), w, None, what)
    xb = base[:, :64].to(torch.bfloat16)
    y = _run(xb, bsw)
    assert y.dtype == torch.bfloat16
    assert_close(y, xb, w, None, "bf16")


@needs_native
def test_row_chunks_and_thread_splits(isa, gen):
    """K = 4096 makes the L2 row chunk 12 rows; n = 16 gives one block row, where
    the threads split the rows of x instead."""
    for n, k, m in [(64, 4096, 30), (16, 256, 50), (300, 128, 3)]:
        w = _weight(n, k, (16, 16), 0.7, gen)
        bsw = bsf.compress(w, (16, 16))
        x = torch.randn(m, k, generator=gen)
        y2 = _run(x, bsw)
        torch.set_num_threads(1)
        try:
            y1 = _run(x, bsw)
        finally:
            torch.set_num_threads(2)
        assert torch.equal(y1, y2)
        assert_close(y2, x, w, None, f"n={n} k={k} m={m}")


@needs_native
@pytest.mark.parametrize("block", [(1, 4), (2, 8), (8, 4), (3, 5)])
def test_small_block_slab_kernel(isa, gen, block):
    """Blocks of <= 8 rows from 2 rows of x: x transposed into slabs (AVX-512
    16 rows, 8 up to m = 8, 16 x 16 register transposes; AVX2 8 rows for the
    band lists, 8 x 8 transposes; masked past m and k). Block widths that are
    multiples of 4 take the band lists on AVX-512 and AVX2 (bands of
    256 // bh * bh channels; lines past k zero: k = 1101 cuts the last
    group), else the slab kernel (8 / 4 / 2 / 1 slabs a pass, K in chunks of
    256 KiB of slab lines: 512 inputs at 8 slabs, so k = 1101 makes three);
    results staged and transposed back into y. n = 70: one band, runs of 16
    channels and a cut one; n = 600: three bands; n = 1100 with 2 threads:
    the threads take bands, at m = 130 (band, chunk of slabs) items, the last
    chunk cut. m = 1: the row kernels (AVX2: two 4-input blocks
    an FMA, the block cut by k in the scalar tail)."""
    k = 1101
    for n, ms in ((70, (1, 2, 7, 8, 9, 15, 16, 17, 40, 130)), (600, (1, 3, 33, 70)), (1100, (8, 64, 130))):
        w = _weight(n, k, block, 0.7, gen)
        bsw = bsf.compress(w, block)
        bias = torch.randn(n, generator=gen)
        for m in ms:
            x = torch.randn(m, k, generator=gen)
            assert_close(_run(x, bsw, bias), x, w, bias, f"{block} n={n} m={m}")
    wide = torch.randn(33, k + 7, generator=gen)
    assert_close(_run(wide[:, 3:k + 3], bsw, bias), wide[:, 3:k + 3], w, bias, f"{block} strided")
    xb = torch.randn(21, k, generator=gen).to(torch.bfloat16)
    y = _run(xb, bsw, bias)
    assert y.dtype == torch.bfloat16
    assert_close(y, xb, w, bias, f"{block} bf16")


@needs_native
@pytest.mark.parametrize("block", [(32, 32), (16, 16), (64, 8), (17, 8), (9, 3)])
def test_big_blocks_on_every_level(gen, block):
    """Blocks of > 8 rows (layout 1, the MR x 16V tiles) on every level the
    CPU runs: M = 1 … 130 covers the 6-row AVX2 tile and its 1 – 5 row
    remainders, the AVX-512 MR = 6 / 8 / 12 tiles and row chunks; n = 600 cuts
    the last block row, k = 1101 the last block column; bias added in the
    epilogue."""
    n, k = 600, 1101
    w = _weight(n, k, block, 0.7, gen)
    bsw = bsf.compress(w, block)
    bias = torch.randn(n, generator=gen)
    packed = bsf.pack_block_sparse(bsw)
    levels = [lv for lv in ("avx512", "avx2", "portable") if _native.isa_supported(lv)]
    for m in (1, 2, 5, 6, 7, 9, 40, 130):
        x = torch.randn(m, k, generator=gen)
        for lv in levels:
            with _native.isa_cap(lv):
                y = torch.ops.pyaccel.block_sparse_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, n, k,
                                                          bias, packed)
                assert_close(y, x, w, bias, f"{block} m={m} {lv}")


@given(m=st.integers(0, 30), n=st.integers(1, 90), k=st.integers(1, 90), bh=st.sampled_from([1, 2, 8, 16, 32]),
       bw=st.sampled_from([1, 4, 5, 16]), sparsity=st.floats(0, 1), seed=st.integers(0, 2 ** 31 - 1))
@settings(max_examples=40, deadline=None)
def test_property_random_blocks(m, n, k, bh, bw, sparsity, seed):
    gen = torch.Generator().manual_seed(seed)
    w = _weight(n, k, (bh, bw), sparsity, gen)
    bsw = bsf.compress(w, (bh, bw))
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    y = _run(x, bsw, bias)
    assert_close(y, x, w, bias, "property")
    r = reference.block_sparse_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, n, k, bias)
    assert_close(r, x, w, bias, "reference")


def test_op_checks_name_the_argument(gen):
    bsw = bsf.compress(_weight(32, 32, (16, 16), 0.5, gen), (16, 16))
    x = torch.randn(2, 32)
    op = torch.ops.pyaccel.block_sparse_linear
    with pytest.raises(ValueError, match="x: expected last dimension"):
        op(torch.randn(2, 31), bsw.values, bsw.crow_indices, bsw.col_indices, 32, 32, None, None)
    with pytest.raises(ValueError, match="crow_indices"):
        op(x, bsw.values, bsw.crow_indices[:-1], bsw.col_indices, 32, 32, None, None)
    with pytest.raises(ValueError, match="col_indices"):
        op(x, bsw.values, bsw.crow_indices, bsw.col_indices.long(), 32, 32, None, None)
    with pytest.raises(TypeError, match="values"):
        op(x, bsw.values.double(), bsw.crow_indices, bsw.col_indices, 32, 32, None, None)
    with pytest.raises(ValueError, match="bias"):
        op(x, bsw.values, bsw.crow_indices, bsw.col_indices, 32, 32, torch.zeros(3), None)


@needs_native
def test_op_raises_for_a_packing_of_another_weight(isa, gen):
    """The op's check read only [n, k] from the packing's header: a packing of
    other blocks (here of the same byte length) ran, silently wrong. Every
    call now compares shape, block shape and kept blocks (and the block
    pattern: test_op_raises_for_a_packing_of_another_block_pattern)."""
    n = k = 64
    bsw = bsf.compress(_weight(n, k, (16, 16), 0.0, gen), (16, 16))
    other = bsf.compress(_weight(n, k, (32, 8), 0.0, gen), (32, 8))
    packed, other_packed = bsf.pack_block_sparse(bsw), bsf.pack_block_sparse(other)
    assert packed.numel() == other_packed.numel() and bsw.values.shape[0] == other.values.shape[0]
    x = torch.randn(3, k, generator=gen)

    def op(p, values=bsw.values, crow=bsw.crow_indices, col=bsw.col_indices, shape=(n, k)):
        return torch.ops.pyaccel.block_sparse_linear(x[:, :shape[1]], values, crow, col, *shape, None, p)

    with pytest.raises(ValueError, match=r"packed: expected 16 x 16 blocks, the buffer holds 32 x 8"):
        op(other_packed)
    sparser = bsf.compress(_weight(n, k, (16, 16), 0.5, gen), (16, 16))
    with pytest.raises(ValueError, match=r"packed: expected 16 kept blocks, the buffer holds \d+"):
        op(bsf.pack_block_sparse(sparser))
    wider = bsf.compress(_weight(n, 96, (16, 16), 0.0, gen), (16, 16))
    with pytest.raises(ValueError, match=r"packed: expected a \[64, 64\] weight, the buffer holds \[64, 96\]"):
        op(bsf.pack_block_sparse(wider))
    q, _ = bsf.quantize_blocks(bsw)
    with pytest.raises(ValueError, match=r"packed: expected a BSR fp32 packing \(pack_block_sparse\), the buffer "
                                         r"holds a BSR int8 packing"):
        op(bsf.pack_block_sparse_int8(q))
    with pytest.raises(ValueError, match=r"packed: expected \d+ bytes for this packing, the buffer has \d+: truncated"):
        op(packed[:-64].clone())
    with pytest.raises(ValueError, match=r"packed: expected a BSR fp32 packing .*64-byte header.*the buffer has 10 "
                                         r"bytes"):
        op(packed[:10].clone())
    with pytest.raises(ValueError, match="packed: expected a contiguous CPU tensor"):
        op(torch.stack([packed, packed], 1).reshape(-1)[::2])
    assert_close(op(packed), x, bsf.decompress(bsw), None, f"{isa}: its own packing")


@needs_native
@pytest.mark.parametrize("block", [(1, 4), (2, 8), (3, 4), (16, 16)])
def test_op_survives_a_corrupted_packing(isa, gen, block):
    """A packing whose header is intact but whose body was overwritten (band
    lists, block pattern, values) segfaulted the band-list kernels (fp32, small
    blocks: the lists' entry offsets and channel rows were trusted). Every
    region of the buffer, overwritten with 0xFF or random bytes, now gives a
    ValueError naming `packed` or an output of the right shape, never a crash."""
    n, k = 72, 264
    w = _weight(n, k, block, 0.5, gen)
    bsw = bsf.compress(w, block)
    good = bsf.pack_block_sparse(bsw)
    args = (bsw.values, bsw.crow_indices, bsw.col_indices, n, k, None)
    cut = 16
    edges = torch.linspace(64, good.numel(), cut + 1).long().tolist()
    for m in (1, 5, 24):
        x = torch.randn(m, k, generator=gen)
        for fill in ("ff", "random"):
            for a, b in zip(edges, edges[1:]):
                bad = good.clone()
                bad[a:b] = 0xFF if fill == "ff" else torch.randint(0, 256, (b - a,), generator=gen, dtype=torch.uint8)
                try:
                    y = torch.ops.pyaccel.block_sparse_linear(x, *args, bad)
                except ValueError as exc:
                    assert str(exc).startswith("packed: "), str(exc)
                else:
                    assert y.shape == (m, n)
    assert_close(torch.ops.pyaccel.block_sparse_linear(x, *args, good), x, bsf.decompress(bsw), None, isa)


def _pattern_weight(rows, gen, block=(16, 16)):
    """A [64, 64] weight keeping, in block row r, the block columns rows[r]."""
    w = torch.zeros(64, 64)
    bh, bw = block
    for r, cols in enumerate(rows):
        for c in cols:
            w[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] = torch.randn(bh, bw, generator=gen)
    return w


# Two patterns of 8 kept 16 x 16 blocks each: A and B differ from block row 2
# on by columns only (same row pointers), A and C by the row pointers.
_PATTERN_A = ([0, 1], [1, 2], [0, 3], [2, 3])
_PATTERN_B = ([0, 1], [1, 2], [1, 3], [0, 2])
_PATTERN_C = ([0, 1], [1, 2, 3], [0], [2, 3])


@needs_native
@pytest.mark.parametrize("other, row", [(_PATTERN_B, 2), (_PATTERN_C, 1)])
def test_op_raises_for_a_packing_of_another_block_pattern(isa, gen, other, row):
    """Same shape, block shape and kept-block count but other kept blocks: the
    header check passed and the op computed with the packing's pattern,
    silently wrong. Every call now compares the row pointers and columns."""
    bsw = bsf.compress(_pattern_weight(_PATTERN_A, gen), (16, 16))
    ob = bsf.compress(_pattern_weight(other, gen), (16, 16))
    assert bsw.values.shape == ob.values.shape == (8, 16, 16)
    x = torch.randn(3, 64, generator=gen)
    args = (x, bsw.values, bsw.crow_indices, bsw.col_indices, 64, 64)
    with pytest.raises(ValueError, match=rf"packed: expected the block pattern of crow_indices / col_indices, the "
                                         rf"buffer holds another \(first difference in block row {row}\)"):
        torch.ops.pyaccel.block_sparse_linear(*args, None, bsf.pack_block_sparse(ob))
    q, scale = bsf.quantize_blocks(bsw)
    qo, _ = bsf.quantize_blocks(ob)
    with pytest.raises(ValueError, match=rf"packed: expected the block pattern .*block row {row}\)"):
        torch.ops.pyaccel.block_sparse_int8_linear(x, q.values, q.crow_indices, q.col_indices, 64, 64, scale, None,
                                                   bsf.pack_block_sparse_int8(qo))
    # a strided view of the same indices is the same pattern
    crow2 = torch.stack([bsw.crow_indices, bsw.crow_indices], 1)[:, 0]
    assert not crow2.is_contiguous()
    assert_close(torch.ops.pyaccel.block_sparse_linear(x, bsw.values, crow2, bsw.col_indices, 64, 64, None,
                                                       bsf.pack_block_sparse(bsw)),
                 x, bsf.decompress(bsw), None, f"{isa}: its own packing, strided crow_indices")


# ---- int8 values -------------------------------------------------------------------------
def _run_int8(x, bsw, scale, bias=None):
    return torch.ops.pyaccel.block_sparse_int8_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices,
                                                      bsw.shape[0], bsw.shape[1], scale, bias,
                                                      bsf.pack_block_sparse_int8(bsw))


def assert_epilogue_close(y, ref, what=""):
    """Integer sums are exact; the fp32 epilogue is the same expression: one rounding."""
    tol = 2 * torch.finfo(y.dtype).eps * ref.abs().float() + 1e-30
    bad = (y.float() - ref.float()).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} off, first at {bad.nonzero()[0].tolist()}"


@needs_native
@pytest.mark.parametrize("block", [(1, 4), (2, 4), (8, 4), (4, 6), (16, 16), (17, 3), (32, 32), (64, 8)])
def test_int8_kernels_match_reference(isa, gen, block):
    bh, bw = block
    mr = _native.lib().kernel_params()["block_sparse_int8"]["mr"]
    for n, k in [(bh * 3 + 1, bw * 5 + 2), (2 * bh, 4 * bw), (33, 50)]:
        w = _weight(n, k, block, 0.6, gen)
        bsw, scale = bsf.quantize_blocks(bsf.compress(w, block))
        if bsw.nnzb:
            bsw.values[0].fill_(127)  # extremes: every lane's largest product
            bsw.values[-1].fill_(-127)
        bias = torch.randn(n, generator=gen)
        for m in sorted({1, 2, mr - 1, mr, mr + 1, 13, 40}):
            x = torch.randn(m, k, generator=gen) * 10
            ref = reference.block_sparse_int8_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, n, k,
                                                     scale, bias)
            assert_epilogue_close(_run_int8(x, bsw, scale, bias), ref, f"{block} n={n} k={k} m={m}")


@needs_native
@pytest.mark.parametrize("block", [(12, 8), (20, 4), (16, 16), (17, 3), (1, 4)])
def test_int8_same_bits_on_every_level(gen, block):
    """One int8 checkpoint gives the same bits at every ISA level: exact
    integer sums and the same epilogue arithmetic (block rows of 12 / 20
    channels end in a full 8 plus a partial group; bias or none; fp32 and
    bf16 activations and outputs)."""
    bh, bw = block
    n, k = 5 * bh + 3, 7 * bw + 1
    bsw, scale = bsf.quantize_blocks(bsf.compress(_weight(n, k, block, 0.5, gen), block))
    levels = [lv for lv in _native.ISA_LADDER if _native.isa_supported(lv)]
    for bias in (None, torch.randn(n, generator=gen)):
        for dtype in (torch.float32, torch.bfloat16):
            for m in (1, 2, 5, 13, 40):
                x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
                outs = {}
                for lv in levels:
                    with _native.isa_cap(lv):
                        outs[lv] = _run_int8(x, bsw, scale, bias)
                for lv, y in outs.items():
                    assert torch.equal(y, outs[levels[0]]), (block, lv, levels[0], m, dtype, bias is None)


@needs_native
@pytest.mark.parametrize("block", [(1, 4), (2, 4), (4, 4), (2, 8), (8, 4), (3, 6)])
def test_int8_small_block_slab_kernel(isa, gen, block):
    """int8 blocks of <= 8 rows with bw % 4 == 0 keep compact values: from 2
    rows of x the slab kernel (activations regrouped into slabs: AVX-512 VNNI
    16 rows, 8 up to m = 8, 4 / 2 / 1 slabs a pass; AVX2 8 rows, 2 / 1 a pass;
    runs of 16 block rows staged and flushed; k = 1101 cuts the last group),
    one row the row kernel (VNNI, AVX2; portable: the padded blocks; on
    AVX-512 VNNI blocks of 2, 4 and 8 rows x 4 pick their weight words out of
    BH loads by vpermt2d, 16 blocks a step: whole and partial steps here).
    n = 1100 with 2 threads at m = 8 / 12: one slab, which every thread
    quantizes and regroups for itself.
    Every row of a batch equals that row alone: the int32 sums are exact, the
    epilogue the same. Extremes: blocks of +-127 and activations at the
    quantizer's ends."""
    k = 1101
    for n, ms in ((70, (2, 7, 8, 9, 17, 40, 130)), (600, (5, 33)), (1100, (8, 12, 64))):
        w = _weight(n, k, block, 0.7, gen)
        bsw, scale = bsf.quantize_blocks(bsf.compress(w, block))
        bsw.values[0].fill_(127)
        bsw.values[-1].fill_(-127)
        bias = torch.randn(n, generator=gen)
        for m in ms:
            x = torch.randn(m, k, generator=gen) * 10
            x[0, :8] = torch.tensor([1e3, -1e3, 5, -5, 0, 1e3, -1e3, 1])
            y = _run_int8(x, bsw, scale, bias)
            ref = reference.block_sparse_int8_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, n, k,
                                                     scale, bias)
            assert_epilogue_close(y, ref, f"{block} n={n} m={m}")
            rows = torch.cat([_run_int8(x[i:i + 1], bsw, scale, bias) for i in range(min(m, 9))])
            assert torch.equal(y[:rows.shape[0]], rows), f"{block} n={n} m={m}: batch != rows alone"
    xb = torch.randn(21, k, generator=gen).to(torch.bfloat16)
    yb = _run_int8(xb, bsw, scale, bias)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb[:3], torch.cat([_run_int8(xb[i:i + 1], bsw, scale, bias) for i in range(3)]))


@needs_native
@pytest.mark.parametrize("block", [(1, 4), (2, 4), (4, 4), (8, 4)])
def test_int8_row_kernel_block_counts_at_step_edges(isa, gen, block):
    """The one-row kernels take a block row's blocks 16 (AVX-512) or 8 (AVX2)
    at a time: block rows of exactly 0, 1, 7, 8, 9, 15, 16, 17 and 33 blocks,
    the last block row cut by n, against the reference at M = 1."""
    bh, bw = block
    counts = [0, 1, 7, 8, 9, 15, 16, 17, 33]
    kb = max(counts) + 2
    n, k = bh * len(counts) - (bh > 1), bw * kb
    mask = torch.zeros(len(counts), kb)
    for r, c in enumerate(counts):
        mask[r, torch.randperm(kb, generator=gen)[:c]] = 1
    w = torch.randn(n, k, generator=gen) * mask.repeat_interleave(bh, 0)[:n].repeat_interleave(bw, 1)
    bsw, scale = bsf.quantize_blocks(bsf.compress(w, block))
    assert [int(v) for v in bsw.crow_indices.diff()] == counts
    bias = torch.randn(n, generator=gen)
    x = torch.randn(1, k, generator=gen) * 10
    ref = reference.block_sparse_int8_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, n, k, scale, bias)
    assert_epilogue_close(_run_int8(x, bsw, scale, bias), ref, f"{block}")


@needs_native
def test_int8_padding_entries_never_count(isa, gen):
    """Canonical padding past k and n may hold anything (a foreign checkpoint): never read."""
    n, k = 30, 37
    w = _weight(n, k, (16, 16), 0.4, gen)
    bsw, scale = bsf.quantize_blocks(bsf.compress(w, (16, 16)))
    clean = bsw.values.clone()
    dirty = bsw.values.clone()
    for b in range(bsw.nnzb):
        dirty[b][:, (k % 16):] = 99 if int(bsw.col_indices[b]) == k // 16 else dirty[b][:, (k % 16):]
        if b >= int(bsw.crow_indices[-2]):
            dirty[b][n % 16:] = -99
    x = torch.randn(5, k, generator=gen)
    y_clean = _run_int8(x, bsf.BlockSparseWeight(clean, bsw.crow_indices, bsw.col_indices, (n, k)), scale)
    y_dirty = _run_int8(x, bsf.BlockSparseWeight(dirty, bsw.crow_indices, bsw.col_indices, (n, k)), scale)
    assert torch.equal(y_clean, y_dirty)


@needs_native
def test_int8_pack_refuses_minus_128(gen):
    """-128 has no int8 negation (the AVX2 sign trick would compute it wrong):
    the packer refuses it inside the weight, naming the block; padding past k
    may hold anything."""
    w = _weight(32, 63, (1, 4), 0.5, gen)
    w[0, 60:] = 1.0  # block row 0 keeps block column 15 (inputs 60 .. 63; 63 is past k)
    bsw, _ = bsf.quantize_blocks(bsf.compress(w, (1, 4)))
    bsw.values[1, 0, 2] = -128
    with pytest.raises(ValueError, match=r"values: int8 weights must be in \[-127, 127\].*block 1 .*-128"):
        bsf.pack_block_sparse_int8(bsw)
    bsw.values[1, 0, 2] = -127
    last = int(bsw.crow_indices[1]) - 1  # block row 0's last block: column 15
    assert int(bsw.col_indices[last]) == 15
    bsw.values[last, 0, 3] = -128
    assert bsf.pack_block_sparse_int8(bsw) is not None


@needs_native
def test_int8_op_raises_for_a_packing_of_another_weight(isa, gen):
    n = k = 64
    bsw, scale = bsf.quantize_blocks(bsf.compress(_weight(n, k, (16, 16), 0.0, gen), (16, 16)))
    other, _ = bsf.quantize_blocks(bsf.compress(_weight(n, k, (32, 8), 0.0, gen), (32, 8)))
    x = torch.randn(3, k, generator=gen)

    def op(p):
        return torch.ops.pyaccel.block_sparse_int8_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, n, k,
                                                          scale, None, p)

    with pytest.raises(ValueError, match=r"packed: expected 16 x 16 blocks, the buffer holds 32 x 8"):
        op(bsf.pack_block_sparse_int8(other))
    fp32 = bsf.compress(_weight(n, k, (16, 16), 0.0, gen), (16, 16))
    with pytest.raises(ValueError, match=r"packed: expected a BSR int8 packing \(pack_block_sparse_int8\), the "
                                         r"buffer holds a BSR fp32 packing"):
        op(bsf.pack_block_sparse(fp32))
    packed = bsf.pack_block_sparse_int8(bsw)
    with pytest.raises(ValueError, match=r"packed: expected \d+ bytes for this packing, the buffer has \d+: truncated"):
        op(packed[:-1].clone())
    with pytest.raises(TypeError, match=r"packed: expected a 1-D uint8 tensor from pack_block_sparse_int8, got"):
        op(packed[None])
    ref = reference.block_sparse_int8_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, n, k, scale)
    assert_epilogue_close(op(packed), ref, f"{isa}: its own packing")


@needs_native
def test_int8_bf16_nan_rows_and_empty(isa, gen):
    w = _weight(40, 64, (16, 16), 0.5, gen)
    bsw, scale = bsf.quantize_blocks(bsf.compress(w, (16, 16)))
    x = torch.randn(6, 64, generator=gen)
    x[2, 5] = float("nan")
    y = _run_int8(x, bsw, scale)
    assert y[2].isnan().all() and not y[[0, 1, 3, 4, 5]].isnan().any()
    xb = torch.randn(4, 64, generator=gen).to(torch.bfloat16)
    ref = reference.block_sparse_int8_linear(xb, bsw.values, bsw.crow_indices, bsw.col_indices, 40, 64, scale)
    assert_epilogue_close(_run_int8(xb, bsw, scale), ref, "bf16")
    assert _run_int8(x[:0], bsw, scale).shape == (0, 40)
