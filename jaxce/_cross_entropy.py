"""Softmax cross-entropy (integer and soft labels) and the negative log-likelihood.

The integer-label loss is the per-row kernel of ``_rows`` applied to whole rows; the fused and
the sharded losses apply the same kernel to chunks and shards. Derivatives are hand-written
``jax.custom_jvp`` rules (see ``_autodiff``): their ``[..., C]`` factors are recomputed in the
backward pass, so reverse mode saves only the logits and ``O(N)`` statistics; on CPU also their
exponentials, which the forward pass computed anyway: for float32 logits of the integer-label
loss without smoothing (or with it, as if every class were admissible:
``_rows.assumes_all_admissible``, also under a soft cap given as a number) in the gradient's
buffer, elsewhere up to a budget (``_xla.saves_exponentials``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxce import _autodiff, _checks, _labels, _loops, _mesh, _rows, _sharding, _xla
from jaxce._checks import Axis
from jaxce._layout import compute_dtype, layout_of
from jaxce._reduction import reduce_loss, weighted
from jaxce._softmax import (
    max_and_exponentials,
    probabilities,
    row_max,
    shift_and_log_sum,
    shift_of,
)


# ----------------------------------------------------------------------------------------------
# Integer labels on [..., C]. Outputs: the per-example loss and what each example counts for in
# a "mean" (its class weight if it takes part, else 0).
# ``unguarded``: the soft cap, if any, was given as a number of at most 2**64, so whole rows
# compute it without a select (``_rows.unguarded``); ``small_cap``: as a number small enough
# that no exponential underflows (``_rows.small_cap``).
@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7))
def _integer_ce(x, labels, mask, weights, options, ignore_index, unguarded, small_cap):
    loss, counted, _ = _forward(
        x, labels, mask, weights, options, ignore_index, unguarded, small_cap, alone=True
    )
    return loss, counted


def _forward(
    x,
    labels,
    mask,
    weights,
    options: _rows.Options,
    ignore_index,
    unguarded: bool,
    small_cap: bool,
    keep=False,
    alone=False,
    all_admissible=False,
):
    """The row statistics of raw logits ``x`` (``[..., C]``, any float dtype) and the loss.

    Written so that XLA needs no ``[..., C]`` temporary: the statistics are reduced a chunk of
    rows at a time (``_rows.row_stats``) and the label logit is read from ``x`` itself
    (``_xla.pick``). With ``keep``, they are reduced from whole rows whose exponentials are
    returned too, for the derivative (``_xla.saves_exponentials``); else those are None.
    ``alone``: no derivative follows (``_rows.row_stats``). ``all_admissible``: with ``keep``,
    the smoothing's sums are first taken as if every class were admissible, as the derivative
    rule decided (``_rows.assumes_all_admissible``).
    """
    dtype = compute_dtype(x.dtype)
    num_classes = x.shape[-1]
    meaning = _labels.classify(labels, num_classes, ignore_index)
    label_logit = _rows.capped(_xla.pick(x, meaning.class_index).astype(dtype), options)
    exponentials = None
    if keep:
        partial, exponentials = _rows.stats_and_exponentials(
            x,
            mask,
            weights,
            options,
            num_classes,
            kept=True,
            all_admissible=all_admissible,
            unguarded=unguarded,
            small_cap=small_cap,
        )
        stats = _rows.finish(partial, num_classes)
    else:
        summed = _rows.row_stats(
            x, mask, weights, options, num_classes, _rows.summed, alone, unguarded
        )
        stats = _rows.finish_summed(summed, num_classes)
    label_mask = None if mask is None else _xla.pick(mask, meaning.class_index)
    label_logit = _rows.label_logit_within(label_logit, stats, label_mask)
    w_y = _rows.label_weight(weights, meaning.class_index, dtype)
    rows = _rows.status(meaning, stats)
    loss = _rows.finalize(_rows.row_loss(stats, label_logit, w_y, options), rows)
    counted = _rows.counted(w_y, rows)
    return loss[..., 0], counted[..., 0], (meaning, stats, label_logit, w_y, rows, exponentials)


def _integer_ce_jvp(ignore_index, unguarded, small_cap, primals, tangents):
    x, labels, mask, weights, options = primals
    x_dot, _, _, w_dot, o_dot = tangents
    dots = _rows.tangents_of(x_dot, w_dot, o_dot, weights, options)
    # Smoothing's sums as if every class were admissible need no buffer of their own.
    all_admissible = _rows.assumes_all_admissible(
        x, mask, weights, options, unguarded, small_cap, kept=True
    )
    keep = dots.per_class(options) and _xla.saves_exponentials(
        x,
        soft_cap=options.logit_soft_cap is not None,
        smoothing=options.smoothing and not all_admissible,
    )
    loss, counted, (meaning, stats, label_logit, w_y, rows, exponentials) = _forward(
        x,
        labels,
        mask,
        weights,
        options,
        ignore_index,
        unguarded,
        small_cap,
        keep,
        all_admissible=all_admissible,
    )
    t = None
    if dots.per_class(options):
        t = _rows.class_tangent(
            x, meaning.class_index, mask, weights, options, stats, w_y, rows, dots, exponentials
        )
    w_y_dot = None
    if dots.weights is not None:
        w_y_dot = _rows.label_weight(dots.weights, meaning.class_index, stats.shift.dtype)
    derivs = _rows.row_derivatives(stats, label_logit, w_y, options)
    t, counted_dot = _rows.row_tangent(t, derivs, rows, w_y_dot, dots)
    return (loss, counted), (_autodiff.or_zeros(t, loss), _autodiff.or_zeros(counted_dot, counted))


_integer_ce.defjvp(_integer_ce_jvp, symbolic_zeros=True)


def _vocabulary_parallel(x: jax.Array) -> bool:
    """Whether the logits' class axis is split over an explicit mesh axis, and at most their
    first batch axis is split too: the layout of :func:`_on_explicit_mesh`. Other splits of
    the class axis are gathered per device (``_mesh.on_own_rows``)."""
    if not _xla.class_axis_sharded(x):
        return False
    spec = tuple(jax.typeof(x).sharding.spec)
    return all(entry is None for entry in spec[1:-1])


def _on_explicit_mesh(x, labels, mask, weights, ignore_index, hyperparameters, reduction):
    """The loss of logits whose class axis is split over an explicit mesh axis.

    Under explicit sharding every intermediate must carry a sharding, and a gather across the
    class axis would need the other shards' columns: the vocabulary-parallel implementation of
    ``jaxce.sharded`` computes the same loss with one all-reduce of a few numbers per example.
    """
    sharding = jax.typeof(x).sharding
    spec = sharding.spec
    data = [a for a in spec[:-1] if a is not None]
    return _sharding.softmax_cross_entropy_with_integer_labels(
        x,
        labels,
        axis_name=spec[-1],
        data_axis_name=data[0] if data else None,
        mesh=sharding.mesh,
        where=mask,
        ignore_index=ignore_index,
        class_weights=weights,
        reduction=reduction,
        **hyperparameters,
    )


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    logit_soft_cap: float | jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Softmax cross-entropy with integer class labels, numerically stable and option-complete.

    For example :math:`i` with label :math:`y`, logits :math:`z` (after the optional soft cap
    :math:`z = \mathrm{cap}\tanh(x/\mathrm{cap})`), admissible classes :math:`A` (``where`` is
    True and the logit is above ``-inf``), :math:`K = |A|`, class weights :math:`w`:

    .. math::
        \ell_i = (1-\varepsilon)\, w_y (\mathrm{lse}(z) - z_y)
          + \frac{\varepsilon}{K} \sum_{c \in A} w_c (\mathrm{lse}(z) - z_c)
          + \lambda_z\, w_y\, \mathrm{lse}(z)^2

    With nothing masked this is exactly PyTorch's ``cross_entropy(..., weight,
    label_smoothing)``; smoothing spreads only over admissible classes, so a masked vocabulary
    (``-inf`` logits) keeps the loss finite. Every difference :math:`\mathrm{lse} - z_c` is
    computed from differences to the row max, so the loss is exact however far the logits are
    from zero. The derivative is hand-written
    (:math:`\partial \ell / \partial z = \mathrm{softmax}(z) - y` without options) and works in
    forward and reverse mode; reverse mode saves only the logits and a few float32 numbers per
    example.

    Args:
      logits: ``[..., C, ...]`` floating-point scores (any float dtype; computed in float32).
      labels: integer class indices (any integer dtype) with the logits' shape minus ``axis``.
      axis: the class axis (e.g. 1 for PyTorch's ``[N, C, d1, ...]``), or a tuple of axes
        flattened into one class axis as optax does.
      where: optional boolean mask of admissible classes, with the logits' rank and
        broadcastable to ``logits`` (``[1, C]`` for ``[N, C]`` logits), or with the labels' rank,
        broadcastable to their shape: one flag per example, as optax (a mask that could be read
        both ways, ``[1, C]`` for ``[N, T, C]`` logits with ``T = C``, is a ``ValueError``).
        Masked classes take no part in the normalisation, however large (or NaN) their logits.
        A row with no admissible class has loss 0.
      ignore_index: label value that marks an example to skip (loss 0, gradient 0, not
        counted in a mean, whatever its logits hold); PyTorch uses -100. ``None`` ignores
        nothing. It must be a value the labels' dtype can hold.
      class_weights: optional ``[C]`` weights, PyTorch's ``weight``.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, PyTorch's semantics (a scalar). On CPU,
        for float32 and float64 logits without ``where`` (and without a traced soft cap),
        its sums are first taken as if every class were admissible, and again for a batch
        that holds a ``-inf`` logit: for batches with masked classes, passing the mask as
        ``where`` saves that second pass.
      z_loss: :math:`\lambda_z \ge 0`, adds :math:`\lambda_z \mathrm{lse}^2` per example
        (PaLM, typically 1e-4); scaled by the example's class weight.
      logit_soft_cap: optional cap in :math:`[2^{-64}, 2^{64}]` applied before the softmax
        (Gemma 2 uses 30); ``None`` or ``inf`` means no cap. Given as a number (not traced),
        whole rows take it without a select, which is faster on CPU; a traced cap is exact
        too, a schedule's ``inf`` included, in row chunks (NaN outside that range).
      reduction: ``"none"`` (per-example, the labels' shape), ``"sum"`` or ``"mean"``: the sum
        divided by the total weight :math:`\sum_i w_{y_i}` of the counted examples, as PyTorch.
        A mean over zero counted examples is 0 (PyTorch gives NaN), unless their sum is NaN.

    Returns:
      The loss in ``result_type(logits.dtype, float32)``: per example for ``"none"``, else a
      scalar. An example whose admissible logits contain a NaN, or whose label lies outside
      ``[0, C)`` without being ``ignore_index``, gets a NaN loss and NaN gradients (so a mean or
      sum is NaN); the other examples are unaffected. :func:`check_labels` finds bad labels.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
      >>> jaxce.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1]))
      Array([0.4170..., 0.2200...], dtype=float32)
      >>> jaxce.softmax_cross_entropy_with_integer_labels(
      ...     logits, jnp.array([0, -100]), ignore_index=-100, label_smoothing=0.1,
      ...     reduction="mean")
      Array(0.5136..., dtype=float32)

    References:
      PyTorch ``torch.nn.functional.cross_entropy``; optax
      ``softmax_cross_entropy_with_integer_labels``; Chowdhery et al., "PaLM", 2022 (z-loss);
      Gemma Team, "Gemma 2", 2024 (soft-capping); Szegedy et al., 2016 (label smoothing).
    """
    layout, x, labels, ignore_index, weights = _labels.prepare(
        "logits",
        logits,
        labels,
        axis=axis,
        ignore_index=ignore_index,
        reduction=reduction,
        class_weights=class_weights,
    )
    mask = layout.mask_to_last("where", where)
    cdt = compute_dtype(x.dtype)
    options = _rows.make_options(cdt, label_smoothing, z_loss, logit_soft_cap)
    if _vocabulary_parallel(x):
        hyperparameters = dict(
            label_smoothing=label_smoothing, z_loss=z_loss, logit_soft_cap=logit_soft_cap
        )
        return _on_explicit_mesh(x, labels, mask, weights, ignore_index, hyperparameters, reduction)
    unguarded = _rows.unguarded(options, logit_soft_cap)
    small_cap = _rows.small_cap(options, logit_soft_cap, cdt)
    losses, counted = _mesh.on_own_rows(
        lambda x, labels, mask, shared: _integer_ce(
            x, labels, mask, *shared, ignore_index, unguarded, small_cap
        ),
        (x, labels, mask),
        (weights, options),
    )
    return reduce_loss(losses, reduction, counted)


