// Native CPU kernels for the LSTM and reset-after GRU recurrences (rnnjax.kernels.native).
//
// Each kernel runs the recurrence alone: the large matmuls of training (weight gradients, input gradients) stay in
// XLA, which runs them as fast as a BLAS would. Arrays are row-major float32 with one flattened batch axis N;
// `mask` is (T, N): where it is false the carry is held and the output is 0, exactly as rnnjax.masked_scan.
//
// The same implementation (rnn_kernels_impl.inc) is compiled once per instruction set (AVX-512, AVX2 + FMA, and a
// portable build) in its own namespace; rnn_kernels_ffi.cc picks one at run time.
#pragma once

#include <cstdint>

namespace rnnjax {

// Runs a task on another thread (the FFI handlers start a thread per task). A null scheduler runs everything on the
// calling thread.
struct Scheduler {
  void* context;
  void (*schedule)(void* context, void (*task)(void*), void* data);
};

// LSTM, gates in PyTorch's order i, f, g, o: z = x W_ih + h W_hh + b; c' = f c + i g; h' = o tanh(c').
struct LstmForward {
  int64_t T, N, I, H;
  const float* xs;    // (T, N, I)
  const float* w_ih;  // (I, 4H)
  const float* w_hh;  // (H, 4H)
  const float* b;     // (4H,)
  const float* h0;    // (N, H)
  const float* c0;    // (N, H)
  const bool* mask;   // (T, N)
  float* ys;          // (T, N, H) outputs, 0 where masked
  float* h_last;      // (N, H)
  float* c_last;      // (N, H)
  float* gates;       // (T, N, 4H) activated gates i, f, g, o, or null (inference)
  float* h_prev;      // (T, N, H) carry h entering each step, or null
  float* c_prev;      // (T, N, H) carry c entering each step, or null
  int64_t threads;
  const Scheduler* scheduler;
  // The input part x W_ih + b (T, N, 4H), projected before the call, or null. With it, I is 0 and xs, w_ih and b
  // are unused: the kernel adds row (t, n) of zx to h W_hh.
  const float* zx = nullptr;
};

struct LstmBackward {
  int64_t T, N, H;
  const float* w_hh;   // (H, 4H)
  const float* gates;  // (T, N, 4H) from the forward pass
  const float* c_prev;   // (T, N, H) from the forward pass
  const float* dys;    // (T, N, H)
  const float* dh_last;  // (N, H)
  const float* dc_last;  // (N, H)
  const bool* mask;    // (T, N)
  float* dz;           // (T, N, 4H) gradient of the pre-activations z (0 where masked)
  float* dh0;          // (N, H)
  float* dc0;          // (N, H)
  float* db;           // (4H,) gradient of b: dz summed over T and N
  int64_t threads;
  const Scheduler* scheduler;
};

// Reset-after GRU, gates r, z, n: r = s(x W_ir + b_ir + h W_hr + b_hr), z likewise,
// n = tanh(x W_in + b_in + r (h W_hn + b_hn)), h' = (1 - z) n + z h.
struct GruForward {
  int64_t T, N, I, H;
  const float* xs;    // (T, N, I)
  const float* w_ih;  // (I, 3H)
  const float* w_hh;  // (H, 3H)
  const float* b_ih;  // (3H,)
  const float* b_hh;  // (3H,)
  const float* h0;    // (N, H)
  const bool* mask;   // (T, N)
  float* ys;          // (T, N, H)
  float* h_last;      // (N, H)
  float* acts;        // (T, N, 4H): r, z, n, h W_hn + b_hn; or null
  float* h_prev;      // (T, N, H) carry entering each step, or null
  int64_t threads;
  const Scheduler* scheduler;
};

struct GruBackward {
  int64_t T, N, H;
  const float* w_hh;   // (H, 3H)
  const float* acts;   // (T, N, 4H)
  const float* h_prev;   // (T, N, H)
  const float* dys;    // (T, N, H)
  const float* dh_last;  // (N, H)
  const bool* mask;    // (T, N)
  float* d_gi;         // (T, N, 3H) gradient of x W_ih + b_ih
  float* d_gh;         // (T, N, 3H) gradient of h W_hh + b_hh
  float* dh0;          // (N, H)
  float* d_b_ih;       // (3H,) d_gi summed over T and N
  float* d_b_hh;       // (3H,) d_gh summed over T and N
  int64_t threads;
  const Scheduler* scheduler;
};

#define RNNJAX_DECLARE_KERNELS(ns)                \
  namespace ns {                                  \
  void lstm_forward(const LstmForward& args);     \
  void lstm_backward(const LstmBackward& args);   \
  void gru_forward(const GruForward& args);       \
  void gru_backward(const GruBackward& args);     \
  }

RNNJAX_DECLARE_KERNELS(portable)
#if defined(__x86_64__) || defined(_M_X64)
RNNJAX_DECLARE_KERNELS(avx2)
RNNJAX_DECLARE_KERNELS(avx512)
#endif

}  // namespace rnnjax
