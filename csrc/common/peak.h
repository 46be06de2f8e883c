// Throughput probes for the benchmark's "% of peak" column: the instruction mix
// each ISA level's kernels are built on, in independent register chains (no
// memory traffic), so the figure is what the running core can issue, not a
// number copied from another machine.
#pragma once
#include <cstdint>

namespace pyaccel {
namespace peak {

// Each probe runs `iters` iterations and returns the operations done
// (int8: multiply + add = 2 per u8*s8 product; fp32: 2 per FMA lane).
int64_t int8_avx2(int64_t iters);     // vpmaddubsw + vpmaddwd + vpaddd, ymm
int64_t int8_exact_avx2(int64_t iters);  // vpmaddwd + vpaddd on int16, ymm
int64_t int8_avx512bw(int64_t iters); // vpmaddubsw + vpmaddwd + vpaddd, zmm
int64_t int8_exact_avx512bw(int64_t iters);  // vpmaddwd + vpaddd on int16, zmm
int64_t int8_vnni(int64_t iters);     // vpdpbusd, zmm
int64_t int8_avxvnni_vex(int64_t iters);   // vpdpbusd, ymm, VEX (AVX-VNNI)
int64_t int8_avxvnni_evex(int64_t iters);  // vpdpbusd, ymm, EVEX (AVX-512 VNNI + VL)
int64_t int8_amx(int64_t iters);      // tdpbusd, 4 accumulator tiles (AMX-INT8; PYACCEL_AMX_BUILT only)
int64_t fp32_avx2(int64_t iters);     // vfmadd231ps, ymm
int64_t fp32_avx512(int64_t iters);   // vfmadd231ps, zmm

struct Result {
  double gops = 0;        // median over the repeats, all threads together
  const char* mix = "";   // the instruction mix measured ("" when the ISA level has none)
};

// kind: "int8", "int8_exact" (a mix that multiplies any 8-bit operands
// exactly in as few instructions as the level allows: vpdpbusd with the 0x80
// offset at VNNI; int16 vpmaddwd + vpaddd at AVX-512 BW and AVX2, whose
// 3-instruction u8 x s8 mix saturates on 8-bit operands) or "fp32"; measured at the ISA level selected now (the cap
// included) on `nthreads` threads, `repeats` runs of about `seconds` each.
Result measure(const char* kind, int nthreads, double seconds, int repeats);

}  // namespace peak
}  // namespace pyaccel
