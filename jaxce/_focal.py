"""Focal losses (Lin et al., 2017): cross-entropy scaled down on well-classified examples."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _autodiff, _checks, _labels, _loops, _mesh, _rows
from jaxce._checks import Axis
from jaxce._layout import compute_dtype
from jaxce._reduction import reduce_loss, reduce_total, weighted
from jaxce._sigmoid import log_sigmoid_pair
from jaxce._softmax import max_and_log_sum, probabilities


def _pow(base: jax.Array, gamma: jax.Array) -> jax.Array:
    """``base ** gamma`` for ``base >= 0`` with ``0 ** 0 = 1``, differentiable everywhere; NaN
    for a NaN base (a NaN label or logit), whatever ``gamma``."""
    safe = jnp.where(base > 0, base, 1)
    at_zero = jnp.where(gamma == 0, 1, 0).astype(base.dtype)
    return jnp.where(base > 0, safe**gamma, jnp.where(jnp.isnan(base), base, at_zero))


def _log_or_zero(u: jax.Array) -> jax.Array:
    return jnp.where(u > 0, jnp.log(jnp.where(u > 0, u, 1)), 0)


def _with_value(rounded: jax.Array, exact: jax.Array) -> jax.Array:
    """``exact``'s value with ``rounded``'s derivative: ``log m`` taken from the logs, where
    ``log`` of the rounded ``m`` is 0 or off by a rounding of ``1 - m`` (``m`` near 1), while
    the derivative ``dm / m`` needs only ``m``'s own derivative to be right (and the logs' own
    would meet ``log 0`` at a label of 0 or 1)."""
    return rounded + jax.lax.stop_gradient(exact - rounded)


def _sigmoid_log_base(m, log_p, log_q, y):
    """``log m``, ``m = p (1 - y) + q y``, as ``logaddexp(log p + log(1 - y), log q + log y)``
    for labels in [0, 1] (``log p`` itself at ``y = 0``, ``log q`` at ``y = 1``), 0 where
    ``m`` is 0, as :func:`_log_or_zero` elsewhere (a label outside [0, 1]). At a label of 0 or
    1 ``log`` of the rounded ``m`` was 44% off at ``|x| = 17`` in float32 and 0 from about 18
    on, where ``log m = -exp(-|x|)`` to within its square."""
    rounded = _log_or_zero(m)
    inside = (y >= 0) & (y <= 1) & (m > 0)
    safe = jnp.where(inside, y, 0.5)
    exact = jnp.logaddexp(log_p + jnp.log1p(-safe), log_q + jnp.log(safe))
    return _with_value(rounded, jnp.where(inside, exact, rounded))


def _softmax_log_base(u, lp):
    """``log u``, ``u = 1 - p_y = -expm1(log p_y)``, as ``log1p(-p_y)`` where ``p_y < 1/2``:
    ``u`` rounds to 1 there once ``p_y`` is below half an epsilon, and ``log u`` to 0 where it
    is ``-p_y``. 0 where ``u`` is 0."""
    # u's derivative as -d(p_y): jax's expm1 takes its own as (expm1 + 1) times the tangent,
    # which is 0 where expm1 rounds to -1 (p_y below half an epsilon), and d/dz of this
    # derivative then had the wrong sign (float32 at a margin of 20: +2.1e-9 for -3.9e-8)
    q = jnp.exp(lp)
    u = jax.lax.stop_gradient(u) - (q - jax.lax.stop_gradient(q))
    rounded = _log_or_zero(u)
    small = lp < -math.log(2.0)
    exact = jnp.log1p(-jnp.where(small, q, 0.5))
    return _with_value(rounded, jnp.where(small, exact, rounded))


# Sigmoid focal loss, elementwise. With p = sigmoid(x), ce the sigmoid BCE, the modulating base
# m = 1 - p_t = p (1 - y) + (1 - p) y and a = alpha y + (1 - alpha)(1 - y):
#   loss = a ce m^gamma
#   dloss/dx = a m^gamma [(p - y) + gamma (ce / m) (1 - 2y) p (1 - p)]
#   dloss/dy = a m^gamma [(log q - log p) + gamma (ce / m) (q - p)] + (2 alpha - 1) ce m^gamma
#   dloss/dalpha = (2y - 1) ce m^gamma,  dloss/dgamma = a ce m^gamma log m
# ce / m tends to 1 as m -> 0, so the derivative stays finite for gamma < 1 too.
def _sigmoid_focal_parts(x, y, alpha, gamma):
    xf = x.astype(compute_dtype(x.dtype))
    yf = y.astype(xf.dtype)
    log_p, log_q = log_sigmoid_pair(xf)
    # `weighted`, not a select: 0 where a label of 0 or 1 meets an infinite log, with the
    # product rule's derivative in y there (a select's is 0: d/dy of dloss/dgamma was wrong at
    # hard labels, -0.855 for -0.868 at x = 2, y = 0, gamma = 2)
    ce = -(weighted(yf, log_p) + weighted(1 - yf, log_q))
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    m = p * (1 - yf) + q * yf
    a = jnp.ones_like(xf) if alpha is None else alpha * yf + (1 - alpha) * (1 - yf)
    return xf, yf, log_p, log_q, ce, p, q, m, a, _pow(m, gamma)


def _sigmoid_focal_value(x, y, alpha, gamma):
    *_, ce, _, _, _, a, mg = _sigmoid_focal_parts(x, y, alpha, gamma)
    # `weighted`: an alpha_t of 0 (alpha 0 or 1) makes the term 0 where ce is infinite
    return weighted(a, ce * mg)


def _sigmoid_focal_tangent(x, y, alpha, gamma, x_dot, y_dot, alpha_dot, gamma_dot):
    xf, yf, log_p, log_q, ce, p, q, m, a, mg = _sigmoid_focal_parts(x, y, alpha, gamma)
    ratio = jnp.where(m > 0, ce / jnp.where(m > 0, m, 1), 0)
    t = None
    if x_dot is not None:
        # ratio * (p * q) first: ratio can be ~3e38 where p * q is 0, and gamma * ratio overflows.
        # Where p * q is 0 (an infinite logit, ratio infinite) the product's limit is 0.
        focus = weighted(p * q, ratio)
        # p - y as p (1 - y) - q y: p - 1 cancels as p nears 1, where m^gamma leaves only the
        # small difference (float32, y = 1, gamma = 2: 2% off at x = 16, 33% from x = 17 on)
        dx = a * mg * ((p * (1 - yf) - q * yf) + gamma * (focus * (1 - 2 * yf)))
        t = dx * x_dot.astype(xf.dtype)
    if y_dot is not None:
        # gamma = 0 (the BCE) keeps an infinite slope of the log terms, not 0 * inf = NaN
        # a * mg first: mg's derivative times an infinite log difference (x = +-inf on the
        # label's side, gamma = 0) would be 0 * inf in a second derivative
        dy = weighted(a * mg, (log_q - log_p) + weighted(gamma, ratio * (q - p)))
        if alpha is not None:
            dy = dy + (2 * alpha - 1) * ce * mg
        t = _autodiff.add(t, dy * y_dot.astype(xf.dtype))
    if alpha_dot is not None:
        t = _autodiff.add(t, (2 * yf - 1) * ce * mg * alpha_dot)
    if gamma_dot is not None:
        log_m = _sigmoid_log_base(m, log_p, log_q, yf)
        # m^gamma log m vanishes where ce is infinite: log m = 0 there (x = -inf, y = 1); ce
        # times m^gamma <= 1 before |log m| > 1, which could overflow first
        t = _autodiff.add(t, weighted(a, weighted(log_m, ce * mg)) * gamma_dot)
    return t


_sigmoid_focal = _autodiff.elementwise(_sigmoid_focal_value, _sigmoid_focal_tangent)


def _gamma(gamma, dtype) -> jax.Array:
    return _checks.hyperparameter("gamma", gamma, dtype, low=0.0)


def sigmoid_focal_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: float | jax.typing.ArrayLike | None = None,
    gamma: float | jax.typing.ArrayLike = 2.0,
    reduction: str = "none",
) -> jax.Array:
    r"""Sigmoid focal loss for dense binary / multi-label detection (Lin et al., 2017).

    .. math::
        \ell = \alpha_t\, (1 - p_t)^\gamma\, \mathrm{BCE}(x, y), \quad
        p_t = p y + (1 - p)(1 - y), \quad \alpha_t = \alpha y + (1 - \alpha)(1 - y)

    The same arguments and results as optax's ``sigmoid_focal_loss``; the hand-written derivative
    stays finite for any ``gamma >= 0``, including ``gamma < 1`` on confident examples.

    Args:
      logits: floating-point logits, any shape.
      labels: targets in [0, 1], the logits' shape.
      alpha: optional scalar in [0, 1] weighting positives (0.25 in the paper).
      gamma: focusing parameter >= 0 (a scalar); 0 gives (alpha-weighted) sigmoid BCE.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over all elements).

    Returns:
      The logits' shape (or a scalar) in ``result_type(logits, float32)``; NaN where a logit or
      label is NaN.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.sigmoid_focal_loss(jnp.array([4.0, -1.0]), jnp.array([1.0, 1.0]))
      Array([5.8715...e-06, 7.0186...e-01], dtype=float32)

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017; optax
      ``sigmoid_focal_loss``.
    """
    logits = _checks.as_float_array("logits", logits)
    labels = _checks.as_real_array("labels", labels)
    _checks.check_reduction(reduction)
    _checks.check_shape("labels", labels, logits.shape, "the logits' shape")
    cdt = compute_dtype(logits.dtype)
    if alpha is not None:
        alpha = _checks.hyperparameter("alpha", alpha, cdt, low=0.0, high=1.0)
    hyperparameters = _checks.nan_together(alpha, _gamma(gamma, cdt))
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(cdt)
    total = reduction != "none"
    out = _mesh.on_own_rows(
        lambda x, y, shared: _sigmoid_focal(total, x, y, *shared),
        (logits, labels),
        hyperparameters,
        axes=logits.ndim,
        summed=total,
    )
    return reduce_total(out, reduction, logits.size)


# Softmax focal loss with integer labels. With q = p_y, lp = log q, u = 1 - q:
#   loss = -alpha_y u^gamma lp
#   dloss/dz_c = alpha_y F (p_c - [c = y]),  F = u^gamma (1 + gamma q r),
#   r = -lp / u, which tends to 1 as u -> 0;
#   dloss/dalpha_y = -u^gamma lp,  dloss/dgamma = -alpha_y u^gamma log(u) lp.
def _softmax_focal_forward(x, labels, alpha, gamma, ignore_index):
    m, log_sum = max_and_log_sum(x, None)
    z = x.astype(m.dtype)
    meaning = _labels.classify(labels, x.shape[-1], ignore_index)
    stats = _rows.Stats(m, log_sum, None, None, None, None)
    # log p_y = (z_y - m) - log_sum: exact even where m + log_sum would round to m.
    z_y = jnp.take_along_axis(z, meaning.class_index[..., None], axis=-1)
    lp = (z_y - m) - stats.log_sum_or_zero()
    u = -jnp.expm1(lp)
    if alpha is None:
        a = jnp.ones_like(lp)
    elif alpha.ndim == 0:
        a = jnp.broadcast_to(alpha, lp.shape)
    else:
        a = jnp.take(alpha, meaning.class_index)[..., None]
    rows = _rows.status(meaning, stats)
    # alpha_y u^gamma times half of -lp, doubled after: -lp alone may overflow (a label logit
    # 3e38 below the row max) where the loss does not (a small alpha_y).
    half = _rows.half_gap(m, z_y, log_sum)
    loss = _rows.finalize(weighted(a * _pow(u, gamma), half) * 2, rows)
    counted = rows.active.astype(m.dtype)
    return loss[..., 0], counted[..., 0], (meaning, stats, lp, u, a, rows)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _softmax_focal(x, labels, alpha, gamma, ignore_index):
    loss, counted, _ = _softmax_focal_forward(x, labels, alpha, gamma, ignore_index)
    return loss, counted


@_autodiff.rematerialized
def _softmax_focal_logit_tangent(x, index, stats, lp, u, a, gamma, rows, x_dot):
    z = x.astype(stats.shift.dtype)
    q = jnp.exp(lp)
    # q r = q (-log q) / u tends to 0 with q: 0 where q underflows, also where log q is -inf (a
    # label logit of -inf, or 6.8e38 below the row max in float32), whose r is inf. There r is
    # taken of a log q of 0: an infinite operand's derivative would meet a zero cotangent in a
    # derivative of this derivative (reverse over reverse: 0 * inf = NaN).
    underflow = q == 0
    safe_lp = jnp.where(underflow, jnp.zeros_like(lp), lp)
    r = jnp.where(u > 0, -safe_lp / jnp.where(u > 0, u, 1), 1)
    qr = jnp.where(underflow, jnp.zeros_like(q), q * r)
    f = _pow(u, gamma) * (1 + gamma * qr)
    p = probabilities(z, stats.shift, stats.log_sum, None)
    dz = _rows.finalize(a * f * (p - _rows.one_hot(index, z).astype(z.dtype)), rows)
    return jnp.sum(dz * x_dot.astype(z.dtype), axis=-1)


def _softmax_focal_jvp(ignore_index, primals, tangents):
    x, labels, alpha, gamma = primals
    x_dot, _, alpha_dot, gamma_dot = (None if _loops.is_zero(t) else t for t in tangents)
    loss, counted, (meaning, stats, lp, u, a, rows) = _softmax_focal_forward(
        x, labels, alpha, gamma, ignore_index
    )
    t = None
    if x_dot is not None:
        t = _softmax_focal_logit_tangent(
            x, meaning.class_index, stats, lp, u, a, gamma, rows, x_dot
        )
    ug = _pow(u, gamma)
    if alpha_dot is not None:
        a_dot = (
            alpha_dot if alpha.ndim == 0 else jnp.take(alpha_dot, meaning.class_index)[..., None]
        )
        t = _autodiff.add(t, _rows.finalize(-ug * lp * a_dot, rows)[..., 0])
    if gamma_dot is not None:
        # `weighted`: u log u vanishes where log p_y overflows (a label logit 6e38 below the
        # row max in float32: log u = 0 and log p_y = -inf)
        log_u = _softmax_log_base(u, lp)
        d_gamma = _rows.finalize(-a * ug * weighted(log_u, lp), rows)
        t = _autodiff.add(t, (d_gamma * gamma_dot)[..., 0])
    return (loss, counted), (_autodiff.or_zeros(t, loss), jnp.zeros_like(counted))


_softmax_focal.defjvp(_softmax_focal_jvp, symbolic_zeros=True)


def softmax_focal_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: float | jax.typing.ArrayLike | None = None,
    gamma: float | jax.typing.ArrayLike = 2.0,
    axis: Axis = -1,
    ignore_index: int | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Multi-class focal loss with integer labels (Lin et al., 2017).

    .. math:: \ell_i = -\alpha_{y}\, (1 - p_y)^\gamma \log p_y, \quad p = \mathrm{softmax}(z)

    Down-weights examples the model already gets right, focusing training on hard ones;
    ``gamma=0`` and no ``alpha`` is plain softmax cross-entropy. Computed from the logits in
    log space; the derivative :math:`\alpha_y F (p - \mathrm{onehot}(y))` with
    :math:`F = (1-p_y)^\gamma (1 + \gamma p_y \frac{-\log p_y}{1 - p_y})` is finite for every
    ``gamma >= 0``.

    Args:
      logits: floating-point scores with a class axis.
      labels: integer class indices, the logits' shape without ``axis``.
      alpha: optional balancing weight >= 0: a scalar, or ``[C]`` per-class weights (a
        concrete value below 0 or not finite is a ``ValueError``; traced, the loss is NaN).
      gamma: focusing parameter >= 0 (2.0 in the paper), a scalar.
      axis: the class axis or a tuple of axes.
      ignore_index: label value to skip (loss 0, gradient 0, not counted in a mean).
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over the examples that are not ignored
        and have a finite logit, as the cross-entropy counts them; 0 over none, unless the sum
        is NaN).

    Returns:
      Per-example losses (or a scalar) in ``result_type(logits, float32)``; NaN for a label out
      of range that is not ``ignore_index``, and for a row containing a NaN logit.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
      >>> jaxce.softmax_focal_loss(logits, jnp.array([0, 0]), gamma=2.0)
      Array([4.4923...e-05, 4.8827...e-01], dtype=float32)

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
    """
    layout, x, labels, ignore_index, _ = _labels.prepare(
        "logits", logits, labels, axis=axis, ignore_index=ignore_index, reduction=reduction
    )
    cdt = compute_dtype(x.dtype)
    if alpha is not None:
        why = f"a scalar or one entry per class, C={layout.num_classes}"
        if isinstance(alpha, list | tuple):
            raise TypeError(
                f"alpha must be {why}, as an array; got a Python {type(alpha).__name__}."
            )
        if isinstance(alpha, jax.Array | np.ndarray) and np.ndim(alpha) >= 1:
            alpha = _checks.class_vector("alpha", alpha, layout.num_classes, why)
            alpha = _checks.nonnegative_entries("alpha", alpha).astype(cdt)
        else:
            alpha = _checks.hyperparameter("alpha", alpha, cdt, low=0.0)
    losses, counted = _mesh.on_own_rows(
        lambda x, labels, shared: _softmax_focal(x, labels, *shared, ignore_index),
        (x, labels),
        _checks.nan_together(alpha, _gamma(gamma, cdt)),
    )
    return reduce_loss(losses, reduction, counted)
