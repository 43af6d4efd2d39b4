// jaxlstm's native CPU code: the LSTM, GRU and Elman recurrences as XLA FFI custom calls.
//
// jaxlstm.lstm, jaxlstm.gru and jaxlstm.rnn run these on CPU where they apply (see
// jaxlstm/_native.py); the pure-XLA path (jaxlstm/_fused.py) stays
// the portable path everywhere else and the reference they are tested against.
//
// The files, by job:
//   simd.h   vectors of the level's width, exp, sigmoid, tanh
//   gemm.h   the register-blocked GEMM tile and the buffers it works on
//   bf16.h   the same GEMM on bfloat16 operands (the avx512_bf16 level)
//   cells.h  the LSTM, GRU and Elman cells: a forward step and its gate cotangents
//   loops.h  the forward and backward loops over time, written once over the cell
//   team.h   the team of threads a call runs on, and its spin barrier
//   ffi.cc   (this file) decoding the calls; one handler pair serves every cell
//   cpu.cc   the CPU's ISA levels (compiled for the baseline: it runs before a level is chosen)
//
// setup.py compiles this file once per ISA level (JAXLSTM_ISA names it), each into a library
// of its own with that level's flags; jaxlstm/_kernel.py loads the best level the CPU supports.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "cells.h"
#include "loops.h"
#include "xla/ffi/api/ffi.h"

#ifndef JAXLSTM_ISA
#define JAXLSTM_ISA "unnamed"
#endif

