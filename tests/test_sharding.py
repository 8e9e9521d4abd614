"""Tests of ``jaxce.sharded``.

The multi-device checks (meshes 1x8, 2x4, 8x1 of emulated CPU devices, every option, padded
vocabularies, compiled-HLO collectives) live in ``_sharded_checks.py``. JAX fixes the number of
CPU devices when it is first imported, so each check runs in an interpreter of its own and is
its own test here. The tests below them run in this process, on one device.
"""

import ast
import doctest
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _products import assert_products
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jaxce
import jaxce.sharded
from jaxce import _xla

HERE = pathlib.Path(__file__).resolve().parent
CHECKS = (
    "logits_every_option_on_every_mesh",
    "logits_each_option",
    "logits_automatic_mesh_axes",
    "logits_padded_vocabulary_inside_shard_map",
    "logits_in_row_chunks",
    "logits_second_derivatives_in_row_chunks",
    "every_device_returns_the_same_loss",
    "fused_every_option_on_every_mesh",
    "fused_each_option",
    "plain_fused_loss_inside_a_data_parallel_shard_map",
    "sharded_losses_inside_an_untyped_shard_map",
    "fused_narrow_dtypes_over_vocabulary_chunks",
    "fused_float16_mean_in_range_where_each_devices_sum_is_not",
    "nan_comes_through_as_on_one_device",
    "hlo_logits_moves_only_rows",
    "hlo_fused_moves_rows_dx_and_the_data_parallel_dw",
    "plain_jit_on_automatic_axes_moves_only_rows",
    "plain_jit_on_explicit_axes_moves_only_rows",
    "every_function_on_batch_sharded_explicit_axes",
    "sigmoid_bce_sum_in_one_fusion_on_split_rows",
    "automatic_axes_keep_every_row_chunk_on_its_devices",
    "automatic_axes_keep_second_derivatives_on_their_devices",
    "every_function_with_split_classes_on_explicit_axes",
    "eager_calls_on_a_mesh_compile_one_program",
    "eager_gradients_on_an_explicit_mesh_need_the_mesh_set",
    "readme_sharded_examples",
)


def _check_names_in(source: pathlib.Path):
    """The names of the functions decorated with ``@check`` in the checks' script."""
    tree = ast.parse(source.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any(isinstance(d, ast.Name) and d.id == "check" for d in node.decorator_list)
    }


def test_every_multi_device_check_is_listed():
    assert _check_names_in(HERE / "_sharded_checks.py") == set(CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_multi_device(tmp_path, name):
    # One interpreter per check (about 3 s to start): pytest-xdist spreads the checks over its
    # workers, and each has its own time limit.
    out = tmp_path / "results.json"
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, str(HERE / "_sharded_checks.py"), str(out), name],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=HERE.parent,
    )
    if not out.exists():
        pytest.fail(f"the multi-device check crashed:\n{proc.stdout}\n{proc.stderr}")
    result = json.loads(out.read_text())[name]
    if result.startswith("skipped"):
        pytest.skip(result)
    assert result == "ok", result
    assert proc.returncode == 0, (proc.returncode, proc.stderr)


# ------------------------------------------------------------------- one device, this process
def _mesh():
    # Automatic axes: shard_map then lays out its unsharded inputs itself.
    return jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def _data(rng, n=6, v=11):
    logits = jnp.asarray(rng.normal(size=(n, v)) * 2, jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    return logits, labels


def test_inside_shard_map_matches_the_single_device_loss(rng):
    logits, labels = _data(rng)
    labels = labels.at[0].set(-100)
    kw = dict(ignore_index=-100, label_smoothing=0.2, z_loss=1e-3, logit_soft_cap=3.0)

    def per_device(z, y):
        return jaxce.sharded.softmax_cross_entropy_with_integer_labels(
            z, y, axis_name="model", reduction="mean", **kw
        )

    f = jax.shard_map(per_device, mesh=_mesh(), in_specs=(P(None, "model"), P()), out_specs=P())
    value, grad = jax.jit(jax.value_and_grad(f))(logits, labels)
    want, want_grad = jax.value_and_grad(
        lambda z: jaxce.softmax_cross_entropy_with_integer_labels(z, labels, reduction="mean", **kw)
    )(logits)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_mesh_call_matches_the_fused_single_device_loss(rng):
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 13)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 13, (2, 3)), jnp.int32)
    got = jaxce.sharded.linear_softmax_cross_entropy(
        x,
        w,
        labels,
        axis_name="model",
        data_axis_name="data",
        mesh=_mesh(),
        label_smoothing=0.1,
        reduction="none",
    )
    want = jaxce.softmax_cross_entropy_with_integer_labels(
        jnp.einsum("btd,dv->btv", x, w), labels, label_smoothing=0.1
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_multiplies_bfloat16_blocks_as_they_are(rng, monkeypatch, backend, reduction):
    """As the one-device loss (tests/test_linear.py): every product of the sharded fused loss,
    forward and backward, has bfloat16 operands and a float32 result."""
    monkeypatch.setattr(_xla, "backend", lambda: backend)
    x = jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(16, 300)) * 0.25, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 300, 8), jnp.int32)

    def f(x, w):
        loss = jaxce.sharded.linear_softmax_cross_entropy(
            x,
            w,
            labels,
            axis_name="model",
            data_axis_name="data",
            mesh=_mesh(),
            reduction=reduction,
            vocab_chunk=128,
        )
        return jnp.sum(loss) if reduction == "none" else loss

    program = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    # x w twice (forward, backward), dz w^T, x^T dz
    assert_products(program.lower(x, w).as_text(), "bf16", at_least=4)


