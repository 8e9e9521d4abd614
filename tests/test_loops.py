"""The loops over chunks of rows (``jaxce._loops``): chunks taken across lanes compute every row
once, with the function's own values and derivatives in every mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce
from jaxce import _loops

F64 = np.float64


def _rows(x, t, scale):
    """Per-row results of two shapes and two dtypes, one reading a shared argument."""
    lse = jax.nn.logsumexp(x * scale, axis=-1, keepdims=True)
    sum_and_max = jnp.stack([jnp.sum(x * t, axis=-1), jnp.max(x, axis=-1)], axis=-1)
    return lse, sum_and_max, jnp.sum(x * x, axis=-1, keepdims=True).astype(jnp.float32)


# (rows, rows per chunk, lanes): lanes with several chunks and a tail in each, lanes with one
# chunk and a tail, lanes without a tail, one lane (an odd row count) with a tail, a chunk of
# all the rows.
CASES = [(36, 8, 4), (12, 8, 4), (6, 4, 2), (40, 8, 8), (7, 2, 1), (16, 16, 1)]


@pytest.mark.parametrize(("n", "size", "lanes"), CASES)
def test_row_chunks_across_lanes_compute_every_row_once(monkeypatch, n, size, lanes):
    monkeypatch.setattr(_loops, "partitionable", lambda: True)
    monkeypatch.setattr(_loops, "MIN_RUN_BYTES", 1)
    monkeypatch.setattr(_loops, "MIN_RUN_ROWS", 1)
    monkeypatch.setattr(_loops, "LANE_ROWS", 1)
    assert _loops.Lanes.of(n, size, 8 * 5).number == lanes
    rng = np.random.default_rng(n)
    x, t, dx, dt = (jnp.asarray(rng.normal(size=(n, 5)), F64) for _ in range(4))
    scale = jnp.asarray(1.5, F64)

    def chunked(x, t, scale):
        return _loops._in_chunks(_rows, size, (x, t), (scale,))

    for got, want in zip(chunked(x, t, scale), _rows(x, t, scale), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-13 if want.dtype == F64 else 1e-6)
    # Forward mode (the chunks' own derivative, in a scan), and reverse mode through it.
    args, dots = (x, t, scale), (dx, dt, jnp.asarray(0.5, F64))
    got_dot = jax.jvp(chunked, args, dots)[1]
    want_dot = jax.jvp(_rows, args, dots)[1]
    for got, want in zip(got_dot, want_dot, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12 if want.dtype == F64 else 1e-6)

    def total(f):
        return lambda *a: sum(jnp.sum(o.astype(F64) ** 2) for o in f(*a))

    got_grad = jax.jit(jax.grad(total(chunked), argnums=(0, 1, 2)))(*args)
    want_grad = jax.grad(total(_rows), argnums=(0, 1, 2))(*args)
    for got, want in zip(got_grad, want_grad, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_the_chunks_loop_pastes_into_one_array_per_dtype():
    """The three per-row results of ``_rows`` (two float64, one float32) are carried through the
    chunks' loop as two arrays, each pasted into by one dynamic-update-slice: XLA's CPU
    compiler generates a kernel for each array a loop pastes into."""
    x = jax.ShapeDtypeStruct((64, 5), F64)
    scale = jax.ShapeDtypeStruct((), F64)
    program = jax.jit(lambda x, t, scale: _loops._in_chunks(_rows, 8, (x, t), (scale,)))
    hlo = program.lower(x, x, scale).compile().as_text()
    pastes = [line for line in hlo.splitlines() if "dynamic-update-slice(" in line]
    shapes = sorted(line.split("=")[1].split()[0].split("{")[0] for line in pastes)
    assert shapes == ["f32[64,1]", "f64[64,3]"]


@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.1, "z_loss": 1e-4, "logit_soft_cap": 30.0}],
    ids=["plain", "options"],
)
def test_the_chunks_loop_takes_the_log_sum(options):
    """Bfloat16 logits whose exponentials are not kept have their row statistics reduced a
    chunk of rows at a time on CPU; the log of each row's sum is taken in that loop too
    (``_rows.row_stats`` with ``_rows.summed``), in the kernel that writes a chunk's results,
    not in a kernel of its own over all the rows after it."""
    if jax.default_backend() != "cpu":
        pytest.skip("the loop over chunks of rows of this size is the CPU's")
    n, c = 4096, 4096
    x = jax.ShapeDtypeStruct((n, c), jnp.bfloat16)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)

    def loss(x, labels):
        return jaxce.softmax_cross_entropy_with_integer_labels(x, labels, **options).mean()

    hlo = jax.jit(jax.value_and_grad(loss)).lower(x, labels).compile().as_text()
    assert " while(" in hlo
    logs = [line.split("=")[1].split()[0] for line in hlo.splitlines() if " log(" in line]
    assert [shape.split("{")[0] for shape in logs] == ["f32[64,1]"]


@pytest.mark.parametrize(
    ("n", "size", "row_bytes", "lanes"),
    [
        (8192, 256, 4000, 32),  # runs of 5 rows of 4000 bytes: at most 51 lanes
        (8192, 256, 65536, 128),  # runs of two rows at least
        (8192, 256, None, 256),  # no minimum run (the fused loss's token chunks): one row
        (4096, 512, None, 128),  # lanes of 32 rows
        (12288, 768, 65536, 128),  # 12288 = 384 * 32 rows: 128 lanes of 96 rows
        (1000, 250, 65536, 1),  # 1000 = 8 * 125: no lane of a multiple of 32 rows
        (8192, 8192, None, 1),  # one chunk
    ],
)
def test_lanes_are_powers_of_two_with_long_runs_and_whole_tiles(
    monkeypatch, n, size, row_bytes, lanes
):
    monkeypatch.setattr(_loops, "partitionable", lambda: True)
    assert _loops.Lanes.of(n, size, row_bytes).number == lanes
    # One device: contiguous chunks, whatever the sizes.
    monkeypatch.setattr(_loops, "partitionable", lambda: False)
    assert _loops.Lanes.of(n, size, row_bytes).number == 1


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("recompute_logits", [False, True])
def test_fused_token_chunks_across_lanes_match_contiguous_chunks(
    monkeypatch, reduction, recompute_logits
):
    """The fused loss's token loops (the single pass, the statistics and the gradients'
    passes) across 2 lanes of 96 tokens, chunks of 64 tokens of each, the last overlapping its
    predecessor, against contiguous chunks (tested against float64 references in
    test_linear.py): every option, value and the gradients of x, w and the bias."""
    rng = np.random.default_rng(7)
    n, d, v = 192, 4, 37
    x = jnp.asarray(rng.normal(size=(n, d)), F64)
    w = jnp.asarray(rng.normal(size=(d, v)), F64)
    bias = jnp.asarray(rng.normal(size=(v,)), F64)
    labels = jnp.asarray(rng.integers(0, v, n), jnp.int32).at[5].set(-100)
    ct = jnp.asarray(rng.normal(size=(n,)), F64)

    def loss(x, w, bias):
        out = jaxce.linear_softmax_cross_entropy(
            x,
            w,
            labels,
            bias=bias,
            ignore_index=-100,
            class_weights=jnp.linspace(0.5, 2.0, v, dtype=F64),
            label_smoothing=0.1,
            z_loss=1e-3,
            logit_soft_cap=3.0,
            reduction=reduction,
            token_chunk=128,
            vocab_chunk=16,
            recompute_logits=None if reduction == "none" else recompute_logits,
        )
        return jnp.sum(out * ct) if reduction == "none" else out

    def value_and_grads():
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, w, bias)

    monkeypatch.setattr(_loops, "partitionable", lambda: True)
    assert _loops.Lanes.of(n, 128).number == 2
    got = value_and_grads()
    monkeypatch.setattr(_loops, "partitionable", lambda: False)
    want = value_and_grads()
    for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w_, rtol=1e-12, atol=1e-14)
