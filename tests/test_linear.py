"""linear_softmax_cross_entropy: the loss of x @ w + bias without materializing the logits.

Values and gradients are compared with the float64 reference of the integer-label loss in
``_reference.py`` applied to ``x @ w + bias`` (differentiated by JAX autodiff); memory is asserted
with ``compile().memory_analysis()`` (deterministic; the memory tests only compile).
"""

import functools

import _reference as R
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from _products import assert_products

from jaxce import _xla
from jaxce._cross_entropy import softmax_cross_entropy_with_integer_labels
from jaxce._linear import linear_softmax_cross_entropy

F64 = np.float64
LCE = linear_softmax_cross_entropy

# (batch shape of x, D, V, token_chunk, vocab_chunk): V prime, V < vocab chunk, N = 1,
# N not divisible by the token chunk, a chunk of 1, exact multiples (chunks across lanes:
# test_loops.py).
SHAPES = [
    ((37,), 8, 1009, 16, 128),
    ((3, 5), 6, 11, 4, 64),  # V < vocab_chunk, 2-D batch
    ((1,), 5, 97, None, 32),  # N = 1
    ((29,), 4, 64, 7, 16),  # exact vocabulary chunks, ragged tokens
    ((6,), 3, 13, 1, 1),  # chunks of one
]
# Each reduction with each strategy: the default (the two passes on CPU for a reduced loss,
# the single pass elsewhere: _xla.TWO_PASS_BACKENDS) and the single pass named, so that CPU runs
# check the accelerators' default too.
STRATEGIES = [("mean", None), ("mean", False), ("sum", None), ("sum", False), ("none", None)]
MEAN_STRATEGIES = [("mean", None), ("mean", False), ("none", None)]


def _strategy_id(strategy):
    reduction, recompute = strategy
    return reduction if recompute is None else f"{reduction}-single-pass"


OPTIONS = [
    {},
    {"ignore_index": -100},
    {"class_weights": True},
    {"label_smoothing": 0.2},
    {"z_loss": 0.05},
    {"logit_soft_cap": 2.5},
    {"bias": True},
    {
        "ignore_index": -100,
        "class_weights": True,
        "label_smoothing": 0.1,
        "z_loss": 0.01,
        "logit_soft_cap": 4.0,
        "bias": True,
    },
]


def _problem(rng, batch, d, v, scale=1.0):
    x = rng.normal(size=batch + (d,)) * scale
    w = rng.normal(size=(d, v)) / np.sqrt(d)
    y = rng.integers(0, v, size=batch).astype(np.int32)
    return x, w, y


