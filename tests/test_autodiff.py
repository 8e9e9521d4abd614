"""Forward mode, reverse mode and second derivatives of every public function.

Each function's hand-written derivative rule (``jax.custom_jvp``, see ``jaxce/_autodiff.py``) is
checked in float64 against the float64 references of ``_reference.py`` differentiated by JAX's
own autodiff, and against finite differences (``jax.test_util.check_grads``):

* ``jax.jvp`` and ``jax.jacfwd`` (forward mode);
* ``jax.jacrev`` (reverse mode) agreeing with ``jax.jacfwd``;
* forward-over-reverse Hessian-vector products ``jax.jvp(jax.grad(f), (x,), (v,))``, the HVP
  second-order optimizers and influence functions use, and ``jax.hessian``.
"""

import functools

import _paths
import _reference as R
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from _jax_support import (
    hessian_over_devices_works,
    one_device_mesh,
    reverse_over_reverse_through_scan_works,
)

import jaxce

F64 = np.float64


def _labels(rng, shape, c):
    return jnp.asarray(rng.integers(0, c, size=shape).astype(np.int32))


def _cases(rng):
    """``name -> (jaxce function of one array, reference of it with xp, input)``."""
    x = R.random_logits(rng, (3, 5))
    p = R.random_probs(rng, (3, 5))
    y = _labels(rng, (3,), 5)
    y_ignored = y.at[1].set(-100)
    weights = jnp.asarray(rng.uniform(0.5, 2.0, 5))
    soft = jnp.asarray(R.random_probs(rng, (3, 5)))
    targets = jnp.asarray(rng.uniform(size=(3, 5)))
    probs = rng.uniform(0.05, 0.95, size=(3, 5))
    ce_options = dict(label_smoothing=0.2, z_loss=0.05, logit_soft_cap_value=4.0)
    mask = jnp.asarray(np.array([[True, True, False, True, True]]))

    def integer_ce(v):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            v,
            y_ignored,
            ignore_index=-100,
            class_weights=weights,
            label_smoothing=0.2,
            z_loss=0.05,
            logit_soft_cap=4.0,
            where=mask,
        )

    def integer_ce_ref(v, xp):
        return R.softmax_cross_entropy_with_integer_labels(
            v,
            y_ignored,
            ignore_index=-100,
            class_weights=weights,
            where=mask,
            xp=xp,
            **ce_options,
        )

    return {
        "log_softmax": (jaxce.log_softmax, lambda v, xp: R.log_softmax(v, xp=xp), x),
        "log_softmax_where": (
            lambda v: jaxce.log_softmax(v, where=mask),
            lambda v, xp: R.log_softmax(v, where=mask, xp=xp),
            x,
        ),
        "softmax": (jaxce.softmax, lambda v, xp: R.softmax(v, xp=xp), x),
        "logsumexp": (jaxce.logsumexp, lambda v, xp: R.logsumexp(v, xp=xp), x),
        "sigmoid": (jaxce.sigmoid, lambda v, xp: R.sigmoid(v, xp=xp), x),
        "log_sigmoid": (jaxce.log_sigmoid, lambda v, xp: R.log_sigmoid(v, xp=xp), x),
        "logit_soft_cap": (
            lambda v: jaxce.logit_soft_cap(v, 2.5),
            lambda v, xp: R.logit_soft_cap(v, 2.5, xp=xp),
            x,
        ),
        "integer_ce_every_option": (integer_ce, integer_ce_ref, x),
        "soft_ce_logits": (
            lambda v: jaxce.softmax_cross_entropy(
                v, soft, label_smoothing=0.1, class_weights=weights
            ),
            lambda v, xp: R.softmax_cross_entropy(
                v, soft, label_smoothing=0.1, class_weights=weights, xp=xp
            ),
            x,
        ),
        "soft_ce_labels": (
            lambda t: jaxce.softmax_cross_entropy(jnp.asarray(x), t, label_smoothing=0.1),
            lambda t, xp: R.softmax_cross_entropy(x, t, label_smoothing=0.1, xp=xp),
            p,
        ),
        "nll_loss": (
            lambda v: jaxce.nll_loss(v, y, class_weights=weights),
            lambda v, xp: R.nll_loss(v, y, class_weights=weights, xp=xp),
            x,
        ),
        "sigmoid_bce": (
            lambda v: jaxce.sigmoid_binary_cross_entropy(
                v, targets, pos_weight=weights, label_smoothing=0.1
            ),
            lambda v, xp: R.sigmoid_binary_cross_entropy(
                v, targets, pos_weight=weights, label_smoothing=0.1, xp=xp
            ),
            x,
        ),
        "binary_cross_entropy": (
            lambda q: jaxce.binary_cross_entropy(q, targets),
            lambda q, xp: R.binary_cross_entropy(q, targets, xp=xp),
            probs,
        ),
        "entropy": (jaxce.entropy, lambda q, xp: R.entropy(q, xp=xp), p),
        "softmax_entropy": (
            jaxce.softmax_entropy,
            lambda v, xp: R.softmax_entropy(v, xp=xp),
            x,
        ),
        "kl_divergence": (
            lambda v: jaxce.kl_divergence(v, soft),
            lambda v, xp: R.kl_divergence(v, soft, xp=xp),
            x,
        ),
        "sigmoid_focal_loss": (
            lambda v: jaxce.sigmoid_focal_loss(v, targets, alpha=0.25, gamma=1.5),
            lambda v, xp: R.sigmoid_focal_loss(v, targets, alpha=0.25, gamma=1.5, xp=xp),
            x,
        ),
        "softmax_focal_loss": (
            lambda v: jaxce.softmax_focal_loss(v, y_ignored, alpha=weights, ignore_index=-100),
            lambda v, xp: R.softmax_focal_loss(
                v, y_ignored, alpha=weights, ignore_index=-100, xp=xp
            ),
            x,
        ),
    }


