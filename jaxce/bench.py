"""Benchmarks of jaxce against optax and the memory-traffic floor: ``python -m jaxce.bench``.

Each benchmark times ``jax.jit(jax.value_and_grad(mean loss))`` of a jaxce loss side by side with
optax's version of the same loss and with a *floor*, a program that does the least work any
implementation must do:

``cross_entropy``
    integer labels: ``jaxce.softmax_cross_entropy_with_integer_labels`` against optax's
    ``softmax_cross_entropy_with_integer_labels``, plus jaxce with every option on (label
    smoothing, z-loss, logit soft-cap and class weights) against the same loss as it is written
    with optax, which has no such options: ``cap * tanh(z / cap)``, then
    ``optax.softmax_cross_entropy_with_integer_labels`` times the label's weight, the smoothing
    term ``eps / C * (sum(w) * lse - z @ w)`` and the z-loss from ``lse =
    jax.nn.logsumexp(z)``, and the mean over the labels' weights (PyTorch's semantics, which
    jaxce's follow; no one-hot labels of the logits' size; the test suite checks that the two
    give the same value and gradient).
``soft_cross_entropy``
    probability labels: ``jaxce.softmax_cross_entropy`` against ``optax.softmax_cross_entropy``.
``binary``
    ``jaxce.sigmoid_binary_cross_entropy`` against ``optax.sigmoid_binary_cross_entropy``.
``linear``
    ``jaxce.linear_softmax_cross_entropy(x, w, labels)`` against the unfused losses (jaxce's and
    optax's on ``x @ w``), gradients to ``x`` and ``w``.
``options``
    run only when named: the integer-label loss with each option of ``cross_entropy``'s alone
    (class weights, z-loss, label smoothing, soft cap) and all four, each against the same
    options written with optax, which tells which option costs what.
``step``
    run only when named: ``cross_entropy``'s losses inside a small classifier's training step,
    ``value_and_grad`` with respect to the parameters of a multilayer perceptron (784 inputs,
    256 ReLU units, ``C`` classes) on ``N`` examples, which tells what a loss's time comes to in
    a step, where its call is no longer a program of its own.

The floor of the first three reads the logits (and the labels where the loss reads them: soft
labels, binary targets) once and writes an array of the logits' size, which any forward +
backward pass must at least do. The floor of ``linear`` is the three matrix products no
implementation can avoid, ``x @ w``, ``g @ w.T`` and ``x.T @ g``, jitted together, the first
summed over the rows (a loss reads its logits, it does not write them out). The floor of
``step`` is the same step with the linear loss ``sum(g * logits)`` for a given ``g``: the model's
forward pass, one read of its logits and its backward pass from ``g``, the least any loss adds to
the model (so ``x floor`` is the step's time over the model's own).

Every program is compiled once as a warm-up and then ``COMPILE_SAMPLES`` times (the compile time
reported is the median of ``lower`` + ``compile`` of a fresh function, so no cache of JAX hides
it). The warm-up is there because XLA's GPU compiler autotunes each matrix product's shape once
per process and keeps the result: the first program of a shape to compile would pay for the others
(``linear`` at 16384 x 4096 x 131072 float32 on an H200: 18.6 s for whichever of optax's and
jaxce's unfused programs compiled first, 0.3 s for the other). ``--quick`` on CPU keeps it only in
each benchmark's first case (``warms_up_every_case``). Each program is then run once as a
warm-up, and the programs of a shape are timed in turn, ``repeats`` rounds, each in a fresh order
(:class:`RoundOrders`: no program runs twice in a row, nor, of three or more, after the same
one in every round), so that machine noise and what ran just before fall on all of them alike.
A sample times a program for at least ``MIN_SAMPLE_SECONDS`` (a fast program is called in a
loop, waiting for each call), and the time reported is the median per call over the samples
(and the minimum).
Every ratio compares numbers of the same run, sample by sample: a ratio is the median over the
rounds of the two programs' times in that round, so that a slow stretch of a shared machine,
which slows every program of a round, cancels out; a target missed on the speed-up gives the
lowest and highest of the rounds' ratios beside it, which tell a loss from a tie within the
machine's noise. Memory is the compiled
program's temporary buffers (``compile().memory_analysis().temp_size_in_bytes``); the arguments
and results are not counted.

The functions below are the command line's building blocks: ``run`` returns one ``Result`` per
program and shape, which ``format_table``, ``format_markdown``, ``write_json`` and ``plot`` turn
into the outputs of ``--markdown``, ``--json`` and ``--plot``; ``read_json`` reads a saved run
back (``--from-json``, which ``join_runs`` several saved runs of one machine), to print its
tables again or choose rows of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import random
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import optax

import jaxce

DTYPES = ("float32", "bfloat16", "float16")

# The default grid: a small classifier (where per-call overhead and compile time matter) up to
# language-model vocabularies. soft_cross_entropy and binary read labels as large as the logits
# and stop at 4096 x 32768 on CPU (at 4096 x 131072, optax's bfloat16 binary cross-entropy alone
# would need 13 GiB of temporaries); linear's 4096 x 512 x 32768 takes two of the ~9 minutes.
GRID: dict[str, tuple[tuple[int, ...], ...]] = {
    "cross_entropy": ((256, 10), (1024, 1000), (16384, 4096), (4096, 32768), (4096, 131072)),
    "soft_cross_entropy": ((256, 10), (1024, 1000), (16384, 4096), (4096, 32768)),
    "binary": ((256, 10), (1024, 1000), (16384, 4096), (4096, 32768)),
    "linear": ((1024, 256, 8192), (4096, 512, 32768)),
}
QUICK_GRID: dict[str, tuple[tuple[int, ...], ...]] = {
    "cross_entropy": ((256, 10), (1024, 1000), (2048, 8192)),
    "soft_cross_entropy": ((256, 10), (2048, 4096)),
    "binary": ((256, 10), (2048, 4096)),
    "linear": ((512, 256, 4096),),
}
# Added to the default grid on a GPU or TPU (bfloat16 8192 x 131072 is a language model's step).
ACCELERATOR_GRID: dict[str, tuple[tuple[int, ...], ...]] = {
    "cross_entropy": ((8192, 131072),),
    "soft_cross_entropy": ((8192, 131072),),
    "binary": ((8192, 131072),),
    "linear": ((16384, 4096, 131072),),
}
# The options benchmark times the integer-label loss at cross_entropy's shapes.
for _grid in (GRID, QUICK_GRID, ACCELERATOR_GRID):
    _grid["options"] = _grid["cross_entropy"]
# The step benchmark's batches and classes: a digit classifier, a thousand classes, and a
# vocabulary's worth, where the loss's share of the step grows.
GRID["step"] = ((256, 10), (1024, 1000), (4096, 4096), (1024, 32768))
QUICK_GRID["step"] = ((256, 10), (1024, 1000))
ACCELERATOR_GRID["step"] = ((8192, 32768),)
DEFAULT_DTYPES = ("float32", "bfloat16")
GRID_MINUTES = "8-13 minutes"  # the default grid, float32 and bfloat16, on 2 x86-64 cores
# A timed sample calls a program this long at least: a 100 µs call is timed as the mean of 200.
MIN_SAMPLE_SECONDS = 0.02
# Compilations per program, a fresh function each time; the median is reported.
COMPILE_SAMPLES = 3

FLOOR, OPTAX, JAXCE = "floor", "optax", "jaxce"
# The mean loss without its gradient (an evaluation step), beside value_and_grad.
JAXCE_ALONE, OPTAX_ALONE = "jaxce, loss alone", "optax, loss alone"


class _Options(TypedDict):
    label_smoothing: float
    z_loss: float
    logit_soft_cap: float


# The options of cross_entropy's "jaxce, all options" row, with class weights in [0.5, 1.5).
ALL_OPTIONS: _Options = {"label_smoothing": 0.1, "z_loss": 1e-4, "logit_soft_cap": 30.0}

# The options benchmark's programs: class weights alone, each of ALL_OPTIONS alone and all four
# (the options, and whether class weights are given).
OPTION_SETS: dict[str, tuple[Mapping[str, Any], bool]] = {
    "class weights": ({}, True),
    "z-loss": ({"z_loss": ALL_OPTIONS["z_loss"]}, False),
    "label smoothing": ({"label_smoothing": ALL_OPTIONS["label_smoothing"]}, False),
    "soft cap": ({"logit_soft_cap": ALL_OPTIONS["logit_soft_cap"]}, False),
    "all four": (ALL_OPTIONS, True),
}


# --------------------------------------------------------------------------------------------
# The programs


@dataclasses.dataclass(frozen=True)
class Program:
    """One timed program of a benchmark.

    Attributes:
      name: the row's name in the tables.
      role: ``"jaxce"``, ``"optax"`` or ``"floor"``; each benchmark has exactly one floor.
      make: returns a new function of the benchmark's inputs on every call, so that each
        compilation starts from a fresh function and no cache shortens it.
      compare_to: the name of the optax program this one is compared with, if any.
    """

    name: str
    role: str
    make: Callable[[], Callable[..., Any]]
    compare_to: str | None = None


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A family of programs timed on the same inputs.

    Attributes:
      name: the benchmark's name on the command line.
      summary: one line for the tables.
      shape_names: the names of the shape's dimensions, e.g. ``("N", "C")``.
      inputs: ``(shape, dtype) -> tuple of arrays``, the arguments of every program.
      programs: the programs, the floor last.
      by_default: whether a run that names no benchmark measures it.
    """

    name: str
    summary: str
    shape_names: tuple[str, ...]
    inputs: Callable[[tuple[int, ...], str], tuple[jax.Array, ...]]
    programs: tuple[Program, ...]
    by_default: bool = True


