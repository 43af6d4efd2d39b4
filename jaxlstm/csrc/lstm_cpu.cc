// jaxlstm's CPU kernel: the LSTM, GRU and Elman recurrences as XLA FFI custom calls.
//
// jaxlstm.lstm, jaxlstm.gru and jaxlstm.rnn run these on CPU where they apply (see
// jaxlstm/_kernel.py); the pure-XLA path (jaxlstm/_fused.py, jaxlstm/_fused_gru.py) stays
// the portable path everywhere else and the reference they are tested against. The two
// loops are written once, over a cell (Lstm, Gru, Elman below); what follows describes
// the LSTM's (LstmForward / LstmBackward); the GRU's and the Elman RNN's (CellForward /
// CellBackward) differ only in the gates, the saved activations and the lack of a c.
//
// Forward (LstmForward), float32, gate order i, f, g, o, inputs and outputs time-major
// [T, B, .] or batch-major [B, T, .] (the saved activations are time-major):
//   z(t) = x(t) · W_ih + h_in(t) · W_hh + b
//   c(t) = σ(z_f) ∗ c_in(t) + σ(z_i) ∗ tanh(z_g),   h(t) = σ(z_o) ∗ tanh(c(t))
// The input projection is computed per step inside the loop, on panels that stay in
// cache: a [T, B, 4H] projection computed before the loop is a buffer of fresh memory,
// whose first touch cost more than the projection's GEMM (measured: 21 ms for
// [8192, 128] · [128, 1024] at B=32, T=256, against 5 ms of arithmetic).
// Backward (LstmBackward): the reverse recurrence of the cotangents (dh, dc) and all
// the gradients: dx, dW_ih, dW_hh, db and the initial and reset states' cotangents.
// The gate cotangents dz never leave the kernel (a [T, B, 4H] buffer would cost its
// first touch again); the weight gradients are GEMMs over chunks of ~256 rows.
//
// Per-step flags: valid [T, B] (the step counts: inside the length and the mask) and
// reset [T, B] (a counted step starts from the reset state). A step that does not
// count leaves the state unchanged and outputs zeros, as in jaxlstm._engine.
//
// Parallelism (a team of threads per call, see run_team): the hidden units are split
// into one contiguous range per thread; each thread owns the G gate columns of its units
// (packed once per call into panels that stay in its core's cache), computes their gates
// with a register-blocked GEMM, and applies the pointwise update to its own units. One spin barrier per step publishes
// the new h to all threads. The backward pass splits the same way: each thread forms
// dz for its units, a barrier, then dh(t-1) for its units from all of dz.

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <sched.h>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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
constexpr int NV = 2;         // vectors per column tile
constexpr int NC = NV * VW;   // columns per tile
constexpr int ALIGN = 64;

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

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

// How many rows of a panel the tile asks for ahead of its k loop. Where a panel is larger
// than the L1 cache (K = H = 1024: 128 KiB) the hardware's prefetchers alone left the
// tile waiting on its loads: at B=64, H=1024 a distance of 64 rows made the forward pass
// 13-18 % faster and training 6-7 % (16 rows: 2-5 %; 128 and 256: as 64), and left the
// smaller regimes as they were (measured, Zen 5).
constexpr long kPrefetch = 64;

// C[r, 0:NC] (+)= Σ_k A[r, k] · P[k, 0:NC] for r < M; A[r, k] = A[r * rs + k * ks];
// P is a packed [K, NC] panel.
template <int M>
void tile(const float* A, long rs, long ks, const float* P, long K, float* C, long ldc, bool accumulate) {
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
    for (int j = 0; j < NV; ++j) __builtin_prefetch(P + (k + kPrefetch) * NC + j * VW);
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = *reinterpret_cast<const vf*>(P + k * NC + j * VW);
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

using TileFn = void (*)(const float*, long, long, const float*, long, float*, long, bool);

template <int... Ms>
constexpr auto make_tiles(std::integer_sequence<int, Ms...>) {
  return std::array<TileFn, sizeof...(Ms)>{&tile<Ms + 1>...};
}
const auto kTiles = make_tiles(std::make_integer_sequence<int, MR>{});

// C [M, N] (+)= A [M, K] · panels, N a multiple of NC; A[r, k] = A[r * rs + k * ks]
// (rs = row stride, ks = 1 for a row-major A; rs = 1 for a transposed one); panel j
// holds columns j*NC ... as [K, NC].
void gemm(const float* A, long rs, long ks, long M, const float* panels, long K, long N, float* C, long ldc,
          bool accumulate) {
  for (long j = 0; j < N / NC; ++j) {
    const float* P = panels + j * K * NC;
    for (long r = 0; r < M; r += MR) {
      const long m = std::min<long>(MR, M - r);
      kTiles[m - 1](A + r * rs, rs, ks, P, K, C + r * ldc + j * NC, ldc, accumulate);
    }
  }
}

// Large output buffers are fresh memory that XLA's allocator maps on each call: in
// 4 KiB pages, first touching them costs more than the recurrence itself (measured:
// 17 of 29 ms of a saving forward pass at B=32, H=256, T=256). Where transparent
// huge pages are enabled on request ("madvise"), asking for them costs one call.
void prefer_huge_pages(void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const auto end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

// dst [cols, rows] = the rows row(0), ..., row(rows - 1) of cols floats, transposed,
// in blocks that stay in cache.
template <typename Row>
void transpose(Row&& row, long rows, long cols, float* dst) {
  constexpr long kBlock = 32;
  for (long r0 = 0; r0 < rows; r0 += kBlock)
    for (long c0 = 0; c0 < cols; c0 += kBlock)
      for (long r = r0; r < std::min(rows, r0 + kBlock); ++r) {
        const float* src = row(r);
        for (long c = c0; c < std::min(cols, c0 + kBlock); ++c) dst[c * rows + r] = src[c];
      }
}

// Where step t of sequence b lies in a [T, B, F] (time-major) or [B, T, F] array, in rows.
struct Layout {
  long T, B;
  bool batch_major;
  long row(long t, long b) const { return batch_major ? b * T + t : t * B + b; }
  long batch_stride() const { return batch_major ? T : 1; }  // rows from (t, b) to (t, b + 1)
};

float* aligned_floats(std::vector<float>& v, size_t n) {
  v.assign(n + ALIGN / sizeof(float), 0.0f);
  auto p = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<float*>((p + ALIGN - 1) / ALIGN * ALIGN);
}

// ---------------------------------------------------------------------------
// Threads: a team per call (run_team) that meets at a spin barrier once per step.

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until done(); after a few microseconds yields the core, so that a waiting
// thread does not hold up the one it waits for: when XLA's pool threads spin beside a
// team on 2 cores (3 runnable threads), a barrier that waits for a descheduled
// member must give up its CPU, or a 1.3 ms call takes 9-14 ms (measured; yielding
// after 50 spins brought that to ~2-3 ms and left the base shape as it was).
constexpr int kSpinsBeforeYield = 50;

template <typename F>
void spin_until(F&& done) {
  for (int i = 0; !done(); ++i) {
    if (i < kSpinsBeforeYield) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
}

class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    if (n_ == 1) return;
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
    } else {
      spin_until([&] { return gen_.load(std::memory_order_acquire) != gen; });
    }
  }

 private:
  const int n_;
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<int> gen_{0};
};

