// What the CPU can run: the ISA levels the native code is compiled for (setup.py), asked of the
// CPU itself (cpuid, and the OS's saved register state, through the compiler's
// __builtin_cpu_supports). Compiled for the baseline of its architecture, with no -m flags,
// so that it runs on any CPU before a level is chosen (jaxlstm/_kernel.py).
//
// Levels, lowest first (each needs the ones before it):
//   avx     x86-64-v2 and AVX (Sandy Bridge, 2011: the least that jaxlib runs on)
//   avx2    x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE (Haswell, Zen 1)
//   avx512  x86-64-v4: AVX-512 F, BW, CD, DQ, VL (Skylake-SP, Zen 4)
// Room for the bf16 levels (avx512_bf16: Cooper Lake, Zen 4; amx: Sapphire Rapids) is kept
// by name in JaxlstmCpuSupports; no library is compiled for them yet.
//   generic the compiler's baseline of any other architecture (aarch64: NEON)

#include <cstring>

namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__) || __GNUC__ < 12
// Compilers that do not know the x86-64-vN names: their features one by one.
bool v2() {
  return __builtin_cpu_supports("sse3") && __builtin_cpu_supports("ssse3") && __builtin_cpu_supports("sse4.1") &&
         __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("popcnt");
}
bool v3() {
  return v2() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2");
}
bool v4() {
  return v3() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}
#else
bool v2() { return __builtin_cpu_supports("x86-64-v2"); }
bool v3() { return __builtin_cpu_supports("x86-64-v3"); }
bool v4() { return __builtin_cpu_supports("x86-64-v4"); }
#endif

bool supports(const char* level) {
  __builtin_cpu_init();
  if (!std::strcmp(level, "avx")) return v2() && __builtin_cpu_supports("avx");
  if (!std::strcmp(level, "avx2")) return v3();
  if (!std::strcmp(level, "avx512")) return v4();
  if (!std::strcmp(level, "avx512_bf16")) return v4() && __builtin_cpu_supports("avx512bf16");
  return false;
}

// The CPU's name (cpuid leaves 0x80000002-4), family and model (leaf 1, with the extended fields).
void cpuid(unsigned leaf, unsigned r[4]) { __asm__ __volatile__("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(0)); }

const char* name() {
  static char brand[49] = {};
  unsigned r[4];
  cpuid(0x80000000u, r);
  if (r[0] < 0x80000004u) return "";
  for (unsigned i = 0; i < 3; ++i) {
    cpuid(0x80000002u + i, r);
    std::memcpy(brand + 16 * i, r, 16);
  }
  const char* p = brand;
  while (*p == ' ') ++p;
  return p;
}

int family_model() {
  unsigned r[4];
  cpuid(1, r);
  const unsigned base_family = (r[0] >> 8) & 0xf, base_model = (r[0] >> 4) & 0xf;
  const unsigned family = base_family == 0xf ? base_family + ((r[0] >> 20) & 0xff) : base_family;
  const unsigned model = (base_family == 0x6 || base_family == 0xf) ? base_model + (((r[0] >> 16) & 0xf) << 4) : base_model;
  return static_cast<int>(family * 1000 + model);
}
#else
bool supports(const char*) { return false; }
const char* name() { return ""; }
int family_model() { return 0; }
#endif

}  // namespace

#pragma GCC visibility push(default)

// 1 where the CPU (and the OS) can run the named level, 0 otherwise; "generic" always runs.
extern "C" int JaxlstmCpuSupports(const char* level) {
  return !std::strcmp(level, "generic") || supports(level) ? 1 : 0;
}

// The CPU's brand string ("" where it is not an x86-64 CPU).
extern "C" const char* JaxlstmCpuName() { return name(); }

// family * 1000 + model, as lscpu reports them (x86-64; 0 elsewhere).
extern "C" int JaxlstmCpuFamilyModel() { return family_model(); }

#pragma GCC visibility pop
