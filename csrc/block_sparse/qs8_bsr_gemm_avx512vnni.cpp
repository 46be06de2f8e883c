// BSR int8 GEMM, AVX-512 VNNI: tiles of MR rows x a chunk of V 16-channel
// vectors of one block row (V = 4, 3, 2, 1 with MR = 6, 8, 8, 12). Per group
// of 4 inputs of a block: V weight loads, MR dword broadcasts of uint8
// activations, MR * V vpdpbusd. Accumulators start at -comp (the uint8 offset
// of the kept weights) and end in int8_gemm's dequantization epilogue.
//
// Small blocks (bh <= 8, bw % 4 == 0): the slab kernel on the compact blocks.
// Activations regrouped into 16-row slabs, one dword (4 inputs of a row) per
// lane, slab-major (4 KiB a slab per 256 inputs: S slabs of a K = 4096
// layer sit in L2). Per channel of a block row and per group of 4 inputs of
// its blocks: one broadcast of the channel's 4 weights and S vpdpbusd with
// the S slab lines, into U accumulator sets taken block by block (U x S >= 8
// chains; the first set starts at -comp); results staged per 16 block rows and moved by 16 x 16 transposes
// to the same epilogue.
//
// One row of x on the compact blocks (the row kernel): per channel, 16 of its
// block groups at a time, the activation words read from the row at the
// blocks' columns (scalar loads and inserts) and the channel's weight words loaded
// (blocks of 2, 4, 8 rows x 4: picked out of the block row's loads by
// vpermt2d, compact_rows_bh; other heights gather them), one vpdpbusd; 16
// channels' sums go to the epilogue together.
#include <immintrin.h>

#include <type_traits>

#include <algorithm>
#include <cstring>
#include <vector>

#include "block_sparse/block_sparse.h"
#include "block_sparse/row_words.h"
#include "common/transpose_avx512.h"
#include "int8_gemm/epilogue_avx512.h"

namespace pyaccel {
namespace block_sparse {
namespace {

inline int32_t load32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <int R, int V>
inline void tile(const GemmArgsI8& g, int64_t m, int64_t r, int ch0) {
  __m512i acc[R][V];
  const int32_t* comp = g.comp + r * g.bh_pad + ch0;
  for (int v = 0; v < V; ++v) {
    const __m512i c = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(comp + 16 * v));
    for (int i = 0; i < R; ++i) acc[i][v] = c;
  }
  const int8_t* a0 = g.a + m * g.lda;
  const int64_t groups = g.bw4 / 4;
  for (int64_t b = g.rowptr[r]; b < g.rowptr[r + 1]; ++b) {
    const int8_t* w = g.blocks + b * g.bw4 * g.bh_pad + ch0 * 4;
    const int8_t* ac = a0 + g.colk[b];
    for (int64_t q = 0; q < groups; ++q) {
      __m512i wv[V];
      for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_si512(w + (q * g.bh_pad + 16 * v) * 4);
      for (int i = 0; i < R; ++i) {
        const __m512i a = _mm512_set1_epi32(load32(ac + i * g.lda + 4 * q));
        for (int v = 0; v < V; ++v) acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], a, wv[v]);
      }
    }
  }
  const int64_t n0 = r * g.bh + ch0;
  // the channels of this block row that exist
  const int8_gemm::GemmArgs e = epilogue_args(g, std::min<int64_t>(r * g.bh + g.bh, g.n));
  for (int v = 0; v < V; ++v) {
    if (n0 + 16 * v >= e.n) break;
    for (int i = 0; i < R; ++i) int8_gemm::avx512::store16(e, acc[i][v], g.a_scale[m + i], m + i, n0 + 16 * v);
  }
}

