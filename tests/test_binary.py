"""sigmoid_binary_cross_entropy (BCEWithLogitsLoss) and binary_cross_entropy (BCELoss)."""

import itertools

import _paths
import _reference as R
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxce
from jaxce import _binary, _xla

BIG32 = float(np.float32(3e38))
SBCE = R.jitted(jaxce.sigmoid_binary_cross_entropy)
BCE = R.jitted(jaxce.binary_cross_entropy)


def _jx(kw):
    return {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


# ------------------------------------------------------------------------ sigmoid BCE


@pytest.mark.parametrize("shape", [(), (7,), (4, 3), (2, 3, 5)])
def test_sbce_values(rng, shape):
    x = R.random_logits(rng, shape, scale=4.0)
    y = rng.random(shape)
    got = SBCE(jnp.asarray(x), jnp.asarray(y))
    assert got.shape == np.shape(x) and got.dtype == jnp.float64
    R.assert_close(got, R.sigmoid_binary_cross_entropy(x, y), rtol=1e-12, atol=1e-14)
    # the textbook formula -[y log p + (1 - y) log(1 - p)]
    p = 1 / (1 + np.exp(-x))
    R.assert_close(got, -(y * np.log(p) + (1 - y) * np.log(1 - p)), rtol=1e-9)


GRID = list(itertools.product([False, True], [False, "full", "row"], [0.0, 0.1], ["none", "mean"]))


@pytest.fixture(params=["cpu", "gpu"])
def backend_forms(request, monkeypatch):
    """The forms jaxce's losses take for each backend (``_xla.backend``), traced afresh here."""
    monkeypatch.setattr(_xla, "backend", lambda: request.param)
    jax.clear_caches()  # traces of the other backend's forms are cached by function
    yield request.param
    jax.clear_caches()


@pytest.mark.parametrize("pos_weight,weights,eps,reduction", GRID)
def test_sbce_option_grid(rng, backend_forms, pos_weight, weights, eps, reduction):
    # On GPUs the derivative takes sigmoid(x) from lax.logistic (_xla.reads_whole_rows)
    n, c = 5, 3
    x = R.random_logits(rng, (n, c))
    y = (rng.random((n, c)) < 0.5).astype(np.float64)
    kw = dict(label_smoothing=eps, reduction=reduction)
    if pos_weight:
        kw["pos_weight"] = rng.uniform(0.5, 4.0, size=c)  # along the last (class) axis
    if weights == "full":
        kw["weights"] = rng.uniform(0.0, 2.0, size=(n, c))
    elif weights == "row":
        kw["weights"] = rng.uniform(0.0, 2.0, size=(n, 1))
    got = SBCE(jnp.asarray(x), jnp.asarray(y), **_jx(kw))
    expected = R.sigmoid_binary_cross_entropy(x, y, **kw)
    R.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    loss = lambda a: jnp.sum(SBCE(a, jnp.asarray(y), **_jx(kw)))  # noqa: E731
    g = R.jgrad(loss)(jnp.asarray(x))
    g_ref = R.ref_grad(lambda a, xp: xp.sum(R.sigmoid_binary_cross_entropy(a, y, xp=xp, **kw)))(x)
    R.assert_close(g, g_ref, rtol=1e-11, atol=1e-14)
    logistic = "logistic" in str(jax.make_jaxpr(jax.grad(loss))(jnp.asarray(x)))
    assert logistic == (backend_forms == "gpu")


@pytest.mark.parametrize(
    "path",
    [_paths.PICKED, _paths.ROW_CHUNKS, _paths.FUSED_PASSES],
    ids=["picked", "chunks", "fused"],
)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize(
    "shape,w_shape",
    [
        ((5, 3), (5, 1)),
        ((5, 3), (1, 3)),
        ((5, 3), (3,)),
        ((2, 3, 4), (2, 3, 1)),
        ((2, 3, 4), (4,)),
        ((2, 3, 4), (2, 1, 4)),
        ((2, 3, 4), (2, 1, 1)),
        ((5, 3), ()),
        ((6,), (1,)),
        ((6,), (6,)),
    ],
)
def test_sbce_weights_per_row_and_class(rng, path, reduction, shape, w_shape):
    """Weights per row or per class, and ``pos_weight``, are read as they are, not broadcast to
    the logits' shape (``_binary._like``): values and gradients wrt the logits, the weights and
    ``pos_weight`` at the shapes the caller passed, on each path a sum takes, against float64."""
    x = R.random_logits(rng, shape)
    y = rng.random(shape)
    w = rng.uniform(0.0, 2.0, size=w_shape)
    pw = rng.uniform(0.5, 4.0, size=shape[-1:])

    def check(total, *args):
        argnums = tuple(range(len(args)))
        with _paths.taken(path):
            got = jax.jit(jax.value_and_grad(total, argnums=argnums))(*args)
        want = R.ref_grad(total, argnums=argnums)(*args)
        R.assert_close(got[0], total(*args, xp=np), rtol=1e-12)
        for g, ref, a in zip(got[1], want, args, strict=True):
            assert g.shape == a.shape
            R.assert_close(g, ref, rtol=1e-11, atol=1e-14)

    def sbce(a, w, pw, xp=None):
        kw = dict(weights=w, pos_weight=pw, label_smoothing=0.1)
        if xp is not None:
            return xp.sum(R.sigmoid_binary_cross_entropy(a, y, xp=xp, **kw))
        loss = jaxce.sigmoid_binary_cross_entropy(a, jnp.asarray(y), reduction=reduction, **kw)
        return jnp.sum(loss)

    def bce(p, w, xp=None):
        if xp is not None:
            return xp.sum(R.binary_cross_entropy(p, y, weights=w, xp=xp))
        loss = jaxce.binary_cross_entropy(p, jnp.asarray(y), weights=w, reduction=reduction)
        return jnp.sum(loss)

    check(sbce, x, w, pw)
    check(bce, 1 / (1 + np.exp(-x)), w)  # on probabilities, its weights read so too


def test_sbce_hand_derived_torch():
    # torch: l = -w [pw y log s(x) + (1 - y) log(1 - s(x))], mean over all elements
    x = np.array([[0.5, -1.0, 2.0], [3.0, 0.0, -0.2]])
    y = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.3]])
    pw = np.array([2.0, 0.5, 3.0])
    w = np.array([[1.0], [0.25]])
    s = 1.0 / (1.0 + np.exp(-x))
    per = -w * (pw * y * np.log(s) + (1 - y) * np.log(1 - s))
    got = SBCE(
        jnp.asarray(x),
        jnp.asarray(y),
        pos_weight=jnp.asarray(pw),
        weights=jnp.asarray(w),
        reduction="mean",
    )
    R.assert_close(got, per.mean(), rtol=1e-12)
    # gradient: w [(pw y + 1 - y) s - pw y] / numel
    g = w * ((pw * y + 1 - y) * s - pw * y) / x.size
    got_g = R.jgrad(
        lambda a: SBCE(
            a, jnp.asarray(y), pos_weight=jnp.asarray(pw), weights=jnp.asarray(w), reduction="mean"
        )
    )(jnp.asarray(x))
    R.assert_close(got_g, g, rtol=1e-12)


