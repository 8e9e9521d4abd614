"""Shared test configuration.

* float64 is enabled so that references can be differentiated by JAX in double precision;
* strict dtype promotion and rank promotion "raise" make implicit casts and broadcasts in jaxce
  (and in these tests) fail loudly, so tests cast explicitly.
"""

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

try:  # hypothesis is a test dependency; keep property tests short and deterministic
    from hypothesis import settings

    settings.register_profile("jaxce", max_examples=30, deadline=None, derandomize=True)
    settings.load_profile("jaxce")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def rng():
    """A fresh generator with a fixed seed for every test."""
    return np.random.default_rng(0)
