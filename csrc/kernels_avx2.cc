// The recurrence kernels for AVX2 + FMA: compiled with -mavx2 -mfma (see CMakeLists.txt). A register block is
// 2 rows x 4 vectors of accumulators (8 of the 16 ymm registers, the rest for the weights and broadcasts).
#define RNNJAX_ISA avx2
#define RNNJAX_VW 8
#define RNNJAX_ROWS 2
#include "rnn_kernels_impl.inc"
