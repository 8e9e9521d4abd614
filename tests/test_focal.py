"""sigmoid_focal_loss (optax's, plus reduction) and softmax_focal_loss (Lin et al. multi-class)."""

import decimal
import itertools

import _reference as R
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import jaxce

SFL = R.jitted(jaxce.sigmoid_focal_loss)
MFL = R.jitted(jaxce.softmax_focal_loss)


@pytest.mark.parametrize(
    "alpha,gamma,reduction",
    list(itertools.product([None, 0.25], [0.0, 0.5, 2.0, 3.0], ["none", "mean"])),
)
def test_sigmoid_focal_values_and_grads(rng, alpha, gamma, reduction):
    x = R.random_logits(rng, (5, 3), scale=3.0)
    y = (rng.random((5, 3)) < 0.4).astype(np.float64)
    kw = dict(alpha=alpha, gamma=gamma, reduction=reduction)
    got = SFL(jnp.asarray(x), jnp.asarray(y), **kw)
    R.assert_close(got, R.sigmoid_focal_loss(x, y, **kw), rtol=1e-11, atol=1e-14)
    g = R.jgrad(lambda a: jnp.sum(SFL(a, jnp.asarray(y), **kw)))(jnp.asarray(x))
    g_ref = R.ref_grad(lambda a, xp: xp.sum(R.sigmoid_focal_loss(a, y, xp=xp, **kw)))(x)
    R.assert_close(g, g_ref, rtol=1e-9, atol=1e-13)


def test_sigmoid_focal_hand_derived():
    # FL = -alpha_t (1 - p_t)^gamma log p_t
    x = np.array([2.0, -1.0])
    y = np.array([1.0, 0.0])
    p = 1 / (1 + np.exp(-x))
    pt = np.where(y == 1, p, 1 - p)
    at = np.where(y == 1, 0.25, 0.75)
    expected = -at * (1 - pt) ** 2 * np.log(pt)
    R.assert_close(SFL(jnp.asarray(x), jnp.asarray(y), alpha=0.25), expected, rtol=1e-12)
    R.assert_close(
        SFL(jnp.asarray(x), jnp.asarray(y), alpha=0.25, reduction="mean"),
        expected.mean(),
        rtol=1e-12,
    )


def test_sigmoid_focal_gamma0_is_bce(rng):
    x = R.random_logits(rng, (7,))
    y = rng.random(7)
    R.assert_close(
        SFL(jnp.asarray(x), jnp.asarray(y), gamma=0.0),
        R.sigmoid_binary_cross_entropy(x, y),
        rtol=1e-12,
    )


def test_sigmoid_focal_gamma0_is_bce_at_infinite_logits():
    """Values and both derivatives, at +-inf too (where the focusing terms were 0 * inf = NaN
    before their limits were taken)."""
    x = jnp.tile(jnp.asarray([-jnp.inf, -50.0, 0.0, 50.0, jnp.inf]), 3)
    y = jnp.repeat(jnp.asarray([0.0, 1.0, 0.3]), 5)

    def value_and_grads(loss):
        total = lambda a, b: jnp.sum(loss(a, b))  # noqa: E731
        return (loss(x, y), *jax.grad(total, (0, 1))(x, y))

    got = value_and_grads(lambda a, b: SFL(a, b, gamma=0.0))
    want = value_and_grads(jaxce.sigmoid_binary_cross_entropy)
    for g, w, name in zip(got, want, ("loss", "d/dx", "d/dy"), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=0, err_msg=name)


@pytest.mark.parametrize("big", [1e4, 3e38])
def test_sigmoid_focal_extremes(big):
    x = jnp.asarray(np.array([big, -big, big, -big, 0.0]), dtype=jnp.float32)
    y = jnp.asarray(np.array([1.0, 0.0, 0.0, 1.0, 1.0]), dtype=jnp.float32)
    for gamma in (0.5, 2.0):
        val, g = jax.value_and_grad(lambda a, gm=gamma: jnp.sum(SFL(a, y, gamma=gm)))(x)
        assert not np.isnan(float(val))
        assert not np.any(np.isnan(np.asarray(g)))
        per = np.asarray(SFL(x, y, gamma=gamma))
        R.assert_close(per[:2], [0.0, 0.0], atol=1e-30)
        R.assert_close(per[2:4], [big, big], rtol=1e-6)


