// BSR int8 GEMM, AVX2: tiles of 4 rows x 16 channels (two ymm of 8 int32
// lanes) of one block row. Per group of 4 inputs: the sign trick
// (vpmaddubsw(|a|, sign(w, a)): pair sums <= 2 * 127 * 127 never saturate),
// vpmaddwd with ones, vpaddd. Signed activations: no offset to subtract.
//
// Small blocks with compact values (block_sparse.h): the slab kernel on
// 8-row slabs of regrouped activations (xg[g][slab][8] int32), 2 or 1 a pass.
// Per channel and group of its blocks: |w| of the channel's broadcast word,
// then per slab line vpsignb (x takes w's signs), vpmaddubsw(|w|, .),
// vpmaddwd with ones, vpaddd; 4 / 2 accumulator sets taken block by block.
// Results staged per 16 block rows, moved by 8 x 8 transposes to int8_gemm's
// AVX2 epilogue. One row of x: the row kernels (compact_rows, compact_rows_bh).
//
// The same kernels serve the AVX-VNNI level (qs8_bsr_*_avxvnni): one
// vpdpbusd per group on uint8 activations (q ^ 0x80), the sums starting at
// -comp (128 * the channel's kept weights, as in the AVX-512 VNNI kernel). As
// in int8_gemm/qs8_gemm_6x16c4_avxvnni.cpp, a VEX build ("{vex} vpdpbusd",
// AVX-VNNI) and an EVEX twin (AVX-512 VNNI + VL: what AVX-512 machines capped
// at avx_vnni run and test) differ only in that instruction.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "block_sparse/block_sparse.h"
#include "block_sparse/row_words.h"
#include "common/cpu_features.h"
#include "common/vnni_ymm.h"
#include "common/transpose_avx2.h"
#include "int8_gemm/int8_gemm.h"
#include "int8_gemm/qs8_gemm_avx2_tile.h"

namespace pyaccel {
namespace block_sparse {
namespace {

// The multiply-add of 8 lanes x 4 products (acc + sum a * w per int32 lane).
// Sign trick (signed activations), |a| or |w| as vpmaddubsw's unsigned
// operand (the same sums: which one is cheaper depends on which is broadcast).
struct SignMul {
  static constexpr bool kVnni = false;
  static __m256i dot_a(__m256i acc, __m256i a, __m256i w) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(w, a)),
                                                   _mm256_set1_epi16(1)));
  }
  static __m256i dot_w(__m256i acc, __m256i a, __m256i w) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w)),
                                                   _mm256_set1_epi16(1)));
  }
};
// vpdpbusd on uint8 activations a (q ^ 0x80) and int8 weights w; Vex: the
// AVX-VNNI encoding, else EVEX.
template <bool Vex>
struct VnniMul {
  static constexpr bool kVnni = true;
  static __m256i dot_a(__m256i acc, __m256i a, __m256i w) {
    dpbusd_ymm<Vex>(acc, a, w);
    return acc;
  }
  static __m256i dot_w(__m256i acc, __m256i a, __m256i w) { return dot_a(acc, a, w); }
};

template <class Mul, int R>
inline void tile(const GemmArgsI8& g, int64_t m, int64_t r, int ch0) {
  __m256i acc[R][2];
  for (int i = 0; i < R; ++i) {
    if constexpr (Mul::kVnni) {  // start at -comp of the 16 channels (comp holds bh_pad per block row)
      const int32_t* comp = g.comp + r * g.bh_pad + ch0;
      acc[i][0] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(comp)));
      acc[i][1] =
          _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(comp + 8)));
    } else {
      acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    }
  }
  const int8_t* a0 = g.a + m * g.lda;
  const int64_t groups = g.bw4 / 4;
  for (int64_t b = g.rowptr[r]; b < g.rowptr[r + 1]; ++b) {
    const int8_t* w = g.blocks + b * g.bw4 * g.bh_pad + ch0 * 4;
    const int8_t* ac = a0 + g.colk[b];
    for (int64_t q = 0; q < groups; ++q) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * g.bh_pad * 4));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * g.bh_pad * 4 + 32));
      for (int i = 0; i < R; ++i) {
        int32_t a32;
        std::memcpy(&a32, ac + i * g.lda + 4 * q, 4);
        const __m256i a = _mm256_set1_epi32(a32);
        acc[i][0] = Mul::dot_a(acc[i][0], a, w0);
        acc[i][1] = Mul::dot_a(acc[i][1], a, w1);
      }
    }
  }
  // the block row's channels end at `end` (store8 writes none past it)
  const int64_t end = std::min<int64_t>(r * g.bh + g.bh, g.n), n0 = r * g.bh + ch0;
  const int8_gemm::GemmArgs e = epilogue_args(g, end);
  for (int i = 0; i < R; ++i) {
    int8_gemm::avx2_tile::store8(e, acc[i][0], g.a_scale[m + i], m + i, n0);
    int8_gemm::avx2_tile::store8(e, acc[i][1], g.a_scale[m + i], m + i, n0 + 8);
  }
}

