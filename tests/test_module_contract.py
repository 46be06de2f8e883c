"""The module contract: every pyaccel module behaves like the module it
replaces wherever PyTorch takes it.

Every pyaccel module class is registered in CASES below; a new op family adds
its ContractCase (a few lines: how to build a random instance, its pure-PyTorch
reference, its native kernel's name in ``_C.kernel_params()`` and what invalid
canonical values look like) and then passes every test in this file, on every
ISA the CPU allows. Kernel-level grids live in tests/ops; the grids here cross
the module-level switches (tiles, row paths, column kernel, plan switch) read
from the native library itself.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import pickle
import threading
import warnings
from typing import Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import pyaccel
from pyaccel import _native, reference
from pyaccel import reference_binary as rb
from pyaccel.formats import binary as bf
from pyaccel.formats import block_sparse as bsf
from pyaccel.formats import sparse24 as s24
from pyaccel.nn import (BinaryConv2d, BinaryLinear, BlockSparseInt8Linear, BlockSparseLinear, Int8Linear,
                        Sparse24Int8Linear, Sparse24Linear, XnorConv2d, XnorLinear)

needs_native = pytest.mark.skipif(not _native.available(), reason="native library not loaded")


# ---- the registry -------------------------------------------------------------------
@dataclasses.dataclass
class ContractCase:
    name: str
    cls: type
    kernel: str  # key of this module's kernel in pyaccel._C.kernel_params()
    build: Callable[[int, int, bool, torch.Generator], nn.Module]  # (in, out, bias, gen) -> random module
    reference: Callable[[nn.Module, Tensor], Tensor]  # what forward computes, in pure PyTorch
    bad_values: Callable[[nn.Module], Dict[str, Tensor]]  # canonical buffers holding invalid values
    ctor_args: Callable[[nn.Module], tuple] = lambda m: (m.in_features, m.out_features)
    # False for a Linear-shaped module that is not a linear map (binary: y = act(sign(x) @ W±1ᵀ * s + b)):
    # no dense-weight view, so the nn.Linear surface tests (F.linear on .weight, the transformer) do not apply
    linear_map: bool = True
    grad_reference: Optional[Callable[[nn.Module, Tensor], Tensor]] = None  # what backward differentiates


def _float_linear(k, n, bias, gen, sparse24=False) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
        if sparse24:
            lin.weight.mul_(s24.mask_24(lin.weight))
    return lin


def _block_sparse(k, n, bias, gen, block, cls=BlockSparseLinear) -> BlockSparseLinear:
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    w *= bsf.block_mask(w, block, 0.6)
    w[:, :block[1]] = 0  # an empty block column
    if n > block[0]:
        w[block[0]:2 * block[0]] = 0  # an empty block row (bias only)
    last = (k - 1) // block[1] * block[1]
    if last > 0:  # one kept block in every other block row, so no layer is all zero
        rows = torch.arange(n) // block[0]
        keep = (rows % 2 == 0) & (rows != 1)
        w[keep, last:] = torch.randn(int(keep.sum()), k - last, generator=gen) / k ** 0.5
    return cls.from_dense(w, torch.randn(n, generator=gen) if bias else None, block)


def _col_out_of_range(col: Tensor) -> Tensor:
    bad = col.clone()
    bad[-1] = 10 ** 6
    return bad


def _crow_decreasing(crow: Tensor) -> Tensor:
    bad = crow.clone()
    bad[1] = bad[-1] + 1
    return bad


def _minus_128(t: Tensor) -> Tensor:
    bad = t.clone()
    bad.view(-1)[bad.numel() // 2] = -128
    return bad


def _repeated_position(meta: Tensor) -> Tensor:
    bad = meta.clone()
    bad[0, 0] = (bad[0, 0] & 0xF0) | (1 | 1 << 2)  # group 0 of row 0: positions (1, 1)
    return bad


def _nan_scale(s: Tensor) -> Tensor:
    bad = s.clone()
    bad[-1] = float("nan")
    return bad


def _padding_bit(bits: Tensor) -> Tensor:
    """Packed binary weights with bit 63 of the last word set: past the channel
    count unless it is a multiple of 64 (the shapes used here are not)."""
    bad = bits.clone()
    bad[..., -1, 0] |= torch.iinfo(torch.int64).min
    return bad


def _xnor_linear(k, n, bias, gen, act=None) -> XnorLinear:
    b = BinaryLinear(k, n, bias=bias)
    with torch.no_grad():
        b.weight.copy_(torch.randn(n, k, generator=gen))
        if bias:
            b.bias.copy_(torch.randn(n, generator=gen))
    return XnorLinear.from_binary(b.eval(), act=act)


def _xnor_linear_reference(m, x, ste=False):
    w = bf.unpack_conv_weight(m.weight_bits, m.out_features, m.in_features, 1, 1).reshape(m.out_features, -1)
    lead = x.shape[:-1]
    y = rb.binary_conv2d(x.reshape(-1, m.in_features)[:, :, None, None], w[:, :, None, None], m.scale, m.bias,
                         act=m.act, act_params=(m.act_lo, m.act_hi), slope=m.slope, ste=ste)
    return y.reshape(*lead, m.out_features)


_XNOR_LINEAR_CTOR = lambda m: (m.in_features, m.out_features, m.bias is not None, m.act, m.act_lo,  # noqa: E731
                               m.act_hi)


CASES = [
    ContractCase(
        "Int8Linear", Int8Linear, "int8",
        build=lambda k, n, bias, gen: Int8Linear.from_float(_float_linear(k, n, bias, gen)),
        reference=lambda m, x: reference.int8_linear(x, m.weight_int8, m.weight_scale, m.bias),
        bad_values=lambda m: {"weight_int8": _minus_128(m.weight_int8), "weight_scale": _nan_scale(m.weight_scale)},
    ),
    ContractCase(  # the opt-in 7-bit activation mode: its own ladder (kernel_params()["int8_a7"])
        "Int8Linear-act7", Int8Linear, "int8_a7",
        build=lambda k, n, bias, gen: Int8Linear.from_float(_float_linear(k, n, bias, gen), act_bits=7),
        reference=lambda m, x: reference.int8_linear(x, m.weight_int8, m.weight_scale, m.bias, qmax=63),
        bad_values=lambda m: {"weight_int8": _minus_128(m.weight_int8), "weight_scale": _nan_scale(m.weight_scale)},
    ),
    ContractCase(
        "Sparse24Linear", Sparse24Linear, "sparse24",
        build=lambda k, n, bias, gen: Sparse24Linear.from_float(_float_linear(k, n, bias, gen, sparse24=True)),
        reference=lambda m, x: reference.sparse24_linear(x, m.values, m.metadata, m.in_features, m.bias),
        bad_values=lambda m: {"metadata": _repeated_position(m.metadata)},
    ),
    ContractCase(
        "Sparse24Int8Linear", Sparse24Int8Linear, "sparse24_int8",
        build=lambda k, n, bias, gen: Sparse24Int8Linear.from_float(
            _float_linear(k, n, bias, gen, sparse24=True)),
        reference=lambda m, x: reference.sparse24_int8_linear(x, m.values, m.metadata, m.in_features, m.weight_scale,
                                                              m.bias),
        bad_values=lambda m: {"values": _minus_128(m.values), "metadata": _repeated_position(m.metadata),
                              "weight_scale": _nan_scale(m.weight_scale)},
    ),
] + [
    ContractCase(
        f"BlockSparseLinear-{bh}x{bw}", BlockSparseLinear, "block_sparse",
        build=lambda k, n, bias, gen, block=(bh, bw): _block_sparse(k, n, bias, gen, block),
        reference=lambda m, x: reference.block_sparse_linear(x, m.values, m.crow_indices, m.col_indices,
                                                             m.out_features, m.in_features, m.bias),
        bad_values=lambda m: {"col_indices": _col_out_of_range(m.col_indices),
                              "crow_indices": _crow_decreasing(m.crow_indices)},
    )
    for bh, bw in [(16, 16), (32, 8), (1, 4)]
] + [
    ContractCase(
        f"BlockSparseInt8Linear-{bh}x{bw}", BlockSparseInt8Linear, "block_sparse_int8",
        build=lambda k, n, bias, gen, block=(bh, bw): _block_sparse(k, n, bias, gen, block, BlockSparseInt8Linear),
        reference=lambda m, x: reference.block_sparse_int8_linear(
            x, m.values, m.crow_indices, m.col_indices, m.out_features, m.in_features, m.weight_scale, m.bias),
        bad_values=lambda m: {"values": _minus_128(m.values), "col_indices": _col_out_of_range(m.col_indices),
                              "weight_scale": _nan_scale(m.weight_scale)},
    )
    for bh, bw in [(16, 16), (4, 6)]
] + [
    ContractCase(
        name, XnorLinear, "binary",
        build=lambda k, n, bias, gen, act=act: _xnor_linear(k, n, bias, gen, act),
        reference=_xnor_linear_reference,
        bad_values=lambda m: {"weight_bits": _padding_bit(m.weight_bits), "scale": _nan_scale(m.scale)},
        ctor_args=_XNOR_LINEAR_CTOR, linear_map=False,
        grad_reference=lambda m, x: _xnor_linear_reference(m, x, ste=True),
    )
    for name, act in [("XnorLinear", None), ("XnorLinear-prelu", nn.PReLU(init=-0.3))]
]


# Public pyaccel.nn classes outside this Linear-shaped suite, each with the
# reason and the file that tests its own contract instead. Keep the list short
# and honest: a class here is not yet held to every test above.
NOT_IN_LINEAR_SUITE = {
    pyaccel.nn.BinaryConv2d: "training module: a plain nn.Conv2d subclass with float Parameters "
                             "(tests/test_binary_modules.py: compile, export, fx, trace, state_dict, backward)",
    pyaccel.nn.BinaryLinear: "training module: a plain nn.Linear subclass with float Parameters "
                             "(tests/test_binary_modules.py)",
}


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request) -> ContractCase:
    return request.param


def test_every_pyaccel_module_is_registered():
    registered = {c.cls for c in CASES} | {c.cls for c in CONV_CASES}  # Conv-shaped ones: CONV_CASES, below
    public = [getattr(pyaccel.nn, n) for n in pyaccel.nn.__all__]
    modules = {c for c in public if isinstance(c, type) and issubclass(c, nn.Module)}
    missing = modules - registered - set(NOT_IN_LINEAR_SUITE)
    assert not missing, f"not in the contract suite: {sorted(c.__name__ for c in missing)}"
    assert not registered & set(NOT_IN_LINEAR_SUITE), "a registered class is also listed as exempt"


# ---- helpers --------------------------------------------------------------------------
def _run_in_threads(work, errors, n=4):
    """Run work() on n threads at once; fail with the first errors it collected."""
    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def _op_path(mod, x):
    """The module's checked torch.ops path (the same kernels, no fast path)."""
    return mod._checked_op(x)


