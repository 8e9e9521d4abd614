"""Values and gradients against optax (where optax is finite), float64."""

import itertools

import _reference as R
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce

optax = pytest.importorskip("optax")
OL = optax.losses


def _optax(fn, *args, **kwargs):
    # optax broadcasts implicitly; run it under permissive promotion (it is not under test)
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        return R.jitted(fn)(*args, **kwargs)


def _grads(fn, args, argnums):
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        return R.jgrad(lambda *a: jnp.sum(fn(*a)), argnums=argnums)(*args)


LAYOUTS = [
    ((6, 5), -1),
    ((4, 5, 3), 1),
    ((3, 4, 5), (1, 2)),
    ((2, 3, 4, 5), (3, 1)),
    ((2, 3, 4), 0),
]


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("use_where", [None, "full", "batch"])
def test_softmax_cross_entropy_with_integer_labels(rng, shape, axis, use_where):
    x = jnp.asarray(R.random_logits(rng, shape))
    axes = (axis,) if isinstance(axis, int) else axis
    nclass = int(np.prod([shape[a] for a in axes]))
    bshape = R._class_shape_removed(shape, axis)
    y = jnp.asarray(rng.integers(0, nclass, size=bshape).astype(np.int32))
    kw = {"axis": axis}
    if use_where == "full":
        m = rng.random(shape) < 0.7
        kw["where"] = jnp.asarray(m)
    elif use_where == "batch":
        m = rng.random(bshape) < 0.6
        kw["where"] = jnp.asarray(m)
    expected = _optax(OL.softmax_cross_entropy_with_integer_labels, x, y, **kw)
    got = R.jitted(jaxce.softmax_cross_entropy_with_integer_labels)(x, y, **kw)
    finite = np.isfinite(np.asarray(expected))
    assert finite.any()
    R.assert_close(np.asarray(got)[finite], np.asarray(expected)[finite], rtol=1e-12, atol=1e-13)
    ge = _grads(lambda a: OL.softmax_cross_entropy_with_integer_labels(a, y, **kw), (x,), 0)
    gg = R.jgrad(lambda a: jnp.sum(jaxce.softmax_cross_entropy_with_integer_labels(a, y, **kw)))(x)
    if finite.all() and np.all(np.isfinite(np.asarray(ge))):
        R.assert_close(gg, ge, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("shape,axis", LAYOUTS[:4])
@pytest.mark.parametrize("use_where", [None, "full", "batch"])
def test_softmax_cross_entropy(rng, shape, axis, use_where):
    x = jnp.asarray(R.random_logits(rng, shape))
    p = jnp.asarray(R.random_probs(rng, shape, axis=axis))
    kw = {"axis": axis}
    if use_where == "full":
        kw["where"] = jnp.asarray(rng.random(shape) < 0.7)
    elif use_where == "batch":
        kw["where"] = jnp.asarray(rng.random(R._class_shape_removed(shape, axis)) < 0.6)
    expected = _optax(OL.softmax_cross_entropy, x, p, **kw)
    got = R.jitted(jaxce.softmax_cross_entropy)(x, p, **kw)
    R.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    ex, ep = _grads(lambda a, b: OL.softmax_cross_entropy(a, b, **kw), (x, p), (0, 1))
    gx, gp = R.jgrad(lambda a, b: jnp.sum(jaxce.softmax_cross_entropy(a, b, **kw)), argnums=(0, 1))(
        x, p
    )
    R.assert_close(gx, ex, rtol=1e-11, atol=1e-13)
    # optax gives d/dy = -log p (possibly -inf*0 artefacts at excluded entries): compare finite
    ep = np.asarray(ep)
    mask = np.isfinite(ep)
    if use_where == "full":
        mask &= np.asarray(kw["where"])
    R.assert_close(np.asarray(gp)[mask], ep[mask], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("shape", [(7,), (4, 3), (2, 3, 4)])
def test_sigmoid_binary_cross_entropy(rng, shape):
    x = jnp.asarray(R.random_logits(rng, shape, scale=5.0))
    y = jnp.asarray(rng.random(shape))
    R.assert_close(
        jaxce.sigmoid_binary_cross_entropy(x, y),
        _optax(OL.sigmoid_binary_cross_entropy, x, y),
        rtol=1e-12,
        atol=1e-14,
    )
    gx, gy = R.jgrad(
        lambda a, b: jnp.sum(jaxce.sigmoid_binary_cross_entropy(a, b)), argnums=(0, 1)
    )(x, y)
    ex, ey = _grads(OL.sigmoid_binary_cross_entropy, (x, y), (0, 1))
    R.assert_close(gx, ex, rtol=1e-11, atol=1e-14)
    R.assert_close(gy, ey, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize(
    "alpha,gamma", list(itertools.product([None, 0.25, 0.9], [0.0, 0.5, 1.0, 2.0, 4.0]))
)
def test_sigmoid_focal_loss(rng, alpha, gamma):
    x = jnp.asarray(R.random_logits(rng, (5, 4), scale=4.0))
    y = jnp.asarray((rng.random((5, 4)) < 0.4).astype(np.float64))
    expected = _optax(OL.sigmoid_focal_loss, x, y, alpha=alpha, gamma=gamma)
    R.assert_close(
        jaxce.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma), expected, rtol=1e-11, atol=1e-14
    )
    for reduction, red in [("sum", np.sum), ("mean", np.mean)]:
        R.assert_close(
            jaxce.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction=reduction),
            red(np.asarray(expected)),
            rtol=1e-11,
        )
    g = R.jgrad(lambda a: jnp.sum(jaxce.sigmoid_focal_loss(a, y, alpha=alpha, gamma=gamma)))(x)
    e = _grads(lambda a: OL.sigmoid_focal_loss(a, y, alpha=alpha, gamma=gamma), (x,), 0)
    R.assert_close(g, e, rtol=1e-9, atol=1e-13)


def test_sigmoid_focal_loss_soft_labels(rng):
    x = jnp.asarray(R.random_logits(rng, (6,), scale=3.0))
    y = jnp.asarray(rng.random(6))
    R.assert_close(
        jaxce.sigmoid_focal_loss(x, y, alpha=0.3, gamma=1.5),
        _optax(OL.sigmoid_focal_loss, x, y, alpha=0.3, gamma=1.5),
        rtol=1e-11,
    )


@pytest.mark.parametrize("axis", [-1, 0, (0, 1)])
@pytest.mark.parametrize("use_where", [False, True])
def test_kl_divergence(rng, axis, use_where):
    lq = jnp.asarray(R.log_softmax(R.random_logits(rng, (4, 5))))
    p = R.random_probs(rng, (4, 5))
    p[0, 1] = 0.0
    p = jnp.asarray(p)
    kw = {"axis": axis}
    if use_where:
        kw["where"] = jnp.asarray(rng.random((4, 5)) < 0.7)
    R.assert_close(
        jaxce.kl_divergence(lq, p, **kw),
        _optax(OL.kl_divergence, lq, p, **kw),
        rtol=1e-12,
        atol=1e-14,
    )
    g = R.jgrad(lambda a, b: jnp.sum(jaxce.kl_divergence(a, b, **kw)), argnums=(0, 1))(lq, p)
    e = _grads(lambda a, b: OL.kl_divergence(a, b, **kw), (lq, p), (0, 1))
    R.assert_close(g[0], e[0], rtol=1e-12, atol=1e-14)
    e1, g1 = np.asarray(e[1]), np.asarray(g[1])
    fin = np.isfinite(e1)
    R.assert_close(g1[fin], e1[fin], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["log_softmax", "softmax", "logsumexp"])
def test_primitives_match_jax_nn(rng, name):
    x = jnp.asarray(R.random_logits(rng, (3, 4, 5)))
    m = rng.random((3, 4, 5)) < 0.7
    m[..., 0] = True  # no fully masked row along any tested axis (jax.nn gives NaN there)
    m[:, 0, :] = True
    m = jnp.asarray(m)
    ref = getattr(jax.nn, name)
    for axis in (-1, 1, (0, 2)):
        R.assert_close(getattr(jaxce, name)(x, axis=axis), ref(x, axis=axis), rtol=1e-12)
        got = getattr(jaxce, name)(x, axis=axis, where=m)
        exp = ref(x, axis=axis, where=m)
        exp = np.asarray(exp)
        if name == "softmax":
            exp = np.where(np.asarray(m), exp, 0.0)
        R.assert_close(np.asarray(got), exp, rtol=1e-12, atol=1e-15)
