// Kernel choice and the driver of the fused depthwise-separable convolution.
//
// Work items are (image, band of output pixels, range of output panels). A
// band holds up to kBandBytes of depthwise output (t, fp32 [band][c_pad]),
// so t stays in L2 while every pointwise panel streams past it; the item
// computes t into a thread-local buffer and runs the GEMM on it at once.
// With fewer bands than 2 per thread (small images, N = 1 late layers), the
// output panels are split too: each item recomputes its band's depthwise
// output (1 - 7 % of the MACs) instead of sharing it through memory.
#include <algorithm>
#include <cstring>

#include <emmintrin.h>  // SSE2 (baseline x86-64): _mm_sfence
#include <vector>

#include "common/ladder.h"
#include "common/parallel.h"
#include "dwconv_fused/dwconv_fused.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace dws {
namespace {

const Kernel kLadder[] = {
    {Isa::kAvx512, "dws_12x32_avx512", 12, 32, dw_avx512, pw_avx512, act2_avx512},
    {Isa::kAvx2, "dws_6x16_avx2", 6, 16, dw_avx2, pw_avx2, act2_avx2},
    {Isa::kPortable, "dws_1x16_scalar", 1, 16, dw_scalar, pw_scalar, act2_portable},
};
LadderChoice<Kernel> g_choice;

constexpr int64_t kBandBytes = 192 * 1024;  // depthwise output per band (L2: 1 MB on Zen 4)
constexpr int64_t kMinParallelMacs = int64_t(1) << 17;
// Inputs of this size on (bytes): the depthwise stage prefetches (Problem::prefetch).
// MobileNetV1 blocks at N = 8, Zen 4, 2 threads: 32->64@112 +7 %, 128->128@56 +6 %,
// 256->256@28 +10 %, 512->512@14 +2 %.
constexpr int64_t kPrefetchMinBytes = int64_t(4) << 20;

thread_local std::vector<float> t_buf;
thread_local std::vector<int8_t> t_q;
thread_local std::vector<float> t_qscale;

float* band_buffer(int64_t floats) {
  if (t_buf.size() < static_cast<size_t>(floats + 16)) t_buf.resize(floats + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(t_buf.data()) + 63) & ~uintptr_t(63));
}

// Row stride of t (floats): c_pad, plus one cache line when c_pad * 4 bytes
// is a multiple of 1 KiB. The pointwise tile broadcasts from MR rows of t at
// once; at a 2 or 4 KiB stride (512, 1024 channels) those rows fall into 2 or
// 1 of the L1's 64 sets (8 ways each) and evict one another (1024 channels,
// Zen 4: the fused block ran 6 % faster with the padded stride).
int64_t t_stride(int64_t c_pad) {
  return (c_pad * 4) % 1024 == 0 ? c_pad + 16 : c_pad;
}

struct BandPlan {
  int64_t band, bands, splits;
  int nthreads;
};

// Bands of about equal size, each at most kBandBytes of t (ldt floats a
// pixel); with few of them, as many as make the items a multiple of the
// threads; with fewer bands than 2 a thread, the panels are split too.
BandPlan plan_bands(int64_t batch, int64_t pixels, int64_t ldt, int64_t macs_per_pixel, int64_t panels, int mr,
                    int nthreads) {
  if (batch * pixels * macs_per_pixel < kMinParallelMacs) nthreads = 1;
  const int64_t nt = std::max(1, nthreads);
  const int64_t max_band = std::max<int64_t>(mr, kBandBytes / (4 * ldt));
  int64_t bands = (pixels + max_band - 1) / max_band;
  if (batch * bands < 16 * nt)
    while ((batch * bands) % nt != 0 && bands < (pixels + mr - 1) / mr) ++bands;
  const int64_t band = (pixels + bands - 1) / bands;
  bands = (pixels + band - 1) / band;
  int64_t splits = 1;
  if (nt > 1 && batch * bands < 2 * nt) splits = std::min<int64_t>(panels, (2 * nt + batch * bands - 1) / (batch * bands));
  return BandPlan{band, bands, std::max<int64_t>(1, splits), static_cast<int>(nt)};
}

