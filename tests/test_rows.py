"""The per-row kernel (``jaxce/_rows.py``) through every loss built on it.

Regression tests for values that were once plausible but wrong: the smoothing term at logits
far from zero, NaN inputs counted as empty rows, -inf label logits in class-weight gradients,
empty inputs, non-scalar hyperparameters and an infinite soft cap. Each runs through the plain,
the fused and (where the loss has one) the soft-label variant, which share the kernel.
"""

import _reference as R
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce

CE = jaxce.softmax_cross_entropy_with_integer_labels


def _shifted_reference(logits, labels, **kw):
    """The float64 reference on logits shifted by their row max: the loss without z-loss is
    shift-invariant, and the shifted logits are small, so the reference is exact there."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return R.softmax_cross_entropy_with_integer_labels(shifted, labels, **kw)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("variant", ["plain", "fused"])
@pytest.mark.parametrize(
    "logits,label,eps",
    [
        ([[1e8, 1e8 + 8, 1e8 + 16]], 0, 0.3),  # PyTorch: 13.6003 (it was 11.2003)
        ([[-1e30] * 64], 5, 0.1),  # log 64 = 4.1589 (it was -4.5e22)
        ([[3e38, 3e38, -3e38]], 1, 0.5),
        ([[-5e4, -5e4 + 1, -5e4 + 3, -5e4 - 7]], 3, 1.0),
    ],
    ids=["1e8", "-1e30", "3e38", "-5e4"],
)
def test_smoothing_is_exact_far_from_zero(dtype, variant, logits, label, eps):
    x = jnp.asarray(np.array(logits), dtype)
    labels = jnp.array([label])
    fn = CE if variant == "plain" else R.fused_of_logits
    got = fn(x, labels, label_smoothing=eps)
    want = _shifted_reference(np.asarray(x), np.array([label]), label_smoothing=eps)
    R.assert_close(got, want, rtol=2e-7 if dtype == jnp.float32 else 1e-14)


def test_half_difference_rounds_as_the_plain_difference():
    """``half_difference`` (every weighted ``lse - z`` and the smoothing gap's terms) is
    ``(a - b) / n``, halved exactly, wherever ``a - b`` is finite and the halves are normal
    numbers, bit for bit, and finite where only ``a - b`` overflows."""
    from jaxce import _rows

    rng = np.random.default_rng(0)
    magnitude = 10.0 ** rng.uniform(-30, 38, size=(2, 4096))
    a, b = (np.float32(m * rng.choice([-1.0, 1.0], size=m.shape)) for m in magnitude)
    huge = np.float32(10.0 ** rng.uniform(38.25, 38.53, size=(2, 512)))  # 1.8e38 to 3.4e38
    a, b = np.concatenate([a, huge[0]]), np.concatenate([b, -huge[1]])
    a, b = np.maximum(a, b), np.minimum(a, b)
    with np.errstate(over="ignore"):
        d = a - b
    finite = np.isfinite(d)
    assert finite.sum() > 4000 and (~finite).sum() > 300
    for n in (1, 2, 3, 1000, 256_000):
        got = np.asarray(_rows.half_difference(jnp.asarray(a), jnp.asarray(b), n))
        plain = np.asarray((jnp.asarray(a) - jnp.asarray(b)) / n)  # XLA's own division
        np.testing.assert_array_equal(got[finite] * 2, plain[finite])
        np.testing.assert_allclose(got[finite] * 2, d[finite] / np.float32(n), rtol=1.2e-7)
        exact = (a[~finite].astype(np.float64) - b[~finite]) / (2 * n)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got[~finite], exact, rtol=2.5e-7)


def test_smoothing_example_against_pytorch_value():
    """The issue's example, to the digits PyTorch prints: 13.6003."""
    got = CE(jnp.array([[1e8, 1e8 + 8, 1e8 + 16]]), jnp.array([0]), label_smoothing=0.3)
    assert abs(float(got[0]) - 13.6003) < 1e-4


@pytest.mark.parametrize("variant", ["plain", "fused"])
def test_smoothing_with_weights_and_mask_far_from_zero(rng, variant):
    x = R.random_logits(rng, (4, 9)) + 1e7
    y = rng.integers(0, 9, size=4)
    w = rng.uniform(0.5, 2.0, 9)
    kw = dict(label_smoothing=0.2, class_weights=w)
    fn = CE if variant == "plain" else R.fused_of_logits
    got = fn(jnp.asarray(x, jnp.float32), jnp.asarray(y), **{**kw, "class_weights": jnp.asarray(w)})
    # float32 holds the logits to within 1 near 1e7: compare with the logits it was given.
    given = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    R.assert_close(got, _shifted_reference(given, y, **kw), rtol=1e-6)


# ------------------------------------------------------------------------------------ NaN
NAN_LOSSES = {
    "integer": lambda x, y: CE(x, y, reduction="none"),
    "integer_all_options": lambda x, y: CE(
        x,
        y,
        label_smoothing=0.1,
        z_loss=1e-3,
        logit_soft_cap=20.0,
        class_weights=jnp.linspace(0.5, 2.0, x.shape[-1]),
    ),
    "fused": lambda x, y: R.fused_of_logits(x, y, label_smoothing=0.1),
    "focal": lambda x, y: jaxce.softmax_focal_loss(x, y),
    "soft": lambda x, y: jaxce.softmax_cross_entropy(
        x, jax.nn.one_hot(y, x.shape[-1], dtype=x.dtype), label_smoothing=0.1
    ),
    "softmax_entropy": lambda x, y: jaxce.softmax_entropy(x),
    "sigmoid_bce": lambda x, y: jaxce.sigmoid_binary_cross_entropy(x, jnp.zeros_like(x)).sum(-1),
    "sigmoid_focal": lambda x, y: jaxce.sigmoid_focal_loss(x, jnp.zeros_like(x)).sum(-1),
}


ELEMENTWISE = {"sigmoid_bce", "sigmoid_focal"}


@pytest.mark.parametrize("name", list(NAN_LOSSES))
@pytest.mark.parametrize("where", ["label", "other"])
def test_nan_logit_gives_nan_for_its_example_only(rng, name, where):
    """A NaN logit makes its example's loss and gradient NaN (so a sum is NaN); the other
    examples' losses and gradients are exactly what they are without it."""
    fn = NAN_LOSSES[name]
    x = R.random_logits(rng, (3, 6))
    y = jnp.array([1, 2, 3])
    bad = x.copy()
    bad[1, 2 if where == "label" else 4] = np.nan
    clean = jax.jit(fn)(jnp.asarray(x), y)
    got = jax.jit(fn)(jnp.asarray(bad), y)
    assert np.isnan(got[1])
    R.assert_close(np.asarray(got)[[0, 2]], np.asarray(clean)[[0, 2]], rtol=0, atol=0)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(fn(v, y))))
    g_clean, g = np.asarray(grad(jnp.asarray(x))), np.asarray(grad(jnp.asarray(bad)))
    # A row's loss couples its logits: its whole gradient is NaN; an elementwise loss's
    # gradient is NaN at the NaN logit only.
    nan = np.isnan(bad) if name in ELEMENTWISE else np.isnan(bad).any(-1, keepdims=True)
    nan = np.broadcast_to(nan, g.shape)
    assert np.all(np.isnan(g[nan]))
    R.assert_close(g[~nan], g_clean[~nan], rtol=0, atol=0)
    assert np.isnan(jnp.sum(got))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nan_makes_a_reduced_loss_nan(rng, reduction):
    x = R.random_logits(rng, (3, 6))
    x[0, 0] = np.nan
    y = jnp.array([1, 2, 3])
    assert np.isnan(CE(jnp.asarray(x), y, reduction=reduction))
    assert np.isnan(
        jaxce.linear_softmax_cross_entropy(jnp.asarray(x), jnp.eye(6), y, reduction=reduction)
    )


