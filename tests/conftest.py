"""Test configuration: strict dtype promotion everywhere, so hidden float32/bfloat16 mixing is an error."""

import gc

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Marks ``slow`` the cases a test module's ``is_slow_case(item)`` names (before ``-m`` selects)."""
    for item in items:
        is_slow_case = getattr(item.module, "is_slow_case", None)
        if is_slow_case is not None and is_slow_case(item):
            item.add_marker(pytest.mark.slow)


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
