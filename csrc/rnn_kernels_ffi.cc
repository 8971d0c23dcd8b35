// XLA FFI handlers for the recurrence kernels, and the run-time choice of instruction set.
//
// Python (rnnjax/kernels/native.py) loads this library with ctypes, registers the handlers below with
// jax.ffi.register_ffi_target and calls them with jax.ffi.ffi_call. Shapes are checked here as well, so a caller that
// bypasses the Python wrapper gets an error instead of an out-of-bounds access.

#include <atomic>
#include <cstdint>
#include <exception>
#include <string>
#include <thread>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

#include "rnn_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace rnnjax {
namespace {

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

int detect_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kPortable;
}

const int kBestIsa = detect_isa();
std::atomic<int> active_isa{kBestIsa};

const char* isa_name(int isa) {
  switch (isa) {
    case kAvx512:
      return "avx512";
    case kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

#if defined(__x86_64__) || defined(_M_X64)
#define RNNJAX_DISPATCH(fn, args)                 \
  switch (active_isa.load()) {                    \
    case kAvx512:                                 \
      avx512::fn(args);                           \
      break;                                      \
    case kAvx2:                                   \
      avx2::fn(args);                             \
      break;                                      \
    default:                                      \
      portable::fn(args);                         \
  }
#else
#define RNNJAX_DISPATCH(fn, args) portable::fn(args)
#endif

// The Scheduler of every call: each task on a thread of its own, detached (the work it joins keeps its shared state
// alive, and the caller never waits for a helper to start, only for the work the helpers claimed). XLA's intra-op
// pool is not used, so that nothing of XLA waits on or competes with work it did not schedule.
void schedule_on_new_thread(void*, void (*task)(void*), void* data) {
  std::thread helper(task, data);
#if defined(__linux__)
  // Start it on another core than the caller's, if the process may use one: left to the scheduler, a new thread
  // starts on its parent's core and waits to be moved.
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0) {
    const int here = sched_getcpu();
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (cpu != here && CPU_ISSET(cpu, &allowed)) {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        pthread_setaffinity_np(helper.native_handle(), sizeof(one), &one);
        break;
      }
    }
  }
#endif
  helper.detach();
}
const Scheduler kThreadScheduler{nullptr, schedule_on_new_thread};

using F32 = ffi::Buffer<ffi::F32>;
using Pred = ffi::Buffer<ffi::PRED>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

std::string dims_of(ffi::Span<const int64_t> dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + (dims.size() == 1 ? ",)" : ")");
}

// An error naming `name` unless its dimensions equal `expected`.
ffi::Error expect(const char* name, ffi::Span<const int64_t> dims, std::initializer_list<int64_t> expected) {
  bool same = dims.size() == expected.size();
  size_t i = 0;
  for (int64_t e : expected) same = same && dims[i++] == e;
  if (same) return ffi::Error::Success();
  std::string want = "(";
  i = 0;
  for (int64_t e : expected) want += (i++ ? ", " : "") + std::to_string(e);
  want += expected.size() == 1 ? ",)" : ")";
  return ffi::Error::InvalidArgument(std::string("rnnjax native kernel: ") + name + " has shape " + dims_of(dims) +
                                     ", expected " + want);
}

#define RNNJAX_CHECK(expr)                  \
  do {                                      \
    ffi::Error error_ = (expr);             \
    if (!error_.success()) return error_;   \
  } while (0)