def _options(rng, v, kw, y):
    """Turns the markers in ``kw`` into arrays; ignores a few labels when asked to."""
    kw = dict(kw)
    bias = rng.normal(size=(v,)) if kw.pop("bias", False) else None
    if kw.pop("class_weights", False):
        kw["class_weights"] = rng.uniform(0.2, 2.0, size=(v,))
    if "ignore_index" in kw and y.size > 1:
        y = y.copy()
        y.flat[:: max(1, y.size // 3)] = kw["ignore_index"]
    return bias, kw, y


def _reference(x, w, bias, y, reduction, kw, xp):
    logits = x @ w if bias is None else x @ w + bias
    ref_kw = {("logit_soft_cap_value" if k == "logit_soft_cap" else k): v for k, v in kw.items()}
    return R.softmax_cross_entropy_with_integer_labels(
        logits, y, reduction=reduction, xp=xp, **ref_kw
    )


def _jnp(kw):
    return {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}


def _value_and_grads(x, w, bias, y, reduction, kw, ct, chunks):
    """The fused loss (contracted with the cotangent ``ct`` for "none") and d/d(x, w, bias)."""

    def f(x, w, bias):
        loss = LCE(x, w, y, bias=bias, reduction=reduction, **chunks, **kw)
        return jnp.sum(loss * ct) if reduction == "none" else loss

    argnums = (0, 1) if bias is None else (0, 1, 2)
    return jax.jit(jax.value_and_grad(f, argnums=argnums))(x, w, bias)


def _reference_value_and_grads(x, w, bias, y, reduction, kw, ct):
    def f(x, w, bias):
        loss = _reference(x, w, bias, y, reduction, kw, jnp)
        return jnp.sum(loss * ct) if reduction == "none" else loss

    argnums = (0, 1) if bias is None else (0, 1, 2)
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        return jax.jit(jax.value_and_grad(f, argnums=argnums))(x, w, bias)


def _assert_near_float64(got, x, w, y, reduction, kw, ct, loss_atol=1e-12):
    """``got``, the value and the gradients to ``x`` and ``w`` of the fused loss of narrow
    ``x`` and ``w``, against float64 on the same (rounded) inputs: the loss within 1e-5, each
    gradient within 1e-2 of its largest entry."""
    x64, w64 = x.astype(jnp.float64), w.astype(jnp.float64)
    expected = _reference_value_and_grads(
        x64, w64, None, jnp.asarray(y), reduction, kw, ct.astype(jnp.float64)
    )
    R.assert_close(got[0], expected[0], rtol=1e-5, atol=loss_atol)
    for a, e in zip(got[1], expected[1], strict=True):
        R.assert_close(a, e, rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(e))))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=_strategy_id)
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: "-".join(kw) or "plain")
@pytest.mark.parametrize("batch,d,v,tc,vc", SHAPES[:1])
def test_matches_unfused_every_option(rng, batch, d, v, tc, vc, kw, strategy):
    reduction, recompute = strategy
    x, w, y = _problem(rng, batch, d, v)
    bias, kw, y = _options(rng, v, kw, y)
    ct = rng.normal(size=batch)
    args = [jnp.asarray(a) if a is not None else None for a in (x, w, bias, y)]
    chunks = {"token_chunk": tc, "vocab_chunk": vc, "recompute_logits": recompute}
    got = _value_and_grads(*args, reduction, _jnp(kw), jnp.asarray(ct), chunks)
    expected = _reference_value_and_grads(*args, reduction, _jnp(kw), jnp.asarray(ct))
    assert got[0].dtype == jnp.float64
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        R.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kw", OPTIONS[-2:], ids=["bias", "all"])
def test_recompute_strategy_for_reduced_losses(rng, kw, reduction):
    """recompute_logits=True (the default for bf16 w) on "mean"/"sum" equals the unfused loss;
    and the single pass refuses reduction="none"."""
    batch, d, v, tc, vc = SHAPES[0]
    x, w, y = _problem(rng, batch, d, v)
    bias, kw, y = _options(rng, v, kw, y)
    args = [jnp.asarray(a) if a is not None else None for a in (x, w, bias, y)]
    chunks = {"token_chunk": tc, "vocab_chunk": vc, "recompute_logits": True}
    got = _value_and_grads(*args, reduction, _jnp(kw), None, chunks)
    expected = _reference_value_and_grads(*args, reduction, _jnp(kw), None)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        R.assert_close(a, e, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="recompute_logits=False"):
        LCE(args[0], args[1], args[3], reduction="none", recompute_logits=False)


@pytest.mark.parametrize("strategy", MEAN_STRATEGIES, ids=_strategy_id)
@pytest.mark.parametrize("batch,d,v,tc,vc", SHAPES[1:])
def test_awkward_shapes(rng, batch, d, v, tc, vc, strategy):
    reduction, recompute = strategy
    x, w, y = _problem(rng, batch, d, v)
    bias, kw, y = _options(rng, v, OPTIONS[-1], y)
    ct = rng.normal(size=batch)
    args = [jnp.asarray(a) for a in (x, w, bias, y)]
    chunks = {"token_chunk": tc, "vocab_chunk": vc, "recompute_logits": recompute}
    got = _value_and_grads(*args, reduction, _jnp(kw), jnp.asarray(ct), chunks)
    expected = _reference_value_and_grads(*args, reduction, _jnp(kw), jnp.asarray(ct))
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        R.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", MEAN_STRATEGIES, ids=_strategy_id)
@pytest.mark.parametrize("batch,d,v,tc,vc", SHAPES)
def test_awkward_shapes_in_bfloat16(rng, batch, d, v, tc, vc, strategy):
    """bfloat16 x and w, multiplied as they are, at the shapes above: every product XLA makes of
    them runs (a bfloat16 product its CPU kernels decline, XLA's own cannot run: UNIMPLEMENTED
    ... BF16 x BF16 = F32), and the result is as close to float64 as bfloat16 allows."""
    reduction, recompute = strategy
    x, w, y = _problem(rng, batch, d, v, scale=2.0)
    x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    ct = jnp.asarray(rng.normal(size=batch), jnp.float32)
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3}
    chunks = {"token_chunk": tc, "vocab_chunk": vc, "recompute_logits": recompute}
    got = _value_and_grads(x, w, None, jnp.asarray(y), reduction, kw, ct, chunks)
    _assert_near_float64(got, x, w, y, reduction, kw, ct, loss_atol=1e-6)


