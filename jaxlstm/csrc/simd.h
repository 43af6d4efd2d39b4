// Vectors and the pointwise maths of the gates, for the ISA level this file is compiled for.
//
// Each level (setup.py: avx, avx2, avx512 on x86-64, generic elsewhere) compiles the whole
// kernel once with its own flags into a library of its own; jaxlstm/_kernel.py loads the best
// one the CPU supports. So VW and MR follow the compiler's target macros here, and nothing in
// one library ever runs an instruction of another level.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace jaxlstm {

#if defined(__AVX512F__)
constexpr int VW = 16;  // floats per vector
constexpr int MR = 12;  // rows per register tile (MR x 2 accumulators of 32 registers)
#elif defined(__AVX__)
constexpr int VW = 8;
constexpr int MR = 6;
#else
constexpr int VW = 4;
constexpr int MR = 4;
#endif
constexpr int NV = 2;        // vectors per column tile
constexpr int NC = NV * VW;  // columns per tile
constexpr int ALIGN = 64;

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }

// The first n (<= VW) lanes; the others zero.
inline vf load_n(const float* p, int n) {
  if (n == VW) return load(p);
  alignas(ALIGN) float tmp[VW] = {};
  std::memcpy(tmp, p, sizeof(float) * n);
  return *reinterpret_cast<const vf*>(tmp);
}

inline void store_n(float* p, vf v, int n) {
  if (n == VW) return store(p, v);
  alignas(ALIGN) float tmp[VW];
  *reinterpret_cast<vf*>(tmp) = v;
  std::memcpy(p, tmp, sizeof(float) * n);
}

inline vf splat(float x) { return vf{} + x; }

// v, held in a register from here on. Without it g++ may fold the load that made v into every
// instruction that uses it (an FMA's memory operand), loading v again at each use: the register tile
// (gemm.h) uses each panel vector once per row, so its M-row tile loaded each M times. g++ 12 did so in
// the 2- and 3-row tiles of the generic-tuned levels and in the 4-row tile of a -march=native build on
// the Zen 4 (its znver3 tuning), whose forward pass at B=8, H=128 took 1.2-1.36x the default's (measured).
inline vf in_register(vf v) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+v"(v));
#elif defined(__aarch64__)
  __asm__("" : "+w"(v));
#endif
  return v;
}

// The bf16 of each lane of x, rounded to nearest even (NaN stays NaN) as bf16.h's bf16() does, in
// the high half of the lane (the low half zero).
inline vu bf16_high(vf x) {
  const vu u = (vu)x;
  const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  return (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x00400000u) & 0xffff0000u : rounded;
}

// x rounded to bfloat16, as a float (exact: a bf16 is the high half of a float); where the CPU
// converts to bf16 itself (VCVTNEPS2BF16, the avx512_bf16 level: the level that runs bf16 calls'
// rounding in the GEMMs), three instructions for bf16_high's eight; like the VDPBF16PS path's
// conversions it flushes subnormal floats to zero.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
inline vf round_bf16(vf x) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh((__m512)x);
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}
#else
inline vf round_bf16(vf x) { return (vf)bf16_high(x); }
#endif

// exp with Cephes' polynomial on [-ln2/2, ln2/2]: relative error ~2e-7 on [-87, 88].
inline vf vexp(vf x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  x = x > splat(88.3f) ? splat(88.3f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = x * 1.44269504088896341f + magic;
  vf n = t - magic;
  const vi ni = (vi)t - (vi)magic;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return (vf)((vi)p + (ni << 23));
}

inline vf sigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }
inline vf vtanh(vf x) { return 2.0f / (1.0f + vexp(x * -2.0f)) - 1.0f; }

}  // namespace jaxlstm
