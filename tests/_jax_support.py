"""What the installed JAX can do, probed where one of its bugs would fail a test for a reason
of its own (the README's supported versions name them)."""

import functools

import jax
import jax.numpy as jnp


def one_device_mesh() -> jax.sharding.Mesh:
    """A mesh of this process's first device, whose class axis is "model" (automatic axes)."""
    return jax.make_mesh(
        (1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1]
    )


@functools.cache
def hessian_over_devices_works() -> bool:
    """Whether this JAX can take ``jax.hessian`` (a ``vmap`` of forward mode) of a ``psum``
    inside ``jax.shard_map``: jax 0.8.2 raises a TypeError inside its ``psum``
    (``axis_index_groups``) for any such function, not for the sharded losses only."""
    mesh = one_device_mesh()
    spec = jax.sharding.PartitionSpec("model")
    total = jax.shard_map(
        lambda v: jax.lax.psum(jnp.sum(jnp.exp(v)), "model"),
        mesh=mesh,
        in_specs=spec,
        out_specs=jax.sharding.PartitionSpec(),
    )
    try:
        jax.hessian(total)(jnp.zeros(2))
    except TypeError as error:
        if "axis_index_groups" in str(error):
            return False
        raise
    return True


@jax.custom_jvp
def _sum_exp(x):
    return jnp.sum(jnp.exp(x))


@_sum_exp.defjvp
def _sum_exp_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents

    def step(carry, i):
        return carry, jnp.sum(jnp.exp(x[i]) * x_dot[i])

    _, terms = jax.lax.scan(step, None, jnp.arange(x.shape[0]))
    return _sum_exp(x), jnp.sum(terms)


@functools.cache
def reverse_over_reverse_through_scan_works() -> bool:
    """Whether this JAX can take reverse mode over reverse mode (``jax.jacrev`` of
    ``jax.grad``) of a ``custom_jvp`` function whose rule's tangent is a ``scan``: jax 0.8.2
    raises a TypeError inside its transposition (``ValAccum``); 0.10.2 and newer take it."""
    try:
        jax.jacrev(jax.grad(_sum_exp))(jnp.ones((3, 2)))
    except TypeError as error:
        if "ValAccum" in str(error):
            return False
        raise
    return True
