// Packing of the fused depthwise-separable weights (layout "DWS1", see dwconv_fused.h).
#include <cstdio>
#include <cstring>
#include <string>

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
  h.flags = (bd ? kHasDwBias : 0) | (bp ? kHasPwBias : 0);
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

namespace {

std::string act_name(int32_t kind, float lo, float hi) {
  static const char* const kNames[] = {"none", "relu", "relu6", "hardswish", "silu"};
  if (kind >= kNone && kind < kHardtanh) return kNames[kind];
  if (kind != kHardtanh) return "code " + std::to_string(kind);
  char buf[64];
  std::snprintf(buf, sizeof(buf), "hardtanh(%g, %g)", lo, hi);
  return buf;
}

bool same_act(int32_t kind, float lo, float hi, const ActParams& a) {
  return kind == a.kind && (kind != kHardtanh || (lo == a.lo && hi == a.hi));
}

std::string pair(int64_t a, int64_t b) { return "(" + std::to_string(a) + ", " + std::to_string(b) + ")"; }

std::string biases(int32_t flags) {
  const bool d = flags & kHasDwBias, p = flags & kHasPwBias;
  return d && p ? "both biases" : d ? "the depthwise bias only" : p ? "the pointwise bias only" : "no bias";
}

std::string differs(const std::string& what, const std::string& want, const std::string& held) {
  return "expected " + what + " " + want + ", the buffer holds " + held;
}

}  // namespace

std::string packing_error(const uint8_t* packed, int64_t nbytes, const PackingSpec& w) {
  const int64_t hb = sizeof(PackedHeader);
  if (packed == nullptr || nbytes < hb)
    return "expected a DWS1 packing (at least its " + std::to_string(hb) + "-byte header), the buffer has " +
           std::to_string(packed == nullptr ? 0 : nbytes) + " bytes";
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  if (h.magic != kMagic) {
    char buf[96];
    std::snprintf(buf, sizeof(buf), "expected a DWS1 packing (magic 0x%08x), the buffer's magic is 0x%08x", kMagic,
                  h.magic);
    return buf;
  }
  if (!is_panel_width(h.layout))
    return "the buffer's panel width (layout tag) " + std::to_string(h.layout) + " is no kernel's of this build";
  if (h.k != w.c || h.n != w.n)
    return differs("channels (C, Cout)", pair(w.c, w.n), pair(h.k, h.n));
  if (h.kh != w.kh || h.kw != w.kw) return differs("a window (kh, kw)", pair(w.kh, w.kw), pair(h.kh, h.kw));
  if (h.sh != w.sh || h.sw != w.sw) return differs("stride", pair(w.sh, w.sw), pair(h.sh, h.sw));
  if (h.dh != w.dh || h.dw != w.dw) return differs("dilation", pair(w.dh, w.dw), pair(h.dh, h.dw));
  if (!same_act(h.act1, h.lo1, h.hi1, w.a1))
    return differs("act1", act_name(w.a1.kind, w.a1.lo, w.a1.hi), act_name(h.act1, h.lo1, h.hi1));
  if (!same_act(h.act2, h.lo2, h.hi2, w.a2))
    return differs("act2", act_name(w.a2.kind, w.a2.lo, w.a2.hi), act_name(h.act2, h.lo2, h.hi2));
  if (h.flags != w.flags) return differs("biases:", biases(w.flags), biases(h.flags));
  if (h.c_pad != round_up(w.c, kChannelPad) || h.n_pad != round_up(w.n, h.layout))
    return "the buffer's header is inconsistent (padded channel counts c_pad " + std::to_string(h.c_pad) +
           ", n_pad " + std::to_string(h.n_pad) + ")";
  const int64_t want = packed_nbytes(w.c, w.n, w.kh, w.kw, h.layout);
  if (h.total_bytes != want || nbytes != want)
    return "expected " + std::to_string(want) + " bytes for this packing, the buffer has " + std::to_string(nbytes) +
           " (its header says " + std::to_string(h.total_bytes) + "): truncated or not made by dws_pack";
  return "";
}

}  // namespace dws
}  // namespace pyaccel
