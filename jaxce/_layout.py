"""Moving the class axes of an array to the end and back.

Every kernel in jaxce works on a ``[..., C]`` layout; public functions accept any class axis (an
int, PyTorch's ``[N, C, d1, ...]`` layout with ``axis=1``, or a tuple of axes that are flattened
into one as optax does) and translate with these helpers. For ``axis=-1`` they are no-ops.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxce import _checks


class ClassLayout:
    """The permutation that moves ``axes`` of a rank-``ndim`` array to the end as one axis."""

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...]):
        self.shape = tuple(shape)
        self.axes = axes
        self.batch_axes = tuple(a for a in range(len(shape)) if a not in axes)
        self.perm = self.batch_axes + axes
        self.batch_shape = tuple(shape[a] for a in self.batch_axes)
        self.num_classes = 1
        for a in axes:
            self.num_classes *= shape[a]

    @property
    def is_identity(self) -> bool:
        return self.perm == tuple(range(len(self.shape)))

    def to_last(self, x: jax.Array) -> jax.Array:
        """``x`` (of the full shape) as ``[*batch_shape, C]``."""
        if not self.is_identity:
            x = jnp.transpose(x, self.perm)
        return jnp.reshape(x, self.batch_shape + (self.num_classes,))

    def from_last(self, x: jax.Array) -> jax.Array:
        """The inverse of :meth:`to_last`."""
        x = jnp.reshape(x, tuple(self.shape[a] for a in self.perm))
        if not self.is_identity:
            inverse = [0] * len(self.perm)
            for i, p in enumerate(self.perm):
                inverse[p] = i
            x = jnp.transpose(x, inverse)
        return x

    def mask_to_last(self, name: str, where: object, per_example: bool = True) -> jax.Array | None:
        """A boolean mask broadcastable to the full shape, as ``[..., C]``.

        With ``per_example`` (the cross-entropies, as optax's), a mask with as many axes as the
        batch (the full rank minus the class axes) is one flag per example
        (:func:`per_example_mask`). Without it (``log_softmax`` and the other functions that
        mirror ``jax.nn``'s or optax's ``where``), the mask broadcasts as it is, NumPy's way.
        """
        if where is None:
            return None
        where = _checks.as_bool_array(name, where)
        flags = per_example_mask(name, where, self.batch_shape, self.shape) if per_example else None
        if flags is not None:
            where = jnp.expand_dims(flags, self.axes)
        else:
            _checks.check_broadcastable(name, where, self.shape)
        return self.to_last(jnp.broadcast_to(where, self.shape))


def per_example_mask(
    name: str, where: jax.Array, batch: tuple[int, ...], shape: tuple[int, ...]
) -> jax.Array | None:
    """A cross-entropy's boolean ``where`` for an array of ``shape`` whose batch (the shape
    without the class axes) is ``batch``, as one flag per example broadcast to ``batch``, or
    None where it is a mask of classes (or entries), to broadcast against the whole array.

    A mask with the batch's rank is one flag per example (optax's convention), and must
    broadcast to ``batch``. Where it is not of the batch's shape but broadcasts both ways (a
    ``[1, C]`` mask of ``[N, T, C]`` logits with ``T = C``: per position, or per class), which
    one is meant cannot be told: that is an error naming both shapes that say it plainly."""
    if where.ndim != len(batch) or len(batch) == len(shape):
        return None
    if not _broadcasts(where.shape, batch):
        raise ValueError(
            f"{name} of shape {where.shape} has the rank of the batch of an array of shape"
            f" {shape}, so it is read as one flag per example (optax's convention) and must"
            f" broadcast to {batch}; to mask classes, give it the array's rank (size-1 batch"
            " axes)."
        )
    if where.shape != batch and _broadcasts(where.shape, shape):
        classes = (1,) * (len(shape) - where.ndim) + where.shape
        raise ValueError(
            f"{name} of shape {where.shape} is ambiguous for an array of shape {shape}: with the"
            f" batch's rank it reads as one flag per example (optax's convention, broadcast to"
            f" {batch}), but it also broadcasts against the array as a mask of classes. Give it"
            f" the batch's shape {batch} for one flag per example, or the array's rank, e.g."
            f" {classes}, for a mask of classes."
        )
    return jnp.broadcast_to(where, batch)


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        chex.assert_is_broadcastable(shape, target)
    except AssertionError:
        return False
    return True


def layout_of(name: str, x: jax.Array, axis: object) -> ClassLayout:
    """The layout of ``x``'s class axes ``axis``, validated; ``name`` is ``x``'s argument name."""
    _checks.check_min_rank(name, x, 1, "[..., C, ...] with a class axis")
    return ClassLayout(x.shape, _checks.canonical_axes("axis", axis, x.ndim))


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype arithmetic happens in: float64 for float64 input, else float32.

    Spelled out rather than ``jnp.promote_types(dtype, float32)`` so that it also holds under
    ``jax_numpy_dtype_promotion="strict"``, which forbids that promotion.
    """
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)
