"""Softmax cross-entropy (integer and soft labels) and the negative log-likelihood.

The integer-label loss is written in terms of a few per-row statistics (``RowStats``): the
logsumexp over admissible classes, the label's logit, the number and total weight of admissible
classes and their weighted mean logit. ``row_loss`` and ``row_grad_coefficients`` turn them into
the loss and its gradient; the fused linear loss (``_linear``) and the sharded loss
(``_sharding``) accumulate the same statistics over vocabulary chunks or devices and call the same
two functions, so every variant computes one formula.

Per example, with logits ``z`` (soft-capped if asked), admissible classes ``A`` (``where``
and ``z > -inf``), ``K = |A|``, class weights ``w``, ``W = sum_A w``, smoothing ``eps``,
z-loss ``zl``:

    loss = (1 - eps) w_y (lse - z_y) + eps / K sum_A w_c (lse - z_c) + zl w_y lse**2
    dloss/dz_c = A p_c - (1 - eps) w_y [c = y] - eps / K w_c [c in A]
    with A = (1 - eps) w_y + eps W / K + 2 zl w_y lse and p = softmax over A.

With nothing masked this is PyTorch's ``cross_entropy`` with ``weight`` and ``label_smoothing``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxce import _checks
from jaxce._checks import Axis
from jaxce._layout import ClassLayout, compute_dtype
from jaxce._reduction import reduce_loss
from jaxce._sigmoid import soft_cap, soft_cap_derivative
from jaxce._softmax import max_and_log_sum, probabilities, row_max, row_sums


class RowStats(NamedTuple):
    """Per-example statistics, each of shape ``[..., 1]`` in the compute dtype.

    The logsumexp is kept as ``max + log_sum`` (``log_sum = log sum exp(z - max)``): every
    difference ``lse - z`` is then computed as ``(max - z) + log_sum``, exact at logits so large
    that ``max + log_sum`` rounds to ``max``.
    """

    max: jax.Array  # the row max of admissible logits (0 for an empty row)
    log_sum: jax.Array  # log sum exp(z - max) over admissible classes (-inf for an empty row)
    label_logit: jax.Array  # z_y, read even if the label is not admissible (optax's behaviour)
    count: jax.Array  # K, the number of admissible classes
    weight_total: jax.Array  # W = sum of class weights over admissible classes (K if unweighted)
    mean_logit: jax.Array  # sum_A w_c z_c / K (only used with label smoothing)

    @property
    def lse(self) -> jax.Array:
        """The logsumexp over admissible classes (-inf for an empty row)."""
        return self.max + self.log_sum

    @classmethod
    def from_lse(cls, lse, label_logit, count, weight_total, mean_logit) -> RowStats:
        """Statistics from a logsumexp known only as one number (shifted by itself)."""
        finite = jnp.isfinite(lse)
        return cls(
            jnp.where(finite, lse, jnp.zeros_like(lse)),
            jnp.where(finite, jnp.zeros_like(lse), lse),
            label_logit,
            count,
            weight_total,
            mean_logit,
        )

    def log_sum_or_zero(self) -> jax.Array:
        """``log_sum`` with empty rows' -inf replaced by 0 (their results are masked anyway,
        and a finite value keeps NaN out of the derivatives of the unselected branch)."""
        return jnp.where(jnp.isfinite(self.log_sum), self.log_sum, jnp.zeros_like(self.log_sum))

    def nll(self) -> jax.Array:
        """``lse - z_y`` as ``(max - z_y) + log_sum``."""
        return (self.max - self.label_logit) + self.log_sum_or_zero()

    def smoothing_term(self) -> jax.Array:
        """``sum_A w_c (lse - z_c) / K = (W/K max - mean_logit) + W/K log_sum``."""
        ratio = self.weight_total / jnp.maximum(self.count, 1)
        return (ratio * self.max - self.mean_logit) + ratio * self.log_sum_or_zero()

    def lse_or_zero(self) -> jax.Array:
        return self.max + self.log_sum_or_zero()


class Options(NamedTuple):
    """The loss's hyperparameters: arrays in the compute dtype, or None when switched off."""

    label_smoothing: jax.Array | None
    z_loss: jax.Array | None
    logit_soft_cap: jax.Array | None


