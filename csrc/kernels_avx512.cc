// The recurrence kernels for AVX-512: compiled with -mavx512f -mavx2 -mfma (see CMakeLists.txt). A register block
// is 6 rows x 4 vectors of accumulators (24 of the 32 zmm registers); 6 rows measured 5% faster than 4 on the LSTM
// forward and train step (B=32, T=128, I=64, H=256, one thread, AMD EPYC).
#define RNNJAX_ISA avx512
#define RNNJAX_VW 16
#define RNNJAX_ROWS 6
#include "rnn_kernels_impl.inc"
