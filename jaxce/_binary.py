"""Binary cross-entropy: on logits (sigmoid BCE) and on probabilities (PyTorch's BCELoss)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxce import _autodiff, _checks, _mesh, _xla
from jaxce._layout import compute_dtype
from jaxce._reduction import reduce_total, weighted
from jaxce._sigmoid import log_sigmoid_pair, logistic, sigmoid_difference, softplus_tail


def _smoothed(y, eps):
    return y if eps is None else (1 - eps) * y + eps / 2


# Sigmoid BCE with PyTorch's pos_weight: with l+ = log sigmoid(x), l- = log sigmoid(-x), the
# target t = (1 - eps) y + eps / 2 and pw = pos_weight:
#   loss = -w (pw t l+ + (1 - t) l-)
#   dloss/dx = w ((pw t + 1 - t) sigmoid(x) - pw t),  dloss/dt = w (l- - pw l+),
#   dloss/dy = (1 - eps) dloss/dt,  dloss/deps = dloss/dt (1/2 - y),
#   dloss/dpw = -w t l+,  dloss/dw = loss / w.
def _coefficients(t, pos_weight, weights, one=1):
    """``(w pw t, w (1 - t))``: the weights multiply the labels before the logarithms, so that a
    weight of 0 gives 0 where ``pw log sigmoid(x)`` alone would overflow."""
    pos = t if pos_weight is None else pos_weight * t
    neg = one - t
    if weights is not None:
        pos, neg = weights * pos, weights * neg
    return pos, neg


def _weighted_tail(x, y, pos_weight, weights, eps, one=1):
    """``(x, pos, neg, (pos + neg) log1p(exp(-|x|)))``, ``x`` in its compute dtype: what the
    loss's value and its terms without a select (:func:`_sigmoid_bce_terms`) share. The tail is
    finite (NaN for a NaN logit); without weights ``pos + neg = t + (1 - t) = 1`` is not
    multiplied: one input less per chunk."""
    xf = x.astype(compute_dtype(x.dtype))
    pos, neg = _coefficients(_smoothed(y.astype(xf.dtype), eps), pos_weight, weights, one)
    tail = softplus_tail(xf)
    if pos_weight is not None or weights is not None:
        tail = (pos + neg) * tail
    return xf, pos, neg, tail


def _sigmoid_bce_value(x, y, pos_weight, weights, eps):
    """The elementwise loss, as ``(pos + neg) log1p(exp(-|x|)) + (pos if x < 0 else neg) |x|``
    (``log sigmoid(+-x) = min(+-x, 0) - log1p(exp(-|x|))``): one exponential, one logarithm and
    one select of a weight per element, where the two weighted logarithms take five more
    operations. That is the cost of the loss's forward pass on CPU, whose reductions take the
    select's operands as arrays of a chunk's size (float32 [4096, 4096] summed a chunk of rows
    at a time: 34 ms written with both logarithms, 23 ms so, 17.6 ms without ``pos + neg``
    where it is 1). A large sum on CPU takes :func:`_sigmoid_bce_terms` first."""
    xf, pos, neg, tail = _weighted_tail(x, y, pos_weight, weights, eps)
    # `weighted` makes 0 |inf| = 0, a perfect prediction at an infinite logit.
    return tail + weighted(jnp.where(xf < 0, pos, neg), jnp.abs(xf))


def _sigmoid_bce_terms(x, y, pos_weight, weights, eps, zero, one, big=None):
    """:func:`_sigmoid_bce_value` without a comparison or a select, which XLA's CPU compiler
    fuses whole into its sum (``_xla.sum_in_one_fusion``, whose constants are ``zero``,
    ``one`` and ``big``, the dtype's largest finite number):
    ``(pos + neg) tail + pos max(-x, 0) + neg max(x, 0)``.

    Wherever the inputs and the coefficients are finite these are the select's values, to
    within a rounding: one of the two products is 0, and a weight of 0 multiplies a finite
    number (XLA may contract a product and a sum into one fused multiply-add in one form and
    not in the other: float32 1.3169797 against 1.3169796). At an infinite logit whose side
    has a coefficient of 0 they are ``0 inf = NaN``, where the select gives 0 (a perfect
    prediction), and so is a coefficient that overflows (``w pw t`` beyond the dtype's range)
    times the 0 of the other side, where the select gives inf. With ``big`` they are the
    select's values there too:
    ``(pos + neg) tail + (pos' min(max(-x, 0), big) + neg' min(max(x, 0), big)) f f``, with the
    coefficients ``pos'`` and ``neg'`` clipped to ``+-big`` (an overflowed one then multiplies
    a 0 as 0, and ``(pos + neg) tail`` carries its inf, as in the select's value) and
    ``f = min(max(|x| - big, 0), big) + 1``, which is 1 at a finite logit (the same values)
    and ``big`` at an infinite one, where the products are finite (``big`` times the
    coefficient of the logit's side) and ``f f`` makes them overflow: ``+-inf`` where that
    coefficient is not 0 (``big^3`` times the smallest subnormal number overflows), 0 where it
    is 0, as the select gives. A NaN gives NaN. These operations cost the loss alone 1.24x its
    time on CPU, so the sum takes the first form and only a batch whose sum is not finite the
    second (``_autodiff.elementwise``): a branch whose sides are one fusion each, which compiles
    in about half the time of a branch to the select's terms in row chunks (``_xla``'s
    FUSED_SUM_MIN_ELEMENTS). tests/test_binary.py compares both forms with the select's values
    entry by entry."""
    xf, pos, neg, tail = _weighted_tail(x, y, pos_weight, weights, eps, one)
    below, above = jnp.maximum(-xf, zero), jnp.maximum(xf, zero)
    if big is None:
        return tail + pos * below + neg * above
    f = jnp.minimum(jnp.maximum(jnp.abs(xf) - big, zero), big) + one
    pos, neg = jnp.clip(pos, -big, big), jnp.clip(neg, -big, big)
    return tail + (pos * jnp.minimum(below, big) + neg * jnp.minimum(above, big)) * f * f


def _sigmoid_bce_tangent(x, y, pos_weight, weights, eps, x_dot, y_dot, pw_dot, w_dot, eps_dot):
    xf = x.astype(compute_dtype(x.dtype))
    t = _smoothed(y.astype(xf.dtype), eps)
    w = jnp.ones_like(xf) if weights is None else weights
    w_pw = w if pos_weight is None else w * pos_weight
    pos, neg = _coefficients(t, pos_weight, weights)
    log_p, log_not_p = log_sigmoid_pair(xf)
    out = None
    if x_dot is not None:
        # Where XLA fuses the loss's sum with this derivative (_xla.reads_whole_rows), sigmoid(x)
        # from an exponential of its own keeps the two in one pass for bfloat16 logits too.
        # (pos + neg) s - pos as neg s - pos (1 - s), with 1 - s = sigmoid(-x): s - 1 cancels as
        # s nears 1 (float32, t = 1: 0 from x = 17 on, where it is -sigmoid(-x)), and so does
        # pos + neg less pos where pos is far larger than neg (a large pos_weight).
        if _xla.reads_whole_rows():
            dx = neg * logistic(xf) - pos * logistic(-xf)
        else:
            dx = sigmoid_difference(xf, neg, pos)
        out = dx * x_dot.astype(xf.dtype)
    if pos_weight is None:
        # log sigmoid(-x) - log sigmoid(x) = -x exactly, where the two logarithms' difference
        # keeps the rounding of their log1p(exp(-|x|)) terms (float32, |x| = 1e-7: 19%)
        dt = weighted(w, -xf)
    else:
        dt = weighted(w, log_not_p) - weighted(w_pw, log_p)
    # `weighted`: dt may overflow where the loss does not (w pw log sigmoid(x) beside the other
    # side's term), and a smoothing of 1, or a label of 1/2 for the smoothing's derivative,
    # makes that derivative 0, not 0 * inf = NaN
    if y_dot is not None:
        dy = dt if eps is None else weighted(1 - eps, dt)
        out = _autodiff.add(out, dy * y_dot.astype(xf.dtype))
    if eps_dot is not None:
        out = _autodiff.add(out, weighted(0.5 - y.astype(xf.dtype), dt) * eps_dot)
    if pw_dot is not None:
        out = _autodiff.add(out, -weighted(w * t, log_p) * pw_dot)
    if w_dot is not None:
        unweighted = _sigmoid_bce_value(x, y, pos_weight, None, eps)
        out = _autodiff.add(out, unweighted * w_dot)
    return out


_sigmoid_bce = _autodiff.elementwise(
    _sigmoid_bce_value, _sigmoid_bce_tangent, narrow_fuses_whole=True, terms=_sigmoid_bce_terms
)


def _like(weights: jax.Array | None, x: jax.Array) -> jax.Array | None:
    """Optional ``weights`` of ``x``'s rank broadcast outside the kernel, so that autodiff sums
    their gradients back to the shape the caller passed, as far as the kernel needs. Of logits
    with rows, one weight per class (``[1, ..., 1, C]``) and one per row (``[..., 1]``) stay so,
    which the sums read in chunks of rows (``_loops.chunked_sum``) without an array of ``x``'s
    size (float32 [4096, 1024] with a ``pos_weight``: 16 MiB more temporaries, broadcast);
    others take ``x``'s shape."""
    if weights is None:
        return None
    if x.ndim > 1 and all(d == 1 for d in weights.shape[:-1]):
        return weights
    if x.ndim > 1 and weights.shape[-1] == 1:
        return jnp.broadcast_to(weights, x.shape[:-1] + (1,))
    return jnp.broadcast_to(weights, x.shape)


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
    labels = _checks.as_real_array("labels", labels)
    _checks.check_reduction(reduction)
    _checks.check_shape("labels", labels, logits.shape, "the logits' shape")
    cdt = compute_dtype(logits.dtype)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(cdt)
    pw = None
    if pos_weight is not None:
        pos_weight = _checks.as_float_array("pos_weight", pos_weight)
        classes = logits.shape[-1:] if logits.ndim else ()
        why = "one weight per class, along the last axis"
        _checks.check_broadcastable("pos_weight", pos_weight, classes, why)
        pw = _checks.float_of_rank("pos_weight", pos_weight, logits.shape, cdt, why)
    w = None
    if weights is not None:
        w = _checks.float_of_rank("weights", weights, logits.shape, cdt, "the logits' shape")
    eps: jax.Array | None = _checks.hyperparameter(
        "label_smoothing", label_smoothing, cdt, low=0.0, high=1.0
    )
    eps = None if _checks.is_literal_zero(label_smoothing) else eps
    total = reduction != "none"
    out = _mesh.on_own_rows(
        lambda x, y, pw, w, eps: _sigmoid_bce(total, x, y, _like(pw, x), _like(w, x), eps),
        (logits, labels, pw, w),
        eps,
        axes=logits.ndim,
        summed=total,
    )
    return reduce_total(out, reduction, logits.size)


# BCE on probabilities, PyTorch's BCELoss: logs clamped at -100, and PyTorch's derivative in p,
# dloss/dp = w (p - y) / max(p (1 - p), 1e-12). dloss/dy = w (log(1-p) - log p) with the clamped
# logs, the derivative of the loss as computed (at most 100 in magnitude), where PyTorch gives the
# unclamped -logit(p): infinite at p = 0 or 1.
_LOG_FLOOR = -100.0
_EPSILON = 1e-12


def _clamped_logs(pf):
    """``log p`` and ``log(1 - p)``, clamped at PyTorch's -100. ``log1p(-p)`` only below 0.25,
    where ``1 - p`` would lose p's digits: above, ``1 - p`` is exact or nearly, and XLA's
    float64 ``log1p`` is 70 times less accurate than its ``log`` there."""
    not_p = jnp.where(pf < 0.25, jnp.log1p(-pf), jnp.log(1 - pf))
    return jnp.maximum(jnp.log(pf), _LOG_FLOOR), jnp.maximum(not_p, _LOG_FLOOR)


def _bce_value(p, y, weights):
    pf = p.astype(compute_dtype(p.dtype))
    t = y.astype(pf.dtype)
    log_p, log_not_p = _clamped_logs(pf)
    loss = 0 - (t * log_p + (1 - t) * log_not_p)
    return loss if weights is None else weights * loss


def _bce_tangent(p, y, weights, p_dot, y_dot, w_dot):
    pf = p.astype(compute_dtype(p.dtype))
    t = y.astype(pf.dtype)
    w = jnp.ones_like(pf) if weights is None else weights
    out = None
    if p_dot is not None:
        dp = w * (pf - t) / jnp.maximum(pf * (1 - pf), _EPSILON)
        out = dp * p_dot.astype(pf.dtype)
    if y_dot is not None:
        log_p, log_not_p = _clamped_logs(pf)
        out = _autodiff.add(out, w * (log_not_p - log_p) * y_dot.astype(pf.dtype))
    if w_dot is not None:
        out = _autodiff.add(out, _bce_value(p, y, None) * w_dot)
    return out


_bce = _autodiff.elementwise(_bce_value, _bce_tangent)


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
    labels = _checks.as_real_array("labels", labels)
    _checks.check_reduction(reduction)
    _checks.check_shape("labels", labels, probs.shape, "the shape of probs")
    cdt = compute_dtype(probs.dtype)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(cdt)
    w = None
    if weights is not None:
        w = _checks.float_of_rank("weights", weights, probs.shape, cdt, "the shape of probs")
    total = reduction != "none"
    out = _mesh.on_own_rows(
        lambda p, y, w, _: _bce(total, p, y, _like(w, p)),
        (probs, labels, w),
        axes=probs.ndim,
        summed=total,
    )
    return reduce_total(out, reduction, probs.size)
