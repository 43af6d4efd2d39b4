// bfloat16 operands for the GEMMs of the two loops, on CPUs with AVX512_BF16 (VDPBF16PS:
// Cooper Lake, Sapphire Rapids and later Xeons, AMD Zen 4 and Zen 5).
//
// A bf16 call (jaxlstm's compute_dtype=bfloat16) multiplies bf16 operands and accumulates in
// float32, as XLA's dot with bf16 operands and preferred_element_type=float32 does: the
// weights are rounded once per call, x(t) and h(t-1) per step, and in the backward pass the
// gate cotangents per step; the cell state, the gate maths, the accumulators and the weight
// gradients stay float32. VDPBF16PS multiplies pairs: each 32-bit lane holds two bf16 of
// consecutive k, so an operand here is "paired": A [M, K2] row-major (K2 = ceil(K / 2) pairs,
// the low half the even k, a zero after the last k where K is odd) and a panel [K2, NC], the
// packed layout of gemm.h with a pair in place of a float.
//
// Only the avx512_bf16 level (setup.py) compiles the GEMM's definitions (JAXLSTM_BF16_DOT); the
// other levels see their declarations alone, so that the loops compile unchanged, and run a bf16
// call on the float32 GEMM of the same data (bf16 inputs widened a step at a time). Every level
// reads bf16 inputs and writes bf16 outputs (from_bf16, store_bf16).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "gemm.h"
#include "simd.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define JAXLSTM_BF16_DOT 1
#else
#define JAXLSTM_BF16_DOT 0
#endif

