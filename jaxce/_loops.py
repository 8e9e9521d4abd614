"""Loops over chunks of rows or columns, for computations that must never see a whole array.

The fused losses loop over blocks of ``x @ w`` (``_blocks``); the row statistics of the plain
and sharded losses loop over chunks of rows (``map_rows``), so that whatever XLA keeps while
reducing a chunk (a float32 copy, ``exp(z - max)``) is the size of a chunk, never of the
logits: the memory bound is a property of the program, not of a compiler's fusion choices.
Nothing is ever padded.

A chunk of rows is not a contiguous block: the rows are viewed as ``lanes`` equal parts, and a
chunk takes a run of consecutive rows from each part (:class:`Lanes`). Rows split over devices
by XLA's partitioner (a mesh of ``AxisType.Auto`` axes) are one or more whole parts on each
device, so every chunk is computed on all of them at once, each device on its own rows; a
contiguous block would lie on one device, and the partitioner would gather the whole array onto
every device to slice it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jaxce import _xla


def varying(x: jax.Array) -> frozenset:
    """The manual mesh axes ``x`` varies over (its ``vma`` type under ``shard_map``'s
    ``check_vma=True``); none outside ``shard_map``."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None and hasattr(mat, "varying"):
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def vary_like(tree, *refs):
    """``tree`` typed as varying over every axis any of ``refs`` varies over: the initial carry
    of a loop whose body mixes those inputs (a loop's carry keeps its type)."""
    axes = frozenset().union(*(varying(r) for r in jax.tree.leaves(refs)))

    def vary(leaf):
        missing = tuple(axes - varying(leaf))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(vary, tree)


def varying_like(*refs) -> Callable:
    """``tree -> vary_like(tree, *refs)``: a loop's initial value typed as varying like the
    inputs its body reads."""
    return lambda tree: vary_like(tree, *refs)


def sum_to(ct: jax.Array | None, primal: jax.Array | None) -> jax.Array | None:
    """A cotangent summed over the axes it varies over and ``primal`` does not: an input that
    is the same on every device of an axis (replicated) receives the sum of the devices'
    contributions (the transpose of JAX's implicit ``pvary``)."""
    if ct is None or primal is None:
        return ct
    out: jax.Array = ct
    extra = varying(out) - varying(primal)
    if extra:
        out = jax.lax.psum(out, tuple(extra))
    missing = varying(primal) - varying(out)
    if missing:
        out = jax.lax.pcast(out, tuple(missing), to="varying")
    return out


def cut(a: jax.Array, start, size: int, axis: int, shape=None) -> jax.Array:
    part = jax.lax.dynamic_slice_in_dim(a, start, size, axis)
    return part if shape is None else jnp.reshape(part, shape)


