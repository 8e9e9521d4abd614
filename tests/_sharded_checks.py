"""Multi-device checks of ``jaxce.sharded``, run by ``tests/test_sharding.py`` in a subprocess.

JAX fixes its number of CPU devices when it is first imported, so these checks run in a fresh
interpreter with ``--xla_force_host_platform_device_count=8``. Each check raises on failure; the
script runs the checks named after its first argument (every check when none is named) and
writes ``{name: "ok" | "skipped: ..." | traceback}`` as JSON to the path given as that argument.

Every sharded result is compared with the single-device jaxce loss on the same data (itself
tested against float64 references in ``test_cross_entropy.py``/``test_linear.py``).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import checkify  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import _paths  # noqa: E402
from _compilations import counted  # noqa: E402
from _float16_overflow import Float16Overflow  # noqa: E402
from _jax_support import (  # noqa: E402
    hessian_over_devices_works,
    reverse_over_reverse_through_scan_works,
)

import jaxce  # noqa: E402
import jaxce.sharded  # noqa: E402
from jaxce import _xla  # noqa: E402
from jaxce._linear import linear_softmax_cross_entropy as fused_reference  # noqa: E402

MESHES = ((1, 8), (2, 4), (8, 1))
CHECKS = {}
RTOL, ATOL = 1e-5, 1e-6


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def mesh_of(shape, kind=AxisType.Explicit):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(kind, kind))


def place(mesh, *pairs):
    return [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in pairs]


def close(name, got, want, rtol=RTOL, atol=ATOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {got.shape} != {want.shape}")
    finite = np.abs(want[np.isfinite(want)])
    scale = max(1.0, float(finite.max()) if finite.size else 1.0)
    if not np.array_equal(np.isnan(got), np.isnan(want)):
        wrong = int(np.sum(np.isnan(got) != np.isnan(want)))
        raise AssertionError(f"{name}: NaN in {wrong} entries where the other is not NaN")
    if not np.allclose(got, want, rtol=rtol, atol=atol * scale, equal_nan=True):
        err = np.nanmax(np.abs(got - want))
        raise AssertionError(f"{name}: max abs error {err:.3g} (scale {scale:.3g})")


def data(n=32, v=1001, d=16, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, v)) * 3
    logits[1, rng.integers(0, v, 50)] = -np.inf  # masked vocabulary entries
    labels = rng.integers(0, v, n)
    labels[[2, 7]] = -100  # ignored
    return {
        "logits": jnp.asarray(logits, jnp.float32),
        "labels": jnp.asarray(labels, jnp.int32),
        "weights": jnp.asarray(rng.uniform(0.5, 2.0, v), jnp.float32),
        "mask": jnp.asarray(rng.uniform(size=(1, v)) > 0.1),
        "x": jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
        "w": jnp.asarray(rng.normal(size=(d, v)) / 2, jnp.float32),
        "bias": jnp.asarray(rng.normal(size=v), jnp.float32),
    }


# Option sets: each alone, and all of them. Differentiable ones are traced (jnp arrays) so
# that their gradients are compared too.
OPTIONS = {
    "plain": {},
    "ignore_index": {"ignore_index": -100},
    "class_weights": {"ignore_index": -100, "class_weights": True},
    "label_smoothing": {"ignore_index": -100, "label_smoothing": 0.2},
    "z_loss": {"ignore_index": -100, "z_loss": 1e-3},
    "logit_soft_cap": {"ignore_index": -100, "logit_soft_cap": 4.0},
    "where": {"ignore_index": -100, "where": True},
    "all": {
        "ignore_index": -100,
        "class_weights": True,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "logit_soft_cap": 6.0,
        "where": True,
    },
}


def _kwargs(options, d):
    kw = dict(options)
    if kw.pop("class_weights", False):
        kw["class_weights"] = d["weights"]
    if kw.pop("where", False):
        kw["where"] = d["mask"]
    return kw


def _evaluation_and_training(loss, reduction, cotangent, argnums):
    """The jitted loss alone (an evaluation step) and value_and_grad of its reduction, a
    per-example loss weighted by ``cotangent`` (a training step): their programs differ (the
    derivative rule computes its own forward pass)."""

    def scalar(*args):
        out = loss(*args)
        return jnp.sum(out * cotangent) if reduction == "none" else out

    return jax.jit(loss), jax.jit(jax.value_and_grad(scalar, argnums=argnums))


def _reused(programs, key, build):
    """``build()``, kept in ``programs`` (a dict, or None: build every time) under ``key``."""
    if programs is None:
        return build()
    if key not in programs:
        programs[key] = build()
    return programs[key]


def _compare_logits(mesh, options, reduction, d, data_axis="data", programs=None):
    """Value and gradients (logits, class weights, smoothing, z-loss, soft cap: each one that
    is given, traced) on a mesh vs one device. ``programs``: a dict in which the compiled
    programs are kept for calls with the same options (scalars only), mesh and labels."""
    kw = _kwargs(options, d)
    weights = kw.pop("class_weights", None)
    eps = jnp.float32(kw.pop("label_smoothing", 0.0))
    zl = jnp.float32(kw.pop("z_loss", 0.0))
    cap = kw.pop("logit_soft_cap", None)
    cap = None if cap is None else jnp.float32(cap)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=d["labels"].shape), jnp.float32)
    argnums = (0, 2, 3) + ((1,) if weights is not None else ()) + ((4,) if cap is not None else ())

    def make(fn):
        def loss(logits, weights, eps, zl, cap):
            return fn(
                logits,
                d["labels"],
                class_weights=weights,
                label_smoothing=eps,
                z_loss=zl,
                logit_soft_cap=cap,
                reduction=reduction,
                **kw,
            )

        return _evaluation_and_training(loss, reduction, cotangent, argnums)

    def build():
        sharded = make(
            lambda *a, **k: jaxce.sharded.softmax_cross_entropy_with_integer_labels(
                *a, axis_name="model", data_axis_name=data_axis, mesh=mesh, **k
            )
        )
        return sharded, make(jaxce.softmax_cross_entropy_with_integer_labels)

    key = ("logits", reduction, data_axis, tuple(sorted(kw.items())), weights is None, cap is None)
    sharded, single = _reused(programs, key, build)
    args = (d["logits"], weights, eps, zl, cap)
    close("loss alone", sharded[0](*args), single[0](*args))
    (v1, g1), (v2, g2) = sharded[1](*args), single[1](*args)
    close("loss", v1, v2)
    for i, (a, b) in enumerate(zip(g1, g2, strict=True)):
        close(f"gradient {i}", a, b)
    return v2


@check
def logits_every_option_on_every_mesh():
    d = data()
    for shape in MESHES:
        # Every reduction on one mesh; "mean" (the global weighted mean) on all of them.
        for reduction in ("mean", "sum", "none") if shape == (2, 4) else ("mean",):
            _compare_logits(mesh_of(shape), OPTIONS["all"], reduction, d)


@check
def logits_each_option():
    d = data()
    mesh = mesh_of((2, 4))
    for name, options in OPTIONS.items():
        try:
            _compare_logits(mesh, options, "mean", d)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None


@check
def logits_automatic_mesh_axes():
    # Meshes whose axes are AxisType.Auto (GSPMD) take the same path.
    _compare_logits(mesh_of((2, 4), AxisType.Auto), OPTIONS["all"], "mean", data(v=1024))


@check
def logits_padded_vocabulary_inside_shard_map():
    # V=1001 padded to 1008 columns on 8 devices; the padding columns hold garbage (huge
    # logits) and must not enter the loss: vocab_size marks them.
    d = data(v=1001)
    padded = jnp.pad(d["logits"], ((0, 0), (0, 7)), constant_values=1e4)
    weights = jnp.pad(d["weights"], (0, 7), constant_values=5.0)
    for shape in MESHES:
        mesh = mesh_of(shape)

        def per_device(logits, labels, weights):
            return jaxce.sharded.softmax_cross_entropy_with_integer_labels(
                logits,
                labels,
                axis_name="model",
                data_axis_name="data",
                vocab_size=1001,
                class_weights=weights,
                ignore_index=-100,
                label_smoothing=0.1,
                z_loss=1e-3,
                reduction="mean",
            )

        f = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P("data", "model"), P("data"), P("model")),
            out_specs=P(),
        )
        args = place(
            mesh, (padded, P("data", "model")), (d["labels"], P("data")), (weights, P("model"))
        )
        value, grad = jax.jit(jax.value_and_grad(f))(*args)
        want, want_grad = jax.value_and_grad(
            lambda z: jaxce.softmax_cross_entropy_with_integer_labels(
                z,
                d["labels"],
                class_weights=d["weights"],
                ignore_index=-100,
                label_smoothing=0.1,
                z_loss=1e-3,
                reduction="mean",
            )
        )(d["logits"])
        close("loss", value, want)
        grad = np.asarray(grad)
        close("gradient", grad[:, :1001], want_grad)
        assert np.all(grad[:, 1001:] == 0), "padding columns have a gradient"


@contextlib.contextmanager
def row_chunks_of(rows, v_local):
    """Each device reduces its logits ``rows`` rows at a time, as its shard of a large batch
    and vocabulary does (on a CPU from 1 MiB of float32 logits a device, on a GPU or a TPU from
    256 MiB): a loop whose carry varies over the mesh axes of the logits."""
    patched = {
        "ROW_CHUNK_BYTES": dict.fromkeys(_xla.ROW_CHUNK_BYTES, 4 * v_local * rows),
        "reads_whole_rows": lambda: False,
        "cpu_fuses_whole_rows": lambda: False,
        "saves_exponentials": lambda *a, **k: False,
    }
    saved = {k: getattr(_xla, k) for k in patched}
    for k, value in patched.items():
        setattr(_xla, k, value)
    try:
        yield
    finally:
        for k, value in saved.items():
            setattr(_xla, k, value)


@check
def logits_in_row_chunks():
    # The value and first derivatives without options and with every option on, on explicit
    # and automatic mesh axes.
    d = data(v=1024)
    with row_chunks_of(3, 1024 // 4):
        for kind, name in (
            (AxisType.Explicit, "plain"),
            (AxisType.Explicit, "all"),
            (AxisType.Auto, "all"),
        ):
            try:
                _compare_logits(mesh_of((2, 4), kind), OPTIONS[name], "mean", d)
            except AssertionError as err:
                raise AssertionError(f"{kind} {name}: {err}") from None


@check
def logits_second_derivatives_in_row_chunks():
    # Reverse over reverse (jax.grad of jax.grad) and forward over reverse, every option on.
    if not hessian_over_devices_works():
        raise Skipped(f"jax {jax.__version__} cannot take jax.hessian through a psum")
    small = data(n=8, v=16)
    mesh = mesh_of((1, 4), AxisType.Auto)
    kw = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, logit_soft_cap=6.0)

    def sharded(z):
        return jaxce.sharded.softmax_cross_entropy_with_integer_labels(
            z, small["labels"], axis_name="model", mesh=mesh, reduction="mean", **kw
        )

    def single(z):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            z, small["labels"], reduction="mean", **kw
        )

    want = jax.jit(jax.hessian(single))(small["logits"])
    with row_chunks_of(3, 16 // 4):
        close("hessian", jax.jit(jax.hessian(sharded))(small["logits"]), want)
        if not reverse_over_reverse_through_scan_works():
            raise Skipped(f"jax {jax.__version__} cannot transpose a scan in a custom_jvp rule")
        close("jacrev of grad", jax.jit(jax.jacrev(jax.grad(sharded)))(small["logits"]), want)


@check
def every_device_returns_the_same_loss():
    d = data(v=1024)
    for shape in MESHES:
        mesh = mesh_of(shape)

        def per_device(logits, labels):
            loss = jaxce.sharded.softmax_cross_entropy_with_integer_labels(
                logits,
                labels,
                axis_name="model",
                data_axis_name="data",
                ignore_index=-100,
                label_smoothing=0.1,
                reduction="mean",
            )
            return jnp.broadcast_to(loss, (1, 1))

        f = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P("data", "model"), P("data")),
            out_specs=P("data", "model"),
        )
        args = place(mesh, (d["logits"], P("data", "model")), (d["labels"], P("data")))
        losses = np.asarray(jax.jit(f)(*args))
        assert losses.shape == shape, losses.shape
        assert np.all(losses == losses.flat[0]), f"devices disagree: {losses}"
        want = jaxce.softmax_cross_entropy_with_integer_labels(
            d["logits"], d["labels"], ignore_index=-100, label_smoothing=0.1, reduction="mean"
        )
        close("loss", losses.flat[0], want)


def _compare_fused(mesh, options, reduction, d, rtol=RTOL, atol=ATOL, programs=None, **chunks):
    """As :func:`_compare_logits`, for the fused loss (``chunks``: its chunk sizes)."""
    kw = _kwargs(options, d)
    kw.pop("where", None)  # the fused loss has no mask: -inf in the bias removes classes
    weights = kw.pop("class_weights", None)
    # The hyperparameters given are traced (not differentiated here), as a schedule's are.
    names = ("label_smoothing", "z_loss", "logit_soft_cap")
    hyper = {k: jnp.float32(kw.pop(k)) for k in names if k in kw}
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=d["labels"].shape), jnp.float32)

    def make(fn):
        def loss(x, w, bias, weights, hyper):
            return fn(
                x,
                w,
                d["labels"],
                bias=bias,
                class_weights=weights,
                reduction=reduction,
                **hyper,
                **kw,
            )

        argnums = (0, 1, 2) if weights is None else (0, 1, 2, 3)
        return _evaluation_and_training(loss, reduction, cotangent, argnums)

    def build():
        sharded = make(
            lambda *a, **k: jaxce.sharded.linear_softmax_cross_entropy(
                *a, axis_name="model", data_axis_name="data", mesh=mesh, **chunks, **k
            )
        )
        return sharded, make(fused_reference)

    key = ("fused", reduction, tuple(sorted(kw.items())), weights is None, tuple(sorted(hyper)))
    sharded, single = _reused(programs, key, build)
    args = (d["x"], d["w"], d["bias"], weights, hyper)
    close("loss alone", sharded[0](*args), single[0](*args), rtol, atol)
    (v1, g1), (v2, g2) = sharded[1](*args), single[1](*args)
    close("loss", v1, v2, rtol, atol)
    for name, a, b in zip(("x", "w", "bias", "class_weights"), g1, g2, strict=False):
        close(f"gradient of {name}", a, b, rtol, atol)
    return v2


@check
def fused_every_option_on_every_mesh():
    d = data(v=1001)  # uneven: padded to 1008 columns by the mesh wrapper
    for shape in MESHES:
        for reduction in ("mean", "none") if shape == (2, 4) else ("mean",):
            _compare_fused(
                mesh_of(shape), OPTIONS["all"], reduction, d, token_chunk=5, vocab_chunk=40
            )


@check
def plain_fused_loss_inside_a_data_parallel_shard_map():
    """The plain fused loss in a caller's ``jax.shard_map`` (``check_vma`` on, JAX's default)
    over the batch, ``w`` replicated: the loss and the gradients of ``x``, ``w``, ``bias`` and
    the class weights, summed over the devices, are the single-device ones, for every option,
    both strategies and every reduction (its loops' carries vary like their inputs, and the
    per-token rule sums a replicated input's cotangent over the devices)."""
    d = data(n=32, v=301)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    labels = d["labels"]
    for reduction in ("sum", "none"):
        # The single pass (the accelerators' default) and the two passes (the CPU's), named.
        strategies = ({"recompute_logits": False}, {"recompute_logits": True})
        chunked = {"token_chunk": 3, "vocab_chunk": 64}
        for chunks in (*(strategies if reduction == "sum" else ({},)), chunked):
            options = dict(label_smoothing=0.1, z_loss=1e-3, logit_soft_cap=6.0, **chunks)

            def loss(x, w, bias, weights, y, options=options, reduction=reduction):
                out = jaxce.linear_softmax_cross_entropy(
                    x,
                    w,
                    y,
                    bias=bias,
                    class_weights=weights,
                    ignore_index=-100,
                    reduction=reduction,
                    **options,
                )
                return jnp.sum(out)

            def on_devices(x, w, bias, weights, y, loss=loss):
                return jax.lax.psum(loss(x, w, bias, weights, y), "data")

            split = jax.shard_map(
                on_devices,
                mesh=mesh,
                in_specs=(P("data"), P(), P(), P(), P("data")),
                out_specs=P(),
            )
            args = (d["x"], d["w"], d["bias"], d["weights"], labels)
            got = jax.jit(jax.value_and_grad(split, argnums=(0, 1, 2, 3)))(*args)
            want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args)
            name = f"{reduction} {chunks}"
            close(f"{name}: loss", got[0], want[0])
            for part, a, b in zip(
                ("x", "w", "bias", "class_weights"), got[1], want[1], strict=True
            ):
                close(f"{name}: gradient of {part}", a, b)


