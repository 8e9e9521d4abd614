"""sigmoid, log_sigmoid and logit soft-capping with hand-written derivatives."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxce import _autodiff, _loops
from jaxce._checks import as_float_array, concrete, hyperparameter
from jaxce._layout import compute_dtype


def stable_log_sigmoid(x: jax.Array) -> jax.Array:
    """``log(sigmoid(x)) = -softplus(-x) = min(x, 0) - log1p(exp(-|x|))``: no overflow anywhere."""
    return log_sigmoid_pair(x)[0]


def softplus_tail(x: jax.Array) -> jax.Array:
    """``log1p(exp(-|x|))``, in ``[0, log 2]``: ``softplus(x) = max(x, 0)`` plus this."""
    return jnp.log1p(jnp.exp(-jnp.abs(x)))


def log_sigmoid_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(log sigmoid(x), log sigmoid(-x))`` as ``min(+-x, 0) - log1p(exp(-|x|))``: one
    exponential and one logarithm for both (the binary losses need both)."""
    tail = softplus_tail(x)
    return jnp.minimum(x, 0) - tail, jnp.minimum(-x, 0) - tail


def sigmoid_difference(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``a sigmoid(x) - b sigmoid(-x)`` from one exponential ``e = exp(-|x|) <= 1`` and
    ``1 / (1 + e)``, with one select on x's sign between the two sides' expressions,
    ``(a - b e) / (1 + e)`` and ``(a e - b) / (1 + e)``: neither sigmoid is rounded from the other
    (``1 - s`` cancels as ``s`` nears 1), and nothing overflows. A select of each sigmoid made
    XLA's CPU compiler keep both as arrays (the sigmoid BCE's ``value_and_grad`` of the mean at
    float32 [4096, 4096]: 41 -> 63 ms, bfloat16 31 -> 75 ms)."""
    e = jnp.exp(-jnp.abs(x))
    return jnp.where(x >= 0, a - b * e, a * e - b) * (1 / (1 + e))


def _float(x: jax.Array) -> jax.Array:
    return x.astype(compute_dtype(x.dtype))


# sigmoid: s = 1 / (1 + exp(-x)) (jax.nn.sigmoid evaluates it without overflow).
# s' = s (1 - s) x' = sigmoid(x) sigmoid(-x) x', which keeps precision for large |x| where
# 1 - s rounds to 0. The factor is recomputed from x in reverse mode (see _autodiff), as two
# logistic functions: from one exponential, with a select on x's sign of each, XLA's CPU
# compiler kept the exponential and 1 / (1 + e) as float32 arrays of x's size (value_and_grad of
# the sum at [4096, 4096], in one run: float32 82 -> 45 ms and 128 -> 0 MiB of temporaries,
# bfloat16 113 -> 54 ms and 256 -> 64 MiB). The derivatives that hold a sigmoid (log_sigmoid's,
# the sigmoid BCE's on GPUs) take this one, not jax.nn.sigmoid, whose own derivative s (1 - s)
# cancels as s nears 1 (in float32 at x = 16, where 1 - s is one rounding of 1: up to 100% off;
# the second derivative of log_sigmoid at x = -16).
@jax.custom_jvp
def logistic(x):
    return jax.nn.sigmoid(_float(x)).astype(x.dtype)


@jax.custom_jvp
def _logistic_slope(x: jax.Array) -> jax.Array:
    """``sigmoid(x) sigmoid(-x)``, the logistic function's derivative ``s (1 - s)``."""
    return jax.nn.sigmoid(x) * jax.nn.sigmoid(-x)


@_logistic_slope.defjvp
def _logistic_slope_jvp(primals, tangents):
    # d/dx s (1 - s) = s (1 - s) (1 - 2 s) = -s (1 - s) tanh(x / 2), to a few roundings of itself
    # at every x. Autodiff of the product subtracts two terms of about 1/8 that cancel near
    # x = 0, where it is about -x / 8: in float32 5% off at x = 1e-6, 0 from 1e-8 on (the second
    # derivative of sigmoid).
    (x,), (x_dot,) = primals, tangents
    slope = _logistic_slope(x)
    return slope, (-slope * jnp.tanh(x * 0.5)) * x_dot


