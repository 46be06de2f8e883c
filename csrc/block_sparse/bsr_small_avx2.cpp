// BSR fp32 with small blocks, AVX2 + FMA: the loops of bsr_small_generic.h
// compiled with AVX2 flags (the slab kernel's 16-lane loops become two ymm FMAs).
#include "block_sparse/bsr_small_generic.h"

namespace pyaccel {
namespace block_sparse {

void bsr_small_rows_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  small_rows_generic(g, m0, m1, r0, r1);
}

void bsr_small_slabs_avx2(const GemmArgs& g, const float* xt, int64_t nslabs, int64_t m, int64_t s0, int64_t s1,
                          int64_t r0, int64_t r1, int /*sw: 16 here*/) {
  small_slabs_generic(g, xt, nslabs, m, s0, s1, r0, r1);
}

void bsr_pack_slabs_avx2(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, float* xt, int64_t nslabs,
                         int64_t s0, int64_t s1, int /*sw: 16 here*/) {
  pack_slabs_generic(x, ldx, x_bf16, m, k, xt, nslabs, s0, s1);
}

}  // namespace block_sparse
}  // namespace pyaccel
