"""Argument validation, run at trace time.

Every check raises ``ValueError`` or ``TypeError`` whose message names the argument, what was
expected and what was received, so that a mistake is reported where it is made rather than as a
shape error deep inside XLA. Shape contracts go through chex; its ``AssertionError`` is re-raised
as a ``ValueError`` that a user can act on.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import overload

import chex
import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "mean", "sum")

Axis = int | Sequence[int]


def _describe(x: object) -> str:
    """A short description of a value for an error message."""
    if isinstance(x, jax.Array | np.ndarray):
        return f"an array of shape {x.shape} and dtype {x.dtype}"
    return " ".join(f"{type(x).__name__} {x!r}".split())[:120]


def as_array(name: str, x: object) -> jax.Array:
    """``x`` as a ``jax.Array``: arrays and Python or NumPy scalars are accepted; lists, tuples,
    None and other objects raise a ``TypeError`` naming ``name`` (``jax.numpy`` functions reject
    lists too, with a message that does not say which argument was one)."""
    if isinstance(x, jax.Array | np.ndarray | np.generic | numbers.Number):
        return jnp.asarray(x)
    if hasattr(x, "__jax_array__"):  # an array in a wrapper, e.g. a Flax NNX Param
        return as_array(name, x.__jax_array__())
    if isinstance(x, list | tuple):
        raise TypeError(
            f"{name} must be an array; got a Python {type(x).__name__}. Convert it first, e.g."
            f" {name}=jnp.asarray(...)."
        )
    raise TypeError(f"{name} must be an array; got {_describe(x)}.")


def as_float_array(name: str, x: object) -> jax.Array:
    """``x`` as an array, raising ``TypeError`` unless its dtype is floating point."""
    x = as_array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}.")
    return x


def _narrowed_out_of_range(name: str, x: object) -> None:
    """Raises for a NumPy array of 64-bit integers that ``jnp.asarray`` would narrow to 32 bits
    (JAX without ``jax_enable_x64``) and that holds a value the narrow dtype cannot: wrapped, an
    ``int64`` label of 2**32 + 3 would become class 3. Its values are concrete, so this is known
    at trace time."""
    if isinstance(x, int) and not isinstance(x, bool):
        x = np.asarray(x)  # a Python int: int64, or beyond it, an object array
        if x.dtype == object:
            raise ValueError(f"{name}={x} is beyond the range of every integer dtype.")
    if not isinstance(x, np.ndarray | np.generic):
        return
    values = np.asarray(x)
    kind = values.dtype
    narrow_kind = jax.dtypes.canonicalize_dtype(kind)
    if kind.kind not in "iu" or narrow_kind == kind:
        return
    narrow = np.iinfo(narrow_kind)
    beyond = (values < narrow.min) | (values > narrow.max)
    if beyond.any():
        count = int(beyond.sum())
        more = f" (and {count - 1} more)" if count > 1 else ""
        raise ValueError(
            f"{name} of dtype {kind} holds {values[beyond].flat[0]}{more}, beyond the range of"
            f" {narrow.dtype}, which JAX narrows {kind} to without 64-bit mode: it"
            " would wrap to another class. Enable jax_enable_x64, or map such labels to one"
            " that is out of range (e.g. -1) first."
        )


def as_real_array(name: str, x: object) -> jax.Array:
    """``x`` as an array of real numbers (floating-point, integer or boolean), raising
    ``TypeError`` for a complex one, whose imaginary part a conversion would drop."""
    x = as_array(name, x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be a real array; got dtype {x.dtype}.")
    return x


def as_int_array(name: str, x: object) -> jax.Array:
    """``x`` as an array of class indices, raising ``TypeError`` unless its dtype is integer
    (booleans are not class indices), and ``ValueError`` for a NumPy 64-bit label that 32-bit
    JAX would wrap into range."""
    _narrowed_out_of_range(name, x)
    x = as_array(name, x)
    if x.dtype == jnp.bool_ or not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be an integer array of class indices; got dtype {x.dtype}"
            " (for probabilities use the soft-label function)."
        )
    return x


def as_bool_array(name: str, x: object) -> jax.Array:
    x = as_array(name, x)
    if x.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean array; got dtype {x.dtype}.")
    return x


def check_min_rank(name: str, x: jax.Array, rank: int, layout: str) -> None:
    if x.ndim < rank:
        raise ValueError(f"{name} must have shape {layout}; got a {x.ndim}-d array {x.shape}.")


def canonical_axes(name: str, axis: object, ndim: int) -> tuple[int, ...]:
    """``axis`` as a tuple of non-negative ints in the order given (a tuple of class axes is
    flattened in that order, as optax does), checking the type, the range and repeats."""
    if ndim == 0:
        raise ValueError(f"{name}={axis!r} needs an array with a class axis; got a 0-d array.")
    is_int = isinstance(axis, numbers.Integral) and not isinstance(axis, bool)
    if is_int:
        axes: tuple = (axis,)
    elif isinstance(axis, list | tuple) and axis:
        axes = tuple(axis)
    else:
        axes = ()
    if not axes or not all(
        isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes
    ):
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


def check_reduction(reduction: object) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}.")
    return reduction


def check_num_classes(name: str, num_classes: int, what: str = "class axis") -> None:
    """Losses with integer labels need at least one class to index."""
    if num_classes == 0:
        raise ValueError(
            f"{name} has 0 classes along its {what}; a loss over integer labels needs at least"
            " one class."
        )


def concrete(value: object) -> float | None:
    """The Python value of a number or concrete array scalar; None under tracing."""
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        return float(np.asarray(value))
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _bound(v: float) -> str:
    """A bound as a message shows it: a power of two far from 1 as one (``2**64``,
    ``2**-64``), else ``:g``."""
    if v <= 0 or math.isinf(v):
        return f"{v:g}"
    exponent = math.frexp(v)[1] - 1
    return f"2**{exponent}" if abs(exponent) >= 20 and v == 2.0**exponent else f"{v:g}"


def _in_range(v, low: float, high: float, open_low: bool):
    above_low = v > low if open_low else v >= low
    return above_low & (v <= high)


def hyperparameter(
    name: str,
    value: object,
    dtype,
    *,
    low: float,
    high: float = math.inf,
    open_low: bool = False,
    allow_inf: bool = False,
) -> jax.Array:
    """A scalar hyperparameter as a 0-d array in ``dtype``.

    A Python number or a 0-d array; a non-scalar is an error rather than silently using its
    first element. A concrete value outside ``low..high``, or NaN, is a ``ValueError`` naming
    it; with ``allow_inf``, +inf (which switches the term off) is accepted even above ``high``.
    A traced value (a schedule under ``jit``) cannot be checked at trace time: outside the range
    (tested in its own dtype, before the conversion to ``dtype`` could round it to the bound or
    to inf) it becomes NaN, so the loss and its derivatives (this one's included) are NaN, never
    a plausible number."""
    if isinstance(value, bool) or not isinstance(
        value, numbers.Real | jax.Array | np.ndarray | np.generic
    ):
        raise TypeError(f"{name} must be a number or a 0-d array; got {_describe(value)}.")
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        if np.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar; got an array of shape {np.shape(value)}.")
        kind = jnp.asarray(value).dtype
        if not (jnp.issubdtype(kind, jnp.floating) or jnp.issubdtype(kind, jnp.integer)):
            raise TypeError(f"{name} must be a real number; got dtype {kind}.")
    v = concrete(value)
    if v is not None:
        off = allow_inf and v == math.inf
        bad = math.isnan(v) or (math.isinf(v) and not allow_inf)
        if bad or not (off or _in_range(v, low, high, open_low)):
            bracket = "(" if open_low else "["
            upper = "inf)" if math.isinf(high) else f"{_bound(high)}]"
            if allow_inf:
                also = "" if math.isinf(high) else " or be inf"
            else:
                also = ", finite"
            raise ValueError(f"{name} must lie in {bracket}{_bound(low)}, {upper}{also}; got {v}.")
        return jnp.asarray(v, dtype)
    raw = jnp.asarray(value)
    valid = _in_range(raw, low, high, open_low)
    if allow_inf:
        valid = valid | (raw == jnp.inf)
    else:
        valid = valid & jnp.isfinite(raw)
    x = raw.astype(dtype)
    # x times 1 or NaN rather than a select of NaN, whose derivative would be 0: out of range,
    # the derivative with respect to the hyperparameter is NaN too.
    return x * jnp.where(valid, jnp.ones_like(x), jnp.full_like(x, jnp.nan))


def nan_together(*values: jax.Array | None) -> tuple[jax.Array | None, ...]:
    """One function's hyperparameters (from :func:`hyperparameter`, or arrays of entries, or
    None), each times 1, or times NaN where any of them holds a NaN: a traced one out of range
    then makes every derivative NaN, those with respect to the others included, whose rules may
    not read the bad one (the z-loss's derivative reads no smoothing)."""
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return values
    bad = jnp.any(jnp.stack([jnp.any(jnp.isnan(v)) for v in present]))
    factor = jnp.where(bad, jnp.nan, 1.0)
    return tuple(None if v is None else v * factor.astype(v.dtype) for v in values)


def nonnegative_entries(name: str, x: jax.Array) -> jax.Array:
    """A vector of weights whose entries must be finite and >= 0 (as a scalar of the same
    meaning, :func:`hyperparameter`): a concrete one holding another value is a ``ValueError``
    naming it; a traced one is NaN where its entries are not (so is the loss)."""
    try:
        values = np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        valid = (x >= 0) & jnp.isfinite(x)
        return x * jnp.where(valid, jnp.ones_like(x), jnp.full_like(x, jnp.nan))
    bad = ~((values >= 0) & np.isfinite(values))
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} must hold finite values >= 0; got {values.flat[index]} at index {index}."
        )
    return x


