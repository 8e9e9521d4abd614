"""Values and gradients against PyTorch in float64, for every option combination.

PyTorch puts the class axis at dim 1 ([N, C] or [N, C, d1]); jaxce is called with ``axis=1``.
Deliberate differences (semantics.md) are not compared: the mean over zero non-ignored examples
(PyTorch NaN, jaxce 0) and masked (-inf) vocabularies with label smoothing.
"""

import itertools

import _reference as R
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _t(a, grad=False):
    return torch.tensor(
        np.asarray(a, np.float64) if np.asarray(a).dtype.kind == "f" else np.asarray(a, np.int64),
        requires_grad=grad,
    )


def _torch_value_and_grad(fn, x):
    xt = _t(x, grad=True)
    out = fn(xt)
    out.backward(torch.ones_like(out) if out.ndim else None)
    return out.detach().numpy(), xt.grad.numpy()


def _jax_value_and_grad(fn, x):
    xj = jnp.asarray(x)
    out = jax.jit(fn)(xj)
    g = R.jgrad(lambda a: jnp.sum(fn(a)))(xj)
    return np.asarray(out), np.asarray(g)


SHAPES = [(6, 4), (3, 5, 2)]  # [N, C], [N, C, d1]
# the full grid on [N, C]; the [N, C, d1] layout on its hardest combinations
CE_GRID = list(
    itertools.product(SHAPES[:1], [False, True], [None, -100, 1], [0.0, 0.15], ["none", "mean"])
) + [
    (SHAPES[1], True, -100, 0.15, "none"),
    (SHAPES[1], True, 1, 0.15, "mean"),
    (SHAPES[1], False, None, 0.0, "sum"),
    (SHAPES[0], True, -100, 0.15, "sum"),
]