template <int MR, int V>
inline void rows_of_chunk(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r, int ch0) {
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) tile<MR, V>(g, m, r, ch0);
  switch (m1 - m) {
#define PYACCEL_BSR_CASE(R) \
  case R:                   \
    if constexpr (R < MR) tile<R, V>(g, m, r, ch0); \
    break;
    PYACCEL_BSR_CASE(1) PYACCEL_BSR_CASE(2) PYACCEL_BSR_CASE(3) PYACCEL_BSR_CASE(4) PYACCEL_BSR_CASE(5)
    PYACCEL_BSR_CASE(6) PYACCEL_BSR_CASE(7) PYACCEL_BSR_CASE(8) PYACCEL_BSR_CASE(9) PYACCEL_BSR_CASE(10)
    PYACCEL_BSR_CASE(11)
#undef PYACCEL_BSR_CASE
    default:
      break;
  }
}

// int32 slab lines of W rows: zmm (16) or, for batches of <= 8 rows, ymm (8:
// on Zen 4 a ymm vpdpbusd does the work of a half-empty zmm one, and the
// slabs of a K = 4096 layer fit L1).
struct Z16 {
  using T = __m512i;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_si512(); }
  static T set1(int32_t v) { return _mm512_set1_epi32(v); }
  static T load(const int32_t* p) { return _mm512_load_si512(p); }
  static T dot(T acc, const int32_t* x, T w) { return _mm512_dpbusd_epi32(acc, _mm512_load_si512(x), w); }
  static T add(T a, T b) { return _mm512_add_epi32(a, b); }
  static void store(int32_t* p, T v) { _mm512_store_si512(p, v); }
  static __m512 to_zmm(T v) { return _mm512_castsi512_ps(v); }
};
struct Y8 {
  using T = __m256i;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_si256(); }
  static T set1(int32_t v) { return _mm256_set1_epi32(v); }
  static T load(const int32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  static T dot(T acc, const int32_t* x, T w) { return _mm256_dpbusd_epi32(acc, load(x), w); }
  static T add(T a, T b) { return _mm256_add_epi32(a, b); }
  static void store(int32_t* p, T v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }
  static __m512 to_zmm(T v) { return _mm512_castsi512_ps(_mm512_zextsi256_si512(v)); }
};

