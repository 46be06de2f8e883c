"""The opt-in 7-bit activation mode (act_bits=7, activations in [-63, 63]):
native kernels on every ISA against the reference, exact integer parts, the
extreme values of the AVX2 u7 kernel (u = q + 64 in [1, 127] times w in
[-127, 127]: vpmaddubsw pair sums up to 2 * 127 * 127), the quantizer with
qmax = 63, and the module's mode in state_dict.

Exact accumulators through the whole linear: x rows holding integers with
max |x| = 63 quantize to q = x (scale 63 / 63 = 1), so with unit weight scales
and no bias y = float(acc).
"""
import io

import numpy as np
import pytest
import torch
from torch import nn

import pyaccel
from pyaccel import _native, ops, reference
from pyaccel.nn import Int8Linear

needs_native = pytest.mark.skipif(not _native.available(), reason="native library not loaded")

K_GRID = [1, 3, 4, 5, 63, 64, 65, 255, 257, 1030]
N_GRID = [1, 15, 16, 17, 63, 64, 65, 130]


def _q7(shape, gen) -> torch.Tensor:
    q = torch.randint(-63, 64, shape, generator=gen, dtype=torch.int8)
    q[:, 0] = 63  # max |x| = 63 in every row: q = x exactly
    return q


def _linear7(x, w, w_scale=None, bias=None):
    n = w.shape[0]
    ws = torch.ones(n) if w_scale is None else w_scale
    return ops.int8_linear_cpu(x, w, ws, bias, None, act_bits=7)


def _rows_grid():
    p = _native.lib().kernel_params()["int8_a7"]
    ms = {1, 2, 3, p["mr"] - 1, p["mr"], p["mr"] + 1, 2 * p["mr"] + 1, 37}
    if p["row_path_rows"]:
        ms |= {p["row_path_rows"] - 1, p["row_path_rows"], p["row_path_rows"] + 1}
    return sorted(m for m in ms if m > 0)


@needs_native
@pytest.mark.parametrize("n", N_GRID)
def test_accumulators_exact_grid(isa, gen, n):
    for m in _rows_grid():
        for k in K_GRID:
            q = _q7((m, k), gen)
            w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
            y = _linear7(q.float(), w)
            ref = reference.int8_matmul_exact(q, w).float()
            assert torch.equal(y, ref), f"m={m} n={n} k={k}: first mismatch at {(y - ref).nonzero()[0].tolist()}"


@needs_native
@pytest.mark.parametrize("k", [4, 1030, 131072])  # 131072 = INT8_MAX_K: |acc| = 63 * 127 * k ~ 1.05e9
def test_extreme_values_exact(isa, k):
    """±63 activations against ±127 weights in every sign combination: the
    largest vpmaddubsw pair sums (u = 127 or 1 after the +64 offset) and the
    largest accumulators; the comp / 2 correction must come out exact."""
    q = torch.full((6, k), 63, dtype=torch.int8)
    q[1] = -63
    q[2, ::2] = -63
    q[3, 1::2] = -63
    q[4, : k // 2] = -63
    q[5, ::3] = -63
    q[5, 0] = 63
    w = torch.full((67, k), 127, dtype=torch.int8)
    w[1] = -127
    w[2, ::2] = -127
    w[3, 1::2] = -127
    w[4:] = torch.where(torch.rand(63, k, generator=torch.Generator().manual_seed(k)) < 0.5, 127, -127).to(torch.int8)
    for m in (1, 6):  # the row path and the tile
        y = _linear7(q[:m].float(), w[:, :])
        ref = reference.int8_matmul_exact(q[:m], w).float()
        assert torch.equal(y, ref)
    assert float(reference.int8_matmul_exact(q[:1], w[:1])) == 63 * 127 * k


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(isa, gen, dtype, bias):
    from pyaccel.formats.int8 import quantize_weight_per_channel

    for m, n, k in [(1, 70, 33), (5, 64, 256), (17, 130, 260), (40, 65, 1030)]:
        w = quantize_weight_per_channel(torch.randn(n, k, generator=gen))
        b = torch.randn(n, generator=gen) if bias else None
        x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
        y = ops.int8_linear_cpu(x, w.values, w.scale, b, None, act_bits=7)
        yr = reference.int8_linear(x, w.values, w.scale, b, qmax=63)
        tol = torch.finfo(dtype).eps * yr.abs().float().clamp_min(1e-30)
        assert ((y.float() - yr.float()).abs() <= tol).all(), f"m={m} n={n} k={k}"


@needs_native
def test_same_bits_on_every_isa(gen):
    """One checkpoint, one answer: the 7-bit ladder is bit-identical across ISAs."""
    from pyaccel.formats.int8 import quantize_weight_per_channel

    w = quantize_weight_per_channel(torch.randn(130, 300, generator=gen))
    x = torch.randn(37, 300, generator=gen) * 5
    outs = {}
    for isa in _native.ISA_LADDER:
        if _native.isa_supported(isa):
            with _native.isa_cap(isa):
                outs[isa] = ops.int8_linear_cpu(x, w.values, w.scale, None, None, act_bits=7)
    first = next(iter(outs.values()))
    for isa, y in outs.items():
        assert torch.equal(y, first), isa


def _native_quantize(x, qmax):
    C = _native.lib()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8)
    s = torch.empty(m)
    C.quantize_rows(x.data_ptr(), x.stride(0), x.dtype == torch.bfloat16, m, k, q.data_ptr(), k, s.data_ptr(), 2,
                    qmax=qmax)
    return q, s