def test_primitives_agree_on_a_nan_row():
    x = jnp.array([[1.0, np.nan, 3.0], [1.0, 2.0, 3.0]])
    assert np.isnan(jaxce.logsumexp(x)[0])
    assert np.all(np.isnan(jaxce.log_softmax(x)[0]))
    assert np.all(np.isnan(jaxce.softmax(x)[0]))
    R.assert_close(jaxce.softmax(x)[1], R.softmax(np.array([1.0, 2.0, 3.0])), rtol=1e-6)


def test_the_log_sum_of_a_nan_max_is_nan_and_of_a_finite_max_at_least_0():
    """Every row statistic takes its log-sum through one helper, which keeps a NaN max NaN: XLA's
    CPU code evaluates exp(NaN) to 0 inside some fused sums with a select, and a NaN row whose
    sum came out 0 would otherwise look empty (log-sum -inf, loss 0). A finite max's row sums
    at least its own exp(0) = 1: a sum rounded below it is floored there."""
    from jaxce._softmax import shift_and_log_sum

    # The last row: a finite max's sum rounded below its own exp(0) = 1 is floored at 1.
    m = jnp.array([[np.nan], [np.nan], [1.0], [-np.inf], [np.inf], [2.0]])
    total = jnp.array([[0.0], [3.0], [2.0], [0.0], [np.nan], [1 - 2**-20]])
    shift, log_sum = shift_and_log_sum(m, total)
    np.testing.assert_array_equal(shift[:, 0], [0.0, 0.0, 1.0, 0.0, 0.0, 2.0])
    np.testing.assert_array_equal(
        log_sum[:, 0], [np.nan, np.nan, np.log(np.asarray(total)[2, 0]), -np.inf, np.nan, 0.0]
    )