@pytest.mark.parametrize("shape,weighted,ignore_index,eps,reduction", CE_GRID)
def test_cross_entropy_integer_targets(rng, shape, weighted, ignore_index, eps, reduction):
    c = shape[1]
    x = R.random_logits(rng, shape)
    y = rng.integers(0, c, size=(shape[0],) + shape[2:]).astype(np.int32)
    if ignore_index is not None:
        y.reshape(-1)[[0, 3]] = ignore_index
    w = rng.uniform(0.2, 2.0, size=c) if weighted else None
    tkw = dict(
        weight=None if w is None else _t(w),
        reduction=reduction,
        label_smoothing=eps,
        ignore_index=-100 if ignore_index is None else ignore_index,
    )
    jkw = dict(
        axis=1,
        class_weights=None if w is None else jnp.asarray(w),
        reduction=reduction,
        label_smoothing=eps,
        ignore_index=ignore_index,
    )
    tv, tg = _torch_value_and_grad(lambda a: F.cross_entropy(a, _t(y), **tkw), x)
    jv, jg = _jax_value_and_grad(
        lambda a: jaxce.softmax_cross_entropy_with_integer_labels(a, jnp.asarray(y), **jkw), x
    )
    R.assert_close(jv, tv, rtol=1e-12, atol=1e-13)
    R.assert_close(jg, tg, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize(
    "shape,weighted,eps,reduction",
    list(itertools.product(SHAPES[:1], [False, True], [0.0, 0.2], ["none", "sum", "mean"]))
    + [(SHAPES[1], True, 0.2, "mean"), (SHAPES[1], False, 0.0, "none")],
)
def test_cross_entropy_probability_targets(rng, shape, weighted, eps, reduction):
    c = shape[1]
    x = R.random_logits(rng, shape)
    p = R.random_probs(rng, shape, axis=1)
    w = rng.uniform(0.2, 2.0, size=c) if weighted else None
    xt, pt = _t(x, grad=True), _t(p, grad=True)
    out = F.cross_entropy(
        xt, pt, weight=None if w is None else _t(w), reduction=reduction, label_smoothing=eps
    )
    out.backward(torch.ones_like(out))
    jkw = dict(
        axis=1,
        class_weights=None if w is None else jnp.asarray(w),
        reduction=reduction,
        label_smoothing=eps,
    )
    f = lambda a, b: jaxce.softmax_cross_entropy(a, b, **jkw)  # noqa: E731
    jv = f(jnp.asarray(x), jnp.asarray(p))
    gx, gp = R.jgrad(lambda a, b: jnp.sum(f(a, b)), argnums=(0, 1))(jnp.asarray(x), jnp.asarray(p))
    R.assert_close(jv, out.detach().numpy(), rtol=1e-12, atol=1e-13)
    R.assert_close(gx, xt.grad.numpy(), rtol=1e-11, atol=1e-13)
    R.assert_close(gp, pt.grad.numpy(), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize(
    "shape,weighted,ignore_index,reduction",
    list(itertools.product(SHAPES[:1], [False, True], [None, -100, 2], ["none", "mean"]))
    + [(SHAPES[1], True, -100, "mean"), (SHAPES[1], False, None, "sum")],
)
def test_nll_loss(rng, shape, weighted, ignore_index, reduction):
    c = shape[1]
    lp = R.log_softmax(R.random_logits(rng, shape), axis=1)
    y = rng.integers(0, c, size=(shape[0],) + shape[2:]).astype(np.int32)
    if ignore_index is not None:
        y.reshape(-1)[[1, 2]] = ignore_index
    w = rng.uniform(0.2, 2.0, size=c) if weighted else None
    tv, tg = _torch_value_and_grad(
        lambda a: F.nll_loss(
            a,
            _t(y),
            weight=None if w is None else _t(w),
            reduction=reduction,
            ignore_index=-100 if ignore_index is None else ignore_index,
        ),
        lp,
    )
    jv, jg = _jax_value_and_grad(
        lambda a: jaxce.nll_loss(
            a,
            jnp.asarray(y),
            axis=1,
            reduction=reduction,
            ignore_index=ignore_index,
            class_weights=None if w is None else jnp.asarray(w),
        ),
        lp,
    )
    R.assert_close(jv, tv, rtol=1e-12, atol=1e-13)
    R.assert_close(jg, tg, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "pos_weight,weights,reduction",
    list(itertools.product([False, True], [None, "full", "row"], ["none", "sum", "mean"])),
)
def test_binary_cross_entropy_with_logits(rng, pos_weight, weights, reduction):
    x = R.random_logits(rng, (5, 3))
    y = (rng.random((5, 3)) < 0.5).astype(np.float64)
    y[0, 0] = 0.3  # a soft target
    pw = rng.uniform(0.3, 3.0, size=3) if pos_weight else None
    w = {None: None, "full": rng.uniform(0, 2, size=(5, 3)), "row": rng.uniform(0, 2, size=(5, 1))}[
        weights
    ]
    tv, tg = _torch_value_and_grad(
        lambda a: F.binary_cross_entropy_with_logits(
            a,
            _t(y),
            weight=None if w is None else _t(w),
            pos_weight=None if pw is None else _t(pw),
            reduction=reduction,
        ),
        x,
    )
    jv, jg = _jax_value_and_grad(
        lambda a: jaxce.sigmoid_binary_cross_entropy(
            a,
            jnp.asarray(y),
            weights=None if w is None else jnp.asarray(w),
            pos_weight=None if pw is None else jnp.asarray(pw),
            reduction=reduction,
        ),
        x,
    )
    R.assert_close(jv, tv, rtol=1e-12, atol=1e-13)
    R.assert_close(jg, tg, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize(
    "weighted,reduction", list(itertools.product([False, True], ["none", "sum", "mean"]))
)
def test_binary_cross_entropy(rng, weighted, reduction):
    p = rng.uniform(0.02, 0.98, size=(4, 3))
    y = rng.random((4, 3))
    w = rng.uniform(0, 2, size=(4, 3)) if weighted else None
    tv, tg = _torch_value_and_grad(
        lambda a: F.binary_cross_entropy(
            a, _t(y), weight=None if w is None else _t(w), reduction=reduction
        ),
        p,
    )
    jv, jg = _jax_value_and_grad(
        lambda a: jaxce.binary_cross_entropy(
            a, jnp.asarray(y), weights=None if w is None else jnp.asarray(w), reduction=reduction
        ),
        p,
    )
    R.assert_close(jv, tv, rtol=1e-12, atol=1e-13)
    R.assert_close(jg, tg, rtol=1e-10, atol=1e-12)


def test_binary_cross_entropy_clamped_values():
    p = np.array([0.0, 1.0, 1e-60, 1.0 - 1e-17, 0.5])
    y = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    tv = F.binary_cross_entropy(_t(p), _t(y), reduction="none").numpy()
    R.assert_close(jaxce.binary_cross_entropy(jnp.asarray(p), jnp.asarray(y)), tv, rtol=1e-12)


def test_reference_matches_torch(rng):
    """The float64 references used by the other files agree with PyTorch."""
    x = R.random_logits(rng, (5, 4, 3))
    y = rng.integers(0, 4, size=(5, 3))
    y[0, 0] = -100
    w = rng.uniform(0.2, 2.0, size=4)
    for red in ("none", "mean"):
        tv = F.cross_entropy(_t(x), _t(y), weight=_t(w), label_smoothing=0.1, reduction=red)
        rv = R.softmax_cross_entropy_with_integer_labels(
            x, y, axis=1, class_weights=w, label_smoothing=0.1, ignore_index=-100, reduction=red
        )
        R.assert_close(rv, tv.numpy(), rtol=1e-12, atol=1e-14)
    p = R.random_probs(rng, (5, 4, 3), axis=1)
    tv = F.cross_entropy(_t(x), _t(p), weight=_t(w), label_smoothing=0.1, reduction="mean")
    rv = R.softmax_cross_entropy(
        x, p, axis=1, class_weights=w, label_smoothing=0.1, reduction="mean"
    )
    R.assert_close(rv, tv.numpy(), rtol=1e-12)
    xb = R.random_logits(rng, (4, 3))
    yb = rng.random((4, 3))
    pw = np.array([0.5, 2.0, 3.0])
    tv = F.binary_cross_entropy_with_logits(_t(xb), _t(yb), pos_weight=_t(pw), reduction="none")
    R.assert_close(R.sigmoid_binary_cross_entropy(xb, yb, pos_weight=pw), tv.numpy(), rtol=1e-12)


def test_torch_mean_over_all_ignored_is_deliberately_zero(rng):
    # PyTorch returns NaN here; jaxce returns 0 with a zero gradient (documented difference)
    x = R.random_logits(rng, (3, 4))
    y = np.full(3, -100)
    assert np.isnan(F.cross_entropy(_t(x), _t(y), reduction="mean").item())
    v = jaxce.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(x), jnp.asarray(y.astype(np.int32)), ignore_index=-100, reduction="mean"
    )
    assert float(v) == 0.0


def test_bf16_logits_close_to_torch_float64(rng):
    x = jnp.asarray(R.random_logits(rng, (16, 50)), dtype=jnp.bfloat16)
    y = rng.integers(0, 50, size=16).astype(np.int32)
    x64 = np.asarray(x.astype(jnp.float64))
    tv = F.cross_entropy(_t(x64), _t(y), label_smoothing=0.1, reduction="mean").item()
    jv = jaxce.softmax_cross_entropy_with_integer_labels(
        x, jnp.asarray(y), label_smoothing=0.1, reduction="mean"
    )
    assert jv.dtype == jnp.float32
    assert abs(float(jv) - tv) <= 1e-5 * abs(tv)
