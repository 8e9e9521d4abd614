"""A float16 case of the fused linear loss whose summed ``dw`` is beyond float16's range where
the mean's is not, shared by the one-device tests and the multi-device checks."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxce


class Float16Overflow(NamedTuple):
    """1024 tokens of activations near 200, each adding about -190 to the label's column of
    ``dw``: the sum's gradient (about -195000) is beyond float16's 65504, the mean's is not."""

    x: jax.Array  # [1024, 4] float16
    w: jax.Array  # [4, 16] float16
    labels: jax.Array  # [1024] int32, all 0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Float16Overflow":
        n, d, v = 1024, 4, 16
        x = jnp.asarray(200 + rng.normal(size=(n, d)), jnp.float16)
        w = jnp.asarray(rng.normal(size=(d, v)) * 1e-3, jnp.float16)
        return cls(x, w, jnp.zeros((n,), jnp.int32))

    def unfused_mean(self, x, w):
        """The unfused mean loss over float32 logits, the reference for the fused one."""
        logits = jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
        return jaxce.softmax_cross_entropy_with_integer_labels(
            logits, self.labels, reduction="mean"
        )
