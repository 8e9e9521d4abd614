"""entropy, softmax_entropy and kl_divergence; the identity H(p, q) = H(p) + KL(p || q)."""

import _reference as R
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
import scipy.special
import scipy.stats

import jaxce


@pytest.mark.parametrize("shape,axis", [((5,), -1), ((4, 6), -1), ((4, 6), 0), ((2, 5, 3), 1)])
def test_entropy_matches_scipy(rng, shape, axis):
    p = R.random_probs(rng, shape, axis=axis)
    got = jaxce.entropy(jnp.asarray(p), axis=axis)
    R.assert_close(got, scipy.stats.entropy(p, axis=axis), rtol=1e-12)
    R.assert_close(got, R.entropy(p, axis=axis), rtol=1e-12)


def test_entropy_zero_probabilities():
    # 0 log 0 = 0, in the value and without NaN in the gradient
    p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    got = jaxce.entropy(jnp.asarray(p))
    R.assert_close(got, [np.log(2.0), 0.0], rtol=1e-14, atol=1e-300)
    g = np.asarray(R.jgrad(lambda a: jnp.sum(jaxce.entropy(a)))(jnp.asarray(p)))
    assert not np.any(np.isnan(g))
    R.assert_close(g[0, :2], -(np.log(0.5) + 1.0), rtol=1e-12)


@pytest.mark.parametrize("shape,axis", [((5,), -1), ((4, 6), -1), ((4, 6), 0), ((2, 5, 3), 1)])
def test_softmax_entropy(rng, shape, axis):
    x = R.random_logits(rng, shape)
    got = jaxce.softmax_entropy(jnp.asarray(x), axis=axis)
    p = np.exp(x - scipy.special.logsumexp(x, axis=axis, keepdims=True))
    R.assert_close(got, scipy.stats.entropy(p, axis=axis), rtol=1e-11)
    g = R.jgrad(lambda a: jnp.sum(jaxce.softmax_entropy(a, axis=axis)))(jnp.asarray(x))
    g_ref = R.ref_grad(lambda a, xp: xp.sum(R.softmax_entropy(a, axis=axis, xp=xp)))(x)
    R.assert_close(g, g_ref, rtol=1e-10, atol=1e-13)


def test_softmax_entropy_neg_inf_logits(rng):
    x = R.random_logits(rng, (3, 6))
    x[:, 4:] = -np.inf
    got = jaxce.softmax_entropy(jnp.asarray(x))
    R.assert_close(got, scipy.stats.entropy(R.softmax(x[:, :4]), axis=-1), rtol=1e-12)
    g = np.asarray(R.jgrad(lambda a: jnp.sum(jaxce.softmax_entropy(a)))(jnp.asarray(x)))
    assert not np.any(np.isnan(g))
    np.testing.assert_array_equal(g[:, 4:], 0.0)
    g_ref = R.ref_grad(lambda a, xp: xp.sum(R.softmax_entropy(a, xp=xp)))(x[:, :4])
    R.assert_close(g[:, :4], g_ref, rtol=1e-10, atol=1e-13)


def test_softmax_entropy_huge_logits():
    x = jnp.asarray(np.array([[3e38, 3e38, -3e38], [1e4, -1e4, 0.0]]), dtype=jnp.float32)
    got = np.asarray(jaxce.softmax_entropy(x))
    R.assert_close(got, [np.log(2.0), 0.0], rtol=1e-6, atol=1e-6)
    g = np.asarray(R.jgrad(lambda a: jnp.sum(jaxce.softmax_entropy(a)))(x))
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("axis", [-1, 0])
def test_kl_divergence(rng, axis):
    p = R.random_probs(rng, (4, 5), axis=axis)
    q = R.random_probs(rng, (4, 5), axis=axis)
    got = jaxce.kl_divergence(jnp.asarray(np.log(q)), jnp.asarray(p), axis=axis)
    R.assert_close(got, np.sum(scipy.special.rel_entr(p, q), axis=axis), rtol=1e-12)
    R.assert_close(got, R.kl_divergence(np.log(q), p, axis=axis), rtol=1e-12)