// Rows [W s, W (s + S)) x the channels of block rows [r0, r1), in runs of
// 16 block rows whose results are staged, then flushed. GPB: groups of 4
// inputs a block (bw / 4) when 1, else 0 (read at run time). K is not cut
// into L1-sized chunks: at 90 % zero 1 x 4 blocks that ran 1.5 - 2x slower
// (a channel has few blocks a chunk; finding them and the partial sums' round
// trip cost more than the L2 reads saved).
template <typename V, int S, int GPB>
void slab_rows(const GemmArgsI8& g, const int32_t* xg, int64_t sst, int64_t m, int64_t s, int64_t r0, int64_t r1,
               int32_t* stage) {
  constexpr int L = S * V::W;
  constexpr int64_t kRunRows = 16;
  const int64_t gpb = GPB > 0 ? GPB : g.bw4 / 4;
  int8_gemm::GemmArgs e = epilogue_args(g, 0);
  for (int64_t rf = r0; rf < r1; rf += kRunRows) {
    const int64_t rl = std::min<int64_t>(r1, rf + kRunRows);
    const int64_t cbeg = rf * g.bh, cend = std::min<int64_t>(rl * g.bh, g.n);
    for (int64_t r = rf; r < rl; ++r) {
      const int64_t b0 = g.rowptr[r], b1 = g.rowptr[r + 1];
      for (int i = 0; i < g.bh && r * g.bh + i < cend; ++i) {
        // U accumulator sets, one block each in turn: U x S independent vpdpbusd chains
        constexpr bool kAsm = std::is_same_v<V, Y8> && S == 1 && GPB == 1;
        constexpr int U = kAsm ? 8 : S >= 2 ? 2 : 4;
        typename V::T acc[U][S];
        for (int u = 0; u < U; ++u)
          for (int t = 0; t < S; ++t) acc[u][t] = V::zero();
        for (int t = 0; t < S; ++t) acc[0][t] = V::set1(-g.comp[r * g.bh_pad + i]);
        const int32_t* wi = g.w4 + i * gpb;  // channel i of block b at wi + b * bh * gpb
        const int32_t* xs = xg + s * sst;
        auto add_block = [&](int64_t b, typename V::T (&a)[S]) {
          const int32_t* w = wi + b * g.bh * gpb;
          const int32_t* xb = xs + (static_cast<uint32_t>(g.colk[b]) >> 2) * V::W;
          for (int64_t q = 0; q < gpb; ++q) {
            const typename V::T wv = V::set1(w[q]);
#pragma GCC unroll 8
            for (int t = 0; t < S; ++t) a[t] = V::dot(a[t], xb + q * V::W + t * sst, wv);
          }
        };
        int64_t b = b0;
        if constexpr (kAsm) {
          // 1 x 4 blocks (one channel, one weight word a block), 8-row slabs:
          // an asm loop over 8 blocks an iteration: two 16-byte loads of
          // their weight words, each copied to both 128-bit lanes, the column
          // indices two to an 8-byte load (split by a 32-bit move and a shift:
          // the loop is bound by its loads), then per block its slab line
          // (colk * 8 bytes = (colk / 4) lines of 32 bytes), a vpshufd that
          // broadcasts its weight word (an embedded broadcast was a third load
          // a block) and vpdpbusd into its own accumulator (8 chains). GCC's
          // loop took ~8.5 instructions a block (shift, scale, broadcast,
          // accumulator copies).
          static_assert(U == 8 && V::W == 8, "the asm takes 8 blocks an iteration and 8-lane (32-byte) slab lines");
          if (g.bh == 1 && g.colk4 && b1 - b0 >= U) {
            const int32_t* ck = g.colk;
            const int32_t* wp = wi;  // bh = gpb = 1: block b's word at wp[b]
            const int64_t last = b1 - U;
            int64_t r0_, r1_, r2_, r3_;
            __asm__(
                "1:\n\t"
                "vbroadcasti32x4 (%[wp],%[b],4), %%ymm24\n\t"
                "vbroadcasti32x4 16(%[wp],%[b],4), %%ymm25\n\t"
                "movq 0(%[ck],%[b],4), %[r1]\n\t"
                "movq 8(%[ck],%[b],4), %[r3]\n\t"
                "movl %k[r1], %k[r0]\n\t"
                "movl %k[r3], %k[r2]\n\t"
                "shrq $32, %[r1]\n\t"
                "shrq $32, %[r3]\n\t"
                "vmovdqa32 (%[xs],%[r0],8), %%ymm16\n\t"
                "vmovdqa32 (%[xs],%[r1],8), %%ymm17\n\t"
                "vmovdqa32 (%[xs],%[r2],8), %%ymm18\n\t"
                "vmovdqa32 (%[xs],%[r3],8), %%ymm19\n\t"
                "vpshufd $0x00, %%ymm24, %%ymm20\n\t"
                "vpshufd $0x55, %%ymm24, %%ymm21\n\t"
                "vpshufd $0xaa, %%ymm24, %%ymm22\n\t"
                "vpshufd $0xff, %%ymm24, %%ymm23\n\t"
                "vpdpbusd %%ymm20, %%ymm16, %[a0]\n\t"
                "vpdpbusd %%ymm21, %%ymm17, %[a1]\n\t"
                "vpdpbusd %%ymm22, %%ymm18, %[a2]\n\t"
                "vpdpbusd %%ymm23, %%ymm19, %[a3]\n\t"
                "movq 16(%[ck],%[b],4), %[r1]\n\t"
                "movq 24(%[ck],%[b],4), %[r3]\n\t"
                "movl %k[r1], %k[r0]\n\t"
                "movl %k[r3], %k[r2]\n\t"
                "shrq $32, %[r1]\n\t"
                "shrq $32, %[r3]\n\t"
                "vmovdqa32 (%[xs],%[r0],8), %%ymm16\n\t"
                "vmovdqa32 (%[xs],%[r1],8), %%ymm17\n\t"
                "vmovdqa32 (%[xs],%[r2],8), %%ymm18\n\t"
                "vmovdqa32 (%[xs],%[r3],8), %%ymm19\n\t"
                "vpshufd $0x00, %%ymm25, %%ymm20\n\t"
                "vpshufd $0x55, %%ymm25, %%ymm21\n\t"
                "vpshufd $0xaa, %%ymm25, %%ymm22\n\t"
                "vpshufd $0xff, %%ymm25, %%ymm23\n\t"
                "vpdpbusd %%ymm20, %%ymm16, %[a4]\n\t"
                "vpdpbusd %%ymm21, %%ymm17, %[a5]\n\t"
                "vpdpbusd %%ymm22, %%ymm18, %[a6]\n\t"
                "vpdpbusd %%ymm23, %%ymm19, %[a7]\n\t"
                "add $8, %[b]\n\t"
                "cmp %[last], %[b]\n\t"
                "jle 1b"
                : [a0] "+v"(acc[0][0]), [a1] "+v"(acc[1][0]), [a2] "+v"(acc[2][0]), [a3] "+v"(acc[3][0]),
                  [a4] "+v"(acc[4][0]), [a5] "+v"(acc[5][0]), [a6] "+v"(acc[6][0]), [a7] "+v"(acc[7][0]),
                  [b] "+r"(b), [r0] "=&r"(r0_), [r1] "=&r"(r1_), [r2] "=&r"(r2_), [r3] "=&r"(r3_)
                : [ck] "r"(ck), [wp] "r"(wp), [xs] "r"(xs), [last] "r"(last)
                : "memory", "cc", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23",
                  "xmm24", "xmm25");
          }
        }
        for (; b + U <= b1; b += U)
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) add_block(b + u, acc[u]);
        if constexpr (U > 4) {
          if (b + 4 <= b1) {
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u) add_block(b + u, acc[u]);
            b += 4;
          }
        }
        for (; b < b1; ++b) add_block(b, acc[0]);
        for (int u = 1; u < U; ++u)
          for (int t = 0; t < S; ++t) acc[0][t] = V::add(acc[0][t], acc[u][t]);
        int32_t* st = stage + (r * g.bh + i - cbeg) * L;
        for (int t = 0; t < S; ++t) V::store(st + t * V::W, acc[0][t]);
      }
    }
    e.n = cend;  // this run's channels only (the next belongs to another thread)
    for (int64_t c = cbeg; c < cend; c += 16) {
      const int nc = static_cast<int>(std::min<int64_t>(16, cend - c));
      for (int t = 0; t < S; ++t) {
        const int64_t row0 = (s + t) * V::W;
        if (row0 >= m) break;
        const int rows = static_cast<int>(std::min<int64_t>(V::W, m - row0));
        __m512 rr[16], o[16];
        for (int q = 0; q < 16; ++q)
          rr[q] = q < nc ? V::to_zmm(V::load(stage + (c - cbeg + q) * L + t * V::W)) : _mm512_setzero_ps();
        transpose16x16(rr, o);
        for (int l = 0; l < rows; ++l)
          int8_gemm::avx512::store16(e, _mm512_castps_si512(o[l]), g.a_scale[row0 + l], row0 + l, c);
      }
    }
  }
}

