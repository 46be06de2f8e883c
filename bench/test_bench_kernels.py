"""pytest-benchmark microbenchmarks for the int8 and 2:4 linears (run with
`pytest bench/ --benchmark-only`). The full interleaved comparison
is `python -m pyaccel.bench`; these give per-candidate statistics."""
import warnings

import pytest
import torch
from torch import nn

import pyaccel
from pyaccel.nn import Int8Linear

SHAPES = [(1024, 4096, 1), (1024, 4096, 128), (4096, 4096, 8)]


@pytest.fixture(scope="module", autouse=True)
def _info():
    print("\n" + str(pyaccel.backend_info()))


def _setup(n, k, m):
    torch.manual_seed(0)
    lin = nn.Linear(k, n).eval()
    return lin, torch.randn(m, k)


@pytest.mark.parametrize("n,k,m", SHAPES)
def test_pyaccel_int8(benchmark, n, k, m):
    lin, x = _setup(n, k, m)
    mod = Int8Linear.from_float(lin)
    benchmark.extra_info["isa"] = pyaccel.backend_info().cpu_isa
    with torch.inference_mode():
        benchmark(mod, x)


@pytest.mark.parametrize("n,k,m", SHAPES)
def test_torch_ao_int8(benchmark, n, k, m):
    lin, x = _setup(n, k, m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
    with torch.inference_mode():
        benchmark(q, x)


@pytest.mark.parametrize("n,k,m", SHAPES)
def test_torch_fp32(benchmark, n, k, m):
    lin, x = _setup(n, k, m)
    with torch.inference_mode():
        benchmark(lin, x)


@pytest.mark.parametrize("n,k,m", SHAPES)
def test_pyaccel_sparse24_fp32(benchmark, n, k, m):
    from pyaccel.formats.sparse24 import mask_24
    from pyaccel.nn import Sparse24Linear

    lin, x = _setup(n, k, m)
    w = lin.weight.detach() * mask_24(lin.weight)
    mod = Sparse24Linear.from_dense(w, lin.bias.detach())
    benchmark.extra_info["isa"] = pyaccel.backend_info().cpu_isa
    with torch.inference_mode():
        benchmark(mod, x)
