#include "common/cpu_features.h"

#include <cpuid.h>
#include <cctype>
#include <atomic>
#include <cstdlib>
#include <mutex>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pyaccel {
namespace {

unsigned long long xgetbv0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

// Linux hands a process the AMX tile data state only on request (kernel 5.16+;
// without it the first tile instruction raises SIGILL). Asked once, and only
// when the AMX level could be selected (isa_usable): the grant is process-wide
// and raises the minimum signal stack size for every thread. Idempotent:
// torch's oneDNN makes the same request when it first uses AMX.
enum AmxPermission : int { kAmxNotAsked = 0, kAmxGranted = 1, kAmxRefused = 2 };
std::atomic<int> g_amx_permission{kAmxNotAsked};

bool request_amx_permission() {
  const int state = g_amx_permission.load();
  if (state != kAmxNotAsked) return state == kAmxGranted;
#ifdef __linux__
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  const bool ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  const bool ok = false;
#endif
  g_amx_permission.store(ok ? kAmxGranted : kAmxRefused);
  return ok;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (__get_cpuid(0, &a, &b, &c, &d))  // vendor string in EBX, EDX, ECX: "Genu" "ineI" "ntel"
    f.intel = b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1;
  bool os_amx = false;
  f.fma = (c >> 12) & 1;
  const bool avx = (c >> 28) & 1;
  if (osxsave && avx) {
    const unsigned long long xcr0 = xgetbv0();
    f.os_avx = (xcr0 & 0x6) == 0x6;            // XMM and YMM state
    f.os_avx512 = f.os_avx && (xcr0 & 0xE0) == 0xE0;  // opmask, ZMM_Hi256, Hi16_ZMM
    os_amx = (xcr0 & 0x60000) == 0x60000;              // XTILECFG, XTILEDATA
  }
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const unsigned max_subleaf7 = a;
  f.avx2 = f.os_avx && ((b >> 5) & 1);
  f.bmi1 = (b >> 3) & 1;
  f.bmi2 = (b >> 8) & 1;
  f.avx512f = f.os_avx512 && ((b >> 16) & 1);
  f.avx512dq = f.os_avx512 && ((b >> 17) & 1);
  f.avx512bw = f.os_avx512 && ((b >> 30) & 1);
  f.avx512vl = f.os_avx512 && ((b >> 31) & 1);
  f.avx512vnni = f.os_avx512 && ((c >> 11) & 1);
  f.avx512vbmi = f.os_avx512 && ((c >> 1) & 1);
  f.avx512vpopcntdq = f.os_avx512 && ((c >> 14) & 1);
  const bool amx_tile = (d >> 24) & 1, amx_int8 = (d >> 25) & 1;
  f.amx_int8 = kAmxBuilt && os_amx && amx_tile && amx_int8;
  if (max_subleaf7 < 1) return f;
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512bf16 = f.os_avx512 && ((a >> 5) & 1);
  f.avxvnni = f.os_avx && ((a >> 4) & 1);
  return f;
}

std::atomic<int> g_cap{-1};  // -1: not initialised yet; else an Isa value
std::atomic<int> g_generation{0};
std::once_flag g_env_once;

void init_cap_from_env() {
  std::call_once(g_env_once, [] {
    Isa cap = kTopIsa;
    if (const char* env = std::getenv("PYACCEL_CPU_ISA")) {
      Isa parsed;
      if (parse_isa(env, &parsed)) cap = parsed;  // unknown names: ignored (Python warns)
    }
    int expected = -1;
    g_cap.compare_exchange_strong(expected, static_cast<int>(cap));
  });
}

std::atomic<int> g_tuning{-1};  // -1: the vendor's (after PYACCEL_CPU_TUNING); else a Tuning value
std::once_flag g_tuning_env_once;

// lower case, surrounding blanks dropped (environment values: " AMD " means amd)
std::string normalized(const std::string& raw) {
  const auto first = raw.find_first_not_of(" \t"), last = raw.find_last_not_of(" \t");
  std::string name = first == std::string::npos ? std::string() : raw.substr(first, last - first + 1);
  for (char& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return name;
}

bool parse_tuning(const std::string& raw, int* out) {
  const std::string name = normalized(raw);
  if (name == "intel") *out = static_cast<int>(Tuning::kIntel);
  else if (name == "amd") *out = static_cast<int>(Tuning::kAmd);
  else if (name.empty()) *out = -1;
  else return false;
  return true;
}

void init_tuning_from_env() {
  std::call_once(g_tuning_env_once, [] {
    int t = -1;
    if (const char* env = std::getenv("PYACCEL_CPU_TUNING")) {
      if (!parse_tuning(env, &t)) t = -1;  // unknown names: ignored (Python warns)
    }
    g_tuning.store(t);
  });
}

}  // namespace

Tuning cpu_tuning() {
  init_tuning_from_env();
  const int t = g_tuning.load();
  if (t >= 0) return static_cast<Tuning>(t);
  return cpu_features().intel ? Tuning::kIntel : Tuning::kAmd;
}

bool set_cpu_tuning(const std::string& name) {
  init_tuning_from_env();
  int t;
  if (!parse_tuning(name, &t)) return false;
  g_tuning.store(t);
  g_generation.fetch_add(1);
  return true;
}

const char* tuning_name(Tuning t) { return t == Tuning::kIntel ? "intel" : "amd"; }

const char* tuning_override() {
  init_tuning_from_env();
  const int t = g_tuning.load();
  return t < 0 ? "" : tuning_name(static_cast<Tuning>(t));
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

Isa detected_isa() {
  const CpuFeatures& f = cpu_features();
  // (every AVX-512 CPU has BMI1/BMI2; the AVX-512 sources are built with them)
  const bool avx512 = f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl && f.avx2 && f.fma && f.bmi1 && f.bmi2;
  const bool icl = avx512 && f.avx512vnni && f.avx512vbmi && f.avx512vpopcntdq;
  if (icl && f.amx_int8) return Isa::kAvx512Amx;
  if (icl) return Isa::kAvx512Icl;
  if (avx512 && f.avx512vnni) return Isa::kAvx512Vnni;
  if (avx512) return Isa::kAvx512;
  if (f.avx2 && f.fma && f.avxvnni) return Isa::kAvxVnni;
  if (f.avx2 && f.fma) return Isa::kAvx2;
  return Isa::kPortable;
}

Isa isa_cap() {
  init_cap_from_env();
  return static_cast<Isa>(g_cap.load());
}

bool isa_usable(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(detected_isa())) return false;
  if (isa == Isa::kAvx512Amx) return request_amx_permission();
  if (isa != Isa::kAvxVnni) return true;
  const CpuFeatures& f = cpu_features();
  return (kVexVnniBuilt && f.avxvnni) || (f.avx512f && f.avx512vnni && f.avx512vl);
}

bool isa_allows(Isa selected, Isa entry) {
  if (static_cast<int>(entry) > static_cast<int>(selected)) return false;
  if (entry != Isa::kAvxVnni) return true;
  return selected != Isa::kAvx512 && isa_usable(entry);
}

Isa selected_isa() {
  const Isa d = detected_isa(), c = isa_cap();
  int s = static_cast<int>(c) < static_cast<int>(d) ? static_cast<int>(c) : static_cast<int>(d);
  while (s > 0 && !isa_usable(static_cast<Isa>(s))) --s;
  return static_cast<Isa>(s);
}

bool set_isa_cap(const std::string& name) {
  init_cap_from_env();
  Isa cap = kTopIsa;
  if (!name.empty() && !parse_isa(name, &cap)) return false;
  g_cap.store(static_cast<int>(cap));
  g_generation.fetch_add(1);
  return true;
}

int isa_generation() { return g_generation.load(); }

const char* amx_permission() {
  switch (g_amx_permission.load()) {
    case kAmxGranted: return "granted";
    case kAmxRefused: return "refused";
    default: return "not asked";
  }
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Amx: return "avx512_amx";
    case Isa::kAvx512Icl: return "avx512_icl";
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvxVnni: return "avx_vnni";
    case Isa::kAvx2: return "avx2";
    case Isa::kPortable: return "portable";
  }
  return "unknown";
}

bool parse_isa(const std::string& raw, Isa* out) {
  const std::string name = normalized(raw);  // case-insensitive: PYACCEL_CPU_ISA=AVX2 means avx2
  if (name == "avx512_amx") { *out = Isa::kAvx512Amx; return true; }
  if (name == "avx512_icl") { *out = Isa::kAvx512Icl; return true; }
  if (name == "avx512_vnni") { *out = Isa::kAvx512Vnni; return true; }
  if (name == "avx512") { *out = Isa::kAvx512; return true; }
  if (name == "avx_vnni") { *out = Isa::kAvxVnni; return true; }
  if (name == "avx2") { *out = Isa::kAvx2; return true; }
  if (name == "portable") { *out = Isa::kPortable; return true; }
  return false;
}

}  // namespace pyaccel