// The input rows [pf, pf_end) work item it + 1 reads (image, band), for the
// pointwise stage of item `it` to prefetch into L2 so the next depthwise stage
// finds them there, not in DRAM; none when item it + 1 reads item it's band
// again (another panel range).
void next_item_input(const float* x, int64_t h, int64_t w, int64_t c, int64_t ow, int64_t pad_t,
                     const PackedHeader& hd, int64_t pixels, int64_t band, int64_t bands, int64_t splits, int64_t it,
                     const char** pf, const char** pf_end) {
  if ((it + 1) / splits == it / splits) return;
  const int64_t nimg = (it + 1) / (bands * splits), nb = ((it + 1) % (bands * splits)) / splits;
  const int64_t np0 = nb * band, np1 = std::min(pixels, np0 + band);
  const int64_t iy0 = std::max<int64_t>(0, (np0 / ow) * hd.sh - pad_t);
  const int64_t iy1 = std::min<int64_t>(h, ((np1 - 1) / ow) * hd.sh - pad_t + int64_t(hd.kh - 1) * hd.dh + 1);
  if (iy0 >= iy1) return;
  const float* xi = x + nimg * h * w * c;
  *pf = reinterpret_cast<const char*>(xi + iy0 * w * c);
  *pf_end = reinterpret_cast<const char*>(xi + iy1 * w * c);
}

}  // namespace

const Kernel& select_kernel() {
  return g_choice.get(kLadder, [](const Kernel& k) { return k.isa; });
}

bool is_panel_width(int nr) {
  for (const Kernel& k : kLadder)
    if (k.nr == nr) return true;
  return false;
}

void forward(const float* x, int64_t batch, int64_t h, int64_t w, int64_t c, const uint8_t* packed, float* y,
             int64_t oh, int64_t ow, int64_t pad_t, int64_t pad_l, int nthreads) {
  if (batch <= 0 || oh <= 0 || ow <= 0) return;
  const Kernel& kern = select_kernel();
  PackedHeader hd;
  std::memcpy(&hd, packed, sizeof(hd));
  const Offsets o = offsets(c, hd.n, hd.kh, hd.kw, hd.layout);
  const int64_t pixels = oh * ow, ldt = t_stride(hd.c_pad), n = hd.n;
  const int64_t panels = hd.n_pad / hd.layout;
  const BandPlan bp = plan_bands(batch, pixels, ldt, c * n, panels, kern.mr, nthreads);
  const int64_t band = bp.band, bands = bp.bands, splits = bp.splits, nt = bp.nthreads;
  const int64_t items = batch * bands * splits;
  Problem base{};
  base.h = h; base.w = w; base.c = c; base.oh = oh; base.ow = ow; base.pad_t = pad_t; base.pad_l = pad_l;
  base.hd = reinterpret_cast<const PackedHeader*>(packed);
  base.wd = reinterpret_cast<const float*>(packed + o.wd);
  base.bd = reinterpret_cast<const float*>(packed + o.bd);
  base.wp = reinterpret_cast<const float*>(packed + o.wp);
  base.bp = reinterpret_cast<const float*>(packed + o.bp);
  // An output of kStreamMinBytes or more is stored with non-temporal stores:
  // it cannot stay in a core's L2 for the next layer, and skipping the read
  // for ownership saves a third of its traffic. Whole vectors only, so every
  // tile row must start 64-byte aligned (y aligned, N a multiple of 16);
  // each thread fences its stores before the barrier.
  base.stream = batch * pixels * n * int64_t(sizeof(float)) >= kStreamMinBytes && n % 16 == 0 &&
                reinterpret_cast<uintptr_t>(y) % 64 == 0;
  // Inputs beyond the caches (kPrefetchMinBytes) come from DRAM: the
  // depthwise stage prefetches the row the next output row adds (stride 1;
  // at stride 2 and with cache-resident inputs it measured 1 - 3 % slower).
  base.prefetch = hd.sh == 1 && batch * h * w * c * int64_t(sizeof(float)) >= kPrefetchMinBytes;
  parallel_for(items, 1, nt, [&](int64_t i0, int64_t i1) {
    float* t = band_buffer(band * ldt);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t img = it / (bands * splits), rest = it % (bands * splits);
      const int64_t b = rest / splits, s = rest % splits;
      Problem pr = base;
      pr.x = x + img * h * w * c;
      pr.y = y + img * pixels * n;
      const int64_t p0 = b * band, p1 = std::min(pixels, p0 + band);
      // MobileNetV1 blocks, Zen 4, 2 threads, interleaved: N = 8 128@56 +13 %, 256@28 +7 %,
      // 512@14 +1.5 %; N = 1 within +-2 %.
      if (it + 1 < i1) next_item_input(x, h, w, c, ow, pad_t, hd, pixels, band, bands, splits, it, &pr.pf, &pr.pf_end);
      kern.dw(pr, p0, p1, t, ldt);
      const int64_t q0 = panels * s / splits, q1 = panels * (s + 1) / splits;
      if (q0 < q1) kern.pw(pr, t, ldt, p0, p1, q0, q1);
    }
    if (base.stream) _mm_sfence();
  });
}

