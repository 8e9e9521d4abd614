"""Property-based tests of every public loss and primitive.

Inputs are drawn over shapes (size-1 and empty dimensions, several class axes), the dtypes
float16, bfloat16, float32 and float64, magnitudes from 1e-30 to the dtype's largest number,
rows far from zero (every logit near 1e8, -1e30 or the dtype's limit), -inf logits, masks,
ignored labels and every option. The properties:

* agreement with the float64 references of ``_reference.py`` (and ``scipy.special``), evaluated
  on the inputs as given, to a bound in units of the dtype's epsilon (the metric of
  ``_precision.py``; at offsets far from zero the reference is evaluated on logits shifted by
  their row max, where it is exact);
* finite values and gradients for every finite input whose true result is representable,
  NaN only in the example that holds a NaN (an ignored example or a masked class holding a NaN
  changes nothing);
* invariances: a shift of the logits, sum of ``"none"`` = ``"sum"``, ``"mean"`` = sum / counted
  weight, one-hot soft labels = integer labels (with smoothing and class weights), sigmoid BCE =
  two-class softmax CE on ``[0, x]``, focal with ``gamma=0`` = CE, a permutation of the classes,
  ``vmap`` = a loop, any class axis = the last axis, fused = unfused.

The softmax functions take other code paths where an input is large: chunks of rows with their
tail, and exponentials computed again in the backward pass instead of kept. Their tests run on
the path the library picks at these small shapes and on that one, forced (``_paths.py``).

Two hypothesis profiles are registered in ``conftest.py``: ``ci``, the default (derandomized, a
few dozen examples per test), and ``thorough`` (many random examples), run by hand with::

    pytest -p no:xdist --hypothesis-profile=thorough tests/test_properties.py
    HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py   # the same

The worst errors are checked against the table of ``docs/precision.md``;
``python tests/_precision.py`` measures the table again with the thorough profile.

Compilation dominates the run time, so each test draws its shapes from a short list and calls
module-level jitted functions whose static arguments are the option structure only: the
hyperparameters are traced, and an example reuses an earlier compilation whenever it can.
"""

from __future__ import annotations

import decimal
import functools
import math
import os
from unittest import mock

import _paths
import _precision as P
import _reference as R
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.sharding import AxisType

import jaxce
import jaxce.sharded
from jaxce import _cross_entropy, _xla

F64 = np.float64
DTYPES = P.DTYPES
CE = jaxce.softmax_cross_entropy_with_integer_labels
IGNORE = -1  # the ignore_index of every loss with options