// The activation words of up to 16 blocks of a channel (row_words.h).
inline __m512i row_words16(const int8_t* a, const int32_t* cols, int left) {
  const __m512i lo = _mm512_inserti32x4(_mm512_castsi128_si512(row_words_quarter(a, cols, 0, left)),
                                        row_words_quarter(a, cols, 1, left), 1);
  return _mm512_inserti32x4(_mm512_inserti32x4(lo, row_words_quarter(a, cols, 2, left), 2),
                            row_words_quarter(a, cols, 3, left), 3);
}

// One row's channel sums, 16 at a time to the epilogue (channels from c0).
struct RowSums16 {
  const int8_gemm::GemmArgs& e;
  float a_scale;
  int64_t m, c0;
  alignas(64) int32_t sums[16] = {};
  int j = 0;
  void push(int32_t v) {
    sums[j++] = v;
    if (j == 16) flush();
  }
  void flush() {  // e.n bounds the last group
    if (j > 0) int8_gemm::avx512::store16(e, _mm512_load_si512(sums), a_scale, m, c0);
    c0 += 16;
    j = 0;
  }
};

template <bool CONTIGUOUS>
void compact_rows(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  const int64_t gpb = g.bw4 / 4;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  each_block_row<RowSums16>(g, m0, m1, r0, r1, [&](const int8_t* a, int64_t r, int64_t b0, int64_t b1, int nch,
                                                   RowSums16& out) {
    for (int i = 0; i < nch; ++i) {
      __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
      for (int64_t q = 0; q < gpb; ++q) {
        for (int64_t b = b0; b < b1; b += 16) {
          const int left = static_cast<int>(std::min<int64_t>(16, b1 - b));
          const __mmask16 k = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
          const __m512i x = row_words16(a + 4 * q, g.colk + b, left);
          __m512i w;
          if (CONTIGUOUS) {
            w = _mm512_maskz_loadu_epi32(k, g.w4 + b);
          } else {
            const __m512i wi = _mm512_add_epi32(
                _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(b)), lane),
                                   _mm512_set1_epi32(static_cast<int32_t>(g.bh * gpb))),
                _mm512_set1_epi32(static_cast<int32_t>(i * gpb + q)));
            w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, wi, g.w4, 4);
          }
          if ((b - b0) & 16)
            acc1 = _mm512_dpbusd_epi32(acc1, x, w);
          else
            acc0 = _mm512_dpbusd_epi32(acc0, x, w);
        }
      }
      out.push(_mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1)) - g.comp[r * g.bh_pad + i]);
    }
  });
}