void forward_int8(const float* x, int64_t batch, int64_t h, int64_t w, int64_t c, const uint8_t* packed_dw,
                  const uint8_t* packed_i8, int64_t n, const float* w_scale, const float* bias, float* y, int64_t oh,
                  int64_t ow, int64_t pad_t, int64_t pad_l, int nthreads) {
  if (batch <= 0 || oh <= 0 || ow <= 0) return;
  const Kernel& kern = select_kernel();
  const int8_gemm::Kernel& k8 = int8_gemm::select_kernel();
  PackedHeader hd;
  std::memcpy(&hd, packed_dw, sizeof(hd));
  int8_gemm::PackedHeader h8;
  std::memcpy(&h8, packed_i8, sizeof(h8));
  const Offsets o = offsets(c, 0, hd.kh, hd.kw, hd.layout);
  const int64_t pixels = oh * ow, ldt = t_stride(hd.c_pad), lda = int8_gemm::a_stride(h8.k_pad);
  const int64_t panels = h8.n_pad / int8_gemm::kPanel;
  const BandPlan bp = plan_bands(batch, pixels, ldt, c * n, panels, std::max(kern.mr, k8.mr), nthreads);
  const int64_t items = batch * bp.bands * bp.splits;
  Problem base{};
  base.h = h; base.w = w; base.c = c; base.oh = oh; base.ow = ow; base.pad_t = pad_t; base.pad_l = pad_l;
  base.hd = reinterpret_cast<const PackedHeader*>(packed_dw);
  base.wd = reinterpret_cast<const float*>(packed_dw + o.wd);
  base.bd = reinterpret_cast<const float*>(packed_dw + o.bd);
  base.prefetch = hd.sh == 1 && batch * h * w * c * int64_t(sizeof(float)) >= kPrefetchMinBytes;
  const int8_t* wq = reinterpret_cast<const int8_t*>(packed_i8 + h8.data_offset);
  const int32_t* comp = reinterpret_cast<const int32_t*>(packed_i8 + h8.comp_offset);
  parallel_for(items, 1, bp.nthreads, [&](int64_t i0, int64_t i1) {
    float* t = band_buffer(bp.band * ldt);
    if (t_q.size() < static_cast<size_t>(bp.band * lda + 64)) t_q.resize(bp.band * lda + 64);
    if (t_qscale.size() < static_cast<size_t>(bp.band)) t_qscale.resize(bp.band);
    int8_t* q = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(t_q.data()) + 63) & ~uintptr_t(63));
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t img = it / (bp.bands * bp.splits), rest = it % (bp.bands * bp.splits);
      const int64_t b = rest / bp.splits, s = rest % bp.splits;
      Problem pr = base;
      pr.x = x + img * h * w * c;
      const int64_t p0 = b * bp.band, p1 = std::min(pixels, p0 + bp.band), rows = p1 - p0;
      kern.dw(pr, p0, p1, t, ldt);
      k8.quantize(t, ldt, false, 0, rows, c, h8.k_pad, lda, k8.a_zero, int8_gemm::kQmax8, q, t_qscale.data());
      float* yb = y + (img * pixels + p0) * n;
      int8_gemm::GemmArgs g{q, lda, t_qscale.data(), wq, comp, w_scale, bias, yb, n, false, rows, n, h8.k_pad};
      if (k8.widen && rows > k8.row_path_rows) {  // int16 tiles: widen the band once for all its panels
        g.ld16 = int8_gemm::a16_stride(h8.k_pad);
        int16_t* a16 = int8_gemm::a16_scratch(rows, g.ld16);  // this thread's, as the linear driver's
        k8.widen(q, lda, rows, h8.k_pad, a16, g.ld16);
        g.a16 = a16;
      }
      const int64_t q0 = panels * s / bp.splits, q1 = panels * (s + 1) / bp.splits;
      if (q0 >= q1) continue;
      // The next item's input rows into L2, a step of lines per panel (as forward does per
      // tile; MobileNetV1 blocks, N = 8, interleaved: 128@56 +5 %, 256@28 +2 %, wider +-0.5 %).
      const char* pf = nullptr;
      const char* pf_end = nullptr;
      if (it + 1 < i1)
        next_item_input(x, h, w, c, ow, pad_t, hd, pixels, bp.band, bp.bands, bp.splits, it, &pf, &pf_end);
      LinePrefetch prefetch(pf, pf_end, q1 - q0);
      for (int64_t q = q0; q < q1; ++q) {
        prefetch.step();
        k8.gemm(g, 0, rows, q, q + 1);
        // act2 over the panel's outputs while they are in cache (a scalar pass after all the
        // panels had doubled the stage's time: 128@56 N = 8 with ReLU 6.3 ms, without 2.6 ms)
        if (hd.act2 != kNone)
          kern.act2(yb, n, rows, q * int8_gemm::kPanel, std::min<int64_t>(n, (q + 1) * int8_gemm::kPanel), hd);
      }
    }
  });
}

}  // namespace dws
}  // namespace pyaccel