def assert_matches_reference(y: Tensor, ref: Tensor, x: Tensor, mod: nn.Module, what=""):
    """|y - ref| <= 4 eps (|x| @ |W|ᵀ + |b|) + eps |ref|: the error bound of a K-term fp32 dot
    product (the int8 references quantize x exactly as the kernels do)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype, what
    if isinstance(mod, XnorLinear):  # the ±1 dot is exact: |dot| <= K, only the fp32 epilogue rounds
        scale = (mod.scale.abs() * mod.in_features).expand(x.numel() // x.shape[-1], -1)
    else:
        w = mod.weight.materialize().abs()
        scale = x.detach().float().abs().reshape(-1, x.shape[-1]) @ w.t()
    if mod.bias is not None:
        scale = scale + mod.bias.abs()
    eps = torch.finfo(y.dtype).eps
    tol = 4 * torch.finfo(torch.float32).eps * scale.reshape(ref.shape) + eps * ref.float().abs() + 1e-30
    bad = (y.float() - ref.float()).abs() > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} outputs off, first at {bad.nonzero()[0].tolist()}: "
                           f"{y[tuple(bad.nonzero()[0])]} vs {ref[tuple(bad.nonzero()[0])]}")


def _grid(params) -> tuple:
    """Rows, (out, in) pairs crossing the selected kernel's tiles and switches."""
    mr, nr, kr = params["mr"], params["nr"], params["kr"]
    ms = {0, 1, 2, mr - 1, mr, mr + 1, 2 * mr + 1, 37}
    for key in ("row_path_rows", "cols_from_rows", "dense_from_rows", "sparse_from_rows_small"):
        t = params.get(key, 0)
        if t > 0:
            ms |= {t - 1, t, t + 1}
    ms = sorted(m for m in ms if m >= 0)
    shapes = [(1, kr + 1), (nr - 1, kr - 1 if kr > 1 else 3), (nr + 1, 3 * kr + 5), (2 * nr + 3, 53)]
    return ms, shapes


# ---- numerics on every ISA --------------------------------------------------------------
@needs_native
def test_tile_grid_matches_reference(isa, gen, case):
    params = _native.lib().kernel_params()[case.kernel]
    ms, shapes = _grid(params)
    for n, k in shapes:
        mod = case.build(k, n, True, gen)
        for m in ms:
            x = torch.randn(m, k, generator=gen)
            y = mod(x)
            assert_matches_reference(y, case.reference(mod, x), x, mod, f"{params['name']} m={m} n={n} k={k}")
            assert torch.equal(y, _op_path(mod, x)), f"fast path != op path at m={m} n={n} k={k}"


@needs_native
def test_column_kernel_k_blocks(isa, gen, case):
    """The 2:4 column kernel blocks K past cols_whole_k_groups groups: cross it."""
    params = _native.lib().kernel_params()[case.kernel]
    if not params.get("cols_from_rows"):
        pytest.skip(f"{params['name']} has no column kernel")
    k = 4 * params["cols_whole_k_groups"] + 4 * params["cols_k_block_groups"] + 7
    mod = case.build(k, params["cols_nr"] + 3, True, gen)
    x = torch.randn(params["cols_from_rows"] + 1, k, generator=gen)
    assert_matches_reference(mod(x), case.reference(mod, x), x, mod)