# ----------------------------------------------------------------------------------------------
# Soft labels. loss = sum_c w_c y'_c (lse - z_c) with y' = (1-eps) y + eps/K [c in A], terms
# with a zero target being 0 (0 log 0 = 0, even at -inf logits).
#   dloss/dz = (sum_c w_c y'_c) p - w y',   dloss/dy = (1-eps) w (lse - z) on admissible rows,
#   dloss/dw_c = y'_c (lse - z_c),          dloss/deps = sum_c w_c (1/K [c in A] - y_c)(lse - z_c)
class _SoftRows(NamedTuple):
    """Per-row values of the soft-label loss, each ``[..., 1]``, from the forward pass."""

    shift: jax.Array
    log_sum: jax.Array  # -inf for a row with no admissible class
    num_admissible: jax.Array | None  # K, with label smoothing
    mass: jax.Array  # sum_c w_c y'_c
    loss: jax.Array


def _soft_targets(adm, y, mask, eps, count):
    """``y'``: the targets mixed with the uniform distribution over the ``count`` admissible
    classes, 0 on masked classes."""
    t = y if mask is None else jnp.where(mask, y, jnp.zeros_like(y))
    if eps is None:
        return t
    return (1 - eps) * t + jnp.where(adm, eps / jnp.maximum(count, 1), jnp.zeros_like(t))