namespace jaxlstm {

using pair16 = uint32_t;  // two bf16 of consecutive k: the low half the even k

inline long pairs(long k) { return (k + 1) / 2; }

// float to bf16, rounding to nearest even (NaN stays NaN), as XLA's convert does.
inline uint16_t bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// n zeroed pairs in v, the first at a multiple of ALIGN bytes.
inline pair16* aligned_pairs(std::vector<pair16>& v, size_t n) {
  v.assign(n + ALIGN / sizeof(pair16), 0u);
  auto p = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<pair16*>((p + ALIGN - 1) / ALIGN * ALIGN);
}

inline pair16 pair(float lo, float hi) { return bf16(lo) | (static_cast<pair16>(bf16(hi)) << 16); }

// dst[0 .. pairs(n)) = src[0 .. n) rounded and paired (a zero after the last where n is odd).
inline void to_pairs(const float* src, pair16* dst, long n);

// The backward pass's paired panels [cols / NC][pairs(K)][NC] of the transposed rows of a row-major
// w: panel column c is row c of w (K floats, rows ld apart) for c < n, zero after (cols a multiple
// of NC; the panels zeroed before). A row at a time: rounded and paired in order (to_pairs), then
// spread down its panel column (before, a float at a time through bf16(): one-process A/B of bf16
// training at B=64, D=512, H=1024, T=64 on a Zen 4, this 0.99-1.04x that, at the VM's resolution).
inline void pack_row_pairs(pair16* panels, const float* w, long K, long ld, long n, long cols) {
  const long K2 = pairs(K);
  std::vector<pair16> row(static_cast<size_t>(K2));
  for (long c = 0; c < std::min(n, cols); ++c) {
    to_pairs(w + c * ld, row.data(), K);
    pair16* dst = panels + (c / NC) * K2 * NC + c % NC;
    for (long k2 = 0; k2 < K2; ++k2) dst[k2 * NC] = row[static_cast<size_t>(k2)];
  }
}

// The forward pass's paired panels (pack_row_pairs' layout) of the columns of a row-major w [K, ld]
// that one thread owns: panel column g*np + u is column g*H + lo + u of w for u < nu (the other
// columns stay as they are: zero). A vector of a row at a time, rounded and paired with the next
// row's (a float at a time, this took 8 of the 140 ms of a forward call at B=64, D=512,
// H=1024, T=64 on the Zen 4).
inline void pack_gate_pairs(pair16* panels, const float* w, long K, long ld, int G, long H, long lo, long nu,
                            long np) {
  const long K2 = pairs(K);
  for (long k2 = 0; k2 < K2; ++k2) {
    const float* even = w + 2 * k2 * ld + lo;
    const float* odd = 2 * k2 + 1 < K ? even + ld : nullptr;
    for (long g = 0; g < G; ++g)
      for (long u = 0; u < nu; u += VW) {
        const int m = static_cast<int>(std::min<long>(VW, nu - u));
        const vu p = (bf16_high(load_n(even + g * H + u, m)) >> 16) |
                     (odd ? bf16_high(load_n(odd + g * H + u, m)) : vu{});
        const long c = g * np + u;
        std::memcpy(panels + (c / NC) * K2 * NC + k2 * NC + c % NC, &p, 4 * m);
      }
  }
}

// dst [cols, pairs(rows)] (row-major, rows ld pairs apart, paired along rows) = the rows row(0), ...,
// row(rows - 1) of cols floats, transposed and rounded, in blocks that stay in cache; a zero after the
// last row where rows is odd.
template <typename Row>
void transpose_pairs(Row&& row, long rows, long cols, pair16* dst, long ld) {
  constexpr long kBlock = 32;
  const long R2 = pairs(rows);
  for (long r0 = 0; r0 < R2; r0 += kBlock)
    for (long c0 = 0; c0 < cols; c0 += kBlock)
      for (long r2 = r0; r2 < std::min(R2, r0 + kBlock); ++r2) {
        const float* lo = row(2 * r2);
        const float* hi = 2 * r2 + 1 < rows ? row(2 * r2 + 1) : nullptr;
        for (long c = c0; c < std::min(cols, c0 + kBlock); ++c) dst[c * ld + r2] = pair(lo[c], hi ? hi[c] : 0.0f);
      }
}

// The first m (<= VW) lanes of v, rounded, to dst (every level: the forward pass writes bf16
// outputs with it).
inline void store_bf16(uint16_t* dst, vf v, int m);

// dst[0 .. n) = src[0 .. n) rounded to bf16, as floats.
inline void round_floats(const float* src, float* dst, long n) {
  for (long i = 0; i < n; i += VW) {
    const int m = static_cast<int>(std::min<long>(VW, n - i));
    store_n(dst + i, round_bf16(load_n(src + i, m)), m);
  }
}

// dst[0 .. n) = the bf16 src[0 .. n), widened (exactly: a bf16 is the high half of a float).
inline void from_bf16(const uint16_t* src, float* dst, long n) {
  for (long i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

// C [M, N] (+)= A · panels with paired operands: A [M, K2] (row stride rs pairs), panel j
// [K2, NC] for columns j*NC ...; N a multiple of NC.
inline void gemm_bf16(const pair16* A, long rs, long M, const pair16* panels, long K2, long N, float* C, long ldc,
               bool accumulate);

// One paired operand of gemm2_bf16: A [M, K2] (row stride rs pairs) and its panels [N / NC][K2][NC].
struct PairOperand {
  const pair16* A = nullptr;
  long rs = 0;
  const pair16* panels = nullptr;
  long K2 = 0;
};

// C [M, N] = bias + x.A · x.panels + h.A · h.panels (bias [N], broadcast over the rows; h with K2 = 0:
// none): the forward step's z = b + x(t)·W_ih + h(t-1)·W_hh in one pass of the register tile, each
// tile's sums kept in registers from the bias to the store (three passes over C before: the bias
// copied in, each GEMM loading and storing it).
inline void gemm2_bf16(const PairOperand& x, const PairOperand& h, long M, long N, const float* bias, float* C,
                       long ldc);

#if JAXLSTM_BF16_DOT

inline void to_pairs(const float* src, pair16* dst, long n) {
  long i = 0;
  // 32 floats to 16 pairs: the low 16 bf16 from the second operand, in memory order.
  for (; i + 32 <= n; i += 32)
    _mm512_storeu_si512(dst + i / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i)));
  for (; i < n; i += 2) dst[i / 2] = pair(src[i], i + 1 < n ? src[i + 1] : 0.0f);
}

inline void store_bf16(uint16_t* dst, vf v, int m) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh((__m512)v);
  if (m == VW) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), h);
  } else {
    _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>((1u << m) - 1), h);
  }
}

