"""pyaccel::quantize_per_row (native, every ISA) against the reference: bit-exact."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyaccel import reference

K_GRID = [1, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 256, 1000, 1024, 1030]


def _check(x):
    q, s = torch.ops.pyaccel.quantize_per_row(x)
    qr, sr = reference.quantize_per_row(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == x.shape[:-1]
    diff = (q.int() - qr.int()).abs()
    assert torch.equal(q, qr), f"q differs at {diff.nonzero()[:5].tolist()}"
    assert torch.equal(s, sr), f"scale differs: {(s - sr).abs().max()}"
    return q, s


@pytest.mark.parametrize("k", K_GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_over_k(isa, gen, k, dtype):
    x = (torch.randn(5, k, generator=gen) * 3).to(dtype)
    _check(x)


def test_ties_round_half_even(isa):
    # amax 127 makes inv exactly 1: x*inv hits .5 ties exactly
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5]])
    q, _ = _check(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -126]]


def test_zero_rows_and_zero_size(isa, gen):
    x = torch.randn(4, 40, generator=gen)
    x[1] = 0
    q, s = _check(x)
    assert s[1] == 0 and q[1].abs().sum() == 0
    _check(torch.randn(0, 40))
    _check(torch.randn(3, 0))


def test_strided_and_3d(isa, gen):
    base = torch.randn(6, 100, generator=gen)
    _check(base[:, 10:73])       # row stride 100, K 63
    _check(base[::2])            # every other row
    _check(torch.randn(2, 3, 37, generator=gen))
    _check(torch.randn(37, 6, generator=gen).t())  # unit stride along rows, not K


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 9), k=st.integers(1, 300), scale=st.floats(1e-3, 1e3),
       bf16=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_exact(m, k, scale, bf16, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * scale
    _check(x.to(torch.bfloat16) if bf16 else x)


def test_bad_input():
    with pytest.raises(TypeError, match="x: expected a float32 or bfloat16"):
        torch.ops.pyaccel.quantize_per_row(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="x: expected"):
        torch.ops.pyaccel.quantize_per_row(torch.zeros((), dtype=torch.float32))


@pytest.mark.parametrize("k", [37, 200])  # tails only; the 64-wide AVX-512 steps too
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_rows_give_nan_not_garbage(isa, gen, dtype, k):
    from pyaccel.formats.int8 import pack_int8_weight, quantize_weight_per_channel

    x = torch.randn(5, k, generator=gen)
    x[1, 3] = float("inf")
    x[3, k - 1] = float("nan")
    x[4, 0] = float("-inf")
    x = x.to(dtype)
    q, s = _check(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))  # finite rows: plain path
    q, s = torch.ops.pyaccel.quantize_per_row(x)
    qr, sr = reference.quantize_per_row(x)
    assert torch.equal(q, qr)
    assert torch.equal(torch.isnan(s), torch.tensor([False, True, False, True, True]))
    assert torch.equal(s[~torch.isnan(s)], sr[~torch.isnan(sr)])
    w = quantize_weight_per_channel(torch.randn(9, k, generator=gen))
    y = torch.ops.pyaccel.int8_linear(x, w.values, w.scale, torch.zeros(9), pack_int8_weight(w.values))
    assert torch.isnan(y[[1, 3, 4]]).all() and torch.isfinite(y[[0, 2]]).all()
    assert torch.equal(y[[0, 2]], reference.int8_linear(x, w.values, w.scale, torch.zeros(9))[[0, 2]])


@pytest.mark.parametrize("where", [0, 15, 16, 31, 32, 63, 64, 100, 130, 191, 192, 199, 200, 202])
def test_a_lone_nan_is_caught_anywhere(isa, where):
    """A NaN escapes the running maxima; it must still mark its row -- also in
    a row of zeros (amax 0) and next to the row maximum. K = 203: 32-value
    steps, an 8-value step and a scalar tail."""
    x = torch.zeros(3, 203)
    x[0, where] = float("nan")
    x[1] = torch.linspace(-2, 3, 203)
    x[1, where] = float("nan")
    x[2, where] = float("nan")
    x[2, (where + 1) % 203] = 1e30
    q, s = torch.ops.pyaccel.quantize_per_row(x)
    qr, sr = reference.quantize_per_row(x)
    assert torch.isnan(s).all() and torch.isnan(sr).all()
    assert torch.equal(q, qr)


# ---- tiny rows: 127 / amax would overflow fp32 (issue 9, fault 4) ---------------------
# Row maxima around the lift threshold 2**-64 and down into the subnormals.
TINY_AMAX = [2.0 ** -64, 2.0 ** -64 * (1 - 2.0 ** -24), 1e-25, 4e-37, 3.7e-37, 2e-37, 1.2e-38, 1e-38,
             1e-40, 1e-44]
TINY_K = [1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 200]


def _rows_with_amax(amaxes, k, gen):
    """One random row per entry, scaled (in float64, then rounded to fp32) to max|x| ~ amax."""
    x = torch.randn(len(amaxes), k, generator=gen, dtype=torch.float64)
    x = x / x.abs().amax(dim=1, keepdim=True) * torch.tensor(amaxes, dtype=torch.float64)[:, None]
    return x.float()


def _ideal_q(x):
    """round(x / amax * 127) in float64: the exact quantization, up to ties."""
    xd = x.double()
    return (xd / xd.abs().amax(dim=-1, keepdim=True) * 127).round()


@pytest.mark.parametrize("k", TINY_K)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_rows_exact_and_right(isa, gen, k, dtype):
    """Tiny and normal rows mixed in one batch: every ISA equals the reference,
    q is within one step of the float64 quantization (not a sign pattern), and
    the scale is fp32(amax / 127)."""
    amaxes = TINY_AMAX + [1.0, 3e5, 1e-3]
    if dtype == torch.bfloat16:
        amaxes = [a for a in amaxes if a > 1e-40]  # bf16's subnormals stop at 9.2e-41
    perm = torch.randperm(len(amaxes), generator=gen).tolist()
    x = _rows_with_amax([amaxes[i] for i in perm], k, gen).to(dtype)
    q, s = _check(x)
    assert ((q.double() - _ideal_q(x.float())).abs() <= 1).all()
    amax = x.float().abs().amax(dim=1).double()
    assert torch.equal(s, (amax / 127).float())  # fp64 quotient rounded once: correctly rounded
    assert (s[amax < 1.5e-36] < torch.finfo(torch.float32).tiny).all()  # documented: subnormal scales


@pytest.mark.parametrize("k", [16, 64, 65, 200])
def test_subnormal_inputs(isa, gen, k):
    """Rows of subnormals (full range; a few bits only; one subnormal among tiny normal values)."""
    def subnormals(n, top):
        bits = torch.randint(1, top, (n,), generator=gen, dtype=torch.int32)
        sign = 1.0 - 2.0 * torch.randint(0, 2, (n,), generator=gen).float()
        return bits.view(torch.float32) * sign

    x = torch.stack([subnormals(k, 2 ** 23), subnormals(k, 2 ** 6), torch.randn(k, generator=gen) * 1e-30])
    x[2, k // 3] = subnormals(1, 2 ** 23)[0]
    assert (x[:2].abs() < torch.finfo(torch.float32).tiny).all()
    q, _ = _check(x)
    assert ((q.double() - _ideal_q(x)).abs() <= 1).all()


def test_tiny_rule_keeps_old_results_where_127_over_amax_is_finite(gen):
    """For amax in [~3.7e-37, 2**-64), where the former rule rne(x * fp32(127 / amax))
    did not overflow, the lifted rule gives the same q (the same real product)."""
    amaxes = [5.4e-20, 1e-20, 1e-25, 1e-30, 1e-35, 1e-36, 4e-37, 3.8e-37]
    x = _rows_with_amax(amaxes * 8, 300, gen)
    amax = x.abs().amax(dim=1, keepdim=True)
    inv = torch.full_like(amax, 127.0) / amax
    assert torch.isfinite(inv).all()
    old = torch.round(x * inv).clamp(-127, 127).to(torch.int8)
    q, _ = reference.quantize_per_row(x)
    assert torch.equal(q, old)


@pytest.mark.parametrize("k", [37, 200])
def test_tiny_rows_with_a_nan_or_inf_are_marked(isa, gen, k):
    """A NaN next to tiny values (it escapes the AVX-512 maxima) still gives q 0, scale NaN."""
    x = _rows_with_amax([1e-40, 2e-37, 1e-30, 2e-37], k, gen)
    x[0, k // 2] = float("nan")
    x[1, k - 1] = float("nan")
    x[2, 0] = float("inf")
    q, s = torch.ops.pyaccel.quantize_per_row(x)
    qr, sr = reference.quantize_per_row(x)
    assert torch.isnan(s[:3]).all() and torch.isnan(sr[:3]).all()
    assert torch.equal(q, qr) and (q[:3] == 0).all()
    assert torch.equal(s[3], sr[3])