def test_nan_in_an_excluded_entry_takes_no_part(rng):
    """A masked (where=False) entry, like an ignored example, takes no part whatever it holds."""
    x = R.random_logits(rng, (2, 5))
    x[0, 3] = np.nan
    mask = jnp.array([[True, True, True, False, True]])
    y = jnp.array([0, 1])
    got = CE(jnp.asarray(x), y, where=mask, label_smoothing=0.1)
    want = R.softmax_cross_entropy_with_integer_labels(
        np.where(np.asarray(mask), x, 0.0), y, where=mask, label_smoothing=0.1
    )
    R.assert_close(got, want, rtol=1e-6)
    R.assert_close(
        jaxce.logsumexp(jnp.asarray(x), where=mask),
        R.logsumexp(np.where(np.asarray(mask), x, 0.0), where=mask),
        rtol=1e-6,
    )


def test_ignored_example_with_nan_logits_takes_no_part(rng):
    x = R.random_logits(rng, (2, 5))
    x[1] = np.nan
    y = jnp.array([0, -100])
    for fn in (
        lambda v: CE(v, y, ignore_index=-100, label_smoothing=0.1, reduction="mean"),
        lambda v: jaxce.linear_softmax_cross_entropy(
            v, jnp.eye(5), y, ignore_index=-100, label_smoothing=0.1
        ),
    ):
        value, g = jax.jit(jax.value_and_grad(fn))(jnp.asarray(x))
        want = CE(jnp.asarray(x[:1]), y[:1], label_smoothing=0.1, reduction="mean")
        R.assert_close(value, want, rtol=1e-6)
        assert np.all(np.asarray(g)[1] == 0) and np.all(np.isfinite(g))


# ------------------------------------------------------------ class weights at -inf logits
def test_class_weight_gradient_is_finite_when_a_skipped_row_has_a_minus_inf_label():
    """An ignored row, and a row with no admissible class, whose label logit is -inf add
    nothing to d/dclass_weights (it was NaN from 0 * inf)."""
    x = jnp.array([[0.0, 1.0, 2.0], [-jnp.inf, 1.0, 2.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
    y = jnp.array([1, -100, 0])
    kw = dict(ignore_index=-100, label_smoothing=0.1, reduction="sum")
    g = jax.jit(jax.grad(lambda w: CE(x, y, class_weights=w, **kw)))(jnp.ones(3))
    want = jax.jit(jax.grad(lambda w: CE(x[:1], y[:1], class_weights=w, **kw)))(jnp.ones(3))
    assert np.all(np.isfinite(g)), g
    R.assert_close(g, want, rtol=1e-6)
    # The fused loss: a -inf bias makes class 0's logit -inf in every row; row 1 is ignored.
    h, bias = jnp.ones((2, 3)), jnp.array([-jnp.inf, 0.0, 0.0])

    def fused(w):
        return jaxce.linear_softmax_cross_entropy(
            h, jnp.eye(3), y[:2], bias=bias, class_weights=w, **kw
        )

    g = jax.jit(jax.grad(fused))(jnp.ones(3))
    want = jax.jit(jax.grad(lambda w: CE(h[:1] + bias[None, :], y[:1], class_weights=w, **kw)))(
        jnp.ones(3)
    )
    assert np.all(np.isfinite(g)), g
    R.assert_close(g, want, rtol=1e-6)


# ---------------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("recompute_logits", [None, True])
def test_fused_loss_of_no_tokens(reduction, recompute_logits):
    if reduction == "none" and recompute_logits is False:
        return
    x, w = jnp.zeros((0, 4)), jnp.ones((4, 7))
    y = jnp.zeros((0,), jnp.int32)

    def f(x, w):
        out = jaxce.linear_softmax_cross_entropy(
            x, w, y, reduction=reduction, recompute_logits=recompute_logits
        )
        return jnp.sum(out)

    value, (dx, dw) = jax.value_and_grad(f, argnums=(0, 1))(x, w)
    assert float(value) == 0.0 and dx.shape == (0, 4) and np.all(dw == 0)
    plain = CE(jnp.zeros((0, 7)), y, reduction=reduction)
    assert (
        np.asarray(plain).shape
        == np.asarray(jaxce.linear_softmax_cross_entropy(x, w, y, reduction=reduction)).shape
    )


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: CE(jnp.zeros((2, 0)), jnp.zeros((2,), jnp.int32)), "logits has 0 classes"),
        (
            lambda: jaxce.nll_loss(jnp.zeros((2, 0)), jnp.zeros((2,), jnp.int32)),
            "log_probs has 0 classes",
        ),
        (
            lambda: jaxce.softmax_focal_loss(jnp.zeros((2, 0)), jnp.zeros((2,), jnp.int32)),
            "logits has 0 classes",
        ),
        (
            lambda: jaxce.linear_softmax_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((3, 0)), jnp.zeros((2,), jnp.int32)
            ),
            "w has 0 classes",
        ),
    ],
)
def test_no_classes_is_an_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_empty_batches_give_the_empty_values():
    y = jnp.zeros((0,), jnp.int32)
    assert CE(jnp.zeros((0, 5)), y).shape == (0,)
    assert float(CE(jnp.zeros((0, 5)), y, reduction="mean")) == 0.0
    assert (
        float(jaxce.softmax_cross_entropy(jnp.zeros((0, 5)), jnp.zeros((0, 5)), reduction="mean"))
        == 0.0
    )
    assert jaxce.logsumexp(jnp.zeros((3, 0))).tolist() == [-np.inf] * 3
    assert jaxce.entropy(jnp.zeros((3, 0))).tolist() == [0.0] * 3


