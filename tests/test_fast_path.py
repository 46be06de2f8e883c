"""The eager fast path of every packed module (PackedModule.__call__ ->
native plan) against the general torch.ops path: same kernel, so the same
bits, for every input layout the fast path takes or declines."""
import pytest
import torch
from torch import nn

from pyaccel import _native
from pyaccel.formats import sparse24 as s24
from pyaccel.nn import Int8Linear, Sparse24Int8Linear, Sparse24Linear

pytestmark = pytest.mark.skipif(not _native.available(), reason="native library not loaded")

K, N = 72, 40


def _modules():
    torch.manual_seed(7)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.mul_(s24.mask_24(lin.weight))
    return {
        "int8": (Int8Linear.from_float(lin),
                 lambda m, x: torch.ops.pyaccel.int8_linear(x, m.weight_int8, m.weight_scale, m.bias, m._packed)),
        "sparse24": (Sparse24Linear.from_float(lin),
                     lambda m, x: torch.ops.pyaccel.sparse24_linear(x, m.values, m.metadata, K, m.bias, m._packed)),
        "sparse24_int8": (Sparse24Int8Linear.from_float(lin),
                          lambda m, x: torch.ops.pyaccel.sparse24_int8_linear(
                              x, m.values, m.metadata, K, m.weight_scale, m.bias, m._packed)),
    }


def _inputs(gen, dtype):
    base = torch.randn(6, 2 * K, generator=gen).to(dtype)
    yield "2-D", base[:, :K].contiguous()
    yield "2-D row stride", base[:, :K]
    yield "2-D stride 0 rows", base[:1, :K].expand(5, K)
    yield "M = 1", base[:1, :K]
    yield "3-D", torch.randn(2, 3, K, generator=gen).to(dtype)
    yield "4-D", torch.randn(2, 1, 3, K, generator=gen).to(dtype)
    yield "3-D transposed", torch.randn(3, 2, K, generator=gen).to(dtype).transpose(0, 1)
    yield "2-D column stride", base[:, ::2]
    yield "zero rows 2-D", torch.randn(0, K).to(dtype)
    yield "zero rows 3-D", torch.randn(2, 0, K).to(dtype)