NAMES = list(_cases(np.random.default_rng(0)))


def _ref(fn):
    """A float64 reference as a plain JAX function (differentiated by JAX's autodiff)."""

    def call(v):
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            return fn(v, jnp)

    return call


@pytest.fixture(params=NAMES)
def case(request):
    f, ref, x = _cases(np.random.default_rng(0))[request.param]
    return jax.jit(f), _ref(ref), jnp.asarray(x, F64)


def test_jvp_matches_reference(case):
    f, ref, x = case
    t = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))
    value, tangent = jax.jvp(f, (x,), (t,))
    want_value, want_tangent = jax.jvp(ref, (x,), (t,))
    R.assert_close(value, want_value, rtol=1e-12, atol=1e-12)
    R.assert_close(tangent, want_tangent, rtol=1e-10, atol=1e-12)


def test_jacfwd_equals_jacrev_and_reference(case):
    f, ref, x = case
    forward = jax.jacfwd(f)(x)
    R.assert_close(forward, jax.jacrev(f)(x), rtol=1e-12, atol=1e-13)
    R.assert_close(forward, jax.jacfwd(ref)(x), rtol=1e-10, atol=1e-12)


def test_forward_over_reverse_hvp_and_hessian(case):
    f, ref, x = case
    v = jnp.asarray(np.random.default_rng(2).normal(size=x.shape))

    def hvp(g):
        return jax.jvp(jax.grad(lambda u: jnp.sum(g(u))), (x,), (v,))[1]

    R.assert_close(hvp(f), hvp(ref), rtol=1e-9, atol=1e-11)
    hessian = jax.hessian(lambda u: jnp.sum(f(u)))(x)
    R.assert_close(jnp.tensordot(hessian, v, axes=v.ndim), hvp(ref), rtol=1e-9, atol=1e-11)


def test_finite_differences_to_second_order(case):
    f, _, x = case
    jax.test_util.check_grads(f, (x,), order=2, modes=("fwd", "rev"), eps=1e-6)


# ------------------------------------------------------ every path a size or a backend picks
def _path_cases(rng):
    """:func:`_cases`, and the losses whose reduction or lack of options picks a path of its
    own: the mean of an elementwise loss (a sum taken a chunk of rows at a time), soft labels
    without options (one fused pass, or an exact one for the whole batch) and smoothing without
    a mask or a soft cap (its sums as if every class were admissible, or over the admissible
    ones for the whole batch)."""
    cases = _cases(rng)
    x = R.random_logits(rng, (3, 5))
    targets = jnp.asarray(rng.uniform(size=(3, 5)))
    soft = jnp.asarray(R.random_probs(rng, (3, 5)))
    probs = rng.uniform(0.05, 0.95, size=(3, 5))
    mean = dict(reduction="mean")
    cases["sigmoid_bce_mean"] = (
        lambda v: jaxce.sigmoid_binary_cross_entropy(v, targets, **mean),
        lambda v, xp: R.sigmoid_binary_cross_entropy(v, targets, xp=xp, **mean),
        x,
    )
    cases["binary_cross_entropy_mean"] = (
        lambda q: jaxce.binary_cross_entropy(q, targets, **mean),
        lambda q, xp: R.binary_cross_entropy(q, targets, xp=xp, **mean),
        probs,
    )
    cases["sigmoid_focal_loss_mean"] = (
        lambda v: jaxce.sigmoid_focal_loss(v, targets, gamma=1.5, **mean),
        lambda v, xp: R.sigmoid_focal_loss(v, targets, gamma=1.5, xp=xp, **mean),
        x,
    )
    y = _labels(rng, (3,), 5)
    weights = jnp.asarray(rng.uniform(0.5, 2.0, 5))
    smoothing = dict(class_weights=weights, label_smoothing=0.2, z_loss=0.05)
    cases["integer_ce_smoothing"] = (
        lambda v: jaxce.softmax_cross_entropy_with_integer_labels(v, y, **smoothing),
        lambda v, xp: R.softmax_cross_entropy_with_integer_labels(v, y, xp=xp, **smoothing),
        x,
    )
    cases["soft_ce_plain_logits"] = (
        lambda v: jaxce.softmax_cross_entropy(v, soft),
        lambda v, xp: R.softmax_cross_entropy(v, soft, xp=xp),
        x,
    )
    cases["soft_ce_plain_labels"] = (
        lambda t: jaxce.softmax_cross_entropy(jnp.asarray(x), t),
        lambda t, xp: R.softmax_cross_entropy(x, t, xp=xp),
        R.random_probs(rng, (3, 5)),
    )
    return cases