@check
def sharded_losses_inside_an_untyped_shard_map():
    """Both sharded losses in a caller's ``jax.shard_map`` with ``check_vma=False`` (no types:
    JAX hands each device a share of a replicated output's cotangent and sums the cotangents of
    replicated inputs), on a model axis alone and beside a data axis, every reduction: the loss
    and the gradients of every input (the slices of ``w``, ``bias`` and the class weights, the
    replicated ``x`` and hyperparameters) are the single-device ones, as with ``check_vma=True``.
    The per-token fused loss sums its cotangent's shares itself (it once returned 1/P of the
    gradients of ``w``, ``bias``, the class weights and the cap)."""
    d = data(n=16, v=64)
    hyper = (jnp.float32(0.1), jnp.float32(1e-3), jnp.float32(6.0))

    def options(weights, eps, zl, cap, reduction):
        return dict(
            class_weights=weights, label_smoothing=eps, z_loss=zl, logit_soft_cap=cap,
            ignore_index=-100, reduction=reduction,
        )  # fmt: skip

    def fused(x, w, bias, weights, y, *hyper, reduction):
        return jaxce.sharded.linear_softmax_cross_entropy(
            x, w, y, bias=bias, axis_name="model", data_axis_name="data",
            **options(weights, *hyper, reduction),
        )  # fmt: skip

    def fused_on_one(x, w, bias, weights, y, *hyper, reduction):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            x @ w + bias[None, :], y, **options(weights, *hyper, reduction)
        )

    def logits_loss(z, weights, y, *hyper, reduction):
        return jaxce.sharded.softmax_cross_entropy_with_integer_labels(
            z, y, axis_name="model", data_axis_name="data", **options(weights, *hyper, reduction)
        )

    def logits_on_one(z, weights, y, *hyper, reduction):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            z, y, **options(weights, *hyper, reduction)
        )

    cases = (
        (fused, fused_on_one, (d["x"], d["w"], d["bias"], d["weights"]),
         (P("data"), P(None, "model"), P("model"), P("model"))),
        (logits_loss, logits_on_one, (d["logits"], d["weights"]),
         (P("data", "model"), P("model"))),
    )  # fmt: skip
    for shape in ((1, 8), (2, 4)):
        mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
        for reduction in ("none", "sum", "mean"):
            per_token = reduction == "none"
            for sharded, on_one, arrays, specs in cases:
                args = (*arrays, d["labels"], *hyper)
                argnums = tuple(i for i in range(len(args)) if i != len(arrays))

                def total(*a, f=on_one, reduction=reduction):
                    return jnp.sum(f(*a, reduction=reduction))

                want = jax.jit(jax.value_and_grad(total, argnums=argnums))(*args)
                for typed in (True, False):
                    split = jax.shard_map(
                        functools.partial(sharded, reduction=reduction),
                        mesh=mesh,
                        in_specs=(*specs, P("data"), P(), P(), P()),
                        out_specs=P("data") if per_token else P(),
                        check_vma=typed,
                    )

                    def split_total(*a, split=split):
                        return jnp.sum(split(*a))

                    got = jax.jit(jax.value_and_grad(split_total, argnums=argnums))(*args)
                    name = f"{sharded.__name__} {shape} {reduction} check_vma={typed}"
                    close(f"{name}: loss", got[0], want[0])
                    for i, a, b in zip(argnums, got[1], want[1], strict=True):
                        close(f"{name}: gradient of argument {i}", a, b)


