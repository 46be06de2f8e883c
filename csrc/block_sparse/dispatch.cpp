// Kernel choice and the driver of the BSR fp32 linear: x in place when it is
// fp32 (any row stride), else converted to fp32 in row passes; threads split
// the block rows into ranges of about equal numbers of kept blocks.
#include <algorithm>
#include <cstring>
#include <vector>

#include "block_sparse/block_sparse.h"
#include "common/bf16.h"
#include "common/ladder.h"
#include "common/parallel.h"
#include "common/row_passes.h"

namespace pyaccel {
namespace block_sparse {
namespace {

const Kernel kLadder[] = {
    {Isa::kAvx512, "bsr_gemm_6x64_avx512", 8, bsr_gemm_avx512, bsr_small_rows_avx512, bsr_small_slabs_avx512,
     bsr_pack_slabs_avx512, true, bsr_scatter_avx512, 16},
    {Isa::kAvx2, "bsr_gemm_6x16_avx2", 6, bsr_gemm_avx2, bsr_small_rows_avx2, bsr_small_slabs_avx2, bsr_pack_slabs_avx2,
     false, bsr_scatter_avx2, 8},
    {Isa::kPortable, "bsr_gemm_1x16_scalar", 1, bsr_gemm_scalar, bsr_small_rows_scalar, bsr_small_slabs_scalar,
     bsr_pack_slabs_scalar, false, nullptr, 0},
};
thread_local std::vector<float> t_xt;

LadderChoice<Kernel> g_choice;
thread_local std::vector<float> t_x;

// Below this many multiply-adds (kept blocks only) one thread is faster.
constexpr int64_t kMinParallelMacs = int64_t(1) << 18;


}  // namespace

const Kernel& select_kernel() {
  return g_choice.get(kLadder, [](const Kernel& k) { return k.isa; });
}

void store_scalar(const GemmArgs& g, int64_t m, int64_t n, float v) {
  if (g.bias) v += g.bias[n];
  if (g.y_bf16)
    static_cast<uint16_t*>(g.y)[m * g.ldy + n] = fp32_to_bf16_rne(v);
  else
    static_cast<float*>(g.y)[m * g.ldy + n] = v;
}

void linear(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, const uint8_t* packed,
            const float* bias, void* y, int64_t ldy, bool y_bf16, int nthreads) {
  if (m <= 0) return;
  const Kernel& kern = select_kernel();
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  const int32_t* rowptr = reinterpret_cast<const int32_t*>(packed + sizeof(h));
  const int32_t* colk = rowptr + h.nbr + 1;
  const float* blocks = reinterpret_cast<const float*>(packed + h.data_offset);
  if (m * h.nnzb * h.bh * h.bw < kMinParallelMacs) nthreads = 1;
  const size_t ysize = y_bf16 ? 2 : 4;
  const int64_t nbr = h.nbr;
  const int64_t nt = std::max<int64_t>(1, nthreads);
  // Threads take block-row ranges of about equal kept blocks.
  auto by_blocks = [&](const auto& fn) { split_by_blocks(rowptr, nbr, h.nnzb, nthreads, fn); };
  // small blocks (layout 2) carry band lists where bw % 4 == 0
  const BandLists lists = kern.scatter && h.layout == kLayoutF32RowMajor ? BandLists::at(packed) : BandLists{};
  if (h.layout == kLayoutF32RowMajor && m >= kSlabRowsFrom) {
    // many rows: x transposed into slabs of 16 rows (8 for batches of <= 8
    // rows where the kernel has them), in row passes
    const int sw = lists.goff ? (kern.scatter_sw == 8 || m <= 8 ? 8 : 16) : (kern.narrow_slabs && m <= 8 ? 8 : 16);
    // the scatter kernel reads whole groups of 4 inputs: lines past k are zero
    const int64_t kp = lists.goff ? lists.ngroups * 4 : k;
    for_each_row_pass(m, kp * 4, kRowPassBytes, sw, [&](int64_t p0, int64_t p1) {
      const int64_t rows = p1 - p0, slabs = (rows + sw - 1) / sw;
      if (t_xt.size() < static_cast<size_t>(slabs * kp * sw + 16)) t_xt.resize(slabs * kp * sw + 16);
      float* xt = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(t_xt.data()) + 63) & ~uintptr_t(63));
      const char* xp = static_cast<const char*>(x) + p0 * ldx * (x_bf16 ? 2 : 4);
      auto pack = [&](int64_t s0, int64_t s1) { kern.pack_slabs(xp, ldx, x_bf16, rows, k, xt, slabs, s0, s1, sw); };
      if (kp > k) std::memset(xt + k * slabs * sw, 0, (kp - k) * slabs * sw * sizeof(float));
      GemmArgs g{nullptr, 0, rowptr, colk, blocks, k, h.n, h.bh, h.bw, h.bh_pad, bias,
                 static_cast<char*>(y) + p0 * ldy * ysize, ldy, y_bf16};
      if (lists.goff) {
        g.lists = lists;
        if (nt > 1 && lists.nbands < 2 * nt && slabs >= 2) {
          parallel_for(slabs, 1, nthreads, pack);
          parallel_for(slabs, 1, nthreads,
                       [&](int64_t s0, int64_t s1) { kern.scatter(g, xt, slabs, rows, s0, s1, 0, lists.nbands, sw); });
        } else {
          // one team: x into slabs, then (band, slab chunk) items handed out one at a time (a slow core
          // takes fewer). With fewer than 4 bands a thread (1024 channels: 4 bands) the slabs are cut into
          // up to ceil(slabs / 4) chunks (chunks of >= 4 slabs, the kernel's widest pass, from 8 slabs),
          // so that the items still spread over the team.
          const int64_t want = 4 * nt, nb = lists.nbands;
          const int64_t chunks = nb >= want ? 1 : std::max<int64_t>(1, std::min((slabs + 3) / 4, (want + nb - 1) / nb));
          const int64_t per = (slabs + chunks - 1) / chunks;
          parallel_two_phase(
              slabs, nb * chunks, nthreads, pack,
              [&](int64_t i0, int64_t i1) {
                for (int64_t i = i0; i < i1; ++i) {
                  const int64_t b = i / chunks, s0 = (i % chunks) * per, s1 = std::min(slabs, s0 + per);
                  if (s0 < s1) kern.scatter(g, xt, slabs, rows, s0, s1, b, b + 1, sw);
                }
              },
              nb * chunks);
        }
        return;
      }
      parallel_for(slabs, 1, nthreads, pack);
      if (nt > 1 && nbr < 2 * nt && slabs >= 2)
        parallel_for(slabs, 1, nthreads,
                     [&](int64_t s0, int64_t s1) { kern.small_slabs(g, xt, slabs, rows, s0, s1, 0, nbr, sw); });
      else
        by_blocks([&](int64_t r0, int64_t r1) { kern.small_slabs(g, xt, slabs, rows, 0, slabs, r0, r1, sw); });
    });
    return;
  }
  const GemmFn gemm = h.layout == kLayoutF32RowMajor ? kern.small_rows : kern.gemm;
  for_each_row_pass(m, k * 4, x_bf16 ? kRowPassBytes : INT64_MAX / 2, 16, [&](int64_t p0, int64_t p1) {
    const int64_t rows = p1 - p0;
    const float* xf;
    int64_t lx = ldx;
    if (x_bf16) {
      if (t_x.size() < static_cast<size_t>(rows * k)) t_x.resize(rows * k);
      float* s = t_x.data();
      const uint16_t* xs = static_cast<const uint16_t*>(x) + p0 * ldx;
      parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), nthreads,
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r)
                       for (int64_t i = 0; i < k; ++i) s[r * k + i] = bf16_as_fp32(xs[r * ldx + i]);
                   });
      xf = s;
      lx = k;
    } else {
      xf = static_cast<const float*>(x) + p0 * ldx;
    }
    const GemmArgs g{xf, lx, rowptr, colk, blocks, k, h.n, h.bh, h.bw, h.bh_pad, bias,
                     static_cast<char*>(y) + p0 * ldy * ysize, ldy, y_bf16};
    // with fewer block rows than 2 per thread, threads split the rows of x instead
    if (nt > 1 && nbr < 2 * nt && rows >= 2 * kern.mr)
      parallel_for(rows, kern.mr, nthreads, [&](int64_t m0, int64_t m1) { gemm(g, m0, m1, 0, nbr); });
    else
      by_blocks([&](int64_t r0, int64_t r1) { gemm(g, 0, rows, r0, r1); });
  });
}

}  // namespace block_sparse
}  // namespace pyaccel
