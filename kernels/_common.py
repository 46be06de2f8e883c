"""Helpers shared by the Triton kernel modules."""
import os


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, no libdevice, small tiles)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def tile_ranges(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(rows, columns, k offsets) of this program's [BLOCK_M, BLOCK_N] output tile."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, tl.arange(0, BLOCK_K)


@triton.jit
def load_rows(ptr, rm, kk, M, K, stride_m):
    """The [rows rm, columns kk] tile of a row-major [M, K] matrix, zeros outside."""
    return tl.load(ptr + rm[:, None].to(tl.int64) * stride_m + kk[None, :],
                   mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)


@triton.jit
def dequant_store(acc, sx_ptr, sw_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    """The int8 epilogue: y[m, n] = float(acc) * sx[m] * sw[n] + bias[n], stored in y's dtype,
    formed as (float(acc) * lo) * (hi * sw) with (lo, hi) = (sx, 1) for sx < 1, else (1, sx)
    (pyaccel.reference.int8_linear, csrc/int8_gemm/int8_gemm.h split_scale)."""
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
    small = sx < 1.0
    lo = tl.where(small, sx, 1.0)
    hi = tl.where(small, 1.0, sx)
    y = (acc.to(tl.float32) * lo[:, None]) * (hi[:, None] * sw[None, :])
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