def test_float16_mean_gradient_of_the_fused_loss_in_range_where_the_sum_gradient_is_not(
    float16_overflow,
):
    """As tests/test_linear.py's test of the one-device loss: the summed loss's ``dw`` is beyond
    float16's range, the mean's is not (about -190)."""
    x, w, labels = float16_overflow.x, float16_overflow.w, float16_overflow.labels

    def fused(w):
        return jaxce.sharded.linear_softmax_cross_entropy(
            x, w, labels, axis_name="model", data_axis_name="data", mesh=_mesh(), reduction="mean"
        )

    def unfused(w):
        return float16_overflow.unfused_mean(x, w)

    got, want = jax.grad(fused)(w), jax.grad(unfused)(w)
    assert got.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(got)))
    assert float(jnp.min(got.astype(jnp.float32))) < -150
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-3, atol=2e-3 * scale
    )


def test_padding_columns_are_not_classes(rng):
    logits, labels = _data(rng, v=11)
    padded = jnp.concatenate([logits, jnp.full((6, 5), 50.0, jnp.float32)], axis=-1)

    def per_device(z, y):
        return jaxce.sharded.softmax_cross_entropy_with_integer_labels(
            z, y, axis_name="model", vocab_size=11, label_smoothing=0.3
        )

    # Jitted: a shard_map run operation by operation compiles each operation at every call.
    f = jax.jit(
        jax.shard_map(per_device, mesh=_mesh(), in_specs=(P(None, "model"), P()), out_specs=P())
    )
    want = jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, label_smoothing=0.3)
    np.testing.assert_allclose(f(padded, labels), want, rtol=1e-6)
    # A label in the padding is out of range: NaN, as for the single-device loss.
    assert np.isnan(f(padded, labels.at[0].set(12))[0])


def test_class_weights_are_the_local_slice_inside_shard_map(rng):
    logits, labels = _data(rng)

    def per_device(z, y):
        return jaxce.sharded.softmax_cross_entropy_with_integer_labels(
            z, y, axis_name="model", class_weights=jnp.ones((12,), jnp.float32)
        )

    f = jax.shard_map(per_device, mesh=_mesh(), in_specs=(P(None, "model"), P()), out_specs=P())
    with pytest.raises(ValueError, match=r"class_weights must have shape \(11,\).*slice"):
        f(logits, labels)


def test_an_unbound_axis_name_says_how_to_call_it(rng):
    logits, labels = _data(rng)
    with pytest.raises(ValueError, match="axis_name='model'.*shard_map.*mesh="):
        jaxce.sharded.softmax_cross_entropy_with_integer_labels(logits, labels, axis_name="model")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(axis_name="tensor"), ValueError, "axis_name='tensor'.*does not have"),
        (dict(axis_name="model", vocab_size=12), ValueError, r"vocab_size must lie in \[1, 11\]"),
        (dict(axis_name="model", vocab_size=2.5), TypeError, "vocab_size must be"),
        (dict(axis_name="model", reduction="avg"), ValueError, "reduction"),
        (dict(axis_name="model", label_smoothing=1.5), ValueError, "label_smoothing"),
    ],
)
def test_bad_arguments_on_a_mesh(rng, kwargs, error, match):
    logits, labels = _data(rng)
    with pytest.raises(error, match=match):
        jaxce.sharded.softmax_cross_entropy_with_integer_labels(
            logits, labels, mesh=_mesh(), **kwargs
        )


def test_data_axis_must_divide_the_batch(rng):
    # Needs two devices on the data axis; on one device every batch divides, so check the
    # helper's message directly through a 1-device mesh by a batch of size 0 (divides) and
    # the error path of _data_spec.
    from jaxce._sharding import _data_spec

    with pytest.raises(ValueError, match="must divide evenly over data_axis_name='data'"):
        _data_spec("labels", (5,), "data", 2)


@pytest.mark.parametrize(
    "name", ["softmax_cross_entropy_with_integer_labels", "linear_softmax_cross_entropy"]
)
def test_docstring_examples_run(name):
    # As test_docs.py does for jaxce.__all__, under JAX's default promotion rules.
    fn = getattr(jaxce.sharded, name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    with (
        jax.numpy_rank_promotion("allow"),
        jax.numpy_dtype_promotion("standard"),
        jax.enable_x64(False),
    ):
        for test in finder.find(fn, name, globs={}):
            runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_public_namespace():
    assert set(jaxce.sharded.__all__) == {
        "softmax_cross_entropy_with_integer_labels",
        "linear_softmax_cross_entropy",
    }
    for name in jaxce.sharded.__all__:
        doc = getattr(jaxce.sharded, name).__doc__
        assert "Args:" in doc and "Returns:" in doc and "Examples:" in doc