template <class Mul, int S, int GPB>
void slab_rows(const GemmArgsI8& g, const int32_t* xg, int64_t sst, int64_t m, int64_t s, int64_t r0, int64_t r1,
               int32_t* stage) {
  constexpr int L = S * 8;
  constexpr int64_t kRunRows = 16;
  constexpr int U = S >= 2 ? 2 : 4;
  const int64_t gpb = GPB > 0 ? GPB : g.bw4 / 4;
  int8_gemm::GemmArgs e = epilogue_args(g, 0);
  for (int64_t rf = r0; rf < r1; rf += kRunRows) {
    const int64_t rl = std::min<int64_t>(r1, rf + kRunRows);
    const int64_t cbeg = rf * g.bh, cend = std::min<int64_t>(rl * g.bh, g.n);
    for (int64_t r = rf; r < rl; ++r) {
      const int64_t b0 = g.rowptr[r], b1 = g.rowptr[r + 1];
      for (int i = 0; i < g.bh && r * g.bh + i < cend; ++i) {
        __m256i acc[U][S];
        for (int u = 0; u < U; ++u)
          for (int t = 0; t < S; ++t) acc[u][t] = _mm256_setzero_si256();
        if constexpr (Mul::kVnni)  // the first set starts at -comp
          for (int t = 0; t < S; ++t) acc[0][t] = _mm256_set1_epi32(-g.comp[r * g.bh_pad + i]);
        const int32_t* wi = g.w4 + i * gpb;
        const int32_t* xs = xg + s * sst;
        auto add_block = [&](int64_t b, __m256i (&a)[S]) {
          const int32_t* w = wi + b * g.bh * gpb;
          const int32_t* xb = xs + (static_cast<uint32_t>(g.colk[b]) >> 2) * 8;
          for (int64_t q = 0; q < gpb; ++q) {
            const __m256i wv = _mm256_set1_epi32(w[q]);
            for (int t = 0; t < S; ++t) {
              const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(xb + q * 8 + t * sst));
              a[t] = Mul::dot_w(a[t], x, wv);
            }
          }
        };
        int64_t b = b0;
        for (; b + U <= b1; b += U)
          for (int u = 0; u < U; ++u) add_block(b + u, acc[u]);
        for (; b < b1; ++b) add_block(b, acc[0]);
        for (int u = 1; u < U; ++u)
          for (int t = 0; t < S; ++t) acc[0][t] = _mm256_add_epi32(acc[0][t], acc[u][t]);
        int32_t* st = stage + (r * g.bh + i - cbeg) * L;
        for (int t = 0; t < S; ++t) _mm256_store_si256(reinterpret_cast<__m256i*>(st + t * 8), acc[0][t]);
      }
    }
    e.n = cend;  // this run's channels only (the next belongs to another thread)
    for (int64_t c = cbeg; c < cend; c += 8) {
      const int nc = static_cast<int>(std::min<int64_t>(8, cend - c));
      for (int t = 0; t < S; ++t) {
        const int64_t row0 = (s + t) * 8;
        if (row0 >= m) break;
        const int rows = static_cast<int>(std::min<int64_t>(8, m - row0));
        __m256 rr[8];
        for (int q = 0; q < 8; ++q)
          rr[q] = q < nc ? _mm256_castsi256_ps(
                               _mm256_load_si256(reinterpret_cast<const __m256i*>(stage + (c - cbeg + q) * L + t * 8)))
                         : _mm256_setzero_ps();
        transpose8x8(rr);
        for (int l = 0; l < rows; ++l)
          int8_gemm::avx2_tile::store8(e, _mm256_castps_si256(rr[l]), g.a_scale[row0 + l], row0 + l, c);
      }
    }
  }
}

