"""Argument validation, run at trace time.

Every check raises ``ValueError`` or ``TypeError`` whose message names the argument, what was
expected and what was received, so that a mistake is reported where it is made rather than as a
shape error deep inside XLA. Shape contracts go through chex; its ``AssertionError`` is re-raised
as a ``ValueError`` that a user can act on.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "mean", "sum")

Axis = int | Sequence[int]


def _dtype_of(x: jax.typing.ArrayLike) -> np.dtype:
    if isinstance(x, bool):
        return np.dtype(bool)
    if isinstance(x, int):
        return np.dtype(np.int32)
    if isinstance(x, float):
        return np.dtype(np.float32)
    return np.dtype(jnp.result_type(x))


def as_float_array(name: str, x: jax.typing.ArrayLike) -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless its dtype is floating point."""
    dtype = _dtype_of(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {dtype}.")
    return jnp.asarray(x)


def as_int_array(name: str, x: jax.typing.ArrayLike) -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless its dtype is integer."""
    dtype = _dtype_of(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{name} must be an integer array of class indices; got dtype {dtype}"
            " (for probabilities use the soft-label function)."
        )
    return jnp.asarray(x)


def as_bool_array(name: str, x: jax.typing.ArrayLike) -> jax.Array:
    dtype = _dtype_of(x)
    if dtype != np.dtype(bool):
        raise TypeError(f"{name} must be a boolean array; got dtype {dtype}.")
    return jnp.asarray(x)


def canonical_axes(name: str, axis: Axis, ndim: int) -> tuple[int, ...]:
    """Returns ``axis`` as a tuple of non-negative ints in the order given (a tuple of class
    axes is flattened in that order, as optax does), checking the range and repeats."""
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    if not axes or not all(isinstance(a, numbers.Integral) for a in axes):
        raise TypeError(f"{name} must be an int or a non-empty tuple of ints; got {axis!r}.")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{name}={axis!r} is out of range for an array of rank {ndim};"
                f" expected values in [{-ndim}, {ndim})."
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} repeats an axis.")
    return tuple(out)


def check_ignore_index(ignore_index) -> None:
    if ignore_index is not None and (
        not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool)
    ):
        raise TypeError(f"ignore_index must be an int or None; got {ignore_index!r}.")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}.")


def _concrete(value) -> float | None:
    """The Python value of a number or concrete array scalar; None under tracing."""
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        return float(np.asarray(value))
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def check_in_unit_interval(name: str, value) -> None:
    v = _concrete(value)
    if v is not None and not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {v}.")


def check_non_negative(name: str, value) -> None:
    v = _concrete(value)
    if v is not None and not v >= 0.0:
        raise ValueError(f"{name} must be >= 0; got {v}.")


def check_positive(name: str, value) -> None:
    v = _concrete(value)
    if v is not None and not v > 0.0:
        raise ValueError(f"{name} must be > 0; got {v}.")


def scalar_or_none(value, dtype) -> jax.Array | None:
    """A hyperparameter as a scalar array, or None when it is a literal 0 (the term is skipped).

    A traced value (a schedule under jit) is always kept: it may be nonzero at run time.
    """
    if value is None or (isinstance(value, numbers.Real) and value == 0):
        return None
    return jnp.asarray(value, dtype)


def check_shape(name: str, x: jax.Array, expected: Sequence[int], why: str = "") -> None:
    """Checks ``x.shape == expected`` with chex, re-raising as a ValueError naming ``name``."""
    try:
        chex.assert_shape(x, tuple(expected))
    except AssertionError as err:
        suffix = f" ({why})" if why else ""
        raise ValueError(
            f"{name} must have shape {tuple(expected)}{suffix}; got shape {x.shape}."
        ) from err


def check_broadcastable(name: str, x: jax.Array, target: Sequence[int], why: str = "") -> None:
    try:
        chex.assert_is_broadcastable(x.shape, tuple(target))
    except AssertionError as err:
        suffix = f" ({why})" if why else ""
        raise ValueError(
            f"{name} of shape {x.shape} does not broadcast to shape {tuple(target)}{suffix}."
        ) from err


def class_vector(name: str, x: jax.typing.ArrayLike | None, num_classes: int) -> jax.Array | None:
    """Validates an optional per-class vector (class weights, focal alpha) of length C."""
    if x is None:
        return None
    x = as_float_array(name, x)
    check_shape(name, x, (num_classes,), f"one entry per class, C={num_classes}")
    return x


def check_labels(
    labels: jax.typing.ArrayLike, num_classes: int, *, ignore_index: int | None = None
) -> None:
    """Checks that every integer label lies in ``[0, num_classes)`` or equals ``ignore_index``.

    The losses cannot raise on a bad label inside ``jax.jit`` (values are unknown at trace
    time), so they return NaN for it instead. This is the matching check, built on
    ``jax.experimental.checkify``: called eagerly it raises at once; inside a jitted function,
    wrap that function with ``checkify.checkify`` and call ``err.throw()`` on the result.

    Args:
      labels: integer class indices of any shape.
      num_classes: the number of classes ``C``.
      ignore_index: a label value that is allowed anyway (e.g. -100 for padding).

    Returns:
      None. Raises ``jax.experimental.checkify.JaxRuntimeError`` naming the first bad label and
      how many there are.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxce
      >>> from jax.experimental import checkify
      >>> jaxce.check_labels(jnp.array([0, 2, -100]), 3, ignore_index=-100)  # fine
      >>> def loss(logits, labels):
      ...     jaxce.check_labels(labels, logits.shape[-1])
      ...     return jaxce.softmax_cross_entropy_with_integer_labels(logits, labels)
      >>> err, _ = jax.jit(checkify.checkify(loss))(jnp.zeros((2, 3)), jnp.array([0, 7]))
      >>> err.get()
      'labels must lie in [0, 3); found 1 outside, the first is 7 (at flat index 1)...'

    References:
      ``jax.experimental.checkify``.
    """
    from jax.experimental import checkify

    labels = as_int_array("labels", labels)
    check_ignore_index(ignore_index)
    if not isinstance(num_classes, numbers.Integral) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
    if labels.size == 0:
        return
    ok = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        ok = ok | (labels == ignore_index)
    flat_ok = jnp.ravel(ok)
    first = jnp.argmin(flat_ok)  # the first False, when there is one
    allowed = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
    checkify.check(
        jnp.all(ok),
        f"labels must lie in [0, {num_classes}){allowed}; found {{count}} outside,"
        " the first is {value} (at flat index {index})",
        count=jnp.sum(~flat_ok),
        value=jnp.ravel(labels)[first],
        index=first,
    )