@check
def fused_narrow_dtypes_over_vocabulary_chunks():
    """bfloat16 and float16 x, w and bias whose device columns take several vocabulary chunks,
    each read from w inside a cond on CPU (``_xla.chunk``), against the single-device loss."""
    for dtype in (jnp.bfloat16, jnp.float16):
        d = {k: v.astype(dtype) if k in ("x", "w", "bias") else v for k, v in data().items()}
        try:
            # Gradients rounded to the inputs' dtype: a rounding apart (2**-8 in bfloat16).
            _compare_fused(
                mesh_of((2, 4)), OPTIONS["all"], "mean", d, rtol=1e-2, atol=1e-3, vocab_chunk=40
            )
        except AssertionError as err:
            raise AssertionError(f"{jnp.dtype(dtype).name}: {err}") from None


@check
def fused_float16_mean_in_range_where_each_devices_sum_is_not():
    """A float16 ``w`` on a data-parallel mesh: each device's summed ``dw`` over its 512 tokens
    (about -97000 in the label's column) is beyond float16's 65504 where the mean's is not; the
    fused mean's gradients are the unfused loss's, finite, in float16."""
    case = Float16Overflow.draw(np.random.default_rng(0))
    mesh = mesh_of((2, 4))

    def fused(x, w):
        return jaxce.sharded.linear_softmax_cross_entropy(
            x,
            w,
            case.labels,
            axis_name="model",
            data_axis_name="data",
            mesh=mesh,
            reduction="mean",
            vocab_chunk=2,
        )

    got = jax.jit(jax.grad(fused, argnums=(0, 1)))(case.x, case.w)
    want = jax.jit(jax.grad(case.unfused_mean, argnums=(0, 1)))(case.x, case.w)
    assert float(jnp.min(got[1].astype(jnp.float32))) < -150, "the label's column"
    for name, a, e in zip(("x", "w"), got, want, strict=True):
        assert a.dtype == jnp.float16, f"gradient of {name}: {a.dtype}"
        assert bool(jnp.all(jnp.isfinite(a))), f"gradient of {name}: {a}"
        close(f"gradient of {name}", a, e, rtol=2e-3, atol=2e-3)


