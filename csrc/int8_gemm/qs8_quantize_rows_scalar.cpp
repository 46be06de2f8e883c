// Dynamic per-row symmetric int8 quantization, portable C++.
// Bit-exact with the reference: inv = qmax / amax (fp32 division), q = rne(x * inv);
// rows with 0 < amax < kTinyAmax go through quantize_tiny_row (int8_gemm.h).
#include <cmath>
#include <cstring>

#include "int8_gemm/int8_gemm.h"

namespace pyaccel {
namespace int8_gemm {

bool quantize_tiny_row(const void* row, bool x_bf16, int64_t k, int64_t k_pad, float amax,
                       uint8_t zero_point, int qmax, int8_t* q_row) {
  const float* xf = x_bf16 ? nullptr : static_cast<const float*>(row);
  const uint16_t* xh = x_bf16 ? static_cast<const uint16_t*>(row) : nullptr;
  const float fq = static_cast<float>(qmax);
  const float inv = fq / (amax * kTinyLift);
  bool finite = true;
  for (int64_t i = 0; i < k; ++i) {
    const float x = xf ? xf[i] : bf16_to_fp32(xh[i]);
    finite &= std::isfinite(x);
    float v = std::nearbyint((x * kTinyLift) * inv);
    v = std::fmin(fq, std::fmax(-fq, v));
    q_row[i] = encode_q(static_cast<int>(v), zero_point);
  }
  for (int64_t i = k; i < k_pad; ++i) q_row[i] = static_cast<int8_t>(zero_point);
  return finite;
}

void quantize_rows_scalar(const void* x, int64_t ldx, bool x_bf16, int64_t m0, int64_t m1,
                          int64_t k, int64_t k_pad, int64_t ldq, uint8_t zero_point, int qmax, int8_t* q,
                          float* scale) {
  const float fq = static_cast<float>(qmax);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xf = x_bf16 ? nullptr : static_cast<const float*>(x) + m * ldx;
    const uint16_t* xh = x_bf16 ? static_cast<const uint16_t*>(x) + m * ldx : nullptr;
    auto at = [&](int64_t i) { return xf ? xf[i] : bf16_to_fp32(xh[i]); };
    float amax = 0.f;
    bool bad = false;
    for (int64_t i = 0; i < k; ++i) {
      amax = std::fmax(amax, std::fabs(at(i)));
      bad |= !std::isfinite(at(i));
    }
    if (bad) {
      mark_nonfinite_row(q + m * ldq, k_pad, zero_point, scale + m);
      continue;
    }
    scale[m] = amax / fq;
    int8_t* qr = q + m * ldq;
    if (amax < kTinyAmax && amax > 0.f) {
      quantize_tiny_row(x_bf16 ? static_cast<const void*>(xh) : xf, x_bf16, k, k_pad, amax, zero_point, qmax, qr);
      continue;
    }
    const float inv = amax > 0.f ? fq / amax : 0.f;
    for (int64_t i = 0; i < k; ++i) {
      float v = std::nearbyint(at(i) * inv);
      v = std::fmin(fq, std::fmax(-fq, v));
      qr[i] = encode_q(static_cast<int>(v), zero_point);
    }
    for (int64_t i = k; i < k_pad; ++i) qr[i] = static_cast<int8_t>(zero_point);
  }
}

}  // namespace int8_gemm
}  // namespace pyaccel
