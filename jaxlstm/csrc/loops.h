// The two loops over time, written once over the cell (cells.h): forward (with or without
// saving for the backward pass) and backward (the reverse recurrence and every gradient).
//
// Forward, float32, gate order as the cell's (the LSTM's i, f, g, o), inputs and outputs
// time-major [T, B, .] or batch-major [B, T, .] (the saved activations are time-major):
//   z(t) = x(t) · W_ih + h_in(t) · W_hh + b, and the cell's update (cells.h).
// The input projection is computed per step inside the loop, on panels that stay in
// cache: a [T, B, G*H] projection computed before the loop is a buffer of fresh memory,
// whose first touch cost more than the projection's GEMM (measured: 21 ms for
// [8192, 128] · [128, 1024] at B=32, T=256, against 5 ms of arithmetic).
// Backward: the reverse recurrence of the cotangents (dh, and dc for the LSTM) and all
// the gradients: dx, dW_ih, dW_hh, db (the GRU's db_hn) and the initial and reset
// states' cotangents. The gate cotangents never leave the native code (a [T, B, G*H] buffer
// would cost its first touch again); the weight gradients are GEMMs over chunks of ~256 rows.
//
// Per-step flags: valid [T, B] (the step counts: inside the length and the mask) and
// reset [T, B] (a counted step starts from the reset state). A step that does not
// count leaves the state unchanged and outputs zeros, as in jaxlstm._engine.
//
// Parallelism (a team of threads per call, team.h). Where the weights are small enough for each
// thread to hold them all near it and there are sequences enough, the forward pass splits the
// batch: each thread runs the whole recurrence of its sequences, no barrier per step (run_forward,
// sequences()). Otherwise the hidden units are split into one contiguous range per thread; each
// thread owns the G gate columns of its units (packed once per call into panels that stay in its
// core's cache), computes their gates with the register-blocked GEMM (gemm.h), and applies the
// pointwise update to its own units. One spin barrier per step publishes the new h to all
// threads. The backward pass splits by units: each thread forms the gate cotangents of its
// units, a barrier, then dh(t-1) for its units from all of them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bf16.h"
#include "cells.h"
#include "gemm.h"
#include "simd.h"
#include "team.h"