@pytest.mark.parametrize("recompute", [None, False, True])
def test_default_chunks_and_vmap(rng, recompute):
    x, w, y = _problem(rng, (4, 9), 8, 300)
    xs, ws, ys = jnp.asarray(x), jnp.asarray(w), jnp.asarray(y)
    got = jax.vmap(lambda x, y: LCE(x, ws, y, recompute_logits=recompute))(xs, ys)
    expected = [_reference(x[i], w, None, y[i], "mean", {}, np) for i in range(4)]
    R.assert_close(got, np.array(expected), rtol=1e-10)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_gpus_take_the_whole_vocabulary_in_the_single_pass(rng, monkeypatch, backend):
    """Traced for a GPU, the single pass loops over token chunks only; elsewhere also over
    vocabulary chunks inside (here 8192 columns at D = 2048 are cut to 1024 on CPU). The value
    and gradients equal the float64 reference either way."""
    monkeypatch.setattr(_xla, "backend", lambda: backend)
    n, d, v = 64, 2048, 8192
    shapes = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def loss(x, w, y):
        return LCE(x, w, y, label_smoothing=0.1, z_loss=1e-4, recompute_logits=False)

    program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    loops = program.lower(*shapes).as_text().count("stablehlo.while")
    assert loops == 1 if backend == "gpu" else loops >= 2, loops
    x, w, y = _problem(rng, (8,), 16, 300)  # several token chunks: N / 8 rows per chunk
    got = program(jnp.asarray(x), jnp.asarray(w), jnp.asarray(y))
    kw = {"label_smoothing": 0.1, "z_loss": 1e-4}
    expected = _reference_value_and_grads(
        jnp.asarray(x), jnp.asarray(w), None, jnp.asarray(y), "mean", kw, None
    )
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        R.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpus_default_to_the_two_passes(monkeypatch, backend, dtype):
    """A reduced loss's default strategy: the single pass for a float32 ``w`` on GPUs and TPUs
    (one loop over token chunks, no statistics pass), the two passes on CPU, where they are
    faster (``_xla.TWO_PASS_BACKENDS``), and for a bfloat16 ``w`` everywhere; the lowered
    program of ``recompute_logits`` set to the chosen strategy is the default's."""
    monkeypatch.setattr(_xla, "backend", lambda: backend)
    shapes = (
        jax.ShapeDtypeStruct((64, 32), dtype),
        jax.ShapeDtypeStruct((32, 512), dtype),
        jax.ShapeDtypeStruct((64,), jnp.int32),
    )

    def program(**kw):
        def loss(x, w, y):
            return LCE(x, w, y, **kw)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*shapes).as_text()

    single = backend != "cpu" and dtype == jnp.float32
    default = program()
    assert default == program(recompute_logits=not single)
    assert default != program(recompute_logits=single)


def test_class_weight_gradient(rng):
    """Gradients also flow to class_weights (a learned reweighting), in every strategy."""
    x, w, y = _problem(rng, (23,), 5, 41)
    cw = rng.uniform(0.5, 2.0, size=41)
    kw = {"label_smoothing": 0.1, "z_loss": 0.02}
    for reduction, recompute in [("mean", True), ("mean", False), ("none", None)]:

        def f(cw, reduction=reduction, recompute=recompute):
            loss = LCE(
                jnp.asarray(x),
                jnp.asarray(w),
                jnp.asarray(y),
                class_weights=cw,
                reduction=reduction,
                token_chunk=5,
                vocab_chunk=8,
                recompute_logits=recompute,
                **kw,
            )
            return jnp.sum(loss)

        def r(cw, reduction=reduction):
            return jnp.sum(
                _reference(
                    jnp.asarray(x),
                    jnp.asarray(w),
                    None,
                    jnp.asarray(y),
                    reduction,
                    {"class_weights": cw, **kw},
                    jnp,
                )
            )

        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            expected = jax.jit(jax.grad(r))(jnp.asarray(cw))
        R.assert_close(jax.jit(jax.grad(f))(jnp.asarray(cw)), expected, rtol=1e-9)


