"""Fused whole-sequence kernels with hand-written backward passes, used by the cells' ``sequence`` fast paths.

* :mod:`rnnjax.kernels.gated` — LSTM and GRU.
* :mod:`rnnjax.kernels.minimal` — minGRU and minLSTM (the blockwise ``"sequential"`` method), and their gate algebra.
"""