@_autodiff.rematerialized
def _logistic_tangent(x, x_dot):
    xf = _float(x)
    return (_logistic_slope(xf) * x_dot.astype(xf.dtype)).astype(x.dtype)


@logistic.defjvp
def _logistic_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    return logistic(x), _logistic_tangent(x, x_dot)


# log_sigmoid: (log sigmoid(x))' = (1 - sigmoid(x)) x' = sigmoid(-x) x'.
@jax.custom_jvp
def _log_sigmoid(x):
    return stable_log_sigmoid(_float(x)).astype(x.dtype)


@_autodiff.rematerialized
def _log_sigmoid_tangent(x, x_dot):
    xf = _float(x)
    return (logistic(-xf) * x_dot.astype(xf.dtype)).astype(x.dtype)


@_log_sigmoid.defjvp
def _log_sigmoid_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    return _log_sigmoid(x), _log_sigmoid_tangent(x, x_dot)


def sigmoid(x: jax.typing.ArrayLike) -> jax.Array:
    r"""The logistic function :math:`\sigma(x) = 1 / (1 + e^{-x})`, elementwise.

    Each output is independent of the others: use it for multi-label problems, where several
    classes can be true at once (softmax couples the outputs and suits exclusive classes).

    Args:
      x: floating-point array of any shape.

    Returns:
      An array of ``x``'s shape and dtype with values in [0, 1]; the derivative
      :math:`\sigma(x)\sigma(-x)` is accurate even where :math:`1 - \sigma(x)` rounds to 0.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.sigmoid(jnp.array([3.0, 1.0, -3.0])))
      [0.95257413 0.7310586  0.04742587]

    References:
      ``jax.nn.sigmoid``; ``torch.sigmoid``.
    """
    return logistic(as_float_array("x", x))


def log_sigmoid(x: jax.typing.ArrayLike) -> jax.Array:
    r""":math:`\log \sigma(x) = -\mathrm{softplus}(-x)`, elementwise and without overflow.

    Note :math:`\log(1 - \sigma(x)) = \log\sigma(-x)`: never compute ``log(1 - sigmoid(x))``.

    Args:
      x: floating-point array of any shape.

    Returns:
      An array of ``x``'s shape and dtype, finite for every finite input.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.log_sigmoid(jnp.array([-200.0, 0.0]))
      Array([-200.     ,   -0.6931472], dtype=float32)

    References:
      ``jax.nn.log_sigmoid``; ``torch.nn.functional.logsigmoid``.
    """
    return _log_sigmoid(as_float_array("x", x))


# ----------------------------------------------------------------------------------------------
# Soft cap: z = cap tanh(x / cap), keeping -inf (a masked logit) at -inf.
#   dz/dx = 1 - tanh(u)^2,  dz/dcap = tanh(u) - u (1 - tanh(u)^2),  u = x / cap
# (both 0 at x = -inf, whose output does not depend on anything).
#
# Where |u| is below sqrt(eps), tanh(u) rounds to u and cap tanh(u) is x itself. Taking x there is
# what keeps the cap exact where u underflows (x below 2**64 times the smallest normal number,
# 2e-19 in float32, for the largest cap, CAP_LIMIT), and for an infinite cap that was traced (a
# schedule under jit: inf * tanh(0) is NaN), for which z = x is the definition ("inf means no
# cap"). A NaN u from x (x = +-inf with an infinite cap, or a NaN x) fails the comparison and
# keeps x too; a NaN cap (a traced cap out of range, see _checks.hyperparameter) takes
# cap * tanh(u), NaN, never the uncapped x.
def _tanh_is_identity_below(dtype) -> float:
    return float(jnp.finfo(dtype).eps) ** 0.5


