"""Binary cross-entropy: on logits (sigmoid BCE) and on probabilities (PyTorch's BCELoss)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxce import _checks
from jaxce._layout import compute_dtype
from jaxce._reduction import reduce_loss
from jaxce._sigmoid import stable_log_sigmoid


def _times(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a * b`` with ``0 * inf = 0``: a label of exactly 0 or 1 never meets log 0 as NaN."""
    return jnp.where(a == 0, jnp.zeros_like(b), a * b)


def _elementwise_weight(name, w, shape, dtype):
    """Validates an optional weight array and broadcasts it to ``shape`` (no rank promotion)."""
    if w is None:
        return None
    w = _checks.as_float_array(name, w)
    _checks.check_broadcastable(name, w, shape)
    return jnp.broadcast_to(w.astype(dtype), shape)


# Sigmoid BCE with PyTorch's pos_weight: with l+ = log sigmoid(x), l- = log sigmoid(-x),
#   loss = -w (pw y l+ + (1 - y) l-),  dloss/dx = w ((pw y + 1 - y) sigmoid(x) - pw y),
#   dloss/dy = w (pw softplus(-x) - softplus(x)) (before smoothing's factor 1 - eps).
# Residuals: the inputs only.
@jax.custom_vjp
def _sigmoid_bce(x, y, pos_weight, weights, eps):
    return _sigmoid_bce_fwd(x, y, pos_weight, weights, eps)[0]


def _smoothed(y, eps):
    return y if eps is None else (1 - eps) * y + eps / 2


def _sigmoid_bce_fwd(x, y, pos_weight, weights, eps):
    xf = x.astype(compute_dtype(x.dtype))
    t = _smoothed(y.astype(xf.dtype), eps)
    pos = t if pos_weight is None else pos_weight * t
    # `+ 0` turns the -0.0 of a perfect prediction into 0.0.
    loss = 0 - (_times(pos, stable_log_sigmoid(xf)) + _times(1 - t, stable_log_sigmoid(-xf)))
    if weights is not None:
        loss = weights * loss
    return loss, (x, y, pos_weight, weights, eps)


def _sigmoid_bce_bwd(res, g):
    x, y, pos_weight, weights, eps = res
    xf = x.astype(compute_dtype(x.dtype))
    g = g.astype(xf.dtype)
    gw = g if weights is None else g * weights
    t = _smoothed(y.astype(xf.dtype), eps)
    pw = jnp.ones_like(xf) if pos_weight is None else pos_weight
    dx = gw * ((pw * t + 1 - t) * jax.nn.sigmoid(xf) - pw * t)
    log_p, log_not_p = stable_log_sigmoid(xf), stable_log_sigmoid(-xf)
    dt = gw * (log_not_p - pw * log_p)  # d loss / d t
    dy = dt if eps is None else (1 - eps) * dt
    d_pw = None if pos_weight is None else -gw * _times(t, log_p)
    d_w = None
    if weights is not None:
        d_w = -g * (_times(pw * t, log_p) + _times(1 - t, log_not_p))
    d_eps = None if eps is None else jnp.sum(dt * (0.5 - y.astype(xf.dtype))).astype(eps.dtype)
    return dx.astype(x.dtype), dy.astype(y.dtype), d_pw, d_w, d_eps


_sigmoid_bce.defvjp(_sigmoid_bce_fwd, _sigmoid_bce_bwd)