def _layouts(k, gen, dtype):
    base = torch.randn(6, 2 * k, generator=gen).to(dtype)
    yield "2-D", base[:, :k].contiguous()
    yield "2-D row stride", base[:, :k]
    yield "2-D column stride", base[:, ::2]
    yield "stride-0 rows", base[:1, :k].expand(5, k)
    yield "M = 1", base[:1, :k]
    yield "3-D", torch.randn(2, 3, k, generator=gen).to(dtype)
    yield "3-D transposed", torch.randn(3, 2, k, generator=gen).to(dtype).transpose(0, 1)
    yield "4-D", torch.randn(2, 1, 3, k, generator=gen).to(dtype)
    yield "empty 2-D", torch.randn(0, k).to(dtype)
    yield "empty 3-D", torch.randn(2, 0, k).to(dtype)
    yield "1-D", torch.randn(k, generator=gen).to(dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_layouts(isa, gen, case, dtype):
    mod = case.build(44, 24, True, gen)
    for what, x in _layouts(44, gen, dtype):
        y = mod(x)
        assert y.shape == x.shape[:-1] + (24,) and y.dtype == dtype, what
        assert torch.equal(y, _op_path(mod, x)), what
        if dtype == torch.float32:
            assert_matches_reference(y, case.reference(mod, x), x, mod, what)


@given(m=st.integers(0, 40), k=st.integers(1, 150), n=st.integers(1, 90), pad=st.integers(0, 9),
       bias=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
@settings(max_examples=30, deadline=None)
def test_property_random_shapes_and_row_strides(m, k, n, pad, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    for case in CASES:
        mod = case.build(k, n, bias, gen)
        x = torch.randn(m, k + pad, generator=gen)[:, :k]
        assert_matches_reference(mod(x), case.reference(mod, x), x, mod, f"{case.name} m={m} k={k} n={n}")


@needs_native
def test_one_checkpoint_same_answer_on_every_isa(gen, case):
    """A state_dict with extreme values (±127, the largest scales' rows) gives one answer everywhere."""
    src = case.build(67, 33, True, gen)
    with torch.no_grad():
        for name in ("weight_int8", "values"):
            t = getattr(src, name, None)
            if t is not None and t.dtype == torch.int8:
                t[0].copy_(torch.where(t[0] != 0, torch.full_like(t[0], -127), t[0]))
                t[1].copy_(torch.where(t[1] != 0, torch.full_like(t[1], 127), t[1]))
    x = torch.randn(9, 67, generator=gen) * 40
    outs = _outputs_on_every_isa(src, case.cls, case.ctor_args, x)
    ref = case.reference(src, x)
    for isa, y in outs.items():
        assert_matches_reference(y, ref, x, src, isa)


def _outputs_on_every_isa(src, cls, ctor_args, x) -> dict:
    """isa -> output of a fresh cls module loaded from src's saved state_dict, under each ISA cap the CPU allows."""
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    outs = {}
    for isa in _native.ISA_LADDER:
        if not _native.isa_supported(isa):
            continue
        with _native.isa_cap(isa):
            buf.seek(0)
            mod = cls(*ctor_args(src))
            mod.load_state_dict(torch.load(buf, weights_only=True))
            outs[isa] = mod(x)
    return outs


# ---- the nn.Linear surface ---------------------------------------------------------------
def _needs_linear_map(case):
    if not case.linear_map:
        pytest.skip(f"{case.name} is not a linear map: no dense-weight view, F.linear does not apply")


def test_linear_surface(gen, case):
    _needs_linear_map(case)
    mod = case.build(40, 24, True, gen)
    assert (mod.in_features, mod.out_features) == (40, 24)
    assert mod.bias.shape == (24,) and mod.bias.dtype == torch.float32
    w = mod.weight
    assert isinstance(w, Tensor) and w.shape == (24, 40) and w.dtype == torch.float32
    assert w.device == mod.bias.device and not w.requires_grad and w.dim() == 2
    assert "weight" not in mod.state_dict()
    x = torch.randn(5, 40, generator=gen)
    assert torch.equal(F.linear(x, mod.weight, mod.bias), mod(x))  # the kernel, not a dense matmul
    other = torch.randn(24, generator=gen)
    assert torch.allclose(F.linear(x, mod.weight, other), mod(x) - mod.bias + other, atol=1e-5)
    dense = w.materialize()
    assert type(dense) is Tensor and dense.shape == (24, 40)
    from pyaccel.nn import _weight

    _weight._warned.discard(type(mod).__name__)  # the warning comes once per class
    with pytest.warns(UserWarning, match="materialized"):
        y = x @ mod.weight.t()
    assert torch.allclose(y, x @ dense.t())
    with pytest.raises(AttributeError, match="read-only"):
        mod.weight = nn.Parameter(torch.zeros(24, 40))
    nobias = case.build(40, 24, False, gen)
    assert nobias.bias is None and torch.equal(F.linear(x, nobias.weight), nobias(x))


_WRITES = {  # each one wrote into a materialized copy and returned normally: a silent no-op
    "copy_": lambda w: w.copy_(torch.zeros(w.shape)),
    "add_": lambda w: w.add_(1),
    "iadd": lambda w: w.__iadd__(1),
    "init.zeros_": nn.init.zeros_,
    "init.kaiming_uniform_": nn.init.kaiming_uniform_,
    "init.orthogonal_": nn.init.orthogonal_,  # writes through w.view_as(q)
    "data.mul_": lambda w: w.data.mul_(0),
    "detach().zero_": lambda w: w.detach().zero_(),
    "t().add_": lambda w: w.t().add_(1),
    "row.zero_": lambda w: w[0].zero_(),
    "setitem": lambda w: w.__setitem__(0, 1.0),
    "split.fill_": lambda w: w.split(2)[0].fill_(0),
    "out=": lambda w: torch.add(torch.zeros(w.shape), 1, out=w),
    "data =": lambda w: setattr(w, "data", torch.zeros(w.shape)),
}


@pytest.mark.parametrize("write", list(_WRITES), ids=list(_WRITES))
def test_weight_view_refuses_writes(gen, case, write):
    """The view of the effective weight cannot be written (it is computed from
    the packed buffers); every way to write it raises, naming the buffers to
    change instead, and the module keeps computing what it computed."""
    _needs_linear_map(case)
    mod = case.build(24, 16, True, gen)
    x = torch.randn(3, 24, generator=gen)
    y0 = mod(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # materializing for a view op warns
        refused = (rf"{case.cls.__name__}\.weight is read-only: it is computed from the packed buffers "
                   r"\(.*load_state_dict")
        with torch.no_grad(), pytest.raises(RuntimeError, match=refused):
            _WRITES[write](mod.weight)
    assert torch.equal(mod(x), y0)


def test_weight_view_requires_grad_and_conversions(gen, case):
    """requires_grad_() raises (it returned a view that required grad while
    module.weight did not); tolist / numpy / deepcopy / pickle give the dense
    weight (they failed with torch internals), numpy read-only; .data and
    .detach() are the view again, computing nothing."""
    _needs_linear_map(case)
    import numpy as np

    mod = case.build(24, 16, True, gen)
    dense = mod.weight.materialize()
    with pytest.raises(RuntimeError, match="weight cannot require grad"):
        mod.weight.requires_grad_()
    with pytest.raises(RuntimeError, match="weight cannot require grad"):
        mod.weight.requires_grad = True
    assert not mod.weight.requires_grad_(False).requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mod.weight.tolist() == dense.tolist()
        a = mod.weight.numpy()
        assert np.array_equal(a, dense.numpy()) and not a.flags.writeable
        assert np.array_equal(np.asarray(mod.weight), dense.numpy()) and not np.asarray(mod.weight).flags.writeable
        assert np.array(mod.weight).flags.writeable  # numpy.array: the caller's copy
        for copied in (copy.deepcopy(mod.weight), pickle.loads(pickle.dumps(mod.weight))):
            assert type(copied) is Tensor and torch.equal(copied, dense)
            copied.add_(1)  # the caller's own tensor
        b = io.BytesIO()
        torch.save(mod.weight, b)
        b.seek(0)
        assert torch.equal(torch.load(b, weights_only=True), dense)
        assert torch.equal(mod.weight.t().contiguous(), dense.t())
    for same in (mod.weight.data, mod.weight.detach()):
        assert type(same) is type(mod.weight) and same._module is mod


def test_weight_view_warning_names_the_callers_line(gen, case):
    """The materialization warning points at the line that used the weight
    (it pointed at torch/utils/_pytree.py)."""
    _needs_linear_map(case)
    from pyaccel.nn import _weight

    mod = case.build(24, 16, True, gen)
    for use in (lambda w: w.sum(), lambda w: w.numpy(), lambda w: copy.deepcopy(w)):
        _weight._warned.discard(type(mod).__name__)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            use(mod.weight)
        assert [w.filename for w in caught if "materialized" in str(w.message)] == [__file__]


class _CountCalls:
    """Counts calls of `cls` instances (at class level: no hooks on instances)."""

    def __init__(self, monkeypatch, cls):
        self.n = 0
        orig = cls.__call__

        def counted(mod, *a, **k):
            self.n += 1
            return orig(mod, *a, **k)

        monkeypatch.setattr(cls, "__call__", counted)


def test_transformer_encoder_layer_runs_the_kernels(gen, case, monkeypatch):
    """TransformerEncoderLayer's eval fast path reads linear1.weight and would
    compute with it; the view turns it off, so the layer calls the modules."""
    _needs_linear_map(case)
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2).eval()
    for layer in enc.layers:
        layer.linear1 = case.build(64, 128, True, gen)
        layer.linear2 = case.build(128, 64, True, gen)
    src = torch.randn(2, 7, 64, generator=gen)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        expected = enc(src).detach()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    calls = _CountCalls(monkeypatch, case.cls)
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd",
                        lambda *a, **k: pytest.fail("the fused layer bypassed the pyaccel modules"))
    with torch.no_grad():
        out = enc(src)
    assert calls.n == 4
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    out = enc(src)  # grad mode on
    assert calls.n == 8 and torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # compiled: reading .weight breaks the graph, the fused path stays off
        out = torch.compile(enc.layers[0])(src)
    assert torch.allclose(out, enc.layers[0](src), rtol=1e-5, atol=1e-5)


# ---- tracing, compiling, exporting --------------------------------------------------------
def test_jit_trace_records_the_op(gen, case):
    mod = nn.Sequential(case.build(48, 32, True, gen), nn.ReLU())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=torch.jit.TracerWarning, module=r"pyaccel\.nn\._packed")
        traced = torch.jit.trace(mod, torch.randn(4, 48, generator=gen))
    assert "pyaccel" in str(traced.graph)
    for shape in [(4, 48), (7, 48), (2, 3, 48)]:
        x = torch.randn(*shape, generator=gen)
        assert torch.equal(traced(x), mod(x)), shape


def test_fx_symbolic_trace_leaf(gen, case):
    mod = nn.Sequential(case.build(48, 32, True, gen), nn.ReLU())
    gm = torch.fx.symbolic_trace(mod)
    nodes = [(n.op, n.target) for n in gm.graph.nodes]
    assert ("call_module", "0") in nodes, nodes
    x = torch.randn(5, 48, generator=gen)
    assert torch.equal(gm(x), mod(x))


def test_torch_compile(gen, case):
    torch._dynamo.reset()  # every module shares PackedModule.__call__: compiled alone, at most 8 instances a process
    mod = case.build(48, 32, True, gen)
    compiled = torch.compile(mod, fullgraph=True)
    for m in (3, 5):
        x = torch.randn(m, 48, generator=gen)
        assert torch.allclose(compiled(x), mod(x), rtol=1e-6, atol=1e-6)


def test_torch_export_dynamic_batch(gen, case):
    torch._dynamo.reset()
    mod = case.build(48, 32, True, gen)
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(mod, (torch.randn(4, 48, generator=gen),), dynamic_shapes=({0: batch},))
    for m in (1, 9):
        x = torch.randn(m, 48, generator=gen)
        assert torch.allclose(ep.module()(x), mod(x), rtol=1e-6, atol=1e-6)


# ---- autograd ------------------------------------------------------------------------------
def test_script_says_it_is_not_supported(gen, case):
    """torch.jit.script failed inside TorchScript's annotation parser
    ("Unknown type annotation: 'Optional[Tensor]'"); it now names the module
    and what to use instead, also from inside a container."""
    mod = case.build(16, 8, True, gen)
    for obj in (mod, nn.Sequential(nn.ReLU(), mod)):
        with pytest.raises(RuntimeError, match=rf"{type(mod).__name__}: torch.jit.script is not supported .*"
                                               r"torch.jit.trace, torch.compile or torch.export"):
            torch.jit.script(obj)


def test_backward_after_inference_mode(gen, case):
    """Built, or loaded from a state_dict made, under torch.inference_mode: the
    packing came out as an inference tensor (carved from a buffer chunk first
    mapped in inference mode), and a later grad-enabled call raised "Inference
    tensors cannot be saved for backward". Every tensor the module holds is a
    normal one."""
    with torch.inference_mode():
        built = case.build(48, 32, True, gen)
        sd = {k: v.clone() for k, v in built.state_dict().items()}
    loaded = case.build(48, 32, True, gen)
    loaded.load_state_dict(sd)
    for what, mod in (("built", built), ("loaded", loaded)):
        held = [v for v in vars(mod).values() if isinstance(v, torch.Tensor)] + list(mod.buffers())
        assert not any(t.is_inference() for t in held), what
        x = torch.randn(6, 48, generator=gen, requires_grad=True)
        mod(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, what


def test_backward_reaches_the_input(gen, case):
    mod = case.build(48, 32, True, gen)
    x = torch.randn(6, 48, generator=gen, requires_grad=True)
    y = mod(x)
    assert y.requires_grad and y.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(y.detach(), mod(x))  # the same kernel with and without autograd
    g = torch.randn(6, 32, generator=gen)
    y.backward(g)
    if case.grad_reference is None:
        assert torch.allclose(x.grad, g @ mod.weight.materialize(), rtol=1e-5, atol=1e-5)
    else:
        xr = x.detach().double().requires_grad_()
        case.grad_reference(mod, xr).backward(g.double())
        assert torch.allclose(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-5) and x.grad.abs().sum() > 0
    # a frozen pyaccel layer between trainable ones
    net = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), mod, nn.ReLU(), nn.Linear(32, 8))
    net(torch.randn(3, 16, generator=gen)).sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
    # bf16 and N-D inputs
    xb = torch.randn(2, 3, 48, generator=gen).to(torch.bfloat16).requires_grad_()
    mod(xb).float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and xb.grad.shape == xb.shape


