// Kernel choice and driver of the BSR int8 linear: activations quantized per
// row by int8_gemm's quantizers in row passes (bounded scratch), then the
// block rows split over threads by kept blocks, as in the fp32 driver.
#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "block_sparse/block_sparse.h"
#include "common/ladder.h"
#include "common/parallel.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace block_sparse {
namespace {

struct EntryI8 {
  KernelI8 kernel;
  int8_gemm::QuantizeRowsFn quantize;
};

const EntryI8 kLadderI8[] = {
    {{Isa::kAvx512Vnni, "qs8_bsr_gemm_6x64c4_avx512vnni", 6, 0x80, qs8_bsr_gemm_avx512vnni, qs8_bsr_slabs_avx512vnni,
      qs8_bsr_rows_avx512vnni, qs8_bsr_pack_groups_avx512, 16, true},
     int8_gemm::quantize_rows_avx512},
    {{Isa::kAvxVnni, "qs8_bsr_gemm_4x16c4_avxvnni", 4, 0x80, qs8_bsr_gemm_avxvnni, qs8_bsr_slabs_avxvnni,
      qs8_bsr_rows_avxvnni, qs8_bsr_pack_groups_avx2, 8, false},
     int8_gemm::quantize_rows_avx2},
    {{Isa::kAvx2, "qs8_bsr_gemm_4x16c4_avx2", 4, 0x00, qs8_bsr_gemm_avx2, qs8_bsr_slabs_avx2, qs8_bsr_rows_avx2,
      qs8_bsr_pack_groups_avx2, 8, false},
     int8_gemm::quantize_rows_avx2},
    {{Isa::kPortable, "qs8_bsr_gemm_1x16c4_scalar", 1, 0x00, qs8_bsr_gemm_scalar}, int8_gemm::quantize_rows_scalar},
};

LadderChoice<EntryI8> g_choice_i8;
thread_local std::vector<int32_t> t_xg;

// This thread's slab buffer for `words` int32 (64-byte aligned, grown on demand).
int32_t* slab_scratch(int64_t words) {
  if (t_xg.size() < static_cast<size_t>(words + 16)) t_xg.resize(words + 16);
  return reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(t_xg.data()) + 63) & ~uintptr_t(63));
}

constexpr int64_t kMinParallelMacs = int64_t(1) << 19;

const EntryI8& select_entry() {
  return g_choice_i8.get(kLadderI8, [](const EntryI8& e) { return e.kernel.isa; });
}


}  // namespace

const KernelI8& select_kernel_int8() { return select_entry().kernel; }