def _weighted(t, weights):
    return t if weights is None else t * _rows.class_row(weights, t)


def _half_gaps(z, shift, t):
    """``(shift - z) / 2`` where the target ``t`` is nonzero, 0 elsewhere (0 log 0 = 0, even at
    -inf logits; halves: ``_rows.half_difference``). ``(lse - z) / 2`` is this plus half the
    row's log-sum, which is added once per row: a NaN logit (a NaN log-sum) then makes its row
    NaN whatever the targets (as optax)."""
    return jnp.where(t != 0, _rows.half_difference(shift, z), jnp.zeros_like(z))


def _soft_rows(x, y, mask, weights, eps) -> _SoftRows:
    """The per-row values of a chunk of rows (``[rows, C]``)."""
    return _soft_rows_and_exponentials(x, y, mask, weights, eps)[0]


def _soft_rows_and_exponentials(x, y, mask, weights, eps) -> tuple[_SoftRows, jax.Array]:
    """:func:`_soft_rows` and the exponentials ``exp(x - shift)`` its log-sum adds up. Whole
    rows, of a row chunk or of kept exponentials (at most ``_xla.SOFT_KEPT_BYTES``): in sub-rows
    the chunks took 1.05-1.2x the time (``_xla.row_blocks``)."""
    m, e = max_and_exponentials(x, mask)
    shift, log_sum = shift_and_log_sum(m, jnp.sum(e, axis=-1, keepdims=True))
    z = x.astype(shift.dtype)
    adm = _rows.admissible(z, mask)
    count = None
    if eps is not None:
        count = jnp.sum(adm, axis=-1, keepdims=True, dtype=z.dtype)
    wt = _weighted(_soft_targets(adm, y.astype(z.dtype), mask, eps, count), weights)
    mass = jnp.sum(wt, axis=-1, keepdims=True)
    # Half the loss, doubled once summed: a term w y' (lse - z) may be representable where
    # lse - z is not (logits 3e38 and -3e38), and the sum where its terms' sum is not.
    half = jnp.sum(wt * _half_gaps(z, shift, wt), axis=-1, keepdims=True)
    return _SoftRows(shift, log_sum, count, mass, _soft_row_loss(half, mass, log_sum)), e


