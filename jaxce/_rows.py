"""The per-row mathematics of softmax cross-entropy with integer labels, written once.

The plain loss (``_cross_entropy``), the fused linear loss (``_linear``) and the sharded losses
(``_sharding``) all compute one example's loss from a few statistics of its row of logits. The
plain loss takes them over the whole row at once, the fused loss over vocabulary chunks and
the sharded losses over each device's columns; every variant then merges them with
:func:`rebase` and :func:`merge` and calls the same :func:`row_loss`, :func:`coefficients` and
:func:`logit_derivative`. A numeric rule therefore lives in exactly one place.

Per example, with logits ``z`` (soft-capped if asked), admissible classes ``A`` (``where`` and
``z > -inf``), ``K = |A|``, class weights ``w``, ``W = sum_A w``, smoothing ``eps``, z-loss
``zl`` and ``lse`` the logsumexp over ``A``:

    loss = (1 - eps) w_y (lse - z_y) + eps / K sum_A w_c (lse - z_c) + zl w_y lse**2
    dloss/dz_c = a p_c - b [c = y] - c w_c [c in A]
    with a = (1 - eps) w_y + eps W / K + 2 zl w_y lse,  b = (1 - eps) w_y,  c = eps / K
    and p = softmax over A.

With nothing masked this is PyTorch's ``cross_entropy`` with ``weight`` and ``label_smoothing``.

Exactness. ``lse`` is kept as a shift ``m`` (the row max) and ``log_sum = log sum_A exp(z - m)``,
and every difference ``lse - z`` is evaluated as ``(m - z) + log_sum``: each term is computed
from the logits' differences to their row max, which are exact, so nothing cancels however far
the logits are from zero (at logits near 1e8, or of -1e30, ``lse`` itself has no digits to
spare). The smoothing sum is kept the same way, as ``sum_A w_c (m - z_c)`` (a sum of
non-negative terms), never as ``W m - sum_A w_c z_c``.

Range. Every weighted difference is formed from halves, ``w ((m/2 - z/2) + log_sum/2)``, and
doubled once its weight has scaled it: halving is exact, so it rounds as ``w (lse - z)`` does,
but a difference beyond the range (logits 3e38 and -3e38) no longer overflows where its
weighted term is representable (a class weight or a smoothing of 1e-10 on it). The loss is
infinite only where its value is beyond the range.

NaN. A NaN among a row's admissible logits makes its ``sum_exp`` NaN, and so its loss and
derivative NaN; such a row is never mistaken for an empty one (``sum_exp == 0``), which takes no
part (loss 0, derivative 0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp

from jaxce import _autodiff, _checks, _loops, _xla
from jaxce._labels import Labels
from jaxce._layout import compute_dtype
from jaxce._reduction import weighted
from jaxce._sigmoid import (
    checked_cap,
    soft_cap,
    soft_cap_bulk,
    soft_cap_cap_derivative,
    soft_cap_derivative,
    soft_cap_unguarded,
)
from jaxce._softmax import (
    exponentials,
    log_sum_of,
    log_sum_or_zero,
    probabilities,
    row_max,
    shift_of,
)

T = TypeVar("T")


class Options(NamedTuple):
    """The loss's hyperparameters: scalar arrays in the compute dtype, or None when off."""

    label_smoothing: jax.Array | None
    z_loss: jax.Array | None
    logit_soft_cap: jax.Array | None

    @property
    def smoothing(self) -> bool:
        return self.label_smoothing is not None

    @property
    def elementwise(self) -> bool:
        """Whether the row statistics need more than ``exp(x - max)`` of each logit (a soft
        cap's ``tanh``, smoothing's differences)."""
        return self.logit_soft_cap is not None or self.smoothing


def make_options(dtype, label_smoothing, z_loss, logit_soft_cap) -> Options:
    """Validates the hyperparameters (scalars, in range; see ``_checks.hyperparameter``); a
    literal 0 (or a cap of None or inf) switches the term off statically."""
    eps = _checks.hyperparameter("label_smoothing", label_smoothing, dtype, low=0.0, high=1.0)
    zl = _checks.hyperparameter("z_loss", z_loss, dtype, low=0.0)
    cap = None
    if logit_soft_cap is not None:
        cap = checked_cap("logit_soft_cap", logit_soft_cap, dtype)
    return Options(
        *_checks.nan_together(
            None if _checks.is_literal_zero(label_smoothing) else eps,
            None if _checks.is_literal_zero(z_loss) else zl,
            cap,
        )
    )


def capped(x: jax.Array, options: Options) -> jax.Array:
    """Soft-capped logits; -inf (a masked class) stays -inf."""
    cap = options.logit_soft_cap
    return x if cap is None else soft_cap(x, cap)


def capped_bulk(x: jax.Array, options: Options) -> jax.Array:
    """``cap * tanh(x / cap)`` for whole ``[..., C]`` blocks, where -inf becomes -cap.

    Callers mask non-admissible entries with :func:`admissible` of the raw logits instead: the
    select that keeps -inf reads ``x`` three times, which makes XLA materialize a float32
    ``[..., C]`` temporary (tests/test_memory.py).
    """
    cap = options.logit_soft_cap
    return x if cap is None else soft_cap_bulk(x, cap)


def capped_unguarded(x: jax.Array, options: Options) -> jax.Array:
    """:func:`capped` of whole ``[..., C]`` blocks without a select, for a cap of at most
    ``CAP_LIMIT`` (``soft_cap_unguarded``): -inf is kept at -inf by adding
    ``min(x, lowest) - lowest``, which is -inf there, NaN at NaN and 0 exactly for every other
    ``x``. Without a select, XLA's CPU compiler reduces it in one pass over whole rows, with no
    temporary."""
    cap = options.logit_soft_cap
    if cap is None:
        return x
    lowest = jnp.asarray(jnp.finfo(x.dtype).min, x.dtype)
    return soft_cap_unguarded(x, cap) + (jnp.minimum(x, lowest) - lowest)


def unguarded(options: Options, logit_soft_cap) -> bool:
    """Whether the soft cap may be computed without its guard (``soft_cap_unguarded``): none,
    or one given as a number (or a concrete array), as the caller passed it (``options`` holds
    it as an array), which is at most ``CAP_LIMIT`` (``make_options``)."""
    if options.logit_soft_cap is None:
        return True
    return _checks.concrete(logit_soft_cap) is not None


def capped_derivative(raw: jax.Array, options: Options) -> jax.Array | None:
    """``dz/draw`` of the soft cap (None without a cap)."""
    cap = options.logit_soft_cap
    return None if cap is None else soft_cap_derivative(raw, cap)


_chained = _autodiff.product_rule(lambda dz, derivative: dz == 0)


def chain(dz: jax.Array, derivative: jax.Array | None) -> jax.Array:
    """``dz * derivative``, where a zero ``dz`` stays 0: an entry that takes no part (a masked
    class, a row ignored or with no admissible class) may hold NaN or inf, whose derivative
    through the soft cap is NaN (tests/test_properties.py, the NaN tests). Differentiated by the
    product rule, also where ``dz`` is 0 (a class weight of 0 under a soft cap)."""
    if derivative is None:
        return dz
    return _chained(dz, derivative)