@pytest.mark.parametrize("kind", ["int8", "sparse24", "sparse24_int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_matches_op_path(isa, gen, kind, dtype):
    mod, op = _modules()[kind]
    for what, x in _inputs(gen, dtype):
        y = mod(x)
        ref = op(mod, x)
        assert y.shape == x.shape[:-1] + (N,) and y.dtype == dtype, what
        assert torch.equal(y, ref), what
        assert torch.equal(mod(x=x), ref), what  # keyword call: forward()


@pytest.mark.parametrize("kind", ["int8", "sparse24", "sparse24_int8"])
def test_fast_path_output_is_fresh(gen, kind):
    mod, _ = _modules()[kind]
    x = torch.randn(3, K, generator=gen)
    y1 = mod(x)
    keep = y1.clone()
    y2 = mod(torch.randn(3, K, generator=gen))
    assert y1.data_ptr() != y2.data_ptr() and torch.equal(y1, keep)


@pytest.mark.parametrize("kind", ["int8", "sparse24", "sparse24_int8"])
def test_dtype_casts_keep_the_stored_format(gen, kind):
    """.double() / .half() / .to(bf16) move nothing and round nothing: the stored
    format is fixed and the compute dtype follows the input."""
    x = torch.randn(3, K, generator=gen)
    y = _modules()[kind][0](x)
    for cast in (lambda m: m.double(), lambda m: m.half(), lambda m: m.to(torch.bfloat16),
                 lambda m: m.to("cpu", torch.float16)):
        mod = cast(_modules()[kind][0])
        assert all(not b.is_floating_point() or b.dtype == torch.float32 for b in mod.buffers())
        assert torch.equal(mod(x), y)


@pytest.mark.parametrize("kind", ["int8", "sparse24", "sparse24_int8"])
def test_edited_buffers_are_checked_not_misread(gen, kind):
    mod, _ = _modules()[kind]
    x = torch.randn(3, K, generator=gen)
    y = mod(x)
    plan = mod._plan
    with pytest.raises(ValueError, match="bias: expected float32"):
        mod.bias = mod.bias.double()  # refused at assignment; the module keeps its bias and plan
    assert mod._plan is plan and torch.equal(mod(x), y)
    mod.bias = mod.bias.float() + 1
    assert torch.allclose(mod(x), y + 1, rtol=1e-5, atol=1e-5)


def test_plan_keeps_its_memory_alive(gen):
    """A native plan owns references to the storages it reads: a swapped .data
    or a dropped module never leaves it reading freed memory."""
    mod, _ = _modules()["sparse24_int8"]
    x = torch.randn(3, K, generator=gen)
    y = mod(x)
    plan = mod._plan
    mod.bias.data = torch.zeros(N)  # storage swap behind the module's back
    del mod
    import gc

    gc.collect()
    torch.randn(1 << 20)  # reuse freed memory, if any had been freed
    out = torch.empty(3, N)
    plan(x.data_ptr(), K, False, 3, out.data_ptr(), 1)
    assert torch.equal(out, y)


@pytest.mark.parametrize("kind", ["int8", "sparse24", "sparse24_int8"])
def test_native_forward_takes_or_declines(gen, kind):
    """LinearPlan.forward (the native eager path) returns the module's output
    for the layouts it takes and None, touching nothing, for the rest."""
    mod, op = _modules()[kind]
    plan = mod._plan
    for dtype in (torch.float32, torch.bfloat16):
        for what, x in _inputs(gen, dtype):
            y = plan.forward(x)
            takes = (x.dim() == 2 and x.stride(1) == 1) or (x.dim() > 2 and x.is_contiguous())
            # a 2:4 int8 plan at rows where its kernel hands over to dense int8 (AVX-512 VNNI
            # without VBMI, AVX-VNNI, AMX) declines until the module attaches its dense plan
            rows = x.numel() // K
            if kind == "sparse24_int8" and plan.dense is None and _native.lib().s24i8_dense_wins(rows, N, K):
                takes = False
            if not takes:
                assert y is None, what
                continue
            assert y is not None and y.dtype == dtype and y.shape == x.shape[:-1] + (N,), what
            assert torch.equal(y, op(mod, x)), what
    x = torch.randn(4, K, generator=gen)
    declined = {
        "float64": x.double(), "float16": x.half(), "1-D": x[0], "wrong K": torch.randn(4, K + 1),
        "Parameter": nn.Parameter(x, requires_grad=False), "not a tensor": x.numpy(), "None": None,
    }
    for what, bad in declined.items():
        assert plan.forward(bad) is None, what
    plan.max_rows = 4  # from 4 rows on the module switches kernels in Python
    few = x[:1] if kind == "sparse24_int8" else x[:3]  # (1 row: never in a 2:4 int8 kernel's dense window)
    assert plan.forward(x) is None and plan.forward(few) is not None


def test_native_forward_follows_the_default_dtype(gen):
    """y takes x's dtype whatever torch's default dtype is."""
    mod, op = _modules()["int8"]
    x = torch.randn(3, K, generator=gen)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        y = mod(x)
        yb = mod(x.bfloat16())
    finally:
        torch.set_default_dtype(prev)
    assert y.dtype == torch.float32 and torch.equal(y, op(mod, x))
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, op(mod, x.bfloat16()))


def test_native_forward_leaks_no_references(gen):
    """The native path holds no reference past the call (x, dtypes, the shape)."""
    import sys

    mod, _ = _modules()["sparse24_int8"]
    xs = [torch.randn(3, K, generator=gen), torch.randn(2, 3, K, generator=gen).bfloat16()]
    for x in xs:
        mod(x)
    before = [sys.getrefcount(o) for o in xs + [torch.float32, torch.bfloat16]]
    for _ in range(200):
        for x in xs:
            mod(x)
            mod._plan.forward(x.double())  # a decline
    after = [sys.getrefcount(o) for o in xs + [torch.float32, torch.bfloat16]]
    assert after == before
