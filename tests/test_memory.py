"""The integer-label cross-entropy and its gradient need no [N, V] float32 temporaries.

``compile().memory_analysis()`` is deterministic for a given program, so it can be asserted;
the bound is one bfloat16 logits buffer (the gradient itself is the output, not a temporary).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce

N, V = 256, 8192


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"label_smoothing": 0.1},
        {"z_loss": 1e-4},
        {"logit_soft_cap": 30.0},
        {"label_smoothing": 0.1, "z_loss": 1e-4, "logit_soft_cap": 30.0},
        {"ignore_index": -100},
    ],
    ids=["plain", "smoothing", "z_loss", "soft_cap", "all", "ignore_index"],
)
def test_value_and_grad_temp_memory_bf16(kw):
    y = jnp.asarray(np.random.default_rng(0).integers(0, V, size=N).astype(np.int32))
    logits = jax.ShapeDtypeStruct((N, V), jnp.bfloat16)

    def loss(lg):
        return jaxce.softmax_cross_entropy_with_integer_labels(lg, y, reduction="mean", **kw)

    f = jax.value_and_grad(loss)
    compiled = jax.jit(f).lower(logits).compile()
    stats = compiled.memory_analysis()
    if stats is None:  # pragma: no cover - backend without memory analysis
        pytest.skip("memory_analysis not available on this backend")
    assert stats.temp_size_in_bytes <= N * V * 2, (
        f"temporaries {stats.temp_size_in_bytes} B exceed one bf16 logits buffer {N * V * 2} B"
    )
    # the output (the gradient) has the logits' dtype
    out = jax.eval_shape(f, logits)
    assert out[1].dtype == jnp.bfloat16 and out[0].dtype == jnp.float32


def test_naive_float32_upcast_would_exceed_the_bound():
    """Sanity check that the bound is meaningful: a naive f32 log_softmax path exceeds it."""
    y = jnp.asarray(np.random.default_rng(0).integers(0, V, size=N).astype(np.int32))

    def naive(lg):
        lp = jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(lp, y[:, None], axis=-1))

    stats = (
        jax.jit(jax.value_and_grad(naive))
        .lower(jax.ShapeDtypeStruct((N, V), jnp.bfloat16))
        .compile()
        .memory_analysis()
    )
    if stats is None:  # pragma: no cover
        pytest.skip("memory_analysis not available on this backend")
    assert stats.temp_size_in_bytes > N * V * 2


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_every_option_combination_fits_one_bf16_buffer(smoothing, z_loss, cap, weighted, masked):
    y = jnp.asarray(np.random.default_rng(0).integers(0, V, size=N).astype(np.int32))
    weights = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, V).astype(np.float32))
    mask = jax.ShapeDtypeStruct((N, V), jnp.bool_)

    def loss(lg, where):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            lg,
            y,
            where=where if masked else None,
            class_weights=weights if weighted else None,
            label_smoothing=smoothing,
            z_loss=z_loss,
            logit_soft_cap=cap,
            ignore_index=-100,
            reduction="mean",
        )

    logits = jax.ShapeDtypeStruct((N, V), jnp.bfloat16)
    stats = jax.jit(jax.value_and_grad(loss)).lower(logits, mask).compile().memory_analysis()
    if stats is None:  # pragma: no cover - backend without memory analysis
        pytest.skip("memory_analysis not available on this backend")
    assert stats.temp_size_in_bytes <= N * V * 2