// JAXLSTM_KERNEL_THREADS, or 0 where it is unset.
int requested_threads() {
  const char* env = std::getenv("JAXLSTM_KERNEL_THREADS");
  return env ? std::max(0, std::atoi(env)) : 0;
}

// The units [lo, hi) of thread p of n: contiguous ranges, multiples of VW where H allows.
struct Split {
  long lo, hi;
  long n() const { return hi - lo; }
  long padded() const { return (n() + NC - 1) / NC * NC; }  // columns per gate in the panel
};

Split split_units(long H, int p, int n) {
  const long per = ((H + n - 1) / n + VW - 1) / VW * VW;
  const long lo = std::min(H, p * per);
  return {lo, std::min(H, lo + per)};
}

// The CPUs this process may run on.
int cpu_count() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Threads worth using: one per CPU at most (the calling thread is one more than XLA's
// pool holds: a third thread on 2 cores made a 1.3 ms call take 14 ms, measured), at
// least VW units each, and per step at least kMinWork
// multiply-adds each. A smaller step (B=1, H=64: 25k) is over before a second thread
// has crossed its barrier, and on this project's 2-core machines a second thread made
// such steps 2x slower in some processes and 30x in others (measured).
// JAXLSTM_KERNEL_THREADS=n asks for n threads whatever the work (the tests use it).
constexpr long kMinWork = 128 * 1024;

int thread_count(long units, long work_per_step) {
  const long by_units = std::max<long>(1, units / VW);
  const int asked = requested_threads();
  if (asked > 0) return static_cast<int>(std::min<long>(asked, by_units));
  const long by_work = std::max<long>(1, work_per_step / kMinWork);
  return static_cast<int>(std::min<long>(cpu_count(), std::min(by_units, by_work)));
}

// ---------------------------------------------------------------------------
// Cells: what the two loops need to know of the LSTM, the GRU and the Elman RNN.
//
//   G        gates per hidden unit (columns of W_ih, W_hh and b per unit);
//   S        floats saved per unit and step for the backward pass (acts [T, B, S*H]);
//   kCell    a cell state c besides h (the LSTM);
//   kSplit   h·W_hh is kept apart from x·W_ih + b (the GRU: r multiplies h·W_hn + b_hn),
//            so that the gate cotangents of the two products differ (the n block).

struct Lstm {  // i, f, g, o; saves i, f, g, o (and c, apart)
  static constexpr int G = 4, S = 4;
  static constexpr bool kCell = true, kSplit = false;
};
struct Gru {  // r, z, n (PyTorch's order); saves r, z, n, hn = h·W_hn + b_hn
  static constexpr int G = 3, S = 4;
  static constexpr bool kCell = false, kSplit = true;
};
struct Elman {  // h(t) = tanh(x·W_ih + b + h(t-1)·W_hh); saves h(t)
  static constexpr int G = 1, S = 1;
  static constexpr bool kCell = false, kSplit = false;
};

template <class A, class B>
constexpr bool same = std::is_same_v<A, B>;

// ---------------------------------------------------------------------------
// Forward

// The sizes of a call, and the layout of its sequences (xs, ys, dys, dxs).
struct Dims {
  long T, B, D, H;
  Layout io;
};

struct ForwardArgs : Dims {
  const float *xs, *w_ih, *bias, *b_hn, *w_hh, *h0, *c0, *hr, *cr;  // b_hn: the GRU's; c0, cr: the LSTM's
  const uint8_t *valid, *reset;
  float *ys, *hT, *cT;
  float *acts, *cs, *hin;  // saved for the backward pass, or nullptr (cs: the LSTM's)
};

// One step of a cell for the units u ... u+m (m <= VW) of one sequence: zx holds
// x·W_ih + b and zh h·W_hh (the same buffer unless kSplit), gate g at g*np; h and c
// are the thread's slices of the state (h still h(t-1)). Saves the S blocks to act
// (stride H) unless it is null; returns h(t).
template <class Cell>
inline vf cell_step(const float* zx, const float* zh, long np, long u, int m, const float* b_hn, const float* h,
                    float* c, float* act, long H) {
  auto save = [&](std::initializer_list<vf> blocks) {
    if (!act) return;
    long k = 0;
    for (vf v : blocks) store_n(act + (k++) * H + u, v, m);
  };
  if constexpr (same<Cell, Lstm>) {
    const vf i = sigmoid(load(zx + u)), f = sigmoid(load(zx + np + u));
    const vf g = vtanh(load(zx + 2 * np + u)), o = sigmoid(load(zx + 3 * np + u));
    const vf cn = f * load_n(c + u, m) + i * g;
    store_n(c + u, cn, m);
    save({i, f, g, o});
    return o * vtanh(cn);
  } else if constexpr (same<Cell, Gru>) {
    const vf r = sigmoid(load(zx + u) + load(zh + u)), z = sigmoid(load(zx + np + u) + load(zh + np + u));
    const vf hn = load(zh + 2 * np + u) + load_n(b_hn + u, m);
    const vf n = vtanh(load(zx + 2 * np + u) + r * hn);
    save({r, z, n, hn});
    return n + z * (load_n(h + u, m) - n);  // (1 - z) n + z h(t-1)
  } else {
    const vf hn = vtanh(load(zx + u));
    save({hn});
    return hn;
  }
}

template <class Cell>
void forward_thread(const ForwardArgs& a, int p, int n, SpinBarrier& barrier, float* h_state, float* c_state,
                    float* hbuf) {
  constexpr int G = Cell::G, S = Cell::S;
  const long T = a.T, B = a.B, H = a.H, GH = G * H;
  const Split s = split_units(H, p, n);
  const long nu = s.n(), np = s.padded(), cols = G * np;
  // Panels of W_ih's and W_hh's columns for this thread's units, gate-blocked: column
  // g*np + u is gate g of unit lo + u (zero for the padding units).
  std::vector<float> wx_store, wh_store, zx_store, zh_store, bias_store;
  float* wx = aligned_floats(wx_store, static_cast<size_t>(a.D) * cols);
  float* wh = aligned_floats(wh_store, static_cast<size_t>(H) * cols);
  float* zx = aligned_floats(zx_store, static_cast<size_t>(B) * cols);
  float* zh = Cell::kSplit ? aligned_floats(zh_store, static_cast<size_t>(B) * cols) : zx;
  float* bias = aligned_floats(bias_store, cols);
  // Row by row (read column by column, W_hh took 5 % of the forward pass at H=1024, a
  // cache miss per float): np is a multiple of NC, so a run of NC units of one gate is
  // contiguous in w and in one panel.
  auto pack = [&](float* panel, const float* w, long K) {
    for (long k = 0; k < K; ++k)
      for (long g = 0; g < G; ++g)
        for (long u = 0; u < nu; u += NC)
          std::memcpy(panel + (g * np + u) / NC * K * NC + k * NC, w + k * GH + g * H + s.lo + u,
                      4 * std::min<long>(NC, nu - u));
  };
  pack(wx, a.w_ih, a.D);
  pack(wh, a.w_hh, H);
  for (long g = 0; g < G; ++g) std::memcpy(bias + g * np, a.bias + g * H + s.lo, 4 * nu);
  const float* b_hn = a.b_hn ? a.b_hn + s.lo : nullptr;
  auto h_in_at = [&](long t) -> float* { return a.hin ? a.hin + t * B * H : hbuf + (t & 1) * B * H; };
  // The state entering step t for this thread's units (a reset replaces it).
  auto enter = [&](long t) {
    float* hin = h_in_at(t);
    for (long b = 0; b < B; ++b) {
      const bool r = a.reset[t * B + b] != 0;
      for (long u = s.lo; u < s.hi; ++u) {
        const long i = b * H + u;
        if (r) {
          h_state[i] = a.hr[i];
          if constexpr (Cell::kCell) c_state[i] = a.cr[i];
        }
        hin[i] = h_state[i];
      }
    }
  };
  if (nu > 0) {
    for (long b = 0; b < B; ++b)
      for (long u = s.lo; u < s.hi; ++u) {
        h_state[b * H + u] = a.h0[b * H + u];
        if constexpr (Cell::kCell) c_state[b * H + u] = a.c0[b * H + u];
      }
    if (T > 0) enter(0);
  }
  barrier.wait();
  for (long t = 0; t < T; ++t) {
    if (nu > 0) {
      for (long b = 0; b < B; ++b) std::memcpy(zx + b * cols, bias, 4 * cols);
      gemm(a.xs + a.io.row(t, 0) * a.D, a.io.batch_stride() * a.D, 1, B, wx, a.D, cols, zx, cols, true);
      gemm(h_in_at(t), H, 1, B, wh, H, cols, zh, cols, !Cell::kSplit);
      for (long b = 0; b < B; ++b) {
        const bool valid = a.valid[t * B + b] != 0;
        float* y = a.ys + a.io.row(t, b) * H + s.lo;
        float* hs = h_state + b * H + s.lo;
        float* cst = Cell::kCell ? c_state + b * H + s.lo : nullptr;
        float* act = a.acts ? a.acts + (t * B + b) * S * H + s.lo : nullptr;
        for (long u = 0; u < nu; u += VW) {
          const int m = static_cast<int>(std::min<long>(VW, nu - u));
          if (!valid) {
            store_n(y + u, vf{}, m);
            if (act)
              for (int k = 0; k < S; ++k) store_n(act + k * H + u, vf{}, m);
            continue;
          }
          const vf h = cell_step<Cell>(zx + b * cols, zh + b * cols, np, u, m, b_hn, hs, cst, act, H);
          store_n(hs + u, h, m);
          store_n(y + u, h, m);
        }
        if (Cell::kCell && a.cs) std::memcpy(a.cs + (t * B + b) * H + s.lo, cst, 4 * nu);
      }
      if (t + 1 < T) enter(t + 1);
    }
    barrier.wait();
  }
  if (nu > 0)
    for (long b = 0; b < B; ++b) {
      std::memcpy(a.hT + b * H + s.lo, h_state + b * H + s.lo, 4 * nu);
      if constexpr (Cell::kCell) std::memcpy(a.cT + b * H + s.lo, c_state + b * H + s.lo, 4 * nu);
    }
}

// ---------------------------------------------------------------------------
// Backward

struct BackwardArgs : Dims {
  const float *xs, *w_ih, *w_hh, *acts, *cs, *h_in, *c0, *cr;  // cs, c0, cr: the LSTM's
  const uint8_t *valid, *reset;
  const float *dys, *dhT, *dcT;
  float *dxs, *dw_ih, *dw_hh, *db, *db_hn, *dh0, *dc0, *dhr, *dcr;  // db_hn: the GRU's
};

// Each thread owns the units [lo, hi) (their G gate columns of the gate cotangents
// and of the weight gradients) and the input features [dlo, dhi) (their columns of
// dx). Per step: the gate cotangents of its units into a shared ring (a barrier), then
// dh(t-1) for its units from all of them. Every TC steps (a chunk, TC·B rows), the
// weight gradients of its columns take one GEMM over the chunk's rows, and dx of its
// features one GEMM; the ring holds two chunks, so a chunk is read while the next is
// written. dgx is the cotangent of x·W_ih + b, dgh that of h·W_hh (the same but for
// the GRU's n block, dgh_n = dgx_n ∗ r); with kSplit each has its ring and panels.
template <class Cell>
void backward_thread(const BackwardArgs& a, int p, int n, SpinBarrier& barrier, float* dh, float* dc, float* ring,
                     float* ring_x, long TC) {
  constexpr int G = Cell::G, S = Cell::S;
  const long T = a.T, B = a.B, D = a.D, H = a.H, GH = G * H;
  const Split s = split_units(H, p, n), sd = split_units(D, p, n);
  const long nu = s.n(), np = s.padded(), cols = G * np, nd = sd.n(), ndp = sd.padded();
  std::vector<float> st[12];
  // W_hhᵀ's columns for this thread's units, [GH, np]; W_ihᵀ's for its features, [GH, ndp].
  float* whT = aligned_floats(st[0], static_cast<size_t>(GH) * np);
  float* wiT = aligned_floats(st[1], static_cast<size_t>(GH) * ndp);
  for (long u = 0; u < nu; ++u)
    for (long k = 0; k < GH; ++k) whT[(u / NC) * GH * NC + k * NC + u % NC] = a.w_hh[(s.lo + u) * GH + k];
  for (long d = 0; d < nd; ++d)
    for (long k = 0; k < GH; ++k) wiT[(d / NC) * GH * NC + k * NC + d % NC] = a.w_ih[(sd.lo + d) * GH + k];
  const size_t chunk_cols = static_cast<size_t>(TC) * B * cols;
  float* rec = aligned_floats(st[2], static_cast<size_t>(B) * np);  // dh(t-1) of its units through W_hh
  float* direct = aligned_floats(st[3], Cell::kSplit ? static_cast<size_t>(B) * np : 0);  // the GRU's dh ∗ z
  float* ph = aligned_floats(st[4], chunk_cols);                                       // its dgh columns, as panels
  float* px = Cell::kSplit ? aligned_floats(st[5], chunk_cols) : ph;                  // its dgx columns
  float* gwh = aligned_floats(st[6], static_cast<size_t>(H) * cols);                  // dW_hh of its columns
  float* gwi = aligned_floats(st[7], static_cast<size_t>(D) * cols);                  // dW_ih of its columns
  float* gb = aligned_floats(st[8], cols);                                            // db of its columns
  float* gbh = aligned_floats(st[9], cols);                                           // Σ dgh (the GRU's db_hn)
  float* dxc = aligned_floats(st[10], static_cast<size_t>(TC) * B * ndp);              // dx of its features, a chunk
  std::vector<float> hT_store, xT_store;
  float* hT = aligned_floats(hT_store, static_cast<size_t>(TC) * B * H);  // a chunk of h_in, transposed
  float* xT = aligned_floats(xT_store, static_cast<size_t>(TC) * B * D);  // and of x
  for (long b = 0; b < B; ++b)
    for (long u = s.lo; u < s.hi; ++u) {
      const long i = b * H + u;
      dh[i] = a.dhT[i];
      a.dhr[i] = 0.0f;
      if constexpr (Cell::kCell) {
        dc[i] = a.dcT[i];
        a.dcr[i] = 0.0f;
      }
    }
  // The chunk of t: steps [t0, t0 + TC); its rows k = (t - t0) * B + b.
  for (long t = T - 1; t >= 0; --t) {
    const long t0 = t / TC * TC, rows = std::min(TC, T - t0) * B;
    const long chunk = ((t / TC) & 1) * TC * B * GH;
    float* dgh_t = ring + chunk + (t - t0) * B * GH;
    float* dgx_t = ring_x + chunk + (t - t0) * B * GH;
    for (long b = 0; b < B && nu > 0; ++b) {
      const long row = t * B + b, k = (t - t0) * B + b;
      // The cotangents of gate g, units u...u+m: vx of x·W_ih + b, vh of h·W_hh.
      auto put = [&](long g, long u, vf vx, vf vh, int m) {
        const long c = g * np + u;  // VW divides NC: a vector never straddles two panels
        const long at = k * NC + (c / NC) * TC * B * NC + c % NC;
        store_n(dgh_t + b * GH + g * H + s.lo + u, vh, m);
        store_n(ph + at, vh, m);
        store_n(gb + c, load_n(gb + c, m) + vx, m);
        if constexpr (Cell::kSplit) {
          store_n(dgx_t + b * GH + g * H + s.lo + u, vx, m);
          store_n(px + at, vx, m);
          store_n(gbh + c, load_n(gbh + c, m) + vh, m);
        }
      };
      if (!a.valid[row]) {
        for (long g = 0; g < G; ++g)
          for (long u = 0; u < nu; u += VW) put(g, u, vf{}, vf{}, static_cast<int>(std::min<long>(VW, nu - u)));
        continue;
      }
      const float* act = a.acts + row * S * H + s.lo;
      const float* dy = a.dys + a.io.row(t, b) * H + s.lo;
      float* dhb = dh + b * H + s.lo;
      for (long u = 0; u < nu; u += VW) {
        const int m = static_cast<int>(std::min<long>(VW, nu - u));
        const vf dh_tot = load_n(dy + u, m) + load_n(dhb + u, m);
        auto saved = [&](int k) { return load_n(act + k * H + u, m); };
        if constexpr (same<Cell, Lstm>) {
          const bool reset = a.reset[row] != 0;
          const float* c = a.cs + row * H + s.lo;
          const float* c_in = reset ? a.cr + b * H + s.lo : (t > 0 ? a.cs + (row - B) * H : a.c0 + b * H) + s.lo;
          float* dcb = dc + b * H + s.lo;
          const vf i = saved(0), f = saved(1), g = saved(2), o = saved(3);
          const vf tc = vtanh(load_n(c + u, m));
          const vf dc_tot = load_n(dcb + u, m) + dh_tot * o * (1.0f - tc * tc);
          const vf di = dc_tot * g * i * (1.0f - i), df = dc_tot * load_n(c_in + u, m) * f * (1.0f - f);
          const vf dg = dc_tot * i * (1.0f - g * g), dout = dh_tot * tc * o * (1.0f - o);
          put(0, u, di, di, m);
          put(1, u, df, df, m);
          put(2, u, dg, dg, m);
          put(3, u, dout, dout, m);
          store_n(dcb + u, dc_tot * f, m);  // routed below, with dh
        } else if constexpr (same<Cell, Gru>) {
          const vf r = saved(0), z = saved(1), nn = saved(2), hn = saved(3);
          const vf h_prev = load_n(a.h_in + row * H + s.lo + u, m);
          const vf dn = dh_tot * (1.0f - z) * (1.0f - nn * nn);
          const vf dr = dn * hn * r * (1.0f - r), dz = dh_tot * (h_prev - nn) * z * (1.0f - z);
          put(0, u, dr, dr, m);
          put(1, u, dz, dz, m);
          put(2, u, dn, dn * r, m);
          store_n(direct + b * np + u, dh_tot * z, m);
        } else {
          const vf hn = saved(0), dpre = dh_tot * (1.0f - hn * hn);
          put(0, u, dpre, dpre, m);
        }
      }
    }
    barrier.wait();  // all of the step's gate cotangents are written
    if (nu > 0) {
      gemm(dgh_t, GH, 1, B, whT, GH, np, rec, np, false);
      for (long b = 0; b < B; ++b) {
        const long row = t * B + b;
        if (!a.valid[row]) continue;  // the state's cotangent passes through
        float* dhb = dh + b * H + s.lo;
        float* recb = rec + b * np;
        if constexpr (Cell::kSplit)
          for (long u = 0; u < nu; ++u) recb[u] += direct[b * np + u];
        if (a.reset[row]) {  // the step started from the reset state
          for (long u = 0; u < nu; ++u) {
            a.dhr[b * H + s.lo + u] += recb[u];
            dhb[u] = 0.0f;
            if constexpr (Cell::kCell) {
              a.dcr[b * H + s.lo + u] += dc[b * H + s.lo + u];
              dc[b * H + s.lo + u] = 0.0f;
            }
          }
        } else {
          std::memcpy(dhb, recb, 4 * nu);
        }
      }
    }
    if (t != t0) continue;
    // The chunk is complete (it ran from its last step down to t0).
    if (nu > 0) {
      // dW_hh += h_inᵀ · dgh and dW_ih += xᵀ · dgx over the chunk's rows. A = h_inᵀ, xᵀ,
      // transposed into row-major copies first: read in place, each step of the GEMM's
      // k loop would jump a row of h_in (a page at H=1024).
      transpose([&](long k) { return a.h_in + (t0 * B + k) * H; }, rows, H, hT);
      transpose([&](long k) { return a.xs + a.io.row(t0 + k / B, k % B) * D; }, rows, D, xT);
      for (long j = 0; j < cols / NC; ++j) {
        gemm(hT, rows, 1, H, ph + j * TC * B * NC, rows, NC, gwh + j * NC, cols, true);
        gemm(xT, rows, 1, D, px + j * TC * B * NC, rows, NC, gwi + j * NC, cols, true);
      }
    }
    if (nd > 0) {
      gemm(ring_x + chunk, GH, 1, rows, wiT, GH, ndp, dxc, ndp, false);
      for (long k = 0; k < rows; ++k)
        std::memcpy(a.dxs + a.io.row(t0 + k / B, k % B) * D + sd.lo, dxc + k * ndp, 4 * nd);
    }
  }
  for (long b = 0; b < B; ++b) {
    std::memcpy(a.dh0 + b * H + s.lo, dh + b * H + s.lo, 4 * nu);
    if constexpr (Cell::kCell) std::memcpy(a.dc0 + b * H + s.lo, dc + b * H + s.lo, 4 * nu);
  }
  for (long g = 0; g < G && nu > 0; ++g) {
    for (long k = 0; k < H; ++k) std::memcpy(a.dw_hh + k * GH + g * H + s.lo, gwh + k * cols + g * np, 4 * nu);
    for (long k = 0; k < D; ++k) std::memcpy(a.dw_ih + k * GH + g * H + s.lo, gwi + k * cols + g * np, 4 * nu);
    std::memcpy(a.db + g * H + s.lo, gb + g * np, 4 * nu);
  }
  if (Cell::kSplit && nu > 0) std::memcpy(a.db_hn + s.lo, gbh + (G - 1) * np, 4 * nu);
}

// A team for one call: the calling thread and up to want-1 helpers from XLA's own
// intra-op thread pool. XLA promises nothing about when (or whether) a scheduled task
// runs, so helpers are recruited, not assumed: each task joins only while the caller is
// still recruiting, the caller waits a short while for them and then closes the team
// with whoever came; a task that comes late, or that XLA runs inline on the calling
// thread, returns at once. Where none came, the kernel's own Pool serves. (XLA's pool
// comes first: threads of the kernel's own compete for the cores with XLA's pool
// threads, which spin after their work; on 2 cores that made steps up to 5x slower.)
struct Team {
  std::mutex mu;
  bool open = true;
  int joined = 0;                  // helpers admitted (ids 1 ... joined)
  std::atomic<int> arrived{0};     // the same count, for the caller's spin
  std::atomic<int> size{0};        // the closed team's size; 0 while recruiting
  std::atomic<int> finished{0};    // helpers done
  std::thread::id caller;
  std::function<void(int, int)> job;
  std::condition_variable over_cv;  // extra pool threads sleep on it until the call ends
  bool over = false;
  std::vector<int> cpus;  // the allowed CPUs but the caller's: helper k runs on cpus[(k-1) % size]
};

// Runs f with the calling thread held to one CPU, then restores its affinity. A pool
// thread woken for the team often started on the caller's CPU (wake-affine placement)
// and stayed there, so that each barrier cost two context switches: at B=8, H=128 such
// calls took 2.1-2.9 ms against 1.2-1.5 ms (measured).
template <typename F>
void on_cpu(int cpu, F&& f) {
  cpu_set_t old_set, one;
  if (cpu < 0 || pthread_getaffinity_np(pthread_self(), sizeof(old_set), &old_set) != 0) return f();
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);
  const bool moved = pthread_setaffinity_np(pthread_self(), sizeof(one), &one) == 0;
  f();
  if (moved) pthread_setaffinity_np(pthread_self(), sizeof(old_set), &old_set);
}