def test_check_grads(rng):
    x, w, y = _problem(rng, (5,), 3, 7)
    bias = jnp.asarray(rng.normal(size=7))
    for reduction, recompute in [("mean", True), ("mean", False), ("none", None)]:
        f = functools.partial(
            lambda x, w, b, red, recompute: jnp.sum(
                LCE(
                    x,
                    w,
                    jnp.asarray(y),
                    bias=b,
                    reduction=red,
                    label_smoothing=0.1,
                    z_loss=0.1,
                    logit_soft_cap=3.0,
                    token_chunk=2,
                    vocab_chunk=3,
                    recompute_logits=recompute,
                )
            ),
            red=reduction,
            recompute=recompute,
        )
        jax.test_util.check_grads(
            jax.jit(f), (jnp.asarray(x), jnp.asarray(w), bias), order=1, modes=("rev",)
        )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_inputs(rng, dtype, reduction):
    """bf16/f16 x and w: float32 loss, gradients in the inputs' dtype, close to float64 on the
    rounded inputs (the products are accumulated in float32)."""
    x, w, y = _problem(rng, (50,), 32, 1009, scale=2.0)
    x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3}
    ct = jnp.asarray(rng.normal(size=50), jnp.float32)
    got = _value_and_grads(
        x, w, None, jnp.asarray(y), reduction, kw, ct, {"token_chunk": 16, "vocab_chunk": 256}
    )
    assert got[0].dtype == jnp.float32
    assert got[1][0].dtype == dtype and got[1][1].dtype == dtype
    _assert_near_float64(got, x, w, y, reduction, kw, ct)


@pytest.mark.parametrize("cotangent", [1.0, 0.0])
@pytest.mark.parametrize("recompute_logits", [None, True, False])
def test_float16_mean_gradient_in_range_where_the_sum_gradient_is_not(
    float16_overflow, recompute_logits, cotangent
):
    """A reduced loss keeps the summed loss's ``dw`` before the cotangent scales it. Here that
    is beyond float16's 65504 where the mean's (about -190) is not: kept in float16 by the two
    passes, it was -inf, and NaN under a zero cotangent; now in float32
    (``_blocks.kept_dw_dtype``). The fused loss gives what the unfused one gives (float32
    logits, ``dw`` rounded once to float16) in every strategy, and zeros under a zero
    cotangent; ``reduction="sum"``'s gradient is the sum's, beyond the range: -inf."""
    x, w, y = float16_overflow.x, float16_overflow.w, float16_overflow.labels
    chunks = {"token_chunk": 96, "vocab_chunk": 8, "recompute_logits": recompute_logits}

    def fused(x, w, reduction="mean"):
        return LCE(x, w, y, reduction=reduction, **chunks) * cotangent

    def unfused(x, w):
        return float16_overflow.unfused_mean(x, w) * cotangent

    got = jax.jit(jax.grad(fused, argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(unfused, argnums=(0, 1)))(x, w)
    for a, e in zip(got, want, strict=True):
        assert a.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(a)))
        scale = float(jnp.max(jnp.abs(e.astype(jnp.float32))))
        R.assert_close(a, e, rtol=2e-3, atol=2e-3 * scale)
    if cotangent:
        assert float(jnp.min(got[1].astype(jnp.float32))) < -150  # the label's column
        summed = jax.jit(jax.grad(lambda w: fused(x, w, "sum")))(w)
        assert bool(jnp.isneginf(summed[:, 0]).all())
    else:
        assert not bool(jnp.any(got[1]))


