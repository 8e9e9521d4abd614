"""How jaxce's hand-written derivatives are attached: ``jax.custom_jvp`` rules, linear in the
tangents, whose large factors are rematerialized.

Each function's rule returns its value and a tangent ``sum(D * x_dot)`` where ``D`` is the
hand-written derivative (``softmax(z) - onehot(y)`` for the cross-entropy). Forward mode
(``jax.jvp``, ``jax.jacfwd``) evaluates that directly; reverse mode (``jax.grad``) transposes it
into ``g * D``. ``D`` is computed by a function wrapped in ``jax.checkpoint``
(:func:`rematerialized`): in reverse mode JAX then saves only its inputs (the logits, alive
anyway, and ``O(N)`` row statistics) and recomputes ``D`` in the backward pass, so no ``[N, C]``
residual is kept, as a hand-written ``custom_vjp`` backward pass would do. Higher orders
(``jax.hessian``, forward-over-reverse Hessian-vector products) differentiate the rules.

Rules are registered with ``symbolic_zeros=True``: an input that is not differentiated (a mask,
class weights held fixed) arrives as a symbolic zero, and its terms are skipped rather than
computed and multiplied by zero.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _loops, _xla
from jaxce._layout import compute_dtype
from jaxce._loops import is_zero

F = TypeVar("F", bound=Callable)


def rematerialized(fn: F) -> F:
    """``fn`` recomputed in the backward pass instead of saved (``jax.checkpoint``).

    ``prevent_cse=False``: with the default, an optimization barrier keeps the recomputation
    apart, and XLA (jax 0.12 on CPU) then materializes the broadcast cotangent of a summed
    elementwise loss as a float32 array of the input's size (tests/test_memory.py,
    test_temporaries_do_not_grow_with_the_rows). XLA's common-subexpression elimination cannot
    merge the recomputation into the forward pass here: the rules run inside custom_jvp.
    """
    # jax.checkpoint is typed as returning Callable[..., Any].
    return cast(F, jax.checkpoint(fn, prevent_cse=False))


def no_tangent(x: jax.Array) -> np.ndarray:
    """The tangent of a boolean or integer output: a ``float0`` zero of its shape."""
    return np.zeros(np.shape(x), jax.dtypes.float0)


def zero_with_derivative(x: jax.Array) -> jax.Array:
    """0 with ``x``'s derivative (0 where ``x`` is infinite: no derivative at inf either). Added
    to a value a rounding apart from ``x`` that replaces it, it keeps ``x``'s derivative, which
    derivatives taken of the derivative rules read."""
    finite = jnp.isfinite(x)
    x = jnp.where(finite, x, jnp.zeros_like(x))
    return x - jax.lax.stop_gradient(x)


def add(total: jax.Array | None, term: jax.Array | None) -> jax.Array | None:
    """Sums tangent terms, any of which may be absent (None)."""
    if term is None:
        return total
    return term if total is None else total + term


def or_zeros(total: jax.Array | None, like: jax.Array) -> jax.Array:
    return jnp.zeros_like(like) if total is None else total.astype(like.dtype)


def dot(tangent: object, value: jax.Array) -> jax.Array | None:
    """``tangent * value`` for a scalar hyperparameter's tangent, None if it is zero."""
    if is_zero(tangent):
        return None
    return jnp.asarray(tangent).astype(value.dtype) * value


def contract(grad: jax.Array | None, tangent: object, dtype) -> jax.Array | None:
    """``sum(grad * tangent)`` in ``dtype``: the tangent of a sum whose gradient is ``grad``
    (None when either is absent). Reverse mode transposes it to ``g * grad``."""
    if grad is None or is_zero(tangent):
        return None
    return jnp.sum(grad.astype(dtype) * jnp.asarray(tangent).astype(dtype))


