"""Temporary memory of the losses' ``jit(value_and_grad)``, which ``memory_analysis()`` gives
deterministically for a compiled program.

The integer-label cross-entropy and its gradient need no ``[N, V]`` float32 temporaries: at most
one bfloat16 logits buffer (the gradient itself is the output, not a temporary), for every option
combination, above the exponentials that a CPU keeps (``jaxce._xla.KEPT_BYTES``). And every loss
reduces a chunk of rows at a time, so its temporaries do not grow with the number of rows at all,
whatever XLA fuses (this differs between JAX versions).
"""

import functools
import re

import _paths
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _compilations import counted

import jaxce
from jaxce import _xla

N, V = 256, 8192
CHUNK = 2**20  # jaxce._xla.ROW_CHUNK_BYTES on CPU
# bfloat16 rows whose float32 exponentials (32 MiB) are more than the CPU keeps for the backward
# pass (jaxce._xla.KEPT_BYTES): there the temporaries are bounded by the logits' own size.
N_BF16 = 1024


@pytest.fixture(autouse=True)
def _row_chunks_of_one_mib(monkeypatch):
    """Every backend's row chunks at the CPU's 1 MiB while these tests compile. The bounds below
    are a few chunks, not a number of rows: with small chunks they show that a loss's loop over
    row chunks bounds its memory on whatever backend runs them. GPUs and TPUs take chunks of 256
    MiB by default (``_xla.ROW_CHUNK_BYTES``), larger than these tests' arrays, which would
    then be read whole; and XLA keeps a float32 copy of a whole chunk for some options."""
    monkeypatch.setattr(_xla, "ROW_CHUNK_BYTES", dict.fromkeys(_xla.ROW_CHUNK_BYTES, CHUNK))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"label_smoothing": 0.1},
        {"z_loss": 1e-4},
        {"logit_soft_cap": 30.0},
        {"label_smoothing": 0.1, "z_loss": 1e-4, "logit_soft_cap": 30.0},
        {"ignore_index": -100},
    ],
    ids=["plain", "smoothing", "z_loss", "soft_cap", "all", "ignore_index"],
)
def test_value_and_grad_temp_memory_bf16(kw):
    y = jnp.asarray(np.random.default_rng(0).integers(0, V, size=N_BF16).astype(np.int32))
    logits = jax.ShapeDtypeStruct((N_BF16, V), jnp.bfloat16)

    def loss(lg):
        return jaxce.softmax_cross_entropy_with_integer_labels(lg, y, reduction="mean", **kw)

    f = jax.value_and_grad(loss)
    compiled = jax.jit(f).lower(logits).compile()
    stats = compiled.memory_analysis()
    if stats is None:  # pragma: no cover - backend without memory analysis
        pytest.skip("memory_analysis not available on this backend")
    assert stats.temp_size_in_bytes <= N_BF16 * V * 2, (
        f"temporaries {stats.temp_size_in_bytes} B exceed one bf16 logits buffer {N_BF16 * V * 2} B"
    )
    # the output (the gradient) has the logits' dtype
    out = jax.eval_shape(f, logits)
    assert out[1].dtype == jnp.bfloat16 and out[0].dtype == jnp.float32


def test_naive_float32_upcast_would_exceed_the_bound():
    """Sanity check that the bound is meaningful: a naive f32 log_softmax path exceeds it."""
    y = jnp.asarray(np.random.default_rng(0).integers(0, V, size=N_BF16).astype(np.int32))

    def naive(lg):
        lp = jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(lp, y[:, None], axis=-1))

    stats = (
        jax.jit(jax.value_and_grad(naive))
        .lower(jax.ShapeDtypeStruct((N_BF16, V), jnp.bfloat16))
        .compile()
        .memory_analysis()
    )
    if stats is None:  # pragma: no cover
        pytest.skip("memory_analysis not available on this backend")
    assert stats.temp_size_in_bytes > N_BF16 * V * 2


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_every_option_combination_fits_one_bf16_buffer(smoothing, z_loss, cap, weighted, masked):
    y = jnp.asarray(np.random.default_rng(0).integers(0, V, size=N_BF16).astype(np.int32))
    weights = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, V).astype(np.float32))
    mask = jax.ShapeDtypeStruct((N_BF16, V), jnp.bool_)

    def loss(lg, where):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            lg,
            y,
            where=where if masked else None,
            class_weights=weights if weighted else None,
            label_smoothing=smoothing,
            z_loss=z_loss,
            logit_soft_cap=cap,
            ignore_index=-100,
            reduction="mean",
        )

    logits = jax.ShapeDtypeStruct((N_BF16, V), jnp.bfloat16)
    stats = jax.jit(jax.value_and_grad(loss)).lower(logits, mask).compile().memory_analysis()
    if stats is None:  # pragma: no cover - backend without memory analysis
        pytest.skip("memory_analysis not available on this backend")
    assert stats.temp_size_in_bytes <= N_BF16 * V * 2