# --------------------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize("name", ["label_smoothing", "z_loss", "logit_soft_cap"])
def test_non_scalar_hyperparameter_is_an_error(name):
    with pytest.raises(ValueError, match=f"{name} must be a scalar; got an array of shape"):
        CE(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), **{name: jnp.array([0.1, 0.9])})
    with pytest.raises(ValueError, match=name):
        jaxce.linear_softmax_cross_entropy(
            jnp.zeros((2, 3)),
            jnp.zeros((3, 4)),
            jnp.zeros((2,), jnp.int32),
            **{name: jnp.array([0.1, 0.9])},
        )


def test_non_scalar_focal_parameters_are_errors():
    x, y = jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="gamma must be a scalar"):
        jaxce.softmax_focal_loss(x, y, gamma=jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="alpha must be a scalar"):
        jaxce.sigmoid_focal_loss(x, jnp.zeros((2, 3)), alpha=jnp.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="alpha must have shape"):
        jaxce.softmax_focal_loss(x, y, alpha=jnp.array([0.1, 0.2]))


@pytest.mark.parametrize("cap", [float("inf"), np.float32("inf")])
def test_infinite_soft_cap_means_no_cap(rng, cap):
    x = jnp.asarray(R.random_logits(rng, (3, 5)))
    y = jnp.array([0, 1, 2])
    R.assert_close(CE(x, y, logit_soft_cap=cap), CE(x, y), rtol=0, atol=0)
    R.assert_close(jaxce.logit_soft_cap(x, cap), x, rtol=0, atol=0)
    R.assert_close(
        R.fused_of_logits(x, y, logit_soft_cap=cap), R.fused_of_logits(x, y), rtol=0, atol=0
    )


@pytest.mark.parametrize("variant", ["plain", "fused"])
@pytest.mark.parametrize("logits", ["equal", "random"])
def test_the_smoothing_derivative_of_the_gradient_is_whole_at_equal_logits(variant, logits):
    """``d/deps dloss/dx = onehot(y) - 1/C`` (summed loss, no weights) at any logits. At equal
    logits the smoothing gap is exactly 0, where its floor at 0 (``_rows.finish``) must pass
    the whole derivative: a ``max`` there split it at the tie and gave half of the ``-1/C``."""
    rng = np.random.default_rng(3)
    c = 10
    x = np.zeros((4, c)) if logits == "equal" else rng.standard_normal((4, c))
    x = jnp.asarray(x, jnp.float32)
    labels = jnp.asarray(rng.integers(0, c, 4))
    fn = CE if variant == "plain" else R.fused_of_logits

    def loss(a, eps):
        return fn(a, labels, label_smoothing=eps).sum()

    eps = jnp.float32(0.1)
    want = np.eye(c)[np.asarray(labels)] - 1 / c
    # In both orders: d/deps of the gradient, and the gradient of d/deps (forward over reverse).
    np.testing.assert_allclose(jax.jacfwd(lambda e: jax.grad(loss)(x, e))(eps), want, atol=1e-6)
    np.testing.assert_allclose(jax.jacfwd(lambda a: jax.grad(loss, 1)(a, eps))(x), want, atol=1e-6)