def _decimal_ce_and_base(v: decimal.Decimal, t: decimal.Decimal):
    """The sigmoid BCE ``ce`` and the focal base ``m = 1 - p_t`` of logit ``v`` and label ``t``,
    in the decimal context in force."""
    p, q = 1 / (1 + (-v).exp()), 1 / (1 + v.exp())
    return -(t * p.ln() + (1 - t) * q.ln()), p * (1 - t) + q * t


def _sigmoid_focal_slope(x: float, y: float, alpha: float, gamma: float) -> float:
    """d/dx of the sigmoid focal loss, a central difference of step 1e-25 in 60-digit decimal
    arithmetic (exact to about 1e-40 relative)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        y_, a_, g_ = decimal.Decimal(y), decimal.Decimal(alpha), decimal.Decimal(gamma)

        def loss(v):
            ce, m = _decimal_ce_and_base(v, y_)
            return (a_ * y_ + (1 - a_) * (1 - y_)) * ce * m**g_

        h = decimal.Decimal(10) ** -25
        return float((loss(decimal.Decimal(x) + h) - loss(decimal.Decimal(x) - h)) / (2 * h))


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_sigmoid_focal_gradient_of_confident_right_predictions(gamma):
    """Where the prediction is right and confident (``y = 1``, ``x`` far above 0), the gradient
    ``a m^gamma [(p - y) + ...]`` keeps its digits: ``p - y`` is taken as ``p (1 - y) - q y``,
    since ``p - 1`` cancels as ``p`` nears 1 and ``m^gamma`` leaves only that small difference
    (float32, gamma = 2: 2% off at x = 16 and 33% from 17 on as ``p - 1``)."""
    x = np.array([2.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0])
    x = np.concatenate([x, -x])
    y = np.concatenate([np.ones(7), np.zeros(7)])
    g = jax.grad(lambda v: jnp.sum(SFL(v, jnp.asarray(y, jnp.float32), alpha=0.25, gamma=gamma)))(
        jnp.asarray(x, jnp.float32)
    )
    want = [_sigmoid_focal_slope(a, b, 0.25, gamma) for a, b in zip(x, y, strict=True)]
    np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=2e-6)


def _sigmoid_focal_in_gamma(x: float, y: float, gamma: float, h: float = 0.0) -> float:
    """d/dgamma of the sigmoid focal loss, ``ce m^gamma ln m``, in 60-digit decimal arithmetic;
    with ``h``, its central difference in ``y`` of that step (``ce`` and ``m`` are linear in
    ``y``, so the formula holds just outside [0, 1] too)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        v, g_ = decimal.Decimal(x), decimal.Decimal(gamma)

        def slope(t):
            ce, m = _decimal_ce_and_base(v, t)
            return ce * m**g_ * m.ln()

        if not h:
            return float(slope(decimal.Decimal(y)))
        step = decimal.Decimal(h)
        y_ = decimal.Decimal(y)
        return float((slope(y_ + step) - slope(y_ - step)) / (2 * step))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_focal_losses_gamma_derivative_where_the_base_rounds_to_one(dtype):
    """d/dgamma = a ce m^gamma log m takes ``log m`` from the logs (``log sigmoid(x)`` at
    ``y = 0``; ``log1p(-p_y)`` for the softmax loss), not from ``m`` rounded near 1: float32
    at x = 17, y = 0 was 44% off, and 0 from about x = 18 on (float64: 1.6e-4 off at x = 30,
    0 at 80). For the softmax loss d/dz of it too: ``u = -expm1(log p_y)``'s derivative, from
    jax's ``expm1``, was 0 where ``expm1`` rounds to -1, which gave that second derivative the
    wrong sign (float32 at a margin of 20: +2.1e-9 for -3.9e-8)."""
    eps = float(jnp.finfo(dtype).eps)
    wide = dtype == jnp.float64
    x = np.array([17.0, 30.0, -17.0, 40.0, 2.0, -5.0, 0.5] + ([80.0] if wide else []))
    y = np.array([0.0, 0.0, 1.0, 0.0, 0.3, 0.9, 0.5] + ([0.0] if wide else []), dtype)

    def slope(v, t):
        loss = lambda g: SFL(jnp.asarray([v], dtype), jnp.asarray([t], dtype), gamma=g)  # noqa: E731
        return float(jax.grad(lambda g: jnp.sum(loss(g)))(jnp.asarray(2.0, dtype)))

    for v, t in zip(x, y, strict=True):
        want = _sigmoid_focal_in_gamma(float(v), float(t), 2.0)
        np.testing.assert_allclose(slope(v, t), want, rtol=16 * eps, err_msg=f"x={v}, y={t}")

    # softmax, label 0: -u^gamma log(u) log p_y with u = 1 - p_y, in 60 digits
    def in_gamma(z0, others):
        log_p = z0 - (z0.exp() + sum(decimal.Decimal(o).exp() for o in others)).ln()
        u = 1 - log_p.exp()
        return -(u**2) * u.ln() * log_p

    def softmax_in_gamma(z):
        return jax.grad(lambda g: jnp.sum(MFL(z[None], jnp.array([0]), gamma=g)))(
            jnp.asarray(2.0, dtype)
        )

    for d in (20.0, 30.0, 5.0, -1.0):
        with decimal.localcontext() as ctx:
            ctx.prec = 60
            want = float(in_gamma(decimal.Decimal(0), [d]))
        got = softmax_in_gamma(jnp.asarray([0.0, d], dtype))
        np.testing.assert_allclose(float(got), want, rtol=16 * eps, err_msg=f"d={d}")
    # d/dz_0 of d/dgamma, against a central difference of the 60-digit derivative in gamma
    for d in (20.0, 5.0):
        with decimal.localcontext() as ctx:
            ctx.prec = 60
            h = decimal.Decimal(10) ** -25
            want = float((in_gamma(h, [d, 0.0]) - in_gamma(-h, [d, 0.0])) / (2 * h))
        got = float(jax.grad(softmax_in_gamma)(jnp.asarray([0.0, d, 0.0], dtype))[0])
        np.testing.assert_allclose(got, want, rtol=64 * eps, err_msg=f"d/dz d/dgamma, d={d}")
    # where log p_y overflows (a label logit 6e38 below the max), u log u is 0, not 0 * inf
    z = jnp.asarray([[3e38, -3e38, 0.0]], dtype)
    got = jax.grad(lambda g: jnp.sum(MFL(z, jnp.array([1]), gamma=g)))(jnp.asarray(2.0, dtype))
    assert float(got) == 0.0


