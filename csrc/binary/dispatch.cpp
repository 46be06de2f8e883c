// Kernel choice and the driver of the binary convolution / linear: pack the
// activations (rows of pixels in parallel), build the border-correction table
// (exact zero padding), then run the tiles over (group, 32-channel block) x
// pixel chunks (common/parallel.h's GEMM split).
#include <algorithm>
#include <cstring>
#include <vector>

#include <emmintrin.h>  // SSE2: baseline x86-64
#include <omp.h>

#include "binary/binary.h"
#include "common/ladder.h"
#include "common/parallel.h"

namespace pyaccel {
namespace binary {
namespace {

const Kernel kLadder[] = {
    {Isa::kAvx512Icl, "bconv_6x32_avx512icl", 6, tile_avx512icl, pack_row_avx512},
    {Isa::kAvx2, "bconv_4x8_avx2", 4, tile_avx2, pack_row_avx2},
    {Isa::kPortable, "bconv_1x32_scalar", 1, tile_scalar, pack_row_scalar},
};
LadderChoice<Kernel> g_choice;

// Below this many binary multiply-adds one thread is faster.
constexpr int64_t kMinParallelMacs = int64_t(1) << 21;

thread_local std::vector<uint64_t> t_packed;

}  // namespace

const Kernel& select_kernel() {
  return g_choice.get(kLadder, [](const Kernel& k) { return k.isa; });
}

BorderTable border_table(const ConvArgs& a) {
  BorderTable bt;
  bt.correct = a.pad_mode == kPadZeros && (a.ph > 0 || a.pw > 0) && a.kh <= 64 && a.kw <= 64;
  if (!bt.correct) return bt;
  const int64_t ntaps = a.kh * a.kw;
  // per output row / column: the mask of kernel rows / columns outside the input
  auto masks = [](int64_t out, int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, std::vector<int>& cls,
                  std::vector<uint64_t>& uniq) {
    cls.assign(out, 0);
    uniq.assign(1, 0);  // class 0: nothing outside
    for (int64_t o = 0; o < out; ++o) {
      uint64_t m = 0;
      for (int64_t t = 0; t < k; ++t) {
        const int64_t i = o * s - p + t * d;
        if (i < 0 || i >= in) m |= uint64_t(1) << t;
      }
      int c = static_cast<int>(std::find(uniq.begin(), uniq.end(), m) - uniq.begin());
      if (c == static_cast<int>(uniq.size())) uniq.push_back(m);
      cls[o] = c;
    }
  };
  std::vector<uint64_t> rmask, cmask;
  masks(a.oh, a.h, a.kh, a.sh, a.ph, a.dh, bt.rcls, rmask);
  masks(a.ow, a.w, a.kw, a.sw, a.pw, a.dw, bt.ccls, cmask);
  const int64_t nr = rmask.size(), nc = cmask.size();
  bt.ncls = nc;
  bt.corr.resize(nr * nc * a.oc);
  std::vector<int64_t> outside;
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t q = 0; q < nc; ++q) {
      outside.clear();  // the taps of this border class that fall outside the input
      for (int64_t i = 0; i < a.kh; ++i)
        for (int64_t j = 0; j < a.kw; ++j)
          if (((rmask[r] >> i) & 1) || ((cmask[q] >> j) & 1)) outside.push_back(i * a.kw + j);
      int32_t* row = bt.corr.data() + (r * nc + q) * a.oc;
      for (int64_t o = 0; o < a.oc; ++o) {  // wsum rows are contiguous per output channel
        const int32_t* ws = a.wsum + o * ntaps;
        int32_t sum = 0;
        for (const int64_t t : outside) sum += ws[t];
        row[o] = sum;
      }
    }
  return bt;
}

void conv(const ConvArgs& a, int nthreads, double* phase_seconds, const BorderTable* table) {
  const Kernel& kern = select_kernel();
  const int64_t npix = a.n * a.oh * a.ow;
  if (npix <= 0 || a.oc <= 0) return;
  const int64_t G = a.groups, cg = a.c / G, ocg = a.oc / G;
  const int64_t cw = (cg + 63) / 64, wpix = G * cw;
  const int64_t hp = a.h + 2 * a.ph, wp = a.w + 2 * a.pw;
  const int64_t ntaps = a.kh * a.kw;
  const int64_t nb = (ocg + kNR - 1) / kNR;
  if (npix * a.oc * ntaps * cg < kMinParallelMacs) nthreads = 1;

  const double t_start = phase_seconds ? omp_get_wtime() : 0.0;
  // 1. activations -> padded channels-last bits
  const size_t need = static_cast<size_t>(a.n * hp * wp * wpix) + 8;
  if (t_packed.size() < need) t_packed.resize(need);
  uint64_t* xb = t_packed.data();
  const int64_t row_words = wp * wpix;
  // xbits: the valid channel bits of a pixel's last word (C % 64 of them; all for C a multiple of 64)
  const uint64_t xbits_tail = a.c % 64 ? (uint64_t(1) << (a.c % 64)) - 1 : ~uint64_t(0);
  auto pack_rows = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t img = r / hp, yy = r % hp - a.ph;
      uint64_t* row = xb + r * row_words;
      if (yy < 0 || yy >= a.h) {
        std::memset(row, 0, sizeof(uint64_t) * row_words);
        continue;
      }
      std::memset(row, 0, sizeof(uint64_t) * a.pw * wpix);
      std::memset(row + (a.pw + a.w) * wpix, 0, sizeof(uint64_t) * a.pw * wpix);
      if (a.xbits) {  // signs already packed by the previous layer (groups == 1: the same words)
        uint64_t* dst = row + a.pw * wpix;
        std::memcpy(dst, a.xbits + (img * a.h + yy) * a.w * wpix, sizeof(uint64_t) * a.w * wpix);
        if (xbits_tail != ~uint64_t(0))  // bits past C would count as channels: ignore them
          for (int64_t px = 0; px < a.w; ++px) dst[px * wpix + wpix - 1] &= xbits_tail;
      } else
        kern.pack_row(a.x + img * a.sxn + yy * a.sxh, a.c, a.w, a.sxc, a.sxw, G, cg, cw, row + a.pw * wpix);
    }
  };
  // Several images per thread (and no phase timing asked): each thread packs
  // and computes whole images, so one thread's packing (memory-bound: fp32
  // input from DRAM) overlaps the other's tiles (ALU-bound), and an image's
  // bits stay in cache. Otherwise pack everything, then split the tiles.
  const int team = effective_threads(nthreads);
  const bool per_image = team > 1 && a.n >= 2 * team && !phase_seconds;
  if (!per_image) parallel_for(a.n * hp, 1, nthreads, pack_rows);

  const double t_packed = phase_seconds ? omp_get_wtime() : 0.0;
  // 2. tap offsets (words from a pixel's top-left tap) and border classes
  std::vector<int64_t> tap_off(ntaps);
  for (int64_t i = 0; i < a.kh; ++i)
    for (int64_t j = 0; j < a.kw; ++j) tap_off[i * a.kw + j] = (i * a.dh * wp + j * a.dw) * wpix;
  BorderTable own_table;
  const BorderTable* border = table;
  if (!border) {
    own_table = border_table(a);
    border = &own_table;
  }
  const bool correct = border->correct;
  const std::vector<int>& rcls = border->rcls;
  const std::vector<int>& ccls = border->ccls;
  const std::vector<int32_t>& corr = border->corr;
  const int64_t ncls = border->ncls;

  const double t_table = phase_seconds ? omp_get_wtime() : 0.0;
  // 3. tiles
  const int mr = kern.mr;
  // A float output of kStreamMinBytes or more goes out with non-temporal
  // stores (no read for ownership, no eviction of the packed input and
  // weights): whole 16-channel groups only, so y must be 64-byte aligned and
  // OC / groups a multiple of 16 (every group's channel blocks then start on a
  // cache line). Each thread fences its stores before the barrier.
  const bool stream = !a.ybits && ocg % 16 == 0 && reinterpret_cast<uintptr_t>(a.y) % 64 == 0 &&
                      npix * a.oc * int64_t(sizeof(float)) >= kStreamMinBytes;
  const int64_t words_per_block = ntaps * cw * kNR;
  auto tiles = [&](int64_t unit, int64_t p0, int64_t p1) {
    const int64_t g = unit / nb, b = unit % nb;
    const int64_t oc0 = g * ocg + b * kNR;
    const int nvalid = static_cast<int>(std::min<int64_t>(kNR, ocg - b * kNR));
    const uint64_t* wblk = a.wpacked + unit * words_per_block;
    TileArgs t{static_cast<int>(ntaps), tap_off.data(), cw, static_cast<int32_t>(ntaps * cg), a.scale, a.shift,
               a.act, a.lo, a.hi, a.slope, stream};
    const uint64_t* xs[kMaxMR];
    const int32_t* cs[kMaxMR];
    float* ys[kMaxMR];
    alignas(64) float scratch[kMaxMR][kNR];  // ybits: the tile's floats, turned into sign bits below
    const int64_t owords32 = 2 * ((a.oc + 63) / 64);
    // output coordinates of pixel p0, then stepped (no divisions per pixel)
    int64_t img = p0 / (a.oh * a.ow), oy = p0 % (a.oh * a.ow) / a.ow, ox = p0 % a.ow;
    for (int64_t p = p0; p < p1; p += mr) {
      const int m = static_cast<int>(std::min<int64_t>(mr, p1 - p));
      bool any = false;
      for (int i = 0; i < m; ++i) {
        xs[i] = xb + ((img * hp + oy * a.sh) * wp + ox * a.sw) * wpix + g * cw;
        ys[i] = a.ybits ? scratch[i] : a.y + (p + i) * a.oc + oc0;
        cs[i] = nullptr;
        if (correct) {
          const int64_t cl = rcls[oy] * ncls + ccls[ox];
          if (cl) {
            cs[i] = corr.data() + cl * a.oc + oc0;
            any = true;
          }
        }
        if (++ox == a.ow) {
          ox = 0;
          if (++oy == a.oh) {
            oy = 0;
            ++img;
          }
        }
      }
      kern.tile(t, m, xs, wblk, any ? cs : nullptr, ys, nvalid, oc0);
      if (a.ybits) {  // oc0 is a multiple of 32: this block's signs are one 32-bit half of a word
        const uint32_t keep = nvalid >= 32 ? ~0u : (1u << nvalid) - 1;  // channels past nvalid stay 0
        const __m128 zero = _mm_setzero_ps();
        for (int i = 0; i < m; ++i) {
          uint32_t bits = 0;
          for (int j = 0; j < kNR; j += 4)  // y < 0 (false for NaN: sign(NaN) = +1)
            bits |= uint32_t(_mm_movemask_ps(_mm_cmplt_ps(_mm_load_ps(scratch[i] + j), zero))) << j;
          bits &= keep;
          std::memcpy(reinterpret_cast<uint32_t*>(a.ybits) + (p + i) * owords32 + oc0 / 32, &bits, 4);
        }
      }
    }
  };
  if (per_image) {
    const int64_t ohw = a.oh * a.ow;
    // images handed out dynamically (a thread slowed by a busy neighbour takes fewer)
    parallel_two_phase(
        0, a.n, nthreads, [](int64_t, int64_t) {},
        [&](int64_t i0, int64_t i1) {
          for (int64_t img = i0; img < i1; ++img) {
            pack_rows(img * hp, (img + 1) * hp);
            for (int64_t unit = 0; unit < G * nb; ++unit) tiles(unit, img * ohw, (img + 1) * ohw);
          }
          if (stream) _mm_sfence();
        },
        a.n);
  } else {
    parallel_units_rows(G * nb, npix, mr, nthreads, [&](int64_t u, int64_t p0, int64_t p1) {
      tiles(u, p0, p1);
      if (stream) _mm_sfence();
    });
  }
  if (phase_seconds) {
    phase_seconds[0] = t_packed - t_start;
    phase_seconds[1] = t_table - t_packed;
    phase_seconds[2] = omp_get_wtime() - t_table;
  }
}

}  // namespace binary
}  // namespace pyaccel
