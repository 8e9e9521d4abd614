"""sigmoid, log_sigmoid and logit soft-capping with hand-written gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxce._checks import as_float_array, check_positive
from jaxce._layout import compute_dtype


# sigmoid: s = 1 / (1 + exp(-x)) (jax.nn.sigmoid evaluates it without overflow). ds/dx = s(1-s)
# = sigmoid(x) * sigmoid(-x), which keeps precision for large |x| where 1 - s rounds to 0.
@jax.custom_vjp
def _sigmoid(x):
    return jax.nn.sigmoid(x.astype(compute_dtype(x.dtype))).astype(x.dtype)


def _sigmoid_fwd(x):
    return _sigmoid(x), x


def _sigmoid_bwd(x, g):
    xf = x.astype(compute_dtype(x.dtype))
    return (((jax.nn.sigmoid(xf) * jax.nn.sigmoid(-xf)) * g.astype(xf.dtype)).astype(x.dtype),)


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def stable_log_sigmoid(x: jax.Array) -> jax.Array:
    """``log(sigmoid(x)) = -softplus(-x) = min(x, 0) - log1p(exp(-|x|))``: no overflow anywhere."""
    return jnp.minimum(x, 0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


# log_sigmoid: d/dx log sigmoid(x) = 1 - sigmoid(x) = sigmoid(-x).
@jax.custom_vjp
def _log_sigmoid(x):
    return stable_log_sigmoid(x.astype(compute_dtype(x.dtype))).astype(x.dtype)


def _log_sigmoid_fwd(x):
    return _log_sigmoid(x), x


def _log_sigmoid_bwd(x, g):
    xf = x.astype(compute_dtype(x.dtype))
    return ((jax.nn.sigmoid(-xf) * g.astype(xf.dtype)).astype(x.dtype),)


_log_sigmoid.defvjp(_log_sigmoid_fwd, _log_sigmoid_bwd)


def sigmoid(x: jax.typing.ArrayLike) -> jax.Array:
    r"""The logistic function :math:`\sigma(x) = 1 / (1 + e^{-x})`, elementwise.

    Each output is independent of the others: use it for multi-label problems, where several
    classes can be true at once (softmax couples the outputs and suits exclusive classes).

    Args:
      x: floating-point array of any shape.

    Returns:
      An array of ``x``'s shape and dtype with values in [0, 1]; the gradient
      :math:`\sigma(x)\sigma(-x)` is accurate even where :math:`1 - \sigma(x)` rounds to 0.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.sigmoid(jnp.array([3.0, 1.0, -3.0])))
      [0.95257413 0.7310586  0.04742587]

    References:
      ``jax.nn.sigmoid``; ``torch.sigmoid``.
    """
    return _sigmoid(as_float_array("x", x))


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


def soft_cap(x: jax.Array, cap) -> jax.Array:
    """``cap * tanh(x / cap)`` in ``x``'s dtype, keeping ``-inf`` (a masked logit) at ``-inf``."""
    capped = cap * jnp.tanh(x / cap)
    return jnp.where(jnp.isneginf(x), x, capped)


def soft_cap_derivative(x: jax.Array, cap) -> jax.Array:
    """``d/dx cap * tanh(x / cap) = 1 - tanh(x / cap)**2`` (0 at -inf)."""
    t = jnp.tanh(x / cap)
    return 1 - t * t


@jax.custom_vjp
def _logit_soft_cap(x, cap):
    return soft_cap(x.astype(compute_dtype(x.dtype)), cap).astype(x.dtype)


def _logit_soft_cap_fwd(x, cap):
    return _logit_soft_cap(x, cap), (x, cap)


def _logit_soft_cap_bwd(res, g):
    x, cap = res
    xf = x.astype(compute_dtype(x.dtype))
    gx = soft_cap_derivative(xf, cap) * g.astype(xf.dtype)
    # d/dcap cap * tanh(x/cap) = tanh(u) - u (1 - tanh(u)^2), u = x / cap.
    u = jnp.where(jnp.isfinite(xf), xf / cap, 0)
    t = jnp.tanh(u)
    gcap = jnp.sum((t - u * (1 - t * t)) * g.astype(xf.dtype))
    return gx.astype(x.dtype), gcap.astype(jnp.result_type(cap))


_logit_soft_cap.defvjp(_logit_soft_cap_fwd, _logit_soft_cap_bwd)


def logit_soft_cap(x: jax.typing.ArrayLike, cap: float | jax.typing.ArrayLike) -> jax.Array:
    r"""Soft-caps logits: :math:`\mathrm{cap} \cdot \tanh(x / \mathrm{cap})` (Gemma 2).

    Bounds logits to ``(-cap, cap)`` smoothly, which keeps attention and output logits from
    growing without limit. ``-inf`` (a masked entry) stays ``-inf``.

    Args:
      x: floating-point array of any shape.
      cap: positive scalar (e.g. 30.0 for Gemma 2's final logits).

    Returns:
      An array of ``x``'s shape and dtype. Gradients flow to ``x`` and to ``cap``.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> jaxce.logit_soft_cap(jnp.array([0.0, 1e6, -jnp.inf]), 30.0)
      Array([  0.,  30., -inf], dtype=float32)

    References:
      Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size", 2024.
    """
    x = as_float_array("x", x)
    check_positive("cap", cap)
    cap = jnp.asarray(cap, compute_dtype(x.dtype))
    return _logit_soft_cap(x, cap)
