"""log_softmax, softmax, logsumexp and logit_soft_cap against float64 references."""

import decimal
import itertools

import _reference as R
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
import scipy.special

import jaxce

F64 = np.float64

# (shape, axis): odd sizes, class axis not last, tuple axes
SHAPES_AXES = [
    ((7,), -1),
    ((3, 5), -1),
    ((3, 5), 0),
    ((2, 5, 3), 1),
    ((2, 5, 3), -1),
    ((2, 5, 3), (0, 2)),
    ((2, 3, 4, 5), (1, 3)),
]


def _scipy_log_softmax(x, axis):
    # Shift by the max first: x - logsumexp(x) loses log(2) to rounding at 3e38 even in float64.
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - scipy.special.logsumexp(shifted, axis=axis, keepdims=True)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_log_softmax_matches_scipy(rng, shape, axis):
    x = R.random_logits(rng, shape)
    got = R.jitted(jaxce.log_softmax)(jnp.asarray(x), axis=axis)
    assert got.dtype == jnp.float64
    assert got.shape == x.shape
    R.assert_close(got, _scipy_log_softmax(x, axis), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_softmax_matches_scipy(rng, shape, axis):
    x = R.random_logits(rng, shape)
    got = R.jitted(jaxce.softmax)(jnp.asarray(x), axis=axis)
    R.assert_close(got, np.exp(_scipy_log_softmax(x, axis)), rtol=1e-12, atol=1e-14)
    R.assert_close(np.sum(np.asarray(got), axis=axis), 1.0, rtol=1e-12)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_logsumexp_matches_scipy(rng, shape, axis):
    x = R.random_logits(rng, shape)
    got = R.jitted(jaxce.logsumexp)(jnp.asarray(x), axis=axis)
    expected = scipy.special.logsumexp(x, axis=axis)
    assert got.shape == np.shape(expected)
    R.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_default_axis_is_last(rng):
    x = R.random_logits(rng, (4, 6))
    R.assert_close(jaxce.log_softmax(jnp.asarray(x)), _scipy_log_softmax(x, -1))
    R.assert_close(jaxce.logsumexp(jnp.asarray(x)), scipy.special.logsumexp(x, axis=-1))


# ------------------------------------------------------------------------------- where / -inf


def _mask(rng, shape):
    m = rng.random(shape) < 0.6
    m[0, :] = False  # a fully masked row
    m[1, :] = True
    return m


@pytest.mark.parametrize("axis", [-1, 0])
def test_where_matches_reference(rng, axis):
    x = R.random_logits(rng, (5, 7))
    m = _mask(rng, (5, 7))
    if axis == 0:
        x, m = x.T.copy(), m.T.copy()
    lsm = jaxce.log_softmax(jnp.asarray(x), axis=axis, where=jnp.asarray(m))
    sm = jaxce.softmax(jnp.asarray(x), axis=axis, where=jnp.asarray(m))
    lse = jaxce.logsumexp(jnp.asarray(x), axis=axis, where=jnp.asarray(m))
    R.assert_close(lsm, R.log_softmax(x, axis=axis, where=m), rtol=1e-12)
    R.assert_close(sm, R.softmax(x, axis=axis, where=m), rtol=1e-12, atol=1e-15)
    R.assert_close(lse, R.logsumexp(x, axis=axis, where=m), rtol=1e-12)
    # excluded entries: softmax 0, log_softmax -inf; the fully masked row: lse -inf
    assert np.all(np.asarray(sm)[~m] == 0.0)
    assert np.all(np.asarray(lsm)[~m] == -np.inf)
    assert np.asarray(lse)[0] == -np.inf


def test_where_broadcastable(rng):
    x = R.random_logits(rng, (4, 6))
    m = np.array([[True, False, True, True, False, True]])
    got = jaxce.softmax(jnp.asarray(x), where=jnp.asarray(m))
    R.assert_close(got, R.softmax(x, where=np.broadcast_to(m, x.shape)), rtol=1e-12)


def test_neg_inf_logit_behaves_like_excluded(rng):
    x = R.random_logits(rng, (3, 5))
    m = np.array([True, False, True, False, True])
    x_inf = np.where(m, x, -np.inf)
    for fn in (jaxce.log_softmax, jaxce.softmax, jaxce.logsumexp):
        a = fn(jnp.asarray(x_inf))
        b = fn(jnp.asarray(x), where=jnp.asarray(m))
        R.assert_close(a, b, rtol=1e-14, err_msg=fn.__name__)


@pytest.mark.parametrize("rows", [5, 3])
def test_a_mask_of_classes_broadcasts_over_the_rows(rng, rows):
    """A ``[C]`` mask masks those classes in every row, as ``jax.nn``'s ``where`` (and optax's
    for ``kl_divergence``) does, also where there are as many rows as classes."""
    x = jnp.asarray(R.random_logits(rng, (rows, 5)))
    m = jnp.asarray([True, False, True, True, False])
    full = jnp.broadcast_to(m, x.shape)
    pairs = (
        (jaxce.log_softmax, jax.nn.log_softmax),
        (jaxce.softmax, jax.nn.softmax),
        (jaxce.logsumexp, jax.nn.logsumexp),
    )
    for fn, reference in pairs:
        got = fn(x, where=m)
        np.testing.assert_array_equal(got, fn(x, where=full), err_msg=fn.__name__)
        R.assert_close(got, reference(x, axis=-1, where=m), rtol=1e-14, err_msg=fn.__name__)
    lq, t = jax.nn.log_softmax(x), jax.nn.softmax(-x)
    got = jaxce.kl_divergence(lq, t, where=m)
    np.testing.assert_array_equal(got, jaxce.kl_divergence(lq, t, where=full))
    R.assert_close(got, optax.kl_divergence(lq, t, where=m), rtol=1e-14)


def test_the_cross_entropies_read_a_batch_shaped_mask_per_example(rng):
    """The cross-entropies keep optax's convention: a mask with the batch's rank is one flag per
    example, even where it would also broadcast against the classes (5 rows, 5 classes)."""
    x = jnp.asarray(R.random_logits(rng, (5, 5)))
    labels = jnp.asarray([0, 2, 3, 0, 2])
    m = jnp.asarray([True, False, True, True, False])
    got = jaxce.softmax_cross_entropy_with_integer_labels(x, labels, where=m)
    want = optax.softmax_cross_entropy_with_integer_labels(x, labels, where=m)
    R.assert_close(got, want, rtol=1e-14)
    np.testing.assert_array_equal(np.asarray(got)[~np.asarray(m)], 0.0)
    soft = jax.nn.one_hot(labels, 5)
    R.assert_close(
        jaxce.softmax_cross_entropy(x, soft, where=m),
        optax.softmax_cross_entropy(x, soft, where=m),
        rtol=1e-14,
    )


@pytest.mark.parametrize("how", ["where", "neginf"])
def test_fully_masked_row_values_and_zero_gradient(how):
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = np.array([[True, True, True], [False, False, False]])
    if how == "neginf":
        x = np.where(m, x, -np.inf)
        kw = {}
    else:
        kw = {"where": jnp.asarray(m)}
    xj = jnp.asarray(x)
    assert np.all(np.asarray(jaxce.softmax(xj, **kw))[1] == 0.0)
    assert np.all(np.asarray(jaxce.log_softmax(xj, **kw))[1] == -np.inf)
    assert np.asarray(jaxce.logsumexp(xj, **kw))[1] == -np.inf
    c = np.array([[0.3, -0.2, 0.5], [1.0, 2.0, -1.0]])
    cot = jnp.asarray(c)
    g_sm = R.jgrad(lambda v: jnp.sum(jaxce.softmax(v, **kw) * cot))(xj)
    g_lsm = R.jgrad(
        lambda v: jnp.sum(jnp.where(jnp.asarray(m), jaxce.log_softmax(v, **kw), 0.0) * cot)
    )(xj)
    g_lse = R.jgrad(lambda v: jnp.sum(jaxce.logsumexp(v, **kw) * cot[:, 0]))(xj)
    for g in (g_sm, g_lsm, g_lse):
        g = np.asarray(g)
        assert not np.any(np.isnan(g)), g
        np.testing.assert_array_equal(g[1], 0.0)
    # the first row's gradient is the ordinary one
    s = R.softmax(x[0])
    R.assert_close(np.asarray(g_lse)[0], c[0, 0] * s, rtol=1e-12)
    R.assert_close(np.asarray(g_sm)[0], s * (c[0] - s @ c[0]), rtol=1e-12, atol=1e-15)
    R.assert_close(np.asarray(g_lsm)[0], c[0] - s * c[0].sum(), rtol=1e-12, atol=1e-15)


def test_where_excludes_huge_logits(rng):
    x = R.random_logits(rng, (3, 5))
    x[:, 2] = 1e300
    m = np.ones((3, 5), bool)
    m[:, 2] = False
    got = jaxce.log_softmax(jnp.asarray(x), where=jnp.asarray(m))
    expected = R.log_softmax(np.where(m, x, 0.0), where=m)
    R.assert_close(got, expected, rtol=1e-12)


# ------------------------------------------------------------------------------- extremes


@pytest.mark.parametrize("big", [1e4, 3e38])
def test_huge_float32_logits(big):
    x = np.array([[big, -big, 0.0, big], [-big, -big, -big, 1.0]], np.float32)
    xj = jnp.asarray(x)
    lsm = np.asarray(jaxce.log_softmax(xj))
    sm = np.asarray(jaxce.softmax(xj))
    lse = np.asarray(jaxce.logsumexp(xj))
    x64 = x.astype(F64)
    R.assert_close(sm, np.exp(_scipy_log_softmax(x64, -1)), rtol=1e-6, atol=1e-30)
    R.assert_close(lse, scipy.special.logsumexp(x64, axis=-1), rtol=1e-6)
    # log_softmax of the row maxima is exactly finite
    assert np.isclose(lsm[0, 0], -np.log(2.0), rtol=1e-6)
    assert np.isclose(lsm[1, 3], 0.0, atol=1e-6)
    g = R.jgrad(lambda v: jnp.sum(jaxce.logsumexp(v)))(xj)
    assert np.all(np.isfinite(np.asarray(g)))
    R.assert_close(g, np.exp(_scipy_log_softmax(x64, -1)), rtol=1e-6, atol=1e-30)


# ------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ["log_softmax", "softmax", "logsumexp"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_check_grads_order2(rng, name, axis):
    fn = getattr(jaxce, name)
    x = jnp.asarray(R.random_logits(rng, (3, 4), scale=1.0))
    R.check_grads(lambda v: fn(v, axis=axis), (x,), order=2, modes=("rev",))


@pytest.mark.parametrize("name", ["log_softmax", "softmax", "logsumexp"])
def test_check_grads_with_where(rng, name):
    fn = getattr(jaxce, name)
    x = jnp.asarray(R.random_logits(rng, (3, 4), scale=1.0))
    m = jnp.asarray(np.array([[True, False, True, True]] * 3))

    def f(v):
        out = fn(v, where=m)
        return jnp.where(jnp.isfinite(out), out, 0.0)

    R.check_grads(f, (x,), order=2, modes=("rev",))


@pytest.mark.parametrize("name", ["log_softmax", "softmax", "logsumexp"])
@pytest.mark.parametrize("axis", [-1, 1, (0, 2)])
def test_gradient_matches_reference_autodiff(rng, name, axis):
    x = R.random_logits(rng, (2, 3, 4))
    cot_shape = np.shape(scipy.special.logsumexp(x, axis=axis)) if name == "logsumexp" else x.shape
    cot = rng.normal(size=cot_shape)
    fn = getattr(jaxce, name)
    got = R.jgrad(lambda v: jnp.sum(fn(v, axis=axis) * jnp.asarray(cot)))(jnp.asarray(x))

    def ref(v, xp):
        if name == "logsumexp":
            out = R.logsumexp(v, axis=axis, xp=xp)
        else:
            lse = R.logsumexp(v, axis=axis, xp=xp)
            lse = xp.expand_dims(lse, axis)
            out = v - lse if name == "log_softmax" else xp.exp(v - lse)
        return xp.sum(out * cot)

    expected = R.ref_grad(ref)(x)
    R.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_grad_of_grad_logsumexp(rng):
    # d/dx sum_i g_i(x) where g = grad lse = softmax: Hessian of lse is diag(s) - s s^T
    x = R.random_logits(rng, (5,))
    h = jax.jit(jax.jacrev(jax.grad(lambda v: jaxce.logsumexp(v))))(jnp.asarray(x))
    s = R.softmax(x)
    R.assert_close(h, np.diag(s) - np.outer(s, s), rtol=1e-10, atol=1e-14)


def test_softmax_jacobian_and_hessian_analytic(rng):
    x = R.random_logits(rng, (4,), scale=1.0)
    s = R.softmax(x)
    jac = jax.jit(jax.jacrev(jaxce.softmax))(jnp.asarray(x))
    R.assert_close(jac, np.diag(s) - np.outer(s, s), rtol=1e-10, atol=1e-14)
    hess = jax.jit(jax.jacrev(jax.jacrev(jaxce.softmax)))(jnp.asarray(x))
    R.assert_close(hess, R.softmax_hessian(x), rtol=1e-9, atol=1e-13)


# ----------------------------------------------------------------------- jit / vmap / dtypes


@pytest.mark.parametrize("name", ["log_softmax", "softmax", "logsumexp"])
def test_jit_and_vmap(rng, name):
    fn = getattr(jaxce, name)
    x = jnp.asarray(R.random_logits(rng, (3, 4, 5)))
    eager = fn(x, axis=1)
    R.assert_close(jax.jit(lambda v: fn(v, axis=1))(x), eager, rtol=1e-13)
    vm = jax.vmap(lambda v: fn(v, axis=0))(x)  # per-batch [4, 5], class axis 0 == axis 1 overall
    R.assert_close(vm, eager, rtol=1e-13)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("name", ["log_softmax", "softmax", "logsumexp"])
def test_low_precision_dtype_and_accuracy(rng, dtype, name):
    x = jnp.asarray(R.random_logits(rng, (6, 33)), dtype=dtype)
    x64 = np.asarray(x.astype(jnp.float64))  # the rounded input, exactly
    fn = getattr(jaxce, name)
    got = fn(x)
    assert got.dtype == dtype
    if name == "logsumexp":
        expected = scipy.special.logsumexp(x64, axis=-1)
    elif name == "log_softmax":
        expected = _scipy_log_softmax(x64, -1)
    else:
        expected = np.exp(_scipy_log_softmax(x64, -1))
    # only the output rounding may be lost: a few ulps of the output dtype, relative to the scale
    eps = float(jnp.finfo(dtype).eps) * (2 if dtype != jnp.float32 else 16)
    scale = np.max(np.abs(expected))
    R.assert_close(got, expected, rtol=eps, atol=eps * scale)
    g = R.jgrad(lambda v: jnp.sum(fn(v).astype(jnp.float32)))(x)
    assert g.dtype == dtype


def test_float32_accuracy_large_rows(rng):
    x = jnp.asarray(R.random_logits(rng, (4, 10001), scale=10.0), dtype=jnp.float32)
    x64 = np.asarray(x.astype(jnp.float64))
    R.assert_close(jaxce.logsumexp(x), scipy.special.logsumexp(x64, axis=-1), rtol=1e-6)
    R.assert_close(jaxce.log_softmax(x), _scipy_log_softmax(x64, -1), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------- logit_soft_cap


@pytest.mark.parametrize("cap", [1.0, 30.0, 50.0])
def test_logit_soft_cap(rng, cap):
    x = R.random_logits(rng, (4, 9), scale=40.0)
    got = jaxce.logit_soft_cap(jnp.asarray(x), cap)
    R.assert_close(got, R.logit_soft_cap(x, cap), rtol=1e-13, atol=1e-13)
    assert np.all(np.abs(np.asarray(got)) <= cap)
    g = R.jgrad(lambda v: jnp.sum(jaxce.logit_soft_cap(v, cap)))(jnp.asarray(x))
    R.assert_close(g, 1.0 - np.tanh(x / cap) ** 2, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("float64", 1e-14)])
def test_logit_soft_cap_derivatives_deep_in_saturation(dtype, rtol):
    """``d/dx = 1 / cosh(u)^2`` and ``d/dcap = tanh(u) - u / cosh(u)^2`` (``u = x / cap``) to a
    few roundings of themselves where ``tanh(u)`` is within rounding of +-1 too, where
    ``1 - tanh(u)^2`` cancels (float32: 1e-4 relative at ``|u| = 4``, 0 from 8 on). In float32
    XLA's CPU ``exp`` itself is 2e-6 from the true value at -24."""
    cap = 30.0
    u = np.array([-18.0, -12.0, -8.0, -6.0, -4.0, 0.5, 2.0, 4.0, 6.0, 8.0, 12.0, 18.0])
    x = jnp.asarray(u * cap, dtype)  # u is exact in both dtypes
    d_x = jax.vmap(jax.grad(lambda v: jaxce.logit_soft_cap(v, cap)))(x)
    np.testing.assert_allclose(np.asarray(d_x, np.float64), 1 / np.cosh(u) ** 2, rtol=rtol)
    d_cap = jax.vmap(jax.grad(lambda c, v: jaxce.logit_soft_cap(v, c)), (None, 0))(
        jnp.asarray(cap, dtype), x
    )
    want = np.tanh(u) - u / np.cosh(u) ** 2
    np.testing.assert_allclose(np.asarray(d_cap, np.float64), want, rtol=rtol)


def _sech_squared_exact(u: float) -> float:
    """``1 / cosh(u)**2 = 4 e / (1 + e)**2``, ``e = exp(-2 |u|)``, in 60-digit arithmetic."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        e = (-2 * abs(decimal.Decimal(u))).exp()
        return float(4 * e / (1 + e) ** 2)


@pytest.mark.parametrize(
    "dtype, u, rtol",
    [
        ("float32", [30.0, 32.5, 40.0, 43.75, 44.0, 44.25], 4e-7),
        ("float64", [256.5, 300.0, 354.25, 354.5, 354.75], 1e-15),
    ],
)
def test_logit_soft_cap_derivative_near_the_smallest_normal_number(dtype, u, rtol):
    """``d/dx = 4 e / (1 + e)**2``, ``e = exp(-2 |u|)``: where ``e`` is below the smallest normal
    number (flushed to 0 by XLA on CPU) and ``4 e`` is not (float32 ``|u|`` in [43.7, 44.4],
    float64 [354.2, 354.9]), the derivative is that normal number to a few roundings, not 0 (at
    ``|u| = 43.75``: 4.0e-38 in float32), and a loss scale multiplies it, not a 0."""
    cap = 0.5
    u = np.array(u + [-v for v in u])
    x = jnp.asarray(u * cap, dtype)  # exact in both dtypes
    for scale in (1.0, 2.0**15):
        d_x = jax.vmap(jax.grad(lambda v, s=scale: jaxce.logit_soft_cap(v, cap) * s))(x)
        want = scale * np.array([_sech_squared_exact(float(v)) for v in u])
        assert np.all(want >= np.finfo(dtype).smallest_normal)
        np.testing.assert_allclose(np.asarray(d_x, np.float64), want, rtol=rtol)


def _tanh_and_cap_derivative_exact(u: float) -> tuple[float, float, float]:
    """``tanh(u)``, ``tanh(u) - u / cosh(u)**2`` and the scale of the latter's rounding,
    ``|tanh(u)| + 2 |u| / cosh(u)**2`` (docs/precision.md), in 60-digit decimal arithmetic from
    ``e = exp(-2 |u|)``: no cancellation left (near 0, where the difference is ``2 u**3 / 3``,
    its two terms agree to within about ``u**2`` of themselves: 12 of the 60 digits at
    ``u = 2**-20``, the smallest ``u`` it is asked for)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        d = decimal.Decimal(u)
        e = (-2 * abs(d)).exp()
        t = (1 - e) / (1 + e) * (1 if d >= 0 else -1)
        s = 4 * e / (1 + e) ** 2
        return float(t), float(t - d * s), float(abs(t) + 2 * abs(d) * s)


@pytest.mark.parametrize("dtype, tol", [("float32", 1.5), ("float64", 1.5)])
def test_logit_soft_cap_where_tanh_nears_one(dtype, tol):
    """The soft cap's value (float64) and its derivative in the cap (both dtypes) within
    ``tol`` epsilons for ``|u|`` in [1, 21] (of the value, and of the derivative's scale
    ``|tanh(u)| + 2 |u| / cosh(u)**2``), where ``tanh(u)`` nears +-1: XLA's CPU
    ``tanh`` is up to 3.46 epsilons off there in float64 (1.89 in float32), which the value took
    (3.46 epsilons at ``u = -20.0``) and the derivative too (3.70 in float64 and 2.10 in float32;
    a thorough run found 3.05 at ``x = 0.1875``, ``cap = 0.01``). The inputs are exact."""
    cap = 0.5
    u = np.concatenate([np.linspace(1.0, 21.0, 1601), [18.75, 19.06, 19.9995]])
    u = np.concatenate([u, -u]).astype(dtype).astype(np.float64)
    x = jnp.asarray(u * cap, dtype)
    want = np.array([_tanh_and_cap_derivative_exact(float(v)) for v in u])
    eps = float(np.finfo(dtype).eps)
    if dtype == "float64":  # float32 keeps XLA's tanh for the value (see _sigmoid._tanh)
        value = np.asarray(jaxce.logit_soft_cap(x, cap), np.float64)
        err = np.abs(value - cap * want[:, 0]) / (cap * np.abs(want[:, 0])) / eps
        assert err.max() <= tol, f"value: {err.max():.3g} epsilons at u = {u[err.argmax()]}"
    d_cap = jax.vmap(jax.grad(lambda c, v: jaxce.logit_soft_cap(v, c)), (None, 0))(
        jnp.asarray(cap, dtype), x
    )
    err = np.abs(np.asarray(d_cap, np.float64) - want[:, 1]) / want[:, 2] / eps
    assert err.max() <= tol, f"cap derivative: {err.max():.3g} epsilons at u = {u[err.argmax()]}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_soft_capped_loss_has_the_same_hessian_at_minus_zero(dtype):
    """The Hessian of the integer-label loss under a cap given as a number is the same at a
    logit of -0.0 as at +0.0, where the loss is smooth (autodiff of a ``tanh`` whose sign is
    taken by ``copysign`` gave its diagonal entry the opposite sign at -0.0 in float64, and a
    Hessian that is not symmetric)."""
    labels = jnp.array([1, 2])

    def loss(z):
        return jaxce.softmax_cross_entropy_with_integer_labels(z, labels, logit_soft_cap=5.0).sum()

    plus = np.array([[0.0, 1.0, -2.0], [0.5, 0.25, 3.0]], dtype)
    minus = plus.copy()
    minus[0, 0] = -0.0
    h_plus = np.asarray(jax.hessian(loss)(jnp.asarray(plus)))
    h_minus = np.asarray(jax.hessian(loss)(jnp.asarray(minus)))
    assert h_plus[0, 0, 0, 0] > 0
    np.testing.assert_array_equal(h_minus, h_plus)


@pytest.mark.parametrize("dtype, rtol", [("float32", 4e-6), ("float64", 1e-14)])
def test_logit_soft_cap_cap_derivative_near_zero(dtype, rtol):
    """``d/dcap = tanh(u) - u / cosh(u)**2`` is ``2 u**3 / 3`` near 0, where its two terms are
    ``u``: to a few roundings of itself there too (subtracting the terms gave 136% of it at
    ``u = 3e-4`` in float32, 1% at ``u = 3e-3``), and across ``|u| = 1``, where the series
    hands over to the terms."""
    cap = 32.0
    u = np.array([2.0**-20, 2.0**-12, 2.0**-8, 0.01, 0.1, 0.5, 0.99, 1.0, 1.01, 1.5, 3.0])
    u = np.concatenate([u, -u]).astype(dtype).astype(np.float64)  # exact in both dtypes
    x = jnp.asarray(u * cap, dtype)
    d_cap = jax.vmap(jax.grad(lambda c, v: jaxce.logit_soft_cap(v, c)), (None, 0))(
        jnp.asarray(cap, dtype), x
    )
    want = np.array([_tanh_and_cap_derivative_exact(float(v))[1] for v in u])
    np.testing.assert_allclose(np.asarray(d_cap, np.float64), want, rtol=rtol)


@pytest.mark.parametrize("dtype, rtol", [("float32", 2e-6), ("float64", 1e-14)])
def test_logit_soft_cap_second_derivatives_near_zero_and_beyond(dtype, rtol):
    """The second derivatives in ``x``, in ``x`` and the cap, and in the cap,
    ``-2 tanh(u) / cosh(u)**2 / cap``, ``-u`` and ``u**2`` times it, to a few roundings of
    themselves, also near ``u = 0``, where the first is about ``-2 u / cap``: autodiff of the
    first derivative's ``4 e / (1 + e)**2`` subtracts two terms of about 2 there (in float32 7%
    off at ``u = 1e-6``, 0 from ``1e-8`` on; autodiff of ``cap * tanh(x / cap)`` in JAX: 2% and
    0), and deep in saturation, where the one in the cap is ``1 / cosh(u)**2`` less the
    derivative of ``tanh(u)``: autodiff of ``tanh``, ``1 - tanh(u)**2``, cancels (6% off at
    ``u = 8`` in float32, 2% at ``u = 18`` in float64: ``1 / (2 u)`` where it rounds to 0); the
    cap's derivative clamped ``u`` at 40, which made its own derivatives 0 from there on (in
    float64 they are normal numbers up to ``u = 354``). The cap is a power of two: ``u`` is
    exact."""
    cap = 32.0
    u = np.array(
        [2.0**-40, 2.0**-27, 2.0**-20, 2.0**-12, 2.0**-8, 0.01, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0]
        + [12.0, 18.0, 24.0, 30.0, 36.0]
        + ([41.0, 100.0, 300.0] if dtype == "float64" else [])
    )
    u = np.concatenate([u, -u]).astype(dtype).astype(np.float64)  # exact in both dtypes
    x = jnp.asarray(u * cap, dtype)
    c = jnp.asarray(cap, dtype)
    d_xx = jax.vmap(jax.grad(jax.grad(jaxce.logit_soft_cap)), (0, None))(x, c)
    d_xc = jax.vmap(jax.grad(jax.grad(jaxce.logit_soft_cap), argnums=1), (0, None))(x, c)
    d_cc = jax.vmap(jax.grad(jax.grad(jaxce.logit_soft_cap, 1), 1), (0, None))(x, c)
    want = np.array([R.logit_soft_cap_second_derivatives(float(v), cap) for v in u])
    np.testing.assert_allclose(np.asarray(d_xx, np.float64), want[:, 0], rtol=rtol)
    np.testing.assert_allclose(np.asarray(d_xc, np.float64), want[:, 1], rtol=rtol)
    np.testing.assert_allclose(np.asarray(d_cc, np.float64), want[:, 2], rtol=rtol)


@pytest.mark.parametrize("dtype, rtol", [("float32", 2e-6), ("float64", 1e-14)])
@pytest.mark.parametrize("cap", [32.0, 2.0**63, 2.0**64])
def test_logit_soft_cap_second_derivatives_in_the_cap_at_large_caps(dtype, rtol, cap):
    """``d2/dx dcap`` and ``d2/dcap2`` to a few roundings of themselves wherever they are normal
    numbers, at large ``u`` and large caps. Autodiff differentiates ``u = x / cap`` in the cap as
    ``-x * cap**-2``, which multiplied the cotangent by ``cap**-2`` first: a product below the
    smallest normal number, flushed to 0 though the result is not. In float32 at a cap of 32
    they were 0 from ``|u| = 42`` and 43.1 on (3.5e-36 and 7.8e-36 there), and at every ``u``
    for caps from ``2**63`` on, where ``cap**-2`` is flushed itself. The caps are powers of
    two: ``u`` is exact."""
    u = np.array([0.5, 1.0, 3.0, 10.0, 20.0, 30.0, 40.0, 42.0, 43.0, 43.5, 44.0, 44.25])
    if dtype == "float64":
        u = np.concatenate([u, [100.0, 300.0, 354.0, 354.5]])
    u = np.concatenate([u, -u])
    x = jnp.asarray(u * cap, dtype)
    c = jnp.asarray(cap, dtype)
    d_xc = jax.vmap(jax.grad(jax.grad(jaxce.logit_soft_cap), argnums=1), (0, None))(x, c)
    d_cc = jax.vmap(jax.grad(jax.grad(jaxce.logit_soft_cap, 1), 1), (0, None))(x, c)
    want = np.array([R.logit_soft_cap_second_derivatives(float(v), cap) for v in u])
    for got, w in ((d_xc, want[:, 1]), (d_cc, want[:, 2])):
        normal = np.abs(w) >= np.finfo(dtype).smallest_normal
        assert normal.sum() >= 8
        got = np.asarray(got, np.float64)
        np.testing.assert_allclose(got[normal], w[normal], rtol=rtol)
        assert np.all(np.abs(got[~normal]) <= np.finfo(dtype).smallest_normal)


@pytest.mark.parametrize("cap", [0.001, 1.0, 30.0])
def test_logit_soft_cap_third_derivatives(cap):
    """Every third derivative in ``x`` and the cap, forward and reverse mode, against autodiff of
    ``cap * tanh(x / cap)`` in float64 (accurate at these ``u``). The derivative in the cap of
    the first derivatives' quotient ``u = x / cap`` clamps ``u`` where ``1 / cosh(u)**2``
    vanishes (355 in float64, 45 in float32); applied to the tangent's own quotients
    ``x_dot / cap`` (1000 at a cap of 0.001) it made them wrong (in float32 at
    ``x = cap = 0.01``: ``d3/dx2 dcap`` -3338 for 180.7 in one order, ``d3/dcap3`` 9456 for
    12975)."""
    u = np.array([-3.0, -1.25, 1.0, 2.5])
    x = jnp.asarray(u * cap)
    c = jnp.asarray(cap)

    def plain(x, c):
        return c * jnp.tanh(x / c)

    fwd, rev = jax.jacfwd, jax.jacrev
    for modes in ((fwd, fwd, fwd), (rev, rev, rev), (fwd, rev, fwd)):
        for argnums in itertools.product((0, 1), repeat=3):

            def derivative(f, argnums=argnums, modes=modes):
                for mode, i in zip(modes, argnums, strict=True):
                    f = mode(f, argnums=i)
                return jax.jit(jax.vmap(f, (0, None)))

            got = derivative(jaxce.logit_soft_cap)(x, c)
            want = derivative(plain)(x, c)
            np.testing.assert_allclose(got, want, rtol=1e-9, err_msg=f"{modes} {argnums}")


def test_logit_soft_cap_dtype_and_neg_inf():
    x = jnp.asarray(np.array([-np.inf, -3.0, 0.0, 100.0]), dtype=jnp.bfloat16)
    got = jaxce.logit_soft_cap(x, 30.0)
    assert got.dtype == jnp.bfloat16
    got = np.asarray(got.astype(jnp.float32))
    assert got[0] == -30.0 or got[0] == -np.inf  # the primitive is tanh; CE keeps -inf masked
    R.assert_close(
        got[1:], 30.0 * np.tanh(np.array([-3.0, 0.0, 100.0]) / 30.0), rtol=1e-2, atol=1e-2
    )
