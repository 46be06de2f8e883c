// 2:4 dispatch ladder and threaded driver.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/ladder.h"
#include "common/packed_header.h"  // round_up
#include "common/parallel.h"
#include "common/row_passes.h"
#include "int8_gemm/int8_gemm.h"  // bf16_to_fp32
#include "sparse24/sparse24.h"

namespace pyaccel {
namespace sparse24 {
namespace {

// AVX2 column kernels: k-blocks of <= 40 groups for the 4-channel AMD tile
// (s24_gemm_cols_4x24_avx2: a 3-half row tile spans two slabs, so a k-block
// is 2 x 40 x 256 B = 20 KiB of half lines, in L1 while the channel tiles
// reuse them; at 64 groups it was 32 KiB, all of L1: Zen 3, 2 threads,
// interleaved, 40 against 64 ran 1.16 - 1.19x at 48 - 128 rows on 384x1536,
// 1.02 - 1.17x on 1536x384, 1024x4096 and 4096x4096 at 128 rows, the same at
// 32 rows (one slab a tile)); the 2 x 48 tile's are the k-blocks of its
// k-blocked xt, 32 groups (kXtKbGroups: its 3 slabs' lines, 24 KiB; on a
// Golden Cove core 1.1 - 1.2x over 64 at 128 rows).
constexpr int kAvx2ColsKcGroups = 40;
constexpr int kIntel = static_cast<int>(Tuning::kIntel), kAmd = static_cast<int>(Tuning::kAmd);

const Kernel kLadder[] = {
    {Isa::kAvx512, "s24_gemm_4x32_avx512", 4, s24_gemm_4x32_avx512, s24_gemm_cols_avx512, s24_pack_xt_avx512,
     cols_part_avx512, 8, 16, "s24_gemm_cols_avx512"},
    // AVX2, Intel cores: the 2 x 48 column tile from 24 rows: at 16 rows it measured
    // 0.94 - 1.06x the row kernel, at 24 1.01 - 1.23x (Golden Cove capped at AVX2, 2 threads)
    {Isa::kAvx2, "s24_gemm_4x8_avx2", 4, s24_gemm_4x8_avx2, s24_gemm_cols_2x48_avx2, s24_pack_xt_kb_avx2,
     cols_part_avx2, 4, 24, "s24_gemm_cols_2x48_avx2", kAvx2RowPathRows, kXtKbGroups, kIntel, true},
    // AVX2, other cores: the 4-channel column tile from 32 rows: at 16 rows it
    // measured 0.86 - 1.04x the row kernel (Zen 4, ymm)
    {Isa::kAvx2, "s24_gemm_4x8_avx2", 4, s24_gemm_4x8_avx2, s24_gemm_cols_4x24_avx2, s24_pack_xt_avx2,
     cols_part_avx2, 4, 32, "s24_gemm_cols_4x24_avx2", kAvx2RowPathRows, kAvx2ColsKcGroups, kAmd},
    {Isa::kPortable, "s24_gemm_1x16_scalar", 1, s24_gemm_1x16_scalar, nullptr, nullptr, nullptr, 0, 0, nullptr},
};

LadderChoice<Kernel> g_choice;
thread_local std::vector<float> t_x;

// 64-byte aligned scratch that grows (never shrinks) per thread
float* aligned_scratch(std::vector<float>& v, int64_t floats) {
  if (v.size() < static_cast<size_t>(floats + 16)) v.resize(floats + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}
thread_local std::vector<float> t_xt, t_part;

// Groups per k-block of the column kernel. AVX-512: all of K up to
// kColsWholeKGroups (the row tile's slab lines, <= 3 x 2048 x 64 B, stay in L2
// next to the weights); beyond, blocks of about kColsKBlockGroups (measured
// best at K = 4096, 128 - 512 rows). A kernel with cols_kc_max: blocks of at
// most that many groups (multiples of 4; the last one may be shorter); with
// k-blocked xt, exactly those of the layout (kXtKbGroups, the last shorter).
int64_t cols_kc_groups(const Kernel& kern, int64_t groups_pad) {
  if (kern.xt_kblocked) return groups_pad < kXtKbGroups ? groups_pad : kXtKbGroups;
  const int64_t whole = kern.cols_kc_max > 0 ? kern.cols_kc_max : kColsWholeKGroups;
  const int64_t block = kern.cols_kc_max > 0 ? kern.cols_kc_max : kColsKBlockGroups;
  if (groups_pad <= whole) return groups_pad;
  const int64_t blocks = (groups_pad + block - 1) / block;
  return round_up((groups_pad + blocks - 1) / blocks, kBlockGroups);
}

// The column kernel pads rows to slabs of 16: worth it from 16 rows when at
// least 70 % of the slab rows are real (17 - 22 rows: the row-tile kernel).
bool use_cols(const Kernel& kern, int64_t m) {
  if (!kern.cols || kern.cols_from_rows <= 0 || m < kern.cols_from_rows) return false;
  return m * 10 >= 7 * 16 * ((m + 15) / 16);
}

// Many rows: per pass, one team transposes x into 16-row slabs, then takes
// the channel tiles in dynamically handed-out contiguous items.
void linear_cols(const Kernel& kern, const PackedHeader& h, const uint8_t* w, const void* x, int64_t ldx,
                 bool x_bf16, int64_t m, int64_t k, const float* bias, void* y, int64_t ldy, bool y_bf16,
                 int nthreads) {
  const int64_t kp = h.groups_pad * 4, kc = cols_kc_groups(kern, h.groups_pad), tiles = (h.n + kern.cols_nr - 1) / kern.cols_nr;
  const size_t xsize = x_bf16 ? 2 : 4, ysize = y_bf16 ? 2 : 4;
  // passes of <= ~8 MiB of transposed x (scratch bounded for any batch)
  for_each_row_pass(m, xt_row_bytes(kern, kp), kRowPassBytes, 16, [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0, slabs = (rows + 15) / 16;
    const void* xc = static_cast<const char*>(x) + r0 * ldx * xsize;
    float* xt = aligned_scratch(t_xt, xt_floats(kern, slabs, kp));
    const ColsArgs a{xt, kp, w, bias, static_cast<char*>(y) + r0 * ldy * ysize, ldy, y_bf16, rows, h.n,
                     h.groups_pad, kc, xt_kb_floats(kern, slabs)};
    parallel_two_phase(
        slabs, tiles, nthreads,
        [&](int64_t s0, int64_t s1) { kern.pack_xt(xc, ldx, x_bf16, rows, k, kp, xt, s0, s1); },
        [&](int64_t t0, int64_t t1) {
          float* part = aligned_scratch(t_part, kern.cols_part(rows, t1 - t0));
          kern.cols(a, t0, t1, part);
        },
        // 4 dynamic items per thread: with a busy process on one of 2 cores
        // 1.0 - 1.4x the static halves, and 1.00 - 1.05x on a quiet machine
        // (each item re-reads the row tiles' transposed x)
        std::min<int64_t>(tiles, 4 * static_cast<int64_t>(nthreads)));
  });
}

constexpr int64_t kMinParallelMacs = int64_t(1) << 19;

// Row split (column kernels): from kRowSplitRows rows per thread, on packed
// weights of at most kRowSplitMaxBytes, each thread takes one chunk of whole
// 16-row slabs, transposes it, then runs it in kRowSplitUnits items of
// channel tiles (all of K, all of the chunk's rows each), and then the
// leftover items of the other chunks (parallel_row_chunks): a thread reads
// the x it transposed itself, in its own core's caches, unless it steals, and
// a thread whose core runs slower (seen on a KVM guest: 1.7 - 1.9x for one
// vCPU in 5 of 6 calls) hands part of its chunk to the other. Split by
// channels instead, every item re-reads all of x, half of it transposed by
// the other core. Each output's sums are the same either way (same bits).
// Larger weights keep the channel split: every chunk re-reads all of them.
constexpr int64_t kRowSplitRows = 48;
constexpr int64_t kRowSplitMaxBytes = int64_t(16) << 20;
constexpr int64_t kRowSplitUnits = 4;

// linear_cols with the row split above (nt >= 2 threads).
void linear_cols_rows(const Kernel& kern, const PackedHeader& h, const uint8_t* w, const void* x, int64_t ldx,
                      bool x_bf16, int64_t m, int64_t k, const float* bias, void* y, int64_t ldy, bool y_bf16,
                      int nt) {
  const int64_t kp = h.groups_pad * 4, kc = cols_kc_groups(kern, h.groups_pad);
  const int64_t tiles = (h.n + kern.cols_nr - 1) / kern.cols_nr, units = std::min<int64_t>(tiles, kRowSplitUnits);
  const size_t xsize = x_bf16 ? 2 : 4, ysize = y_bf16 ? 2 : 4;
  // passes of <= ~8 MiB of transposed x, as linear_cols; every thread reads
  // the pass's slabs through xt (the calling thread's scratch)
  for_each_row_pass(m, xt_row_bytes(kern, kp), kRowPassBytes, 16, [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0, slabs = (rows + 15) / 16;
    const void* xc = static_cast<const char*>(x) + r0 * ldx * xsize;
    float* xt = aligned_scratch(t_xt, xt_floats(kern, slabs, kp));
    parallel_row_chunks(
        rows, 16, units, rows, nt,
        [&](int, int64_t a0, int64_t a1) { kern.pack_xt(xc, ldx, x_bf16, rows, k, kp, xt, a0 / 16, (a1 + 15) / 16); },
        [&](int, int64_t u, int64_t a0, int64_t a1) {
          const int64_t t0 = tiles * u / units, t1 = tiles * (u + 1) / units;
          const ColsArgs a{xt + a0 / 16 * xt_slab_stride(kern, kp), kp, w, bias,
                           static_cast<char*>(y) + (r0 + a0) * ldy * ysize, ldy, y_bf16, a1 - a0, h.n,
                           h.groups_pad, kc, xt_kb_floats(kern, slabs)};
          kern.cols(a, t0, t1, aligned_scratch(t_part, kern.cols_part(a1 - a0, t1 - t0)));
        });
  });
}

}  // namespace

const Kernel& select_kernel() {
  return g_choice.get(kLadder, [](const Kernel& k) { return k.isa; },
                      [](const Kernel& k) { return k.tuning < 0 || k.tuning == static_cast<int>(cpu_tuning()); });
}

void linear(const void* x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, const uint8_t* packed,
            const float* bias, void* y, int64_t ldy, bool y_bf16, int nthreads) {
  if (m <= 0) return;
  const Kernel& kern = select_kernel();
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  const int64_t kp = h.groups_pad * 4;
  if (m * h.n_pad * kp < kMinParallelMacs) nthreads = 1;  // dense-equivalent work, as int8_gemm
  if (use_cols(kern, m)) {
    const int64_t wbytes = h.n_pad * h.groups_pad * (2 * 4 + 1);
    if (nthreads > 1 && m >= kRowSplitRows * nthreads && wbytes <= kRowSplitMaxBytes) {
      const int nt = effective_threads(nthreads);
      if (nt > 1) return linear_cols_rows(kern, h, packed + h.data_offset, x, ldx, x_bf16, m, k, bias, y, ldy, y_bf16, nt);
    }
    linear_cols(kern, h, packed + h.data_offset, x, ldx, x_bf16, m, k, bias, y, ldy, y_bf16, nthreads);
    return;
  }
  // The kernels read x in whole groups of 4 up to kp: use x in place when it is
  // fp32 and k == kp; otherwise copy (bf16 -> fp32, zero tail) into scratch, in
  // passes of <= ~8 MiB of rows (scratch bounded for any batch).
  const bool copy = x_bf16 || k != kp;
  const size_t xsize = x_bf16 ? 2 : 4, ysize = y_bf16 ? 2 : 4;
  const int64_t panels = h.n_pad / kPanel;
  for_each_row_pass(m, kp * 4, copy ? kRowPassBytes : INT64_MAX / 2, kern.mr, [&](int64_t p0, int64_t p1) {
    const int64_t rows = p1 - p0;
    const void* xp = static_cast<const char*>(x) + p0 * ldx * xsize;
    const float* xf = static_cast<const float*>(xp);
    int64_t lx = ldx;
    if (copy) {
      if (t_x.size() < static_cast<size_t>(rows * kp)) t_x.resize(rows * kp);
      float* s = t_x.data();
      parallel_for(rows, std::max<int64_t>(1, 16384 / kp), nthreads, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          float* d = s + r * kp;
          if (x_bf16) {
            const uint16_t* xs = static_cast<const uint16_t*>(xp) + r * ldx;
            for (int64_t i = 0; i < k; ++i) d[i] = int8_gemm::bf16_to_fp32(xs[i]);
          } else {
            std::memcpy(d, static_cast<const float*>(xp) + r * ldx, k * sizeof(float));
          }
          std::memset(d + k, 0, (kp - k) * sizeof(float));
        }
      });
      xf = s;
      lx = kp;
    }
    GemmArgs g{xf, lx, packed + h.data_offset, bias, static_cast<char*>(y) + p0 * ldy * ysize, ldy, y_bf16,
               rows, h.n, h.groups_pad};
    // units: pairs of 16-channel panels (the AVX-512 tiles are 32 channels wide)
    parallel_units_rows((panels + 1) / 2, rows, kern.mr, nthreads, [&](int64_t u, int64_t r0, int64_t r1) {
      kern.gemm(g, r0, r1, 2 * u, std::min<int64_t>(panels, 2 * u + 2));
    });
  });
}

}  // namespace sparse24
}  // namespace pyaccel