// One row of x on the compact blocks: per channel 8 of its block groups at a
// time, the activation words read from the row at the blocks' columns
// (scalar loads and inserts), the channel's weight words loaded (gathered for blocks of
// several rows), the sign trick; 8 channels' sums to the epilogue together.
// The activation words of up to 8 blocks of a channel (row_words.h).
inline __m256i row_words8(const int8_t* a, const int32_t* cols, int left) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(row_words_quarter(a, cols, 0, left)),
                                 row_words_quarter(a, cols, 1, left), 1);
}

// One row's channel sums, 8 at a time to the epilogue (channels from c0).
struct RowSums8 {
  const int8_gemm::GemmArgs& e;
  float a_scale;
  int64_t m, c0;
  alignas(32) int32_t sums[8] = {};
  int j = 0;
  void push(int32_t v) {
    sums[j++] = v;
    if (j == 8) flush();
  }
  void flush() {  // e.n bounds the last group
    if (j > 0) int8_gemm::avx2_tile::store8(e, _mm256_load_si256(reinterpret_cast<const __m256i*>(sums)), a_scale, m, c0);
    c0 += 8;
    j = 0;
  }
};
inline int32_t hsum8(__m256i t) {
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1)));
}

template <class Mul, bool CONTIGUOUS>
void compact_rows(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  const int64_t gpb = g.bw4 / 4;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  each_block_row<RowSums8>(g, m0, m1, r0, r1, [&](const int8_t* a, int64_t r, int64_t b0, int64_t b1, int nch,
                                                  RowSums8& out) {
    for (int i = 0; i < nch; ++i) {
      __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
      for (int64_t q = 0; q < gpb; ++q) {
        for (int64_t b = b0; b < b1; b += 8) {
          const int left = static_cast<int>(std::min<int64_t>(8, b1 - b));
          const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lane);  // lanes of blocks that exist
          const __m256i x = row_words8(a + 4 * q, g.colk + b, left);
          __m256i w;
          if (CONTIGUOUS) {
            w = _mm256_maskload_epi32(g.w4 + b, k);
          } else {
            const __m256i wi = _mm256_add_epi32(
                _mm256_mullo_epi32(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(b)), lane),
                                   _mm256_set1_epi32(static_cast<int32_t>(g.bh * gpb))),
                _mm256_set1_epi32(static_cast<int32_t>(i * gpb + q)));
            w = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), g.w4, wi, k, 4);
          }
          // (lanes past the channel's blocks: w = 0, no product; x repeats the last word)
          if ((b - b0) & 8)
            acc1 = Mul::dot_a(acc1, x, w);
          else
            acc0 = Mul::dot_a(acc0, x, w);
        }
      }
      out.push(hsum8(_mm256_add_epi32(acc0, acc1)) - (Mul::kVnni ? g.comp[r * g.bh_pad + i] : 0));
    }
  });
}

// The row kernel for blocks of BH = 2, 4 or 8 rows x 4 inputs: per 8 blocks
// of a block row one set of activation words serves its BH channels, and
// the blocks' 8 x BH weight words come in BH loads, transposed in registers
// into one vector a channel (BH = 2: vshufps; 4: in-lane 4 x 4 unpacks; 8: an
// 8 x 8 transpose); where that leaves the blocks out of order (2, 4) the
// activation words are permuted to match once per step.
template <class Mul, int BH>
void compact_rows_bh(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  static_assert(BH == 2 || BH == 4 || BH == 8, "block rows");
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i order = BH == 2 ? _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7)   // blocks of the shuffled lanes
                                : _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // (BH = 4; unused at 8)
  each_block_row<RowSums8>(g, m0, m1, r0, r1, [&](const int8_t* a, int64_t r, int64_t b0, int64_t b1, int nch,
                                                  RowSums8& out) {
    __m256i acc[BH];
    for (int i = 0; i < BH; ++i) acc[i] = _mm256_setzero_si256();
    for (int64_t b = b0; b < b1; b += 8) {
      const int left = static_cast<int>(std::min<int64_t>(8, b1 - b));
      __m256i x = row_words8(a, g.colk + b, left);
      __m256i w[BH];  // the blocks' words in order; past the last block zero
      for (int q = 0; q < BH; ++q)
        w[q] = _mm256_maskload_epi32(g.w4 + b * BH + 8 * q, _mm256_cmpgt_epi32(_mm256_set1_epi32(left * BH - 8 * q), lane));
      if constexpr (BH == 2) {
        x = _mm256_permutevar8x32_epi32(x, order);
        const __m256 w0 = _mm256_castsi256_ps(w[0]), w1 = _mm256_castsi256_ps(w[1]);
        w[0] = _mm256_castps_si256(_mm256_shuffle_ps(w0, w1, 0x88));  // word 0 of blocks 0 1 4 5 | 2 3 6 7
        w[1] = _mm256_castps_si256(_mm256_shuffle_ps(w0, w1, 0xdd));  // word 1
      } else if constexpr (BH == 4) {
        x = _mm256_permutevar8x32_epi32(x, order);
        const __m256i t0 = _mm256_unpacklo_epi32(w[0], w[1]), t1 = _mm256_unpackhi_epi32(w[0], w[1]);
        const __m256i t2 = _mm256_unpacklo_epi32(w[2], w[3]), t3 = _mm256_unpackhi_epi32(w[2], w[3]);
        w[0] = _mm256_unpacklo_epi64(t0, t2);  // word 0 of blocks 0 2 4 6 | 1 3 5 7
        w[1] = _mm256_unpackhi_epi64(t0, t2);
        w[2] = _mm256_unpacklo_epi64(t1, t3);
        w[3] = _mm256_unpackhi_epi64(t1, t3);
      } else {
        __m256 t[8];
        for (int q = 0; q < 8; ++q) t[q] = _mm256_castsi256_ps(w[q]);
        transpose8x8(t);  // t[i]: word i of blocks 0 .. 7
        for (int q = 0; q < 8; ++q) w[q] = _mm256_castps_si256(t[q]);
      }
      for (int i = 0; i < BH; ++i) acc[i] = Mul::dot_a(acc[i], x, w[i]);
    }
    for (int i = 0; i < nch; ++i) out.push(hsum8(acc[i]) - (Mul::kVnni ? g.comp[r * g.bh_pad + i] : 0));
  });
}

