"""log_softmax, softmax and logsumexp with hand-written gradients.

Each works on the class axes moved to the end (``[..., C]``, see ``_layout``); the kernels below
(``max_and_log_sum``, ``probabilities``) are shared with the losses, so there is exactly one
implementation of the max-shifted logsumexp in the library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxce._checks import Axis, as_float_array, canonical_axes
from jaxce._layout import ClassLayout, compute_dtype


def _variadic_reduce(operands, inits, combine):
    """One pass of ``lax.reduce`` over the last axis of several arrays."""
    dims = (operands[0].ndim - 1,)
    return tuple(jax.lax.reduce(tuple(operands), tuple(inits), combine, dims))


@jax.custom_jvp
def row_sums(operands: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Sums over the last axis of several arrays in one variadic reduction.

    XLA's CPU backend gives plain sums and maxima dedicated kernels that fuse ``exp``, ``convert``
    and arithmetic but not ``tanh`` or a select on a mask argument, which then get materialized
    as ``[..., C]`` float32 temporaries; a variadic reduction fuses any elementwise producer.
    XLA drops unused results, so every result must be used, or the reduction becomes a plain
    one again.
    """
    zero = jnp.zeros((), operands[0].dtype)
    return _variadic_reduce(
        operands,
        (zero,) * len(operands),
        lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)),
    )


@row_sums.defjvp
def _row_sums_jvp(primals, tangents):
    # Sums are linear; the tangents use plain sums, which JAX can also transpose.
    (operands,), (dots,) = primals, tangents
    return row_sums(operands), tuple(jnp.sum(t, axis=-1) for t in dots)