def make_options(dtype, label_smoothing, z_loss, logit_soft_cap) -> Options:
    """Validates the hyperparameters; a literal 0 (or None cap) switches the term off statically."""
    _checks.check_in_unit_interval("label_smoothing", label_smoothing)
    _checks.check_non_negative("z_loss", z_loss)
    if logit_soft_cap is not None:
        _checks.check_positive("logit_soft_cap", logit_soft_cap)

    return Options(
        _checks.scalar_or_none(label_smoothing, dtype),
        _checks.scalar_or_none(z_loss, dtype),
        _checks.scalar_or_none(logit_soft_cap, dtype),
    )


def capped(x: jax.Array, options: Options) -> jax.Array:
    """Soft-capped logits; -inf (a masked class) stays -inf."""
    return x if options.logit_soft_cap is None else soft_cap(x, options.logit_soft_cap)


def _capped_bulk(x: jax.Array, options: Options) -> jax.Array:
    """``cap * tanh(x / cap)`` for whole ``[..., C]`` blocks, where -inf becomes -cap.

    Callers mask non-admissible entries with ``admissible`` of the raw logits instead: the
    select that keeps -inf reads ``x`` three times, which makes XLA materialize a float32
    ``[..., C]`` temporary.
    """
    cap = options.logit_soft_cap
    return x if cap is None else cap * jnp.tanh(x / cap)


