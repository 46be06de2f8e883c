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

}  // namespace
}  // namespace sparse24
}  // namespace pyaccel
