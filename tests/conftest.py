"""Shared test configuration.

* float64 is enabled so that references can be differentiated by JAX in double precision;
* float32 matrix products at full precision on every backend;
* strict dtype promotion and rank promotion "raise" make implicit casts and broadcasts in jaxce
  (and in these tests) fail loudly, so tests cast explicitly.
"""

import importlib
import os

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Float32 products in float32 on every backend (GPUs and TPUs would otherwise multiply in TF32 or
# bfloat16 passes), so the float64 references bound what jaxce does, not the matrix units.
jax.config.update("jax_default_matmul_precision", "highest")

try:  # hypothesis is a test dependency
    from hypothesis import settings

    # "ci" (the default): short and deterministic. "thorough": many random examples, run by
    # hand with `pytest --hypothesis-profile=thorough` or HYPOTHESIS_PROFILE=thorough.
    settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None)
    settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass

# Hypothesis mixes literal constants from the project's imported modules into the values it
# draws, so the "ci" profile's examples would depend on which tests ran first in a pytest-xdist
# worker. Importing every module now makes that pool, and the examples, the same in every run.
for _module in ("jaxce", "jaxce.sharded", "jaxce.bench", "jaxce.__main__", "jaxce.demo"):
    try:
        importlib.import_module(_module)
    except ImportError:  # the demo's extras are optional
        pass


from _float16_overflow import Float16Overflow  # noqa: E402  (imports jaxce after the config)


@pytest.fixture
def untraced():
    """Clears JAX's caches before and after the test: a jitted loss (CE_INT) reuses the trace
    another test cached, or one this test cached under a patched module attribute, instead of
    the one the test chooses."""
    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.fixture
def rng():
    """A fresh generator with a fixed seed for every test."""
    return np.random.default_rng(0)


@pytest.fixture
def float16_overflow(rng):
    """A float16 fused loss whose summed ``dw`` is beyond float16's range where the mean's is
    not (:class:`_float16_overflow.Float16Overflow`)."""
    return Float16Overflow.draw(rng)