// The row kernel for blocks of BH = 2, 4 or 8 rows x 4 inputs: per 16 blocks of
// a block row one set of activation words serves its BH channels, and the
// blocks' 16 x BH weight words come in BH loads, each channel's 16 picked
// out by vpermt2d (from two registers at a time, masked moves joining them)
// instead of a vpgatherdd each.
template <int BH>
void compact_rows_bh(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  static_assert(BH == 2 || BH == 4 || BH == 8, "block rows");
  constexpr int kSpan = 32 / BH;  // lanes one register pair serves
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i pick[BH];  // word t * BH + i of a register pair, for channel i
  for (int i = 0; i < BH; ++i)
    pick[i] = _mm512_and_si512(_mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(BH)), _mm512_set1_epi32(i)),
                               _mm512_set1_epi32(31));
  each_block_row<RowSums16>(g, m0, m1, r0, r1, [&](const int8_t* a, int64_t r, int64_t b0, int64_t b1, int nch,
                                                   RowSums16& out) {
    __m512i acc[BH];
    for (int i = 0; i < BH; ++i) acc[i] = _mm512_setzero_si512();
    for (int64_t b = b0; b < b1; b += 16) {
      const int left = static_cast<int>(std::min<int64_t>(16, b1 - b));
      const __m512i x = row_words16(a, g.colk + b, left);
      __m512i w[BH];  // the blocks' words in order; past the last block zero
      for (int q = 0; q < BH; ++q) {
        const int rem = left * BH - 16 * q;
        const __mmask16 k = rem >= 16 ? __mmask16(0xffff) : rem <= 0 ? __mmask16(0) : __mmask16((1u << rem) - 1);
        w[q] = _mm512_maskz_loadu_epi32(k, g.w4 + b * BH + 16 * q);
      }
      for (int i = 0; i < BH; ++i) {
        __m512i wi = _mm512_permutex2var_epi32(w[0], pick[i], w[1]);
        for (int p = 1; p < BH / 2; ++p)
          wi = _mm512_mask_mov_epi32(wi, __mmask16(((1u << kSpan) - 1) << (kSpan * p)),
                                     _mm512_permutex2var_epi32(w[2 * p], pick[i], w[2 * p + 1]));
        acc[i] = _mm512_dpbusd_epi32(acc[i], x, wi);
      }
    }
    for (int i = 0; i < nch; ++i) out.push(_mm512_reduce_add_epi32(acc[i]) - g.comp[r * g.bh_pad + i]);
  });
}

