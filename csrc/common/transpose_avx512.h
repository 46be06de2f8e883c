// 16 x 16 fp32 transpose in zmm registers, shared by the kernels that move x
// into 16-row slabs and their results back (2:4 column kernel, BSR slab
// kernel). Included only from files compiled with AVX-512.
#pragma once
#include <immintrin.h>

namespace pyaccel {

// out[c] = column c of the rows r[0..16): pairs of rows interleaved (32-bit,
// then 64-bit) give in every 128-bit lane L four rows of column 4L + q; two
// rounds of 128-bit lane shuffles gather the 16 rows of each column.
static inline void transpose16x16(const __m512 r[16], __m512 out[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int q = 0; q < 4; ++q) {
    const __m512 ab02 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0x88), ab13 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0xDD);
    const __m512 cd02 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0x88),
                 cd13 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0xDD);
    out[q] = _mm512_shuffle_f32x4(ab02, cd02, 0x88);
    out[q + 4] = _mm512_shuffle_f32x4(ab13, cd13, 0x88);
    out[q + 8] = _mm512_shuffle_f32x4(ab02, cd02, 0xDD);
    out[q + 12] = _mm512_shuffle_f32x4(ab13, cd13, 0xDD);
  }
}

}  // namespace pyaccel
