// Packing of BSR int8 weights ("BSR_I8_K4", see block_sparse.h):
//
//   header (64 B) | int32 rowptr[nbr + 1] | int32 colk[nnzb] | pad to 64 B |
//   int32 comp[nbr][bh_pad] | blocks: [nnzb][bw4 / 4][bh_pad][4] int8 |
//   blocks of <= kSmallBlockRows rows with bw % 4 == 0: pad to 64 B, the
//   compact blocks [nnzb][bh][bw] int8 (zero past n and k), read as one
//   32-bit word per channel and group of 4 inputs
#include <cstring>
#include <string>

#include "block_sparse/block_sparse.h"

namespace pyaccel {
namespace block_sparse {
namespace {

struct Layout {
  int64_t nbr, bh_pad, bw4, idx_bytes, comp_offset, data_offset, compact_offset, total;
};

Layout layout(int64_t n, int bh, int bw, int64_t nnzb) {
  Layout l;
  l.nbr = (n + bh - 1) / bh;
  l.bh_pad = round_up(bh, kChannelPad);
  l.bw4 = round_up(bw, 4);
  l.idx_bytes = 4 * (l.nbr + 1 + nnzb);
  l.comp_offset = round_up(static_cast<int64_t>(sizeof(PackedHeader)) + l.idx_bytes, 64);
  l.data_offset = round_up(l.comp_offset + 4 * l.nbr * l.bh_pad, 64);
  l.compact_offset = round_up(l.data_offset + nnzb * l.bw4 * l.bh_pad, 64);
  l.total = has_compact_int8(bh, bw) ? l.compact_offset + nnzb * bh * bw : l.data_offset + nnzb * l.bw4 * l.bh_pad;
  return l;
}

}  // namespace

int64_t packed_nbytes_int8(int64_t n, int64_t /*k: the size does not depend on it*/, int bh, int bw, int64_t nnzb) {
  return layout(n, bh, bw, nnzb).total;
}

const int32_t* compact_int8(const uint8_t* packed) {
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  if (!has_compact_int8(h.bh, h.bw)) return nullptr;
  return reinterpret_cast<const int32_t*>(packed + layout(h.n, h.bh, h.bw, h.nnzb).compact_offset);
}

void pack_int8(const int8_t* values, const int32_t* crow, const int32_t* col, int64_t n, int64_t k, int bh, int bw,
               int64_t nnzb, uint8_t* out) {
  const Layout l = layout(n, bh, bw, nnzb);
  std::memset(out, 0, l.total);
  const int32_t* colk = write_header_and_indices(out, kMagicI8, kLayoutI8K4, n, k, bh, bw, l.bh_pad, l.nbr, nnzb,
                                                 l.data_offset, crow, col);
  int32_t* comp = reinterpret_cast<int32_t*>(out + l.comp_offset);
  int8_t* d = reinterpret_cast<int8_t*>(out + l.data_offset);
  for (int64_t r = 0; r < l.nbr; ++r) {
    for (int64_t b = crow[r]; b < crow[r + 1]; ++b) {
      const int8_t* v = values + b * bh * bw;
      int8_t* o = d + b * l.bw4 * l.bh_pad;
      for (int i = 0; i < bh && r * bh + i < n; ++i) {
        for (int j = 0; j < bw && colk[b] + j < k; ++j) {  // entries past n or k stay zero
          o[(j / 4 * l.bh_pad + i) * 4 + j % 4] = v[i * bw + j];
          comp[r * l.bh_pad + i] += 128 * v[i * bw + j];
        }
      }
    }
  }
  if (!has_compact_int8(bh, bw)) return;
  int8_t* c = reinterpret_cast<int8_t*>(out + l.compact_offset);
  for (int64_t r = 0; r < l.nbr; ++r)
    for (int64_t b = crow[r]; b < crow[r + 1]; ++b)
      for (int i = 0; i < bh && r * bh + i < n; ++i)
        for (int j = 0; j < bw && colk[b] + j < k; ++j)  // canonical values past n or k may hold anything
          c[(b * bh + i) * bw + j] = values[(b * bh + i) * bw + j];
}

const char* check_packed_int8(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k) {
  if (buf == nullptr || nbytes < static_cast<int64_t>(sizeof(PackedHeader)))
    return "packed weight is empty or shorter than its header";
  PackedHeader h;
  std::memcpy(&h, buf, sizeof(h));
  if (h.bh < 1 || h.bw < 1 || h.nnzb < 0) return "packed weight header is corrupt";
  return check_packed_header<PackedHeader>(buf, nbytes, n, k, kMagicI8, kLayoutI8K4,
                                           packed_nbytes_int8(h.n, h.k, h.bh, h.bw, h.nnzb));
}

std::string packing_error_int8(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k, int bh, int bw,
                               int64_t nnzb, const int32_t* crow, const int32_t* col) {
  if (bh < 1 || bw < 1 || nnzb < 0)
    return "expected blocks of at least 1 x 1 and nnzb >= 0, got " + std::to_string(bh) + " x " + std::to_string(bw) +
           " and " + std::to_string(nnzb);
  const Layout l = layout(n, bh, bw, nnzb);
  return packing_error_for(buf, nbytes, n, k, bh, bw, nnzb, crow, col,
                           PackingFormat{kMagicI8, kLayoutI8K4, l.bh_pad, l.data_offset, l.total});
}

}  // namespace block_sparse
}  // namespace pyaccel