@check
def fused_each_option():
    d = data(v=1024)
    for name, options in OPTIONS.items():
        try:
            _compare_fused(mesh_of((2, 4)), options, "sum", d)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None


def _poisoned(d, key, index):
    bad = np.array(d[key])
    bad[index] = np.nan
    return {**d, key: jnp.asarray(bad)}


# What must come out NaN, as on one device: a NaN that one device's columns hold (a logit; for
# the fused loss a column of w), one that every device's do (a row of logits, a counted token's
# activations), and a traced hyperparameter out of range, which makes every row NaN. The
# devices merge their row maxima with pmax, which drops a NaN on CPU; each must come through.
POISON = {
    "a NaN logit on one device": ("logits", (3, 5), {}),
    "a row of NaN logits": ("logits", (4, slice(None)), {}),
    "a NaN in one column of w": ("w", (0, 5), {}),
    "a NaN in a counted token's x": ("x", (4, 0), {}),
    "a traced soft cap of NaN": (None, None, {"logit_soft_cap": np.nan}),
    "a traced soft cap of -1": (None, None, {"logit_soft_cap": -1.0}),
    "a traced soft cap of 0": (None, None, {"logit_soft_cap": 0.0}),
    "a traced smoothing of NaN": (None, None, {"label_smoothing": np.nan}),
    "a traced smoothing of 1.5": (None, None, {"label_smoothing": 1.5}),
    "a traced z-loss of NaN": (None, None, {"z_loss": np.nan}),
}


@check
def nan_comes_through_as_on_one_device():
    d = data(v=1024)
    mesh = mesh_of((2, 4))
    # The cases differ in their data and in the values of their traced hyperparameters, not in
    # their programs: each program is compiled once, for every case with its options' names.
    programs = {}
    for name, (key, index, hyper) in POISON.items():
        poisoned = d if key is None else _poisoned(d, key, index)
        options = {"ignore_index": -100, **hyper}
        try:
            for reduction in ("none", "mean"):
                values = []
                if key in (None, "logits"):
                    values.append(
                        _compare_logits(mesh, options, reduction, poisoned, programs=programs)
                    )
                if key != "logits":
                    values.append(
                        _compare_fused(mesh, options, reduction, poisoned, programs=programs)
                    )
                # The single-device loss is NaN (its own tests check that), so agreeing with it
                # means being NaN, not both being some number.
                assert all(np.isnan(v) for v in values), f"{reduction}: {values} is not NaN"
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None


COLLECTIVE = re.compile(
    r"= (\(?[^=]*?\)?) (all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter|"
    r"ragged-all-to-all|collective-broadcast)(-start)?\("
)


def collectives(hlo: str):
    """``(op, [shape, ...])`` of every collective in compiled HLO text."""
    out = []
    for m in COLLECTIVE.finditer(hlo):
        shapes = [
            tuple(int(s) for s in dims.split(",") if s)
            for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))
        ]
        out.append((m.group(2), shapes))
    return out


def _assert_only_row_sized(hlo, n_local, allowed=()):
    """No gather or all-to-all at all; every all-reduce moves [n_local, 1] rows, scalars or
    one of the ``allowed`` shapes (data-parallel gradient reductions)."""
    found = collectives(hlo)
    assert found, "no collectives found: is the HLO pattern stale?"
    for op, shapes in found:
        assert op == "all-reduce", f"unexpected {op} of {shapes}"
        for s in shapes:
            ok = s in ((), (n_local,), (n_local, 1)) or s in allowed
            assert ok, f"all-reduce of shape {s} (allowed: rows of {n_local}, {allowed})"
    return found