def test_row_statistics_without_a_cap_read_whole_rows_on_cpu_whoever_calls(monkeypatch):
    """A caller that does not pass ``unguarded`` (the sharded loss) has nothing to guard without
    a soft cap: its statistics take whole rows on CPU from jaxlib 0.10.2 on, and smoothing its
    sums as if every class were admissible, as the plain loss's do; a soft cap there keeps its
    chunks and its guard."""
    from jaxce import _loops, _rows, _xla

    if jax.default_backend() != "cpu" or not _xla.cpu_fuses_whole_rows():
        pytest.skip("whole rows on CPU from jaxlib 0.10.2 on")
    x = jnp.zeros((64, 1000), jnp.float32)
    asked = []
    chunks = _loops.by_row_chunks

    def recorded(*args, **kw):
        asked.append(kw.get("fuses_whole_on_cpu"))
        return chunks(*args, **kw)

    monkeypatch.setattr(_loops, "by_row_chunks", recorded)
    plain = _rows.make_options(jnp.float32, 0.0, 0.0, None)
    capped = _rows.make_options(jnp.float32, 0.0, 0.0, 30.0)
    _rows.row_stats(x, None, None, plain, 1000, lambda p: p)
    _rows.row_stats(x, None, None, capped, 1000, lambda p: p)
    assert asked == [True, False]
    smoothing = _rows.make_options(jnp.float32, 0.1, 0.0, None)
    assert _rows.assumes_all_admissible(x, None, None, smoothing, False)
    capped_smoothing = _rows.make_options(jnp.float32, 0.1, 0.0, 30.0)
    assert not _rows.assumes_all_admissible(x, None, None, capped_smoothing, False)
    assert _rows.assumes_all_admissible(x, None, None, capped_smoothing, True)


