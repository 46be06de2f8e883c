// Packing of the fused depthwise-separable weights (layout "DWS1", see dwconv_fused.h).
#include <cstring>

#include "common/packed_header.h"
#include "dwconv_fused/dwconv_fused.h"

namespace pyaccel {
namespace dws {

Offsets offsets(int64_t c, int64_t n, int kh, int kw, int nr) {
  const int64_t c_pad = round_up(c, kChannelPad), n_pad = round_up(n, nr);
  Offsets o;
  o.wd = align64(sizeof(PackedHeader));
  o.bd = align64(o.wd + int64_t(kh) * kw * c_pad * 4);
  o.wp = align64(o.bd + c_pad * 4);
  o.bp = align64(o.wp + n_pad * c * 4);
  o.total = align64(o.bp + n_pad * 4);
  return o;
}

int64_t packed_nbytes(int64_t c, int64_t n, int kh, int kw, int nr) { return offsets(c, n, kh, kw, nr).total; }

void pack(const float* wd, const float* bd, const float* wp, const float* bp, int64_t c, int64_t n, int kh, int kw,
          int sh, int sw, int dh, int dw, ActParams a1, ActParams a2, int nr, uint8_t* out) {
  const Offsets o = offsets(c, n, kh, kw, nr);
  std::memset(out, 0, o.total);
  PackedHeader h = new_packed_header<PackedHeader>(kMagic, nr, n, c, nr);
  h.c_pad = static_cast<int32_t>(round_up(c, kChannelPad));
  h.kh = kh; h.kw = kw; h.sh = sh; h.sw = sw; h.dh = dh; h.dw = dw;
  h.act1 = a1.kind; h.lo1 = a1.lo; h.hi1 = a1.hi;
  h.act2 = a2.kind; h.lo2 = a2.lo; h.hi2 = a2.hi;
  h.total_bytes = o.total;
  std::memcpy(out, &h, sizeof(h));
  float* pwd = reinterpret_cast<float*>(out + o.wd);
  for (int64_t ch = 0; ch < c; ++ch)
    for (int t = 0; t < kh * kw; ++t) pwd[t * h.c_pad + ch] = wd[ch * kh * kw + t];
  if (bd) std::memcpy(out + o.bd, bd, c * 4);
  float* pwp = reinterpret_cast<float*>(out + o.wp);
  for (int64_t oc = 0; oc < n; ++oc)
    for (int64_t ch = 0; ch < c; ++ch) pwp[(oc / nr) * c * nr + ch * nr + oc % nr] = wp[oc * c + ch];
  if (bp) std::memcpy(out + o.bp, bp, n * 4);
}

const char* check_packed(const uint8_t* packed, int64_t nbytes, int64_t c, int64_t n, int kh, int kw) {
  if (packed == nullptr || nbytes < static_cast<int64_t>(sizeof(PackedHeader)))
    return "packed weight is empty or shorter than its header";
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  if (h.magic != kMagic) return "packed weight was not packed for this op (bad magic)";
  if (h.layout != select_kernel().nr) return "packed weight was packed for another kernel (layout): repack";
  if (h.n != n || h.k != c || h.kh != kh || h.kw != kw) return "packed weight shape does not match the weights";
  if (nbytes != packed_nbytes(c, n, kh, kw, h.layout) || h.total_bytes != nbytes)
    return "packed weight has the wrong size";
  return nullptr;
}

}  // namespace dws
}  // namespace pyaccel
