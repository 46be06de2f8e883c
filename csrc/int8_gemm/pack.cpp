// The NR64K4 packed layout (machine independent; every ISA reads it):
//
//   [PackedHeader: 64 B][comp: int32 x n_pad][panels: int8 x n_pad x k_pad]
//
// Panel p holds output channels [64p, 64p+64). Inside a panel, the k dimension
// is cut in groups of 4; group g is 256 contiguous bytes: channel c's 4 weights
// w[64p+c, 4g .. 4g+3] at bytes [4c, 4c+4). One 512-bit load thus gives 16
// channels x 4 k values, exactly the operand of vpdpbusd; a 256-bit load gives
// 8 channels for the AVX2 kernel. Padding (n -> n_pad, k -> k_pad) is zero.
// An optional pair-safe or quad-safe section follows (PsHeader, int8_gemm.h).
#include <cstring>

#include "common/packed_header.h"
#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {

namespace {

// f(k, s, r) for each k < k of one channel's weights (row), split by kind
// (kPsPair, kPsQuad; -1: s = w, r = 0), in ascending k.
template <typename F>
void for_each_split_value(const int8_t* row, int64_t k, int64_t k_pad, int32_t kind, const F& f) {
  if (kind == kPsQuad) {
    const int64_t quad_end = k_pad / 8 * 8;  // whole pairs of groups; the rest is not split
    for (int64_t k0 = 0; k0 < k; k0 += 8) {
      int w8[8], s8[8];
      for (int i = 0; i < 8; ++i) w8[i] = k0 + i < k ? row[k0 + i] : 0;
      if (k0 < quad_end)
        qs_split(w8, s8);
      else
        std::memcpy(s8, w8, sizeof(s8));
      for (int i = 0; i < 8 && k0 + i < k; ++i) f(k0 + i, s8[i], w8[i] - s8[i]);
    }
    return;
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    const int v = row[kk];
    const int sv = kind == kPsPair && kk % 2 == 1 ? ps_value(row[kk - 1], v) : v;
    f(kk, sv, v - sv);
  }
}

// Panels of w (or of its split part: kind kPsPair or kPsQuad, -1 for w itself)
// into data (n_pad x k_pad, zeroed here), in NR64K4 order or (quarters) in
// the pair-safe section's kPsQuarters order.
void write_panels(const int8_t* w, int64_t ldw, int64_t n, int64_t k, int64_t n_pad, int64_t k_pad, int32_t kind,
                  int8_t* data, bool quarters = false) {
  std::memset(data, 0, static_cast<size_t>(n_pad * k_pad));
  const int64_t groups = k_pad / kKGroup;
  // channel c's group stride and first byte in its panel
  const int64_t width = quarters ? 16 : kPanel;
  for (int64_t c = 0; c < n; ++c) {
    const int8_t* row = w + c * ldw;
    int8_t* base = data + (c / kPanel) * groups * kPanel * kKGroup + (c % kPanel) / width * width * k_pad +
                   (c % width) * kKGroup;
    for_each_split_value(row, k, k_pad, kind, [&](int64_t kk, int v, int) {
      base[(kk / kKGroup) * width * kKGroup + kk % kKGroup] = static_cast<int8_t>(v);
    });
  }
}

}  // namespace

int64_t ps_entries(const int8_t* w, int64_t ldw, int64_t n, int64_t k, int act_bits) {
  const int32_t kind = act_bits == 7 ? kPsQuad : kPsPair;
  const int64_t k_pad = round_up(k, kKGroup);
  int64_t e = 0;
  for (int64_t c = 0; c < n; ++c) for_each_split_value(w + c * ldw, k, k_pad, kind, [&](int64_t, int, int r) { e += r != 0; });
  return e;
}

