// vpdpbusd on ymm in either encoding, for the AVX-VNNI level's kernels
// (include only from sources compiled with the AVX2 flags).
//
// Vex = true: "{vex} vpdpbusd" (AVX-VNNI), where the assembler knows it
// (PYACCEL_VEX_PREFIX, cpu_features.h); false: the EVEX form (AVX-512 VNNI +
// VL). The same operation either way (Intel SDM, VPDPBUSD): each int32 lane of
// c gains the 4 products of its u8 bytes of a and s8 bytes of w, wrapping.
// Inline asm because the intrinsics need -mavxvnni or AVX-512 flags, and GCC
// copies accumulators around them. "xm": w from a register or memory; "x"
// keeps every operand in ymm0-15, which both encodings can name.
#pragma once
#include <immintrin.h>

#include "common/cpu_features.h"

namespace pyaccel {

template <bool Vex>
inline void dpbusd_ymm(__m256i& c, __m256i a_u8, const __m256i& w_s8) {
  if constexpr (Vex)
    __asm__(PYACCEL_VEX_PREFIX "vpdpbusd %[w], %[a], %[c]" : [c] "+x"(c) : [a] "x"(a_u8), [w] "xm"(w_s8));
  else
    __asm__("vpdpbusd %[w], %[a], %[c]" : [c] "+x"(c) : [a] "x"(a_u8), [w] "xm"(w_s8));
}

}  // namespace pyaccel
