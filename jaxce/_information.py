"""Entropy and KL divergence, with ``0 log 0 = 0`` throughout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxce import _autodiff, _checks, _loops, _mesh, _xla
from jaxce._checks import Axis
from jaxce._layout import compute_dtype, layout_of
from jaxce._reduction import reduce_loss
from jaxce._softmax import log_probabilities, max_and_sum_exp, shift_and_log_sum


def _safe_log(p: jax.Array) -> jax.Array:
    """``log p`` floored at ``log(tiny)``: the derivative of ``-p log p`` at ``p = 0`` is
    ``+inf``; flooring gives the large finite one-sided slope instead of inf. NaN for a negative
    ``p``, which is no probability (a floor would make it a plausible number)."""
    return jnp.log(jnp.where(p < 0, p, jnp.maximum(p, jnp.finfo(p.dtype).tiny)))


def _or_nan(p: jax.Array) -> jax.Array:
    """``p``, NaN where it is negative: no probability, so every term it enters is NaN."""
    return jnp.where(p < 0, jnp.full_like(p, jnp.nan), p)


def _xlogx(p: jax.Array) -> jax.Array:
    """``p log p`` with ``0 log 0 = 0``; NaN for a negative ``p``, which is no probability."""
    out = jnp.where(p == 0, jnp.zeros_like(p), p * _safe_log(p))
    return jnp.where(p < 0, jnp.full_like(p, jnp.nan), out)


# entropy: H = -sum p log p;  H' = -sum (log p + 1) p'  (log floored at p = 0).
# Both forward sums (entropy's, KL's) take row chunks: their selects (0 log 0 = 0) keep XLA's CPU
# compiler from fusing them into the reduction, and over whole rows it kept the terms as a float32
# array of the input's size (64 MiB at [4096, 4096]; tests/test_memory.py). GPUs read them whole
# (``fuses_whole``), one fusion of the sum and the gradient: on an H200, value_and_grad at
# [32768, 4096], whole rows against 64 MiB chunks (the floor, reading and writing the array, in
# brackets): float32 entropy 470 against 722 µs (462), KL 590 against 789 µs (545) in float32 and
# 380 against 605 µs (312) in bfloat16, with 0.02-0.13 MiB of temporaries. Not bfloat16 entropy:
# at [4096, 4096] XLA shares log(p) in float32 between the sum and the gradient and keeps it
# whole (64 MiB; none at [512, 4096] or [32768, 4096]), so bfloat16 and float16 probabilities
# keep their row chunks, as a narrow elementwise sum does (``_loops.chunked_sum``), at a cost in
# time (380 µs whole, 643 µs in 64 MiB chunks, the floor 326 µs).
def _entropy_rows(p):
    pf = p.astype(compute_dtype(p.dtype))
    # `0 -` gives 0.0, not -0.0, for a one-hot p
    return 0 - jnp.sum(_xlogx(pf), axis=-1, keepdims=True)


@jax.custom_jvp
def _entropy(p):
    whole = _xla.computes_in_place(p)  # see above
    return _loops.by_row_chunks(_entropy_rows, p, fuses_whole=whole)[..., 0]


@_autodiff.rematerialized
def _entropy_tangent(p, p_dot):
    pf = p.astype(compute_dtype(p.dtype))
    return jnp.sum(-(_safe_log(pf) + 1) * p_dot.astype(pf.dtype), axis=-1)


@_entropy.defjvp
def _entropy_jvp(primals, tangents):
    (p,), (p_dot,) = primals, tangents
    return _entropy(p), _entropy_tangent(p, p_dot)


def entropy(probs: jax.typing.ArrayLike, axis: Axis = -1, *, reduction: str = "none") -> jax.Array:
    r"""Shannon entropy :math:`H(p) = -\sum_c p_c \log p_c` (in nats), with :math:`0 \log 0 = 0`.

    Args:
      probs: probabilities (each row along ``axis`` a distribution), any float dtype.
      axis: the class axis or a tuple of axes.
      reduction: ``"none"`` (per distribution), ``"sum"`` or ``"mean"`` (over distributions).

    Returns:
      ``probs``' shape without ``axis`` (or a scalar), in ``result_type(probs, float32)``. The
      gradient
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
    _checks.check_reduction(reduction)
    layout = layout_of("probs", probs, axis)
    losses = _mesh.on_own_rows(lambda p, _: _entropy(p), (layout.to_last(probs),))
    return reduce_loss(losses, reduction)


# softmax_entropy: H = lse - sum p z = -sum p log p;  H' = -sum p (log p + H) z'.
# The forward pass keeps each row's (shift, log-sum, H), reduced a chunk of rows at a time.
def _log_p(z, shift, log_sum):
    """``(p, log p)`` with ``log p`` 0 where ``p`` is (``p log p = 0``)."""
    log_p = log_probabilities(z, shift, log_sum, None)
    p = jnp.exp(log_p)
    return p, jnp.where(p > 0, log_p, jnp.zeros_like(z))


def _softmax_entropy_rows(x):
    shift, log_sum = shift_and_log_sum(*max_and_sum_exp(x, None))
    p, log_p = _log_p(x.astype(shift.dtype), shift, log_sum)
    return shift, log_sum, 0 - jnp.sum(p * log_p, axis=-1, keepdims=True)


@jax.custom_jvp
def _softmax_entropy(x):
    return _loops.by_row_chunks(_softmax_entropy_rows, x)[2][..., 0]