def test_sigmoid_focal_mixed_second_derivative_at_hard_labels():
    """d/dy of dloss/dgamma at labels of 0 and 1, against a central difference of the exact
    derivative, in both orders of ``jax.hessian``: the loss's ``ce`` took its label terms as
    selects, whose derivative in ``y`` is 0 at ``y = 0`` and ``y = 1`` (-0.855 for -0.868 at
    x = 2, y = 0, gamma = 2), where the loss's own first derivatives were right."""
    with jax.enable_x64():
        x = jnp.asarray([2.0, -3.0, 0.5, 4.0])
        y = jnp.asarray([0.0, 1.0, 1.0, 0.0])
        f = lambda a, b, g: jnp.sum(SFL(a, b, gamma=g))  # noqa: E731
        h = jax.hessian(f, argnums=(1, 2))(x, y, jnp.asarray(2.0))
        pairs = zip(np.asarray(x), np.asarray(y), strict=True)
        want = [_sigmoid_focal_in_gamma(float(a), float(b), 2.0, h=1e-25) for a, b in pairs]
        np.testing.assert_allclose(np.asarray(h[0][1]), want, rtol=1e-12, err_msg="d/dgamma dy")
        np.testing.assert_allclose(np.asarray(h[1][0]), want, rtol=1e-12, err_msg="d/dy dgamma")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_sigmoid_focal_alpha_of_zero_at_an_infinite_term(dtype):
    """alpha = 0 (or 1) makes a positive (negative) label's term 0 where its BCE is infinite,
    as a weight of 0 does everywhere in jaxce (it was NaN), and its derivative in the label
    keeps the other side's finite term."""
    with jax.enable_x64(dtype == jnp.float64):
        inf = jnp.inf
        for x, y, alpha in ((-inf, 1.0, 0.0), (inf, 0.0, 1.0)):
            got = SFL(jnp.asarray([x], dtype), jnp.asarray([y], dtype), alpha=alpha)
            assert float(got[0]) == 0.0, (x, y, alpha)
        big = float(jnp.finfo(dtype).max) / 2
        # alpha_t = 0: dloss/dy = (2 alpha - 1) ce m^gamma = -ce = -|x| at y = 1, x = -big, and
        # -inf at x = -inf, where the other term, 0 times an infinite log difference, adds 0
        for x, want in ((-big, -big), (-inf, -inf)):
            grad = jax.grad(lambda b, x=x: jnp.sum(SFL(jnp.asarray([x], dtype), b, alpha=0.0)))
            np.testing.assert_allclose(float(grad(jnp.asarray([1.0], dtype))[0]), want, rtol=1e-6)
        # d2/dy2 = 2 (2 alpha - 1)(log q - log p) at gamma = 0: +inf at x = +inf, y = 1
        second = jax.hessian(
            lambda b: jnp.sum(SFL(jnp.asarray([inf], dtype), b, alpha=0.25, gamma=0.0))
        )
        assert float(second(jnp.asarray([1.0], dtype))[0, 0]) == inf


