"""sigmoid and log_sigmoid against float64 references."""

import _reference as R
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
import scipy.special

import jaxce


@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 4)])
def test_sigmoid_values(rng, shape):
    x = R.random_logits(rng, shape, scale=8.0)
    got = jaxce.sigmoid(jnp.asarray(x))
    assert got.shape == np.shape(x) and got.dtype == jnp.float64
    R.assert_close(got, scipy.special.expit(x), rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 4)])
def test_log_sigmoid_values(rng, shape):
    x = R.random_logits(rng, shape, scale=8.0)
    got = jaxce.log_sigmoid(jnp.asarray(x))
    R.assert_close(got, scipy.special.log_expit(x), rtol=1e-13, atol=1e-300)


def test_extremes_no_nan():
    x = np.array([-np.inf, -3e38, -1e4, -100.0, 0.0, 100.0, 1e4, 3e38, np.inf])
    for dt in (jnp.float32, jnp.float64):
        xj = jnp.asarray(x, dtype=dt)
        s = np.asarray(jaxce.sigmoid(xj), np.float64)
        ls = np.asarray(jaxce.log_sigmoid(xj), np.float64)
        x_r = np.asarray(xj, np.float64)
        assert not np.any(np.isnan(s)) and not np.any(np.isnan(ls))
        R.assert_close(s, scipy.special.expit(x_r), rtol=1e-6, atol=1e-37)
        R.assert_close(ls, scipy.special.log_expit(x_r), rtol=1e-6, atol=1e-37)  # FTZ
        # log(1 - sigmoid(x)) = log_sigmoid(-x) stays exact at large x
        assert np.isclose(float(jaxce.log_sigmoid(-xj)[6]), -1e4, rtol=1e-6)
    g = R.jgrad(lambda v: jnp.sum(jaxce.log_sigmoid(v)))(jnp.asarray(x[1:-1]))
    assert np.all(np.isfinite(np.asarray(g)))
    R.assert_close(g, scipy.special.expit(-x[1:-1]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["sigmoid", "log_sigmoid"])
def test_check_grads(rng, name):
    x = jnp.asarray(R.random_logits(rng, (3, 4), scale=2.0))
    R.check_grads(getattr(jaxce, name), (x,), order=2, modes=("rev",))


@pytest.mark.parametrize("name", ["sigmoid", "log_sigmoid"])
def test_gradient_matches_reference(rng, name):
    x = R.random_logits(rng, (5, 3), scale=5.0)
    cot = rng.normal(size=x.shape)
    got = R.jgrad(lambda v: jnp.sum(getattr(jaxce, name)(v) * jnp.asarray(cot)))(jnp.asarray(x))
    expected = R.ref_grad(lambda v, xp: xp.sum(getattr(R, name)(v, xp=xp) * cot))(x)
    R.assert_close(got, expected, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("name", ["sigmoid", "log_sigmoid"])
def test_jit_vmap(rng, name):
    fn = getattr(jaxce, name)
    x = jnp.asarray(R.random_logits(rng, (4, 5)))
    R.assert_close(jax.jit(fn)(x), fn(x), rtol=1e-14)
    R.assert_close(jax.vmap(fn)(x), fn(x), rtol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("name", ["sigmoid", "log_sigmoid"])
def test_dtype_preserved_and_accuracy(rng, dtype, name):
    x = jnp.asarray(R.random_logits(rng, (50,), scale=6.0), dtype=dtype)
    x64 = np.asarray(x.astype(jnp.float64))
    got = getattr(jaxce, name)(x)
    assert got.dtype == dtype
    expected = scipy.special.expit(x64) if name == "sigmoid" else scipy.special.log_expit(x64)
    eps = float(jnp.finfo(dtype).eps) * (2 if dtype != jnp.float32 else 8)
    R.assert_close(got, expected, rtol=eps, atol=eps * 1e-3)
    g = R.jgrad(lambda v: jnp.sum(getattr(jaxce, name)(v).astype(jnp.float32)))(x)
    assert g.dtype == dtype


def test_sigmoid_is_two_class_softmax(rng):
    # the article: sigmoid(x) == softmax([0, x])[1]
    x = R.random_logits(rng, (9,))
    two = jnp.stack([jnp.zeros(9, jnp.float64), jnp.asarray(x)], axis=-1)
    R.assert_close(jaxce.sigmoid(jnp.asarray(x)), jaxce.softmax(two)[:, 1], rtol=1e-13)
    R.assert_close(jaxce.sigmoid(jnp.asarray(x)), scipy.special.expit(x), rtol=1e-13)