def _tanh(u: jax.Array) -> jax.Array:
    """``tanh(u)``: XLA's, but in float64 from ``|u| = 0.5`` on ``(-m) / (2 + m)``,
    ``m = expm1(-2 |u|)``, with the sign of ``u``: within 1.60 epsilons of the true value,
    relative, on 23001 points of ``|u|`` in [1e-12, 25], where XLA's CPU ``tanh`` is up to 3.46
    off as it nears +-1 (``logit_soft_cap`` measured 3.75 units of its bound of 4 in float64
    with it). Below 0.5 XLA's, which keeps ``cap tanh(x / cap)`` within a rounding of ``x``
    where ``tanh(u)`` rounds to ``u`` (the quotient alone: 3 roundings). The sign is a select:
    ``copysign``'s derivative is -1 at ``u = -0.0``, which gave a Hessian the opposite sign there.
    (Taking the form of :func:`_tanh_beyond_one` from ``|u| = 1``, with its exponential's
    selects, had XLA's CPU compiler write two arrays of the logits' size out: 40 MiB at float64
    [40, 65536], ``tests/test_memory.py``.) In float32 XLA's is within 1.89 epsilons, and the
    losses' fusions on CPU are tuned to its code."""
    if u.dtype != jnp.float64:
        return jnp.tanh(u)
    em1 = jnp.expm1(-2 * jnp.abs(u))
    t = -em1 / (2 + em1)
    return jnp.where(jnp.abs(u) >= 0.5, jnp.where(u < 0, -t, t), jnp.tanh(u))


def soft_cap_bulk(x: jax.Array, cap: jax.Array) -> jax.Array:
    """``cap * tanh(x / cap)``, where ``-inf`` becomes ``-cap`` (see :func:`soft_cap`); its
    derivatives are the soft cap's own (:func:`_soft_capped`)."""
    return _soft_capped(_soft_cap_bulk_value, x, cap)


def _soft_cap_bulk_value(x: jax.Array, cap: jax.Array) -> jax.Array:
    u = x / cap
    capped = cap * _tanh(u)
    return jnp.where((jnp.abs(u) >= _tanh_is_identity_below(x.dtype)) | jnp.isnan(cap), capped, x)


# A cap is at most CAP_LIMIT (or inf, no cap). XLA's CPU compiler divides by way of the divisor's
# reciprocal, and a reciprocal below the smallest normal number is flushed to 0: with a cap above
# 2**126 (float32), u was 0 at every logit, so a cap of 1e38 left logits of 3e38 uncapped (an
# infinite loss, a NaN gradient), traced or not. Caps above CAP_LIMIT are an error, or NaN when
# traced (_checks.hyperparameter); within it the reciprocal is a normal number in float32 and
# float64. A cap known at trace time needs no guard: u = x / cap underflows only for |x| below
# 2**64 times the smallest normal number (2e-19 in float32, 2.4e-289 in float64), where
# cap tanh(u) is 0 instead of x, and elsewhere cap tanh(u) is within one unit in the last place
# of x where tanh(u) rounds to u (measured: tests/test_cross_entropy.py).
CAP_LIMIT = 2.0**64
# The smallest cap, for the same reason: a cap below the smallest normal number (1.2e-38 in
# float32) was flushed to 0 itself, and cap tanh(x / cap) was NaN. From 2**-64 up, x / cap and
# cap tanh(u) are normal numbers wherever the result is.
CAP_FLOOR = 2.0**-64


def checked_cap(name: str, cap: object, dtype) -> jax.Array | None:
    """The soft cap ``cap`` (the argument ``name``) as a 0-d array in ``dtype``, checked against
    its range, ``[CAP_FLOOR, CAP_LIMIT]`` or inf (``hyperparameter``), or None for an inf known
    at trace time: no cap. A traced inf stays an array, which :func:`soft_cap_bulk`'s guard
    takes as no cap."""
    value = hyperparameter(name, cap, dtype, low=CAP_FLOOR, high=CAP_LIMIT, allow_inf=True)
    known = concrete(cap)
    return None if known is not None and math.isinf(known) else value


def soft_cap_unguarded(x: jax.Array, cap: jax.Array) -> jax.Array:
    """``cap * tanh(x / cap)`` without the guard of :func:`soft_cap_bulk` (-inf becomes -cap),
    for a cap of at most ``CAP_LIMIT``. Without its select, XLA's CPU compiler reduces
    it in one pass over whole rows; it writes a select's operands out first."""
    return _soft_capped(_soft_cap_unguarded_value, x, cap)


def _soft_cap_unguarded_value(x: jax.Array, cap: jax.Array) -> jax.Array:
    return cap * _tanh(x / cap)


def soft_cap(x: jax.Array, cap: jax.Array) -> jax.Array:
    """``cap * tanh(x / cap)`` in ``x``'s dtype, keeping ``-inf`` (a masked logit) at ``-inf``."""
    return jnp.where(jnp.isneginf(x), x, soft_cap_bulk(x, cap))