def admissible(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Classes that take part in the normalisation: ``where`` and a logit above -inf (the cap
    keeps -inf, so the raw logits tell)."""
    finite = ~jnp.isneginf(x)
    return finite if mask is None else finite & mask


def class_row(v: jax.Array, like: jax.Array) -> jax.Array:
    """A per-class ``[C]`` vector shaped ``[1, ..., 1, C]`` to broadcast against ``like``; one
    already of ``like``'s rank (``_loops.SubRows.classes``) as it is."""
    if v.ndim == like.ndim:
        return v.astype(like.dtype)
    return jnp.reshape(v.astype(like.dtype), (1,) * (like.ndim - 1) + (like.shape[-1],))


def one_hot(index: jax.Array, like: jax.Array, offset=0) -> jax.Array:
    """``[..., C]`` booleans marking each example's label column (columns start at ``offset``)."""
    cols = jax.lax.broadcasted_iota(index.dtype, like.shape, like.ndim - 1)
    return cols + jnp.asarray(offset, index.dtype) == index[..., None]


def label_weight(weights: jax.Array | None, index: jax.Array, dtype) -> jax.Array:
    """``w_y`` as ``[..., 1]`` (1 when unweighted)."""
    if weights is None:
        return jnp.ones(index.shape + (1,), dtype)
    return jnp.take(weights.astype(dtype), index)[..., None]


# ---------------------------------------------------------------------------- statistics
class Partial(NamedTuple):
    """Row statistics of a block of classes (all of them, a vocabulary chunk, or a device's
    columns), each ``[..., 1]`` in the compute dtype; merged across blocks by :func:`merge`.

    ``sum_exp`` and ``gap`` are taken relative to ``shift_of(max)``. The last three are only
    kept with label smoothing (None otherwise).
    """

    max: jax.Array  # the block's max admissible logit (-inf if none, NaN with a NaN)
    sum_exp: jax.Array  # sum_A exp(z - shift): 0 exactly for an empty block
    num_admissible: jax.Array | None  # K of the block
    weight_total: jax.Array | None  # sum_A w_c
    gap: jax.Array | None  # sum_A w_c (shift - z_c) / (2 num_classes): non-negative terms


def half_difference(
    a: jax.Array, b: jax.Array, n: int = 1, half: jax.Array | None = None
) -> jax.Array:
    """``(a - b) / (2 n)`` for ``a >= b``, as ``(a / 2 - b / 2) / n``: halving is exact, so
    this rounds as ``(a - b) / n`` does, halved exactly, wherever ``a - b`` is finite, and the
    halves' difference cannot overflow (``a = 3e38, b = -3e38``). Only halves of subnormal
    numbers (below 1.2e-38 in float32) round, by at most half the smallest one.

    Three or four operations per entry, where a guarded form (``isinf`` of the difference, a
    select) took ten: XLA's CPU compiler fuses the smoothing gap's sum into the per-row loss,
    and at so many operations per entry it split that fusion over threads, whose wake-up was
    most of a small call (float32 [256, 10] with label smoothing: the fusion 35.6 -> 2.5 us,
    ``value_and_grad`` 0.76x the time; [1024, 1000] 0.89x, [4096, 4096] 0.95x). ``half``:
    0.5 as an array the caller holds (behind an optimization barrier, where a literal's
    broadcast would be written out whole), else a literal."""
    if half is None:
        half = jnp.asarray(0.5, jnp.result_type(a, b))
    difference = a * half - b * half
    return difference if n == 1 else difference / n


def half_gap(shift: jax.Array, z: jax.Array, log_sum: jax.Array) -> jax.Array:
    """``(lse - z) / 2`` as ``(shift/2 - z/2) + log_sum/2``, finite for finite logits
    (``log_sum``: the row's, an empty row's -inf read as 0). A caller multiplies it by its
    weight and doubles the product (or the sum of products): that rounds as ``w (lse - z)``
    does, and is infinite only where the weighted term is beyond the range."""
    return half_difference(shift, z) + log_sum_or_zero(log_sum) * jnp.asarray(0.5, z.dtype)


def partial_stats(
    x: jax.Array,
    mask: jax.Array | None,
    weights: jax.Array | None,
    options: Options,
    num_classes: int,
    unguarded: bool = False,
) -> Partial:
    """The :class:`Partial` statistics of a block of raw logits ``x`` (``[..., cols]``, any
    float dtype; soft-capped here), ``mask`` its admissible columns (or None) and ``weights``
    its ``[cols]`` class weights (or None). ``num_classes`` is the whole vocabulary's size:
    each gap term is divided by it before summing, so the sum cannot overflow.

    The max is read from the raw logits in their own dtype (the cap is increasing: the max of
    the capped logits is the capped max). Callers reduce large arrays a chunk of rows at a
    time (:func:`row_stats`) or a block at a time (``_blocks``), so whatever XLA keeps while
    reducing is the size of a chunk.
    """
    return stats_and_exponentials(x, mask, weights, options, num_classes, unguarded=unguarded)[0]


def stats_and_exponentials(
    x: jax.Array,
    mask: jax.Array | None,
    weights: jax.Array | None,
    options: Options,
    num_classes: int,
    kept: bool = False,
    all_admissible: bool = False,
    unguarded: bool = False,
    small_cap: bool = False,
) -> tuple[Partial, jax.Array]:
    """:func:`partial_stats` of ``x`` and the ``[..., cols]`` exponentials ``exp(z - shift)``
    its ``sum_exp`` adds up (0 off the admissible entries), in the compute dtype. Kept, they
    give the probabilities without a second exponential pass (:func:`logit_derivative`). A row
    longer than XLA's CPU reductions take at full speed is reduced in sub-rows
    (``_loops.SubRows``): each sum is the sum of its sub-rows' sums, all taken relative to the
    row's max. ``kept``: the derivative reads the exponentials, and for float32 and float64
    logits without smoothing (or with it, ``all_admissible``) it writes the gradient into their
    buffer (``_xla.saves_exponentials``), so they are computed in the rows' own shape, and only
    summed in sub-rows. ``all_admissible``: the smoothing's sums first as if every class were
    admissible (:func:`assumes_all_admissible`). ``unguarded``: a soft cap of at most
    ``CAP_LIMIT`` (:func:`unguarded`), computed without a select where there is no
    mask (:func:`capped_exponentials`). ``small_cap``: a soft cap small enough that no kept
    exponential underflows (:func:`small_cap`), from which the smoothing's gap is then summed
    (:func:`exponential_gap_sums`)."""
    sub = _loops.SubRows.of(x)
    xs, ms = sub.view(x, mask)
    raw_max = sub.max(row_max(xs, ms))

    def summed(of_rows, m):
        """``of_rows(x, mask, m)``, the exponentials of rows whose max is ``m``, and their
        rows' sums. Kept, of the rows' shape, so that the derivative writes the gradient into
        their buffer (with one block, the same computation as the view's; with a soft cap in
        sub-rows, of the view's shape, XLA kept them beside it: 32 MiB at [64, 131072])."""
        if kept:
            e = of_rows(x, mask, m)
            (viewed,) = sub.view(e)
        else:
            viewed = of_rows(xs, ms, sub.spread(m))
            e = sub.whole(viewed)
        return e, sub.sum(jnp.sum(viewed, axis=-1, keepdims=True))

    if not options.elementwise:
        e, sum_exp = summed(exponentials, raw_max)
        return Partial(raw_max, sum_exp, None, None, None), e
    m = capped_max(raw_max, options)
    signed = kept and signs_admissible(x, options)
    e, sum_exp = summed(
        lambda a, a_mask, a_max: capped_exponentials(a, a_mask, a_max, options, unguarded, signed),
        m,
    )
    if all_admissible:
        assert mask is None and options.smoothing and unguarded
        if kept and small_cap:
            sums = exponential_gap_sums(e, weights, m, num_classes, sub)
        else:
            sums = all_admissible_sums(xs, weights, m, options, num_classes, sub)
        sums = _xla.unless_nonfinite(
            sums[2],
            lambda: sums,
            lambda: exact_smoothing_sums(x, weights, m, options, num_classes),
        )
        return Partial(m, sum_exp, *sums), e
    if not options.smoothing:
        return Partial(m, sum_exp, None, None, None), e
    count, total, gap = smoothing_sums(xs, ms, sub.classes(weights), m, options, num_classes, sub)
    return Partial(m, sum_exp, count, total, gap), e


def capped_max(raw_max: jax.Array, options: Options) -> jax.Array:
    """The rows' max of the (capped) logits from that of the raw ones (the cap is increasing):
    a shift only, without a derivative (as ``row_max``'s). Capped, it would carry one in the
    cap, which the merges (:func:`rebase`) and ``lse = shift + log_sum`` then add to derivatives
    taken of the derivative (d/dcap of dloss/dx, a Hessian in the cap)."""
    if options.logit_soft_cap is None:
        return raw_max
    return jax.lax.stop_gradient(capped(raw_max, options))


def smoothing_sums(
    x: jax.Array,
    mask: jax.Array | None,
    weights: jax.Array | None,
    m: jax.Array,
    options: Options,
    num_classes: int,
    sub: _loops.SubRows,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The smoothing's row sums over the admissible classes of the raw logits ``x`` (the view
    of ``sub``, as ``mask`` and ``weights``), given their rows' max ``m``: the
    :class:`Partial`'s ``num_admissible``, ``weight_total`` and ``gap``."""
    z = capped_bulk(x.astype(compute_dtype(x.dtype)), options)
    w, gaps = gap_terms(z, weights, m, num_classes, sub)
    adm = admissible(x, mask)
    zero = jnp.zeros_like(gaps)

    def row_sum(values):
        return sub.sum(jnp.sum(jnp.where(adm, values, zero), axis=-1, keepdims=True))

    gap = row_sum(gaps)
    return row_sum(jnp.ones_like(gaps)), row_sum(w), gap


def all_admissible_sums(
    x: jax.Array,
    weights: jax.Array | None,
    m: jax.Array,
    options: Options,
    num_classes: int,
    sub: _loops.SubRows,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`smoothing_sums` as if every class were admissible: no select, the count and the
    weight total the row's. A -inf logit makes its gap term +-inf or NaN (NaN where its weight
    is 0; under a soft cap, which takes -inf to -cap, the terms add ``x - x``, NaN at +-inf),
    so the row's gap is not finite, as it is for a +inf or NaN logit or an infinite or NaN
    class weight: where the gap is finite, every class is admissible and the sums are exact.
    ``weights``: the row's ``[C]`` (not the view's). A soft cap (of at most
    ``CAP_LIMIT``) is computed here again, from a cap XLA cannot tell is the same:
    the exponentials' reduction computed it too, and XLA's CPU compiler wrote capped logits
    that two reductions share out whole (256 MiB at [16384, 4096], 1.6x the time)."""
    xf = x.astype(compute_dtype(x.dtype))
    cap = options.logit_soft_cap
    z = xf
    if cap is not None:
        # x - x, not a constant: a [..., C] broadcast of a constant that another fusion reads
        # too is written out whole.
        z = soft_cap_unguarded(xf, jax.lax.optimization_barrier(cap)) + (xf - xf)
    _, gaps = gap_terms(z, sub.classes(weights), m, num_classes, sub)
    gap = sub.sum(jnp.sum(gaps, axis=-1, keepdims=True))
    return (*admissible_counts(weights, m, sub), gap)


def exponential_gap_sums(
    e: jax.Array,
    weights: jax.Array | None,
    m: jax.Array,
    num_classes: int,
    sub: _loops.SubRows,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`all_admissible_sums` from the kept ``[..., C]`` exponentials ``e = exp(z - shift)``
    of soft-capped logits, as ``shift - z = -log(e)``, under a cap small enough that no finite
    logit's exponential underflows (:func:`small_cap`): one read of an array the derivative
    reads anyway, without the cap's ``tanh``, where :func:`all_admissible_sums` computes the
    cap again from the logits (float32 [16384, 4096] with every option on: ``value_and_grad``
    257 ms against 283-294 ms). A -inf logit's exponential is 0, its term +inf (NaN with a
    class weight of 0), so the gap is not finite, as for a NaN logit; a +inf one, capped to
    the cap, is admissible and its term finite. ``-log(e)`` is within a few roundings of
    ``shift - z`` in absolute terms: ``e``'s relative error of a few units in the last place
    (XLA's ``exp`` is not correctly rounded) becomes an absolute error of a few units in 2**24
    in float32, the logarithm's own a few units in the last place of ``-log(e) <= 2 cap``,
    and the scaling by ``1 / (2 C)`` one more rounding."""
    # A barrier: XLA's simplifier takes log(exp(y)) to y, and y would be the capped logits again,
    # written out whole for the two reductions that read them.
    (viewed,) = sub.view(jax.lax.optimization_barrier(e))
    gaps = _minus_log(viewed) * jnp.asarray(0.5 / num_classes, viewed.dtype)
    w = sub.classes(weights)
    if w is not None:
        gaps = class_row(w, viewed) * gaps
    gap = sub.sum(jnp.sum(gaps, axis=-1, keepdims=True))
    return (*admissible_counts(weights, m, sub), gap)


