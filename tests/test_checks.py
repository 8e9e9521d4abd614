"""Bad inputs raise ValueError/TypeError naming the argument, at trace time; check_labels."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxce

X43 = np.linspace(-1.0, 1.0, 12).reshape(4, 3)
P43 = np.full((4, 3), 1.0 / 3.0)
Y4 = np.array([0, 1, 2, 0], np.int32)
B43 = np.array([[1.0, 0.0, 1.0]] * 4)


def _mentions(msg, token):
    """``token`` appears in ``msg``; shapes may be written (4, 2), [4, 2] or (4,2)."""
    if isinstance(token, tuple):
        pattern = r"[\(\[]\s*" + r"\s*,\s*".join(str(t) for t in token) + r"\s*,?\s*[\)\]]"
        return re.search(pattern, msg) is not None
    return str(token) in msg


# (id, fn(*arrays), arrays, argument named, tokens of the received value)
CASES = [
    # integer-label cross-entropy
    (
        "ce_int/labels_shape",
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y),
        (X43, np.zeros(5, np.int32)),
        "labels",
        [(5,)],
    ),
    (
        "ce_int/labels_shape_rank",
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y),
        (X43, np.zeros((4, 3), np.int32)),
        "labels",
        [(4, 3)],
    ),
    (
        "ce_int/labels_shape_axis1",
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=0),
        (X43, np.zeros(4, np.int32)),
        "labels",
        [(4,)],
    ),
    (
        "ce_int/labels_shape_tuple_axis",
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=(1, 2)),
        (np.zeros((2, 3, 4)), np.zeros(3, np.int32)),
        "labels",
        [(3,)],
    ),
    (
        "ce_int/float_labels",
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y),
        (X43, Y4.astype(np.float32)),
        "labels",
        ["float"],
    ),
    (
        "ce_int/int_logits",
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y),
        (X43.astype(np.int32), Y4),
        "logits",
        ["int"],
    ),
    (
        "ce_int/axis",
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=2),
        (X43, Y4),
        "axis",
        ["2"],
    ),
    (
        "ce_int/axis_neg",
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=-3),
        (X43, Y4),
        "axis",
        ["-3"],
    ),
    (
        "ce_int/reduction",
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="avg"),
        (X43, Y4),
        "reduction",
        ["avg"],
    ),
    (
        "ce_int/label_smoothing_high",
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, label_smoothing=1.5),
        (X43, Y4),
        "label_smoothing",
        ["1.5"],
    ),
    (
        "ce_int/label_smoothing_neg",
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, label_smoothing=-0.1),
        (X43, Y4),
        "label_smoothing",
        ["-0.1"],
    ),
    (
        "ce_int/class_weights",
        lambda x, y, w: jaxce.softmax_cross_entropy_with_integer_labels(x, y, class_weights=w),
        (X43, Y4, np.ones(4)),
        "class_weights",
        ["4"],
    ),
    (
        "ce_int/class_weights_2d",
        lambda x, y, w: jaxce.softmax_cross_entropy_with_integer_labels(x, y, class_weights=w),
        (X43, Y4, np.ones((3, 3))),
        "class_weights",
        [(3, 3)],
    ),
    (
        "ce_int/soft_cap_zero",
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, logit_soft_cap=0.0),
        (X43, Y4),
        "logit_soft_cap",
        ["0"],
    ),
    (
        "ce_int/soft_cap_neg",
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, logit_soft_cap=-2.0),
        (X43, Y4),
        "logit_soft_cap",
        ["-2"],
    ),
    # soft-label cross-entropy
    (
        "ce_soft/labels_shape",
        lambda x, y: jaxce.softmax_cross_entropy(x, y),
        (X43, np.zeros((4, 2))),
        "labels",
        [(4, 2)],
    ),
    (
        "ce_soft/int_logits",
        lambda x, y: jaxce.softmax_cross_entropy(x, y),
        (X43.astype(np.int32), P43),
        "logits",
        ["int"],
    ),
    (
        "ce_soft/axis",
        lambda x, y: jaxce.softmax_cross_entropy(x, y, axis=5),
        (X43, P43),
        "axis",
        ["5"],
    ),
    (
        "ce_soft/reduction",
        lambda x, y: jaxce.softmax_cross_entropy(x, y, reduction="batchmean"),
        (X43, P43),
        "reduction",
        ["batchmean"],
    ),
    (
        "ce_soft/label_smoothing",
        lambda x, y: jaxce.softmax_cross_entropy(x, y, label_smoothing=1.25),
        (X43, P43),
        "label_smoothing",
        ["1.25"],
    ),
    (
        "ce_soft/class_weights",
        lambda x, y, w: jaxce.softmax_cross_entropy(x, y, class_weights=w),
        (X43, P43, np.ones(2)),
        "class_weights",
        ["2"],
    ),
    # nll_loss
    (
        "nll/labels_shape",
        lambda x, y: jaxce.nll_loss(x, y),
        (X43, np.zeros((2, 2), np.int32)),
        "labels",
        [(2, 2)],
    ),
    (
        "nll/float_labels",
        lambda x, y: jaxce.nll_loss(x, y),
        (X43, Y4.astype(np.float64)),
        "labels",
        ["float"],
    ),
    (
        "nll/int_log_probs",
        lambda x, y: jaxce.nll_loss(x, y),
        (X43.astype(np.int32), Y4),
        "log_probs",
        ["int"],
    ),
    ("nll/axis", lambda x, y: jaxce.nll_loss(x, y, axis=3), (X43, Y4), "axis", ["3"]),
    (
        "nll/class_weights",
        lambda x, y, w: jaxce.nll_loss(x, y, class_weights=w),
        (X43, Y4, np.ones(5)),
        "class_weights",
        ["5"],
    ),
    (
        "nll/reduction",
        lambda x, y: jaxce.nll_loss(x, y, reduction="Mean"),
        (X43, Y4),
        "reduction",
        ["Mean"],
    ),
    # sigmoid BCE
    (
        "sbce/labels_shape",
        lambda x, y: jaxce.sigmoid_binary_cross_entropy(x, y),
        (X43, np.zeros((5, 2))),
        "labels",
        [(5, 2)],
    ),
    (
        "sbce/int_logits",
        lambda x, y: jaxce.sigmoid_binary_cross_entropy(x, y),
        (X43.astype(np.int32), B43),
        "logits",
        ["int"],
    ),
    (
        "sbce/pos_weight",
        lambda x, y, w: jaxce.sigmoid_binary_cross_entropy(x, y, pos_weight=w),
        (X43, B43, np.ones(4)),
        "pos_weight",
        ["4"],
    ),
    (
        "sbce/weights",
        lambda x, y, w: jaxce.sigmoid_binary_cross_entropy(x, y, weights=w),
        (X43, B43, np.ones(5)),
        "weights",
        ["5"],
    ),
    (
        "sbce/label_smoothing",
        lambda x, y: jaxce.sigmoid_binary_cross_entropy(x, y, label_smoothing=2.0),
        (X43, B43),
        "label_smoothing",
        ["2.0"],
    ),
    (
        "sbce/reduction",
        lambda x, y: jaxce.sigmoid_binary_cross_entropy(x, y, reduction="avg"),
        (X43, B43),
        "reduction",
        ["avg"],
    ),
    # BCE on probabilities
    (
        "bce/labels_shape",
        lambda p, y: jaxce.binary_cross_entropy(p, y),
        (P43, np.zeros((3, 4))),
        "labels",
        [(3, 4)],
    ),
    (
        "bce/int_probs",
        lambda p, y: jaxce.binary_cross_entropy(p, y),
        (X43.astype(np.int32), B43),
        "probs",
        ["int"],
    ),
    (
        "bce/weights",
        lambda p, y, w: jaxce.binary_cross_entropy(p, y, weights=w),
        (P43, B43, np.ones((2, 3))),
        "weights",
        [(2, 3)],
    ),
    (
        "bce/reduction",
        lambda p, y: jaxce.binary_cross_entropy(p, y, reduction="avg"),
        (P43, B43),
        "reduction",
        ["avg"],
    ),
    # focal
    (
        "mfl/gamma",
        lambda x, y: jaxce.softmax_focal_loss(x, y, gamma=-1.0),
        (X43, Y4),
        "gamma",
        ["-1"],
    ),
    (
        "mfl/alpha",
        lambda x, y, a: jaxce.softmax_focal_loss(x, y, alpha=a),
        (X43, Y4, np.ones(4)),
        "alpha",
        ["4"],
    ),
    (
        "mfl/float_labels",
        lambda x, y: jaxce.softmax_focal_loss(x, y),
        (X43, Y4.astype(np.float32)),
        "labels",
        ["float"],
    ),
    (
        "mfl/labels_shape",
        lambda x, y: jaxce.softmax_focal_loss(x, y),
        (X43, np.zeros(3, np.int32)),
        "labels",
        [(3,)],
    ),
    (
        "mfl/reduction",
        lambda x, y: jaxce.softmax_focal_loss(x, y, reduction="avg"),
        (X43, Y4),
        "reduction",
        ["avg"],
    ),
    (
        "sfl/gamma",
        lambda x, y: jaxce.sigmoid_focal_loss(x, y, gamma=-0.5),
        (X43, B43),
        "gamma",
        ["-0.5"],
    ),
    (
        "sfl/int_logits",
        lambda x, y: jaxce.sigmoid_focal_loss(x, y),
        (X43.astype(np.int32), B43),
        "logits",
        ["int"],
    ),
    (
        "sfl/reduction",
        lambda x, y: jaxce.sigmoid_focal_loss(x, y, reduction="avg"),
        (X43, B43),
        "reduction",
        ["avg"],
    ),
    # primitives and information
    ("log_softmax/axis", lambda x: jaxce.log_softmax(x, axis=2), (X43,), "axis", ["2"]),
    ("softmax/axis", lambda x: jaxce.softmax(x, axis=-3), (X43,), "axis", ["-3"]),
    ("logsumexp/axis", lambda x: jaxce.logsumexp(x, axis=(0, 4)), (X43,), "axis", ["4"]),
    ("logit_soft_cap/cap", lambda x: jaxce.logit_soft_cap(x, 0.0), (X43,), "cap", ["0"]),
    ("logit_soft_cap/cap_neg", lambda x: jaxce.logit_soft_cap(x, -1.0), (X43,), "cap", ["-1"]),
    ("entropy/axis", lambda p: jaxce.entropy(p, axis=2), (P43,), "axis", ["2"]),
    ("softmax_entropy/axis", lambda x: jaxce.softmax_entropy(x, axis=2), (X43,), "axis", ["2"]),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("fn,arrays,name,tokens", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_argument(fn, arrays, name, tokens, jit):
    args = [jnp.asarray(a) for a in arrays]
    call = jax.jit(fn) if jit else fn
    with pytest.raises((ValueError, TypeError)) as info:
        call(*args)
    msg = str(info.value)
    assert name in msg, msg
    for token in tokens:
        assert _mentions(msg, token), f"{token!r} not in {msg!r}"


def test_errors_are_raised_at_trace_time():
    # tracing alone (no execution) raises: jax.eval_shape never runs the computation
    with pytest.raises((ValueError, TypeError)):
        jax.eval_shape(
            lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y),
            jax.ShapeDtypeStruct((4, 3), jnp.float32),
            jax.ShapeDtypeStruct((5,), jnp.int32),
        )


def test_valid_edge_hyperparameters_accepted():
    x, y = jnp.asarray(X43), jnp.asarray(Y4)
    for eps in (0.0, 1.0):
        out = jaxce.softmax_cross_entropy_with_integer_labels(x, y, label_smoothing=eps)
        assert np.all(np.isfinite(np.asarray(out)))
    out = jaxce.softmax_focal_loss(x, y, gamma=0.0)
    assert np.all(np.isfinite(np.asarray(out)))


# ------------------------------------------------------------------------ check_labels


@pytest.mark.parametrize(
    "labels,ignore_index", [([0, 3, 1], None), ([0, -1, 1], None), ([0, -1, -100], -100), ([5], 2)]
)
def test_check_labels_raises_eagerly(labels, ignore_index):
    with pytest.raises(Exception) as info:
        jaxce.check_labels(jnp.asarray(np.array(labels, np.int32)), 3, ignore_index=ignore_index)
    assert "label" in str(info.value).lower()


@pytest.mark.parametrize(
    "labels,ignore_index",
    [([0, 2, 1], None), ([0, -100, 2], -100), ([[0, 1], [2, 2]], None), ([], None)],
)
def test_check_labels_accepts_valid(labels, ignore_index):
    jaxce.check_labels(jnp.asarray(np.array(labels, np.int32)), 3, ignore_index=ignore_index)


@pytest.mark.parametrize("order", ["checkify_of_jit", "jit_of_checkify"])
def test_check_labels_under_jit_with_checkify(order):
    def f(labels, logits):
        jaxce.check_labels(labels, logits.shape[-1], ignore_index=-100)
        return jaxce.softmax_cross_entropy_with_integer_labels(
            logits, labels, ignore_index=-100, reduction="mean"
        )

    g = (
        checkify.checkify(jax.jit(f))
        if order == "checkify_of_jit"
        else jax.jit(checkify.checkify(f))
    )
    logits = jnp.asarray(X43)
    err, out = g(jnp.asarray(np.array([0, -100, 2, 1], np.int32)), logits)
    assert err.get() is None
    err.throw()  # no error
    assert np.isfinite(float(out))
    err, out = g(jnp.asarray(np.array([0, 3, 2, 1], np.int32)), logits)
    assert err.get() is not None
    with pytest.raises(checkify.JaxRuntimeError):
        err.throw()
    err, _ = g(jnp.asarray(np.array([0, -1, 2, 1], np.int32)), logits)
    assert err.get() is not None


# ------------------------------------------------------------- traced hyperparameters
W34 = np.linspace(-1.0, 1.0, 12).reshape(3, 4)  # x [4, 3] @ w [3, 4]: logits [4, 4]

# A hyperparameter traced under jit (a schedule) cannot be checked at trace time; out of range
# it makes the loss NaN, never a plausible number, and the derivatives with respect to the
# logits and to itself NaN. (loss, hyperparameter, out-of-range values), logits X43.
LOSSES = {
    "ce_int": lambda x, **kw: jaxce.softmax_cross_entropy_with_integer_labels(x, Y4, **kw),
    "linear": lambda x, **kw: jaxce.linear_softmax_cross_entropy(x, W34, Y4, **kw),
    "ce_soft": lambda x, **kw: jaxce.softmax_cross_entropy(x, P43, **kw),
    "bce": lambda x, **kw: jaxce.sigmoid_binary_cross_entropy(x, B43, **kw),
    "soft_cap": jaxce.logit_soft_cap,
    "sigmoid_focal": lambda x, **kw: jaxce.sigmoid_focal_loss(x, B43, **kw),
    "softmax_focal": lambda x, **kw: jaxce.softmax_focal_loss(x, Y4, **kw),
}
NAN = np.nan
TRACED = [
    ("ce_int", "label_smoothing", (-0.5, 1.5, NAN)),
    ("ce_int", "z_loss", (-1.0, NAN, np.inf)),
    ("ce_int", "logit_soft_cap", (-1.0, 0.0, NAN, 1e-39, 1e38, -np.inf)),
    ("linear", "label_smoothing", (-0.5, NAN)),
    ("linear", "z_loss", (-1.0, NAN)),
    ("linear", "logit_soft_cap", (-1.0, 0.0, NAN, 1e-39, 1e38)),
    ("ce_soft", "label_smoothing", (-0.5, 1.5, NAN)),
    ("bce", "label_smoothing", (-0.5, 1.5, NAN)),
    ("soft_cap", "cap", (-1.0, 0.0, NAN, 1e-39, 1e38, -np.inf)),
    ("sigmoid_focal", "gamma", (-1.0, NAN)),
    ("sigmoid_focal", "alpha", (-0.5, 1.5, NAN)),
    ("softmax_focal", "gamma", (-1.0, NAN)),
    ("softmax_focal", "alpha", (-0.5, NAN)),
]


@pytest.mark.parametrize("loss,name,bad", TRACED, ids=[f"{a}/{b}" for a, b, _ in TRACED])
def test_traced_hyperparameter_out_of_range_gives_nan(loss, name, bad):
    def fn(x, v):
        return LOSSES[loss](x, **{name: v})

    loss_of = jax.jit(fn)
    grads = jax.jit(jax.grad(lambda x, v: jnp.sum(fn(x, v)), argnums=(0, 1)))
    x = jnp.asarray(X43, jnp.float32)
    for value in bad:
        v = jnp.float32(value)
        assert np.isnan(np.asarray(loss_of(x, v))).all(), value
        gx, gv = grads(x, v)
        assert np.isnan(np.asarray(gx)).all() and np.isnan(np.asarray(gv)), value


# Two traced hyperparameters, one out of range: the derivative with respect to the other (whose
# rule may not read the bad one) is NaN too, as the loss is. (loss, the bad one, its value,
# the other one, its valid value.)
TOGETHER = [
    ("ce_int", "label_smoothing", 1.5, "z_loss", 1e-3),
    ("ce_int", "z_loss", -1.0, "label_smoothing", 0.1),
    ("ce_int", "logit_soft_cap", -1.0, "z_loss", 1e-3),
    ("ce_int", "label_smoothing", NAN, "logit_soft_cap", 5.0),
    ("linear", "label_smoothing", 1.5, "z_loss", 1e-3),
    ("linear", "z_loss", NAN, "logit_soft_cap", 5.0),
    ("sigmoid_focal", "gamma", -1.0, "alpha", 0.25),
    ("sigmoid_focal", "alpha", 1.5, "gamma", 2.0),
    ("softmax_focal", "gamma", NAN, "alpha", 0.25),
    ("softmax_focal", "alpha", -0.5, "gamma", 2.0),
]


@pytest.mark.parametrize(
    "loss,bad_name,bad,name,value", TOGETHER, ids=[f"{a}/{b}={c}" for a, b, c, *_ in TOGETHER]
)
def test_an_out_of_range_hyperparameter_makes_the_others_derivatives_nan(
    loss, bad_name, bad, name, value
):
    def total(x, b, v):
        return jnp.sum(LOSSES[loss](x, **{bad_name: b, name: v}))

    x = jnp.asarray(X43, jnp.float32)
    grads = jax.jit(jax.grad(total, argnums=(0, 1, 2)))
    gx, gb, gv = grads(x, jnp.float32(bad), jnp.float32(value))
    assert np.isnan(np.asarray(gx)).all() and np.isnan(gb) and np.isnan(gv)
    # In range, both derivatives are finite: the test above is not vacuous.
    ok = {"label_smoothing": 0.2, "z_loss": 1e-2, "logit_soft_cap": 4.0, "gamma": 1.0}
    _, gb, gv = grads(x, jnp.float32(ok.get(bad_name, 0.5)), jnp.float32(value))
    assert np.isfinite(gb) and np.isfinite(gv)
