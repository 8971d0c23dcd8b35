"""Test configuration: strict dtype promotion everywhere, so hidden float32/bfloat16 mixing is an error; XLA:CPU
compiles without LLVM's expensive optimisations."""

import gc
import os

TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
"""Most of the suite's time is XLA compiling small programs that then run for microseconds; without LLVM's
expensive passes a test module compiles in about 20% less time (tests/test_conformance.py: 88 -> 70 s). Neither
flag licenses reassociation or other changes to floating-point results (XLA:CPU keeps fast-math off), and the
subprocesses the tests start (docs blocks, notebooks, multi-process runs) inherit them. Set ``XLA_FLAGS`` to
anything containing ``--xla_backend_optimization_level`` to test at another level."""
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join((os.environ.get("XLA_FLAGS", ""), *TEST_XLA_FLAGS)).strip()

import jax  # noqa: E402  (after XLA_FLAGS: the CPU backend reads them when it starts)
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key():
    """A fresh PRNG key for each test."""
    return jax.random.key(0)


@pytest.fixture
def enable_x64():
    """Runs a test with 64-bit floats (finite-difference gradient checks need them)."""
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module.

    Every XLA:CPU executable holds about five memory mappings for its code, and jitted functions defined at
    module level keep theirs for the life of the process. Across the whole suite that passed Linux's default
    ``vm.max_map_count`` (65,530): the next compilation segfaulted inside LLVM. Clearing the caches between
    modules keeps the count at what one module needs.
    """
    yield
    jax.clear_caches()
    gc.collect()