# ----------------------------------------------------------------------------------------------
# Every loss reduces a chunk of rows at a time, so its temporaries are a few chunks whatever the
# number of rows and whatever XLA fuses: the bound is a property of the program (it holds on
# every JAX the package supports, where fusing the reductions differs between versions).
C = 4096
PER_ROW = 64  # bytes of per-row statistics a loss may keep (a few float32 numbers per row)
LOSSES = {
    "integer_all_options": (
        lambda x, t, y: jaxce.softmax_cross_entropy_with_integer_labels(
            x,
            y,
            label_smoothing=0.1,
            z_loss=1e-4,
            logit_soft_cap=30.0,
            class_weights=jnp.linspace(0.5, 2.0, C),
            reduction="mean",
        )
    ),
    "soft_labels": lambda x, t, y: jaxce.softmax_cross_entropy(
        x, t, label_smoothing=0.1, reduction="mean"
    ),
    # without options: on CPU one fused forward pass for float32 logits, chunks for narrower ones
    "soft_labels_plain": lambda x, t, y: jaxce.softmax_cross_entropy(x, t, reduction="mean"),
    "softmax_focal": lambda x, t, y: jaxce.softmax_focal_loss(x, y, reduction="mean"),
    # its gradient written as a select: a scatter into zeros kept a float32 buffer of its size
    "nll": lambda x, t, y: jaxce.nll_loss(x, y, reduction="mean"),
    "sigmoid_bce": lambda x, t, y: jaxce.sigmoid_binary_cross_entropy(x, t, reduction="mean"),
    "sigmoid_focal": lambda x, t, y: jaxce.sigmoid_focal_loss(x, t, reduction="mean"),
    "softmax_entropy": lambda x, t, y: jaxce.softmax_entropy(x, reduction="mean"),
    # their 0 log 0 = 0 selects: over whole rows XLA's CPU compiler kept the terms' float32 array
    "entropy": lambda x, t, y: jaxce.entropy(x, reduction="mean"),
    "kl_divergence": lambda x, t, y: jaxce.kl_divergence(x, t, reduction="mean"),
    "binary_cross_entropy": lambda x, t, y: jaxce.binary_cross_entropy(x, t, reduction="mean"),
}


def _loss_temp_bytes(name, n):
    x = jax.ShapeDtypeStruct((n, C), jnp.bfloat16)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)
    compiled = jax.jit(jax.value_and_grad(LOSSES[name])).lower(x, x, labels).compile()
    stats = compiled.memory_analysis()
    if stats is None:  # pragma: no cover - backend without memory analysis
        pytest.skip("memory_analysis not available on this backend")
    return stats.temp_size_in_bytes


@pytest.mark.parametrize("name", list(LOSSES))
def test_temporaries_do_not_grow_with_the_rows(name):
    small, large = 2048, 8192  # above the kept exponentials' budget (_xla.KEPT_BYTES)
    at_small, at_large = _loss_temp_bytes(name, small), _loss_temp_bytes(name, large)
    # A float32 copy of the large logits would be 128 MiB; a bf16 one 64 MiB.
    assert at_small <= 8 * CHUNK, f"{at_small / 2**20:.2f} MiB at N={small}"
    assert at_large - at_small <= PER_ROW * (large - small), (
        f"{at_small / 2**20:.2f} MiB at N={small}, {at_large / 2**20:.2f} MiB at N={large}"
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["entropy", "kl_divergence", "softmax_entropy"])
def test_the_information_losses_alone_keep_no_array_of_their_size(name, dtype):
    """The loss alone (an evaluation step): float32 [4096, 4096] is 64 MiB, which XLA's CPU
    compiler kept whole for entropy and KL before their sums took row chunks."""
    x = jax.ShapeDtypeStruct((4096, C), dtype)
    labels = jax.ShapeDtypeStruct((4096,), jnp.int32)
    stats = jax.jit(LOSSES[name]).lower(x, x, labels).compile().memory_analysis()
    if stats is None:  # pragma: no cover - backend without memory analysis
        pytest.skip("memory_analysis not available on this backend")
    assert stats.temp_size_in_bytes <= 4 * CHUNK, f"{stats.temp_size_in_bytes / 2**20:.2f} MiB"


def _hvp_temp_bytes(name, n, dtype):
    x = jax.ShapeDtypeStruct((n, C), dtype)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)

    def hvp(x, t, y):
        loss = functools.partial(LOSSES[name], t=t, y=y)
        return jax.jvp(jax.grad(loss), (x,), (jnp.ones_like(x),))[1]

    stats = jax.jit(hvp).lower(x, x, labels).compile().memory_analysis()
    if stats is None:  # pragma: no cover - backend without memory analysis
        pytest.skip("memory_analysis not available on this backend")
    return stats.temp_size_in_bytes


# Forward over reverse (a Hessian-vector product, as second-order optimizers take) differentiates
# the row chunks' loop itself (jaxce._loops._in_chunks): a chunk at a time too. The sigmoid focal
# loss has no row chunks; its elementwise rule's product keeps one array of the logits' size.
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", [n for n in LOSSES if n != "sigmoid_focal"])
def test_hessian_vector_products_do_not_grow_with_the_rows(name, dtype):
    small, large = 2048, 8192  # above the kept exponentials' budget (_xla.KEPT_BYTES)
    at_small, at_large = _hvp_temp_bytes(name, small, dtype), _hvp_temp_bytes(name, large, dtype)
    # Float32 logits with a soft cap keep their exponentials at any size on CPU (with smoothing
    # from jaxlib 0.10.2 on), and the forward-over-reverse pass keeps what it derives from them:
    # float32 arrays of the logits' size, one on jaxlib 0.10.2, three on 0.12.0.1 and two on
    # 0.12.1 (their tangent, and copies), the price of the faster reverse pass. (The soft cap's
    # derivative differentiated as -2 tanh(u) times its value, not in its own parts, kept a
    # second one.)
    kept = name == "integer_all_options" and dtype == jnp.float32 and PLAIN_SMOOTHING
    arrays = (1 if jax.__version_info__ < (0, 12) else 3) if kept else 0
    per_row = PER_ROW + arrays * 4 * C
    assert at_small <= 8 * CHUNK + arrays * 4 * C * small, (
        f"{at_small / 2**20:.2f} MiB at N={small}"
    )
    assert at_large - at_small <= per_row * (large - small), (
        f"{at_small / 2**20:.2f} MiB at N={small}, {at_large / 2**20:.2f} MiB at N={large}"
    )