PATH_NAMES = list(_path_cases(np.random.default_rng(0)))
# What each forced path must reach, in the first derivative's program: a loop over chunks of
# rows (a while loop), or the choice for the whole batch (a cond) of the fused soft-label pass,
# of the smoothing's sums as if every class were admissible, or of an elementwise loss's sum in
# one fusion.
CHUNKED = {
    "log_softmax",
    "log_softmax_where",
    "softmax",
    "logsumexp",
    "integer_ce_every_option",
    "soft_ce_logits",
    "soft_ce_labels",
    "softmax_entropy",
    "entropy",
    "kl_divergence",
    "softmax_focal_loss",
    "sigmoid_bce_mean",
    "binary_cross_entropy_mean",
    "sigmoid_focal_loss_mean",
    "soft_ce_plain_logits",
    "soft_ce_plain_labels",
    "integer_ce_smoothing",
}
FUSED = {
    "soft_ce_plain_logits",
    "soft_ce_plain_labels",
    "integer_ce_smoothing",
    "sigmoid_bce_mean",
}


@pytest.mark.parametrize("path", [_paths.ROW_CHUNKS, _paths.FUSED_PASSES])
@pytest.mark.parametrize("name", PATH_NAMES)
def test_second_derivatives_in_every_mode_on_every_path(name, path):
    """Reverse over reverse (``jax.grad`` of ``jax.grad``, as in meta-learning or a gradient
    penalty) and forward over reverse equal the reference's Hessian where a large input or a
    backend makes the library loop over chunks of rows or choose a soft-label pass for the whole
    batch. Their loops and choice have no reverse-mode derivative of their own: the rules
    read their results, and JAX raised an error where a derivative of a rule reached them."""
    f, ref, x = _path_cases(np.random.default_rng(0))[name]
    x = jnp.asarray(x, F64)

    def total(g):
        return lambda u: jnp.sum(g(u))

    want = jax.hessian(total(_ref(ref)))(x)
    with _paths.taken(path):
        program = str(jax.make_jaxpr(jax.grad(total(f)))(x))
        reached = "while[" in program if path == _paths.ROW_CHUNKS else "cond[" in program
        assert reached == (name in (CHUNKED if path == _paths.ROW_CHUNKS else FUSED)), program
        R.assert_close(jax.jit(jax.hessian(total(f)))(x), want, rtol=1e-9, atol=1e-11)
        if path == _paths.ROW_CHUNKS and not reverse_over_reverse_through_scan_works():
            pytest.skip(f"jax {jax.__version__} cannot transpose a scan in a custom_jvp rule")
        R.assert_close(jax.jit(jax.jacrev(jax.grad(total(f))))(x), want, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------- hyperparameters and weights
def test_forward_mode_to_hyperparameters_and_class_weights():
    """Tangents of label smoothing, z-loss, the soft cap and the class weights, traced."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(R.random_logits(rng, (4, 6)))
    y = _labels(rng, (4,), 6)
    weights = jnp.asarray(rng.uniform(0.5, 2.0, 6))

    def loss(params, xp=None):
        eps, zl, cap, w = params
        if xp is None:
            return jaxce.softmax_cross_entropy_with_integer_labels(
                x,
                y,
                class_weights=w,
                label_smoothing=eps,
                z_loss=zl,
                logit_soft_cap=cap,
                reduction="mean",
            )
        return R.softmax_cross_entropy_with_integer_labels(
            x,
            y,
            class_weights=w,
            label_smoothing=eps,
            z_loss=zl,
            logit_soft_cap_value=cap,
            reduction="mean",
            xp=xp,
        )

    params = (jnp.asarray(0.1), jnp.asarray(0.01), jnp.asarray(3.0), weights)
    tangents = (jnp.asarray(0.3), jnp.asarray(-0.2), jnp.asarray(0.7), jnp.ones(6))

    def ref(p):
        return R.jax_ref(lambda *a, xp: loss(a, xp), *p)

    got = jax.jit(lambda p, t: jax.jvp(jax.jit(loss), (p,), (t,)))(params, tangents)
    want = jax.jvp(ref, (params,), (tangents,))  # eager: the reference branches on values
    R.assert_close(got[0], want[0], rtol=1e-12)
    R.assert_close(got[1], want[1], rtol=1e-10)
    grads = jax.jit(jax.grad(jax.jit(loss)))(params)
    want_grads = jax.grad(ref)(params)
    for g, w in zip(grads, want_grads, strict=True):
        R.assert_close(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "options",
    [
        dict(logit_soft_cap=2.0),
        dict(logit_soft_cap=2.0, label_smoothing=0.1),
        dict(logit_soft_cap=2.0, z_loss=0.05),
        dict(logit_soft_cap=2.0, label_smoothing=0.1, z_loss=0.05, class_weights=True),
    ],
    ids=["cap", "cap+smoothing", "cap+z_loss", "all"],
)
def test_hessian_in_the_logits_and_the_hyperparameters(options):
    """Second derivatives mixing the logits and every traced hyperparameter (d/dcap of dloss/dx,
    d2loss/dcap2, ...) against autodiff of the float64 reference: the row max is a shift without
    a derivative, also once capped (it carried one in the cap, which the derivatives of the
    derivative picked up)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(R.random_logits(rng, (3, 5)))
    y = _labels(rng, (3,), 5)
    names = [k for k in options if k != "class_weights"]
    w = jnp.asarray(rng.uniform(0.5, 2.0, 5)) if options.get("class_weights") else None
    hyper = jnp.asarray([options[k] for k in names])

    def loss(x, hyper, w, xp=None):
        kw = dict(zip(names, hyper, strict=True))
        if xp is None:
            return jaxce.softmax_cross_entropy_with_integer_labels(
                x, y, class_weights=w, reduction="sum", **kw
            )
        kw["logit_soft_cap_value"] = kw.pop("logit_soft_cap")
        return R.softmax_cross_entropy_with_integer_labels(
            x, y, class_weights=w, reduction="sum", xp=xp, **kw
        )

    def ref(x, hyper, w):
        return R.jax_ref(lambda *a, xp: loss(*a, xp=xp), x, hyper, w)

    argnums = (0, 1) if w is None else (0, 1, 2)
    got = jax.jit(jax.hessian(jax.jit(loss), argnums=argnums))(x, hyper, w)
    want = jax.hessian(ref, argnums=argnums)(x, hyper, w)  # eager: it branches on values
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        R.assert_close(g, h, rtol=1e-9, atol=1e-12)


# Logits whose u = x / cap lies on both sides of where tanh(u) rounds to +-1 (|u| = 9 in
# float32, 19 in float64), and one where 1 / cosh(u)**2 nears float32's smallest normal number.
_SATURATED_U = np.array([[10.4, 7.6, -5.6, -10.1, -5.0, 0.3], [0.5, -21.0, 2.0, -2.5, 43.5, 9.0]])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cap", [1.0, 4.0])
@pytest.mark.parametrize("traced", [False, True], ids=["cap_number", "cap_traced"])
@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.1, "z_loss": 0.01}], ids=["cap", "cap+smoothing+z"]
)
def test_soft_capped_loss_hessian_where_tanh_rounds_to_one(dtype, cap, traced, options):
    """The integer-label loss's second derivatives in the logits and in a traced cap, each entry
    within 16 epsilons of its scale (the sum of its terms' absolute values) of a 60-digit
    reference, where ``tanh(u)`` rounds to +-1. The losses' rules compute the capped logits,
    which a derivative of a rule differentiates: autodiff of ``tanh`` took ``1 - tanh(u)**2``
    from the rounded ``tanh(u)``, 0 in float32 from ``|u| = 9``, and every entry between a
    logit there and another was 0 (float64: 3.7e-8 of itself), the mixed one in a logit and the
    cap 8.3% off. An entry below the smallest normal number is within 16 of it."""
    labels = np.array([0, 2])
    x = jnp.asarray(_SATURATED_U * cap, dtype)  # exact: the caps are powers of two
    smoothing, z_loss = options.get("label_smoothing", 0.0), options.get("z_loss", 0.0)

    def loss(x, c):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            x, labels, logit_soft_cap=c if traced else cap, reduction="sum", **options
        )

    got = jax.jit(jax.hessian(loss, argnums=(0, 1) if traced else 0))(x, jnp.asarray(cap, dtype))
    h_xx = np.asarray(got[0][0] if traced else got, np.float64)
    rows = [
        R.soft_capped_cross_entropy_hessian(np.asarray(x[r], np.float64), y, cap, smoothing, z_loss)
        for r, y in enumerate(labels)
    ]
    eps, tiny = float(np.finfo(dtype).eps), float(np.finfo(dtype).smallest_normal)

    def check(name, value, want, scale):
        # an entry below the smallest normal number is flushed: within it, not its scale
        err = np.max(np.abs(np.asarray(value, np.float64) - want) / np.maximum(scale * eps, tiny))
        assert err <= 16, f"{name}: {err:.3g} epsilons of its scale"

    for r, (w_xx, s_xx, w_xc, s_xc, _, _) in enumerate(rows):
        check(f"d2/dx2, row {r}", h_xx[r, :, r, :], w_xx, s_xx)
        if traced:  # both orders: d/dcap of the gradient, and d/dx of the derivative in the cap
            check(f"d/dcap d/dx, row {r}", got[0][1][r], w_xc, s_xc)
            check(f"d/dx d/dcap, row {r}", got[1][0][r], w_xc, s_xc)
    if traced:
        check("d2/dcap2", got[1][1], sum(w[4] for w in rows), sum(w[5] for w in rows))