// The fallback when XLA's pool sends no helper in time (measured: at B=64, H=1024, in
// some processes XLA ran no scheduled task for the whole call, so the forward pass ran
// at one thread's speed): threads of the kernel's own, which sleep between calls.
class Pool {
 public:
  static Pool& get() {
    // Never destroyed: its workers outlive static teardown.
    static Pool* pool = new Pool(std::max(cpu_count(), requested_threads()));
    return *pool;
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs f(0), ..., f(n-1) on n threads (the caller is thread 0). A second call
  // while one runs (XLA may run two custom calls at once) gets the caller alone.
  int run(int n, const std::function<void(int, int)>& f) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || n <= 1) {
      f(0, 1);
      return 1;
    }
    n = std::min(n, size());
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &f;
      active_ = n;
      pending_.store(n - 1, std::memory_order_relaxed);
      ++generation_;
    }
    cv_.notify_all();
    f(0, n);
    spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; });
    return n;
  }

 private:
  explicit Pool(int n) {
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i] { loop(i); });
    for (auto& w : workers_) w.detach();
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int, int)>* job;
      int n;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
        n = active_;
      }
      if (id < n) {
        (*job)(id, n);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex busy_, mu_;
  std::condition_variable cv_;
  uint64_t generation_ = 0;
  const std::function<void(int, int)>* job_ = nullptr;
  int active_ = 0;
  std::atomic<int> pending_{0};
};

