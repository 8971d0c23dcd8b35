"""Fused whole-sequence kernels with hand-written backward passes, used by the cells' ``sequence`` fast paths.

* :mod:`rnnjax.kernels.native` — LSTM and GRU recurrences as native CPU kernels behind XLA's FFI (the default on
  the CPU when the library was built; :func:`rnnjax.kernels.native.status` says which path is active).
* :mod:`rnnjax.kernels.cudnn` — the LSTM on cuDNN through ``jax.experimental.rnn`` (the default on CUDA GPUs;
  :func:`rnnjax.kernels.cudnn.status` says whether it is active).
* :mod:`rnnjax.kernels.gated` — LSTM and GRU in JAX (every other backend, dtype, or with the native kernels off).
* :mod:`rnnjax.kernels.minimal` — minGRU and minLSTM (the blockwise ``"sequential"`` method), and their gate algebra.
* :mod:`rnnjax.kernels.pallas_scan` — the linear recurrence ``h_t = a_t ⊙ h_{t-1} + b_t`` as a chunked Pallas
  kernel (``method="pallas"`` of :mod:`rnnjax.linear_recurrence`; compiled on a GPU, interpreted elsewhere).
"""