@check
def hlo_logits_moves_only_rows():
    n, v = 64, 1024
    d = data(n=n, v=v)
    for shape in MESHES:
        mesh = mesh_of(shape)
        logits = jax.device_put(d["logits"], NamedSharding(mesh, P("data", "model")))
        labels = jax.device_put(d["labels"], NamedSharding(mesh, P("data")))
        weights = jax.device_put(d["weights"], NamedSharding(mesh, P("model")))
        f = jax.jit(
            jax.value_and_grad(
                lambda z, labels=labels, mesh=mesh, weights=weights: (
                    jaxce.sharded.softmax_cross_entropy_with_integer_labels
                )(
                    z,
                    labels,
                    axis_name="model",
                    data_axis_name="data",
                    mesh=mesh,
                    class_weights=weights,
                    ignore_index=-100,
                    label_smoothing=0.1,
                    z_loss=1e-3,
                    logit_soft_cap=30.0,
                    where=d["mask"],
                    reduction="mean",
                )
            )
        )
        hlo = f.lower(logits).compile().as_text()
        _assert_only_row_sized(hlo, n // shape[0])


@check
def hlo_fused_moves_rows_dx_and_the_data_parallel_dw():
    n, v, dim = 64, 1024, 16
    d = data(n=n, v=v, d=dim)
    for shape in MESHES:
        mesh = mesh_of(shape)
        x = jax.device_put(d["x"], NamedSharding(mesh, P("data")))
        w = jax.device_put(d["w"], NamedSharding(mesh, P(None, "model")))
        bias = jax.device_put(d["bias"], NamedSharding(mesh, P("model")))
        labels = jax.device_put(d["labels"], NamedSharding(mesh, P("data")))
        f = jax.jit(
            jax.value_and_grad(
                lambda x, w, b, labels=labels, mesh=mesh: (
                    jaxce.sharded.linear_softmax_cross_entropy(
                        x,
                        w,
                        labels,
                        bias=b,
                        axis_name="model",
                        data_axis_name="data",
                        mesh=mesh,
                        ignore_index=-100,
                        label_smoothing=0.1,
                        z_loss=1e-3,
                        logit_soft_cap=30.0,
                    )
                ),
                argnums=(0, 1, 2),
            )
        )
        hlo = f.lower(x, w, bias).compile().as_text()
        n_local, cols = n // shape[0], v // shape[1]
        # dx over the model axis (N x D), dw and dbias over the data axis (D x V/P, V/P).
        _assert_only_row_sized(hlo, n_local, allowed=((n_local, dim), (dim, cols), (cols,)))


@check
def plain_jit_on_automatic_axes_moves_only_rows():
    # jaxce's single-device loss under jit on a GSPMD (AxisType.Auto) mesh: XLA partitions it
    # without gathering the logits (the smoothing sums gather [N, P] partial sums).
    n, v = 64, 1024
    d = data(n=n, v=v)
    mesh = mesh_of((2, 4), AxisType.Auto)
    logits = jax.device_put(d["logits"], NamedSharding(mesh, P("data", "model")))
    labels = jax.device_put(d["labels"], NamedSharding(mesh, P("data")))

    def loss(z):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            z, labels, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, reduction="mean"
        )

    f = jax.jit(jax.value_and_grad(loss))
    for op, shapes in collectives(f.lower(logits).compile().as_text()):
        for s in shapes:
            assert v not in s and v // 4 not in s, f"{op} of shape {s} moves logits"
    # Long rows keep whole rows with several devices: a view of sub-rows (_loops.SubRows)
    # splits the class axis the partitioner may have split, and it gathered the logits.
    assert _xla.row_blocks(4 * 2**15, jnp.float32) == 1
    value, grad = f(logits)
    want, want_grad = jax.value_and_grad(loss)(d["logits"])
    close("loss", value, want)
    close("gradient", grad, want_grad)


@check
def plain_jit_on_explicit_axes_moves_only_rows():
    # jaxce's single-device loss under jit on a mesh with Explicit axes (jax.make_mesh's
    # default): it sees the vocabulary-sharded class axis in the logits' type and computes the
    # loss vocabulary-parallel. Every option and reduction, values and gradients.
    n, v = 64, 1024
    d = data(n=n, v=v)
    full_mask = jnp.broadcast_to(d["mask"], (n, v))
    cotangent = jnp.asarray(np.random.default_rng(2).normal(size=(n,)), jnp.float32)
    for shape in MESHES:
        mesh = mesh_of(shape)
        logits, labels, mask = place(
            mesh,
            (d["logits"], P("data", "model")),
            (d["labels"], P("data")),
            (full_mask, P("data", "model")),
        )
        for reduction in ("none", "mean", "sum"):
            kw = dict(
                ignore_index=-100,
                class_weights=d["weights"],
                label_smoothing=0.1,
                z_loss=1e-3,
                logit_soft_cap=4.0,
                reduction=reduction,
            )

            def loss(z, y, m, kw=kw):
                out = jaxce.softmax_cross_entropy_with_integer_labels(z, y, where=m, **kw)
                return jnp.sum(out * cotangent) if kw["reduction"] == "none" else out

            with jax.set_mesh(mesh):
                f = jax.jit(jax.value_and_grad(loss))
                hlo = f.lower(logits, labels, mask).compile().as_text()
                value, grad = f(logits, labels, mask)
            for op, shapes in collectives(hlo):
                for s in shapes:
                    assert v not in s and v // shape[1] not in s, f"{op} of shape {s} moves logits"
            want, want_grad = jax.value_and_grad(loss)(d["logits"], d["labels"], full_mask)
            close(f"{shape} {reduction} loss", value, want)
            close(f"{shape} {reduction} gradient", grad, want_grad)