def test_float16_loss_scaled_mean_keeps_small_gradients(rng):
    """Float16 training scales the loss (here by 2**15) so that small gradients stay within
    float16's range: the fused loss's ``dw`` of a mean, kept before the cotangent scales it,
    must not round them to 0 first. One column of ``w`` at -4 takes little probability: its
    mean gradient is about 1e-8 (float16's smallest subnormal: 6e-8), 3e-4 once scaled."""
    n, d, v = 1024, 4, 16
    x = jnp.asarray(1 + 0.1 * rng.normal(size=(n, d)), jnp.float16)
    w = np.zeros((d, v))
    w[:, 3] = -4.0
    w = jnp.asarray(w, jnp.float16)
    y = jnp.asarray(rng.integers(4, v, n), jnp.int32)
    scale = 2.0**15

    def fused(w):
        return LCE(x, w, y, recompute_logits=True) * scale

    def unfused(w):
        logits = jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
        return softmax_cross_entropy_with_integer_labels(logits, y, reduction="mean") * scale

    got, want = jax.grad(fused)(w), jax.grad(unfused)(w)
    assert float(jnp.min(want[:, 3].astype(jnp.float32))) > 1e-4
    R.assert_close(got[:, 3], want[:, 3], rtol=2e-3)
    R.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize(
    "backend, dtype, operand",
    [
        ("gpu", "bfloat16", "bf16"),
        ("tpu", "bfloat16", "bf16"),
        ("cpu", "bfloat16", "bf16"),
        ("gpu", "float16", "f16"),
        ("cpu", "float16", "f32"),
    ],
)
@pytest.mark.parametrize("strategy", MEAN_STRATEGIES, ids=_strategy_id)
def test_narrow_blocks_are_multiplied_as_they_are(
    rng, monkeypatch, backend, dtype, operand, strategy
):
    """bfloat16 x and w: every product (x w, dz w^T, x^T dz, forward and backward, in the
    two passes and in the single pass) has bfloat16 operands and a float32 result, so it runs
    at the hardware's full rate, on CPU too; float16 ones on accelerators, but in float32 on
    CPU, whose XLA computes them so. Either way the result is as close to float64 as the
    rounding of the inputs and of dz to the products' dtype allows."""
    reduction, recompute_logits = strategy
    monkeypatch.setattr(_xla, "backend", lambda: backend)
    x, w, y = _problem(rng, (40,), 16, 300, scale=2.0)
    x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    ct = jnp.asarray(rng.normal(size=40), jnp.float32)
    chunks = {"token_chunk": 16, "vocab_chunk": 128}

    def f(x, w):
        loss = LCE(
            x,
            w,
            jnp.asarray(y),
            reduction=reduction,
            label_smoothing=0.1,
            recompute_logits=recompute_logits,
            **chunks,
        )
        return jnp.sum(loss * ct) if reduction == "none" else loss

    program = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    # x w (twice in the two passes), dz w^T, x^T dz
    at_least = 3 if recompute_logits is False else 4
    assert_products(program.lower(x, w).as_text(), operand, at_least)
    _assert_near_float64(program(x, w), x, w, y, reduction, {"label_smoothing": 0.1}, ct)


def test_bad_label_gives_nan_for_that_token_only(rng):
    x, w, y = _problem(rng, (6,), 4, 10)
    y[2], y[4] = 10, -100
    got = LCE(jnp.asarray(x), jnp.asarray(w), jnp.asarray(y), ignore_index=-100, reduction="none")
    assert np.isnan(got[2]) and got[4] == 0
    assert np.all(np.isfinite(np.delete(np.asarray(got), 2)))
    assert np.isnan(LCE(jnp.asarray(x), jnp.asarray(w), jnp.asarray(y), ignore_index=-100))


@pytest.mark.parametrize("recompute_logits", [False, True])
@pytest.mark.parametrize("garbage", [np.nan, np.inf])
def test_garbage_activations_of_ignored_tokens_poison_nothing(rng, recompute_logits, garbage):
    """A padding token's activations may hold NaN or inf: with its label ignore_index it adds
    nothing to the loss or to any gradient, dw and dbias included (0 times its activation)."""
    x, w, y = _problem(rng, (7,), 4, 10)
    y[[1, 5]] = -100
    bias = jnp.asarray(rng.normal(size=10))
    kw = dict(
        ignore_index=-100,
        label_smoothing=0.1,
        token_chunk=3,
        vocab_chunk=4,
        recompute_logits=recompute_logits,
    )

    @jax.jit  # one program for both calls (eagerly, each primitive compiles on its own)
    def value_and_grads(x):
        loss = lambda x, w, b: LCE(x, w, jnp.asarray(y), bias=b, **kw)  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, jnp.asarray(w), bias)

    clean = value_and_grads(jnp.asarray(x))
    dirty_x = x.copy()
    dirty_x[1, 2], dirty_x[5, :] = garbage, -garbage
    dirty = value_and_grads(jnp.asarray(dirty_x))
    for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-15)