// How long the caller waits for helpers: a parked pool thread took 5-40 µs to start a
// task, now and then more than 200 µs (measured); a call of `work` multiply-adds waits
// up to 5 % of its one-thread time (at ~100 GMAC/s), within [200 µs, 2 ms].
std::chrono::microseconds recruit_timeout(double work) {
  return std::chrono::microseconds(static_cast<long>(std::clamp(work / 100e3 * 0.05, 200.0, 2000.0)));
}

// Wakes the pool threads that slept through the call, and closes it to late ones.
void end_call(Team& team) {
  {
    std::lock_guard<std::mutex> lock(team.mu);
    team.open = false;
    team.over = true;
  }
  team.over_cv.notify_all();
}

template <typename F>
void run_team(ffi::ThreadPool& pool, int want, double work, F&& body) {
  const int pool_threads = static_cast<int>(std::max<int64_t>(0, pool.num_threads()));
  const int helpers = std::min(want - 1, pool_threads);
  if (helpers <= 0) {
    SpinBarrier barrier(1);
    body(0, 1, barrier);
    return;
  }
  auto team = std::make_shared<Team>();
  team->caller = std::this_thread::get_id();
  cpu_set_t allowed;
  const int here = sched_getcpu();
  if (here >= 0 && sched_getaffinity(0, sizeof(allowed), &allowed) == 0)
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (c != here && CPU_ISSET(c, &allowed)) team->cpus.push_back(c);
  std::unique_ptr<SpinBarrier> barrier;
  team->job = [&](int p, int n) { body(p, n, *barrier); };
  // A task for every pool thread: the first helpers join; the others sleep until the
  // call ends, so that no idle pool thread spins beside the team (measured: with one
  // spinning, a 1.3 ms call at B=8, H=128 took 2.5-5 ms).
  for (int i = 0; i < pool_threads; ++i) {
    pool.Schedule([team, helpers] {
      if (std::this_thread::get_id() == team->caller) return;  // run inline: not a second thread
      int id;
      {
        std::unique_lock<std::mutex> lock(team->mu);
        if (!team->open) return;
        if (team->joined >= helpers) {
          team->over_cv.wait(lock, [&] { return team->over; });
          return;
        }
        id = ++team->joined;
        team->arrived.store(team->joined, std::memory_order_release);
      }
      int n;
      spin_until([&] { return (n = team->size.load(std::memory_order_acquire)) != 0; });
      if (id < n) {
        const int cpu = team->cpus.empty() ? -1 : team->cpus[(id - 1) % team->cpus.size()];
        on_cpu(cpu, [&] { team->job(id, n); });
      }
      team->finished.fetch_add(1, std::memory_order_acq_rel);
    });
  }
  const auto deadline = std::chrono::steady_clock::now() + recruit_timeout(work);
  while (team->arrived.load(std::memory_order_acquire) < helpers && std::chrono::steady_clock::now() < deadline)
    cpu_relax();
  int n, admitted;
  {
    std::lock_guard<std::mutex> lock(team->mu);
    team->open = false;
    admitted = team->joined;
    n = 1 + admitted;
  }
  if (n == 1) {  // none came: the kernel's own threads
    team->size.store(1, std::memory_order_release);
    std::mutex mu;
    std::unique_ptr<SpinBarrier> own_barrier;
    std::function<void(int, int)> job = [&](int p, int m) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (!own_barrier) own_barrier = std::make_unique<SpinBarrier>(m);
      }
      body(p, m, *own_barrier);
    };
    Pool::get().run(want, job);
    end_call(*team);
    return;
  }
  barrier = std::make_unique<SpinBarrier>(n);
  team->size.store(n, std::memory_order_release);
  on_cpu(team->cpus.empty() ? -1 : here, [&] { team->job(0, n); });  // the caller stays on its CPU too
  spin_until([&] { return team->finished.load(std::memory_order_acquire) == admitted; });  // also those sent home
  end_call(*team);
}

