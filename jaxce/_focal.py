"""Focal losses (Lin et al., 2017): cross-entropy scaled down on well-classified examples."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxce import _checks
from jaxce._checks import Axis
from jaxce._cross_entropy import (
    finalize_rows,
    normalizer,
    one_hot,
    row_status,
    safe_labels,
)
from jaxce._layout import ClassLayout, compute_dtype
from jaxce._reduction import reduce_loss
from jaxce._sigmoid import stable_log_sigmoid
from jaxce._softmax import max_and_log_sum, probabilities


def _pow(base: jax.Array, gamma: jax.Array) -> jax.Array:
    """``base ** gamma`` for ``base >= 0`` with ``0 ** 0 = 1``, differentiable everywhere."""
    safe = jnp.where(base > 0, base, 1)
    return jnp.where(base > 0, safe**gamma, jnp.where(gamma == 0, 1, 0).astype(base.dtype))


# Sigmoid focal loss, elementwise. With p = sigmoid(x), ce the sigmoid BCE, the modulating base
# m = 1 - p_t = p (1 - y) + (1 - p) y and a = alpha y + (1 - alpha)(1 - y):
#   loss = a ce m^gamma
#   dloss/dx = a m^gamma [(p - y) + gamma (ce / m) (1 - 2y) p (1 - p)]
# ce / m tends to 1 as m -> 0, so the gradient stays finite for gamma < 1 too.
@jax.custom_vjp
def _sigmoid_focal(x, y, alpha, gamma):
    return _sigmoid_focal_fwd(x, y, alpha, gamma)[0]


def _sigmoid_focal_parts(x, y, alpha, gamma):
    xf = x.astype(compute_dtype(x.dtype))
    yf = y.astype(xf.dtype)
    log_p, log_q = stable_log_sigmoid(xf), stable_log_sigmoid(-xf)
    ce = -(jnp.where(yf == 0, 0, yf * log_p) + jnp.where(yf == 1, 0, (1 - yf) * log_q))
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    m = p * (1 - yf) + q * yf
    a = jnp.ones_like(xf) if alpha is None else alpha * yf + (1 - alpha) * (1 - yf)
    return xf, yf, log_p, log_q, ce, p, q, m, a, _pow(m, gamma)


def _sigmoid_focal_fwd(x, y, alpha, gamma):
    *_, ce, _, _, _, a, mg = _sigmoid_focal_parts(x, y, alpha, gamma)
    return a * ce * mg, (x, y, alpha, gamma)


def _sigmoid_focal_bwd(res, g):
    x, y, alpha, gamma = res
    xf, yf, log_p, log_q, ce, p, q, m, a, mg = _sigmoid_focal_parts(x, y, alpha, gamma)
    g = g.astype(xf.dtype)
    ratio = jnp.where(m > 0, ce / jnp.where(m > 0, m, 1), 0)
    # ratio * (p * q) first: ratio can be ~3e38 where p * q is 0, and gamma * ratio overflows.
    dx = a * mg * ((p - yf) + gamma * ((ratio * (p * q)) * (1 - 2 * yf))) * g
    # d/dy: dce/dy = -x (as log_q - log_p), dm/dy = q - p, da/dy = 2 alpha - 1.
    dy = a * mg * ((log_q - log_p) + gamma * (ratio * (q - p)))
    if alpha is not None:
        dy = dy + (2 * alpha - 1) * ce * mg
    d_alpha = None if alpha is None else jnp.sum((2 * yf - 1) * ce * mg * g).astype(alpha.dtype)
    log_m = jnp.where(m > 0, jnp.log(jnp.where(m > 0, m, 1)), 0)
    d_gamma = jnp.sum(a * ce * mg * log_m * g).astype(gamma.dtype)
    return dx.astype(x.dtype), (dy * g).astype(y.dtype), d_alpha, d_gamma


_sigmoid_focal.defvjp(_sigmoid_focal_fwd, _sigmoid_focal_bwd)


def _check_gamma(gamma, dtype) -> jax.Array:
    _checks.check_non_negative("gamma", gamma)
    return jnp.asarray(gamma, dtype)


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

    The same arguments and results as optax's ``sigmoid_focal_loss``; the hand-written gradient
    stays finite for any ``gamma >= 0``, including ``gamma < 1`` on confident examples.

    Args:
      logits: floating-point logits, any shape.
      labels: targets in [0, 1], the logits' shape.
      alpha: optional scalar in [0, 1] weighting positives (0.25 in the paper).
      gamma: focusing parameter >= 0; 0 gives (alpha-weighted) sigmoid BCE.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over all elements).

    Returns:
      The logits' shape (or a scalar) in ``result_type(logits, float32)``.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.sigmoid_focal_loss(jnp.array([4.0, -1.0]), jnp.array([1.0, 1.0]))
      Array([5.8715...e-06, 7.0186...e-01], dtype=float32)

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017; optax
      ``sigmoid_focal_loss``.
    """
    logits = _checks.as_float_array("logits", logits)
    labels = jnp.asarray(labels)
    _checks.check_reduction(reduction)
    _checks.check_shape("labels", labels, logits.shape, "the logits' shape")
    cdt = compute_dtype(logits.dtype)
    if alpha is not None:
        _checks.check_in_unit_interval("alpha", alpha)
        alpha = jnp.asarray(alpha, cdt)
        _checks.check_shape("alpha", alpha, (), "a scalar")
    gamma = _check_gamma(gamma, cdt)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(cdt)
    return reduce_loss(_sigmoid_focal(logits, labels, alpha, gamma), reduction)