@pytest.mark.usefixtures("untraced")
@pytest.mark.parametrize(
    "rows",
    ["rows", "long rows", "sub-rows", "weighted sub-rows"],
)
def test_a_small_cap_sums_the_smoothing_gap_from_the_kept_exponentials(monkeypatch, rows):
    """Under a soft cap given as a number small enough that no capped logit's exponential
    underflows (``_rows.small_cap``: below 43.2 in float32, 353.7 in float64), the derivative's
    forward pass sums the smoothing's gap from the exponentials it keeps, and nothing else does;
    its loss and gradient are the float64 reference's on rows whose capped logits span nearly
    twice the cap (exponentials down to exp(-2 cap)), with class weights (but in ``sub-rows``)
    and an ignored row. ``long rows``: longer than ``_rows.CAPPED_WEIGHTED_CLASSES``, which a
    small cap takes too, the others taking the sums over the admissible classes; ``sub-rows``:
    long rows reduced in sub-rows (``_xla.row_blocks``), which take it without class weights,
    and with them (``weighted sub-rows``) the sums over the admissible classes. With a -inf
    logit, the gradient of ``value_and_grad``'s value is the gradient, without NaN."""
    from jaxce import _rows, _xla

    if rows != "rows":
        monkeypatch.setattr(_rows, "CAPPED_WEIGHTED_CLASSES", 100)
    if "sub-rows" in rows:
        monkeypatch.setattr(_xla, "row_blocks", lambda num_classes, dtype: 4)

    def small(cap, dtype=jnp.float32):
        options = _rows.make_options(dtype, 0.1, 0.0, cap)
        return _rows.small_cap(options, cap, dtype)

    assert small(30.0) and small(43.0) and small(np.float32(3.0))
    assert not small(43.5) and not small(1e4) and not small(None)
    assert small(350.0, jnp.float64) and not small(360.0, jnp.float64)
    assert not jax.jit(lambda c: jnp.asarray(small(c)))(30.0)  # traced: not known to be small
    if jax.default_backend() != "cpu" or not _xla.cpu_fuses_whole_rows():
        pytest.skip("the sums as if every class were admissible: CPU, from jaxlib 0.10.2 on")

    rng = np.random.default_rng(3)
    x = rng.uniform(-1e3, 1e3, (64, 300))
    x[:, 0] = 1e3  # each row's capped max near the cap, another logit near minus the cap
    x[:, 1] = -1e3
    labels = rng.integers(0, 300, 64)
    labels[5] = -100
    weights = None if rows == "sub-rows" else rng.uniform(0.5, 1.5, 300)
    calls = []
    summed = _rows.exponential_gap_sums
    monkeypatch.setattr(
        _rows, "exponential_gap_sums", lambda *a, **k: calls.append(1) or summed(*a, **k)
    )
    for cap, taken in ((30.0, True), (43.0, True), (80.0, False)):
        taken = taken and rows != "weighted sub-rows"
        kw = dict(label_smoothing=0.2, class_weights=weights, ignore_index=-100, z_loss=1e-3)

        def loss(a, cap=cap, kw=kw):
            return CE(a, labels, logit_soft_cap=cap, reduction="mean", **kw)

        xs = jnp.asarray(x, jnp.float32)
        options = _rows.make_options(jnp.float32, 0.2, 1e-3, cap)
        w = None if weights is None else jnp.asarray(weights, jnp.float32)
        assert _rows.assumes_all_admissible(xs, None, w, options, True, small(cap)) == (
            rows in ("rows", "sub-rows") or taken
        )
        calls.clear()
        alone = jax.jit(loss)(xs)
        assert calls == []
        value, grad = jax.jit(jax.value_and_grad(loss))(xs)
        assert calls == ([1] if taken else [])
        ref_kw = dict(kw, logit_soft_cap_value=cap, reduction="mean")
        want = R.softmax_cross_entropy_with_integer_labels(x, labels, **ref_kw)
        want_grad = R.ref_grad(R.softmax_cross_entropy_with_integer_labels)(x, labels, **ref_kw)
        R.assert_close(alone, want, rtol=2e-6)
        R.assert_close(value, want, rtol=2e-6)
        R.assert_close(grad, want_grad, rtol=1e-4, atol=1e-9)
        # A batch with a -inf logit takes the exact sums; reverse mode through the value of
        # value_and_grad transposes the unused branch too, whose -log(0) must give no NaN.
        masked = x.copy()
        masked[2, 7] = -np.inf
        xm = jnp.asarray(masked, jnp.float32)
        through_value = jax.jit(jax.grad(lambda a: jax.value_and_grad(loss)(a)[0]))(xm)
        assert np.isfinite(np.asarray(through_value)).all()
        R.assert_close(through_value, jax.jit(jax.grad(loss))(xm), rtol=1e-4, atol=1e-8)


