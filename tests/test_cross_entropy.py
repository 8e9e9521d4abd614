"""softmax_cross_entropy_with_integer_labels, softmax_cross_entropy and nll_loss.

Values and gradients are compared with the float64 references in ``_reference.py``; a few PyTorch
cases are derived by hand here so that the PyTorch semantics are tested without torch.
"""

import functools
import itertools

import _reference as R
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxce
from jaxce import _xla

F64 = np.float64
CE_INT = R.jitted(jaxce.softmax_cross_entropy_with_integer_labels)
CE_SOFT = R.jitted(jaxce.softmax_cross_entropy)

# (logits shape, class axis): odd sizes, class axis not last, tuple axes
INT_LAYOUTS = [
    ((7, 5), -1),
    ((4, 5, 3), 1),  # PyTorch's [N, C, d1]
    ((2, 3, 6), -1),
    ((3, 5), 0),
    ((3, 4, 5), (1, 2)),
    ((2, 3, 4, 5), (1, 3)),
    ((2, 3, 4, 5), (3, 1)),  # unsorted tuple: flattened in the given order, as optax
    ((1, 1), -1),
]


def _batch_shape(shape, axis):
    return R._class_shape_removed(shape, axis)


def _num_classes(shape, axis):
    axes = (axis,) if isinstance(axis, int) else axis
    return int(np.prod([shape[a] for a in axes]))


def _labels(rng, shape, axis):
    return rng.integers(0, _num_classes(shape, axis), size=_batch_shape(shape, axis)).astype(
        np.int32
    )


def _jx(kwargs):
    """Reference kwargs -> jaxce kwargs (arrays to jnp)."""
    out = {}
    for k, v in kwargs.items():
        if k == "logit_soft_cap_value":
            k = "logit_soft_cap"
        if isinstance(v, np.ndarray):
            v = jnp.asarray(v)
        out[k] = v
    return out


# ------------------------------------------------------------------------ integer labels: values


@pytest.mark.parametrize("shape,axis", INT_LAYOUTS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_int_labels_layouts(rng, shape, axis, reduction):
    x = R.random_logits(rng, shape)
    y = _labels(rng, shape, axis)
    got = CE_INT(jnp.asarray(x), jnp.asarray(y), axis=axis, reduction=reduction)
    expected = R.softmax_cross_entropy_with_integer_labels(x, y, axis=axis, reduction=reduction)
    assert got.shape == np.shape(expected)
    assert got.dtype == jnp.float64
    R.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_int_labels_tuple_axis_is_flattened_row_major(rng):
    # labels index the flattened class axes: class (i, j) of axes (1, 2) is i * d2 + j
    x = R.random_logits(rng, (3, 4, 5))
    y = np.array([0, 7, 19], np.int32)
    got = CE_INT(jnp.asarray(x), jnp.asarray(y), axis=(1, 2))
    flat = x.reshape(3, 20)
    expected = np.log(np.exp(flat).sum(-1)) - flat[np.arange(3), y]
    R.assert_close(got, expected, rtol=1e-12)


OPTION_GRID = list(
    itertools.product(
        [None, 1, -100],  # ignore_index
        [False, True],  # class_weights
        [0.0, 0.2],  # label_smoothing
        ["none", "mean"],  # "sum" is covered by test_int_labels_layouts
    )
)


@pytest.mark.parametrize("ignore_index,weighted,eps,reduction", OPTION_GRID)
def test_int_labels_option_grid(rng, ignore_index, weighted, eps, reduction):
    n, c = 9, 4
    x = R.random_logits(rng, (n, c))
    y = rng.integers(0, c, size=n).astype(np.int32)
    if ignore_index is not None:
        y[[0, 4]] = ignore_index
    kw = dict(ignore_index=ignore_index, label_smoothing=eps, reduction=reduction)
    if weighted:
        kw["class_weights"] = rng.uniform(0.2, 2.0, size=c)
    expected = R.softmax_cross_entropy_with_integer_labels(x, y, **kw)
    got = CE_INT(jnp.asarray(x), jnp.asarray(y), **_jx(kw))
    R.assert_close(got, expected, rtol=1e-12, atol=1e-13)

    cot = rng.normal(size=np.shape(expected))

    def loss(v):
        return jnp.sum(CE_INT(v, jnp.asarray(y), **_jx(kw)) * jnp.asarray(cot))

    g = R.jgrad(loss)(jnp.asarray(x))
    g_ref = R.ref_grad(
        lambda v, xp: xp.sum(R.softmax_cross_entropy_with_integer_labels(v, y, xp=xp, **kw) * cot)
    )(x)
    R.assert_close(g, g_ref, rtol=1e-10, atol=1e-13)
    if ignore_index is not None:
        np.testing.assert_array_equal(np.asarray(g)[[0, 4]], 0.0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(z_loss=1e-2),
        dict(logit_soft_cap_value=2.5),
        dict(z_loss=1e-3, logit_soft_cap_value=4.0, label_smoothing=0.1),
        dict(z_loss=1e-2, class_weights=np.array([0.5, 2.0, 1.0, 3.0, 0.1]), reduction="mean"),
        dict(label_smoothing=1.0),
        dict(
            label_smoothing=0.3,
            class_weights=np.array([0.5, 2.0, 1.0, 3.0, 0.1]),
            ignore_index=2,
            z_loss=1e-2,
            logit_soft_cap_value=3.0,
            reduction="mean",
        ),
    ],
    ids=["zloss", "softcap", "zloss+cap+smooth", "zloss+weights+mean", "smooth1", "all"],
)
def test_int_labels_zloss_softcap(rng, kw):
    x = R.random_logits(rng, (6, 5), scale=4.0)
    y = rng.integers(0, 5, size=6).astype(np.int32)
    got = CE_INT(jnp.asarray(x), jnp.asarray(y), **_jx(kw))
    expected = R.softmax_cross_entropy_with_integer_labels(x, y, **kw)
    R.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    g = R.jgrad(lambda v: jnp.sum(CE_INT(v, jnp.asarray(y), **_jx(kw))))(jnp.asarray(x))
    g_ref = R.ref_grad(
        lambda v, xp: xp.sum(R.softmax_cross_entropy_with_integer_labels(v, y, xp=xp, **kw))
    )(x)
    R.assert_close(g, g_ref, rtol=1e-10, atol=1e-13)


def test_zloss_hand_computed():
    # z_loss adds zl * w_y * lse**2 (PaLM), scaled by the label's class weight
    x = np.array([[1.0, 2.0, 0.5]])
    lse = np.log(np.exp(x).sum())
    w = np.array([1.0, 3.0, 1.0])
    got = CE_INT(
        jnp.asarray(x),
        jnp.asarray(np.array([1], np.int32)),
        z_loss=0.1,
        class_weights=jnp.asarray(w),
    )
    R.assert_close(got, [3.0 * (lse - 2.0) + 0.1 * 3.0 * lse**2], rtol=1e-13)


def test_soft_cap_hand_computed():
    x = np.array([[10.0, -20.0, 0.3]])
    z = 5.0 * np.tanh(x / 5.0)
    got = CE_INT(jnp.asarray(x), jnp.asarray(np.array([0], np.int32)), logit_soft_cap=5.0)
    R.assert_close(got, [np.log(np.exp(z).sum()) - z[0, 0]], rtol=1e-13)


def test_torch_semantics_hand_derived():
    """PyTorch CrossEntropyLoss(weight, ignore_index, label_smoothing, reduction='mean'), by hand.

    loss_i = (1-eps) w_y (-log p_y) + eps/C sum_c w_c (-log p_c); mean = sum / sum_{kept} w_y.
    """
    x = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0], [1.0, 1.0, 1.0], [0.0, -1.0, 3.0]])
    y = np.array([0, 2, -100, 1], np.int32)
    w = np.array([0.2, 1.0, 3.0])
    eps = 0.1
    logp = x - np.log(np.exp(x).sum(1, keepdims=True))
    losses = []
    for i, yi in enumerate(y):
        if yi == -100:
            losses.append(0.0)
            continue
        losses.append((1 - eps) * w[yi] * -logp[i, yi] + eps / 3 * np.sum(w * -logp[i]))
    mean = sum(losses) / (w[0] + w[2] + w[1])
    kw = dict(class_weights=jnp.asarray(w), ignore_index=-100, label_smoothing=eps)
    got_none = CE_INT(jnp.asarray(x), jnp.asarray(y), **kw)
    got_mean = CE_INT(jnp.asarray(x), jnp.asarray(y), reduction="mean", **kw)
    got_sum = CE_INT(jnp.asarray(x), jnp.asarray(y), reduction="sum", **kw)
    R.assert_close(got_none, losses, rtol=1e-13)
    R.assert_close(got_mean, mean, rtol=1e-13)
    R.assert_close(got_sum, sum(losses), rtol=1e-13)
    # gradient of the mean: ((1-eps) w_y (p - onehot) + eps/C (sum_c w_c) p - eps/C w) / W
    p = np.exp(logp)
    g = np.zeros_like(x)
    for i, yi in enumerate(y):
        if yi == -100:
            continue
        onehot = np.eye(3)[yi]
        g[i] = (1 - eps) * w[yi] * (p[i] - onehot) + eps / 3 * (w.sum() * p[i] - w)
    g /= w[0] + w[2] + w[1]
    got_g = R.jgrad(lambda v: CE_INT(v, jnp.asarray(y), reduction="mean", **kw))(jnp.asarray(x))
    R.assert_close(got_g, g, rtol=1e-12, atol=1e-15)


def test_class_axis_not_last_torch_layout(rng):
    # [N, C, d1] with axis=1 equals moving C last
    x = R.random_logits(rng, (3, 4, 5))
    y = rng.integers(0, 4, size=(3, 5)).astype(np.int32)
    a = CE_INT(jnp.asarray(x), jnp.asarray(y), axis=1)
    b = CE_INT(jnp.asarray(np.moveaxis(x, 1, -1)), jnp.asarray(y))
    R.assert_close(a, b, rtol=1e-14)
    R.assert_close(a, R.softmax_cross_entropy_with_integer_labels(x, y, axis=1), rtol=1e-12)


# ------------------------------------------------------------------------ where / masked vocab