ffi::Error check(bool ok, const char* what) {
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument(std::string("jaxlstm kernel: ") + what);
}

// Sizes from xs ([T, B, D], or [B, T, D] when batch-major) and w_hh [H, G*H].
template <class Cell>
ffi::Error decode(const ffi::Buffer<ffi::F32>& xs, const ffi::Buffer<ffi::F32>& w_ih,
                  const ffi::Buffer<ffi::F32>& w_hh, int32_t batch_major, Dims& a) {
  auto d = xs.dimensions();
  auto dw = w_hh.dimensions();
  if (d.size() != 3 || dw.size() != 2 || dw[1] != Cell::G * dw[0])
    return check(false, "xs must be 3-D, w_hh [H, G*H] (G gates per unit)");
  a.T = d[batch_major ? 1 : 0];
  a.B = d[batch_major ? 0 : 1];
  a.D = d[2];
  a.H = dw[0];
  a.io = {a.T, a.B, batch_major != 0};
  if (w_ih.element_count() != static_cast<size_t>(a.D * Cell::G * a.H)) return check(false, "w_ih must be [D, G*H]");
  return ffi::Error::Success();
}

// The flags [T, B] and the states [B, H] a call reads.
ffi::Error check_flags(const Dims& a, const ffi::Buffer<ffi::U8>& valid, const ffi::Buffer<ffi::U8>& reset) {
  return check(valid.element_count() == static_cast<size_t>(a.T * a.B) && reset.element_count() == valid.element_count(),
               "flags must be [T, B]");
}