@pytest.mark.parametrize("cap", [0.002, 2.0])
def test_soft_capped_loss_third_derivatives_in_the_cap(cap):
    """Third derivatives of the integer-label loss in a traced cap and the logits (a derivative
    of the Hessian) against autodiff of the float64 reference, at a small cap: the derivative in
    the cap of the tangent's own quotients ``x_dot / cap`` was clamped as ``u`` is, which made
    ``d3/dcap3`` 165658 for 150620 at a cap of 0.002."""
    x = jnp.asarray([[0.01, -0.004, 0.002], [0.5, 1.5, -2.0]]) * (cap / 0.002 if cap > 1 else 1)
    labels = np.array([0, 2])

    def loss(x, c, xp=None):
        if xp is None:
            return jaxce.softmax_cross_entropy_with_integer_labels(
                x, labels, logit_soft_cap=c, label_smoothing=0.1, reduction="sum"
            )
        return R.softmax_cross_entropy_with_integer_labels(
            x, labels, logit_soft_cap_value=c, label_smoothing=0.1, reduction="sum", xp=xp
        )

    def ref(x, c):
        return R.jax_ref(lambda *a, xp: loss(*a, xp=xp), x, c)

    c = jnp.asarray(cap)
    third = lambda f: jax.jacfwd(jax.hessian(f, argnums=(0, 1)), argnums=(0, 1))  # noqa: E731
    got = jax.jit(third(jax.jit(loss)))(x, c)
    want = third(ref)(x, c)  # eager: the reference branches on values
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        R.assert_close(g, h, rtol=1e-9, atol=1e-12 * float(np.max(np.abs(h))))