def test_int_labels_where_full_shape(rng):
    x = R.random_logits(rng, (6, 7))
    m = rng.random((6, 7)) < 0.6
    m[0] = False  # no admissible entry: loss 0
    y = rng.integers(0, 7, size=6).astype(np.int32)
    m[np.arange(1, 6), y[1:]] = True
    m[5, y[5]] = False  # label logit read from logits although excluded (optax)
    for reduction in ("none", "mean", "sum"):
        got = CE_INT(jnp.asarray(x), jnp.asarray(y), where=jnp.asarray(m), reduction=reduction)
        expected = R.softmax_cross_entropy_with_integer_labels(x, y, where=m, reduction=reduction)
        R.assert_close(got, expected, rtol=1e-12, err_msg=reduction)
    assert float(CE_INT(jnp.asarray(x), jnp.asarray(y), where=jnp.asarray(m))[0]) == 0.0
    g = R.jgrad(lambda v: jnp.sum(CE_INT(v, jnp.asarray(y), where=jnp.asarray(m))))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g)[0], 0.0)
    g_ref = R.ref_grad(
        lambda v, xp: xp.sum(R.softmax_cross_entropy_with_integer_labels(v, y, where=m, xp=xp))
    )(x)
    R.assert_close(g, g_ref, rtol=1e-10, atol=1e-14)


def test_int_labels_where_batch_shape(rng):
    # optax: `where` of the batch shape selects examples
    x = R.random_logits(rng, (6, 4))
    y = rng.integers(0, 4, size=6).astype(np.int32)
    m = np.array([True, False, True, True, False, True])
    got = CE_INT(jnp.asarray(x), jnp.asarray(y), where=jnp.asarray(m))
    full = R.softmax_cross_entropy_with_integer_labels(x, y)
    R.assert_close(got, np.where(m, full, 0.0), rtol=1e-12)
    got_mean = CE_INT(jnp.asarray(x), jnp.asarray(y), where=jnp.asarray(m), reduction="mean")
    R.assert_close(got_mean, full[m].mean(), rtol=1e-12)


# On CPU the derivative scales the exponentials the forward pass kept (jaxce._xla.
# saves_exponentials: float32 and float64 logits at any size, with a soft cap too, and with
# smoothing up to a budget; narrower logits with any option up to a budget);
# elsewhere, and above it, it computes them again. Both against the float64 reference, on logits
# with masked (-inf) entries, a where mask, an ignored row, a NaN-free empty row and a finite
# logit whose exponential underflows to 0. "signed": kept exponentials of any size carry the
# admissible classes for smoothing's derivative (above _rows.SIGNED_BYTES they do; these
# logits are smaller), which must tell that logit from a masked class (_rows.kept_admissible).
KEPT_OR_RECOMPUTED = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.2),
    "smoothing+weights+zloss+ignore": dict(
        label_smoothing=0.3,
        class_weights=np.array([0.5, 2.0, 1.0, 3.0, 0.1, 1.5]),
        z_loss=1e-2,
        ignore_index=3,
    ),
    "soft_cap": dict(logit_soft_cap_value=3.0),
    "soft_cap+weights+zloss": dict(
        logit_soft_cap_value=2.5,
        class_weights=np.array([0.5, 2.0, 1.0, 3.0, 0.1, 1.5]),
        z_loss=1e-2,
    ),
    "everything": dict(label_smoothing=0.1, logit_soft_cap_value=4.0, z_loss=1e-3),
}


@pytest.mark.usefixtures("untraced")
@pytest.mark.parametrize("how", ["as_chosen", "recomputed", "signed"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "where"])
@pytest.mark.parametrize("kw", list(KEPT_OR_RECOMPUTED.values()), ids=list(KEPT_OR_RECOMPUTED))
def test_kept_and_recomputed_exponentials_match_the_reference(monkeypatch, rng, kw, masked, how):
    from jaxce import _rows

    if how == "recomputed":
        monkeypatch.setattr(_xla, "saves_exponentials", lambda *a, **k: False)
    if how == "signed":
        monkeypatch.setattr(_rows, "SIGNED_BYTES", 0)
    x = R.random_logits(rng, (7, 6), scale=4.0)
    x[1, 2:4] = -np.inf
    x[5, :] = -np.inf  # an empty row
    x[6, 0] = -1000.0  # admissible, its exponential 0 (smoothing still spreads over it)
    y = np.array([0, 1, 2, 3, 4, 5, 1], np.int32)
    kw = dict(kw, reduction="mean")
    if masked:
        m = np.ones((7, 6), bool)
        m[0, 3:] = False
        m[4, :2] = False
        kw["where"] = m
    cot = rng.normal(size=())
    expected = R.softmax_cross_entropy_with_integer_labels(x, y, **kw)
    got = CE_INT(jnp.asarray(x), jnp.asarray(y), **_jx(kw))
    R.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    g = R.jgrad(lambda v: cot * CE_INT(v, jnp.asarray(y), **_jx(kw)))(jnp.asarray(x))
    g_ref = R.ref_grad(
        lambda v, xp: cot * R.softmax_cross_entropy_with_integer_labels(v, y, xp=xp, **kw)
    )(x)
    R.assert_close(g, g_ref, rtol=1e-10, atol=1e-13)
    assert np.all(np.isfinite(np.asarray(g)))


# bfloat16 and float16 logits keep their float32 exponentials on CPU with smoothing and a soft
# cap too (within _xla.KEPT_BYTES): the kept and the recomputed value_and_grad agree with each
# other and with float64 on the same (rounded) logits, with -inf logits and an empty row.
@pytest.mark.usefixtures("untraced")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize(
    "name", ["plain", "smoothing", "soft_cap", "everything", "smoothing+weights+zloss+ignore"]
)
def test_narrow_kept_exponentials_match_the_recomputed(monkeypatch, rng, name, dtype):
    from jaxce import _rows

    monkeypatch.setattr(_rows, "SIGNED_BYTES", 0)  # kept for smoothing, they carry its classes
    kw = dict(KEPT_OR_RECOMPUTED[name], reduction="mean")
    x = R.random_logits(rng, (7, 6), scale=4.0)
    x[1, 2:4] = -np.inf
    x[5, :] = -np.inf  # an empty row
    x[6, 0] = -1000.0  # admissible, its exponential 0 (smoothing still spreads over it)
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float64))  # the logits the dtype holds
    y = np.array([0, 1, 2, 3, 4, 5, 1], np.int32)
    xn = jnp.asarray(x, dtype)
    options = dict(smoothing="label_smoothing" in kw, soft_cap="logit_soft_cap_value" in kw)
    if jax.default_backend() == "cpu":
        assert _xla.saves_exponentials(xn, **options)

    def value_and_grad():
        return jax.jit(jax.value_and_grad(lambda v: CE_INT(v, jnp.asarray(y), **_jx(kw))))(xn)

    kept = value_and_grad()
    monkeypatch.setattr(_xla, "saves_exponentials", lambda *a, **k: False)
    recomputed = value_and_grad()
    expected = R.softmax_cross_entropy_with_integer_labels(x, y, **kw)
    g_ref = R.ref_grad(
        lambda v, xp: R.softmax_cross_entropy_with_integer_labels(v, y, xp=xp, **kw)
    )(x)
    step = 2.0 ** -(jnp.finfo(dtype).nmant + 1)  # a rounding of the gradient's dtype
    for loss, g in (kept, recomputed):
        assert loss.dtype == jnp.float32 and g.dtype == jnp.dtype(dtype)
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
        R.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        R.assert_close(g, g_ref, rtol=2 * step, atol=1e-4)
    R.assert_close(kept[1], recomputed[1], rtol=2 * step, atol=1e-4)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_masked_vocab_neg_inf_logits_finite(rng, eps):
    # -inf logits (padded vocabulary) with finite label logits: finite loss and gradient, and
    # smoothing spreads over admissible classes only
    x = R.random_logits(rng, (5, 8))
    x[:, 5:] = -np.inf
    x[2, 1] = -np.inf
    y = np.array([0, 4, 3, 2, 1], np.int32)
    kw = dict(label_smoothing=eps)
    got = CE_INT(jnp.asarray(x), jnp.asarray(y), **kw)
    assert np.all(np.isfinite(np.asarray(got)))
    R.assert_close(got, R.softmax_cross_entropy_with_integer_labels(x, y, **kw), rtol=1e-12)
    # same as dropping the masked columns (row 2 handled separately)
    keep = x[[0, 1, 3, 4], :5]
    R.assert_close(
        np.asarray(got)[[0, 1, 3, 4]],
        R.softmax_cross_entropy_with_integer_labels(keep, y[[0, 1, 3, 4]], **kw),
        rtol=1e-12,
    )
    for reduction in ("sum", "mean"):
        g = R.jgrad(lambda v, r=reduction: CE_INT(v, jnp.asarray(y), reduction=r, **kw))(
            jnp.asarray(x)
        )
        g = np.asarray(g)
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[:, 5:], 0.0)
        assert g[2, 1] == 0.0


@pytest.mark.parametrize("how", ["neginf", "where"])
def test_fully_masked_rows_zero_loss_and_grad(rng, how):
    x = R.random_logits(rng, (4, 5))
    y = np.array([1, 2, 3, 0], np.int32)
    m = np.ones((4, 5), bool)
    m[1] = False
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    if how == "neginf":
        x[1] = -np.inf
    else:
        kw["where"] = jnp.asarray(m)
    for reduction in ("none", "sum", "mean"):
        out = CE_INT(jnp.asarray(x), jnp.asarray(y), reduction=reduction, **kw)
        assert np.all(np.isfinite(np.asarray(out)))

        def f(v, reduction=reduction):
            return jnp.sum(CE_INT(v, jnp.asarray(y), reduction=reduction, **kw))

        g = np.asarray(R.jgrad(f)(jnp.asarray(x)))
        assert not np.any(np.isnan(g))
        np.testing.assert_array_equal(g[1], 0.0)
    per = np.asarray(CE_INT(jnp.asarray(x), jnp.asarray(y), **kw))
    assert per[1] == 0.0
    xr = x.copy()
    xr[1] = 0.0
    ref = R.softmax_cross_entropy_with_integer_labels(
        xr, y, where=m, label_smoothing=0.1, z_loss=1e-3, reduction="mean"
    )
    got = CE_INT(jnp.asarray(x), jnp.asarray(y), reduction="mean", **kw)
    R.assert_close(got, ref, rtol=1e-12)  # the masked row counts 0 in the mean's denominator


