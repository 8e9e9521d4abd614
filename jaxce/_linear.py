"""The fused linear + softmax cross-entropy: the loss of the logits ``x @ w + bias`` without them.

In a language model the last layer's logits ``[N, V]`` (N tokens, a vocabulary of V up to
256k) dominate memory. This module computes the integer-label cross-entropy of
``x @ w + bias`` block by block, so no ``[N, V]`` array exists in the forward or the backward
pass, with exactly the semantics of ``softmax_cross_entropy_with_integer_labels``: the same
``RowStats`` are accumulated over blocks and the same ``row_loss``/``row_grad_coefficients``/
``logit_gradient`` turn them into the loss and ``dloss/dz`` of each block.

Two strategies, both hand-written ``custom_vjp`` rules:

* **single pass** (``reduction="mean"``/``"sum"``): over chunks of ``token_chunk`` rows, the
  forward rule computes the block of logits for the whole vocabulary, its row statistics and
  at once ``dz``, ``dx = dz w^T`` and ``dw += x^T dz``: 6NDV FLOPs. The cotangent of a reduced
  loss is one scalar ``g``, so the unscaled gradients are the residuals and the backward rule
  only multiplies them by ``g``.
* **recompute** (``reduction="none"``, whose per-token cotangent cannot be factored out of
  ``dw``; a bfloat16/float16 ``w``, for which the single pass would need a float32 ``[D, V]``
  accumulator; or ``recompute_logits=True``): the forward rule keeps only the row statistics
  (O(N) residuals) and the backward rule recomputes each ``[token_chunk, vocab_chunk]`` block
  of logits: 8NDV FLOPs.

Vocabulary and token sizes need not divide the chunks, and nothing is ever padded, so padding
can never enter the logsumexp or a mean's denominator. The recompute strategy runs full chunks
in a loop and the remainder as one more statically sized block; the single pass, whose loops
carry the ``[D, V]`` gradient (which XLA would copy into a remainder block), runs every chunk
in one loop, the last one shifted back to overlap its predecessor, whose rows count as ignored
tokens there (and whose columns get a zero ``dz``). Block statistics are merged the online
softmax way, as a row max and a sum of ``exp(z - max)``, never as one logsumexp, so
``lse - z_y`` keeps its digits at huge logits. ``w`` is only ever read a chunk at a time with
``dynamic_slice``, so a bfloat16 ``w`` is never converted to float32 as a whole; products
accumulate in float32 (``preferred_element_type``).
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxce import _checks
from jaxce._cross_entropy import (
    Options,
    RowStats,
    admissible,
    finalize_rows,
    label_weight,
    logit_gradient,
    make_options,
    normalizer,
    one_hot,
    row_grad_coefficients,
    row_loss,
    row_status,
    safe_labels,
)
from jaxce._layout import compute_dtype
from jaxce._reduction import reduce_loss
from jaxce._sigmoid import soft_cap, soft_cap_derivative

# Default chunk sizes per backend, measured on CPU with `python -m jaxce.bench linear` (see the
# README): (rows of the recompute strategy's blocks, its vocabulary chunk, the byte budget of
# one float32 [token_chunk, V] block of the single-pass strategy). Accelerators have the memory
# bandwidth and the parallelism for bigger blocks; their single-pass block is bounded so that
# it stays far below the [N, V] logits it replaces.
_DEFAULTS = {
    "cpu": (1024, 2048, 24 * 2**20),
    "gpu": (4096, 8192, 512 * 2**20),
    "tpu": (4096, 8192, 512 * 2**20),
}


class _Static(NamedTuple):
    """Hashable settings that shape the computation (``nondiff_argnums`` of the rules)."""

    ignore_index: int | None
    token_chunk: int
    vocab_chunk: int


class _Partial(NamedTuple):
    """Row statistics of a block of columns, each ``[rows, 1]``; merged across blocks.

    The logsumexp is kept as a max and a sum shifted by it (``lse = max + log sum_exp``), never
    as one number: at logits of 1e4 ``max + log sum_exp`` rounds away the digits of the log-sum
    that ``lse - z_y`` needs (``RowStats`` keeps the two apart for the same reason).
    """

    max: jax.Array  # the block's row max (-inf for no admissible class, +inf/NaN as they come)
    sum_exp: jax.Array  # sum exp(z - max), the shift being 0 where max is not finite
    count: jax.Array | None  # only with label smoothing
    weight_total: jax.Array | None
    scaled_logit_sum: jax.Array | None  # sum_A w_c z_c / V: divided by V so it cannot overflow


# ---------------------------------------------------------------------------------- blocks
def _matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int], dtype) -> jax.Array:
    """``a`` times ``b`` over the given axes, accumulated in ``dtype`` (float32 for bf16).

    Operands of one dtype are multiplied as they are (bf16 x bf16 -> f32 on accelerators);
    mixed operands are both cast to ``dtype`` first.
    """
    if a.dtype != b.dtype:
        a, b = a.astype(dtype), b.astype(dtype)
    return jax.lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=dtype
    )


def _compute_dtype(x: jax.Array, w: jax.Array):
    """float64 if either input is float64, else float32 (spelled out: strict promotion)."""
    return compute_dtype(jnp.float64 if jnp.float64 in (x.dtype, w.dtype) else x.dtype)


def _slice(a: jax.Array, start, size: int, axis: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, start, size, axis)


def _for_chunks(total: int, size: int, body, carry):
    """``body(start, length, carry)`` over ``[0, total)`` in chunks of ``size``.

    Full chunks run in a ``fori_loop`` (``start`` traced, ``length`` static); the remainder is
    one more call with its own static length. So no block is padded.
    """
    full, tail = divmod(total, size)
    if full == 1:
        carry = body(0, size, carry)
    elif full > 1:
        carry = jax.lax.fori_loop(0, full, lambda i, c: body(i * size, size, c), carry)
    if tail:
        carry = body(full * size, tail, carry)
    return carry


def _overlapping_chunks(total: int, size: int, body, carry):
    """``body(start, fresh, carry)`` over ``ceil(total / size)`` chunks of exactly ``size`` rows.

    The last chunk starts at ``total - size`` when ``size`` does not divide ``total``, so it
    overlaps the one before; ``fresh`` (``[size]`` booleans, None when ``size`` divides
    ``total``) marks the entries no earlier chunk had, and ``body`` makes the others contribute
    nothing (rows become ignored tokens, columns get a zero ``dz``). Every chunk then runs in
    one loop: a remainder called after the loop, as in ``_for_chunks``, makes XLA copy a
    loop-carried ``[D, V]`` accumulator. Nothing is padded, so no padding can enter a
    statistic or a mean's denominator.
    """
    count = -(-total // size)
    if total % size == 0:
        step = lambda i, c: body(i * size, None, c)  # noqa: E731
    else:

        def step(i, c):
            nominal = i * size
            start = jnp.minimum(nominal, total - size)
            fresh = jax.lax.iota(jnp.int32, size) + start >= nominal
            return body(start, fresh, c)

    if count == 1:
        return step(0, carry)
    return jax.lax.fori_loop(0, count, step, carry)


class _Block(NamedTuple):
    """One block of logits ``[rows, cols]`` (raw and soft-capped) and what goes with it."""

    raw: jax.Array  # x @ w + bias, in the compute dtype
    z: jax.Array  # capped logits
    adm: jax.Array  # admissible: z > -inf
    onehot: jax.Array  # the label's column, if it falls in this block
    weights: jax.Array | None  # the block's class weights


def _columns(w: jax.Array, col0, cols: int, dtype) -> jax.Array:
    """Columns ``[col0, col0 + cols)`` of ``w`` (``[D, cols]``), in ``w``'s dtype.

    XLA's CPU backend multiplies bfloat16 by converting to float32, moves that convert ahead
    of a ``dynamic_slice`` and then out of the loop: a float32 copy of all of ``w``
    (optimization barriers are removed before that happens on CPU). Reading the chunk inside
    a ``cond`` whose predicate depends on the loop index keeps the convert after the slice,
    so only one chunk is ever float32. Other backends multiply bfloat16 natively.
    """
    if cols == w.shape[1] and not isinstance(col0, jax.Array):
        return w
    if w.dtype == dtype or jax.default_backend() != "cpu" or not isinstance(col0, jax.Array):
        return _slice(w, col0, cols, 1)
    read = lambda w: _slice(w, col0, cols, 1).astype(dtype)  # noqa: E731
    unreachable = lambda w: jnp.zeros((w.shape[0], cols), dtype)  # noqa: E731
    return jax.lax.cond(col0 >= 0, read, unreachable, w)


def _logits(x, w, bias, col0, cols: int, dtype) -> jax.Array:
    """``x @ w[:, cols] + bias[cols]`` for rows ``x`` (``[rows, D]``), accumulated in ``dtype``."""
    raw = _matmul(x, _columns(w, col0, cols, dtype), (1, 0), dtype)
    if bias is not None:
        b = bias if cols == bias.shape[0] else _slice(bias, col0, cols, 0)
        raw = raw + b.astype(dtype)[None, :]
    return raw


def _block(raw, weights, safe, col0, options: Options) -> _Block:
    """The block of raw logits ``raw`` (columns ``[col0, col0 + cols)``) with what goes with it."""
    cols = raw.shape[1]
    if weights is not None and cols != weights.shape[0]:
        weights = _slice(weights, col0, cols, 0)
    z = raw if options.logit_soft_cap is None else soft_cap(raw, options.logit_soft_cap)
    return _Block(raw, z, admissible(z, None), one_hot(safe, z, col0), weights)


def _finite_or_zero(a: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(a), a, jnp.zeros_like(a))


def _block_stats(blk: _Block, num_classes: int, smoothing: bool) -> _Partial:
    """The block's row max ``m`` and ``sum exp(z - m)`` (shifted by 0 where ``m`` is not finite,
    so an all ``-inf`` row sums to 0, not NaN) and, with smoothing, the block's share of ``K``,
    ``W`` and ``sum_A w_c z_c / V``."""
    z = blk.z
    zero = jnp.zeros_like(z)
    m = jnp.max(z, axis=-1, keepdims=True)
    sum_exp = jnp.sum(jnp.exp(z - _finite_or_zero(m)), axis=-1, keepdims=True)
    if not smoothing:
        return _Partial(m, sum_exp, None, None, None)
    w = jnp.ones_like(z) if blk.weights is None else blk.weights.astype(z.dtype)[None, :]
    return _Partial(
        m,
        sum_exp,
        jnp.sum(blk.adm.astype(z.dtype), axis=-1, keepdims=True),
        jnp.sum(jnp.where(blk.adm, w, zero), axis=-1, keepdims=True),
        jnp.sum(jnp.where(blk.adm, w * z / num_classes, zero), axis=-1, keepdims=True),
    )


def _merge(a: _Partial, b: _Partial) -> _Partial:
    """Statistics of the union of two blocks, the online softmax way: the larger max is the
    new shift and the other block's sum is rescaled by ``exp(m_old - m)`` (at most 1).

    A block whose max already is the new one keeps its sum as it is (the same shift: this also
    covers two empty blocks, -inf and -inf, and +inf); an empty block (-inf, sum 0) rescales to
    0.
    """
    m = jnp.maximum(a.max, b.max)

    def rescaled(p: _Partial) -> jax.Array:
        return jnp.where(p.max == m, p.sum_exp, p.sum_exp * jnp.exp(p.max - m))

    add = lambda u, v: None if u is None else u + v  # noqa: E731
    return _Partial(
        m,
        rescaled(a) + rescaled(b),
        add(a.count, b.count),
        add(a.weight_total, b.weight_total),
        add(a.scaled_logit_sum, b.scaled_logit_sum),
    )


def _empty(rows: int, dtype, smoothing: bool) -> _Partial:
    """The statistics of no columns: max -inf, sum 0."""
    zeros = jnp.zeros((rows, 1), dtype)
    extra = zeros if smoothing else None
    return _Partial(jnp.full((rows, 1), -jnp.inf, dtype), zeros, extra, extra, extra)


def _row_stats(p: _Partial, label_logit: jax.Array, num_classes: int) -> RowStats:
    """The ``RowStats`` of ``_cross_entropy`` from statistics merged over the whole vocabulary:
    ``max`` (0 where not finite) and ``log_sum = log sum_exp`` (-inf for an empty row) apart."""
    m, log_sum = _finite_or_zero(p.max), jnp.log(p.sum_exp)
    if p.count is None:
        ones = jnp.ones_like(m)
        return RowStats(m, log_sum, label_logit, ones, ones, jnp.zeros_like(ones))
    mean_logit = p.scaled_logit_sum * (num_classes / jnp.maximum(p.count, 1))
    return RowStats(m, log_sum, label_logit, p.count, p.weight_total, mean_logit)


def _label_logits(x, w, bias, safe, options: Options, dtype) -> jax.Array:
    """``z_y = cap(x_i . w[:, y_i] + b[y_i])`` (``[rows, 1]``) from the label's column of ``w``
    alone ([D, rows] gathered), rather than picked out of a block of logits, which would cost
    XLA a second block-sized buffer."""
    columns = jnp.take(w, safe, axis=1).astype(dtype)  # [D, rows]
    raw = jnp.sum(x.astype(dtype) * columns.T, axis=-1, keepdims=True)
    if bias is not None:
        raw = raw + jnp.take(bias, safe).astype(dtype)[:, None]
    return raw if options.logit_soft_cap is None else soft_cap(raw, options.logit_soft_cap)


class _Rows(NamedTuple):
    """Per-row quantities derived from the labels and the row statistics, each ``[rows, 1]``."""

    safe: jax.Array  # [rows] labels clamped into range
    w_y: jax.Array
    active: jax.Array
    poisoned: jax.Array


def _rows(labels, stats: RowStats, weights, num_classes, ignore_index) -> _Rows:
    safe, in_range = safe_labels(labels, num_classes)
    w_y = label_weight(weights, safe, stats.lse.dtype)
    active, poisoned = row_status(labels, in_range, stats.lse, ignore_index)
    return _Rows(safe, w_y, active, poisoned)


def _block_dz(blk: _Block, stats: RowStats, rows: _Rows, g: jax.Array, options) -> jax.Array:
    """``g * dloss/draw`` on a block (``g`` finalized: 0 on inactive rows, NaN on poisoned),
    through the soft cap: ``d/dx cap tanh(x / cap) = 1 - tanh(x / cap)**2``."""
    coefficients = row_grad_coefficients(stats, rows.w_y, options)
    dz = logit_gradient(blk.z, blk.adm, blk.onehot, blk.weights, stats, coefficients, g)
    if options.logit_soft_cap is not None:
        dz = dz * soft_cap_derivative(blk.raw, options.logit_soft_cap)
    return dz


def _smoothing_weight_grad(blk: _Block, stats: RowStats, g: jax.Array, options) -> jax.Array:
    """The smoothing term of ``dloss/dw_c`` summed over the block's rows:
    ``sum_i g_i eps / K_i (lse_i - z_ic) [c in A_i]`` (``[cols]``), with ``lse - z`` as
    ``(max - z) + log_sum``."""
    gap = (stats.max - blk.z) + stats.log_sum_or_zero()
    scale = options.label_smoothing / jnp.maximum(stats.count, 1) * g
    terms = jnp.where(blk.adm, gap * scale, jnp.zeros_like(blk.z))
    return jnp.sum(terms, axis=0)


def _row_parameter_grads(stats: RowStats, rows: _Rows, options, g: jax.Array):
    """Per-row pieces of the gradients that do not depend on the logits block by block:
    ``dloss/dw_y`` (the label's class weight), ``dloss/deps`` and ``dloss/dzl``, times ``g``.

    ``dloss/dw_y = (1-eps)(lse - z_y) + zl lse^2``; ``dloss/deps = eps-free smoothing term -
    w_y (lse - z_y)``; ``dloss/dzl = w_y lse^2``.
    """
    lse = stats.lse_or_zero()
    eps, zl = options.label_smoothing, options.z_loss
    nll = stats.nll()  # (max - z_y) + log_sum: exact at huge logits
    per_label = nll if eps is None else (1 - eps) * nll
    if zl is not None:
        per_label = per_label + zl * lse * lse
    d_eps = d_zl = None
    if eps is not None:
        d_eps = jnp.sum(g * (stats.smoothing_term() - rows.w_y * nll))
    if zl is not None:
        d_zl = jnp.sum(g * rows.w_y * lse * lse)
    return g * per_label, d_eps, d_zl


def _scatter_label_grad(weights, safe, per_label, dtype):
    """Adds each row's ``dloss/dw_y`` to its label's class weight."""
    return jnp.zeros(weights.shape, dtype).at[safe].add(per_label[:, 0])


def _options_cotangent(options: Options, d_eps, d_zl) -> Options:
    # The soft cap is a fixed architectural constant, as in the unfused loss.
    cap = options.logit_soft_cap
    return Options(
        None if d_eps is None else d_eps.astype(options.label_smoothing.dtype),
        None if d_zl is None else d_zl.astype(options.z_loss.dtype),
        None if cap is None else jnp.zeros_like(cap),
    )


# ------------------------------------------------------------- recompute (reduction="none")
def _unchanged(tree):
    return tree


def _local_statistics(x, w, bias, label_cols, weights, options, static, dtype, num_classes, vary):
    """Row partials (``_Partial``) of ``x @ w + bias`` over all of ``w``'s columns, for chunks of
    ``token_chunk`` rows at a time, each merged over chunks of ``vocab_chunk`` columns.

    ``label_cols`` are the labels as columns of ``w`` (-1 where a row's label is elsewhere) and
    ``num_classes`` the whole vocabulary's size (for the smoothing sums); ``vary`` adapts each
    loop's initial value (``jaxce.sharded`` types it as varying over its mesh axes).
    """
    n, v = x.shape[0], w.shape[1]
    smoothing = options.label_smoothing is not None

    def token_body(t0, rows, acc):
        x_t, labels_t = _slice(x, t0, rows, 0), _slice(label_cols, t0, rows, 0)

        def vocab_body(c0, cols, part):
            raw = _logits(x_t, w, bias, c0, cols, dtype)
            blk = _block(raw, weights, labels_t, c0, options)
            return _merge(part, _block_stats(blk, num_classes, smoothing))

        empty = vary(_empty(rows, dtype, smoothing))
        part = _for_chunks(v, static.vocab_chunk, vocab_body, empty)
        return jax.tree.map(
            lambda a, p: jax.lax.dynamic_update_slice_in_dim(a, p, t0, 0), acc, part
        )

    return _for_chunks(n, static.token_chunk, token_body, vary(_empty(n, dtype, smoothing)))


def _statistics(x, w, bias, safe, weights, options, static: _Static, dtype) -> RowStats:
    """Row statistics over vocabulary chunks, for chunks of ``token_chunk`` rows at a time."""
    v = w.shape[1]
    part = _local_statistics(x, w, bias, safe, weights, options, static, dtype, v, _unchanged)
    return _row_stats(part, _label_logits(x, w, bias, safe, options, dtype), v)


def _block_gradients(x, w, bias, weights, options, static, stats, rows, g, dtype, vary):
    """``(dx, dw, dbias, dclass_weights_smoothing)`` over ``w``'s columns, recomputing each
    ``[token_chunk, vocab_chunk]`` block of logits (``rows.safe`` are the labels as columns).

    The outer loop runs over vocabulary chunks, so each chunk of ``dw`` is complete (summed over
    all tokens in float32) when it is written, in ``w``'s dtype; ``dx`` accumulates in float32.
    ``vary`` adapts each loop's initial value, as in ``_local_statistics``.
    """
    (n, d), v = x.shape, w.shape[1]
    smoothing = weights is not None and options.label_smoothing is not None

    def vocab_body(c0, cols, acc):
        dx, dw, db, dwt = acc

        def token_body(t0, n_rows, inner):
            dx, dw_c, db_c, dwt_c = inner
            x_t = _slice(x, t0, n_rows, 0)
            stats_t = RowStats(*(_slice(s, t0, n_rows, 0) for s in stats))
            rows_t = _Rows(*(_slice(r, t0, n_rows, 0) for r in rows))
            g_t = _slice(g, t0, n_rows, 0)
            w_c = _columns(w, c0, cols, dtype)
            raw = _matmul(x_t, w_c, (1, 0), dtype)
            if bias is not None:
                raw = raw + _slice(bias, c0, cols, 0).astype(dtype)[None, :]
            blk = _block(raw, weights, rows_t.safe, c0, options)
            dz = _block_dz(blk, stats_t, rows_t, g_t, options)
            dx_t = _slice(dx, t0, n_rows, 0) + _matmul(dz, w_c, (1, 1), dtype)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dx_t, t0, 0)
            dw_c = dw_c + _matmul(x_t, dz, (0, 0), dtype)
            db_c = db_c + jnp.sum(dz, axis=0)
            if smoothing:
                dwt_c = dwt_c + _smoothing_weight_grad(blk, stats_t, g_t, options)
            return dx, dw_c, db_c, dwt_c

        zeros = jnp.zeros((cols,), dtype)
        init = vary((dx, jnp.zeros((d, cols), dtype), zeros, zeros))
        dx, dw_c, db_c, dwt_c = _for_chunks(n, static.token_chunk, token_body, init)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_c.astype(dw.dtype), c0, 1)
        db = jax.lax.dynamic_update_slice_in_dim(db, db_c, c0, 0)
        dwt = jax.lax.dynamic_update_slice_in_dim(dwt, dwt_c, c0, 0)
        return dx, dw, db, dwt

    init = (
        jnp.zeros((n, d), dtype),
        jnp.zeros((d, v), w.dtype),
        jnp.zeros((v,), dtype),
        jnp.zeros((v,), dtype),
    )
    return _for_chunks(v, static.vocab_chunk, vocab_body, vary(init))


# loss_i as in _cross_entropy; dloss_i/dz = a p - b [c = y] - c w [c in A] (row_grad_coefficients)
# and dx = dz w^T, dw = x^T dz, dbias = sum_i dz. Residuals: the inputs (alive anyway) and the five
# float32 row statistics, O(N); the backward rule recomputes each block of logits (8NDV FLOPs).
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _recompute(x, w, bias, labels, weights, options, static):
    return _recompute_fwd(x, w, bias, labels, weights, options, static)[0]


def _recompute_fwd(x, w, bias, labels, weights, options, static):
    dtype = _compute_dtype(x, w)
    safe, _ = safe_labels(labels, w.shape[1])
    stats = _statistics(x, w, bias, safe, weights, options, static, dtype)
    rows = _rows(labels, stats, weights, w.shape[1], static.ignore_index)
    loss = finalize_rows(row_loss(stats, rows.w_y, options), rows.active, rows.poisoned)
    return (loss[:, 0], rows.active[:, 0]), (x, w, bias, labels, weights, options, stats)


def _recompute_bwd(static, res, cotangents):
    x, w, bias, labels, weights, options, stats = res
    g, _ = cotangents  # the "counted" flags are boolean: no cotangent
    dtype = stats.lse.dtype
    rows = _rows(labels, stats, weights, w.shape[1], static.ignore_index)
    g = finalize_rows(g.astype(dtype)[:, None], rows.active, rows.poisoned)
    dx, dw, db, dwt = _block_gradients(
        x, w, bias, weights, options, static, stats, rows, g, dtype, _unchanged
    )
    per_label, d_eps, d_zl = _row_parameter_grads(stats, rows, options, g)
    d_weights = None
    if weights is not None:
        d_weights = _scatter_label_grad(weights, rows.safe, per_label, dtype) + dwt
        d_weights = d_weights.astype(weights.dtype)
    return (
        dx.astype(x.dtype),
        dw,
        None if bias is None else db.astype(bias.dtype),
        None,
        d_weights,
        _options_cotangent(options, d_eps, d_zl),
    )


_recompute.defvjp(_recompute_fwd, _recompute_bwd)


# ------------------------------------------------------------ single pass ("mean", "sum")
# The loss is reduced to one number, so its cotangent is a scalar g and every gradient is g times
# the gradient of the plain sum: the forward rule computes that unscaled gradient right after the
# row statistics of each token chunk (the block of logits is still there: 6NDV FLOPs, no
# recomputation) and saves it as the residual; the backward rule multiplies by g. Residuals:
# dx [N, D], dw [D, V], dbias [V] and class-weight / hyperparameter gradients, in float32.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _single_pass(x, w, bias, labels, weights, options, static):
    return _single_pass_fwd(x, w, bias, labels, weights, options, static)[0]


def _single_pass_fwd(x, w, bias, labels, weights, options, static):
    dtype = _compute_dtype(x, w)
    (n, d), v = x.shape, w.shape[1]
    smoothing = options.label_smoothing is not None
    smooth_weights = weights is not None and smoothing

    def token_body(t0, fresh, acc):
        total, active, dx, dw, db, dwt, d_eps, d_zl = acc
        n_rows = static.token_chunk
        x_t, labels_t = _slice(x, t0, n_rows, 0), _slice(labels, t0, n_rows, 0)
        safe_t, _ = safe_labels(labels_t, v)
        blk = _block(
            _block_logits(x_t, w, bias, static.vocab_chunk, dtype), weights, safe_t, 0, options
        )
        label_logit = _label_logits(x_t, w, bias, safe_t, options, dtype)
        stats = _row_stats(_block_stats(blk, v, smoothing), label_logit, v)
        rows = _rows(labels_t, stats, weights, v, static.ignore_index)
        if fresh is not None:  # rows of the previous chunk count as ignored tokens here
            fresh = fresh[:, None]
            rows = rows._replace(active=rows.active & fresh, poisoned=rows.poisoned & fresh)
        loss = finalize_rows(row_loss(stats, rows.w_y, options), rows.active, rows.poisoned)
        g = finalize_rows(jnp.ones_like(loss), rows.active, rows.poisoned)
        dz = _block_dz(blk, stats, rows, g, options)
        dx_t, dw = _block_grads(x_t, w, dz, dw, static.vocab_chunk, dtype)
        if fresh is not None:
            dx_t = jnp.where(fresh, dx_t, _slice(dx, t0, n_rows, 0))
        dx = jax.lax.dynamic_update_slice_in_dim(dx, dx_t, t0, 0)
        db = db + jnp.sum(dz, axis=0)
        per_label, de, dzl = _row_parameter_grads(stats, rows, options, g)
        if weights is not None:
            dwt = dwt + _scatter_label_grad(weights, rows.safe, per_label, dtype)
            if smooth_weights:
                dwt = dwt + _smoothing_weight_grad(blk, stats, g, options)
        d_eps = d_eps if de is None else d_eps + de
        d_zl = d_zl if dzl is None else d_zl + dzl
        total = total + jnp.sum(loss)
        active_t = rows.active[:, 0] | _slice(active, t0, n_rows, 0)  # keeps earlier chunks'
        active = jax.lax.dynamic_update_slice_in_dim(active, active_t, t0, 0)
        return total, active, dx, dw, db, dwt, d_eps, d_zl

    scalar = jnp.zeros((), dtype)
    init = (
        scalar,
        jnp.zeros((n,), bool),
        jnp.zeros((n, d), dtype),
        jnp.zeros((d, v), dtype),
        jnp.zeros((v,), dtype),
        jnp.zeros((v,), dtype),
        scalar,
        scalar,
    )
    total, active, *grads = _overlapping_chunks(n, static.token_chunk, token_body, init)
    return (total, active), (tuple(grads), x, w, bias, weights, options)


def _block_logits(x_t, w, bias, cols_per_step, dtype):
    """The ``[rows, V]`` logits of rows ``x_t``, a vocabulary chunk at a time (``_columns``)."""
    n_rows, v = x_t.shape[0], w.shape[1]

    def body(c0, cols, block):
        return jax.lax.dynamic_update_slice_in_dim(
            block, _logits(x_t, w, bias, c0, cols, dtype), c0, 1
        )

    return _for_chunks(v, cols_per_step, body, jnp.zeros((n_rows, v), dtype))


def _block_grads(x_t, w, dz, dw, cols_per_step, dtype):
    """``dz w^T`` and ``dw += x_t^T dz``, a chunk of columns at a time, ``dw`` in place: one
    product would be a second ``[D, V]`` buffer (XLA's CPU backend does not fuse the addition
    into the product). The chunks are evened out, so the last one overlaps its predecessor by
    fewer columns than there are chunks."""
    v = dz.shape[1]
    cols = -(-v // -(-v // cols_per_step))

    def body(c0, fresh, acc):
        dx_t, dw = acc
        dz_c = _slice(dz, c0, cols, 1)
        if fresh is not None:  # columns of the previous chunk: already counted
            dz_c = jnp.where(fresh[None, :], dz_c, jnp.zeros_like(dz_c))
        dx_t = dx_t + _matmul(dz_c, _columns(w, c0, cols, dtype), (1, 1), dtype)
        product = _matmul(x_t, dz_c, (0, 0), dtype)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, _slice(dw, c0, cols, 1) + product, c0, 1)
        return dx_t, dw

    init = (jnp.zeros((x_t.shape[0], w.shape[0]), dtype), dw)
    return _overlapping_chunks(v, cols, body, init)


def _single_pass_bwd(static, res, cotangents):
    del static
    (dx, dw, db, dwt, d_eps, d_zl), x, w, bias, weights, options = res
    g, _ = cotangents  # the "counted" flags are boolean: no cotangent
    g = g.astype(dx.dtype)
    return (
        (g * dx).astype(x.dtype),
        (g * dw).astype(w.dtype),
        None if bias is None else (g * db).astype(bias.dtype),
        None,
        None if weights is None else (g * dwt).astype(weights.dtype),
        _options_cotangent(
            options,
            None if options.label_smoothing is None else g * d_eps,
            None if options.z_loss is None else g * d_zl,
        ),
    )


_single_pass.defvjp(_single_pass_fwd, _single_pass_bwd)


# ------------------------------------------------------------------------------ public API
def _chunk_size(name: str, value, default: int, limit: int) -> int:
    """A validated chunk size, at most ``limit`` (the size of the chunked axis, at least 1)."""
    if value is None:
        return max(1, min(default, limit))
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int or None; got {value!r}.")
    _checks.check_positive(name, value)
    return max(1, min(int(value), limit))


def _single_pass_rows(n: int, v: int, budget: int) -> int:
    """The default ``token_chunk`` of the single pass: at most ``budget`` bytes per float32
    ``[rows, V]`` block and at most an eighth of the tokens, in equal chunks.

    XLA keeps two blocks alive at once (the logits, then the probabilities and ``dz``), plus
    ``[D, cols]`` products: an eighth of the tokens keeps the blocks at a quarter of the
    ``[N, V]`` logits of the unfused loss even where the byte budget would allow all of them
    (small V; measured with ``memory_analysis``, a quarter of the tokens left too little room
    where D is large next to N). The chunks are then evened out (``ceil(N / chunks)`` rows),
    so the last one, which overlaps its predecessor, recomputes fewer rows than there are
    chunks.
    """
    rows = max(1, min(budget // (4 * v), -(-n // 8)))
    chunks = -(-n // rows)
    return -(-n // chunks)


def _single_pass_cols(rows: int, d: int, v: int, default: int) -> int:
    """The default ``vocab_chunk`` of the single pass. Each ``dw += x_t^T dz`` product is a
    ``[D, cols]`` temporary (two, with the slice of ``dw`` it is added to): where D is large
    next to the rows, so that they would outgrow half a ``[rows, V]`` block, ``cols`` is cut to
    a quarter block's worth, but never below 128 columns (an inner loop over more, smaller
    products costs time and a copy of the loop-carried ``dw``, so only when it pays)."""
    cols = min(default, v)
    if d * cols <= rows * v // 2:
        return cols
    return max(1, min(cols, max(128, rows * v // (4 * d))))


def check_linear_arguments(x, w, labels, reduction, ignore_index):
    """Validates the fused loss's arrays (also ``jaxce.sharded``'s): ``x`` ``[..., D]``, ``w``
    ``[D, V]``, integer ``labels`` of ``x``'s shape without D. Returns them as arrays."""
    x = _checks.as_float_array("x", x)
    w = _checks.as_float_array("w", w)
    labels = _checks.as_int_array("labels", labels)
    _checks.check_reduction(reduction)
    _checks.check_ignore_index(ignore_index)
    if x.ndim < 1:
        raise ValueError(f"x must have shape [..., D]; got a scalar of shape {x.shape}.")
    if w.ndim != 2:
        raise ValueError(f"w must have shape [D, V] (a Dense kernel); got shape {w.shape}.")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"x's last axis must match w's first axis D={w.shape[0]} (w has shape {w.shape});"
            f" got x of shape {x.shape}."
        )
    _checks.check_shape("labels", labels, x.shape[:-1], f"x's shape {x.shape} without D")
    return x, w, labels