def _uniform(shape: tuple[int, ...], seed: int) -> jax.Array:
    """Deterministic pseudo-random float32 numbers in [0, 1), made in one cheap pass.

    ``jax.random`` takes about 30 s for the 2**29 numbers of a 4096 x 131072 array on two CPU
    cores; an integer hash of the element's index looks as random to a loss and is 50x faster.
    """
    h = jnp.full(shape, jnp.uint32(seed * 0x9E3779B9 % 2**32), jnp.uint32)
    for axis in range(len(shape)):
        index = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        h = (h ^ index) * jnp.uint32(0x85EBCA6B)
        h = h ^ (h >> jnp.uint32(13))
    h = (h ^ (h >> jnp.uint32(16))) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> jnp.uint32(16))
    return (h >> jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)


@jax.jit(static_argnums=(0, 1, 2))
def _logits(shape: tuple[int, ...], dtype: str, scale: float) -> jax.Array:
    # Uniform on [-scale, scale): roughly the spread of a trained classifier's logits.
    u = _uniform(shape, 1)
    return (jnp.float32(2 * scale) * u - jnp.float32(scale)).astype(dtype)


@jax.jit(static_argnums=(0, 1))
def _integer_labels(n: int, classes: int) -> jax.Array:
    return (_uniform((n,), 2) * jnp.float32(classes)).astype(jnp.int32) % jnp.int32(classes)


def _class_weights(classes: int) -> jax.Array:
    return jnp.float32(0.5) + _uniform((classes,), 3)  # in [0.5, 1.5)


def _cross_entropy_inputs(shape, dtype):
    n, c = shape
    return _logits(shape, dtype, 4.0), _integer_labels(n, c), _class_weights(c)


@jax.jit(static_argnums=(0, 1))
def _soft_labels(shape: tuple[int, ...], dtype: str) -> jax.Array:
    u = _uniform(shape, 4)
    return (u / jnp.sum(u, axis=-1, keepdims=True)).astype(dtype)


def _soft_cross_entropy_inputs(shape, dtype):
    return _logits(shape, dtype, 4.0), _soft_labels(shape, dtype)


@jax.jit(static_argnums=(0, 1))
def _binary_targets(shape: tuple[int, ...], dtype: str) -> jax.Array:
    return (_uniform(shape, 5) < jnp.float32(0.5)).astype(dtype)


def _binary_inputs(shape, dtype):
    return _logits(shape, dtype, 4.0), _binary_targets(shape, dtype)


def _linear_inputs(shape, dtype):
    n, d, v = shape
    x = _logits((n, d), dtype, 3.0**0.5)  # unit variance
    w = _logits((d, v), dtype, (3.0 / d) ** 0.5)  # logits of unit variance
    g = _logits((n, v), dtype, (3.0 / (n * v)) ** 0.5)  # the floor's stand-in for dlogits
    return x, w, _integer_labels(n, v), g


def _grad_of_logits(mean_loss: Callable[..., jax.Array]) -> Callable[[], Callable]:
    """``make`` for a program ``(logits, labels, *rest) -> value_and_grad wrt the logits``."""

    def make():
        def program(logits, labels, *rest):
            return jax.value_and_grad(lambda z: mean_loss(z, labels, *rest))(logits)

        return program

    return make


def _loss_alone(mean_loss: Callable[..., jax.Array]) -> Callable[[], Callable]:
    """``make`` for a program ``(logits, labels, *rest) -> the mean loss``, no gradient (an
    evaluation step)."""

    def make():
        def program(logits, labels, *rest):
            return mean_loss(logits, labels, *rest)

        return program

    return make


# The step benchmark's model: a multilayer perceptron with MODEL_FEATURES inputs and one hidden
# layer of MODEL_HIDDEN ReLU units (the size of a digit classifier), whose logits the loss reads.
MODEL_FEATURES, MODEL_HIDDEN = 784, 256


def _step_inputs(shape, dtype):
    """The inputs of the step benchmark's programs: ``(features, labels, class weights, w1, b1,
    w2, b2, g)``, with ``g`` the floor's stand-in for the gradient of the loss wrt the logits."""
    n, c = shape
    features = _logits((n, MODEL_FEATURES), dtype, 3.0**0.5)  # unit variance
    w1 = _logits((MODEL_FEATURES, MODEL_HIDDEN), dtype, (6.0 / MODEL_FEATURES) ** 0.5)  # He
    b1 = jnp.zeros((MODEL_HIDDEN,), dtype)
    w2 = _logits((MODEL_HIDDEN, c), dtype, 2.0 * (3.0 / MODEL_HIDDEN) ** 0.5)  # logits' sd 2
    b2 = jnp.zeros((c,), dtype)
    g = _logits((n, c), dtype, (3.0 / (n * c)) ** 0.5)
    return features, _integer_labels(n, c), _class_weights(c), w1, b1, w2, b2, g


def _model(features, w1, b1, w2, b2):
    """The step benchmark's logits."""
    return jax.nn.relu(features @ w1 + b1[None, :]) @ w2 + b2[None, :]


def _step(mean_loss: Callable[..., jax.Array]) -> Callable[[], Callable]:
    """``make`` for a program ``(features, labels, weights, w1, b1, w2, b2, g) ->
    value_and_grad wrt (w1, b1, w2, b2)`` of ``mean_loss`` on the model's logits."""

    def make():
        def program(features, labels, weights, w1, b1, w2, b2, g):
            def loss(params):
                return mean_loss(_model(features, *params), labels, weights)

            return jax.value_and_grad(loss)((w1, b1, w2, b2))

        return program

    return make


def _model_floor():
    # A step whose loss is linear, sum(g * logits) with g given: the model's forward pass, one
    # read of its logits, and its backward pass from g, the gradient wrt the logits. A loss
    # does at least that, and then computes and writes its gradient. (Returning the logits
    # instead of reading them writes them out as an output, in fresh memory on every call: in
    # bfloat16 at [4096, 4096] on CPU that took 290 ms, a step with jaxce's loss 266 ms.)
    def program(features, labels, weights, w1, b1, w2, b2, g):
        def linear_loss(params):
            return jnp.sum(_model(features, *params) * g, dtype=jnp.float32)

        return jax.value_and_grad(linear_loss)((w1, b1, w2, b2))

    return program


def _grad_of_x_and_w(mean_loss: Callable[..., jax.Array]) -> Callable[[], Callable]:
    """``make`` for a program ``(x, w, labels, g) -> value_and_grad wrt x and w``."""

    def make():
        def program(x, w, labels, g):
            return jax.value_and_grad(lambda x, w: mean_loss(x, w, labels), argnums=(0, 1))(x, w)

        return program

    return make


def _logits_floor():
    # Reads every logit once and writes an array of their size; each output element depends
    # on its input element, so XLA can neither drop nor shrink the pass.
    return lambda logits, *unused: logits * jnp.asarray(2, logits.dtype)


def _logits_and_labels_floor():
    # As _logits_floor, reading the labels too (soft labels and binary targets are as large as
    # the logits, and any loss on them reads them).
    return lambda logits, labels: logits + labels


def _matmul_floor():
    # The three products, with x @ w summed over the rows rather than written out: a loss reads
    # its logits, it does not return them, and a [V] result that depends on every logit keeps
    # XLA from dropping the product. Writing x @ w out as a [N, V] result made the floor slower:
    # at 1024 x 256 x 8192 on 2 CPU cores (5 rounds, round-robin, in one process, two runs),
    # the column sums took 0.97x and 0.89x the time of that in float32, 0.84x and 0.84x in
    # bfloat16; the scalar sum(x @ w) 1.02x, 1.07x and 0.84x, 0.89x; value_and_grad of
    # sum((x @ w) * g) 1.02x, 1.12x and 0.86x, 1.02x.
    def program(x, w, labels, g):
        return jnp.sum(x @ w, axis=0, dtype=jnp.float32), g @ w.T, x.T @ g

    return program