@jax.custom_jvp
def _minus_log(e: jax.Array) -> jax.Array:
    """``-log(e)`` whose derivative is 0 where ``e`` is 0 (a -inf logit's exponential), not
    ``0 / 0``. Such a batch takes the exact sums (``_xla.unless_nonfinite``), but reverse mode
    through the loss's value (a gradient penalty, ``grad`` of ``value_and_grad``'s value)
    transposes both branches, and the unused one's zero cotangents would make NaN there."""
    return -jnp.log(e)


@_minus_log.defjvp
def _minus_log_jvp(primals, tangents):
    (e,), (e_dot,) = primals, tangents
    positive = e > 0
    safe = jnp.where(positive, e, jnp.ones_like(e))
    return _minus_log(e), jnp.where(positive, -e_dot / safe, jnp.zeros_like(e))


def admissible_counts(
    weights: jax.Array | None, m: jax.Array, sub: _loops.SubRows
) -> tuple[jax.Array, jax.Array]:
    """The count and the weight total of rows in which every class is admissible."""
    count = jnp.full_like(m, sub.shape[-1])
    total = count if weights is None else jnp.full_like(m, jnp.sum(weights.astype(m.dtype)))
    return count, total


# The capped logits' exponentials exp(z - max) are at least exp(-2 cap): above the smallest
# normal number of the compute dtype for caps below half its -log, less a margin for roundings.
SMALL_CAP_MARGIN = 1.0


def small_cap(options: Options, logit_soft_cap, dtype) -> bool:
    """Whether the soft cap is a number (or a concrete array) small enough that no finite
    logit's exponential ``exp(z - max)`` underflows in ``dtype`` (the compute dtype): below
    ``(-log(tiny) - SMALL_CAP_MARGIN) / 2``, 43.2 in float32, 353.7 in float64. Typical caps
    (30 for Gemma 2's final logits) are."""
    if options.logit_soft_cap is None:
        return False
    value = _checks.concrete(logit_soft_cap)
    limit = (-math.log(float(jnp.finfo(dtype).tiny)) - SMALL_CAP_MARGIN) / 2
    return value is not None and value < limit


