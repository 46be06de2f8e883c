// Packing of BSR fp32 weights:
//
//   header (64 B) | int32 rowptr[nbr + 1] | int32 colk[nnzb] | pad to 64 B |
//   blocks, for each kept block in BSR order:
//     layout 1 ("BSR_F32_T16", bh > kSmallBlockRows): [bw][bh_pad] fp32, the
//       block transposed, channels padded with zeros to bh_pad (a multiple of 16)
//     layout 2 ("BSR_F32_RM", bh <= kSmallBlockRows): [bh][bw] fp32 as given
//
// colk holds each block's first input (block column * bw), so a kernel adds it
// to a row pointer of x without a multiply.
#include <cstring>

#include "block_sparse/block_sparse.h"

namespace pyaccel {
namespace block_sparse {
namespace {

struct Layout {
  int64_t nbr, bh_pad, idx_bytes, data_offset, total;
};

Layout layout(int64_t n, int bh, int bw, int64_t nnzb) {
  Layout l;
  l.nbr = (n + bh - 1) / bh;
  l.bh_pad = layout_for(bh) == kLayoutF32T16 ? round_up(bh, kChannelPad) : bh;
  l.idx_bytes = 4 * (l.nbr + 1 + nnzb);
  l.data_offset = round_up(static_cast<int64_t>(sizeof(PackedHeader)) + l.idx_bytes, 64);
  l.total = l.data_offset + nnzb * bw * l.bh_pad * 4;
  return l;
}

}  // namespace

int64_t packed_nbytes(int64_t n, int64_t /*k*/, int bh, int bw, int64_t nnzb) {
  return layout(n, bh, bw, nnzb).total;
}

int32_t* write_header_and_indices(uint8_t* out, uint32_t magic, int32_t layout, int64_t n, int64_t k, int bh, int bw,
                                  int64_t bh_pad, int64_t nbr, int64_t nnzb, int64_t data_offset,
                                  const int32_t* crow, const int32_t* col) {
  PackedHeader h{};
  h.magic = magic;
  h.layout = layout;
  h.n = n;
  h.k = k;
  h.n_pad = nbr * bh;
  h.bh = bh;
  h.bw = bw;
  h.bh_pad = static_cast<int32_t>(bh_pad);
  h.nbr = static_cast<int32_t>(nbr);
  h.nnzb = nnzb;
  h.data_offset = data_offset;
  std::memcpy(out, &h, sizeof(h));
  int32_t* rowptr = reinterpret_cast<int32_t*>(out + sizeof(h));
  int32_t* colk = rowptr + nbr + 1;
  std::memcpy(rowptr, crow, 4 * (nbr + 1));
  for (int64_t b = 0; b < nnzb; ++b) colk[b] = col[b] * bw;
  return colk;
}

void pack(const float* values, const int32_t* crow, const int32_t* col, int64_t n, int64_t k, int bh, int bw,
          int64_t nnzb, uint8_t* out) {
  const Layout l = layout(n, bh, bw, nnzb);
  const int32_t lay = layout_for(bh);
  const int32_t* colk = write_header_and_indices(out, kMagic, lay, n, k, bh, bw, l.bh_pad, l.nbr, nnzb, l.data_offset,
                                                 crow, col);
  std::memset(out + sizeof(PackedHeader) + l.idx_bytes, 0, l.data_offset - sizeof(PackedHeader) - l.idx_bytes);
  float* d = reinterpret_cast<float*>(out + l.data_offset);
  const bool row_major = lay == kLayoutF32RowMajor;
  for (int64_t r = 0; r < l.nbr; ++r) {
    for (int64_t b = crow[r]; b < crow[r + 1]; ++b) {
      const float* v = values + b * bh * bw;
      float* o = d + b * bw * l.bh_pad;
      for (int j = 0; j < bw; ++j) {
        for (int64_t i = 0; i < l.bh_pad; ++i) {
          // entries past n or k (edge blocks' padding) and channel padding are zero
          const float w = (i < bh && r * bh + i < n && colk[b] + j < k) ? v[i * bw + j] : 0.f;
          o[row_major ? i * bw + j : j * l.bh_pad + i] = w;
        }
      }
    }
  }
}

const char* check_packed(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k) {
  if (buf == nullptr || nbytes < static_cast<int64_t>(sizeof(PackedHeader)))
    return "packed weight is empty or shorter than its header";
  PackedHeader h;
  std::memcpy(&h, buf, sizeof(h));
  if (h.bh < 1 || h.bw < 1 || h.nnzb < 0) return "packed weight header is corrupt";
  return check_packed_header<PackedHeader>(buf, nbytes, n, k, kMagic, layout_for(h.bh),
                                           packed_nbytes(h.n, h.k, h.bh, h.bw, h.nnzb));
}

}  // namespace block_sparse
}  // namespace pyaccel