namespace jaxlstm {
namespace {

using F32 = ffi::Buffer<ffi::F32>;
using Out = ffi::ResultBuffer<ffi::F32>;
using Any = ffi::AnyBuffer;  // the forward call's xs and ys: float32 or bfloat16
using AnyOut = ffi::Result<ffi::AnyBuffer>;
using Flags = ffi::Buffer<ffi::U8>;

ffi::Error invalid(const std::string& what) { return ffi::Error::InvalidArgument("jaxlstm kernel: " + what); }

// Sizes from xs ([T, B, D], or [B, T, D] when batch-major) and w_hh [H, G*H].
template <class Cell, class Xs>
ffi::Error decode(const Xs& xs, const F32& w_ih, const F32& w_hh, int32_t batch_major, Dims& a) {
  auto d = xs.dimensions();
  auto dw = w_hh.dimensions();
  if (d.size() != 3 || dw.size() != 2 || dw[1] != Cell::G * dw[0])
    return invalid("xs must be 3-D, w_hh [H, G*H] (G gates per unit)");
  a.T = d[batch_major ? 1 : 0];
  a.B = d[batch_major ? 0 : 1];
  a.D = d[2];
  a.H = dw[0];
  a.io = {a.T, a.B, batch_major != 0, a.B};
  if (w_ih.element_count() != static_cast<size_t>(a.D * Cell::G * a.H)) return invalid("w_ih must be [D, G*H]");
  return ffi::Error::Success();
}

// Every buffer a call reads or writes, against the element count the cell and the sizes
// ask for ("name" is what the error says): the cell's unused ones are [0].
struct Expect {
  std::string error;
  void operator()(size_t count, size_t want, const char* name) {
    if (error.empty() && count != want)
      error = std::string(name) + " has " + std::to_string(count) + " elements, expected " + std::to_string(want);
  }
};

template <class Cell>
ffi::Error Forward(ffi::ThreadPool& pool, Any& xs, F32& w_ih, F32& bias, F32& b_hn, F32& w_hh, F32& h0, F32& c0,
                   F32& hr, F32& cr, Flags& valid, Flags& reset, AnyOut& ys, Out& hT, Out& cT, Out& acts, Out& cs,
                   Out& hin, int32_t batch_major, int32_t bf16) {
  ForwardArgs a{};
  if (auto e = decode<Cell>(xs, w_ih, w_hh, batch_major, a); e.failure()) return e;
  const auto dtype = xs.element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16) return invalid("xs must be float32 or bfloat16");
  if (ys->element_type() != dtype) return invalid("ys must have the dtype of xs");
  const bool save = acts->element_count() != 0, io16 = dtype == ffi::DataType::BF16;
  const size_t bh = a.B * a.H, tbh = a.T * bh, c_bh = Cell::kHasC ? bh : 0;
  Expect expect;
  expect(bias.element_count(), Cell::G * a.H, "b");
  expect(b_hn.element_count(), Cell::kSplit ? a.H : 0, "b_hn");
  expect(h0.element_count(), bh, "h0");
  expect(hr.element_count(), bh, "reset h");
  expect(c0.element_count(), c_bh, "c0");
  expect(cr.element_count(), c_bh, "reset c");
  expect(valid.element_count(), a.T * a.B, "valid");
  expect(reset.element_count(), a.T * a.B, "reset");
  expect(ys->element_count(), tbh, "ys");
  expect(hT->element_count(), bh, "h(T)");
  expect(cT->element_count(), c_bh, "c(T)");
  expect(acts->element_count(), save ? Cell::S * tbh : 0, "acts");
  expect(cs->element_count(), save && Cell::kHasC ? tbh : 0, "cs");
  expect(hin->element_count(), save ? tbh : 0, "h_in");
  if (!expect.error.empty()) return invalid(expect.error);
  a.xs = io16 ? nullptr : static_cast<const float*>(xs.untyped_data());
  a.xs16 = io16 ? static_cast<const uint16_t*>(xs.untyped_data()) : nullptr;
  a.w_ih = w_ih.typed_data();
  a.bias = bias.typed_data();
  a.b_hn = Cell::kSplit ? b_hn.typed_data() : nullptr;
  a.w_hh = w_hh.typed_data();
  a.h0 = h0.typed_data();
  a.hr = hr.typed_data();
  a.c0 = Cell::kHasC ? c0.typed_data() : nullptr;
  a.cr = Cell::kHasC ? cr.typed_data() : nullptr;
  a.valid = valid.typed_data();
  a.reset = reset.typed_data();
  a.ys = io16 ? nullptr : static_cast<float*>(ys->untyped_data());
  a.ys16 = io16 ? static_cast<uint16_t*>(ys->untyped_data()) : nullptr;
  a.hT = hT->typed_data();
  a.cT = Cell::kHasC ? cT->typed_data() : nullptr;
  a.acts = save ? acts->typed_data() : nullptr;
  a.cs = save && Cell::kHasC ? cs->typed_data() : nullptr;
  a.hin = save ? hin->typed_data() : nullptr;
  with_precision(bf16 != 0, [&](auto b) { run_forward<Cell, decltype(b)::value>(pool, a); });
  return ffi::Error::Success();
}

template <class Cell>
ffi::Error Backward(ffi::ThreadPool& pool, F32& xs, F32& w_ih, F32& w_hh, F32& acts, F32& cs, F32& h_in, F32& c0,
                    F32& cr, Flags& valid, Flags& reset, F32& dys, F32& dhT, F32& dcT, Out& dxs, Out& dw_ih,
                    Out& dw_hh, Out& db, Out& db_hn, Out& dh0, Out& dc0, Out& dhr, Out& dcr, int32_t batch_major,
                    int32_t bf16) {
  BackwardArgs a{};
  if (auto e = decode<Cell>(xs, w_ih, w_hh, batch_major, a); e.failure()) return e;
  const size_t bh = a.B * a.H, tbh = a.T * bh, c_bh = Cell::kHasC ? bh : 0;
  Expect expect;
  expect(acts.element_count(), Cell::S * tbh, "acts");
  expect(cs.element_count(), Cell::kHasC ? tbh : 0, "cs");
  expect(h_in.element_count(), tbh, "h_in");
  expect(c0.element_count(), c_bh, "c0");
  expect(cr.element_count(), c_bh, "reset c");
  expect(valid.element_count(), a.T * a.B, "valid");
  expect(reset.element_count(), a.T * a.B, "reset");
  expect(dys.element_count(), tbh, "dys");
  expect(dhT.element_count(), bh, "dh(T)");
  expect(dcT.element_count(), c_bh, "dc(T)");
  expect(dxs->element_count(), xs.element_count(), "dxs");
  expect(dw_ih->element_count(), w_ih.element_count(), "dW_ih");
  expect(dw_hh->element_count(), w_hh.element_count(), "dW_hh");
  expect(db->element_count(), Cell::G * a.H, "db");
  expect(db_hn->element_count(), Cell::kSplit ? a.H : 0, "d b_hn");
  expect(dh0->element_count(), bh, "dh0");
  expect(dc0->element_count(), c_bh, "dc0");
  expect(dhr->element_count(), bh, "d reset h");
  expect(dcr->element_count(), c_bh, "d reset c");
  if (!expect.error.empty()) return invalid(expect.error);
  a.xs = xs.typed_data();
  a.w_ih = w_ih.typed_data();
  a.w_hh = w_hh.typed_data();
  a.acts = acts.typed_data();
  a.cs = Cell::kHasC ? cs.typed_data() : nullptr;
  a.h_in = h_in.typed_data();
  a.c0 = Cell::kHasC ? c0.typed_data() : nullptr;
  a.cr = Cell::kHasC ? cr.typed_data() : nullptr;
  a.valid = valid.typed_data();
  a.reset = reset.typed_data();
  a.dys = dys.typed_data();
  a.dhT = dhT.typed_data();
  a.dcT = Cell::kHasC ? dcT.typed_data() : nullptr;
  a.dxs = dxs->typed_data();
  a.dw_ih = dw_ih->typed_data();
  a.dw_hh = dw_hh->typed_data();
  a.db = db->typed_data();
  a.db_hn = Cell::kSplit ? db_hn->typed_data() : nullptr;
  a.dh0 = dh0->typed_data();
  a.dc0 = Cell::kHasC ? dc0->typed_data() : nullptr;
  a.dhr = dhr->typed_data();
  a.dcr = Cell::kHasC ? dcr->typed_data() : nullptr;
  with_precision(bf16 != 0, [&](auto b) { run_backward<Cell, decltype(b)::value>(pool, a); });
  return ffi::Error::Success();
}

// Calls f with the cell type that the `cell` attribute names.
template <typename F>
ffi::Error with_cell(int32_t cell, F&& f) {
  switch (cell) {
    case Lstm::kId:
      return f(Lstm{});
    case Gru::kId:
      return f(Gru{});
    case Elman::kId:
      return f(Elman{});
    default:
      return invalid("cell must be 0 (LSTM), 1 (GRU) or 2 (Elman), got " + std::to_string(cell));
  }
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, Any xs, F32 w_ih, F32 bias, F32 b_hn, F32 w_hh, F32 h0, F32 c0, F32 hr,
                       F32 cr, Flags valid, Flags reset, AnyOut ys, Out hT, Out cT, Out acts, Out cs, Out hin,
                       int32_t batch_major, int32_t cell, int32_t bf16) {
  return with_cell(cell, [&](auto c) {
    return Forward<decltype(c)>(pool, xs, w_ih, bias, b_hn, w_hh, h0, c0, hr, cr, valid, reset, ys, hT, cT, acts, cs,
                                hin, batch_major, bf16);
  });
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, F32 xs, F32 w_ih, F32 w_hh, F32 acts, F32 cs, F32 h_in, F32 c0, F32 cr,
                        Flags valid, Flags reset, F32 dys, F32 dhT, F32 dcT, Out dxs, Out dw_ih, Out dw_hh, Out db,
                        Out db_hn, Out dh0, Out dc0, Out dhr, Out dcr, int32_t batch_major, int32_t cell,
                        int32_t bf16) {
  return with_cell(cell, [&](auto c) {
    return Backward<decltype(c)>(pool, xs, w_ih, w_hh, acts, cs, h_in, c0, cr, valid, reset, dys, dhT, dcT, dxs,
                                 dw_ih, dw_hh, db, db_hn, dh0, dc0, dhr, dcr, batch_major, bf16);
  });
}

}  // namespace
}  // namespace jaxlstm