def test_train_mode_behaves_like_eval(gen, case):
    mod = case.build(48, 32, True, gen)
    x = torch.randn(4, 48, generator=gen)
    y = mod.eval()(x)
    assert torch.equal(mod.train()(x), y) and mod.training


# ---- saving, loading, copying --------------------------------------------------------------
def test_copies_and_state_dict_round_trips(gen, case):
    mod = case.build(48, 32, True, gen)
    x = torch.randn(5, 48, generator=gen)
    y = mod(x)
    assert torch.equal(copy.deepcopy(mod)(x), y)
    assert torch.equal(pickle.loads(pickle.dumps(mod))(x), y)
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    fresh = case.cls(*case.ctor_args(mod))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), y)


def test_meta_skeleton_load_with_assign(gen, case):
    src = case.build(64, 48, True, gen)
    with torch.device("meta"):
        m = case.cls(*case.ctor_args(src))
    assert all(b.is_meta for b in m.buffers())
    m.load_state_dict(src.state_dict(), assign=True)
    x = torch.randn(3, 64, generator=gen)
    assert torch.equal(m(x), src(x))
    # to_empty + load (non-assign) works too
    with torch.device("meta"):
        m2 = case.cls(*case.ctor_args(src))
    m2 = m2.to_empty(device="cpu")
    m2.load_state_dict(src.state_dict())
    assert torch.equal(m2(x), src(x))


def test_to_and_dtype_casts_keep_the_stored_format(gen, case):
    mod = case.build(48, 32, True, gen)
    x = torch.randn(3, 48, generator=gen)
    y = mod(x)
    for cast in (lambda m: m.double(), lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.cpu()):
        m2 = cast(copy.deepcopy(mod))
        assert all(not b.is_floating_point() or b.dtype == torch.float32 for b in m2.buffers())
        assert torch.equal(m2(x), y)


# ---- state changed behind the module -------------------------------------------------------
@needs_native
def test_data_swap_is_seen_by_every_path(isa, gen, case):
    mod = case.build(40, 24, True, gen)
    x = torch.randn(5, 80, generator=gen)
    mod(x[:, :40].contiguous())  # the plan exists and has run
    mod.bias.data = torch.randn(24, generator=gen)
    for what, xi in (("plan", x[:, :40].contiguous()), ("row stride", x[:, :40]), ("column stride", x[:, ::2])):
        assert_matches_reference(mod(xi), case.reference(mod, xi), xi, mod, what)
        assert torch.equal(mod(xi), _op_path(mod, xi)), what


@needs_native
def test_valid_in_place_weight_edit_is_seen(gen, case):
    mod = case.build(40, 24, True, gen)
    x = torch.randn(5, 40, generator=gen)
    _check_valid_edit_is_seen(mod, case, x)