def _jaxce_ce_with(options: Mapping[str, Any], weighted: bool) -> Callable[..., jax.Array]:
    """The integer-label loss with ``options`` (and the class weights if ``weighted``)."""

    def loss(z, labels, weights):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            z, labels, class_weights=weights if weighted else None, reduction="mean", **options
        )

    return loss


def _optax_ce_with(options: Mapping[str, Any], weighted: bool) -> Callable[..., jax.Array]:
    """The same loss as :func:`_jaxce_ce_with`, as it is best written with optax (PyTorch's
    semantics: each class's term weighted by its class weight, the mean over the labels' weights).

    With smoothing ``eps`` over ``C`` classes, class weights ``w``, z-loss ``zl`` and
    ``lse = logsumexp(z)``, the loss of an example of label ``y`` is

        (1 - eps) * w_y * nll + eps / C * sum_c w_c (lse - z_c) + zl * w_y * lse**2

    with ``nll`` from ``optax.softmax_cross_entropy_with_integer_labels`` and the smoothing term
    written ``sum(w) * lse - z @ w`` (``C * lse - sum(z)`` without weights), on the soft-capped
    logits ``cap * tanh(z / cap)``. Nothing of size ``[N, C]`` is made but the logits' own
    arrays: a one-hot of the labels, smoothed by ``optax.smooth_labels`` for
    ``optax.softmax_cross_entropy``, would be a straw man that writes and reads one more array
    of the logits' size. In float32, as jaxce computes (and as the float32 weights need under
    strict dtype promotion)."""
    cap, eps, zl = (options.get(k) for k in ("logit_soft_cap", "label_smoothing", "z_loss"))

    def loss(z, labels, weights):
        z = z.astype(jnp.float32)
        if cap is not None:
            z = cap * jnp.tanh(z / cap)
        w_y = weights[labels] if weighted else None
        per_example = optax.softmax_cross_entropy_with_integer_labels(z, labels)
        if w_y is not None:
            per_example = w_y * per_example
        lse = jax.nn.logsumexp(z, axis=-1)  # unused without smoothing and z-loss: XLA drops it
        if eps is not None:
            classes = z.shape[-1]
            if weighted:
                # At full float32 precision: a GPU multiplies float32 in TF32 by default, whose
                # 10-bit mantissa would make this another loss than jaxce's.
                z_w = jnp.matmul(z, weights, precision=jax.lax.Precision.HIGHEST)
                smooth = jnp.sum(weights) * lse - z_w
            else:
                smooth = classes * lse - jnp.sum(z, axis=-1)
            per_example = (1 - eps) * per_example + eps / classes * smooth
        if zl is not None:
            per_example = per_example + zl * (lse**2 if w_y is None else w_y * lse**2)
        return jnp.mean(per_example) if w_y is None else jnp.sum(per_example) / jnp.sum(w_y)

    return loss


def _optax_ce(z, labels, weights):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, labels))


_jaxce_ce = _jaxce_ce_with({}, weighted=False)
_jaxce_ce_all_options = _jaxce_ce_with(ALL_OPTIONS, weighted=True)
_optax_ce_all_options = _optax_ce_with(ALL_OPTIONS, weighted=True)


def _jaxce_soft_ce(z, labels):
    return jaxce.softmax_cross_entropy(z, labels, reduction="mean")


def _optax_soft_ce(z, labels):
    return jnp.mean(optax.softmax_cross_entropy(z, labels))


def _jaxce_binary(z, labels):
    return jaxce.sigmoid_binary_cross_entropy(z, labels, reduction="mean")


def _optax_binary(z, labels):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(z, labels))


def _jaxce_fused(x, w, labels):
    return jaxce.linear_softmax_cross_entropy(x, w, labels, reduction="mean")


def _jaxce_unfused(x, w, labels):
    return jaxce.softmax_cross_entropy_with_integer_labels(x @ w, labels, reduction="mean")


def _optax_unfused(x, w, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ w, labels))


def _plain_and_all_options(
    program: Callable[[Callable[..., jax.Array]], Callable[[], Callable]],
) -> tuple[Program, ...]:
    """The integer-label loss, plain and with every option on, jaxce's and optax's, each made
    into a program by ``program`` (e.g. :func:`_grad_of_logits`)."""
    return (
        Program("jaxce", JAXCE, program(_jaxce_ce), compare_to="optax"),
        Program(
            "jaxce, all options",
            JAXCE,
            program(_jaxce_ce_all_options),
            compare_to="optax, all options",
        ),
        Program("optax", OPTAX, program(_optax_ce)),
        Program("optax, all options", OPTAX, program(_optax_ce_all_options)),
    )


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "cross_entropy",
            "integer-label softmax cross-entropy, value_and_grad of the mean wrt the logits",
            ("N", "C"),
            _cross_entropy_inputs,
            (
                *_plain_and_all_options(_grad_of_logits),
                Program(JAXCE_ALONE, JAXCE, _loss_alone(_jaxce_ce), compare_to=OPTAX_ALONE),
                Program(OPTAX_ALONE, OPTAX, _loss_alone(_optax_ce)),
                Program("floor (read + write the logits)", FLOOR, _logits_floor),
            ),
        ),
        Benchmark(
            "soft_cross_entropy",
            "softmax cross-entropy on probability labels, value_and_grad of the mean wrt the"
            " logits",
            ("N", "C"),
            _soft_cross_entropy_inputs,
            (
                Program("jaxce", JAXCE, _grad_of_logits(_jaxce_soft_ce), compare_to="optax"),
                Program("optax", OPTAX, _grad_of_logits(_optax_soft_ce)),
                Program(JAXCE_ALONE, JAXCE, _loss_alone(_jaxce_soft_ce), compare_to=OPTAX_ALONE),
                Program(OPTAX_ALONE, OPTAX, _loss_alone(_optax_soft_ce)),
                Program(
                    "floor (read logits and labels, write logits)",
                    FLOOR,
                    _logits_and_labels_floor,
                ),
            ),
        ),
        Benchmark(
            "binary",
            "sigmoid binary cross-entropy, value_and_grad of the mean wrt the logits",
            ("N", "C"),
            _binary_inputs,
            (
                Program("jaxce", JAXCE, _grad_of_logits(_jaxce_binary), compare_to="optax"),
                Program("optax", OPTAX, _grad_of_logits(_optax_binary)),
                Program(
                    "floor (read logits and labels, write logits)",
                    FLOOR,
                    _logits_and_labels_floor,
                ),
            ),
        ),
        Benchmark(
            "linear",
            "linear + integer-label softmax cross-entropy, value_and_grad of the mean wrt x and w",
            ("N", "D", "V"),
            _linear_inputs,
            (
                Program(
                    "jaxce fused (linear_softmax_cross_entropy)",
                    JAXCE,
                    _grad_of_x_and_w(_jaxce_fused),
                    compare_to="optax unfused (x @ w, then the loss)",
                ),
                Program(
                    "jaxce unfused (x @ w, then the loss)",
                    JAXCE,
                    _grad_of_x_and_w(_jaxce_unfused),
                    compare_to="optax unfused (x @ w, then the loss)",
                ),
                Program(
                    "optax unfused (x @ w, then the loss)", OPTAX, _grad_of_x_and_w(_optax_unfused)
                ),
                Program("floor (x @ w, g @ w.T, x.T @ g)", FLOOR, _matmul_floor),
            ),
        ),
        Benchmark(
            "options",
            "integer-label softmax cross-entropy with each option alone and all four,"
            " value_and_grad of the mean wrt the logits",
            ("N", "C"),
            _cross_entropy_inputs,
            (
                *(
                    program
                    for name, (options, weighted) in OPTION_SETS.items()
                    for program in (
                        Program(
                            f"jaxce, {name}",
                            JAXCE,
                            _grad_of_logits(_jaxce_ce_with(options, weighted)),
                            compare_to=f"optax, {name}",
                        ),
                        Program(
                            f"optax, {name}",
                            OPTAX,
                            _grad_of_logits(_optax_ce_with(options, weighted)),
                        ),
                    )
                ),
                Program("floor (read + write the logits)", FLOOR, _logits_floor),
            ),
            by_default=False,
        ),
        Benchmark(
            "step",
            "a training step: value_and_grad wrt the parameters of a multilayer perceptron"
            f" ({MODEL_FEATURES} inputs, {MODEL_HIDDEN} ReLU units) of the mean loss on its logits",
            ("N", "C"),
            _step_inputs,
            (
                *_plain_and_all_options(_step),
                Program("floor (the model, a linear loss)", FLOOR, _model_floor),
            ),
            by_default=False,
        ),
    )
}
# What a run that names no benchmark measures.
DEFAULT_BENCHMARKS = tuple(name for name, b in BENCHMARKS.items() if b.by_default)