def _flush_shift(dtype) -> float:
    """The largest power of two below ``-log`` of ``dtype``'s smallest normal number: 64 in
    float32, 512 in float64 (see :func:`_sech_squared`)."""
    return 2.0 ** math.floor(math.log2(-math.log(float(jnp.finfo(dtype).smallest_normal))))


@jax.custom_jvp
def _sech_squared(u: jax.Array) -> jax.Array:
    """``1 - tanh(u)**2`` as ``4 e / (1 + e)**2``, ``e = exp(-2 |u|)``: within 2.4 (float32) and
    2.9 (float64) epsilons of the true value, relative, wherever that is a normal number (0 at
    +-inf; measured on 120002 points of ``|u|`` up to 44.4 and 354.8; 2.6 on 4000 random
    draws). ``1 - tanh(u)**2`` itself cancels as ``tanh(u)``
    nears +-1: 250-290 epsilons for ``|u|`` in [0.5, 3]; in float32, 1.1e-4 relative at
    ``|u| = 4``, 8.9e-3 at 6, and 0 from 8 on, where the true value is 4.5e-7 and less. Named
    in the compiled program (``sech_squared``): its exponential is not one of the logits'
    (``tests/test_memory.py`` counts those).

    ``e`` is below the smallest normal number, which XLA flushes to 0 on CPU and GPU, from
    ``2 |u| = 87.3`` in float32 (708.4 in float64), ``4 e`` only from 88.7 (709.8): from
    ``2 |u| = s`` (:func:`_flush_shift`) on, ``4 e`` is ``exp(s - 2 |u|)`` times the constant
    ``4 exp(-s)``, whose exponent ``s - 2 |u|`` is exact (Sterbenz) where the result is above 0,
    so the result stays within a few roundings of itself down to the smallest normal number
    (4.0e-38 at ``2 |u| = 87.5``, not 0), within 1.2 epsilons beyond ``s`` (measured; the
    constant's rounding). Below ``s`` the result is the same as without the shift, bit for
    bit."""
    four_e, _, r, _ = _sech_squared_parts(u)
    return four_e * r * r