thread_local std::vector<int32_t> t_stage;

template <typename V, int GPB>
void slab_runs(const GemmArgsI8& g, const int32_t* xg, int64_t sst, int64_t m, int64_t s0, int64_t s1,
               int64_t r0, int64_t r1) {
  const size_t words = 16 * kSmallBlockRows * 4 * 16 + 16;  // 16 block rows x bh channels x S x W
  if (t_stage.size() < words) t_stage.resize(words);
  int32_t* stage = reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(t_stage.data()) + 63) & ~uintptr_t(63));
  for_each_slab_run<4>(s0, s1, [&](int64_t s, auto run) {
    slab_rows<V, decltype(run)::value, GPB>(g, xg, sst, m, s, r0, r1, stage);
  });
}

// 8-row slabs: 16 groups of 8 rows a step, an 8 x 16 dword transpose in
// three shuffle stages (24 shuffles, where the 16 x 16 transpose with 8
// zero rows took 64).
void pack_groups8(const int8_t* q, int64_t lda, int64_t m, int64_t ngroups, int32_t* xg, int64_t sst, int64_t s0,
                  int64_t s1) {
  const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t rows = std::min<int64_t>(8, m - s * 8);
    int32_t* out = xg + s * sst;
    for (int64_t g0 = 0; g0 < ngroups; g0 += 16) {
      const int gn = static_cast<int>(std::min<int64_t>(16, ngroups - g0));
      const __mmask16 mask = gn >= 16 ? __mmask16(0xffff) : __mmask16((1u << gn) - 1);
      __m512i r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = i < rows ? _mm512_maskz_loadu_epi32(mask, q + (s * 8 + i) * lda + 4 * g0) : _mm512_setzero_si512();
      // a: pairs of rows interleaved; b[c] (c < 4): lane l holds group 4 l + c of rows 0 - 3, b[4 + c] of rows 4 - 7
      __m512i a[8], b[8];
      for (int h = 0; h < 2; ++h) {
        a[4 * h + 0] = _mm512_unpacklo_epi32(r[4 * h + 0], r[4 * h + 1]);
        a[4 * h + 1] = _mm512_unpackhi_epi32(r[4 * h + 0], r[4 * h + 1]);
        a[4 * h + 2] = _mm512_unpacklo_epi32(r[4 * h + 2], r[4 * h + 3]);
        a[4 * h + 3] = _mm512_unpackhi_epi32(r[4 * h + 2], r[4 * h + 3]);
        b[4 * h + 0] = _mm512_unpacklo_epi64(a[4 * h + 0], a[4 * h + 2]);
        b[4 * h + 1] = _mm512_unpackhi_epi64(a[4 * h + 0], a[4 * h + 2]);
        b[4 * h + 2] = _mm512_unpacklo_epi64(a[4 * h + 1], a[4 * h + 3]);
        b[4 * h + 3] = _mm512_unpackhi_epi64(a[4 * h + 1], a[4 * h + 3]);
      }
      int32_t* o = out + g0 * 8;
      for (int c = 0; c < 4; ++c) {
        // groups c and 4 + c (lanes 0, 1 of b), 8 + c and 12 + c (lanes 2, 3): rows 0 - 7 each
        const __m512i e = _mm512_permutex2var_epi64(b[c], lo, b[4 + c]);
        const __m512i f = _mm512_permutex2var_epi64(b[c], hi, b[4 + c]);
        if (c < gn) _mm256_store_si256(reinterpret_cast<__m256i*>(o + c * 8), _mm512_castsi512_si256(e));
        if (4 + c < gn) _mm256_store_si256(reinterpret_cast<__m256i*>(o + (4 + c) * 8), _mm512_extracti64x4_epi64(e, 1));
        if (8 + c < gn) _mm256_store_si256(reinterpret_cast<__m256i*>(o + (8 + c) * 8), _mm512_castsi512_si256(f));
        if (12 + c < gn)
          _mm256_store_si256(reinterpret_cast<__m256i*>(o + (12 + c) * 8), _mm512_extracti64x4_epi64(f, 1));
      }
    }
  }
}

}  // namespace