def test_where_false_huge_logits_excluded(rng):
    x = R.random_logits(rng, (4, 6))
    x[:, 3] = 1e30
    m = np.ones((4, 6), bool)
    m[:, 3] = False
    y = np.array([0, 1, 2, 5], np.int32)
    got = CE_INT(jnp.asarray(x), jnp.asarray(y), where=jnp.asarray(m))
    x_drop = np.delete(x, 3, axis=1)
    y_drop = np.where(y > 3, y - 1, y)
    R.assert_close(got, R.softmax_cross_entropy_with_integer_labels(x_drop, y_drop), rtol=1e-12)
    g = np.asarray(
        R.jgrad(lambda v: jnp.sum(CE_INT(v, jnp.asarray(y), where=jnp.asarray(m))))(jnp.asarray(x))
    )
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[:, 3], 0.0)


@pytest.mark.parametrize("big", [1e4, 3e38])
def test_huge_float32_logits(big):
    x = np.array(
        [[big, big, -big, 0.0], [-big, 1.0, -big, -big], [big, -big, -big, -big]], np.float32
    )
    y = np.array([0, 1, 0], np.int32)
    xj = jnp.asarray(x)
    got = CE_INT(xj, jnp.asarray(y))
    assert got.dtype == jnp.float32
    R.assert_close(got, [np.log(2.0), 0.0, 0.0], rtol=1e-6, atol=1e-6)
    g = np.asarray(R.jgrad(lambda v: jnp.sum(CE_INT(v, jnp.asarray(y))))(xj))
    R.assert_close(g, [[-0.5, 0.5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], atol=1e-6)
    g = np.asarray(
        R.jgrad(
            lambda v: CE_INT(v, jnp.asarray(y), label_smoothing=0.1, z_loss=1e-4, reduction="mean")
        )(xj)
    )
    assert np.all(np.isfinite(g))


# ------------------------------------------------------------------------ ignore_index / bad labels


@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_ignore_index_zero_loss_zero_grad(rng, ignore_index):
    x = R.random_logits(rng, (6, 4))
    y = np.array([0, ignore_index, 3, ignore_index, 1, 2 if ignore_index != 2 else 0], np.int32)
    kw = dict(
        ignore_index=ignore_index,
        label_smoothing=0.1,
        z_loss=1e-2,
        class_weights=jnp.asarray(np.array([1.0, 2.0, 0.5, 1.5])),
    )
    per = np.asarray(CE_INT(jnp.asarray(x), jnp.asarray(y), **kw))
    np.testing.assert_array_equal(per[[1, 3]], 0.0)
    assert np.all(per[[0, 2, 4, 5]] > 0)
    g = np.asarray(
        R.jgrad(lambda v: CE_INT(v, jnp.asarray(y), reduction="mean", **kw))(jnp.asarray(x))
    )
    np.testing.assert_array_equal(g[[1, 3]], 0.0)
    assert np.all(np.abs(g[[0, 2, 4, 5]]).sum(-1) > 0)


@pytest.mark.parametrize("fn_name", ["ce", "nll", "focal"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(rng, fn_name, reduction):
    x = R.random_logits(rng, (3, 4))
    y = np.full(3, -100, np.int32)
    fn = {"ce": CE_INT, "nll": jaxce.nll_loss, "focal": jaxce.softmax_focal_loss}[fn_name]
    arg = jnp.asarray(x if fn_name != "nll" else R.log_softmax(x))

    def f(v):
        return jnp.sum(fn(v, jnp.asarray(y), ignore_index=-100, reduction=reduction))

    val, g = jax.jit(jax.value_and_grad(f))(arg)
    assert float(val) == 0.0
    np.testing.assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize("bad", [5, -1, 1000])
@pytest.mark.parametrize("jit", [False, True])
def test_out_of_range_label_is_nan_only_for_that_example(rng, bad, jit):
    x = R.random_logits(rng, (4, 5))
    y = np.array([0, bad, 4, 2], np.int32)
    f = lambda v, t: jaxce.softmax_cross_entropy_with_integer_labels(v, t, ignore_index=-100)  # noqa
    if jit:
        f = jax.jit(f)
    per = np.asarray(f(jnp.asarray(x), jnp.asarray(y)))
    assert np.isnan(per[1])
    ok = [0, 2, 3]
    R.assert_close(per[ok], R.softmax_cross_entropy_with_integer_labels(x[ok], y[ok]), rtol=1e-12)
    for reduction in ("mean", "sum"):
        val = CE_INT(jnp.asarray(x), jnp.asarray(y), reduction=reduction)
        assert np.isnan(float(val))
    # other rows' gradients are unaffected
    g = np.asarray(
        R.jgrad(
            lambda v: jnp.sum(jnp.where(jnp.asarray(y) == bad, 0.0, CE_INT(v, jnp.asarray(y))))
        )(jnp.asarray(x))
    )
    R.assert_close(g[ok], R.softmax(x[ok]) - np.eye(5)[y[ok]], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["ce", "nll", "focal"])
@pytest.mark.parametrize("bad", [5, -1])
def test_out_of_range_label_makes_its_whole_gradient_row_nan(rng, name, bad):
    """In reverse mode an out-of-range label's row of the gradient is NaN in every column (it
    has no column of its own), not only in the column it is clamped to; the other rows' are
    the reference's."""
    x = R.random_logits(rng, (4, 5))
    y = np.array([0, bad, 4, 2], np.int32)
    arg = x if name != "nll" else R.log_softmax(x)
    loss, ref = {
        "ce": (CE_INT, R.softmax_cross_entropy_with_integer_labels),
        "nll": (jaxce.nll_loss, R.nll_loss),
        "focal": (jaxce.softmax_focal_loss, R.softmax_focal_loss),
    }[name]
    g = np.asarray(R.jgrad(lambda v: loss(v, jnp.asarray(y), reduction="sum"))(jnp.asarray(arg)))
    assert np.isnan(g[1]).all(), g[1]
    ok = [0, 2, 3]
    want = R.ref_grad(ref)(arg[ok], y[ok], reduction="sum")
    R.assert_close(g[ok], want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_nll_forward_mode_reads_only_the_label_column(weighted):
    """``jacfwd`` of ``nll_loss(log(p))`` where a class other than the label has probability 0
    (its log's tangent is infinite): the label's column alone makes the derivative, as JAX's
    own derivative of ``-log(p)[y]``; an ignored row's is 0 and an out-of-range one's NaN."""
    p = jnp.array([[0.0, 0.3, 0.7], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    y = jnp.array([2, 0, 9, -100])
    w = jnp.array([0.5, 2.0, 1.5]) if weighted else None
    kept = jnp.array([0, 1])

    def loss(q):
        return jaxce.nll_loss(jnp.log(q), y, ignore_index=-100, class_weights=w)

    def ref(q):
        w_y = jnp.ones(2) if w is None else w[y[kept]]
        return -w_y * jnp.log(q[kept, y[kept]])

    jac = np.asarray(jax.jacfwd(loss)(p))
    np.testing.assert_allclose(jac[kept], np.asarray(jax.jacfwd(ref)(p)), rtol=1e-6)
    assert np.isnan(jac[2]).all()
    np.testing.assert_array_equal(jac[3], 0.0)


# ------------------------------------------------------------------------ gradients


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(label_smoothing=0.2, class_weights=np.array([0.5, 2.0, 1.0, 1.5])),
        dict(z_loss=0.05, logit_soft_cap=3.0, reduction="mean"),
        dict(ignore_index=1, label_smoothing=0.1, reduction="mean"),
    ],
    ids=["plain", "smooth+weights", "zloss+cap", "ignore+smooth"],
)
def test_int_labels_check_grads(rng, kw):
    x = jnp.asarray(R.random_logits(rng, (3, 4), scale=1.0))
    y = jnp.asarray(np.array([0, 1, 3], np.int32))
    kw = _jx(kw)
    R.check_grads(lambda v: CE_INT(v, y, **kw), (x,), order=2, modes=("rev",))


def test_int_labels_grad_of_grad_matches_reference(rng):
    # reverse-over-reverse: Hessian-vector product of the mean loss
    x = R.random_logits(rng, (3, 4), scale=1.0)
    y = np.array([0, 2, 3], np.int32)
    kw = dict(label_smoothing=0.1, z_loss=1e-2, reduction="mean")
    v = rng.normal(size=x.shape)

    def gv(fn):
        return lambda a: jnp.sum(R.jgrad(fn)(a) * jnp.asarray(v))

    got = R.jgrad(gv(lambda a: CE_INT(a, jnp.asarray(y), **kw)))(jnp.asarray(x))
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        expected = R.jgrad(
            gv(lambda a: R.softmax_cross_entropy_with_integer_labels(a, y, xp=jnp, **kw))
        )(jnp.asarray(x))
    R.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_gradient_is_softmax_minus_onehot(rng):
    x = R.random_logits(rng, (5, 6))
    y = rng.integers(0, 6, size=5).astype(np.int32)
    g = R.jgrad(lambda v: jnp.sum(CE_INT(v, jnp.asarray(y))))(jnp.asarray(x))
    R.assert_close(g, R.softmax(x) - np.eye(6)[y], rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------ soft labels

SOFT_LAYOUTS = [((6, 5), -1), ((4, 5, 3), 1), ((3, 4, 5), (1, 2)), ((2, 3, 4), 0), ((1, 7), -1)]


@pytest.mark.parametrize("shape,axis", SOFT_LAYOUTS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_soft_layouts(rng, shape, axis, reduction):
    x = R.random_logits(rng, shape)
    ax = axis if isinstance(axis, int) else axis
    y = R.random_probs(rng, shape, axis=ax)
    got = CE_SOFT(jnp.asarray(x), jnp.asarray(y), axis=axis, reduction=reduction)
    expected = R.softmax_cross_entropy(x, y, axis=axis, reduction=reduction)
    assert got.shape == np.shape(expected)
    R.assert_close(got, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.25])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_soft_options_and_label_gradient(rng, weighted, eps, reduction):
    x = R.random_logits(rng, (5, 4))
    y = R.random_probs(rng, (5, 4))
    kw = dict(label_smoothing=eps, reduction=reduction)
    if weighted:
        kw["class_weights"] = rng.uniform(0.3, 2.0, size=4)
    got = CE_SOFT(jnp.asarray(x), jnp.asarray(y), **_jx(kw))
    R.assert_close(got, R.softmax_cross_entropy(x, y, **kw), rtol=1e-12, atol=1e-13)
    gx, gy = R.jgrad(lambda a, b: jnp.sum(CE_SOFT(a, b, **_jx(kw))), argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(y)
    )
    gx_ref, gy_ref = R.ref_grad(
        lambda a, b, xp: xp.sum(R.softmax_cross_entropy(a, b, xp=xp, **kw)), argnums=(0, 1)
    )(x, y)
    R.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-13)
    R.assert_close(gy, gy_ref, rtol=1e-10, atol=1e-13)


def test_soft_label_gradient_is_minus_log_probs(rng):
    # dL/dy_c = -(1 - eps) w_c log p_c  (distillation)
    x = R.random_logits(rng, (3, 4))
    y = R.random_probs(rng, (3, 4))
    w = np.array([0.5, 1.0, 2.0, 1.5])
    gy = R.jgrad(
        lambda b: jnp.sum(
            CE_SOFT(jnp.asarray(x), b, label_smoothing=0.2, class_weights=jnp.asarray(w))
        )
    )(jnp.asarray(y))
    R.assert_close(gy, -(0.8) * w * R.log_softmax(x), rtol=1e-12)


@pytest.mark.parametrize("eps", [None, 0.1, 1.0])
@pytest.mark.parametrize("masked", [False, True])
def test_soft_label_gradient_is_zero_where_nothing_depends_on_the_label(eps, masked):
    """A class of weight 0 (or smoothing of 1) on a -inf logit (a masked vocabulary entry):
    the loss does not depend on its label, whose derivative is 0, not 0 * inf = NaN."""
    x = jnp.array([[-jnp.inf, 1.0, 2.0], [0.5, -jnp.inf, -1.0]])
    y = jnp.array([[0.0, 0.3, 0.7], [0.6, 0.0, 0.4]])
    w = jnp.array([0.0, 0.0, 1.0]) if eps != 1.0 else jnp.array([0.5, 1.0, 2.0])
    kw = dict(class_weights=w, where=jnp.array([[False, True, True]]) if masked else None)
    if eps is not None:
        kw["label_smoothing"] = eps
    gy = jax.grad(lambda b: jnp.sum(CE_SOFT(x, b, **kw)))(y)
    log_p = np.asarray(jax.nn.log_softmax(jnp.where(kw["where"], x, -jnp.inf) if masked else x))
    scale = 1.0 if eps is None else 1.0 - eps
    coef = scale * np.asarray(w)
    want = -coef * np.where(coef == 0, 0.0, log_p)
    np.testing.assert_allclose(np.asarray(gy), want, rtol=1e-6)
    assert np.isfinite(np.asarray(gy)).all()


def test_soft_hand_derived_torch_probability_targets():
    # torch: loss_i = -sum_c w_c y'_c log p_c, y' = (1-eps) y + eps/C; mean divides by N
    x = np.array([[1.0, 2.0, 3.0], [0.0, 0.5, -0.5]])
    y = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    w = np.array([1.0, 2.0, 0.5])
    eps = 0.3
    logp = x - np.log(np.exp(x).sum(1, keepdims=True))
    yp = (1 - eps) * y + eps / 3
    per = -(w * yp * logp).sum(1)
    got = CE_SOFT(
        jnp.asarray(x),
        jnp.asarray(y),
        class_weights=jnp.asarray(w),
        label_smoothing=eps,
        reduction="mean",
    )
    R.assert_close(got, per.mean(), rtol=1e-13)


def test_soft_where_and_neg_inf(rng):
    x = R.random_logits(rng, (5, 6))
    y = R.random_probs(rng, (5, 6))
    m = rng.random((5, 6)) < 0.7
    m[0] = False
    y = np.where(m, y, 0.0)
    got = CE_SOFT(jnp.asarray(x), jnp.asarray(y), where=jnp.asarray(m))
    R.assert_close(got, R.softmax_cross_entropy(x, y, where=m), rtol=1e-12)
    assert float(got[0]) == 0.0
    # -inf logits with zero labels: 0 * log 0 = 0, finite loss and gradients
    x_inf = np.where(m, x, -np.inf)
    for eps in (0.0, 0.1):
        got = CE_SOFT(jnp.asarray(x_inf), jnp.asarray(y), label_smoothing=eps)
        assert np.all(np.isfinite(np.asarray(got)))
        R.assert_close(got, R.softmax_cross_entropy(x, y, where=m, label_smoothing=eps), rtol=1e-12)
        gx, gy = R.jgrad(
            lambda a, b, e=eps: jnp.sum(CE_SOFT(a, b, label_smoothing=e)), argnums=(0, 1)
        )(jnp.asarray(x_inf), jnp.asarray(y))
        assert not np.any(np.isnan(np.asarray(gx))) and not np.any(np.isnan(np.asarray(gy)))
        np.testing.assert_array_equal(np.asarray(gx)[~m], 0.0)
        np.testing.assert_array_equal(np.asarray(gx)[0], 0.0)


def test_soft_where_batch_shape(rng):
    x = R.random_logits(rng, (4, 3))
    y = R.random_probs(rng, (4, 3))
    m = np.array([True, False, True, False])
    got = CE_SOFT(jnp.asarray(x), jnp.asarray(y), where=jnp.asarray(m))
    R.assert_close(got, np.where(m, R.softmax_cross_entropy(x, y), 0.0), rtol=1e-12)


def test_soft_mean_over_zero_rows_is_zero():
    x = jnp.zeros((0, 3), jnp.float64)
    y = jnp.zeros((0, 3), jnp.float64)
    val, g = jax.value_and_grad(lambda a: CE_SOFT(a, y, reduction="mean"))(x)
    assert float(val) == 0.0 and g.shape == (0, 3)


def test_soft_check_grads(rng):
    x = jnp.asarray(R.random_logits(rng, (3, 4), scale=1.0))
    y = jnp.asarray(R.random_probs(rng, (3, 4)))
    w = jnp.asarray(np.array([0.5, 2.0, 1.0, 1.5]))
    R.check_grads(
        lambda a, b: CE_SOFT(a, b, label_smoothing=0.1, class_weights=w, reduction="mean"),
        (x, y),
        order=2,
        modes=("rev",),
    )


def test_soft_equals_int_for_one_hot(rng):
    x = R.random_logits(rng, (6, 5))
    y = rng.integers(0, 5, size=6).astype(np.int32)
    w = rng.uniform(0.5, 2.0, size=5)
    for eps in (0.0, 0.15):
        a = CE_SOFT(
            jnp.asarray(x),
            jnp.asarray(np.eye(5)[y]),
            label_smoothing=eps,
            class_weights=jnp.asarray(w),
        )
        b = CE_INT(
            jnp.asarray(x), jnp.asarray(y), label_smoothing=eps, class_weights=jnp.asarray(w)
        )
        R.assert_close(a, b, rtol=1e-12)


# ------------------------------------------------------------------------ nll_loss


@pytest.mark.parametrize(
    "ignore_index,weighted,reduction",
    list(itertools.product([None, 0, -100], [False, True], ["none", "mean"])),
)
def test_nll_options(rng, ignore_index, weighted, reduction):
    lp = R.log_softmax(R.random_logits(rng, (7, 4)))
    y = rng.integers(0, 4, size=7).astype(np.int32)
    if ignore_index is not None:
        y[[1, 5]] = ignore_index
    kw = dict(ignore_index=ignore_index, reduction=reduction)
    if weighted:
        kw["class_weights"] = rng.uniform(0.3, 2.0, size=4)
    got = jaxce.nll_loss(jnp.asarray(lp), jnp.asarray(y), **_jx(kw))
    R.assert_close(got, R.nll_loss(lp, y, **kw), rtol=1e-13, atol=1e-14)
    g = R.jgrad(lambda a: jnp.sum(jaxce.nll_loss(a, jnp.asarray(y), **_jx(kw))))(jnp.asarray(lp))
    g_ref = R.ref_grad(lambda a, xp: xp.sum(R.nll_loss(a, y, xp=xp, **kw)))(lp)
    R.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)


def test_nll_hand_derived_weighted_mean():
    lp = np.log(np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.3, 0.3, 0.4]]))
    y = np.array([1, 2, 0], np.int32)
    w = np.array([2.0, 1.0, 0.5])
    expected = -(1.0 * lp[0, 1] + 0.5 * lp[1, 2] + 2.0 * lp[2, 0]) / (1.0 + 0.5 + 2.0)
    got = jaxce.nll_loss(
        jnp.asarray(lp), jnp.asarray(y), class_weights=jnp.asarray(w), reduction="mean"
    )
    R.assert_close(got, expected, rtol=1e-13)
    got_ign = jaxce.nll_loss(
        jnp.asarray(lp),
        jnp.asarray(y),
        class_weights=jnp.asarray(w),
        ignore_index=2,
        reduction="mean",
    )
    R.assert_close(got_ign, -(1.0 * lp[0, 1] + 2.0 * lp[2, 0]) / 3.0, rtol=1e-13)


