"""What happens on bad input: the catalogue behind docs/bad_input.md.

Each case is one misuse of one public function, written as a user would make it, with what the
user gets: an exception whose message names the argument, what was expected and what came, raised
at trace time (the same error under ``jax.jit``), or, for a problem only visible at run time, a
documented value (NaN, never a plausible number). docs/bad_input.md renders these cases as a
table; after changing them, regenerate it with

    python tests/test_bad_input.py --write
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxce
import jaxce.sharded

PAGE = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"
BEGIN, END = "<!-- catalogue: begin -->", "<!-- catalogue: end -->"


# ------------------------------------------------------------------------------ outcomes
@dataclasses.dataclass(frozen=True)
class Raises:
    """The call raises ``error`` whose message matches ``pattern`` (naming the argument, what
    was expected and what came); at trace time unless ``trace_time`` is False."""

    error: type[Exception]
    pattern: str
    says: str  # the message's content, for the table
    trace_time: bool = True

    def describe(self) -> str:
        return f"`{self.error.__name__}`: {self.says}"


@dataclasses.dataclass(frozen=True)
class Returns:
    """The call, under ``jax.jit``, returns a value for which ``check`` holds."""

    check: Callable[[object], bool]
    says: str

    def describe(self) -> str:
        return self.says


def raises(error: type[Exception], pattern: str, says: str, *, trace_time=True) -> Raises:
    return Raises(error, pattern, says, trace_time)


def nan_exactly_at(*where: int) -> Callable[[object], bool]:
    """NaN at these flat positions, finite everywhere else."""

    def check(out) -> bool:
        out = np.ravel(np.asarray(out))
        nan = np.zeros(out.shape, bool)
        nan[list(where)] = True
        return bool(np.all(np.isnan(out) == nan) and np.all(np.isfinite(out[~nan])))

    return check


def all_nan(out) -> bool:
    return bool(np.all(np.isnan(np.asarray(out))))


def exactly(value: float) -> Callable[[object], bool]:
    return lambda out: bool(np.all(np.asarray(out) == value))


def checkify_error(pattern: str) -> Callable[[object], bool]:
    """``(err, value)`` from a checkified function: ``err.get()`` matches ``pattern``."""
    return lambda out: re.search(pattern, out[0].get() or "") is not None


# ------------------------------------------------------------------------------ the cases
@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    function: Callable  # the public function misused
    misuse: str  # as a user would write it, for the table
    call: Callable  # does the misuse, given ``arrays`` (traced under jax.jit)
    arrays: tuple
    outcome: Raises | Returns

    def run(self):
        """The misuse, as a zero-argument call."""
        return self.call(*self.arrays)


ce = jaxce.softmax_cross_entropy_with_integer_labels
sharded_ce = jaxce.sharded.softmax_cross_entropy_with_integer_labels
sharded_linear = jaxce.sharded.linear_softmax_cross_entropy

f32, i32 = jnp.float32, jnp.int32
LOGITS = jnp.linspace(-2.0, 2.0, 40, dtype=f32).reshape(4, 10)  # 4 examples, C = 10
LABELS = jnp.array([1, 2, 3, 4], i32)
MULTI = jnp.linspace(-1.0, 1.0, 12, dtype=f32).reshape(4, 3)  # 4 examples, 3 binary labels
TARGETS = jnp.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], f32)
PROBS = jnp.full((4, 3), 1 / 3, f32)
X = jnp.linspace(-1.0, 1.0, 96, dtype=f32).reshape(2, 3, 16)  # [batch, seq, D = 16]
W = jnp.linspace(-0.5, 0.5, 1600, dtype=f32).reshape(16, 100)  # [D, V = 100]
TOKENS = jnp.array([[1, 2, 3], [4, 5, 6]], i32)
# Concrete arrays closed over (a traced one out of range gives NaN, not an error).
NEGATIVE_ALPHA = jnp.linspace(-0.5, 1.0, 10)
SMOOTHING_1_5 = jnp.array(1.5)

# One device is enough for every mistake below: a 1 x 1 mesh, and for a data axis that does not
# divide the batch, an abstract mesh with 2 devices on "data" (the check happens before any
# device is used).
MESH = jax.make_mesh((1, 1), ("data", "model"))
TWO_DATA_DEVICES = jax.sharding.AbstractMesh((2, 1), ("data", "model"))
LOCAL_LOGITS = jax.device_put(LOGITS, NamedSharding(MESH, P(None, "model")))
LOCAL_LABELS = jax.device_put(LABELS, NamedSharding(MESH, P()))


def per_device(loss: Callable) -> Callable:
    """``loss(local_logits, labels)`` run inside ``jax.shard_map`` over ``MESH``, the
    vocabulary split over "model"."""
    specs = (P(None, "model"), P())
    return jax.shard_map(loss, mesh=MESH, in_specs=specs, out_specs=P())


def label_check(logits, labels):
    jaxce.check_labels(labels, logits.shape[-1], ignore_index=-100)
    return ce(logits, labels, ignore_index=-100, reduction="mean")


CASES = [
    # ------------------------------------------------------------------ log_softmax, softmax
    Case(
        "log_softmax/int_x",
        jaxce.log_softmax,
        "`x` of dtype int32 (`jnp.arange(10)`)",
        lambda x: jaxce.log_softmax(x),
        (jnp.arange(10, dtype=i32),),
        raises(TypeError, r"\bx\b.*float.*int32", "`x` must be floating-point; got int32"),
    ),
    Case(
        "log_softmax/axis_none",
        jaxce.log_softmax,
        "`axis=None` (meaning all axes)",
        lambda x: jaxce.log_softmax(x, axis=None),
        (LOGITS,),
        raises(
            TypeError,
            r"axis.*int.*tuple.*None",
            "`axis` must be an int or a non-empty tuple of ints; got None",
        ),
    ),
    Case(
        "softmax/axis_float",
        jaxce.softmax,
        "`axis=1.0`",
        lambda x: jaxce.softmax(x, axis=1.0),
        (LOGITS,),
        raises(TypeError, r"axis.*int.*1\.0", "`axis` must be an int or a tuple of ints; got 1.0"),
    ),
    Case(
        "softmax/axis_repeated",
        jaxce.softmax,
        "`axis=(0, -2)` on a 2-d `x` (the same axis twice)",
        lambda x: jaxce.softmax(x, axis=(0, -2)),
        (LOGITS,),
        raises(ValueError, r"axis=\(0, -2\).*repeat", "`axis=(0, -2)` repeats an axis"),
    ),
    Case(
        "softmax/where_float",
        jaxce.softmax,
        "`where` a float32 0/1 mask",
        lambda x, m: jaxce.softmax(x, where=m),
        (LOGITS, jnp.ones((4, 10), f32)),
        raises(TypeError, r"where.*bool.*float32", "`where` must be boolean; got float32"),
    ),
    Case(
        "logsumexp/axis_out_of_range",
        jaxce.logsumexp,
        "`axis=2` for a 2-d `x`",
        lambda x: jaxce.logsumexp(x, axis=2),
        (LOGITS,),
        raises(
            ValueError,
            r"axis=2.*range.*rank 2",
            "`axis=2` is out of range for rank 2; expected [-2, 2)",
        ),
    ),
    Case(
        "logsumexp/where_shape",
        jaxce.logsumexp,
        "`where` of shape (3,) for `x` of shape (4, 10)",
        lambda x, m: jaxce.logsumexp(x, where=m),
        (LOGITS, jnp.ones(3, bool)),
        raises(
            ValueError,
            r"where.*\(3,\).*\(4, 10\)",
            "`where` of shape (3,) does not broadcast to (4, 10)",
        ),
    ),
    # ------------------------------------------------------------------ sigmoid, soft cap
    Case(
        "sigmoid/bool_x",
        jaxce.sigmoid,
        "`x` a boolean array",
        lambda x: jaxce.sigmoid(x),
        (jnp.array([True, False]),),
        raises(TypeError, r"\bx\b.*float.*bool", "`x` must be floating-point; got bool"),
    ),
    Case(
        "log_sigmoid/list_x",
        jaxce.log_sigmoid,
        "`x` a Python list `[1.0, 2.0]`",
        lambda: jaxce.log_sigmoid([1.0, 2.0]),
        (),
        raises(TypeError, r"\bx\b.*array.*list", "`x` must be an array; got a Python list"),
    ),
    Case(
        "logit_soft_cap/cap_zero",
        jaxce.logit_soft_cap,
        "`cap=0.0`",
        lambda x: jaxce.logit_soft_cap(x, 0.0),
        (LOGITS,),
        raises(
            ValueError,
            r"cap.*\[2\*\*-64, 2\*\*64\] or be inf.*0",
            "`cap` must lie in [2**-64, 2**64] or be inf; got 0.0",
        ),
    ),
    Case(
        "logit_soft_cap/cap_huge",
        jaxce.logit_soft_cap,
        "`cap=1e38` (above 2**64, whose reciprocal XLA's CPU compiler flushes to 0)",
        lambda x: jaxce.logit_soft_cap(x, 1e38),
        (LOGITS,),
        raises(
            ValueError,
            r"cap.*\[2\*\*-64, 2\*\*64\] or be inf.*1e\+38",
            "`cap` must lie in [2**-64, 2**64] or be inf; got 1e+38",
        ),
    ),
    Case(
        "logit_soft_cap/cap_none",
        jaxce.logit_soft_cap,
        "`cap=None` (meaning no cap)",
        lambda x: jaxce.logit_soft_cap(x, None),
        (LOGITS,),
        raises(
            TypeError,
            r"cap.*number.*None.*no cap is cap=inf",
            "`cap` must be a number or a 0-d array; got None (no cap is `cap=inf`)",
        ),
    ),
    # ------------------------------------------------------------------ soft-label CE
    Case(
        "softmax_cross_entropy/int_labels",
        jaxce.softmax_cross_entropy,
        "class indices as `labels` (int32, shape (4,))",
        lambda z, y: jaxce.softmax_cross_entropy(z, y),
        (LOGITS, LABELS),
        raises(TypeError, r"labels.*float.*int32", "`labels` must be floating-point; got int32"),
    ),
    Case(
        "softmax_cross_entropy/labels_shape",
        jaxce.softmax_cross_entropy,
        "`labels` of shape (4,) for logits (4, 10)",
        lambda z, y: jaxce.softmax_cross_entropy(z, y),
        (LOGITS, jnp.zeros(4, f32)),
        raises(
            ValueError,
            r"labels.*\(4, 10\).*\(4,\)",
            "`labels` must have the logits' shape (4, 10); got (4,)",
        ),
    ),
    Case(
        "softmax_cross_entropy/class_weights_shape",
        jaxce.softmax_cross_entropy,
        "`class_weights` of shape (9,) for C = 10",
        lambda z, y, c: jaxce.softmax_cross_entropy(z, y, class_weights=c),
        (LOGITS, jax.nn.softmax(LOGITS), jnp.ones(9, f32)),
        raises(
            ValueError,
            r"class_weights.*\(10,\).*\(9,\)",
            "`class_weights` must have shape (10,); got (9,)",
        ),
    ),
    Case(
        "softmax_cross_entropy/label_smoothing_above_1",
        jaxce.softmax_cross_entropy,
        "`label_smoothing=1.5`",
        lambda z, y: jaxce.softmax_cross_entropy(z, y, label_smoothing=1.5),
        (LOGITS, jax.nn.softmax(LOGITS)),
        raises(
            ValueError,
            r"label_smoothing.*\[0, 1\].*1\.5",
            "`label_smoothing` must lie in [0, 1]; got 1.5",
        ),
    ),
    Case(
        "softmax_cross_entropy/reduction_unknown",
        jaxce.softmax_cross_entropy,
        '`reduction="avg"`',
        lambda z, y: jaxce.softmax_cross_entropy(z, y, reduction="avg"),
        (LOGITS, jax.nn.softmax(LOGITS)),
        raises(
            ValueError,
            r"reduction.*'none', 'mean', 'sum'.*'avg'",
            "`reduction` must be one of 'none', 'mean', 'sum'; got 'avg'",
        ),
    ),
    # ------------------------------------------------------------------ integer-label CE
    Case(
        "softmax_cross_entropy_with_integer_labels/labels_shape",
        ce,
        "`labels` of shape (5,) for logits (4, 10)",
        lambda z, y: ce(z, y),
        (LOGITS, jnp.zeros(5, i32)),
        raises(
            ValueError,
            r"labels.*\(4,\).*\(4, 10\).*\(5,\)",
            "`labels` must have shape (4,) (logits (4, 10) without axis -1); got (5,)",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/where_of_classes",
        ce,
        "`where` of shape (10,) (one flag per class) for logits (4, 10)",
        lambda z, y, m: ce(z, y, where=m),
        (LOGITS, LABELS, jnp.ones(10, bool)),
        raises(
            ValueError,
            r"where.*\(10,\).*one flag per example.*\(4,\).*the array's rank",
            "a `where` with the batch's rank is one flag per example (optax's convention), so it"
            " must broadcast to (4,); a mask of classes needs the logits' rank, e.g. (1, 10)",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/where_ambiguous",
        ce,
        "`where` of shape (1, 4) (a mask of classes) for logits (2, 4, 4), labels (2, 4)",
        lambda z, y, m: ce(z, y, where=m),
        (jnp.zeros((2, 4, 4), f32), jnp.zeros((2, 4), i32), jnp.ones((1, 4), bool)),
        raises(
            ValueError,
            r"where.*\(1, 4\).*ambiguous.*\(2, 4, 4\).*one flag per example.*\(2, 4\)"
            r".*mask of classes.*\(1, 1, 4\)",
            "`where` of shape (1, 4) is ambiguous: one flag per example (broadcast to the labels'"
            " (2, 4)) or a mask of classes; give it the labels' shape (2, 4), or the logits' rank,"
            " e.g. (1, 1, 4), for a mask of classes",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/python_int_label_beyond_int64",
        ce,
        "a Python int label `2**70`",
        lambda z: ce(z, 2**70),
        (LOGITS[0],),
        raises(
            ValueError,
            r"labels=1180591620717411303424 is beyond the range of every integer dtype",
            "`labels=1180591620717411303424` is beyond the range of every integer dtype",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/labels_keepdims",
        ce,
        "`labels` of shape (4, 1) (kept dims) for logits (4, 10)",
        lambda z, y: ce(z, y),
        (LOGITS, LABELS[:, None]),
        raises(
            ValueError,
            r"labels.*\(4,\).*\(4, 1\)",
            "`labels` must have shape (4,); got (4, 1)",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/one_hot_labels",
        ce,
        "one-hot float32 `labels` of the logits' shape",
        lambda z, y: ce(z, y),
        (LOGITS, jax.nn.one_hot(LABELS, 10, dtype=f32)),
        raises(
            TypeError,
            r"labels.*integer.*float32",
            "`labels` must be integer class indices; got float32",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/bool_labels",
        ce,
        "boolean `labels`",
        lambda z, y: ce(z, y),
        (LOGITS, jnp.array([True, False, True, False])),
        raises(
            TypeError,
            r"labels.*integer.*bool",
            "`labels` must be integer class indices; got bool",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/list_labels",
        ce,
        "`labels` a Python list `[1, 2, 3, 4]`",
        lambda z: ce(z, [1, 2, 3, 4]),
        (LOGITS,),
        raises(
            TypeError,
            r"labels.*array.*list",
            "`labels` must be an array; got a Python list",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/none_labels",
        ce,
        "`labels=None`",
        lambda z: ce(z, None),
        (LOGITS,),
        raises(TypeError, r"labels.*array.*None", "`labels` must be an array; got None"),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/int_logits",
        ce,
        "`logits` of dtype int32",
        lambda z, y: ce(z, y),
        (LOGITS.astype(i32), LABELS),
        raises(TypeError, r"logits.*float.*int32", "`logits` must be floating-point; got int32"),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/0d_logits",
        ce,
        "0-d `logits` and 0-d `labels`",
        lambda z, y: ce(z, y),
        (jnp.array(1.0, f32), jnp.array(0, i32)),
        raises(
            ValueError,
            r"\blogits\b.*0-d",
            "`logits` needs a class axis (axis -1); got a 0-d array",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/no_classes",
        ce,
        "`logits` of shape (4, 0): C = 0",
        lambda z, y: ce(z, y),
        (jnp.zeros((4, 0), f32), LABELS),
        raises(
            ValueError,
            r"logits.*0 classes.*at least one",
            "`logits` has 0 classes; integer labels need at least one",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/ignore_index_outside_dtype",
        ce,
        "`ignore_index=-100` with uint8 `labels`",
        lambda z, y: ce(z, y, ignore_index=-100),
        (LOGITS, LABELS.astype(jnp.uint8)),
        raises(
            ValueError,
            r"ignore_index=-100.*uint8.*0\.\.255",
            "`ignore_index=-100` can never equal a uint8 label (0..255)",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/ignore_index_traced",
        ce,
        "`ignore_index` an argument of the jitted function (traced)",
        lambda z, y, i: jax.jit(lambda z, y, i: ce(z, y, ignore_index=i))(z, y, i),
        (LOGITS, LABELS, jnp.int32(-100)),
        raises(
            TypeError,
            r"ignore_index must be an int or None, known when the loss is traced.*static",
            "`ignore_index` must be an int known when the loss is traced; got a traced value:"
            " close over it or mark it static",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/ignore_index_float",
        ce,
        "`ignore_index=-100.0`",
        lambda z, y: ce(z, y, ignore_index=-100.0),
        (LOGITS, LABELS),
        raises(
            TypeError,
            r"ignore_index.*int.*-100\.0",
            "`ignore_index` must be an int or None; got -100.0",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/label_smoothing_vector",
        ce,
        "`label_smoothing` an array of shape (2,)",
        lambda z, y, e: ce(z, y, label_smoothing=e),
        (LOGITS, LABELS, jnp.array([0.1, 0.1], f32)),
        raises(
            ValueError,
            r"label_smoothing.*scalar.*\(2,\)",
            "`label_smoothing` must be a scalar; got shape (2,)",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/label_smoothing_nan",
        ce,
        '`label_smoothing=float("nan")`',
        lambda z, y: ce(z, y, label_smoothing=math.nan),
        (LOGITS, LABELS),
        raises(
            ValueError,
            r"label_smoothing.*\[0, 1\].*nan",
            "`label_smoothing` must lie in [0, 1]; got nan",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/label_smoothing_str",
        ce,
        '`label_smoothing="0.1"` (read from a config file)',
        lambda z, y: ce(z, y, label_smoothing="0.1"),
        (LOGITS, LABELS),
        raises(
            TypeError,
            r"label_smoothing.*number.*str",
            "`label_smoothing` must be a number or a 0-d array; got str '0.1'",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/z_loss_negative",
        ce,
        "`z_loss=-1e-4`",
        lambda z, y: ce(z, y, z_loss=-1e-4),
        (LOGITS, LABELS),
        raises(
            ValueError,
            r"z_loss.*\[0, inf\).*-0\.0001",
            "`z_loss` must lie in [0, inf); got -0.0001",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/z_loss_inf",
        ce,
        '`z_loss=float("inf")`',
        lambda z, y: ce(z, y, z_loss=math.inf),
        (LOGITS, LABELS),
        raises(ValueError, r"z_loss.*finite.*inf", "`z_loss` must be finite; got inf"),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/logit_soft_cap_negative",
        ce,
        "`logit_soft_cap=-30.0`",
        lambda z, y: ce(z, y, logit_soft_cap=-30.0),
        (LOGITS, LABELS),
        raises(
            ValueError,
            r"logit_soft_cap.*\[2\*\*-64, 2\*\*64\] or be inf.*-30",
            "`logit_soft_cap` must lie in [2**-64, 2**64] or be inf; got -30.0",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/logit_soft_cap_huge",
        ce,
        "`logit_soft_cap=1e38`",
        lambda z, y: ce(z, y, logit_soft_cap=1e38),
        (LOGITS, LABELS),
        raises(
            ValueError,
            r"logit_soft_cap.*\[2\*\*-64, 2\*\*64\] or be inf.*1e\+38",
            "`logit_soft_cap` must lie in [2**-64, 2**64] or be inf; got 1e+38",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/reduction_none_object",
        ce,
        "`reduction=None`",
        lambda z, y: ce(z, y, reduction=None),
        (LOGITS, LABELS),
        raises(
            ValueError,
            r"reduction.*'none', 'mean', 'sum'.*None",
            "`reduction` must be one of 'none', 'mean', 'sum'; got None",
        ),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/label_out_of_range",
        ce,
        "labels 10 and -1 for C = 10, under `jax.jit`",
        lambda z, y: ce(z, y),
        (LOGITS, jnp.array([0, 10, 9, -1], i32)),
        Returns(nan_exactly_at(1, 3), "NaN for those examples only"),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/padding_without_ignore_index",
        ce,
        'padding labels -100 without `ignore_index=-100`, `reduction="mean"`',
        lambda z, y: ce(z, y, reduction="mean"),
        (LOGITS, jnp.array([0, -100, 9, 1], i32)),
        Returns(all_nan, "NaN"),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/all_ignored_mean",
        ce,
        'every label equal to `ignore_index`, `reduction="mean"`',
        lambda z, y: ce(z, y, ignore_index=-100, reduction="mean"),
        (LOGITS, jnp.full(4, -100, i32)),
        Returns(exactly(0.0), "0 (a mean over nothing)"),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/out_of_range_in_a_mean_over_nothing",
        ce,
        "the last label 10 for C = 10, the others `ignore_index`, class weights `arange(10)` "
        '(0 for class 0), `reduction="mean"`, under `jax.jit`',
        jax.jit(
            lambda z, y: ce(
                z, y, ignore_index=-100, class_weights=jnp.arange(10.0), reduction="mean"
            )
        ),
        (LOGITS, jnp.array([-100, -100, -100, 10], i32)),
        Returns(all_nan, "NaN (a mean over nothing is 0 only if its sum is not NaN)"),
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels/nan_logit",
        ce,
        "a NaN among the second example's logits",
        lambda z, y: ce(z, y),
        (LOGITS.at[1, 3].set(jnp.nan), LABELS),
        Returns(nan_exactly_at(1), "NaN for that example only"),
    ),
    *(
        Case(
            f"softmax_cross_entropy_with_integer_labels/traced_{name}_{tag}",
            ce,
            f"`{name}` traced under `jax.jit` (a schedule) that reaches {value:g}{why}",
            lambda z, y, v, name=name: ce(z, y, **{name: v}),
            (LOGITS, LABELS, jnp.array(value, f32)),
            Returns(all_nan, "NaN (the value is unknown at trace time)"),
        )
        for name, tag, value, why in (
            ("label_smoothing", "above_1", 1.5, ""),
            ("logit_soft_cap", "huge", 1e38, " (above 2**64)"),
        )
    ),
    # ------------------------------------------------------------------ nll_loss
    Case(
        "nll_loss/labels_shape_axis1",
        jaxce.nll_loss,
        "`axis=1` on log_probs (4, 10, 3) with `labels` of shape (4, 10)",
        lambda lp, y: jaxce.nll_loss(lp, y, axis=1),
        (jnp.zeros((4, 10, 3), f32), jnp.zeros((4, 10), i32)),
        raises(
            ValueError,
            r"labels.*\(4, 3\).*\(4, 10\)",
            "`labels` must have shape (4, 3) (log_probs without axis 1); got (4, 10)",
        ),
    ),
    Case(
        "nll_loss/label_out_of_range",
        jaxce.nll_loss,
        "label 10 for C = 10, under `jax.jit`",
        lambda lp, y: jaxce.nll_loss(lp, y),
        (jax.nn.log_softmax(LOGITS), jnp.array([0, 10, 9, 1], i32)),
        Returns(nan_exactly_at(1), "NaN for that example only"),
    ),
    # ------------------------------------------------------------------ binary losses
    Case(
        "sigmoid_binary_cross_entropy/pos_weight_per_example",
        jaxce.sigmoid_binary_cross_entropy,
        "`pos_weight` of shape (4,) (one per example) for logits (4, 3)",
        lambda z, y, pw: jaxce.sigmoid_binary_cross_entropy(z, y, pos_weight=pw),
        (MULTI, TARGETS, jnp.ones(4, f32)),
        raises(
            ValueError,
            r"pos_weight.*\(4,\).*\(3,\)",
            "`pos_weight` of shape (4,) does not broadcast to the classes (3,)",
        ),
    ),
    Case(
        "sigmoid_binary_cross_entropy/weights_per_example",
        jaxce.sigmoid_binary_cross_entropy,
        "`weights` of shape (4,) (one per example; (4, 1) broadcasts) for logits (4, 3)",
        lambda z, y, w: jaxce.sigmoid_binary_cross_entropy(z, y, weights=w),
        (MULTI, TARGETS, jnp.ones(4, f32)),
        raises(
            ValueError,
            r"weights.*\(4,\).*\(4, 3\)",
            "`weights` of shape (4,) does not broadcast to (4, 3)",
        ),
    ),
    Case(
        "sigmoid_binary_cross_entropy/pos_weight_int",
        jaxce.sigmoid_binary_cross_entropy,
        "`pos_weight=2` (a Python int)",
        lambda z, y: jaxce.sigmoid_binary_cross_entropy(z, y, pos_weight=2),
        (MULTI, TARGETS),
        raises(
            TypeError,
            r"pos_weight.*float.*int",
            "`pos_weight` must be floating-point; got an integer dtype",
        ),
    ),
    Case(
        "sigmoid_binary_cross_entropy/complex_labels",
        jaxce.sigmoid_binary_cross_entropy,
        "`labels` of dtype complex64",
        lambda z, t: jaxce.sigmoid_binary_cross_entropy(z, t),
        (MULTI, TARGETS.astype(jnp.complex64)),
        raises(TypeError, r"labels.*real.*complex64", "`labels` must be real; got complex64"),
    ),
    Case(
        "binary_cross_entropy/weights_rank",
        jaxce.binary_cross_entropy,
        "`weights` of shape (2, 4, 3) for probs (4, 3)",
        lambda p, y, w: jaxce.binary_cross_entropy(p, y, weights=w),
        (PROBS, TARGETS, jnp.ones((2, 4, 3), f32)),
        raises(
            ValueError,
            r"weights.*\(2, 4, 3\).*\(4, 3\)",
            "`weights` of shape (2, 4, 3) does not broadcast to (4, 3)",
        ),
    ),
    Case(
        "binary_cross_entropy/probs_outside_0_1",
        jaxce.binary_cross_entropy,
        "`probs` 1.5 and -0.5 (logits passed as probabilities), under `jax.jit`",
        lambda p, y: jaxce.binary_cross_entropy(p, y),
        (jnp.array([1.5, -0.5, 0.5], f32), jnp.array([1.0, 0.0, 1.0], f32)),
        Returns(nan_exactly_at(0, 1), "NaN for those entries only"),
    ),
    # ------------------------------------------------------------------ information
    Case(
        "entropy/int_probs",
        jaxce.entropy,
        "`probs` of dtype int32",
        lambda p: jaxce.entropy(p),
        (TARGETS.astype(i32),),
        raises(TypeError, r"probs.*float.*int32", "`probs` must be floating-point; got int32"),
    ),
    Case(
        "entropy/negative_probs",
        jaxce.entropy,
        "`probs` with a negative entry in the first row, under `jax.jit`",
        lambda p: jaxce.entropy(p),
        (jnp.array([[-0.5, 1.5], [0.5, 0.5]], f32),),
        Returns(nan_exactly_at(0), "NaN for that row only"),
    ),
    Case(
        "softmax_entropy/none_logits",
        jaxce.softmax_entropy,
        "`logits=None`",
        lambda: jaxce.softmax_entropy(None),
        (),
        raises(TypeError, r"logits.*array.*None", "`logits` must be an array; got None"),
    ),
    Case(
        "kl_divergence/targets_shape",
        jaxce.kl_divergence,
        "`targets` of shape (4,) for log_predictions (4, 10)",
        lambda lq, t: jaxce.kl_divergence(lq, t),
        (jax.nn.log_softmax(LOGITS), jnp.zeros(4, f32)),
        raises(
            ValueError,
            r"targets.*\(4, 10\).*\(4,\)",
            "`targets` must have the shape of log_predictions (4, 10); got (4,)",
        ),
    ),
    Case(
        "kl_divergence/negative_target",
        jaxce.kl_divergence,
        "a target of -0.1 in the first row (teacher logits passed as probabilities)",
        lambda lq, t: jaxce.kl_divergence(lq, t),
        (jax.nn.log_softmax(LOGITS), jnp.full((4, 10), 0.1, f32).at[0, 3].set(-0.1)),
        Returns(nan_exactly_at(0), "NaN for that row only (as optax)"),
    ),
    # ------------------------------------------------------------------ focal losses
    Case(
        "sigmoid_focal_loss/alpha_above_1",
        jaxce.sigmoid_focal_loss,
        "`alpha=1.5`",
        lambda z, y: jaxce.sigmoid_focal_loss(z, y, alpha=1.5),
        (MULTI, TARGETS),
        raises(ValueError, r"alpha.*\[0, 1\].*1\.5", "`alpha` must lie in [0, 1]; got 1.5"),
    ),
    Case(
        "sigmoid_focal_loss/alpha_vector",
        jaxce.sigmoid_focal_loss,
        "`alpha` an array of shape (2,)",
        lambda z, y, a: jaxce.sigmoid_focal_loss(z, y, alpha=a),
        (MULTI, TARGETS, jnp.array([0.25, 0.75], f32)),
        raises(ValueError, r"alpha.*scalar.*\(2,\)", "`alpha` must be a scalar; got shape (2,)"),
    ),
    Case(
        "sigmoid_focal_loss/gamma_negative",
        jaxce.sigmoid_focal_loss,
        "`gamma=-1.0`",
        lambda z, y: jaxce.sigmoid_focal_loss(z, y, gamma=-1.0),
        (MULTI, TARGETS),
        raises(ValueError, r"gamma.*\[0, inf\).*-1", "`gamma` must lie in [0, inf); got -1.0"),
    ),
    Case(
        "sigmoid_focal_loss/gamma_inf",
        jaxce.sigmoid_focal_loss,
        '`gamma=float("inf")`',
        lambda z, y: jaxce.sigmoid_focal_loss(z, y, gamma=math.inf),
        (MULTI, TARGETS),
        raises(ValueError, r"gamma.*finite.*inf", "`gamma` must be finite; got inf"),
    ),
    Case(
        "softmax_focal_loss/alpha_shape",
        jaxce.softmax_focal_loss,
        "`alpha` of shape (9,) for C = 10",
        lambda z, y, a: jaxce.softmax_focal_loss(z, y, alpha=a),
        (LOGITS, LABELS, jnp.full(9, 0.25, f32)),
        raises(
            ValueError,
            r"alpha.*\(10,\).*\(9,\)",
            "`alpha` must be a scalar or have shape (10,); got (9,)",
        ),
    ),
    Case(
        "softmax_focal_loss/alpha_list",
        jaxce.softmax_focal_loss,
        "`alpha` a Python list of 10 per-class weights",
        lambda z, y: jaxce.softmax_focal_loss(z, y, alpha=[0.25] * 10),
        (LOGITS, LABELS),
        raises(
            TypeError,
            r"alpha\b.*(per class|\(10,\)).*list",
            "`alpha` must be a number or an array of shape (10,); got a Python list",
        ),
    ),
    Case(
        "softmax_focal_loss/alpha_vector_negative",
        jaxce.softmax_focal_loss,
        "`alpha` a [C] vector with a negative entry",
        lambda z, y: jaxce.softmax_focal_loss(z, y, alpha=NEGATIVE_ALPHA),
        (LOGITS, LABELS),
        raises(
            ValueError,
            r"alpha.*finite values >= 0.*-0\.5.*index 0",
            "`alpha` must hold finite values >= 0; got -0.5 at index 0",
        ),
    ),
    Case(
        "softmax_focal_loss/label_out_of_range",
        jaxce.softmax_focal_loss,
        "label 10 for C = 10, under `jax.jit`",
        lambda z, y: jaxce.softmax_focal_loss(z, y),
        (LOGITS, jnp.array([0, 10, 9, 1], i32)),
        Returns(nan_exactly_at(1), "NaN for that example only"),
    ),
    # ------------------------------------------------------------------ check_labels
    Case(
        "check_labels/num_classes_zero",
        jaxce.check_labels,
        "`num_classes=0`",
        lambda y: jaxce.check_labels(y, 0),
        (LABELS,),
        raises(
            ValueError,
            r"num_classes.*positive.*\b0\b",
            "`num_classes` must be a positive int; got 0",
        ),
    ),
    Case(
        "check_labels/num_classes_float",
        jaxce.check_labels,
        "`num_classes=10.0`",
        lambda y: jaxce.check_labels(y, 10.0),
        (LABELS,),
        raises(TypeError, r"num_classes.*int.*10\.0", "`num_classes` must be an int; got 10.0"),
    ),
    Case(
        "check_labels/eager",
        jaxce.check_labels,
        "labels 10 and -1 for 10 classes, called eagerly",
        lambda y: jaxce.check_labels(y, 10),
        (jnp.array([0, 10, 9, -1], i32),),
        raises(
            checkify.JaxRuntimeError,
            r"labels must lie in \[0, 10\).*found 2 outside.*first is 10",
            "labels must lie in [0, 10); found 2 outside, the first is 10 (at flat index 1)",
            trace_time=False,
        ),
    ),
    Case(
        "check_labels/checkify_under_jit",
        jaxce.check_labels,
        "label 12 for 10 classes, in a loss under `jax.jit(checkify.checkify(loss))`",
        lambda z, y: checkify.checkify(label_check)(z, y),
        (LOGITS, jnp.array([0, 12, -100, 1], i32)),
        Returns(
            checkify_error(r"labels must lie in \[0, 10\) or equal ignore_index=-100.*first is 12"),
            "`err.get()` says: labels must lie in [0, 10) or equal ignore_index=-100; found 1"
            " outside, the first is 12",
        ),
    ),
    Case(
        "check_labels/under_jit_without_checkify",
        jaxce.check_labels,
        "called inside `jax.jit` without `checkify.checkify`",
        lambda z, y: jax.jit(label_check)(z, y),
        (LOGITS, LABELS),
        raises(
            ValueError,
            r"without functionalizing it through `checkify\.checkify`",
            "JAX's error, when the function is compiled: wrap it in `checkify.checkify`",
            trace_time=False,
        ),
    ),
    # ------------------------------------------------------------------ fused linear CE
    Case(
        "linear_softmax_cross_entropy/w_1d",
        jaxce.linear_softmax_cross_entropy,
        "`w` of shape (100,)",
        lambda x, w, y: jaxce.linear_softmax_cross_entropy(x, w, y),
        (X, W[0], TOKENS),
        raises(ValueError, r"\bw\b.*\[D, V\].*\(100,\)", "`w` must have shape [D, V]; got (100,)"),
    ),
    Case(
        "linear_softmax_cross_entropy/embedding_not_transposed",
        jaxce.linear_softmax_cross_entropy,
        "a tied embedding table `E` of shape (V, D) = (100, 16) as `w` instead of `E.T`",
        lambda x, w, y: jaxce.linear_softmax_cross_entropy(x, w, y),
        (X, W.T, TOKENS),
        raises(
            ValueError,
            r"x.*w.*D=100.*\(100, 16\).*\(2, 3, 16\)",
            "`x`'s last axis must match `w`'s first axis D=100 (w of shape (100, 16)); got x of"
            " shape (2, 3, 16)",
        ),
    ),
    Case(
        "linear_softmax_cross_entropy/labels_flattened",
        jaxce.linear_softmax_cross_entropy,
        "`labels` of shape (6,) for x (2, 3, 16)",
        lambda x, w, y: jaxce.linear_softmax_cross_entropy(x, w, y),
        (X, W, TOKENS.reshape(6)),
        raises(
            ValueError,
            r"labels.*\(2, 3\).*\(6,\)",
            "`labels` must have shape (2, 3) (x without D); got (6,)",
        ),
    ),
    Case(
        "linear_softmax_cross_entropy/bias_shape",
        jaxce.linear_softmax_cross_entropy,
        "`bias` of shape (16,) (D) instead of (100,) (V)",
        lambda x, w, y, b: jaxce.linear_softmax_cross_entropy(x, w, y, bias=b),
        (X, W, TOKENS, jnp.zeros(16, f32)),
        raises(ValueError, r"bias.*\(100,\).*\(16,\)", "`bias` must have shape (100,); got (16,)"),
    ),
    Case(
        "linear_softmax_cross_entropy/no_classes",
        jaxce.linear_softmax_cross_entropy,
        "`w` of shape (16, 0): V = 0",
        lambda x, w, y: jaxce.linear_softmax_cross_entropy(x, w, y),
        (X, jnp.zeros((16, 0), f32), TOKENS),
        raises(
            ValueError,
            r"\bw\b.*0 classes.*at least one",
            "`w` has 0 classes; integer labels need at least one",
        ),
    ),
    Case(
        "linear_softmax_cross_entropy/0d_x",
        jaxce.linear_softmax_cross_entropy,
        "0-d `x`",
        lambda x, w, y: jaxce.linear_softmax_cross_entropy(x, w, y),
        (jnp.array(1.0, f32), W, TOKENS),
        raises(
            ValueError,
            r"\bx\b.*\[\.\.\., D\].*0-d",
            "`x` must have shape [..., D]; got a 0-d array",
        ),
    ),
    Case(
        "linear_softmax_cross_entropy/vocab_chunk_negative",
        jaxce.linear_softmax_cross_entropy,
        "`vocab_chunk=-1`",
        lambda x, w, y: jaxce.linear_softmax_cross_entropy(x, w, y, vocab_chunk=-1),
        (X, W, TOKENS),
        raises(
            ValueError,
            r"vocab_chunk.*> 0.*-1",
            "`vocab_chunk` must be > 0 (or None for the default); got -1",
        ),
    ),
    Case(
        "linear_softmax_cross_entropy/token_chunk_float",
        jaxce.linear_softmax_cross_entropy,
        "`token_chunk=64.0`",
        lambda x, w, y: jaxce.linear_softmax_cross_entropy(x, w, y, token_chunk=64.0),
        (X, W, TOKENS),
        raises(
            TypeError,
            r"token_chunk.*int.*64\.0",
            "`token_chunk` must be a positive int or None; got 64.0",
        ),
    ),
    Case(
        "linear_softmax_cross_entropy/token_chunk_zero_no_tokens",
        jaxce.linear_softmax_cross_entropy,
        "`token_chunk=0` on a batch of 0 tokens",
        lambda x, w, y: jaxce.linear_softmax_cross_entropy(x, w, y, token_chunk=0),
        (X[:0], W, TOKENS[:0]),
        raises(
            ValueError,
            r"token_chunk.*> 0.*\b0\b",
            "`token_chunk` must be > 0 (or None for the default); got 0",
        ),
    ),
    Case(
        "linear_softmax_cross_entropy/recompute_per_token",
        jaxce.linear_softmax_cross_entropy,
        '`recompute_logits=False` with `reduction="none"`',
        lambda x, w, y: jaxce.linear_softmax_cross_entropy(
            x, w, y, reduction="none", recompute_logits=False
        ),
        (X, W, TOKENS),
        raises(
            ValueError,
            r"recompute_logits=False.*reduction=\"mean\" or \"sum\"",
            '`recompute_logits=False` needs `reduction="mean"` or `"sum"`',
        ),
    ),
    Case(
        "linear_softmax_cross_entropy/label_out_of_range",
        jaxce.linear_softmax_cross_entropy,
        'label 100 for V = 100, `reduction="none"`, under `jax.jit`',
        lambda x, w, y: jaxce.linear_softmax_cross_entropy(x, w, y, reduction="none"),
        (X, W, TOKENS.at[0, 1].set(100)),
        Returns(nan_exactly_at(1), "NaN for that token only"),
    ),
    # ------------------------------------------------------------------ sharded, logits
    Case(
        "sharded.softmax_cross_entropy_with_integer_labels/axis_name_unbound",
        sharded_ce,
        '`axis_name="model"` outside `jax.shard_map`, without `mesh=`',
        lambda z, y: sharded_ce(z, y, axis_name="model"),
        (LOGITS, LABELS),
        raises(
            ValueError,
            r"axis_name='model'.*not a mesh axis bound.*shard_map.*mesh=",
            "`axis_name='model'` is not a bound mesh axis: call inside `jax.shard_map` or pass"
            " `mesh=`",
        ),
    ),
    Case(
        "sharded.softmax_cross_entropy_with_integer_labels/axis_name_not_in_mesh",
        sharded_ce,
        '`axis_name="vocab"` with `mesh=` of axes ("data", "model")',
        lambda z, y: sharded_ce(z, y, axis_name="vocab", mesh=MESH),
        (LOGITS, LABELS),
        raises(
            ValueError,
            r"axis_name='vocab'.*\('data', 'model'\)",
            "`axis_name='vocab'` is not an axis of the mesh; its axes are ('data', 'model')",
        ),
    ),
    Case(
        "sharded.softmax_cross_entropy_with_integer_labels/axis_name_none",
        sharded_ce,
        '`axis_name=None` with `mesh=` of axes ("data", "model")',
        lambda z, y: sharded_ce(z, y, axis_name=None, mesh=MESH),
        (LOGITS, LABELS),
        raises(
            ValueError,
            r"axis_name must name the mesh axis.*got None.*\('data', 'model'\)",
            "`axis_name` must name a mesh axis; got None; the mesh's axes are ('data', 'model')",
        ),
    ),
    Case(
        "sharded.softmax_cross_entropy_with_integer_labels/where_per_example_length",
        sharded_ce,
        "`where` of shape (2,) for 4 examples, with `mesh=` and `data_axis_name`",
        lambda z, y, m: sharded_ce(
            z, y, axis_name="model", data_axis_name="data", mesh=MESH, where=m
        ),
        (LOGITS, LABELS, jnp.array([True, False])),
        raises(
            ValueError,
            r"where.*\(2,\).*\(4, 10\).*one flag per example.*\(4,\)",
            "`where` of shape (2,) has the batch's rank of logits (4, 10): one flag per example,"
            " which must broadcast to (4,)",
        ),
    ),
    Case(
        "sharded.softmax_cross_entropy_with_integer_labels/concrete_smoothing_out_of_range",
        sharded_ce,
        "`label_smoothing=jnp.array(1.5)` with `mesh=`",
        lambda z, y: sharded_ce(z, y, axis_name="model", mesh=MESH, label_smoothing=SMOOTHING_1_5),
        (LOGITS, LABELS),
        raises(
            ValueError,
            r"label_smoothing must lie in \[0, 1\].*1\.5",
            "`label_smoothing` must lie in [0, 1]; got 1.5 (as without a mesh)",
        ),
    ),
    Case(
        "sharded.softmax_cross_entropy_with_integer_labels/same_axis_twice",
        sharded_ce,
        '`axis_name="model", data_axis_name="model"`',
        lambda z, y: sharded_ce(z, y, axis_name="model", data_axis_name="model", mesh=MESH),
        (LOGITS, LABELS),
        raises(
            ValueError,
            r"axis_name='model' and data_axis_name='model' must name different.*'model'",
            "`axis_name` and `data_axis_name` must name different mesh axes; both name 'model'",
        ),
    ),
    Case(
        "sharded.softmax_cross_entropy_with_integer_labels/axis_name_list",
        sharded_ce,
        '`axis_name=["model"]` (a list)',
        lambda z, y: sharded_ce(z, y, axis_name=["model"], mesh=MESH),
        (LOGITS, LABELS),
        raises(
            TypeError,
            r"axis_name must be a mesh axis name or a tuple.*list.*\('model',\)",
            "`axis_name` must be a mesh axis name or a tuple of them; got a list (use the tuple"
            " ('model',))",
        ),
    ),
    Case(
        "sharded.softmax_cross_entropy_with_integer_labels/mesh_not_a_mesh",
        sharded_ce,
        '`mesh="data"` (an axis name instead of a mesh)',
        lambda z, y: sharded_ce(z, y, axis_name="model", mesh="data"),
        (LOGITS, LABELS),
        raises(
            TypeError,
            r"\bmesh\b.*Mesh.*str",
            "`mesh` must be a `jax.sharding.Mesh` or None; got str 'data'",
        ),
    ),
    Case(
        "sharded.softmax_cross_entropy_with_integer_labels/vocab_size_too_large",
        sharded_ce,
        "`vocab_size=11` for logits with 10 columns",
        lambda z, y: sharded_ce(z, y, axis_name="model", mesh=MESH, vocab_size=11),
        (LOGITS, LABELS),
        raises(
            ValueError,
            r"vocab_size.*\[1, 10\].*11",
            "`vocab_size` must lie in [1, 10] (all shards' columns); got 11",
        ),
    ),
    Case(
        "sharded.softmax_cross_entropy_with_integer_labels/batch_not_divisible",
        sharded_ce,
        '3 examples over `data_axis_name="data"` with 2 devices',
        lambda z, y: sharded_ce(
            z, y, axis_name="model", data_axis_name="data", mesh=TWO_DATA_DEVICES
        ),
        (LOGITS[:3], LABELS[:3]),
        raises(
            ValueError,
            r"labels.*\(3\).*data_axis_name='data'.*2 devices",
            "the labels' first axis (3) must divide evenly over `data_axis_name='data'` (2"
            " devices)",
        ),
    ),
    Case(
        "sharded.softmax_cross_entropy_with_integer_labels/data_axis_name_unbound",
        sharded_ce,
        'inside `jax.shard_map` over ("data", "model"), `data_axis_name="batch"`',
        per_device(
            lambda z, y: sharded_ce(
                z, y, axis_name="model", data_axis_name="batch", reduction="mean"
            )
        ),
        (LOCAL_LOGITS, LOCAL_LABELS),
        raises(
            ValueError,
            r"data_axis_name='batch'.*not a mesh axis bound",
            "`data_axis_name='batch'` is not a bound mesh axis",
        ),
    ),
    Case(
        "sharded.softmax_cross_entropy_with_integer_labels/label_in_padding",
        sharded_ce,
        "label 8 with `vocab_size=8` (a padding column), under `jax.jit`",
        lambda z, y: sharded_ce(z, y, axis_name="model", mesh=MESH, vocab_size=8),
        (LOGITS, jnp.array([0, 8, 7, 1], i32)),
        Returns(nan_exactly_at(1), "NaN for that example only"),
    ),
    # ------------------------------------------------------------------ sharded, fused
    Case(
        "sharded.linear_softmax_cross_entropy/axis_name_unbound",
        sharded_linear,
        '`axis_name="model"` outside `jax.shard_map`, without `mesh=`',
        lambda x, w, y: sharded_linear(x, w, y, axis_name="model"),
        (X, W, TOKENS),
        raises(
            ValueError,
            r"axis_name='model'.*not a mesh axis bound.*shard_map.*mesh=",
            "`axis_name='model'` is not a bound mesh axis: call inside `jax.shard_map` or pass"
            " `mesh=`",
        ),
    ),
    Case(
        "sharded.linear_softmax_cross_entropy/data_axis_name_not_in_mesh",
        sharded_linear,
        '`data_axis_name="batch"` with `mesh=` of axes ("data", "model")',
        lambda x, w, y: sharded_linear(
            x, w, y, axis_name="model", data_axis_name="batch", mesh=MESH
        ),
        (X, W, TOKENS),
        raises(
            ValueError,
            r"data_axis_name='batch'.*\('data', 'model'\)",
            "`data_axis_name='batch'` is not an axis of the mesh; its axes are ('data', 'model')",
        ),
    ),
]


# ------------------------------------------------------------------------------ the table
def public_name(fn: Callable) -> str:
    for module, prefix in ((jaxce.sharded, "jaxce.sharded."), (jaxce, "jaxce.")):
        for name in module.__all__:
            if getattr(module, name) is fn:
                return prefix + name
    raise LookupError(f"{fn!r} is not public")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table() -> str:
    lines = ["| function | misuse | what you get |", "| --- | --- | --- |"]
    for case in CASES:
        cells = (f"`{public_name(case.function)}`", case.misuse, case.outcome.describe())
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render_page(page: str) -> str:
    """``page`` with the text between the catalogue markers replaced by the table."""
    head, found, rest = page.partition(BEGIN + "\n")
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise ValueError(f"{PAGE.name} lacks the markers {BEGIN} and {END}")
    return head + BEGIN + "\n" + render_table() + END + tail


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case):
    outcome = case.outcome
    if isinstance(outcome, Returns):
        out = jax.jit(case.call)(*case.arrays)
        assert outcome.check(out), f"{case.misuse}: got {out}"
        return
    pattern = re.compile(outcome.pattern, re.S)
    with pytest.raises(outcome.error, match=pattern):
        case.run()
    if outcome.trace_time:  # tracing alone raises it: nothing is compiled or run
        with pytest.raises(outcome.error, match=pattern):
            jax.jit(case.call).trace(*case.arrays)


def test_every_public_function_is_catalogued():
    public = {f"jaxce.{name}" for name in jaxce.__all__}
    public |= {f"jaxce.sharded.{name}" for name in jaxce.sharded.__all__}
    assert {public_name(c.function) for c in CASES} == public


def test_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_page_shows_the_catalogue():
    page = PAGE.read_text()
    assert page == render_page(page), "run: python tests/test_bad_input.py --write"


def test_readme_links_the_page():
    readme = (PAGE.parents[1] / "README.md").read_text()
    assert "docs/bad_input.md" in readme


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_bad_input.py --write")
    PAGE.write_text(render_page(PAGE.read_text()))
    print(f"wrote {len(CASES)} cases to {PAGE}")