template <class Mul, int GPB>
void slab_runs(const GemmArgsI8& g, const int32_t* xg, int64_t sst, int64_t m, int64_t s0, int64_t s1,
               int64_t r0, int64_t r1, int32_t* stage) {
  for_each_slab_run<2>(s0, s1, [&](int64_t s, auto run) {
    slab_rows<Mul, decltype(run)::value, GPB>(g, xg, sst, m, s, r0, r1, stage);
  });
}

thread_local std::vector<int32_t> t_stage;

template <class Mul>
inline void gemm(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  const int64_t mc = std::max<int64_t>(8, (int64_t(256) << 10) / std::max<int64_t>(1, g.lda) / 4 * 4);
  for (int64_t ma = m0; ma < m1; ma += mc) {
    const int64_t mb = std::min(m1, ma + mc);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t end = std::min<int64_t>(r * g.bh + g.bh, g.n);
      for (int ch = 0; ch < g.bh_pad && r * g.bh + ch < end; ch += 16) {
        int64_t m = ma;
        for (; m + 4 <= mb; m += 4) tile<Mul, 4>(g, m, r, ch);
        switch (mb - m) {
          case 3: tile<Mul, 3>(g, m, r, ch); break;
          case 2: tile<Mul, 2>(g, m, r, ch); break;
          case 1: tile<Mul, 1>(g, m, r, ch); break;
          default: break;
        }
      }
    }
  }
}

template <class Mul>
inline void slabs(const GemmArgsI8& g, const int32_t* xg, int64_t sst, int64_t m, int64_t s0, int64_t s1, int64_t r0,
                  int64_t r1) {
  const size_t words = 16 * kSmallBlockRows * 2 * 8 + 8;
  if (t_stage.size() < words) t_stage.resize(words);
  int32_t* stage = reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(t_stage.data()) + 31) & ~uintptr_t(31));
  if (g.bw4 == 4)
    slab_runs<Mul, 1>(g, xg, sst, m, s0, s1, r0, r1, stage);
  else
    slab_runs<Mul, 0>(g, xg, sst, m, s0, s1, r0, r1, stage);
}

template <class Mul>
inline void rows(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  if (g.bw4 == 4 && g.bh == 1) return compact_rows<Mul, true>(g, m0, m1, r0, r1);
  if (g.bw4 == 4 && g.bh == 2) return compact_rows_bh<Mul, 2>(g, m0, m1, r0, r1);
  if (g.bw4 == 4 && g.bh == 4) return compact_rows_bh<Mul, 4>(g, m0, m1, r0, r1);
  if (g.bw4 == 4 && g.bh == 8) return compact_rows_bh<Mul, 8>(g, m0, m1, r0, r1);
  compact_rows<Mul, false>(g, m0, m1, r0, r1);
}

}  // namespace

void qs8_bsr_gemm_avx2(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  gemm<SignMul>(g, m0, m1, r0, r1);
}