def test_sigmoid_focal_check_grads_dtypes_jit(rng):
    x = jnp.asarray(R.random_logits(rng, (3, 4), scale=1.5))
    y = jnp.asarray((rng.random((3, 4)) < 0.5).astype(np.float64))
    R.check_grads(
        lambda a: SFL(a, y, alpha=0.25, gamma=2.0, reduction="mean"), (x,), order=2, modes=("rev",)
    )
    xb = x.astype(jnp.bfloat16)
    out = SFL(xb, y.astype(jnp.bfloat16))
    assert out.dtype == jnp.float32
    R.assert_close(
        out,
        R.sigmoid_focal_loss(np.asarray(xb.astype(jnp.float64)), np.asarray(y)),
        rtol=1e-5,
        atol=1e-6,
    )
    assert R.jgrad(lambda a: jnp.sum(SFL(a, y.astype(jnp.bfloat16))))(xb).dtype == jnp.bfloat16
    f = lambda a, b: SFL(a, b, alpha=0.25)  # noqa: E731
    R.assert_close(jax.jit(f)(x, y), f(x, y), rtol=1e-13)
    R.assert_close(
        jax.vmap(f)(x, y),
        R.sigmoid_focal_loss(np.asarray(x), np.asarray(y), alpha=0.25),
        rtol=1e-11,
    )


# ------------------------------------------------------------------------ softmax focal


ALPHAS = [None, 0.25, np.array([0.1, 0.5, 1.0, 2.0])]


@pytest.mark.parametrize(
    "alpha,gamma,ignore_index,reduction",
    list(itertools.product(range(3), [0.0, 2.0], [None, 1], ["none", "mean"])),
)
def test_softmax_focal_values_and_grads(rng, alpha, gamma, ignore_index, reduction):
    alpha = ALPHAS[alpha]
    x = R.random_logits(rng, (6, 4), scale=2.0)
    y = rng.integers(0, 4, size=6).astype(np.int32)
    y[2] = 1
    kw = dict(alpha=alpha, gamma=gamma, ignore_index=ignore_index, reduction=reduction)
    jkw = dict(kw, alpha=jnp.asarray(alpha) if isinstance(alpha, np.ndarray) else alpha)
    got = MFL(jnp.asarray(x), jnp.asarray(y), **jkw)
    R.assert_close(got, R.softmax_focal_loss(x, y, **kw), rtol=1e-11, atol=1e-14)
    g = R.jgrad(lambda a: jnp.sum(MFL(a, jnp.asarray(y), **jkw)))(jnp.asarray(x))
    g_ref = R.ref_grad(lambda a, xp: xp.sum(R.softmax_focal_loss(a, y, xp=xp, **kw)))(x)
    R.assert_close(g, g_ref, rtol=1e-9, atol=1e-13)
    if ignore_index is not None:
        np.testing.assert_array_equal(np.asarray(g)[y == ignore_index], 0.0)


def test_softmax_focal_hand_derived_mean_over_non_ignored():
    x = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1.0, 3.0, 0.0]])
    y = np.array([0, -100, 1], np.int32)
    alpha = np.array([0.25, 0.5, 1.0])
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    per = [
        -alpha[0] * (1 - p[0, 0]) ** 2 * np.log(p[0, 0]),
        0.0,
        -alpha[1] * (1 - p[2, 1]) ** 2 * np.log(p[2, 1]),
    ]
    got = MFL(jnp.asarray(x), jnp.asarray(y), alpha=jnp.asarray(alpha), ignore_index=-100)
    R.assert_close(got, per, rtol=1e-12)
    got = MFL(
        jnp.asarray(x),
        jnp.asarray(y),
        alpha=jnp.asarray(alpha),
        ignore_index=-100,
        reduction="mean",
    )
    R.assert_close(got, sum(per) / 2, rtol=1e-12)