def test_sbce_label_smoothing_hand():
    # y' = (1 - eps) y + eps / 2
    x = np.array([1.5, -0.5])
    y = np.array([1.0, 0.0])
    yp = 0.8 * y + 0.1
    s = 1.0 / (1.0 + np.exp(-x))
    got = SBCE(jnp.asarray(x), jnp.asarray(y), label_smoothing=0.2)
    R.assert_close(got, -(yp * np.log(s) + (1 - yp) * np.log(1 - s)), rtol=1e-13)


def test_sbce_pos_weight_broadcasts_along_last_axis(rng):
    x = R.random_logits(rng, (2, 3, 4))
    y = (rng.random((2, 3, 4)) < 0.5).astype(np.float64)
    pw = np.array([1.0, 2.0, 3.0, 4.0])
    got = SBCE(jnp.asarray(x), jnp.asarray(y), pos_weight=jnp.asarray(pw))
    R.assert_close(
        got, R.sigmoid_binary_cross_entropy(x, y, pos_weight=pw[None, None, :]), rtol=1e-12
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_sbce_infinite_logits(dtype):
    x = jnp.asarray(np.array([np.inf, np.inf, -np.inf, -np.inf, np.inf]), dtype=dtype)
    y = jnp.asarray(np.array([1.0, 0.0, 0.0, 1.0, 0.5]), dtype=dtype)
    got = np.asarray(SBCE(x, y))
    np.testing.assert_array_equal(got, [0.0, np.inf, 0.0, np.inf, np.inf])
    pw = jnp.asarray(np.array([2.0, 2.0, 2.0, 2.0]), dtype=dtype)
    got = np.asarray(SBCE(x[:4], y[:4], pos_weight=pw))
    np.testing.assert_array_equal(got, [0.0, np.inf, 0.0, np.inf])
    # A weight of 0 takes an infinite term out, in the elementwise values and in the sum.
    w = jnp.asarray(np.array([1.0, 0.0, 1.0, 0.0, 1.0]), dtype=dtype)
    np.testing.assert_array_equal(np.asarray(SBCE(x, y, weights=w)), [0, 0, 0, 0, np.inf])
    assert float(SBCE(x[:4], y[:4], weights=w[:4], reduction="sum")) == 0.0


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
def test_sbce_sum_in_one_fusion_keeps_every_digit(dtype, eps):
    """The sum in one fusion (on CPU from ``_xla.FUSED_SUM_MIN_ELEMENTS`` entries, forced here)
    of large logits on targets near their side, ``(1 - t) x`` for a target near 1 (``0.95``,
    smoothing's ``1 - eps / 2``) and ``t |x|`` near 0, is within a few units of float64's sum.
    An infinite logit whose side has a weight of 0 adds 0 there, not NaN (``0 inf`` without
    the clips to the finite range), and one whose side has a weight of 16 times the smallest
    normal number adds inf, not about ``16 tiny max = 64`` (without the factor that is the
    largest number at an infinite logit), under ``vmap`` too (``_binary._sigmoid_bce_terms``)."""
    x = np.array([30.0, 1e4, -1e4, 3.0, -30.0, 1e4, 2.0, np.inf, -np.inf])
    y = np.array([0.95, 0.999, 0.001, 1 - 2**-20, 0.05, 1.0, 0.9, 0.0, 1.0])
    w = np.array([1.0, 1.0, 2.0, 1.0, 1.0, 0.5, 1.0, 0.0, 0.0])
    cd = jnp.float64 if dtype == jnp.float64 else jnp.float32  # the weights: the compute dtype
    xs, ys, ws = jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.asarray(w, cd)

    def total(x, y, w):
        return SBCE(x, y, weights=w, label_smoothing=eps, reduction="sum")

    finite = slice(0, 7)
    f64 = [np.asarray(a[finite], np.float64) for a in (xs, ys, ws)]
    terms = R.sigmoid_binary_cross_entropy(*f64[:2], weights=f64[2], label_smoothing=eps)
    want = np.sum(terms)
    with _paths.taken(_paths.FUSED_PASSES), _paths.fused_sums() as fusion:
        fused = jax.jit(total)
        got = float(fused(xs, ys, ws))
        got_finite = float(fused(xs[finite], ys[finite], ws[finite]))
        pair = jax.jit(jax.vmap(total))(*(jnp.stack([a[:7], a[2:]]) for a in (xs, ys, ws)))
        tiny = ws.at[8].set(16 * np.finfo(cd).tiny)  # on the target 1's side of -inf
        assert float(fused(xs, ys, tiny)) == np.inf
        assert float(jax.jit(jax.vmap(total))(xs[None], ys[None], tiny[None])[0]) == np.inf
    # the fused sum and its branch (traced with it) to the terms exact at infinite logits
    assert [c.kwargs.get("infinite", False) for c in fusion.call_args_list[:2]] == [False, True]
    unit = float(np.finfo(cd).eps)
    assert abs(got_finite - want) <= 4 * unit * want, (got_finite, want)
    assert abs(got - got_finite) <= 4 * unit * want  # the branch's sum, the infinities adding 0
    assert abs(float(pair[0]) - got_finite) <= 4 * unit * want
    assert abs(float(pair[1]) - np.sum(terms[2:])) <= 4 * unit * want  # the infinities add 0


@pytest.mark.parametrize("eps", [None, 0.1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
def test_sbce_terms_without_a_select_are_the_selects_values(dtype, eps):
    """The sigmoid BCE's terms without a select (``_binary._sigmoid_bce_terms``, which the CPU
    sums in one fusion) against the select's elementwise values, entry by entry: with ``big``
    equal everywhere (finite and infinite logits, the largest ones, zero, negative and
    overflowing coefficients, NaN); without it equal wherever the logit and the coefficients
    are finite, and NaN (which sends the sum to the second form) wherever not equal. Equal to
    within a rounding (``rtol``): XLA contracts a product and a sum into one fused
    multiply-add in one form and not in the other."""
    cd = jnp.float64 if dtype == jnp.float64 else jnp.float32
    top, huge = float(jnp.finfo(dtype).max), float(jnp.finfo(cd).max) / 2
    xs = [0.0, -0.0, 1e-7, -1e-7, 0.5, -0.5, 3.0, -3.0, 30.0, -30.0, 1e4, -1e4, top, -top]
    xs += [np.inf, -np.inf, np.nan]
    grid = itertools.product(xs, [0.0, 1.0, 0.3, 0.999], [1.0, 0.0, -2.0, 1e-3, huge], [1.0, 4.0])
    x, y, w, pw = (np.array(a) for a in zip(*grid, strict=True))
    args = (jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.asarray(pw, cd), jnp.asarray(w, cd))
    e = None if eps is None else jnp.asarray(eps, cd)
    zero, one, big = (jnp.asarray(v, cd) for v in (0.0, 1.0, jnp.finfo(cd).max))
    value = np.asarray(jax.jit(_binary._sigmoid_bce_value)(*args, e), np.float64)
    plain = np.asarray(jax.jit(_binary._sigmoid_bce_terms)(*args, e, zero, one), np.float64)
    exact = np.asarray(jax.jit(_binary._sigmoid_bce_terms)(*args, e, zero, one, big), np.float64)
    rtol = 2 * float(jnp.finfo(cd).eps)
    np.testing.assert_allclose(exact, value, rtol=rtol, atol=0)
    t = np.asarray(args[1], np.float64) * (1 - (eps or 0.0)) + (eps or 0.0) / 2
    with np.errstate(invalid="ignore", over="ignore"):
        coefficients = np.maximum(np.abs(w * pw * t), np.abs(w * (1 - t)))
    finite = np.isfinite(np.asarray(args[0], np.float64)) & (coefficients <= huge * 1.9)
    assert np.any(~finite & ~np.isnan(x)) and np.any(coefficients > 2 * huge)
    np.testing.assert_allclose(plain[finite], value[finite], rtol=rtol, atol=0)
    with np.errstate(invalid="ignore"):
        differ = ~np.isclose(plain, value, rtol=rtol, atol=0, equal_nan=True)
    assert np.all(np.isnan(plain[differ])), plain[differ]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_sbce_label_derivative_is_minus_the_logit(dtype):
    """``d/dy = log sigmoid(-x) - log sigmoid(x) = -x`` (times the weight, and times
    ``1 - eps`` with smoothing), exactly, near 0 too, where the two logarithms are about
    -0.69 each (their difference gave 19% of it at x = 1e-7 in float32), and at +-inf; a weight
    of 0 takes an infinite one out."""
    x = np.array([1e-7, -3e-8, 1e-3, -2.5, 40.0, np.inf, -np.inf, 0.0])
    w = np.array([1.0, 2.0, 0.5, 1.0, 3.0, 0.0, 1.0, 1.0])
    xs = jnp.asarray(x, dtype)
    y = jnp.full(x.shape, 0.5, dtype)

    def total(y, eps):
        return SBCE(xs, y, weights=jnp.asarray(w, dtype), label_smoothing=eps, reduction="sum")

    want = np.where(w == 0, 0.0, -np.asarray(xs, np.float64))  # weight 0 on x = inf: 0
    want = np.where(w == 0, 0.0, w * want)
    np.testing.assert_array_equal(np.asarray(jax.grad(total)(y, 0.0), np.float64), want)
    got = np.asarray(jax.grad(total)(y, 0.25), np.float64)
    np.testing.assert_allclose(got, 0.75 * want, rtol=np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_sbce_label_and_smoothing_derivatives_where_their_factor_is_zero(dtype):
    """``d/dt = w (log sigmoid(-x) - pw log sigmoid(x))`` overflows where the loss does not (a
    pos_weight of a quarter of the range, a weight of 2: the loss is about half the largest
    number, ``d/dt`` about 1.06 times it): the derivative in the label is 0 at a smoothing of
    1, and the smoothing's, ``d/dt (1/2 - y)``, is 0 at a label of 1/2, not ``0 * inf = NaN``."""
    big = float(jnp.finfo(dtype).max) / 4
    x, y = jnp.asarray([-2.0], dtype), jnp.asarray([0.5], dtype)
    pw, w = jnp.asarray([big], dtype), jnp.asarray([2.0], dtype)

    def total(y, eps):
        return SBCE(x, y, pos_weight=pw, weights=w, label_smoothing=eps, reduction="sum")

    assert np.isfinite(float(total(y, 1.0)))
    assert float(jax.grad(total)(y, jnp.asarray(1.0, dtype))[0]) == 0.0
    assert float(jax.grad(total, 1)(y, jnp.asarray(0.1, dtype))) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_sbce_logit_derivative_of_confident_predictions(backend_forms, dtype):
    """``d/dx = w ((1 - t) sigmoid(x) - p_w t sigmoid(-x))`` to a few roundings of itself where
    the prediction is confident, right or wrong: ``(pos + neg) sigmoid(x) - pos`` cancels as
    ``sigmoid(x)`` nears 1 (float32, t = 1: 0 from x = 17 on, where the derivative is
    ``-sigmoid(-x)``; PyTorch's ``sigmoid(x) - t`` too), and as ``pos`` dwarfs
    ``neg`` (a large ``pos_weight``). Both backends' forms."""
    x = np.array([2.0, 8.0, 17.0, 30.0, 50.0, 80.0, -2.0, -17.0, -50.0, 17.0, -17.0, 5.0])
    t = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.25])
    pw = 1e30
    xs = jnp.asarray(x, dtype)
    grad = jax.grad(lambda v: SBCE(v, jnp.asarray(t, dtype), pos_weight=pw, reduction="sum"))
    got = np.asarray(grad(xs), np.float64)
    x64 = np.asarray(xs, np.float64)
    want = (1 - t) * scipy.special.expit(x64) - pw * t * scipy.special.expit(-x64)
    np.testing.assert_allclose(got, want, rtol=8 * np.finfo(dtype).eps)


@pytest.mark.parametrize("big", [1e4, 3e38])
def test_sbce_huge_float32(big):
    x = jnp.asarray(np.array([big, -big, big, -big]), dtype=jnp.float32)
    y = jnp.asarray(np.array([1.0, 0.0, 0.0, 1.0]), dtype=jnp.float32)
    got = np.asarray(SBCE(x, y))
    R.assert_close(got, [0.0, 0.0, big, big], rtol=1e-6)
    g = np.asarray(R.jgrad(lambda a: jnp.sum(SBCE(a, y)))(x))
    R.assert_close(g, [0.0, 0.0, 1.0, -1.0], atol=1e-7)


def test_sbce_equals_two_class_softmax_ce(rng):
    # sigmoid BCE == 2-class softmax CE on logits [0, x]
    x = R.random_logits(rng, (11,))
    y = (rng.random(11) < 0.5).astype(np.int32)
    two = jnp.stack([jnp.zeros(11, jnp.float64), jnp.asarray(x)], axis=-1)
    a = SBCE(jnp.asarray(x), jnp.asarray(y.astype(np.float64)))
    b = jaxce.softmax_cross_entropy_with_integer_labels(two, jnp.asarray(y))
    R.assert_close(a, b, rtol=1e-12, atol=1e-14)
    soft = rng.random(11)
    a = SBCE(jnp.asarray(x), jnp.asarray(soft))
    b = jaxce.softmax_cross_entropy(two, jnp.asarray(np.stack([1 - soft, soft], -1)))
    R.assert_close(a, b, rtol=1e-12, atol=1e-14)
    ga = R.jgrad(lambda v: jnp.sum(SBCE(v, jnp.asarray(soft))))(jnp.asarray(x))
    R.assert_close(ga, 1 / (1 + np.exp(-x)) - soft, rtol=1e-12, atol=1e-15)


def test_sbce_check_grads(rng):
    x = jnp.asarray(R.random_logits(rng, (3, 4), scale=2.0))
    y = jnp.asarray(rng.random((3, 4)))
    pw = jnp.asarray(np.array([1.0, 2.0, 0.5, 3.0]))
    R.check_grads(
        lambda a: SBCE(a, y, pos_weight=pw, label_smoothing=0.1, reduction="mean"),
        (x,),
        order=2,
        modes=("rev",),
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_sbce_dtypes(rng, dtype):
    x = jnp.asarray(R.random_logits(rng, (6, 5), scale=5.0), dtype=dtype)
    y = jnp.asarray((rng.random((6, 5)) < 0.5).astype(np.float32), dtype=dtype)
    got = SBCE(x, y)
    assert got.dtype == jnp.float32
    R.assert_close(
        got,
        R.sigmoid_binary_cross_entropy(
            np.asarray(x.astype(jnp.float64)), np.asarray(y.astype(jnp.float64))
        ),
        rtol=1e-5,
        atol=1e-6,
    )
    gx, gy = R.jgrad(lambda a, b: jnp.sum(SBCE(a, b)), argnums=(0, 1))(x, y)
    assert gx.dtype == dtype and gy.dtype == dtype


def test_sbce_jit_vmap(rng):
    x = jnp.asarray(R.random_logits(rng, (3, 4)))
    y = jnp.asarray(rng.random((3, 4)))
    pw = jnp.asarray(np.array([1.0, 2.0, 0.5, 3.0]))
    f = lambda a, b: SBCE(a, b, pos_weight=pw, reduction="sum")  # noqa: E731
    R.assert_close(jax.jit(f)(x, y), f(x, y), rtol=1e-13)
    expected = [
        R.sigmoid_binary_cross_entropy(
            np.asarray(x[i]), np.asarray(y[i]), pos_weight=np.asarray(pw), reduction="sum"
        )
        for i in range(3)
    ]
    R.assert_close(jax.vmap(f)(x, y), expected, rtol=1e-12)


_sbce_vg = jax.jit(
    jax.value_and_grad(lambda a, b: jnp.sum(jaxce.sigmoid_binary_cross_entropy(a, b)))
)


@given(
    x=hnp.arrays(np.float32, (6,), elements=st.floats(-BIG32, BIG32, width=32)),
    y=hnp.arrays(np.float32, (6,), elements=st.floats(0.0, 1.0, width=32)),
)
def test_sbce_property_no_nan(x, y):
    val, g = _sbce_vg(jnp.asarray(x), jnp.asarray(y))
    assert not np.isnan(float(val))
    assert not np.any(np.isnan(np.asarray(g)))


# ------------------------------------------------------------------------ BCE on probabilities


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_bce_values_and_grads(rng, weighted, reduction):
    p = rng.uniform(0.01, 0.99, size=(4, 3))
    y = rng.random((4, 3))
    kw = dict(reduction=reduction)
    if weighted:
        kw["weights"] = rng.uniform(0.0, 2.0, size=(4, 3))
    got = BCE(jnp.asarray(p), jnp.asarray(y), **_jx(kw))
    R.assert_close(got, R.binary_cross_entropy(p, y, **kw), rtol=1e-12)
    g = R.jgrad(lambda a: jnp.sum(BCE(a, jnp.asarray(y), **_jx(kw))))(jnp.asarray(p))
    g_ref = R.ref_grad(lambda a, xp: xp.sum(R.binary_cross_entropy(a, y, xp=xp, **kw)))(p)
    R.assert_close(g, g_ref, rtol=1e-10)


def test_bce_clamps_logs_at_minus_100():
    # PyTorch BCELoss: log terms are clamped at >= -100, so p in {0, 1} gives at most 100
    p = jnp.asarray(np.array([0.0, 1.0, 0.0, 1.0, 1e-50]))
    y = jnp.asarray(np.array([1.0, 0.0, 0.0, 1.0, 1.0]))
    got = np.asarray(BCE(p, y))
    R.assert_close(got, [100.0, 100.0, 0.0, 0.0, 100.0], rtol=1e-12)
    R.assert_close(BCE(p, y, reduction="mean"), 60.0, rtol=1e-12)


def test_bce_hand_derived():
    p = np.array([0.9, 0.2, 0.6])
    y = np.array([1.0, 0.0, 0.3])
    w = np.array([2.0, 1.0, 0.5])
    per = -w * (y * np.log(p) + (1 - y) * np.log(1 - p))
    R.assert_close(
        BCE(jnp.asarray(p), jnp.asarray(y), weights=jnp.asarray(w), reduction="mean"),
        per.mean(),
        rtol=1e-13,
    )


def test_bce_matches_sigmoid_bce(rng):
    x = R.random_logits(rng, (10,), scale=2.0)
    y = rng.random(10)
    a = BCE(jaxce.sigmoid(jnp.asarray(x)), jnp.asarray(y))
    R.assert_close(a, R.sigmoid_binary_cross_entropy(x, y), rtol=1e-10)


def test_bce_check_grads_and_dtypes(rng):
    p = jnp.asarray(rng.uniform(0.1, 0.9, size=(3, 4)))
    y = jnp.asarray(rng.random((3, 4)))
    R.check_grads(lambda a: BCE(a, y, reduction="mean"), (p,), order=2, modes=("rev",), eps=1e-4)
    pb = p.astype(jnp.bfloat16)
    out = BCE(pb, y.astype(jnp.bfloat16))
    assert out.dtype == jnp.float32
    assert R.jgrad(lambda a: jnp.sum(BCE(a, y.astype(jnp.bfloat16))))(pb).dtype == jnp.bfloat16
    R.assert_close(
        jax.jit(BCE)(p, y), R.binary_cross_entropy(np.asarray(p), np.asarray(y)), rtol=1e-12
    )
    R.assert_close(
        jax.vmap(BCE)(p, y), R.binary_cross_entropy(np.asarray(p), np.asarray(y)), rtol=1e-12
    )