# --------------------------------------------------------------------------- the fused loss
def _fused_problem(rng):
    x = jnp.asarray(rng.normal(size=(7, 4)))
    w = jnp.asarray(rng.normal(size=(4, 11)) / 2)
    y = _labels(rng, (7,), 11).at[2].set(-100)
    return x, w, y


FUSED_OPTIONS = dict(
    ignore_index=-100,
    label_smoothing=0.1,
    z_loss=0.01,
    logit_soft_cap=3.0,
    token_chunk=3,
    vocab_chunk=4,
)


@pytest.mark.parametrize("recompute_logits", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_forward_mode_and_hvp(recompute_logits, reduction):
    rng = np.random.default_rng(4)
    x, w, y = _fused_problem(rng)
    kw = {**FUSED_OPTIONS, "reduction": reduction, "recompute_logits": recompute_logits}
    options = {
        k: v for k, v in kw.items() if k not in ("token_chunk", "vocab_chunk", "recompute_logits")
    }

    def fused(x, w):
        return jaxce.linear_softmax_cross_entropy(x, w, y, **kw)

    def unfused(x, w):
        return jaxce.softmax_cross_entropy_with_integer_labels(x @ w, y, **options)

    tx, tw = jnp.asarray(rng.normal(size=x.shape)), jnp.asarray(rng.normal(size=w.shape))

    # Each derivative is one jitted program (called eagerly, each primitive of the loss's
    # loops would be compiled on its own).
    def jvp(loss):
        return jax.jit(lambda x, w: jax.jvp(loss, (x, w), (tx, tw)))(x, w)

    got, want = jvp(jax.jit(fused)), jvp(unfused)
    R.assert_close(got[0], want[0], rtol=1e-12)
    R.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)

    def hvp(loss):
        grad = jax.grad(loss, argnums=(0, 1))
        return jax.jit(lambda x, w: jax.jvp(grad, (x, w), (tx, tw))[1])(x, w)

    for a, b in zip(hvp(jax.jit(fused)), hvp(unfused), strict=True):
        R.assert_close(a, b, rtol=1e-9, atol=1e-11)
    R.assert_close(
        jax.jit(jax.jacfwd(fused, argnums=1))(x, w),
        jax.jit(jax.jacrev(unfused, argnums=1))(x, w),
        rtol=1e-10,
    )


