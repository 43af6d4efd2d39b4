// The cells: what the two loops (loops.h) need to know of the LSTM, the GRU and the Elman RNN.
#pragma once

#include <initializer_list>
#include <type_traits>

#include "simd.h"

namespace jaxlstm {

// Each cell type names:
//   G         gates per hidden unit (columns of W_ih, W_hh and b per unit);
//   S         floats saved per unit and step for the backward pass (acts [T, B, S*H]);
//   kHasC     a cell state c besides h (the LSTM);
//   kSplit    h·W_hh is kept apart from x·W_ih + b (the GRU: r multiplies h·W_hn + b_hn),
//             so that the gate cotangents of the two products differ (the n block);
//   kId       its number in the FFI calls' `cell` attribute (jaxlstm/_kernel.py).

struct Lstm {  // i, f, g, o; saves i, f, g, o (and c, apart)
  static constexpr int G = 4, S = 4, kId = 0;
  static constexpr bool kHasC = true, kSplit = false;
};
struct Gru {  // r, z, n (PyTorch's order); saves r, z, n, hn = h·W_hn + b_hn
  static constexpr int G = 3, S = 4, kId = 1;
  static constexpr bool kHasC = false, kSplit = true;
};
struct Elman {  // h(t) = tanh(x·W_ih + b + h(t-1)·W_hh); saves h(t)
  static constexpr int G = 1, S = 1, kId = 2;
  static constexpr bool kHasC = false, kSplit = false;
};

template <class A, class B>
constexpr bool same = std::is_same_v<A, B>;

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

// What the backward step of a cell reads for the units u ... u+m of one sequence at one
// step: the saved activations (act, stride H), the cotangent of h(t) (dh_tot: from the
// output and from step t+1), and the cell's own inputs.
struct GradIn {
  const float* act;
  long H;
  long u;
  int m;
  vf dh_tot;
  const float* c;     // the LSTM: c(t)
  const float* c_in;  // the LSTM: c(t-1) (or the reset state)
  float* dc;          // the LSTM: in dc(t) from step t+1, out its part of dc(t-1)
  const float* h_in;  // the GRU: h(t-1)
  float* direct;      // the GRU: out dh(t-1)'s part that skips W_hh, dh ∗ z
};

// The gate cotangents of one backward step: put(g, vx, vh) receives gate g's cotangent of
// x·W_ih + b (vx) and of h·W_hh (vh); they differ only in the GRU's n block.
template <class Cell, typename Put>
inline void cell_grad(const GradIn& in, Put&& put) {
  const long u = in.u;
  const int m = in.m;
  auto saved = [&](int k) { return load_n(in.act + k * in.H + u, m); };
  const vf dh_tot = in.dh_tot;
  if constexpr (same<Cell, Lstm>) {
    const vf i = saved(0), f = saved(1), g = saved(2), o = saved(3);
    const vf tc = vtanh(load_n(in.c + u, m));
    const vf dc_tot = load_n(in.dc + u, m) + dh_tot * o * (1.0f - tc * tc);
    const vf di = dc_tot * g * i * (1.0f - i), df = dc_tot * load_n(in.c_in + u, m) * f * (1.0f - f);
    const vf dg = dc_tot * i * (1.0f - g * g), dout = dh_tot * tc * o * (1.0f - o);
    put(0, di, di);
    put(1, df, df);
    put(2, dg, dg);
    put(3, dout, dout);
    store_n(in.dc + u, dc_tot * f, m);
  } else if constexpr (same<Cell, Gru>) {
    const vf r = saved(0), z = saved(1), nn = saved(2), hn = saved(3);
    const vf h_prev = load_n(in.h_in + u, m);
    const vf dn = dh_tot * (1.0f - z) * (1.0f - nn * nn);
    const vf dr = dn * hn * r * (1.0f - r), dz = dh_tot * (h_prev - nn) * z * (1.0f - z);
    put(0, dr, dr);
    put(1, dz, dz);
    put(2, dn, dn * r);
    store_n(in.direct + u, dh_tot * z, m);
  } else {
    const vf hn = saved(0), dpre = dh_tot * (1.0f - hn * hn);
    put(0, dpre, dpre);
  }
}

}  // namespace jaxlstm
