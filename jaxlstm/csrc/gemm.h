// The register-blocked GEMM of the two loops, and the buffers it works on.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "simd.h"

namespace jaxlstm {

// How many rows of a panel the tile asks for ahead of its k loop. Where a panel is larger
// than the L1 cache (K = H = 1024: 128 KiB) the hardware's prefetchers alone left the
// tile waiting on its loads: at B=64, H=1024 a distance of 64 rows made the forward pass
// 13-18 % faster and training 6-7 % (16 rows: 2-5 %; 128 and 256: as 64), and left the
// smaller regimes as they were (measured, Zen 5).
constexpr long kPrefetch = 64;

// C[r, 0:NC] (+)= Σ_k A[r, k] · P[k, 0:NC] for r < M; A[r, k] = A[r * rs + k * ks];
// P is a packed [K, NC] panel, or (InPlace) NC columns of a row-major matrix whose rows are ldp long;
// with Round, P's values rounded to bf16 as they are read (a bf16 one-step call's weights).
template <int M, bool InPlace, bool Round = false>
void tile(const float* A, long rs, long ks, const float* P, long K, float* C, long ldc, bool accumulate, long ldp) {
  const long stride = InPlace ? ldp : NC;  // a constant for the panels: their loop as it was
  // U independent sums over alternate k where a row block has fewer than 8 accumulators:
  // one chain per register was bound by the FMA's latency, not its throughput (B=1: the
  // forward pass 3-6 % faster, training 7-9 %, measured at B=1, H=64 on Zen 5).
  constexpr int U = M * NV >= 8 ? 1 : 8 / (M * NV);
  vf acc[U][M][NV];
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      acc[0][r][j] = accumulate ? load(C + r * ldc + j * VW) : vf{};
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) acc[u][r][j] = vf{};
    }
  auto step = [&](long k, vf(&sum)[M][NV]) {
    vf b[NV];
    // The panel's row kPrefetch ahead (past the end: the next panel's, or nothing; a
    // prefetch does not fault).
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) __builtin_prefetch(P + (k + kPrefetch) * stride + j * VW);
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      b[j] = load(P + k * stride + j * VW);
      if constexpr (Round) b[j] = round_bf16(b[j]);
      // one load per k, not one per row (simd.h); one row reads it once either way
      if constexpr (M > 1) b[j] = in_register(b[j]);
    }
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const float a = A[r * rs + k * ks];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) sum[r][j] += b[j] * a;
    }
  };
  long k = 0;
  for (; k + U <= K; k += U)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) step(k + u, acc[u]);
  for (; k < K; ++k) step(k, acc[0]);
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) acc[0][r][j] += acc[u][r][j];
      store(C + r * ldc + j * VW, acc[0][r][j]);
    }
}

using TileFn = void (*)(const float*, long, long, const float*, long, float*, long, bool, long);

template <bool InPlace, bool Round, int... Ms>
constexpr auto make_tiles(std::integer_sequence<int, Ms...>) {
  return std::array<TileFn, sizeof...(Ms)>{&tile<Ms + 1, InPlace, Round>...};
}
const auto kTiles = make_tiles<false, false>(std::make_integer_sequence<int, MR>{});
const auto kTilesInPlace = make_tiles<true, false>(std::make_integer_sequence<int, MR>{});
const auto kTilesInPlaceRounded = make_tiles<true, true>(std::make_integer_sequence<int, MR>{});

// The row stride, in 4-byte elements, for a buffer of rows of n elements that the register tile reads
// as its A: n, or one cache line more where rows n apart would lie a multiple of 4 KiB apart. The tile
// reads MR rows at a time, each a line per 16 k; rows 4 KiB apart all fall in one set of the L1 cache
// (8 ways on the CPUs measured) and evict each other: on the Zen 4 a float32 forward pass at B=64,
// D=512, H=1024 (h(t-1) rows 4 KiB apart) ran at 132 GFLOP/s, at H=1008 and 1040 at 162-165.
inline bool aliased(long n) { return n % 1024 == 0; }
inline long lead(long n) { return aliased(n) ? n + 16 : n; }