def _soft_row_loss(half, mass, log_sum):
    """A row's loss ``sum_c w_c y'_c (lse - z_c)`` from ``half``, the sum of its terms
    ``w_c y'_c (shift - z_c) / 2``, ``mass``, the sum of ``w_c y'_c``, and the row's log-sum.
    An empty row (log-sum -inf) has loss 0, unless its targets hold a NaN: never hidden. A NaN
    log-sum (a NaN logit) makes the row NaN, whatever the targets (``mass`` times NaN)."""
    loss = (half + mass * (log_sum * 0.5)) * 2
    empty = jnp.isneginf(log_sum) & ~jnp.isnan(mass)
    return jnp.where(empty, jnp.zeros_like(loss), loss)


def _soft_forward(x, y, mask, weights, eps) -> _SoftRows:
    fuses_whole = mask is None and weights is None and eps is None
    return _loops.by_row_chunks(
        _soft_rows, x, y, mask, shared=(weights, eps), fuses_whole=fuses_whole
    )


class _RowSums(NamedTuple):
    """The sums over each row that both fused soft-label passes read, each ``[..., 1]``."""

    max: jax.Array  # m: -inf for a row of -inf logits, NaN (or not) for a row with a NaN
    shift: jax.Array  # m with +-inf replaced by +-big (_finite_part), that log_sum is shifted by
    sum_exp: jax.Array  # sum exp(x - shift): NaN for a row with a NaN logit
    mass: jax.Array  # sum y

    def log_sum(self) -> jax.Array:
        """The log of ``sum_exp``, taken by each pass that reads it: a log shared by the fused
        pass's loss and the exact pass's branch XLA kept as an [..., C] broadcast (float32
        [16384, 4096]: 256 MiB)."""
        return jnp.log(self.sum_exp)


def _finite_part(v: jax.Array, big) -> jax.Array:
    """``v`` with +-inf replaced by +-``big``, as ``sign(v) min(|v|, big)``: a ``clip`` (which
    XLA's CPU compiler does not fuse into its reductions) written in operations it does. A NaN
    stays NaN only where ``sign`` and ``min`` pass it on, which callers do not rely on."""
    return jnp.sign(v) * jnp.minimum(jnp.abs(v), big)


def _row_sums(x, y, sub: _loops.SubRows) -> _RowSums:
    """The max, shift, log-sum and target mass of each row, for :func:`_fusible_soft_rows` and,
    where that gives a row that is not finite, :func:`_fusible_exact_soft_rows`: computed once
    for both, so that the second reads the logits and targets once more, not four times, and
    the compiled program holds one reduction in its branch, not four.

    The shift is ``m`` where ``m`` is finite and +-big where it is infinite: ``exp(x - shift)``
    is then 0 at every finite logit, and an empty row's sum is 0 (log: -inf), a +inf logit's
    inf, as in the exact rows. The per-row rules go by the log-sum, not the max: XLA's CPU
    reductions (max, min) and sign can pass over a NaN logit, its sum of exponentials not.

    ``x`` and ``y`` are the rows' sub-rows (``sub``: :func:`_in_sub_rows`), the sums the rows'."""
    dtype = compute_dtype(x.dtype)
    m = sub.max(row_max(x, None))
    shift = _finite_part(m, jnp.finfo(dtype).max)
    sum_exp = _sum(sub, jnp.exp(_shifted(x, shift, sub)))
    return _RowSums(m, shift, sum_exp, _sum(sub, y.astype(dtype)))


def _shifted(x, shift, sub: _loops.SubRows) -> jax.Array:
    """``x - shift`` in the compute dtype (``shift``: the rows' ``[..., 1]``), of the sub-rows
    ``x`` (``sub``)."""
    return x.astype(shift.dtype) - sub.spread(shift)


def _sum(sub: _loops.SubRows, values: jax.Array) -> jax.Array:
    """The rows' sums (``[..., 1]``) of ``values`` over their sub-rows."""
    return sub.sum(jnp.sum(values, axis=-1, keepdims=True))