PsHeader ps_layout(int64_t n_pad, int64_t entries, int64_t panel_bytes, int32_t kind) {
  PsHeader p{};
  p.magic = kPsMagic;
  p.kind = kind;
  p.entries = entries;
  p.lane_offset = sizeof(PsHeader);
  p.ek_offset = p.lane_offset + 4 * (n_pad + 1);
  p.er_offset = p.ek_offset + 4 * entries;
  p.panels_offset = round_up(p.er_offset + 4 * entries, 64);
  p.total = p.panels_offset + panel_bytes;
  return p;
}

const char* check_ps_section(const uint8_t* buf, int64_t nbytes, int64_t offset, int64_t n_pad, int64_t panel_bytes,
                             int64_t k_limit, bool allow_quad) {
  if (nbytes < offset + static_cast<int64_t>(sizeof(PsHeader))) return "packed weight has the wrong size";
  PsHeader p;
  std::memcpy(&p, buf + offset, sizeof(p));
  if (p.magic != kPsMagic || p.entries < 0 || p.entries > panel_bytes ||
      (p.kind != kPsPair && (p.kind != kPsQuad || !allow_quad)))
    return "packed weight has a damaged pair-safe section";
  // panel order: NR64K4 everywhere; kPsQuarters in int8_gemm's sections (pair- and quad-safe)
  if (p.panel_order != kPsPanels64 && (p.panel_order != kPsQuarters || !allow_quad))
    return "packed weight has a damaged pair-safe section";
  PsHeader want = ps_layout(n_pad, p.entries, panel_bytes, p.kind);
  want.panel_order = p.panel_order;
  if (std::memcmp(&p, &want, sizeof(p)) != 0) return "packed weight has a damaged pair-safe section";
  if (nbytes != offset + p.total) return "packed weight has the wrong size";
  // the tables as the kernels read them (4-byte aligned: the section starts on a 64-byte boundary)
  const int32_t* lane = reinterpret_cast<const int32_t*>(buf + offset + p.lane_offset);
  const int32_t* ek = reinterpret_cast<const int32_t*>(buf + offset + p.ek_offset);
  const int32_t* er = reinterpret_cast<const int32_t*>(buf + offset + p.er_offset);
  uint32_t bad = lane[0] != 0 || lane[n_pad] != p.entries;
  for (int64_t c = 0; c < n_pad; ++c) bad |= lane[c + 1] < lane[c];
  for (int64_t e = 0; e < p.entries; ++e)
    bad |= (static_cast<uint32_t>(ek[e]) >= static_cast<uint64_t>(k_limit)) | (static_cast<uint32_t>(er[e]) >> 16);
  if (bad) return "packed weight has a damaged pair-safe section";
  return nullptr;
}

int64_t packed_nbytes_for(const int8_t* w, int64_t ldw, int64_t n, int64_t k, int act_bits) {
  if (!(act_bits == 7 ? wants_quad_safe() : wants_pair_safe()) || n < 1 || k < 1) return packed_nbytes(n, k);
  const int64_t e = ps_entries(w, ldw, n, k, act_bits);
  if (static_cast<double>(e) > kPsMaxEntryFraction * static_cast<double>(n) * static_cast<double>(k))
    return packed_nbytes(n, k);
  const int64_t n_pad = round_up(n, kPanel);
  return packed_nbytes(n, k) + ps_layout(n_pad, e, n_pad * round_up(k, kKGroup)).total;
}

int64_t packed_nbytes(int64_t n, int64_t k) {
  const int64_t n_pad = round_up(n, kPanel), k_pad = round_up(k, kKGroup);
  return static_cast<int64_t>(sizeof(PackedHeader)) + n_pad * 4 + n_pad * k_pad;
}

int64_t packed_nbytes_ps(const int8_t* w, int64_t ldw, int64_t n, int64_t k, int act_bits) {
  const int64_t n_pad = round_up(n, kPanel), k_pad = round_up(k, kKGroup);
  return packed_nbytes(n, k) + ps_layout(n_pad, ps_entries(w, ldw, n, k, act_bits), n_pad * k_pad).total;
}