def _every_function(shape, rng):
    """``(name, fn, args)`` for every public function, on ``[*batch, C]`` inputs:
    ``fn(reduction, *args)``, the first of ``args`` the batch-leading array (logits,
    probabilities, or the fused loss's ``x``), each of them a float differentiated; the rest are
    closed over. The primitives, which have no reduction, ignore it."""
    c = shape[-1]
    batch = shape[:-1]
    z = jnp.asarray(rng.normal(size=shape) * 3, jnp.float32)
    y = jnp.asarray(rng.integers(0, c, batch), jnp.int32).at[(0,) * len(batch)].set(-100)
    soft = jax.nn.softmax(jnp.asarray(rng.normal(size=shape), jnp.float32))
    binary = jnp.asarray(rng.uniform(size=shape) > 0.5, jnp.float32)
    weights = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
    flags = jnp.asarray(rng.uniform(size=batch) > 0.2)
    classes = jnp.asarray(rng.uniform(size=(1,) * len(batch) + (c,)) > 0.1)
    h = jnp.asarray(rng.normal(size=batch + (24,)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(24, c)) / 4, jnp.float32)
    eps, zl, cap, gamma = (jnp.float32(v) for v in (0.1, 1e-3, 6.0, 2.0))
    integer = jaxce.softmax_cross_entropy_with_integer_labels
    fused = jaxce.linear_softmax_cross_entropy
    every = dict(ignore_index=-100, class_weights=weights)
    return (
        ("integer labels", lambda r, z: integer(z, y, ignore_index=-100, reduction=r), (z,)),
        (
            "integer labels, every option",
            lambda r, z, e, zl, cap: integer(
                z,
                y,
                **every,
                label_smoothing=e,
                z_loss=zl,
                logit_soft_cap=cap,
                where=classes,
                reduction=r,
            ),
            (z, eps, zl, cap),
        ),
        (
            "integer labels, per-example where",
            lambda r, z: integer(z, y, where=flags, reduction=r),
            (z,),
        ),
        (
            "soft labels",
            lambda r, z, t, wt, e: jaxce.softmax_cross_entropy(
                z, t, class_weights=wt, label_smoothing=e, where=classes, reduction=r
            ),
            (z, soft, weights, eps),
        ),
        (
            "nll",
            lambda r, lp, wt: jaxce.nll_loss(
                lp, y, class_weights=wt, ignore_index=-100, reduction=r
            ),
            (jax.nn.log_softmax(z), weights),
        ),
        (
            "sigmoid BCE",
            lambda r, z, t, pw, e: jaxce.sigmoid_binary_cross_entropy(
                z, t, pos_weight=pw, label_smoothing=e, reduction=r
            ),
            (z, binary, weights, eps),
        ),
        (
            "BCE",
            lambda r, p, t: jaxce.binary_cross_entropy(p, t, reduction=r),
            (jax.nn.sigmoid(z), binary),
        ),
        (
            "sigmoid focal",
            lambda r, z: jaxce.sigmoid_focal_loss(z, binary, alpha=0.25, reduction=r),
            (z,),
        ),
        (
            "softmax focal",
            lambda r, z, g: jaxce.softmax_focal_loss(
                z, y, alpha=weights, gamma=g, ignore_index=-100, reduction=r
            ),
            (z, gamma),
        ),
        ("entropy", lambda r, p: jaxce.entropy(p, reduction=r), (soft,)),
        ("softmax entropy", lambda r, z: jaxce.softmax_entropy(z, reduction=r), (z,)),
        (
            "kl",
            lambda r, lq, t: jaxce.kl_divergence(lq, t, where=classes, reduction=r),
            (jax.nn.log_softmax(z), soft),
        ),
        ("logsumexp", lambda r, z: jaxce.logsumexp(z), (z,)),
        ("log_softmax", lambda r, z: jaxce.log_softmax(z), (z,)),
        ("softmax", lambda r, z: jaxce.softmax(z), (z,)),
        ("sigmoid", lambda r, z: jaxce.sigmoid(z), (z,)),
        ("log_sigmoid", lambda r, z: jaxce.log_sigmoid(z), (z,)),
        ("logit_soft_cap", lambda r, z, cap: jaxce.logit_soft_cap(z, cap), (z, cap)),
        ("fused", lambda r, h, w: fused(h, w, y, ignore_index=-100, reduction=r), (h, w)),
        (
            "fused, every option",
            lambda r, h, w, e, zl, cap: fused(
                h, w, y, **every, label_smoothing=e, z_loss=zl, logit_soft_cap=cap, reduction=r
            ),
            (h, w, eps, zl, cap),
        ),
    )


def _scalar(fn, reduction, cotangent):
    """``fn(reduction, *args)`` as a scalar: its reduction, or a per-example (or per-entry)
    output summed against ``cotangent`` (broadcast over the class axis an output keeps)."""

    def scalar(*args):
        out = fn(reduction, *args)
        if out.ndim:
            t = cotangent.reshape(cotangent.shape + (1,) * (out.ndim - cotangent.ndim))
            out = jnp.sum(out * jnp.broadcast_to(t, out.shape))
        return out

    return scalar


# One function of each kind of kernel: per example with class weights and every option, soft
# targets, elementwise and summed over devices, a masked row sum, a primitive, and the fused
# loss (its x and its replicated w).
KINDS = (
    "integer labels, every option",
    "soft labels",
    "sigmoid BCE",
    "kl",
    "log_softmax",
    "fused, every option",
)


def _on_explicit_axes(mesh, shape, spec, reductions, w_spec=None, only=None):
    """Every public function under ``jax.jit`` with its batch-leading input laid out as
    ``spec`` (and the fused loss's ``w`` as ``w_spec``) over ``mesh``, set as the current mesh,
    against one device: the value and the gradient of every float argument, which keeps the
    input's layout (``only``: the names of the functions to check, default all). Where only
    batch axes are split, no collective of the training step moves
    more than a [C] vector or the gradient of a replicated argument."""
    rng = np.random.default_rng(3)
    cotangent = jnp.asarray(rng.normal(size=shape[:-1]), jnp.float32)
    c = shape[-1]
    rows_only = spec[len(shape) - 1 :] in ((), (None,)) and w_spec is None
    for name, fn, args in _every_function(shape, rng):
        if only is not None and name not in only:
            continue
        for reduction in reductions:
            label = f"{name}, {reduction}, {spec}"
            scalar = _scalar(fn, reduction, cotangent)
            argnums = tuple(range(len(args)))
            want, want_grads = jax.jit(jax.value_and_grad(scalar, argnums))(*args)
            placed = list(args)
            placed[0] = jax.device_put(args[0], NamedSharding(mesh, spec))
            if w_spec is not None and name.startswith("fused"):
                placed[1] = jax.device_put(args[1], NamedSharding(mesh, w_spec))
            with jax.set_mesh(mesh):
                f = jax.jit(jax.value_and_grad(scalar, argnums))
                try:
                    compiled = f.lower(*placed).compile()
                    value, grads = compiled(*placed)
                except Exception as err:
                    raise AssertionError(f"{label}: {type(err).__name__}: {err}") from None
            # A sum of thousands of float32 terms, added in another order over the devices.
            close(f"{label}: value", value, want, atol=1e-4)
            for i, (g, g_want) in enumerate(zip(grads, want_grads, strict=True)):
                close(f"{label}: gradient {i}", g, g_want)
                if placed[i] is not args[i] and not g.sharding.is_equivalent_to(
                    placed[i].sharding, g.ndim
                ):
                    raise AssertionError(
                        f"{label}: gradient {i} laid out {g.sharding.spec}, its input"
                        f" {placed[i].sharding.spec}"
                    )
            if not rows_only:
                continue
            # The gradients of replicated arguments (class weights, the fused loss's w), or
            # blocks of them, are summed over the devices; nothing of the batch's size moves.
            replicated = [tuple(a.shape) for a in args[1:]]
            for op, shapes in collectives(compiled.as_text()):
                for s in shapes:
                    block = any(
                        len(r) == len(s) and all(i <= j for i, j in zip(s, r, strict=True))
                        for r in replicated
                    )
                    ok = block or np.prod(s, dtype=int) <= c
                    assert ok, f"{label}: {op} of shape {s}"