def _in_sub_rows(x, y):
    """``(sub, x, y)``: the soft-label rows' sub-rows (``_loops.SubRows``: whole rows but on
    CPU, for rows longer than its reductions take at full speed) and the arrays' views."""
    sub = _loops.SubRows.of(x)
    return (sub, *sub.view(x, y))


def _fusible_soft_rows(x, y, sums: _RowSums, sub: _loops.SubRows, *, alone: bool) -> _SoftRows:
    """The soft-label rows without options, written only in operations that XLA's CPU compiler
    fuses into its reductions (arithmetic, ``exp``, ``log``, ``min``, ``max``, conversions; no
    comparison or select), so that they read whole rows and keep nothing of their size
    (``_xla.fuses_soft_loss``); ``sums``: :func:`_row_sums`. A row whose exact loss needs a
    select comes out NaN or infinite here: a zero target on a -inf logit (``0 * inf``, where
    the loss takes ``0 log 0 = 0``), a row of -inf logits, a +inf or NaN logit or target,
    a target on a -inf logit (+inf, its true loss). ``x``, ``y``: the
    rows' sub-rows (``sub``); ``alone``: whether the caller reads the rows' loss alone, not
    their log-sum too (as the derivative does)."""
    dtype = sums.sum_exp.dtype
    log_sum = sums.log_sum()
    if alone and _xla.fuses_soft_pass_whole(sub.rows):
        # One fusion reads each row once: the differences x - shift of the sum of exponentials,
        # shared (the loss alone, against optax's: 0.83-0.94x -> 0.99-1.00x at float32 and
        # bfloat16 [16384, 4096] and [4096, 32768]). Where the
        # log-sum is read too, XLA computes it in a kernel of its own, and the shared
        # differences would be written out before it.
        gaps = sub.spread(log_sum) - _shifted(x, sums.shift, sub)
        loss = _sum(sub, y.astype(dtype) * gaps)
    else:
        # Else XLA leaves the log between the two reductions outside their fusions, and
        # anything of [..., C] they share is kept as an array: the differences, one conversion of
        # narrow logits, or of narrow targets shared with the mass's sum. So the differences
        # take the max m, not the shift (the same where m is finite; a row whose m is infinite
        # comes out NaN, -inf - -inf or inf - inf, and takes the exact pass), and the
        # conversions are values of their own. The shift written again, -min(-m, big), cost a
        # kernel of its own, big's broadcast, that XLA's CPU compiler generated code for (float32
        # [16384, 4096] value_and_grad: 9 such kernels with it, 8 without).
        gaps = (sub.spread(sums.max) - _xla.unshared(x).astype(dtype)) + sub.spread(log_sum)
        loss = _sum(sub, _xla.unshared(y).astype(dtype) * gaps)
    return _SoftRows(sums.shift, log_sum, None, sums.mass, loss)


def _fusible_exact_soft_rows(x, y, sums: _RowSums, sub: _loops.SubRows) -> _SoftRows:
    """The soft-label rows without options as :func:`_soft_forward` computes them, for every
    input (inf and NaN included), written like :func:`_fusible_soft_rows` in operations that
    XLA's CPU compiler fuses into its reductions, with the selects per row, after the sums;
    ``sums``: :func:`_row_sums`.

    An entry's term ``y h`` (``h``: the half gap, +inf at a -inf logit, -inf at a +inf one) is
    0 where ``y`` is, even where ``h`` is infinite (``0 log 0 = 0``), which needs a select per
    entry there. Here it is ``y fin(h) + 2 sign(y) sign(d) big``, where ``fin(h)`` is ``h`` with
    +-inf replaced by +-``big`` and ``d = h - fin(h)`` is 0 where ``h`` is finite, +-inf where
    not: ``y h`` where ``h`` is finite, 0 for a zero target, and +-inf (``2 big`` overflows)
    for any other target on an infinite ``h``, the sign of ``y h``. About four times the
    operations per entry of :func:`_fusible_soft_rows`, in one more reduction over the logits
    and targets. ``x``, ``y``: the rows' sub-rows (``sub``)."""
    dtype = sums.sum_exp.dtype
    big = jnp.finfo(dtype).max
    # Values of their own, so that their float32 conversions stay inside the sum (_xla.unshared).
    z = _xla.unshared(x).astype(dtype)
    t = _xla.unshared(y).astype(dtype)
    # The gaps take the exact rows' shift, shift_of(m): m, or 0 where it is infinite.
    shift = sums.shift - _finite_part(sums.max - sums.shift, big)
    h = _rows.half_difference(sub.spread(shift), z)
    finite = _finite_part(h, big)
    d = h - finite
    infinite = jnp.sign(t) * jnp.sign(d)
    half = _sum(sub, t * finite + (infinite + infinite) * big)
    log_sum = sums.log_sum()
    loss = _soft_row_loss(half, sums.mass, log_sum)
    return _SoftRows(shift_of(sums.max), log_sum, None, sums.mass, loss)