# --------------------------------------------------------------------------------------------
# Targets


@dataclasses.dataclass(frozen=True)
class Targets:
    """What a program should reach; ``None`` where nothing is promised."""

    min_speedup: float | None = None  # optax's time / this program's time
    max_x_floor: float | None = None  # this program's time / the floor's
    max_compile_ratio: float | None = None  # this program's compile time / optax's


# The compile-time target, for every value_and_grad program that has an optax counterpart.
MAX_COMPILE_RATIO = 1.5


def _compiles_against_optax(benchmark: str, program: str) -> bool:
    """Whether ``program`` of ``benchmark`` is a jaxce ``value_and_grad`` program compared with
    an optax one: every jaxce program with a ``compare_to`` but the "loss alone" ones, which
    compile no gradient."""
    found = BENCHMARKS.get(benchmark)  # None for a benchmark of a saved run no longer defined
    programs = {} if found is None else {p.name: p for p in found.programs}
    mine = programs.get(program)
    if mine is None or mine.role != JAXCE or mine.compare_to is None or program == JAXCE_ALONE:
        return False
    other = programs.get(mine.compare_to)
    return other is not None and other.role == OPTAX


def targets(benchmark: str, program: str, dtype: str, backend: str) -> Targets:
    """The performance targets of a program of a benchmark, from the project's goals: never
    slower than optax, with any option; twice as fast in bfloat16 on integer labels; near the
    floor; and a ``jax.jit(value_and_grad)`` that compiles in at most ``MAX_COMPILE_RATIO``
    times optax's time."""
    if benchmark == "options" and program == "jaxce, all four":
        # The same program as cross_entropy's "jaxce, all options" (OPTION_SETS["all four"]).
        return targets("cross_entropy", "jaxce, all options", dtype, backend)
    compile_ratio = MAX_COMPILE_RATIO if _compiles_against_optax(benchmark, program) else None
    if benchmark == "cross_entropy" and program == "jaxce":
        return Targets(
            min_speedup=2.0 if dtype == "bfloat16" else 1.0,
            # The project's issue promises "<= 1.5x the floor in f32 on CPU", and no more: on
            # an accelerator, and in bfloat16, the promise is against optax.
            max_x_floor=1.5 if dtype == "float32" and backend == "cpu" else None,
            max_compile_ratio=compile_ratio,
        )
    if benchmark == "cross_entropy" and program == "jaxce, all options":
        return Targets(min_speedup=1.0, max_x_floor=2.5, max_compile_ratio=compile_ratio)
    if program == JAXCE_ALONE:
        return Targets(min_speedup=1.0)
    if benchmark in ("soft_cross_entropy", "binary") and program == "jaxce":
        return Targets(min_speedup=1.0, max_x_floor=1.3, max_compile_ratio=compile_ratio)
    if benchmark == "options" and program in {f"jaxce, {name}" for name in OPTION_SETS}:
        return Targets(min_speedup=1.0, max_compile_ratio=compile_ratio)  # never slower
    return Targets(max_compile_ratio=compile_ratio)


# --------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class Result:
    """The measurements of one program at one shape and dtype.

    Times are in seconds and memory in bytes. ``times`` holds, for each timed sample, the mean
    time of its ``calls`` calls (more than one for a fast program). The ratios and ``missed`` are
    filled in by ``compute_ratios`` from the other programs of the same run; ``None`` where
    there is nothing to compare with (or the measurement failed, then ``error`` says why).
    """

    benchmark: str
    program: str
    role: str
    shape: tuple[int, ...]
    dtype: str
    times: tuple[float, ...] = ()
    calls: int = 1
    compile_seconds: float | None = None
    temp_bytes: int | None = None
    compare_to: str | None = None
    error: str | None = None
    x_floor: float | None = None
    speedup: float | None = None
    speedup_range: tuple[float, float] | None = None
    compile_ratio: float | None = None
    missed: tuple[str, ...] = ()

    @property
    def median(self) -> float | None:
        """The median of the timed runs, in seconds."""
        return statistics.median(self.times) if self.times else None

    @property
    def minimum(self) -> float | None:
        """The fastest timed run, in seconds."""
        return min(self.times) if self.times else None

    def to_json(self) -> dict[str, Any]:
        """The fields and the median and minimum, as JSON-compatible values."""
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        out["times"] = list(self.times)
        out["missed"] = list(self.missed)
        out["median_seconds"] = self.median
        out["min_seconds"] = self.minimum
        return out


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _round_ratios(numerator: Result | None, denominator: Result | None) -> list[float] | None:
    """``numerator``'s time over ``denominator``'s in each round, or ``None`` where the two were
    not timed in the same rounds."""
    if numerator is None or denominator is None or not numerator.times or not denominator.times:
        return None
    if len(numerator.times) != len(denominator.times) or min(denominator.times) <= 0:
        return None
    return [a / b for a, b in zip(numerator.times, denominator.times, strict=True)]


def paired_ratio(numerator: Result | None, denominator: Result | None) -> float | None:
    """The ratio of two programs' times measured in the same rounds: the median over the rounds
    of ``numerator``'s time over ``denominator``'s (the ratio of the medians where the two were
    not timed the same number of times). ``None`` where either has no time."""
    ratios = _round_ratios(numerator, denominator)
    if ratios is None:
        if numerator is None or denominator is None:
            return None
        return _ratio(numerator.median, denominator.median)
    return statistics.median(ratios)


def paired_ratio_range(
    numerator: Result | None, denominator: Result | None
) -> tuple[float, float] | None:
    """The lowest and highest of the rounds' ratios that :func:`paired_ratio` takes the median
    of; ``None`` where there are fewer than two rounds to compare."""
    ratios = _round_ratios(numerator, denominator)
    return None if ratios is None or len(ratios) < 2 else (min(ratios), max(ratios))


def _missing(value: float, limit: float, *, above: bool) -> str:
    """``value``, which misses ``limit`` (lies above it where ``above``, below it otherwise),
    with two decimals, or as many more as it takes to print it on its side of the limit: a miss
    never reads as its target. 0.996 under 1 is "0.996", not "1.00"; 1.504 over 1.5 is
    "1.504". Past six decimals, it is rounded away from the limit."""
    for digits in range(2, 7):
        text = f"{value:.{digits}f}"
        if float(text) > limit if above else float(text) < limit:
            return text
    step = 1e-6
    return f"{(math.ceil if above else math.floor)(value / step) * step:.6f}"


def missed_targets(result: Result, backend: str) -> tuple[str, ...]:
    """The targets a result misses, as sentences; empty when it meets all of them."""
    t = targets(result.benchmark, result.program, result.dtype, backend)
    missed = []
    if t.min_speedup is not None and result.speedup is not None:
        if result.speedup < t.min_speedup:
            spread = ""
            if result.speedup_range is not None:  # a ratio near 1 may be the machine's noise
                low, high = result.speedup_range
                spread = f"; {low:.2f}-{high:.2f} over the {len(result.times)} rounds"
            target = "" if t.min_speedup == 1.0 else f"; target >= {t.min_speedup:g}x faster"
            if result.speedup < 1.0:
                missed.append(
                    f"slower than optax (optax's time / this ="
                    f" {_missing(result.speedup, 1.0, above=False)}{target}{spread})"
                )
            else:
                missed.append(
                    f"{_missing(result.speedup, t.min_speedup, above=False)}x faster than optax"
                    f" (target >= {t.min_speedup:g}x{spread})"
                )
    if t.max_x_floor is not None and result.x_floor is not None:
        if result.x_floor > t.max_x_floor:
            missed.append(
                f"{_missing(result.x_floor, t.max_x_floor, above=True)}x the floor"
                f" (target <= {t.max_x_floor:g}x)"
            )
    if t.max_compile_ratio is not None and result.compile_ratio is not None:
        if result.compile_ratio > t.max_compile_ratio:
            missed.append(
                f"compiles in {_missing(result.compile_ratio, t.max_compile_ratio, above=True)}x"
                f" optax's time (target <= {t.max_compile_ratio:g}x)"
            )
    return tuple(missed)


