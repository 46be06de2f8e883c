// CPU feature detection and the ISA ladder shared by every op.
//
// Nothing else in pyaccel asks the CPU what it can do: each op's dispatch
// function calls selected_isa() once and picks its kernel, packing and tiles.
#pragma once
#include <string>

namespace pyaccel {

// Ordered from worst to best. A larger value may use every smaller one, with
// one exception: kAvxVnni (ymm vpdpbusd) is usable on a CPU detected at a
// higher level only where that CPU has VNNI in some encoding (isa_usable):
// an AVX-512 CPU without VNNI (Skylake-X) cannot run it.
enum class Isa : int {
  kPortable = 0,   // plain C++, any x86-64
  kAvx2 = 1,       // AVX2 + FMA
  kAvxVnni = 2,    // AVX2 + FMA + vpdpbusd on ymm: VEX-encoded on CPUs with AVX-VNNI (Alder Lake
                   // and later client cores, Sierra Forest, Sapphire Rapids, Zen 5), EVEX-encoded
                   // on AVX-512 VNNI CPUs without it (Ice Lake, Zen 4), when capped at this level
  kAvx512 = 3,     // AVX-512 F/BW/DQ/VL
  kAvx512Vnni = 4, // AVX-512 + VNNI (vpdpbusd): Cascade Lake
  kAvx512Icl = 5,  // AVX-512 + VNNI + VBMI (vpmultishiftqb, vpermb) + VPOPCNTDQ: Ice Lake, Zen 4 and later
  kAvx512Amx = 6,  // kAvx512Icl + AMX-TILE + AMX-INT8 (tdpbusd), tile state enabled by the OS and granted
                   // to the process: Sapphire Rapids and later Xeons. Only the int8 GEMM has an AMX
                   // kernel; every other op runs its kAvx512Icl kernel at this level.
};
constexpr Isa kTopIsa = Isa::kAvx512Amx;

struct CpuFeatures {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false,
       avx512dq = false, avx512vl = false, avx512vnni = false,
       avx512vpopcntdq = false, avx512vbmi = false, avx512bf16 = false, os_avx = false,
       os_avx512 = false, bmi1 = false, bmi2 = false,
       avxvnni = false,  // AVX-VNNI: CPUID.(7,1):EAX[4], VEX-encoded vpdpbusd on xmm/ymm
       amx_int8 = false;  // AMX-TILE + AMX-INT8 (CPUID.(7,0):EDX[24, 25]), XCR0 tile state (bits 17, 18)
                          // and the AMX build; the process's permission is asked for separately (isa_usable)
  bool intel = false;     // CPUID vendor "GenuineIntel"
};

// What CPUID (and XGETBV: the OS must save the registers) reports. Cached.
const CpuFeatures& cpu_features();

// Best ISA this CPU supports.
Isa detected_isa();

// True when this CPU can run kernels of level `isa`: isa <= detected_isa(),
// for kAvxVnni also AVX-VNNI (with the VEX build present) or AVX-512 VNNI + VL,
// for kAvx512Amx also the OS's grant of the tile state to the process, asked
// for on the first such call (Linux arch_prctl(ARCH_REQ_XCOMP_PERM)); so a cap
// below the AMX level never asks.
bool isa_usable(Isa isa);
// "granted", "refused" or "not asked": the AMX permission's state.
const char* amx_permission();

// True when a kernel built for level `entry` may run while level `selected`
// is in use: entry <= selected, and an AVX-VNNI entry only where VNNI is part
// of the selected level (never at kAvx512, which stands for AVX-512 without
// VNNI, e.g. a Zen 4 capped at avx512) and the CPU can run it.
bool isa_allows(Isa selected, Isa entry);

// The ISA kernels use: the highest usable level <= min(detected, cap). The cap starts from the
// PYACCEL_CPU_ISA environment variable (if set) and can be lowered or restored
// by set_isa_cap(); it can never raise the choice above what the CPU has.
Isa selected_isa();
Isa isa_cap();
// name: "avx512_amx" | "avx512_icl" | "avx512_vnni" | "avx512" | "avx_vnni" | "avx2" | "portable" | "" (no cap).
// Returns false (and changes nothing) for an unknown name.
bool set_isa_cap(const std::string& name);
// Bumped whenever the cap or the tuning changes, so dispatch tables know to re-select.
int isa_generation();

// Which core family's variant to take where an op has two kernels of one ISA
// level, tuned for different port layouts. kIntel: Intel cores (Golden Cove
// and the like), where vector shuffles and scalar ALU ops issue on the same
// ports as the FMAs; kAmd: Zen 3 / Zen 4, whose FP pipes are apart from the
// integer ALUs. Starts from the CPU's vendor (kAmd for any non-Intel CPU),
// overridden by PYACCEL_CPU_TUNING=intel|amd or set_cpu_tuning().
enum class Tuning : int { kAmd = 0, kIntel = 1 };
Tuning cpu_tuning();
// "intel" | "amd" | "" (back to the vendor's). Returns false (and changes
// nothing) for an unknown name.
bool set_cpu_tuning(const std::string& name);
const char* tuning_name(Tuning t);
// The explicit setting in effect ("intel", "amd"), or "" when the vendor's applies.
const char* tuning_override();

// The AMX kernels exist only where the compiler knows AMX (PYACCEL_AMX_BUILT,
// set by CMake); without them the level is never detected.
#ifdef PYACCEL_AMX_BUILT
constexpr bool kAmxBuilt = true;
#else
constexpr bool kAmxBuilt = false;
#endif

// The AVX-VNNI level's kernels are each built twice, VEX-encoded and as an
// EVEX twin (see int8_gemm/qs8_gemm_6x16c4_avxvnni.cpp). The VEX build exists
// only where the assembler knows AVX-VNNI (PYACCEL_VEX_VNNI, set by CMake);
// without it the "VEX" functions hold EVEX code too and are never chosen.
#ifdef PYACCEL_VEX_VNNI
constexpr bool kVexVnniBuilt = true;
#define PYACCEL_VEX_PREFIX "%{vex%} "
#else
constexpr bool kVexVnniBuilt = false;
#define PYACCEL_VEX_PREFIX ""
#endif
// The build this CPU runs: VEX where it has AVX-VNNI (and the build exists),
// else the EVEX twin (an AVX-512 VNNI CPU; isa_usable guarantees one of the two).
template <typename Fn>
Fn avx_vnni_build(Fn vex, Fn evex) {
  return kVexVnniBuilt && cpu_features().avxvnni ? vex : evex;
}

const char* isa_name(Isa isa);
bool parse_isa(const std::string& name, Isa* out);

}  // namespace pyaccel
