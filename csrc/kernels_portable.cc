// The recurrence kernels, portable build: the compiler's baseline instruction set (SSE2 on x86-64, NEON on aarch64).
#define RNNJAX_ISA portable
#define RNNJAX_VW 4
#define RNNJAX_ROWS 2
#include "rnn_kernels_impl.inc"