def row_max(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The max of ``x`` over its last axis where ``mask``, keepdims, in the compute dtype; -inf
    for a row with nothing admissible. No derivative: callers use it as a shift only.

    Without a mask it reads ``x`` in its own dtype (a max is exact in any dtype). With one, a
    variadic reduction also counts the admissible entries (see ``row_sums``).
    """
    x = jax.lax.stop_gradient(x)
    dtype = compute_dtype(x.dtype)
    if mask is None:
        return jnp.max(x, axis=-1, keepdims=True).astype(dtype)
    neg_inf = jnp.asarray(-jnp.inf, dtype)
    m, count = _variadic_reduce(
        (jnp.where(mask, x.astype(dtype), neg_inf), mask.astype(dtype)),
        (neg_inf, jnp.zeros((), dtype)),
        lambda a, b: (jnp.maximum(a[0], b[0]), a[1] + b[1]),
    )
    return jnp.where(count > 0, m, neg_inf)[..., None]


def max_and_log_sum(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(m, log_sum)`` with ``logsumexp(x) = m + log_sum``, in the compute dtype, keepdims.

    ``m`` is the row max (0 for a row with nothing admissible, whose ``log_sum`` is -inf) under
    ``stop_gradient`` (its derivative cancels) and ``log_sum = log(sum(exp(x - m)))``. Keeping the
    two apart is what makes ``log_softmax = (x - m) - log_sum`` exact at huge logits, where
    ``x - (m + log_sum)`` would lose ``log_sum`` to rounding (at 3e38 it vanishes entirely).

    Memory: without a mask the max is taken on ``x`` in its own dtype (a max is exact in any
    dtype), so each of the two reductions reads ``x`` directly; a float32 copy shared by both is
    what XLA would otherwise materialize. With a mask both reductions are variadic (see
    ``row_sums``), each using its count of admissible entries.
    """
    dtype = compute_dtype(x.dtype)
    xf = x.astype(dtype)
    m = row_max(x, mask)
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    if mask is None:
        return m, jnp.log(jnp.sum(jnp.exp(xf - m), axis=-1, keepdims=True))
    e = jnp.where(mask, jnp.exp(xf - m), jnp.zeros_like(xf))
    total, count = (r[..., None] for r in row_sums((e, mask.astype(dtype))))
    return m, jnp.where(count > 0, jnp.log(total), -jnp.inf)


def log_probabilities(
    x: jax.Array, m: jax.Array, log_sum: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """``log_softmax = (x - m) - log_sum``; -inf on masked entries and on empty rows."""
    keep = jnp.isfinite(log_sum) if mask is None else mask & jnp.isfinite(log_sum)
    return jnp.where(keep, (x - m) - jnp.where(keep, log_sum, 0), -jnp.inf)


def probabilities(
    x: jax.Array, m: jax.Array, log_sum: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """``softmax = exp((x - m) - log_sum)``, 0 on masked entries and on empty rows."""
    return jnp.exp(log_probabilities(x, m, log_sum, mask))


def _masked(mask: jax.Array | None, x: jax.Array, fill) -> jax.Array:
    return x if mask is None else jnp.where(mask, x, jnp.asarray(fill, x.dtype))


# ----------------------------------------------------------------------------------------------
# log_softmax: y = x - lse(x).  d/dx_j sum_i g_i y_i = g_j - softmax_j * sum_i g_i.
# Residuals: the input (already alive) and the float32 per-row max and log-sum; the backward
# pass recomputes the probabilities from them, smaller and more accurate than a bf16 output.
@jax.custom_vjp
def _log_softmax(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return _log_softmax_fwd(x, mask)[0]


def _log_softmax_fwd(x, mask):
    m, log_sum = max_and_log_sum(x, mask)
    y = log_probabilities(x.astype(m.dtype), m, log_sum, mask)
    return y.astype(x.dtype), (x, mask, m, log_sum)


def _log_softmax_bwd(res, g):
    x, mask, m, log_sum = res
    p = probabilities(x.astype(m.dtype), m, log_sum, mask)
    g = _masked(mask, g.astype(m.dtype), 0)
    gx = g - p * jnp.sum(g, axis=-1, keepdims=True)
    return _masked(mask, gx, 0).astype(x.dtype), None


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)


# softmax: s = exp(x - lse).  d/dx_j sum_i g_i s_i = s_j * (g_j - sum_i g_i s_i).
@jax.custom_vjp
def _softmax(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return _softmax_fwd(x, mask)[0]


def _softmax_fwd(x, mask):
    m, log_sum = max_and_log_sum(x, mask)
    return probabilities(x.astype(m.dtype), m, log_sum, mask).astype(x.dtype), (x, mask, m, log_sum)


def _softmax_bwd(res, g):
    x, mask, m, log_sum = res
    s = probabilities(x.astype(m.dtype), m, log_sum, mask)
    g = g.astype(m.dtype)
    gx = s * (g - jnp.sum(g * s, axis=-1, keepdims=True))
    return gx.astype(x.dtype), None


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


# logsumexp: d/dx_j lse = softmax_j. Residuals: the input and the float32 (max, log-sum).
@jax.custom_vjp
def _logsumexp(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return _logsumexp_fwd(x, mask)[0]


def _logsumexp_fwd(x, mask):
    m, log_sum = max_and_log_sum(x, mask)
    return (m + log_sum)[..., 0].astype(x.dtype), (x, mask, m, log_sum)


def _logsumexp_bwd(res, g):
    x, mask, m, log_sum = res
    p = probabilities(x.astype(m.dtype), m, log_sum, mask)
    return (p * g.astype(m.dtype)[..., None]).astype(x.dtype), None


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


def _prepare(x, axis, where):
    x = as_float_array("x", x)
    layout = ClassLayout(x.shape, canonical_axes("axis", axis, x.ndim))
    return layout, layout.to_last(x), layout.mask_to_last("where", where)


def log_softmax(
    x: jax.typing.ArrayLike, axis: Axis = -1, where: jax.typing.ArrayLike | None = None
) -> jax.Array:
    r"""Log-softmax, computed stably: :math:`x_i - \log \sum_j e^{x_j}`.

    The row maximum is subtracted before exponentiating, so any finite input gives a finite
    output; ``-inf`` entries (a masked vocabulary) are legal and give ``-inf``.

    Args:
      x: floating-point array of any shape.
      axis: the class axis, or a tuple of axes normalised together.
      where: optional boolean mask, broadcastable to ``x`` (or of ``x``'s shape without
        ``axis``): ``False`` entries take no part and come back as ``-inf``. A row with no
        admissible entry gives ``-inf`` everywhere and zero gradient.

    Returns:
      An array of ``x``'s shape and dtype (computed in at least float32).

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.log_softmax(jnp.array([1000.0, 0.0]))
      Array([    0., -1000.], dtype=float32)

    References:
      ``jax.nn.log_softmax``; ``torch.nn.functional.log_softmax``.
    """
    layout, x2, mask = _prepare(x, axis, where)
    return layout.from_last(_log_softmax(x2, mask))


def softmax(
    x: jax.typing.ArrayLike, axis: Axis = -1, where: jax.typing.ArrayLike | None = None
) -> jax.Array:
    r"""Softmax, computed stably: :math:`e^{x_i - m} / \sum_j e^{x_j - m}` with ``m`` the row max.

    Its gradient is hand-written: :math:`\partial_x (g \cdot s) = s \odot (g - g \cdot s)`.

    Args:
      x: floating-point array of any shape.
      axis: the class axis, or a tuple of axes normalised together.
      where: optional boolean mask broadcastable to ``x`` (or of ``x``'s shape without
        ``axis``); ``False`` entries get probability 0. A row with no admissible entry is all 0.

    Returns:
      An array of ``x``'s shape and dtype whose entries along ``axis`` sum to 1.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.softmax(jnp.array([3.0, 1.0, -3.0])))
      [0.87887824 0.11894324 0.00217852]

    References:
      ``jax.nn.softmax``; ``torch.softmax``.
    """
    layout, x2, mask = _prepare(x, axis, where)
    return layout.from_last(_softmax(x2, mask))


def logsumexp(
    x: jax.typing.ArrayLike, axis: Axis = -1, where: jax.typing.ArrayLike | None = None
) -> jax.Array:
    r"""Log of the sum of exponentials, :math:`m + \log \sum_j e^{x_j - m}`, computed stably.

    Args:
      x: floating-point array of any shape.
      axis: the axis, or a tuple of axes, to reduce.
      where: optional boolean mask broadcastable to ``x`` (or of ``x``'s shape without
        ``axis``); only ``True`` entries are summed. An empty row gives ``-inf``.

    Returns:
      ``x``'s shape without ``axis``, in ``x``'s dtype. The gradient is ``softmax(x)``.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.logsumexp(jnp.array([1000.0, 1000.0]))  # 1000 + log 2; exp(1000) overflows
      Array(1000.6932, dtype=float32)

    References:
      ``jax.nn.logsumexp``; ``scipy.special.logsumexp``.
    """
    layout, x2, mask = _prepare(x, axis, where)
    return _logsumexp(x2, mask)