def test_masked_classes_and_empty_mean(rng):
    """A -inf bias removes a class (it never enters the logsumexp or the smoothing); a batch of
    only ignored tokens has mean 0 with zero gradient."""
    x, w, y = _problem(rng, (9,), 4, 12)
    bias = np.zeros(12)
    bias[[0, 5]] = -np.inf
    y = np.where(np.isin(y, [0, 5]), 1, y).astype(np.int32)
    kw = {"label_smoothing": 0.3}
    got = LCE(
        jnp.asarray(x),
        jnp.asarray(w),
        jnp.asarray(y),
        bias=jnp.asarray(bias),
        reduction="none",
        vocab_chunk=5,
        **kw,
    )
    expected = _reference(x, w, bias, y, "none", kw, np)
    R.assert_close(got, expected, rtol=1e-10)
    ignored = jnp.full((9,), -100, jnp.int32)
    loss, grads = jax.jit(
        jax.value_and_grad(lambda x, w: LCE(x, w, ignored, ignore_index=-100), argnums=(0, 1))
    )(jnp.asarray(x), jnp.asarray(w))
    assert loss == 0 and all(not jnp.any(g) for g in grads)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_huge_logits_keep_the_digits_of_the_log_sum(rng, offset, reduction):
    """Logits offset + O(10) with offset = +-1e4, exact in float32 (x = [1, a, c] with small
    integers a, c; w = [offset; u; v] with u, v multiples of 1/64), so the loss (O(1)) is only
    as accurate as the row statistics: lse = max + log_sum in float32 would round log_sum to
    ulp(1e4) ~ 1e-3. Ragged token and vocabulary chunks, so blocks are merged."""
    n, v = 37, 301
    a, c = (rng.integers(-3, 4, size=n).astype(F64) for _ in range(2))
    x = np.stack([np.ones(n), a, c], axis=1)
    u, t = (rng.integers(-128, 129, size=v) / 64 for _ in range(2))
    w = np.stack([np.full(v, offset), u, t])
    y = rng.integers(0, v, size=n).astype(np.int32)
    ct = rng.normal(size=n)
    args = [jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), None, jnp.asarray(y)]
    assert np.array_equal(np.asarray(args[0] @ args[1], F64), x @ w)  # exact logits
    chunks = {"token_chunk": 16, "vocab_chunk": 64}
    got = _value_and_grads(*args, reduction, {}, jnp.asarray(ct, jnp.float32), chunks)
    expected = _reference_value_and_grads(
        jnp.asarray(x), jnp.asarray(w), None, jnp.asarray(y), reduction, {}, jnp.asarray(ct)
    )
    assert got[0].dtype == jnp.float32
    R.assert_close(got[0], expected[0], rtol=1e-6)
    # dx[:, 0] = offset * sum_c dloss/dz_c is offset times a sum that cancels to 0: float32
    # rounding of sum_c p_c alone leaves ~1e-3 there, whatever the statistics.
    (dx, dw), (dx_ref, dw_ref) = got[1], expected[1]
    for a, e in [(dx[:, 1:], dx_ref[:, 1:]), (dw, dw_ref)]:
        R.assert_close(a, e, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(e))))


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"x": np.zeros((4, 5))}, ValueError, "D=3"),
        ({"w": np.zeros((3,))}, ValueError, r"w must have shape \[D, V\]"),
        ({"labels": np.zeros((5,), np.int32)}, ValueError, "labels must have shape"),
        ({"labels": np.zeros((4,))}, TypeError, "labels must be an integer"),
        ({"bias": np.zeros((6,))}, ValueError, "bias must have shape"),
        ({"class_weights": np.ones((6,))}, ValueError, "class_weights must have shape"),
        ({"token_chunk": 0}, ValueError, "token_chunk must be > 0"),
        ({"vocab_chunk": -3}, ValueError, "vocab_chunk must be > 0"),
        ({"vocab_chunk": 2.5}, TypeError, "vocab_chunk must be a positive int"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"logit_soft_cap": 0.0}, ValueError, "logit_soft_cap"),
    ],
)
def test_bad_input(change, error, match):
    args = {"x": np.zeros((4, 3)), "w": np.zeros((3, 7)), "labels": np.zeros((4,), np.int32)}
    args.update(change)
    x, w, labels = (jnp.asarray(args.pop(k)) for k in ("x", "w", "labels"))
    kw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    with pytest.raises(error, match=match):
        LCE(x, w, labels, **kw)


# ---------------------------------------------------------------------------------- memory
N, D, V = 4096, 512, 32768
# The bounds below are of the CPU's chunk defaults; GPUs and TPUs take 512 MiB blocks
# (_xla.CHUNK_DEFAULTS), and the whole-w conversion they guard against is XLA's CPU backend's.
CPU_DEFAULTS = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="bounds of the CPU chunk defaults"
)