def paste(a: jax.Array, part: jax.Array, start, axis: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(a, part, start, axis)


def _loop(count: int, stride: int, step, carry):
    """``step(start, carry)`` for ``start`` in ``range(0, count * stride, stride)``, as a
    ``while_loop``. The loop steps ``start`` itself: each scalar operation of a loop's index is
    a kernel XLA's CPU compiler generates code for (milliseconds of compile time), and ``i *
    stride`` would be one more.

    Not a ``scan`` (what ``fori_loop`` with static bounds builds): these loops run inside
    ``jax.custom_jvp`` rules, and JAX's partial evaluation of a scan for reverse mode moves
    every loop-invariant value of its body out of the loop, materializing broadcasts such as a
    ``[token_chunk, V]`` block of zeros or a column iota (tests/test_linear.py, the memory
    section). A ``while_loop`` whose inputs are all known is kept whole. The loops compute
    primal values only; their derivatives are the hand-written rules. A derivative of a rule
    differentiates the loops themselves, which a ``while_loop`` allows in forward mode only:
    the row chunks' loop takes its derivative in a ``scan`` (:func:`_in_chunks`), and the
    fused loss's blocks have forward-over-reverse second derivatives only.
    """
    if not _xla.staged():  # op by op: a Python loop (see _xla.staged)
        for start in range(0, count * stride, stride):
            carry = step(jnp.int32(start), carry)
        return carry
    end = jnp.int32(count * stride)
    _, carry = jax.lax.while_loop(
        lambda c: c[0] < end,
        lambda c: (c[0] + jnp.int32(stride), step(c[0], c[1])),
        (jnp.int32(0), carry),
    )
    return carry


def for_chunks(total: int, size: int, body, carry):
    """``body(start, length, carry)`` over ``[0, total)`` in chunks of ``size``.

    Full chunks run in a loop (``start`` traced, ``length`` static); the remainder is one more
    call with its own static length. So no block is padded.
    """
    full, tail = divmod(total, size)
    if full == 1:
        carry = body(0, size, carry)
    elif full > 1:
        carry = _loop(full, size, lambda start, c: body(start, size, c), carry)
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

        def step(nominal, c):
            return body(nominal, None, c)

    else:

        def step(nominal, c):
            start = jnp.minimum(nominal, total - size)
            fresh = jax.lax.iota(jnp.int32, size) + start >= nominal
            return body(start, fresh, c)

    if count == 1:
        return step(0, carry)
    return _loop(count, size, step, carry)


# A run of rows taken from one lane is at least this long (in float32 bytes) in the plain
# losses' row chunks. Runs of one row read slower on XLA's CPU backend: value_and_grad of the
# bfloat16 soft-label loss at [8192, 1000] (chunks of 256 rows) took 1.39x the time of
# contiguous chunks with runs of one row (4000 bytes), 1.05x with runs of 4 (16 KiB), in the same
# rounds; float32, and the integer-label loss with every option, within noise of 1 with either.
MIN_RUN_BYTES = 16 * 1024
# And at least this many rows: with runs of one row, XLA's CPU backend keeps a copy of a chunk
# in the forward-over-reverse derivative (a Hessian-vector product of the soft-label loss at
# [4096, 4096]: 3.14 MiB of temporaries with runs of one row, 2.14 MiB with runs of two).
MIN_RUN_ROWS = 2
# Each lane holds a multiple of this many rows: TPUs lay arrays out in tiles of 8 to 32 rows
# (by dtype), and a view whose lanes cut through the tiles would be a copy of the whole array.
LANE_ROWS = 32


def partitionable() -> bool:
    """Whether XLA's partitioner may split rows over devices: more than one device in this
    process. With one, chunks are contiguous (one lane): lanes would cost compile time for
    nothing (value_and_grad with every option at [1024, 1000]: 343 ms against 293 ms)."""
    return jax.device_count() > 1


class Lanes(NamedTuple):
    """``[N, ...]`` row arrays seen as ``number`` lanes of ``N / number`` consecutive rows each
    (``[number, N / number, ...]``, a reshape that moves nothing); a chunk is the same run of
    rows of every lane, ``number * size`` rows in all, in lane order.

    A loop over such chunks keeps the data parallelism of rows split over devices: on a mesh
    of ``AxisType.Auto`` axes, XLA's partitioner lays a split row axis of the view over its
    lanes (when the number of devices divides ``number``), and each chunk is then computed on
    every device, from its own rows (tests/_sharded_checks.py,
    ``automatic_axes_keep_every_row_chunk_on_its_devices``).
    """

    number: int

    @staticmethod
    def of(total: int, size: int, row_bytes: int | None = None) -> Lanes:
        """The lanes of a loop over chunks of ``size`` of ``total`` rows, each ``row_bytes``
        wide: the largest power of two that divides both (a chunk is then ``size`` rows, the
        lanes' runs ``size / number`` rows), with runs of at least ``MIN_RUN_BYTES`` and
        ``MIN_RUN_ROWS`` (without ``row_bytes``, a run may be one row) and lanes of a multiple of
        ``LANE_ROWS`` rows. One lane (contiguous chunks) when a chunk is all the rows, or in a
        process with one device (:func:`partitionable`)."""
        if size >= total or not partitionable():
            return Lanes(1)
        run = 1
        if row_bytes is not None:
            run = max(MIN_RUN_ROWS, -(-MIN_RUN_BYTES // max(row_bytes, 1)))
        number = 1
        while (
            size % (2 * number) == 0
            and 2 * number * run <= size
            and total % (2 * number * LANE_ROWS) == 0
        ):
            number *= 2
        return Lanes(number)

    def view(self, a: jax.Array) -> jax.Array:
        """``[N, ...]`` as ``[number, N / number, ...]``."""
        if self.number == 1:
            return a
        return jnp.reshape(a, (self.number, a.shape[0] // self.number) + a.shape[1:])

    def whole(self, a: jax.Array) -> jax.Array:
        """The inverse of :meth:`view`."""
        if self.number == 1:
            return a
        return jnp.reshape(a, (a.shape[0] * a.shape[1],) + a.shape[2:])

    def cut(self, a: jax.Array, start, size: int) -> jax.Array:
        """Rows ``[start, start + size)`` of every lane of a viewed array, as ``[number * size,
        ...]``."""
        return self._rows(cut, a, start, size)

    def chunk(self, a: jax.Array, start, size: int) -> jax.Array:
        """:meth:`cut` that converts a narrow float a chunk at a time (:func:`_xla.chunk`)."""
        return self._rows(_xla.chunk, a, start, size)

    def _rows(self, take: Callable, a: jax.Array, start, size: int) -> jax.Array:
        if self.number == 1:
            return take(a, start, size, 0)
        return take(a, start, size, 1, (self.number * size,) + a.shape[2:])

    def paste(self, a: jax.Array, part: jax.Array, start) -> jax.Array:
        """``part`` (``[number * size, ...]``, as :meth:`cut` returns) written into a viewed
        array at rows ``[start, start + size)`` of every lane."""
        if self.number == 1:
            return paste(a, part, start, 0)
        size = part.shape[0] // self.number
        return paste(a, jnp.reshape(part, (self.number, size) + part.shape[1:]), start, 1)

    def tile(self, per_lane: jax.Array) -> jax.Array:
        """A ``[size]`` mask of a chunk's rows in each lane as the chunk's ``[number * size]``."""
        return per_lane if self.number == 1 else jnp.tile(per_lane, self.number)


class SubRows(NamedTuple):
    """``[..., C]`` rows seen as ``blocks`` sub-rows each (``_xla.row_blocks``): a view
    ``[rows * blocks, C / blocks]`` (a reshape that moves nothing, behind an optimization
    barrier) whose rows are reduced, and whose per-row results are merged back into the rows'.
    With one block every method returns its argument, so callers write one computation."""

    blocks: int
    shape: tuple[int, ...]  # the rows' shape, [..., C]

    @staticmethod
    def of(x: jax.Array) -> SubRows:
        blocks = _xla.row_blocks(x.shape[-1], x.dtype) if x.ndim else 1
        return SubRows(blocks, tuple(x.shape))

    @property
    def rows(self) -> int:
        """The number of rows (not sub-rows)."""
        return math.prod(self.shape[:-1])

    def view(self, *arrays: jax.Array | None) -> tuple:
        """``[..., C]`` arrays (or None) as ``[rows * blocks, C / blocks]``, all behind one
        barrier."""
        if self.blocks == 1:
            return arrays
        flat = (self.rows * self.blocks, self.shape[-1] // self.blocks)
        present = [jnp.reshape(a, flat) for a in arrays if a is not None]
        viewed = iter(jax.lax.optimization_barrier(present))
        return tuple(None if a is None else next(viewed) for a in arrays)

    def classes(self, v: jax.Array | None) -> jax.Array | None:
        """A per-class ``[C]`` vector as the view's ``[rows * blocks, C / blocks]`` (None:
        None); with one block, as it is."""
        if v is None or self.blocks == 1:
            return v
        rows, width = self.rows, self.shape[-1] // self.blocks
        blocked = jnp.broadcast_to(
            jnp.reshape(v, (1, self.blocks, width)), (rows, self.blocks, width)
        )
        return jnp.reshape(blocked, (rows * self.blocks, width))  # sizes spelled out: no -1

    def spread(self, per_row: jax.Array) -> jax.Array:
        """A per-row ``[..., 1]`` value as each of its sub-rows' ``[rows * blocks, 1]``."""
        if self.blocks == 1:
            return per_row
        rows = self.rows
        return jnp.repeat(jnp.reshape(per_row, (rows, 1)), self.blocks, axis=0)

    def _merged(self, reduce, per_sub_row: jax.Array) -> jax.Array:
        if self.blocks == 1:
            return per_sub_row
        blocked = jnp.reshape(per_sub_row, self.shape[:-1] + (self.blocks, 1))
        return reduce(blocked, axis=-2)

    def max(self, per_sub_row: jax.Array) -> jax.Array:
        """The rows' ``[..., 1]`` max of their sub-rows' ``[rows * blocks, 1]`` maxima (NaN
        if any is NaN)."""
        return self._merged(jnp.max, per_sub_row)

    def sum(self, per_sub_row: jax.Array) -> jax.Array:
        """The rows' ``[..., 1]`` sum of their sub-rows' ``[rows * blocks, 1]`` sums."""
        return self._merged(jnp.sum, per_sub_row)

    def whole(self, a: jax.Array) -> jax.Array:
        """A ``[rows * blocks, C / blocks]`` array of the view as ``[..., C]``."""
        return a if self.blocks == 1 else jnp.reshape(a, self.shape)


def _lanes_of_rows(a: jax.Array, rows: int) -> Lanes:
    """The lanes of chunks of ``rows`` rows of ``a`` (``[N, ...]``), with runs of at least
    ``MIN_RUN_BYTES`` of float32."""
    return Lanes.of(a.shape[0], rows, 4 * math.prod(a.shape[1:]))


class _SideBySide(NamedTuple):
    """A loop's per-row outputs (``[N, k]`` arrays) carried as one ``[N, sum k]`` array per
    dtype: XLA's CPU compiler generates a kernel for each array a loop pastes a chunk into, and
    each costs milliseconds of compile time (docs/performance.md), for a few numbers per row."""

    groups: tuple[tuple[int, ...], ...]  # the outputs in each carried array, in order
    dtypes: tuple  # each carried array's dtype
    widths: tuple[int, ...]  # each output's k

    @staticmethod
    def of(outputs: list) -> _SideBySide:
        by_dtype: dict = {}
        for i, a in enumerate(outputs):
            by_dtype.setdefault(jnp.dtype(a.dtype), []).append(i)
        groups = tuple(tuple(g) for g in by_dtype.values())
        return _SideBySide(groups, tuple(by_dtype), tuple(a.shape[1] for a in outputs))

    def pack(self, outputs: list) -> list:
        return [jnp.concatenate([outputs[i] for i in g], axis=-1) for g in self.groups]

    def zeros(self, n: int, refs) -> list:
        """The ``[n, sum k]`` zeros to carry, typed as varying like ``refs`` (the inputs the
        outputs are computed from)."""
        return [
            vary_like(jnp.zeros((n, sum(self.widths[i] for i in g)), dtype), refs)
            for g, dtype in zip(self.groups, self.dtypes, strict=True)
        ]

    def unpack(self, carried: list) -> list:
        outputs: list = [None] * len(self.widths)
        for group, a in zip(self.groups, carried, strict=True):
            at = 0
            for i in group:
                outputs[i] = a[:, at : at + self.widths[i]]
                at += self.widths[i]
        return outputs


def map_rows(fn: Callable, arrays: tuple, rows: int, out_types, refs):
    """``fn(*chunks)`` for chunks of ``rows`` rows of ``arrays`` (each ``[N, ...]``, or None;
    taken across :class:`Lanes`), its per-row outputs (a pytree of ``[rows, k]`` arrays, of the
    shapes and dtypes of ``out_types``) pasted together, in a loop, with the remainder as one
    more statically sized call (:func:`for_chunks`). The results vary over the mesh axes any of
    ``refs`` does. Outputs of one dtype are carried side by side (:class:`_SideBySide`).
    """
    first = jax.tree.leaves(arrays)[0]
    n = first.shape[0]
    lanes = _lanes_of_rows(first, rows)
    viewed = tuple(None if a is None else lanes.view(a) for a in arrays)
    types, tree = jax.tree.flatten(out_types)
    side_by_side = _SideBySide.of(types)

    def body(start, size, acc):
        chunks = tuple(None if a is None else lanes.chunk(a, start, size) for a in viewed)
        out = side_by_side.pack(jax.tree.leaves(fn(*chunks)))
        return [lanes.paste(a, o, start) for a, o in zip(acc, out, strict=True)]

    out = for_chunks(
        n // lanes.number,
        rows // lanes.number,
        body,
        [lanes.view(a) for a in side_by_side.zeros(n, refs)],
    )
    return jax.tree.unflatten(tree, side_by_side.unpack([lanes.whole(a) for a in out]))


def by_row_chunks(
    fn,
    x: jax.Array,
    *others: jax.Array | None,
    shared: tuple = (),
    fuses_whole: bool = False,
    fuses_whole_on_cpu: bool = False,
    per_row: bool = False,
):
    """``fn(x, *others, *shared)`` of ``[..., C]`` arrays ``x, *others`` whose results are per
    row (``[..., k]`` arrays), computed a chunk of rows at a time (``_xla.row_chunk``): whatever
    XLA keeps while reducing is the size of a chunk, on any XLA (tests/test_memory.py).
    ``shared``: what every chunk reads whole (class weights, hyperparameters), passed to ``fn``
    as arguments: ``fn`` closes over no traced value, so that the chunks' derivative can be
    taken in every mode (:func:`_in_chunks`). ``fuses_whole``: XLA fuses ``fn`` whole without a
    temporary on the backends that read such a reduction whole; ``fuses_whole_on_cpu``: on CPU
    too. ``per_row``: an ``other`` of ``[..., 1]`` is cut into chunks as it is (one number per
    row), not broadcast to ``[..., C]`` first."""
    lead, cols = x.shape[:-1], x.shape[-1]

    n = 1
    for d in lead:
        n *= d

    def rows_of(a):
        if a is None:
            return None
        width = 1 if per_row and a.shape[-1] == 1 else cols
        return jnp.reshape(jnp.broadcast_to(a, lead + (width,)), (n, width))

    arrays = (rows_of(x),) + tuple(rows_of(a) for a in others)
    rows = _xla.row_chunk(n, cols, fuses_whole, fuses_whole_on_cpu)
    if rows >= n:
        out = fn(*arrays, *shared)
    else:
        out = _in_chunks(fn, rows, arrays, tuple(shared))
    return jax.tree.map(lambda a: jnp.reshape(a, lead + a.shape[1:]), out)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _in_chunks(fn, rows: int, arrays: tuple, shared: tuple):
    """``fn(*arrays, *shared)`` with ``arrays`` (``[N, C]``, or None) cut into chunks of
    ``rows`` rows (:func:`map_rows`).

    The chunks' loop is a ``while_loop`` (:func:`_loop`), which JAX differentiates in forward
    mode only. These loops compute the row statistics that derivative rules read, and a
    derivative of a derivative (``jax.grad`` of ``jax.grad``, ``jax.hessian``) differentiates
    them: here it is ``fn``'s own derivative, taken a chunk at a time in a ``scan``, which
    every mode can take and reverse mode transposes. First derivatives never differentiate the
    loop (the rules call it on their primal inputs); forward over reverse (``jax.hessian``, a
    Hessian-vector product) keeps the chunks' memory bound, and reverse over reverse keeps the
    scan's residuals, of the arrays' size.
    """

    def of_chunks(*chunks):
        return fn(*chunks, *shared)

    if _xla.staged():
        # Traced once for both the results' types and the loop's body: a jit's trace is cached
        # by its function and its inputs' types, and inlined where it is called.
        of_chunks = jax.jit(of_chunks, inline=True)
    chunk_types = (
        None if a is None else jax.ShapeDtypeStruct((rows,) + a.shape[1:], a.dtype) for a in arrays
    )
    # Inside shard_map the chunks' results vary over the mesh axes their inputs do.
    return map_rows(
        of_chunks, arrays, rows, jax.eval_shape(of_chunks, *chunk_types), (arrays, shared)
    )


def is_zero(tangent: object) -> bool:
    """Whether a tangent is zero by its type: absent, a symbolic zero (an input that is not
    differentiated) or a float0 one (an integer or boolean input's)."""
    return (
        tangent is None
        or isinstance(tangent, SymbolicZero)
        or getattr(tangent, "dtype", None) == jax.dtypes.float0
    )


def _zeros(t, shape: tuple[int, ...]) -> jax.Array | np.ndarray:
    """Zeros of the tangent ``t``'s dtype (float0 for an integer or boolean input) and
    ``shape``."""
    aval = cast(jax.core.ShapedArray, t.aval) if isinstance(t, SymbolicZero) else t
    dtype = jnp.dtype(aval.dtype)
    return np.zeros(shape, dtype) if dtype == jax.dtypes.float0 else jnp.zeros(shape, dtype)


def _in_chunks_jvp(fn, rows, primals, tangents):
    arrays, shared = primals
    arrays_dot, shared_dot = tangents
    shared_dot = jax.tree.map(
        lambda t, s: _zeros(t, jnp.shape(s)) if is_zero(t) else t, shared_dot, shared
    )

    first = arrays[0]
    lanes = _lanes_of_rows(first, rows)
    viewed = tuple(None if a is None else lanes.view(a) for a in arrays)
    viewed_dots = tuple(None if is_zero(t) else lanes.view(t) for t in arrays_dot)

    def tangent(start, size: int):
        """The tangent of rows ``[start, start + size)`` of every lane, ``[lanes, size, ...]``;
        a zero tangent (an input that is not differentiated) is made a chunk at a time, never
        as a whole array."""

        def rows_of(a):
            return None if a is None else lanes.chunk(a, start, size)

        def dot_rows_of(t, dot, a):
            if a is None:
                return None
            if is_zero(t):
                return _zeros(t, (lanes.number * size,) + a.shape[1:])
            return lanes.chunk(dot, start, size)

        chunks = tuple(rows_of(a) for a in viewed)
        dots = tuple(
            dot_rows_of(t, dot, a)
            for t, dot, a in zip(arrays_dot, viewed_dots, arrays, strict=True)
        )
        out = jax.jvp(lambda a, s: fn(*a, *s), (chunks, shared), (dots, shared_dot))[1]
        return jax.tree.map(lambda o: jnp.reshape(o, (lanes.number, size) + o.shape[1:]), out)

    run = rows // lanes.number
    full, tail = divmod(first.shape[0] // lanes.number, run)
    parts = []
    if full:  # a scan, which reverse mode transposes, over the full chunks

        def step(carry, i):
            return carry, tangent(i * run, run)

        _, stacked = jax.lax.scan(step, None, jnp.arange(full, dtype=jnp.int32))
        # [full, lanes, run, ...] -> [lanes, full * run, ...]
        parts.append(
            jax.tree.map(
                lambda a: jnp.reshape(
                    jnp.swapaxes(a, 0, 1), (lanes.number, full * run) + a.shape[3:]
                ),
                stacked,
            )
        )
    if tail:
        parts.append(tangent(full * run, tail))
    dot = (
        parts[0] if len(parts) == 1 else jax.tree.map(lambda *p: jnp.concatenate(p, axis=1), *parts)
    )
    dot = jax.tree.map(lambda a: jnp.reshape(a, (a.shape[0] * a.shape[1],) + a.shape[2:]), dot)
    return _in_chunks(fn, rows, arrays, shared), dot


_in_chunks.defjvp(_in_chunks_jvp, symbolic_zeros=True)


def chunked_sum(
    fn: Callable, args: tuple, shape: tuple[int, ...], narrow_fuses_whole: bool = False
) -> jax.Array:
    """``sum(fn(*args))`` of an elementwise ``fn``, a chunk of rows at a time: the arguments of
    the full ``shape``, or of one number per row (``[..., 1]``), are cut into chunks of rows, the
    others (scalars, None, arrays of ``[1, ..., 1, C]``) passed whole (as :func:`by_row_chunks`'s
    ``shared``), so the elementwise values never exist as a whole array (XLA's CPU reductions do
    not fuse their producers), nor does such an argument broadcast to the full shape (any other
    is broadcast to it). Float32 arguments are read whole where XLA fuses such a sum
    (``_xla.reads_whole_rows``); narrower ones too if ``narrow_fuses_whole`` (the sum and its
    derivative share no float32 array for XLA to keep)."""
    if not shape:
        return jnp.sum(fn(*args))
    # Rows of the array flattened to 2-D (a 1-D array is one row per element); sizes spelled
    # out, as -1 is undefined for an empty array.
    two_d = (math.prod(shape[:-1]), shape[-1]) if len(shape) > 1 else (shape[0], 1)

    def per_row(a) -> bool:
        return len(shape) > 1 and jnp.shape(a) == shape[:-1] + (1,)

    def whole_rows(a) -> bool:  # scalars, None and [1, ..., 1, C]: the same for every row
        return a is None or jnp.ndim(a) < 2 or all(d == 1 for d in jnp.shape(a)[:-1])

    full = [a is not None and (jnp.shape(a) == shape or not whole_rows(a)) for a in args]
    chunked = tuple(
        jnp.reshape(a, (two_d[0], 1))
        if per_row(a)
        else jnp.reshape(jnp.broadcast_to(a, shape), two_d)
        for a, f in zip(args, full, strict=True)
        if f
    )
    whole = tuple(
        a if a is None or jnp.ndim(a) < 2 else jnp.reshape(a, (1, jnp.shape(a)[-1]))
        for a, f in zip(args, full, strict=True)
        if not f
    )

    def rows(*chunks_and_whole):
        chunks = iter(chunks_and_whole[: len(chunked)])
        rest = iter(chunks_and_whole[len(chunked) :])
        values = fn(*(next(chunks) if f else next(rest) for f in full))
        flat = (values.shape[0], math.prod(values.shape[1:]))
        return jnp.sum(jnp.reshape(values, flat), axis=-1, keepdims=True)

    float32 = all(a.dtype == jnp.float32 for a in chunked)  # no conversion for XLA to keep
    fuses_whole = float32 or narrow_fuses_whole
    return jnp.sum(
        by_row_chunks(rows, *chunked, shared=whole, fuses_whole=fuses_whole, per_row=True)
    )