def admissible(z: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Classes that take part in the normalisation: ``where`` and a logit above -inf."""
    finite = z > -jnp.inf
    return finite if mask is None else finite & mask


def safe_labels(labels: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Labels clamped into range (for gathers) and whether each was in range."""
    in_range = (labels >= 0) & (labels < num_classes)
    return jnp.where(in_range, labels, 0), in_range


def class_row(v: jax.Array, like: jax.Array) -> jax.Array:
    """A per-class ``[C]`` vector shaped ``[1, ..., 1, C]`` to broadcast against ``like``."""
    return jnp.reshape(v.astype(like.dtype), (1,) * (like.ndim - 1) + (like.shape[-1],))


def one_hot(safe: jax.Array, like: jax.Array, offset=0) -> jax.Array:
    """``[..., C]`` booleans marking each example's label column (columns start at ``offset``)."""
    columns = jax.lax.broadcasted_iota(safe.dtype, like.shape, like.ndim - 1) + offset
    return columns == safe[..., None]


def label_weight(weights: jax.Array | None, safe: jax.Array, dtype) -> jax.Array:
    """``w_y`` as ``[..., 1]`` (1 when unweighted)."""
    if weights is None:
        return jnp.ones(safe.shape + (1,), dtype)
    return jnp.take(weights.astype(dtype), safe)[..., None]


def row_loss(stats: RowStats, w_y: jax.Array, options: Options) -> jax.Array:
    """The per-example loss (``[..., 1]``) from its row statistics, before masking rows out."""
    eps, zl = options.label_smoothing, options.z_loss
    loss = w_y * stats.nll()
    if eps is not None:
        loss = (1 - eps) * loss + eps * stats.smoothing_term()
    if zl is not None:
        lse = stats.lse_or_zero()
        loss = loss + zl * w_y * lse * lse
    return loss


def row_grad_coefficients(
    stats: RowStats, w_y: jax.Array, options: Options
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(a, b, c)`` with ``dloss/dz_k = a p_k - b [k = y] - c w_k [k admissible]``."""
    eps, zl = options.label_smoothing, options.z_loss
    a = w_y
    b = w_y
    c = None
    if eps is not None:
        inv_count = 1 / jnp.maximum(stats.count, 1)
        a = (1 - eps) * w_y + eps * stats.weight_total * inv_count
        b = (1 - eps) * w_y
        c = eps * inv_count
    if zl is not None:
        a = a + 2 * zl * w_y * stats.lse_or_zero()
    return a, b, c


def row_status(
    labels: jax.Array, in_range: jax.Array, lse: jax.Array, ignore_index: int | None
) -> tuple[jax.Array, jax.Array]:
    """``(active, poisoned)`` per example, ``[..., 1]``.

    Active rows have a non-ignored label and at least one admissible class (``lse > -inf``);
    poisoned rows have a label out of range that is not ``ignore_index``: their loss and
    gradient are NaN, so a bad label can never produce a plausible number.
    """
    ignored = jnp.zeros_like(in_range) if ignore_index is None else labels == ignore_index
    active = (~ignored)[..., None] & (lse > -jnp.inf)
    poisoned = (~in_range & ~ignored)[..., None]
    return active, poisoned


def finalize_rows(values: jax.Array, active: jax.Array, poisoned: jax.Array) -> jax.Array:
    """0 on inactive rows, NaN on poisoned rows."""
    values = jnp.where(active, values, jnp.zeros_like(values))
    return jnp.where(poisoned, jnp.full_like(values, jnp.nan), values)


def logit_gradient(
    z: jax.Array,
    adm: jax.Array,
    onehot: jax.Array,
    weights: jax.Array | None,
    stats: RowStats,
    coefficients: tuple[jax.Array, jax.Array, jax.Array | None],
    g: jax.Array,
) -> jax.Array:
    """``g * dloss/dz`` over a block of classes (all of them, a chunk, or a shard)."""
    a, b, c = coefficients
    p = probabilities(z, stats.max, stats.log_sum, adm)
    dz = a * p - jnp.where(onehot, b, jnp.zeros_like(b))
    if c is not None:
        w = jnp.ones_like(z) if weights is None else class_row(weights, z)
        dz = dz - jnp.where(adm, c * w, jnp.zeros_like(z))
    return dz * g


def _class_axis_sharded(x: jax.Array) -> bool:
    """Whether ``x``'s class axis is sharded over a mesh axis with explicit sharding."""
    spec = getattr(jax.typeof(x).sharding, "spec", ())
    return len(spec) == x.ndim and spec[-1] is not None


def _pick(x: jax.Array, safe: jax.Array) -> jax.Array:
    """``x[..., safe]`` as ``[..., 1]``, the label's logit.

    A gather, behind an optimization barrier that stops XLA from rewriting it to read a float32
    copy of ``x`` shared with the reductions. When the class axis is explicitly sharded a gather
    would need the other shards' columns; a masked sum instead reduces locally and all-reduces
    one number per example.
    """
    if _class_axis_sharded(x):
        return jnp.sum(jnp.where(one_hot(safe, x), x, jnp.zeros_like(x)), axis=-1, keepdims=True)
    return jnp.take_along_axis(jax.lax.optimization_barrier(x), safe[..., None], axis=-1)


def _forward_stats(x, safe, mask, weights, options: Options) -> RowStats:
    """The row statistics of raw logits ``x`` (``[..., C]``, any float dtype).

    Written so that XLA needs no ``[..., C]`` temporary: ``max_and_log_sum`` reads ``x`` in its
    own dtype, the label logit is read from ``x`` itself (``_pick``), and the smoothing and cap
    statistics come from one variadic reduction.
    """
    dtype = compute_dtype(x.dtype)
    label_logit = capped(_pick(x, safe).astype(dtype), options)
    ones = jnp.ones(x.shape[:-1] + (1,), dtype)
    smoothing = options.label_smoothing is not None
    if not smoothing and options.logit_soft_cap is None:
        m, log_sum = max_and_log_sum(x, mask)
        return RowStats(m, log_sum, label_logit, ones, ones, jnp.zeros_like(ones))
    # The capped or smoothed loss needs more than the plain logsumexp: a single variadic
    # reduction computes all row sums in one pass. It is also the only reduction XLA's CPU
    # backend fuses tanh into (its dedicated sum kernels would materialize the capped logits),
    # as long as every one of its results is used: hence the count is always computed, and
    # used to define lse (-inf for a row with no admissible class).
    m = capped(row_max(x, mask), options)  # the cap is increasing: max of capped = capped max
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m)))
    z = _capped_bulk(x.astype(dtype), options)
    adm = admissible(x, mask)  # the cap maps -inf to -cap: read admissibility off the raw logits
    zero = jnp.zeros_like(z)
    operands = (jnp.where(adm, jnp.exp(z - m), zero), adm.astype(dtype))
    if smoothing:
        # Each logit is divided by C (static) before summing, so the sum cannot overflow. A
        # second capped copy (behind a barrier) keeps XLA from sharing, and so materializing,
        # one capped array between two operands.
        num_classes = x.shape[-1]
        z_again = _capped_bulk(jax.lax.optimization_barrier(x).astype(dtype), options)
        w = jnp.ones_like(z) if weights is None else class_row(weights, z)
        operands += (jnp.where(adm, w, zero), jnp.where(adm, w * z_again / num_classes, zero))
    sums = tuple(r[..., None] for r in row_sums(operands))
    total, count = sums[:2]
    weight_total, mean_logit = ones, jnp.zeros_like(ones)
    if smoothing:
        weight_total, mean_logit = sums[2], sums[3] * (num_classes / jnp.maximum(count, 1))
    log_sum = jnp.where(count > 0, jnp.log(total), -jnp.inf)
    return RowStats(m, log_sum, label_logit, count, weight_total, mean_logit)