def gap_terms(
    z: jax.Array,
    weights: jax.Array | None,
    m: jax.Array,
    num_classes: int,
    sub: _loops.SubRows,
) -> tuple[jax.Array, jax.Array]:
    """``(w, w (shift - z) / (2 C))`` of every entry of the (capped) logits ``z`` (the view of
    ``sub``, as ``weights``, in the compute dtype), given their rows' max ``m``: the class
    weights (1 without) and the gap's terms (:func:`half_difference`)."""
    shift = sub.spread(shift_of(m))
    w = jnp.ones_like(z) if weights is None else class_row(weights, z)
    return w, w * half_difference(shift, z, num_classes)


def exact_smoothing_sums(
    x: jax.Array, weights: jax.Array | None, m: jax.Array, options: Options, num_classes: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`smoothing_sums` of ``[..., C]`` raw logits ``x`` (no mask) over each row's
    admissible classes, given their rows' max ``m``, without a select per entry: the
    branch that a batch takes where :func:`all_admissible_sums` is not finite (a -inf, +inf or
    NaN logit, an infinite or NaN class weight). Each entry's terms equal the select's,
    ``[c in A] (1, w_c, w_c (shift - z_c) / (2 C))``, to within a rounding (XLA may contract a
    product and a sum into a fused multiply-add in one form and not the other), at every class
    weight and every logit but NaN:

    - ``a = 1 - min(max(lowest - x, 0), 1)`` is 1 above -inf (at +inf too), 0 at -inf, NaN at
      NaN: a NaN logit's row has a NaN count and total here, where the select counts it (its
      gap, ``sum_exp`` and loss are NaN either way);
    - the gap's logit is ``max(x, lowest)``, finite at -inf (soft-capped too), so ``a`` times a
      finite class weight times its difference is 0 there, not ``0 * inf``;
    - a class weight enters as ``((a c) f) g`` (:func:`_weight_parts`, per class): ``c`` the
      weight clipped to the finite range, ``f`` and ``g`` 1 at a finite weight, the largest
      finite number at an infinite one (the product overflows to +-inf unless it is 0, and
      then ``inf * 0 = NaN`` on a difference of 0, as the select's ``w (shift - z)`` is), and
      at a NaN one ``c = f = big``, ``g = 0``: ``inf * 0 = NaN`` where ``a`` is 1 and
      ``(0 * big) * 0 = 0`` where it is 0.

    Three sums (two without class weights, whose total is the count), each its own fusion
    after the one before (the logits, the constants and the previous sum behind one
    optimization barrier): XLA's CPU compiler merges sibling reductions of one array into a
    fusion that writes their operands out (192 MiB at float32 [4096, 4096]), shares one
    float32 conversion of bfloat16 logits between them (written out whole), and writes a
    literal constant's broadcast out as an array. Each sum is then one fused pass without a
    temporary.

    Its derivative is the select's, in row chunks (:func:`chunked_smoothing_sums`): only a
    program that differentiates the statistics themselves takes it (a derivative of the
    smoothing's derivative; forward over reverse), where the fused passes' own derivative
    kept arrays of the logits' size (192-480 MiB at float32 [2048, 4096], every option on).

    It replaced those row chunks as the branch itself: a loop that every program with label
    smoothing on CPU compiled, whether a batch takes the branch or not. Every option on,
    ``value_and_grad``, two runs alternating with the loop (2026-12-06): compiled in 456-460
    against 545-549 ms at float32 [1024, 1000] (optax's program 260-321 ms), 328-338 against
    439-464 ms at [4096, 4096], 392-438 against 464-586 ms at bfloat16 [1024, 1000], with
    52 KiB of temporaries at float32 [1024, 1000] instead of 3.0 MiB. A batch that takes the
    branch mostly ran faster in the loop, which sums all three from one read of each chunk:
    with one -inf logit, ``value_and_grad`` 76-86 against 60-76 ms and the loss alone 46-52
    against 35-41 ms at float32 [4096, 4096]; at [1024, 1000] ``value_and_grad`` 2.85-2.92
    against 3.04-3.11 ms (faster fused) and the loss alone 2.48-2.51 against 2.18-2.32 ms."""
    # The max is a shift without a derivative (as capped_max's): the rule below drops its tangent.
    return _exact_sums(num_classes, x, weights, jax.lax.stop_gradient(m), options)


def _present(v: jax.Array | None) -> jax.Array:
    assert v is not None
    return v


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _exact_sums(
    num_classes: int, x: jax.Array, weights: jax.Array | None, m: jax.Array, options: Options
) -> tuple[jax.Array, jax.Array, jax.Array]:
    dtype = compute_dtype(x.dtype)
    sub = _loops.SubRows.of(x)
    (xs,) = sub.view(x)
    parts = None if weights is None else _weight_parts(weights.astype(dtype))
    shift = sub.spread(shift_of(m))

    def constants(before: jax.Array | None):
        """The logits, scalars, the weights' parts, the shift and the cap behind one barrier
        with the sum computed before (ordered after it, not merged with it)."""
        scalars = tuple(jnp.asarray(v, dtype) for v in (0.0, 1.0, 0.5, jnp.finfo(dtype).min))
        barred = jax.lax.optimization_barrier(
            (xs, scalars, parts, shift, options.logit_soft_cap, before)
        )
        xf = barred[0].astype(dtype)
        per_class = None
        if barred[2] is not None:
            per_class = [class_row(_present(sub.classes(v)), xf) for v in barred[2]]
        return xf, barred[1], per_class, *barred[3:5]

    def admitted(xf, scalars):
        zero, one, _, lowest = scalars
        return one - jnp.minimum(jnp.maximum(lowest - xf, zero), one)

    def weighted(a, per_class):
        """``a`` times the clipped weight, times its two factors (:func:`_weight_parts`)."""
        clipped, factor, last = per_class
        return ((a * clipped) * factor) * last

    def row_sum(values):
        return sub.sum(jnp.sum(values, axis=-1, keepdims=True))

    # The gap.
    xf, scalars, per_class, s, cap = constants(None)
    _, _, half, lowest = scalars
    a = admitted(xf, scalars)
    z = jnp.maximum(xf, lowest)
    if cap is not None:
        z = soft_cap_unguarded(z, cap)
    difference = half_difference(s, z, num_classes, half)
    gap = row_sum((a if per_class is None else weighted(a, per_class)) * difference)
    # The weights' total (the count without class weights), then the count.
    xf, scalars, per_class, _, _ = constants(gap)
    a = admitted(xf, scalars)
    total = row_sum(a if per_class is None else weighted(a, per_class))
    if per_class is None:
        return total, total, gap
    xf, scalars, _, _, _ = constants(total)
    return row_sum(admitted(xf, scalars)), total, gap


@_exact_sums.defjvp
def _exact_sums_jvp(num_classes, primals, tangents):
    """The sums' derivative: the select's, in row chunks (:func:`exact_smoothing_sums`)."""
    x, weights, _, options = primals
    x_dot, weights_dot, _, options_dot = tangents

    def chunked(x, weights, options):
        return chunked_smoothing_sums(x, weights, options, num_classes)

    _, dot = jax.jvp(chunked, (x, weights, options), (x_dot, weights_dot, options_dot))
    return _exact_sums(num_classes, *primals), dot


def chunked_smoothing_sums(
    x: jax.Array, weights: jax.Array | None, options: Options, num_classes: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`smoothing_sums` of ``[..., C]`` logits without a mask, over each row's admissible
    classes, a chunk of rows at a time (``_loops.by_row_chunks``)."""

    def sums(rows, weights, options):
        sub = _loops.SubRows.of(rows)
        (viewed,) = sub.view(rows)
        m = capped_max(sub.max(row_max(viewed, None)), options)
        return smoothing_sums(viewed, None, sub.classes(weights), m, options, num_classes, sub)

    return _loops.by_row_chunks(sums, x, shared=(weights, options))


def _weight_parts(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[C]`` class weights ``w`` as :func:`exact_smoothing_sums` takes them, ``(c, f, g)``,
    so that ``((a c) f) g`` is ``a w`` at ``a = 1`` and 0 at ``a = 0`` (``a``: 1 at an
    admissible entry, 0 at a -inf logit), whatever the weight: at a finite one ``(w, 1, 1)``;
    at +-inf ``(+-big, big, big)`` (``big``: the largest finite number), whose products
    overflow to +-inf; at NaN ``(big, big, 0)``, which gives ``inf * 0 = NaN`` (and
    ``(0 * big) * 0 = 0``)."""
    big = jnp.finfo(w.dtype).max
    nan, infinite = jnp.isnan(w), jnp.isinf(w)
    ones, bigs = jnp.ones_like(w), jnp.full_like(w, big)
    clipped = jnp.where(nan, bigs, jnp.clip(w, -big, big))
    factor = jnp.where(nan | infinite, bigs, ones)
    last = jnp.where(nan, jnp.zeros_like(w), jnp.where(infinite, bigs, ones))
    return clipped, factor, last


def capped_exponentials(
    x: jax.Array,
    mask: jax.Array | None,
    m: jax.Array,
    options: Options,
    unguarded: bool = False,
    signed: bool = False,
) -> jax.Array:
    """``exp(z - shift_of(m))`` of the soft-capped logits ``z`` of ``x`` and their rows' max
    ``m`` (keepdims), 0 off the admissible entries, in the compute dtype (as
    ``_softmax.exponentials`` of uncapped logits); without a select where there is no mask and
    the cap may go ``unguarded`` (:func:`capped_unguarded`). ``signed``: -0.0 off the
    admissible entries, which :func:`kept_admissible` tells from an exponential that underflows
    to +0.0 (a select, which costs nothing where the exponentials are written out)."""
    xf = x.astype(compute_dtype(x.dtype))
    if mask is None and unguarded and not signed:
        return jnp.exp(capped_unguarded(xf, options) - shift_of(m))
    z = capped_bulk(xf, options)
    off = jnp.full_like(z, -0.0) if signed else jnp.zeros_like(z)
    return jnp.where(admissible(x, mask), jnp.exp(z - shift_of(m)), off)


# Kept exponentials of more bytes than this (beyond the caches) carry the admissible classes.
# Below it, reading the logits again costs little (float32 [1024, 1000], 3.9 MiB: a tie), and
# at the smallest shapes the select and the sign's comparison tipped XLA's CPU cost model into
# splitting the gradient over threads, whose wake-up is most of a small call (bfloat16
# [256, 10] with smoothing: value_and_grad 0.11 against 0.08 ms).
SIGNED_BYTES = 2**22


def signs_admissible(x: jax.Array, options: Options) -> bool:
    """Whether the exponentials of the logits ``x`` that the derivative keeps carry the
    admissible classes in their sign (:func:`capped_exponentials`' ``signed``,
    :func:`kept_admissible`): with smoothing, whose derivative spreads over the admissible
    classes only, without a soft cap, whose derivative reads the logits anyway, and above
    SIGNED_BYTES of exponentials. Its derivative then reads one array of the logits' size (the
    exponentials, into whose buffer it may write) instead of two or three (the logits and a
    mask): with smoothing alone, float32 [16384, 4096], ``value_and_grad`` at 0.89-0.93x
    optax's speed against 0.86x."""
    size = x.size * jnp.dtype(compute_dtype(x.dtype)).itemsize
    return options.smoothing and options.logit_soft_cap is None and size > SIGNED_BYTES


def kept_admissible(exponentials: jax.Array) -> jax.Array:
    """:func:`admissible` from exponentials kept ``signed`` (:func:`capped_exponentials`):
    an admissible entry's is +0.0 or above, another's -0.0 (a NaN's sign may be either: its
    row's derivative is NaN)."""
    bits = jnp.dtype(exponentials.dtype).itemsize * 8
    # The sign bit as an integer's (one comparison; jnp.signbit takes a shift and two more).
    return jax.lax.bitcast_convert_type(exponentials, jnp.dtype(f"int{bits}")) >= 0


# With class weights and a soft cap, XLA's CPU reduction of the gap's terms slows down on rows
# of more classes than this (float32, its reduction alone: 2.5x the time without the weights at
# [8192, 16384], against 1.2x at [16384, 4096]; every option on, the loss alone at [8192, 8192]
# took 142 ms against 188 ms in row chunks, at [8192, 16384] 472 ms against 390 ms). Summed from
# the kept exponentials under a small cap, without the tanh, it does not on whole rows (every
# option on, value_and_grad at [4096, 32768]: 515-540 ms against 682-715 ms in row chunks), but
# it does in sub-rows (``_xla.row_blocks``), whose class weights XLA broadcasts to the view: the
# weighted sum of -log(e) alone took 297 ms against 38 ms without the weights at [1024, 131072],
# and every option on, value_and_grad at [4096, 131072], 5.1-5.2 s against 3.2 s in row chunks.
CAPPED_WEIGHTED_CLASSES = 8192


def assumes_all_admissible(
    x: jax.Array,
    mask: jax.Array | None,
    weights: jax.Array | None,
    options: Options,
    unguarded: bool,
    small_cap: bool = False,
    kept: bool = False,
) -> bool:
    """Whether the smoothing's row sums of the logits ``x`` are first taken as if every class
    were admissible (:func:`all_admissible_sums`), and again over the admissible classes
    (:func:`exact_smoothing_sums`) for the whole batch where a row's gap is not finite: with
    label smoothing, no mask and no soft cap or an ``unguarded`` one (:func:`unguarded`; with
    class weights, on rows of at most ``CAPPED_WEIGHTED_CLASSES``, or on longer rows reduced
    whole where the gap is summed from kept exponentials, ``small_cap``:
    :func:`exponential_gap_sums` takes no ``tanh``), on CPU for float32 and float64 logits,
    and for bfloat16 ones under a ``small_cap`` where the derivative keeps their exponentials
    (``kept``: it may, and ``_xla.saves_exponentials`` of one buffer). The two agree to
    rounding wherever the first is finite.

    The smoothing's sums over the admissible classes take a select per entry, which XLA's CPU
    compiler does not fuse into a reduction: in row chunks, their summands written out per
    chunk, the loss with smoothing took 2.6x the time of the loss without (float32 [16384,
    4096]), and its ``value_and_grad`` 1.8x, where the exponentials were computed again; with
    every option on, 190 ms against 126 ms for the loss alone, ``value_and_grad`` 367 against
    332 ms. On bfloat16 logits, the sums over the admissible classes write their summands out,
    two float32 buffers beside the kept exponentials (three within ``_xla.KEPT_BYTES``, else
    the derivative computes the exponentials again); summed from the kept exponentials, every
    option on, ``value_and_grad`` took 6.5 against 9.3 ms at [64, 32768], 12.0-12.8 against
    18.5-18.8 ms at [2048, 2048]. Where they are not kept, the sums as if every class were
    admissible read the logits again, and XLA keeps the rows' float32 conversion whole: 565
    against 309 ms and 1 GiB of temporaries at [16384, 4096]; without a soft cap likewise
    (32 MiB, 0.92-0.98x optax's speed against 1.30-1.50x at [2048, 2048], smoothing alone).
    The exact sums' branch costs compile time. As a loop over row chunks, every option on at
    bfloat16 [1024, 1000], in one run: 622 ms, against 399 ms for the program without this
    rule. Fused (:func:`exact_smoothing_sums`), in two other runs alternating with the loop:
    392-438 against 464-586 ms."""
    return (
        options.smoothing
        and mask is None
        and (
            options.logit_soft_cap is None
            or (
                unguarded
                and (
                    weights is None
                    or x.shape[-1] <= CAPPED_WEIGHTED_CLASSES
                    or (small_cap and _xla.row_blocks(x.shape[-1], x.dtype) == 1)
                )
            )
        )
        and _xla.backend() == "cpu"
        and _xla.fusible_on_cpu(x)
        and (
            _xla.computes_in_place(x)
            or (kept and small_cap and _xla.saves_exponentials(x, soft_cap=True))
        )
    )


def row_stats(
    x: jax.Array,
    mask: jax.Array | None,
    weights: jax.Array | None,
    options: Options,
    num_classes: int,
    then: Callable[[Partial], T],
    alone: bool = False,
    unguarded: bool = False,
) -> T:
    """``then`` of :func:`partial_stats` of ``[..., C]`` logits, reduced a chunk of rows at a time
    (``_loops.by_row_chunks``): the temporaries are the size of a chunk, on any XLA; whole rows
    without a mask or a soft cap on a GPU, and where only ``max`` and ``sum exp`` are reduced
    (no smoothing either, and a soft cap only ``unguarded``: :func:`unguarded`, which whole
    rows then compute without a select) on CPU for float32 and float64 logits, and for bfloat16
    ones where no derivative follows (``alone``: the loss without its gradient, whose backward
    pass would otherwise share their float32 conversion; ``_xla.row_chunk``). With smoothing
    on CPU, whole rows first as if every class were admissible
    (:func:`assumes_all_admissible`). The chunks keep the cap's guard.

    ``then`` runs in the chunks' loop where there is one (``_loops._in_chunks``: it may close
    over no traced value). :func:`summed` there (the plain loss's) has XLA compute the log-sum
    and the smoothing's ``1 / max(K, 1)`` in the kernel that writes a chunk's results out, not
    in kernels of their own after the loop (bfloat16 [16384, 4096] ``value_and_grad``: one
    kernel fewer without options, two with every option on); XLA fuses the rest of
    :func:`finish` (:func:`finish_summed`) into the kernels that read it, as before. The
    sharded losses, which merge the statistics across devices, take the :class:`Partial` as it
    is."""
    if assumes_all_admissible(x, mask, weights, options, unguarded):
        partial, _ = stats_and_exponentials(
            x, None, weights, options, num_classes, all_admissible=True, unguarded=True
        )
        return then(partial)

    # Smoothing's sums fuse whole on a GPU too; a soft cap's do not (_xla.WHOLE_ROWS_BACKENDS).
    fuses_whole = mask is None and options.logit_soft_cap is None
    narrow = alone and _xla.fusible_on_cpu(x)
    on_cpu = (
        mask is None
        and (options.logit_soft_cap is None or unguarded)
        and not options.smoothing
        and (_xla.computes_in_place(x) or narrow)
    )
    # Chunks keep the cap's guard: without it, every option on at [4096, 32768] took 0.93x the
    # time of the loss alone and 1.05x of value_and_grad, no gain for a second path.
    unguarded_rows = _xla.whole_rows_on_cpu(on_cpu)

    def stats(xs, ms, weights, options):
        return then(partial_stats(xs, ms, weights, options, num_classes, unguarded_rows))

    if on_cpu and narrow:
        x = _xla.unshared(x)
    return _loops.by_row_chunks(
        stats,
        x,
        mask,
        shared=(weights, options),
        fuses_whole=fuses_whole,
        fuses_whole_on_cpu=on_cpu,
    )


def rebase(p: Partial, new_max: jax.Array, num_classes: int) -> Partial:
    """``p`` re-expressed relative to ``shift_of(new_max)`` (``new_max >= p.max``): the
    online-softmax step. ``sum_exp`` scales by ``exp(shift - new_shift) <= 1`` and each gap term
    grows by ``new_shift - shift >= 0``, so nothing cancels. An empty block (``sum_exp == 0``)
    and a block whose max already is ``new_max`` stay as they are; NaN propagates.
    """
    old, new = shift_of(p.max), shift_of(new_max)
    keep = (p.max == new_max) | (p.sum_exp == 0)
    sum_exp = jnp.where(keep, p.sum_exp, p.sum_exp * jnp.exp(old - new))
    if p.gap is None or p.weight_total is None:
        return Partial(new_max, sum_exp, None, None, None)
    lift = p.weight_total * half_difference(new, old, num_classes)
    gap = jnp.where(keep, p.gap, p.gap + lift)
    return Partial(new_max, sum_exp, p.num_admissible, p.weight_total, gap)


def _add(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    return None if a is None or b is None else a + b


def merge(a: Partial, b: Partial, num_classes: int) -> Partial:
    """The statistics of the union of two blocks."""
    m = jnp.maximum(a.max, b.max)
    a, b = rebase(a, m, num_classes), rebase(b, m, num_classes)
    return Partial(
        m,
        a.sum_exp + b.sum_exp,
        _add(a.num_admissible, b.num_admissible),
        _add(a.weight_total, b.weight_total),
        _add(a.gap, b.gap),
    )


def empty(shape: tuple[int, ...], dtype, smoothing: bool) -> Partial:
    """The statistics of no classes: max -inf, sums 0."""
    zeros = jnp.zeros(shape, dtype)
    extra = zeros if smoothing else None
    return Partial(jnp.full(shape, -jnp.inf, dtype), zeros, extra, extra, extra)


class Stats(NamedTuple):
    """Statistics of a whole row, each ``[..., 1]`` in the compute dtype."""

    shift: jax.Array  # the row max (0 for an empty row)
    log_sum: jax.Array  # log sum_A exp(z - shift): -inf for an empty row, NaN with a NaN
    num_admissible: jax.Array | None  # K (smoothing only)
    weight_total: jax.Array | None  # W (smoothing only)
    half_spread: jax.Array | None  # sum_A w_c (shift - z_c) / (2 K) (smoothing only)
    inv_count: jax.Array | None  # 1 / max(K, 1) (smoothing only)

    def log_sum_or_zero(self) -> jax.Array:
        """``log_sum`` with an empty row's -inf replaced by 0 (``_softmax.log_sum_or_zero``)."""
        return log_sum_or_zero(self.log_sum)

    def lse(self) -> jax.Array:
        return self.shift + self.log_sum_or_zero()

    def nonempty(self) -> jax.Array:
        """Rows with at least one admissible class (or a NaN: never mistaken for empty)."""
        return ~jnp.isneginf(self.log_sum)


class Summed(NamedTuple):
    """A row's :class:`Partial` statistics merged over all its classes, with its log-sum and
    ``1 / max(K, 1)`` taken (:func:`summed`), each ``[..., 1]``: the per-row results of the
    chunks' loop where there is one (:func:`row_stats`), :func:`finish` without its cheap
    steps."""

    max: jax.Array
    log_sum: jax.Array  # :func:`_softmax.log_sum_of`
    num_admissible: jax.Array | None
    weight_total: jax.Array | None
    gap: jax.Array | None
    inv_count: jax.Array | None  # 1 / max(K, 1)


def summed(p: Partial) -> Summed:
    """``p``, already merged over all classes, with its log-sum (``_softmax.log_sum_of``) and, with
    smoothing, ``1 / max(K, 1)`` taken: the two steps of :func:`finish` whose operations (a log,
    a division) XLA computes once in a kernel of their own rather than again in each kernel
    that reads them."""
    count = p.num_admissible
    inv_count = None if count is None else 1 / jnp.maximum(count, 1)
    log_sum = log_sum_of(p.max, p.sum_exp)
    return Summed(p.max, log_sum, count, p.weight_total, p.gap, inv_count)


def finish(p: Partial, num_classes: int) -> Stats:
    """The :class:`Stats` of a row from its statistics merged over all classes
    (:func:`finish_summed` of :func:`summed`)."""
    return finish_summed(summed(p), num_classes)


def finish_summed(s: Summed, num_classes: int) -> Stats:
    """The :class:`Stats` of a row from its :class:`Summed` statistics (a NaN max gives a NaN
    ``log_sum``: ``_softmax.log_sum_of``). The gap, a sum of non-negative terms, is floored at
    0 (NaN stays NaN), as ``log_sum_of`` floors the sum of exponentials at 1: where the max and
    the entries are soft capped apart (a ``tanh`` of one number and of a row, whose codes can
    differ by a rounding), a row's terms can round below 0 (a row of equal logits of 1000 under
    a cap of 1e4: -1.2e-5 of loss for a single class)."""
    shift = shift_of(s.max)
    if s.num_admissible is None or s.gap is None:
        return Stats(shift, s.log_sum, None, None, None, None)
    # A select, not a max: the max splits its derivative at a tie, and a gap of exactly 0 (a
    # row of equal logits) would pass half of it to d/deps of dloss/dx.
    gap = jnp.where(s.gap < 0, jnp.zeros_like(s.gap), s.gap)
    half_spread = gap * (num_classes / jnp.maximum(s.num_admissible, 1))
    return Stats(shift, s.log_sum, s.num_admissible, s.weight_total, half_spread, s.inv_count)


# ---------------------------------------------------------------------------- the loss
def label_logit_within(
    label_logit: jax.Array, stats: Stats, label_admissible: jax.Array | None = None
) -> jax.Array:
    """The label's logit, at most its row's max where the label is admissible and the max is
    finite, so that its ``lse - z_y`` is never below ``log_sum >= 0``.

    The label's logit is computed apart from the row's max: a product-sum of ``x`` and the
    label's column of ``w`` in the fused loss, beside the block's matmul the max is taken from;
    a soft cap of one number, beside the cap of the whole row (XLA's code for ``tanh`` differs
    between the two, as between a jitted program and an eager call). It can then round above
    the max, and a row that the label dominates had a loss below 0 (-1.75 with float32 logits
    near 1e6 in the fused loss, -5e-4 with logits near 3e3 under a soft cap of 1e4, called
    eagerly). Both are within a rounding of the exact logit, so the max is as close to it.
    ``label_admissible`` (``[..., 1]``, nonzero where the label's class is admissible; None:
    all are) leaves a masked label's logit as it is: it may exceed the admissible classes' max
    (its loss below 0, optax's convention). A row with no finite max keeps its label's logit
    (a NaN or infinite one follows the NaN policy)."""
    above = jnp.isfinite(stats.log_sum) & (label_logit > stats.shift)  # a finite max only
    if label_admissible is not None:
        above = above & label_admissible.astype(bool)
    # the max's value with the label logit's derivative (they are a rounding apart)
    clamped = stats.shift + _autodiff.zero_with_derivative(label_logit)
    return jnp.where(above, clamped, label_logit)


def half_nll(stats: Stats, label_logit: jax.Array) -> jax.Array:
    """``(lse - z_y) / 2`` (:func:`half_gap`)."""
    return half_gap(stats.shift, label_logit, stats.log_sum)


def half_smoothing_term(stats: Stats) -> jax.Array:
    """``sum_A w_c (lse - z_c) / (2 K) = half_spread + W / K log_sum / 2``: two non-negative
    terms."""
    assert stats.num_admissible is not None and stats.weight_total is not None
    assert stats.half_spread is not None
    ratio = stats.weight_total / jnp.maximum(stats.num_admissible, 1)
    return stats.half_spread + ratio * (stats.log_sum_or_zero() * 0.5)


def row_loss(stats: Stats, label_logit: jax.Array, w_y: jax.Array, options: Options):
    """The per-example loss (``[..., 1]``) before rows are finalized."""
    eps, zl = options.label_smoothing, options.z_loss
    # (1 - eps) w_y times half the nll, doubled after the weights: w_y nll alone may overflow
    # where the loss does not (module docstring, "Range").
    half = weighted(w_y if eps is None else (1 - eps) * w_y, half_nll(stats, label_logit))
    if eps is not None:
        half = half + weighted(eps, half_smoothing_term(stats))
    loss = half * 2
    if zl is not None:
        lse = stats.lse()
        # (zl w_y lse) lse: lse^2 alone overflows float32 from lse = 1.8e19, the term later.
        loss = loss + weighted(zl * w_y * lse, lse)
    return loss


def coefficients(stats: Stats, w_y: jax.Array, options: Options):
    """``(a, b, c)`` with ``dloss/dz_k = a p_k - b [k = y] - c w_k [k admissible]``."""
    eps, zl = options.label_smoothing, options.z_loss
    a = b = w_y
    c = None
    if eps is not None:
        assert stats.weight_total is not None and stats.inv_count is not None
        a = (1 - eps) * w_y + eps * stats.weight_total * stats.inv_count
        b = (1 - eps) * w_y
        c = eps * stats.inv_count
    if zl is not None:
        a = a + 2 * zl * w_y * stats.lse()
    return a, b, c


def logit_derivative(
    z: jax.Array,
    adm: jax.Array,
    onehot: jax.Array,
    weights: jax.Array | None,
    stats: Stats,
    coeffs,
    exponentials: jax.Array | None = None,
) -> jax.Array:
    """``dloss/dz`` over a block of (capped) logits ``z``: all classes, a chunk or a shard.
    ``exponentials``: the block's ``exp(z - shift)`` where already computed
    (:func:`stats_and_exponentials`), which saves computing them again."""
    b = coeffs[1]
    dense = spread_derivative(z, adm, weights, stats, coeffs, exponentials)
    return dense - jnp.where(onehot, b, jnp.zeros_like(b))


def spread_derivative(
    z: jax.Array,
    adm: jax.Array,
    weights: jax.Array | None,
    stats: Stats,
    coeffs,
    exponentials: jax.Array | None = None,
) -> jax.Array:
    """``a p_k - c w_k [k admissible]``: :func:`logit_derivative` without the label's own term
    ``-b [k = y]`` (``b`` is ``coeffs[1]``), which a caller may add to one entry per row."""
    a, _, c = coeffs
    dz = a * probabilities(z, stats.shift, stats.log_sum, adm, exponentials)
    if c is not None:
        w = jnp.ones_like(z) if weights is None else class_row(weights, z)
        dz = dz - jnp.where(adm, c * w, jnp.zeros_like(z))
    return dz


def smoothing_weight_derivative(z, adm, stats: Stats, options: Options) -> jax.Array:
    """The smoothing part of ``dloss/dw_c``: ``eps / K (lse - z_c) [c in A]``, from
    :func:`half_gap`."""
    assert options.label_smoothing is not None and stats.num_admissible is not None
    scale = options.label_smoothing / jnp.maximum(stats.num_admissible, 1)
    term = (half_gap(stats.shift, z, stats.log_sum) * scale) * 2
    return jnp.where(adm, term, jnp.zeros_like(z))


class RowDerivatives(NamedTuple):
    """Per-row derivatives of the loss that are not per class, each ``[..., 1]`` or None."""

    label_weight: jax.Array  # dloss/dw_y, the label's own term: (1-eps) nll + zl lse^2
    label_smoothing: jax.Array | None  # dloss/deps = smoothing term - w_y nll
    z_loss: jax.Array | None  # dloss/dzl = w_y lse^2


def row_derivatives(stats: Stats, label_logit, w_y, options: Options) -> RowDerivatives:
    eps, zl = options.label_smoothing, options.z_loss
    n = half_nll(stats, label_logit)
    per_label = (n if eps is None else weighted(1 - eps, n)) * 2
    lse = stats.lse()
    if zl is not None:
        per_label = per_label + zl * lse * lse
    d_eps = None if eps is None else (half_smoothing_term(stats) - weighted(w_y, n)) * 2
    d_zl = None if zl is None else w_y * lse * lse
    return RowDerivatives(per_label, d_eps, d_zl)


def cap_derivative(raw: jax.Array, dz: jax.Array, options: Options) -> jax.Array:
    """``dloss/dcap`` of a block, ``sum_c dloss/dz_c dz_c/dcap`` (``[..., 1]``), given
    ``dz = dloss/dz`` of the block."""
    assert options.logit_soft_cap is not None
    d = soft_cap_cap_derivative(raw, options.logit_soft_cap)
    return jnp.sum(chain(dz, d), axis=-1, keepdims=True)


# ---------------------------------------------------------------------------- rows' status
class Status(NamedTuple):
    """Which rows count, each ``[..., 1]``."""

    active: jax.Array  # not ignored and some class admissible (or a NaN)
    poisoned: jax.Array  # a label out of range: loss and derivatives NaN


def status(labels: Labels, stats: Stats) -> Status:
    return Status((~labels.ignored)[..., None] & stats.nonempty(), labels.invalid[..., None])


def counted(weight: jax.Array, rows: Status) -> jax.Array:
    """What each row counts for in a ``"mean"``: its weight (or the weight's tangent) where it
    takes part, 0 where it is ignored or has no admissible class."""
    return jnp.where(rows.active, weight, jnp.zeros_like(weight))


def finalize(values: jax.Array, rows: Status) -> jax.Array:
    """0 on inactive rows (ignored or empty: they take no part, whatever their logits hold),
    NaN on poisoned rows: a bad label never produces a plausible number."""
    values = jnp.where(rows.active, values, jnp.zeros_like(values))
    return jnp.where(rows.poisoned, jnp.full_like(values, jnp.nan), values)


# ---------------------------------------------------------------------------- tangents
class Tangents(NamedTuple):
    """The tangents of a cross-entropy's inputs that are not zero (None where zero)."""

    x: jax.Array | None  # the logits' (on a block: the raw logits')
    weights: jax.Array | None  # the class weights'
    label_smoothing: jax.Array | None
    z_loss: jax.Array | None
    logit_soft_cap: jax.Array | None

    def per_class(self, options: Options) -> bool:
        """Whether a term needs the ``[..., C]`` logits (see :func:`class_tangent`)."""
        smooth_weights = self.weights is not None and options.smoothing
        return self.x is not None or self.logit_soft_cap is not None or smooth_weights


def tangents_of(x_dot, weights_dot, options_dot: Options, weights, options: Options) -> Tangents:
    """:class:`Tangents` from a rule's tangents (symbolic zeros and absent inputs: None)."""

    def live(t, primal):
        return None if primal is None or _loops.is_zero(t) else t

    return Tangents(
        live(x_dot, x_dot),
        live(weights_dot, weights),
        live(options_dot.label_smoothing, options.label_smoothing),
        live(options_dot.z_loss, options.z_loss),
        live(options_dot.logit_soft_cap, options.logit_soft_cap),
    )


@_autodiff.rematerialized
def class_tangent(
    x, label_cols, mask, weights, options, stats, w_y, rows, dots: Tangents, exponentials=None
):
    """The tangent terms that need the whole ``[..., C]`` block of raw logits ``x`` (or a
    device's columns of it): ``sum_c dloss/dx_c x'_c``, the soft cap's and the smoothing class
    weights'. ``label_cols`` is each row's label column (-1 if in no column of ``x``).

    Rematerialized (``_autodiff``): in reverse mode it runs in the backward pass, one
    elementwise pass over ``x``. Given the forward pass's ``exponentials``
    (:func:`stats_and_exponentials`), reverse mode keeps them instead of computing them again.
    """
    xf = x.astype(stats.shift.dtype)
    z = capped_bulk(xf, options)
    signed = exponentials is not None and signs_admissible(x, options)
    adm = kept_admissible(exponentials) if signed else admissible(xf, mask)
    t = None
    if dots.x is not None or dots.logit_soft_cap is not None:
        coeffs = coefficients(stats, w_y, options)
        uncapped = options.logit_soft_cap is None
        if exponentials is not None and uncapped and _xla.scatters_label_term(x, exponentials):
            # The label's term -b [k = y] as a gather of the tangent: in reverse mode, an
            # addition to one entry per row.
            assert dots.x is not None
            dense = spread_derivative(z, adm, weights, stats, coeffs, exponentials)
            x_dot = dots.x.astype(xf.dtype)
            t = jnp.sum(finalize(dense, rows) * x_dot, axis=-1)
            t = t - (finalize(coeffs[1], rows) * _xla.pick(x_dot, label_cols))[..., 0]
        else:
            onehot = one_hot(label_cols, z)
            derivative = logit_derivative(z, adm, onehot, weights, stats, coeffs, exponentials)
            dz = finalize(derivative, rows)
            if dots.x is not None:
                dx = chain(dz, capped_derivative(xf, options))
                t = jnp.sum(dx * dots.x.astype(xf.dtype), axis=-1)
            if dots.logit_soft_cap is not None:
                cap_t = cap_derivative(xf, dz, options)[..., 0] * dots.logit_soft_cap
                t = _autodiff.add(t, cap_t)
    if dots.weights is not None and options.smoothing:
        dw = finalize(smoothing_weight_derivative(z, adm, stats, options), rows)
        t = _autodiff.add(t, jnp.sum(dw * class_row(dots.weights, dw), axis=-1))
    return t


def row_tangent(t, derivs: RowDerivatives, rows: Status, w_y_dot, dots: Tangents):
    """Adds the per-row tangent terms (the label's class weight, smoothing, z-loss) to ``t``
    (``[...]`` or None); returns it and the counted weights' tangent. ``w_y_dot`` is the label's
    class-weight tangent (``[..., 1]``), None when the weights are not differentiated."""
    counted_dot = None
    if w_y_dot is not None:
        t = _autodiff.add(t, (finalize(derivs.label_weight, rows) * w_y_dot)[..., 0])
        counted_dot = counted(w_y_dot, rows)[..., 0]
    for d, tangent in (
        (derivs.label_smoothing, dots.label_smoothing),
        (derivs.z_loss, dots.z_loss),
    ):
        if d is not None and tangent is not None:
            t = _autodiff.add(t, (finalize(d, rows) * tangent)[..., 0])
    return t, counted_dot
