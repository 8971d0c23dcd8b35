// The recurrence kernels for one instruction set: compiled with -mavx2 -mfma (see CMakeLists.txt); 16 ymm registers hold 2 rows x 4 vectors of accumulators.
#define RNNJAX_ISA avx2
#define RNNJAX_VW 8
#define RNNJAX_ROWS 2
#include "rnn_kernels_impl.inc"