def compute_ratios(results: Sequence[Result], backend: str = "cpu") -> list[Result]:
    """Fills in each result's ratios from the results of the same benchmark, shape and dtype.

    ``x_floor`` is the time over the floor's, ``speedup`` the compared optax program's time over
    this one's (above 1: faster than optax), each the median over the rounds of the ratio of
    the two times of a round (:func:`paired_ratio`), and ``speedup_range`` the spread of the
    rounds' speed-ups; ``compile_ratio`` is this program's compile time over optax's. Then
    ``missed`` lists the targets not met.

    Args:
      results: measured results, in any order.
      backend: the JAX backend they were measured on (``"cpu"``, ``"gpu"``, ``"tpu"``),
        which some targets depend on.

    Returns:
      New results, in the same order.
    """
    cases: dict[tuple, dict[str, Result]] = {}
    for r in results:
        cases.setdefault((r.benchmark, r.shape, r.dtype), {})[r.program] = r
    out = []
    for r in results:
        case = cases[(r.benchmark, r.shape, r.dtype)]
        floor = next((f for f in case.values() if f.role == FLOOR), None)
        other = case.get(r.compare_to) if r.compare_to else None
        r = dataclasses.replace(
            r,
            x_floor=paired_ratio(r, floor),
            speedup=paired_ratio(other, r),
            speedup_range=paired_ratio_range(other, r),
            compile_ratio=_ratio(r.compile_seconds, other.compile_seconds if other else None),
        )
        out.append(dataclasses.replace(r, missed=missed_targets(r, backend)))
    return out


# --------------------------------------------------------------------------------------------
# Measuring


class _Progress:
    """A tqdm progress bar on stderr, plain lines where tqdm is missing, or nothing."""

    def __init__(self, total: int, cases: int, mode: bool | None):
        self._bar = None
        self._plain = False
        self._cases = cases
        self._case = 0
        if mode is False:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None and (mode or sys.stderr.isatty()):
            self._bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
        else:
            self._plain = True

    def case(self, text: str) -> None:
        self._case += 1
        if self._bar is not None:
            self._bar.set_description(text)
        elif self._plain:
            print(f"[{self._case}/{self._cases}] {text}", file=sys.stderr, flush=True)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update()

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        elif self._plain:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _temp_bytes(compiled) -> int | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    return None if stats is None else getattr(stats, "temp_size_in_bytes", None)


def _error(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def format_shape(shape: Sequence[int]) -> str:
    """``(4096, 32768)`` -> ``"4096x32768"``."""
    return "x".join(str(s) for s in shape)


def _measure_case(
    benchmark: Benchmark,
    shape: tuple[int, ...],
    dtype: str,
    repeats: int,
    progress: _Progress,
    compile_samples: int = COMPILE_SAMPLES,
    warm_up: bool = True,
) -> list[Result]:
    """Compiles, warms up and times every program of a benchmark at one shape and dtype.
    ``warm_up``: compile each program once, untimed, before the timed compilations."""
    base = {
        p.name: Result(benchmark.name, p.name, p.role, shape, dtype, compare_to=p.compare_to)
        for p in benchmark.programs
    }
    results = dict(base)
    try:
        args = jax.block_until_ready(benchmark.inputs(shape, dtype))
    except Exception as err:
        message = f"could not make the inputs: {_error(err)}"
        progress.write(f"{benchmark.name} {format_shape(shape)} {dtype}: {message}")
        return [dataclasses.replace(r, error=message) for r in results.values()]

    compiled = {}
    for p in benchmark.programs:
        try:
            samples = []
            executable = None
            for sample in range(compile_samples + warm_up):  # a warm-up first (see above)
                fn = p.make()  # a fresh function: nothing of an earlier compilation is reused
                start = time.perf_counter()
                executable = jax.jit(fn).lower(*args).compile()
                if sample >= warm_up:  # after the warm-up, if any
                    samples.append(time.perf_counter() - start)
            seconds = statistics.median(samples)
            compiled[p.name] = executable
            results[p.name] = dataclasses.replace(
                results[p.name], compile_seconds=seconds, temp_bytes=_temp_bytes(executable)
            )
        except Exception as err:  # reported in the table; the other programs go on
            results[p.name] = dataclasses.replace(results[p.name], error=_error(err))
            progress.write(
                f"{benchmark.name} {format_shape(shape)} {dtype} {p.name}: {_error(err)}"
            )
        progress.step()

    times: dict[str, list[float]] = {name: [] for name in compiled}
    calls = dict.fromkeys(compiled, 1)
    orders = RoundOrders()
    last = None
    for repeat in range(repeats + 1):  # the first round is the warm-up
        for name in orders.next(list(compiled), last):
            try:
                seconds = _seconds_per_call(compiled[name], args, calls[name])
            except Exception as err:  # e.g. out of memory: drop this program, keep the others
                del compiled[name]
                results[name] = dataclasses.replace(results[name], error=_error(err))
                progress.write(
                    f"{benchmark.name} {format_shape(shape)} {dtype} {name}: {_error(err)}"
                )
                continue
            if repeat:
                times[name].append(seconds)
            elif seconds < MIN_SAMPLE_SECONDS:  # a fast program: time it in a loop, so that a
                # sample lasts MIN_SAMPLE_SECONDS, longer than the clock's and the scheduler's
                # resolution; a second call, after the warm-up, tells how many calls that is
                seconds = _seconds_per_call(compiled[name], args, 1)
                calls[name] = max(1, min(10_000, math.ceil(MIN_SAMPLE_SECONDS / seconds)))
            last = name
            progress.step()
    return [
        dataclasses.replace(r, times=tuple(times[name]), calls=calls[name])
        if r.error is None
        else r
        for name, r in results.items()
    ]


class RoundOrders:
    """The order of each round of a case's timing: the programs' listed order in the first
    round (the warm-up), then in each round, of ``ORDER_CANDIDATES`` shuffles by a generator of
    a fixed seed (the same orders in every run), the first that puts each program least often
    after the program it has already followed most (ties: least often in all), the previous
    round's last program counting as the one before its first; a program never runs twice in
    a row (an order that would start with the last one is rotated by one).

    Which program ran just before changes a program's time: right after optax's program with
    every option on, which frees 512 MiB of temporaries, the loss alone took 48-49 ms instead
    of 35 ms (jaxce's and optax's alike, float32 [16384, 4096], 7 rounds). Each round starting
    one program further on, as the benchmark ran until 2026-12-05, put the same program before
    each program in every round (jaxce's loss alone after optax's all-options program), and the
    median over the rounds kept the bias in its ratio. With ``n`` programs no order can put a
    program after a given one in fewer than ``ceil(rounds / (n - 1))`` of the rounds; these
    come close: over the 7 timed rounds of the cross-entropy benchmark's 7 programs, no program
    follows the same one more than twice (plain shuffles: 4 times), with 3 programs 4 times
    (the bound), and with 2, each round in the listed order, every time."""

    def __init__(self) -> None:
        self._generator = random.Random(0)
        self._followed: dict[tuple[str, str], int] = {}
        self._last: str | None = None

    def next(self, names: Sequence[str], last: str | None = None) -> list[str]:
        """The next round's order of the programs ``names`` (those still measured); ``last``:
        the program that ran last, where it is not the last round's last (which failed)."""
        names = list(names)
        self._last = last if last is not None else self._last
        if self._last is None or len(names) < 3:
            order = names
        else:
            candidates = []
            for _ in range(ORDER_CANDIDATES):
                candidate = list(names)
                self._generator.shuffle(candidate)
                candidates.append(candidate)
            order = min(candidates, key=self._cost)
        if order and order[0] == self._last:
            order = order[1:] + order[:1]
        for pair in self._pairs(order):
            self._followed[pair] = self._followed.get(pair, 0) + 1
        if order:
            self._last = order[-1]
        return order

    def _pairs(self, order: list[str]) -> list[tuple[str, str]]:
        if self._last is None:
            return []  # the warm-up: what runs in it is not timed
        return list(zip([self._last, *order[:-1]], order, strict=True))

    def _cost(self, order: list[str]) -> tuple[int, int, int]:
        pairs = self._pairs(order)
        counts = [self._followed.get(pair, 0) for pair in pairs] or [0]
        repeats = sum(before == after for before, after in pairs)
        return (repeats, max(counts), sum(counts))


def round_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The orders of ``rounds`` rounds of the programs ``names``, none failing
    (:class:`RoundOrders`)."""
    orders = RoundOrders()
    return [orders.next(names) for _ in range(rounds)]


ORDER_CANDIDATES = 64
ROUND_ORDER = "shuffled"
"""How a run orders its rounds, in its header line and its saved settings (``--json``); a run
saved without it, from before :class:`RoundOrders`, ran them round-robin."""


def _seconds_per_call(executable, args: Sequence[jax.Array], calls: int) -> float:
    """The mean time of ``calls`` calls, each waited for (latency, not pipelined throughput)."""
    start = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(executable(*args))
    return (time.perf_counter() - start) / calls


def plan(
    benchmarks: Sequence[str] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
    dtypes: Sequence[str] | None = None,
    *,
    quick: bool = False,
) -> list[tuple[str, tuple[int, ...], str]]:
    """The ``(benchmark, shape, dtype)`` cases that ``run`` measures, in order.

    Args:
      benchmarks: names from ``BENCHMARKS``; ``None`` for ``DEFAULT_BENCHMARKS`` (all but
        ``options`` and ``step``).
      shapes: shapes ``(N, C)`` for the logits' benchmarks and ``step``, ``(N, D, V)`` for
        ``linear``, each used by the benchmarks of its length; ``None`` for the default grid
        (``GRID``, extended by ``ACCELERATOR_GRID`` on a GPU or TPU) or ``QUICK_GRID`` when
        ``quick``.
      dtypes: names from ``DTYPES``; ``None`` for float32 and bfloat16.
      quick: use the reduced grid.

    Returns:
      The cases, benchmark by benchmark, shapes in the given order, dtypes innermost.
    """
    names = list(DEFAULT_BENCHMARKS) if benchmarks is None else list(benchmarks)
    for name in names:
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    dtypes = list(DEFAULT_DTYPES if dtypes is None else dtypes)
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    cases = []
    for name in names:
        rank = len(BENCHMARKS[name].shape_names)
        if shapes is not None:
            chosen = [tuple(s) for s in shapes if len(s) == rank]
        elif quick:
            chosen = list(QUICK_GRID[name])
        else:
            chosen = list(GRID[name])
            if jax.default_backend() != "cpu":
                chosen += ACCELERATOR_GRID[name]
        cases += [(name, shape, dtype) for shape in chosen for dtype in dtypes]
    return cases


def warms_up_every_case(quick: bool) -> bool:
    """Whether every program of every case is compiled once, untimed, before its timed
    compilations; else only those of each benchmark's first case. The warm-up is for
    accelerators, where XLA autotunes a matrix product's shape once per process (see the module
    docstring). XLA's CPU compiler autotunes nothing, so ``--quick`` on CPU, which spends three
    quarters of its time compiling, keeps the warm-up only where a process compiles a
    benchmark's operations for the first time: in a ``--quick`` run with a warm-up everywhere,
    the untimed compilation took a median 1.09x the timed one (at most 1.32x) in benchmarks'
    first cases and 1.05x in the others (where 3 of 56 took 1.24-1.58x); without, the whole
    ``--quick`` run took 43 s instead of 62 s on 2 CPU cores."""
    return not quick or jax.default_backend() != "cpu"


def run(
    benchmarks: Sequence[str] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
    dtypes: Sequence[str] | None = None,
    repeats: int = 5,
    *,
    quick: bool = False,
    progress: bool | None = False,
    compile_samples: int = COMPILE_SAMPLES,
) -> list[Result]:
    """Measures the benchmarks on JAX's default device.

    Args:
      benchmarks, shapes, dtypes, quick: the cases, as for ``plan``.
      repeats: timed runs of each program, >= 1, after one warm-up run.
      progress: ``True`` for a progress bar on stderr (plain lines without tqdm), ``None`` for
        a bar when stderr is a terminal and plain lines otherwise, ``False`` for silence.
      compile_samples: fresh compilations of each program after an untimed one, >= 1; the
        compile time reported is their median. With ``quick`` on CPU, only the first case of
        each benchmark has the untimed one (:func:`warms_up_every_case`).

    Returns:
      One ``Result`` per case and program, with its ratios. A program that fails (e.g. out of
      memory) gets an ``error`` and the others are still measured; a KeyboardInterrupt stops
      the run and returns what was measured so far.
    """
    for name, value in (("repeats", repeats), ("compile_samples", compile_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    cases = plan(benchmarks, shapes, dtypes, quick=quick)
    steps = sum(len(BENCHMARKS[b].programs) * (repeats + 2) for b, _, _ in cases)
    bar = _Progress(steps, len(cases), progress)
    results: list[Result] = []
    every_case = warms_up_every_case(quick)
    try:
        for index, (name, shape, dtype) in enumerate(cases):
            bar.case(f"{name} {format_shape(shape)} {dtype}")
            warm_up = every_case or index == 0 or cases[index - 1][0] != name
            results += _measure_case(
                BENCHMARKS[name], shape, dtype, repeats, bar, compile_samples, warm_up
            )
    except KeyboardInterrupt:
        bar.write("interrupted: reporting what was measured")
    finally:
        bar.close()
    return compute_ratios(results, jax.default_backend())


# --------------------------------------------------------------------------------------------
# Reporting


def format_seconds(seconds: float | None, micro: str = "µs") -> str:
    """A duration with three significant digits in s, ms or µs, e.g. ``"41.2 µs"``."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, micro)):
        if seconds >= scale or unit == micro:
            return f"{_three_digits(seconds / scale)} {unit}"
    raise AssertionError("unreachable")