# ----------------------------------------------------------------------------------------------
# Integer labels on [..., C]. Residuals: the logits (an input, alive anyway), the labels, mask and
# weights, and the float32 row statistics; probabilities are recomputed in the backward pass, so
# nothing of size [N, C] is saved beyond the input.
# It also returns whether each example counts towards a mean (not ignored, some class
# admissible), which costs nothing here and would cost a second pass over the logits outside.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _integer_ce(x, labels, mask, weights, options, ignore_index):
    return _integer_ce_fwd(x, labels, mask, weights, options, ignore_index)[0]


def _integer_ce_fwd(x, labels, mask, weights, options, ignore_index):
    safe, in_range = safe_labels(labels, x.shape[-1])
    stats = _forward_stats(x, safe, mask, weights, options)
    w_y = label_weight(weights, safe, stats.lse.dtype)
    active, poisoned = row_status(labels, in_range, stats.lse, ignore_index)
    loss = finalize_rows(row_loss(stats, w_y, options), active, poisoned)
    return (loss[..., 0], active[..., 0]), (x, labels, mask, weights, options, stats)


def _integer_ce_bwd(ignore_index, res, cotangents):
    x, labels, mask, weights, options, stats = res
    g, _ = cotangents  # the "counted" flags are boolean: no cotangent
    # The barrier keeps XLA from sharing this pass's float32 copy of x, or its broadcast row
    # max, with the forward pass's reductions, which would make either a materialized
    # [..., C] float32 temporary. Taking the statistics too keeps it distinct from the forward
    # pass's own barrier on x.
    x, stats = jax.lax.optimization_barrier((x, stats))
    xf = x.astype(stats.max.dtype)
    z = _capped_bulk(xf, options)
    adm = admissible(xf, mask)
    safe, in_range = safe_labels(labels, x.shape[-1])
    w_y = label_weight(weights, safe, xf.dtype)
    active, poisoned = row_status(labels, in_range, stats.lse, ignore_index)
    g = finalize_rows(g.astype(xf.dtype)[..., None], active, poisoned)
    onehot = one_hot(safe, z)
    coefficients = row_grad_coefficients(stats, w_y, options)
    dz = logit_gradient(z, adm, onehot, weights, stats, coefficients, g)
    if options.logit_soft_cap is not None:
        dz = dz * soft_cap_derivative(xf, options.logit_soft_cap)
    return (
        dz.astype(x.dtype),
        None,
        None,
        _class_weight_grad(z, adm, safe, weights, stats, options, g),
        _options_grad(stats, w_y, options, g),
    )