namespace jaxlstm {

// The units [lo, hi) of thread p of n: contiguous ranges, multiples of VW where H allows.
struct Split {
  long lo, hi;
  long n() const { return hi - lo; }
  long padded() const { return (n() + NC - 1) / NC * NC; }  // columns per gate in the panel
};

inline Split split_units(long H, int p, int n) {
  const long per = ((H + n - 1) / n + VW - 1) / VW * VW;
  const long lo = std::min(H, p * per);
  return {lo, std::min(H, lo + per)};
}

// Where step t of sequence b lies in a [T, B, F] (time-major) or [B, T, F] array, in rows. ldb: the
// rows of one time step of a time-major array, B but where a call's B sequences are a slice of more
// (the forward pass split by sequences: the arrays' pointers start at the slice's first sequence).
struct Layout {
  long T, B;
  bool batch_major;
  long ldb;
  long row(long t, long b) const { return batch_major ? b * T + t : t * ldb + b; }
  long batch_stride() const { return batch_major ? T : 1; }  // rows from (t, b) to (t, b + 1)
};

// The sizes of a call, and the layout of its sequences (xs, ys, dys, dxs).
struct Dims {
  long T, B, D, H;
  Layout io;
};

struct ForwardArgs : Dims {
  const float *xs, *w_ih, *bias, *b_hn, *w_hh, *h0, *c0, *hr, *cr;  // b_hn: the GRU's; c0, cr: the LSTM's
  const uint8_t *valid, *reset;
  float *ys, *hT, *cT;
  // bfloat16 inputs and outputs (a call on bf16 xs; xs and ys null): read and written as they
  // lie, without a float32 copy of the sequence on either side (bf16.h: from_bf16, store_bf16)
  const uint16_t* xs16;
  uint16_t* ys16;
  float *acts, *cs, *hin;  // saved for the backward pass, or nullptr (cs: the LSTM's)
};

// The row stride of h(t-1) for forward_thread's float32 GEMMs: lead(H) (gemm.h) over a sequence; a
// one-step call (T = 1) reads it rows H apart.
inline long forward_h_lead(bool bf16, long T, long H) { return !bf16 && T > 1 ? lead(H) : H; }
// The row stride of the paired h(t-1) for the bf16 GEMMs (hpairs), in pairs.
inline long forward_hpairs_lead(long H) { return lead(pairs(H)); }

// hbuf: h(t-1) for the float32 GEMMs where it is not read where it is saved, shared by the team: two
// buffers [B, forward_h_lead], step t's at t & 1 (a thread writes step t+1's while another may still
// read step t's). hpairs: with Bf16 (bf16.h), h(t-1) rounded and paired for the recurrent GEMM, two
// buffers [B, pairs(H)] likewise, rows lead(pairs(H)) apart.
template <class Cell, bool Bf16>
void forward_thread(const ForwardArgs& a, int p, int n, SpinBarrier& barrier, float* h_state, float* c_state,
                    float* hbuf, pair16* hpairs) {
  constexpr int G = Cell::G, S = Cell::S;
  const long T = a.T, B = a.B, H = a.H, GH = G * H, D2 = pairs(a.D), H2 = pairs(H);
  const long LD2 = lead(D2), LH2 = forward_hpairs_lead(H);  // the paired rows' strides: x(t), h(t-1)
  const Split s = split_units(H, p, n);
  const long nu = s.n(), np = s.padded(), cols = G * np;
  // Panels of W_ih's and W_hh's columns for this thread's units, gate-blocked: column
  // g*np + u is gate g of unit lo + u (zero for the padding units); paired with Bf16.
  std::vector<float> wx_store, wh_store, zx_store, zh_store, bias_store;
  std::vector<pair16> wxp_store, whp_store, xp_store;
  float* wx = nullptr;
  float* wh = nullptr;
  pair16 *wxp = nullptr, *whp = nullptr, *xp = nullptr;  // Bf16: the panels, and x(t) paired
  // One step (a streaming call): the GEMMs read the weights in place (gemm_unpacked), no panels. With
  // Bf16 they round each weight as they read it, x(t) and h(t-1) rounded first: the contract's
  // products, summed by float32 FMAs. (Packing 0.4 M weights into pairs for one step made a bf16 step
  // at B=1, D=128, H=256 take 125 µs, float32's 54, on the Zen 4.)
  const bool stream = T == 1;
  float* zx = aligned_floats(zx_store, static_cast<size_t>(B) * cols);
  // For the float32 GEMMs, x(t) [B, D], rows ldx apart (gemm.h: lead): bf16 inputs widened, with Bf16
  // (a step) rounded, float32 read in place unless more rows than the L1 cache has ways (8) lie a
  // multiple of 4 KiB apart (gemm.h: aliased; a batch-major x(t)'s are T·D apart: B=32, D=128, T=256,
  // the forward pass 1.13x faster copied, on the Zen 4); and with Bf16 (a step) h(t-1) [B, H] rounded.
  std::vector<float> xf_store, hf_store;
  const bool f32_gemms = !Bf16 || stream;
  const long ldx = lead(a.D);
  const bool x_aliased = !stream && B > 8 && aliased(a.io.batch_stride() * a.D);
  float* xf = f32_gemms && (a.xs16 || Bf16 || x_aliased) ? aligned_floats(xf_store, static_cast<size_t>(B) * ldx)
                                                         : nullptr;
  float* hf = Bf16 && stream ? aligned_floats(hf_store, static_cast<size_t>(B) * H) : nullptr;
  float* zh = Cell::kSplit ? aligned_floats(zh_store, static_cast<size_t>(B) * cols) : zx;
  float* bias = aligned_floats(bias_store, cols);
  if (Bf16 && !stream) {
    wxp = aligned_pairs(wxp_store, static_cast<size_t>(D2) * cols);
    whp = aligned_pairs(whp_store, static_cast<size_t>(H2) * cols);
    xp = aligned_pairs(xp_store, static_cast<size_t>(B) * LD2);
    pack_gate_pairs(wxp, a.w_ih, a.D, GH, G, H, s.lo, nu, np);
    pack_gate_pairs(whp, a.w_hh, H, GH, G, H, s.lo, nu, np);
  } else if (!stream) {
    wx = aligned_floats(wx_store, static_cast<size_t>(a.D) * cols);
    wh = aligned_floats(wh_store, static_cast<size_t>(H) * cols);
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
  }
  for (long g = 0; g < G; ++g) std::memcpy(bias + g * np, a.bias + g * H + s.lo, 4 * nu);
  const float* b_hn = a.b_hn ? a.b_hn + s.lo : nullptr;
  // [T, B, .] arrays (the step flags, the saved activations): ldb rows a step (a slice of sequences)
  const long LB = a.io.ldb;
  // h(t-1) for the float32 GEMMs: where it is saved for the backward pass (a.hin, rows H apart), read
  // there, unless its rows want another stride (forward_h_lead); else hbuf, two buffers [B, ldh], step
  // t's at t & 1. The bf16 GEMMs read it paired (hpairs).
  const long ldh = forward_h_lead(Bf16, T, H);
  const bool h_in_place = a.hin && ldh == H;
  auto h_gemm = [&](long t) -> float* { return h_in_place ? a.hin + t * LB * H : hbuf + (t & 1) * B * ldh; };
  // The state entering step t for this thread's units (a reset replaces it).
  auto enter = [&](long t) {
    for (long b = 0; b < B; ++b) {
      const long i = b * H + s.lo;
      if (a.reset[t * LB + b] != 0) {
        std::memcpy(h_state + i, a.hr + i, 4 * nu);
        if constexpr (Cell::kHasC) std::memcpy(c_state + i, a.cr + i, 4 * nu);
      }
      if (f32_gemms && !h_in_place) std::memcpy(h_gemm(t) + b * ldh + s.lo, h_state + i, 4 * nu);
      if (a.hin) std::memcpy(a.hin + t * LB * H + i, h_state + i, 4 * nu);
      // s.lo is even (a multiple of VW): the thread owns whole pairs
      if (Bf16 && !f32_gemms) to_pairs(h_state + i, hpairs + ((t & 1) * B + b) * LH2 + s.lo / 2, nu);
    }
  };
  if (nu > 0) {
    for (long b = 0; b < B; ++b)
      for (long u = s.lo; u < s.hi; ++u) {
        h_state[b * H + u] = a.h0[b * H + u];
        if constexpr (Cell::kHasC) c_state[b * H + u] = a.c0[b * H + u];
      }
    if (T > 0) enter(0);
  }
  barrier.wait();
  for (long t = 0; t < T; ++t) {
    if (nu > 0) {
      if (f32_gemms)
        for (long b = 0; b < B; ++b) std::memcpy(zx + b * cols, bias, 4 * cols);
      if constexpr (Bf16) {
        if (!f32_gemms) {
          // x(t) paired, its rows side by side: bf16 inputs are pairs as they lie (the low half the
          // even k; odd D: the zero after the last k stays from xp's start). Read in place, the rows
          // of a batch-major x(t) lie T·D apart, in one set of the L1 cache (B=8, D=64, H=128, T=256 on
          // the Zen 4: 4.2 ms a call, against 2.2 copied).
          for (long b = 0; b < B; ++b) {
            const long r = a.io.row(t, b) * a.D;
            if (a.xs16) std::memcpy(xp + b * LD2, a.xs16 + r, 2 * a.D);
            else to_pairs(a.xs + r, xp + b * LD2, a.D);
          }
          // z = b + x(t)·W_ih + h(t-1)·W_hh in one pass (the GRU: zx = b + x(t)·W_ih, zh = h(t-1)·W_hh)
          const PairOperand xo{xp, LD2, wxp, D2}, ho{hpairs + (t & 1) * B * LH2, LH2, whp, H2};
          gemm2_bf16(xo, Cell::kSplit ? PairOperand{} : ho, B, cols, bias, zx, cols);
          if constexpr (Cell::kSplit) gemm_bf16(ho.A, ho.rs, B, ho.panels, ho.K2, cols, zh, cols, false);
        }
      }
      if (f32_gemms) {
        const float* x = a.xs + a.io.row(t, 0) * a.D;
        long rs = a.io.batch_stride() * a.D;
        if (xf) {
          for (long b = 0; b < B; ++b) {
            const long r = a.io.row(t, b) * a.D;
            if (a.xs16) from_bf16(a.xs16 + r, xf + b * ldx, a.D);  // bf16 already: rounding keeps it
            else if (Bf16) round_floats(a.xs + r, xf + b * ldx, a.D);
            else std::memcpy(xf + b * ldx, a.xs + r, 4 * a.D);
          }
          x = xf, rs = ldx;
        }
        if (stream) {
          const float* h = h_gemm(t);  // rows H apart (a step: ldh = H)
          if (hf) round_floats(h, hf, B * H), h = hf;
          if constexpr (Cell::kSplit) std::memset(zh, 0, sizeof(float) * B * cols);
          gemm_unpacked<Bf16>(x, rs, B, a.w_ih + s.lo, GH, a.D, G, H, nu, zx, cols, np);
          gemm_unpacked<Bf16>(h, H, B, a.w_hh + s.lo, GH, H, G, H, nu, zh, cols, np);
        } else {
          gemm(x, rs, 1, B, wx, a.D, cols, zx, cols, true);
          gemm(h_gemm(t), ldh, 1, B, wh, H, cols, zh, cols, !Cell::kSplit);
        }
      }
      for (long b = 0; b < B; ++b) {
        const bool valid = a.valid[t * LB + b] != 0;
        const long y = a.io.row(t, b) * H + s.lo;
        auto put_y = [&](long u, vf v, int m) {
          if (a.ys16) store_bf16(a.ys16 + y + u, v, m);
          else store_n(a.ys + y + u, v, m);
        };
        float* hs = h_state + b * H + s.lo;
        float* cst = Cell::kHasC ? c_state + b * H + s.lo : nullptr;
        float* act = a.acts ? a.acts + (t * LB + b) * S * H + s.lo : nullptr;
        for (long u = 0; u < nu; u += VW) {
          const int m = static_cast<int>(std::min<long>(VW, nu - u));
          if (!valid) {
            put_y(u, vf{}, m);
            if (act)
              for (int k = 0; k < S; ++k) store_n(act + k * H + u, vf{}, m);
            continue;
          }
          const vf h = cell_step<Cell>(zx + b * cols, zh + b * cols, np, u, m, b_hn, hs, cst, act, H);
          store_n(hs + u, h, m);
          put_y(u, h, m);
        }
        if (Cell::kHasC && a.cs) std::memcpy(a.cs + (t * LB + b) * H + s.lo, cst, 4 * nu);
      }
      if (t + 1 < T) enter(t + 1);
    }
    barrier.wait();
  }
  if (nu > 0)
    for (long b = 0; b < B; ++b) {
      std::memcpy(a.hT + b * H + s.lo, h_state + b * H + s.lo, 4 * nu);
      if constexpr (Cell::kHasC) std::memcpy(a.cT + b * H + s.lo, c_state + b * H + s.lo, 4 * nu);
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
// With Bf16 (bf16.h) every GEMM takes paired bf16 operands: the rings hold the gate
// cotangents rounded ([2 TC B, pairs(GH)], rows lead(pairs(GH)) apart: ringp, ringp_x), the
// weights and each chunk's operands are rounded and paired once.
template <class Cell, bool Bf16>
void backward_thread(const BackwardArgs& a, int p, int n, SpinBarrier& barrier, float* dh, float* dc, float* ring,
                     float* ring_x, pair16* ringp, pair16* ringp_x, long TC) {
  constexpr int G = Cell::G, S = Cell::S;
  const long T = a.T, B = a.B, D = a.D, H = a.H, GH = G * H, GH2 = pairs(GH), TB2 = pairs(TC * B);
  const long LR = lead(GH), LR2 = lead(GH2);  // the rings' row strides (gemm.h: lead), floats and pairs
  const long LT = lead(TC * B), LT2 = lead(TB2);  // and those of a chunk's h_in and x, transposed
  const Split s = split_units(H, p, n), sd = split_units(D, p, n);
  const long nu = s.n(), np = s.padded(), cols = G * np, nd = sd.n(), ndp = sd.padded();
  // A thread's own buffers, each a std::vector that aligned_floats fills and aligns.
  struct {
    std::vector<float> whT, wiT, rec, direct, ph, px, gwh, gwi, gb, gbh, dxc, hT, xT;
  } own;
  struct {
    std::vector<pair16> whT, wiT, ph, px, hT, xT;
  } own_p;
  // W_hh's rows of this thread's units, transposed into panels [GH, np]: dh(t-1) = dgh · W_hhᵀ;
  // W_ih's rows of its input features, [GH, ndp]: dx = dgx · W_ihᵀ.
  float *whT = nullptr, *wiT = nullptr;
  pair16 *whTp = nullptr, *wiTp = nullptr, *php = nullptr, *pxp = nullptr, *hTp = nullptr, *xTp = nullptr;
  if constexpr (Bf16) {
    whTp = aligned_pairs(own_p.whT, static_cast<size_t>(GH2) * np);
    wiTp = aligned_pairs(own_p.wiT, static_cast<size_t>(GH2) * ndp);
    pack_row_pairs(whTp, a.w_hh + s.lo * GH, GH, GH, nu, np);
    pack_row_pairs(wiTp, a.w_ih + sd.lo * GH, GH, GH, nd, ndp);
    php = aligned_pairs(own_p.ph, static_cast<size_t>(TB2) * cols);
    pxp = Cell::kSplit ? aligned_pairs(own_p.px, static_cast<size_t>(TB2) * cols) : php;
    hTp = aligned_pairs(own_p.hT, static_cast<size_t>(LT2) * H);
    xTp = aligned_pairs(own_p.xT, static_cast<size_t>(LT2) * D);
  } else {
    whT = aligned_floats(own.whT, static_cast<size_t>(GH) * np);
    wiT = aligned_floats(own.wiT, static_cast<size_t>(GH) * ndp);
    for (long u = 0; u < nu; ++u)
      for (long k = 0; k < GH; ++k) whT[(u / NC) * GH * NC + k * NC + u % NC] = a.w_hh[(s.lo + u) * GH + k];
    for (long d = 0; d < nd; ++d)
      for (long k = 0; k < GH; ++k) wiT[(d / NC) * GH * NC + k * NC + d % NC] = a.w_ih[(sd.lo + d) * GH + k];
  }
  const size_t chunk_cols = static_cast<size_t>(TC) * B * cols;
  float* rec = aligned_floats(own.rec, static_cast<size_t>(B) * np);  // dh(t-1) of its units through W_hh
  float* direct = aligned_floats(own.direct, Cell::kSplit ? static_cast<size_t>(B) * np : 0);  // the GRU's dh ∗ z
  float* ph = aligned_floats(own.ph, chunk_cols);                             // its dgh columns, as panels
  float* px = Cell::kSplit ? aligned_floats(own.px, chunk_cols) : ph;         // its dgx columns
  float* gwh = aligned_floats(own.gwh, static_cast<size_t>(H) * cols);        // dW_hh of its columns
  float* gwi = aligned_floats(own.gwi, static_cast<size_t>(D) * cols);        // dW_ih of its columns
  float* gb = aligned_floats(own.gb, cols);                                   // db of its columns
  float* gbh = aligned_floats(own.gbh, cols);                                 // Σ dgh (the GRU's db_hn)
  float* dxc = aligned_floats(own.dxc, static_cast<size_t>(TC) * B * ndp);    // dx of its features, a chunk
  float* hT = aligned_floats(own.hT, Bf16 ? 0 : static_cast<size_t>(LT) * H);  // a chunk of h_in, transposed
  float* xT = aligned_floats(own.xT, Bf16 ? 0 : static_cast<size_t>(LT) * D);  // and of x
  for (long b = 0; b < B; ++b)
    for (long u = s.lo; u < s.hi; ++u) {
      const long i = b * H + u;
      dh[i] = a.dhT[i];
      a.dhr[i] = 0.0f;
      if constexpr (Cell::kHasC) {
        dc[i] = a.dcT[i];
        a.dcr[i] = 0.0f;
      }
    }
  // The chunk of t: steps [t0, t0 + TC); its rows k = (t - t0) * B + b.
  for (long t = T - 1; t >= 0; --t) {
    const long t0 = t / TC * TC, rows = std::min(TC, T - t0) * B;
    const long chunk_row = ((t / TC) & 1) * TC * B, chunk = chunk_row * LR;
    float* dgh_t = ring + chunk + (t - t0) * B * LR;
    float* dgx_t = ring_x + chunk + (t - t0) * B * LR;
    // Bf16: the step's rows of the paired rings, as bf16 (a gate block may start mid-pair)
    auto* dgh_p = reinterpret_cast<uint16_t*>(ringp + (chunk_row + (t - t0) * B) * LR2);
    auto* dgx_p = reinterpret_cast<uint16_t*>(ringp_x + (chunk_row + (t - t0) * B) * LR2);
    for (long b = 0; b < B && nu > 0; ++b) {
      const long row = t * B + b, k = (t - t0) * B + b;
      // The cotangents of gate g, units u...u+m: vx of x·W_ih + b, vh of h·W_hh.
      auto put = [&](long g, long u, vf vx, vf vh, int m) {
        const long c = g * np + u;  // VW divides NC: a vector never straddles two panels
        const long at = k * NC + (c / NC) * TC * B * NC + c % NC;
        if constexpr (Bf16) {
          store_bf16(dgh_p + b * 2 * LR2 + g * H + s.lo + u, vh, m);
          if constexpr (Cell::kSplit) store_bf16(dgx_p + b * 2 * LR2 + g * H + s.lo + u, vx, m);
        } else {
          store_n(dgh_t + b * LR + g * H + s.lo + u, vh, m);
          if constexpr (Cell::kSplit) store_n(dgx_t + b * LR + g * H + s.lo + u, vx, m);
        }
        store_n(ph + at, vh, m);
        store_n(gb + c, load_n(gb + c, m) + vx, m);
        if constexpr (Cell::kSplit) {
          store_n(px + at, vx, m);
          store_n(gbh + c, load_n(gbh + c, m) + vh, m);
        }
      };
      if (!a.valid[row]) {
        for (long g = 0; g < G; ++g)
          for (long u = 0; u < nu; u += VW) put(g, u, vf{}, vf{}, static_cast<int>(std::min<long>(VW, nu - u)));
        continue;
      }
      GradIn in{};
      in.act = a.acts + row * S * H + s.lo;
      in.H = H;
      if constexpr (Cell::kHasC) {
        in.c = a.cs + row * H + s.lo;
        in.c_in = (a.reset[row] ? a.cr + b * H : (t > 0 ? a.cs + (row - B) * H : a.c0 + b * H)) + s.lo;
        in.dc = dc + b * H + s.lo;  // routed below, with dh
      }
      if constexpr (Cell::kSplit) {
        in.h_in = a.h_in + row * H + s.lo;
        in.direct = direct + b * np;
      }
      const float* dy = a.dys + a.io.row(t, b) * H + s.lo;
      const float* dhb = dh + b * H + s.lo;
      for (long u = 0; u < nu; u += VW) {
        in.u = u;
        in.m = static_cast<int>(std::min<long>(VW, nu - u));
        in.dh_tot = load_n(dy + u, in.m) + load_n(dhb + u, in.m);
        cell_grad<Cell>(in, [&](long g, vf vx, vf vh) { put(g, u, vx, vh, in.m); });
      }
    }
    barrier.wait();  // all of the step's gate cotangents are written
    if (nu > 0) {
      if constexpr (Bf16) {
        gemm_bf16(ringp + (chunk_row + (t - t0) * B) * LR2, LR2, B, whTp, GH2, np, rec, np, false);
      } else {
        gemm(dgh_t, LR, 1, B, whT, GH, np, rec, np, false);
      }
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
            if constexpr (Cell::kHasC) {
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
      auto h_row = [&](long k) { return a.h_in + (t0 * B + k) * H; };
      auto x_row = [&](long k) { return a.xs + a.io.row(t0 + k / B, k % B) * D; };
      if constexpr (Bf16) {
        const long R2 = pairs(rows);
        transpose_pairs(h_row, rows, H, hTp, LT2);
        transpose_pairs(x_row, rows, D, xTp, LT2);
        // The chunk's panels paired along its rows (a zero row after the last where rows is odd).
        auto pair_panels = [&](const float* from, pair16* to) {
          for (long j = 0; j < cols / NC; ++j)
            for (long k2 = 0; k2 < R2; ++k2) {
              const float* lo = from + j * TC * B * NC + 2 * k2 * NC;
              for (long c = 0; c < NC; ++c)
                to[j * R2 * NC + k2 * NC + c] = pair(lo[c], 2 * k2 + 1 < rows ? lo[NC + c] : 0.0f);
            }
        };
        pair_panels(ph, php);
        if constexpr (Cell::kSplit) pair_panels(px, pxp);
        for (long j = 0; j < cols / NC; ++j) {
          gemm_bf16(hTp, LT2, H, php + j * R2 * NC, R2, NC, gwh + j * NC, cols, true);
          gemm_bf16(xTp, LT2, D, pxp + j * R2 * NC, R2, NC, gwi + j * NC, cols, true);
        }
      } else {
        transpose(h_row, rows, H, hT, LT);
        transpose(x_row, rows, D, xT, LT);
        for (long j = 0; j < cols / NC; ++j) {
          gemm(hT, LT, 1, H, ph + j * TC * B * NC, rows, NC, gwh + j * NC, cols, true);
          gemm(xT, LT, 1, D, px + j * TC * B * NC, rows, NC, gwi + j * NC, cols, true);
        }
      }
    }
    if (nd > 0) {
      if constexpr (Bf16) {
        gemm_bf16(ringp_x + chunk_row * LR2, LR2, rows, wiTp, GH2, ndp, dxc, ndp, false);
      } else {
        gemm(ring_x + chunk, LR, 1, rows, wiT, GH, ndp, dxc, ndp, false);
      }
      for (long k = 0; k < rows; ++k)
        std::memcpy(a.dxs + a.io.row(t0 + k / B, k % B) * D + sd.lo, dxc + k * ndp, 4 * nd);
    }
  }
  for (long b = 0; b < B; ++b) {
    std::memcpy(a.dh0 + b * H + s.lo, dh + b * H + s.lo, 4 * nu);
    if constexpr (Cell::kHasC) std::memcpy(a.dc0 + b * H + s.lo, dc + b * H + s.lo, 4 * nu);
  }
  for (long g = 0; g < G && nu > 0; ++g) {
    for (long k = 0; k < H; ++k) std::memcpy(a.dw_hh + k * GH + g * H + s.lo, gwh + k * cols + g * np, 4 * nu);
    for (long k = 0; k < D; ++k) std::memcpy(a.dw_ih + k * GH + g * H + s.lo, gwi + k * cols + g * np, 4 * nu);
    std::memcpy(a.db + g * H + s.lo, gb + g * np, 4 * nu);
  }
  if (Cell::kSplit && nu > 0) std::memcpy(a.db_hn + s.lo, gbh + (G - 1) * np, 4 * nu);
}

// A forward call's sequences b0 .. b0 + rows: the same arrays from its first sequence on.
template <class Cell>
ForwardArgs sequences(const ForwardArgs& a, long b0, long rows) {
  ForwardArgs s = a;
  s.B = s.io.B = rows;
  const long x0 = a.io.row(0, b0);  // the slice's first row of xs and ys
  auto at = [](auto* p, long offset) { return p ? p + offset : p; };
  s.xs = at(a.xs, x0 * a.D), s.xs16 = at(a.xs16, x0 * a.D);
  s.ys = at(a.ys, x0 * a.H), s.ys16 = at(a.ys16, x0 * a.H);
  for (auto* p : {&s.h0, &s.c0, &s.hr, &s.cr}) *p = at(*p, b0 * a.H);
  s.hT = at(a.hT, b0 * a.H), s.cT = at(a.cT, b0 * a.H);
  s.valid = at(a.valid, b0), s.reset = at(a.reset, b0);
  s.acts = at(a.acts, b0 * Cell::S * a.H);
  s.cs = at(a.cs, b0 * a.H), s.hin = at(a.hin, b0 * a.H);
  return s;
}

// Runs the forward loop of a decoded call: saves for the backward pass where a.acts is set;
// Bf16: on paired bf16 operands (bf16.h).
template <class Cell, bool Bf16>
void run_forward(ffi::ThreadPool& pool, ForwardArgs& a) {
  const bool save = a.acts != nullptr;
  const size_t bh = static_cast<size_t>(a.B * a.H), tbh = static_cast<size_t>(a.T) * bh;
  if (a.ys16) prefer_huge_pages(a.ys16, 2 * tbh);
  else prefer_huge_pages(a.ys, 4 * tbh);
  if (save) {
    prefer_huge_pages(a.acts, 4 * Cell::S * tbh);
    prefer_huge_pages(a.hin, 4 * tbh);
    if (Cell::kHasC) prefer_huge_pages(a.cs, 4 * tbh);
  }
  // hbuf where the float32 GEMMs read h(t-1) other than where it is saved (forward_thread: h_in_place)
  const long ldh = forward_h_lead(Bf16, a.T, a.H);
  const bool hbuf_read = (!Bf16 || a.T == 1) && !(save && ldh == a.H);
  std::vector<float> h_state(bh), c_state(Cell::kHasC ? bh : 0);
  std::vector<float> hbuf(hbuf_read ? 2 * static_cast<size_t>(a.B * ldh) : 0);
  std::vector<pair16> hpairs_store;
  const long lh2 = forward_hpairs_lead(a.H);
  pair16* hpairs = Bf16 ? aligned_pairs(hpairs_store, static_cast<size_t>(2 * a.B) * lh2) : nullptr;
  const long step_work = a.B * Cell::G * a.H * (a.D + a.H);
  // A one-step call (streaming) is a few tens of µs in all: a second thread's hand-over costs what it
  // saves until the step is large. On the Zen 4, one thread against two (µs): B=1, H=256 LSTM 66 / 115-123,
  // GRU 52 / 85-111; B=16, H=256 LSTM 204-219 / 180-182 (two win there: 8.4M multiply-adds).
  constexpr long kStreamSplit = 16;
  const int team = thread_count(a.H, VW, a.T == 1 ? step_work / kStreamSplit : step_work);
  // Split by sequences where each thread can hold all the weights near it: each runs the whole
  // recurrence of its sequences, with no barrier per step and no h(t) crossing cores. Measured on the
  // Zen 4 (2 threads, by units / by sequences, interleaved, median ms): bf16 B=32, D=128, H=256, T=256
  // 19.8-20.1 / 18.6-18.8 (29-32 / 18.2-18.5 while the VM's other vCPU was held up: a barrier per step
  // waits for it); B=16, D=64, H=128, T=4096 bf16 53.7 / 44.3, f32 85.5 / 72.1; B=8, D=64, H=128 level;
  // f32 at B=32, H=256 (1.5 MiB of weights) level; B=64, D=512, H=1024 (12 MiB of bf16 weights) 5 % slower.
  constexpr long kMinRowsPerThread = 4, kSplitBySequencesBytes = 2L << 20;
  const long weight_bytes = Cell::G * a.H * (a.D + a.H) * (Bf16 ? 2 : 4);
  const int by_rows = static_cast<int>(std::min<long>(team, a.B / kMinRowsPerThread));
  if (a.T > 1 && by_rows > 1 && weight_bytes <= kSplitBySequencesBytes) {
    run_team(pool, by_rows, static_cast<double>(a.T) * step_work, [&](int p, int n, SpinBarrier&) {
      const long b0 = a.B * p / n, rows = a.B * (p + 1) / n - b0;
      ForwardArgs s = sequences<Cell>(a, b0, rows);
      SpinBarrier alone(1);
      forward_thread<Cell, Bf16>(s, 0, 1, alone, h_state.data() + b0 * a.H,
                                 Cell::kHasC ? c_state.data() + b0 * a.H : nullptr,
                                 hbuf_read ? hbuf.data() + 2 * b0 * ldh : nullptr,
                                 Bf16 ? hpairs + 2 * b0 * lh2 : nullptr);
    });
    return;
  }
  run_team(pool, team, static_cast<double>(a.T) * step_work, [&](int p, int n, SpinBarrier& barrier) {
    forward_thread<Cell, Bf16>(a, p, n, barrier, h_state.data(), c_state.data(), hbuf.data(), hpairs);
  });
}

// Runs the backward loop of a decoded call; Bf16: on paired bf16 operands.
template <class Cell, bool Bf16>
void run_backward(ffi::ThreadPool& pool, BackwardArgs& a) {
  prefer_huge_pages(a.dxs, 4 * static_cast<size_t>(a.T * a.B * a.D));
  // About 256 rows per chunk: the weight-gradient GEMMs run with K = 256.
  const long TC = std::max<long>(1, std::min<long>(a.T, 256 / std::max<long>(1, a.B)));
  const size_t bh = static_cast<size_t>(a.B * a.H), ring_size = static_cast<size_t>(2 * TC) * a.B * lead(Cell::G * a.H);
  std::vector<float> dh(bh), dc(Cell::kHasC ? bh : 0), ring_store, ring_x_store;
  std::vector<pair16> ringp_store, ringp_x_store;
  float* ring = aligned_floats(ring_store, Bf16 ? 0 : ring_size);
  float* ring_x = Cell::kSplit ? aligned_floats(ring_x_store, Bf16 ? 0 : ring_size) : ring;
  const size_t ringp_size = Bf16 ? static_cast<size_t>(2 * TC) * a.B * lead(pairs(Cell::G * a.H)) : 0;
  pair16* ringp = aligned_pairs(ringp_store, ringp_size);
  pair16* ringp_x = Cell::kSplit ? aligned_pairs(ringp_x_store, ringp_size) : ringp;
  const long step_work = a.B * 2 * Cell::G * a.H * (a.D + a.H);
  run_team(pool, thread_count(std::max(a.H, a.D), VW, step_work), static_cast<double>(a.T) * step_work,
           [&](int p, int n, SpinBarrier& barrier) {
             backward_thread<Cell, Bf16>(a, p, n, barrier, dh.data(), dc.data(), ring, ring_x, ringp, ringp_x, TC);
           });
}

// Calls f(std::bool_constant<Bf16>{}): a bf16 call runs on paired bf16 operands where this level
// has the instruction (bf16.h), elsewhere (and every float32 call) on the float32 GEMMs.
template <typename F>
void with_precision(bool bf16, F&& f) {
  if (JAXLSTM_BF16_DOT && bf16) {
    f(std::bool_constant<static_cast<bool>(JAXLSTM_BF16_DOT)>{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace jaxlstm
