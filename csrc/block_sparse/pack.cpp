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
//
// Layout 2 with bw a multiple of 4 also carries the band lists (see
// block_sparse.h, BandLists) after the blocks: every block split into
// bh x bw / 4 entries of one channel x 4 inputs, listed per band of
// band_rows_for(bh) channels by group of 4 inputs, in channel order within a group.
#include <algorithm>
#include <climits>
#include <functional>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "block_sparse/block_sparse.h"

namespace pyaccel {
namespace block_sparse {
namespace {

struct Layout {
  int64_t nbr, bh_pad, idx_bytes, data_offset, lists_offset, total;
  BandLists::Sizes lists;
};

Layout layout(int64_t n, int64_t k, int bh, int bw, int64_t nnzb, int32_t lay) {
  Layout l;
  l.nbr = (n + bh - 1) / bh;
  l.bh_pad = lay == kLayoutF32RowMajor ? bh : round_up(bh, kChannelPad);
  l.idx_bytes = 4 * (l.nbr + 1 + nnzb);
  l.data_offset = round_up(static_cast<int64_t>(sizeof(PackedHeader)) + l.idx_bytes, 64);
  l.lists_offset = round_up(l.data_offset + nnzb * bw * l.bh_pad * 4, 64);
  l.lists = lay == kLayoutF32T16 ? BandLists::Sizes{} : BandLists::sizes(l.nbr * bh, k, bh, bw, nnzb, 16);
  l.total = l.lists.total > 0 ? l.lists_offset + l.lists.total : l.data_offset + nnzb * bw * l.bh_pad * 4;
  return l;
}

}  // namespace

int64_t packed_nbytes(int64_t n, int64_t k, int bh, int bw, int64_t nnzb) {
  return layout(n, k, bh, bw, nnzb, layout_for(bh)).total;
}

BandLists::Sizes BandLists::sizes(int64_t n_pad, int64_t k, int bh, int bw, int64_t nnzb, int entry_bytes) {
  Sizes z{};
  if (bh > kSmallBlockRows || bw % 4 != 0) return z;
  z.nbands = (n_pad + band_rows_for(bh) - 1) / band_rows_for(bh);
  z.ngroups = round_up(k, bw) / 4;
  z.nentries = nnzb * bh * (bw / 4);
  if (z.nentries > INT32_MAX) return Sizes{};  // int32 list offsets: such a weight keeps the block-row kernels
  z.goff_offset = 64;
  z.row_offset = round_up(z.goff_offset + 4 * z.nbands * (z.ngroups + 1), 64);
  z.w_offset = round_up(z.row_offset + 2 * z.nentries, 64);
  z.total = z.w_offset + entry_bytes * z.nentries;
  return z;
}

BandLists BandLists::at(const uint8_t* lists, const Sizes& z, int bh) {
  BandLists b{};
  if (z.total == 0) return b;
  b.goff = reinterpret_cast<const int32_t*>(lists + z.goff_offset);
  b.row = reinterpret_cast<const uint16_t*>(lists + z.row_offset);
  b.w = lists + z.w_offset;
  b.nbands = z.nbands;
  b.ngroups = z.ngroups;
  b.band_rows = band_rows_for(bh);
  b.nentries = z.nentries;
  return b;
}

BandLists BandLists::at(const uint8_t* packed) {
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  const Layout l = layout(h.n, h.k, h.bh, h.bw, h.nnzb, h.layout);
  return at(packed + l.lists_offset, l.lists, h.bh);
}

void write_band_lists(const int32_t* crow, const int32_t* colk, int64_t nbr, int bh, int bw,
                      const BandLists::Sizes& z, uint8_t* lists,
                      const std::function<void(uint8_t* w, int64_t entry, int64_t r, int64_t b, int i, int64_t q)>& put) {
  std::memset(lists, 0, z.total);
  int32_t* goff = reinterpret_cast<int32_t*>(lists + z.goff_offset);
  uint16_t* rows = reinterpret_cast<uint16_t*>(lists + z.row_offset);
  uint8_t* ws = lists + z.w_offset;
  const int64_t gpb = bw / 4, ng = z.ngroups, br = band_rows_for(bh);
  std::vector<int32_t> fill(ng);
  int64_t e = 0;
  for (int64_t band = 0; band < z.nbands; ++band) {
    int32_t* go = goff + band * (ng + 1);
    const int64_t c0 = band * br, c1 = std::min<int64_t>(c0 + br, nbr * bh);
    const int64_t r0 = c0 / bh, r1 = c1 / bh;  // whole block rows
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = crow[r]; b < crow[r + 1]; ++b)
        for (int64_t q = 0; q < gpb; ++q) go[colk[b] / 4 + q + 1] += bh;
    go[0] = static_cast<int32_t>(e);
    for (int64_t gi = 0; gi < ng; ++gi) go[gi + 1] += go[gi];
    for (int64_t gi = 0; gi < ng; ++gi) fill[gi] = go[gi];
    // channels in increasing order: block rows in order, then the rows of a block
    for (int64_t r = r0; r < r1; ++r)
      for (int i = 0; i < bh; ++i)
        for (int64_t b = crow[r]; b < crow[r + 1]; ++b)
          for (int64_t q = 0; q < gpb; ++q) {
            const int32_t at = fill[colk[b] / 4 + q]++;
            rows[at] = static_cast<uint16_t>(r * bh + i - c0);
            put(ws, at, r, b, i, q);
          }
    e = go[ng];
  }
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
  const int32_t lay = layout_for(bh);
  const Layout l = layout(n, k, bh, bw, nnzb, lay);
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
  if (l.lists.total == 0) return;
  std::memset(out + l.data_offset + nnzb * bw * l.bh_pad * 4, 0,
              l.lists_offset - (l.data_offset + nnzb * bw * l.bh_pad * 4));
  write_band_lists(crow, colk, l.nbr, bh, bw, l.lists, out + l.lists_offset,
                   [&](uint8_t* ws, int64_t at, int64_t /*r*/, int64_t b, int i, int64_t q) {
                     // the packed row-major block [bh][bw] (zeros past n and k)
                     float* o = reinterpret_cast<float*>(ws) + 4 * at;
                     for (int j = 0; j < 4; ++j) o[j] = d[b * bw * bh + i * bw + 4 * q + j];
                   });
}

const char* check_packed(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k) {
  if (buf == nullptr || nbytes < static_cast<int64_t>(sizeof(PackedHeader)))
    return "packed weight is empty or shorter than its header";
  PackedHeader h;
  std::memcpy(&h, buf, sizeof(h));
  if (h.bh < 1 || h.bw < 1 || h.nnzb < 0) return "packed weight header is corrupt";
  const int32_t lay = layout_for(h.bh);
  return check_packed_header<PackedHeader>(buf, nbytes, n, k, kMagic, lay, layout(h.n, h.k, h.bh, h.bw, h.nnzb, lay).total);
}

namespace {

const char* format_name(uint32_t magic) {
  return magic == kMagic ? "BSR fp32 packing (pack_block_sparse)"
                         : magic == kMagicI8 ? "BSR int8 packing (pack_block_sparse_int8)" : nullptr;
}

std::string dims(int64_t a, int64_t b, const char* sep) { return std::to_string(a) + sep + std::to_string(b); }

}  // namespace

std::string packing_error_for(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k, int bh, int bw,
                              int64_t nnzb, const int32_t* crow, const int32_t* col, const PackingFormat& f) {
  const std::string want = format_name(f.magic);
  const int64_t hb = sizeof(PackedHeader);
  if (buf == nullptr || nbytes < hb)
    return "expected a " + want + ", at least its " + std::to_string(hb) + "-byte header; the buffer has " +
           std::to_string(buf == nullptr ? 0 : nbytes) + " bytes";
  PackedHeader h;
  std::memcpy(&h, buf, sizeof(h));
  if (h.magic != f.magic) {
    if (const char* other = format_name(h.magic)) return "expected a " + want + ", the buffer holds a " + other;
    char m[32];
    std::snprintf(m, sizeof(m), "0x%08x", h.magic);
    return "expected a " + want + ", the buffer's magic is " + m;
  }
  if (h.n != n || h.k != k)
    return "expected a [" + dims(n, k, ", ") + "] weight, the buffer holds [" + dims(h.n, h.k, ", ") + "]";
  if (h.bh != bh || h.bw != bw)
    return "expected " + dims(bh, bw, " x ") + " blocks, the buffer holds " + dims(h.bh, h.bw, " x ");
  if (h.nnzb != nnzb)
    return "expected " + std::to_string(nnzb) + " kept blocks, the buffer holds " + std::to_string(h.nnzb);
  const int64_t nbr = (n + bh - 1) / bh;
  if (h.layout != f.layout || h.bh_pad != f.bh_pad || h.nbr != nbr || h.n_pad != nbr * bh ||
      h.data_offset != f.data_offset)
    return "the buffer's header is inconsistent (layout tag, padding or offsets are not what the format implies)";
  if (nbytes != f.total)
    return "expected " + std::to_string(f.total) + " bytes for this packing, the buffer has " +
           std::to_string(nbytes) + ": truncated or not made by the packer";
  // The block pattern: the size check above puts rowptr [nbr + 1] and colk [nnzb]
  // inside the buffer. First the packing's own pattern, which the kernels index
  // by (row pointers from 0 to nnzb, non-decreasing; column entries multiples
  // of bw below k), then against crow / col row by row, so that the first block
  // row that differs is named; crow is the caller's (not validated per call):
  // colk is read only within [0, nnzb).
  const int32_t* rowptr = reinterpret_cast<const int32_t*>(buf + hb);
  const int32_t* colk = rowptr + nbr + 1;
  bool sane = rowptr[0] == 0 && rowptr[nbr] == nnzb;
  for (int64_t r = 0; sane && r < nbr; ++r) sane = rowptr[r] <= rowptr[r + 1];
  for (int64_t b = 0; sane && b < nnzb; ++b) sane = colk[b] >= 0 && colk[b] < k && colk[b] % bw == 0;
  if (!sane) return "the buffer's block pattern is corrupt (row pointers or column entries out of range)";
  for (int64_t r = 0; r < nbr; ++r) {
    bool same = rowptr[r] == crow[r] && rowptr[r + 1] == crow[r + 1];
    const int64_t b0 = std::max<int64_t>(crow[r], 0), b1 = std::min<int64_t>(crow[r + 1], nnzb);
    for (int64_t b = b0; same && b < b1; ++b) same = colk[b] == static_cast<int64_t>(col[b]) * bw;
    if (!same)
      return "expected the block pattern of crow_indices / col_indices, the buffer holds another (first difference "
             "in block row " + std::to_string(r) + ")";
  }
  return "";
}

std::string packing_error(const uint8_t* buf, int64_t nbytes, int64_t n, int64_t k, int bh, int bw, int64_t nnzb,
                          const int32_t* crow, const int32_t* col) {
  if (bh < 1 || bw < 1 || nnzb < 0)
    return "expected blocks of at least 1 x 1 and nnzb >= 0, got " + std::to_string(bh) + " x " + std::to_string(bw) +
           " and " + std::to_string(nnzb);
  const int32_t lay = layout_for(bh);
  const Layout l = layout(n, k, bh, bw, nnzb, lay);
  return packing_error_for(buf, nbytes, n, k, bh, bw, nnzb, crow, col,
                           PackingFormat{kMagic, lay, l.bh_pad, l.data_offset, l.total});
}

}  // namespace block_sparse
}  // namespace pyaccel