void qs8_bsr_gemm_avx512vnni(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  // rows of activations per chunk: ~256 KiB, so a chunk stays in L2 across block rows
  const int64_t mc = std::max<int64_t>(24, (int64_t(256) << 10) / std::max<int64_t>(1, g.lda) / 24 * 24);
  for (int64_t ma = m0; ma < m1; ma += mc) {
    const int64_t mb = std::min(m1, ma + mc);
    for (int64_t r = r0; r < r1; ++r) {
      int ch = 0;
      for (; ch + 64 <= g.bh_pad; ch += 64) rows_of_chunk<6, 4>(g, ma, mb, r, ch);
      switch (g.bh_pad - ch) {
        case 48: rows_of_chunk<8, 3>(g, ma, mb, r, ch); break;
        case 32: rows_of_chunk<8, 2>(g, ma, mb, r, ch); break;
        case 16: rows_of_chunk<12, 1>(g, ma, mb, r, ch); break;
        default: break;
      }
    }
  }
}

void qs8_bsr_slabs_avx512vnni(const GemmArgsI8& g, const int32_t* xg, int64_t sst, int64_t m, int64_t s0,
                              int64_t s1, int64_t r0, int64_t r1, int sw) {
  if (sw == 8) {
    if (g.bw4 == 4) slab_runs<Y8, 1>(g, xg, sst, m, s0, s1, r0, r1);
    else slab_runs<Y8, 0>(g, xg, sst, m, s0, s1, r0, r1);
  } else {
    if (g.bw4 == 4) slab_runs<Z16, 1>(g, xg, sst, m, s0, s1, r0, r1);
    else slab_runs<Z16, 0>(g, xg, sst, m, s0, s1, r0, r1);
  }
}

void qs8_bsr_pack_groups_avx512(const int8_t* q, int64_t lda, int64_t m, int64_t ngroups, int32_t* xg,
                                int64_t sst, int64_t s0, int64_t s1, int sw) {
  if (sw == 8) {
    pack_groups8(q, lda, m, ngroups, xg, sst, s0, s1);
    return;
  }
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t rows = std::min<int64_t>(sw, m - s * sw);
    for (int64_t g0 = 0; g0 < ngroups; g0 += 16) {
      const int gn = static_cast<int>(std::min<int64_t>(16, ngroups - g0));
      const __mmask16 mask = gn >= 16 ? __mmask16(0xffff) : __mmask16((1u << gn) - 1);
      __m512 r[16], c[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(mask, q + (s * sw + i) * lda + 4 * g0))
                        : _mm512_setzero_ps();
      transpose16x16(r, c);  // c[j]: group g0 + j of the slab's rows (8-row slabs: the low 8 lanes)
      float* out = reinterpret_cast<float*>(xg + s * sst);
      if (sw == 8)
        for (int j = 0; j < gn; ++j) _mm256_store_ps(out + (g0 + j) * 8, _mm512_castps512_ps256(c[j]));
      else
        for (int j = 0; j < gn; ++j) _mm512_store_ps(out + (g0 + j) * 16, c[j]);
    }
  }
}

void qs8_bsr_rows_avx512vnni(const GemmArgsI8& g, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  if (g.bw4 == 4 && g.bh == 1) return compact_rows<true>(g, m0, m1, r0, r1);
  if (g.bw4 == 4 && g.bh == 2) return compact_rows_bh<2>(g, m0, m1, r0, r1);
  if (g.bw4 == 4 && g.bh == 4) return compact_rows_bh<4>(g, m0, m1, r0, r1);
  if (g.bw4 == 4 && g.bh == 8) return compact_rows_bh<8>(g, m0, m1, r0, r1);
  compact_rows<false>(g, m0, m1, r0, r1);
}

}  // namespace block_sparse
}  // namespace pyaccel
