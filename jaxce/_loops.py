"""Loops over chunks of rows or columns, for computations that must never see a whole array.

The fused losses loop over blocks of ``x @ w`` (``_blocks``); the row statistics of the plain
and sharded losses loop over chunks of rows (``map_rows``), so that whatever XLA keeps while
reducing a chunk (a float32 copy, ``exp(z - max)``) is the size of a chunk, never of the
logits: the memory bound is a property of the program, not of a compiler's fusion choices.
Nothing is ever padded.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxce import _xla


def cut(a: jax.Array, start, size: int, axis: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, start, size, axis)


def paste(a: jax.Array, part: jax.Array, start, axis: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(a, part, start, axis)


def _loop(count: int, step, carry):
    """``step(i, carry)`` for ``i`` in ``range(count)``, as a ``while_loop``.

    Not a ``scan`` (what ``fori_loop`` with static bounds builds): these loops run inside
    ``jax.custom_jvp`` rules, and JAX's partial evaluation of a scan for reverse mode moves
    every loop-invariant value of its body out of the loop, materializing broadcasts such as a
    ``[token_chunk, V]`` block of zeros or a column iota (tests/test_linear.py, the memory
    section). A ``while_loop`` whose inputs are all known is kept whole. The loops compute
    primal values only; their derivatives are the hand-written rules, differentiable again in
    forward mode (forward-over-reverse second derivatives), not in reverse mode.
    """
    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(count), step, carry)


def for_chunks(total: int, size: int, body, carry):
    """``body(start, length, carry)`` over ``[0, total)`` in chunks of ``size``.

    Full chunks run in a loop (``start`` traced, ``length`` static); the remainder is one more
    call with its own static length. So no block is padded.
    """
    full, tail = divmod(total, size)
    if full == 1:
        carry = body(0, size, carry)
    elif full > 1:
        carry = _loop(full, lambda i, c: body(i * size, size, c), carry)
    if tail:
        carry = body(full * size, tail, carry)
    return carry


def overlapping_chunks(total: int, size: int, body, carry):
    """``body(start, fresh, carry)`` over ``ceil(total / size)`` chunks of exactly ``size``.

    The last chunk starts at ``total - size`` when ``size`` does not divide ``total``, so it
    overlaps the one before; ``fresh`` (``[size]`` booleans, None when ``size`` divides
    ``total``) marks the entries no earlier chunk had, and ``body`` makes the others contribute
    nothing. Every chunk then runs in one loop: a remainder called after the loop, as in
    :func:`for_chunks`, makes XLA copy a loop-carried ``[D, V]`` accumulator
    (tests/test_linear.py::test_ragged_token_chunks_add_no_copy_of_the_w_gradient).
    """
    count = -(-total // size)
    if total % size == 0:

        def step(i, c):
            return body(i * size, None, c)

    else:

        def step(i, c):
            nominal = i * size
            start = jnp.minimum(nominal, total - size)
            fresh = jax.lax.iota(jnp.int32, size) + start >= nominal
            return body(start, fresh, c)

    if count == 1:
        return step(0, carry)
    return _loop(count, step, carry)


def map_rows(fn: Callable, arrays: tuple, rows: int, out_like):
    """``fn(*chunks)`` for chunks of ``rows`` rows of ``arrays`` (each ``[N, ...]``, or None),
    its per-row outputs (a pytree of ``[rows, ...]`` arrays) pasted into ``out_like``
    (a pytree of ``[N, ...]`` arrays of the outputs' shapes and dtypes, e.g. zeros).

    One call when ``rows`` covers them all; otherwise a loop, with the remainder as one more
    statically sized call (:func:`for_chunks`).
    """
    n = jax.tree.leaves(arrays)[0].shape[0]
    if rows >= n:
        return fn(*arrays)

    def body(start, size, acc):
        chunks = tuple(None if a is None else _xla.chunk(a, start, size, 0) for a in arrays)
        out = fn(*chunks)
        return jax.tree.map(lambda a, o: paste(a, o, start, 0), acc, out)

    return for_chunks(n, rows, body, out_like)


def by_row_chunks(
    fn,
    x: jax.Array,
    *others: jax.Array | None,
    fuses_whole: bool = False,
    fuses_whole_on_cpu: bool = False,
):
    """``fn(x, *others)`` of ``[..., C]`` arrays whose results are per row (``[..., k]``
    arrays), computed a chunk of rows at a time (``_xla.row_chunk``): whatever XLA keeps while
    reducing is the size of a chunk, on any XLA (tests/test_memory.py). ``fuses_whole``: XLA
    fuses ``fn`` whole without a temporary on the backends that read such a reduction whole;
    ``fuses_whole_on_cpu``: on CPU too."""
    lead, cols = x.shape[:-1], x.shape[-1]

    n = 1
    for d in lead:
        n *= d

    def rows_of(a):
        return None if a is None else jnp.reshape(jnp.broadcast_to(a, x.shape), (n, cols))

    arrays = (rows_of(x),) + tuple(rows_of(a) for a in others)
    shapes = jax.eval_shape(fn, *(None if a is None else a[:1] for a in arrays))
    out_like = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape[1:], s.dtype), shapes)
    rows = _xla.row_chunk(n, cols, fuses_whole, fuses_whole_on_cpu)
    out = map_rows(fn, arrays, rows, out_like)
    return jax.tree.map(lambda a: jnp.reshape(a, lead + a.shape[1:]), out)


def chunked_sum(
    fn: Callable, args: tuple, shape: tuple[int, ...], narrow_fuses_whole: bool = False
) -> jax.Array:
    """``sum(fn(*args))`` of an elementwise ``fn``, a chunk of rows at a time: the arguments of
    the full ``shape`` are cut into chunks of rows, the others (scalars, None) passed whole, so
    the elementwise values never exist as a whole array (XLA's CPU reductions do not fuse their
    producers). Float32 arguments are read whole where XLA fuses such a sum
    (``_xla.reads_whole_rows``); narrower ones too if ``narrow_fuses_whole`` (the sum and its
    derivative share no float32 array for XLA to keep)."""
    full = [a is not None and jnp.shape(a) == shape for a in args]
    if not shape:
        return jnp.sum(fn(*args))
    chunked = tuple(a for a, f in zip(args, full, strict=True) if f)

    def rows(*chunks):
        it = iter(chunks)
        values = fn(*(next(it) if f else a for a, f in zip(args, full, strict=True)))
        flat = (values.shape[0], math.prod(values.shape[1:]))
        return jnp.sum(jnp.reshape(values, flat), axis=-1, keepdims=True)

    # Rows of the array flattened to 2-D (a 1-D array is one row per element); sizes spelled
    # out, as -1 is undefined for an empty array.
    two_d = (math.prod(shape[:-1]), shape[-1]) if len(shape) > 1 else (shape[0], 1)
    chunked = tuple(jnp.reshape(a, two_d) for a in chunked)
    float32 = all(a.dtype == jnp.float32 for a in chunked)  # no conversion for XLA to keep
    return jnp.sum(by_row_chunks(rows, *chunked, fuses_whole=float32 or narrow_fuses_whole))