ffi::Error check_states(const Dims& a, std::initializer_list<const ffi::Buffer<ffi::F32>*> states) {
  for (auto* st : states)
    if (st->element_count() != static_cast<size_t>(a.B * a.H)) return check(false, "states must be [B, H]");
  return ffi::Error::Success();
}

// Runs the forward loop of a decoded call: saves for the backward pass where a.acts is set.
template <class Cell>
void forward(ffi::ThreadPool& pool, ForwardArgs& a) {
  const bool save = a.acts != nullptr;
  const size_t bh = static_cast<size_t>(a.B * a.H), tbh = static_cast<size_t>(a.T) * bh;
  prefer_huge_pages(a.ys, 4 * tbh);
  if (save) {
    prefer_huge_pages(a.acts, 4 * Cell::S * tbh);
    prefer_huge_pages(a.hin, 4 * tbh);
    if (Cell::kCell) prefer_huge_pages(a.cs, 4 * tbh);
  }
  std::vector<float> h_state(bh), c_state(Cell::kCell ? bh : 0), hbuf(save ? 0 : 2 * bh);
  const long step_work = a.B * Cell::G * a.H * (a.D + a.H);
  run_team(pool, thread_count(a.H, step_work), static_cast<double>(a.T) * step_work,
           [&](int p, int n, SpinBarrier& barrier) {
             forward_thread<Cell>(a, p, n, barrier, h_state.data(), c_state.data(), hbuf.data());
           });
}

// Runs the backward loop of a decoded call.
template <class Cell>
void backward(ffi::ThreadPool& pool, BackwardArgs& a) {
  prefer_huge_pages(a.dxs, 4 * static_cast<size_t>(a.T * a.B * a.D));
  // About 256 rows per chunk: the weight-gradient GEMMs run with K = 256.
  const long TC = std::max<long>(1, std::min<long>(a.T, 256 / std::max<long>(1, a.B)));
  const size_t bh = static_cast<size_t>(a.B * a.H), ring_size = static_cast<size_t>(2 * TC) * a.B * Cell::G * a.H;
  std::vector<float> dh(bh), dc(Cell::kCell ? bh : 0), ring_store, ring_x_store;
  float* ring = aligned_floats(ring_store, ring_size);
  float* ring_x = Cell::kSplit ? aligned_floats(ring_x_store, ring_size) : ring;
  const long step_work = a.B * 2 * Cell::G * a.H * (a.D + a.H);
  run_team(pool, thread_count(std::max(a.H, a.D), step_work), static_cast<double>(a.T) * step_work,
           [&](int p, int n, SpinBarrier& barrier) {
             backward_thread<Cell>(a, p, n, barrier, dh.data(), dc.data(), ring, ring_x, TC);
           });
}