@jax.custom_jvp
def _product_or_zero(zero: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``a * b``, but 0 where ``zero``."""
    ab = a * b
    return jnp.where(zero, jnp.zeros_like(ab), ab)


# d(a b) = a_dot b + a b_dot, under the value's select: the first term is 0 only where the
# product is 0 and b is not finite (a weight of 0 on an infinite term has no derivative in the
# weight either), the second is this function again, of (a, b_dot), so its own derivative in a
# keeps the product rule. Nothing is saved but the primals the selects read.
def _product_or_zero_jvp(primals, tangents):
    zero, a, b = primals
    _, a_dot, b_dot = tangents
    out = _product_or_zero(zero, a, b)
    dot = None
    if not is_zero(a_dot):
        dot = a_dot * jnp.where(zero & ~jnp.isfinite(b), jnp.zeros_like(b), b)
    if not is_zero(b_dot):
        dot = add(dot, _product_or_zero(zero, a, b_dot))
    return out, or_zeros(dot, out)


_product_or_zero.defjvp(_product_or_zero_jvp, symbolic_zeros=True)


def product_rule(is_zero_product: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable:
    """``f(a, b) = a * b``, but 0 where ``is_zero_product(a, b)`` (a term that counts for
    nothing, such as a weight of 0 on an infinite log), with the product rule's tangent,
    ``a_dot * b + a * b_dot``, under the same select, at every order.

    A select's own derivative is 0 wherever it picks its constant, which would drop
    ``a_dot * b`` where ``a == 0``: a class weight, a label or a smoothing of exactly 0 would
    have no second derivative through its product, and ``jax.hessian`` in a class weight would
    not be symmetric (tests/test_autodiff.py, the exact zeros). Here that term is kept wherever
    ``b`` is finite; where the product is 0 and ``b`` is not finite, the term counts for nothing
    and has no derivative in ``a`` either. The tangent's own ``a * b_dot`` is the same function
    of ``(a, b_dot)`` under the primals' select, so a derivative taken of it in ``a`` (a third
    derivative) keeps its term too. The selects read the primals only, so the tangent is
    linear in the tangents and transposes (reverse mode).
    """

    def product(a: jax.Array, b: jax.Array) -> jax.Array:
        return _product_or_zero(is_zero_product(a, b), a, b)

    return product


def elementwise(
    value: Callable,
    tangent: Callable,
    narrow_fuses_whole: bool = False,
    terms: Callable | None = None,
) -> Callable:
    """An elementwise loss as a ``jax.custom_jvp`` function ``f(total, *args)``.

    ``value(*args)`` is the elementwise loss and ``tangent(*args, *dots)`` its tangent (one
    ``dot`` per arg, None where zero; returning None if all are). With ``total=True`` (static)
    ``f`` returns the sum over all elements, and its tangent the sum of the tangent: the
    elementwise loss then never exists as an array, in the forward pass or the backward pass
    (one fusion of the rematerialized factor and the scalar cotangent). ``narrow_fuses_whole``:
    the sum of bfloat16 or float16 arguments is read whole too where XLA fuses such a sum
    (``_loops.chunked_sum``). ``terms(*args, zero, one[, big])``: ``value`` written without a
    comparison or a select, which XLA's CPU compiler fuses whole into its sum
    (``_xla.sum_in_one_fusion``), its constants 0, 1 and the largest finite number taken from
    its last arguments, equal to ``value`` to within a rounding: without ``big`` wherever the
    inputs are finite (elsewhere NaN), with it everywhere. Where the first sum is not finite,
    the second is taken, for the whole batch (under ``vmap`` too).
    """
    tangent = rematerialized(tangent)

    def primal(total: bool, *args):
        if not total:
            return value(*args)
        shape = jnp.shape(args[0])

        if terms is None or not _xla.fuses_sum(args, shape):
            return _loops.chunked_sum(value, args, shape, narrow_fuses_whole)
        dtype = compute_dtype(args[0].dtype)
        fused = _xla.sum_in_one_fusion(terms, args, dtype)
        return _xla.unless_nonfinite(
            fused, lambda: fused, lambda: _xla.sum_in_one_fusion(terms, args, dtype, infinite=True)
        )

    f = functools.partial(jax.custom_jvp, nondiff_argnums=(0,))(primal)

    def f_jvp(total, primals, tangents):
        dots = tuple(None if is_zero(t) else t for t in tangents)
        out = primal(total, *primals)
        t = tangent(*primals, *dots)
        if total:
            return out, jnp.zeros_like(out) if t is None else jnp.sum(t)
        return out, or_zeros(t, out)

    f.defjvp(f_jvp, symbolic_zeros=True)
    return f
