// Shared by the column kernels (AVX-512 and AVX2 files): the slab walk of the
// x transposition, an 8 x 8 fp32 transpose and the memory-operand FMA. Internal linkage: each ISA
// file compiles its own copy with its own flags.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "common/transpose_avx2.h"
#include "sparse24/sparse24.h"

namespace pyaccel {
namespace sparse24 {
namespace {

// acc += w * (the vector at p), always as vfmadd231ps with a memory operand:
// with intrinsics GCC picks the 132 form into the dying weight register and
// then moves accumulators between registers (same speed measured, less noise
// in the loop). V: __m512 or __m256.
template <typename V>
inline void fma231(V& acc, V w, const char* p) {
  asm("vfmadd231ps %[m], %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [m] "m"(*reinterpret_cast<const V*>(p)));
}

// Walks slabs [s0, s1) of 16 rows in blocks of KB inputs: block(row0, rows,
// cols, k0, out) with the block's first row, its real rows (<= 16) and inputs
// (0 past k), and where its lines xt[slab][k0..][0..16) start.
template <int KB, typename Block>
inline void for_each_xt_block(int64_t m, int64_t k, int64_t kp, float* xt, int64_t s0, int64_t s1,
                              const Block& block) {
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t rows = m - s * 16 < 16 ? m - s * 16 : 16;
    float* out = xt + s * slab_floats(kp);
    for (int64_t k0 = 0; k0 < kp; k0 += KB) {
      const int64_t cols = k - k0 <= 0 ? 0 : (k - k0 < KB ? k - k0 : KB);
      block(s * 16, rows, cols, k0, out + k0 * 16);
    }
  }
}

// The ISA files' x transposition: whole fp32 blocks (16 rows x KB inputs) go
// to full(x at the block's first element, ldx, out), the others (rows past m,
// inputs past k, bf16) to edge(x, ldx, x_bf16, row0, rows, cols, k0, out), kept
// out of line so that the loop over blocks inlines the whole-block path.
template <int KB, typename Full, typename Edge>
inline void pack_xt_blocks(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, int64_t kp, float* xt,
                           int64_t s0, int64_t s1, const Full& full, const Edge& edge) {
  const float* const xf = static_cast<const float*>(x);
  for_each_xt_block<KB>(m, k, kp, xt, s0, s1, [&](int64_t row0, int64_t rows, int64_t cols, int64_t k0, float* out) {
    if (rows == 16 && cols == KB && !x_bf16)
      full(xf + row0 * ldx + k0, ldx, out);
    else
      edge(x, ldx, x_bf16, row0, rows, cols, k0, out);
  });
}
}  // namespace
}  // namespace sparse24
}  // namespace pyaccel
