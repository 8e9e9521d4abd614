"""Blocks of logits ``x @ w + bias`` that are never formed whole: the loops of the fused losses.

The fused loss (``_linear``) and the sharded fused loss (``_sharding``) compute the integer-label
cross-entropy of ``x @ w + bias`` ``[N, V]`` one ``[token_chunk, vocab_chunk]`` block at a time:
the row statistics of each block (``_rows.partial_stats``) are merged the online-softmax way
(``_rows.merge``), and, given the statistics of whole rows, each block's ``dloss/dz``
(``_rows.logit_derivative``) is multiplied into ``dx``, ``dw`` and ``dbias``. Vocabulary and token
sizes need not divide the chunks and nothing is ever padded, so padding can never enter a
statistic or a mean's denominator. ``w`` is only read a chunk at a time, so a bfloat16 ``w`` is
never converted to float32 as a whole; products accumulate in float32.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxce import _autodiff, _checks, _labels, _loops, _rows, _xla
from jaxce._layout import compute_dtype


class Static(NamedTuple):
    """Hashable settings that shape the computation (``nondiff_argnums`` of the rules)."""

    ignore_index: int | None
    token_chunk: int
    vocab_chunk: int
    num_classes: int  # the whole vocabulary, all devices' columns (for the smoothing sums)


class Needs(NamedTuple):
    """Which derivatives a pass computes (each costs work over every block)."""

    x: bool
    w: bool
    bias: bool
    smoothing_weights: bool  # the smoothing part of d/dclass_weights (per class)
    cap: bool

    @classmethod
    def every(cls, bias, weights, options: _rows.Options) -> Needs:
        """Every derivative the inputs have (a backward pass: JAX asks for all of them)."""
        smooth_weights = weights is not None and options.smoothing
        return cls(True, True, bias is not None, smooth_weights, options.logit_soft_cap is not None)


def dtype_of(x: jax.Array, w: jax.Array):
    """float64 if either input is float64, else float32 (spelled out: strict promotion)."""
    return compute_dtype(jnp.float64 if jnp.float64 in (x.dtype, w.dtype) else x.dtype)


def matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int], dtype) -> jax.Array:
    """``a`` times ``b`` over the given axes, accumulated in ``dtype`` (float32 for bf16).

    Operands of one dtype are multiplied as they are (bf16 x bf16 -> f32, the hardware's
    rate: ``_xla.product_dtype``); mixed operands are both cast to ``dtype`` first.
    """
    if a.dtype != b.dtype:
        a, b = a.astype(dtype), b.astype(dtype)
    return jax.lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=dtype
    )


def logits(x, w, bias, col0, cols: int, dtype) -> jax.Array:
    """``x @ w[:, cols] + bias[cols]`` for rows ``x`` (``[rows, D]``), in ``dtype``."""
    w_c = _xla.columns(w, col0, cols, _xla.product_dtype(x, w, dtype))
    raw = matmul(x, w_c, (1, 0), dtype)
    if bias is not None:
        b = bias if cols == bias.shape[0] else _loops.cut(bias, col0, cols, 0)
        raw = raw + b.astype(dtype)[None, :]
    return raw


def weights_of(weights: jax.Array | None, col0, cols: int) -> jax.Array | None:
    if weights is None or cols == weights.shape[0]:
        return weights
    return _loops.cut(weights, col0, cols, 0)


def label_logits(x, w, bias, index, options: _rows.Options, dtype) -> jax.Array:
    """``z_y = cap(x_i . w[:, y_i] + b[y_i])`` (``[rows, 1]``) from the label's column of ``w``
    alone (a ``[D, rows]`` gather), rather than picked out of a block of logits, which would
    cost XLA a second block-sized buffer. ``index`` must lie in ``[0, w.shape[1])``."""
    cols = jnp.take(w, index, axis=1).astype(dtype)  # [D, rows]
    raw = jnp.sum(x.astype(dtype) * cols.T, axis=-1, keepdims=True)
    if bias is not None:
        raw = raw + jnp.take(bias, index).astype(dtype)[:, None]
    return _rows.capped(raw, options)


def statistics(
    x, w, bias, weights, options: _rows.Options, static: Static, dtype, vary: Callable | None = None
) -> _rows.Partial:
    """Row statistics (:class:`_rows.Partial`, ``[N, 1]`` each) of ``x @ w + bias`` over all of
    ``w``'s columns: chunks of ``token_chunk`` rows, each merged over ``vocab_chunk`` columns.

    ``vary`` adapts each loop's initial value (``jaxce.sharded`` types it as varying over its
    mesh axes); by default, as varying like the inputs (inside a ``shard_map`` of the caller's).
    """
    n, v = x.shape[0], w.shape[1]
    smoothing = options.smoothing
    if vary is None:
        vary = _loops.varying_like(x, w, bias, weights)
    lanes = token_lanes(x, static)
    x_lanes = lanes.view(x)

    def token_body(t0, run, acc):
        x_t = lanes.cut(x_lanes, t0, run)

        def vocab_body(c0, cols, part):
            raw = logits(x_t, w, bias, c0, cols, dtype)
            block = _rows.partial_stats(
                raw, None, weights_of(weights, c0, cols), options, static.num_classes
            )
            return _rows.merge(part, block, static.num_classes)

        empty = _rows.empty((lanes.number * run, 1), dtype, smoothing)
        part = _loops.for_chunks(v, static.vocab_chunk, vocab_body, vary(empty))
        return jax.tree.map(lambda a, p: lanes.paste(a, p, t0), acc, part)

    init = jax.tree.map(lanes.view, _rows.empty((n, 1), dtype, smoothing))
    out = _loops.for_chunks(
        n // lanes.number, static.token_chunk // lanes.number, token_body, vary(init)
    )
    return jax.tree.map(lanes.whole, out)


def token_lanes(x: jax.Array, static: Static) -> _loops.Lanes:
    """The :class:`_loops.Lanes` of the loops over chunks of ``static.token_chunk`` of the
    rows of ``x`` (``[N, D]``): each chunk takes its rows from every lane, so that tokens split
    over devices by XLA's partitioner stay on their devices. A lane's run may be one token:
    a block's products, not the reading of its rows of ``x``, are its time."""
    return _loops.Lanes.of(x.shape[0], static.token_chunk)


class RowInfo(NamedTuple):
    """What the derivative of a block needs per row, each ``[rows, ...]``."""

    label_cols: jax.Array  # [rows] the label's column of w (-1 or out of range: none of them)
    w_y: jax.Array  # [rows, 1]
    rows: _rows.Status  # [rows, 1] each
    g: jax.Array  # [rows, 1] the per-row cotangent (1 for the unscaled gradient of a sum)


def live_rows(x_t: jax.Array, rows: _rows.Status) -> jax.Array:
    """``x_t`` with the rows that take no part (ignored or empty) set to 0, for ``dw = x^T dz``:
    their ``dz`` is 0, but 0 times a NaN or infinite activation (a padding token's garbage)
    would still make ``dw`` NaN. A poisoned row (a bad label) keeps its NaN."""
    return jnp.where(rows.active | rows.poisoned, x_t, jnp.zeros_like(x_t))


def block_derivative(raw, col0, weights_c, stats: _rows.Stats, info: RowInfo, options):
    """``(dz, dloss/draw)`` of a block of raw logits (columns from ``col0``), times ``g``:
    ``dz`` w.r.t. the capped logits, the second through the soft cap. 0 on inactive rows,
    NaN on poisoned ones."""
    z = _rows.capped_bulk(raw, options)
    adm = _rows.admissible(raw, None)
    coeffs = _rows.coefficients(stats, info.w_y, options)
    onehot = _rows.one_hot(info.label_cols, z, col0)
    dz = _rows.logit_derivative(z, adm, onehot, weights_c, stats, coeffs) * info.g
    dz = _rows.finalize(dz, info.rows)
    return z, adm, dz, _rows.chain(dz, _rows.capped_derivative(raw, options))


class Grads(NamedTuple):
    """Derivatives of ``sum_i g_i loss_i`` over a pass (None where not needed)."""

    x: jax.Array | None  # [N, D] float32
    w: jax.Array | None  # [D, V] in kept_dw_dtype() if summed, else w's (each chunk complete)
    bias: jax.Array | None  # [V] float32
    smoothing_weights: jax.Array | None  # [V] the smoothing part of d/dclass_weights
    cap: jax.Array | None  # [] d/dcap


def kept_dw_dtype(w: jax.Array, dtype):
    """The dtype in which :func:`gradients` keeps a reduced loss's ``dw``: ``w``'s (bfloat16
    too, half the memory of float32), or the compute ``dtype`` where ``w``'s exponent range is
    narrower than float32's. A reduced loss keeps the gradient of its sum, which the cotangent
    scales afterwards (by ``1 / counted`` for a mean, by a loss scale in float16 training): in
    float16 (at most 65504, normal from 6.1e-5) the sum over N tokens can be beyond the range
    where the mean's is not (1024 tokens of activations near 200: -inf in the label's column
    where the mean's gradient is about -190, NaN under a zero cotangent), and kept at the
    mean's magnitude instead, a loss-scaled step's small entries would round to 0 before the
    scale multiplies them. The price: a float32 ``[D, V]`` buffer, twice ``w``'s."""
    if jnp.finfo(w.dtype).maxexp < jnp.finfo(jnp.float32).maxexp:
        return dtype
    return w.dtype


def gradients(
    x,
    w,
    bias,
    weights,
    options: _rows.Options,
    static: Static,
    stats: _rows.Stats,
    info: RowInfo,
    dtype,
    needs: Needs,
    vary: Callable | None = None,
    summed: bool = False,
) -> Grads:
    """:class:`Grads` over ``w``'s columns, computing each ``[token_chunk, vocab_chunk]`` block
    of logits again from the statistics of whole rows.

    The outer loop runs over vocabulary chunks, so each chunk of ``dw`` is complete (summed over
    all tokens in float32) when it is written, in ``w``'s dtype, or in :func:`kept_dw_dtype`
    where ``summed`` (a reduced loss's gradients, before the cotangent scales them); ``dx``
    accumulates in float32.
    """
    (n, d), v = x.shape, w.shape[1]
    operand = _xla.product_dtype(x, w, dtype)
    dw_dtype = kept_dw_dtype(w, dtype) if summed else w.dtype
    if vary is None:  # as varying like the inputs (see statistics)
        vary = _loops.varying_like(x, w, bias, weights, stats, info)
    lanes = token_lanes(x, static)
    x_lanes, rows_lanes = lanes.view(x), jax.tree.map(lanes.view, (stats, info))

    def vocab_body(c0, cols, acc):
        dx, dw, db, dwt, dcap = acc
        w_c = _xla.columns(w, c0, cols, operand)
        weights_c = weights_of(weights, c0, cols)

        def token_body(t0, run, inner):
            dx, dw_c, db_c, dwt_c, dcap = inner
            x_t = lanes.cut(x_lanes, t0, run)
            stats_t, info_t = jax.tree.map(lambda a: lanes.cut(a, t0, run), rows_lanes)
            raw = matmul(x_t, w_c, (1, 0), dtype)
            if bias is not None:
                raw = raw + _loops.cut(bias, c0, cols, 0).astype(dtype)[None, :]
            z, adm, dz, draw = block_derivative(raw, c0, weights_c, stats_t, info_t, options)
            factor = draw.astype(operand)
            if needs.x:
                dx_t = lanes.cut(dx, t0, run) + matmul(factor, w_c, (1, 1), dtype)
                dx = lanes.paste(dx, dx_t, t0)
            if needs.w:
                dw_c = dw_c + matmul(live_rows(x_t, info_t.rows), factor, (0, 0), dtype)
            if needs.bias:
                db_c = db_c + jnp.sum(draw, axis=0)
            if needs.smoothing_weights:
                spread = _rows.smoothing_weight_derivative(z, adm, stats_t, options)
                dwt_c = dwt_c + jnp.sum(_rows.finalize(spread * info_t.g, info_t.rows), axis=0)
            if needs.cap:
                dcap = dcap + jnp.sum(_rows.cap_derivative(raw, dz, options))
            return dx, dw_c, db_c, dwt_c, dcap

        zeros = jnp.zeros((cols,), dtype)
        dw_c = jnp.zeros((d, cols) if needs.w else (0, 0), dtype)
        init = vary((dx, dw_c, zeros, zeros, dcap))
        dx, dw_c, db_c, dwt_c, dcap = _loops.for_chunks(
            n // lanes.number, static.token_chunk // lanes.number, token_body, init
        )
        if needs.w:
            dw = _loops.paste(dw, dw_c.astype(dw.dtype), c0, 1)
        db, dwt = _loops.paste(db, db_c, c0, 0), _loops.paste(dwt, dwt_c, c0, 0)
        return dx, dw, db, dwt, dcap

    init = (
        lanes.view(jnp.zeros((n, d), dtype)),
        jnp.zeros((d, v) if needs.w else (0, 0), dw_dtype),
        jnp.zeros((v,), dtype),
        jnp.zeros((v,), dtype),
        jnp.zeros((), dtype),
    )
    dx, dw, db, dwt, dcap = _loops.for_chunks(v, static.vocab_chunk, vocab_body, vary(init))
    return Grads(
        lanes.whole(dx) if needs.x else None,
        dw if needs.w else None,
        db if needs.bias else None,
        dwt if needs.smoothing_weights else None,
        dcap if needs.cap else None,
    )


# ---------------------------------------------------------------------------- tangents
class Dots(NamedTuple):
    """The nonzero tangents of a fused loss's inputs (None where zero)."""

    x: jax.Array | None
    w: jax.Array | None
    bias: jax.Array | None
    rows: _rows.Tangents  # class weights and hyperparameters (its x is None)

    def needs(self, options: _rows.Options) -> Needs:
        smooth_weights = self.rows.weights is not None and options.smoothing
        return Needs(
            self.x is not None,
            self.w is not None,
            self.bias is not None,
            smooth_weights,
            self.rows.logit_soft_cap is not None,
        )


def dots_of(tangents, bias, weights, options: _rows.Options) -> Dots:
    """:class:`Dots` from the tangents of ``(x, w, bias, labels, weights, options)``."""
    x_dot, w_dot, b_dot, _, weights_dot, options_dot = tangents

    def live(t, primal):
        return None if primal is None or _loops.is_zero(t) else t

    return Dots(
        live(x_dot, x_dot),
        live(w_dot, w_dot),
        live(b_dot, bias),
        _rows.tangents_of(None, weights_dot, options_dot, weights, options),
    )


def column_tangent(grads: Grads, dots: Dots, dtype) -> jax.Array | None:
    """The tangent terms over ``w``'s columns: ``<dw, w'> + <dbias, bias'>``, the smoothing
    class weights' and the soft cap's (a device's share, for the sharded loss)."""
    t = None
    for grad, tangent in (
        (grads.w, dots.w),
        (grads.bias, dots.bias),
        (grads.smoothing_weights, dots.rows.weights),
    ):
        t = _autodiff.add(t, _autodiff.contract(grad, tangent, dtype))
    if grads.cap is not None and dots.rows.logit_soft_cap is not None:
        t = _autodiff.add(t, grads.cap * dots.rows.logit_soft_cap)
    return t


def summed_outputs(loss, counted, t, parts, w_y_dot, dots: Dots, options):
    """A summed fused loss rule's outputs: ``(sum of loss, counted)`` and their tangents, the
    per-row terms added to ``t`` (the tangent over ``x`` and the columns). ``parts`` is
    ``(stats, label_logit, w_y, rows)``."""
    stats, label_logit, w_y, rows = parts
    derivs = _rows.row_derivatives(stats, label_logit, w_y, options)
    per_row, counted_dot = _rows.row_tangent(None, derivs, rows, w_y_dot, dots.rows)
    t = _autodiff.add(t, None if per_row is None else jnp.sum(per_row))
    total = jnp.sum(loss)
    tangents = (_autodiff.or_zeros(t, total), _autodiff.or_zeros(counted_dot, counted))
    return (total, counted), tangents


def row_cotangents(stats, label_logit, w_y, rows, g, g_counted, weighted: bool, options):
    """The per-row parts of a per-token loss's cotangents, for the cotangents ``g`` of the
    losses and ``g_counted`` of the counted weights (``[N, 1]`` each): ``(d w_y per row,
    d label_smoothing, d z_loss)``, None where absent."""
    derivs = _rows.row_derivatives(stats, label_logit, w_y, options)
    per_label = d_eps = d_zl = None
    if weighted:
        counted = _rows.counted(g_counted, rows)
        per_label = (_rows.finalize(derivs.label_weight * g, rows) + counted)[:, 0]
    if derivs.label_smoothing is not None:
        d_eps = jnp.sum(_rows.finalize(derivs.label_smoothing * g, rows))
    if derivs.z_loss is not None:
        d_zl = jnp.sum(_rows.finalize(derivs.z_loss * g, rows))
    return per_label, d_eps, d_zl


# ---------------------------------------------------------------------------- arguments
def chunk_size(name: str, value: object, default: int, limit: int) -> int:
    """A validated chunk size, at most ``limit`` (the size of the chunked axis, at least 1)."""
    if value is None:
        return max(1, min(default, limit))
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or None; got {value!r}.")
    if value <= 0:
        raise ValueError(f"{name} must be > 0 (or None for the default); got {value}.")
    return max(1, min(int(value), limit))


def vocab_chunk_of_two_passes(d: int, dtype) -> int:
    """The default ``vocab_chunk`` of the two passes (and of the per-token loss): the
    backend's; on ``_xla.TWO_PASS_BACKENDS`` (CPU), cut where D is large so that each
    ``[D, cols]`` array of a chunk (``w``'s columns for the products, the chunk of ``dw``),
    counted in the compute ``dtype`` (bfloat16 columns take half), is at most a third of the
    byte budget, in multiples of 128 columns and never below 128. On CPU (24 MiB) that is 512
    columns at D = 4096 in float32: at 512 x 4096 x 8192 the 2048 columns of the backend took
    52 MiB of temporaries, more than the unfused loss's 32 MiB, and 512 take 25 MiB in the same
    time (value_and_grad, 1.01x). Accelerators keep theirs (not measured)."""
    _, cols, budget = _xla.chunk_defaults()
    if _xla.single_pass_by_default():
        return cols
    fit = budget // (3 * jnp.dtype(dtype).itemsize * max(d, 1))
    return min(cols, max(128, fit // 128 * 128))


def check_arguments(
    x: object, w: object, labels: object, reduction: object, ignore_index: object
) -> tuple[jax.Array, jax.Array, jax.Array, int | None]:
    """Validates the fused losses' arrays (local and sharded): ``x`` ``[..., D]``, ``w``
    ``[D, V]`` with ``V >= 1``, integer ``labels`` of ``x``'s shape without D, a reduction and
    an ``ignore_index`` the labels' dtype can hold. Returns ``(x, w, labels, ignore_index)``."""
    x = _checks.as_float_array("x", x)
    w = _checks.as_float_array("w", w)
    _checks.check_reduction(reduction)
    _checks.check_min_rank("x", x, 1, "[..., D]")
    if w.ndim != 2:
        raise ValueError(f"w must have shape [D, V] (a Dense kernel); got shape {w.shape}.")
    _checks.check_num_classes("w", w.shape[1], "second axis (V)")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"x's last axis must match w's first axis D={w.shape[0]} (w has shape {w.shape});"
            f" got x of shape {x.shape}."
        )
    labels, ignore_index = _labels.check_integer_labels(
        labels, x.shape[:-1], f"x's shape {x.shape} without D", ignore_index
    )
    return x, w, labels, ignore_index