def test_nll_axis_and_nan(rng):
    lp = R.log_softmax(R.random_logits(rng, (3, 4, 2)), axis=1)
    y = np.array([[0, 3], [4, 1], [2, 2]], np.int32)
    got = np.asarray(
        jax.jit(lambda a, b: jaxce.nll_loss(a, b, axis=1))(jnp.asarray(lp), jnp.asarray(y))
    )
    assert np.isnan(got[1, 0])
    mask = np.ones((3, 2), bool)
    mask[1, 0] = False
    R.assert_close(got[mask], R.nll_loss(lp, y, axis=1)[mask], rtol=1e-13)
    R.check_grads(
        lambda a: jaxce.nll_loss(a, jnp.asarray(np.where(y > 3, 0, y)), axis=1, reduction="mean"),
        (jnp.asarray(lp),),
        order=2,
        modes=("rev",),
    )


# ------------------------------------------------------------------------ article numbers


Y_TRUE = np.array([2, 1, 0], np.int32)  # [[0,0,1],[0,1,0],[1,0,0]]
Y_PRED_1 = np.array([[0.3, 0.3, 0.4], [0.3, 0.4, 0.3], [0.1, 0.2, 0.7]])
Y_PRED_2 = np.array([[0.1, 0.2, 0.7], [0.1, 0.7, 0.2], [0.3, 0.4, 0.3]])


@pytest.mark.parametrize(
    "y_pred,expected", [(Y_PRED_1, 1.3783888522474517), (Y_PRED_2, 0.6391075640678003)]
)
def test_article_sklearn_log_loss(y_pred, expected):
    lp = jnp.log(jnp.asarray(y_pred))
    a = jaxce.nll_loss(lp, jnp.asarray(Y_TRUE), reduction="mean")
    b = CE_SOFT(lp, jnp.asarray(np.eye(3)[Y_TRUE]), reduction="mean")
    c = CE_INT(lp, jnp.asarray(Y_TRUE), reduction="mean")
    for v in (a, b, c):
        assert v.dtype == jnp.float64
        assert abs(float(v) - expected) < 1e-14


