"""The format packers and the ops refuse inconsistent canonical forms before
any native code reads them (a second round of fuzzing: pack_sparse24 with a k
that disagreed with values / meta segfaulted or read out of bounds and made a
packing the op then used; pack_int8_weight reinterpreted the bytes of any
dtype, a uint8 128 passing the -128 guard; the BSR packers read int64 indices
as int32; a meta `packed` sent CPU calls to the fake kernel, which returned
uninitialized memory; N = 0 failed with "w_scale: null pointer")."""
import pytest
import torch

from pyaccel import _native, reference
from pyaccel.formats import block_sparse as fb
from pyaccel.formats import int8 as fi
from pyaccel.formats import sparse24 as fs

ops = torch.ops.pyaccel
needs_native = pytest.mark.skipif(not _native.available(), reason="native library not loaded")


def _sw(gen, n=3, k=8):
    w = torch.randn(n, k, generator=gen)
    return fs.compress(w * fs.mask_24(w))


@pytest.mark.parametrize("pack", ["fp32", "int8"])
def test_sparse24_packers_check_shapes_against_k(gen, pack):
    sw = _sw(gen)
    vals = sw.values if pack == "fp32" else sw.values.sign().to(torch.int8)

    def run(values, meta, k):
        if pack == "fp32":
            return fs.pack_sparse24(fs.Sparse24Weight(values, meta, k))
        return fs.pack_sparse24_int8(values, meta, k)

    for values, meta, k, what in ((vals, sw.meta, 40_000_000, "values"), (vals, sw.meta[:, :0], 8, "meta"),
                                  (vals[:, :2], sw.meta, 8, "values"), (vals, sw.meta, 12, "values"),
                                  (vals, sw.meta, 0, "k"), (vals, sw.meta, -4, "k"), (vals, sw.meta, True, "k"),
                                  (vals[0], sw.meta, 8, "values"), (vals, sw.meta.to(torch.int32), 8, "meta")):
        with pytest.raises(ValueError, match=rf"^{what}: expected"):
            run(values, meta, k)
    if pack == "int8":
        with pytest.raises(TypeError, match=r"values: expected an int8 tensor"):
            run(sw.values, sw.meta, 8)  # float values are not wrapped into int8
    assert run(vals, sw.meta, 8) is not None or not _native.available()


def test_sparse24_decompress_checks_shapes(gen):
    sw = _sw(gen)
    with pytest.raises(ValueError, match=r"meta: expected"):
        fs.decompress(fs.Sparse24Weight(sw.values, sw.meta[:, :0], 8))
    with pytest.raises(ValueError, match=r"values: expected \[N, 50\]"):
        fs.decompress(fs.Sparse24Weight(sw.values, sw.meta, 100))
    assert fs.decompress(sw).shape == (3, 8)


def test_int8_packer_takes_int8_only(gen):
    w = torch.randint(-127, 128, (64, 256), generator=gen, dtype=torch.int8)
    for bad in (w.float(), w.int(), w.to(torch.int16), torch.full((64, 256), 128, dtype=torch.uint8), w[0],
                w[None]):
        with pytest.raises(TypeError, match=r"values: expected a 2-D int8 tensor"):
            fi.pack_int8_weight(bad)


def test_bsr_packers_check_the_canonical_form():
    ok = fb.BlockSparseWeight(torch.ones(1, 2, 2), torch.tensor([0, 1, 1], dtype=torch.int32),
                              torch.tensor([0], dtype=torch.int32), (4, 4))
    with pytest.raises(ValueError, match=r"crow_indices: expected int32"):
        fb.pack_block_sparse(fb.BlockSparseWeight(ok.values, ok.crow_indices.long(), ok.col_indices, (4, 4)))
    with pytest.raises(ValueError, match=r"col_indices: expected int32 of shape \(2,\)"):
        fb.pack_block_sparse(fb.BlockSparseWeight(torch.ones(2, 2, 2), torch.tensor([0, 1, 2], dtype=torch.int32),
                                                  torch.tensor([0], dtype=torch.int32), (4, 4)))
    with pytest.raises(TypeError, match=r"values: expected int8 blocks"):
        fb.pack_block_sparse_int8(fb.BlockSparseWeight(ok.values * 200, ok.crow_indices, ok.col_indices, (4, 4)))
    with pytest.raises(TypeError, match=r"values: expected floating-point blocks"):
        fb.pack_block_sparse(fb.BlockSparseWeight(ok.values.int(), ok.crow_indices, ok.col_indices, (4, 4)))
    fb.pack_block_sparse(ok)


@needs_native
def test_meta_packed_is_refused_not_run_by_the_fake_kernel(gen):
    x = torch.randn(2, 32, generator=gen)
    w = torch.randint(-127, 128, (16, 32), generator=gen, dtype=torch.int8)
    meta = torch.empty(4, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match=r"packed: expected a CPU tensor"):
        ops.int8_linear(x, w, torch.rand(16, generator=gen), None, meta)
    sw = _sw(gen, 16, 32)
    with pytest.raises(ValueError, match=r"packed: expected a CPU tensor"):
        ops.sparse24_linear(x, sw.values, sw.meta, 32, None, meta)
    # a meta x with a meta packing is tracing: allowed
    y = ops.int8_linear(x.to("meta"), w.to("meta"), torch.rand(16).to("meta"), None, meta)
    assert y.device.type == "meta" and y.shape == (2, 16)


@needs_native
def test_ops_with_no_output_channels(gen):
    x = torch.randn(2, 8, generator=gen)
    y = ops.int8_linear(x, torch.zeros(0, 8, dtype=torch.int8), torch.ones(0), None, None)
    assert y.shape == (2, 0)
    sw = fs.Sparse24Weight(torch.zeros(0, 4, dtype=torch.int8), torch.zeros(0, 1, dtype=torch.uint8), 8)
    y = ops.sparse24_int8_linear(x, sw.values, sw.meta, 8, torch.ones(0), None, None)
    assert y.shape == (2, 0)
    assert torch.equal(reference.int8_linear(x, torch.zeros(0, 8, dtype=torch.int8), torch.ones(0), None),
                       torch.zeros(2, 0))