@check
def every_function_on_batch_sharded_explicit_axes():
    # Plain jax.jit under jax.set_mesh with Explicit axes (jax.make_mesh's default): inputs
    # split over the batch only, over one mesh axis and two, and over two batch axes; each
    # device computes its own rows, as data parallelism expects.
    _on_explicit_axes(mesh_of((2, 4)), (16, 200), P("data"), ("none",))
    _on_explicit_axes(mesh_of((2, 4)), (16, 200), P("data"), ("mean",), only=KINDS)
    _on_explicit_axes(mesh_of((2, 4)), (16, 200), P(("data", "model")), ("sum",), only=KINDS)
    _on_explicit_axes(mesh_of((2, 4)), (4, 8, 200), P("data", "model"), ("mean",), only=KINDS)
    with row_chunks_of(2, 200):
        _on_explicit_axes(mesh_of((8, 1)), (64, 200), P("data"), ("mean",), only=KINDS)
    # An explicit axis and an automatic one, both splitting the rows: XLA partitions the
    # automatic one, and no device holds more than its own row. (The fused loss there: in
    # row chunks below. With one row a device, its token chunks are one row each, which no
    # partitioner can split over the 4 devices of the automatic axis.)
    mixed = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Auto))
    unfused = tuple(k for k in KINDS if not k.startswith("fused"))
    _on_explicit_axes(mixed, (8, 200), P(("data", "model")), ("mean",), only=unfused)
    with row_chunks_of(64, 256):
        _on_explicit_axes(mixed, (512, 256), P(("data", "model")), ("mean",), only=KINDS)
    # check_labels reads the first bad label at its index, also of split labels.
    mesh = mesh_of((8, 1))
    labels = jax.device_put(jnp.arange(64, dtype=jnp.int32) % 10, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        err, _ = jax.jit(checkify.checkify(lambda y: jaxce.check_labels(y, 7)))(labels)
    assert "found 18 outside, the first is 7 (at flat index 7)" in err.get(), err.get()


@check
def sigmoid_bce_sum_in_one_fusion_on_split_rows():
    # The sigmoid BCE's sum in one fusion (on CPU from _xla.FUSED_SUM_MIN_ELEMENTS entries,
    # forced here), with weights per row and per class, on rows split over one mesh axis and
    # two: each device sums its rows in one fusion, and a device whose rows hold an infinite
    # logit takes the branch to the terms exact there (0 for a side with a coefficient of 0).
    # Values and gradients as on one device, whose rows are summed in chunks.
    rng = np.random.default_rng(11)
    n, c = 64, 200
    z = rng.normal(size=(n, c)) * 3
    y = (rng.uniform(size=(n, c)) > 0.5).astype(np.float32)
    w = rng.uniform(0.5, 2.0, (n, 1))
    pw = rng.uniform(0.5, 2.0, c)
    infinite = z.copy()
    infinite[3, 5], y[3, 5] = np.inf, 1.0  # 1 - t = 0 on the logit's side
    infinite[20, 9], y[20, 9] = -np.inf, 0.0  # t = 0
    infinite[40, 7], y[40, 7], w[40] = -np.inf, 0.0, 0.0  # and a weight of 0
    labels = jnp.asarray(y)

    def loss(z, w, pw):
        return jaxce.sigmoid_binary_cross_entropy(
            z, labels, weights=w, pos_weight=pw, reduction="mean"
        )

    def grad():  # a function of its own for each call: traced again, not taken from a cache
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    for logits in (z, infinite):
        args = [jnp.asarray(a, jnp.float32) for a in (logits, w, pw)]
        want, want_grads = grad()(*args)
        assert np.isfinite(float(want)), want
        for mesh, rows in ((mesh_of((8, 1)), P("data")), (mesh_of((2, 4)), P(("data", "model")))):
            placed = place(mesh, (args[0], rows), (args[1], rows), (args[2], P()))
            fused_path = _paths.taken(_paths.FUSED_PASSES)
            with jax.set_mesh(mesh), fused_path, _paths.fused_sums() as fusion:
                value, grads = grad()(*placed)
            assert fusion.called  # traced on the fused path (forced here, on any jaxlib)
            label = f"{mesh.axis_sizes} {'infinite' if logits is infinite else 'finite'}"
            close(f"{label}: value", value, want, atol=1e-5)
            for i, (g, g_want) in enumerate(zip(grads, want_grads, strict=True)):
                close(f"{label}: gradient {i}", g, g_want)


@check
def automatic_axes_keep_every_row_chunk_on_its_devices():
    # Plain jax.jit on a mesh of Auto axes (XLA's partitioner, GSPMD) with the inputs split
    # over their rows, reduced a chunk of rows at a time (forced here; from 1 MiB of logits on
    # a CPU, 256 MiB on a GPU or TPU): each chunk takes rows of every device, and nothing of
    # the batch's size moves (contiguous chunks gathered the whole logits, or the fused loss's
    # x, onto every device). Every function, and the kinds of kernel over two mesh axes.
    # Chunks of 128 rows of 256 classes: 8 lanes (runs of 16 KiB of float32).
    auto = mesh_of((8, 1), AxisType.Auto)
    with row_chunks_of(128, 256):
        _on_explicit_axes(auto, (1024, 256), P("data"), ("mean", "none"))
        two_axes = mesh_of((2, 4), AxisType.Auto)
        _on_explicit_axes(two_axes, (1024, 256), P(("data", "model")), ("sum",), only=KINDS)


@check
def automatic_axes_keep_second_derivatives_on_their_devices():
    # Forward over reverse (a Hessian-vector product, as second-order optimizers take) of the
    # losses with row chunks on the same Auto mesh: the chunks' forward-mode rule scans the
    # lanes too, so the product is computed where its rows are, and only scalars move.
    auto = mesh_of((8, 1), AxisType.Auto)
    rng = np.random.default_rng(5)
    n, c, d = 1024, 256, 32
    z = jnp.asarray(rng.normal(size=(n, c)), jnp.float32)
    y = jnp.asarray(rng.integers(0, c, n), jnp.int32)
    t = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, c)), jnp.float32))
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, c)) / 6, jnp.float32)
    every = dict(label_smoothing=0.1, z_loss=1e-4, logit_soft_cap=5.0, reduction="mean")
    ce = jaxce.softmax_cross_entropy_with_integer_labels
    losses = {
        "integer labels, every option": (lambda z: ce(z, y, **every), z),
        "soft labels": (lambda z: jaxce.softmax_cross_entropy(z, t, reduction="mean"), z),
        "fused, every option": (lambda h: jaxce.linear_softmax_cross_entropy(h, w, y, **every), h),
    }
    with row_chunks_of(128, c):
        for name, (loss, a) in losses.items():

            def hvp(a, v, loss=loss):
                return jax.jvp(jax.grad(loss), (a,), (v,))[1]

            v = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
            want = jax.jit(hvp)(a, v)
            placed = [jax.device_put(b, NamedSharding(auto, P("data"))) for b in (a, v)]
            with jax.set_mesh(auto):
                compiled = jax.jit(hvp).lower(*placed).compile()
                got = compiled(*placed)
            close(f"{name}: Hessian-vector product", got, want)
            assert got.sharding.is_equivalent_to(placed[0].sharding, got.ndim), (
                f"{name}: laid out {got.sharding.spec}"
            )
            for op, shapes in collectives(compiled.as_text()):
                assert all(s == () for s in shapes), f"{name}: {op} of shapes {shapes}"