def _check_valid_edit_is_seen(mod, case, x):
    """Edit mod's weights in place (valid values); the next call must see it."""
    before = mod(x)
    with torch.no_grad():
        t = getattr(mod, _edit_name(mod))
        if t.dtype == torch.int64:  # packed binary weights: negate every weight
            t.copy_(_scaled(t, mod))
        else:
            t[0].copy_(torch.flip(t[0], (0,)) if t.dtype == torch.int8 else t[0] * 3)
    after = mod(x)
    assert not torch.equal(after, before)
    assert_matches_reference(after, case.reference(mod, x), x, mod)


@needs_native
def test_in_place_edits_are_seen_in_inference_mode(gen, case):
    """Built, loaded (assign=True) and edited under torch.inference_mode, whose
    tensors have no version counter: the module keeps normal copies, so a valid
    in-place edit is seen and an invalid one refused at the next call."""
    x = torch.randn(5, 40, generator=gen)
    with torch.inference_mode():
        mod = case.build(40, 24, True, gen)
        assert not any(getattr(mod, n).is_inference() for n in mod.WEIGHT_NAMES if getattr(mod, n) is not None)
        loaded = copy.deepcopy(mod)
        loaded.load_state_dict({k: v.clone() for k, v in mod.state_dict().items()}, assign=True)
        for m in (mod, loaded):
            _check_valid_edit_is_seen(m, case, x)
            for bad_name, bad in case.bad_values(m).items():
                if bad_name in m._READ_IN_PLACE:
                    continue
                edited = copy.deepcopy(m)
                getattr(edited, bad_name).copy_(bad)
                with pytest.raises(ValueError, match=bad_name):
                    edited(x)


def test_invalid_canonical_values_are_refused(gen, case):
    mod = case.build(40, 24, True, gen)
    x = torch.randn(5, 40, generator=gen)
    y = mod(x)
    for name, bad in case.bad_values(mod).items():
        sd = dict(mod.state_dict())
        sd[name] = bad
        with pytest.raises(RuntimeError, match=name):
            mod.load_state_dict(sd)
        assert torch.equal(mod(x), y), f"{name}: a refused state_dict changed the module"
        with pytest.raises(ValueError, match=name):
            setattr(mod, name, bad)
        assert torch.equal(mod(x), y), f"{name}: a refused assignment changed the module"
        edited = copy.deepcopy(mod)
        with torch.no_grad():
            getattr(edited, name).copy_(bad)
        if name in mod._READ_IN_PLACE:  # read in place by every path: the same non-finite rows everywhere
            y_plan, y_rows, y_op = edited(x), edited(torch.cat([x, x], 1)[:, :40]), _op_path(edited, x)
            assert torch.equal(y_plan.isnan(), y_op.isnan()) and torch.equal(y_rows.isnan(), y_op.isnan())
            assert y_op.isnan().any()
        else:  # the packing was built from it: the next call repacks, validates and refuses
            with pytest.raises(ValueError, match=name):
                edited(x)
        swapped = copy.deepcopy(mod)
        getattr(swapped, name).data = bad
        with pytest.raises(ValueError, match=name):
            swapped(x[:, :40])
    wrong = copy.deepcopy(mod)
    wrong.bias.data = torch.randn(7)  # wrong shape through .data: refused at the call, never read out of bounds
    with pytest.raises(ValueError, match="bias"):
        wrong(x)
    view = copy.deepcopy(mod)
    view(x)  # a plan exists
    view.bias.data = view.bias.data[:7]  # the same memory, another shape: the plan must not go on reading 24
    with pytest.raises(ValueError, match="bias"):
        view(x)