@needs_native
@pytest.mark.parametrize("k", [1, 7, 8, 17, 63, 64, 65, 200, 1030])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizer_qmax63_exact(isa, gen, k, dtype):
    x = (torch.randn(6, k, generator=gen) * 3).to(dtype)
    x[1] = 0
    x[2] *= 1e-40  # tiny rows: the 2**64 lift
    x[3, 0] = float("nan")
    x[4] = torch.arange(k) - k / 2 + 0.5  # ties
    q, s = _native_quantize(x, 63)
    qr, sr = reference.quantize_per_row(x, 63)
    assert torch.equal(q, qr)
    assert bool(s[3].isnan()) and torch.equal(s.isnan(), sr.isnan()) and torch.equal(s[~s.isnan()], sr[~sr.isnan()])
    assert int(q.abs().max()) <= 63
    with pytest.raises(ValueError, match="qmax"):
        _native_quantize(x, 100)


# ---- the module -------------------------------------------------------------------
def _lin(k=48, n=32, gen=None):
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
    return lin


def test_module_mode_and_state_dict(gen):
    lin = _lin(gen=gen)
    m8, m7 = Int8Linear.from_float(lin), Int8Linear.from_float(lin, act_bits=7)
    assert m7.act_bits == 7 and m8.act_bits == 8
    assert "act_bits" not in m8.state_dict()  # 8-bit checkpoints unchanged
    assert int(m7.state_dict()["act_bits"]) == 7
    x = torch.randn(9, 48, generator=gen) * 3
    assert torch.allclose(m7(x), reference.int8_linear(x, m7.weight_int8, m7.weight_scale, m7.bias, qmax=63),
                          rtol=1e-5, atol=1e-5)
    assert not torch.equal(m7(x), m8(x))
    # a 7-bit checkpoint restores the mode; an 8-bit one (every older one) loads as 8-bit
    buf = io.BytesIO()
    torch.save(m7.state_dict(), buf)
    buf.seek(0)
    fresh = Int8Linear(48, 32)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.act_bits == 7 and torch.equal(fresh(x), m7(x))
    back = Int8Linear(48, 32, act_bits=7)
    back.load_state_dict(m8.state_dict())
    assert back.act_bits == 8 and torch.equal(back(x), m8(x))
    # assigning the mode switches the kernels
    back.act_bits = 7
    assert torch.equal(back(x), m7(x))
    assert "act_bits=7" in repr(back)
    bad = m7.state_dict()
    bad["act_bits"] = torch.tensor(6)
    with pytest.raises(RuntimeError, match="act_bits"):
        fresh.load_state_dict(bad)
    assert fresh.act_bits == 7


def test_bad_act_bits_names_the_argument(gen):
    lin = _lin(gen=gen)
    for bad in (6, 16, True, "7", 7.0):
        with pytest.raises(ValueError, match="act_bits"):
            Int8Linear.from_float(lin, act_bits=bad)
        with pytest.raises(ValueError, match="act_bits"):
            pyaccel.patch(nn.Sequential(_lin(gen=gen)), quantize="int8", act_bits=bad)
    m7 = Int8Linear.from_float(lin, act_bits=np.int64(7))  # a NumPy integer is taken, stored as int
    assert m7.act_bits == 7 and type(m7.act_bits) is int
    m = Int8Linear.from_float(lin)
    with pytest.raises(ValueError, match="act_bits"):
        m.act_bits = 5
    x = torch.randn(2, 48)
    with pytest.raises(ValueError, match="act_bits"):
        torch.ops.pyaccel.int8_linear(x, m.weight_int8, m.weight_scale, None, None, 5)


def test_op_path_and_patch(gen):
    model = nn.Sequential(_lin(gen=gen), nn.ReLU(), _lin(32, 16, gen=gen))
    report = pyaccel.patch(model, quantize="int8", act_bits=7, inplace=False)
    mods = [m for m in report.model.modules() if isinstance(m, Int8Linear)]
    assert len(mods) == 2 and all(m.act_bits == 7 for m in mods)
    x = torch.randn(5, 48, generator=gen)
    m = mods[0]
    assert torch.equal(m(x), torch.ops.pyaccel.int8_linear(x, m.weight_int8, m.weight_scale, m.bias, m._packed, 7))
    assert torch.equal(m(x), m._checked_op(x))


def test_patch_warns_when_act_bits_changes_nothing(gen):
    """act_bits=7 applies to the dense Int8Linear layers patch builds; without
    quantize='int8' (and no torch.ao layers) it would silently do nothing."""
    import warnings

    with pytest.warns(UserWarning, match="act_bits=7 had no effect"):
        pyaccel.patch(nn.Sequential(_lin(gen=gen)), act_bits=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyaccel.patch(nn.Sequential(_lin(gen=gen)).eval(), quantize="int8", act_bits=7)
        pyaccel.patch(nn.Sequential(_lin(gen=gen)))


@needs_native
def test_backend_names_the_7bit_kernel():
    m = Int8Linear(64, 64, act_bits=7)
    with _native.isa_cap("avx2") if _native.isa_supported("avx2") else _native.isa_cap("portable"):
        assert _native.lib().int8_kernel_name(7) in m.backend()
        if _native.isa_supported("avx2"):
            assert "qs8_gemm_4x16c4u7_avx2" in m.backend()