def test_article_sklearn_log_loss_via_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    for y_pred in (Y_PRED_1, Y_PRED_2):
        expected = sklearn_metrics.log_loss(np.eye(3)[Y_TRUE], y_pred)
        got = jaxce.nll_loss(jnp.log(jnp.asarray(y_pred)), jnp.asarray(Y_TRUE), reduction="mean")
        assert abs(float(got) - expected) < 1e-14


@pytest.mark.parametrize(
    "pred,expected", [([0.5, 0.2, 0.3], -np.log(0.5)), ([0.7, 0.1, 0.2], -np.log(0.7))]
)
def test_article_models_a_and_b(pred, expected):
    lp = jnp.log(jnp.asarray(np.array([pred])))
    got = jaxce.nll_loss(lp, jnp.asarray(np.array([0], np.int32)))
    R.assert_close(got, [expected], rtol=1e-14)
    got = CE_SOFT(lp, jnp.asarray(np.array([[1.0, 0.0, 0.0]])))
    R.assert_close(got, [expected], rtol=1e-14)


# ------------------------------------------------------------------------ jit / vmap / dtypes


def test_jit_vmap_int(rng):
    x = jnp.asarray(R.random_logits(rng, (3, 4, 5)))
    y = jnp.asarray(rng.integers(0, 5, size=(3, 4)).astype(np.int32))
    kw = dict(label_smoothing=0.1, z_loss=1e-3, ignore_index=2)
    eager = CE_INT(x, y, **kw)
    R.assert_close(jax.jit(lambda a, b: CE_INT(a, b, **kw))(x, y), eager, rtol=1e-13)
    R.assert_close(jax.vmap(lambda a, b: CE_INT(a, b, **kw))(x, y), eager, rtol=1e-13)
    vm_mean = jax.vmap(lambda a, b: CE_INT(a, b, reduction="mean", **kw))(x, y)
    ref = [
        R.softmax_cross_entropy_with_integer_labels(
            np.asarray(x[i]), np.asarray(y[i]), reduction="mean", **kw
        )
        for i in range(3)
    ]
    R.assert_close(vm_mean, ref, rtol=1e-12)
    g = jax.jit(jax.vmap(R.jgrad(lambda a, b: CE_INT(a, b, reduction="mean", **kw))))(x, y)
    assert g.shape == x.shape and np.all(np.isfinite(np.asarray(g)))


def test_jit_vmap_soft_and_nll(rng):
    x = jnp.asarray(R.random_logits(rng, (3, 4, 5)))
    y = jnp.asarray(R.random_probs(rng, (3, 4, 5)))
    R.assert_close(jax.jit(CE_SOFT)(x, y), CE_SOFT(x, y), rtol=1e-13)
    R.assert_close(
        jax.vmap(CE_SOFT)(x, y), R.softmax_cross_entropy(np.asarray(x), np.asarray(y)), rtol=1e-12
    )
    lab = jnp.asarray(rng.integers(0, 5, size=(3, 4)).astype(np.int32))
    R.assert_close(jax.vmap(jaxce.nll_loss)(x, lab), jax.jit(jaxce.nll_loss)(x, lab), rtol=1e-13)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("which", ["int", "int_opts", "soft", "nll"])
def test_low_precision_dtypes(rng, dtype, which):
    x = jnp.asarray(R.random_logits(rng, (8, 37)), dtype=dtype)
    x64 = np.asarray(x.astype(jnp.float64))
    y = rng.integers(0, 37, size=8).astype(np.int32)
    if which == "int":
        f = lambda a: CE_INT(a, jnp.asarray(y))  # noqa: E731
        expected = R.softmax_cross_entropy_with_integer_labels(x64, y)
    elif which == "int_opts":
        kw = dict(label_smoothing=0.1, z_loss=1e-3, logit_soft_cap_value=5.0)
        f = lambda a: CE_INT(a, jnp.asarray(y), **_jx(kw))  # noqa: E731
        expected = R.softmax_cross_entropy_with_integer_labels(x64, y, **kw)
    elif which == "soft":
        p = R.random_probs(rng, (8, 37)).astype(np.float32)
        f = lambda a: CE_SOFT(a, jnp.asarray(p))  # noqa: E731
        expected = R.softmax_cross_entropy(x64, p.astype(F64))
    else:
        f = lambda a: jaxce.nll_loss(a, jnp.asarray(y))  # noqa: E731
        expected = R.nll_loss(x64, y)
    got = f(x)
    assert got.dtype == jnp.float32  # losses: result_type(input, float32)
    # computed internally in >= float32 from the rounded inputs
    R.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    g = R.jgrad(lambda a: jnp.sum(f(a)))(x)
    assert g.dtype == dtype
    assert np.all(np.isfinite(np.asarray(g.astype(jnp.float32))))


def test_soft_label_gradient_dtype(rng):
    x = jnp.asarray(R.random_logits(rng, (2, 3)), dtype=jnp.bfloat16)
    y = jnp.asarray(R.random_probs(rng, (2, 3)), dtype=jnp.bfloat16)
    gx, gy = R.jgrad(lambda a, b: jnp.sum(CE_SOFT(a, b)), argnums=(0, 1))(x, y)
    assert gx.dtype == jnp.bfloat16 and gy.dtype == jnp.bfloat16


# ------------------------------------------------------------------------ properties


_BIG = float(np.float32(3e38))
_finite32 = st.one_of(
    st.floats(-1e4, 1e4, width=32),
    st.sampled_from([-_BIG, _BIG, -1e4, 1e4, 0.0]),
)


@functools.cache
def _int_vg(eps, zl):
    return jax.jit(
        jax.value_and_grad(
            lambda a, b: jaxce.softmax_cross_entropy_with_integer_labels(
                a, b, label_smoothing=eps, z_loss=zl, reduction="mean"
            )
        )
    )


_soft_vg = jax.jit(
    jax.value_and_grad(
        lambda a, b: jaxce.softmax_cross_entropy(a, b, reduction="sum"), argnums=(0, 1)
    )
)


@given(
    x=hnp.arrays(np.float32, (3, 5), elements=_finite32),
    y=hnp.arrays(np.int32, (3,), elements=st.integers(0, 4)),
    eps=st.sampled_from([0.0, 0.1]),
    zl=st.sampled_from([0.0, 1e-4]),
)
def test_property_finite_inputs_no_nan(x, y, eps, zl):
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    val, g = _int_vg(eps, zl)(xj, yj)
    assert not np.isnan(float(val))
    assert not np.any(np.isnan(np.asarray(g)))
    ps = R.random_probs(np.random.default_rng(0), (3, 5)).astype(np.float32)
    val, (gx, gy) = _soft_vg(xj, jnp.asarray(ps))
    assert not np.isnan(float(val))
    assert not np.any(np.isnan(np.asarray(gx))) and not np.any(np.isnan(np.asarray(gy)))


@pytest.mark.parametrize(
    "options", [{}, {"z_loss": 1e-4}, {"label_smoothing": 0.1}], ids=["plain", "z_loss", "eps"]
)
def test_a_zero_class_weight_counts_for_nothing_even_where_the_nll_is_infinite(options):
    # The label logit 6.8e38 below the max (float32: the nll overflows to inf) or masked (-inf):
    # with class weight 0 the label's terms add 0, not 0 * inf = NaN; a NaN logit stays NaN.
    x = jnp.array([[-3.38e38, 0.0, 3.38e38], [-jnp.inf, 0.0, 1.0], [jnp.nan, 0.0, 1.0]])
    y = jnp.array([0, 0, 0])
    w = jnp.array([0.0, 1.0, 1.0])

    def loss(x):
        return jaxce.softmax_cross_entropy_with_integer_labels(x, y, class_weights=w, **options)

    got = np.asarray(loss(x))
    eps = options.get("label_smoothing", 0.0)
    # the smoothing term of the first row: eps / K sum_c w_c (lse - z_c), K = 3
    smooth = eps / 3 * (3.38e38 + 0.0)
    lse = 1.0 + np.log1p(np.exp(-1.0))  # of the second row, over its classes 1 and 2
    np.testing.assert_allclose(got[:2], [smooth, eps / 2 * (2 * lse - 1.0)], rtol=1e-5)
    assert np.isnan(got[2])
    grad = jax.grad(lambda x: jnp.sum(loss(x)[:2]))(x)
    assert np.all(np.isfinite(np.asarray(grad)[:2]))