ffi::Error LstmForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_ih,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> h0,
                           ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> hr, ffi::Buffer<ffi::F32> cr,
                           ffi::Buffer<ffi::U8> valid, ffi::Buffer<ffi::U8> reset, ffi::ResultBuffer<ffi::F32> ys,
                           ffi::ResultBuffer<ffi::F32> hT, ffi::ResultBuffer<ffi::F32> cT,
                           ffi::ResultBuffer<ffi::F32> acts, ffi::ResultBuffer<ffi::F32> cs,
                           ffi::ResultBuffer<ffi::F32> hin, int32_t batch_major) {
  ForwardArgs a{};
  if (auto e = decode<Lstm>(xs, w_ih, w_hh, batch_major, a); e.failure()) return e;
  if (bias.element_count() != static_cast<size_t>(4 * a.H)) return check(false, "b must be [4H]");
  if (auto e = check_states(a, {&h0, &c0, &hr, &cr}); e.failure()) return e;
  if (auto e = check_flags(a, valid, reset); e.failure()) return e;
  const bool save = acts->element_count() != 0;
  a.xs = xs.typed_data();
  a.w_ih = w_ih.typed_data();
  a.bias = bias.typed_data();
  a.w_hh = w_hh.typed_data();
  a.h0 = h0.typed_data();
  a.c0 = c0.typed_data();
  a.hr = hr.typed_data();
  a.cr = cr.typed_data();
  a.valid = valid.typed_data();
  a.reset = reset.typed_data();
  a.ys = ys->typed_data();
  a.hT = hT->typed_data();
  a.cT = cT->typed_data();
  a.acts = save ? acts->typed_data() : nullptr;
  a.cs = save ? cs->typed_data() : nullptr;
  a.hin = save ? hin->typed_data() : nullptr;
  forward<Lstm>(pool, a);
  return ffi::Error::Success();
}

ffi::Error LstmBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_ih,
                            ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> acts, ffi::Buffer<ffi::F32> cs,
                            ffi::Buffer<ffi::F32> h_in, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> cr,
                            ffi::Buffer<ffi::U8> valid, ffi::Buffer<ffi::U8> reset, ffi::Buffer<ffi::F32> dys,
                            ffi::Buffer<ffi::F32> dhT, ffi::Buffer<ffi::F32> dcT, ffi::ResultBuffer<ffi::F32> dxs,
                            ffi::ResultBuffer<ffi::F32> dw_ih, ffi::ResultBuffer<ffi::F32> dw_hh,
                            ffi::ResultBuffer<ffi::F32> db, ffi::ResultBuffer<ffi::F32> dh0,
                            ffi::ResultBuffer<ffi::F32> dc0, ffi::ResultBuffer<ffi::F32> dhr,
                            ffi::ResultBuffer<ffi::F32> dcr, int32_t batch_major) {
  BackwardArgs a{};
  if (auto e = decode<Lstm>(xs, w_ih, w_hh, batch_major, a); e.failure()) return e;
  const size_t tbh = static_cast<size_t>(a.T * a.B * a.H);
  if (acts.element_count() != 4 * tbh || cs.element_count() != tbh || h_in.element_count() != tbh ||
      dys.element_count() != tbh)
    return check(false, "acts must be [T, B, 4H], cs, h_in [T, B, H], dys like the outputs");
  if (auto e = check_states(a, {&c0, &cr, &dhT, &dcT}); e.failure()) return e;
  if (auto e = check_flags(a, valid, reset); e.failure()) return e;
  a.xs = xs.typed_data();
  a.w_ih = w_ih.typed_data();
  a.w_hh = w_hh.typed_data();
  a.acts = acts.typed_data();
  a.cs = cs.typed_data();
  a.h_in = h_in.typed_data();
  a.c0 = c0.typed_data();
  a.cr = cr.typed_data();
  a.valid = valid.typed_data();
  a.reset = reset.typed_data();
  a.dys = dys.typed_data();
  a.dhT = dhT.typed_data();
  a.dcT = dcT.typed_data();
  a.dxs = dxs->typed_data();
  a.dw_ih = dw_ih->typed_data();
  a.dw_hh = dw_hh->typed_data();
  a.db = db->typed_data();
  a.dh0 = dh0->typed_data();
  a.dc0 = dc0->typed_data();
  a.dhr = dhr->typed_data();
  a.dcr = dcr->typed_data();
  backward<Lstm>(pool, a);
  return ffi::Error::Success();
}

// The GRU (cell = 1) and the Elman RNN (cell = 2): one state h, no c.
constexpr int32_t kGru = 1, kElman = 2;

template <class Cell>
ffi::Error CellForward(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& xs, ffi::Buffer<ffi::F32>& w_ih,
                       ffi::Buffer<ffi::F32>& bias, ffi::Buffer<ffi::F32>& b_hn, ffi::Buffer<ffi::F32>& w_hh,
                       ffi::Buffer<ffi::F32>& h0, ffi::Buffer<ffi::F32>& hr, ffi::Buffer<ffi::U8>& valid,
                       ffi::Buffer<ffi::U8>& reset, ffi::ResultBuffer<ffi::F32>& ys, ffi::ResultBuffer<ffi::F32>& hT,
                       ffi::ResultBuffer<ffi::F32>& acts, ffi::ResultBuffer<ffi::F32>& hin, int32_t batch_major) {
  ForwardArgs a{};
  if (auto e = decode<Cell>(xs, w_ih, w_hh, batch_major, a); e.failure()) return e;
  if (bias.element_count() != static_cast<size_t>(Cell::G * a.H)) return check(false, "b must be [G*H]");
  if (b_hn.element_count() != (Cell::kSplit ? static_cast<size_t>(a.H) : 0)) return check(false, "b_hn must be [H]");
  if (auto e = check_states(a, {&h0, &hr}); e.failure()) return e;
  if (auto e = check_flags(a, valid, reset); e.failure()) return e;
  const bool save = acts->element_count() != 0;
  a.xs = xs.typed_data();
  a.w_ih = w_ih.typed_data();
  a.bias = bias.typed_data();
  a.b_hn = Cell::kSplit ? b_hn.typed_data() : nullptr;
  a.w_hh = w_hh.typed_data();
  a.h0 = h0.typed_data();
  a.hr = hr.typed_data();
  a.valid = valid.typed_data();
  a.reset = reset.typed_data();
  a.ys = ys->typed_data();
  a.hT = hT->typed_data();
  a.acts = save ? acts->typed_data() : nullptr;
  a.hin = save ? hin->typed_data() : nullptr;
  forward<Cell>(pool, a);
  return ffi::Error::Success();
}

ffi::Error CellForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_ih,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> b_hn, ffi::Buffer<ffi::F32> w_hh,
                           ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> hr, ffi::Buffer<ffi::U8> valid,
                           ffi::Buffer<ffi::U8> reset, ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> hT,
                           ffi::ResultBuffer<ffi::F32> acts, ffi::ResultBuffer<ffi::F32> hin, int32_t batch_major,
                           int32_t cell) {
  if (cell == kGru)
    return CellForward<Gru>(pool, xs, w_ih, bias, b_hn, w_hh, h0, hr, valid, reset, ys, hT, acts, hin, batch_major);
  if (cell == kElman)
    return CellForward<Elman>(pool, xs, w_ih, bias, b_hn, w_hh, h0, hr, valid, reset, ys, hT, acts, hin, batch_major);
  return check(false, "cell must be 1 (GRU) or 2 (Elman)");
}

