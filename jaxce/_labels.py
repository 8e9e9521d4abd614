"""Integer class labels: validation at trace time and what each label means at run time.

Every loss that takes class indices (softmax cross-entropy, NLL, softmax focal, the fused and
the sharded losses) goes through this module, so a label means the same thing everywhere:

* its dtype may be any integer type, signed or unsigned, 8 to 64 bits: comparisons are made in
  the label's own dtype against bounds that fit it, and indices are then int32, so a ``uint8``
  label 3 with 300 classes is class 3, not 3 + 256;
* a label equal to ``ignore_index`` marks an example to skip; an ``ignore_index`` that no label
  of that dtype can equal (-100 for ``uint8``) is a ``ValueError``, never a different class;
* a label outside ``[0, C)`` that is not ``ignore_index`` makes its example's loss and gradient
  NaN (out-of-range values are only known at run time); :func:`check_labels` finds them.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxce import _checks, _mesh
from jaxce._layout import ClassLayout, layout_of

INDEX_DTYPE = jnp.int32


class Labels(NamedTuple):
    """What each integer label means, per example."""

    class_index: jax.Array  # int32 class index, clamped into [0, C): safe to gather with
    ignored: jax.Array  # bool: equal to ignore_index
    invalid: jax.Array  # bool: outside [0, C) and not ignored: the example's loss is NaN


def check_ignore_index(ignore_index: object, dtype=None) -> int | None:
    """``ignore_index`` is None or an int that a label of ``dtype`` can equal."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, jax.core.Tracer):
        raise TypeError(
            "ignore_index must be an int or None, known when the loss is traced; got a traced"
            f" value {ignore_index!r}. Under jax.jit, close over it or mark the argument static"
            " (static_argnames)."
        )
    if isinstance(ignore_index, jax.Array) and ignore_index.ndim == 0:  # a concrete 0-d array
        if jnp.issubdtype(ignore_index.dtype, jnp.integer):
            ignore_index = int(ignore_index)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int or None; got {ignore_index!r}.")
    value = int(ignore_index)
    if dtype is not None:
        info = jnp.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise ValueError(
                f"ignore_index={ignore_index} can never equal a label of dtype {np.dtype(dtype)}"
                f" (values {info.min}..{info.max}): pass labels of a dtype that can hold it"
                " (e.g. int32) or an ignore_index in that range."
            )
    return value


def check_integer_labels(
    labels: object, batch_shape: tuple[int, ...], why: str, ignore_index: object
) -> tuple[jax.Array, int | None]:
    """Trace-time checks of integer ``labels`` of shape ``batch_shape`` and ``ignore_index``."""
    labels = _checks.as_int_array("labels", labels)
    _checks.check_shape("labels", labels, batch_shape, why)
    return labels, check_ignore_index(ignore_index, labels.dtype)


def classify(labels: jax.Array, num_classes: int, ignore_index: int | None) -> Labels:
    """The run-time meaning of each label (see the module docstring).

    Bounds are compared in the labels' own dtype, using only values that fit it, and the
    index is converted to int32 after clamping, so no label wraps around into another class.
    """
    info = jnp.iinfo(labels.dtype)
    ignored = (
        jnp.zeros(labels.shape, bool)
        if ignore_index is None
        else labels == jnp.asarray(ignore_index, labels.dtype)
    )
    in_range = jnp.ones(labels.shape, bool)
    if info.min < 0:
        in_range = labels >= jnp.zeros((), labels.dtype)
    if num_classes - 1 < info.max:  # otherwise every value of this dtype is below num_classes
        in_range = in_range & (labels <= jnp.asarray(num_classes - 1, labels.dtype))
    # In range, a label fits int32 (num_classes does); out of range it is replaced by 0.
    zero = jnp.zeros((), labels.dtype)
    index = jnp.where(in_range, labels, zero).astype(INDEX_DTYPE)
    return Labels(index, ignored, ~in_range & ~ignored)


def prepare(
    name: str,
    logits: object,
    labels: object,
    *,
    axis: object,
    ignore_index: object,
    reduction: object,
    class_weights: object = None,
) -> tuple[ClassLayout, jax.Array, jax.Array, int | None, jax.Array | None]:
    """The shared argument preparation of the integer-label losses on ``[..., C, ...]`` arrays:
    ``(layout, x [..., C], labels, ignore_index, class_weights)``, all validated."""
    x = _checks.as_float_array(name, logits)
    _checks.check_reduction(reduction)
    layout = layout_of(name, x, axis)
    _checks.check_num_classes(name, layout.num_classes, f"class axis {axis!r}")
    labels, ignore_index = check_integer_labels(
        labels, layout.batch_shape, f"{name} shape {x.shape} without axis {axis!r}", ignore_index
    )
    weights = _checks.class_vector("class_weights", class_weights, layout.num_classes)
    return layout, layout.to_last(x), labels, ignore_index, weights


def check_labels(
    labels: jax.typing.ArrayLike, num_classes: int, *, ignore_index: int | None = None
) -> None:
    """Checks that every integer label lies in ``[0, num_classes)`` or equals ``ignore_index``.

    The losses cannot raise on a bad label inside ``jax.jit`` (values are unknown at trace
    time), so they return NaN for it instead. This is the matching check, built on
    ``jax.experimental.checkify``: called eagerly it raises at once; inside a jitted function,
    wrap that function with ``checkify.checkify`` and call ``err.throw()`` on the result.

    Args:
      labels: integer class indices of any shape and integer dtype.
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
    labels = _checks.as_int_array("labels", labels)
    ignore_index = check_ignore_index(ignore_index, labels.dtype)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes must be a positive int; got {num_classes!r}.")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
    if labels.size == 0:
        return
    labels = _mesh.gathered(labels)  # read at the first bad label's index
    meaning = classify(labels, int(num_classes), ignore_index)
    bad = jnp.ravel(meaning.invalid)
    first = jnp.argmax(bad)  # the first True, when there is one
    allowed = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
    checkify.check(
        ~jnp.any(bad),
        f"labels must lie in [0, {num_classes}){allowed}; found {{count}} outside,"
        " the first is {value} (at flat index {index})",
        count=jnp.sum(bad),
        value=jnp.ravel(labels)[first],
        index=first,
    )