// The handlers, the level's name and the thread count are the library's only exported symbols.
#pragma GCC visibility push(default)

// cell: 0 LSTM (G = 4 gates, S = 4 saved floats per unit), 1 GRU (G = 3, S = 4), 2 Elman (G = S = 1).
// The LSTM alone has a cell state (c0, reset c, c(T), cs: [0] for the others); the GRU alone
// b_hn ([0] for the others).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlstmForward, jaxlstm::ForwardImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()        // XLA's intra-op threads
                                  .Arg<xla::ffi::AnyBuffer>()  // xs [T, B, D] or [B, T, D], f32 or bf16
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // w_ih [D, G*H]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // b [G*H]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // b_hn [H] (GRU) or [0]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // w_hh [H, G*H]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // h0 [B, H]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // c0 [B, H] (LSTM) or [0]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // reset h [B, H]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // reset c [B, H] (LSTM) or [0]
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()   // valid [T, B]
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()   // reset [T, B]
                                  .Ret<xla::ffi::AnyBuffer>()  // ys, in the layout and dtype of xs
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // h(T)
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // c(T) (LSTM) or [0]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // acts [T, B, S*H] or [0]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // cs [T, B, H] (LSTM, saving) or [0]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // h_in [T, B, H] or [0]
                                  .Attr<int32_t>("batch_major")  // xs, ys [B, T, .] rather than [T, B, .]
                                  .Attr<int32_t>("cell")
                                  .Attr<int32_t>("bf16"));  // bf16 GEMM operands (JaxlstmBf16Dot)

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlstmBackward, jaxlstm::BackwardImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()        // XLA's intra-op threads
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // xs [T, B, D] or [B, T, D]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // w_ih [D, G*H]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // w_hh [H, G*H]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // acts [T, B, S*H]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // cs [T, B, H] (LSTM) or [0]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // h_in [T, B, H]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // c0 [B, H] (LSTM) or [0]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // reset c (LSTM) or [0]
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()   // valid [T, B]
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()   // reset [T, B]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // dys, in the layout of xs
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // dh(T)
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // dc(T) (LSTM) or [0]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // dxs, in the layout of xs
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // dW_ih [D, G*H]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // dW_hh [H, G*H]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // db [G*H]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // d b_hn [H] (GRU) or [0]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // dh0
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // dc0 (LSTM) or [0]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // d reset h
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // d reset c (LSTM) or [0]
                                  .Attr<int32_t>("batch_major")  // xs, dys, dxs [B, T, .]
                                  .Attr<int32_t>("cell")
                                  .Attr<int32_t>("bf16"));