template <class Cell>
ffi::Error CellBackward(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& xs, ffi::Buffer<ffi::F32>& w_ih,
                        ffi::Buffer<ffi::F32>& w_hh, ffi::Buffer<ffi::F32>& acts, ffi::Buffer<ffi::F32>& h_in,
                        ffi::Buffer<ffi::U8>& valid, ffi::Buffer<ffi::U8>& reset, ffi::Buffer<ffi::F32>& dys,
                        ffi::Buffer<ffi::F32>& dhT, ffi::ResultBuffer<ffi::F32>& dxs,
                        ffi::ResultBuffer<ffi::F32>& dw_ih, ffi::ResultBuffer<ffi::F32>& dw_hh,
                        ffi::ResultBuffer<ffi::F32>& db, ffi::ResultBuffer<ffi::F32>& db_hn,
                        ffi::ResultBuffer<ffi::F32>& dh0, ffi::ResultBuffer<ffi::F32>& dhr, int32_t batch_major) {
  BackwardArgs a{};
  if (auto e = decode<Cell>(xs, w_ih, w_hh, batch_major, a); e.failure()) return e;
  const size_t tbh = static_cast<size_t>(a.T * a.B * a.H);
  if (acts.element_count() != Cell::S * tbh || h_in.element_count() != tbh || dys.element_count() != tbh)
    return check(false, "acts must be [T, B, S*H], h_in [T, B, H], dys like the outputs");
  if (db_hn->element_count() != (Cell::kSplit ? static_cast<size_t>(a.H) : 0))
    return check(false, "d b_hn must be [H]");
  if (auto e = check_states(a, {&dhT}); e.failure()) return e;
  if (auto e = check_flags(a, valid, reset); e.failure()) return e;
  a.xs = xs.typed_data();
  a.w_ih = w_ih.typed_data();
  a.w_hh = w_hh.typed_data();
  a.acts = acts.typed_data();
  a.h_in = h_in.typed_data();
  a.valid = valid.typed_data();
  a.reset = reset.typed_data();
  a.dys = dys.typed_data();
  a.dhT = dhT.typed_data();
  a.dxs = dxs->typed_data();
  a.dw_ih = dw_ih->typed_data();
  a.dw_hh = dw_hh->typed_data();
  a.db = db->typed_data();
  a.db_hn = Cell::kSplit ? db_hn->typed_data() : nullptr;
  a.dh0 = dh0->typed_data();
  a.dhr = dhr->typed_data();
  backward<Cell>(pool, a);
  return ffi::Error::Success();
}

ffi::Error CellBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_ih,
                            ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> acts, ffi::Buffer<ffi::F32> h_in,
                            ffi::Buffer<ffi::U8> valid, ffi::Buffer<ffi::U8> reset, ffi::Buffer<ffi::F32> dys,
                            ffi::Buffer<ffi::F32> dhT, ffi::ResultBuffer<ffi::F32> dxs,
                            ffi::ResultBuffer<ffi::F32> dw_ih, ffi::ResultBuffer<ffi::F32> dw_hh,
                            ffi::ResultBuffer<ffi::F32> db, ffi::ResultBuffer<ffi::F32> db_hn,
                            ffi::ResultBuffer<ffi::F32> dh0, ffi::ResultBuffer<ffi::F32> dhr, int32_t batch_major,
                            int32_t cell) {
  if (cell == kGru)
    return CellBackward<Gru>(pool, xs, w_ih, w_hh, acts, h_in, valid, reset, dys, dhT, dxs, dw_ih, dw_hh, db, db_hn,
                             dh0, dhr, batch_major);
  if (cell == kElman)
    return CellBackward<Elman>(pool, xs, w_ih, w_hh, acts, h_in, valid, reset, dys, dhT, dxs, dw_ih, dw_hh, db,
                               db_hn, dh0, dhr, batch_major);
  return check(false, "cell must be 1 (GRU) or 2 (Elman)");
}

}  // namespace

// The handlers are the library's only exported symbols.
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlstmLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()        // XLA's intra-op threads
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs [T, B, D] or [B, T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih [D, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b [4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh [H, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 [B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // reset h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // reset c
                                  .Arg<ffi::Buffer<ffi::U8>>()   // valid [T, B]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // reset [T, B]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ys, in the layout of xs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h(T)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c(T)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // acts [T, B, 4H] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // cs [T, B, H] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_in [T, B, H] or [0]
                                  .Attr<int32_t>("batch_major")  // xs, ys [B, T, .] rather than [T, B, .]
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlstmLstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()        // XLA's intra-op threads
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs [T, B, D] or [B, T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih [D, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh [H, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // acts [T, B, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cs [T, B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h_in [T, B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0 [B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // reset c
                                  .Arg<ffi::Buffer<ffi::U8>>()   // valid [T, B]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // reset [T, B]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dys, in the layout of xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dh(T)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dc(T)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dxs, in the layout of xs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW_ih [D, 4H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW_hh [H, 4H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db [4H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dc0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d reset h
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d reset c
                                  .Attr<int32_t>("batch_major")  // xs, dys, dxs [B, T, .]
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlstmCellForward, CellForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()        // XLA's intra-op threads
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs [T, B, D] or [B, T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih [D, G*H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b [G*H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_hn [H] (GRU) or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh [H, G*H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 [B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // reset h
                                  .Arg<ffi::Buffer<ffi::U8>>()   // valid [T, B]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // reset [T, B]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ys, in the layout of xs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h(T)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // acts [T, B, S*H] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_in [T, B, H] or [0]
                                  .Attr<int32_t>("batch_major")  // xs, ys [B, T, .] rather than [T, B, .]
                                  .Attr<int32_t>("cell")         // 1: GRU (G = 3, S = 4), 2: Elman (G = S = 1)
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlstmCellBackward, CellBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()        // XLA's intra-op threads
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs [T, B, D] or [B, T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih [D, G*H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh [H, G*H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // acts [T, B, S*H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h_in [T, B, H]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // valid [T, B]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // reset [T, B]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dys, in the layout of xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dh(T)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dxs, in the layout of xs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW_ih [D, G*H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW_hh [H, G*H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db [G*H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d b_hn [H] (GRU) or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d reset h
                                  .Attr<int32_t>("batch_major")  // xs, dys, dxs [B, T, .]
                                  .Attr<int32_t>("cell")         // as the forward's
);

#pragma GCC visibility pop