def _class_weight_grad(z, adm, safe, weights, stats, options, g):
    """d loss / d w_c = [c = y] ((1-eps) nll + zl lse^2) + eps / K (lse - z_c) [c in A]."""
    if weights is None:
        return None
    eps, zl = options.label_smoothing, options.z_loss
    per_label = stats.nll()
    if eps is not None:
        per_label = (1 - eps) * per_label
    if zl is not None:
        per_label = per_label + zl * stats.lse_or_zero() ** 2
    grad = jnp.zeros(weights.shape, z.dtype).at[safe.reshape(-1)].add((g * per_label).reshape(-1))
    if eps is not None:
        gap = (stats.max - z) + stats.log_sum_or_zero()  # lse - z_c
        spread = jnp.where(adm, gap * (eps / jnp.maximum(stats.count, 1)), 0) * g
        grad = grad + jnp.sum(spread.reshape(-1, z.shape[-1]), axis=0)
    return grad.astype(weights.dtype)


def _options_grad(stats, w_y, options, g):
    eps, zl = options.label_smoothing, options.z_loss
    d_eps = d_zl = None
    if eps is not None:
        d_eps = jnp.sum(g * (stats.smoothing_term() - w_y * stats.nll())).astype(eps.dtype)
    if zl is not None:
        d_zl = jnp.sum(g * w_y * stats.lse_or_zero() ** 2).astype(zl.dtype)
    # The soft cap is a fixed architectural constant here; use jaxce.logit_soft_cap to learn it.
    d_cap = None if options.logit_soft_cap is None else jnp.zeros_like(options.logit_soft_cap)
    return Options(d_eps, d_zl, d_cap)


_integer_ce.defvjp(_integer_ce_fwd, _integer_ce_bwd)


def _prepare_integer(name, logits, labels, axis, where, ignore_index, class_weights, reduction):
    logits = _checks.as_float_array(name, logits)
    labels = _checks.as_int_array("labels", labels)
    _checks.check_reduction(reduction)
    _checks.check_ignore_index(ignore_index)
    layout = ClassLayout(logits.shape, _checks.canonical_axes("axis", axis, logits.ndim))
    _checks.check_shape(
        "labels", labels, layout.batch_shape, f"{name} shape {logits.shape} without axis {axis}"
    )
    weights = _checks.class_vector("class_weights", class_weights, layout.num_classes)
    mask = layout.mask_to_last("where", where)
    return layout, layout.to_last(logits), labels, mask, weights


def _on_explicit_mesh(
    x, labels, mask, weights, ignore_index, label_smoothing, z_loss, logit_soft_cap, reduction
):
    """The loss of logits whose class axis is sharded over an explicit mesh axis.

    Under explicit sharding every intermediate must carry a sharding, and a gather across the
    class axis would need the other shards' columns: the vocabulary-parallel implementation of
    ``jaxce.sharded`` computes the same loss with one all-reduce of a few numbers per example.
    """
    from jaxce import _sharding  # it builds on this module

    sharding = jax.typeof(x).sharding
    spec = sharding.spec
    data = [a for a in spec[:-1] if a is not None]
    if len(data) > 1 or (data and spec[0] is None):
        raise ValueError(
            "logits sharded over the class axis may shard only their first batch axis;"
            f" got sharding {spec}."
        )
    return _sharding.softmax_cross_entropy_with_integer_labels(
        x,
        labels,
        axis_name=spec[-1],
        data_axis_name=data[0] if data else None,
        mesh=sharding.mesh,
        where=mask,
        ignore_index=ignore_index,
        class_weights=weights,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_soft_cap=logit_soft_cap,
        reduction=reduction,
    )