def format_bytes(size: int | None) -> str:
    """A size with three significant digits in B, KiB, MiB or GiB, e.g. ``"1.50 GiB"``."""
    if size is None:
        return "-"
    for power, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 2**power:
            return f"{_three_digits(size / 2**power)} {unit}"
    return f"{size} B"


def _three_digits(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def environment() -> dict[str, Any]:
    """Date, machine and versions, for the header of a table and the JSON output."""

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    device = jax.devices()[0]
    processor = platform.processor() or platform.machine()
    try:  # Linux names the CPU model only here
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        processor = models[0] if models else processor
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "system": f"{platform.system()} {platform.machine()}",
        "processor": processor,
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "optax": optax.__version__,
        "jaxce": jaxce.__version__,
    }


def describe(
    env: Mapping[str, Any],
    repeats: int | None = None,
    compile_samples: int | None = None,
    warm_up_every_case: bool = True,
    round_order: str = ROUND_ORDER,
) -> str:
    """One line giving the date, machine and versions of a run (``warm_up_every_case``: see
    :func:`warms_up_every_case`; ``round_order``: ``ROUND_ORDER``, or ``"round-robin"`` for a
    run saved before it)."""
    runs = ""
    if repeats is not None:
        runs = f"; median of {repeats} runs after a warm-up, {round_order}"
    if compile_samples is not None:
        runs += f"; compile time: median of {compile_samples} compilations after a warm-up one"
        if not warm_up_every_case:
            runs += " in each benchmark's first case, none in the others"
    return (
        f"{env['date']}: {env['processor']}, {env['cpu_count']} CPU cores, {env['system']};"
        f" JAX device {env['device_kind']} ({env['backend']}); JAX {env['jax']}, jaxlib"
        f" {env['jaxlib']}, optax {env['optax']}, jaxce {env['jaxce']}{runs}"
    )


_COLUMNS = (
    "shape",
    "dtype",
    "program",
    "time",
    "min",
    "x floor",
    "speed-up vs optax",
    "compile",
    "compile x optax",
    "temp memory",
)
_LEGEND = (
    "time: median of the timed runs; x floor: time / the floor's time; speed-up vs optax:"
    " optax's time / this time (above 1: faster than optax), both ratios the median over the"
    " rounds of the two times of a round; compile: lower + compile of jax.jit(value_and_grad)"
    " (of the loss alone in the loss-alone rows), the median over fresh compilations after an"
    " untimed one; compile x optax: this compile time / optax's; temp memory: compiled"
    " temporary buffers (arguments and results not counted); *: misses a target or failed (see"
    " below)."
)


def _rows(results: Sequence[Result], micro: str) -> list[list[str]]:
    rows = []
    previous = None
    for r in results:
        case = (format_shape(r.shape), r.dtype)
        first = case if case != previous else ("", "")
        previous = case
        name = r.program + (" *" if r.missed or r.error is not None else "")
        if r.error is not None:  # the error is printed below the table, whatever its length
            rows.append([*first, name, "failed", "", "", "", "", "", ""])
            continue
        rows.append(
            [
                *first,
                name,
                format_seconds(r.median, micro),
                format_seconds(r.minimum, micro),
                _times(r.x_floor),
                _times(r.speedup),
                format_seconds(r.compile_seconds, micro),
                _times(r.compile_ratio),
                format_bytes(r.temp_bytes),
            ]
        )
    return rows


def _by_benchmark(results: Sequence[Result]) -> dict[str, list[Result]]:
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.benchmark, []).append(r)
    return groups