def sigmoid_binary_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    pos_weight: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    reduction: str = "none",
) -> jax.Array:
    r"""Sigmoid binary cross-entropy on logits, elementwise (multi-label classification).

    .. math::
        \ell = -w \left[ p_w\, y \log\sigma(x) + (1 - y) \log\sigma(-x) \right]

    computed with :math:`\log\sigma(x) = -\mathrm{softplus}(-x)`, never ``log(1 - sigmoid)``,
    so any finite logit gives a finite loss and logits of :math:`\pm\infty` give 0 or
    :math:`\infty` as the mathematics says, never NaN. With label smoothing the target is
    :math:`(1-\varepsilon) y + \varepsilon/2`.

    Args:
      logits: floating-point logits of any shape, e.g. ``[N, C]`` for C independent labels.
      labels: targets in [0, 1] (integers or floats), the logits' shape.
      pos_weight: optional weight of the positive term, broadcast along the last axis
        (one per class, PyTorch's ``pos_weight``): > 1 raises recall.
      weights: optional per-element weights broadcastable to the logits (PyTorch's ``weight``).
      label_smoothing: :math:`\varepsilon \in [0, 1]`.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over all elements, as PyTorch).

    Returns:
      The logits' shape (or a scalar) in ``result_type(logits, float32)``. Gradients flow to
      the logits, the labels, ``pos_weight`` and ``weights``.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.sigmoid_binary_cross_entropy(jnp.array([0.0, 100.0, -jnp.inf]),
      ...                                    jnp.array([1.0, 1.0, 0.0]))
      Array([0.6931472, 0.       , 0.       ], dtype=float32)

    References:
      PyTorch ``binary_cross_entropy_with_logits``; optax ``sigmoid_binary_cross_entropy``.
    """
    logits = _checks.as_float_array("logits", logits)
    labels = jnp.asarray(labels)
    _checks.check_reduction(reduction)
    _checks.check_shape("labels", labels, logits.shape, "the logits' shape")
    _checks.check_in_unit_interval("label_smoothing", label_smoothing)
    cdt = compute_dtype(logits.dtype)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(cdt)
    pw = None
    if pos_weight is not None:
        pos_weight = _checks.as_float_array("pos_weight", pos_weight)
        classes = logits.shape[-1:] if logits.ndim else (1,)
        _checks.check_broadcastable(
            "pos_weight", pos_weight, classes, "one weight per class, along the last axis"
        )
        pw = jnp.broadcast_to(pos_weight.astype(cdt), logits.shape)
    w = _elementwise_weight("weights", weights, logits.shape, cdt)
    # Broadcasting pos_weight and weights happens outside the kernel, so autodiff sums their
    # gradients back to the shapes the caller passed.
    eps = _checks.scalar_or_none(label_smoothing, cdt)
    return reduce_loss(_sigmoid_bce(logits, labels, pw, w, eps), reduction)


# BCE on probabilities, PyTorch's BCELoss: logs clamped at -100, and the backward pass of
# PyTorch: dloss/dp = w (p - y) / max(p (1 - p), 1e-12); dloss/dy = w (log(1-p) - log p), clamped.
_LOG_FLOOR = -100.0
_EPSILON = 1e-12


@jax.custom_vjp
def _bce(p, y, weights):
    return _bce_fwd(p, y, weights)[0]


def _clamped_logs(pf):
    return jnp.maximum(jnp.log(pf), _LOG_FLOOR), jnp.maximum(jnp.log1p(-pf), _LOG_FLOOR)


def _bce_fwd(p, y, weights):
    pf = p.astype(compute_dtype(p.dtype))
    t = y.astype(pf.dtype)
    log_p, log_not_p = _clamped_logs(pf)
    loss = 0 - (t * log_p + (1 - t) * log_not_p)
    if weights is not None:
        loss = weights * loss
    return loss, (p, y, weights)


def _bce_bwd(res, g):
    p, y, weights = res
    pf = p.astype(compute_dtype(p.dtype))
    t = y.astype(pf.dtype)
    gw = g.astype(pf.dtype) if weights is None else g.astype(pf.dtype) * weights
    dp = gw * (pf - t) / jnp.maximum(pf * (1 - pf), _EPSILON)
    log_p, log_not_p = _clamped_logs(pf)
    dy = gw * (log_not_p - log_p)
    dw = None if weights is None else -g.astype(pf.dtype) * (t * log_p + (1 - t) * log_not_p)
    return dp.astype(p.dtype), dy.astype(y.dtype), dw


_bce.defvjp(_bce_fwd, _bce_bwd)


def binary_cross_entropy(
    probs: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    weights: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Binary cross-entropy on probabilities, PyTorch's ``BCELoss``.

    .. math:: \ell = -w \left[ y \log p + (1 - y) \log(1 - p) \right]

    with each log clamped at -100 as PyTorch does, so ``p`` of exactly 0 or 1 gives a finite
    loss. Prefer :func:`sigmoid_binary_cross_entropy` on logits: it is exact where this one
    has to clamp.

    Args:
      probs: probabilities in [0, 1], any shape.
      labels: targets in [0, 1], the shape of ``probs``.
      weights: optional per-element weights broadcastable to ``probs``.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over all elements).

    Returns:
      ``probs``' shape (or a scalar) in ``result_type(probs, float32)``.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.binary_cross_entropy(jnp.array([0.5, 0.0]), jnp.array([1.0, 1.0]))
      Array([  0.6931472, 100.       ], dtype=float32)

    References:
      PyTorch ``torch.nn.functional.binary_cross_entropy``.
    """
    probs = _checks.as_float_array("probs", probs)
    labels = jnp.asarray(labels)
    _checks.check_reduction(reduction)
    _checks.check_shape("labels", labels, probs.shape, "the shape of probs")
    cdt = compute_dtype(probs.dtype)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(cdt)
    w = _elementwise_weight("weights", weights, probs.shape, cdt)
    return reduce_loss(_bce(probs, labels, w), reduction)
