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
        batch (the full rank minus the class axes) is one flag per example: the class axes are
        inserted back before broadcasting, even where its shape would also broadcast against
        the classes. Without it (``log_softmax`` and the other functions that mirror
        ``jax.nn``'s or optax's ``where``), the mask broadcasts as it is, NumPy's way.
        """
        if where is None:
            return None
        where = _checks.as_bool_array(name, where)
        given = where
        batch = tuple(self.shape[a] for a in self.batch_axes)
        one_per_example = per_example and where.ndim == len(batch) != len(self.shape)
        if one_per_example:
            where = jnp.expand_dims(where, self.axes)
        try:
            chex.assert_is_broadcastable(where.shape, self.shape)
        except AssertionError as err:
            if one_per_example:
                message = (
                    f"{name} of shape {given.shape} has the rank of the batch of an array of"
                    f" shape {self.shape}, so it is read as one flag per example (optax's"
                    f" convention) and must broadcast to {batch}; to mask classes, give it the"
                    " array's rank (size-1 batch axes)."
                )
            else:
                message = f"{name} of shape {given.shape} must broadcast to {self.shape}."
            raise ValueError(message) from err
        where = jnp.broadcast_to(where, self.shape)
        return self.to_last(where)


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