# Softmax focal loss with integer labels. With q = p_y, lp = log q, u = 1 - q:
#   loss = -alpha_y u^gamma lp
#   dloss/dz_c = alpha_y F (p_c - [c = y]),  F = u^gamma (1 + gamma q r),
#   r = -lp / u, which tends to 1 as u -> 0.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_focal(x, labels, alpha, gamma, ignore_index):
    return _softmax_focal_fwd(x, labels, alpha, gamma, ignore_index)[0]


def _softmax_focal_parts(x, labels, alpha, ignore_index, normalizer=None):
    z = x.astype(compute_dtype(x.dtype))
    m, log_sum = max_and_log_sum(x, None) if normalizer is None else normalizer
    safe, in_range = safe_labels(labels, x.shape[-1])
    finite = jnp.isfinite(log_sum)  # rows of all -inf have nothing to classify
    # log p_y = (z_y - m) - log_sum: exact even where m + log_sum would round to m.
    lp = (jnp.take_along_axis(z, safe[..., None], axis=-1) - m) - jnp.where(finite, log_sum, 0)
    q = jnp.exp(lp)
    u = -jnp.expm1(lp)
    if alpha is None:
        a = jnp.ones_like(lp)
    elif alpha.ndim == 0:
        a = jnp.broadcast_to(alpha, lp.shape)
    else:
        a = jnp.take(alpha, safe)[..., None]
    active, poisoned = row_status(labels, in_range, log_sum, ignore_index)
    return z, (m, log_sum), safe, lp, q, u, a, active, poisoned


def _softmax_focal_fwd(x, labels, alpha, gamma, ignore_index):
    z, normalizer, safe, lp, q, u, a, active, poisoned = _softmax_focal_parts(
        x, labels, alpha, ignore_index
    )
    loss = finalize_rows(-a * _pow(u, gamma) * lp, active, poisoned)
    return (loss[..., 0], active[..., 0]), (x, labels, alpha, gamma, normalizer)


def _softmax_focal_bwd(ignore_index, res, cotangents):
    x, labels, alpha, gamma, normalizer = res
    g, _ = cotangents  # the "counted" flags are boolean: no cotangent
    z, (m, log_sum), safe, lp, q, u, a, active, poisoned = _softmax_focal_parts(
        x, labels, alpha, ignore_index, normalizer
    )
    g = finalize_rows(g.astype(z.dtype)[..., None], active, poisoned)
    ug = _pow(u, gamma)
    r = jnp.where(u > 0, -lp / jnp.where(u > 0, u, 1), 1)
    f = ug * (1 + gamma * q * r)
    p = probabilities(z, m, log_sum, None)
    dz = a * f * (p - one_hot(safe, z).astype(z.dtype)) * g
    d_alpha = None
    if alpha is not None:
        per_example = -ug * lp * g
        if alpha.ndim == 0:
            d_alpha = jnp.sum(per_example).astype(alpha.dtype)
        else:
            d_alpha = (
                jnp.zeros(alpha.shape, z.dtype).at[safe.reshape(-1)].add(per_example.reshape(-1))
            )
            d_alpha = d_alpha.astype(alpha.dtype)
    log_u = jnp.where(u > 0, jnp.log(jnp.where(u > 0, u, 1)), 0)
    d_gamma = jnp.sum(-a * ug * log_u * lp * g).astype(gamma.dtype)
    return dz.astype(x.dtype), None, d_alpha, d_gamma


_softmax_focal.defvjp(_softmax_focal_fwd, _softmax_focal_bwd)


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
    log space; the gradient :math:`\alpha_y F (p - \mathrm{onehot}(y))` with
    :math:`F = (1-p_y)^\gamma (1 + \gamma p_y \frac{-\log p_y}{1 - p_y})` is finite for every
    ``gamma >= 0``.

    Args:
      logits: floating-point scores with a class axis.
      labels: integer class indices, the logits' shape without ``axis``.
      alpha: optional balancing weight: a scalar, or ``[C]`` per-class weights.
      gamma: focusing parameter >= 0 (2.0 in the paper).
      axis: the class axis or a tuple of axes.
      ignore_index: label value to skip (loss 0, gradient 0, not counted in a mean).
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over the non-ignored examples).

    Returns:
      Per-example losses (or a scalar) in ``result_type(logits, float32)``; NaN for a label out
      of range that is not ``ignore_index``.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
      >>> jaxce.softmax_focal_loss(logits, jnp.array([0, 0]), gamma=2.0)
      Array([4.4923...e-05, 4.8827...e-01], dtype=float32)

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
    """
    logits = _checks.as_float_array("logits", logits)
    labels = _checks.as_int_array("labels", labels)
    _checks.check_reduction(reduction)
    _checks.check_ignore_index(ignore_index)
    layout = ClassLayout(logits.shape, _checks.canonical_axes("axis", axis, logits.ndim))
    _checks.check_shape(
        "labels", labels, layout.batch_shape, f"logits shape {logits.shape} without axis {axis}"
    )
    cdt = compute_dtype(logits.dtype)
    if alpha is not None:
        alpha = _checks.as_float_array("alpha", jnp.asarray(alpha, cdt))
        if alpha.ndim != 0:
            _checks.check_shape("alpha", alpha, (layout.num_classes,), "a scalar or one per class")
    gamma = _check_gamma(gamma, cdt)
    losses, counted = _softmax_focal(layout.to_last(logits), labels, alpha, gamma, ignore_index)
    if reduction != "mean":
        return reduce_loss(losses, reduction)
    return reduce_loss(losses, reduction, normalizer(labels, counted, None, cdt))