@check
def every_function_with_split_classes_on_explicit_axes():
    # The class axis split too (the fused loss's x over its features and w over the
    # vocabulary): the integer-label loss is vocabulary-parallel, the others gather the classes
    # of their own rows.
    mesh = mesh_of((2, 4))
    split = P("data", "model")
    _on_explicit_axes(mesh, (16, 200), split, ("mean",), w_spec=P(None, "model"), only=KINDS)
    _on_explicit_axes(mesh, (16, 200), P(None, "model"), ("sum",), only=KINDS)
    # Classes and a batch axis other than the first split: gathered per device.
    _on_explicit_axes(mesh, (4, 8, 200), P(None, "data", "model"), ("mean",), only=KINDS)


@check
def eager_calls_on_a_mesh_compile_one_program():
    # Outside jax.jit, the losses on split inputs (and jaxce.sharded with mesh=) run their
    # shard_map as one program: run operation by operation, it compiled ~300 programs at every
    # call (18 s). Once the operations around it are compiled, a call compiles that one.
    mesh = mesh_of((8, 1))
    d = data(n=64, v=200)
    logits, labels, x = place(
        mesh, (d["logits"], P("data")), (d["labels"], P("data")), (d["x"], P("data"))
    )
    w = d["w"][:, :200]
    kw = dict(ignore_index=-100, label_smoothing=0.1, reduction="mean")
    calls = {
        "integer labels": lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            logits, labels, **kw
        ),
        "fused": lambda: jaxce.linear_softmax_cross_entropy(x, w, labels, **kw),
        "jaxce.sharded with mesh=": lambda: jaxce.sharded.softmax_cross_entropy_with_integer_labels(
            d["logits"], d["labels"], axis_name="model", data_axis_name="data", mesh=mesh, **kw
        ),
    }
    for name, call in calls.items():
        with jax.set_mesh(mesh):
            want = jax.jit(call)()
            jax.block_until_ready(call())
            with counted() as compiled:
                got = jax.block_until_ready(call())
        assert compiled.count <= 1, f"{name}: {compiled.count} programs compiled in one call"
        close(name, got, want)


@check
def eager_gradients_on_an_explicit_mesh_need_the_mesh_set():
    # Outside jax.jit, JAX forms the cotangent of a result typed on a mesh of Explicit axes only
    # inside jax.set_mesh (README, Known limitations): there jaxce.sharded's gradients are the
    # jitted ones; without it JAX raises, as for any function of explicitly sharded arrays.
    mesh = mesh_of((2, 4))
    d = data(n=16, v=200)
    w = d["w"][:, :200]
    kw = dict(axis_name="model", data_axis_name="data", mesh=mesh, ignore_index=-100)
    losses = {
        "integer labels": (
            lambda z: jaxce.sharded.softmax_cross_entropy_with_integer_labels(
                z, d["labels"], reduction="mean", **kw
            ),
            d["logits"][:, :200],
        ),
        "fused": (
            lambda ww: jaxce.sharded.linear_softmax_cross_entropy(d["x"], ww, d["labels"], **kw),
            w,
        ),
    }
    for name, (loss, arg) in losses.items():
        want = jax.jit(jax.grad(loss))(arg)
        with jax.set_mesh(mesh):
            close(f"{name}, eager inside set_mesh", jax.grad(loss)(arg), want)
        try:
            jax.grad(loss)(arg)
        except ValueError as e:
            assert "set_mesh" in str(e), f"{name}: {e}"
        else:
            raise AssertionError(f"{name}: JAX now takes it without set_mesh: update the README")


class Skipped(Exception):
    """A check with nothing to check (reported to the parent test as a skip)."""


@check
def readme_sharded_examples():
    # The README's jaxce.sharded examples (the data + tensor parallel training step), run on
    # 8 devices; test_readme.py runs them on one.
    readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
    with open(readme) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)
    blocks = [b for b in blocks if "jaxce.sharded" in b]
    if not blocks:
        raise Skipped("the README has no jaxce.sharded example")
    for code in blocks:
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            exec(compile(code, readme, "exec"), {"__name__": "__readme__"})


def main(out_path, names=()):
    assert jax.device_count() == 8, jax.devices()
    unknown = sorted(set(names) - set(CHECKS))
    assert not unknown, f"no such check: {unknown}"
    results = {}
    for name in names or CHECKS:
        start = time.perf_counter()
        try:
            CHECKS[name]()
            results[name] = "ok"
        except Skipped as why:
            results[name] = f"skipped: {why}"
        except Exception:  # noqa: BLE001 - every failure is reported to the parent test
            results[name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    with open(out_path, "w") as f:
        json.dump(results, f)
    return 0 if all(r == "ok" or r.startswith("skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], tuple(sys.argv[2:])))
