"""Entropy and KL divergence, with ``0 log 0 = 0`` throughout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxce import _checks
from jaxce._checks import Axis
from jaxce._layout import ClassLayout, compute_dtype
from jaxce._softmax import log_probabilities, max_and_log_sum


def _safe_log(p: jax.Array) -> jax.Array:
    """``log p`` floored at ``log(tiny)``: the derivative of ``-p log p`` at ``p = 0`` is
    ``+inf``; flooring gives the large finite one-sided slope instead of inf."""
    return jnp.log(jnp.maximum(p, jnp.finfo(p.dtype).tiny))


def _xlogx(p: jax.Array) -> jax.Array:
    return jnp.where(p == 0, jnp.zeros_like(p), p * _safe_log(p))


# entropy: H = -sum p log p;  dH/dp = -(log p + 1).
@jax.custom_vjp
def _entropy(p):
    pf = p.astype(compute_dtype(p.dtype))
    return 0 - jnp.sum(_xlogx(pf), axis=-1)  # `0 -` gives 0.0, not -0.0, for a one-hot p


def _entropy_fwd(p):
    return _entropy(p), p


def _entropy_bwd(p, g):
    pf = p.astype(compute_dtype(p.dtype))
    return ((-(_safe_log(pf) + 1) * g.astype(pf.dtype)[..., None]).astype(p.dtype),)


_entropy.defvjp(_entropy_fwd, _entropy_bwd)


def entropy(probs: jax.typing.ArrayLike, axis: Axis = -1) -> jax.Array:
    r"""Shannon entropy :math:`H(p) = -\sum_c p_c \log p_c` (in nats), with :math:`0 \log 0 = 0`.

    Args:
      probs: probabilities (each row along ``axis`` a distribution), any float dtype.
      axis: the class axis or a tuple of axes.

    Returns:
      ``probs``' shape without ``axis``, in ``result_type(probs, float32)``. The gradient
      :math:`-(\log p + 1)` is finite at :math:`p = 0` (the log is floored at the dtype's
      smallest normal number).

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.entropy(jnp.array([0.5, 0.5, 0.0]))
      Array(0.6931472, dtype=float32)

    References:
      Cover & Thomas, "Elements of Information Theory", ch. 2.
    """
    probs = _checks.as_float_array("probs", probs)
    layout = ClassLayout(probs.shape, _checks.canonical_axes("axis", axis, probs.ndim))
    return _entropy(layout.to_last(probs))


# softmax_entropy: H = lse - sum p z = -sum p log p;  dH/dz = -p (log p + H).
@jax.custom_vjp
def _softmax_entropy(x):
    return _softmax_entropy_fwd(x)[0]


def _softmax_entropy_parts(x):
    z = x.astype(compute_dtype(x.dtype))
    m, log_sum = max_and_log_sum(x, None)
    log_p = log_probabilities(z, m, log_sum, None)
    p = jnp.exp(log_p)
    return p, jnp.where(p > 0, log_p, jnp.zeros_like(z))  # p log p = 0 where p = 0


def _softmax_entropy_fwd(x):
    p, log_p = _softmax_entropy_parts(x)
    return 0 - jnp.sum(p * log_p, axis=-1), x


def _softmax_entropy_bwd(x, g):
    p, log_p = _softmax_entropy_parts(x)
    h = -jnp.sum(p * log_p, axis=-1, keepdims=True)
    return ((-p * (log_p + h) * g.astype(p.dtype)[..., None]).astype(x.dtype),)


_softmax_entropy.defvjp(_softmax_entropy_fwd, _softmax_entropy_bwd)


def softmax_entropy(logits: jax.typing.ArrayLike, axis: Axis = -1) -> jax.Array:
    r"""Entropy of ``softmax(logits)``, computed from the logits without forming ``log 0``.

    .. math:: H(\mathrm{softmax}(z)) = \mathrm{lse}(z) - \sum_c p_c z_c

    Useful as a confidence penalty or an exploration bonus. ``-inf`` logits are legal (their
    probability is 0 and they contribute nothing).

    Args:
      logits: floating-point scores, any shape.
      axis: the class axis or a tuple of axes.

    Returns:
      The logits' shape without ``axis``, in ``result_type(logits, float32)``; the gradient is
      :math:`-p \odot (\log p + H)`.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.softmax_entropy(jnp.array([0.0, 0.0, -jnp.inf]))
      Array(0.6931472, dtype=float32)

    References:
      Pereyra et al., "Regularizing Neural Networks by Penalizing Confident Output
      Distributions", 2017.
    """
    logits = _checks.as_float_array("logits", logits)
    layout = ClassLayout(logits.shape, _checks.canonical_axes("axis", axis, logits.ndim))
    return _softmax_entropy(layout.to_last(logits))


# KL(t || q) = sum t (log t - log q), 0 where t = 0.
# dKL/dlog_q = -t;  dKL/dt = log t + 1 - log q  (log floored as in entropy).
@jax.custom_vjp
def _kl(log_q, t, mask):
    return _kl_fwd(log_q, t, mask)[0]


def _kl_terms(log_q, t, mask):
    lq = log_q.astype(compute_dtype(log_q.dtype))
    tf = t.astype(lq.dtype)
    live = tf != 0 if mask is None else (tf != 0) & mask
    return lq, tf, live


def _kl_fwd(log_q, t, mask):
    lq, tf, live = _kl_terms(log_q, t, mask)
    terms = jnp.where(live, tf * (_safe_log(tf) - lq), jnp.zeros_like(tf))
    return jnp.sum(terms, axis=-1), (log_q, t, mask)


def _kl_bwd(res, g):
    log_q, t, mask = res
    lq, tf, live = _kl_terms(log_q, t, mask)
    g = g.astype(lq.dtype)[..., None]
    keep = jnp.ones_like(live) if mask is None else mask
    d_lq = jnp.where(keep, -tf * g, 0)
    d_t = jnp.where(keep, (_safe_log(tf) + 1 - lq) * g, 0)
    return d_lq.astype(log_q.dtype), d_t.astype(t.dtype), None


_kl.defvjp(_kl_fwd, _kl_bwd)


def kl_divergence(
    log_predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Kullback-Leibler divergence :math:`KL(t \,\|\, q) = \sum_c t_c (\log t_c - \log q_c)`.

    optax's argument order and results: predictions as log-probabilities, targets as
    probabilities, :math:`0 \log 0 = 0`. Cross-entropy decomposes as
    :math:`H(t, q) = H(t) + KL(t \| q)`.

    Args:
      log_predictions: log-probabilities :math:`\log q`, any shape.
      targets: probabilities :math:`t`, the same shape.
      axis: the class axis or a tuple of axes to sum over.
      where: optional boolean mask broadcastable to the inputs; only ``True`` entries are
        summed.

    Returns:
      The inputs' shape without ``axis``, in ``result_type(log_predictions, float32)``.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> t = jnp.array([1.0, 0.0, 0.0])
      >>> float(jaxce.kl_divergence(jnp.log(jnp.array([0.5, 0.2, 0.3])), t))
      0.6931471...

    References:
      Kullback & Leibler, 1951; optax ``kl_divergence``.
    """
    log_predictions = _checks.as_float_array("log_predictions", log_predictions)
    targets = _checks.as_float_array("targets", targets)
    _checks.check_shape("targets", targets, log_predictions.shape, "the shape of log_predictions")
    shape = log_predictions.shape
    layout = ClassLayout(shape, _checks.canonical_axes("axis", axis, len(shape)))
    mask = layout.mask_to_last("where", where)
    return _kl(layout.to_last(log_predictions), layout.to_last(targets), mask)