@pytest.mark.parametrize("recompute_logits", [False, True])
def test_fused_hessian_in_the_cap(recompute_logits):
    """The fused loss's second derivatives in x, w and a traced soft cap equal the unfused
    loss's (whose are checked against the reference above)."""
    rng = np.random.default_rng(6)
    x, w, y = _fused_problem(rng)
    kw = dict(ignore_index=-100, label_smoothing=0.1, reduction="mean")

    def fused(x, w, cap):
        chunks = dict(token_chunk=3, vocab_chunk=4, recompute_logits=recompute_logits)
        return jaxce.linear_softmax_cross_entropy(x, w, y, logit_soft_cap=cap, **chunks, **kw)

    def unfused(x, w, cap):
        return jaxce.softmax_cross_entropy_with_integer_labels(x @ w, y, logit_soft_cap=cap, **kw)

    cap = jnp.asarray(3.0)
    got = jax.jit(jax.hessian(jax.jit(fused), argnums=(0, 1, 2)))(x, w, cap)
    want = jax.jit(jax.hessian(unfused, argnums=(0, 1, 2)))(x, w, cap)
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        R.assert_close(g, h, rtol=1e-9, atol=1e-11)


def test_fused_per_token_loss_is_reverse_mode_only():
    """reduction="none" keeps a reverse-mode rule (its per-token cotangent needs the blocks
    again); forward mode raises JAX's error for such rules, and the reduced losses have it."""
    x, w, y = _fused_problem(np.random.default_rng(5))
    f = functools.partial(
        jaxce.linear_softmax_cross_entropy, labels=y, ignore_index=-100, reduction="none"
    )
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: f(x, w), (x,), (x,))
    hvp = jax.jvp(jax.grad(lambda x: jnp.sum(f(x, w))), (x,), (x,))[1]
    want = jax.jvp(
        jax.grad(
            lambda x: jnp.sum(
                jaxce.softmax_cross_entropy_with_integer_labels(x @ w, y, ignore_index=-100)
            )
        ),
        (x,),
        (x,),
    )[1]
    R.assert_close(hvp, want, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------ derivatives at exact zeros
def _zeros_cases():
    """``name -> (loss of (a, b), a, b)``, each with a weight-like input at exactly 0 (a class
    weight, a label, a smoothing of 0 or 1, a z-loss, a focusing gamma): where a product with it
    is taken by a select (``0 * inf = 0``), the select's own derivative dropped the product rule's
    term, and mixed second derivatives came out one-sided."""
    x = jnp.asarray([[1.0, -0.5, 0.25], [0.1, 0.2, 0.3]])
    y = jnp.asarray([0, 2], jnp.int32)
    ce = jaxce.softmax_cross_entropy_with_integer_labels
    w = jnp.asarray([0.5, 1.0, 2.0])
    w_label_zero = jnp.asarray([0.0, 1.0, 2.0])
    one_hot = jax.nn.one_hot(y, 3, dtype=F64)
    logits, labels = jnp.asarray([-1.5, 0.7]), jnp.asarray([0.3, 0.6])
    zero = jnp.asarray(0.0)
    return {
        "class weights, mean": (
            lambda a, b: ce(a, y, class_weights=b, reduction="mean"),
            x,
            w_label_zero,
        ),
        "nll, class weights, mean": (
            lambda a, b: jaxce.nll_loss(jaxce.log_softmax(a), y, class_weights=b, reduction="mean"),
            x,
            w_label_zero,
        ),
        "class weights and smoothing 0": (
            lambda a, b: ce(x, y, class_weights=a, label_smoothing=b, reduction="mean"),
            w,
            zero,
        ),
        "class weights and z-loss 0": (
            lambda a, b: ce(x, y, class_weights=a, z_loss=b, reduction="mean"),
            w,
            zero,
        ),
        "class weights and smoothing 1": (
            lambda a, b: ce(x, y, class_weights=a, label_smoothing=b, reduction="sum"),
            w,
            jnp.asarray(1.0),
        ),
        "logits and class weights 0, soft cap": (
            lambda a, b: ce(a, y, class_weights=b, logit_soft_cap=5.0, reduction="sum"),
            x,
            jnp.asarray([0.0, 1.0, 0.0]),
        ),
        "soft labels one-hot and class weights": (
            lambda a, b: jaxce.softmax_cross_entropy(x, a, class_weights=b, reduction="sum"),
            one_hot,
            jnp.asarray([1.0, 0.0, 2.0]),
        ),
        "soft labels and smoothing 1": (
            lambda a, b: jaxce.softmax_cross_entropy(x, a, label_smoothing=b, reduction="sum"),
            one_hot,
            jnp.asarray(1.0),
        ),
        "BCE labels 0 and pos_weight": (
            lambda a, b: jaxce.sigmoid_binary_cross_entropy(
                logits, a, pos_weight=b, reduction="sum"
            ),
            jnp.zeros(2),
            jnp.asarray([2.0]),
        ),
        "BCE labels and weights 0": (
            lambda a, b: jaxce.sigmoid_binary_cross_entropy(logits, a, weights=b, reduction="sum"),
            labels,
            jnp.zeros(2),
        ),
        "sigmoid focal, labels and gamma 0": (
            lambda a, b: jaxce.sigmoid_focal_loss(logits, a, gamma=b, reduction="sum"),
            labels,
            zero,
        ),
        **_fused_and_sharded_zeros_cases(),
    }


def _fused_and_sharded_zeros_cases():
    """The same products in the fused loss and the sharded losses (a one-device mesh, in this
    process: the products are per device; tests/test_sharding.py compares the meshes)."""
    h = jnp.asarray([[0.3, -1.2, 0.5], [1.1, 0.4, -0.7], [-0.2, 0.9, 0.6], [0.8, -0.3, 0.1]])
    w = jnp.asarray(
        [
            [0.2, -0.5, 1.0, 0.3, -1.1],
            [0.7, 0.1, -0.4, 0.9, 0.5],
            [-0.6, 1.2, 0.3, -0.2, 0.8],
        ]
    )
    x = h @ w
    y = jnp.asarray([0, 2, 4, 2], jnp.int32)
    cw = jnp.asarray([0.5, 1.0, 2.0, 0.7, 1.3])
    label_zero = jnp.asarray([0.0, 1.0, 0.0, 0.7, 1.3])  # labels 0 and 2 weigh 0
    zero = jnp.asarray(0.0)
    mesh = one_device_mesh()
    fused = functools.partial(jaxce.linear_softmax_cross_entropy, labels=y, reduction="mean")
    on_mesh = dict(labels=y, axis_name="model", mesh=mesh, reduction="mean")
    sharded = functools.partial(jaxce.sharded.softmax_cross_entropy_with_integer_labels, **on_mesh)
    sharded_fused = functools.partial(jaxce.sharded.linear_softmax_cross_entropy, **on_mesh)
    return {
        "fused, w and class weights": (lambda a, b: fused(h, a, class_weights=b), w, label_zero),
        "fused, class weights and smoothing 0": (
            lambda a, b: fused(h, w, class_weights=a, label_smoothing=b),
            cw,
            zero,
        ),
        "fused, class weights and z-loss 0": (
            lambda a, b: fused(h, w, class_weights=a, z_loss=b),
            cw,
            zero,
        ),
        "fused, class weights and smoothing 1": (
            lambda a, b: fused(h, w, class_weights=a, label_smoothing=b, reduction="sum"),
            cw,
            jnp.asarray(1.0),
        ),
        "fused, w and class weights 0, soft cap": (
            lambda a, b: fused(h, a, class_weights=b, logit_soft_cap=5.0, reduction="sum"),
            w,
            label_zero,
        ),
        "sharded, logits and class weights": (
            lambda a, b: sharded(a, class_weights=b),
            x,
            label_zero,
        ),
        "sharded, class weights and smoothing 0": (
            lambda a, b: sharded(x, class_weights=a, label_smoothing=b),
            cw,
            zero,
        ),
        "sharded, class weights and z-loss 0": (
            lambda a, b: sharded(x, class_weights=a, z_loss=b),
            cw,
            zero,
        ),
        "sharded fused, w and class weights": (
            lambda a, b: sharded_fused(h, a, class_weights=b),
            w,
            label_zero,
        ),
        "sharded fused, class weights and z-loss 0": (
            lambda a, b: sharded_fused(h, w, class_weights=a, z_loss=b),
            cw,
            zero,
        ),
    }


ZEROS = _zeros_cases()


def _zeros_case(name):
    if name.startswith("sharded") and not hessian_over_devices_works():
        pytest.skip(f"jax {jax.__version__} cannot take jax.hessian through a psum in shard_map")
    return ZEROS[name]


@pytest.mark.parametrize("name", ZEROS)
def test_second_derivatives_at_exact_zeros_are_symmetric(name):
    """d/db (dL/da) = d/da (dL/db), and each block of the Hessian is symmetric. The same values
    away from the zero (1e-9 off it) agree to first order: the one-sided results were off by
    O(1) (a class weight's Hessian of 0.369 for 0.237). Reverse mode over reverse mode, which
    transposes the tangent's own product, gives the same Hessian (but for the fused loss, whose
    loops allow no reverse mode over its rule)."""
    f, a, b = _zeros_case(name)

    def hessian(a, b, over=jax.jacfwd):
        h = jax.jit(over(jax.jacrev(f, argnums=(0, 1)), argnums=(0, 1)))(a, b)
        sizes = (np.size(a), np.size(b))
        return [[np.asarray(h[i][j]).reshape(sizes[i], sizes[j]) for j in (0, 1)] for i in (0, 1)]

    h = hessian(a, b)
    if not name.startswith("fused"):
        reverse = hessian(a, b, over=jax.jacrev)
        for i in (0, 1):
            for j in (0, 1):
                R.assert_close(reverse[i][j], h[i][j], err_msg=f"reverse over reverse, {i}{j}")
    R.assert_close(h[0][1], h[1][0].T, err_msg="mixed")
    R.assert_close(h[0][0], h[0][0].T, err_msg="in a")
    R.assert_close(h[1][1], h[1][1].T, err_msg="in b")
    # Continuity: nudged off the zeros.
    near = hessian(*_off_the_zeros(a, b))
    for i in (0, 1):
        for j in (0, 1):
            R.assert_close(h[i][j], near[i][j], rtol=1e-6, atol=1e-6, err_msg=f"block {i}{j}")


def _off_the_zeros(*values):
    """Every exact 0 of the values moved up by 1e-9."""
    return tuple(jnp.where(v == 0, 1e-9, v) for v in values)


@pytest.mark.parametrize("name", ZEROS)
def test_third_derivatives_at_exact_zeros_are_continuous(name):
    """The derivative of the Hessian (forward mode over it; the fused loss's loops allow no
    reverse mode over its reverse-mode rule) agrees with its values 1e-9 off the zeros, in every
    block: the tangent's own product with the weight, taken by a plain select, left the weight's
    term out of a derivative taken of it (d3L/dw dx dw of a mean with a class weight of 0: off by
    0.1; the sigmoid focal loss's d3L/dt dt dgamma at gamma = 0: by 0.67)."""
    f, a, b = _zeros_case(name)
    third = jax.jit(jax.jacfwd(jax.hessian(f, argnums=(0, 1)), argnums=(0, 1)))
    at, near = third(a, b), third(*_off_the_zeros(a, b))
    paths = jax.tree_util.tree_flatten_with_path(at)[0]
    for (path, got), want in zip(paths, jax.tree.leaves(near), strict=True):
        R.assert_close(got, want, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path))


