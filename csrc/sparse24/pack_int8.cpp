#include <cstring>

#include "common/packed_header.h"
#include "sparse24/sparse24_int8.h"

namespace pyaccel {
namespace sparse24_int8 {
int64_t packed_nbytes(int64_t n, int64_t k) {
  const int64_t n_pad = round_up(n, kPanel), quads = (k + kQuadInputs - 1) / kQuadInputs;
  return static_cast<int64_t>(sizeof(PackedHeader)) + n_pad * 4 + (n_pad / kPanel) * quads * kQuadBytes;
}

int64_t ctrl_nbytes(int64_t n, int64_t k) {
  return (round_up(n, kPanel) / kPanel) * ((k + kQuadInputs - 1) / kQuadInputs) * kCtrlQuadBytes;
}

int64_t packed_nbytes_ctrl(int64_t n, int64_t k) { return packed_nbytes(n, k) + ctrl_nbytes(n, k); }

const uint8_t* ctrl_table(const uint8_t* packed) {
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  return h.layout == kLayoutP32Q4Ctrl ? packed + packed_nbytes(h.n, h.k) : nullptr;
}

namespace {

// The control table (layout 5) of the positions pos.
void write_ctrl(const uint8_t* pos, int64_t ldp, int64_t n, int64_t k, int64_t quads, uint8_t* ctrl) {
  std::memset(ctrl, 0, static_cast<size_t>(ctrl_nbytes(n, k)));
  for (int64_t c = 0; c < n; ++c) {
    const int64_t p = c / kPanel, lane = c % kPanel;
    const int64_t h = lane / 16, shift = 4 * ((lane / 8) % 2), c8 = lane % 8;
    for (int64_t g = 0; g < (k + 3) / 4; ++g) {
      const int64_t pair = g / 2, half = g % 2, quad = pair / kQuadPairs, j = pair % kQuadPairs;
      const int nib = pos[c * ldp + g] & 0xF;
      uint8_t* d = ctrl + (p * quads + quad) * kCtrlQuadBytes + j * kCtrlPairBytes + h * kCtrlHalfBytes + 4 * c8 +
                   2 * half;
      d[0] |= static_cast<uint8_t>((4 * half + (nib & 3)) << shift);
      d[1] |= static_cast<uint8_t>((4 * half + (nib >> 2)) << shift);
    }
  }
}

// The quads of panel data (zeroed here); pair_safe: v1 replaced by its pair-safe value.
void write_quads(const int8_t* values, int64_t ldv, const uint8_t* pos, int64_t ldp, int64_t n, int64_t k,
                 int64_t n_pad, int64_t quads, bool pair_safe, uint8_t* data) {
  const int64_t groups = (k + 3) / 4;
  std::memset(data, 0, static_cast<size_t>((n_pad / kPanel) * quads * kQuadBytes));
  for (int64_t c = 0; c < n; ++c) {
    const int64_t p = c / kPanel, lane = c % kPanel;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t pair = g / 2, half = g % 2;
      const int64_t quad = pair / kQuadPairs, j = pair % kQuadPairs;
      uint8_t* blk = data + (p * quads + quad) * kQuadBytes;
      const int8_t v0 = values[c * ldv + 2 * g];
      int v1 = values[c * ldv + 2 * g + 1];
      if (pair_safe) v1 = int8_gemm::ps_value(v0, v1);
      blk[kQuadValOffset + j * kPairBytes + lane * 4 + 2 * half] = static_cast<uint8_t>(v0);
      blk[kQuadValOffset + j * kPairBytes + lane * 4 + 2 * half + 1] = static_cast<uint8_t>(v1);
      blk[kQuadPosOffset + lane * 4 + j] |= static_cast<uint8_t>((pos[c * ldp + g] & 0xF) << (4 * half));
    }
  }
}

int64_t ps_entries(const int8_t* values, int64_t ldv, int64_t n, int64_t k) {
  int64_t e = 0;
  for (int64_t c = 0; c < n; ++c)
    for (int64_t g = 0; g < (k + 3) / 4; ++g)
      e += int8_gemm::ps_value(values[c * ldv + 2 * g], values[c * ldv + 2 * g + 1]) != values[c * ldv + 2 * g + 1];
  return e;
}

int64_t quad_bytes(int64_t n_pad, int64_t k) { return (n_pad / kPanel) * ((k + kQuadInputs - 1) / kQuadInputs) * kQuadBytes; }

}  // namespace

bool wants_pair_safe() { return select_kernel().gemm == qs8_s24_gemm_4x16_avx2; }
int wanted_parts() { return wants_pair_safe() ? 2 : select_kernel().gemm == qs8_s24_gemm_4x16_avxvnni ? 1 : 0; }

int64_t packed_nbytes_ps(const int8_t* values, int64_t ldv, int64_t n, int64_t k) {
  const int64_t n_pad = round_up(n, kPanel);
  return packed_nbytes_ctrl(n, k) +
         int8_gemm::ps_layout(n_pad, ps_entries(values, ldv, n, k), quad_bytes(n_pad, k)).total;
}

int64_t packed_nbytes_for(const int8_t* values, int64_t ldv, const uint8_t*, int64_t, int64_t n, int64_t k) {
  const int parts = wanted_parts();
  if (parts == 0 || n < 1 || k < 1) return packed_nbytes(n, k);
  if (parts == 1) return packed_nbytes_ctrl(n, k);
  const int64_t e = ps_entries(values, ldv, n, k);
  if (static_cast<double>(e) > kPsMaxEntryFraction * 2.0 * static_cast<double>(n * ((k + 3) / 4)))
    return packed_nbytes_ctrl(n, k);
  const int64_t n_pad = round_up(n, kPanel);
  return packed_nbytes_ctrl(n, k) + int8_gemm::ps_layout(n_pad, e, quad_bytes(n_pad, k)).total;
}

void pack(const int8_t* values, int64_t ldv, const uint8_t* pos, int64_t ldp, int64_t n, int64_t k,
          uint8_t* out, int64_t out_nbytes) {
  const bool with_ctrl = out_nbytes > packed_nbytes(n, k);
  const bool with_ps = out_nbytes > packed_nbytes_ctrl(n, k);
  PackedHeader h =
      new_packed_header<PackedHeader>(kMagic, with_ctrl ? kLayoutP32Q4Ctrl : kLayoutP32Q4, n, k, kPanel);
  const int64_t groups = (k + 3) / 4;
  h.quads = (k + kQuadInputs - 1) / kQuadInputs;
  h.comp_offset = sizeof(PackedHeader);
  h.data_offset = h.comp_offset + h.n_pad * 4;
  h.ps_offset = with_ps ? packed_nbytes_ctrl(n, k) : 0;
  std::memcpy(out, &h, sizeof(h));
  int32_t* comp = reinterpret_cast<int32_t*>(out + h.comp_offset);
  std::memset(comp, 0, h.n_pad * 4);
  for (int64_t c = 0; c < n; ++c) {
    int64_t sum = 0;
    for (int64_t g = 0; g < groups; ++g) sum += values[c * ldv + 2 * g] + values[c * ldv + 2 * g + 1];
    comp[c] = static_cast<int32_t>(static_cast<uint32_t>(128 * sum));
  }
  write_quads(values, ldv, pos, ldp, n, k, h.n_pad, h.quads, false, out + h.data_offset);
  if (with_ctrl) write_ctrl(pos, ldp, n, k, h.quads, out + packed_nbytes(n, k));
  if (!with_ps) return;
  uint8_t* sec = out + h.ps_offset;
  const int8_gemm::PsHeader p = int8_gemm::write_ps_section(
      sec, n, h.n_pad, ps_entries(values, ldv, n, k), quad_bytes(h.n_pad, k), [&](int64_t c, const auto& emit) {
        for (int64_t g = 0; g < groups; ++g)  // v1 multiplies input 4g + i1
          emit(4 * g + ((pos[c * ldp + g] >> 2) & 3), values[c * ldv + 2 * g], values[c * ldv + 2 * g + 1]);
      });
  write_quads(values, ldv, pos, ldp, n, k, h.n_pad, h.quads, true, sec + p.panels_offset);
}

namespace {
// The header fields the kernels index with, as pack() writes them.
bool derived_fields_match(const PackedHeader& h, int64_t n, int64_t k) {
  const int64_t n_pad = round_up(n, kPanel);
  return h.n_pad == n_pad && h.quads == (k + kQuadInputs - 1) / kQuadInputs &&
         h.comp_offset == static_cast<int64_t>(sizeof(PackedHeader)) && h.data_offset == h.comp_offset + 4 * n_pad;
}

// Magic, layout, shape and size (and the pair-safe section's own checks).
const char* check_layout(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k) {
  PackedHeader h{};
  if (buf != nullptr && nbytes >= static_cast<int64_t>(sizeof(PackedHeader))) std::memcpy(&h, buf, sizeof(h));
  // layout 4, or 5 with the control table after the quads
  const int32_t layout = h.layout == kLayoutP32Q4Ctrl ? kLayoutP32Q4Ctrl : kLayoutP32Q4;
  const int64_t base = layout == kLayoutP32Q4Ctrl ? packed_nbytes_ctrl(n, k) : packed_nbytes(n, k);
  if (h.ps_offset == 0 || h.magic != kMagic || h.n != n || h.k != k || h.layout != layout)
    return check_packed_header<PackedHeader>(buf, nbytes, n, k, kMagic, layout, base);
  // with a pair-safe section: right after them, its layout what its entry count implies
  if (h.ps_offset != base) return "packed weight has the wrong size";
  const int64_t n_pad = round_up(n, kPanel);
  return int8_gemm::check_ps_section(buf, nbytes, base, n_pad, quad_bytes(n_pad, k),
                                     kQuadInputs * ((k + kQuadInputs - 1) / kQuadInputs));
}
}  // namespace

const char* check_packed(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k) {
  if (const char* err = check_layout(buf, nbytes, n, k)) return err;
  PackedHeader h;
  std::memcpy(&h, buf, sizeof(h));
  return derived_fields_match(h, n, k) ? nullptr : "packed weight header is inconsistent (padded sizes or offsets)";
}

}  // namespace sparse24_int8
}  // namespace pyaccel
