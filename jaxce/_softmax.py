"""log_softmax, softmax and logsumexp with hand-written derivatives.

Each works on the class axes moved to the end (``[..., C]``, see ``_layout``); the kernels below
(``max_and_sum_exp``, ``probabilities``) are shared with the losses, so there is exactly one
implementation of the max-shifted logsumexp in the library.

NaN policy: a NaN among a row's admissible entries makes that row's logsumexp, log-softmax and
softmax NaN (every entry of it), as ``jax.nn`` and PyTorch do; other rows are unaffected. An
entry excluded by ``where`` takes no part, whatever its value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxce import _autodiff, _loops, _mesh
from jaxce._checks import Axis, as_float_array
from jaxce._layout import compute_dtype, layout_of


def shift_of(m: jax.Array) -> jax.Array:
    """The shift used for a row whose max is ``m``: ``m`` itself, or 0 where it is not finite
    (an empty row's -inf; +inf and NaN rows are non-finite whatever the shift)."""
    return jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))


def shift_and_log_sum(m: jax.Array, sum_exp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(shift_of(m), log_sum_of(m, sum_exp))``: a row's shift and log-sum from its max ``m``
    and its sum of exponentials ``sum_exp = sum(exp(x - shift))``, keepdims. Every row
    statistic goes through here or through its two parts."""
    return shift_of(m), log_sum_of(m, sum_exp)


def log_sum_of(m: jax.Array, sum_exp: jax.Array) -> jax.Array:
    """``log(sum_exp)``: a row's log-sum from its max ``m`` and its sum of exponentials
    ``sum_exp = sum(exp(x - shift_of(m)))``, keepdims.

    A row whose max is NaN (a NaN logit, or a traced soft cap out of range) has a NaN log-sum,
    also where XLA's CPU code took ``exp(NaN)`` in its sum to 0: it does in some fusions with a
    select, which made such a row look empty (loss 0). A row whose max is finite has a sum of at
    least 1 (the max's own ``exp(0)``), floored there: where the max and the entries are soft
    capped apart (``tanh`` of one number and of a row, whose codes can differ by a rounding),
    the max's own term can round below 1, and the log-sum below 0."""
    below = jnp.isfinite(m) & (sum_exp < 1)
    one = 1 + _autodiff.zero_with_derivative(sum_exp)  # a rounding apart
    # An empty row's log 0 = -inf is a select, not a log: the log's derivative there, 1 / 0,
    # times the zero cotangent a derivative of the derivative sends it (reverse over reverse),
    # would make the whole row NaN.
    empty = sum_exp == 0
    safe = jnp.where(empty, jnp.ones_like(sum_exp), jnp.where(below, one, sum_exp))
    log_sum = jnp.where(empty, jnp.full_like(sum_exp, -jnp.inf), jnp.log(safe))
    return jnp.where(jnp.isnan(m), jnp.full_like(log_sum, jnp.nan), log_sum)


def log_sum_or_zero(log_sum: jax.Array) -> jax.Array:
    """``log_sum`` with an empty row's -inf replaced by 0 (its results are masked anyway, and a
    finite value keeps NaN out of the unselected branch); NaN stays NaN."""
    return jnp.where(jnp.isneginf(log_sum), jnp.zeros_like(log_sum), log_sum)


def row_max(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The max of ``x`` over its last axis where ``mask``, keepdims, in the compute dtype; -inf
    for a row with nothing admissible, NaN for a row with a NaN. No derivative: callers use it
    as a shift only.

    It reads ``x`` in its own dtype (a max is exact in any dtype), so no float32 copy of ``x`` is
    needed for it.
    """
    x = jax.lax.stop_gradient(x)
    dtype = compute_dtype(x.dtype)
    if x.shape[-1] == 0:  # no class: the max of nothing
        return jnp.full(x.shape[:-1] + (1,), -jnp.inf, dtype)
    if mask is not None:
        x = jnp.where(mask, x, jnp.asarray(-jnp.inf, x.dtype))
    return jnp.max(x, axis=-1, keepdims=True).astype(dtype)


def exponentials(x: jax.Array, mask: jax.Array | None, m: jax.Array) -> jax.Array:
    """``exp(x - shift_of(m))`` of ``x`` and its rows' max ``m`` (keepdims), 0 on masked
    entries, in the compute dtype."""
    e = jnp.exp(x.astype(compute_dtype(x.dtype)) - shift_of(m))
    return e if mask is None else jnp.where(mask, e, jnp.zeros_like(e))


def max_and_exponentials(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(max, exp(x - shift_of(max)))``: the row max (keepdims) and the ``[..., C]``
    exponentials, 0 on masked entries, in the compute dtype."""
    m = row_max(x, mask)
    return m, exponentials(x, mask, m)


def max_and_sum_exp(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(max, sum_exp)`` over admissible entries, keepdims, in the compute dtype.

    ``sum_exp = sum(exp(x - shift_of(max)))``: 0 exactly for a row with nothing admissible, at
    least 1 otherwise (the max contributes ``exp(0)``), NaN for a row with a NaN. A row longer
    than XLA's CPU reductions take at full speed is reduced in sub-rows (``_loops.SubRows``).
    """
    sub = _loops.SubRows.of(x)
    xs, ms = sub.view(x, mask)
    m = sub.max(row_max(xs, ms))
    return m, sub.sum(jnp.sum(exponentials(xs, ms, sub.spread(m)), axis=-1, keepdims=True))


def max_and_log_sum(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(shift, log_sum)`` with ``logsumexp(x) = shift + log_sum``, keepdims.

    ``shift`` is the row max (0 for a row with nothing admissible, whose ``log_sum`` is -inf)
    and ``log_sum = log(sum(exp(x - shift)))``. Keeping the two apart is what makes
    ``log_softmax = (x - shift) - log_sum`` exact at huge logits, where ``x - (shift + log_sum)``
    would lose ``log_sum`` to rounding (at 3e38 it vanishes entirely). Reduced a chunk of rows
    at a time (``_loops.by_row_chunks``).
    """

    def stats(x, mask):
        return shift_and_log_sum(*max_and_sum_exp(x, mask))

    return _loops.by_row_chunks(stats, x, mask)


def log_probabilities(
    x: jax.Array, m: jax.Array, log_sum: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """``log_softmax = (x - m) - log_sum``; -inf on masked entries and on empty rows, NaN on a
    row with a NaN."""
    keep = ~jnp.isneginf(log_sum)
    if mask is not None:
        keep = keep & mask
    return jnp.where(keep, (x - m) - log_sum, -jnp.inf)


def probabilities(
    x: jax.Array,
    m: jax.Array,
    log_sum: jax.Array,
    mask: jax.Array | None,
    exponentials: jax.Array | None = None,
) -> jax.Array:
    """``softmax = exp((x - m) - log_sum)``, 0 on masked entries and on empty rows, NaN on a
    row with a NaN. Given the row's ``exponentials`` ``exp(x - m)`` (0 where masked, from
    :func:`max_and_exponentials`), they are scaled instead of computed again."""
    if exponentials is not None:
        return exponentials * jnp.exp(-log_sum_or_zero(log_sum))
    return jnp.exp(log_probabilities(x, m, log_sum, mask))


def _expectation(p: jax.Array, t: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``sum(p * t)`` over the admissible entries, keepdims (a masked ``t`` may be anything)."""
    pt = p * t if mask is None else jnp.where(mask, p * t, 0)
    return jnp.sum(pt, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Each rule is linear in the tangent and recomputes the probabilities from the input and the
# float32 per-row (max, log-sum) (see _autodiff): reverse mode saves nothing of size [..., C]
# beyond the input.
#   log_softmax: y = x - lse(x),       y' = x' - <p, x'>      (masked entries: 0)
#   softmax:     s = exp(x - lse(x)),  s' = s (x' - <p, x'>)
#   logsumexp:   lse' = <p, x'>
def _primitive(value, tangent):
    """A ``jax.custom_jvp`` function of ``(x [..., C], mask)`` whose value and tangent are
    ``value(x, mask, m, log_sum)`` and ``tangent(x, mask, m, log_sum, x_dot)``."""
    tangent = _autodiff.rematerialized(tangent)

    @jax.custom_jvp
    def f(x, mask):
        return value(x, mask, *max_and_log_sum(x, mask))

    @f.defjvp
    def f_jvp(primals, tangents):
        x, mask = primals
        m, log_sum = max_and_log_sum(x, mask)
        return value(x, mask, m, log_sum), tangent(x, mask, m, log_sum, tangents[0])

    return f


def _admissible_only(t, mask):
    return t if mask is None else jnp.where(mask, t, 0)


def _log_softmax_value(x, mask, m, log_sum):
    return log_probabilities(x.astype(m.dtype), m, log_sum, mask).astype(x.dtype)


def _log_softmax_tangent(x, mask, m, log_sum, x_dot):
    p = probabilities(x.astype(m.dtype), m, log_sum, mask)
    t = x_dot.astype(m.dtype)
    return _admissible_only(t - _expectation(p, t, mask), mask).astype(x.dtype)


def _softmax_value(x, mask, m, log_sum):
    return probabilities(x.astype(m.dtype), m, log_sum, mask).astype(x.dtype)


def _softmax_tangent(x, mask, m, log_sum, x_dot):
    p = probabilities(x.astype(m.dtype), m, log_sum, mask)
    t = x_dot.astype(m.dtype)
    return _admissible_only(p * (t - _expectation(p, t, mask)), mask).astype(x.dtype)


def _logsumexp_value(x, mask, m, log_sum):
    return (m + log_sum)[..., 0].astype(x.dtype)


def _logsumexp_tangent(x, mask, m, log_sum, x_dot):
    p = probabilities(x.astype(m.dtype), m, log_sum, mask)
    return _expectation(p, x_dot.astype(m.dtype), mask)[..., 0].astype(x.dtype)


_log_softmax = _primitive(_log_softmax_value, _log_softmax_tangent)
_softmax = _primitive(_softmax_value, _softmax_tangent)
_logsumexp = _primitive(_logsumexp_value, _logsumexp_tangent)


def _on_own_rows(f, x, mask):
    """``f(x, mask)`` on each device's rows where they are split over devices (``_mesh``)."""
    return _mesh.on_own_rows(lambda x, mask, _: f(x, mask), (x, mask))


def _prepare(x, axis, where):
    x = as_float_array("x", x)
    layout = layout_of("x", x, axis)
    return layout, layout.to_last(x), layout.mask_to_last("where", where, per_example=False)


def log_softmax(
    x: jax.typing.ArrayLike, axis: Axis = -1, where: jax.typing.ArrayLike | None = None
) -> jax.Array:
    r"""Log-softmax, computed stably: :math:`x_i - \log \sum_j e^{x_j}`.

    The row maximum is subtracted before exponentiating, so any finite input gives a finite
    output; ``-inf`` entries (a masked vocabulary) are legal and give ``-inf``. A row containing
    a NaN gives NaN in every entry.

    Args:
      x: floating-point array with at least one axis.
      axis: the class axis, or a tuple of axes normalised together.
      where: optional boolean mask broadcastable to ``x`` as ``jax.nn``'s (a ``[C]`` mask
        masks classes in every row): ``False`` entries take no part and come back as
        ``-inf``. A row with no admissible entry gives ``-inf`` everywhere and zero gradient.

    Returns:
      An array of ``x``'s shape and dtype (computed in at least float32). Differentiable in
      forward and reverse mode to any order.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.log_softmax(jnp.array([1000.0, 0.0]))
      Array([    0., -1000.], dtype=float32)

    References:
      ``jax.nn.log_softmax``; ``torch.nn.functional.log_softmax``.
    """
    layout, x2, mask = _prepare(x, axis, where)
    return layout.from_last(_on_own_rows(_log_softmax, x2, mask))


def softmax(
    x: jax.typing.ArrayLike, axis: Axis = -1, where: jax.typing.ArrayLike | None = None
) -> jax.Array:
    r"""Softmax, computed stably: :math:`e^{x_i - m} / \sum_j e^{x_j - m}` with ``m`` the row max.

    Its derivative is hand-written: :math:`\dot s = s \odot (\dot x - s \cdot \dot x)`, which
    reverse mode transposes to :math:`s \odot (g - g \cdot s)`.

    Args:
      x: floating-point array with at least one axis.
      axis: the class axis, or a tuple of axes normalised together.
      where: optional boolean mask broadcastable to ``x`` as ``jax.nn``'s (a ``[C]`` mask
        masks classes in every row); ``False`` entries get probability 0. A row with no
        admissible entry is all 0.

    Returns:
      An array of ``x``'s shape and dtype whose entries along ``axis`` sum to 1 (NaN in every
      entry of a row containing a NaN).

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.softmax(jnp.array([3.0, 1.0, -3.0])))
      [0.87887824 0.11894324 0.00217852]

    References:
      ``jax.nn.softmax``; ``torch.softmax``.
    """
    layout, x2, mask = _prepare(x, axis, where)
    return layout.from_last(_on_own_rows(_softmax, x2, mask))


def logsumexp(
    x: jax.typing.ArrayLike, axis: Axis = -1, where: jax.typing.ArrayLike | None = None
) -> jax.Array:
    r"""Log of the sum of exponentials, :math:`m + \log \sum_j e^{x_j - m}`, computed stably.

    Args:
      x: floating-point array with at least one axis.
      axis: the axis, or a tuple of axes, to reduce.
      where: optional boolean mask broadcastable to ``x`` as ``jax.nn``'s (a ``[C]`` mask
        masks classes in every row); only ``True`` entries are summed. An empty row gives
        ``-inf``.

    Returns:
      ``x``'s shape without ``axis``, in ``x``'s dtype (NaN for a row containing a NaN). The
      gradient is ``softmax(x)``.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.logsumexp(jnp.array([1000.0, 1000.0]))  # 1000 + log 2; exp(1000) overflows
      Array(1000.6932, dtype=float32)

    References:
      ``jax.nn.logsumexp``; ``scipy.special.logsumexp``.
    """
    layout, x2, mask = _prepare(x, axis, where)
    return _on_own_rows(_logsumexp, x2, mask)
