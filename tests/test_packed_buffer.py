"""Packed-weight memory: huge-page-backed mappings (own ones for large buffers,
shared 2 MiB arena chunks for small ones), plain torch.empty when opted out;
modules over such buffers behave like any other."""
import copy
import gc
import io

import pytest
import torch
from torch import nn

from pyaccel import _native, reference
from pyaccel.formats._buffer import HUGE_PAGE, _Arena, packed_buffer
from pyaccel.nn import Int8Linear


def test_small_and_large_buffers(monkeypatch):
    small = packed_buffer(1000)
    assert small.shape == (1000,) and small.dtype == torch.uint8
    big = packed_buffer(HUGE_PAGE + 12345)
    assert big.shape == (HUGE_PAGE + 12345,) and big.dtype == torch.uint8 and big.is_contiguous()
    assert big.untyped_storage().nbytes() == big.numel()
    big.fill_(7)
    gc.collect()
    assert int(big[-1]) == 7 and int(big.sum()) == 7 * big.numel()  # the mapping lives as long as the tensor
    assert big.data_ptr() % HUGE_PAGE == 0  # starts on a huge-page boundary
    monkeypatch.setenv("PYACCEL_HUGEPAGES", "0")
    assert packed_buffer(HUGE_PAGE + 1).shape == (HUGE_PAGE + 1,)
    assert packed_buffer(0).shape == (0,)


def test_small_buffers_share_arena_chunks_without_overlap():
    bufs = [packed_buffer(n) for n in (1000, 1, 70000, 333333, 64, 999999, 5)]
    for i, b in enumerate(bufs):
        assert b.data_ptr() % 64 == 0 and b.is_contiguous()
        b.fill_(i + 1)
    spans = sorted((b.data_ptr(), b.data_ptr() + b.numel()) for b in bufs)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))  # disjoint
    assert any(a.data_ptr() // HUGE_PAGE == b.data_ptr() // HUGE_PAGE
               for a, b in zip(bufs, bufs[1:]))  # carved from one chunk
    # each storage is the buffer's own bytes (whole-storage copies such as
    # torch.jit.trace's constants held the 4 MiB mapping for each buffer)
    assert all(b.untyped_storage().nbytes() == b.numel() for b in bufs)
    keep = bufs[3]
    del bufs
    gc.collect()
    assert int(keep.sum()) == 4 * keep.numel()  # its chunk outlives the other tensors


@pytest.mark.skipif(not _native.available(), reason="native library not loaded")
def test_module_over_a_huge_page_buffer(gen):
    lin = nn.Linear(1024, 2304)  # packed int8 weight > 2 MiB
    m = Int8Linear.from_float(lin)
    assert m._packed.numel() > HUGE_PAGE
    x = torch.randn(3, 1024, generator=gen)
    y = m(x)
    assert torch.allclose(y, reference.int8_linear(x, m.weight_int8, m.weight_scale, m.bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(copy.deepcopy(m)(x), y)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)


@pytest.mark.skipif(not _native.available(), reason="native library not loaded")
def test_traced_model_holds_only_its_packed_bytes(gen, tmp_path):
    """A traced int8 MLP saved 4.4 MB (0.41 MB with PYACCEL_HUGEPAGES=0): each
    packed buffer's storage was its whole 4 MiB mapping, which the trace keeps
    as a constant."""
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128)).eval()
    mods = nn.Sequential(Int8Linear.from_float(net[0]), nn.ReLU(), Int8Linear.from_float(net[2]))
    x = torch.randn(20, 256, generator=gen)
    traced = torch.jit.trace(mods, x)
    path = tmp_path / "t.pt"
    torch.jit.save(traced, str(path))
    packed = sum(m._packed.numel() for m in (mods[0], mods[2]))
    assert path.stat().st_size < 2 * packed + 200_000, (path.stat().st_size, packed)
    assert torch.equal(torch.jit.load(str(path))(x), mods(x))


def test_buffers_made_in_inference_mode_are_normal_tensors():
    with torch.inference_mode():
        bufs = [packed_buffer(n) for n in (100, 5000, HUGE_PAGE + 3)]
    assert not any(b.is_inference() for b in bufs)


def test_arena_gives_back_the_last_buffer_taken():
    """A module's constructor packs a placeholder that its builder replaces at
    once; the placeholder's bytes stayed taken, so chunks held as much dead
    space as live packings (int8 MiniLM: 21.7 MB taken for 10.85 MB)."""
    arena = _Arena()
    x = arena.take(1000)
    p0 = x.data_ptr()
    del x
    gc.collect()
    y = arena.take(500)
    assert y.data_ptr() == p0  # the freed top range was reused
    z = arena.take(100)
    view = y[10:20]
    del y
    gc.collect()
    w = arena.take(100)
    assert w.data_ptr() > z.data_ptr()  # y's storage lives on in its view
    del view, w
    gc.collect()
    assert arena.take(64).data_ptr() == z.data_ptr() + 128  # w and then y freed: back to just above z


@pytest.mark.skipif(not _native.available(), reason="native library not loaded")
def test_module_builders_leave_no_dead_placeholders(gen, monkeypatch):
    import mmap

    import pyaccel.formats._buffer as buf

    monkeypatch.setenv("PYACCEL_HUGEPAGES", "1")
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no MADV_HUGEPAGE here: packed buffers come from torch.empty")
    arena = _Arena()
    monkeypatch.setattr(buf, "_arena", arena)
    mods = [Int8Linear.from_float(nn.Linear(256, 192)) for _ in range(8)]
    spans = sorted((m._packed.data_ptr(), m._packed.data_ptr() + m._packed.numel()) for m in mods)
    live = sum(b - a for a, b in spans)
    assert spans[-1][1] - spans[0][0] < live + 64 * len(mods)  # packed back to back
