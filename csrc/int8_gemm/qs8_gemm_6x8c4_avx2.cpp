// int8 GEMM micro-kernels, AVX2, 8-bit activations (q in [-127, 127]).
//
// More rows than the row path takes (kAvx2RowPathRows): a 6-row x 8-channel tile on int16
// operands. The activations come widened to int16 by the driver, once per call
// (GemmArgs::a16, Kernel::widen), or each panel widens them (a block of rows
// at a time, L2-sized) for callers that pass none; each k group's 8 x 4 weights are sign-extended
// in registers (two vpmovsxbw), and one vpmaddwd multiplies 4 channels x 4 k
// (16 products, exact int32 pair sums) followed by one vpaddd: 4
// instructions per 32 products, 2 of them multiplies, against the sign
// trick's 3 multiply-port instructions (vpsignb shares the multiply ports on
// Zen 3 and Zen 4) -- and nothing can saturate.
//
// Up to kAvx2RowPathRows rows: a row path over whole panels in k-blocks
// (avx2_tile::tile_rows_kb) with the sign trick: |a| in the unsigned operand of
// vpmaddubsw, w carrying a's sign (vpsignb), so int16 pair sums never
// saturate (<= 2*127*127).
#include <vector>

#include "int8_gemm/qs8_gemm_avx2_tile.h"

namespace pyaccel {
namespace int8_gemm {
namespace {

// The sign trick for the row path (avx2_tile::tile_rows_kb).
struct SignStep {
  // Row path: |a| as the unsigned operand, w with a's sign as the signed one.
  struct RowA {
    __m256i abs, sgn;
  };
  static RowA row_a(__m256i a) { return {_mm256_abs_epi8(a), a}; }
  static void row_step(__m256i& c, const RowA& ra, const int8_t* b, __m256i ones) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    c = _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(ra.abs, _mm256_sign_epi8(w, ra.sgn)), ones));
  }
  static __m256i finish(const GemmArgs&, __m256i acc, int64_t, int64_t) { return acc; }
};

// Widened activations of up to this many bytes per block of rows (L2-resident
// while the 8 channel groups of a panel run over them).
constexpr int64_t kA16BlockBytes = 192 << 10;

// The kernel's own widening scratch, for callers that pass no GemmArgs::a16.
thread_local std::vector<int16_t> t_a16;

// c += vpmaddwd(w, a) (inline asm: with intrinsics GCC keeps the 12
// accumulators of the 6-row tile on the stack).
inline void madd_w16(__m256i& c, __m256i w, __m256i a) {
  __m256i t;
  __asm__("vpmaddwd %[a], %[w], %[t]\n\t"
          "vpaddd %[t], %[c], %[c]"
          : [c] "+x"(c), [t] "=&x"(t)
          : [w] "x"(w), [a] "x"(a));
}