def test_kl_divergence_zero_targets_and_where(rng):
    p = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    lq = np.log(np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]))
    got = jaxce.kl_divergence(jnp.asarray(lq), jnp.asarray(p))
    R.assert_close(got, np.sum(scipy.special.rel_entr(p, np.exp(lq)), axis=-1), rtol=1e-12)
    gl, gt = R.jgrad(lambda a, b: jnp.sum(jaxce.kl_divergence(a, b)), argnums=(0, 1))(
        jnp.asarray(lq), jnp.asarray(p)
    )
    R.assert_close(gl, -p, rtol=1e-14)
    assert not np.any(np.isnan(np.asarray(gt)))
    m = np.array([[True, False, True], [True, True, True]])
    got = jaxce.kl_divergence(jnp.asarray(lq), jnp.asarray(p), where=jnp.asarray(m))
    R.assert_close(got, R.kl_divergence(lq, p, where=m), rtol=1e-12)


def test_cross_entropy_is_entropy_plus_kl(rng):
    # H(p, q) = H(p) + KL(p || q)
    p = R.random_probs(rng, (6, 5))
    x = R.random_logits(rng, (6, 5))
    h_pq = jaxce.softmax_cross_entropy(jnp.asarray(x), jnp.asarray(p))
    h_p = jaxce.entropy(jnp.asarray(p))
    kl = jaxce.kl_divergence(jaxce.log_softmax(jnp.asarray(x)), jnp.asarray(p))
    R.assert_close(h_pq, np.asarray(h_p) + np.asarray(kl), rtol=1e-12)
    R.assert_close(h_pq, R.entropy(p) + R.kl_divergence(R.log_softmax(x), p), rtol=1e-12)
    # with a fixed label distribution, CE and KL have the same gradient in the logits
    g_ce = R.jgrad(lambda a: jnp.sum(jaxce.softmax_cross_entropy(a, jnp.asarray(p))))(
        jnp.asarray(x)
    )
    g_kl = R.jgrad(lambda a: jnp.sum(jaxce.kl_divergence(jaxce.log_softmax(a), jnp.asarray(p))))(
        jnp.asarray(x)
    )
    R.assert_close(g_ce, g_kl, rtol=1e-10, atol=1e-14)
    R.assert_close(g_ce, R.softmax(x) - p, rtol=1e-10, atol=1e-14)


def test_information_check_grads(rng):
    u = rng.uniform(0.5, 1.0, size=(3, 4))
    p = jnp.asarray(u / u.sum(-1, keepdims=True))  # away from 0 for finite differences
    x = jnp.asarray(R.random_logits(rng, (3, 4), scale=1.0))
    R.check_grads(jaxce.entropy, (p,), order=2, modes=("rev",), eps=1e-4)
    R.check_grads(jaxce.softmax_entropy, (x,), order=2, modes=("rev",))
    R.check_grads(jaxce.kl_divergence, (jaxce.log_softmax(x), p), order=2, modes=("rev",), eps=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_information_dtypes(rng, dtype):
    p = jnp.asarray(R.random_probs(rng, (4, 7)), dtype=dtype)
    x = jnp.asarray(R.random_logits(rng, (4, 7)), dtype=dtype)
    lq = jnp.asarray(R.log_softmax(R.random_logits(rng, (4, 7))), dtype=dtype)
    p64 = np.asarray(p.astype(jnp.float64))
    x64 = np.asarray(x.astype(jnp.float64))
    lq64 = np.asarray(lq.astype(jnp.float64))
    for out, expected in [
        (jaxce.entropy(p), R.entropy(p64)),
        (jaxce.softmax_entropy(x), R.softmax_entropy(x64)),
        (jaxce.kl_divergence(lq, p), R.kl_divergence(lq64, p64)),
    ]:
        assert out.dtype == jnp.float32
        R.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    g = R.jgrad(lambda a: jnp.sum(jaxce.softmax_entropy(a)))(x)
    assert g.dtype == dtype


def test_information_jit_vmap(rng):
    p = jnp.asarray(R.random_probs(rng, (3, 4, 5)))
    x = jnp.asarray(R.random_logits(rng, (3, 4, 5)))
    for fn, args in [
        (jaxce.entropy, (p,)),
        (jaxce.softmax_entropy, (x,)),
        (jaxce.kl_divergence, (jaxce.log_softmax(x), p)),
    ]:
        eager = fn(*args)
        R.assert_close(jax.jit(fn)(*args), eager, rtol=1e-13)
        R.assert_close(jax.vmap(fn)(*args), eager, rtol=1e-13)
    R.assert_close(jaxce.entropy(p), R.entropy(np.asarray(p)), rtol=1e-12)