// C [M, N] (+)= A [M, K] · panels, N a multiple of NC; A[r, k] = A[r * rs + k * ks]
// (rs = row stride, ks = 1 for a row-major A; rs = 1 for a transposed one); panel j
// holds columns j*NC ... as [K, NC].
inline void gemm(const float* A, long rs, long ks, long M, const float* panels, long K, long N, float* C, long ldc,
                 bool accumulate) {
  for (long j = 0; j < N / NC; ++j) {
    const float* P = panels + j * K * NC;
    for (long r = 0; r < M; r += MR) {
      const long m = std::min<long>(MR, M - r);
      kTiles[m - 1](A + r * rs, rs, ks, P, K, C + r * ldc + j * NC, ldc, accumulate, NC);
    }
  }
}

// The streaming step's GEMM (a call of one step, T = 1): C[b, g * ldg + u] += Σ_k A[b * rs + k] ·
// W[k * ldw + g * H + u] for b < M, g < G, u < nu, on the caller's weights where they lie. A step reads
// each weight once; laying them out in panels first (gemm's) reads and writes them once more. One row
// (M = 1): k outer, each row of W read along its length. More rows: whole NC-column blocks run the
// register tile on W in place (row stride ldw), the last columns of a gate, if any, a plain loop (a
// tile would read past them, and past the end of W on its last row). Measured on the Zen 4, one-step
// calls at H=256 in µs (in place / panels): B=1 LSTM 66 / 166-192, GRU 52 / 128 (the tile in place:
// LSTM 115, its rows 4 KiB apart); B=4 LSTM 115 / 181-227, GRU 59 / 138; B=16 LSTM 206 / 306-329, GRU
// 148 / 228-259. With Round, each weight is rounded to bf16 as it is read (a bf16 call's contract; the
// caller rounds A).
template <bool Round>
void gemm_unpacked(const float* A, long rs, long M, const float* W, long ldw, long K, int G, long H, long nu,
                          float* C, long ldc, long ldg) {
  const long full = M == 1 ? 0 : nu / NC * NC;
  for (int g = 0; g < G; ++g)
    for (long u = 0; u < full; u += NC)
      for (long r = 0; r < M; r += MR) {
        const long m = std::min<long>(MR, M - r);
        (Round ? kTilesInPlaceRounded : kTilesInPlace)[m - 1](A + r * rs, rs, 1, W + g * H + u, K,
                                                              C + r * ldc + g * ldg + u, ldc, true, ldw);
      }
  if (full == nu) return;
  for (long b = 0; b < M; ++b)
    for (long k = 0; k < K; ++k) {
      const vf a = splat(A[b * rs + k]);
      const float* w = W + k * ldw;
      float* c = C + b * ldc;
      for (int g = 0; g < G; ++g)
        for (long u = full; u < nu; u += VW) {
          const int m = static_cast<int>(std::min<long>(VW, nu - u));
          const vf wv = Round ? round_bf16(load_n(w + g * H + u, m)) : load_n(w + g * H + u, m);
          store_n(c + g * ldg + u, load_n(c + g * ldg + u, m) + a * wv, m);
        }
    }
}

// dst [cols, rows] (rows ld apart) = the rows row(0), ..., row(rows - 1) of cols floats, transposed,
// in blocks that stay in cache.
template <typename Row>
void transpose(Row&& row, long rows, long cols, float* dst, long ld) {
  constexpr long kBlock = 32;
  for (long r0 = 0; r0 < rows; r0 += kBlock)
    for (long c0 = 0; c0 < cols; c0 += kBlock)
      for (long r = r0; r < std::min(rows, r0 + kBlock); ++r) {
        const float* src = row(r);
        for (long c = c0; c < std::min(cols, c0 + kBlock); ++c) dst[c * ld + r] = src[c];
      }
}

// n zeroed floats in v, the first at a multiple of ALIGN bytes.
inline float* aligned_floats(std::vector<float>& v, size_t n) {
  v.assign(n + ALIGN / sizeof(float), 0.0f);
  auto p = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<float*>((p + ALIGN - 1) / ALIGN * ALIGN);
}

// Large output buffers are fresh memory that XLA's allocator maps on each call: in
// 4 KiB pages, first touching them costs more than the recurrence itself (measured:
// 17 of 29 ms of a saving forward pass at B=32, H=256, T=256). Where transparent
// huge pages are enabled on request ("madvise"), asking for them costs one call.
inline void prefer_huge_pages(void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const auto end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)begin, (void)end;
#endif
}

}  // namespace jaxlstm