// C[r, 0:NC] (+)= Σ_k2 A[r, k2] · P[k2, 0:NC] for r < M, on VDPBF16PS: each instruction
// multiplies 16 columns by two k and adds both to float32 accumulators. A second operand (A2, P2,
// K22 > 0) adds its products to the same sums; with a bias row, the sums start from it (every row)
// instead of from C or zero.
template <int M>
void tile_bf16(const pair16* A, long rs, const pair16* P, long K2, const pair16* A2, long rs2, const pair16* P2,
               long K22, float* C, long ldc, bool accumulate, const float* bias) {
  constexpr int U = M * NV >= 8 ? 1 : 8 / (M * NV);  // independent sums, as gemm.h's tile
  __m512 acc[U][M][NV];
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      acc[0][r][j] = bias         ? _mm512_loadu_ps(bias + j * VW)
                     : accumulate ? _mm512_loadu_ps(C + r * ldc + j * VW)
                                  : _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) acc[u][r][j] = _mm512_setzero_ps();
    }
  auto run = [&](const pair16* a_rows, long a_rs, const pair16* panel, long k2s) {
    auto step = [&](long k, __m512(&sum)[M][NV]) {
      __m512bh b[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) __builtin_prefetch(panel + (k + kPrefetch) * NC + j * VW);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) b[j] = (__m512bh)_mm512_load_si512(panel + k * NC + j * VW);
#pragma GCC unroll 16
      for (int r = 0; r < M; ++r) {
        int32_t ak;  // by bytes: the pairs may have been written as bf16 (store_bf16)
        std::memcpy(&ak, a_rows + r * a_rs + k, 4);
        const __m512bh a = (__m512bh)_mm512_set1_epi32(ak);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) sum[r][j] = _mm512_dpbf16_ps(sum[r][j], a, b[j]);
      }
    };
    long k = 0;
    for (; k + U <= k2s; k += U)
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) step(k + u, acc[u]);
    for (; k < k2s; ++k) step(k, acc[0]);
  };
  run(A, rs, P, K2);
  if (K22 > 0) run(A2, rs2, P2, K22);
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) acc[0][r][j] = _mm512_add_ps(acc[0][r][j], acc[u][r][j]);
      _mm512_storeu_ps(C + r * ldc + j * VW, acc[0][r][j]);
    }
}

using TileBf16Fn = void (*)(const pair16*, long, const pair16*, long, const pair16*, long, const pair16*, long, float*,
                            long, bool, const float*);

template <int... Ms>
constexpr auto make_tiles_bf16(std::integer_sequence<int, Ms...>) {
  return std::array<TileBf16Fn, sizeof...(Ms)>{&tile_bf16<Ms + 1>...};
}

inline const auto kTilesBf16 = make_tiles_bf16(std::make_integer_sequence<int, MR>{});

inline void gemm_bf16(const pair16* A, long rs, long M, const pair16* panels, long K2, long N, float* C, long ldc,
                      bool accumulate) {
  for (long j = 0; j < N / NC; ++j) {
    const pair16* P = panels + j * K2 * NC;
    for (long r = 0; r < M; r += MR) {
      const long m = std::min<long>(MR, M - r);
      kTilesBf16[m - 1](A + r * rs, rs, P, K2, nullptr, 0, nullptr, 0, C + r * ldc + j * NC, ldc, accumulate,
                        nullptr);
    }
  }
}

inline void gemm2_bf16(const PairOperand& x, const PairOperand& h, long M, long N, const float* bias, float* C,
                       long ldc) {
  for (long j = 0; j < N / NC; ++j) {
    const pair16* Px = x.panels + j * x.K2 * NC;
    const pair16* Ph = h.K2 > 0 ? h.panels + j * h.K2 * NC : nullptr;
    for (long r = 0; r < M; r += MR) {
      const long m = std::min<long>(MR, M - r);
      kTilesBf16[m - 1](x.A + r * x.rs, x.rs, Px, x.K2, h.K2 > 0 ? h.A + r * h.rs : nullptr, h.rs, Ph, h.K2,
                        C + r * ldc + j * NC, ldc, false, bias + j * NC);
    }
  }
}

#else

inline void store_bf16(uint16_t* dst, vf v, int m) {
  for (int i = 0; i < m; ++i) dst[i] = bf16(v[i]);
}

#endif  // JAXLSTM_BF16_DOT

}  // namespace jaxlstm
