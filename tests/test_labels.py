"""Integer labels of every integer dtype mean the same class in every loss (``jaxce/_labels.py``).

Comparisons happen in the label's own dtype and indices are int32 afterwards, so a narrow label
never wraps into another class and a wide one never wraps into range.
"""

import os
import subprocess
import sys

import _reference as R
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce

C = 300  # more classes than a uint8 or int8 label can name


def _losses(logits, labels, **kw):
    """Every integer-label loss of ``logits`` ``[N, C]`` and ``labels`` ``[N]``."""
    x = jnp.asarray(logits)
    d = 8
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(x.shape[0], d)))
    w = jnp.asarray(rng.normal(size=(d, x.shape[1])) / 4)
    return {
        "cross_entropy": jaxce.softmax_cross_entropy_with_integer_labels(x, labels, **kw),
        "smoothed": jaxce.softmax_cross_entropy_with_integer_labels(
            x, labels, label_smoothing=0.1, **kw
        ),
        "nll": jaxce.nll_loss(jaxce.log_softmax(x), labels, **kw),
        "focal": jaxce.softmax_focal_loss(x, labels, **kw),
        "fused": jaxce.linear_softmax_cross_entropy(h, w, labels, reduction="none", **kw),
    }


DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_integer_dtype_indexes_the_same_class(rng, dtype):
    logits = R.random_logits(rng, (5, C))
    labels = np.array([0, 3, 100, 127, 126])
    want = _losses(logits, jnp.asarray(labels, jnp.int32))
    got = _losses(logits, jnp.asarray(labels.astype(dtype)))
    for name in want:
        R.assert_close(got[name], want[name], rtol=0, atol=0, err_msg=name)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16])
def test_narrow_label_gradient_sits_at_its_own_column(rng, dtype):
    """uint8 label 3 with 300 classes: the gradient's -1 is at column 3 only (not 259)."""
    x = jnp.asarray(R.random_logits(rng, (1, C)))
    label = jnp.asarray(np.array([3], dtype))
    g = jax.grad(lambda v: jnp.sum(jaxce.softmax_cross_entropy_with_integer_labels(v, label)))(x)
    want = R.softmax(np.asarray(x)) - np.eye(C)[[3]]
    R.assert_close(g, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "dtype,value",
    [(np.int64, 2**32 + 3), (np.uint32, 2**31 + 5), (np.uint64, 2**63 + 1), (np.int16, 300)],
)
def test_wide_labels_out_of_range_are_nan_not_wrapped(rng, dtype, value):
    """A label that would wrap into range if cast to int32 first is out of range: NaN."""
    logits = R.random_logits(rng, (2, C))
    labels = jnp.asarray(np.array([value, 1], dtype))
    for name, loss in _losses(logits, labels).items():
        loss = np.asarray(loss)
        assert np.isnan(loss[0]) and np.isfinite(loss[1]), name


_WITHOUT_X64 = """
import numpy as np, jax.numpy as jnp, jaxce
logits = jnp.zeros((2, 5)).at[:, 3].set(5.0)
losses = (
    lambda y: jaxce.softmax_cross_entropy_with_integer_labels(logits, y),
    lambda y: jaxce.nll_loss(logits, y),
    lambda y: jaxce.linear_softmax_cross_entropy(jnp.eye(2), logits, y),
    lambda y: jaxce.check_labels(y, 5),
)
for loss in losses:
    loss(np.array([3, 3], np.int64))  # narrowed to int32 losslessly
    for labels in (np.array([3, 2**32 + 3], np.int64), np.array([0, 2**32], np.uint64)):
        try:
            loss(labels)
        except ValueError as err:
            assert "beyond the range" in str(err) and str(labels[1]) in str(err), err
        else:
            raise AssertionError(f"{labels!r} was accepted")
print("ok")
"""


def test_numpy_int64_labels_beyond_int32_are_an_error_without_x64():
    """Without 64-bit mode JAX narrows a NumPy int64 array to int32, where 2**32 + 3 wraps to
    class 3: the losses and check_labels raise instead of computing class 3's loss."""
    env = dict(os.environ, JAX_ENABLE_X64="0", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_X64], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_ignore_index_in_a_narrow_dtype(rng):
    logits = R.random_logits(rng, (3, C))
    labels = np.array([5, -100, 7])
    want = _losses(logits, jnp.asarray(labels, jnp.int32), ignore_index=-100)
    got = _losses(logits, jnp.asarray(labels, jnp.int8), ignore_index=-100)
    for name in want:
        R.assert_close(got[name], want[name], rtol=0, atol=0, err_msg=name)
        assert float(got[name][1]) == 0.0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_negative_ignore_index_with_unsigned_labels_is_an_error(dtype):
    """uint8 labels cannot equal -100: ignoring class 156 (-100 wrapped) would be silent."""
    labels = jnp.asarray(np.array([1, 156], dtype))
    logits = jnp.zeros((2, C))
    fns = [
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, ignore_index=-100),
        lambda: jaxce.nll_loss(logits, labels, ignore_index=-100),
        lambda: jaxce.softmax_focal_loss(logits, labels, ignore_index=-100),
        lambda: jaxce.linear_softmax_cross_entropy(
            jnp.zeros((2, 3)), jnp.zeros((3, C)), labels, ignore_index=-100
        ),
        lambda: jaxce.check_labels(labels, C, ignore_index=-100),
    ]
    for fn in fns:
        with pytest.raises(ValueError, match=r"ignore_index=-100 can never equal a label"):
            fn()


def test_ignore_index_out_of_a_signed_range_is_an_error():
    with pytest.raises(ValueError, match="dtype int8"):
        jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((1, 3)), jnp.zeros((1,), jnp.int8), ignore_index=-200
        )


@pytest.mark.parametrize("bad", [True, 1.5, "x", jnp.asarray([-100]), jnp.asarray(-100.0)])
def test_ignore_index_type(bad):
    with pytest.raises(TypeError, match="ignore_index must be an int or None"):
        jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((1, 3)), jnp.zeros((1,), jnp.int32), ignore_index=bad
        )


def test_ignore_index_as_a_concrete_integer_scalar():
    """A concrete 0-d integer array (``jnp.int32(-100)``) is the int it holds, as a NumPy
    integer is; a traced one is an error naming the fix (tests/test_bad_input.py)."""
    logits, labels = jnp.zeros((3, 4)), jnp.array([0, -100, 2], jnp.int32)
    ce = jaxce.softmax_cross_entropy_with_integer_labels
    expected = ce(logits, labels, ignore_index=-100)
    for value in (jnp.int32(-100), jnp.asarray(-100, jnp.int16), np.int64(-100)):
        np.testing.assert_array_equal(ce(logits, labels, ignore_index=value), expected)


def test_boolean_labels_are_a_type_error():
    for fn in (
        jaxce.softmax_cross_entropy_with_integer_labels,
        jaxce.nll_loss,
        jaxce.softmax_focal_loss,
    ):
        with pytest.raises(TypeError, match="labels must be an integer array.*bool"):
            fn(jnp.zeros((2, 3)), jnp.array([True, False]))


def test_check_labels_every_dtype():
    jaxce.check_labels(jnp.asarray(np.array([0, 255], np.uint8)), C)
    with pytest.raises(Exception, match="the first is 5"):
        jaxce.check_labels(jnp.asarray(np.array([0, 5], np.uint8)), 3)
    with pytest.raises(Exception, match="found 1 outside"):
        jaxce.check_labels(jnp.asarray(np.array([0, 2**32 + 3], np.int64)), C)