def normalizer(labels: jax.Array, active: jax.Array, weights: jax.Array | None, dtype) -> jax.Array:
    """What each example counts for in a ``"mean"``: its class weight if active, else 0."""
    safe = jnp.clip(labels, 0, None if weights is None else weights.shape[0] - 1)
    w_y = (
        jnp.ones(labels.shape, dtype) if weights is None else jnp.take(weights.astype(dtype), safe)
    )
    return jnp.where(active, w_y, jnp.zeros_like(w_y))


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
    (``-inf`` logits) keeps the loss finite. The gradient is hand-written
    (:math:`\partial \ell / \partial z = \mathrm{softmax}(z) - y` without options) and the
    backward pass saves only the logits and a float32 logsumexp per example.

    Args:
      logits: ``[..., C, ...]`` floating-point scores (any float dtype; computed in float32).
      labels: integer class indices with the logits' shape minus ``axis``.
      axis: the class axis (e.g. 1 for PyTorch's ``[N, C, d1, ...]``), or a tuple of axes
        flattened into one class axis as optax does.
      where: optional boolean mask of admissible classes, broadcastable to ``logits`` or of the
        labels' shape (a per-example mask, as optax). Masked classes take no part in the
        normalisation, however large their logits. A row with no admissible class has loss 0.
      ignore_index: label value that marks an example to skip (loss 0, gradient 0, not
        counted in a mean); PyTorch uses -100. ``None`` ignores nothing.
      class_weights: optional ``[C]`` weights, PyTorch's ``weight``.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, PyTorch's semantics.
      z_loss: :math:`\lambda_z \ge 0`, adds :math:`\lambda_z \mathrm{lse}^2` per example
        (PaLM, typically 1e-4); scaled by the example's class weight.
      logit_soft_cap: optional positive cap applied before the softmax (Gemma 2 uses 30).
      reduction: ``"none"`` (per-example, the labels' shape), ``"sum"`` or ``"mean"``: the sum
        divided by the total weight :math:`\sum_i w_{y_i}` of the counted examples, as PyTorch.
        A mean over zero counted examples is 0 (PyTorch gives NaN).

    Returns:
      The loss in ``result_type(logits.dtype, float32)``: per example for ``"none"``, else a
      scalar. A label outside ``[0, C)`` that is not ``ignore_index`` gives NaN for that example
      (see :func:`check_labels` to find such labels).

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
    layout, x, labels, mask, weights = _prepare_integer(
        "logits", logits, labels, axis, where, ignore_index, class_weights, reduction
    )
    if _class_axis_sharded(x):
        return _on_explicit_mesh(
            x,
            labels,
            mask,
            weights,
            ignore_index,
            label_smoothing,
            z_loss,
            logit_soft_cap,
            reduction,
        )
    cdt = compute_dtype(x.dtype)
    options = make_options(cdt, label_smoothing, z_loss, logit_soft_cap)
    losses, counted = _integer_ce(x, labels, mask, weights, options, ignore_index)
    if reduction != "mean":
        return reduce_loss(losses, reduction)
    return reduce_loss(losses, reduction, normalizer(labels, counted, weights, cdt))


# ----------------------------------------------------------------------------------------------
# Soft labels. loss = sum_c w_c y'_c (lse - z_c) with y' = (1-eps) y + eps/K [c in A] and
# 0 * log 0 = 0. dloss/dz = (sum_c w_c y'_c) p - w y';  dloss/dy = (1-eps) w (lse - z).
def _soft_targets(z, y, mask, weights, eps):
    adm = admissible(z, mask)
    count = jnp.sum(adm, axis=-1, keepdims=True, dtype=z.dtype)
    t = y if mask is None else jnp.where(mask, y, 0)
    if eps is not None:
        t = (1 - eps) * t + jnp.where(adm, eps / jnp.maximum(count, 1), 0)
    return (t if weights is None else t * class_row(weights, z)), adm


@jax.custom_vjp
def _soft_ce(x, y, mask, weights, eps):
    return _soft_ce_fwd(x, y, mask, weights, eps)[0]


def _neg_log_prob(z, m, log_sum, wt):
    """``lse - z`` as ``(m - z) + log_sum`` where the target is nonzero, 0 elsewhere
    (0 log 0 = 0, even at -inf logits)."""
    log_sum = jnp.where(jnp.isfinite(log_sum), log_sum, 0)
    return jnp.where(wt != 0, (m - z) + log_sum, jnp.zeros_like(z))


def _soft_ce_fwd(x, y, mask, weights, eps):
    z = x.astype(compute_dtype(x.dtype))
    wt, _ = _soft_targets(z, y.astype(z.dtype), mask, weights, eps)
    m, log_sum = max_and_log_sum(x, mask)
    loss = jnp.sum(wt * _neg_log_prob(z, m, log_sum, wt), axis=-1, keepdims=True)
    loss = jnp.where(jnp.isfinite(log_sum), loss, jnp.zeros_like(loss))
    return loss[..., 0], (x, y, mask, weights, eps, m, log_sum)


def _soft_ce_bwd(res, g):
    x, y, mask, weights, eps, m, log_sum = res
    z = x.astype(m.dtype)
    wt, adm = _soft_targets(z, y.astype(z.dtype), mask, weights, eps)
    has_row = jnp.isfinite(log_sum)
    g = jnp.where(has_row, g.astype(z.dtype)[..., None], 0)
    p = probabilities(z, m, log_sum, mask)
    dz = (jnp.sum(wt, axis=-1, keepdims=True) * p - wt) * g
    # d/dy: the labels' own term only (the smoothing mass does not depend on y).
    nlp = (m - z) + jnp.where(has_row, log_sum, 0)
    live = jnp.ones_like(adm) if mask is None else mask
    scale = 1 if eps is None else 1 - eps
    w = jnp.ones_like(z) if weights is None else class_row(weights, z)
    dy = jnp.where(live & has_row, scale * w * nlp * g, 0)
    dw = d_eps = None
    if weights is not None:
        t, _ = _soft_targets(z, y.astype(z.dtype), mask, None, eps)
        dw = jnp.sum((t * _neg_log_prob(z, m, log_sum, t) * g).reshape(-1, z.shape[-1]), axis=0)
        dw = dw.astype(weights.dtype)
    if eps is not None:
        y0 = y.astype(z.dtype) if mask is None else jnp.where(mask, y.astype(z.dtype), 0)
        dt = jnp.where(adm, 1 / jnp.maximum(jnp.sum(adm, -1, keepdims=True, dtype=z.dtype), 1), 0)
        dt = (dt - y0) * w
        d_eps = jnp.sum(jnp.where(dt != 0, dt * nlp, 0) * g).astype(eps.dtype)
    return dz.astype(x.dtype), dy.astype(y.dtype), None, dw, d_eps


_soft_ce.defvjp(_soft_ce_fwd, _soft_ce_bwd)


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

    with :math:`0 \log 0 = 0`, so ``-inf`` logits where the label is 0 are fine. Gradients flow
    to both the logits (:math:`(\sum_c w_c y'_c)\,\mathrm{softmax}(z) - w \odot y'`) and the
    labels (:math:`-(1-\varepsilon) w \log \mathrm{softmax}(z)`), as knowledge distillation needs.

    Args:
      logits: floating-point scores of any shape.
      labels: target probabilities, the logits' shape (need not be normalised).
      axis: the class axis or a tuple of axes.
      where: optional boolean mask broadcastable to the logits (or per example); ``False``
        classes take no part. A row with no admissible class has loss 0.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, mixing in the uniform distribution over
        the :math:`K` admissible classes (PyTorch's semantics when nothing is masked).
      class_weights: optional ``[C]`` weights (PyTorch's ``weight``).
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over examples, as PyTorch does for
        probability targets; 0 for an empty batch).

    Returns:
      The logits' shape without ``axis`` (or a scalar), in ``result_type(logits, float32)``.

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
    layout = ClassLayout(logits.shape, _checks.canonical_axes("axis", axis, logits.ndim))
    weights = _checks.class_vector("class_weights", class_weights, layout.num_classes)
    mask = layout.mask_to_last("where", where)
    options = make_options(compute_dtype(logits.dtype), label_smoothing, 0.0, None)
    losses = _soft_ce(
        layout.to_last(logits), layout.to_last(labels), mask, weights, options.label_smoothing
    )
    return reduce_loss(losses, reduction)


# ----------------------------------------------------------------------------------------------
# NLL on log-probabilities: loss = -w_y log_probs[y];  dloss/dlog_probs = -w_y onehot(y).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _nll(log_probs, labels, weights, ignore_index):
    return _nll_fwd(log_probs, labels, weights, ignore_index)[0]


def _nll_parts(log_probs, labels, weights, ignore_index):
    cdt = compute_dtype(log_probs.dtype)
    safe, in_range = safe_labels(labels, log_probs.shape[-1])
    w_y = label_weight(weights, safe, cdt)
    has_class = jnp.zeros(labels.shape + (1,), cdt)  # a finite "lse": every row has classes
    active, poisoned = row_status(labels, in_range, has_class, ignore_index)
    return safe, w_y, active, poisoned


def _nll_fwd(log_probs, labels, weights, ignore_index):
    safe, w_y, active, poisoned = _nll_parts(log_probs, labels, weights, ignore_index)
    picked = jnp.take_along_axis(log_probs, safe[..., None], axis=-1).astype(w_y.dtype)
    loss = finalize_rows(-w_y * picked, active, poisoned)
    return loss[..., 0], (log_probs, labels, weights, picked)


def _nll_bwd(ignore_index, res, g):
    log_probs, labels, weights, picked = res
    safe, w_y, active, poisoned = _nll_parts(log_probs, labels, weights, ignore_index)
    g = finalize_rows(g.astype(w_y.dtype)[..., None], active, poisoned)
    onehot = one_hot(safe, log_probs)
    d = jnp.where(onehot, -w_y * g, 0).astype(log_probs.dtype)
    dw = None
    if weights is not None:
        dw = jnp.zeros(weights.shape, w_y.dtype).at[safe.reshape(-1)].add((-picked * g).reshape(-1))
        dw = dw.astype(weights.dtype)
    return d, None, dw


_nll.defvjp(_nll_fwd, _nll_bwd)


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
      out of range.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> y_pred = jnp.array([[0.3, 0.3, 0.4], [0.3, 0.4, 0.3], [0.1, 0.2, 0.7]])
      >>> float(jaxce.nll_loss(jnp.log(y_pred), jnp.array([2, 1, 0]), reduction="mean"))
      1.378388...

    References:
      PyTorch ``torch.nn.functional.nll_loss``.
    """
    layout, lp, labels, _, weights = _prepare_integer(
        "log_probs", log_probs, labels, axis, None, ignore_index, class_weights, reduction
    )
    losses = _nll(lp, labels, weights, ignore_index)
    if reduction != "mean":
        return reduce_loss(losses, reduction)
    ignored = jnp.zeros(labels.shape, bool) if ignore_index is None else labels == ignore_index
    return reduce_loss(losses, reduction, normalizer(labels, ~ignored, weights, losses.dtype))