// The ISA level this library was compiled for (setup.py's JAXLSTM_ISA).
extern "C" const char* JaxlstmIsa() { return JAXLSTM_ISA; }

// 1 where a call with bf16=1 multiplies bf16 operands (VDPBF16PS); 0 where it runs on the
// float32 GEMMs of the same data.
extern "C" int JaxlstmBf16Dot() { return JAXLSTM_BF16_DOT; }

// The most threads a call's team may have: one per CPU this process may run on, or
// JAXLSTM_NATIVE_THREADS where it is set.
extern "C" int JaxlstmMaxThreads() {
  const int asked = jaxlstm::requested_threads();
  return asked > 0 ? asked : jaxlstm::cpu_count();
}

// The team size the last call asked for, and the CPUs other processes kept busy meanwhile
// (team.h: a busy machine gets a smaller team).
extern "C" int JaxlstmLastThreads() { return jaxlstm::last_threads().load(std::memory_order_relaxed); }
extern "C" double JaxlstmOthersBusyCpus() { return jaxlstm::others_busy_cpus(); }

// The rate (GFLOP/s) of this level's bf16 GEMM (bf16.h) on [n, n] · [n, n], its columns split
// over `threads` threads: the attainable bf16 matmul rate that the benchmarks' share of peak is
// taken of (XLA:CPU has no bf16 GEMM of its own to probe). Best of `repeats`; 0 where the level
// has no bf16 GEMM.
extern "C" double JaxlstmBf16GemmGflops(long n, int threads, int repeats) {
#if JAXLSTM_BF16_DOT
  using namespace jaxlstm;
  n = std::max<long>(NC, n / NC * NC);
  threads = std::max(1, std::min(threads, static_cast<int>(n / NC)));
  const long n2 = pairs(n);
  std::vector<pair16> a_store, p_store;
  std::vector<float> c_store;
  pair16* A = aligned_pairs(a_store, static_cast<size_t>(n) * n2);
  pair16* P = aligned_pairs(p_store, static_cast<size_t>(n2) * n);
  float* C = aligned_floats(c_store, static_cast<size_t>(n) * n);
  for (long i = 0; i < n * n2; ++i) A[i] = P[i] = pair(1.0f / (1 + i % 7), 0.5f);
  double best = 0.0;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> team;
    const long panels = n / NC;
    for (int p = 0; p < threads; ++p)
      team.emplace_back([=] {
        const long lo = panels * p / threads, hi = panels * (p + 1) / threads;
        gemm_bf16(A, n2, n, P + lo * n2 * NC, n2, (hi - lo) * NC, C + lo * NC, n, false);
      });
    for (auto& t : team) t.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * n * n * n / s / 1e9);
  }
  return best;
#else
  (void)n, (void)threads, (void)repeats;
  return 0.0;
#endif
}

#pragma GCC visibility pop
