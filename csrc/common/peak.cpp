// The peak probes' driver: picks the probe of the ISA level selected now and
// times it on a team of threads (the pool the kernels use).
#include "common/peak.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common/cpu_features.h"

namespace pyaccel {
namespace peak {
namespace {

using Probe = int64_t (*)(int64_t);

struct Choice {
  Probe probe;
  const char* mix;
};

Choice choose(const char* kind) {
  const Isa isa = selected_isa();
  // the AVX-VNNI level: vpdpbusd ymm, in the encoding its GEMM kernel runs
  const Probe ymm_probe = avx_vnni_build(&int8_avxvnni_vex, &int8_avxvnni_evex);
  const Choice ymm_vnni{ymm_probe, ymm_probe == &int8_avxvnni_vex ? "vpdpbusd ymm" : "vpdpbusd ymm (EVEX)"};
#ifdef PYACCEL_AMX_BUILT
  if (isa >= Isa::kAvx512Amx && (std::strcmp(kind, "int8") == 0 || std::strcmp(kind, "int8_exact") == 0))
    return {int8_amx, "tdpbusd (AMX)"};
#endif
  if (std::strcmp(kind, "int8") == 0) {
    if (isa >= Isa::kAvx512Vnni) return {int8_vnni, "vpdpbusd zmm"};
    if (isa == Isa::kAvxVnni) return ymm_vnni;
    if (isa >= Isa::kAvx512) return {int8_avx512bw, "vpmaddubsw+vpmaddwd+vpaddd zmm"};
    if (isa >= Isa::kAvx2) return {int8_avx2, "vpmaddubsw+vpmaddwd+vpaddd ymm"};
    return {nullptr, ""};
  }
  if (std::strcmp(kind, "int8_exact") == 0) {
    if (isa >= Isa::kAvx512Vnni) return {int8_vnni, "vpdpbusd zmm"};
    if (isa == Isa::kAvxVnni) return ymm_vnni;
    if (isa >= Isa::kAvx512) return {int8_exact_avx512bw, "vpmaddwd+vpaddd zmm (int16)"};
    if (isa >= Isa::kAvx2) return {int8_exact_avx2, "vpmaddwd+vpaddd ymm (int16)"};
    return {nullptr, ""};
  }
  if (std::strcmp(kind, "fp32") == 0) {
    if (isa >= Isa::kAvx512) return {fp32_avx512, "vfmadd231ps zmm"};
    if (isa >= Isa::kAvx2) return {fp32_avx2, "vfmadd231ps ymm"};
    return {nullptr, ""};
  }
  throw std::invalid_argument(std::string("measure_peak: kind must be 'int8', 'int8_exact' or 'fp32', got '") + kind + "'");
}

double seconds_of(Probe probe, int64_t iters, int nthreads, int64_t* ops) {
  const auto t0 = std::chrono::steady_clock::now();
  int64_t total = 0;
  if (nthreads <= 1) {
    total = probe(iters);
  } else {
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    total += probe(iters);
  }
  const auto t1 = std::chrono::steady_clock::now();
  *ops = total;
  return std::chrono::duration<double>(t1 - t0).count();
}

}  // namespace

Result measure(const char* kind, int nthreads, double seconds, int repeats) {
  const Choice c = choose(kind);
  Result r;
  r.mix = c.mix;
  if (!c.probe) return r;
  nthreads = std::max(1, nthreads);
  repeats = std::max(1, repeats);
  // calibrate on this thread (a team's first fork costs milliseconds): grow
  // the iteration count until one run takes >= 1/8 of the target
  int64_t iters = 1024, ops = 0;
  double t = seconds_of(c.probe, iters, 1, &ops);
  while (t < seconds / 8 && iters < (int64_t(1) << 40)) {
    iters *= 4;
    t = seconds_of(c.probe, iters, 1, &ops);
  }
  iters = std::max<int64_t>(1, static_cast<int64_t>(iters * (seconds / std::max(t, 1e-9))));
  seconds_of(c.probe, 1024, nthreads, &ops);  // start the team
  std::vector<double> g;
  for (int i = 0; i < repeats; ++i) {
    t = seconds_of(c.probe, iters, nthreads, &ops);
    g.push_back(ops / t * 1e-9);
  }
  std::sort(g.begin(), g.end());
  r.gops = g[g.size() / 2];
  return r;
}

}  // namespace peak
}  // namespace pyaccel