def _whole_batch(fn):
    """``fn`` of ``(x, y)`` (per-row results), under ``vmap`` called once on the whole batch of
    batches (its results are per row at any number of leading axes): ``fn`` branches on the
    values of all its rows, and ``vmap`` of that branch would select between both sides, each
    computed."""
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, x, y):
        x, y = (
            a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, b in zip((x, y), in_batched, strict=True)
        )
        out = wrapped(x, y)
        return out, jax.tree.map(lambda _: True, out)

    def call(x, y):
        # Op by op, fn itself: a custom_vmap call would be compiled again at every call.
        return wrapped(x, y) if _xla.staged() else fn(x, y)

    return call


def _fused_else_exact(x, y, part, shared: bool):
    """``part`` of the soft-label rows without options, from one fused pass
    (:func:`_fusible_soft_rows`); if a row's loss comes out NaN or infinite there, of the whole
    batch again in the exact fused pass (:func:`_fusible_exact_soft_rows`), so the two agree
    wherever the first gives a finite number (a NaN input stays NaN either way; a row whose
    ``lse - z`` overflows where its loss does not is finite in the second). ``part`` picks
    what the caller reads, so the compiled program computes nothing else.

    ``shared``: whether the exact pass reads the fused pass's row sums (:func:`_row_sums`),
    for the derivative's rows, which are computed whatever the branch (float32 [4096, 4096]
    with 100 -inf columns, ``value_and_grad`` against optax's in the same run: 0.78x with the
    sums computed again, 0.95x shared). The loss alone computes them again in the branch: there
    XLA makes the fused pass one fusion that reads each row once, and sums read by the branch too
    would be four reductions (float32 [16384, 4096], against optax's loss in the same run: 0.83x
    as one fusion, 0.47x as four)."""
    sub, x, y = _in_sub_rows(x, y)
    sums = _row_sums(x, y, sub)
    fused = _fusible_soft_rows(x, y, sums, sub, alone=not shared)

    def exact():
        again = sums if shared else _row_sums(x, y, sub)
        return part(_fusible_exact_soft_rows(x, y, again, sub))

    # Whether a row is not finite: a plain sum of the losses XLA merges with the rows' own sums
    # into one sum of the whole array, which it writes out first; ``loss * 0`` it does not.
    return _xla.unless_nonfinite(fused.loss, lambda: part(fused), exact)


# The rows, for the derivative; the loss alone.
_fused_soft_rows = _whole_batch(lambda x, y: _fused_else_exact(x, y, lambda rows: rows, True))
_plain_soft_loss = _whole_batch(
    lambda x, y: _fused_else_exact(x, y, lambda r: r.loss[..., 0], False)
)


@jax.custom_jvp
def _plain_soft_rows(x, y) -> _SoftRows:
    """The soft-label rows without options, from the fused pass (:func:`_fused_else_exact`).

    Its choice of a pass for the whole batch (``custom_vmap``) has no derivative in reverse
    mode; a derivative of the derivative rule (``jax.grad`` of ``jax.grad``) takes that of the
    rows of whole arrays, :func:`_soft_rows`, which give the same values."""
    return _fused_soft_rows(x, y)


@_plain_soft_rows.defjvp
def _plain_soft_rows_jvp(primals, tangents):
    _, dot = jax.jvp(lambda x, y: _soft_rows(x, y, None, None, None), primals, tangents)
    return _plain_soft_rows(*primals), dot


def _no_options(mask, weights, eps) -> bool:
    """Whether a soft-label loss has no mask, class weights or smoothing (what the fused pass,
    :func:`_plain_soft_rows`, computes)."""
    return mask is None and weights is None and eps is None


@jax.custom_jvp
def _soft_ce(x, y, mask, weights, eps):
    if _no_options(mask, weights, eps) and _xla.fuses_soft_loss(x, y):
        return _plain_soft_loss(x, y)
    return _soft_forward(x, y, mask, weights, eps).loss[..., 0]