void pack_weights(const int8_t* w, int64_t ldw, int64_t n, int64_t k, uint8_t* out, bool with_ps, int act_bits) {
  PackedHeader h = new_packed_header<PackedHeader>(kMagic, kLayoutNR64K4, n, k, kPanel);
  h.k_pad = round_up(k, kKGroup);
  h.comp_offset = sizeof(PackedHeader);
  h.data_offset = h.comp_offset + h.n_pad * 4;
  h.ps_offset = with_ps ? packed_nbytes(n, k) : 0;
  std::memcpy(out, &h, sizeof(h));
  int32_t* comp = reinterpret_cast<int32_t*>(out + h.comp_offset);
  write_panels(w, ldw, n, k, h.n_pad, h.k_pad, -1, reinterpret_cast<int8_t*>(out + h.data_offset));
  for (int64_t c = 0; c < h.n_pad; ++c) {
    int64_t sum = 0;
    for (int64_t kk = 0; c < n && kk < k; ++kk) sum += w[c * ldw + kk];
    // wraps modulo 2^32 like the kernel's int32 accumulators, so acc - comp
    // is exact whenever the true dot product fits in int32
    comp[c] = static_cast<int32_t>(static_cast<uint32_t>(128 * sum));
  }
  if (!with_ps) return;
  uint8_t* sec = out + h.ps_offset;
  const int32_t kind = act_bits == 7 ? kPsQuad : kPsPair;
  const PsHeader p = write_section(sec, n, h.n_pad, ps_entries(w, ldw, n, k, act_bits), h.n_pad * h.k_pad, kind,
                                   [&](int64_t c, const auto& emit) {
                                     for_each_split_value(w + c * ldw, k, h.k_pad, kind, [&](int64_t kk, int, int r) {
                                       if (r != 0) emit(kk, r);
                                     });
                                   });
  // both kinds' sections in kPsQuarters order
  PsHeader q = p;
  q.panel_order = kPsQuarters;
  std::memcpy(sec, &q, sizeof(q));
  write_panels(w, ldw, n, k, h.n_pad, h.k_pad, kind, reinterpret_cast<int8_t*>(sec + p.panels_offset), true);
}

namespace {
const char* check_parts(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k);
}  // namespace

const char* check_packed(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k) {
  if (const char* err = check_parts(buf, nbytes, n, k)) return err;
  PackedHeader h;
  std::memcpy(&h, buf, sizeof(h));
  // the fields the kernels index with, as pack_weights writes them
  const int64_t n_pad = round_up(n, kPanel);
  if (h.n_pad != n_pad || h.k_pad != round_up(k, kKGroup) || h.comp_offset != static_cast<int64_t>(sizeof(h)) ||
      h.data_offset != h.comp_offset + 4 * n_pad)
    return "packed weight header is inconsistent (padded sizes or offsets)";
  return nullptr;
}

namespace {
const char* check_parts(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k) {
  const int64_t base = packed_nbytes(n, k);
  if (buf == nullptr || nbytes < static_cast<int64_t>(sizeof(PackedHeader)))
    return check_packed_header<PackedHeader>(buf, nbytes, n, k, kMagic, kLayoutNR64K4, base);
  PackedHeader h;
  std::memcpy(&h, buf, sizeof(h));
  if (h.ps_offset == 0 || h.magic != kMagic || h.layout != kLayoutNR64K4 || h.n != n || h.k != k)
    return check_packed_header<PackedHeader>(buf, nbytes, n, k, kMagic, kLayoutNR64K4, base);
  // with a pair-safe section: right after the panels, its layout what its entry count implies
  if (h.ps_offset != base) return "packed weight has the wrong size";
  const int64_t n_pad = round_up(n, kPanel);
  return check_ps_section(buf, nbytes, base, n_pad, n_pad * round_up(k, kKGroup), round_up(k, kKGroup), true);
}
}  // namespace

}  // namespace int8_gemm
}  // namespace pyaccel