def _temp_bytes(v, dtype=jnp.float32, reduction="mean", n=N, d=D, w_dtype=None, **kw):
    def loss(x, w, y):
        out = LCE(x, w, y, reduction=reduction, **kw)
        return jnp.mean(out) if reduction == "none" else out

    shapes = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype if w_dtype is None else w_dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*shapes).compile()
    stats = compiled.memory_analysis()
    if stats is None:  # pragma: no cover - backend without memory analysis
        pytest.skip("memory_analysis not available on this backend")
    return stats.temp_size_in_bytes


@CPU_DEFAULTS
@pytest.mark.parametrize("strategy", MEAN_STRATEGIES, ids=_strategy_id)
def test_temporaries_at_most_64_mib(strategy):
    """The unfused loss needs 1024 MiB of temporaries here (the [N, V] logits and their
    gradient); the fused one at most 64 MiB, in every strategy."""
    reduction, recompute = strategy
    assert _temp_bytes(V, reduction=reduction, recompute_logits=recompute) <= 64 * 2**20


@CPU_DEFAULTS
@pytest.mark.parametrize("strategy", MEAN_STRATEGIES, ids=_strategy_id)
def test_doubling_the_vocabulary_grows_temporaries_by_at_most_the_extra_w_gradient(strategy):
    reduction, recompute = strategy
    kw = {"reduction": reduction, "recompute_logits": recompute}
    grown = _temp_bytes(2 * V, **kw) - _temp_bytes(V, **kw)
    assert grown <= D * V * 4, f"temporaries grew by {grown / 2**20:.1f} MiB"


def _unfused_temp_bytes(n, d, v):
    def loss(x, w, y):
        return softmax_cross_entropy_with_integer_labels(x @ w, y, reduction="mean")

    shapes = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "n,d,v",
    [
        (2048, 256, 1000),
        (2048, 256, 4000),
        (2048, 256, 16000),
        (2048, 1024, 4000),
        (512, 4096, 8192),
    ],
)
def test_default_chunks_never_need_more_than_the_unfused_loss(n, d, v):
    """Small V, where the [N, V] logits are small next to the block budget, and a D large next
    to N: the default strategy still needs no more temporaries than the unfused loss (at D =
    4096 the two passes' [D, vocab_chunk] arrays took 52 MiB against the unfused 32 MiB before
    their columns were cut: ``_blocks.vocab_chunk_of_two_passes``)."""
    fused = _temp_bytes(v, n=n, d=d)
    unfused = _unfused_temp_bytes(n, d, v)
    assert fused <= unfused, f"fused {fused / 2**20:.1f} MiB, unfused {unfused / 2**20:.1f} MiB"


def test_ragged_token_chunks_add_no_copy_of_the_w_gradient():
    """A token_chunk that does not divide N costs the single pass no more than one that does
    (the last chunk overlaps its predecessor instead of running after the loop, which made XLA
    copy dw)."""
    v = 64000
    single = {"recompute_logits": False}
    ragged = _temp_bytes(v, n=2048, d=256, token_chunk=96, **single)  # 2048 = 21 * 96 + 32
    exact = _temp_bytes(v, n=2048, d=256, token_chunk=128, **single)
    assert ragged <= exact, f"{ragged / 2**20:.1f} MiB vs {exact / 2**20:.1f} MiB"


@CPU_DEFAULTS
@pytest.mark.parametrize(
    "x_dtype, w_dtype, reduction",
    [
        ("bfloat16", "bfloat16", "mean"),
        ("bfloat16", "bfloat16", "none"),
        ("float16", "float16", "none"),  # a reduced loss keeps a float32 dw by design
        ("float32", "bfloat16", "mean"),
        ("float32", "bfloat16", "none"),
    ],
)
def test_a_narrow_w_is_never_converted_whole(x_dtype, w_dtype, reduction):
    """A float32 copy of a narrow w would be D*V*4 bytes of temporaries. float16 on CPU and
    a float32 x beside a bfloat16 w are multiplied in float32, w's columns converted a chunk at
    a time (``_xla.chunk``); bfloat16 inputs are multiplied as they are."""
    got = _temp_bytes(V, x_dtype, reduction=reduction, w_dtype=w_dtype)
    assert got < D * V * 4, f"{got / 2**20:.1f} MiB"