def test_nll_a_zero_class_weight_counts_for_nothing_even_at_log_zero():
    """As the cross-entropy's: a label whose log-probability is -inf (or -3.4e38) with class
    weight 0 adds 0, not 0 * inf = NaN (PyTorch's nll_loss gives NaN); a NaN stays NaN."""
    lp = jnp.array([[-jnp.inf, -0.1, -3.0], [-3.4e38, -0.1, -3.0], [jnp.nan, -1.0, -2.0]])
    y = jnp.array([0, 0, 0])
    w = jnp.array([0.0, 1.0, 1.0])
    got = np.asarray(jaxce.nll_loss(lp, y, class_weights=w))
    assert got[0] == 0.0 and got[1] == 0.0 and np.isnan(got[2])
    equivalent = jaxce.softmax_cross_entropy_with_integer_labels(
        jnp.array([[-jnp.inf, 0.0, 1.0]]), y[:1], class_weights=w
    )
    assert float(equivalent[0]) == 0.0
    grad = jax.grad(lambda a: jnp.sum(jaxce.nll_loss(a, y, class_weights=w)[:2]))(lp)
    np.testing.assert_array_equal(np.asarray(grad)[:2], 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_soft_loss_alone_under_vmap(rng, dtype):
    """The loss alone of a batch of batches is that of each batch, a -inf logit under a zero
    target (which the fused CPU pass leaves to its exact pass) in one of them only; vmap tests
    for such rows once over all of them (a cond, not a select between both branches)."""
    x = R.random_logits(rng, (3, 64, 256))  # above _xla.FUSED_SOFT_MIN_ELEMENTS per batch
    y = R.random_probs(rng, (3, 64, 256))
    x[1, 2, 0], y[1, 2, 0] = -np.inf, 0.0
    y = y / y.sum(-1, keepdims=True)
    xs, ys = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    batched = jax.jit(jax.vmap(jaxce.softmax_cross_entropy))(xs, ys)
    for i in range(3):
        np.testing.assert_allclose(batched[i], CE_SOFT(xs[i], ys[i]), rtol=1e-6)
    want = R.softmax_cross_entropy(x, y, where=np.isfinite(x))
    R.assert_close(batched, want, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6)
    shared = jax.vmap(jaxce.softmax_cross_entropy, in_axes=(0, None))(xs, ys[0])
    np.testing.assert_allclose(shared[1], CE_SOFT(xs[1], ys[0]), rtol=1e-6)
    if _xla.fuses_soft_loss(xs, ys):
        jaxpr = str(jax.make_jaxpr(jax.vmap(jaxce.softmax_cross_entropy))(xs, ys))
        assert "cond[" in jaxpr


@pytest.mark.parametrize("whole", [False, True], ids=["two fusions", "one fusion"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
def test_soft_loss_alone_rows_the_fused_pass_leaves(rng, monkeypatch, dtype, whole):
    """Rows whose loss needs a select (a zero target on a -inf logit, a row of -inf logits, a
    +inf or NaN logit, a NaN target) come out NaN in the fused CPU pass: the batch is computed
    again by its exact pass, so the loss alone agrees with value_and_grad's everywhere, inf and
    NaN included; a batch without such rows takes the fused pass itself. Both forms of the
    pass (``whole``: its sums sharing the differences ``x - shift``, as from
    ``_xla.CPU_WHOLE_PASS_ROWS`` rows on) find the same rows, and give the same numbers."""
    from jaxce import _cross_entropy

    if whole:
        monkeypatch.setattr(_xla, "CPU_WHOLE_PASS_ROWS", 0)
    rows, cols = 64, 256  # above _xla.FUSED_SOFT_MIN_ELEMENTS
    x = R.random_logits(rng, (rows, cols))
    y = R.random_probs(rng, (rows, cols))
    x[0, 3], y[0, 3] = -np.inf, 0.0  # 0 log 0 = 0: finite
    x[1, 5] = -np.inf  # a target on a -inf logit: +inf
    x[2] = -np.inf  # no admissible class: 0
    y[2] = 0.0
    x[3, 7] = np.inf  # NaN
    x[4, 9] = np.nan  # NaN
    y[5, 11] = np.nan  # NaN
    x[6] += 3e4  # large offset: exact in the shifted form
    xs, ys = jnp.asarray(x, dtype), jnp.asarray(y, dtype)

    def loss_alone(a, b):  # traced anew at each call: the patches act at trace time
        return jax.jit(lambda a, b: jaxce.softmax_cross_entropy(a, b))(a, b)

    alone = loss_alone(xs, ys)
    with_grad = jax.jit(jax.value_and_grad(lambda a: jaxce.softmax_cross_entropy(a, ys).sum()))
    per_row = jax.jit(jax.vmap(jax.value_and_grad(jaxce.softmax_cross_entropy)))(xs, ys)[0]
    assert with_grad(xs)[0].dtype == alone.dtype
    np.testing.assert_array_equal(np.isnan(alone), np.isnan(per_row))
    np.testing.assert_allclose(alone, per_row, rtol=1e-6)
    assert np.isfinite(alone[0]) and alone[1] == np.inf and alone[2] == 0.0
    assert np.isnan(alone[3:6]).all() and np.isfinite(alone[6:]).all()
    rounded = (np.asarray(a[6:].astype(jnp.float64)) for a in (xs, ys))  # as the loss reads them
    want = R.softmax_cross_entropy(*rounded)
    R.assert_close(alone[6:], want, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5)
    if _xla.fuses_soft_loss(xs, ys):  # then the rows without such entries take the fused pass
        sub, xs6, ys6 = _cross_entropy._in_sub_rows(xs[6:], ys[6:])
        sums = _cross_entropy._row_sums(xs6, ys6, sub)
        fused = _cross_entropy._fusible_soft_rows(xs6, ys6, sums, sub, alone=True).loss[:, 0]
        np.testing.assert_array_equal(loss_alone(xs[6:], ys[6:]), fused)
        # The other form: the same roundings, (m - x) + log-sum against log-sum - (x - m).
        with monkeypatch.context() as other:
            other.setattr(_xla, "CPU_WHOLE_PASS_ROWS", 2**62 if whole else 0)
            np.testing.assert_array_equal(loss_alone(xs[6:], ys[6:]), fused)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_soft_loss_alone_of_4096_rows_is_the_two_fusion_form(monkeypatch, dtype):
    """From _xla.CPU_WHOLE_PASS_ROWS rows on, unpatched, the fused pass's sums share
    ``x - shift`` (one XLA fusion on CPU): bitwise the loss of the form below that size, and the
    row chunks' within rounding, rows that take the exact pass included."""
    from jaxce import _cross_entropy

    rng = np.random.default_rng(3)
    rows, cols = 4096, 10
    assert _xla.fuses_soft_pass_whole(rows) and not _xla.fuses_soft_pass_whole(rows - 1)
    x = R.random_logits(rng, (rows, cols)) * 4
    y = R.random_probs(rng, (rows, cols))
    x[7, 3], y[7, 3] = -np.inf, 0.0  # the exact pass, for the whole batch
    xs, ys = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    clean = (xs.at[7, 3].set(0.0), ys)  # a batch the fused pass takes itself

    def loss_alone(a, b):  # traced anew at each call: the patch acts at trace time
        return np.asarray(jax.jit(lambda a, b: jaxce.softmax_cross_entropy(a, b))(a, b))

    chunks = jax.jit(lambda a, b: _cross_entropy._soft_forward(a, b, None, None, None).loss)
    for args in ((xs, ys), clean):
        got = loss_alone(*args)
        R.assert_close(got, np.asarray(chunks(*args))[:, 0], rtol=1e-6)
        with monkeypatch.context() as other:
            other.setattr(_xla, "CPU_WHOLE_PASS_ROWS", 2**62)
            np.testing.assert_array_equal(loss_alone(*args), got)


# Entries that the exact fused pass must sum like the row chunks: +-inf, NaN, the range's ends,
# a subnormal logit; zero, negative, NaN, infinite, subnormal and large targets.
_SPECIAL_LOGITS = [0.0, 1.5, -2.0, 30.0, -np.inf, np.inf, np.nan, 3e38, -3e38, 1e-40]
_SPECIAL_TARGETS = [0.0, 0.25, 1.0, -0.5, np.nan, np.inf, -np.inf, 1e-45, 2.0, -3.0, 5.0]


def _assert_same_soft_rows(got, want):
    """Every field of two ``_SoftRows`` equal within rounding, NaN where NaN, inf with its sign
    (a NaN row's shift aside: it depends on whether a max passed over the NaN)."""
    nan_rows = np.isnan(np.asarray(want.log_sum))
    for field in ("shift", "log_sum", "mass", "loss"):
        a, b = np.asarray(getattr(got, field), F64), np.asarray(getattr(want, field), F64)
        if field == "shift":
            a, b = a[~nan_rows], b[~nan_rows]
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=field)
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=field)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
def test_the_exact_fused_soft_rows_are_the_row_chunks(dtype):
    """The soft-label rows that the loss alone and its derivative compute again when the fused
    CPU pass gives a NaN (``_fusible_exact_soft_rows``, whole rows without a select per entry)
    are the row chunks' (``_soft_forward``), on rows of special values: NaN where they are NaN,
    infinite with the same sign, also in rows whose max is +inf. 8192 rows: XLA's CPU
    reductions of that many rows are the ones that pass over a NaN in their max; and 64 wide
    rows with a NaN logit among finite ones, summed in vector lanes."""
    from jaxce import _cross_entropy

    if jax.default_backend() != "cpu" or not _xla.cpu_fuses_whole_rows():
        # The pass is taken only there (_xla.fuses_soft_loss). On older jaxlib (0.8.2) the row
        # chunks themselves give NaN where this pass gives -inf, in rows with a +inf logit and
        # a negative target mass (both not finite; exactly, -inf).
        pytest.skip("the exact fused pass is used on CPU from jaxlib 0.10.2 on")
    rng = np.random.default_rng(7)
    rows, cols = 8192, 6
    special_x = np.asarray(_SPECIAL_LOGITS)[rng.integers(0, len(_SPECIAL_LOGITS), (rows, cols))]
    special_y = np.asarray(_SPECIAL_TARGETS)[rng.integers(0, len(_SPECIAL_TARGETS), (rows, cols))]
    x = np.where(rng.random((rows, cols)) < 0.5, rng.normal(size=(rows, cols)) * 3, special_x)
    y = np.where(rng.random((rows, cols)) < 0.5, rng.random((rows, cols)), special_y)
    x[:16], y[:16] = -np.inf, 0.0  # empty rows
    y[16:32] = np.where(np.isneginf(x[16:32]), 0.0, y[16:32])
    x[32:512, 0] = np.inf  # rows whose max is +inf
    wide_x, wide_y = R.random_logits(rng, (64, 1024)), R.random_probs(rng, (64, 1024))
    wide_x[::2, 500] = np.nan
    wide_x[1::4, 7], wide_y[1::4, 7] = -np.inf, 0.0

    def exact_rows(a, b):
        sub, a, b = _cross_entropy._in_sub_rows(a, b)
        return _cross_entropy._fusible_exact_soft_rows(
            a, b, _cross_entropy._row_sums(a, b, sub), sub
        )

    exact = jax.jit(exact_rows)
    chunks = jax.jit(lambda a, b: _cross_entropy._soft_forward(a, b, None, None, None))
    for a, b in ((x, y), (wide_x, wide_y)):
        xs, ys = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        _assert_same_soft_rows(exact(xs, ys), chunks(xs, ys))
    loss = np.asarray(exact(jnp.asarray(x, dtype), jnp.asarray(y, dtype)).loss)[:, 0]
    assert (loss[:16] == 0).all()  # empty rows
    # Every kind of row occurs: finite, +inf (a target on a -inf logit), -inf, NaN.
    assert np.isfinite(loss).any() and np.isnan(loss).any()
    assert np.isposinf(loss).any() and np.isneginf(loss).any()
    wide = np.asarray(exact(jnp.asarray(wide_x, dtype), jnp.asarray(wide_y, dtype)).loss)[:, 0]
    assert np.isnan(wide[::2]).all() and np.isfinite(wide[1::2]).all()


@pytest.mark.parametrize("rows, cols", [(64, 256), (4096, 16), (8192, 16)])
def test_the_soft_loss_alone_finds_its_nan_rows_at_any_size(rows, cols):
    """The fused CPU pass's test for rows to compute again sees a NaN row at every size: a zero
    target on a -inf logit in the middle of the batch gives the loss of the row chunks, not
    NaN. (A test by the max of the rows' |loss| passed over the NaN from 4096 rows on.)"""
    rng = np.random.default_rng(rows)
    x = R.random_logits(rng, (rows, cols))
    y = R.random_probs(rng, (rows, cols))
    x[rows // 2, 3], y[rows // 2, 3] = -np.inf, 0.0
    y = y / y.sum(-1, keepdims=True)
    for dtype in (jnp.float32, jnp.bfloat16):
        xs, ys = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
        if jax.default_backend() == "cpu":  # the fused pass, not the chunks
            assert _xla.fuses_soft_loss(xs, ys) == _xla.cpu_fuses_whole_rows()
        got = jax.jit(jaxce.softmax_cross_entropy)(xs, ys)
        assert np.isfinite(got).all()
        want = R.softmax_cross_entropy(x, y, where=np.isfinite(x))
        R.assert_close(got, want, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5)


@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.1}, {"class_weights": "ramp"}, {"where": "class"}],
    ids=["plain", "smoothing", "weights", "where"],
)
@pytest.mark.parametrize("rows, cols", [(4, 5), (64, 256)])  # row chunks; above 8192: fused
def test_soft_empty_row_is_zero_unless_its_targets_hold_a_nan(rng, options, rows, cols):
    """A row with no admissible class (every logit -inf) has soft-label loss 0, and NaN when
    its targets hold a NaN, never a plausible 0 (the NaN policy), in the loss alone and in
    value_and_grad's value, whichever pass computes them; the other rows keep their loss."""
    x = R.random_logits(rng, (rows, cols))
    y = R.random_probs(rng, (rows, cols))
    x[1] = -np.inf  # empty, finite targets: 0
    x[2], y[2, 1] = -np.inf, np.nan  # empty, a NaN target: NaN
    kwargs = dict(options)
    if kwargs.get("class_weights") == "ramp":
        kwargs["class_weights"] = jnp.linspace(0.5, 1.5, cols)
    mask = None
    if kwargs.pop("where", None) == "class":  # the last class masked in every row
        mask = jnp.broadcast_to(jnp.arange(cols) != cols - 1, (rows, cols))
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    def loss(a, b, m):
        return jaxce.softmax_cross_entropy(a, b, where=m, **kwargs)

    alone = np.asarray(jax.jit(loss)(xs, ys, mask))
    per_row = np.asarray(jax.jit(jax.vmap(jax.value_and_grad(loss)))(xs, ys, mask)[0])
    with_grad = jax.jit(jax.value_and_grad(lambda a: loss(a, ys, mask).sum()))(xs)[0]
    for got in (alone, per_row):
        assert got[1] == 0.0 and np.isnan(got[2])
        assert np.isfinite(got[[0, *range(3, rows)]]).all()
    np.testing.assert_allclose(alone, per_row, rtol=1e-6)
    assert np.isnan(float(with_grad))