template <class F>
ffi::Error guarded(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("rnnjax native kernel failed: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error check_time_major(const F32& xs, int64_t& T, int64_t& N, int64_t& I) {
  auto dims = xs.dimensions();
  if (dims.size() != 3) {
    return ffi::Error::InvalidArgument("rnnjax native kernel: xs must be (T, N, I), got " + dims_of(dims));
  }
  T = dims[0];
  N = dims[1];
  I = dims[2];
  return ffi::Error::Success();
}

// Checks the forward operands and fills the inputs of `args` (the outputs are set by the caller).
ffi::Error LstmForwardCommon(F32& xs, F32& w_ih, F32& w_hh, F32& b, F32& h0, F32& c0, Pred& mask, LstmForward& args) {
  int64_t T, N, I;
  RNNJAX_CHECK(check_time_major(xs, T, N, I));
  const int64_t H = h0.dimensions().size() == 2 ? h0.dimensions()[1] : -1;
  RNNJAX_CHECK(expect("w_ih", w_ih.dimensions(), {I, 4 * H}));
  RNNJAX_CHECK(expect("w_hh", w_hh.dimensions(), {H, 4 * H}));
  RNNJAX_CHECK(expect("b", b.dimensions(), {4 * H}));
  RNNJAX_CHECK(expect("h0", h0.dimensions(), {N, H}));
  RNNJAX_CHECK(expect("c0", c0.dimensions(), {N, H}));
  RNNJAX_CHECK(expect("mask", mask.dimensions(), {T, N}));
  args = LstmForward{T, N, I, H, xs.typed_data(), w_ih.typed_data(), w_hh.typed_data(), b.typed_data(),
                     h0.typed_data(), c0.typed_data(), mask.typed_data(), nullptr, nullptr, nullptr, nullptr,
                     nullptr, nullptr, 1, &kThreadScheduler};
  return ffi::Error::Success();
}

ffi::Error LstmForwardImpl(F32 xs, F32 w_ih, F32 w_hh, F32 b, F32 h0, F32 c0, Pred mask, F32Out ys, F32Out h_last,
                           F32Out c_last, int64_t threads) {
  LstmForward args;
  RNNJAX_CHECK(LstmForwardCommon(xs, w_ih, w_hh, b, h0, c0, mask, args));
  args.ys = ys->typed_data();
  args.h_last = h_last->typed_data();
  args.c_last = c_last->typed_data();
  args.threads = threads;
  return guarded([&] { RNNJAX_DISPATCH(lstm_forward, args); });
}

ffi::Error LstmForwardTrainImpl(F32 xs, F32 w_ih, F32 w_hh, F32 b, F32 h0, F32 c0, Pred mask, F32Out ys,
                                F32Out h_last, F32Out c_last, F32Out gates, F32Out h_prev, F32Out c_prev,
                                int64_t threads) {
  LstmForward args;
  RNNJAX_CHECK(LstmForwardCommon(xs, w_ih, w_hh, b, h0, c0, mask, args));
  args.ys = ys->typed_data();
  args.h_last = h_last->typed_data();
  args.c_last = c_last->typed_data();
  args.gates = gates->typed_data();
  args.h_prev = h_prev->typed_data();
  args.c_prev = c_prev->typed_data();
  args.threads = threads;
  return guarded([&] { RNNJAX_DISPATCH(lstm_forward, args); });
}

// The forward pass on an input part projected before the call: zx = x W_ih + b, (T, N, 4H).
ffi::Error LstmProjectedCommon(F32& zx, F32& w_hh, F32& h0, F32& c0, Pred& mask, LstmForward& args) {
  auto dims = zx.dimensions();
  if (dims.size() != 3) {
    return ffi::Error::InvalidArgument("rnnjax native kernel: zx must be (T, N, 4H), got " + dims_of(dims));
  }
  const int64_t T = dims[0], N = dims[1];
  const int64_t H = h0.dimensions().size() == 2 ? h0.dimensions()[1] : -1;
  RNNJAX_CHECK(expect("zx", dims, {T, N, 4 * H}));
  RNNJAX_CHECK(expect("w_hh", w_hh.dimensions(), {H, 4 * H}));
  RNNJAX_CHECK(expect("h0", h0.dimensions(), {N, H}));
  RNNJAX_CHECK(expect("c0", c0.dimensions(), {N, H}));
  RNNJAX_CHECK(expect("mask", mask.dimensions(), {T, N}));
  args = LstmForward{T, N, 0, H, nullptr, nullptr, w_hh.typed_data(), nullptr, h0.typed_data(), c0.typed_data(),
                     mask.typed_data(), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, &kThreadScheduler,
                     zx.typed_data()};
  return ffi::Error::Success();
}

ffi::Error LstmProjectedImpl(F32 zx, F32 w_hh, F32 h0, F32 c0, Pred mask, F32Out ys, F32Out h_last, F32Out c_last,
                             int64_t threads) {
  LstmForward args;
  RNNJAX_CHECK(LstmProjectedCommon(zx, w_hh, h0, c0, mask, args));
  args.ys = ys->typed_data();
  args.h_last = h_last->typed_data();
  args.c_last = c_last->typed_data();
  args.threads = threads;
  return guarded([&] { RNNJAX_DISPATCH(lstm_forward, args); });
}

ffi::Error LstmProjectedTrainImpl(F32 zx, F32 w_hh, F32 h0, F32 c0, Pred mask, F32Out ys, F32Out h_last,
                                  F32Out c_last, F32Out gates, F32Out h_prev, F32Out c_prev, int64_t threads) {
  LstmForward args;
  RNNJAX_CHECK(LstmProjectedCommon(zx, w_hh, h0, c0, mask, args));
  args.ys = ys->typed_data();
  args.h_last = h_last->typed_data();
  args.c_last = c_last->typed_data();
  args.gates = gates->typed_data();
  args.h_prev = h_prev->typed_data();
  args.c_prev = c_prev->typed_data();
  args.threads = threads;
  return guarded([&] { RNNJAX_DISPATCH(lstm_forward, args); });
}

ffi::Error LstmBackwardImpl(F32 w_hh, F32 gates, F32 c_prev, F32 dys, F32 dh_last, F32 dc_last, Pred mask, F32Out dz,
                            F32Out dh0, F32Out dc0, F32Out db, int64_t threads) {
  auto dims = c_prev.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("rnnjax native kernel: c_prev must be (T, N, H)");
  const int64_t T = dims[0], N = dims[1], H = dims[2];
  RNNJAX_CHECK(expect("w_hh", w_hh.dimensions(), {H, 4 * H}));
  RNNJAX_CHECK(expect("gates", gates.dimensions(), {T, N, 4 * H}));
  RNNJAX_CHECK(expect("dys", dys.dimensions(), {T, N, H}));
  RNNJAX_CHECK(expect("dh_last", dh_last.dimensions(), {N, H}));
  RNNJAX_CHECK(expect("dc_last", dc_last.dimensions(), {N, H}));
  RNNJAX_CHECK(expect("mask", mask.dimensions(), {T, N}));
  LstmBackward args{T, N, H, w_hh.typed_data(), gates.typed_data(), c_prev.typed_data(), dys.typed_data(),
                    dh_last.typed_data(), dc_last.typed_data(), mask.typed_data(), dz->typed_data(),
                    dh0->typed_data(), dc0->typed_data(), db->typed_data(), threads, nullptr};
  args.scheduler = &kThreadScheduler;
  return guarded([&] { RNNJAX_DISPATCH(lstm_backward, args); });
}

ffi::Error GruForwardCommon(F32& xs, F32& w_ih, F32& w_hh, F32& b_ih, F32& b_hh, F32& h0, Pred& mask,
                            GruForward& args) {
  int64_t T, N, I;
  RNNJAX_CHECK(check_time_major(xs, T, N, I));
  const int64_t H = h0.dimensions().size() == 2 ? h0.dimensions()[1] : -1;
  RNNJAX_CHECK(expect("w_ih", w_ih.dimensions(), {I, 3 * H}));
  RNNJAX_CHECK(expect("w_hh", w_hh.dimensions(), {H, 3 * H}));
  RNNJAX_CHECK(expect("b_ih", b_ih.dimensions(), {3 * H}));
  RNNJAX_CHECK(expect("b_hh", b_hh.dimensions(), {3 * H}));
  RNNJAX_CHECK(expect("h0", h0.dimensions(), {N, H}));
  RNNJAX_CHECK(expect("mask", mask.dimensions(), {T, N}));
  args = GruForward{T, N, I, H, xs.typed_data(), w_ih.typed_data(), w_hh.typed_data(), b_ih.typed_data(),
                    b_hh.typed_data(), h0.typed_data(), mask.typed_data(), nullptr, nullptr, nullptr, nullptr, 1, nullptr};
  return ffi::Error::Success();
}

ffi::Error GruForwardImpl(F32 xs, F32 w_ih, F32 w_hh, F32 b_ih, F32 b_hh, F32 h0, Pred mask, F32Out ys,
                          F32Out h_last, int64_t threads) {
  GruForward args;
  RNNJAX_CHECK(GruForwardCommon(xs, w_ih, w_hh, b_ih, b_hh, h0, mask, args));
  args.ys = ys->typed_data();
  args.h_last = h_last->typed_data();
  args.threads = threads;
  args.scheduler = &kThreadScheduler;
  return guarded([&] { RNNJAX_DISPATCH(gru_forward, args); });
}

ffi::Error GruForwardTrainImpl(F32 xs, F32 w_ih, F32 w_hh, F32 b_ih, F32 b_hh, F32 h0, Pred mask, F32Out ys,
                               F32Out h_last, F32Out acts, F32Out h_prev, int64_t threads) {
  GruForward args;
  RNNJAX_CHECK(GruForwardCommon(xs, w_ih, w_hh, b_ih, b_hh, h0, mask, args));
  args.ys = ys->typed_data();
  args.h_last = h_last->typed_data();
  args.acts = acts->typed_data();
  args.h_prev = h_prev->typed_data();
  args.threads = threads;
  args.scheduler = &kThreadScheduler;
  return guarded([&] { RNNJAX_DISPATCH(gru_forward, args); });
}

ffi::Error GruBackwardImpl(F32 w_hh, F32 acts, F32 h_prev, F32 dys, F32 dh_last, Pred mask, F32Out d_gi,
                           F32Out d_gh, F32Out dh0, F32Out d_b_ih, F32Out d_b_hh, int64_t threads) {
  auto dims = h_prev.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("rnnjax native kernel: h_prev must be (T, N, H)");
  const int64_t T = dims[0], N = dims[1], H = dims[2];
  RNNJAX_CHECK(expect("w_hh", w_hh.dimensions(), {H, 3 * H}));
  RNNJAX_CHECK(expect("acts", acts.dimensions(), {T, N, 4 * H}));
  RNNJAX_CHECK(expect("dys", dys.dimensions(), {T, N, H}));
  RNNJAX_CHECK(expect("dh_last", dh_last.dimensions(), {N, H}));
  RNNJAX_CHECK(expect("mask", mask.dimensions(), {T, N}));
  GruBackward args{T, N, H, w_hh.typed_data(), acts.typed_data(), h_prev.typed_data(), dys.typed_data(),
                   dh_last.typed_data(), mask.typed_data(), d_gi->typed_data(), d_gh->typed_data(),
                   dh0->typed_data(), d_b_ih->typed_data(), d_b_hh->typed_data(), threads, nullptr};
  args.scheduler = &kThreadScheduler;
  return guarded([&] { RNNJAX_DISPATCH(gru_backward, args); });
}

// One streaming step on host memory, outside XLA, for rnnjax.Streamer (rnnjax/streaming.py), which owns every
// buffer and checks its shape: x (N, I); h0, c0, h, c (N, H); mask (N,) all true; b (4H,) or, for the GRU, b_ih and
// b_hh (3H,) (zeros for a cell without biases). The step's output is h. Returns 0, 1 for a size below 1, 2 if the
// kernel failed (it allocates its scratch).
int LstmStep(int64_t N, int64_t I, int64_t H, const float* x, const float* w_ih, const float* w_hh, const float* b,
             const float* h0, const float* c0, const bool* mask, float* h, float* c, int64_t threads) {
  if (N < 1 || I < 1 || H < 1) return 1;
  LstmForward args{1,    N,    I, H, x,       w_ih,    w_hh,    b,       h0,      c0,
                   mask, h,    h, c, nullptr, nullptr, nullptr, threads, &kThreadScheduler};
  return guarded([&] { RNNJAX_DISPATCH(lstm_forward, args); }).success() ? 0 : 2;
}

int GruStep(int64_t N, int64_t I, int64_t H, const float* x, const float* w_ih, const float* w_hh, const float* b_ih,
            const float* b_hh, const float* h0, const bool* mask, float* h, int64_t threads) {
  if (N < 1 || I < 1 || H < 1) return 1;
  GruForward args{1, N, I, H, x, w_ih, w_hh, b_ih, b_hh, h0, mask, h, h, nullptr, nullptr, threads,
                  &kThreadScheduler};
  return guarded([&] { RNNJAX_DISPATCH(gru_forward, args); }).success() ? 0 : 2;
}

}  // namespace
}  // namespace rnnjax