@pytest.mark.usefixtures("untraced")
@pytest.mark.parametrize(
    "budget", [None, 2 * 64 * 300 * 4, 2**10], ids=["kept", "one buffer", "above the budget"]
)
def test_bfloat16_under_a_small_cap_sums_the_smoothing_gap_from_kept_exponentials(
    monkeypatch, budget
):
    """bfloat16 logits (computed in float32) under a small soft cap take the smoothing's sums
    as if every class were admissible, from the exponentials the derivative keeps, where it
    keeps them (``_xla.saves_exponentials``, ``kept``): also where the budget holds their one
    buffer but not the three of the sums over the admissible classes (``one buffer``); above
    it, and in the loss alone, the sums over the admissible classes. Both give the float64
    reference's loss and gradient on the bfloat16 logits' values, with class weights, z-loss
    and an ignored row, and a batch with a -inf logit takes the exact sums, with no NaN in the
    gradient of ``value_and_grad``'s value (both branches transposed)."""
    from jaxce import _rows, _xla

    if jax.default_backend() != "cpu" or not _xla.cpu_fuses_whole_rows():
        pytest.skip("the sums as if every class were admissible: CPU, from jaxlib 0.10.2 on")
    if budget is not None:
        monkeypatch.setattr(_xla, "KEPT_BYTES", budget)
    within = budget != 2**10
    rng = np.random.default_rng(5)
    xb = jnp.asarray(rng.uniform(-1e3, 1e3, (64, 300)), jnp.bfloat16)
    xb = xb.at[:, 0].set(1e3).at[:, 1].set(-1e3)  # capped logits spanning nearly twice the cap
    x = np.asarray(xb.astype(jnp.float32), np.float64)
    labels = rng.integers(0, 300, 64)
    labels[5] = -100
    weights = rng.uniform(0.5, 1.5, 300)
    kw = dict(label_smoothing=0.2, class_weights=weights, ignore_index=-100, z_loss=1e-3)
    options = _rows.make_options(jnp.float32, 0.2, 1e-3, 30.0)
    w = jnp.asarray(weights, jnp.float32)
    assert _rows.assumes_all_admissible(xb, None, w, options, True, True, kept=True) == within
    assert not _rows.assumes_all_admissible(xb, None, w, options, True, True)
    assert not _rows.assumes_all_admissible(xb, None, w, options, True, False, kept=True)
    calls = []
    summed = _rows.exponential_gap_sums
    monkeypatch.setattr(
        _rows, "exponential_gap_sums", lambda *a, **k: calls.append(1) or summed(*a, **k)
    )

    def loss(a):
        return CE(a, labels, logit_soft_cap=30.0, reduction="mean", **kw)

    alone = jax.jit(loss)(xb)
    assert calls == []
    value, grad = jax.jit(jax.value_and_grad(loss))(xb)
    assert calls == ([1] if within else [])
    assert grad.dtype == jnp.bfloat16
    ref_kw = dict(kw, logit_soft_cap_value=30.0, reduction="mean")
    want = R.softmax_cross_entropy_with_integer_labels(x, labels, **ref_kw)
    want_grad = R.ref_grad(R.softmax_cross_entropy_with_integer_labels)(x, labels, **ref_kw)
    R.assert_close(alone, want, rtol=2e-6)
    R.assert_close(value, want, rtol=2e-6)
    # The gradient rounded to bfloat16 (8 bits): within 2^-8 of each entry, or of the smallest.
    R.assert_close(grad.astype(jnp.float32), want_grad, rtol=2**-8, atol=1e-9)
    masked = xb.at[2, 7].set(-jnp.inf)
    xm = np.asarray(masked.astype(jnp.float32), np.float64)
    value, grad = jax.jit(jax.value_and_grad(loss))(masked)
    R.assert_close(
        value, R.softmax_cross_entropy_with_integer_labels(xm, labels, **ref_kw), rtol=2e-6
    )
    want_grad = R.ref_grad(R.softmax_cross_entropy_with_integer_labels)(xm, labels, **ref_kw)
    R.assert_close(grad.astype(jnp.float32), want_grad, rtol=2**-8, atol=1e-9)
    through_value = jax.jit(jax.grad(lambda a: jax.value_and_grad(loss)(a)[0]))(masked)
    assert np.isfinite(np.asarray(through_value.astype(jnp.float32))).all()
    # Reverse mode through the value is less precise in bfloat16 than the plain gradient (as on
    # the sums over the admissible classes: 6e-5 off at most, 19% off entries of 1e-7), within a
    # unit in the last place of the largest entry.
    largest = np.abs(want_grad).max()
    R.assert_close(through_value.astype(jnp.float32), want_grad, rtol=2**-8, atol=2**-7 * largest)


def _smoothing_sums(form, x, weights, options):
    """The smoothing's row sums of ``x`` (no mask, ``weights`` ``[C]`` or None) with a select
    per entry (``_rows.smoothing_sums``, ``form="select"``) or without
    (``_rows.exact_smoothing_sums``, ``form="fused"``)."""
    from jaxce import _loops, _rows, _softmax

    sub = _loops.SubRows.of(x)
    (viewed,) = sub.view(x)
    m = _rows.capped_max(sub.max(_softmax.row_max(viewed, None)), options)
    c = x.shape[-1]
    if form == "select":
        return _rows.smoothing_sums(viewed, None, sub.classes(weights), m, options, c, sub)
    return _rows.exact_smoothing_sums(x, weights, m, options, c)


