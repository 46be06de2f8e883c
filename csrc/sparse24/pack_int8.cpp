#include <cstring>

#include "common/packed_header.h"
#include "sparse24/sparse24_int8.h"

namespace pyaccel {
namespace sparse24_int8 {
int64_t packed_nbytes(int64_t n, int64_t k) {
  const int64_t n_pad = round_up(n, kPanel), quads = (k + kQuadInputs - 1) / kQuadInputs;
  return static_cast<int64_t>(sizeof(PackedHeader)) + n_pad * 4 + (n_pad / kPanel) * quads * kQuadBytes;
}

void pack(const int8_t* values, int64_t ldv, const uint8_t* pos, int64_t ldp, int64_t n, int64_t k,
          uint8_t* out) {
  PackedHeader h = new_packed_header<PackedHeader>(kMagic, kLayoutP32Q4, n, k, kPanel);
  const int64_t groups = (k + 3) / 4;
  h.quads = (k + kQuadInputs - 1) / kQuadInputs;
  h.comp_offset = sizeof(PackedHeader);
  h.data_offset = h.comp_offset + h.n_pad * 4;
  std::memcpy(out, &h, sizeof(h));
  int32_t* comp = reinterpret_cast<int32_t*>(out + h.comp_offset);
  uint8_t* data = out + h.data_offset;
  std::memset(comp, 0, h.n_pad * 4);
  std::memset(data, 0, static_cast<size_t>((h.n_pad / kPanel) * h.quads * kQuadBytes));
  for (int64_t c = 0; c < n; ++c) {
    const int64_t p = c / kPanel, lane = c % kPanel;
    int64_t sum = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t pair = g / 2, half = g % 2;
      const int64_t quad = pair / kQuadPairs, j = pair % kQuadPairs;
      uint8_t* blk = data + (p * h.quads + quad) * kQuadBytes;
      const int8_t v0 = values[c * ldv + 2 * g], v1 = values[c * ldv + 2 * g + 1];
      blk[kQuadValOffset + j * kPairBytes + lane * 4 + 2 * half] = static_cast<uint8_t>(v0);
      blk[kQuadValOffset + j * kPairBytes + lane * 4 + 2 * half + 1] = static_cast<uint8_t>(v1);
      blk[kQuadPosOffset + lane * 4 + j] |= static_cast<uint8_t>((pos[c * ldp + g] & 0xF) << (4 * half));
      sum += v0 + v1;
    }
    comp[c] = static_cast<int32_t>(static_cast<uint32_t>(128 * sum));
  }
}

const char* check_packed(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k) {
  return check_packed_header<PackedHeader>(buf, nbytes, n, k, kMagic, kLayoutP32Q4, packed_nbytes(n, k));
}

}  // namespace sparse24_int8
}  // namespace pyaccel