@pytest.mark.parametrize("cap", [None, 30.0, 80.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("rows, cols", [(64, 256), (4096, 16)])
def test_smoothing_as_if_every_class_were_admissible_is_exact_where_one_is_not(
    rows, cols, dtype, cap
):
    """On CPU the smoothing's sums are first taken as if every class were admissible, without
    a select per entry (``_rows.assumes_all_admissible``), and taken again over the admissible
    classes when a row of the batch has a -inf logit (or a +inf or NaN one): batches of plain
    rows, of rows with masked classes (one with a class weight of 0 there, one of every class
    but one masked) and of a NaN row give the float64 reference's loss and gradient, alone, in
    ``value_and_grad`` and under ``vmap``, where the branch stays one branch for the batch.
    Under a soft cap, which takes -inf to a finite -cap, as without; and a +inf logit, which
    the cap takes to cap, admissible, gives the reference's finite loss. A cap of 30 (and 80 in
    float64) is small enough for ``value_and_grad`` to sum the gap from its kept exponentials
    (``_rows.small_cap``), 80 in float32 is not."""
    from jaxce import _rows

    if jax.default_backend() != "cpu" or not _xla.cpu_fuses_whole_rows():
        pytest.skip("taken on CPU from jaxlib 0.10.2 on")
    rng = np.random.default_rng(rows + cols)
    x = R.random_logits(rng, (rows, cols)) + 50.0  # offset: the gap's terms lean on the max
    labels = rng.integers(0, cols, rows)
    weights = rng.uniform(0.5, 1.5, cols)
    weights[3] = 0.0
    masked = x.copy()
    masked[1, 3] = masked[rows // 2, 5] = masked[-1, 7] = -np.inf  # weight 0 at [1, 3]
    masked[2, :] = -np.inf
    masked[2, labels[2]] = 1.0  # one admissible class
    labels[rows // 2] = 4
    each = dict(label_smoothing=0.2, class_weights=weights)
    kw = dict(each, reduction="mean")
    tol = 1e-5 if dtype == jnp.float32 else 1e-12

    def loss(a):
        return jaxce.softmax_cross_entropy_with_integer_labels(a, labels, logit_soft_cap=cap, **kw)

    def per_row(a):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            a, labels, logit_soft_cap=cap, **each
        )

    ref_each = dict(each, logit_soft_cap_value=cap)  # the reference's name for the cap
    ref_kw = dict(kw, logit_soft_cap_value=cap)

    options = _rows.make_options(dtype, 0.2, 0.0, cap)
    assert _rows.assumes_all_admissible(
        jnp.asarray(x, dtype), None, jnp.asarray(weights), options, _rows.unguarded(options, cap)
    )
    assert "cond[" in str(jax.make_jaxpr(loss)(jnp.asarray(x, dtype)))
    for batch in (x, masked):
        xs = jnp.asarray(batch, dtype)
        want = R.softmax_cross_entropy_with_integer_labels(batch, labels, **ref_kw)
        want_grad = R.ref_grad(R.softmax_cross_entropy_with_integer_labels)(batch, labels, **ref_kw)
        R.assert_close(jax.jit(loss)(xs), want, rtol=tol)
        value, grad = jax.jit(jax.value_and_grad(loss))(xs)
        R.assert_close(value, want, rtol=tol)
        R.assert_close(grad, want_grad, rtol=tol, atol=tol / rows)
        assert (np.asarray(grad)[np.isneginf(batch)] == 0).all()
    # Under vmap, one branch for the whole batch of batches: a cond, not a select of both.
    both = jnp.asarray(np.stack([x, masked]), dtype)
    program = str(jax.make_jaxpr(jax.vmap(per_row))(both))
    assert "cond[" in program, program
    got = jax.jit(jax.vmap(per_row))(both)
    for i, batch in enumerate((x, masked)):
        want = R.softmax_cross_entropy_with_integer_labels(batch, labels, **ref_each)
        R.assert_close(got[i], want, rtol=tol, atol=tol)
    nan = x.copy()
    nan[5, 2] = np.nan
    got = np.asarray(jax.jit(per_row)(jnp.asarray(nan, dtype)))
    assert np.isnan(got[5]) and np.isfinite(np.delete(got, 5)).all()
    if cap is not None:
        high = x.copy()
        high[6, 1] = np.inf
        want = R.softmax_cross_entropy_with_integer_labels(high, labels, **ref_each)
        assert np.isfinite(want).all()
        R.assert_close(jax.jit(per_row)(jnp.asarray(high, dtype)), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("cap", [None, 30.0])
def test_the_exact_branch_takes_no_loop_and_differentiates_twice_as_the_mask_does(cap):
    """The branch for a batch with a -inf logit (``_rows.exact_smoothing_sums``) is fused
    passes: ``value_and_grad`` with every option on holds no loop over row chunks (the loop
    made its compile time 1.6-2.0x optax's). Its derivative is taken in row chunks, so a
    Hessian-vector product (forward over reverse) through it is the one through the same
    classes masked with ``where`` instead (finite logits there), which never takes the branch;
    and an infinite or NaN class weight on the masked class changes nothing."""
    from jaxce import _rows

    if jax.default_backend() != "cpu" or not _xla.cpu_fuses_whole_rows():
        pytest.skip("taken on CPU from jaxlib 0.10.2 on")
    rng = np.random.default_rng(7)
    rows, cols = 48, 40
    x = R.random_logits(rng, (rows, cols)) + 20.0
    labels = jnp.asarray(rng.integers(1, cols, rows))
    weights = rng.uniform(0.5, 1.5, cols)
    mask = np.ones((rows, cols), bool)
    mask[:, 0] = False  # a class no row admits
    mask[3, 5] = mask[17, 9] = False
    mask[3, labels[3]] = True
    masked = np.where(mask, x, -np.inf)
    v = jnp.asarray(rng.normal(size=(rows, cols)))
    kw = dict(label_smoothing=0.2, z_loss=1e-3, logit_soft_cap=cap, reduction="mean")

    def loss(a, w=weights, where=None):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            a, labels, class_weights=jnp.asarray(w), where=where, **kw
        )

    options = _rows.make_options(jnp.float64, 0.2, 1e-3, cap)
    assert _rows.assumes_all_admissible(
        jnp.asarray(masked), None, jnp.asarray(weights), options, True
    )
    # Lowered only, at a shape the row chunks took 8 of (over 1 MiB; at [48, 40] they were one).
    big = jax.ShapeDtypeStruct((512, 1024), jnp.float64)
    big_labels = jnp.zeros((512,), jnp.int32)

    def big_loss(a):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            a, big_labels, class_weights=jnp.linspace(0.5, 1.5, 1024), **kw
        )

    program = jax.jit(jax.value_and_grad(big_loss)).lower(big).as_text()
    assert "stablehlo.while" not in program
    assert "stablehlo.case" in program or "stablehlo.if" in program
    assert _rows.assumes_all_admissible(jnp.zeros(big.shape), None, jnp.ones(1024), options, True)

    def hvp(f, a):
        return jax.jvp(jax.grad(f), (a,), (v,))[1]

    want = jax.jit(lambda a: hvp(lambda b: loss(b, where=jnp.asarray(mask)), a))(jnp.asarray(x))
    got = jax.jit(lambda a: hvp(loss, a))(jnp.asarray(masked))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-12)

    # The smoothing's derivative depends on the gap, so its derivative in the logits takes the
    # sums' own (their jvp rule); the gradient's does not.
    def d_smoothing(a, where=None):
        def of(eps):
            return jaxce.softmax_cross_entropy_with_integer_labels(
                a,
                labels,
                class_weights=jnp.asarray(weights),
                where=where,
                **dict(kw, label_smoothing=eps),
            )

        return jax.grad(of)(jnp.float64(0.2))

    def jvp_of(f, a):
        return jax.jvp(f, (a,), (v,))[1]

    want = jvp_of(lambda a: d_smoothing(a, jnp.asarray(mask)), jnp.asarray(x))
    got = jax.jit(lambda a: jvp_of(d_smoothing, a))(jnp.asarray(masked))
    assert abs(float(want)) > 1e-3
    np.testing.assert_allclose(float(got), float(want), rtol=1e-9)
    want_value = loss(jnp.asarray(x), where=jnp.asarray(mask))
    for bad in (np.inf, np.nan):
        w = weights.copy()
        w[0] = bad
        value, grad = jax.jit(jax.value_and_grad(lambda a, w=w: loss(a, w)))(jnp.asarray(masked))
        np.testing.assert_allclose(float(value), float(want_value), rtol=1e-12)
        assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cap", [0.5, 30.0, 1e10, 2.0**64])
def test_a_cap_given_as_a_number_goes_without_its_guard_within_a_rounding(cap, dtype):
    """A soft cap given as a number of at most 2**64 is computed without the select that
    takes ``x`` itself where ``tanh(x / cap)`` rounds to ``x / cap`` (``_rows.unguarded``):
    ``cap tanh(x / cap)`` is then within a rounding of it, or within 2**64 times the smallest
    normal number where ``x / cap`` underflows (2.2e-19 in float32). In float64 too, where
    ``tanh`` is not XLA's (``_sigmoid._tanh``). A traced one keeps the guard; a larger one is
    refused."""
    from jaxce import _rows
    from jaxce._sigmoid import soft_cap_bulk, soft_cap_unguarded

    rng = np.random.default_rng(0)
    scales = 10.0 ** rng.uniform(-30, 30, 20000)
    x = jnp.asarray((rng.standard_normal(20000) * scales).astype(dtype))
    c = jnp.asarray(cap, dtype)
    guarded = np.asarray(jax.jit(soft_cap_bulk)(x, c))
    plain = np.asarray(jax.jit(soft_cap_unguarded)(x, c))
    floor = float(np.finfo(dtype).smallest_normal) * 2.0**64
    allowed = np.maximum(np.spacing(np.abs(guarded)), floor)
    assert (np.abs(plain - guarded) <= allowed).all()

    def decided(value):
        return _rows.unguarded(_rows.make_options(jnp.float32, 0.0, 0.0, value), value)

    traced = []
    jax.jit(lambda t: traced.append(decided(t)) or t)(c)
    assert decided(cap) and decided(c) and traced == [False]
    assert decided(None) and decided(float("inf"))
    with pytest.raises(ValueError, match=r"logit_soft_cap must lie in \[2\*\*-64, 2\*\*64\]"):
        decided(2.0**65)


@pytest.mark.parametrize("cap", [30.0, 1500.0, 1e4])
def test_equal_capped_logits_far_from_zero_give_log_c_and_never_below_zero(cap):
    """Rows of equal logits (1, 3 and 1000 classes) at offsets up to the cap: the loss is
    ``log C`` (times the weights' mix with smoothing) within a few roundings of the capped
    logit, jitted and not, and never below 0. The max, the exponentials and the smoothing's gap
    take ``tanh`` in different kernels, whose codes can differ by a rounding; the sum of
    exponentials is floored at 1 and the gap at 0 (``_rows.finish``): without the floor, a
    single class of logit 1000 under a cap of 1e4 lost -1.2e-5."""
    for v in (-0.05 * cap, 7.0, 0.1 * cap, 0.3 * cap, 0.9999 * cap):
        z = np.float32(cap * np.tanh(np.float64(np.float32(v)) / cap))
        for c in (1, 3, 1000):
            x = jnp.full((8, c), v, jnp.float32)
            labels = jnp.zeros(8, jnp.int32)
            w = np.linspace(0.5, 1.5, c)
            for kw, want in (
                ({}, np.log(c)),
                ({"label_smoothing": 0.1}, np.log(c)),
                (
                    {"label_smoothing": 0.1, "class_weights": w},
                    np.log(c) * (0.9 * w[0] + 0.1 * w.mean()),
                ),
            ):

                def loss(a, kw=kw, labels=labels):
                    return jaxce.softmax_cross_entropy_with_integer_labels(
                        a, labels, logit_soft_cap=cap, **kw
                    )

                for got in (np.asarray(jax.jit(loss)(x)), np.asarray(loss(x))):
                    assert (got >= 0).all(), (v, c, kw, got)
                    np.testing.assert_allclose(got, want, rtol=1e-6, atol=8 * np.spacing(abs(z)))


@pytest.mark.parametrize("cap", [3.0, 2.0**64])
def test_a_cap_given_as_a_number_gives_the_traced_caps_loss(cap):
    """Every option on, with an ignored row, in a batch of finite logits (the sums as if every
    class were admissible) and in one with masked classes (the exact sums): the loss and
    gradient of a cap given as a number (without its guard where at most 2**64) are those of
    the same cap traced (with it), within rounding."""
    rng = np.random.default_rng(1)
    finite = R.random_logits(rng, (64, 40)) * 4
    masked = finite.copy()
    masked[3, 5] = masked[9, :30] = -np.inf
    labels = rng.integers(0, 40, 64)
    labels[7] = -100
    kw = dict(
        label_smoothing=0.1,
        z_loss=1e-3,
        class_weights=rng.uniform(0.5, 1.5, 40),
        ignore_index=-100,
        reduction="mean",
    )

    def given(a):
        return jaxce.softmax_cross_entropy_with_integer_labels(a, labels, logit_soft_cap=cap, **kw)

    def traced(a, c):
        return jaxce.softmax_cross_entropy_with_integer_labels(a, labels, logit_soft_cap=c, **kw)

    for x in (finite, masked):
        xs = jnp.asarray(x, jnp.float32)
        want = R.softmax_cross_entropy_with_integer_labels(
            x, labels, logit_soft_cap_value=cap, **kw
        )
        value, grad = jax.jit(jax.value_and_grad(given))(xs)
        value_t, grad_t = jax.jit(jax.value_and_grad(traced))(xs, jnp.float32(cap))
        R.assert_close(value, want, rtol=1e-5)
        np.testing.assert_allclose(value, value_t, rtol=1e-6)
        np.testing.assert_allclose(grad, grad_t, rtol=1e-5, atol=1e-7)


def test_smoothing_takes_its_exact_sums_only_for_a_batch_that_needs_them(monkeypatch):
    """Op by op (a Python branch), the exact sums over the admissible classes are computed for
    a batch with a -inf logit and for none other: a batch of finite logits, with finite class
    weights, takes the sums as if every class were admissible alone."""
    from jaxce import _rows

    if jax.default_backend() != "cpu" or not _xla.cpu_fuses_whole_rows():
        pytest.skip("taken on CPU from jaxlib 0.10.2 on")
    calls = []
    exact = _rows.exact_smoothing_sums
    monkeypatch.setattr(
        _rows, "exact_smoothing_sums", lambda *a, **k: calls.append(1) or exact(*a, **k)
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(R.random_logits(rng, (8, 6)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 6, 8))
    weights = jnp.linspace(0.0, 2.0, 6)  # a weight of 0: finite terms where the logit is

    def loss(a, w=weights):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            a, labels, class_weights=w, label_smoothing=0.1
        )

    loss(x)
    jax.value_and_grad(lambda a: loss(a).sum())(x)
    assert calls == []
    got = loss(x.at[2, 0].set(-jnp.inf))  # the class of weight 0
    assert calls == [1]
    want = R.softmax_cross_entropy_with_integer_labels(
        np.asarray(x.at[2, 0].set(-jnp.inf)), labels, class_weights=weights, label_smoothing=0.1
    )
    R.assert_close(got, want, rtol=1e-5)
    loss(x, weights.at[1].set(jnp.inf))  # an infinite weight: its terms are not finite either
    assert calls == [1, 1]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("given", ["number", "traced"])
def test_the_largest_cap_bends_logits_of_its_size(given, smoothing):
    """A soft cap of 2**64, the largest accepted, on logits of its size and up to float32's
    largest: the loss and its gradient are float64's, given as a number or traced, eagerly and
    under jit. XLA's CPU compiler divides by the cap's reciprocal, which above 2**126 is flushed
    to 0: a cap of 1e38 (accepted before) left logits of 3e38 uncapped, an infinite loss and a
    NaN gradient."""
    cap = 2.0**64
    x = np.array(
        [[3.0e38, -3.0e38, 1e20, 0.0], [3e19, -1e19, 2e19, 1.0], [1.0, 2.0, -1.0, 5e18]],
        np.float32,
    )
    labels = np.array([1, 0, 3])
    x64 = x.astype(np.float64)
    u = x64 / cap
    z = cap * np.tanh(u)
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    p = np.exp(z - lse[:, None])
    onehot = np.eye(4)[labels]
    want = (1 - smoothing) * (lse - z[np.arange(3), labels]) + smoothing * (lse - z.mean(axis=1))
    dz = p - (1 - smoothing) * onehot - smoothing / 4
    want_grad = dz / np.cosh(u) ** 2

    def loss(a, c=cap):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            a, labels, label_smoothing=smoothing, logit_soft_cap=c
        )

    # d loss / d cap, summed over the examples: dz times tanh(u) - u sech(u)^2
    want_d_cap = np.sum(dz * (np.tanh(u) - u / np.cosh(u) ** 2))
    args = (jnp.asarray(x),) if given == "number" else (jnp.asarray(x), jnp.float32(cap))
    argnums = (0,) if given == "number" else (0, 1)
    for run in (loss, jax.jit(loss)):
        got = np.asarray(run(*args), np.float64)
        grads = jax.grad(lambda *a, run=run: jnp.sum(run(*a)), argnums=argnums)(*args)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(
            np.asarray(grads[0], np.float64), want_grad, rtol=1e-4, atol=1e-6
        )
        if given == "traced":
            np.testing.assert_allclose(float(grads[1]), want_d_cap, rtol=1e-4, atol=1e-6)