@_autodiff.rematerialized
def _soft_tangent(x, y, mask, weights, eps, rows: _SoftRows, e, x_dot, y_dot, w_dot, eps_dot):
    """The tangent; ``e``: the forward pass's exponentials if kept (``_xla.saves_exponentials``),
    else None."""
    z = x.astype(rows.shift.dtype)
    yf = y.astype(z.dtype)
    adm = _rows.admissible(z, mask)
    t = _soft_targets(adm, yf, mask, eps, rows.num_admissible)
    wt = _weighted(t, weights)
    has_row = ~jnp.isneginf(rows.log_sum)
    out = None
    if x_dot is not None:
        p = probabilities(z, rows.shift, rows.log_sum, mask, e)
        dz = jnp.where(has_row, rows.mass * p - wt, 0)
        out = jnp.sum(dz * x_dot.astype(z.dtype), axis=-1)
    # (lse - z) / 2 (only the labels', the weights' and the smoothing's derivatives read it):
    # each weights it, then doubles the product or the sum (_rows.half_gap)
    gaps = _rows.half_gap(rows.shift, z, rows.log_sum)
    if y_dot is not None:
        live = has_row if mask is None else has_row & mask
        scale = jnp.ones_like(z) if eps is None else (1 - eps) * jnp.ones_like(z)
        # A weight of 0 (a class weight, eps = 1) on an infinite gap (a -inf logit) adds 0.
        dy = jnp.where(live, weighted(_weighted(scale, weights), gaps) * 2, jnp.zeros_like(z))
        out = _autodiff.add(out, jnp.sum(dy * y_dot.astype(z.dtype), axis=-1))
    if w_dot is not None:
        dw = jnp.where(has_row, weighted(t, gaps) * 2, jnp.zeros_like(z))
        out = _autodiff.add(out, jnp.sum(dw * _rows.class_row(w_dot, dw), axis=-1))
    if eps_dot is not None:
        assert rows.num_admissible is not None  # kept whenever there is smoothing
        y0 = yf if mask is None else jnp.where(mask, yf, jnp.zeros_like(yf))
        uniform = jnp.where(adm, 1 / jnp.maximum(rows.num_admissible, 1), jnp.zeros_like(z))
        dt = _weighted(uniform - y0, weights)
        d_eps = jnp.where(has_row, weighted(dt, gaps), jnp.zeros_like(z))
        out = _autodiff.add(out, (jnp.sum(d_eps, axis=-1) * 2) * eps_dot)
    return out


def _soft_ce_jvp(primals, tangents):
    x, y, mask, weights, eps = primals
    x_dot, y_dot, _, w_dot, eps_dot = (None if _loops.is_zero(t) else t for t in tangents)
    e = None
    kept = _xla.saves_exponentials(x, smoothing=eps is not None, soft_labels=True)
    if x_dot is not None and kept:
        rows, e = _soft_rows_and_exponentials(x, y, mask, weights, eps)
    elif _no_options(mask, weights, eps) and _xla.fuses_soft_rows(x, y):
        rows = _plain_soft_rows(x, y)
    else:
        rows = _soft_forward(x, y, mask, weights, eps)
    loss = rows.loss[..., 0]
    t = _soft_tangent(x, y, mask, weights, eps, rows, e, x_dot, y_dot, w_dot, eps_dot)
    return loss, _autodiff.or_zeros(t, loss)