void qs8_bsr_slabs_avx2(const GemmArgsI8& g, const int32_t* xg, int64_t sst, int64_t m, int64_t s0, int64_t s1,
                        int64_t r0, int64_t r1, int /*sw: 8 here*/) {
  slabs<SignMul>(g, xg, sst, m, s0, s1, r0, r1);
}

// 8-row slabs: 8 x 8 blocks of activation words transposed in registers (a
// block cut by m or the group count through a zero-padded copy).
void qs8_bsr_pack_groups_avx2(const int8_t* q, int64_t lda, int64_t m, int64_t ngroups, int32_t* xg, int64_t sst,
                              int64_t s0, int64_t s1, int /*sw: 8 here*/) {
  for (int64_t s = s0; s < s1; ++s) {
    const int rows = static_cast<int>(std::min<int64_t>(8, m - s * 8));
    for (int64_t g0 = 0; g0 < ngroups; g0 += 8) {
      const int gn = static_cast<int>(std::min<int64_t>(8, ngroups - g0));
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        if (i >= rows) {
          r[i] = _mm256_setzero_ps();
        } else if (gn == 8) {
          r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(q + (s * 8 + i) * lda + 4 * g0));
        } else {
          alignas(32) int32_t tmp[8] = {};
          std::memcpy(tmp, q + (s * 8 + i) * lda + 4 * g0, 4 * gn);
          r[i] = _mm256_load_ps(reinterpret_cast<const float*>(tmp));
        }
      }
      transpose8x8(r);
      for (int j = 0; j < gn; ++j) _mm256_store_ps(reinterpret_cast<float*>(xg + s * sst + (g0 + j) * 8), r[j]);
    }
  }
}

void qs8_bsr_rows_avx2(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  rows<SignMul>(g, m0, m1, r0, r1);
}

// The AVX-VNNI level: each kernel's VEX build and EVEX twin, everything
// inlined (flatten) for the encoding test (tests/ops/test_int8_avxvnni.py).
#define PYACCEL_FLAT __attribute__((flatten, noinline))
PYACCEL_FLAT void qs8_bsr_gemm_avxvnni_vex(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  gemm<VnniMul<true>>(g, m0, m1, r0, r1);
}
PYACCEL_FLAT void qs8_bsr_gemm_avxvnni_evex(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  gemm<VnniMul<false>>(g, m0, m1, r0, r1);
}
PYACCEL_FLAT void qs8_bsr_slabs_avxvnni_vex(const GemmArgsI8& g, const int32_t* xg, int64_t sst, int64_t m, int64_t s0,
                                            int64_t s1, int64_t r0, int64_t r1, int) {
  slabs<VnniMul<true>>(g, xg, sst, m, s0, s1, r0, r1);
}
PYACCEL_FLAT void qs8_bsr_slabs_avxvnni_evex(const GemmArgsI8& g, const int32_t* xg, int64_t sst, int64_t m,
                                             int64_t s0, int64_t s1, int64_t r0, int64_t r1, int) {
  slabs<VnniMul<false>>(g, xg, sst, m, s0, s1, r0, r1);
}
PYACCEL_FLAT void qs8_bsr_rows_avxvnni_vex(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  rows<VnniMul<true>>(g, m0, m1, r0, r1);
}
PYACCEL_FLAT void qs8_bsr_rows_avxvnni_evex(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  rows<VnniMul<false>>(g, m0, m1, r0, r1);
}
#undef PYACCEL_FLAT

void qs8_bsr_gemm_avxvnni(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  static const auto build = avx_vnni_build(&qs8_bsr_gemm_avxvnni_vex, &qs8_bsr_gemm_avxvnni_evex);
  build(g, m0, m1, r0, r1);
}
void qs8_bsr_slabs_avxvnni(const GemmArgsI8& g, const int32_t* xg, int64_t sst, int64_t m, int64_t s0, int64_t s1,
                           int64_t r0, int64_t r1, int sw) {
  static const auto build = avx_vnni_build(&qs8_bsr_slabs_avxvnni_vex, &qs8_bsr_slabs_avxvnni_evex);
  build(g, xg, sst, m, s0, s1, r0, r1, sw);
}
void qs8_bsr_rows_avxvnni(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  static const auto build = avx_vnni_build(&qs8_bsr_rows_avxvnni_vex, &qs8_bsr_rows_avxvnni_evex);
  build(g, m0, m1, r0, r1);
}

}  // namespace block_sparse
}  // namespace pyaccel
