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
from pyaccel.formats._buffer import HUGE_PAGE, packed_buffer
from pyaccel.nn import Int8Linear


def test_small_and_large_buffers(monkeypatch):
    small = packed_buffer(1000)
    assert small.shape == (1000,) and small.dtype == torch.uint8
    big = packed_buffer(HUGE_PAGE + 12345)
    assert big.shape == (HUGE_PAGE + 12345,) and big.dtype == torch.uint8 and big.is_contiguous()
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
    assert any(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
               for a, b in zip(bufs, bufs[1:]))  # carved from one chunk
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