def _summary(results: Sequence[Result], markdown: bool) -> list[str]:
    """The lines below the tables: the programs that failed, with their errors, and the targets
    missed; and only when there are neither, that the targets are met, or that none apply.
    A failed program's targets are not checked, so a failure never reads as targets met."""

    def where(r: Result) -> str:
        return f"{r.benchmark} {format_shape(r.shape)} {r.dtype} {r.program}"

    failed = [f"{where(r)}: failed: {r.error}" for r in results if r.error is not None]
    missed = [f"{where(r)}: {'; '.join(r.missed)}" for r in results if r.missed]
    lines = []
    for title, items in (("Programs failed", failed), ("Targets missed", missed)):
        if items and markdown:
            lines += ["", f"{title} ({len(items)}):", "", *(f"- {item}" for item in items)]
        elif items:
            lines += ["", f"{title}: {len(items)}", *items]
    if failed or missed:
        return lines
    # Which programs have targets does not depend on the backend (only the floor's target of
    # cross_entropy's "jaxce", which has others, does).
    targeted = {
        r.benchmark for r in results if targets(r.benchmark, r.program, r.dtype, "cpu") != Targets()
    }
    untargeted = [name for name in _by_benchmark(results) if name not in targeted]
    if not targeted:
        return ["", "No targets apply to these programs."]
    met = "Every target is met" if markdown else "Targets met"
    if untargeted:
        return ["", f"{met} (no targets apply to {', '.join(untargeted)})."]
    return ["", f"{met}."]


def _notes(benchmark: str) -> str:
    options = ", ".join(f"{k}={v:g}" for k, v in ALL_OPTIONS.items())
    if benchmark in ("cross_entropy", "step"):
        return f"all options: {options} and class_weights."
    if benchmark == "options":
        return f"{options}; class weights in [0.5, 1.5)."
    return ""


def format_table(results: Sequence[Result], header: str = "", micro: str = "µs") -> str:
    """The results as aligned plain-text tables, one per benchmark, for a terminal.

    Args:
      results: from ``run``.
      header: a first line, e.g. ``describe(environment())``.
      micro: the unit written for microseconds (``"us"`` where the terminal lacks ``µ``).
    """
    lines = [header, ""] if header else []
    for name, group in _by_benchmark(results).items():
        lines.append(f"{name}: {BENCHMARKS[name].summary}")
        if _notes(name):
            lines.append(_notes(name))
        table = [list(_COLUMNS), *_rows(group, micro)]
        widths = [max(len(row[i]) for row in table if len(row) > i) for i in range(len(_COLUMNS))]
        for k, row in enumerate(table):
            cells = [
                row[i].ljust(widths[i]) if i < 3 or k == 0 else row[i].rjust(widths[i])
                for i in range(len(row))
            ]
            lines.append("  ".join(cells).rstrip())
        lines.append("")
    lines.append(_LEGEND)
    lines += _summary(results, markdown=False)
    return "\n".join(lines)


def format_markdown(results: Sequence[Result], header: str = "") -> str:
    """The results as Markdown tables, one per benchmark, to paste in a README.

    Args:
      results: from ``run``.
      header: a first paragraph, e.g. ``describe(environment(), repeats)``.
    """
    lines = [header, ""] if header else []
    for name, group in _by_benchmark(results).items():
        notes = f" ({_notes(name).rstrip('.')})" if _notes(name) else ""
        lines += [f"`{name}`: {BENCHMARKS[name].summary}{notes}.", ""]
        columns = [c for c in _COLUMNS if c != "min"]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join("---" for _ in columns) + "|")
        for row in _rows(group, "µs"):
            del row[4]  # the minimum: the median is what the tables compare
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
        lines.append("")
    lines.append(_LEGEND)
    lines += _summary(results, markdown=True)
    return "\n".join(lines)


def write_json(path: str | os.PathLike, results: Sequence[Result], env: Mapping[str, Any]) -> None:
    """Writes ``{"environment": ..., "results": [...]}`` (times in seconds, memory in bytes)."""
    data = {"environment": dict(env), "results": [r.to_json() for r in results]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def read_json(path: str | os.PathLike) -> tuple[list[Result], dict[str, Any]]:
    """Reads what :func:`write_json` wrote, with the ratios, their spread and the targets
    computed again (:func:`compute_ratios`).

    Returns:
      The results and the environment (date, machine, versions, repeats).

    Raises:
      ValueError: if the file is not JSON of that form (the message names the file).
    """
    fields = {f.name for f in dataclasses.fields(Result)}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        env = dict(data["environment"])
        results = []
        for row in data["results"]:
            row = {k: v for k, v in row.items() if k in fields}
            for key in ("shape", "times"):
                row[key] = tuple(row[key])
            results.append(Result(**row))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{os.fspath(path)!r} is not a result file of python -m jaxce.bench --json: {err}"
        ) from None
    return compute_ratios(results, env.get("backend", "cpu")), env


def join_runs(
    runs: Sequence[tuple[list[Result], dict[str, Any]]],
) -> tuple[list[Result], dict[str, Any]]:
    """Joins saved runs (what :func:`read_json` returns) of one machine, with the same versions
    and settings, into one: their results in order, the environment of the first, dated from the
    first run's date to the last's where they differ.

    Raises:
      ValueError: if the runs differ in anything but the date, or if two of them measured the
        same program at the same shape and dtype.
    """
    results, env = list(runs[0][0]), dict(runs[0][1])
    seen = {(r.benchmark, r.program, r.shape, r.dtype) for r in results}
    for more, other in runs[1:]:
        differ = sorted(
            k for k in env.keys() | other.keys() if k != "date" and env.get(k) != other.get(k)
        )
        if differ:
            name = differ[0]
            raise ValueError(
                f"the runs differ in {', '.join(differ)} ({env.get(name)!r} against"
                f" {other.get(name)!r}): only runs of one machine and settings are joined"
            )
        for r in more:
            key = (r.benchmark, r.program, r.shape, r.dtype)
            if key in seen:
                raise ValueError(
                    f"{r.benchmark} {r.program} {format_shape(r.shape)} {r.dtype} is in two runs"
                )
            seen.add(key)
            results.append(r)
    last = runs[-1][1]["date"]
    if last != env["date"]:
        env["date"] = f"{env['date']} to {last}"
    return results, env


_LINESTYLES = {"float32": "-", "bfloat16": "--", "float16": ":"}
_MARKERS = {JAXCE: "o", OPTAX: "s", FLOOR: "x"}
# The title's line: 150 characters of its small font take 920 of the figure's 1300 pixels (a run's
# header, 308 characters on one line, took 1890).
_TITLE_CHARACTERS = 150


def _colors(results: Sequence[Result], pairs: Sequence[Any]) -> dict[str, Any]:
    """A colour of its own for each program of one benchmark, from ``pairs``, a palette of a dark
    and a light shade of each hue (matplotlib's ``tab20``): the dark shades for jaxce's programs,
    in order, each with the light shade of its hue for the optax program it is compared with
    (where no jaxce program came first to it), the next dark shade for any other, and black for
    the floor. Eleven programs, the most of a benchmark (``options``), take ten of twenty."""
    roles = {r.program: r.role for r in results}
    compare_to = {r.program: r.compare_to for r in results}
    colors: dict[str, Any] = {}
    hue = 0
    jaxce_first = sorted(roles, key=lambda p: roles[p] != JAXCE)  # stable: jaxce's in order
    for program in jaxce_first:
        if program in colors:
            continue
        if roles[program] == FLOOR:
            colors[program] = "black"
            continue
        colors[program] = pairs[2 * hue % len(pairs)]
        other = compare_to[program]
        if other in roles and other not in colors:
            colors[other] = pairs[(2 * hue + 1) % len(pairs)]
        hue += 1
    return colors