def _settings(weight: float):
    """The loaded profile's example count scaled by ``weight`` (tests differ in cost)."""
    n = max(1, round(settings.default.max_examples * weight))
    return settings(
        max_examples=n,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(autouse=True)
def _quiet_float64():
    """The references overflow to inf, and form 0 * inf, on purpose at the dtypes' limits."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        yield


@pytest.fixture(scope="module", autouse=True)
def _write_measurements():
    """In a measuring run (``python tests/_precision.py``) writes the worst errors at the end."""
    yield
    path = os.environ.get(P.OUT_ENV)
    if path:
        assert "PYTEST_XDIST_WORKER" not in os.environ, "measure in one process (-p no:xdist)"
        P.RECORDER.dump(path)


# ------------------------------------------------------------------------------- inputs
MAX_EXPONENT = {"float16": 4, "bfloat16": 38, "float32": 38, "float64": 308}
OFFSETS = {
    "float16": (-6.5e4, -3e4, -1e3, 1e3, 3e4, 6.5e4),
    "bfloat16": (-3e38, -1e30, -1e8, 1e8, 1e30, 3e38),
    "float32": (-3e38, -1e30, -1e8, 1e8, 1e30, 3e38),
    "float64": (-1e300, -1e30, -1e8, 1e8, 1e30, 1e300),
}


def cdtype(dtype: str):
    """The dtype jaxce computes in (and returns losses in) for inputs of ``dtype``."""
    return jnp.dtype(P.compute_dtype(dtype))


def cast(x, dtype) -> np.ndarray:
    """float64 values clipped to the range of ``dtype`` and rounded to it. Numbers that are
    subnormal in the dtype jaxce computes in become 0: XLA flushes them to zero on CPU."""
    top = float(P.finfo(dtype).max)
    tiny = float(P.finfo(P.compute_dtype(dtype)).smallest_normal)
    with np.errstate(invalid="ignore"):
        x = np.clip(np.asarray(x, F64), -top, top).astype(jnp.dtype(dtype))
    return np.where(np.abs(x.astype(F64)) < tiny, 0, x).astype(jnp.dtype(dtype))


def reals(low, high):
    """Floats in [low, high] with magnitudes below 1e-3 replaced by 0: the values are scaled by
    powers of ten elsewhere, and hypothesis would otherwise spend its time near 1e-300."""
    return st.floats(low, high).map(lambda v: 0.0 if abs(v) < 1e-3 else v)


@st.composite
def values(
    draw, rows, cols, dtype, *, low=-30, high=None, offsets=True, neg_inf=False, nonneg=False
):
    """A ``[rows, cols]`` array of ``dtype``. Row ``i`` is ``o_i + 10**k_i * u_i`` with ``u_i``
    in [-1, 1]: ``k_i`` between ``low`` and ``high`` (default the dtype's largest exponent),
    often near 0, and ``o_i`` 0 or (with ``offsets``) one of :data:`OFFSETS`. With ``neg_inf``
    some entries are -inf."""
    high = MAX_EXPONENT[dtype] if high is None else high
    exponent = st.one_of(st.integers(-1, 1), st.integers(low, high))
    k = draw(hnp.arrays(np.int64, (rows,), elements=exponent))
    offset_index = st.one_of(st.just(-1), st.integers(0, 5)) if offsets else st.just(-1)
    which = draw(hnp.arrays(np.int64, (rows,), elements=offset_index))
    u = draw(hnp.arrays(F64, (rows, cols), elements=reals(-1, 1)))
    if nonneg:
        u = np.abs(u)
    offset = np.where(which >= 0, np.asarray(OFFSETS[dtype])[np.maximum(which, 0)], 0.0)
    if nonneg:
        offset = np.abs(offset)
    scale = 10.0 ** k.astype(F64)
    scale[k == MAX_EXPONENT[dtype]] = float(P.finfo(dtype).max)  # up to the limit itself
    x = cast(offset[:, None] + scale[:, None] * u, dtype)
    if neg_inf and rows * cols and draw(st.booleans()):
        holes = draw(hnp.arrays(np.int8, (rows, cols), elements=st.integers(0, 5))) == 0
        x[holes] = -np.inf
    return x


def booleans(draw, shape, *, rate=4):
    """A boolean array of ``shape``, mostly True (one in ``rate`` False), or all True."""
    if not math.prod(shape) or draw(st.booleans()):
        return np.ones(shape, bool)
    return draw(hnp.arrays(np.int8, shape, elements=st.integers(0, rate - 1))) != 0


def class_weights(draw, n, dtype):
    some = st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0]) | reals(0, 10)
    return cast(draw(hnp.arrays(F64, (n,), elements=some)), cdtype(dtype))


def cotangent(draw, shape, dtype):
    return cast(draw(hnp.arrays(F64, shape, elements=reals(-2, 2))), dtype)


def scalar(draw, strategy, dtype, label):
    """A hyperparameter drawn from ``strategy`` as a 0-d array of the compute dtype."""
    return cast(np.asarray(draw(strategy, label)), cdtype(dtype))


def probabilities(draw, rows, cols, dtype, *, normalised=None):
    """Rows of probabilities in [0, 1] of ``dtype``: normalised distributions (sharp ones
    included) or unnormalised values, zeros and ones included. Subnormal numbers of the compute
    dtype are flushed to 0 (jaxce floors ``log p`` at the smallest normal number)."""
    x = values(rows, cols, dtype, low=-30, offsets=False, nonneg=True)
    p = np.minimum(draw(x).astype(F64), 1.0)
    if normalised is None:
        normalised = draw(st.booleans())
    if normalised and cols:
        total = p.sum(-1, keepdims=True)
        p = np.where(total > 0, p / np.where(total > 0, total, 1), 1.0 / cols)
    p = cast(p, dtype).astype(F64)
    tiny = float(P.finfo(P.compute_dtype(dtype)).smallest_normal)
    p[p < tiny] = 0.0
    return cast(p, dtype)


def batch_rows(shape, axis=-1):
    """``(rows, classes)`` of a ``shape`` whose class axis is ``axis``."""
    classes = shape[axis]
    return math.prod(shape) // classes if classes else math.prod(shape[:axis]), classes


def same(a, b) -> bool:
    """Bitwise equality of two arrays, NaN included."""
    return np.array_equal(P.to_f64(a), P.to_f64(b), equal_nan=True)


def rounded_alike(dtype):
    """``same`` but for a few units in the last place of ``dtype`` or of its compute dtype,
    whichever is larger, relative to the largest finite magnitude of the second array: NaN
    where the second has one, and infinities, still exactly."""
    unit = max(float(P.finfo(dtype).eps), float(P.finfo(P.compute_dtype(dtype)).eps))

    def alike(a, b) -> bool:
        a, b = P.to_f64(a), P.to_f64(b)
        finite = np.isfinite(b)
        if not np.array_equal(finite, np.isfinite(a)) or not same(a[~finite], b[~finite]):
            return False
        size = np.max(np.abs(b[finite]), initial=0.0)
        return bool(np.all(np.abs(a[finite] - b[finite]) <= 8 * unit * size))

    return alike


def nan_probe(draw, run, arrays, which, expect_nan):
    """Puts a NaN into ``arrays[which]`` (``[rows, cols]``) at a drawn place ``(r, c)``.
    ``run(arrays)`` gives a tuple of float64 results with the rows first: every row but ``r``
    must stay as it was, and row ``r`` of the first result must be NaN if
    ``expect_nan(r, c)``, else unchanged."""
    rows, cols = arrays[which].shape
    if not rows * cols or not draw(st.booleans(), "probe NaN"):
        return
    r = draw(st.integers(0, rows - 1), "NaN row")
    c = draw(st.integers(0, cols - 1), "NaN column")
    before = run(arrays)
    bad = list(arrays)
    bad[which] = arrays[which].copy()
    bad[which][r, c] = np.nan
    after = run(bad)
    others = np.arange(rows) != r
    for b, a in zip(before, after, strict=True):
        assert same(b[others], a[others])
    if expect_nan(r, c):
        assert np.all(np.isnan(after[0][r]))
    else:
        assert same(before[0][r], after[0][r])


# ------------------------------------------------------------------------- float64 maths
def row_stats(z, adm):
    """Per row of ``z`` restricted to ``adm``: max ``m`` (0 for an empty row), ``log_sum`` (0
    for an empty row), ``log p`` (-inf off ``adm``), ``p`` and the count ``K``."""
    k = adm.sum(-1)
    m = np.where(adm, z, -np.inf).max(-1, initial=-np.inf)
    m = np.where(k > 0, m, 0.0)
    with np.errstate(invalid="ignore"):
        gap = np.where(adm, m[..., None] - np.where(adm, z, 0.0), np.inf)  # m - z >= 0
    log_sum = np.where(k > 0, np.log(np.maximum(np.exp(-gap).sum(-1), 1e-300)), 0.0)
    log_p = np.where(adm, -gap - log_sum[..., None], -np.inf)
    return m, log_sum, log_p, np.exp(log_p), k


def half_gap(m, log_sum, z):
    """``(lse - z) / 2`` as ``(m / 2 - z / 2) + log_sum / 2``, as jaxce forms it (_rows,
    "Range"): no half overflows where ``m - z`` alone does (a logit of -1.7e308 in a row whose
    max is 1.7e308)."""
    return (m / 2 - z / 2) + log_sum / 2


def capped(x, cap):
    if cap is None:
        return x
    with np.errstate(invalid="ignore"):
        return np.where(np.isneginf(x), -np.inf, cap * np.tanh(x / cap))


def times(a, b):
    """``a * b`` with ``0 * inf = 0`` (a term with a zero coefficient is absent)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(a == 0, 0.0, a * b)


def underflow(p, dtype):
    """Where ``p`` is below the smallest normal number of the compute dtype it may be flushed
    to 0 (XLA on CPU): an absolute error of that much per unit of what multiplies it, as a
    scale in units of ``dtype``'s epsilon (0 elsewhere)."""
    tiny = float(P.finfo(P.compute_dtype(dtype)).smallest_normal)
    return np.where(p < tiny, tiny / float(P.finfo(dtype).eps), 0.0)


def gather(a, index):
    return np.take_along_axis(a, index[..., None], axis=-1)[..., 0]


def xlogx_scale(lp):
    """``|log p| + 1``, with 0 where ``log p`` is -inf."""
    return np.where(np.isneginf(lp), 0.0, np.abs(lp) + 1)


# =========================================================================== primitives
# The softmax losses take other code paths at large sizes (chunks of rows, the exponentials
# computed again; on CPU, long rows reduced in sub-rows): the tests of the functions that take
# them run on each, at small shapes.
PATHS = [_paths.PICKED, _paths.ROW_CHUNKS, _paths.SUB_ROWS]
PATH_IDS = ["picked", "row chunks", "sub-rows"]


@functools.partial(jax.jit, static_argnames=("masked", "path"))
def _primitives(x, where, ct_lse, ct_sm, ct_lsm, masked, path=_paths.PICKED):
    where = where if masked else None
    with _paths.taken(path):
        lsm, lsm_pull = jax.vjp(lambda v: jaxce.log_softmax(v, where=where), x)
        sm, sm_pull = jax.vjp(lambda v: jaxce.softmax(v, where=where), x)
        lse, lse_pull = jax.vjp(lambda v: jaxce.logsumexp(v, where=where), x)
        return lsm, sm, lse, lsm_pull(ct_lsm)[0], sm_pull(ct_sm)[0], lse_pull(ct_lse)[0]


PRIMITIVE_SHAPES = ((6, 5), (2, 3, 4), (4, 1), (0, 3))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@_settings(1.0)
@given(data=st.data())
def test_log_softmax_softmax_logsumexp(data, path):
    """Values and gradients of the three primitives, in the input's dtype."""
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    shape = draw(st.sampled_from(PRIMITIVE_SHAPES), "shape")
    masked = draw(st.booleans(), "masked")
    rows, cols = batch_rows(shape)
    x = draw(values(rows, cols, dtype, neg_inf=True), "x")
    where = data.draw(st.composite(lambda d: booleans(d, (rows, cols)))(), "where")
    cts = [cotangent(draw, s, dtype) for s in ((rows,), (rows, cols), (rows, cols))]
    args = (x.reshape(shape), where.reshape(shape), cts[0].reshape(shape[:-1]))
    args += (cts[1].reshape(shape), cts[2].reshape(shape))
    out = _primitives(*(jnp.asarray(a) for a in args), masked=masked, path=path)
    lsm, sm, lse, g_lsm, g_sm, g_lse = (
        P.to_f64(o).reshape((rows,) if o.ndim < len(shape) else (rows, cols)) for o in out
    )
    for o in out:
        assert o.dtype == jnp.dtype(dtype)

    x64 = x.astype(F64)
    adm = (where if masked else True) & (x64 > -np.inf)
    m, log_sum, log_p, p, k = row_stats(x64, adm)
    # The reference on logits shifted by their max: exact however far they are from zero.
    mask = where if masked else None
    shifted = np.where(adm, x64 - m[:, None], -np.inf)
    want_lsm = R.log_softmax(shifted, where=mask)
    want_sm = R.softmax(shifted, where=mask)
    want_lse = m + R.logsumexp(shifted, where=mask)
    want_lse = np.where(k > 0, want_lse, -np.inf)
    u = dict(unit_dtype=dtype)
    P.compare("log_softmax", dtype, lsm, want_lsm, np.abs(want_lsm) + 1, **u)
    P.compare("softmax", dtype, sm, want_sm, want_sm * xlogx_scale(log_p), **u)
    P.compare("logsumexp", dtype, lse, want_lse, np.abs(m) + log_sum + 1, **u)

    # Gradients: lse' = p, softmax' = p (g - <g, p>), log_softmax' = g - p sum(g).
    ct_lse, ct_sm, ct_lsm = (c.astype(F64) for c in cts)
    term = p * xlogx_scale(log_p) + underflow(p, dtype)
    P.compare(
        "logsumexp (gradient)",
        dtype,
        g_lse,
        ct_lse[:, None] * p,
        np.abs(ct_lse)[:, None] * term,
        **u,
    )
    inner = (ct_sm * p).sum(-1, keepdims=True)
    spread = (np.abs(ct_sm) * term).sum(-1, keepdims=True)
    P.compare(
        "softmax (gradient)",
        dtype,
        g_sm,
        np.where(adm, p * (ct_sm - inner), 0.0),
        term * (np.abs(ct_sm) + spread),
        **u,
    )
    # log_softmax_i = x_i - lse depends on x unless i is masked by `where`, -inf entries too
    live = where if masked else np.ones_like(where)
    ct_live = np.where(live, ct_lsm, 0.0)
    total = ct_live.sum(-1, keepdims=True)
    P.compare(
        "log_softmax (gradient)",
        dtype,
        g_lsm,
        ct_live - p * total,
        np.abs(ct_live) + term * np.abs(ct_live).sum(-1, keepdims=True),
        **u,
    )

    # A NaN among a row's admissible entries makes that row NaN and nothing else; a NaN in a
    # masked entry changes nothing.
    if rows and draw(st.booleans(), "probe NaN"):
        r = draw(st.integers(0, rows - 1), "NaN row")
        c = draw(st.integers(0, cols - 1), "NaN column")
        bad = x.copy()
        bad[r, c] = np.nan
        args2 = (bad.reshape(shape),) + args[1:]
        out2 = _primitives(*(jnp.asarray(a) for a in args2), masked=masked, path=path)
        lsm2, sm2, lse2 = (
            P.to_f64(o).reshape(b.shape) for o, b in zip(out2[:3], (lsm, sm, lse), strict=True)
        )
        others = np.arange(rows) != r
        live = where[r] if masked else np.ones(cols, bool)  # masked entries stay -inf, 0
        for before, after in ((lsm, lsm2), (sm, sm2), (lse, lse2)):
            assert same(before[others], after[others])
            if not live[c]:
                assert same(before[r], after[r])
            elif after.ndim == 1:
                assert np.isnan(after[r])
            else:
                assert np.all(np.isnan(after[r][live])) and same(before[r][~live], after[r][~live])


# ---------------------------------------------------------------------- sigmoid family
@jax.jit
def _sigmoids(x, cap, ct):
    s, s_pull = jax.vjp(jaxce.sigmoid, x)
    ls, ls_pull = jax.vjp(jaxce.log_sigmoid, x)
    c, c_pull = jax.vjp(jaxce.logit_soft_cap, x, cap)  # the cap traced, as a schedule's
    g_c, g_cap = c_pull(ct)
    return s, ls, c, s_pull(ct)[0], ls_pull(ct)[0], g_c, g_cap


# Caps of every size: a few units to 1e4, 1e15, the largest accepted (2**64, where x / cap
# underflows for x below 2e-19), and inf, "no cap", traced.
CAPS = st.sampled_from([0.5, 5.0, 30.0, 1e4, 1e15, 2.0**64, math.inf]) | st.floats(0.01, 1e4)


def soft_cap_reference(x64, cap):
    """``cap tanh(x / cap)`` and its derivatives in ``x`` and ``cap`` in float64 (``u = x / cap``
    is normal there for every cap the tests draw), with their limits at infinite ``x`` and the
    identity for an infinite cap."""
    if math.isinf(cap):
        return x64, np.ones_like(x64), np.zeros_like(x64)
    with np.errstate(invalid="ignore", over="ignore"):
        u = x64 / cap
        t = np.tanh(u)
        # 1 / cosh^2, not 1 - tanh^2, which cancels as tanh nears +-1 (0 from |u| = 19 on)
        d_x = 1 / np.cosh(u) ** 2
        d_cap = np.where(np.isinf(u), np.sign(u), t - u * d_x)
    return (
        np.where(np.isneginf(x64), -np.inf, cap * t),
        d_x,
        np.where(np.isneginf(x64), 0.0, d_cap),
    )


ELEMENTWISE_SHAPES = ((12,), (3, 4), (), (0,))


@_settings(0.7)
@given(data=st.data())
def test_sigmoid_log_sigmoid_soft_cap(data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    shape = draw(st.sampled_from(ELEMENTWISE_SHAPES), "shape")
    n = math.prod(shape)
    x = draw(values(n, 1, dtype), "x").reshape(shape)
    cap = draw(CAPS, "cap")
    if math.isfinite(cap) and draw(st.booleans(), "logits of the cap's size"):
        # Where the cap bends them: a cap whose reciprocal XLA flushed to 0 (above 2**126 in
        # float32, now refused) left such logits uncapped.
        u = draw(hnp.arrays(F64, shape, elements=reals(-40, 40)), "x / cap")
        big = float(P.finfo(dtype).max)
        x = cast(np.clip(u * cap, -big, big), dtype)
    ct = cotangent(draw, shape, dtype)
    cap_arg = jnp.asarray(cap, cdtype(dtype))
    out = _sigmoids(jnp.asarray(x), cap_arg, jnp.asarray(ct))
    for o in out[:-1]:
        assert o.dtype == jnp.dtype(dtype) and o.shape == shape
    s, ls, c, g_s, g_ls, g_c, g_cap = (P.to_f64(o) for o in out)
    x64, ct64 = x.astype(F64), ct.astype(F64)
    cap = float(np.asarray(cap_arg).astype(F64))  # the cap as the library sees it
    u = dict(unit_dtype=dtype)
    want_s, want_ls = scipy.special.expit(x64), scipy.special.log_expit(x64)
    P.compare("sigmoid", dtype, s, want_s, np.abs(want_s), **u)
    P.compare("log_sigmoid", dtype, ls, want_ls, np.abs(want_ls), **u)
    want_c, d_x, d_cap = soft_cap_reference(x64, cap)
    P.compare("logit_soft_cap", dtype, c, want_c, np.abs(want_c), **u)
    q = scipy.special.expit(-x64)
    want = ct64 * want_s * q
    P.compare("sigmoid (gradient)", dtype, g_s, want, np.abs(want), **u)
    P.compare("log_sigmoid (gradient)", dtype, g_ls, ct64 * q, np.abs(ct64 * q), **u)
    # 1 - tanh(u)^2 to a few roundings relative to itself, deep in saturation too, beside the
    # rounding of u = x / cap, which it multiplies by 2 |u| tanh(u)
    with np.errstate(invalid="ignore", over="ignore"):
        g_size = np.abs(ct64) * d_x * (1 + 2 * np.abs(x64 / cap))
    g_size = np.where(np.isfinite(g_size), g_size, 0.0)
    P.compare("logit_soft_cap (gradient)", dtype, g_c, ct64 * d_x, g_size, **u)
    # d/dcap = tanh(u) - u (1 - tanh(u)^2), summed over the entries: terms of size |tanh(u)|
    # and |u| (1 - tanh(u)^2) each, with the rounding of u = x / cap itself (as large as u)
    with np.errstate(invalid="ignore", over="ignore"):
        size = np.abs(np.tanh(x64 / cap)) + 2 * np.abs(x64 / cap) * d_x
    size = np.where(np.isfinite(size), size, 1.0)
    P.compare(
        "logit_soft_cap (cap gradient)",
        dtype,
        g_cap,
        np.sum(ct64 * d_cap),
        np.sum(np.abs(ct64) * size),
        unit_dtype=cdtype(dtype),
    )
    if n and draw(st.booleans(), "probe NaN"):
        i = draw(st.integers(0, n - 1), "NaN index")
        bad = x.copy().reshape(-1)
        bad[i] = np.nan
        out2 = _sigmoids(jnp.asarray(bad.reshape(shape)), cap_arg, jnp.asarray(ct))
        others = np.arange(n) != i
        assert np.isnan(P.to_f64(out2[-1]))  # the cap's gradient sums over every entry
        for before, after in zip(out[:-1], out2[:-1], strict=True):
            before, after = P.to_f64(before).reshape(-1), P.to_f64(after).reshape(-1)
            assert np.isnan(after[i]) and same(before[others], after[others])


@jax.jit
def _second_derivatives(x, u, cap):
    """The second derivatives of sigmoid and log_sigmoid at ``x``, and of the soft cap at
    ``u * cap`` in ``x``, in ``x`` and ``cap`` and in ``cap``, elementwise."""

    def second(f, argnums=0):
        return jax.vmap(jax.grad(jax.grad(f), argnums=argnums), (0, None))

    xc = u * cap  # exact: the caps are powers of two
    return (
        jax.vmap(jax.grad(jax.grad(jaxce.sigmoid)))(x),
        jax.vmap(jax.grad(jax.grad(jaxce.log_sigmoid)))(x),
        second(jaxce.logit_soft_cap)(xc, cap),
        second(jaxce.logit_soft_cap, 1)(xc, cap),
        jax.vmap(jax.grad(jax.grad(jaxce.logit_soft_cap, 1), 1), (0, None))(xc, cap),
    )


def _second_derivatives_reference(x: float, u: float, cap: float) -> list[float]:
    """The five of :func:`_second_derivatives` in 60-digit decimal arithmetic: ``s (1 - s)
    (1 - 2 s)``, ``-s (1 - s)`` (``s = sigmoid(x)``), ``-2 tanh(u) / cosh(u)**2 / cap``, and
    ``-u`` and ``u**2`` times that."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        d = decimal.Decimal(x)
        s = 1 / (1 + (-d).exp())
        return [
            float(s * (1 - s) * (1 - 2 * s)),
            float(-s * (1 - s)),
            *R.logit_soft_cap_second_derivatives(u, cap),
        ]


def _magnitudes(n: int, top: int):
    """``n`` floats ``+-m 2**k``, ``m`` in [1, 2), ``k`` from -60 to ``top``: tiny ones too."""
    return st.lists(
        st.tuples(
            st.sampled_from([-1.0, 1.0]), st.floats(1, 2, exclude_max=True), st.integers(-60, top)
        ),
        min_size=n,
        max_size=n,
    ).map(lambda v: np.array([sign * m * 2.0**k for sign, m, k in v]))


@_settings(0.5)
@given(data=st.data())
def test_second_derivatives_of_the_elementwise_functions(data):
    """Each second derivative to a few roundings of itself at every magnitude, near 0 too,
    where the first derivatives' forms, differentiated as written, subtract two terms that
    cancel (``sigmoid(x) sigmoid(-x)``: two of about 1/8 where the result is about ``-x / 8``;
    the soft cap's ``4 e / (1 + e)**2``: two of about 2 where it is about ``-2 u``), and at
    caps up to ``2**64``, where autodiff's derivative of ``u = x / cap`` in the cap,
    ``-x * cap**-2``, flushed a float32 cotangent times ``cap**-2`` to 0 (at every ``u`` from a
    cap of ``2**63`` on). The inputs and ``u = x / cap`` are exact."""
    dtype = data.draw(st.sampled_from(["float32", "float64"]), "dtype")
    cap = data.draw(st.sampled_from([2.0**-60, 0.5, 1.0, 32.0, 1024.0, 2.0**63, 2.0**64]), "cap")
    x = data.draw(_magnitudes(8, 5), "x").astype(dtype)  # |x| < 64: sigmoid's tail is normal
    u = data.draw(_magnitudes(8, 5), "u").astype(dtype)  # |u| < 64: the cap's tail too
    got = _second_derivatives(jnp.asarray(x), jnp.asarray(u), jnp.asarray(cap, dtype))
    want = np.array(
        [_second_derivatives_reference(float(a), float(b), cap) for a, b in zip(x, u, strict=True)]
    )
    names = [
        "sigmoid''",
        "log_sigmoid''",
        "logit_soft_cap d2/dx2",
        "logit_soft_cap d2/dx dcap",
        "logit_soft_cap d2/dcap2",
    ]
    eps, tiny = float(np.finfo(dtype).eps), float(np.finfo(dtype).smallest_normal)
    for name, g, w in zip(names, got, want.T, strict=True):
        g = np.asarray(g, F64)
        where = f"{name} ({dtype}) at {x if 'sig' in name else u}"
        # a result near or below the smallest normal number (the mixed derivative, 2 u**2 / cap
        # near 0) is flushed or rounded to it: within it, not relative to itself
        small = np.abs(w) < 16 * tiny
        assert np.all(np.abs(g[small]) <= 16 * tiny), where
        err = np.abs(g - w)[~small] / (np.abs(w[~small]) * eps)
        assert np.all(err <= 8), f"{err.max():.3g} epsilons: {where}"


@jax.jit
def _binary_slopes(x, t, pos_weight, gamma):
    """d/dx of the sigmoid BCE (with ``pos_weight``) and of the sigmoid focal loss, elementwise."""
    bce = jax.grad(lambda v: jaxce.sigmoid_binary_cross_entropy(v, t, pos_weight=pos_weight).sum())
    focal = jax.grad(lambda v: jaxce.sigmoid_focal_loss(v, t, alpha=0.25, gamma=gamma).sum())
    return bce(x), focal(x)


@_settings(0.5)
@given(data=st.data())
def test_binary_logit_derivatives_of_confident_predictions(data):
    """The logit derivatives of the sigmoid BCE and the sigmoid focal loss at hard labels, to a
    few roundings of themselves at every logit whose derivative is a normal number, confident
    ones included: ``sigmoid(x) - t`` cancels as ``sigmoid(x)`` nears 1 (0 from x = 17 on in
    float32, where the derivative is ``-sigmoid(-x)``), which the focal loss's ``m**gamma``
    leaves alone in its derivative (33% off from x = 17 on with gamma = 2)."""
    # |x| <= 80: exp(-|x|) is a normal number (XLA flushes it to 0 from 87.4 on)
    x = np.clip(data.draw(_magnitudes(8, 6), "x"), -80, 80).astype(np.float32)
    t = data.draw(hnp.arrays(np.float32, 8, elements=st.sampled_from([0.0, 1.0])), "t")
    # and confident predictions, right and wrong, in every example
    x = np.concatenate([x, np.float32([6.0, 17.0, 30.0, -6.0, -17.0, 6.0, -6.0])])
    t = np.concatenate([t, np.float32([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])])
    pw = data.draw(st.sampled_from([1.0, 3.0, 1e20]), "pos_weight")
    gamma = data.draw(st.sampled_from([0.5, 2.0]), "gamma")
    got = _binary_slopes(jnp.asarray(x), jnp.asarray(t), jnp.float32(pw), jnp.float32(gamma))
    x64, t64 = x.astype(F64), t.astype(F64)
    p, q = scipy.special.expit(x64), scipy.special.expit(-x64)
    want_bce = (1 - t64) * p - pw * t64 * q
    # d/dx of 0.25 q^gamma (-log p) at t = 1 and of 0.75 p^gamma (-log q) at t = 0
    # (p' = p q, q' = -p q)
    log_p, log_q = scipy.special.log_expit(x64), scipy.special.log_expit(-x64)
    want_focal = np.where(
        t64 == 1,
        0.25 * q**gamma * (gamma * p * log_p - q),
        0.75 * p**gamma * (p - gamma * q * log_q),
    )
    eps, tiny = float(np.finfo(np.float32).eps), float(np.finfo(np.float32).smallest_normal)
    for name, g, w in (("sigmoid BCE", got[0], want_bce), ("sigmoid focal", got[1], want_focal)):
        g = np.asarray(g, F64)
        small = np.abs(w) < 16 * tiny  # flushed or rounded to the smallest normal number
        assert np.all(np.abs(g[small]) <= 16 * tiny), f"{name} at {x}"
        err = np.abs(g - w)[~small] / (np.abs(w[~small]) * eps)
        assert np.all(err <= 16), f"{name}: {err.max():.3g} epsilons at {x}, t = {t}"


# ======================================================= cross-entropy, integer labels
@functools.partial(jax.jit, static_argnames=("variant", "path"))
def _ce(x, labels, where, weights, hyper, ct, variant, path=_paths.PICKED):
    """The per-example loss and its pullback of ``ct`` for one option variant: ``plain``
    (defaults), ``options`` (every option but the cap, hyperparameters traced), ``unmasked``
    (those without ``where``, whose smoothing's sums the CPU takes as if every class were
    admissible first: ``_rows.assumes_all_admissible``) or ``capped``;
    on the path the library picks for these shapes (``_paths.PICKED``) or one a large input
    takes (:func:`_paths.taken`)."""
    eps, zl, cap = hyper
    kw = {}
    if variant != "plain":
        kw = dict(
            where=where if variant in WHERE_VARIANTS else None,
            class_weights=weights,
            label_smoothing=eps,
            z_loss=zl,
            ignore_index=IGNORE,
        )
    if variant == "capped":
        kw["logit_soft_cap"] = cap
    with _paths.taken(path):
        loss, pull = jax.vjp(lambda v: CE(v, labels, **kw), x)
        # The loss alone is a program of its own (on CPU whole rows where XLA fuses them).
        return loss, pull(ct)[0], CE(x, labels, **kw)


CE_SHAPES = ((6, 5), (2, 3, 4), (3, 1), (0, 5))
VARIANTS = ("plain", "options", "unmasked", "capped")
# The variants that pass ``where`` (:func:`_ce`): a class masked in a case of another is not.
WHERE_VARIANTS = ("options", "capped")


@st.composite
def ce_cases(draw, shapes=CE_SHAPES, variants=VARIANTS, dtypes=DTYPES):
    """Arguments of :func:`_ce` as numpy arrays, in the ``[rows, C]`` layout."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.sampled_from(shapes))
    variant = draw(st.sampled_from(variants))
    rows, cols = batch_rows(shape)
    plain = variant == "plain"
    x = draw(values(rows, cols, dtype, neg_inf=True))
    low = 0 if plain else IGNORE
    labels = draw(hnp.arrays(np.int32, (rows,), elements=st.integers(low, cols - 1)))
    unmasked = plain or variant == "unmasked"
    where = np.ones((rows, cols), bool) if unmasked else booleans(draw, (rows, cols))
    w = class_weights(draw, cols, dtype)
    hyper = (
        draw(st.sampled_from([0.0, 0.1, 1.0]) | reals(0, 1)),
        draw(st.sampled_from([0.0, 1e-4, 1e-2, 1.0])),
        draw(CAPS.filter(lambda cap: cap >= 0.1)),
    )
    if plain:
        hyper = (0.0, 0.0, 1.0)
        w = np.ones(cols, cdtype(dtype))
    # An infinite cap stays inf ("no cap", traced), not the dtype's largest number, which as a
    # cap is out of range (above 2**64).
    hyper = tuple(
        cast(h, cdtype(dtype)) if math.isfinite(h) else np.asarray(h, cdtype(dtype)) for h in hyper
    )
    ct = cotangent(draw, (rows,), cdtype(dtype))
    return dict(
        dtype=dtype,
        shape=shape,
        variant=variant,
        x=x,
        labels=labels,
        where=where,
        w=w,
        hyper=hyper,
        ct=ct,
    )


def run_ce(case, x=None, with_alone=False, path=_paths.PICKED):
    """:func:`_ce` on a case (``x`` replaces its logits), results as float64 ``[rows, ...]``;
    ``with_alone``: the loss as the pair (with its gradient, alone)."""
    shape, rows = case["shape"], case["x"].shape[0]
    x = case["x"] if x is None else x
    loss, grad, alone = _ce(
        jnp.asarray(x.reshape(shape)),
        jnp.asarray(case["labels"].reshape(shape[:-1])),
        jnp.asarray(case["where"].reshape(shape)),
        jnp.asarray(case["w"]),
        tuple(jnp.asarray(h) for h in case["hyper"]),
        jnp.asarray(case["ct"].reshape(shape[:-1])),
        variant=case["variant"],
        path=path,
    )
    assert loss.dtype == alone.dtype == cdtype(case["dtype"])
    assert grad.dtype == jnp.dtype(case["dtype"])
    if with_alone:
        return (P.to_f64(a).reshape(rows) for a in (loss, alone)), P.to_f64(grad).reshape(x.shape)
    return P.to_f64(loss).reshape(rows), P.to_f64(grad).reshape(x.shape)


def ce_reference(case):
    """Float64 loss, gradient and the scales of the metric for a case of :func:`ce_cases`."""
    variant = case["variant"]
    x64 = case["x"].astype(F64)
    labels = case["labels"]
    rows, cols = x64.shape
    eps, zl, cap = (float(h.astype(F64)) for h in case["hyper"])
    if variant != "capped" or math.isinf(cap):  # a traced inf: no cap
        cap = None
    where = case["where"]
    w = case["w"].astype(F64)
    ignore = None if variant == "plain" else IGNORE
    z = capped(x64, cap)
    adm = where & (z > -np.inf)
    m, log_sum, log_p, p, k = row_stats(z, adm)
    lse = m + log_sum
    kw = dict(
        where=None if variant == "plain" else where,
        ignore_index=ignore,
        class_weights=None if variant == "plain" else w,
        label_smoothing=eps,
    )
    with np.errstate(invalid="ignore", over="ignore"):
        # the (capped) logits shifted by the row max, where the reference is exact (a huge cap
        # leaves them huge); then the z-loss. An admissible logit whose difference to the row
        # max is beyond float64 (-1.7e308 in a row whose max is 1.7e308) must not read as -inf,
        # a masked class, which the reference drops from K, the smoothing's count (it gave half
        # the loss, or accepted any value where the scale overflowed): it is kept admissible at
        # -max, and those rows' loss is taken from halves, where every difference is in range.
        shifted = np.where(np.isneginf(z), -np.inf, z - m[:, None])
        far = (adm & np.isneginf(shifted)).any(-1)
        yy = np.clip(labels, 0, max(cols - 1, 0))
        if cols:  # the label's own difference too, also on a class masked by ``where``
            far |= np.isneginf(gather(shifted, yy)) & np.isfinite(gather(z, yy))
        shifted = np.where(adm, np.maximum(shifted, -np.finfo(F64).max), shifted)
        want = R.softmax_cross_entropy_with_integer_labels(shifted, labels, **kw)
        if far.any():
            z_adm = np.where(adm, z, 0.0)
            half = np.where(adm, half_gap(m[:, None], log_sum[:, None], z_adm), 0.0)
            half_y = half_gap(m, log_sum, gather(z, yy))
            share = eps * w / np.maximum(k, 1)[:, None]  # eps w_c / K, doubled after it scales
            exact = 2 * ((1 - eps) * w[yy] * half_y) + (2 * (share * half)).sum(-1)
            want = np.where(far & (labels != IGNORE) & (k > 0), exact, want)
    y = np.clip(labels, 0, max(cols - 1, 0))
    active = (labels != IGNORE) & (k > 0)
    w_y = w[y] if cols else np.zeros(rows)
    with np.errstate(invalid="ignore", over="ignore"):
        if zl:
            want = want + np.where(active, zl * w_y * lse * lse, 0.0)
        z_y = gather(z, y) if cols else np.zeros(rows)
        kk = np.maximum(k, 1)
        total_w = np.where(adm, w, 0.0).sum(-1)
        # lse - z as (m - z) + log_sum: lse itself loses log_sum at offsets beyond 2^53 log_sum
        finite_m = np.isfinite(m)
        m0 = np.where(finite_m, m, 0.0)[:, None]
        lse0 = np.where(finite_m, log_sum, lse)[:, None]
        # halves again: (m - z) alone can be beyond float64 where its weighted term is not
        half_gaps = np.where(adm, half_gap(m0, lse0 + 1, np.where(adm, z, 0.0)), 0.0)
        scale = 2 * times((1 - eps) * w_y, np.abs(half_gap(m0[:, 0], lse0[:, 0], z_y)) + 0.5)
        if eps:
            scale += (2 * times(eps * w / kk[:, None], half_gaps)).sum(-1)
        if zl:
            size = np.abs(m) + log_sum + 1
            scale += zl * w_y * size * size
        if cap is not None:
            size = np.where(adm, np.abs(z), 0.0) + np.abs(m)[:, None]
            scale += times((1 - eps) * w_y, np.abs(z_y) + np.abs(m))
            if eps:
                scale += eps * (w * size / kk[:, None]).sum(-1)
        scale = np.where(active, scale, 0.0)
        # d loss / d z = a p - b onehot(y) - c w [admissible]
        a = (1 - eps) * w_y + eps * total_w / kk + 2 * zl * w_y * lse
        a_size = (1 - eps) * w_y + eps * total_w / kk
        if zl:
            a_size = a_size + 2 * zl * w_y * (np.abs(m) + log_sum + 1)
        onehot = np.arange(cols)[None, :] == y[:, None]
        c = eps / kk
        dz = a[:, None] * p - ((1 - eps) * w_y)[:, None] * onehot - c[:, None] * w * adm
        p_err = xlogx_scale(log_p)
        if cap is not None:
            p_err = p_err + np.where(adm, size, 0.0)
        g_scale = a_size[:, None] * p * p_err + ((1 - eps) * w_y)[:, None] * onehot
        g_scale += c[:, None] * w * adm
        g_scale += a_size[:, None] * underflow(p, case["dtype"])
        if cap is not None:
            t = np.where(np.isneginf(x64), 1.0, np.tanh(x64 / cap))
            g_scale = g_scale * (1 - t * t) + 2 * np.abs(dz)
            dz = dz * (1 - t * t)
        ct = case["ct"].astype(F64)
        grad = np.where(active[:, None], ct[:, None] * dz, 0.0)
        # 0 where no gradient flows (an ignored row, a zero cotangent), not 0 * inf: a huge cap
        # over huge logits takes the scale beyond the range there.
        flows = active[:, None] & (ct != 0)[:, None]
        g_scale = np.where(flows, np.abs(ct)[:, None] * g_scale, 0.0)
    # Rows where a term of the formula is beyond the range: the loss cannot be computed in that
    # dtype (an infinite or NaN result is accepted there; compare() also accepts it where the
    # loss itself is). Every weighted lse - z is formed from halves and doubled after its
    # weight (_rows, "Range"), as the reference above forms it too, so in every dtype only the
    # smoothing's half sum and the z-loss count: a term lse - z_c beyond the range under a small
    # weight must not overflow.
    top = float(P.finfo(cdtype(case["dtype"])).max)
    with np.errstate(invalid="ignore", over="ignore"):
        overflow = zl * w_y * lse * lse > top
        # (lse - z) / 2 from halves, as jaxce forms it, in every dtype
        halves = np.where(adm, half_gap(m0, lse0, np.where(adm, z, 0.0)), 0.0)
        if variant != "plain":  # the smoothing terms are formed, even at a traced eps of 0
            overflow |= np.where(adm, w * halves, 0.0).sum(-1) / kk > top
        # the z-loss's coefficient 2 zl w_y lse of the gradient, likewise
        coefficient_overflow = (np.abs(a) > top) & active
        g_overflow = (overflow & active) | coefficient_overflow
    # A label term that is infinite in the reference, with a zero coefficient, 0 * inf: NaN or
    # 0 are both accepted. Its logit is -inf. (A label logit of -1.8e308 in a row whose max is
    # 1.8e308 is not: the reference takes lse - z_y from halves there, as jaxce does, and a
    # weight of 0 adds 0.)
    infinite_term = np.isneginf(z_y)
    ambiguous = active & infinite_term & ((1 - eps) * w_y == 0)
    return dict(
        want=want,
        grad=grad,
        scale=scale,
        g_scale=g_scale,
        active=active,
        overflow=overflow & active,
        g_overflow=g_overflow,
        coefficient_overflow=coefficient_overflow,
        finite=np.isfinite(want) & ~ambiguous,
        ambiguous=ambiguous,
    )


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@_settings(1.5)
@given(case=ce_cases(), data=st.data())
def test_integer_label_cross_entropy(case, data, path):
    """Every option, shape and dtype against the reference, values and gradients; NaN only
    where a NaN is, nothing at all from an ignored example or a masked class. On the path the
    library picks at these shapes (whole rows, the exponentials kept) and on the one a large
    input takes (chunks of rows and their tail, the exponentials computed again)."""
    dtype = case["dtype"]
    losses, grad = run_ce(case, with_alone=True, path=path)
    ref = ce_reference(case)
    name = "softmax_cross_entropy_with_integer_labels"
    for loss in losses:
        P.compare(
            name,
            dtype,
            loss,
            ref["want"],
            ref["scale"],
            unit_dtype=P.compute_dtype(dtype),
            overflow=ref["overflow"],
            mask=~ref["ambiguous"],
        )
    P.compare(
        f"{name} (gradient)",
        dtype,
        grad,
        ref["grad"],
        ref["g_scale"],
        unit_dtype=dtype,
        mask=ref["finite"][:, None],
        overflow=ref["g_overflow"][:, None],
    )


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@_settings(0.7)
@given(case=ce_cases(), data=st.data())
def test_integer_labels_nan_stays_in_its_example(case, data, path):
    """A NaN logit makes its example's loss NaN, and gradient, if its class is admissible; the
    loss alone if it is the label's, masked. An ignored example, an example with no admissible
    class and a masked class take no part whatever they hold (NaN or +inf): the loss and
    gradient are those without it, and the gradient of the entry is 0. The other examples never
    change."""
    x = case["x"]
    rows, cols = x.shape
    if not rows:
        return
    kind = data.draw(st.sampled_from(("takes part", "ignored", "masked")), "kind")
    labels, where = case["labels"].copy(), case["where"].copy()
    r = data.draw(st.integers(0, rows - 1), "row")
    c = data.draw(st.integers(0, cols - 1), "column")
    if case["variant"] != "plain" and kind == "ignored":
        labels[r] = IGNORE
    elif case["variant"] in WHERE_VARIANTS and kind == "masked" and labels[r] != c:
        where[r, c] = False
    case = dict(case, labels=labels, where=where)
    (loss, alone), grad = run_ce(case, with_alone=True, path=path)
    admissible = where[r] & ~np.isneginf(x[r])
    label = labels[r]
    takes_part = label != IGNORE and (where[r, c] or (label == c and admissible.any()))
    bad = x.copy()
    bad[r, c] = np.nan if takes_part else data.draw(st.sampled_from([np.nan, np.inf]), "value")
    (loss2, alone2), grad2 = run_ce(case, bad, with_alone=True, path=path)
    others = np.arange(rows) != r
    # Without where, a NaN or inf sends the batch from the smoothing's sums as if every class were
    # admissible to the exact ones (_rows.assumes_all_admissible), which agree to rounding only.
    unchanged = same if case["variant"] in WHERE_VARIANTS else rounded_alike(case["dtype"])
    assert unchanged(loss[others], loss2[others]) and unchanged(grad[others], grad2[others])
    assert unchanged(alone[others], alone2[others])
    if takes_part and where[r, c]:
        assert np.isnan(loss2[r]) and np.isnan(alone2[r]) and np.isnan(grad2[r]).any()
    elif takes_part:  # a masked label: its logit is read (optax), in the loss's linear term
        # -w_y z_y only, whose derivative does not depend on z_y: the other classes keep their
        # gradient, the label's is NaN through the soft cap and unchanged without one.
        assert np.isnan(loss2[r]) and np.isnan(alone2[r])
        others_c = np.arange(cols) != c
        assert same(grad2[r][others_c], grad[r][others_c]), (grad2[r], grad[r])
        assert np.isnan(grad2[r, c]) or same(grad2[r, c], grad[r, c]), (grad2[r], grad[r])
    else:
        assert same(loss[r], loss2[r]) and same(alone[r], alone2[r]), (loss[r], loss2[r])
        expected = grad[r].copy()
        expected[c] = 0.0
        if kind == "masked" and ce_reference(case)["coefficient_overflow"][r]:
            # A known gap (docs/precision.md): where the row's gradient coefficient overflows
            # (a z-loss over logits near the range's limit), a masked entry's is inf * 0 = NaN.
            expected[c] = grad2[r, c] if np.isnan(grad2[r, c]) else 0.0
        assert same(grad2[r], expected), (grad2[r], expected)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("eps", [1.0, 0.999])
def test_smoothing_label_term_does_not_overflow(eps, fused):
    """With label smoothing the label's term is ``(1 - eps) w_y (lse - z_y)``: finite when it
    is representable, even where ``w_y (lse - z_y)`` alone would not be (and 0 at eps = 1).
    Here every term of the formula is below 4.1e37; the loss is 3.3e37."""
    classes = 12
    x = np.full((1, classes), 2e37, np.float32)
    x[0, 0] = -2e37
    w = np.ones(classes, np.float32)
    w[0] = 10.0
    labels = np.array([0], np.int32)
    kw = dict(label_smoothing=eps, class_weights=jnp.asarray(w))
    if fused:
        got = jaxce.linear_softmax_cross_entropy(
            jnp.eye(1, dtype=jnp.float32),
            jnp.asarray(x),
            jnp.asarray(labels),
            reduction="none",
            **kw,
        )
    else:
        got = CE(jnp.asarray(x), jnp.asarray(labels), **kw)
    x64, w64 = x[0].astype(F64), w.astype(F64)
    lse = x64.max() + np.log(np.exp(x64 - x64.max()).sum())
    want = (1 - eps) * w64[0] * (lse - x64[0]) + eps / classes * (w64 * (lse - x64)).sum()
    P.assert_finite("loss", got)
    np.testing.assert_allclose(P.to_f64(got)[0], want, rtol=1e-6)


# Logits spanning more than float32's range: lse - z is up to 6.8e38 for the far logits, beyond
# it, but a small weight, target or smoothing on them makes every term of the loss representable.
SPAN_CASES = {
    # name: (jaxce loss, float64 reference, soft labels?, hyperparameters differentiated)
    "integer, weights": (CE, R.softmax_cross_entropy_with_integer_labels, False, ["class_weights"]),
    "integer, smoothing": (CE, R.softmax_cross_entropy_with_integer_labels, False, ["eps"]),
    "integer, both": (
        CE,
        R.softmax_cross_entropy_with_integer_labels,
        False,
        ["class_weights", "eps"],
    ),
    "fused, both": (
        R.fused_of_logits,
        R.softmax_cross_entropy_with_integer_labels,
        False,
        ["class_weights", "eps"],
    ),
    "soft": (jaxce.softmax_cross_entropy, R.softmax_cross_entropy, True, []),
    "soft, both": (
        jaxce.softmax_cross_entropy,
        R.softmax_cross_entropy,
        True,
        ["class_weights", "eps"],
    ),
    "focal, alpha": (jaxce.softmax_focal_loss, R.softmax_focal_loss, False, ["alpha"]),
}
# far apart: 3.4e38 - (-3.4e38) is beyond float32, and so are most differences drawn from these
SPAN_VALUES = st.sampled_from([3.4e38, 3e38, 1e38, 1e30, 0.0, -1e30, -1e38, -3e38, -3.4e38])
SMALL = st.sampled_from([1e-12, 1e-10, 1e-6, 1e-3]) | st.floats(1e-12, 1.0).map(np.float32)


SPAN_COLS = 4


@functools.cache
def _span_loss_and_grads(name, keys):
    """The jitted loss of a case and its sum's derivatives with respect to ``keys``."""
    fn, _, soft, _ = SPAN_CASES[name]

    def loss(x, y, *values):
        given = dict(zip(keys, values, strict=True))
        return fn(x, given.pop("labels") if soft else y, **given)

    def both(x, y, *values):
        total = jax.grad(lambda *v: jnp.sum(loss(x, y, *v)), argnums=tuple(range(len(keys))))
        return loss(x, y, *values), total(*values) if keys else ()

    return jax.jit(both)


@pytest.mark.parametrize("name", list(SPAN_CASES))
@_settings(0.5)
@given(data=st.data())
def test_weighted_terms_beyond_the_difference_range(name, data):
    """Float32 logits spanning more than float32's range (a difference ``lse - z`` of up to
    6.8e38) under small weights, soft labels, smoothing or focal ``alpha``: the loss and its
    derivatives with respect to those are finite wherever their float64 value is within the
    range, and match it. Beyond the range they may be infinite. (Terms were once formed as
    ``w * (lse - z)``, which overflowed before a weight of 1e-10 could scale them.)"""
    draw = data.draw
    _, ref, soft, hyper = SPAN_CASES[name]
    cols = SPAN_COLS
    x = draw(hnp.arrays(np.float32, (2, cols), elements=SPAN_VALUES), "logits")
    x[0, :2] = [3e38, -3e38]  # one row spans the range whatever was drawn
    if soft:
        y = draw(hnp.arrays(np.float32, (2, cols), elements=SMALL), "labels")
    else:
        y = draw(hnp.arrays(np.int32, (2,), elements=st.integers(0, cols - 1)), "labels")
    args = {"labels": y} if soft else {}
    if "class_weights" in hyper:
        args["class_weights"] = draw(hnp.arrays(np.float32, (cols,), elements=SMALL), "w")
    if "alpha" in hyper:
        args["alpha"] = draw(hnp.arrays(np.float32, (cols,), elements=SMALL), "alpha")
    if "eps" in hyper:
        args["label_smoothing"] = np.float32(draw(SMALL, "eps"))
    keys = tuple(args)
    loss, grads = _span_loss_and_grads(name, keys)(
        jnp.asarray(x), jnp.asarray(y), *(jnp.asarray(v) for v in args.values())
    )
    wide = {k: np.asarray(v, F64) for k, v in args.items()}
    # Each loss is the same for logits shifted by their row max, where the float64 reference
    # is exact (at 3e38 itself, its lse would lose log-sums below 1e22 to rounding).
    shifted = x.astype(F64) - x.max(-1, keepdims=True)

    def theirs(**given):
        given = {**wide, **given}
        labels = given.pop("labels") if soft else y
        return ref(shifted, labels, **given)

    # The float64 derivatives: the loss is linear in the weights and alpha (its value at each
    # unit vector) and affine in the smoothing; the labels' is (1 - eps) w (lse - z). Every one
    # is a sum of non-negative terms, but the smoothing's, whose size is that of its two ends.
    want, scale = [theirs()], [theirs()]
    for key in keys:
        if key == "label_smoothing":
            at_one, at_zero = (np.sum(theirs(label_smoothing=e)) for e in (1.0, 0.0))
            want.append(at_one - at_zero)
            scale.append(at_one + at_zero)
            continue
        if key == "labels":  # (1 - eps) w (lse - z)
            eps = wide.get("label_smoothing", 0.0)
            w = wide.get("class_weights", 1.0)
            d = (1 - eps) * w * -R.log_softmax(shifted)
        else:
            units = np.eye(wide[key].size)
            d = np.array([np.sum(theirs(**{key: u})) for u in units])
        want.append(d)
        scale.append(np.abs(d))
    top = float(np.finfo(np.float32).max)
    for what, g, w, size in zip(["loss", *keys], [loss, *grads], want, scale, strict=True):
        g, w, size = (np.asarray(a, F64) for a in (g, w, size))
        inside = np.abs(size) <= top / 2
        assert np.all(np.isfinite(g[inside])), (name, what, g, w)
        error = np.abs(g[inside] - w[inside])
        np.testing.assert_array_less(error, 1e-5 * size[inside] + 1e-30, err_msg=f"{name}: {what}")


@functools.cache
def _loss_at_the_max(case):
    """The per-example loss of ``case`` (``AT_THE_MAX``) as a function of ``(x, w, labels,
    cap)``: jitted (the cap traced) but for the eager case; ``w`` is None for the logits' loss."""
    if case == "integer, capped, eager":
        return lambda x, w, labels, cap: CE(x, labels, logit_soft_cap=cap)
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    def loss(x, w, labels, cap):
        kw = {} if cap is None else {"logit_soft_cap": cap}
        if case == "sharded fused":
            return jaxce.sharded.linear_softmax_cross_entropy(
                x, w, labels, axis_name="model", mesh=mesh, reduction="none", **kw
            )
        return jaxce.linear_softmax_cross_entropy(x, w, labels, reduction="none", **kw)

    return jax.jit(loss)


AT_THE_MAX = ("fused", "fused, capped", "sharded fused", "integer, capped, eager")


@pytest.mark.parametrize("case", AT_THE_MAX)
@_settings(0.3)
@given(
    seed=st.integers(0, 2**32 - 1),
    magnitude=st.sampled_from([1e2, 1e3, 1e4, 1e5]) | st.floats(1.0, 1e6),
)
def test_a_label_at_its_rows_max_has_a_loss_of_at_least_0(case, seed, magnitude):
    """Float32 rows whose label is their max, far from zero: the loss, ``lse - z_y >= lse - max
    >= 0``, is never below 0, and within the rounding of the logits of its float64 value. The
    label's logit is computed apart from the row's max (a product-sum beside the fused loss's
    matmul; a soft cap of one number beside the row's, whose ``tanh`` differs in an eager call)
    and could round above it: -1.75 at fused logits near 1e6, -5e-4 at soft-capped ones near
    3e3."""
    rng = np.random.default_rng(seed)
    capped = "capped" in case
    if case == "integer, capped, eager":
        x64 = rng.standard_normal((2048, 333)) * magnitude
        cap = np.float32(10 * magnitude)
        x, w = x64.astype(np.float32), None
        z64 = cap * np.tanh(x.astype(F64) / cap)
        rounding = np.max(np.abs(z64), axis=-1)
    else:
        n, d, v = 64, 128, 512
        x = (rng.standard_normal((n, d)) * magnitude).astype(np.float32)
        w = rng.standard_normal((d, v)).astype(np.float32)
        raw = x.astype(F64) @ w.astype(F64)
        cap = np.float32(3 * np.max(np.abs(raw))) if capped else None
        z64 = raw if cap is None else cap * np.tanh(raw / cap)
        # the products' rounding: d terms of up to |x_i w_i| each
        rounding = d * (np.abs(x).astype(F64) @ np.abs(w).astype(F64)).max(-1)
    labels = np.argmax(z64, axis=-1).astype(np.int32)
    got = _loss_at_the_max(case)(
        jnp.asarray(x), w, jnp.asarray(labels), None if cap is None else jnp.asarray(cap)
    )
    got = np.asarray(got, F64)
    want = -np.take_along_axis(R.log_softmax(z64), labels[:, None], -1)[:, 0]
    assert np.all(got >= 0), (case, got.min(), np.argmin(got))
    bound = 4 * float(np.finfo(np.float32).eps) * rounding + 1e-6
    assert np.all(np.abs(got - want) <= bound), (case, np.max(np.abs(got - want) - bound))


# ============================================================ cross-entropy, soft labels
@functools.partial(jax.jit, static_argnames=("variant", "path"))
def _soft(x, y, where, weights, eps, ct, variant, path=_paths.PICKED):
    kw = {}
    if variant != "plain":
        kw = dict(where=where, class_weights=weights, label_smoothing=eps)
    with _paths.taken(path):
        loss, pull = jax.vjp(lambda a, b: jaxce.softmax_cross_entropy(a, b, **kw), x, y)
        alone = jaxce.softmax_cross_entropy(x, y, **kw)
    # The loss alone without options is on CPU one fused pass above a size (_xla.fuses_soft_loss),
    # which these small shapes do not reach: that pass, whatever the size.
    fused = _cross_entropy._plain_soft_loss(x, y) if variant == "plain" else alone
    # From _xla.CPU_WHOLE_PASS_ROWS rows on, that pass's two sums share their operands.
    with mock.patch.object(_xla, "CPU_WHOLE_PASS_ROWS", 0):
        whole = _cross_entropy._plain_soft_loss(x, y) if variant == "plain" else alone
    grads = pull(ct)
    if variant == "plain":
        # So are the forward rows of the derivative where its exponentials are not kept: the
        # gradients from those rows, whatever the size.
        with (
            mock.patch.object(_xla, "saves_exponentials", lambda *a, **k: False),
            mock.patch.object(_xla, "fuses_soft_loss", lambda a, b: a.shape[-1] > 0),
        ):
            fused_grads = jax.vjp(jaxce.softmax_cross_entropy, x, y)[1](ct)
    else:
        fused_grads = grads
    return (loss, *grads, alone, fused, *fused_grads, whole)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@_settings(1.0)
@given(data=st.data())
def test_soft_label_cross_entropy(data, path):
    """Values and gradients (to the logits and to the labels) against the reference."""
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    shape = draw(st.sampled_from(CE_SHAPES), "shape")
    variant = draw(st.sampled_from(("plain", "options")), "variant")
    rows, cols = batch_rows(shape)
    x = draw(values(rows, cols, dtype, neg_inf=True), "x")
    y = draw(st.composite(lambda d: probabilities(d, rows, cols, dtype))(), "labels")
    # Label mass on a -inf logit is left out: see test_soft_label_mass_on_minus_inf.
    y[np.isneginf(x)] = 0
    plain = variant == "plain"
    where = np.ones((rows, cols), bool) if plain else booleans(draw, (rows, cols))
    w = np.ones(cols, cdtype(dtype)) if plain else class_weights(draw, cols, dtype)
    eps = 0.0 if plain else draw(st.sampled_from([0.0, 0.1, 1.0]) | reals(0, 1), "eps")
    eps_arg = cast(eps, cdtype(dtype))
    ct = cotangent(draw, (rows,), cdtype(dtype))
    args = (x.reshape(shape), y.reshape(shape), where.reshape(shape), w, eps_arg)
    ct_arg = jnp.asarray(ct.reshape(shape[:-1]))
    out = _soft(*(jnp.asarray(a) for a in args), ct_arg, variant, path)
    assert out[0].dtype == out[3].dtype == out[4].dtype == out[7].dtype == cdtype(dtype)
    assert out[1].dtype == out[2].dtype == jnp.dtype(dtype)
    loss, alone, fused, whole = (
        P.to_f64(o).reshape(rows) for o in (out[0], out[3], out[4], out[7])
    )
    gx, gy, fused_gx, fused_gy = (P.to_f64(o).reshape(rows, cols) for o in out[1:3] + out[5:7])

    x64, y64, w64, ct64 = x.astype(F64), y.astype(F64), w.astype(F64), ct.astype(F64)
    eps = float(eps_arg.astype(F64))
    adm = where & (x64 > -np.inf)
    m, log_sum, log_p, p, k = row_stats(x64, adm)
    # Differences to the row max; one that overflows float64 (a logit of -1.8e308 in a row whose
    # max is 1.8e308) is kept at the largest float rather than read as a -inf (masked) logit, and
    # those rows' loss is taken from halves, (lse - z_c) / 2 = (m / 2 - z_c / 2) + log_sum / 2,
    # where no difference overflows, as jaxce forms it (_rows, "Range"): the reference's own
    # term for that class was m - max, and the scale inf, which accepted any value.
    with np.errstate(over="ignore", invalid="ignore"):
        shifted = np.where(np.isneginf(x64), -np.inf, x64 - m[:, None])
        far = (adm & np.isneginf(shifted)).any(-1)
        shifted = np.where(np.isneginf(x64), -np.inf, np.maximum(shifted, -P.finfo("float64").max))
        half = np.where(adm, half_gap(m[:, None], log_sum[:, None], np.where(adm, x64, 0.0)), 0.0)
    kw = {} if plain else dict(where=where, label_smoothing=eps, class_weights=w64)
    want = R.softmax_cross_entropy(shifted, y64, **kw)
    target = np.where(adm, (1 - eps) * y64 + eps / np.maximum(k, 1)[:, None], 0.0)
    wt = w64 * target
    with np.errstate(over="ignore"):
        want = np.where(far, (2 * times(wt, half)).sum(-1), want)
        scale = (2 * times(wt, half + 0.5)).sum(-1)  # lse - z + 1, weighted
    gap = np.where(adm, -log_p + 1, 0.0)  # lse - z + 1 (of the label's derivative below)
    name = "softmax_cross_entropy"
    # a term beyond the range: an infinite or NaN result is accepted. Each w y' (lse - z_c) is
    # formed from halves (_rows, "Range"): only a weighted term beyond the range counts, not
    # lse - z_c alone.
    top = float(P.finfo(cdtype(dtype)).max)
    over = adm & (wt * half > top)
    overflow = (over & (wt != 0)).any(-1)
    for got in (loss, alone, fused, whole):
        u = dict(unit_dtype=P.compute_dtype(dtype))
        P.compare(name, dtype, got, want, scale, overflow=overflow, **u)
    # d/dz = (sum w y') p - w y';  d/dy = (1 - eps) w (lse - z) on where & admissible rows
    mass = wt.sum(-1, keepdims=True)
    want_gx = ct64[:, None] * (mass * p - wt)
    # p's error, its flush to 0, and the rounding of the sum that gives the mass (log2 K units)
    p_err = p * (xlogx_scale(log_p) + np.log2(np.maximum(k, 1))[:, None])
    g_scale = np.abs(ct64)[:, None] * (mass * (p_err + underflow(p, dtype)) + wt)
    u = dict(unit_dtype=dtype)
    for got_gx in (gx, fused_gx):
        P.compare(f"{name} (gradient)", dtype, got_gx, want_gx, g_scale, **u)
    live = where & (k > 0)[:, None]
    a = (1 - eps) * w64
    with np.errstate(invalid="ignore", over="ignore"):
        want_gy = np.where(live, ct64[:, None] * (a * -log_p), 0.0)
        gy_scale = np.abs(ct64)[:, None] * (a * gap)
        # Where lse - z overflows float64 (only there: a logit of -1.8e308 in a row whose max is
        # 1.8e308), 2 (a (lse - z) / 2) from halves, as jaxce forms it: a weight below 1/2
        # brings it back into the range.
        far_gy = adm & np.isinf(log_p) & np.isfinite(x64)
        doubled = 2 * times(a, half)
        want_gy = np.where(far_gy & live, ct64[:, None] * doubled, want_gy)
        gy_scale = np.where(far_gy, np.abs(ct64)[:, None] * (2 * times(a, half + 0.5)), gy_scale)
        # beyond the range an infinite or NaN result is accepted
        over_gy = adm & np.where(far_gy, np.isinf(doubled), a * -log_p > top)
    # (at a -inf logit the derivative is +inf: not compared)
    compared = ~(np.isneginf(x64) & live)
    for got_gy in (gy, fused_gy):
        P.compare(
            f"{name} (gradient)",
            dtype,
            got_gy,
            want_gy,
            gy_scale,
            mask=compared,
            overflow=over_gy,
            **u,
        )
    if rows and draw(st.booleans(), "probe NaN"):
        r, c = draw(st.integers(0, rows - 1), "NaN row"), draw(st.integers(0, cols - 1), "col")
        source = draw(st.sampled_from(("logits", "labels")), "NaN in")
        bad_x, bad_y = x.copy(), y.copy()
        (bad_x if source == "logits" else bad_y)[r, c] = np.nan
        args2 = (bad_x.reshape(shape), bad_y.reshape(shape)) + args[2:]
        out2 = _soft(*(jnp.asarray(a) for a in args2), ct_arg, variant, path)
        loss2, alone2, fused2 = (P.to_f64(o).reshape(rows) for o in (out2[0], out2[3], out2[4]))
        others = np.arange(rows) != r
        assert same(loss[others], loss2[others])
        # the fused pass computes every row again when one is NaN: the others agree with it, to
        # rounding (its exact pass sums the same terms in another order). On the sub-rows path
        # the loss alone takes that pass too, as large inputs on CPU do.
        np.testing.assert_allclose(fused2[others], fused[others], rtol=1e-5)
        if path == _paths.SUB_ROWS and variant == "plain":
            np.testing.assert_allclose(alone2[others], alone[others], rtol=1e-5)
        else:
            assert same(alone[others], alone2[others])
        assert np.isnan(fused2[r]) == np.isnan(alone2[r])
        for got, fused_got in zip(out2[1:3], out2[5:7], strict=True):  # NaN where it is
            assert same(np.isnan(P.to_f64(got)), np.isnan(P.to_f64(fused_got)))
        for before, after in zip(out[1:3], out2[1:3], strict=True):
            assert same(
                P.to_f64(before).reshape(rows, cols)[others],
                P.to_f64(after).reshape(rows, cols)[others],
            )
        if not where[r, c]:  # a masked class takes no part, whatever it holds
            assert same(loss[r], loss2[r]) and same(alone[r], alone2[r])
        else:  # never hidden, not even where every target or weight of the row is 0
            assert np.isnan(loss2[r]) and np.isnan(alone2[r]), (loss2[r], alone2[r])


def test_soft_label_mass_on_minus_inf():
    """Label mass on a -inf logit: the class cannot be predicted, so the cross-entropy is
    +inf (as it is for an integer label there), never NaN and never silently dropped."""
    x = jnp.array([[0.0, -jnp.inf, 1.0]])
    y = jnp.array([[0.5, 0.5, 0.0]])
    assert float(jaxce.softmax_cross_entropy(x, y)[0]) == np.inf
    assert float(CE(x, jnp.array([1]))[0]) == np.inf


def test_soft_label_term_beyond_the_range():
    """A target on a finite logit whose distance to the row max overflows float64 (-1.8e308
    in a row whose max is 1.8e308): the cross-entropy, 3.6e308, is beyond the range: +inf, as
    for an integer label there (a thorough run of the property test above found its reference
    reading that logit as a masked one)."""
    x = jnp.array([[-1.79769313e308, 0.0, 0.0, 1.79769313e308]], jnp.float64)
    y = jnp.array([[1.0, 0.0, 0.0, 0.0]], jnp.float64)
    assert float(jaxce.softmax_cross_entropy(x, y)[0]) == np.inf
    assert float(CE(x, jnp.array([0]))[0]) == np.inf


# ===================================================================== NLL
@functools.partial(jax.jit, static_argnames=("variant",))
def _nll(log_probs, labels, weights, ct, variant):
    kw = {} if variant == "plain" else dict(ignore_index=IGNORE, class_weights=weights)
    loss, pull = jax.vjp(lambda a: jaxce.nll_loss(a, labels, **kw), log_probs)
    return loss, pull(ct)[0]


@_settings(0.5)
@given(data=st.data())
def test_nll_loss(data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    shape = draw(st.sampled_from(CE_SHAPES), "shape")
    variant = draw(st.sampled_from(("plain", "options")), "variant")
    rows, cols = batch_rows(shape)
    lp = -np.abs(draw(values(rows, cols, dtype, neg_inf=True), "log_probs"))
    low = 0 if variant == "plain" else IGNORE
    labels = draw(hnp.arrays(np.int32, (rows,), elements=st.integers(low, cols - 1)), "labels")
    w = np.ones(cols, cdtype(dtype)) if variant == "plain" else class_weights(draw, cols, dtype)
    ct = cotangent(draw, (rows,), cdtype(dtype))

    def run(arrays):
        lp, labels = arrays
        loss, grad = _nll(
            jnp.asarray(lp.reshape(shape)),
            jnp.asarray(labels.reshape(shape[:-1])),
            jnp.asarray(w),
            jnp.asarray(ct.reshape(shape[:-1])),
            variant,
        )
        return P.to_f64(loss).reshape(rows), P.to_f64(grad).reshape(rows, cols)

    loss, grad = run((lp, labels))
    # A NaN log-probability matters only at the label of an example that is not ignored.
    nan_probe(draw, run, (lp, labels), 0, lambda r, c: labels[r] == c)
    lp64, w64 = lp.astype(F64), w.astype(F64)
    ignore = None if variant == "plain" else IGNORE
    y = np.clip(labels, 0, cols - 1)
    w_y = w64[y]
    ambiguous = (w_y == 0) & np.isneginf(gather(lp64, y))  # 0 * inf
    with np.errstate(invalid="ignore"):
        want = R.nll_loss(lp64, labels, ignore_index=ignore, class_weights=w64)
    P.compare(
        "nll_loss",
        dtype,
        loss,
        want,
        np.abs(want),
        unit_dtype=P.compute_dtype(dtype),
        mask=~ambiguous,
    )
    onehot = (np.arange(cols)[None, :] == y[:, None]) & (labels != IGNORE)[:, None]
    want_g = np.where(onehot, -(w_y * ct.astype(F64))[:, None], 0.0)
    P.compare("nll_loss (gradient)", dtype, grad, want_g, np.abs(want_g), unit_dtype=dtype)


# ========================================================== binary cross-entropies
@functools.partial(jax.jit, static_argnames=("variant",))
def _sbce(x, y, pos_weight, weights, eps, ct, variant):
    kw = {}
    if variant != "plain":
        kw = dict(pos_weight=pos_weight, weights=weights, label_smoothing=eps)
    loss, pull = jax.vjp(lambda a, b: jaxce.sigmoid_binary_cross_entropy(a, b, **kw), x, y)
    return (loss, *pull(ct))


BINARY_SHAPES = ((6, 4), (5,), (), (0, 3))


def unit_interval(draw, shape, dtype):
    """Targets in [0, 1]: exactly 0 or 1, or anything between (tiny and near 1 included)."""
    n = math.prod(shape)
    small = np.abs(draw(values(n, 1, dtype, offsets=False)).astype(F64)).reshape(shape)
    small = np.minimum(small, 1.0)
    flip = draw(hnp.arrays(bool, shape))
    exact = draw(hnp.arrays(np.int8, shape, elements=st.integers(0, 3)))
    y = np.where(flip, 1 - small, small)
    y = np.where(exact == 0, 0.0, np.where(exact == 1, 1.0, y))
    return cast(y, dtype)


@_settings(0.8)
@given(data=st.data())
def test_sigmoid_binary_cross_entropy(data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    shape = draw(st.sampled_from(BINARY_SHAPES), "shape")
    variant = draw(st.sampled_from(("plain", "options")), "variant")
    n = math.prod(shape)
    x = draw(values(n, 1, dtype), "logits").reshape(shape)
    y = unit_interval(draw, shape, dtype)
    classes = shape[-1:]
    cd = cdtype(dtype)
    pw = cast(draw(hnp.arrays(F64, classes, elements=reals(0, 10)), "pos_weight"), cd)
    w = cast(draw(hnp.arrays(F64, shape, elements=reals(0, 10)), "weights"), cd)
    eps = draw(st.sampled_from([0.0, 0.1, 1.0]) | reals(0, 1), "eps")
    if variant == "plain":
        pw, w, eps = np.ones(classes, cd), np.ones(shape, cd), 0.0
    eps_arg = cast(eps, cd)
    ct = cotangent(draw, shape, cd)
    args = (x, y, pw, w, eps_arg, ct)
    out = _sbce(*(jnp.asarray(a) for a in args), variant)
    assert out[0].dtype == cd and out[1].dtype == out[2].dtype == jnp.dtype(dtype)
    loss, gx, gy = (P.to_f64(o) for o in out)

    x64, y64, ct64 = x.astype(F64), y.astype(F64), ct.astype(F64)
    pw64, w64, eps = pw.astype(F64), w.astype(F64), float(eps_arg.astype(F64))
    kw = {} if variant == "plain" else dict(pos_weight=pw64, weights=w64, label_smoothing=eps)
    want = R.sigmoid_binary_cross_entropy(x64, y64, **kw)
    t = (1 - eps) * y64 + eps / 2
    pos, neg = -scipy.special.log_expit(x64), -scipy.special.log_expit(-x64)
    with np.errstate(over="ignore"):
        scale = w64 * (times(pw64 * t, pos) + times(1 - t, neg))
        if eps:  # 1 - t has an absolute error of a unit
            scale = scale + w64 * times(t, neg)
    name = "sigmoid_binary_cross_entropy"
    P.compare(name, dtype, loss, want, scale, unit_dtype=P.compute_dtype(dtype))
    s = scipy.special.expit(x64)
    with np.errstate(over="ignore", invalid="ignore"):
        want_gx = ct64 * (w64 * ((pw64 * t + 1 - t) * s - pw64 * t))
        gx_scale = np.abs(ct64) * (w64 * ((pw64 * t + 1) * s + pw64 * t))
        # A weight of 0 (w, or eps = 1) on a term beyond the range adds 0, not 0 * inf.
        label_weight = (1 - eps) * w64
        want_gy = ct64 * np.where(label_weight == 0, 0.0, label_weight * (pw64 * pos - neg))
        gy_scale = np.abs(ct64) * np.where(
            label_weight == 0, 0.0, label_weight * (pw64 * pos + neg)
        )
    P.compare(f"{name} (gradient)", dtype, gx, want_gx, gx_scale, unit_dtype=dtype)
    # d/dy has the term pos_weight |log sigmoid(x)|, beyond the range at x near -3e38
    terms = pw64 * pos + neg
    overflow = np.maximum(terms, w64 * terms) > float(P.finfo(cd).max)
    P.compare(
        f"{name} (gradient)", dtype, gy, want_gy, gy_scale, unit_dtype=dtype, overflow=overflow
    )
    if n and draw(st.booleans(), "probe NaN"):
        i = draw(st.integers(0, n - 1), "NaN index")
        which = draw(st.integers(0, 1), "NaN in logits (0) or labels (1)")
        bad = [x.copy().reshape(-1), y.copy().reshape(-1)]
        bad[which][i] = np.nan
        out2 = _sbce(
            *(jnp.asarray(a) for a in (bad[0].reshape(shape), bad[1].reshape(shape))),
            *(jnp.asarray(a) for a in args[2:]),
            variant,
        )
        others = np.arange(n) != i
        for before, after in zip(out, out2, strict=True):
            before, after = P.to_f64(before).reshape(-1), P.to_f64(after).reshape(-1)
            assert same(before[others], after[others])
        # never hidden, not even by a zero weight, pos_weight or target
        assert np.isnan(P.to_f64(out2[0]).reshape(-1)[i])


def _sbce_total(x, y, pos_weight, weights, eps, reduction, path):
    """The reduced sigmoid BCE, jitted and traced on ``path``, and whether its sum is taken in
    one fusion (``_xla.sum_in_one_fusion``)."""
    kw = {} if pos_weight is None else dict(pos_weight=pos_weight, weights=weights)
    kw |= {} if eps is None else dict(label_smoothing=eps)

    def loss(x, y):
        return jaxce.sigmoid_binary_cross_entropy(x, y, reduction=reduction, **kw)

    with _paths.taken(path), _paths.fused_sums() as fusion:
        return jax.jit(loss)(x, y), fusion.called


@_settings(0.5)
@given(data=st.data())
def test_sigmoid_bce_sum_in_one_fusion(data):
    """The sum (and mean) of the sigmoid BCE taken whole in one fusion (on CPU from
    ``_xla.FUSED_SUM_MIN_ELEMENTS`` entries, forced here) is the sum of the elementwise losses:
    its terms, written without a select, are theirs, to within a rounding, at finite logits,
    and at infinite ones 0 or inf as the select gives (``_binary._sigmoid_bce_terms``). Both
    paths differ from the float64 sum of the elementwise losses by at most the sum's own
    rounding."""
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    shape = draw(st.sampled_from(((5,), (2, 3), (3, 2, 4))), "shape")
    variant = draw(st.sampled_from(("plain", "smoothing", "options")), "variant")
    reduction = draw(st.sampled_from(("sum", "mean")), "reduction")
    n = math.prod(shape)
    x = draw(values(n, 1, dtype), "logits").reshape(shape)
    special = draw(hnp.arrays(np.int8, shape, elements=st.integers(0, 11)), "special entries")
    x = np.where(special == 1, np.inf, np.where(special == 2, -np.inf, x)).astype(x.dtype)
    if draw(st.integers(0, 7), "NaN") == 0:
        x.reshape(-1)[draw(st.integers(0, n - 1))] = np.nan
    y = unit_interval(draw, shape, dtype)
    cd = cdtype(dtype)
    pw = w = eps = None
    if variant != "plain":
        eps = cast(draw(st.sampled_from([0.1, 1.0]) | reals(0, 1), "eps"), cd)
    if variant == "options":
        some = st.sampled_from([0.0, 1.0, 3.0]) | reals(0, 10)
        pw = cast(draw(hnp.arrays(F64, shape[-1:], elements=some), "pos_weight"), cd)
        w = cast(draw(hnp.arrays(F64, shape, elements=some), "weights"), cd)
    args = tuple(None if a is None else jnp.asarray(a) for a in (x, y, pw, w, eps))
    fused, chose = _sbce_total(*args, reduction, _paths.FUSED_PASSES)
    chunked, _ = _sbce_total(*args, reduction, _paths.ROW_CHUNKS)
    assert chose == (dtype != "float16")  # float16 is not fused (a float32 copy)
    # float64 terms: the reference's at finite logits; at +-inf, 0 where the logit's side has a
    # coefficient of 0 (a perfect prediction), else inf; NaN at a NaN logit.
    x64, y64 = P.to_f64(args[0]), P.to_f64(args[1])
    kw = {}
    if pw is not None:
        kw = dict(pos_weight=P.to_f64(args[2]), weights=P.to_f64(args[3]))
    e = 0.0 if eps is None else float(P.to_f64(args[4]))
    t = (1 - e) * y64 + e / 2
    w64, pw64 = kw.get("weights", 1.0), kw.get("pos_weight", 1.0)
    pos, neg = w64 * pw64 * t, w64 * (1 - t)
    finite = np.isfinite(x64)
    terms = R.sigmoid_binary_cross_entropy(np.where(finite, x64, 0.0), y64, label_smoothing=e, **kw)
    side = np.where(x64 > 0, neg, pos)
    terms = np.where(finite, terms, np.where(side == 0, 0.0, np.inf))
    terms = np.where(np.isnan(x64), np.nan, terms)
    want = np.sum(terms) / (n if reduction == "mean" else 1)
    # The float32 sum of n terms: n roundings of at most the sum of their magnitudes.
    bound = (n + 2) * float(P.finfo(cd).eps) * np.sum(np.abs(terms))
    bound /= n if reduction == "mean" else 1
    top = float(P.finfo(cd).max)
    for got in (fused, chunked):
        got = float(P.to_f64(got))
        if np.isnan(want):
            assert np.isnan(got)
        elif want == np.inf:
            assert got == np.inf
        elif np.sum(np.abs(terms)) > top / 2:  # a term or the sum may overflow the dtype
            assert got == np.inf or abs(got - want) <= bound, (got, want, bound)
        else:
            assert abs(got - want) <= bound, (got, want, bound)


@jax.jit
def _bce(p, y, weights, ct):
    loss, pull = jax.vjp(lambda a: jaxce.binary_cross_entropy(a, y, weights=weights), p)
    return loss, pull(ct)[0]


@_settings(0.5)
@given(data=st.data())
def test_binary_cross_entropy(data):
    """PyTorch's BCELoss on probabilities (logs clamped at -100): values, PyTorch's gradient
    ``w (p - y) / max(p (1 - p), 1e-12)``, finite everywhere on [0, 1]."""
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    shape = draw(st.sampled_from(BINARY_SHAPES), "shape")
    p = unit_interval(draw, shape, dtype)
    y = unit_interval(draw, shape, dtype)
    cd = cdtype(dtype)
    w = cast(draw(hnp.arrays(F64, shape, elements=reals(0, 10)), "weights"), cd)
    ct = cotangent(draw, shape, cd)
    loss, grad = _bce(jnp.asarray(p), jnp.asarray(y), jnp.asarray(w), jnp.asarray(ct))
    assert loss.dtype == cd and grad.dtype == jnp.dtype(dtype)
    p64, y64, w64, ct64 = (a.astype(F64) for a in (p, y, w, ct))
    with np.errstate(divide="ignore"):
        log_p = np.maximum(np.log(p64), -100.0)
        log_q = np.maximum(np.log1p(-p64), -100.0)
    want = -w64 * (y64 * log_p + (1 - y64) * log_q)
    scale = w64 * (y64 * np.abs(log_p) + (1 - y64) * np.abs(log_q))
    name = "binary_cross_entropy"
    P.compare(name, dtype, loss, want, scale, unit_dtype=P.compute_dtype(dtype))
    denominator = np.maximum(p64 * (1 - p64), 1e-12)
    want_g = ct64 * (w64 * (p64 - y64) / denominator)
    g_scale = np.abs(ct64) * (w64 * (p64 + y64) / denominator)
    # away from the switch of the clamp, where the two branches differ
    away = np.abs(p64 * (1 - p64) / 1e-12 - 1) > 1e-3
    P.compare(f"{name} (gradient)", dtype, grad, want_g, g_scale, unit_dtype=dtype, mask=away)


# =============================================================== entropy and KL
@functools.partial(jax.jit, static_argnames=("masked", "path"))
def _information(probs, logits, log_q, targets, where, ct, masked, path=_paths.PICKED):
    with _paths.taken(path):
        h, h_pull = jax.vjp(jaxce.entropy, probs)
        sh, sh_pull = jax.vjp(jaxce.softmax_entropy, logits)
        kl, kl_pull = jax.vjp(
            lambda a, b: jaxce.kl_divergence(a, b, where=where if masked else None), log_q, targets
        )
        return h, sh, kl, h_pull(ct)[0], sh_pull(ct)[0], *kl_pull(ct)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@_settings(1.0)
@given(data=st.data())
def test_entropy_softmax_entropy_kl_divergence(data, path):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    shape = draw(st.sampled_from(PRIMITIVE_SHAPES), "shape")
    masked = draw(st.booleans(), "masked")
    rows, cols = batch_rows(shape)
    prob = st.composite(lambda d: probabilities(d, rows, cols, dtype))()
    p = draw(prob, "probs")
    x = draw(values(rows, cols, dtype, neg_inf=True), "logits")
    lq = -np.abs(draw(values(rows, cols, dtype, neg_inf=True), "log_predictions"))
    t = draw(prob, "targets")
    where = data.draw(st.composite(lambda d: booleans(d, (rows, cols)))(), "where")
    ct = cotangent(draw, (rows,), cdtype(dtype))

    def run(arrays):
        out = _information(
            *(jnp.asarray(a.reshape(shape)) for a in arrays),
            jnp.asarray(ct.reshape(shape[:-1])),
            masked,
            path,
        )
        for o in out[:3]:
            assert o.dtype == cdtype(dtype)
        for o in out[3:]:
            assert o.dtype == jnp.dtype(dtype)
        return tuple(P.to_f64(o).reshape(rows, cols if o.ndim == len(shape) else 1) for o in out)

    arrays = (p, x, lq, t, where)
    h, sh, kl, g_h, g_sh, g_lq, g_t = run(arrays)
    h, sh, kl = h[:, 0], sh[:, 0], kl[:, 0]
    p64, x64, lq64, t64, ct64 = (a.astype(F64) for a in (p, x, lq, t, ct))
    unit = dict(unit_dtype=P.compute_dtype(dtype))
    tiny = float(P.finfo(P.compute_dtype(dtype)).smallest_normal)

    with np.errstate(divide="ignore"):
        log_p = np.log(p64)
    want = R.entropy(p64)
    P.compare("entropy", dtype, h, want, times(p64, np.abs(log_p)).sum(-1), **unit)
    floored = np.log(np.maximum(p64, tiny))
    P.compare(
        "entropy (gradient)",
        dtype,
        g_h,
        -ct64[:, None] * (floored + 1),
        np.abs(ct64)[:, None] * (np.abs(floored) + 1),
        unit_dtype=dtype,
    )

    adm = x64 > -np.inf
    m, log_sum, log_s, s, k = row_stats(x64, adm)
    want = R.softmax_entropy(np.where(adm, x64 - m[:, None], -np.inf))
    want = np.where(k > 0, want, 0.0)
    size = xlogx_scale(log_s)
    P.compare("softmax_entropy", dtype, sh, want, (s * size * size).sum(-1), **unit)
    with np.errstate(invalid="ignore"):
        plogp = np.where(adm & (s > 0), s * log_s, 0.0)  # p log p -> 0 as p -> 0
        want_g = -ct64[:, None] * (plogp + s * want[:, None])
    g_scale = (s * size + underflow(s, dtype)) * (size + np.abs(want)[:, None])
    g_scale = np.abs(ct64)[:, None] * g_scale
    P.compare("softmax_entropy (gradient)", dtype, g_sh, want_g, g_scale, unit_dtype=dtype)

    mask = where if masked else np.ones_like(where)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = R.kl_divergence(lq64, t64, where=mask)
        log_t = np.log(t64)
        terms = np.where(mask & (t64 > 0), t64 * (np.abs(log_t) + np.abs(lq64)), 0.0)
        P.compare("kl_divergence", dtype, kl, want, terms.sum(-1), **unit)
        floored = np.log(np.maximum(t64, tiny))
        want_lq = np.where(mask, -ct64[:, None] * t64, 0.0)
        want_t = np.where(mask, ct64[:, None] * (floored + 1 - lq64), 0.0)
        t_scale = np.abs(ct64)[:, None] * (np.abs(floored) + 1 + np.abs(lq64))
    u = dict(unit_dtype=dtype)
    P.compare("kl_divergence (gradient)", dtype, g_lq, want_lq, np.abs(want_lq), **u)
    # (masked entries holding -inf or NaN: test_masked_entries_take_no_part)
    compared = mask | np.isfinite(lq64)
    P.compare("kl_divergence (gradient)", dtype, g_t, want_t, t_scale, mask=compared, **u)

    # NaN in a row's input: that row's result is NaN (a KL term wherever where is True: a NaN
    # log q is not hidden by a zero target, as in optax)
    def first(k):  # the results with the k-th first
        return lambda arrays: (lambda out: out[k:] + out[:k])(run(arrays))

    which = draw(st.sampled_from(("probs", "logits", "log_q", "targets")), "NaN in")
    if which == "probs":
        nan_probe(draw, run, arrays, 0, lambda r, c: True)
    elif which == "logits":
        nan_probe(draw, first(1), arrays, 1, lambda r, c: True)
    elif which == "log_q":
        nan_probe(draw, first(2), arrays, 2, lambda r, c: mask[r, c])
    else:
        nan_probe(draw, first(2), arrays, 3, lambda r, c: mask[r, c])


@_settings(0.3)
@given(data=st.data())
def test_masked_entries_take_no_part(data):
    """``where=False`` entries of the KL divergence and the softmax primitives take no part,
    whatever they hold (-inf, +inf or NaN): every result, and every gradient but the entry's
    own (0), is what it is with a 0 there."""
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    shape = (6, 5)
    rows, cols = shape
    lq = -np.abs(draw(values(rows, cols, dtype), "log_predictions"))
    t = probabilities(draw, rows, cols, dtype)
    p = probabilities(draw, rows, cols, dtype)
    x = draw(values(rows, cols, dtype), "logits")
    where = booleans(draw, shape)
    where[0, 0] = False  # at least one masked entry
    ct = cotangent(draw, (rows,), cdtype(dtype))
    poison = draw(st.sampled_from([np.nan, np.inf, -np.inf]), "poison")
    masked = ~where

    def kl_and_gradients(lq, t):
        out = _information(*(jnp.asarray(a) for a in (p, x, lq, t, where, ct)), masked=True)
        return [P.to_f64(o) for o in (out[2], out[5], out[6])]

    clean_lq, clean_t = np.where(masked, 0, lq).astype(lq.dtype), np.where(masked, 0, t)
    want = kl_and_gradients(clean_lq, clean_t.astype(t.dtype))
    for w in want[1:]:
        w[masked] = 0.0
    got = kl_and_gradients(np.where(masked, poison, lq).astype(lq.dtype), clean_t.astype(t.dtype))
    for name, g, w in zip(("KL", "d/dlog_q", "d/dt"), got, want, strict=True):
        assert same(g, w), f"{name}: {g} != {w}"
    got = kl_and_gradients(clean_lq, np.where(masked, np.nan, t).astype(t.dtype))
    for name, g, w in zip(("KL", "d/dlog_q", "d/dt"), got, want, strict=True):
        assert same(g, w), f"{name} (NaN targets): {g} != {w}"

    ct1, ct2 = cotangent(draw, (rows,), dtype), cotangent(draw, shape, dtype)

    def softmaxes(x):
        out = _primitives(*(jnp.asarray(a) for a in (x, where, ct1, ct2, ct2)), masked=True)
        return [P.to_f64(o) for o in out]

    want = softmaxes(np.where(masked, 0, x).astype(x.dtype))
    for w in want[3:]:
        w[masked] = 0.0
    got = softmaxes(np.where(masked, poison, x).astype(x.dtype))
    names = ("log_softmax", "softmax", "logsumexp") + ("their gradients",) * 3
    for name, g, w in zip(names, got, want, strict=True):
        assert same(g, w), f"{name}: {g} != {w}"


# ======================================================================= focal
@functools.partial(jax.jit, static_argnames=("alpha_kind",))
def _sigmoid_focal(x, y, alpha, gamma, ct, alpha_kind):
    a = None if alpha_kind == "none" else alpha
    loss, pull = jax.vjp(lambda u, v: jaxce.sigmoid_focal_loss(u, v, alpha=a, gamma=gamma), x, y)
    return (loss, *pull(ct))


@_settings(0.7)
@given(data=st.data())
def test_sigmoid_focal_loss(data):
    """Values against the float64 formula (with accurate sigmoids at both tails); finite
    gradients for every gamma >= 0, including gamma < 1 on confident examples."""
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    shape = draw(st.sampled_from(BINARY_SHAPES), "shape")
    alpha_kind = draw(st.sampled_from(("none", "scalar")), "alpha")
    n = math.prod(shape)
    x = draw(values(n, 1, dtype), "logits").reshape(shape)
    y = unit_interval(draw, shape, dtype)
    cd = cdtype(dtype)
    alpha = scalar(draw, reals(0, 1), dtype, "alpha value")
    gamma = scalar(draw, st.sampled_from([0.0, 0.5, 2.0]) | reals(0, 5), dtype, "gamma")
    ct = cotangent(draw, shape, cd)
    args = (x, y, alpha, gamma, ct)
    out = _sigmoid_focal(*(jnp.asarray(a) for a in args), alpha_kind)
    loss, gx, gy = (P.to_f64(o) for o in out)
    assert out[0].dtype == cd
    x64, y64 = x.astype(F64), y.astype(F64)
    a64, g64 = float(alpha.astype(F64)), float(gamma.astype(F64))
    ce = R.sigmoid_binary_cross_entropy(x64, y64)
    p, q = scipy.special.expit(x64), scipy.special.expit(-x64)
    base = p * (1 - y64) + q * y64
    weight = 1.0 if alpha_kind == "none" else a64 * y64 + (1 - a64) * (1 - y64)
    want = weight * ce * base**g64
    logs = np.maximum(-scipy.special.log_expit(x64), -scipy.special.log_expit(-x64))
    # A loss of 0 has a scale of 0, even where the logs overflow (a logit of -1.8e308).
    with np.errstate(over="ignore"):
        scale = times(np.abs(want), 1 + g64 * (logs + 1))
    P.compare("sigmoid_focal_loss", dtype, loss, want, scale, unit_dtype=P.compute_dtype(dtype))
    # The gradients are finite wherever a bound on their true magnitude is representable:
    # |d/dx| and |d/dy| <= |ct| (2 + 2 gamma)(|x| + 2)
    bound = np.maximum(np.abs(ct.astype(F64)), 1) * (2 + 2 * g64) * (np.abs(x64) + 2)
    representable = bound < float(P.finfo(dtype).max)
    P.assert_finite("sigmoid_focal_loss gradient", gx[representable], gy[representable])

    # A NaN logit or label makes that entry's loss and both its derivatives NaN (whatever gamma:
    # its modulating factor m^gamma is NaN too), and changes no other entry.
    if n and draw(st.booleans(), "probe NaN"):
        i = draw(st.integers(0, n - 1), "NaN index")
        k = draw(st.integers(0, 1), "NaN in (0: logit, 1: label)")
        bad = [a.copy().reshape(-1) for a in (x, y)]
        bad[k][i] = np.nan
        args2 = (bad[0].reshape(shape), bad[1].reshape(shape)) + args[2:]
        out2 = _sigmoid_focal(*(jnp.asarray(a) for a in args2), alpha_kind)
        others = np.arange(n) != i
        for before, after in zip(out, out2, strict=True):
            before, after = P.to_f64(before).reshape(-1), P.to_f64(after).reshape(-1)
            assert np.isnan(after[i]) and same(before[others], after[others])


@functools.partial(jax.jit, static_argnames=("alpha_kind", "path"))
def _softmax_focal(x, labels, alpha, gamma, ct, alpha_kind, path=_paths.PICKED):
    a = {"none": None, "scalar": alpha[0], "classes": alpha}[alpha_kind]
    kw = dict(alpha=a, gamma=gamma)
    if alpha_kind != "none":
        kw["ignore_index"] = IGNORE
    with _paths.taken(path):
        loss, pull = jax.vjp(lambda v: jaxce.softmax_focal_loss(v, labels, **kw), x)
        return loss, pull(ct)[0]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@_settings(0.8)
@given(data=st.data())
def test_softmax_focal_loss(data, path):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    shape = draw(st.sampled_from(CE_SHAPES), "shape")
    alpha_kind = draw(st.sampled_from(("none", "scalar", "classes")), "alpha")
    rows, cols = batch_rows(shape)
    x = draw(values(rows, cols, dtype, neg_inf=True), "logits")
    low = 0 if alpha_kind == "none" else IGNORE
    labels = draw(hnp.arrays(np.int32, (rows,), elements=st.integers(low, cols - 1)), "labels")
    cd = cdtype(dtype)
    alpha = cast(draw(hnp.arrays(F64, (cols,), elements=reals(0, 1)), "alpha values"), cd)
    gamma = scalar(draw, st.sampled_from([0.0, 0.5, 2.0]) | reals(0, 5), dtype, "gamma")
    ct = cotangent(draw, (rows,), cd)

    def run(arrays):
        (x,) = arrays
        loss, grad = _softmax_focal(
            jnp.asarray(x.reshape(shape)),
            jnp.asarray(labels.reshape(shape[:-1])),
            jnp.asarray(alpha),
            jnp.asarray(gamma),
            jnp.asarray(ct.reshape(shape[:-1])),
            alpha_kind,
            path,
        )
        assert loss.dtype == cd and grad.dtype == jnp.dtype(dtype)
        return P.to_f64(loss).reshape(rows), P.to_f64(grad).reshape(rows, cols)

    loss, grad = run((x,))
    nan_probe(draw, run, (x,), 0, lambda r, c: labels[r] != IGNORE)
    x64, a64, g64 = x.astype(F64), alpha.astype(F64), float(gamma.astype(F64))
    adm = x64 > -np.inf
    m, log_sum, log_p, p, k = row_stats(x64, adm)
    y = np.clip(labels, 0, cols - 1)
    with np.errstate(invalid="ignore", over="ignore"):
        lp = gather(R.log_softmax(np.where(adm, x64 - m[:, None], -np.inf)), y)
        # -log p_y / 2 from halves: in float64 m - x_y alone overflows for a label logit of
        # -1.7e308 in a row whose max is 1.7e308, where a weight below 1/2 keeps the loss in range
        half_nlp = np.where(gather(adm, y), half_gap(m, log_sum, gather(x64, y)), np.inf)
    a_y = {"none": np.ones(rows), "scalar": np.full(rows, a64[0]), "classes": a64[y]}[alpha_kind]
    u = -np.expm1(lp)  # 1 - p_y, exact where p_y is near 1
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        want = 2 * times(a_y * u**g64, half_nlp)
        ratio = np.where(u > 0, np.abs(lp) / np.where(u > 0, u, 1), 1.0)
        spread = np.where(np.isfinite(lp), g64 * (1 - u) * ratio, 0.0)
        scale = 2 * a_y * u**g64 * (half_nlp + 0.5) * (1 + spread)
    counted = (labels != IGNORE) & (k > 0)
    want, scale = np.where(counted, want, 0.0), np.where(counted, scale, 0.0)
    ambiguous = counted & (a_y == 0) & np.isneginf(lp)  # 0 * inf: NaN or 0 are accepted
    P.compare(
        "softmax_focal_loss",
        dtype,
        loss,
        want,
        scale,
        unit_dtype=P.compute_dtype(dtype),
        mask=~ambiguous,
    )
    P.assert_finite("softmax_focal_loss gradient", grad[np.isfinite(want) & ~ambiguous])


# ================================================================ the fused loss
FUSED_CONFIGS = (  # (token_chunk, vocab_chunk, recompute_logits, reduction): chunks divide nothing
    (3, 4, None, "mean"),
    (2, 5, True, "sum"),
    (4, 3, None, "none"),
    (None, None, False, "mean"),
)
N, D, V = 7, 3, 11


@functools.partial(jax.jit, static_argnames=("config", "capped"))
def _fused_and_unfused(x, w, bias, labels, weights, hyper, ct, config, capped):
    token_chunk, vocab_chunk, recompute, reduction = config
    eps, zl, cap = hyper
    kw = dict(
        ignore_index=IGNORE,
        class_weights=weights,
        label_smoothing=eps,
        z_loss=zl,
        reduction=reduction,
    )
    if capped:
        kw["logit_soft_cap"] = cap

    def fused(x, w, bias):
        return jaxce.linear_softmax_cross_entropy(
            x,
            w,
            labels,
            bias=bias,
            token_chunk=token_chunk,
            vocab_chunk=vocab_chunk,
            recompute_logits=recompute,
            **kw,
        )

    def unfused(x, w, bias):
        dtype = eps.dtype  # float32, or float64 for float64 inputs: the fused loss's precision
        logits = jnp.matmul(x.astype(dtype), w.astype(dtype), precision="highest")
        return CE(logits + bias.astype(dtype)[None, :], labels, **kw)

    loss_f, pull_f = jax.vjp(fused, x, w, bias)
    loss_u, pull_u = jax.vjp(unfused, x, w, bias)
    return loss_f, pull_f(ct), loss_u, pull_u(ct)


# (lowest and highest exponent of x and w, highest exponent of the offset, largest logit's)
GRID = {
    "float16": (-11, 6, 23, 15),
    "bfloat16": (-60, 45, 23, 127),
    "float32": (-60, 45, 23, 127),
    "float64": (-480, 480, 44, 1023),
}


@st.composite
def exact_logits(draw, dtype):
    """``x``, ``w`` and ``bias`` of ``dtype`` whose logits ``x @ w + bias`` are exact in float32:
    ``x = i 2**a``, ``w = j 2**b`` with integers ``|i|, |j| <= 8``, so ``x @ w = k 2**(a+b)``
    with ``|k| <= 192``, and a bias on the same grid, near 0 or every class near an offset
    ``+-2**o 2**(a+b)`` (far from zero: 2**23 for float32), some classes -inf. Both the fused
    and the unfused loss then see exactly the logits the float64 reference sees."""
    low, high, top, largest = GRID[dtype]
    a, b = draw(st.integers(low, high), "x exponent"), draw(st.integers(low, high), "w exponent")
    small = st.integers(-8, 8)
    x = draw(hnp.arrays(np.int64, (N, D), elements=small)) * math.ldexp(1.0, a)
    w = draw(hnp.arrays(np.int64, (D, V), elements=small)) * math.ldexp(1.0, b)
    top = max(0, min(top, largest - (a + b)))  # a bias the input dtype holds
    offset = draw(st.sampled_from([0, 1, -1]), "offset sign") * 2.0 ** draw(
        st.integers(0, top), "offset exponent"
    )
    spread = draw(hnp.arrays(np.int64, (V,), elements=small)) if offset == 0 else 0
    bias = (offset + spread) * math.ldexp(1.0, a + b)
    bias = bias * np.ones(V)
    holes = draw(hnp.arrays(np.int8, (V,), elements=st.integers(0, 7)), "holes") == 0
    bias[holes] = -np.inf
    x, w, bias = (cast(v, dtype) for v in (x, w, bias))
    z = x.astype(F64) @ w.astype(F64) + bias.astype(F64)
    z = z[np.isfinite(z)]
    # exact in the compute dtype (a bias rounded to a 16-bit dtype may leave the grid)
    assume(np.all(z.astype(cdtype(dtype)).astype(F64) == z))
    return x, w, bias


@_settings(0.17)
@given(data=st.data())
def test_fused_equals_unfused(data):
    """``linear_softmax_cross_entropy`` and the unfused loss on ``x @ w + bias`` (in float32)
    against the float64 reference: values and the gradients to ``x``, ``w`` and ``bias``, with
    chunk sizes that divide neither N nor V. The logits are exact in float32 by construction
    (:func:`exact_logits`), far from zero too, so the two losses are compared on the same
    logits."""
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    config = draw(st.sampled_from(FUSED_CONFIGS), "config")
    capped = draw(st.booleans(), "capped")
    x, w, bias = draw(exact_logits(dtype), "x, w, bias")
    labels = draw(hnp.arrays(np.int32, (N,), elements=st.integers(IGNORE, V - 1)), "labels")
    weights = class_weights(draw, V, dtype)
    hyper = (
        draw(st.sampled_from([0.0, 0.1]) | reals(0, 1), "eps"),
        draw(st.sampled_from([0.0, 1e-4, 1.0]), "z_loss"),
        draw(st.sampled_from([5.0, 30.0]), "cap"),
    )
    hyper = tuple(cast(h, cdtype(dtype)) for h in hyper)
    reduction = config[3]
    ct = cotangent(draw, (N,) if reduction == "none" else (), cdtype(dtype))
    out = _fused_and_unfused(
        *(jnp.asarray(a) for a in (x, w, bias, labels, weights)),
        tuple(jnp.asarray(h) for h in hyper),
        jnp.asarray(ct),
        config,
        capped,
    )
    loss_f, grads_f, loss_u, grads_u = out
    assert loss_f.dtype == cdtype(dtype)
    for g, a in zip(grads_f, (x, w, bias), strict=True):
        assert g.dtype == a.dtype

    x64, w64, b64 = x.astype(F64), w.astype(F64), bias.astype(F64)
    z64 = x64 @ w64 + b64
    case = dict(
        dtype=dtype,
        x=z64,
        labels=labels,
        where=np.ones((N, V), bool),
        w=weights,
        hyper=hyper,
        variant="capped" if capped else "options",
    )
    # the per-token cotangent of the reduced loss
    active = (labels != IGNORE) & np.isfinite(b64).any()
    counted = np.where(active, weights.astype(F64)[np.clip(labels, 0, V - 1)], 0.0).sum()
    if reduction == "none":
        per_token = ct.astype(F64)
    elif reduction == "sum":
        per_token = np.full(N, float(ct))
    else:
        per_token = np.full(N, float(ct) / counted if counted else 0.0)
    case["ct"] = per_token
    ref = ce_reference(case)
    want, dz, scale, g_scale = ref["want"], ref["grad"], ref["scale"], ref["g_scale"]
    overflow = ref["overflow"]
    if reduction != "none":
        # divided before the sum, as the loss is: the sum alone may overflow where the mean
        # does not
        denominator = counted if reduction == "mean" else 1.0
        # the mean is the sum over the counted weight, as every loss's (test_reductions): a sum
        # beyond the range is +-inf, even where the mean would be within it
        with np.errstate(over="ignore", invalid="ignore"):
            beyond = abs(want.sum()) >= float(P.finfo(cdtype(dtype)).max)
        want = (want / denominator).sum() if denominator else 0.0
        scale = (scale / denominator).sum() if denominator else 0.0
        overflow = overflow.any() | beyond
    unit = dict(unit_dtype=P.compute_dtype(dtype), overflow=overflow)
    name = "linear_softmax_cross_entropy"
    P.compare(name, dtype, loss_f, want, scale, **unit)
    P.compare(f"{name} (unfused)", dtype, loss_u, want, scale, **unit)

    if not np.all(ref["finite"]):
        return  # a -inf bias at a label: the loss is +inf, its gradient not compared
    dz = np.where(np.isfinite(b64), dz, 0.0)
    top = float(P.finfo(cdtype(dtype)).max)
    wants = (dz @ w64.T, x64.T @ dz, dz.sum(0))
    scales = (g_scale @ np.abs(w64).T, np.abs(x64).T @ g_scale, g_scale.sum(0))
    # beyond the range: a row's z-loss coefficient, or a product of the matmuls
    rows = ref["g_overflow"].astype(F64)
    big = np.abs(dz)
    overflows = (
        (rows[:, None] + (big @ np.abs(w64).T > top)) > 0,
        (np.abs(x64).T @ rows[:, None] + (np.abs(x64).T @ big > top)) > 0,
        (rows.sum() + (big.sum(0) > top)) > 0,
    )
    for got_f, got_u, want, scale, over in zip(
        grads_f, grads_u, wants, scales, overflows, strict=True
    ):
        u = dict(unit_dtype=dtype, overflow=over)
        P.compare(f"{name} (gradient)", dtype, got_f, want, scale, **u)
        P.compare(f"{name} (unfused, gradient)", dtype, got_u, want, scale, **u)


# ================================================================== invariances
def assert_close(name, a, b, scale, dtype, units=4.0):
    """``a`` and ``b`` (two results of jaxce) agree to ``units`` units of ``dtype``'s epsilon
    relative to ``scale`` (or of its smallest normal number); NaN and infinities must match."""
    a, b = P.to_f64(a), P.to_f64(b)
    scale = np.broadcast_to(np.asarray(scale, F64), a.shape)
    info = P.finfo(dtype)
    nonfinite = ~np.isfinite(a) | ~np.isfinite(b)
    assert same(a[nonfinite], b[nonfinite]), f"{name}: {a[nonfinite]} != {b[nonfinite]}"
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(a - b) / np.maximum(scale * float(info.eps), float(info.smallest_normal))
    err = np.where(nonfinite, 0.0, err)
    assert np.all(err <= units), f"{name}: {np.max(err):.3g} units apart at {np.argmax(err)}"


REDUCTION_CASES = tuple((d, (6, 5)) for d in DTYPES) + (("float32", (0, 5)),)


@jax.jit
def _all_reductions(x, labels, where, weights, soft, log_probs, bx, by, probs, eps, zl):
    """Every loss with ``"none"``, ``"sum"`` and ``"mean"``."""
    losses = {
        "ce": lambda r: CE(
            x,
            labels,
            where=where,
            class_weights=weights,
            label_smoothing=eps,
            z_loss=zl,
            ignore_index=IGNORE,
            reduction=r,
        ),
        "soft": lambda r: jaxce.softmax_cross_entropy(
            x, soft, where=where, class_weights=weights, label_smoothing=eps, reduction=r
        ),
        "nll": lambda r: jaxce.nll_loss(
            log_probs, labels, ignore_index=IGNORE, class_weights=weights, reduction=r
        ),
        "focal": lambda r: jaxce.softmax_focal_loss(x, labels, ignore_index=IGNORE, reduction=r),
        "sbce": lambda r: jaxce.sigmoid_binary_cross_entropy(bx, by, reduction=r),
        "bce": lambda r: jaxce.binary_cross_entropy(probs, by, reduction=r),
        "sfocal": lambda r: jaxce.sigmoid_focal_loss(bx, by, reduction=r),
        "entropy": lambda r: jaxce.entropy(probs, reduction=r),
        "softmax_entropy": lambda r: jaxce.softmax_entropy(x, reduction=r),
        "kl": lambda r: jaxce.kl_divergence(log_probs, soft, where=where, reduction=r),
    }
    return {k: tuple(f(r) for r in ("none", "sum", "mean")) for k, f in losses.items()}


@_settings(0.3)
@given(data=st.data())
def test_reductions(data):
    """``"sum"`` is the sum of ``"none"``; ``"mean"`` is that sum over the counted weight (the
    class weights of the counted examples for the integer-label losses, the number of
    non-ignored examples for the focal loss, of examples or elements otherwise); 0 if that is
    0, unless the sum is NaN. Some batches hold a poisoned example (a NaN logit or a label out
    of range), some of them alone among ignored ones with class weights of 0: a mean over
    nothing whose sum is NaN is NaN."""
    draw = data.draw
    dtype, shape = draw(st.sampled_from(REDUCTION_CASES), "case")
    rows, cols = shape
    x = draw(values(rows, cols, dtype, neg_inf=True), "logits")
    labels = draw(hnp.arrays(np.int32, (rows,), elements=st.integers(IGNORE, cols - 1)), "y")
    where = booleans(draw, shape)
    weights = class_weights(draw, cols, dtype)
    poison = draw(st.sampled_from(["none", "NaN logit", "label out of range"]), "poison")
    if poison != "none" and rows:
        r = draw(st.integers(0, rows - 1), "poisoned row")
        if poison == "NaN logit":
            x[r, draw(st.integers(0, cols - 1), "column")] = np.nan
        else:
            labels[r] = cols + draw(st.integers(0, 3), "past the last class")
        if draw(st.booleans(), "counts for nothing"):
            labels[np.arange(rows) != r] = IGNORE
            weights[:] = 0
    soft = probabilities(draw, rows, cols, dtype)
    soft[np.isneginf(x)] = 0
    log_probs = -np.abs(draw(values(rows, cols, dtype), "log_probs"))
    bx = draw(values(rows, cols, dtype), "binary logits")
    by = unit_interval(draw, shape, dtype)
    probs = unit_interval(draw, shape, dtype)
    eps = scalar(draw, st.sampled_from([0.0, 0.1]), dtype, "eps")
    zl = scalar(draw, st.sampled_from([0.0, 1e-4]), dtype, "z_loss")
    out = _all_reductions(
        *(jnp.asarray(a) for a in (x, labels, where, weights, soft, log_probs, bx, by, probs)),
        jnp.asarray(eps),
        jnp.asarray(zl),
    )
    x64, w64 = x.astype(F64), weights.astype(F64)
    y = np.clip(labels, 0, cols - 1)
    kept = labels != IGNORE
    nonempty = (where & (x64 > -np.inf)).any(-1)
    elements, examples = float(rows * cols), float(rows)
    denominators = {
        "ce": np.where(kept & nonempty, w64[y], 0.0).sum(),
        "soft": examples,
        "nll": np.where(kept, w64[y], 0.0).sum(),
        "focal": float((kept & (x64 > -np.inf).any(-1)).sum()),
        "sbce": elements,
        "bce": elements,
        "sfocal": elements,
        "entropy": examples,
        "softmax_entropy": examples,
        "kl": examples,
    }
    unit_dtype = P.compute_dtype(dtype)
    for name, (none, total, mean) in out.items():
        none = P.to_f64(none)
        assert total.shape == mean.shape == () and total.dtype == cdtype(dtype)
        want, size = none.sum(), np.abs(none).sum()
        d = denominators[name]
        want_mean = want / d if d else (want if np.isnan(want) else 0.0)
        if np.isfinite(want) and abs(want) >= float(P.finfo(unit_dtype).max):
            # the sum is beyond the range: +-inf (or NaN from inf - inf) is the right answer
            assert not np.isfinite(P.to_f64(total)), name
            continue
        assert_close(f"{name} sum", total, want, size, unit_dtype, units=2 * none.size + 2)
        assert_close(
            f"{name} mean",
            mean,
            want_mean,
            size / d if d else 0.0,
            unit_dtype,
            units=2 * none.size + 4,
        )


@jax.jit
def _shiftable(x, labels, where, weights, soft, eps):
    """The functions of the logits that do not change when a row is shifted by a constant."""
    return dict(
        ce=CE(x, labels),
        ce_options=CE(
            x,
            labels,
            where=where,
            class_weights=weights,
            label_smoothing=eps,
            ignore_index=IGNORE,
        ),
        log_softmax=jaxce.log_softmax(x, where=where),
        softmax=jaxce.softmax(x, where=where),
        softmax_entropy=jaxce.softmax_entropy(x),
        soft=jaxce.softmax_cross_entropy(
            x, soft, where=where, class_weights=weights, label_smoothing=eps
        ),
        focal=jaxce.softmax_focal_loss(x, labels),
        fused=jaxce.linear_softmax_cross_entropy(  # logits = I @ x, exactly
            jnp.eye(x.shape[0], dtype=x.dtype), x, labels, reduction="none", vocab_chunk=2
        ),
        logsumexp=jaxce.logsumexp(x, where=where),
    )


MANTISSA = {"float16": 11, "bfloat16": 8, "float32": 24, "float64": 53}
MIN_EXPONENT = {"float16": -14, "bfloat16": -126, "float32": -126, "float64": -1022}
MAX_BINARY_EXPONENT = {"float16": 15, "bfloat16": 127, "float32": 127, "float64": 1023}


@_settings(0.3)
@given(data=st.data())
def test_shift_invariance(data):
    """Shifting each row of logits by a constant changes no loss and no probability, far from
    zero too: on a grid where ``x + c`` is exact, the results are bitwise the same (jaxce works
    with differences to the row max, which are exact); logsumexp moves by ``c``."""
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    rows, cols = 6, 5
    p = MANTISSA[dtype]
    # x = k 2**e and c = n 2**e with |k| < 2**(p-2), |n| < 2**(p-1): every x + c is exact
    top = MAX_BINARY_EXPONENT[dtype] - p
    e = draw(st.integers(MIN_EXPONENT[dtype], top), "grid exponent")
    k = draw(
        hnp.arrays(
            np.int64, (rows, cols), elements=st.integers(-(2 ** (p - 2)) + 1, 2 ** (p - 2) - 1)
        ),
        "k",
    )
    n = draw(
        hnp.arrays(
            np.int64, (rows, 1), elements=st.integers(-(2 ** (p - 1)) + 1, 2 ** (p - 1) - 1)
        ),
        "n",
    )
    spread = draw(st.integers(0, p - 2), "spread")  # small k: nearby logits
    k = k >> (p - 2 - spread)
    grid = math.ldexp(1.0, e)
    x = (k * grid).astype(jnp.dtype(dtype))
    holes = draw(hnp.arrays(np.int8, (rows, cols), elements=st.integers(0, 5)), "holes") == 0
    x[holes] = -np.inf
    shifted = x.astype(F64) + n * grid
    assert np.all(shifted.astype(jnp.dtype(dtype)).astype(F64) == shifted)  # exact
    shifted = shifted.astype(jnp.dtype(dtype))
    labels = draw(hnp.arrays(np.int32, (rows,), elements=st.integers(IGNORE, cols - 1)), "y")
    labels = np.where(labels == IGNORE, 0, labels) if not draw(st.booleans()) else labels
    where = booleans(draw, (rows, cols))
    weights = class_weights(draw, cols, dtype)
    soft = probabilities(draw, rows, cols, dtype)
    soft[holes] = 0
    eps = scalar(draw, st.sampled_from([0.0, 0.1, 1.0]), dtype, "eps")
    rest = tuple(jnp.asarray(a) for a in (where, weights, soft, eps))
    plain_labels = jnp.asarray(np.maximum(labels, 0))
    before = _shiftable(jnp.asarray(x), plain_labels, *rest)
    after = _shiftable(jnp.asarray(shifted), plain_labels, *rest)
    for name in before:
        if name == "logsumexp":
            c = (n[:, 0] * grid).astype(F64)
            want = P.to_f64(before[name]) + c
            size = np.abs(P.to_f64(before[name])) + np.abs(c) + 1
            assert_close(name, after[name], want, size, dtype)
        elif name == "ce_options" and np.any(labels == IGNORE):
            pass
        else:
            assert same(before[name], after[name]), name


@jax.jit
def _equivalent(x, labels, where, weights, eps, bx, by, pos_weight, bw):
    """Pairs of computations that must agree."""
    onehot = jax.nn.one_hot(labels, x.shape[-1], dtype=x.dtype)
    options = dict(where=where, class_weights=weights, label_smoothing=eps)

    def integer(v):
        return CE(v, labels, **options)

    def soft(v):
        return jaxce.softmax_cross_entropy(v, onehot, **options)

    def grads(f):
        loss, pull = jax.vjp(f, x)
        return loss, pull(jnp.ones_like(loss))[0]

    bx32, by32 = bx.astype(eps.dtype), by.astype(eps.dtype)  # exact, and 1 - y exact too
    two = jnp.stack([jnp.zeros_like(bx32), bx32], axis=-1)  # sigmoid(x) = softmax([0, x])[1]
    two_labels = jnp.stack([1 - by32, by32], axis=-1)
    class_w = jnp.stack([jnp.ones_like(pos_weight), pos_weight])
    binary = jaxce.softmax_cross_entropy(
        two, two_labels, class_weights=class_w, label_smoothing=eps
    )
    return dict(
        integer=grads(integer),
        soft=grads(soft),
        focal=jaxce.softmax_focal_loss(x, labels, gamma=0.0),
        plain=CE(x, labels),
        sigmoid=jaxce.sigmoid_binary_cross_entropy(
            bx, by, pos_weight=pos_weight, weights=bw, label_smoothing=eps
        ),
        # a weight of 0 is 0 even where the unweighted loss overflows (as the sigmoid BCE's)
        softmax=jnp.where(bw == 0, jnp.zeros_like(binary), bw * binary),
    )


@_settings(0.3)
@given(data=st.data())
def test_equivalent_formulations(data):
    """One-hot soft labels = integer labels (with smoothing, class weights and masks), values
    and gradients; focal loss with gamma = 0 = cross-entropy; sigmoid BCE (with pos_weight,
    weights and smoothing) = two-class softmax CE on ``[0, x]``."""
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), "dtype")
    rows, cols = 6, 5
    x = draw(values(rows, cols, dtype, neg_inf=True), "logits")
    labels = draw(hnp.arrays(np.int32, (rows,), elements=st.integers(0, cols - 1)), "labels")
    x[np.arange(rows), labels] = np.where(
        np.isneginf(x[np.arange(rows), labels]), 0, x[np.arange(rows), labels]
    )  # a finite label logit (a -inf one makes both losses +inf)
    where = booleans(draw, (rows, cols))
    where[np.arange(rows), labels] = True  # the soft loss drops a masked label's mass
    weights = class_weights(draw, cols, dtype)
    eps = scalar(draw, st.sampled_from([0.0, 0.1, 1.0]) | reals(0, 1), dtype, "eps")
    bx = draw(values(8, 1, dtype), "binary logits")[:, 0]
    by = unit_interval(draw, (8,), dtype)
    pos_weight = scalar(draw, st.sampled_from([1.0, 3.0]) | reals(0, 10), dtype, "pos_weight")
    bw = cast(draw(hnp.arrays(F64, (8,), elements=reals(0, 10)), "weights"), cdtype(dtype))
    arrays = (x, labels, where, weights, eps, bx, by, pos_weight, bw)
    out = _equivalent(*(jnp.asarray(a) for a in arrays))
    case = dict(
        dtype=dtype,
        variant="options",
        x=x,
        labels=labels,
        where=where,
        w=weights,
        hyper=(eps, np.zeros((), cdtype(dtype)), np.ones((), cdtype(dtype))),
        ct=np.ones(rows, cdtype(dtype)),
    )
    ref = ce_reference(case)
    ok = ~ref["overflow"] & (np.abs(ref["want"]) < float(P.finfo(cdtype(dtype)).max) / 2)
    unit = P.compute_dtype(dtype)
    soft, integer = (P.to_f64(out[k][0])[ok] for k in ("soft", "integer"))
    assert_close("one-hot soft labels", soft, integer, ref["scale"][ok], unit, 16)
    soft, integer = (P.to_f64(out[k][1])[ok] for k in ("soft", "integer"))
    assert_close("their gradients", soft, integer, ref["g_scale"][ok], dtype, 16)
    ref = ce_reference(
        dict(case, variant="plain", where=np.ones_like(where), w=np.ones_like(weights))
    )
    ok = ~ref["overflow"] & (np.abs(ref["want"]) < float(P.finfo(cdtype(dtype)).max) / 2)
    focal, plain = (P.to_f64(out[k])[ok] for k in ("focal", "plain"))
    assert_close("focal loss, gamma = 0", focal, plain, ref["scale"][ok], unit, 16)
    # the two-class softmax has an absolute error of a unit per term (its log of a sum)
    x64, y64, e64 = bx.astype(F64), by.astype(F64), float(eps.astype(F64))
    t = (1 - e64) * y64 + e64 / 2
    pos, neg = -scipy.special.log_expit(x64), -scipy.special.log_expit(-x64)
    pw, w64 = float(pos_weight.astype(F64)), bw.astype(F64)
    with np.errstate(over="ignore"):
        scale = w64 * (pw * t * (pos + 1) + (1 - t) * (neg + 1) + (pos + neg) * (e64 > 0))
        unweighted = pw * t * pos + (1 - t) * neg
    # the two-class form weights its loss afterwards, so it overflows where the unweighted loss
    # does; the sigmoid BCE weights first (its result can be finite there)
    fits = unweighted < float(P.finfo(unit).max) / 2
    sigmoid, softmax = (P.to_f64(out[k])[fits] for k in ("sigmoid", "softmax"))
    assert_close("sigmoid BCE", sigmoid, softmax, scale[fits], unit, 16)


@jax.jit
def _ce_rows(x, labels, where, weights, eps, zl):
    """The options loss of a batch, by ``vmap`` over its rows."""

    def one(xi, yi, wi):
        return CE(
            xi,
            yi,
            where=wi,
            class_weights=weights,
            label_smoothing=eps,
            z_loss=zl,
            ignore_index=IGNORE,
        )

    return jax.vmap(one)(x, labels, where)


@jax.jit
def _ce_row(x, label, where, weights, eps, zl):
    return CE(
        x,
        label,
        where=where,
        class_weights=weights,
        label_smoothing=eps,
        z_loss=zl,
        ignore_index=IGNORE,
    )


@_settings(0.2)
@given(case=ce_cases(shapes=((6, 5),), variants=("options",)), data=st.data())
def test_vmap_loop_and_class_permutation(case, data):
    """``vmap`` over examples = one call per example = the batched call; permuting the classes
    (logits, mask, class weights and labels alike) changes nothing but the order of sums."""
    x, labels, where, w = case["x"], case["labels"], case["where"], case["w"]
    eps, zl, _ = (jnp.asarray(h) for h in case["hyper"])
    batched, grad = run_ce(case)
    mapped = _ce_rows(*(jnp.asarray(a) for a in (x, labels, where, w)), eps, zl)
    looped = [
        _ce_row(*(jnp.asarray(a) for a in (x[i], labels[i], where[i], w)), eps, zl)
        for i in range(x.shape[0])
    ]
    ref = ce_reference(case)
    scale, g_scale = ref["scale"], ref["g_scale"]
    unit = P.compute_dtype(case["dtype"])
    assert_close("vmap", mapped, batched, scale, unit)
    assert_close("loop", np.stack([P.to_f64(v) for v in looped]), batched, scale, unit)
    perm = np.asarray(data.draw(st.permutations(range(x.shape[1])), "permutation"))
    inverse = np.argsort(perm)
    permuted = dict(
        case,
        x=x[:, perm],
        where=where[:, perm],
        w=w[perm],
        labels=np.where(labels == IGNORE, IGNORE, inverse[np.maximum(labels, 0)]),
    )
    loss2, grad2 = run_ce(permuted)
    cols = x.shape[1]
    assert_close("permuted classes", loss2, batched, scale, unit, units=2 * cols)
    assert_close("their gradients", grad2[:, inverse], grad, g_scale, case["dtype"], 2 * cols)


@functools.partial(jax.jit, static_argnames=("axis",))
def _along(x, labels, probs, where, axis):
    """Every function with a class axis, along ``axis``."""
    return dict(
        ce=CE(x, labels, axis=axis, where=where, label_smoothing=0.1, ignore_index=IGNORE),
        soft=jaxce.softmax_cross_entropy(x, probs, axis=axis, where=where),
        nll=jaxce.nll_loss(x, labels, axis=axis, ignore_index=IGNORE),
        focal=jaxce.softmax_focal_loss(x, labels, axis=axis),
        log_softmax=jaxce.log_softmax(x, axis=axis, where=where),
        softmax=jaxce.softmax(x, axis=axis, where=where),
        logsumexp=jaxce.logsumexp(x, axis=axis, where=where),
        entropy=jaxce.entropy(probs, axis=axis),
        softmax_entropy=jaxce.softmax_entropy(x, axis=axis),
        kl=jaxce.kl_divergence(x, probs, axis=axis, where=where),
    )


@_settings(0.2)
@given(data=st.data())
def test_class_axis(data):
    """A class axis in the middle (PyTorch's ``[N, C, d]``) or a tuple of axes gives the
    results of the same classes moved to the last axis: exactly on CPU, to the order of a row's
    sum elsewhere."""
    draw = data.draw
    dtype = draw(st.sampled_from(("float32", "bfloat16")), "dtype")
    axis = draw(st.sampled_from((1, (1, 2), (2, 1))), "axis")
    shape = (2, 3, 4)
    x = draw(values(6, 4, dtype, neg_inf=True), "x").reshape(shape)
    probs = probabilities(draw, 6, 4, dtype).reshape(shape)
    where = booleans(draw, shape)
    axes = (axis,) if isinstance(axis, int) else axis
    rest = tuple(a for a in range(3) if a not in axes)
    classes = math.prod(shape[a] for a in axes)
    labels = draw(
        hnp.arrays(
            np.int32, tuple(shape[a] for a in rest), elements=st.integers(IGNORE, classes - 1)
        ),
        "labels",
    )

    def last(a):
        moved = np.transpose(a, rest + axes)
        return moved.reshape(moved.shape[: len(rest)] + (classes,))

    got = _along(*(jnp.asarray(a) for a in (x, labels, probs, where)), axis=axis)
    want = _along(*(jnp.asarray(a) for a in (last(x), labels, last(probs), last(where))), axis=-1)
    # On CPU, XLA sums a row in the same order whatever its layout: the results are the same
    # bits. A GPU's reduction of a transposed read may add the same terms in another order, so
    # there they agree to a few rounding units of each row's scale: 1 for probabilities, else
    # the largest finite magnitude among the row's logits and the result.
    exact = jax.default_backend() == "cpu"
    x_last = P.to_f64(last(x))
    magnitude = np.max(np.where(np.isfinite(x_last), np.abs(x_last), 0.0), axis=-1)
    for name in got:
        g, w = P.to_f64(got[name]), P.to_f64(want[name])
        if g.shape == x.shape:
            g = last(g)
        if exact:
            assert same(g, w), name
            continue
        finite = np.where(np.isfinite(w), np.abs(w), 0.0)
        per_row = magnitude if w.ndim == magnitude.ndim else magnitude[..., None]
        rows = np.max(finite, axis=-1, keepdims=True) if w.ndim > magnitude.ndim else finite
        scale = 1.0 if name == "softmax" else np.maximum(np.maximum(per_row, rows), 1.0)
        assert_close(name, g, w, scale, dtype, units=4 * classes)


# ============================================================== empty class axis
ZERO_CLASS_FUNCTIONS = {
    "log_softmax": (lambda x: jaxce.log_softmax(x), np.zeros((3, 0))),
    "softmax": (lambda x: jaxce.softmax(x), np.zeros((3, 0))),
    "logsumexp": (lambda x: jaxce.logsumexp(x), np.full(3, -np.inf)),
    "softmax_entropy": (lambda x: jaxce.softmax_entropy(x), np.zeros(3)),
    "entropy": (lambda x: jaxce.entropy(x), np.zeros(3)),
    "kl_divergence": (lambda x: jaxce.kl_divergence(x, x), np.zeros(3)),
}


@pytest.mark.parametrize("name", list(ZERO_CLASS_FUNCTIONS))
def test_zero_classes(name):
    """A class axis of length 0 is a row with no admissible entry: logsumexp -inf, empty
    (log-)probabilities, entropy 0; as ``where=`` already gives for such rows."""
    fn, want = ZERO_CLASS_FUNCTIONS[name]
    got = jax.jit(fn)(jnp.zeros((3, 0), jnp.float32))
    assert got.shape == want.shape
    assert same(got, want)


def test_zero_classes_soft_labels():
    """Soft labels over no classes: a loss of 0 per example (a row with no admissible class, a
    sum over nothing as in optax), with and without smoothing, and an empty gradient."""
    x = jnp.zeros((3, 0))
    assert same(jaxce.softmax_cross_entropy(x, x), np.zeros(3))
    assert same(jaxce.softmax_cross_entropy(x, x, label_smoothing=0.1), np.zeros(3))
    grad = jax.grad(lambda a: jaxce.softmax_cross_entropy(a, x, reduction="sum"))(x)
    assert grad.shape == (3, 0)


# ============================================================== the precision page
def test_precision_page_lists_every_measurement():
    """docs/precision.md has a row for every measured function, a cell for every dtype, and
    each documented worst error within the bound the tests assert."""
    table = P.read_page()
    assert table, "docs/precision.md has no precision table"
    for function, bound in P.BOUNDS.items():
        for dtype in DTYPES:
            assert (function, dtype) in table, f"{function} ({dtype}) missing from the page"
            assert table[(function, dtype)] <= bound, (function, dtype)
    assert {f for f, _ in table} <= set(P.BOUNDS)


def test_precision_merge_keeps_the_worse_cell():
    """``python tests/_precision.py --merge``: each cell the worse of the new run and the table,
    and the table's cells the run did not measure."""
    rows = [
        {"function": "softmax", "dtype": "float32", "units": 0.5, "examples": 3},
        {"function": "softmax", "dtype": "float64", "units": 2.0, "examples": 4},
    ]
    previous = {
        ("softmax", "float32"): 1.5,
        ("softmax", "float64"): 1.0,
        ("sigmoid", "float16"): 0.7,
    }
    merged = {(r["function"], r["dtype"]): r for r in P.merge_worse(rows, previous)}
    assert merged[("softmax", "float32")]["units"] == 1.5
    assert merged[("softmax", "float64")]["units"] == 2.0
    assert merged[("sigmoid", "float16")] == {
        "function": "sigmoid",
        "dtype": "float16",
        "units": 0.7,
        "examples": 0,
    }