def _smoothing_sums_both_ways(x, weights, options):
    """:func:`_smoothing_sums` of both forms, the weights in the compute dtype, as float64."""
    from jaxce import _rows

    w = None if weights is None else jnp.asarray(weights, _rows.compute_dtype(x.dtype))
    return [
        [np.asarray(v, np.float64)[..., 0] for v in _smoothing_sums(form, x, w, options)]
        for form in ("select", "fused")
    ]


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
@pytest.mark.parametrize("cols", [8, 2**16])  # 2**16: sub-rows (_xla.row_blocks) in float32
def test_the_exact_smoothing_sums_without_a_select_are_the_selects(dtype, cap, cols):
    """The branch that a batch with a -inf logit takes (``_rows.exact_smoothing_sums``: the
    count, the weights' total and the gap over the admissible classes, without a select) gives
    the select's sums, to within a rounding, on rows of finite, -inf, +inf, +-max and NaN logits
    (a row all -inf, one with a NaN), under class weights that are finite (0 and negative
    included), infinite or NaN on a masked class, on an admissible one, and on the row's max
    (a gap term of ``inf * 0 = NaN``): the same infinities and NaNs, entry for entry of the
    rows' sums. NaN rows are NaN in the gap either way; their count and total are NaN without
    the select (the loss of such a row is NaN already)."""
    from jaxce import _rows

    big = float(jnp.finfo(dtype).max)
    rng = np.random.default_rng(cols)
    x = rng.normal(0.0, 3.0, (9, cols))
    x[0, 1] = x[1, 0] = x[1, 2] = -np.inf  # row 1: the max at column 3
    x[1, 3] = 20.0
    x[2, :] = -np.inf  # a row with nothing admissible
    x[3, 4] = np.inf
    x[4, 1], x[4, 2] = big, -big
    x[5, 5] = np.nan
    x[6, 1] = -np.inf
    x[6, 4] = x[7, 4] = 25.0  # the max at the weighted column 4
    x[8, 2] = -np.inf
    xs = jnp.asarray(x, dtype)
    finite = rng.uniform(0.5, 2.0, cols)
    finite[6] = 0.0
    finite[7] = -1.5
    cases = {"none": None, "finite": finite}
    for name, value in [("inf", np.inf), ("-inf", -np.inf), ("nan", np.nan)]:
        for col, where in [(1, "masked in rows 0, 6"), (4, "the max of rows 6, 7")]:
            w = finite.copy()
            w[col] = value
            cases[f"{name} at {col} ({where})"] = w
    options = _rows.make_options(_rows.compute_dtype(dtype), 0.1, 0.0, cap)
    nan_rows = np.isnan(x).any(-1)
    for name, w in cases.items():
        select, fused = _smoothing_sums_both_ways(xs, w, options)
        for what, s, f in zip(["count", "total", "gap"], select, fused, strict=True):
            if what != "gap":
                assert np.isnan(f[nan_rows]).all(), (name, what)
                s, f = s[~nan_rows], f[~nan_rows]
            rtol = 4 * float(jnp.finfo(_rows.compute_dtype(dtype)).eps)
            np.testing.assert_allclose(f, s, rtol=rtol, atol=0, err_msg=f"{name}: {what}")
    # What the weights cases exercise: some sums are infinite, some NaN, some finite.
    select, _ = _smoothing_sums_both_ways(xs, cases["inf at 4 (the max of rows 6, 7)"], options)
    assert np.isnan(select[2][6]) and np.isinf(select[1][6])  # inf * 0 on the max
    select, _ = _smoothing_sums_both_ways(xs, cases["nan at 1 (masked in rows 0, 6)"], options)
    assert np.isfinite(select[1][0]) and np.isnan(select[1][3])


@pytest.mark.parametrize("weighted", [False, True])
def test_the_exact_smoothing_sums_take_the_selects_derivative(weighted):
    """The fused sums' derivative (their jvp rule) is the select's, in the logits, the class
    weights and the soft cap together, on rows with -inf logits: a rule that dropped or swapped
    a tangent would differ."""
    from jaxce import _rows

    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 3.0, (6, 12))
    x[0, 1] = x[4, :5] = -np.inf
    x = jnp.asarray(x)
    w = jnp.asarray(rng.uniform(0.5, 2.0, 12)) if weighted else None
    tangents = (
        jnp.asarray(rng.normal(size=x.shape)),
        jnp.asarray(rng.normal(size=12)) if weighted else None,
        jnp.float64(0.7),
    )

    def sums(form):
        def of(x, w, cap):
            return _smoothing_sums(form, x, w, _rows.make_options(jnp.float64, 0.1, 0.0, cap))

        return of

    primals = (x, w, jnp.float64(5.0))
    want, want_dot = jax.jvp(sums("select"), primals, tangents)
    got, got_dot = jax.jvp(sums("fused"), primals, tangents)
    assert float(jnp.max(jnp.abs(want_dot[2]))) > 0.1  # the gap moves with x and the cap
    for a, b in zip((*got, *got_dot), (*want, *want_dot), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-15)
