"""Ways of writing a computation so that XLA compiles it without large temporaries.

The mathematics lives in ``_rows`` and ``_blocks``; this module holds the forms they are written
in because of how XLA (above all its CPU backend) fuses operations, each next to the memory test
that fails without it. ``memory_analysis()`` of a compiled program is deterministic, so these
bounds are asserted, not hoped for:

* ``tests/test_memory.py``: ``jit(value_and_grad)`` of the integer-label loss on bfloat16
  ``[N, C]`` logits needs at most one bfloat16 ``[N, C]`` buffer of temporaries, for every option
  combination (a float32 copy of the logits is twice that);
* ``tests/test_linear.py`` (the memory section): the fused loss stays within its block budget and
  never converts all of a bfloat16 ``w`` to float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Default chunk sizes of the fused loss per backend, measured with `python -m jaxce.bench linear`:
# (rows of the recompute strategy's blocks, its vocabulary chunk, the byte budget of one float32
# [token_chunk, V] block of the single-pass strategy). Accelerators have the bandwidth and the
# parallelism for bigger blocks; their single-pass block stays far below the [N, V] logits it
# replaces. Guarded by tests/test_linear.py::test_temporaries_at_most_64_mib and
# ::test_default_chunks_never_need_more_than_the_unfused_loss.
CHUNK_DEFAULTS = {
    "cpu": (1024, 2048, 24 * 2**20),
    "gpu": (4096, 8192, 512 * 2**20),
    "tpu": (4096, 8192, 512 * 2**20),
}


def chunk_defaults() -> tuple[int, int, int]:
    return CHUNK_DEFAULTS.get(jax.default_backend(), CHUNK_DEFAULTS["gpu"])


def barrier(tree):
    """``lax.optimization_barrier``: XLA may not move computations across it.

    Used where XLA would otherwise share one float32 copy of the logits between two readers
    (two reductions, or the forward and the backward pass), which makes it materialize that
    copy: each reader then converts its own, inside its own fusion. Guarded by
    tests/test_memory.py::test_every_option_combination_fits_one_bf16_buffer.
    """
    return jax.lax.optimization_barrier(tree)


def _variadic_reduce(operands, inits, combine):
    """One pass of ``lax.reduce`` over the last axis of several arrays."""
    dims = (operands[0].ndim - 1,)
    return tuple(jax.lax.reduce(tuple(operands), tuple(inits), combine, dims))


@jax.custom_jvp
def row_sums(operands: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Sums over the last axis of several arrays in one variadic reduction.

    XLA's CPU backend gives plain sums and maxima dedicated kernels that fuse ``exp``, ``convert``
    and arithmetic but not ``tanh`` or a select on a mask argument, which then get materialized
    as ``[..., C]`` float32 temporaries; a variadic reduction fuses any elementwise producer.
    XLA drops unused results, so every result must be used, or the reduction becomes a plain
    one again. Guarded by tests/test_memory.py::test_every_option_combination_fits_one_bf16_buffer
    (the soft-cap, smoothing and masked cases).
    """
    zero = jnp.zeros((), operands[0].dtype)
    return _variadic_reduce(
        operands,
        (zero,) * len(operands),
        lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)),
    )


@row_sums.defjvp
def _row_sums_jvp(primals, tangents):
    # Sums are linear; the tangents use plain sums, which JAX can also transpose.
    (operands,), (dots,) = primals, tangents
    return row_sums(operands), tuple(jnp.sum(t, axis=-1) for t in dots)


def masked_max(x: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """The max of ``x`` over its last axis where ``mask`` (keepdims, in ``dtype``), -inf for a
    row with nothing admissible.

    A variadic reduction that also counts the admissible entries: a plain max of a select on a
    mask is not fused on CPU (see ``row_sums``), and the count must be used (it defines the
    empty rows' -inf) or XLA drops it and the reduction becomes a plain one again.
    """
    neg_inf = jnp.asarray(-jnp.inf, dtype)
    m, count = _variadic_reduce(
        (jnp.where(mask, x.astype(dtype), neg_inf), mask.astype(dtype)),
        (neg_inf, jnp.zeros((), dtype)),
        lambda a, b: (jnp.maximum(a[0], b[0]), a[1] + b[1]),
    )
    return jnp.where(count > 0, m, neg_inf)[..., None]


def class_axis_sharded(x: jax.Array) -> bool:
    """Whether ``x``'s class (last) axis is split over a mesh axis with explicit sharding."""
    spec: tuple[object, ...] = getattr(jax.typeof(x).sharding, "spec", ())
    return len(spec) == x.ndim and spec[-1] is not None


def pick(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[..., index]`` as ``[..., 1]`` in ``x``'s dtype: the label's logit.

    A gather, behind an optimization barrier that stops XLA from rewriting it to read a float32
    copy of ``x`` shared with the reductions (guarded by tests/test_memory.py). When the class
    axis is explicitly sharded a gather would need the other shards' columns; a masked sum
    reduces locally instead and all-reduces one number per example.
    """
    if class_axis_sharded(x):
        columns = jax.lax.broadcasted_iota(index.dtype, x.shape, x.ndim - 1)
        hit = columns == index[..., None]
        return jnp.sum(jnp.where(hit, x, jnp.zeros_like(x)), axis=-1, keepdims=True)
    return jnp.take_along_axis(barrier(x), index[..., None], axis=-1)


def columns(w: jax.Array, col0, cols: int, dtype) -> jax.Array:
    """Columns ``[col0, col0 + cols)`` of ``w`` (``[D, cols]``), in ``w``'s dtype.

    XLA's CPU backend multiplies bfloat16 by converting to float32, moves that convert ahead
    of a ``dynamic_slice`` and then out of the loop: a float32 copy of all of ``w``
    (optimization barriers are removed before that happens on CPU). Reading the chunk inside
    a ``cond`` whose predicate depends on the loop index keeps the convert after the slice,
    so only one chunk is ever float32. Other backends multiply bfloat16 natively. Guarded by
    tests/test_linear.py::test_bfloat16_never_converts_all_of_w.
    """
    if cols == w.shape[1] and not isinstance(col0, jax.Array):
        return w
    if w.dtype == dtype or jax.default_backend() != "cpu" or not isinstance(col0, jax.Array):
        return jax.lax.dynamic_slice_in_dim(w, col0, cols, 1)

    def read(w):
        return jax.lax.dynamic_slice_in_dim(w, col0, cols, 1).astype(dtype)

    def unreachable(w):
        return jnp.zeros((w.shape[0], cols), dtype)

    return jax.lax.cond(col0 >= 0, read, unreachable, w)