def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    logit_soft_cap: float | jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    recompute_logits: bool | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy of the logits ``x @ w + bias``, without materializing them.

    Equal, in value and gradients (to float32 rounding), to
    ``softmax_cross_entropy_with_integer_labels(x @ w + bias, labels, ...)`` with the same
    options, but no ``[N, V]`` array is ever allocated (``N`` tokens, ``V`` classes): the logits
    are computed, reduced and differentiated one block at a time. For example :math:`i` with
    logits :math:`z = \mathrm{cap}\tanh((x_i w + b)/\mathrm{cap})`:

    .. math::
        \ell_i = (1-\varepsilon)\, w_y (\mathrm{lse}(z) - z_y)
          + \frac{\varepsilon}{K} \sum_{c \in A} w_c (\mathrm{lse}(z) - z_c)
          + \lambda_z\, w_y\, \mathrm{lse}(z)^2

    With ``reduction="mean"`` or ``"sum"`` the gradients are computed in the same pass as the
    loss (6NDV FLOPs, the three matmuls any implementation needs); with ``"none"`` the
    per-token cotangent is only known afterwards, so the backward pass recomputes the logits
    block by block (8NDV FLOPs). bfloat16/float16 ``x`` and ``w`` are multiplied with float32
    accumulation, and ``w`` is never converted to float32 as a whole.

    Args:
      x: ``[..., D]`` floating-point activations (the last hidden states).
      w: ``[D, V]`` output projection (the layout of a Flax ``Dense`` kernel).
      labels: integer class indices of shape ``x.shape[:-1]``.
      bias: optional ``[V]`` output bias (a ``-inf`` entry removes that class).
      ignore_index: label value that marks a token to skip (loss 0, gradient 0, not counted
        in a mean); PyTorch uses -100. ``None`` ignores nothing.
      class_weights: optional ``[V]`` weights, PyTorch's ``weight``.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, PyTorch's semantics.
      z_loss: :math:`\lambda_z \ge 0`, PaLM's auxiliary :math:`\lambda_z \mathrm{lse}^2`.
      logit_soft_cap: optional positive cap applied to the logits (Gemma 2 uses 30).
      reduction: ``"mean"`` (default: sum over tokens divided by the summed class weights of
        the counted tokens, as PyTorch; 0 if none), ``"sum"`` or ``"none"`` (per token, the
        labels' shape).
      token_chunk: rows per block (default per backend). In the single-pass path the block
        is ``[token_chunk, V]`` in float32, so the default is chosen from a byte budget.
      vocab_chunk: columns per block of the recompute path, and per product of the
        single-pass path (default per backend).
      recompute_logits: ``False`` computes the gradients in the forward pass (6NDV FLOPs;
        needs a reduced loss, and with a bfloat16/float16 ``w`` a float32 ``[D, V]``
        accumulator); ``True`` recomputes the logits in the backward pass (8NDV FLOPs, O(N)
        residuals). ``None`` (default): single pass for ``"mean"``/``"sum"`` with a float32
        ``w``, recompute otherwise.

    Returns:
      The loss in float32 (float64 for float64 inputs): a scalar, or per token for
      ``reduction="none"``. A label outside ``[0, V)`` that is not ``ignore_index`` gives NaN
      for that token. Gradients flow to ``x``, ``w``, ``bias`` (and ``class_weights``), each in
      its own dtype.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxce
      >>> x = jax.random.normal(jax.random.key(0), (2, 5, 16))  # [batch, seq, D]
      >>> w = jax.random.normal(jax.random.key(1), (16, 100)) / 4  # [D, V]
      >>> labels = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, -100]])
      >>> loss = jaxce.linear_softmax_cross_entropy(x, w, labels, ignore_index=-100)
      >>> unfused = jaxce.softmax_cross_entropy_with_integer_labels(
      ...     x @ w, labels, ignore_index=-100, reduction="mean")
      >>> bool(jnp.allclose(loss, unfused, rtol=1e-5))
      True
      >>> dx, dw = jax.grad(jaxce.linear_softmax_cross_entropy, argnums=(0, 1))(x, w, labels)
      >>> dw.shape
      (16, 100)

    References:
      Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024 (the
      blockwise idea); PyTorch ``cross_entropy``; Chowdhery et al., "PaLM", 2022 (z-loss);
      Gemma Team, "Gemma 2", 2024 (soft-capping).
    """
    x, w, labels = check_linear_arguments(x, w, labels, reduction, ignore_index)
    d, v = w.shape
    if bias is not None:
        bias = _checks.as_float_array("bias", bias)
        _checks.check_shape("bias", bias, (v,), f"one entry per class, V={v}")
    weights = _checks.class_vector("class_weights", class_weights, v)
    dtype = _compute_dtype(x, w)
    options = make_options(dtype, label_smoothing, z_loss, logit_soft_cap)

    batch_shape = labels.shape
    x2, labels1 = jnp.reshape(x, (-1, d)), jnp.reshape(labels, (-1,))
    n = x2.shape[0]
    default_rows, default_cols, budget = _DEFAULTS.get(jax.default_backend(), _DEFAULTS["gpu"])
    if recompute_logits is None:
        recompute_logits = reduction == "none" or w.dtype != dtype
    if recompute_logits:
        static = _Static(
            ignore_index,
            _chunk_size("token_chunk", token_chunk, default_rows, max(n, 1)),
            _chunk_size("vocab_chunk", vocab_chunk, default_cols, v),
        )
        if n == 0:
            return jnp.zeros(batch_shape if reduction == "none" else (), dtype)
        losses, counted = _recompute(x2, w, bias, labels1, weights, options, static)
        if reduction == "none":
            return jnp.reshape(losses, batch_shape)
        if reduction == "sum":
            return reduce_loss(losses, reduction)
        return reduce_loss(losses, reduction, normalizer(labels1, counted, weights, dtype))
    if reduction == "none":
        raise ValueError(
            'recompute_logits=False needs reduction="mean" or "sum": the per-token cotangent'
            ' of reduction="none" is only known after the forward pass.'
        )

    rows = _chunk_size("token_chunk", token_chunk, _single_pass_rows(n, v, budget), max(n, 1))
    static = _Static(
        ignore_index,
        rows,
        _chunk_size("vocab_chunk", vocab_chunk, _single_pass_cols(rows, d, v, default_cols), v),
    )
    if n == 0:
        return jnp.zeros((), dtype)
    total, counted = _single_pass(x2, w, bias, labels1, weights, options, static)
    if reduction == "sum":
        return total
    return reduce_loss(total[None], "mean", normalizer(labels1, counted, weights, dtype))