using rnnjax::F32;
using rnnjax::F32Out;
using rnnjax::Pred;

XLA_FFI_DEFINE_HANDLER_SYMBOL(rnnjax_lstm_forward, rnnjax::LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<Pred>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(rnnjax_lstm_forward_train, rnnjax::LstmForwardTrainImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<Pred>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(rnnjax_lstm_forward_projected, rnnjax::LstmProjectedImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<Pred>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(rnnjax_lstm_forward_projected_train, rnnjax::LstmProjectedTrainImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<Pred>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(rnnjax_lstm_backward, rnnjax::LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<Pred>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(rnnjax_gru_forward, rnnjax::GruForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<Pred>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(rnnjax_gru_forward_train, rnnjax::GruForwardTrainImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<Pred>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(rnnjax_gru_backward, rnnjax::GruBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<Pred>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("threads"));

// The instruction set the kernels run with ("avx512", "avx2" or "portable"), the best this CPU supports, and a way
// to choose a lower one (tests run every path this CPU can execute). Returns 0 on success, -1 if the CPU cannot
// run the requested set.
extern "C" {
__attribute__((visibility("default"))) const char* rnnjax_native_isa() { return rnnjax::isa_name(rnnjax::active_isa); }
__attribute__((visibility("default"))) const char* rnnjax_native_best_isa() {
  return rnnjax::isa_name(rnnjax::kBestIsa);
}
__attribute__((visibility("default"))) int rnnjax_native_set_isa(int isa) {
  if (isa < 0 || isa > rnnjax::kBestIsa) return -1;
  rnnjax::active_isa = isa;
  return 0;
}
__attribute__((visibility("default"))) int rnnjax_lstm_step(int64_t N, int64_t I, int64_t H, const float* x,
                                                            const float* w_ih, const float* w_hh, const float* b,
                                                            const float* h0, const float* c0, const bool* mask,
                                                            float* h, float* c, int64_t threads) {
  return rnnjax::LstmStep(N, I, H, x, w_ih, w_hh, b, h0, c0, mask, h, c, threads);
}
__attribute__((visibility("default"))) int rnnjax_gru_step(int64_t N, int64_t I, int64_t H, const float* x,
                                                           const float* w_ih, const float* w_hh, const float* b_ih,
                                                           const float* b_hh, const float* h0, const bool* mask,
                                                           float* h, int64_t threads) {
  return rnnjax::GruStep(N, I, H, x, w_ih, w_hh, b_ih, b_hh, h0, mask, h, threads);
}
}
