"""Losses over a vocabulary split across devices: ``jaxce.sharded``.

Each function takes ``axis_name`` (the mesh axis the vocabulary is split over) and works either
inside ``jax.shard_map`` on this device's columns, or, given ``mesh=``, under ``jax.jit`` on
global arrays. Devices exchange O(N) numbers per step, never the logits or the projection.
"""

from jaxce._sharding import linear_softmax_cross_entropy as linear_softmax_cross_entropy
from jaxce._sharding import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)

__all__ = [
    "linear_softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]