@_autodiff.rematerialized
def _softmax_entropy_tangent(x, shift, log_sum, h, x_dot):
    p, log_p = _log_p(x.astype(shift.dtype), shift, log_sum)
    return jnp.sum(-p * (log_p + h) * x_dot.astype(p.dtype), axis=-1)


@_softmax_entropy.defjvp
def _softmax_entropy_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    shift, log_sum, h = _loops.by_row_chunks(_softmax_entropy_rows, x)
    return h[..., 0], _softmax_entropy_tangent(x, shift, log_sum, h, x_dot)


def softmax_entropy(
    logits: jax.typing.ArrayLike, axis: Axis = -1, *, reduction: str = "none"
) -> jax.Array:
    r"""Entropy of ``softmax(logits)``, computed from the logits without forming ``log 0``.

    .. math:: H(\mathrm{softmax}(z)) = \mathrm{lse}(z) - \sum_c p_c z_c

    Useful as a confidence penalty or an exploration bonus. ``-inf`` logits are legal (their
    probability is 0 and they contribute nothing).

    Args:
      logits: floating-point scores with at least one axis.
      axis: the class axis or a tuple of axes.
      reduction: ``"none"`` (per row), ``"sum"`` or ``"mean"`` (over rows).

    Returns:
      The logits' shape without ``axis`` (or a scalar), in ``result_type(logits, float32)``;
      the gradient is :math:`-p \odot (\log p + H)`.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.softmax_entropy(jnp.array([0.0, 0.0, -jnp.inf]))
      Array(0.6931472, dtype=float32)

    References:
      Pereyra et al., "Regularizing Neural Networks by Penalizing Confident Output
      Distributions", 2017.
    """
    logits = _checks.as_float_array("logits", logits)
    _checks.check_reduction(reduction)
    layout = layout_of("logits", logits, axis)
    losses = _mesh.on_own_rows(lambda x, _: _softmax_entropy(x), (layout.to_last(logits),))
    return reduce_loss(losses, reduction)


# KL(t || q) = sum t (log t - log q), 0 where t = 0 unless log q is NaN (as optax: a NaN is never
# hidden by a zero target).
# KL' = sum (-t lq' + (log t + 1 - log q) t')  (log floored as in entropy).
def _kl_terms(log_q, t, mask):
    lq = log_q.astype(compute_dtype(log_q.dtype))
    tf = _or_nan(t.astype(lq.dtype))
    live = (tf != 0) | jnp.isnan(lq)
    return lq, tf, live if mask is None else live & mask


def _kl_rows(log_q, t, mask):
    lq, tf, live = _kl_terms(log_q, t, mask)
    terms = jnp.where(live, tf * (_safe_log(tf) - lq), jnp.zeros_like(tf))
    return jnp.sum(terms, axis=-1, keepdims=True)


@jax.custom_jvp
def _kl(log_q, t, mask):
    return _loops.by_row_chunks(_kl_rows, log_q, t, mask, fuses_whole=True)[..., 0]


@_autodiff.rematerialized
def _kl_tangent(log_q, t, mask, lq_dot, t_dot):
    lq, tf, _ = _kl_terms(log_q, t, mask)
    keep = jnp.ones(lq.shape, bool) if mask is None else mask
    zeros = jnp.zeros_like(lq)
    # The masks select the coefficients, not the products: transposed, a select of the product
    # becomes a select of the cotangent times the coefficient, and 0 * NaN at a masked entry.
    out = None
    if lq_dot is not None:
        out = jnp.where(keep, -tf, zeros) * lq_dot.astype(lq.dtype)
    if t_dot is not None:
        dt = jnp.where(keep, _safe_log(tf) + 1 - lq, zeros) * t_dot.astype(lq.dtype)
        out = _autodiff.add(out, dt)
    return jnp.sum(_autodiff.or_zeros(out, lq), axis=-1)


def _kl_jvp(primals, tangents):
    log_q, t, mask = primals
    lq_dot, t_dot, _ = (None if _loops.is_zero(d) else d for d in tangents)
    return _kl(log_q, t, mask), _kl_tangent(log_q, t, mask, lq_dot, t_dot)


_kl.defjvp(_kl_jvp, symbolic_zeros=True)


def kl_divergence(
    log_predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Kullback-Leibler divergence :math:`KL(t \,\|\, q) = \sum_c t_c (\log t_c - \log q_c)`.

    optax's argument order and results: predictions as log-probabilities, targets as
    probabilities, :math:`0 \log 0 = 0`. Cross-entropy decomposes as
    :math:`H(t, q) = H(t) + KL(t \| q)`.

    Args:
      log_predictions: log-probabilities :math:`\log q`, any shape.
      targets: probabilities :math:`t`, the same shape.
      axis: the class axis or a tuple of axes to sum over.
      where: optional boolean mask broadcastable to the inputs as optax's (a ``[C]`` mask
        masks classes in every row); only ``True`` entries are summed.
      reduction: ``"none"`` (per distribution, optax's result), ``"sum"`` or ``"mean"`` (over
        distributions).

    Returns:
      The inputs' shape without ``axis`` (or a scalar), in
      ``result_type(log_predictions, float32)``.

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
    _checks.check_reduction(reduction)
    layout = layout_of("log_predictions", log_predictions, axis)
    mask = layout.mask_to_last("where", where, per_example=False)
    losses = _mesh.on_own_rows(
        lambda log_q, t, mask, _: _kl(log_q, t, mask),
        (layout.to_last(log_predictions), layout.to_last(targets), mask),
    )
    return reduce_loss(losses, reduction)