void linear_int8(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, const uint8_t* packed,
                 const float* w_scale, const float* bias, void* y, int64_t ldy, bool y_bf16, int nthreads) {
  if (m <= 0) return;
  const EntryI8& e = select_entry();
  const KernelI8& kern = e.kernel;
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  const int32_t* rowptr = reinterpret_cast<const int32_t*>(packed + sizeof(h));
  const int32_t* colk = rowptr + h.nbr + 1;
  const int64_t comp_offset = round_up(static_cast<int64_t>(sizeof(h)) + 4 * (h.nbr + 1 + h.nnzb), 64);
  const int32_t* comp = reinterpret_cast<const int32_t*>(packed + comp_offset);
  const int8_t* blocks = reinterpret_cast<const int8_t*>(packed + h.data_offset);
  const int32_t* w4 = kern.slabs ? compact_int8(packed) : nullptr;
  // the compact row kernels' per-word work (activation words by scalar loads): priced at 20x a MAC of the others
  const int64_t work = m * h.nnzb * h.bh * h.bw * (w4 && m < kCompactSlabRowsFrom && kern.rows ? 20 : 1);
  if (work < kMinParallelMacs) nthreads = 1;
  const size_t ysize = y_bf16 ? 2 : 4;
  const int64_t nbr = h.nbr;
  const int bw4 = static_cast<int>(round_up(h.bw, 4));
  const int64_t ngroups = round_up(k, h.bw) / 4;
  // One slab of rows (AVX-512 VNNI: up to 8 rows in a narrow slab, 9 - 16 in
  // a 16-row one; AVX2: up to 8): every thread quantizes the rows and regroups them into its own
  // thread-local slab, then takes block rows dynamically. The ~4 us of
  // preparation per thread is repeated, but no thread writes a cache line
  // another one reads: a shared slab that both cores had read in the last call
  // took 5 us to rewrite (each line's copy in the other core invalidated)
  // instead of 1.3, and the barrier and the quantizer's own fork go too.
  const int64_t kpa = kpad_a(k, h.bw), lda1 = int8_gemm::a_stride(kpa);
  const int sw1 = kern.narrow_slabs && m <= 8 ? 8 : std::max(1, kern.slab_rows);
  if (w4 && m >= kCompactSlabRowsFrom && m <= sw1 && nthreads > 1) {
    const int64_t sst = xg_slab_stride(ngroups, sw1);
    struct Prepared {
      GemmArgsI8 g;
      const int32_t* xg;
    };
    parallel_private_prep(
        nbr, nthreads, std::min<int64_t>(nbr, 8 * std::max(1, nthreads)),
        [&]() {
          const int8_gemm::QuantScratch s = int8_gemm::quant_scratch(m, lda1);
          e.quantize(x, ldx, x_bf16, 0, m, k, kpa, lda1, kern.a_xor, int8_gemm::kQmax8, s.q, s.scale);
          int32_t* xg = slab_scratch(sst);
          kern.pack_groups(s.q, lda1, m, ngroups, xg, sst, 0, 1, sw1);
          Prepared p{{s.q, lda1, s.scale, rowptr, colk, comp, blocks, h.n, h.bh, bw4, h.bh_pad, w_scale, bias, y, ldy,
                      y_bf16},
                     xg};
          p.g.w4 = w4;
          p.g.colk4 = h.bw % 4 == 0;
          return p;
        },
        [&](const Prepared& p, int64_t r0b, int64_t r1b) { kern.slabs(p.g, p.xg, sst, m, 0, 1, r0b, r1b, sw1); });
    return;
  }
  int8_gemm::quantized_passes(
      e.quantize, kern.a_xor, kern.mr, x, ldx, x_bf16, m, k, kpad_a(k, h.bw), nthreads,
      [&](const int8_t* q, const float* qs, int64_t lda, int64_t r0, int64_t rows) {
        GemmArgsI8 g{q, lda, qs, rowptr, colk, comp, blocks, h.n, h.bh, bw4, h.bh_pad, w_scale, bias,
                     static_cast<char*>(y) + r0 * ldy * ysize, ldy, y_bf16};
        g.colk4 = h.bw % 4 == 0;
        const int64_t nt = std::max<int64_t>(1, nthreads);
        // the row kernel forms weight indices in 32 bits
        if (w4 && rows < kCompactSlabRowsFrom && kern.rows && h.nnzb * h.bh * (bw4 / 4) < INT32_MAX) {
          g.w4 = w4;
          split_by_blocks(rowptr, nbr, h.nnzb, nthreads, [&](int64_t b0, int64_t b1) { kern.rows(g, 0, rows, b0, b1); });
          return;
        }
        if (w4 && rows >= kCompactSlabRowsFrom) {
          // small blocks: activations regrouped into slabs, then the slab kernel on the compact blocks
          g.w4 = w4;
          const int sw = kern.narrow_slabs && m <= 8 ? 8 : kern.slab_rows;
          const int64_t slabs = (rows + sw - 1) / sw, sst = xg_slab_stride(ngroups, sw);
          int32_t* xg = slab_scratch(slabs * sst);
          auto pack = [&](int64_t s0, int64_t s1) { kern.pack_groups(q, lda, rows, ngroups, xg, sst, s0, s1, sw); };
          if (nt > 1 && nbr < 2 * nt && slabs >= 2) {
            parallel_for(slabs, 1, nthreads, pack);
            parallel_for(slabs, 1, nthreads,
                         [&](int64_t s0, int64_t s1) { kern.slabs(g, xg, sst, rows, s0, s1, 0, nbr, sw); });
          } else {
            // one team: activations into slabs, then ranges of block rows handed out in order (a slow core takes fewer)
            parallel_two_phase(
                slabs, nbr, nthreads, pack,
                [&](int64_t r0b, int64_t r1b) { kern.slabs(g, xg, sst, rows, 0, slabs, r0b, r1b, sw); },
                std::min<int64_t>(nbr, 8 * nt));
          }
          return;
        }
        if (nt > 1 && nbr < 2 * nt && rows >= 2 * kern.mr) {
          parallel_for(rows, kern.mr, nthreads, [&](int64_t m0, int64_t m1) { kern.gemm(g, m0, m1, 0, nbr); });
        } else {
          split_by_blocks(rowptr, nbr, h.nnzb, nthreads, [&](int64_t b0, int64_t b1) { kern.gemm(g, 0, rows, b0, b1); });
        }
      });
}

}  // namespace block_sparse
}  // namespace pyaccel