# ----------------------------------------------------------------------------------------------
# On CPU the forward pass keeps exp(x - max) for the backward pass
# (jaxce._xla.saves_exponentials), so both take one exponential pass over the logits. The
# float32 integer-label loss keeps them in the gradient's buffer, with a soft cap too, and with
# smoothing (and a soft cap) where its sums are first taken as if every class were admissible
# (from jaxlib 0.10.2 on: jaxce._rows.assumes_all_admissible): still no [N, V] temporary. Soft
# labels and bfloat16 logits keep them in buffers of their own, only up to _xla.KEPT_BYTES, as
# float32 logits with smoothing (one buffer; two with a soft cap) do on an older jaxlib. Under a
# small soft cap (_rows.small_cap), bfloat16 logits with smoothing keep one buffer there too (the
# sums as if every class were admissible, from the kept exponentials), three on an older jaxlib.
PLAIN_SMOOTHING = jax.default_backend() == "cpu" and _xla.cpu_fuses_whole_rows()
FLOAT32_CASES = {
    "plain": {},
    "z_loss": {"z_loss": 1e-4},
    "class_weights": {"class_weights": jnp.linspace(0.5, 2.0, V)},
    "ignore_index": {"ignore_index": -100},
    "smoothing": {"label_smoothing": 0.1},
    "soft_cap": {"logit_soft_cap": 30.0},
    "smoothing_and_soft_cap": {"label_smoothing": 0.1, "logit_soft_cap": 30.0},
}
KEPT = 16 * 2**20  # jaxce._xla.KEPT_BYTES
KEPT_ROWS = KEPT // (4 * V)  # rows whose float32 exponentials are KEPT bytes
SOFT_KEPT_ROWS = 4 * 2**20 // (4 * V)  # jaxce._xla.SOFT_KEPT_BYTES of them
# name, dtype, the most rows whose exponentials are kept, and the buffers of the logits' size (in
# float32) kept beside the gradient there, which fit in KEPT bytes: smoothing and a soft cap
# together keep two (the capped logits and their exponentials), smoothing of bfloat16 logits
# three (one under a small soft cap, above); soft labels keep exponentials of up to 4 MiB, in
# three buffers for bfloat16 logits.
BUDGET_CASES = {
    "soft_labels_float32": ("soft_labels", jnp.float32, SOFT_KEPT_ROWS, 1),
    "soft_labels_bfloat16": ("soft_labels", jnp.bfloat16, SOFT_KEPT_ROWS, 3),
    "integer_bfloat16": ("plain", jnp.bfloat16, KEPT_ROWS, 1),
    "soft_cap_bfloat16": ("soft_cap", jnp.bfloat16, KEPT_ROWS, 1),
    "smoothing_bfloat16": ("smoothing", jnp.bfloat16, KEPT_ROWS // 3, 3),
    "smoothing_and_soft_cap_bfloat16": (
        ("smoothing_and_soft_cap", jnp.bfloat16, KEPT_ROWS, 1)
        if PLAIN_SMOOTHING
        else ("smoothing_and_soft_cap", jnp.bfloat16, KEPT_ROWS // 3, 3)
    ),
    **(
        {}
        if PLAIN_SMOOTHING
        else {
            "smoothing_float32": ("smoothing", jnp.float32, KEPT_ROWS, 1),
            "smoothing_and_soft_cap_float32": (
                "smoothing_and_soft_cap",
                jnp.float32,
                KEPT_ROWS // 2,
                2,
            ),
        }
    ),
}
# The float32 integer-label cases with buffers of their own, and the most rows they keep.
FLOAT32_KEPT_ROWS = {
    name: rows
    for name, dtype, rows, _ in BUDGET_CASES.values()
    if dtype == jnp.float32 and name in FLOAT32_CASES
}


def _program(name, rows=N, dtype=jnp.float32):
    y = jnp.asarray(np.random.default_rng(0).integers(0, V, size=rows).astype(np.int32))

    def loss(lg, soft):
        if name == "soft_labels":
            return jaxce.softmax_cross_entropy(lg, soft, reduction="mean")
        kw = FLOAT32_CASES[name]
        return jaxce.softmax_cross_entropy_with_integer_labels(lg, y, reduction="mean", **kw)

    logits = jax.ShapeDtypeStruct((rows, V), dtype)
    return jax.jit(jax.value_and_grad(loss)).lower(logits, logits)


def _temp_bytes(program):
    stats = program.compile().memory_analysis()
    if stats is None:  # pragma: no cover - backend without memory analysis
        pytest.skip("memory_analysis not available on this backend")
    return stats.temp_size_in_bytes


@pytest.mark.parametrize("name", list(FLOAT32_CASES))
def test_float32_on_cpu_needs_no_temporaries(name):
    # Above the budget: the cases without buffers of their own keep their exponentials at any
    # size, in the gradient's buffer; the others compute them again there (within it: below).
    rows = 2 * FLOAT32_KEPT_ROWS.get(name, KEPT_ROWS)
    temp = _temp_bytes(_program(name, rows))
    assert temp <= rows * V * 2, f"{temp / 2**20:.2f} MiB"  # less than half a float32 buffer


@pytest.mark.parametrize("above", [False, True], ids=["kept", "above"])
@pytest.mark.parametrize("case", list(BUDGET_CASES))
def test_kept_exponentials_stay_within_their_budget(case, above):
    name, dtype, kept_rows, buffers = BUDGET_CASES[case]
    rows = (2 if above else 1) * kept_rows
    temp = _temp_bytes(_program(name, rows, dtype))
    assert temp <= buffers * kept_rows * V * 4 + 8 * 2**10 * rows, f"{temp / 2**20:.2f} MiB"


def _exponential_passes(program):
    # exponentials of logits: of all rows, or of a chunk of rows in a loop (not the soft cap's
    # derivative's, exp(-2 |x / cap|), named sech_squared)
    wide = re.compile(rf"= f32\[\d+,{V}\]\S* exponential\(")
    lines = program.compile().as_text().splitlines()
    return [line for line in lines if wide.search(line) and "sech_squared" not in line]


ON_CPU = pytest.mark.skipif(jax.default_backend() != "cpu", reason="kept on CPU only")


@ON_CPU
@pytest.mark.parametrize(
    "name",
    ["plain", "z_loss", "class_weights", "ignore_index", "soft_cap"]
    + (["smoothing", "smoothing_and_soft_cap"] if PLAIN_SMOOTHING else []),
)
def test_float32_on_cpu_takes_one_exponential_pass(name):
    passes = _exponential_passes(_program(name, 2 * KEPT_ROWS))  # at any size
    assert len(passes) == 1, "\n".join(passes)


@ON_CPU
@pytest.mark.parametrize("case", list(BUDGET_CASES))
def test_one_exponential_pass_on_cpu_within_the_budget(case):
    name, dtype, kept_rows, _ = BUDGET_CASES[case]
    chunk_rows = CHUNK // (4 * V)
    rows = kept_rows // chunk_rows * chunk_rows  # above: whole row chunks, no tail
    kept = _exponential_passes(_program(name, rows, dtype))
    assert len(kept) == 1, "\n".join(kept)
    logits = jax.ShapeDtypeStruct((2 * rows, V), dtype)
    above = _exponential_passes(_program(name, 2 * rows, dtype))
    # Above: once in the forward pass (over chunks of rows) and once in the backward pass. The
    # soft-label loss's forward pass is one fused pass over all rows instead where XLA fuses it
    # (_cross_entropy._plain_soft_rows). The branch that computes its rows again, exactly, if
    # one comes out NaN, reads that pass's sums of exponentials (_cross_entropy._row_sums): it
    # takes no exponential of its own.
    if name == "soft_labels" and _xla.fuses_soft_rows(logits, logits):
        whole = [line for line in above if f"[{2 * rows},{V}]" in line]
        assert len(whole) == 2, "\n".join(above)
    assert len(above) == 2, "\n".join(above)


@ON_CPU
def test_the_sigmoid_derivative_keeps_no_array_on_cpu():
    """The derivative of sigmoid is ``sigmoid(x) sigmoid(-x)`` from two logistic functions: from
    one exponential and a select on x's sign of each, XLA's CPU compiler
    kept two float32 arrays of x's size (128 MiB here)."""
    x = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    program = jax.jit(jax.value_and_grad(lambda v: jnp.sum(jaxce.sigmoid(v)))).lower(x)
    assert _temp_bytes(program) <= CHUNK, f"{_temp_bytes(program) / 2**20:.2f} MiB"


SCATTER_ROWS = 2**20 // (4 * V)  # rows whose float32 exponentials are _xla.SCATTER_BYTES


@ON_CPU
@pytest.mark.parametrize(
    "dtype, rows, scattered",
    [
        (jnp.float32, N, True),  # in place, at any size
        (jnp.bfloat16, SCATTER_ROWS, True),
        (jnp.bfloat16, KEPT_ROWS, False),  # a second float32 buffer would leave the cache
    ],
    ids=["float32", "bfloat16_small", "bfloat16_kept"],
)
def test_label_term_is_scattered_where_it_pays(dtype, rows, scattered):
    # jaxce._xla.scatters_label_term: the label's term of the derivative is added to one entry
    # per row (a scatter) rather than selected at every entry, where that costs no extra memory
    # traffic; a float32 gradient buffer of its own stays within the kept exponentials' budget.
    program = _program("plain", rows, dtype)
    text = program.compile().as_text()
    assert (" scatter(" in text) == scattered
    if scattered and dtype != jnp.float32:
        assert _temp_bytes(program) <= 2 * 2**20 + 8 * 2**10 * rows


# On a GPU the reductions XLA fuses whole read whole rows (_xla.WHOLE_ROWS_BACKENDS): traced for
# each backend, a [4096, 32768] loss (512 MiB of float32, two of the accelerators' default 256 MiB
# chunks, many of the 1 MiB that this module's fixture sets) has a loop over row chunks exactly
# where the measurement found XLA keeping a temporary the size of the array without one.
CE = jaxce.softmax_cross_entropy_with_integer_labels
_WEIGHTS = jnp.ones((32768,), jnp.float32)
_WHOLE_ROW_CASES = {
    "integer labels": (lambda z, y: CE(z, y, reduction="mean"), "float32", True),
    "integer labels, bf16": (lambda z, y: CE(z, y, reduction="mean"), "bfloat16", True),
    "z-loss and class weights": (
        lambda z, y: CE(z, y, z_loss=1e-4, class_weights=_WEIGHTS, reduction="mean"),
        "float32",
        True,
    ),
    "smoothing": (lambda z, y: CE(z, y, label_smoothing=0.1, reduction="mean"), "float32", True),
    "smoothing, z-loss and class weights, bf16": (
        lambda z, y: CE(
            z, y, label_smoothing=0.1, z_loss=1e-4, class_weights=_WEIGHTS, reduction="mean"
        ),
        "bfloat16",
        True,
    ),
    "soft cap": (lambda z, y: CE(z, y, logit_soft_cap=30.0, reduction="mean"), "bfloat16", False),
    "smoothing, soft cap": (
        lambda z, y: CE(z, y, label_smoothing=0.1, logit_soft_cap=30.0, reduction="mean"),
        "float32",
        False,
    ),
    "where": (lambda z, y: CE(z, y, where=z > 0, reduction="mean"), "float32", False),
    "soft labels": (
        lambda z, y: jaxce.softmax_cross_entropy(z, jax.nn.one_hot(y, 32768), reduction="mean"),
        "float32",
        True,
    ),
    "soft labels, smoothing": (
        lambda z, y: jaxce.softmax_cross_entropy(
            z, jax.nn.one_hot(y, 32768), label_smoothing=0.1, reduction="mean"
        ),
        "float32",
        False,
    ),
    "sigmoid BCE": (
        lambda z, y: jaxce.sigmoid_binary_cross_entropy(z, z > 0, reduction="mean"),
        "float32",
        True,
    ),
    "sigmoid BCE, bf16": (
        lambda z, y: jaxce.sigmoid_binary_cross_entropy(z, z > 0, reduction="mean"),
        "bfloat16",
        True,
    ),
    "entropy": (lambda z, y: jaxce.entropy(z, reduction="mean"), "float32", True),
    "entropy, bf16": (lambda z, y: jaxce.entropy(z, reduction="mean"), "bfloat16", False),
    "KL divergence, bf16": (
        lambda z, y: jaxce.kl_divergence(z, z, reduction="mean"),
        "bfloat16",
        True,
    ),
    "BCE on probabilities, bf16": (
        lambda z, y: jaxce.binary_cross_entropy(jax.nn.sigmoid(z), z > 0, reduction="mean"),
        "bfloat16",
        False,
    ),
}


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", list(_WHOLE_ROW_CASES))
def test_gpus_read_whole_rows_where_xla_fuses_them(monkeypatch, backend, case):
    monkeypatch.setattr(_xla, "backend", lambda: backend)
    loss, dtype, whole = _WHOLE_ROW_CASES[case]
    shapes = (
        jax.ShapeDtypeStruct((4096, 32768), jnp.dtype(dtype)),
        jax.ShapeDtypeStruct((4096,), jnp.int32),
    )
    text = jax.jit(jax.value_and_grad(loss)).lower(*shapes).as_text()
    loops = text.count("stablehlo.while")
    if whole and backend == "gpu":
        assert loops == 0, f"{case}: {loops} loops"
    else:
        assert loops >= 1, f"{case}: no loop over row chunks"


# ----------------------------------------------------------------------------------------------
# The loss alone (an evaluation step, no gradient): on CPU the integer-label statistics of
# float32, float64 and bfloat16 logits are read in whole rows, which XLA fuses without a
# temporary from jaxlib 0.10.2 on (_xla.row_chunk; bfloat16 through _xla.unshared, without which
# XLA keeps a 64 MiB float32 copy here), with smoothing too (its sums first as if every class were
# admissible, and in the branch for a -inf logit over the admissible ones, fused too:
# jaxce._rows.exact_smoothing_sums); float16 logits, which XLA's CPU fusions do not take, keep
# their 1 MiB row chunks, as every case does on an older jaxlib.
ALONE_CASES = {
    "plain": ({}, jnp.float32, True),
    "z_loss_and_class_weights": (
        {"z_loss": 1e-4, "class_weights": jnp.linspace(0.5, 2.0, V)},
        jnp.float32,
        True,
    ),
    "ignore_index": ({"ignore_index": -100}, jnp.float32, True),
    "bfloat16": ({}, jnp.bfloat16, True),
    "bfloat16_ignore_index": ({"ignore_index": -100}, jnp.bfloat16, True),
    "float16": ({}, jnp.float16, False),
    "smoothing": ({"label_smoothing": 0.1}, jnp.float32, True),
    "where": ({"where": None}, jnp.float32, False),  # the mask: the program's second argument
}


@pytest.mark.parametrize("case", list(ALONE_CASES))
def test_the_loss_alone_reads_whole_rows_on_cpu(monkeypatch, case):
    monkeypatch.setattr(_xla, "backend", lambda: "cpu")
    kw, dtype, whole = ALONE_CASES[case]
    whole = whole and _xla.cpu_fuses_whole_rows()  # else every case keeps its chunks
    rows = 2048  # 64 MiB of float32 logits, 64 row chunks
    y = jnp.zeros((rows,), jnp.int32)

    def loss(lg, mask):
        options = {k: mask if k == "where" else v for k, v in kw.items()}
        return jaxce.softmax_cross_entropy_with_integer_labels(lg, y, reduction="mean", **options)

    shapes = (jax.ShapeDtypeStruct((rows, V), dtype), jax.ShapeDtypeStruct((rows, V), jnp.bool_))
    program = jax.jit(loss).lower(*shapes)
    text = program.as_text()
    loops = text.count("stablehlo.while")
    assert (loops == 0) == whole, f"{loops} loops"
    if case == "smoothing" and _xla.cpu_fuses_whole_rows():
        # Whole rows first, without a select; the branch that a batch with a -inf logit takes
        # (jaxce._rows.assumes_all_admissible) sums over the admissible classes, fused too.
        assert "stablehlo.case" in text or "stablehlo.if" in text, text
    if jax.default_backend() == "cpu":
        temp = _temp_bytes(program)  # a float32 copy of the logits would be 64 MiB
        assert temp <= (CHUNK if whole else 4 * CHUNK), f"{temp / 2**20:.2f} MiB"


# The sum of the sigmoid BCE in one fusion (_xla.sum_in_one_fusion; on CPU from jaxlib 0.10.2):
# its inputs and constants behind an optimization barrier, so that it shares nothing with the
# derivative's kernel. With a literal 1 (for 1 - t) XLA kept its broadcast as an array, 128 MiB
# at float32 [4096, 4096]. Weights per row and per class stay so (_binary._like): broadcast, they
# were an array of the logits' size (16 MiB here), whatever the path. The branch for a sum that
# is not finite is one fusion too (_binary._sigmoid_bce_terms exact at infinite logits), where
# the row chunks it held took 4 MiB here.
SUM_OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "weights per row and class": {"label_smoothing": 0.1, "weights": None, "pos_weight": None},
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("options", list(SUM_OPTIONS))
@pytest.mark.parametrize("derivative", [False, True], ids=["alone", "value_and_grad"])
def test_elementwise_sums_keep_no_array_of_their_size(dtype, options, derivative):
    rows, classes = 4096, 1024  # a float32 array of the logits' size: 16 MiB
    kw = SUM_OPTIONS[options]

    def loss(x, y, w, pw):
        weights = {"weights": w, "pos_weight": pw}
        options = {k: weights.get(k, v) if v is None else v for k, v in kw.items()}
        return jaxce.sigmoid_binary_cross_entropy(x, y, reduction="mean", **options)

    logits = jax.ShapeDtypeStruct((rows, classes), dtype)
    w = jax.ShapeDtypeStruct((rows, 1), jnp.float32)
    pw = jax.ShapeDtypeStruct((classes,), jnp.float32)
    fn = jax.jit(jax.value_and_grad(loss) if derivative else loss)
    with _paths.fused_sums() as fusion:
        program = fn.lower(logits, logits, w, pw)
    assert fusion.called == (jax.default_backend() == "cpu" and _xla.cpu_fuses_whole_rows())
    temp = _temp_bytes(program)  # fused: scalars (288 bytes at most), else the chunks
    assert temp <= (CHUNK // 16 if fusion.called else 8 * CHUNK), f"{temp / 2**20:.2f} MiB"


@pytest.mark.parametrize("loss", ["sigmoid_binary_cross_entropy", "binary_cross_entropy"])
@pytest.mark.parametrize("w_shape", [(4096, 1), (1024,)], ids=["per row", "per class"])
def test_weights_per_row_and_class_keep_no_array_of_the_logits_size(loss, w_shape):
    """Weights of one number per row or per class are read so in the sums' row chunks, not
    broadcast to the logits' shape first (``_binary._like``): broadcast, they were kept as an
    array (16 MiB here, float32 [4096, 1024])."""
    fn = getattr(jaxce, loss)
    logits = jax.ShapeDtypeStruct((4096, 1024), jnp.float32)
    w = jax.ShapeDtypeStruct(w_shape, jnp.float32)
    program = jax.jit(
        jax.value_and_grad(lambda x, y, w: fn(x, y, weights=w, reduction="mean"))
    ).lower(logits, logits, w)
    temp = _temp_bytes(program)
    assert temp <= 8 * CHUNK, f"{temp / 2**20:.2f} MiB"


# ----------------------------------------------------------------------------------------------
# Rows longer than 128 KiB of the compute dtype: XLA's CPU compiler (jaxlib 0.10.2 on) reduces
# them several times slower, so there they are reduced in sub-rows (_xla.row_blocks,
# _loops.SubRows). The compiled programs' reductions are read from their HLO: no reduction
# spans more than the limit, where without the sub-rows the statistics span whole rows.
_SHAPE = re.compile(r"%(\S+) = \w+\[([\d,]*)\]")
_REDUCE = re.compile(r"= \w+\[[\d,]*\]\S* reduce\(%([^,\s]+), .*dimensions=\{([\d,]*)\}")


def _longest_reduction(text: str) -> int:
    """The most entries any one reduction of a compiled program's HLO combines into a value."""
    shapes = {m.group(1): m.group(2) for m in _SHAPE.finditer(text)}
    longest = 0
    for operand, dims in _REDUCE.findall(text):
        sizes = [int(d) for d in shapes[operand].split(",") if d]
        longest = max(longest, int(np.prod([sizes[int(d)] for d in dims.split(",") if d])))
    return longest


def _long_row_programs(dtype, cols):
    rows = 40  # above the budgets of kept exponentials (4 MiB for soft labels, 16 MiB in all)
    y = jnp.arange(rows, dtype=jnp.int32)
    weights = jnp.linspace(0.5, 2.0, cols, dtype=jnp.float32)
    targets = jnp.full((rows, cols), 1 / cols, dtype)
    options = {"label_smoothing": 0.1, "z_loss": 1e-4, "logit_soft_cap": 30.0}
    ce = jaxce.softmax_cross_entropy_with_integer_labels

    def integer(**kw):
        return lambda lg: ce(lg, y, reduction="mean", **kw)

    losses = {
        "plain": integer(),
        "soft_cap": integer(logit_soft_cap=30.0),
        "z_loss_and_class_weights": integer(z_loss=1e-4, class_weights=weights),
        "every_option": integer(class_weights=weights, **options),
        "logsumexp": lambda lg: jnp.sum(jaxce.logsumexp(lg)),
    }
    logits = jax.ShapeDtypeStruct((rows, cols), dtype)
    for name, loss in losses.items():
        yield f"{name}, alone", jax.jit(loss).lower(logits)
        yield f"{name}, value_and_grad", jax.jit(jax.value_and_grad(loss)).lower(logits)
    # The soft-label loss's fused pass: the loss alone, and the forward pass of value_and_grad
    # for float32 and float64 (bfloat16's keeps its row chunks, of whole rows:
    # _cross_entropy._soft_rows_and_exponentials).
    soft = lambda lg: jaxce.softmax_cross_entropy(lg, targets, reduction="mean")  # noqa: E731
    yield "soft_labels, alone", jax.jit(soft).lower(logits)
    if dtype != jnp.bfloat16:
        yield "soft_labels, value_and_grad", jax.jit(jax.value_and_grad(soft)).lower(logits)
    # Without the derivative: the reverse-mode rules of log_softmax and softmax sum the
    # cotangent over whole rows (``_softmax``), which in sub-rows took 1.7-3x the time.
    for name, fn in (("log_softmax", jaxce.log_softmax), ("softmax", jaxce.softmax)):
        yield f"{name}, alone", jax.jit(lambda lg, fn=fn: jnp.sum(fn(lg)[:, :3])).lower(logits)


LONG_ROWS = {  # dtype: the longest row XLA's CPU compiler reduces at full speed
    jnp.float32: 32768,
    jnp.bfloat16: 32768,
    jnp.float64: 16384,
}


@ON_CPU
@pytest.mark.parametrize("dtype", list(LONG_ROWS), ids=lambda d: jnp.dtype(d).name)
def test_long_rows_are_reduced_in_sub_rows_on_cpu(monkeypatch, dtype):
    limit = LONG_ROWS[dtype]
    cols = 4 * limit
    if not _xla.cpu_fuses_whole_rows():  # an older XLA: every row length is reduced alike
        assert _xla.row_blocks(cols, dtype) == 1
        return
    assert _xla.row_blocks(limit, dtype) == 1 and _xla.row_blocks(cols, dtype) == 4
    prime = next(n for n in range(limit + 1, 2 * limit) if all(n % d for d in range(2, n)))
    # no sub-rows of at least 128 entries
    assert _xla.row_blocks(prime, dtype) == _xla.row_blocks(2 * prime, dtype) == 1
    assert _xla.row_blocks(50257, dtype) == 29  # GPT-2's vocabulary: 29 sub-rows of 1733
    for name, program in _long_row_programs(dtype, cols):
        text = program.compile().as_text()
        assert _longest_reduction(text) <= limit, name
        if name in ("plain, value_and_grad", "soft_cap, value_and_grad") and dtype != jnp.bfloat16:
            # the gradient still takes the kept exponentials' buffer, kept at any size
            assert _temp_bytes(program) <= 2**16, f"{_temp_bytes(program) / 2**20:.2f} MiB"
    # Without sub-rows, whole rows: every program on jaxlib 0.10.2, and some of them on newer
    # ones, whose XLA splits some long reductions itself (the soft-label loss alone on 0.12).
    monkeypatch.setattr(_xla, "row_blocks", lambda num_classes, dtype: 1)
    longest = {
        name: _longest_reduction(program.compile().as_text())
        for name, program in _long_row_programs(dtype, cols)
    }
    assert longest["plain, alone"] == longest["plain, value_and_grad"] == cols, longest


# ----------------------------------------------------------------------------------------------
# The soft-label loss alone without options: on CPU (jaxlib 0.10.2 on) float32, bfloat16 and
# float64 logits take one fused pass (_cross_entropy._fusible_soft_rows) that keeps only per-row
# numbers; float16 keeps its row chunks. Below 4096 rows (_xla.CPU_WHOLE_PASS_ROWS), where XLA
# splits the pass into two fusions, its two shifts and its barrier are what keep an [N, C]
# broadcast or float32 copy out of it (without them: 4-64 MiB here; _xla.unshared); from 4096
# rows on, one fusion, its two sums share the differences x - shift.
@pytest.mark.parametrize("rows", [1024, 2048, 4096, 8192])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64, jnp.float16])
def test_the_soft_label_loss_alone_reads_whole_rows_on_cpu(monkeypatch, dtype, rows):
    from jaxce import _cross_entropy

    monkeypatch.setattr(_xla, "backend", lambda: "cpu")
    fused = _xla.cpu_fuses_whole_rows() and dtype != jnp.float16
    shapes = (jax.ShapeDtypeStruct((rows, V), dtype),) * 2
    program = jax.jit(jaxce.softmax_cross_entropy).lower(*shapes)
    jaxpr = str(jax.make_jaxpr(jaxce.softmax_cross_entropy)(*shapes))
    assert ("custom_vmap" in jaxpr) == fused  # the fused pass (_cross_entropy._plain_soft_loss)
    if jax.default_backend() != "cpu" or not fused:
        return

    def loss(x, y):
        sub, x, y = _cross_entropy._in_sub_rows(x, y)
        return _cross_entropy._fusible_soft_rows(
            x, y, _cross_entropy._row_sums(x, y, sub), sub, alone=True
        ).loss

    one_pass = _temp_bytes(jax.jit(loss).lower(*shapes))
    assert one_pass <= PER_ROW * rows, f"{one_pass / 2**20:.2f} MiB"
    # The compiled program also holds the branch taken when a row comes out NaN, the exact
    # rows, over whole rows too (_cross_entropy._fusible_exact_soft_rows): no loop over row
    # chunks, whose compilation took 0.2-0.3 s, and no boolean reduction to choose it (its XLA
    # CPU kernels took as long again to compile).
    assert _temp_bytes(program) <= PER_ROW * rows, f"{_temp_bytes(program) / 2**20:.2f} MiB"
    assert "while" not in program.as_text()
    assert "reduce_or" not in jaxpr


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_soft_label_loss_alone_in_sub_rows_keeps_nothing_of_their_size(monkeypatch, dtype):
    # From 4096 rows (_xla.CPU_WHOLE_PASS_ROWS) the fused pass's two sums share x - shift; in
    # sub-rows too (rows of more than _xla.CPU_ROW_BYTES) XLA keeps it in the fusion.
    if not _xla.cpu_fuses_whole_rows():  # an older XLA: row chunks, no sub-rows, no fused pass
        pytest.skip("the fused pass and sub-rows are taken on CPU from jaxlib 0.10.2 on")
    monkeypatch.setattr(_xla, "backend", lambda: "cpu")
    rows, cols = 4096, 2 * LONG_ROWS[dtype]
    shapes = (jax.ShapeDtypeStruct((rows, cols), dtype),) * 2
    assert _xla.row_blocks(cols, dtype) == 2 and _xla.fuses_soft_pass_whole(rows)
    program = jax.jit(jaxce.softmax_cross_entropy).lower(*shapes)
    assert _temp_bytes(program) <= PER_ROW * rows, f"{_temp_bytes(program) / 2**20:.2f} MiB"


# ------------------------------------------------------------------ calls outside jax.jit
def _eager_cases():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(512, 1000)), jnp.float32)  # 2 row chunks of 1 MiB on CPU
    p = jax.nn.softmax(z)
    y = jnp.asarray(rng.integers(0, 1000, 512), jnp.int32)
    x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(32, 5000)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 5000, 64), jnp.int32)
    ce = jaxce.softmax_cross_entropy_with_integer_labels
    every = {"label_smoothing": 0.1, "z_loss": 1e-4, "logit_soft_cap": 5.0}
    return {
        "logsumexp": lambda: jaxce.logsumexp(z),
        "log_softmax bfloat16": lambda: jaxce.log_softmax(z.astype(jnp.bfloat16)),
        "integer labels, every option": lambda: ce(z, y, **every),
        "its gradient": lambda: jax.grad(lambda z: ce(z, y, reduction="mean", **every))(z),
        # On CPU, as if every class were admissible, then exactly for a batch with a -inf logit
        "smoothing": lambda: ce(z, y, label_smoothing=0.1),
        "smoothing, a -inf logit": lambda: ce(z.at[3, 4].set(-jnp.inf), y, label_smoothing=0.1),
        "smoothing's gradient": lambda: jax.grad(
            lambda z: ce(z, y, reduction="mean", label_smoothing=0.1)
        )(z),
        "soft labels": lambda: jaxce.softmax_cross_entropy(z, p),
        "their gradient": lambda: jax.grad(lambda z: jaxce.softmax_cross_entropy(z, p).sum())(z),
        "kl_divergence": lambda: jaxce.kl_divergence(jaxce.log_softmax(z), p),
        "entropy": lambda: jaxce.entropy(p),
        "sigmoid BCE": lambda: jaxce.sigmoid_binary_cross_entropy(z, p, reduction="mean"),
        "softmax focal": lambda: jaxce.softmax_focal_loss(z, y),
        "fused": lambda: jaxce.linear_softmax_cross_entropy(x, w, tokens, reduction="mean"),
        "fused gradient": lambda: jax.grad(
            lambda w: jaxce.linear_softmax_cross_entropy(x, w, tokens, reduction="mean")
        )(w),
    }


@pytest.mark.parametrize("name", list(_eager_cases()))
def test_calls_outside_jit_compile_nothing_again(name):
    """Called again with the same shapes outside ``jax.jit`` (a notebook, an evaluation loop), a
    function compiles nothing: a loop or branch compiled as a program of its own would be
    compiled at every call (its body is a new closure each time) and kept by JAX's caches, 2 MB
    more memory a call at [512, 1000] (``_xla.staged``)."""
    call = _eager_cases()[name]
    jax.block_until_ready(call())  # compiles each operation once
    with counted() as counter:
        for _ in range(2):
            jax.block_until_ready(call())
    assert counter.count == 0, f"{name}: {counter.count} programs compiled again in 2 calls"
