// The recurrence kernels for one instruction set: compiled with -mavx512f -mavx2 -mfma (see CMakeLists.txt); 32 zmm registers hold 4 rows x 4 vectors of accumulators.
#define RNNJAX_ISA avx512
#define RNNJAX_VW 16
#define RNNJAX_ROWS 4
#include "rnn_kernels_impl.inc"