def is_literal_zero(value: object) -> bool:
    """A Python 0 (or None) switches a term off statically; a traced value never does: it may
    be nonzero at run time."""
    return value is None or (isinstance(value, numbers.Real) and value == 0)


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
    """Checks that ``x`` broadcasts to ``target`` by NumPy's rules, re-raising chex's error as a
    ValueError naming ``name``."""
    try:
        chex.assert_is_broadcastable(x.shape, tuple(target))
    except AssertionError as err:
        suffix = f" ({why})" if why else ""
        raise ValueError(
            f"{name} of shape {x.shape} does not broadcast to shape {tuple(target)}{suffix}."
        ) from err


def float_of_rank(name: str, x: object, shape: Sequence[int], dtype, why: str = "") -> jax.Array:
    """An optional float weight array validated as broadcastable to ``shape``, in ``dtype``,
    with ``shape``'s rank (leading axes of size 1 added). The caller broadcasts it by name, not
    implicitly inside an expression (rank promotion), and after splitting a batch over devices
    (``_mesh.on_own_rows``), so that no device holds more than its own rows of it."""
    x = as_float_array(name, x)
    check_broadcastable(name, x, shape, why)
    return jnp.reshape(x.astype(dtype), (1,) * (len(shape) - x.ndim) + x.shape)


@overload
def class_vector(name: str, x: None, num_classes: int, why: str = "") -> None: ...
@overload
def class_vector(
    name: str, x: jax.typing.ArrayLike, num_classes: int, why: str = ""
) -> jax.Array: ...
@overload
def class_vector(name: str, x: object, num_classes: int, why: str = "") -> jax.Array | None: ...
def class_vector(name: str, x: object, num_classes: int, why: str = "") -> jax.Array | None:
    """Validates an optional per-class vector (class weights, focal alpha) of length C."""
    if x is None:
        return None
    x = as_float_array(name, x)
    check_shape(name, x, (num_classes,), why or f"one entry per class, C={num_classes}")
    return x