_soft_ce.defjvp(_soft_ce_jvp, symbolic_zeros=True)


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Softmax cross-entropy against soft labels (probability distributions).

    .. math::
        \ell_i = -\sum_c w_c\, y'_c \log \mathrm{softmax}(z)_c, \qquad
        y' = (1-\varepsilon) y + \varepsilon / K

    with :math:`0 \log 0 = 0`, so ``-inf`` logits where the label is 0 are fine. Derivatives flow
    to both the logits (:math:`(\sum_c w_c y'_c)\,\mathrm{softmax}(z) - w \odot y'`) and the
    labels (:math:`-(1-\varepsilon) w \log \mathrm{softmax}(z)`), as knowledge distillation needs.

    Args:
      logits: floating-point scores with at least one axis.
      labels: target probabilities, the logits' shape (need not be normalised).
      axis: the class axis or a tuple of axes.
      where: optional boolean mask broadcastable to the logits with their rank, or one flag
        per example with the batch's rank (as for the integer labels' loss); ``False`` classes
        take no part. A row with no admissible class has loss 0.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, mixing in the uniform distribution over
        the :math:`K` admissible classes (PyTorch's semantics when nothing is masked).
      class_weights: optional ``[C]`` weights (PyTorch's ``weight``).
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over examples, as PyTorch does for
        probability targets; 0 for an empty batch).

    Returns:
      The logits' shape without ``axis`` (or a scalar), in ``result_type(logits, float32)``. A
      NaN among a row's admissible logits or labels makes that row's loss NaN.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> truth = jnp.array([1.0, 0.0, 0.0])
      >>> float(jaxce.softmax_cross_entropy(jnp.log(jnp.array([0.5, 0.2, 0.3])), truth))
      0.6931471...

    References:
      optax ``softmax_cross_entropy``; PyTorch ``cross_entropy`` with probability targets;
      Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
    """
    logits = _checks.as_float_array("logits", logits)
    labels = _checks.as_float_array("labels", labels)
    _checks.check_reduction(reduction)
    _checks.check_shape("labels", labels, logits.shape, "the logits' shape")
    # No classes: every row has no admissible class, a loss of 0 (optax's sum over nothing).
    layout = layout_of("logits", logits, axis)
    weights = _checks.class_vector("class_weights", class_weights, layout.num_classes)
    mask = layout.mask_to_last("where", where)
    options = _rows.make_options(compute_dtype(logits.dtype), label_smoothing, 0.0, None)
    losses = _mesh.on_own_rows(
        lambda x, y, mask, shared: _soft_ce(x, y, mask, *shared),
        (layout.to_last(logits), layout.to_last(labels), mask),
        (weights, options.label_smoothing),
    )
    return reduce_loss(losses, reduction)


# ----------------------------------------------------------------------------------------------
# NLL on log-probabilities: loss = -w_y log_probs[y];  dloss/dlog_probs = -w_y onehot(y),
# dloss/dw_y = -log_probs[y].
def _nll_value(log_probs, labels, weights, ignore_index):
    dtype = compute_dtype(log_probs.dtype)
    meaning = _labels.classify(labels, log_probs.shape[-1], ignore_index)
    w_y = _rows.label_weight(weights, meaning.class_index, dtype)
    picked = jnp.take_along_axis(log_probs, meaning.class_index[..., None], axis=-1).astype(dtype)
    # Every row has classes: only ignored and out-of-range labels matter.
    no_stats = _rows.Stats(picked, jnp.zeros_like(picked), None, None, None, None)
    rows = _rows.status(meaning, no_stats)
    loss = _rows.finalize(weighted(w_y, -picked), rows)  # a weight of 0 on log 0: 0
    counted = _rows.counted(w_y, rows)
    return loss[..., 0], counted[..., 0], (meaning, w_y, picked, rows)


@_autodiff.rematerialized
def _nll_derivative(class_index, w_y, rows: _rows.Status, log_probs) -> jax.Array:
    """``d loss / d log_probs`` (of their shape): ``-w_y`` in the label's column, 0 elsewhere,
    finalized as the loss is (:func:`_rows.finalize`): 0 on an ignored row, and NaN in every
    column of a row whose label is out of range (it has no column; the cross-entropy's
    derivative is NaN there too), not only in the column it is clamped to. Written as a select,
    not a scatter into zeros: one write of the gradient in reverse mode."""
    at_label = jnp.where(_rows.one_hot(class_index, log_probs), -w_y, jnp.zeros_like(w_y))
    return _rows.finalize(at_label, rows)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _nll(log_probs, labels, weights, ignore_index):
    loss, counted, _ = _nll_value(log_probs, labels, weights, ignore_index)
    return loss, counted


def _nll_jvp(ignore_index, primals, tangents):
    log_probs, labels, weights = primals
    lp_dot, _, w_dot = (None if _loops.is_zero(t) else t for t in tangents)
    loss, counted, (meaning, w_y, picked, rows) = _nll_value(
        log_probs, labels, weights, ignore_index
    )
    t = counted_dot = None
    if lp_dot is not None:
        d = _nll_derivative(meaning.class_index, w_y, rows, log_probs)
        # The label's column only, by a select (linear in lp_dot; transposed, a select again,
        # never a scatter): a NaN or infinite tangent elsewhere in the row (log 0 of a class
        # with probability 0) changes nothing, as in the loss.
        at_label = _rows.one_hot(meaning.class_index, log_probs)
        terms = jnp.where(at_label, d * lp_dot.astype(d.dtype), jnp.zeros_like(d))
        t = jnp.sum(terms, axis=-1, keepdims=True)
    if w_dot is not None and weights is not None:
        w_y_dot = _rows.label_weight(w_dot, meaning.class_index, w_y.dtype)
        t = _autodiff.add(t, _rows.finalize(-picked, rows) * w_y_dot)
        counted_dot = _rows.counted(w_y_dot, rows)[..., 0]
    t = None if t is None else t[..., 0]
    return (loss, counted), (_autodiff.or_zeros(t, loss), _autodiff.or_zeros(counted_dot, counted))


_nll.defjvp(_nll_jvp, symbolic_zeros=True)


def nll_loss(
    log_probs: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: Axis = -1,
    ignore_index: int | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Negative log-likelihood of integer labels under given log-probabilities.

    :math:`\ell_i = -w_{y_i} \log p_{i, y_i}`. ``softmax_cross_entropy_with_integer_labels`` is
    ``nll_loss(log_softmax(logits), labels)`` computed in one stable step.

    Args:
      log_probs: floating-point log-probabilities (e.g. from :func:`log_softmax`).
      labels: integer class indices, the shape of ``log_probs`` without ``axis``.
      axis: the class axis or a tuple of axes.
      ignore_index: label value to skip (loss 0, gradient 0, not counted in a mean).
      class_weights: optional ``[C]`` weights (PyTorch's ``weight``).
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (divided by the summed weights of the
        non-ignored examples, as PyTorch; 0 if there are none).

    Returns:
      Per-example losses or a scalar, in ``result_type(log_probs, float32)``; NaN for a label
      out of range (and for a NaN log-probability of the label), whose row of the gradient is
      NaN in every column.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> y_pred = jnp.array([[0.3, 0.3, 0.4], [0.3, 0.4, 0.3], [0.1, 0.2, 0.7]])
      >>> float(jaxce.nll_loss(jnp.log(y_pred), jnp.array([2, 1, 0]), reduction="mean"))
      1.378388...

    References:
      PyTorch ``torch.nn.functional.nll_loss``.
    """
    _, lp, labels, ignore_index, weights = _labels.prepare(
        "log_probs",
        log_probs,
        labels,
        axis=axis,
        ignore_index=ignore_index,
        reduction=reduction,
        class_weights=class_weights,
    )
    losses, counted = _mesh.on_own_rows(
        lambda lp, labels, weights: _nll(lp, labels, weights, ignore_index), (lp, labels), weights
    )
    return reduce_loss(losses, reduction, counted)