_ROW = jnp.array([[0.5, -jnp.inf, 1.0], [-jnp.inf, -jnp.inf, -jnp.inf], [2.0, 0.1, -jnp.inf]])
_LABELS = jnp.array([0, 1, 0])
_SOFT = jnp.array([[0.3, 0.0, 0.7], [0.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
EMPTY_ROW = {
    "log_softmax": lambda x: jnp.sum(jnp.where(jnp.isfinite(x), jaxce.log_softmax(x), 0.0)),
    "softmax": lambda x: jnp.sum(jaxce.softmax(x) * jnp.arange(3.0)[None, :]),
    "logsumexp": lambda x: jnp.sum(jnp.where(jnp.arange(3) == 1, 0.0, jaxce.logsumexp(x))),
    "softmax_entropy": lambda x: jaxce.softmax_entropy(x, reduction="sum"),
    "integer labels": lambda x: jaxce.softmax_cross_entropy_with_integer_labels(
        x, _LABELS, reduction="sum"
    ),
    "integer labels, every option": lambda x: jaxce.softmax_cross_entropy_with_integer_labels(
        x,
        _LABELS,
        class_weights=jnp.array([1.0, 2.0, 0.5]),
        label_smoothing=0.1,
        z_loss=1e-2,
        logit_soft_cap=4.0,
        reduction="mean",
    ),
    "soft labels": lambda x: jaxce.softmax_cross_entropy(x, _SOFT, reduction="sum"),
    "softmax focal": lambda x: jaxce.softmax_focal_loss(x, _LABELS, reduction="sum"),
}


@pytest.mark.parametrize("name", EMPTY_ROW)
def test_reverse_over_reverse_on_a_row_with_no_admissible_class(name):
    """A row of -inf logits (no admissible class) takes no part: its loss and derivatives are 0.
    Reverse mode over reverse mode gave its Hessian-vector product NaN (the log of its sum of
    exponentials, 0, has the derivative 1 / 0, which met a zero cotangent), where forward over
    reverse gave 0; the other rows' agree too."""
    f = EMPTY_ROW[name]
    v = jnp.ones_like(_ROW)
    forward = jax.jvp(jax.grad(f), (_ROW,), (v,))[1]
    reverse = jax.grad(lambda x: jnp.sum(jax.grad(f)(x) * v))(_ROW)
    assert np.all(np.isfinite(np.asarray(reverse))), reverse
    np.testing.assert_array_equal(np.asarray(reverse)[1], 0.0)
    R.assert_close(reverse, forward, rtol=1e-6, atol=1e-7)
