"""Test configuration: strict dtype promotion everywhere, so hidden float32/bfloat16 mixing is an error."""

import jax
import pytest

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