#define PYACCEL_W16_ROW(r)                      \
  if constexpr (MR > r) {                       \
    int64_t a4;                                 \
    std::memcpy(&a4, ak + r * ld16, 8);         \
    const __m256i av = _mm256_set1_epi64x(a4);  \
    madd_w16(c##r##0, w0, av);                  \
    madd_w16(c##r##1, w1, av);                  \
  }
// lanes (c0 c1 c4 c5 | c2 c3 c6 c7) -> (c0 .. c7), then the epilogue: with all
// 8 channels valid the channel scales and bias are loaded once per tile
// (avx2_tile::store_full8), else avx2_tile::store8 (partial last group).
#define PYACCEL_W16_STORE(r)                                                                  \
  if constexpr (MR > r) {                                                                     \
    const __m256i v = _mm256_permute4x64_epi64(_mm256_hadd_epi32(c##r##0, c##r##1), 0xD8);     \
    if (full)                                                                                 \
      avx2_tile::store_full8(g, v, g.a_scale[m + r], vw, vb, m + r, n0);                      \
    else                                                                                      \
      avx2_tile::store8(g, v, g.a_scale[m + r], m + r, n0);                                   \
  }

// Rows [m, m + MR) x channels [n0, n0 + 8): sub points at the channels' 32
// bytes in the panel's first k group (a k group is 64 channels x 4 k = 256
// bytes), ak16 at row m's widened activations. Per k group: w0, w1 = the 16 bytes of channels 0-3 and 4-7
// sign-extended to int16 (lanes: channel c's k0 k1 | k2 k3), each row's 4
// activations broadcast as one 64-bit pattern, vpmaddwd -> per channel two
// int32 partial sums (k0 + k1, k2 + k3), summed by vphaddd at the end. Every
// pair sum is exact (|2 * 127 * 127| < 2^31), the int32 accumulators exact
// as in every int8 kernel. pf: the line of the next quarter-panel to pull into
// L2 per k group (avx2_tile::next_quarter_lines).
template <int MR>
inline void tile_w16(const GemmArgs& g, const int16_t* ak16, int64_t ld16, int64_t m, const int8_t* sub,
                     int64_t n0, const int8_t* pf) {
  const int64_t groups = g.k_pad / kKGroup;
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const int8_t* b = sub;
  const int16_t* ak = ak16;
  if constexpr (MR == 6) {
    // One k group of the full tile per asm block: 12 accumulators + w0, w1,
    // the broadcast and the product fill the 16 ymm registers, and the 6 row
    // addresses are two bases and a stride (with intrinsics GCC spills an
    // accumulator and reloads row pointers every k group).
    const int16_t* ak3 = ak + 3 * ld16;
    const int64_t s1 = ld16 * 2;
#define PYACCEL_W16_ASM_ROW(addr, c0, c1)    \
  "vpbroadcastq " addr ", %%ymm14\n\t"        \
  "vpmaddwd %%ymm14, %%ymm12, %%ymm15\n\t"     \
  "vpaddd %%ymm15, %[" c0 "], %[" c0 "]\n\t"   \
  "vpmaddwd %%ymm14, %%ymm13, %%ymm15\n\t"     \
  "vpaddd %%ymm15, %[" c1 "], %[" c1 "]\n\t"
    for (int64_t grp = 0; grp < groups; ++grp, b += kPanel * kKGroup, ak += kKGroup, ak3 += kKGroup, pf += kPanel * kKGroup) {
      __asm__(
          "prefetcht1 (%[pf])\n\t"
          "vpmovsxbw (%[b]), %%ymm12\n\t"
          "vpmovsxbw 16(%[b]), %%ymm13\n\t"
          PYACCEL_W16_ASM_ROW("(%[a0])", "c00", "c01")
          PYACCEL_W16_ASM_ROW("(%[a0],%[s1])", "c10", "c11")
          PYACCEL_W16_ASM_ROW("(%[a0],%[s1],2)", "c20", "c21")
          PYACCEL_W16_ASM_ROW("(%[a3])", "c30", "c31")
          PYACCEL_W16_ASM_ROW("(%[a3],%[s1])", "c40", "c41")
          PYACCEL_W16_ASM_ROW("(%[a3],%[s1],2)", "c50", "c51")
          : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20),
            [c21] "+x"(c21), [c30] "+x"(c30), [c31] "+x"(c31), [c40] "+x"(c40), [c41] "+x"(c41),
            [c50] "+x"(c50), [c51] "+x"(c51)
          : [b] "r"(b), [a0] "r"(ak), [a3] "r"(ak3), [s1] "r"(s1), [pf] "r"(pf)
          : "xmm12", "xmm13", "xmm14", "xmm15", "memory");
    }
#undef PYACCEL_W16_ASM_ROW
  } else {
    for (int64_t grp = 0; grp < groups; ++grp, b += kPanel * kKGroup, ak += kKGroup, pf += kPanel * kKGroup) {
      _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T1);
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
      PYACCEL_W16_ROW(0) PYACCEL_W16_ROW(1) PYACCEL_W16_ROW(2) PYACCEL_W16_ROW(3) PYACCEL_W16_ROW(4)
    }
  }
  const bool full = n0 + 8 <= g.n;
  const __m256 vw = full ? _mm256_loadu_ps(g.w_scale + n0) : _mm256_setzero_ps();
  const __m256 vb = full && g.bias ? _mm256_loadu_ps(g.bias + n0) : _mm256_setzero_ps();
  PYACCEL_W16_STORE(0) PYACCEL_W16_STORE(1) PYACCEL_W16_STORE(2) PYACCEL_W16_STORE(3) PYACCEL_W16_STORE(4)
  PYACCEL_W16_STORE(5)
}
#undef PYACCEL_W16_ROW
#undef PYACCEL_W16_STORE

// Rows [m0, m1) x one panel on the int16 tile: rows in L2-sized blocks, each
// run by the panel's 8 channel groups in turn. The rows come widened
// (g.a16: the driver widened the call's rows once) or are widened here, a
// block at a time (each panel then widens them again).
void gemm_w16(const GemmArgs& g, int64_t m0, int64_t m1, const int8_t* panel, int64_t p) {
  const int64_t ld16 = g.a16 ? g.ld16 : a16_stride(g.k_pad);
  int64_t block = kA16BlockBytes / (2 * ld16) / 6 * 6;
  if (block < 6) block = 6;
  if (!g.a16 && t_a16.size() < static_cast<size_t>(block * ld16)) t_a16.resize(block * ld16);
  for (int64_t mb = m0; mb < m1; mb += block) {
    const int64_t me = mb + block < m1 ? mb + block : m1;
    const int16_t* a16 = g.a16 ? g.a16 + mb * ld16 : t_a16.data();
    if (!g.a16) widen_rows_avx2(g.a + mb * g.lda, g.lda, me - mb, g.k_pad, t_a16.data(), ld16);
    for (int j = 0; j < kPanel / 8; ++j) {
      const int64_t n0 = p * kPanel + 8 * j;
      if (n0 >= g.n) break;
      // eighths 2s and 2s + 1 read quarter s's lines: both prefetch quarter s + 1's
      const int8_t* pf = avx2_tile::next_quarter_lines(g, panel, p, j / 2);
      for_each_row_tile<6>(mb, me, [&](int64_t m, auto h) {
        tile_w16<h()>(g, a16 + (m - mb) * ld16, ld16, m, panel + 8 * j * kKGroup, n0, pf);
      });
    }
  }
}

static_assert(kAvx2RowPathRows <= avx2_tile::kRowsKbMaxRows, "tile_rows_kb's partial sums");

}  // namespace

// rows x k_pad int8 (row stride lda) -> int16 (row stride ld16); k_pad % 4 == 0.
void widen_rows_avx2(const int8_t* a, int64_t lda, int64_t rows, int64_t k_pad, int16_t* out, int64_t ld16) {
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* src = a + r * lda;
    int16_t* dst = out + r * ld16;
    int64_t i = 0;
    for (; i + 16 <= k_pad; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    for (; i < k_pad; ++i) dst[i] = src[i];
  }
}

void qs8_gemm_6x8c4_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t groups = g.k_pad / kKGroup;
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* panel = g.w + p * groups * kPanel * kKGroup;
    if (m1 - m0 <= kAvx2RowPathRows) {
      avx2_tile::tile_rows_kb<SignStep>(g, m0, m1, panel, p * kPanel);
    } else {
      gemm_w16(g, m0, m1, panel, p);
    }
  }
}

}  // namespace int8_gemm
}  // namespace pyaccel
