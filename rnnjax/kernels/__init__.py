"""Fused whole-sequence kernels with hand-written backward passes, used by the cells' ``sequence`` fast paths.

* :mod:`rnnjax.kernels.native` — LSTM and GRU recurrences as native CPU kernels behind XLA's FFI (the default on
  the CPU when the library was built; :func:`rnnjax.kernels.native.status` says which path is active).
* :mod:`rnnjax.kernels.gated` — LSTM and GRU in JAX (every other backend, dtype, or with the native kernels off).
* :mod:`rnnjax.kernels.minimal` — minGRU and minLSTM (the blockwise ``"sequential"`` method), and their gate algebra.
"""
