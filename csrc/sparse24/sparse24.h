// 2:4 semi-structured sparse linear with fp32 values:
//
//   y[m, n] = sum_g ( x[m, 4g + i0] * v0[n, g] + x[m, 4g + i1] * v1[n, g] ) + bias[n]
//
// x: fp32 or bf16 activations; values fp32; positions i0 < i1 in 0..3 per
// group of 4 input features. Half the multiply-adds of dense and about half
// the weight bytes (8 value bytes + 1 position byte per group of 4, vs 16).
#pragma once
#include <cstdint>

#include "common/cpu_features.h"

namespace pyaccel {
namespace sparse24 {

// ---- packed layout "S24F32_P16B4" -----------------------------------------
// Panels of 16 output channels; inside a panel, groups in blocks of 4:
//   v0[4 groups][16 ch] fp32 | v1[4][16] fp32 | pos[4][16] uint8 (i0 | i1 << 2)
// = 576 bytes (9 cache lines) per block. The position byte serves the kernels
// directly: vpermps picks x[4g + (byte & 3)] from 4 x values repeated across
// the register, and byte >> 2 gives i1. n pads to 16, groups to 4 (zeros).
constexpr int kPanel = 16;
constexpr int kBlockGroups = 4;
constexpr int64_t kBlockBytes = kBlockGroups * kPanel * (4 + 4 + 1);
constexpr uint32_t kMagic = 0x34325350u;  // "PS24"
constexpr int32_t kLayoutF32P16B4 = 1;

struct PackedHeader {
  uint32_t magic;
  int32_t layout;
  int64_t n, k;
  int64_t n_pad, groups_pad;  // n to 16, ceil(k/4) to 4
  int64_t data_offset;
  int64_t reserved[2];
};
static_assert(sizeof(PackedHeader) == 64, "header must stay 64 bytes");

int64_t packed_nbytes(int64_t n, int64_t k);
// values: fp32 [n, 2*ceil(k/4)] (row stride ldv); pos: uint8 [n, ceil(k/4)]
// (row stride ldp), one byte per group = i0 | i1 << 2.
void pack(const float* values, int64_t ldv, const uint8_t* pos, int64_t ldp, int64_t n,
          int64_t k, uint8_t* out);
const char* check_packed(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k);

// ---- kernels --------------------------------------------------------------
struct GemmArgs {
  const float* x;  // [m, >= 4*groups_pad] fp32, row stride ldx, zero past k
  int64_t ldx;
  const uint8_t* w;  // packed blocks (after the header)
  const float* bias;  // [n] or nullptr
  void* y;  // [m, n] fp32 or bf16, row stride ldy
  int64_t ldy;
  bool y_bf16;
  int64_t m, n, groups_pad;
};
// rows [m0, m1) x panels [p0, p1)
using GemmFn = void (*)(const GemmArgs&, int64_t m0, int64_t m1, int64_t p0, int64_t p1);

struct Kernel {
  Isa isa;
  const char* name;
  int mr;
  GemmFn gemm;
};
const Kernel& select_kernel();

void linear(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, const uint8_t* packed,
            const float* bias, void* y, int64_t ldy, bool y_bf16, int nthreads);

void s24_gemm_1x16_scalar(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void s24_gemm_4x8_avx2(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
void s24_gemm_6x32_avx512(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);

}  // namespace sparse24
}  // namespace pyaccel