def plot(path: str | os.PathLike, results: Sequence[Result], header: str = "") -> None:
    """Saves time and temporary memory against size, one line per program and dtype.

    One row of two panels per benchmark; the size is the number of logits (``N * C``, and
    ``N * D * V`` multiply-adds for ``linear``). Each program has a colour of its own
    (:func:`_colors`) and a marker of its role, each dtype a line style; ``header``, wrapped, is
    the title. Needs matplotlib (no display: it draws with ``matplotlib.figure.Figure``
    directly).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    groups = _by_benchmark(results)
    fig = Figure(figsize=(13, 3.6 * len(groups) + 0.6), layout="constrained")
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for (name, group), (ax_time, ax_memory) in zip(groups.items(), axes, strict=True):
        names = BENCHMARKS[name].shape_names
        size_label = "·".join(names) + (" (multiply-adds)" if name == "linear" else " (logits)")
        programs = list(dict.fromkeys(r.program for r in group))
        roles = {r.program: r.role for r in group}
        colors = _colors(group, [tuple(c) for c in colormaps["tab20"](range(20))])
        for program in programs:
            for dtype in dict.fromkeys(r.dtype for r in group):
                points = sorted(
                    (math.prod(r.shape), r.median, r.temp_bytes)
                    for r in group
                    if r.program == program and r.dtype == dtype and r.error is None
                )
                if not points:
                    continue
                sizes = [p[0] for p in points]
                style = {
                    "color": colors[program],
                    "linestyle": _LINESTYLES[dtype],
                    "marker": _MARKERS.get(roles[program], "o"),
                }
                label = f"{program}, {dtype}"
                ax_time.plot(sizes, [p[1] for p in points], label=label, **style)
                memory = [(s, m / 2**20) for s, _, m in points if m is not None]
                if memory:
                    ax_memory.plot(*zip(*memory, strict=True), label=label, **style)
        ax_time.set(xscale="log", yscale="log", xlabel=size_label, ylabel="time (s, median)")
        ax_time.set_title(f"{name}: time", loc="left")
        ax_memory.set_xscale("log")
        ax_memory.set_yscale("symlog", linthresh=0.01)
        ax_memory.set(xlabel=size_label, ylabel="temporary memory (MiB)")
        ax_memory.set_ylim(bottom=0)
        ax_memory.set_title(f"{name}: compiled temporary memory", loc="left")
        ax_memory.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        for ax in (ax_time, ax_memory):
            ax.grid(True, which="major", alpha=0.3)
            ax.xaxis.set_minor_formatter(NullFormatter())  # no labels crowding within a decade
    if header:
        fig.suptitle(textwrap.fill(header, _TITLE_CHARACTERS), fontsize="small")
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    expected = "NxC (e.g. 4096x32768) or, for linear, NxDxV (e.g. 4096x512x32768)"
    if len(parts) not in (2, 3) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
    shape = tuple(int(p) for p in parts)
    if min(shape) < 1:
        raise argparse.ArgumentTypeError(f"every size must be >= 1; got {text!r}")
    return shape


def _benchmark(text: str) -> str:
    if text not in BENCHMARKS:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark {text!r} (choose from {', '.join(BENCHMARKS)})"
        )
    return text


def _writable(path: str) -> str:
    """The path, if a file can be written there (checked before anything is measured)."""
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path!r} is a directory, not a file")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: no directory {directory!r}")
    if not os.access(directory, os.W_OK | os.X_OK) or (
        os.path.exists(path) and not os.access(path, os.W_OK)
    ):
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: permission denied")
    return path


def _readable(path: str) -> str:
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no file {path!r}")
    return path


def _plot_path(path: str) -> str:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise argparse.ArgumentTypeError(
            "needs matplotlib, which is not installed (pip install matplotlib)"
        ) from None
    formats = Figure().canvas.get_supported_filetypes()
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in formats:
        raise argparse.ArgumentTypeError(
            f"cannot tell the image format of {path!r}: end it with one of"
            f" {', '.join('.' + f for f in sorted(formats))}"
        )
    return _writable(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxce.bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Times jax.jit(jax.value_and_grad(mean loss)) of jaxce's losses side by side with\n"
            "optax's and with the floor (the least work any implementation must do), in one\n"
            "process, and prints the ratios, compile times and compiled temporary memory.\n"
            f"Without --shape it runs a grid of shapes ({GRID_MINUTES} on 2 CPU cores;\n"
            "--quick: under a minute)."
        ),
        epilog=(
            "examples:\n"
            "  python -m jaxce.bench --quick\n"
            "  python -m jaxce.bench cross_entropy --shape 4096x32768 --dtype bfloat16\n"
            "  python -m jaxce.bench linear --shape 4096x512x32768 --markdown\n"
            "  python -m jaxce.bench step --shape 256x10 --shape 1024x1000\n"
            "  python -m jaxce.bench --json results.json --plot results.png\n"
            "  python -m jaxce.bench cross_entropy --from-json results.json --markdown"
        ),
    )
    parser.add_argument(
        "benchmarks",
        nargs="*",
        type=_benchmark,
        metavar="BENCHMARK",
        help=f"any of {', '.join(BENCHMARKS)} (default: {', '.join(DEFAULT_BENCHMARKS)})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a reduced grid, under a minute (on CPU, the untimed warm-up compilation only in"
        " each benchmark's first case)",
    )
    parser.add_argument(
        "--shape",
        action="append",
        type=_shape,
        metavar="NxC|NxDxV",
        help="measure this shape instead of the grid (repeatable): NxC for the logits'"
        " benchmarks and step (N examples of C classes), NxDxV for linear",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        help="the logits' dtype (and the inputs' and weights' of linear and step), repeatable"
        " (default: float32 and bfloat16)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        metavar="N",
        help="timed runs per program after one warm-up (default 5; 3 with --quick)",
    )
    parser.add_argument(
        "--compile-samples",
        type=_positive_int,
        metavar="N",
        help=(
            f"fresh compilations per program after an untimed one, the median reported"
            f" (default {COMPILE_SAMPLES}; 1 with --quick)"
        ),
    )
    parser.add_argument("--json", type=_writable, metavar="FILE", help="write the results")
    parser.add_argument(
        "--from-json",
        type=_readable,
        action="append",
        metavar="FILE",
        help="measure nothing: print the tables (and --plot) of a run saved with --json, its"
        " ratios and targets computed again; BENCHMARK, --shape and --dtype choose its rows"
        " (without BENCHMARK, those of every benchmark in the files);"
        " repeatable, to join runs of one machine and settings (one benchmark each, say)",
    )
    parser.add_argument(
        "--plot",
        type=_plot_path,
        metavar="FILE.png",
        help="draw time and memory against size, one line per program (needs matplotlib)",
    )
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print Markdown tables with a line giving the date, machine and versions",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal; plain lines"
        " otherwise or without tqdm)",
    )
    return parser


# What the JSON output's environment adds to environment(): how the run measured.
_RUN_SETTINGS = ("repeats", "compile_samples", "compile_warm_up_every_case", "round_order")


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line, runs the benchmarks (or reads a saved run) and prints the tables.

    Args:
      argv: command-line arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
      The exit status: 0, or 1 if a program failed (e.g. ran out of memory), measured now or in
      the saved runs read. Bad arguments exit with status 2 and a message, before anything is
      measured.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    benchmarks = list(dict.fromkeys(args.benchmarks)) or None
    if args.shape is not None:
        ranks = {len(s) for s in args.shape}
        # Naming none, a run measures the default benchmarks; from saved runs, every benchmark
        # is eligible (options and step are in a file only if its run named them).
        eligible = BENCHMARKS if args.from_json else DEFAULT_BENCHMARKS
        chosen = benchmarks or [b for b in eligible if len(BENCHMARKS[b].shape_names) in ranks]
        for name in chosen:
            names = BENCHMARKS[name].shape_names
            if len(names) not in ranks:
                parser.error(f"{name} needs --shape {'x'.join(names)}; no such shape was given")
        benchmarks = chosen
    dtypes = list(dict.fromkeys(args.dtype)) if args.dtype else None
    if args.from_json:
        if args.quick or args.repeats is not None or args.compile_samples is not None:
            parser.error(
                "--from-json measures nothing: --quick, --repeats and --compile-samples do not"
                " apply"
            )
        try:
            results, saved = join_runs([read_json(path) for path in args.from_json])
        except ValueError as err:
            parser.error(f"argument --from-json: {err}")
        results = [
            r
            for r in results
            if (benchmarks is None or r.benchmark in benchmarks)
            and (args.shape is None or r.shape in args.shape)
            and (dtypes is None or r.dtype in dtypes)
        ]
        if not results:
            files = ", ".join(repr(path) for path in args.from_json)
            parser.error(f"argument --from-json: no result in {files} is chosen")
        env = {k: v for k, v in saved.items() if k not in _RUN_SETTINGS}
        repeats = saved.get("repeats")
        compile_samples = saved.get("compile_samples")
        every_case = saved.get("compile_warm_up_every_case", True)
        round_order = saved.get("round_order", "round-robin")
    else:
        repeats = args.repeats or (3 if args.quick else 5)
        compile_samples = args.compile_samples or (1 if args.quick else COMPILE_SAMPLES)
        results = run(
            benchmarks,
            args.shape,
            dtypes,
            repeats,
            quick=args.quick,
            progress=args.progress,
            compile_samples=compile_samples,
        )
        env = environment()
        every_case = warms_up_every_case(args.quick)
        round_order = ROUND_ORDER
    try:
        "µs".encode(sys.stdout.encoding or "ascii")
        micro = "µs"
    except (UnicodeEncodeError, LookupError):
        micro = "us"  # a terminal that cannot show µ
    header = describe(env, repeats, compile_samples, every_case, round_order)
    if args.markdown:
        print(format_markdown(results, header))
    else:
        print(format_table(results, header, micro))
    if args.json:
        settings = (repeats, compile_samples, every_case, round_order)
        write_json(args.json, results, {**env, **dict(zip(_RUN_SETTINGS, settings, strict=True))})
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(args.plot, results, header)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 1 if any(r.error is not None for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
