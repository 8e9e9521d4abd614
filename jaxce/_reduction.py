"""The one place that knows what ``"mean"`` and ``"sum"`` mean, and what a weight of 0 means."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxce import _autodiff


def reduce_loss(
    losses: jax.Array, reduction: str, normalizer: jax.Array | None = None
) -> jax.Array:
    """Reduces per-example ``losses``.

    ``"mean"`` divides the sum by ``sum(normalizer)`` when a normalizer is given (PyTorch's
    weighted mean: the class weight of each counted example, 0 for ignored ones), else by the
    number of elements. A mean over nothing (a zero denominator) is 0 with zero gradient, where
    PyTorch returns NaN: an all-padding batch should not poison a training run. A NaN sum stays
    NaN, whatever the denominator: an example that counts for nothing in it (a class weight of
    0, no admissible class) but holds a NaN or a label out of range makes the mean NaN, as it
    makes the sum.
    """
    if reduction == "none":
        return losses
    total = jnp.sum(losses)
    if reduction == "sum":
        return total
    if normalizer is None:
        denominator = jnp.asarray(losses.size, losses.dtype)
    else:
        denominator = jnp.sum(normalizer.astype(losses.dtype))
    nonzero = denominator != 0
    nothing = jnp.where(jnp.isnan(total), total, jnp.zeros_like(total))
    return jnp.where(nonzero, total / jnp.where(nonzero, denominator, 1), nothing)


def reduce_total(out: jax.Array, reduction: str, size: int) -> jax.Array:
    """The reduction of an elementwise loss computed as ``out``: the elementwise values for
    ``"none"``, else their sum (see ``_autodiff.elementwise``), divided by the number of
    elements ``size`` for ``"mean"`` (0 for no element)."""
    if reduction != "mean":
        return out
    return out / size if size else jnp.zeros_like(out)


weighted = _autodiff.product_rule(lambda weight, term: (weight == 0) & ~jnp.isnan(term))
"""``weighted(weight, term)``: ``weight * term`` with ``0 * inf = 0``: a term that counts for
nothing (a weight, a label or a smoothing of exactly 0) adds 0, also where it is infinite (log 0
of a label probability that underflowed, an nll that overflowed). A NaN term (a NaN input) stays
NaN. Its derivative is the product rule's, at a weight of 0 too (``_autodiff.product_rule``)."""