def test_softmax_focal_gamma0_is_ce(rng):
    x = R.random_logits(rng, (5, 6))
    y = rng.integers(0, 6, size=5).astype(np.int32)
    R.assert_close(
        MFL(jnp.asarray(x), jnp.asarray(y), gamma=0.0),
        R.softmax_cross_entropy_with_integer_labels(x, y),
        rtol=1e-12,
    )


def test_softmax_focal_axis_and_nan(rng):
    x = R.random_logits(rng, (3, 4, 2))
    y = np.array([[0, 3], [1, 9], [2, 2]], np.int32)
    got = np.asarray(jax.jit(lambda a, b: MFL(a, b, axis=1))(jnp.asarray(x), jnp.asarray(y)))
    assert np.isnan(got[1, 1])
    ok = np.ones((3, 2), bool)
    ok[1, 1] = False
    R.assert_close(got[ok], R.softmax_focal_loss(x, y, axis=1)[ok], rtol=1e-11)


def test_softmax_focal_extremes_and_check_grads(rng):
    x = jnp.asarray(
        np.array([[3e38, -3e38, 0.0], [1e4, -1e4, -np.inf], [-5.0, 5.0, 0.0]]), dtype=jnp.float32
    )
    y = jnp.asarray(np.array([0, 0, 0], np.int32))
    val, g = jax.value_and_grad(lambda a: MFL(a, y, reduction="mean"))(x)
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
    xs = jnp.asarray(R.random_logits(rng, (3, 4), scale=1.0))
    ys = jnp.asarray(np.array([0, 3, 1], np.int32))
    R.check_grads(
        lambda a: MFL(a, ys, alpha=0.5, gamma=2.0, reduction="mean"), (xs,), order=2, modes=("rev",)
    )


def test_softmax_focal_dtypes_jit_vmap(rng):
    x = jnp.asarray(R.random_logits(rng, (3, 4, 5)))
    y = jnp.asarray(rng.integers(0, 5, size=(3, 4)).astype(np.int32))
    f = lambda a, b: MFL(a, b, gamma=1.5)  # noqa: E731
    R.assert_close(jax.jit(f)(x, y), f(x, y), rtol=1e-13)
    R.assert_close(
        jax.vmap(f)(x, y), R.softmax_focal_loss(np.asarray(x), np.asarray(y), gamma=1.5), rtol=1e-11
    )
    xb = x.astype(jnp.float16)
    out = f(xb, y)
    assert out.dtype == jnp.float32
    R.assert_close(
        out,
        R.softmax_focal_loss(np.asarray(xb.astype(jnp.float64)), np.asarray(y), gamma=1.5),
        rtol=1e-5,
        atol=1e-6,
    )
    assert R.jgrad(lambda a: jnp.sum(f(a, y)))(xb).dtype == jnp.float16


# Rows whose label probability underflows to 0 exactly: a masked label (-inf), and a float32
# row whose label logit is 6.8e38 below the max (the difference overflows to -inf).
UNDERFLOW_ROWS = [[-np.inf, 0.0, 1.0, 0.5], [-3.38e38, 0.0, 0.0, 3.38e38]]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_softmax_focal_gradient_where_the_label_probability_underflows(dtype, gamma):
    # dloss/dz = alpha F (p - onehot) with F = u^gamma (1 + gamma q (-log q) / u) -> 1 as
    # q -> 0: the gradient is softmax - onehot, not 0 * inf = NaN.
    x = jnp.asarray(UNDERFLOW_ROWS, dtype)
    y = jnp.array([0, 0])
    grad = jax.grad(lambda x: jaxce.softmax_focal_loss(x, y, gamma=gamma, reduction="sum"))(x)
    want = np.asarray(jax.nn.softmax(x.astype(jnp.float32), axis=-1)) - np.eye(4)[[0, 0]]
    np.testing.assert_allclose(np.float32(grad), want, atol=1e-2 if dtype == jnp.bfloat16 else 1e-6)
    # A zero alpha for the label's class: the example adds 0 (its -log q overflowed or is inf).
    alpha = jnp.array([0.0, 1.0, 1.0, 1.0])
    loss = jaxce.softmax_focal_loss(x, y, alpha=alpha, gamma=gamma)
    np.testing.assert_array_equal(np.float32(loss), [0.0, 0.0])
    # A NaN logit still makes its row NaN, with any alpha.
    bad = x.at[0, 1].set(jnp.nan)
    assert np.isnan(np.float32(jaxce.softmax_focal_loss(bad, y, alpha=alpha, gamma=gamma)[0]))