# ---- calls ---------------------------------------------------------------------------------
def test_bad_input_names_the_argument(gen, case):
    mod = case.build(40, 24, True, gen)
    with pytest.raises(TypeError, match="x"):
        mod([1.0] * 40)
    with pytest.raises(ValueError, match="x"):
        mod(torch.randn(3, 41))
    with pytest.raises(TypeError, match="x"):
        mod(torch.randint(0, 5, (3, 40)))
    with pytest.raises(TypeError, match="x"):
        mod(torch.randn(3, 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="x"):
        mod(torch.randn(()))
    # sparse inputs: named, not torch's "reshape is not implemented" / "no strides"
    dense = torch.randn(3, 40, generator=gen)
    for sparse in (dense.to_sparse(), dense.to_sparse_csr()):
        with pytest.raises(TypeError, match=r"x: expected a dense \(strided\) tensor"):
            mod(sparse)
    with pytest.raises((TypeError, ValueError), match="in_features"):
        case.cls(0, 24)


def test_hooks_run(gen, case):
    mod = case.build(40, 24, True, gen)
    x = torch.randn(3, 40, generator=gen)
    y = mod(x)
    seen = []
    h1 = mod.register_forward_pre_hook(lambda m, a: (a[0] * 2,))
    h2 = mod.register_forward_hook(lambda m, a, out: seen.append(out.shape) or out + 1)
    assert torch.allclose(mod(x), mod.__class__.forward(mod, x * 2) + 1)
    assert seen == [torch.Size([3, 24])]
    h1.remove(), h2.remove()
    assert torch.equal(mod(x), y)


def test_shared_at_two_paths(gen, case):
    mod = case.build(24, 24, True, gen)
    net = nn.Sequential(mod, nn.Tanh(), mod)
    x = torch.randn(4, 24, generator=gen)
    assert torch.equal(net(x), mod(torch.tanh(mod(x))))


def test_threads(gen, case):
    mods = [case.build(64, 40, True, gen) for _ in range(2)]
    xs = [torch.randn(m, 64, generator=gen) for m in (1, 7, 33)]
    want = [[mod(x) for x in xs] for mod in mods]
    errors = []

    def work():
        try:
            for _ in range(20):
                for i, mod in enumerate(mods):
                    for j, x in enumerate(xs):
                        if not torch.equal(mod(x), want[i][j]):
                            errors.append((i, j))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    _run_in_threads(work, errors)


# ---- state changed behind the module, every way (review findings) ------------------------
def _edit_name(mod):
    for name in ("weight_int8", "weight_bits"):
        if hasattr(mod, name):
            return name
    return "values"


def _scaled(t, mod=None):
    """A valid edit of a canonical buffer: float x2, int8 x2 where it fits, packed binary weights negated."""
    if t.dtype == torch.int64:
        return t ^ bf.valid_bits_mask(t.shape, mod._oc(), mod._cg())
    return t * 2 if t.is_floating_point() else torch.where(t.abs() <= 60, t * 2, t)


def test_edits_are_seen_off_the_plan_path(gen, case):
    """Tensor-subclass inputs, F.linear with another bias, and a module without a
    native plan all see an in-place edit of the weights."""
    mod = case.build(40, 24, True, gen)
    x = torch.randn(5, 40, generator=gen)
    mod(x)
    name = _edit_name(mod)
    with torch.no_grad():
        getattr(mod, name).copy_(_scaled(getattr(mod, name), mod))
    want = case.reference(mod, x)
    assert_matches_reference(mod(nn.Parameter(x, requires_grad=False)), want, x, mod, "Parameter input")
    if case.linear_map:
        other = torch.randn(24, generator=gen)
        assert torch.allclose(F.linear(x, mod.weight, other), want - mod.bias + other, rtol=1e-5, atol=1e-4)
    mod.bias = torch.randn(48, generator=gen)[::2]  # a non-contiguous bias: no native plan
    assert mod._plan is None
    with torch.no_grad():
        getattr(mod, name).copy_(_scaled(getattr(mod, name), mod))
    assert_matches_reference(mod(x), case.reference(mod, x), x, mod, "no plan")


def test_buffer_assignment_in_any_way_is_seen(gen, case):
    mod = case.build(40, 24, True, gen)
    x = torch.randn(5, 40, generator=gen)
    mod(x)
    mod.register_buffer("bias", torch.ones(24))
    assert torch.allclose(mod(x), case.reference(mod, x), rtol=1e-5, atol=1e-5)
    name = _edit_name(mod)
    mod._buffers[name] = _scaled(getattr(mod, name), mod)  # as accelerate's set_module_tensor_to_device does
    assert_matches_reference(mod(x), case.reference(mod, x), x, mod, "_buffers assignment")
    nobias = case.build(40, 24, False, gen)
    nobias.bias = torch.ones(24)
    assert "bias" in nobias.state_dict() and torch.allclose(nobias(x), case.reference(nobias, x), atol=1e-5)


def test_repaired_in_place_edit_works_again(gen, case):
    mod = case.build(40, 24, True, gen)
    x = torch.randn(5, 40, generator=gen)
    y = mod(x)
    name, bad = next(iter(case.bad_values(mod).items()))
    good = getattr(mod, name).clone()
    with torch.no_grad():
        getattr(mod, name).copy_(bad)
    with pytest.raises(ValueError, match=name):
        mod(x)
    with torch.no_grad():
        getattr(mod, name).copy_(good)
    assert torch.equal(mod(x), y)


def test_default_device_context_and_bias_gradient(gen, case):
    mod = case.build(40, 24, True, gen)
    x = torch.randn(5, 40, generator=gen)
    y = mod(x)
    with torch.device("meta"):
        assert torch.equal(mod(x), y)  # the output stays on x's device
    if not case.linear_map:
        return
    b = nn.Parameter(torch.zeros(24))
    F.linear(x, mod.weight, b).sum().backward()
    assert b.grad is not None and torch.equal(b.grad, torch.full((24,), 5.0))


# ==== Conv-shaped modules (pyaccel.nn._conv.PackedConv2d) ===================================
# The same contract for modules that take [N, C, H, W] (NCHW or channels_last)
# and return [N, Cout, OH, OW] in the input's memory format. A new conv family
# adds its ConvContractCase to CONV_CASES.
from pyaccel.nn import FusedDWSeparableConv2d, FusedDWSeparableInt8Conv2d  # noqa: E402


@dataclasses.dataclass
class ConvContractCase:
    name: str
    cls: type
    kernel: str  # key in pyaccel._C.kernel_params()
    build: Callable[[int, int, torch.Generator], nn.Module]  # (in_channels, out_channels, gen) -> random module
    reference: Callable[[nn.Module, Tensor], Tensor]  # float64-capable pure-PyTorch forward
    bad_values: Callable[[nn.Module], Dict[str, Tensor]]  # canonical buffers holding invalid values
    ctor_args: Callable[[nn.Module], tuple]
    edit_name: str  # a canonical buffer the packing is built from (for in-place edit tests)
    grad_reference: Optional[Callable[[nn.Module, Tensor], Tensor]] = None  # what backward differentiates
    rel: float = 1e-5  # |y - reference| <= rel * max|reference| (int8: the kernel's depthwise sums may round a
    #                    quantized activation the other way than the reference's: one step of 1/127)
    unbatched: bool = False  # takes [C, H, W] as nn.Conv2d does (else refuses it, naming x)


def _dws_build(c, co, gen, k=3, stride=1, padding=None, act1="relu6", act2="hardswish"):
    m = FusedDWSeparableConv2d(c, co, k, stride, padding, 1, act1, act2)
    with torch.no_grad():
        m.dw_weight.copy_(torch.randn(m.dw_weight.shape, generator=gen))
        m.dw_bias.copy_(torch.randn(c, generator=gen))
        m.pw_weight.copy_(torch.randn(m.pw_weight.shape, generator=gen) / c ** 0.5)
        m.bias.copy_(torch.randn(co, generator=gen))
    m._repack()
    return m


def _dws_reference(m, x):
    g = m.geometry
    return reference.dws_conv2d(x, m.dw_weight.to(x.dtype) if x.dtype == torch.float64 else m.dw_weight, m.dw_bias,
                                m.pw_weight, m.bias, g.stride, g.dilation, g.pads(x.shape[-2], x.shape[-1]), m.act1,
                                m.act2)


def _dws_int8_reference(m, x):
    g = m.geometry
    return reference.dws_conv2d_int8(x.float(), m.dw_weight, m.dw_bias, m.pw_weight_int8, m.pw_scale, m.bias,
                                     g.stride, g.dilation, g.pads(x.shape[-2], x.shape[-1]), m.act1, m.act2).to(x.dtype)


def _nan_weight(t: Tensor) -> Tensor:
    bad = t.clone()
    bad.view(-1)[0] = float("nan")
    return bad


def _xnor_conv(c, co, gen, k=3, stride=1, padding=1, mode="zeros", act=None):
    b = BinaryConv2d(c, co, k, stride=stride, padding=padding, binary_padding=mode)
    bn = nn.BatchNorm2d(co)
    with torch.no_grad():
        b.weight.copy_(torch.randn(b.weight.shape, generator=gen))
        b.bias.copy_(torch.randn(co, generator=gen))
        bn.running_mean.copy_(torch.randn(co, generator=gen))
        bn.running_var.copy_(torch.rand(co, generator=gen) + 0.5)
        bn.weight.copy_(torch.randn(co, generator=gen))  # negative gammas too
        bn.bias.copy_(torch.randn(co, generator=gen))
    return XnorConv2d.from_binary(b.eval(), bn.eval(), act)


def _xnor_conv_reference(m, x, ste=False):
    w = bf.unpack_conv_weight(m.weight_bits, m.out_channels, m.in_channels // m.groups, *m.kernel_size)
    return rb.binary_conv2d(x, w, m.scale, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode,
                            m.act, (m.act_lo, m.act_hi), m.slope, ste=ste)


_XNOR_CONV_CTOR = lambda m: (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,  # noqa: E731
                             m.dilation, m.groups, m.bias is not None, m.padding_mode, m.act, m.act_lo, m.act_hi)

CONV_CASES = [
    ConvContractCase(
        "FusedDWSeparableConv2d", FusedDWSeparableConv2d, "dws",
        build=lambda c, co, gen: _dws_build(c, co, gen),
        reference=_dws_reference,
        bad_values=lambda m: {"dw_weight": _nan_weight(m.dw_weight), "pw_weight": _nan_weight(m.pw_weight)},
        ctor_args=lambda m: (m.in_channels, m.out_channels, m.geometry.kernel, m.geometry.stride,
                             m.geometry.padding, m.geometry.dilation, m.act1, m.act2),
        edit_name="pw_weight", unbatched=True,
    ),
    ConvContractCase(
        "FusedDWSeparableConv2d-k5s2-tf_same", FusedDWSeparableConv2d, "dws",
        build=lambda c, co, gen: _dws_build(c, co, gen, 5, 2, "tf_same", "silu", "none"),
        reference=_dws_reference,
        bad_values=lambda m: {"dw_weight": _nan_weight(m.dw_weight)},
        ctor_args=lambda m: (m.in_channels, m.out_channels, m.geometry.kernel, m.geometry.stride,
                             m.geometry.padding, m.geometry.dilation, m.act1, m.act2),
        edit_name="dw_weight", unbatched=True,
    ),
    ConvContractCase(
        "FusedDWSeparableInt8Conv2d", FusedDWSeparableInt8Conv2d, "dws",
        build=lambda c, co, gen: FusedDWSeparableInt8Conv2d.from_float(_dws_build(c, co, gen)),
        reference=_dws_int8_reference,
        bad_values=lambda m: {"pw_weight_int8": _minus_128(m.pw_weight_int8), "pw_scale": _nan_scale(m.pw_scale)},
        ctor_args=lambda m: (m.in_channels, m.out_channels, m.geometry.kernel, m.geometry.stride,
                             m.geometry.padding, m.geometry.dilation, m.act1, m.act2),
        edit_name="dw_weight", rel=2e-2, unbatched=True,
        grad_reference=lambda m, x: reference.dws_conv2d(  # activation quantization passes gradients straight
            x, m.dw_weight, m.dw_bias, (m.pw_weight_int8.float() * m.pw_scale[:, None])[..., None, None], m.bias,
            m.geometry.stride, m.geometry.dilation, m.geometry.pads(x.shape[-2], x.shape[-1]), m.act1, m.act2),
    ),
    ConvContractCase(
        "XnorConv2d", XnorConv2d, "binary",
        build=lambda c, co, gen: _xnor_conv(c, co, gen, act=nn.PReLU(co, init=-0.2)),
        reference=_xnor_conv_reference,
        bad_values=lambda m: {"weight_bits": _padding_bit(m.weight_bits), "scale": _nan_scale(m.scale)},
        ctor_args=_XNOR_CONV_CTOR, edit_name="weight_bits", unbatched=True,
        grad_reference=lambda m, x: _xnor_conv_reference(m, x, ste=True),
    ),
    ConvContractCase(  # 5 x 5, stride 2, one padding, Hardtanh
        "XnorConv2d-k5s2-ones", XnorConv2d, "binary",
        build=lambda c, co, gen: _xnor_conv(c, co, gen, 5, 2, 2, "ones", nn.Hardtanh(-0.5, 2.0)),
        reference=_xnor_conv_reference,
        bad_values=lambda m: {"weight_bits": _padding_bit(m.weight_bits)},
        ctor_args=_XNOR_CONV_CTOR, edit_name="weight_bits", unbatched=True,
        grad_reference=lambda m, x: _xnor_conv_reference(m, x, ste=True),
    ),
]


@pytest.fixture(params=CONV_CASES, ids=lambda c: c.name)
def ccase(request) -> ConvContractCase:
    return request.param


def assert_conv_close(y, ref, what="", rel=1e-5):
    assert y.shape == ref.shape and y.dtype == ref.dtype, what
    if y.numel() == 0:
        return
    scale = ref.double().abs().max().item() + 1e-30
    err = (y.double() - ref.double()).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _cx(gen, c, n=2, h=9, w=7):
    return torch.randn(n, c, h, w, generator=gen)


@needs_native
def test_conv_tile_grid_matches_reference(isa, gen, ccase):
    p = _native.lib().kernel_params()[ccase.kernel]
    for c, co in [(1, 1), (15, p["nr"] - 1), (16, p["nr"]), (17, p["nr"] + 1), (40, 2 * p["nr"] + 3)]:
        mod = ccase.build(c, co, gen)
        for n, h, w in [(1, 1, 1), (1, p["mr"], 3), (2, 9, 7), (3, 14, 15)]:
            x = _cx(gen, c, n, h, w)
            y = mod(x)
            assert_conv_close(y, ccase.reference(mod, x.double()).float(), f"{isa} c={c} co={co} {n}x{h}x{w}",
                              rel=ccase.rel)
            assert torch.equal(y, mod._checked_op(x)), f"fast path != op path at c={c} co={co}"


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_input_layouts(isa, gen, ccase, dtype):
    mod = ccase.build(24, 20, gen)
    base = _cx(gen, 48, 3, 11, 10).to(dtype)
    for what, x in [("NCHW", base[:, :24].contiguous()), ("channels_last", base[:, :24].contiguous(
            memory_format=torch.channels_last)), ("channel stride", base[:, ::2]), ("N = 1", base[:1, :24]),
            ("empty batch", base[:0, :24].contiguous()), ("empty batch, channels_last", base[:0, :24].contiguous(
                memory_format=torch.channels_last)), ("odd H W", _cx(gen, 24, 1, 5, 3).to(dtype))]:
        y = mod(x)
        if x.numel() == 0:  # every format counts as contiguous here: compare the strides
            fmt = torch.channels_last if "channels_last" in what else torch.contiguous_format
            assert y.stride() == torch.empty(y.shape, memory_format=fmt).stride(), (what, y.stride())
        want_cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == dtype and (not want_cl or y.is_contiguous(memory_format=torch.channels_last)), what
        assert want_cl or y.is_contiguous(), what
        assert torch.equal(y, mod._checked_op(x)), what
        if dtype == torch.float32:
            assert_conv_close(y, ccase.reference(mod, x.double()).float(), what, rel=ccase.rel)


def test_conv_empty_batch_keeps_autograd_and_format(gen, ccase):
    """An empty batch that requires grad: the output follows the input's memory
    format and stays connected to it (backward runs), NCHW and channels_last."""
    mod = ccase.build(12, 10, gen)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(0, 12, 9, 7).contiguous(memory_format=fmt).requires_grad_()
        y = mod(x)
        assert y.requires_grad and y.stride() == torch.empty(y.shape, memory_format=fmt).stride(), fmt
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape, fmt


@needs_native
def test_conv_one_checkpoint_same_answer_on_every_isa(gen, ccase):
    src = ccase.build(33, 29, gen)
    x = _cx(gen, 33, 2, 12, 11)
    ref = ccase.reference(src, x.double()).float()
    outs = _outputs_on_every_isa(src, ccase.cls, ccase.ctor_args, x)
    assert outs
    for isa, y in outs.items():
        assert_conv_close(y, ref, isa, rel=ccase.rel)


def test_conv_jit_trace_fx_compile_export(gen, ccase):
    mod = ccase.build(16, 24, gen)
    net = nn.Sequential(mod, nn.ReLU())
    x = _cx(gen, 16, 2, 10, 10)
    with warnings.catch_warnings():  # the packing check is a constant of the trace, not a TracerWarning
        warnings.filterwarnings("error", category=torch.jit.TracerWarning, module=r"pyaccel\.nn\._packed")
        traced = torch.jit.trace(net, x)
    assert "pyaccel" in str(traced.graph)
    for shape in [(2, 16, 10, 10), (3, 16, 10, 10)]:
        xi = torch.randn(*shape, generator=gen)
        assert torch.equal(traced(xi), net(xi)), shape
    gm = torch.fx.symbolic_trace(net)
    assert ("call_module", "0") in [(n.op, n.target) for n in gm.graph.nodes]
    assert torch.equal(gm(x), net(x))
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True)
    for n in (2, 3):
        xi = _cx(gen, 16, n, 10, 10)
        assert torch.allclose(compiled(xi), mod(xi), rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(mod, (x,), dynamic_shapes=({0: batch},))
    for n in (1, 5):
        xi = _cx(gen, 16, n, 10, 10)
        assert torch.allclose(ep.module()(xi), mod(xi), rtol=1e-6, atol=1e-6)


def test_conv_backward_after_inference_mode(gen, ccase):
    """Conv modules built under torch.inference_mode hold normal tensors only
    (test_backward_after_inference_mode)."""
    with torch.inference_mode():
        mod = ccase.build(12, 10, gen)
        sd = {k: v.clone() for k, v in mod.state_dict().items()}
    loaded = ccase.build(12, 10, gen)
    loaded.load_state_dict(sd)
    for what, m in (("built", mod), ("loaded", loaded)):
        held = [v for v in vars(m).values() if isinstance(v, torch.Tensor)] + list(m.buffers())
        assert not any(t.is_inference() for t in held), what
        x = _cx(gen, 12, 2, 8, 9).requires_grad_()
        m(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, what


def test_conv_backward_reaches_the_input(gen, ccase):
    mod = ccase.build(12, 10, gen)
    x = _cx(gen, 12, 2, 8, 9).requires_grad_()
    y = mod(x)
    assert y.requires_grad
    with torch.no_grad():
        assert torch.equal(y.detach(), mod(x))
    g = torch.randn(y.shape, generator=gen)
    y.backward(g)
    xr = x.detach().double().requires_grad_()
    (ccase.grad_reference or ccase.reference)(mod, xr).backward(g.double())
    assert torch.allclose(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)
    net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), mod, nn.ReLU())
    net(torch.randn(2, 3, 8, 8, generator=gen)).sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
    assert torch.equal(mod.train()(x.detach()), mod.eval()(x.detach()))


def test_conv_copies_state_dict_meta_and_casts(gen, ccase):
    mod = ccase.build(16, 12, gen)
    x = _cx(gen, 16)
    y = mod(x)
    assert torch.equal(copy.deepcopy(mod)(x), y)
    assert torch.equal(pickle.loads(pickle.dumps(mod))(x), y)
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    fresh = ccase.cls(*ccase.ctor_args(mod))
    fresh.load_state_dict(mod.state_dict())
    assert torch.equal(fresh(x), y)
    with torch.device("meta"):
        m = ccase.cls(*ccase.ctor_args(mod))
    assert all(b.is_meta for b in m.buffers())
    m.load_state_dict(mod.state_dict(), assign=True)
    assert torch.equal(m(x), y)
    with torch.device("meta"):
        m2 = ccase.cls(*ccase.ctor_args(mod))
    m2 = m2.to_empty(device="cpu")
    m2.load_state_dict(mod.state_dict())
    assert torch.equal(m2(x), y)
    for cast in (lambda m: m.double(), lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.cpu()):
        m3 = cast(copy.deepcopy(mod))
        assert all(b.dtype == mod.get_buffer(name).dtype for name, b in m3.named_buffers())
        assert torch.equal(m3(x), y)


@needs_native
def test_conv_state_changed_behind_the_module(isa, gen, ccase):
    mod = ccase.build(16, 12, gen)
    x = _cx(gen, 16)
    before = mod(x)
    with torch.no_grad():
        t = getattr(mod, ccase.edit_name)
        t.copy_(_scaled(t, mod))
    after = mod(x)
    assert not torch.equal(after, before)
    assert_conv_close(after, ccase.reference(mod, x.double()).float(), "in-place edit", rel=ccase.rel)
    mod.bias.data = torch.randn(12, generator=gen)
    assert_conv_close(mod(x), ccase.reference(mod, x.double()).float(), ".data swap", rel=ccase.rel)
    mod.register_buffer("bias", torch.ones(12))
    assert_conv_close(mod(x), ccase.reference(mod, x.double()).float(), "register_buffer", rel=ccase.rel)


@needs_native
def test_conv_in_place_edits_are_seen_in_inference_mode(gen, ccase):
    """As test_in_place_edits_are_seen_in_inference_mode, for the conv modules."""
    x = _cx(gen, 16)
    with torch.inference_mode():
        mod = ccase.build(16, 12, gen)
        before = mod(x)
        t = getattr(mod, ccase.edit_name)
        assert not t.is_inference()
        t.copy_(_scaled(t, mod))
        after = mod(x)
    assert not torch.equal(after, before)
    assert_conv_close(after, ccase.reference(mod, x.double()).float(), "in-place edit", rel=ccase.rel)


def test_conv_invalid_canonical_values_are_refused(gen, ccase):
    mod = ccase.build(16, 12, gen)
    x = _cx(gen, 16)
    y = mod(x)
    for name, bad in ccase.bad_values(mod).items():
        sd = dict(mod.state_dict())
        sd[name] = bad
        with pytest.raises(RuntimeError, match=name):
            mod.load_state_dict(sd)
        assert torch.equal(mod(x), y)
        with pytest.raises(ValueError, match=name):
            setattr(mod, name, bad)
        assert torch.equal(mod(x), y)
        edited = copy.deepcopy(mod)
        with torch.no_grad():
            getattr(edited, name).copy_(bad)
        if name in mod._READ_IN_PLACE:  # read in place by every path: the same non-finite channels everywhere
            y_fast, y_op = edited(x), edited._checked_op(x)
            assert torch.equal(y_fast.isnan(), y_op.isnan()) and y_op.isnan().any()
        else:  # the packing was built from it: the next call repacks, validates and refuses
            with pytest.raises(ValueError, match=name):
                edited(x)
        swapped = copy.deepcopy(mod)
        getattr(swapped, name).data = bad
        with pytest.raises(ValueError, match=name):
            swapped(x)
    wrong = copy.deepcopy(mod)
    wrong.bias.data = torch.randn(7)
    with pytest.raises(ValueError, match="bias"):
        wrong(x)
    view = copy.deepcopy(mod)
    view(x)
    view.bias.data = view.bias.data[:7]  # the same memory, another shape
    with pytest.raises(ValueError, match="bias"):
        view(x)


def test_conv_bad_input_hooks_shared_threads(gen, ccase):
    mod = ccase.build(16, 16, gen)
    with pytest.raises(TypeError, match="x"):
        mod([1.0] * 16)
    with pytest.raises(ValueError, match="x"):
        mod(torch.randn(1, 15, 8, 8))
    with pytest.raises(TypeError, match="x"):
        mod(torch.randint(0, 5, (1, 16, 8, 8)))
    with pytest.raises(TypeError, match="x"):
        mod(torch.randn(1, 16, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"x: expected a dense \(strided\) tensor"):
        mod(torch.randn(1, 16, 8, 8, generator=gen).to_sparse())
    x3 = torch.randn(16, 8, 8, generator=gen)
    if ccase.unbatched:
        assert torch.equal(mod(x3), mod(x3[None])[0])
    else:
        with pytest.raises(ValueError, match="x"):
            mod(x3)
    with pytest.raises((TypeError, ValueError), match="in_channels"):
        ccase.cls(0, *ccase.ctor_args(mod)[1:])
    x = _cx(gen, 16, 2, 8, 8)
    y = mod(x)
    seen = []
    h1 = mod.register_forward_pre_hook(lambda m, a: (a[0] * 2,))
    h2 = mod.register_forward_hook(lambda m, a, out: seen.append(out.shape) or out + 1)
    assert torch.allclose(mod(x), mod.__class__.forward(mod, x * 2) + 1)
    assert len(seen) == 1
    h1.remove(), h2.remove()
    assert torch.equal(mod(x), y)
    net = nn.Sequential(mod, nn.Tanh(), mod)
    assert torch.equal(net(x), mod(torch.tanh(mod(x))))
    errors = []

    def work():
        try:
            for _ in range(10):
                if not torch.equal(mod(x), y):
                    errors.append("mismatch")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    _run_in_threads(work, errors)


@pytest.mark.parametrize("build", ["int8", "sparse24_int8", "block_sparse_int8"])
def test_nonfinite_float_weight_is_named_when_quantized(build):
    """An inf / NaN in the float weight given to an int8 constructor names `weight`
    and its row (before: a derived buffer, "weight_scale: expected finite scales")."""
    from pyaccel.formats import block_sparse as bsf
    from pyaccel.formats import sparse24 as s24f
    from pyaccel.nn import BlockSparseInt8Linear, Int8Linear, Sparse24Int8Linear
    for bad in (float("nan"), float("inf")):
        w = torch.randn(8, 16)
        w = w * s24f.mask_24(w)
        w[5, 1 if w[5, 1] != 0 else 0] = bad
        w[5] = w[5] * s24f.mask_24(w[5:6])[0]  # still 2:4 with the bad value kept
        lin = nn.Linear(16, 8)
        with torch.no_grad():
            lin.weight.copy_(w)
        with pytest.raises(ValueError, match=r"weight: expected finite values.*row 5"):
            if build == "int8":
                Int8Linear.from_float(lin)
            elif build == "sparse24_int8":
                Sparse24Int8Linear.from_float(lin)
            else:
                BlockSparseInt8Linear.from_dense(w, None, (1, 4))


@needs_native
@pytest.mark.parametrize("m", [2, 5, 9, 33])
def test_output_does_not_depend_on_the_thread_count(isa, gen, case, m):
    """The same bits at 1, 2 and 3 threads: how rows and channels are split
    between threads (which also changes when a loaded machine starts a worker
    late) never changes a result."""
    mod = case.build(512, 256, True, gen)
    x = torch.randn(m, 512, generator=gen)
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(mod(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