def _sech_squared_parts(u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(4 e, e, 1 / (1 + e), -2 |u|)`` of :func:`_sech_squared`, ``e = exp(-2 |u|)`` (``e``
    is 0 from ``2 |u| = _flush_shift`` on, where ``1 + e`` rounds to 1)."""
    with jax.named_scope("sech_squared"):
        a = -2 * jnp.abs(u)
        s = _flush_shift(a.dtype)
        far = a < -s
        shifted = jnp.exp(jnp.where(far, a + s, a))
        e = jnp.where(far, 0.0, shifted)
        four_e = shifted * jnp.where(far, 4 * math.exp(-s), 4.0)
        # 4 e times 1 / (1 + e) twice, not one division by (1 + e)^2: in a forward-mode
        # derivative of the reverse pass (a Hessian-vector product), XLA kept the divisor's
        # tangent whole (12 MiB at [512, 8192] with every option of the cross-entropy on).
        # r from e (0 where 1 + e rounds to 1 anyway), not from four_e / 4: that kept XLA's
        # CPU compiler from fusing the derivative into the gradient's pass (tests/test_memory.py:
        # twice the temporaries with a soft cap).
        r = 1 / (1 + e)
        return four_e, e, r, a


@_sech_squared.defjvp
def _sech_squared_jvp(primals, tangents):
    # d/du 4 e r^2 = a' 4 e r^2 (1 - e) r = -2 tanh(u) sech(u)^2 (a = -2 |u|, a' its slope),
    # with 1 - e = -expm1(a): to a few roundings of itself at every u. Autodiff of 4 e r^2
    # subtracts two terms of about 2 that cancel near u = 0, where the derivative is about -2 u:
    # in float32 7% off at u = 1e-6, 0 from 1e-8 on (the second derivative of logit_soft_cap in
    # x, and its mixed one in x and the cap). Written in the value's own parts, which XLA's CPU
    # compiler fuses into a Hessian-vector product's pass as it did the autodiff (with
    # -2 tanh(u) times the value it kept one more float32 array of the logits' size).
    (u,), (u_dot,) = primals, tangents
    four_e, _, r, a = _sech_squared_parts(u)
    sech2 = four_e * r * r
    slope = jnp.where(u < 0, 2.0, -2.0).astype(u.dtype)
    return sech2, (slope * (sech2 * (-jnp.expm1(a) * r))) * u_dot


@jax.custom_jvp
def _over_cap(x: jax.Array, cap: jax.Array) -> jax.Array:
    """``u = x / cap``, whose derivative in the cap is taken as ``-(u / cap)``. Autodiff's,
    ``-x * cap**-2``, multiplies a cotangent by ``cap**-2`` first, which flushes it to 0 where
    the product is below the smallest normal number though the result is not: the soft cap's
    second derivatives in the cap were 0 at a cap of 32 from ``|u| = 42`` on in float32 (the
    mixed one in ``x`` and the cap: 3.5e-36 there), and at every ``u`` for float32 caps from
    ``2**63`` on (``cap**-2`` flushed: 6.9e-20 at ``u = 1``).

    The slope is that of ``u`` clamped to ``+-_sech_squared_vanishes``: beyond it every
    derivative of the soft cap in ``u`` is 0, and where ``x / cap`` overflows (``x = 3e38``,
    ``cap = 0.5``) an unclamped slope would multiply that 0 into NaN."""
    return x / cap


@_over_cap.defjvp
def _over_cap_jvp(primals, tangents):
    (x, cap), (x_dot, cap_dot) = primals, tangents
    u = _over_cap(x, cap)
    bound = _sech_squared_vanishes(u.dtype)
    return u, _per_cap(x_dot, cap) - _per_cap(jnp.clip(u, -bound, bound), cap) * cap_dot


@jax.custom_jvp
def _per_cap(a: jax.Array, cap: jax.Array) -> jax.Array:
    """``a / cap`` with the derivative in the cap ``-(a / cap) / cap`` (never ``cap**-2``), for
    the quotients of :func:`_over_cap`'s tangent, which are not ``u``: its clamp would change
    their derivatives (third derivatives of the soft cap: at ``x = cap = 0.01`` in float32,
    ``d3/dx2 dcap`` was -3338 against 180.7 in the other order, the true value)."""
    return a / cap


@_per_cap.defjvp
def _per_cap_jvp(primals, tangents):
    (a, cap), (a_dot, cap_dot) = primals, tangents
    q = _per_cap(a, cap)
    return q, _per_cap(a_dot, cap) - _per_cap(q, cap) * cap_dot


@jax.custom_jvp
def _sech_squared_apart(u: jax.Array) -> jax.Array:
    """:func:`_sech_squared` from an exponential of its own: ``sech(u)**2``,
    ``sech(u) = 2 e / (1 + e**2)``, ``e = exp(-|u|)``. Within 3.1 (float32) and 3.6 (float64)
    epsilons of the true value, relative, wherever that is a normal number (measured on 120002
    points of ``|u|`` up to 44.4 and 354.8, where :func:`_sech_squared` is within 2.4 and 2.9);
    no shift is needed, as ``sech(u)`` is normal up to twice the
    ``|u|`` where its square is not. The capped logits' tangent in the losses' rules takes it: a
    derivative of a rule (a Hessian-vector product) reads that tangent in one pass over the
    logits and the rule's chain reads :func:`_sech_squared` in another, and with one exponential
    for both XLA's CPU compiler kept it and ``1 / (1 + e)`` as two float32 arrays of the logits'
    size (forward over reverse of the integer-label loss with every option on, float32
    [2048, 4096]: 33 -> 97 MiB on jaxlib 0.10.2, 64 -> 128 MiB on 0.12.1). With an exponential
    of its own, each pass computes its own."""
    e = jnp.exp(-jnp.abs(u))
    sech = 2 * e / (1 + e * e)
    return sech * sech


@_sech_squared_apart.defjvp
def _sech_squared_apart_jvp(primals, tangents):
    return _sech_squared_apart(*primals), _sech_squared_jvp(primals, tangents)[1]


def soft_cap_derivative(x: jax.Array, cap: jax.Array) -> jax.Array:
    """``d/dx cap * tanh(x / cap) = 1 - tanh(x / cap)**2`` (0 at -inf)."""
    return _sech_squared(_over_cap(x, cap))


def _sech_squared_vanishes(dtype) -> int:
    """A ``|u|`` beyond which ``1 / cosh(u)**2`` is below ``dtype``'s smallest normal number
    (44.4 in float32, 354.9 in float64: ``4 exp(-2 |u|)`` there), rounded up: there
    :func:`_sech_squared` is flushed to 0 and ``tanh(u)`` is +-1, so clamping ``u`` changes
    neither the cap's derivative nor the derivatives this module computes of it, and keeps
    ``u / cosh(u)**2`` finite where ``x / cap`` overflows (``x = 3e38``, ``cap = 0.5``;
    ``x = +inf``), instead of ``inf * 0 = NaN``. (A clamp at ``|u| = 40``, where ``tanh(u)`` is
    +-1 too, made the cap's second derivative 0 from there on, though it is a normal number up to
    ``|u| = 354`` in float64.)"""
    tiny = float(jnp.finfo(dtype).smallest_normal)
    return math.ceil((math.log(4) - math.log(tiny)) / 2)


# sinh(w) - w = sum_k w^(2k+1) / (2k+1)!, k >= 1: the series' coefficients, highest first, to
# w^23; for |w| < 2 the next term is below 2.2e-18 of the sum (float64's rounding: 1.1e-16).
_SINH_MINUS_W = tuple(1 / math.factorial(2 * k + 1) for k in range(11, 0, -1))


def soft_cap_cap_derivative(x: jax.Array, cap: jax.Array) -> jax.Array:
    """``d/dcap cap * tanh(x / cap) = tanh(u) - u (1 - tanh(u)**2)``, ``u = x / cap`` (0 at
    -inf, 1 at +inf).

    For ``|u| < 1`` the two terms cancel (the difference is ``2 u**3 / 3`` near 0, where they
    are ``u``): there it is ``(1 - tanh(u)**2) (sinh(2u) - 2u) / 2``, with ``sinh(w) - w`` from
    its series, to a few roundings of itself (the subtraction gave 136% of it at ``u = 3e-4``
    in float32, 1% at ``u = 3e-3``)."""
    u = jnp.where(jnp.isneginf(x), jnp.zeros_like(x), _over_cap(x, cap))
    saturates = _sech_squared_vanishes(u.dtype)
    u = jnp.clip(u, -saturates, saturates)
    sech2 = _sech_squared(u)
    small = jnp.abs(u) < 1
    w = 2 * jnp.where(small, u, jnp.zeros_like(u))
    w2 = w * w
    series = jnp.zeros_like(w)
    for c in _SINH_MINUS_W:
        series = series * w2 + c
    near_zero = sech2 * (series * (w2 * w)) * 0.5
    return jnp.where(small, near_zero, _tanh_beyond_one(u) - u * sech2)


@jax.custom_jvp
def _tanh_beyond_one(u: jax.Array) -> jax.Array:
    """``tanh(u)`` for ``|u| >= 1`` as ``sign(u) (1 - e) / (1 + e)``, ``e = exp(-2 |u|)`` (at most
    ``exp(-2)``, so ``1 - e`` does not cancel), from the parts of :func:`_sech_squared`: within
    1.08 epsilons of the true value, relative, in float32 and float64, where XLA's CPU ``tanh``
    is up to 1.89 and 3.46 epsilons off (measured on 20001 points of ``|u|`` in [1, 21]; its
    float64 error is largest as ``tanh(u)`` nears 1). Its derivative is :func:`_sech_squared`,
    the very value the cap's derivative subtracts, so that the second derivative of
    ``tanh(u) - u / cosh(u)**2`` is ``-u`` times the derivative of ``1 / cosh(u)**2`` to a few
    roundings; ``tanh``'s, ``1 - tanh(u)**2``, cancels (0 in float32 from ``|u| = 8`` on)."""
    _, e, r, _ = _sech_squared_parts(u)
    t = (1 - e) * r
    return jnp.where(u < 0, -t, t)


@_tanh_beyond_one.defjvp
def _tanh_beyond_one_jvp(primals, tangents):
    (u,), (u_dot,) = primals, tangents
    return _tanh_beyond_one(u), _sech_squared(u) * u_dot


@jax.custom_jvp
def _logit_soft_cap(x, cap):
    return soft_cap(_float(x), cap).astype(x.dtype)


def _soft_cap_tangent(x, cap, x_dot, cap_dot, *, bulk: bool):
    """The tangent of ``cap * tanh(x / cap)`` given ``x_dot`` and ``cap_dot`` (None: zero):
    :func:`soft_cap_derivative` and :func:`soft_cap_cap_derivative` for :func:`logit_soft_cap`,
    where ``-inf`` stays ``-inf``; with ``bulk``, for :func:`_soft_capped`, where ``-inf`` becomes
    ``-cap`` (a derivative of -1 in the cap) and the derivative in ``x`` is
    :func:`_sech_squared_apart`."""
    xf = _float(x)
    t = None
    if x_dot is not None:
        slope = _sech_squared_apart(_over_cap(xf, cap)) if bulk else soft_cap_derivative(xf, cap)
        t = slope * x_dot.astype(xf.dtype)
    if cap_dot is not None:
        d = soft_cap_cap_derivative(xf, cap)
        if bulk:
            d = jnp.where(jnp.isneginf(xf), -jnp.ones_like(d), d)
        t = _autodiff.add(t, d * cap_dot.astype(xf.dtype))
    return _autodiff.or_zeros(t, x)


_logit_soft_cap_tangent = _autodiff.rematerialized(functools.partial(_soft_cap_tangent, bulk=False))
_bulk_tangent = _autodiff.rematerialized(functools.partial(_soft_cap_tangent, bulk=True))


def _logit_soft_cap_jvp(primals, tangents):
    x, cap = primals
    dots = (None if _loops.is_zero(t) else t for t in tangents)
    return _logit_soft_cap(x, cap), _logit_soft_cap_tangent(x, cap, *dots)


_logit_soft_cap.defjvp(_logit_soft_cap_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _soft_capped(form, x, cap):
    """``form(x, cap)``, a form of ``cap * tanh(x / cap)`` in which ``-inf`` becomes ``-cap``
    (:func:`_soft_cap_bulk_value`, :func:`_soft_cap_unguarded_value`), with the soft cap's
    derivatives rather than autodiff's: the losses' rules compute the capped logits with it, and
    derivatives taken of a rule (Hessians, Hessian-vector products) differentiate them. Autodiff
    takes ``1 - tanh(u)**2`` from the rounded ``tanh(u)``, 0 in float32 from ``|u| = 9``: the
    integer-label loss's second derivative in a logit and a traced cap was 8.3% off at
    ``u = -10.1`` in float32 (2e-9 in float64), and ``tanh(u) - u (1 - tanh(u)**2)``, its
    derivative in the cap, cancels near ``u = 0``."""
    return form(x, cap)


def _soft_capped_jvp(form, primals, tangents):
    x, cap = primals
    dots = (None if _loops.is_zero(t) else t for t in tangents)
    return _soft_capped(form, x, cap), _bulk_tangent(x, cap, *dots)


_soft_capped.defjvp(_soft_capped_jvp, symbolic_zeros=True)


def logit_soft_cap(x: jax.typing.ArrayLike, cap: float | jax.typing.ArrayLike) -> jax.Array:
    r"""Soft-caps logits: :math:`\mathrm{cap} \cdot \tanh(x / \mathrm{cap})` (Gemma 2).

    Bounds logits to ``(-cap, cap)`` smoothly, which keeps attention and output logits from
    growing without limit. ``-inf`` (a masked entry) stays ``-inf``; ``cap=inf`` is the identity.

    Args:
      x: floating-point array of any shape.
      cap: scalar in ``[2**-64, 2**64]`` (e.g. 30.0 for Gemma 2's final logits), a Python
        number or a 0-d array; ``inf`` means no cap. Another is a ``ValueError`` (NaN when
        traced): XLA divides by the cap's reciprocal, which above 2**126 would be flushed to 0,
        as would a cap below float32's smallest normal number itself.

    Returns:
      An array of ``x``'s shape and dtype. Derivatives flow to ``x`` and to ``cap``.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.logit_soft_cap(jnp.array([0.0, 1e6, -jnp.inf]), 30.0)
      Array([  0.,  30., -inf], dtype=float32)

    References:
      Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size", 2024.
    """
    x = as_float_array("x", x)
    if cap is None:
        raise TypeError("cap must be a number or a 0-d array; got None (no cap is cap=inf).")
    value = checked_cap("cap", cap, compute_dtype(x.dtype))
    return x if value is None else _logit_soft_cap(x, value)
