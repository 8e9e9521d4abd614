"""Tests of the benchmark tool, ``python -m jaxce.bench``.

Speed is never asserted here: these tests check the arguments, the outputs, that every ratio comes
from the numbers of the same run, and that the floors do the work they stand for.
"""

import dataclasses
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxce import bench

TINY_SHAPES = [(8, 16), (8, 4, 16)]


@pytest.fixture(scope="module")
def results():
    """Every benchmark at tiny shapes, float32, one timed sample."""
    return bench.run(None, TINY_SHAPES, ["float32"], repeats=1)


# --------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "foo"], "argument --dtype: invalid choice: 'foo'"),
        (["--dtype", "int32"], "argument --dtype: invalid choice: 'int32'"),
        (["--repeats", "0"], "argument --repeats: expected an integer >= 1, got 0"),
        (["--repeats", "-2"], "argument --repeats: expected an integer >= 1, got -2"),
        (["--repeats", "two"], "argument --repeats: expected an integer >= 1, got 'two'"),
        (["--compile-samples", "0"], "argument --compile-samples: expected an integer >= 1"),
        (["--shape", "4096"], "argument --shape: expected NxC"),
        (["--shape", "8xfoo"], "argument --shape: expected NxC"),
        (["--shape", "1x2x3x4"], "argument --shape: expected NxC"),
        (["--shape", "0x10"], "argument --shape: every size must be >= 1"),
        (["softmax"], "unknown benchmark 'softmax'"),
        (["linear", "--shape", "8x16"], "linear needs --shape NxDxV"),
        (["cross_entropy", "--shape", "8x4x16"], "cross_entropy needs --shape NxC"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("usage: python -m jaxce.bench")
    assert "Traceback" not in err


def test_unwritable_outputs_are_refused_before_measuring(tmp_path, capsys):
    cases = [
        (["--json", str(tmp_path / "missing" / "out.json")], "no directory"),
        (["--json", str(tmp_path)], "is a directory"),
        (["--plot", str(tmp_path / "missing" / "out.png")], "no directory"),
        (["--plot", str(tmp_path / "out.txt")], "cannot tell the image format"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {argv[0]}:" in err and message in err
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_prints_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxce.bench", "--dtype", "int32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "invalid choice: 'int32'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_the_benchmarks_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in [*bench.BENCHMARKS, "--quick", "--shape", "--dtype", "--json", "--plot"]:
        assert word in out


# --------------------------------------------------------------------------------------------
# The plan and the run


def test_plan_gives_each_benchmark_the_shapes_of_its_rank():
    cases = bench.plan(None, TINY_SHAPES, ["float32", "bfloat16"])
    assert ("linear", (8, 4, 16), "bfloat16") in cases
    assert ("binary", (8, 16), "float32") in cases
    assert all(len(shape) == (3 if name == "linear" else 2) for name, shape, _ in cases)
    assert len(cases) == 2 * len(bench.DEFAULT_BENCHMARKS)
    for name in ("options", "step"):
        assert name not in bench.DEFAULT_BENCHMARKS  # measured only when named
    for name in ("cross_entropy", "options", "step"):
        quick = bench.plan([name], quick=True)
        assert [s for _, s, d in quick if d == "float32"] == list(bench.QUICK_GRID[name])
    with pytest.raises(ValueError, match="unknown benchmark"):
        bench.plan(["nope"])
    with pytest.raises(ValueError, match="unknown dtype"):
        bench.plan(None, dtypes=["int32"])
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        bench.run(["binary"], [(2, 3)], repeats=0)
    with pytest.raises(ValueError, match="compile_samples must be an integer >= 1"):
        bench.run(["binary"], [(2, 3)], compile_samples=0)


def _install_fake(monkeypatch, name, description, *programs):
    """Registers the benchmark ``name`` of ``programs``, whose input is one ``[N, C]`` array of
    ones, for the rest of the test."""
    fake = bench.Benchmark(
        name, description, ("N", "C"), lambda shape, dtype: (jnp.ones(shape, dtype),), programs
    )
    monkeypatch.setitem(bench.BENCHMARKS, name, fake)


@pytest.mark.parametrize("samples", [1, 2])
def test_each_program_is_compiled_afresh_compile_samples_times(monkeypatch, samples):
    # after one untimed compilation, which here is slow (as the first of a matrix product's
    # shape is on a GPU, where XLA autotunes it once per process)
    made = []

    def counted():
        made.append(1)
        first = len(made) == 1

        def program(logits):
            if first:
                time.sleep(1.0)  # while tracing, inside lower + compile
            return logits + logits

        return program

    _install_fake(monkeypatch, "fake", "one program", bench.Program("floor", bench.FLOOR, counted))
    (result,) = bench.run(["fake"], [(2, 3)], ["float32"], repeats=1, compile_samples=samples)
    assert len(made) == samples + 1 and 0 < result.compile_seconds < 1.0


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("quick", [False, True])
def test_quick_on_cpu_warms_up_only_each_benchmarks_first_case(monkeypatch, backend, quick):
    made = []
    for name in ("fake_a", "fake_b"):

        def fresh(name=name):  # records each fresh function made, under its benchmark's name
            made.append(name)
            return lambda logits: logits + logits

        _install_fake(monkeypatch, name, "one program", bench.Program("floor", bench.FLOOR, fresh))
    monkeypatch.setattr(bench.jax, "default_backend", lambda: backend)
    shapes = [(2, 3), (4, 3), (6, 3)]
    bench.run(["fake_a", "fake_b"], shapes, ["float32"], repeats=1, quick=quick, compile_samples=2)
    every_case = not (quick and backend == "cpu")
    assert bench.warms_up_every_case(quick) == every_case
    # Per benchmark, three cases of two timed compilations, each case after a warm-up one, or
    # only the first.
    per_benchmark = 3 * 2 + (3 if every_case else 1)
    assert made == ["fake_a"] * per_benchmark + ["fake_b"] * per_benchmark


def test_run_measures_every_program(results):
    expected = {
        (name, p.name) for name in bench.DEFAULT_BENCHMARKS for p in bench.BENCHMARKS[name].programs
    }
    assert {(r.benchmark, r.program) for r in results} == expected
    for r in results:
        assert r.error is None, r
        assert len(r.times) == 1 and r.times[0] > 0 and r.calls >= 1
        assert r.compile_seconds > 0
        assert r.temp_bytes is not None and r.temp_bytes >= 0
        assert r.x_floor is not None
        if r.role == bench.FLOOR:
            assert r.x_floor == 1.0
        assert (r.speedup is not None) == (r.compare_to is not None)


def test_the_compared_programs_compute_the_same_loss():
    # A ratio to optax means something only if both sides compute the same value and gradient.
    for name, benchmark in bench.BENCHMARKS.items():
        shape = (6, 5, 12) if name == "linear" else (6, 12)
        args = benchmark.inputs(shape, "float32")
        for p in benchmark.programs:
            if p.compare_to is None:
                continue
            other = next(q for q in benchmark.programs if q.name == p.compare_to)
            mine, theirs = (jax.jit(q.make())(*args) for q in (p, other))
            # (value, gradients), or the value alone (the "loss alone" programs)
            assert len(jax.tree.leaves(mine)) == len(jax.tree.leaves(theirs)), p.name
            pairs = zip(jax.tree.leaves(mine), jax.tree.leaves(theirs), strict=True)
            for i, (a, b) in enumerate(pairs):  # the value first, to 1e-5
                rtol, atol = (1e-5, 0) if i == 0 else (1e-4, 1e-7)
                np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{name}: {p.name}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_integer_label_programs_agree_with_optax_in_every_option_set(dtype):
    """Every option set of ``options`` and cross_entropy's "all options": jaxce's value and
    gradient and optax's, written without a one-hot, within float32 rounding (a bfloat16
    gradient within one bfloat16 rounding of the float32 one it is rounded from)."""
    compared = []
    for name in ("cross_entropy", "options"):
        benchmark = bench.BENCHMARKS[name]
        args = benchmark.inputs((24, 37), dtype)
        for p in benchmark.programs:
            # (the plain loss's optax program computes in the logits' dtype, as optax does)
            if p.role != bench.JAXCE or p.name in ("jaxce", bench.JAXCE_ALONE):
                continue
            other = next(q for q in benchmark.programs if q.name == p.compare_to)
            (value, grad), (want, want_grad) = (jax.jit(q.make())(*args) for q in (p, other))
            assert value.dtype == want.dtype == jnp.float32, p.name
            assert grad.dtype == want_grad.dtype == jnp.dtype(dtype), p.name
            eps = np.finfo(np.float32).eps
            np.testing.assert_allclose(value, want, rtol=8 * eps, err_msg=f"{name}: {p.name}")
            grad, want_grad = (np.asarray(g, np.float64) for g in (grad, want_grad))
            scale = np.abs(want_grad).max()
            rtol = 2.0**-7 if dtype == "bfloat16" else 0.0  # one bfloat16 rounding
            np.testing.assert_allclose(
                grad, want_grad, rtol=rtol, atol=8 * eps * scale, err_msg=f"{name}: {p.name}"
            )
            compared.append((name, p.name))
    assert ("cross_entropy", "jaxce, all options") in compared
    assert {f"jaxce, {option}" for option in bench.OPTION_SETS} <= {p for _, p in compared}


def test_the_optax_programs_make_no_one_hot_labels(monkeypatch):
    """optax's side of a comparison is the strongest program optax allows, not a straw man that
    makes one-hot labels of the logits' size: the programs run with the means to make them taken
    away."""

    def taken_away(*args, **kwargs):
        raise AssertionError("a one-hot of the labels, the size of the logits")

    for module, name in ((jax.nn, "one_hot"), (optax, "smooth_labels")):
        monkeypatch.setattr(module, name, taken_away)
    monkeypatch.setattr(optax, "softmax_cross_entropy", taken_away)  # reads dense labels
    for name in ("cross_entropy", "options", "step"):
        benchmark = bench.BENCHMARKS[name]
        args = benchmark.inputs((6, 12), "float32")
        for p in benchmark.programs:
            if p.role == bench.OPTAX:
                jax.jit(p.make())(*args)


def test_the_options_benchmark_pairs_each_option_set_with_optax():
    """``options``: each option alone and all four, each jaxce program compared with the same
    options written with optax, in one run with a floor."""
    results = bench.run(["options"], [(8, 16)], ["float32"], repeats=1, compile_samples=1)
    by_name = {r.program: r for r in results}
    for name in bench.OPTION_SETS:
        mine = by_name[f"jaxce, {name}"]
        assert mine.compare_to == f"optax, {name}" and mine.speedup is not None, mine
        assert mine.x_floor is not None and by_name[f"optax, {name}"].x_floor is not None
    assert len(results) == 2 * len(bench.OPTION_SETS) + 1
    assert all(r.error is None for r in results)
    table = bench.format_table(results)
    assert "label_smoothing=0.1, z_loss=0.0001, logit_soft_cap=30" in table


def test_the_step_benchmark_compares_whole_training_steps():
    """``step``: the integer-label losses inside a model's training step, each jaxce program
    compared with optax's, in one run with the model's own step as the floor."""
    results = bench.run(["step"], [(8, 16)], ["float32"], repeats=1, compile_samples=1)
    by_name = {r.program: r for r in results}
    assert set(by_name) == {p.name for p in bench.BENCHMARKS["step"].programs}
    assert all(r.error is None for r in results)
    for name in ("jaxce", "jaxce, all options"):
        mine = by_name[name]
        assert mine.compare_to == name.replace("jaxce", "optax") and mine.speedup is not None
    assert "all options: label_smoothing=0.1" in bench.format_table(results)


def test_the_step_floor_is_the_model_with_a_linear_loss():
    """The step's floor: the model's forward pass, the linear loss sum(g * logits), and the
    backward pass from g, against the same step written out in NumPy."""
    benchmark = bench.BENCHMARKS["step"]
    floor = next(p for p in benchmark.programs if p.role == bench.FLOOR).make()
    args = benchmark.inputs((5, 7), "float32")
    x, labels, weights, w1, b1, w2, b2, g = (np.asarray(a, np.float64) for a in args)
    value, (dw1, db1, dw2, db2) = floor(*args)
    pre = x @ w1 + b1
    hidden = np.maximum(pre, 0)
    logits = hidden @ w2 + b2
    assert logits.shape == (5, 7) and 1 < logits.std() < 4  # logits of a classifier's spread
    dpre = (g @ w2.T) * (pre > 0)
    expected = (np.sum(g * logits), (x.T @ dpre, dpre.sum(0), hidden.T @ g, g.sum(0)))
    got = jax.tree.leaves((value, (dw1, db1, dw2, db2)))
    for mine, want in zip(got, jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(mine, want, rtol=2e-5, atol=1e-6)
    # Compiled, the model's products are all there: two forward, three backward (no gradient
    # wrt the features).
    cost = jax.jit(floor).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    hidden_units, features = bench.MODEL_HIDDEN, bench.MODEL_FEATURES
    assert cost["flops"] >= 2 * 5 * (2 * features * hidden_units + 3 * hidden_units * 7) - 1


def test_a_failing_program_is_reported_and_the_others_still_run(monkeypatch, capsys):
    def broken():
        def program(logits):
            raise RuntimeError("out of memory, say")

        return program

    floor = bench.Program("floor", bench.FLOOR, lambda: lambda logits: logits + logits)
    _install_fake(
        monkeypatch,
        "fake",
        "a benchmark with a program that fails",
        bench.Program("broken", bench.JAXCE, broken),
        floor,
    )
    failed, measured = bench.run(["fake"], [(2, 3)], ["float32"], repeats=2, progress=None)
    assert failed.error == "RuntimeError: out of memory, say"
    assert failed.times == () and failed.x_floor is None
    assert measured.error is None and len(measured.times) == 2
    err = capsys.readouterr().err
    assert "[1/1] fake 2x3 float32" in err  # plain progress lines: stderr is not a terminal
    assert "broken: RuntimeError: out of memory, say" in err
    table = bench.format_table([failed, measured])
    assert "failed: RuntimeError: out of memory, say" in table


@pytest.mark.parametrize("markdown", [False, True])
def test_a_failed_program_is_never_reported_as_targets_met(markdown):
    measured = bench.compute_ratios(
        [
            _result("jaxce", bench.JAXCE, [1.0], 0.1, compare_to="optax"),
            _result("optax", bench.OPTAX, [2.0], 0.1),
            _result("floor", bench.FLOOR, [1.0], 0.1),
        ]
    )
    form = bench.format_markdown if markdown else bench.format_table
    met = "Every target is met." if markdown else "Targets met."
    assert form(measured).endswith(met)
    error = "RESOURCE_EXHAUSTED: out of memory " + "x" * 200
    failed = dataclasses.replace(measured[0], times=(), error=error)
    output = form(bench.compute_ratios([failed, *measured[1:]]))
    assert "met" not in output.split(bench._LEGEND)[1]
    assert f"cross_entropy 4x8 float32 jaxce: failed: {error}" in output
    assert ("Programs failed (1):" if markdown else "Programs failed: 1") in output
    # A benchmark without targets: none is claimed met.
    floor_only = [_result("floor", bench.FLOOR, [1.0], 0.1, benchmark="step")]
    assert form(floor_only).endswith("No targets apply to these programs.")


def test_a_failed_row_keeps_the_table_narrow():
    measured = [
        _result("jaxce", bench.JAXCE, [1.0], 0.1, compare_to="optax"),
        _result("optax", bench.OPTAX, [2.0], 0.1),
        _result("floor", bench.FLOOR, [1.0], 0.1),
    ]
    failed = dataclasses.replace(measured[1], times=(), error="XlaRuntimeError: " + "y" * 280)
    table = bench.format_table(bench.compute_ratios([failed, *measured[1:]]))
    narrow = bench.format_table(bench.compute_ratios(measured))
    column_line = next(line for line in narrow.splitlines() if line.startswith("shape"))
    lines = table.split("\n\n")[0].splitlines()  # the table, before the legend
    rows = lines[lines.index(column_line) + 1 :]
    assert len(rows) == 3 and all(len(row) <= len(column_line) for row in rows)


def test_the_legend_says_what_a_loss_alone_row_compiles():
    assert "of the loss alone in the loss-alone rows" in bench._LEGEND


# --------------------------------------------------------------------------------------------
# Ratios and targets


def _result(program, role, times, compile_seconds, dtype="float32", compare_to=None, **kw):
    return bench.Result(
        kw.pop("benchmark", "cross_entropy"),
        program,
        role,
        kw.pop("shape", (4, 8)),
        dtype,
        times=tuple(times),
        compile_seconds=compile_seconds,
        compare_to=compare_to,
        **kw,
    )


def test_ratios_come_from_the_same_case():
    results = [
        _result("jaxce", bench.JAXCE, [3.0, 1.0, 2.0], 0.6, compare_to="optax"),
        _result("optax", bench.OPTAX, [3.0, 4.0, 5.0], 0.5),
        _result("floor", bench.FLOOR, [1.0, 1.0, 9.0], 0.1),
        # Another dtype: its numbers must not leak into the float32 case.
        _result("jaxce", bench.JAXCE, [8.0], 2.0, "bfloat16", compare_to="optax"),
        _result("optax", bench.OPTAX, [16.0], 1.0, "bfloat16"),
        _result("floor", bench.FLOOR, [2.0], 1.0, "bfloat16"),
    ]
    jaxce, optax_, floor, jaxce_bf16, optax_bf16, floor_bf16 = bench.compute_ratios(results)
    assert jaxce.median == 2.0 and jaxce.minimum == 1.0
    assert jaxce.x_floor == 1.0  # rounds: 3 / 1, 1 / 1, 2 / 9
    assert jaxce.speedup == 2.5  # rounds: optax's 3 / 3, 4 / 1, 5 / 2
    assert jaxce.compile_ratio == pytest.approx(1.2)
    assert optax_.x_floor == 3.0  # rounds: 3 / 1, 4 / 1, 5 / 9
    assert optax_.speedup is None and optax_.compile_ratio is None
    assert floor.x_floor == 1.0
    assert jaxce_bf16.x_floor == 4.0 and jaxce_bf16.speedup == 2.0
    assert jaxce_bf16.compile_ratio == 2.0
    assert optax_bf16.x_floor == 8.0 and floor_bf16.x_floor == 1.0


def test_ratios_pair_the_times_of_each_round():
    # The machine's speed changes from round to round and slows both programs of a round
    # alike: in two rounds of three jaxce is 1.25x faster; the medians' ratio (3.9 / 4) would
    # call it slower.
    jaxce = _result("jaxce", bench.JAXCE, [4.0, 8.0, 2.0], 0.1, compare_to="optax")
    optax_ = _result("optax", bench.OPTAX, [3.9, 10.0, 2.5], 0.1)
    assert optax_.median / jaxce.median == pytest.approx(0.975)
    assert bench.paired_ratio(optax_, jaxce) == pytest.approx(1.25)
    assert bench.compute_ratios([jaxce, optax_])[0].speedup == pytest.approx(1.25)
    # The rounds' spread: 3.9 / 4, 10 / 8 and 2.5 / 2.
    assert bench.paired_ratio_range(optax_, jaxce) == pytest.approx((0.975, 1.25))
    assert bench.compute_ratios([jaxce, optax_])[0].speedup_range == pytest.approx((0.975, 1.25))
    # Programs timed a different number of times (one failed midway): the medians' ratio,
    # and no spread.
    short = _result("optax", bench.OPTAX, [6.0], 0.1)
    assert bench.paired_ratio(short, jaxce) == pytest.approx(1.5)
    assert bench.paired_ratio_range(short, jaxce) is None
    one_round = _result("jaxce", bench.JAXCE, [4.0], 0.1, compare_to="optax")
    assert bench.paired_ratio_range(_result("optax", bench.OPTAX, [3.0], 0.1), one_round) is None
    assert bench.paired_ratio(None, jaxce) is None
    assert bench.paired_ratio(_result("optax", bench.OPTAX, [], None), jaxce) is None


def test_targets_missed_are_listed():
    results = [
        _result("jaxce", bench.JAXCE, [2.0], 1.0, "bfloat16", compare_to="optax"),
        _result("jaxce, all options", bench.JAXCE, [2.0], 1.0, "bfloat16"),
        _result("optax", bench.OPTAX, [3.0], 0.5, "bfloat16"),
        _result("floor", bench.FLOOR, [1.0], 0.1, "bfloat16"),
    ]
    jaxce, all_options, optax_, floor = bench.compute_ratios(results, "cpu")
    assert jaxce.missed == (
        "1.50x faster than optax (target >= 2x)",
        "compiles in 2.00x optax's time (target <= 1.5x)",
    )
    assert all_options.missed == ()  # 2x the floor: within 2.5x
    assert optax_.missed == () and floor.missed == ()
    slower = bench.compute_ratios(
        [
            _result("jaxce", bench.JAXCE, [2.0], 0.1, compare_to="optax", benchmark="binary"),
            _result("optax", bench.OPTAX, [1.0], 0.1, benchmark="binary"),
            _result("floor", bench.FLOOR, [1.0], 0.1, benchmark="binary"),
        ]
    )[0]
    assert slower.missed == (
        "slower than optax (optax's time / this = 0.50)",
        "2.00x the floor (target <= 1.3x)",
    )
    assert "Targets missed: 1" in bench.format_table([slower])
    tie = bench.compute_ratios(
        [
            _result("jaxce", bench.JAXCE, [1.004], 0.1, compare_to="optax", benchmark="binary"),
            _result("optax", bench.OPTAX, [1.0], 0.1, benchmark="binary"),
        ]
    )[0]
    assert tie.missed == ("slower than optax (optax's time / this = 0.996)",)
    # With several rounds, a miss gives their spread: here jaxce won one round of three.
    noisy = bench.compute_ratios(
        [
            _result("jaxce", bench.JAXCE, [2.0, 1.0, 1.0], 0.1, compare_to="optax"),
            _result("optax", bench.OPTAX, [1.0, 1.1, 0.8], 0.1),
        ]
    )[0]
    assert noisy.missed == (
        "slower than optax (optax's time / this = 0.80; 0.50-1.10 over the 3 rounds)",
    )
    bf16 = bench.compute_ratios(
        [
            _result("jaxce", bench.JAXCE, [1.0, 1.0], 0.1, "bfloat16", compare_to="optax"),
            _result("optax", bench.OPTAX, [1.5, 1.75], 0.1, "bfloat16"),
        ]
    )[0]
    assert bf16.missed == ("1.62x faster than optax (target >= 2x; 1.50-1.75 over the 2 rounds)",)
    # A failed comparison is not a miss.
    assert (
        bench.compute_ratios([_result("jaxce", bench.JAXCE, [], None, compare_to="optax")])[
            0
        ].missed
        == ()
    )


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_compared_gradient_program_has_targets(dtype, backend):
    """Never slower than optax with any option; options' "all four", the same program as
    cross_entropy's "all options", the same targets; the compile-time target for every
    value_and_grad program with an optax counterpart, none for the loss alone; the floor's
    1.5x for integer labels only in float32 on CPU."""
    for name, benchmark in bench.BENCHMARKS.items():
        programs = {p.name: p for p in benchmark.programs}
        for p in benchmark.programs:
            t = bench.targets(name, p.name, dtype, backend)
            counterpart = programs.get(p.compare_to) if p.compare_to else None
            gradient = p.role == bench.JAXCE and p.name != bench.JAXCE_ALONE
            compared = gradient and counterpart is not None and counterpart.role == bench.OPTAX
            assert t.max_compile_ratio == (1.5 if compared else None), (name, p.name)
            if name == "options" and p.role == bench.JAXCE:
                assert t.min_speedup == 1.0, p.name
    all_four = bench.targets("options", "jaxce, all four", dtype, backend)
    assert all_four == bench.targets("cross_entropy", "jaxce, all options", dtype, backend)
    assert all_four.max_x_floor is not None
    plain = bench.targets("cross_entropy", "jaxce", dtype, backend)
    assert plain.max_x_floor == (1.5 if (dtype, backend) == ("float32", "cpu") else None)


def test_a_miss_never_prints_as_its_target():
    for value, limit, above, text in [
        (0.9996, 1.0, False, "0.9996"),
        (0.996, 1.0, False, "0.996"),
        (0.5, 1.0, False, "0.50"),
        (1.996, 2.0, False, "1.996"),
        (1.504, 1.5, True, "1.504"),
        (1.6, 1.5, True, "1.60"),
        (1.5 + 1e-9, 1.5, True, "1.500001"),  # past six decimals: rounded away from the limit
    ]:
        assert bench._missing(value, limit, above=above) == text
    bf16 = [
        _result("jaxce", bench.JAXCE, [1.0], 1.0, "bfloat16", compare_to="optax"),
        _result("optax", bench.OPTAX, [1.996], 1.504, "bfloat16"),
        _result("floor", bench.FLOOR, [1.0], 0.1, "bfloat16"),
    ]
    assert bench.compute_ratios(bf16, "cpu")[0].missed == (
        "1.996x faster than optax (target >= 2x)",
    )
    bf16[0] = dataclasses.replace(bf16[0], times=(2.0,), compile_seconds=1.504 * 1.504)
    assert bench.compute_ratios(bf16, "cpu")[0].missed == (
        "slower than optax (optax's time / this = 0.998; target >= 2x faster)",
        "compiles in 1.504x optax's time (target <= 1.5x)",
    )
    f32 = [
        _result("jaxce", bench.JAXCE, [1.504], 0.1, compare_to="optax"),
        _result("optax", bench.OPTAX, [1.5036], 0.1),
        _result("floor", bench.FLOOR, [1.0], 0.1),
    ]
    assert bench.compute_ratios(f32, "cpu")[0].missed == (
        "slower than optax (optax's time / this = 0.9997)",
        "1.504x the floor (target <= 1.5x)",
    )


# --------------------------------------------------------------------------------------------
# The floors


def _covers_every_element(jacobian, out_size, in_size):
    matrix = np.asarray(jacobian).reshape(out_size, in_size) != 0
    return matrix.any(axis=0).all()


@pytest.mark.parametrize("name", ["cross_entropy", "soft_cross_entropy", "binary"])
def test_the_logits_floor_reads_every_input_and_writes_the_logits_size(name):
    benchmark = bench.BENCHMARKS[name]
    floor = next(p for p in benchmark.programs if p.role == bench.FLOOR).make()
    args = benchmark.inputs((3, 5), "float32")
    logits = args[0]
    out = floor(*args)
    assert out.shape == logits.shape and out.dtype == logits.dtype
    # Every output element depends on its own logit (and label): nothing can be dropped.
    read = [0] if name == "cross_entropy" else [0, 1]  # the integer-label loss reads no labels
    for i in read:
        jac = jax.jacrev(lambda a, i=i: floor(*args[:i], a, *args[i + 1 :]))(args[i])
        assert _covers_every_element(jac, out.size, args[i].size)
        assert (np.asarray(jac).reshape(out.size, args[i].size) != 0).any(axis=1).all()
    # XLA does not make the compiled floor cheaper than one read of its inputs and one write.
    compiled = jax.jit(floor).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost["bytes accessed"] >= sum(args[i].nbytes for i in read) + out.nbytes


def test_the_matmul_floor_does_the_three_products():
    benchmark = bench.BENCHMARKS["linear"]
    floor = next(p for p in benchmark.programs if p.role == bench.FLOOR).make()
    x, w, labels, g = benchmark.inputs((3, 2, 5), "float32")
    outputs = floor(x, w, labels, g)
    # x @ w is read, not written out as a [N, V] result (a loss returns no logits) ...
    assert all(out.shape != (3, 5) for out in outputs)
    column_sums, dx, dw = outputs
    assert dx.shape == x.shape and dw.shape == w.shape
    # ... but every logit is in an output, so XLA cannot drop the product.
    np.testing.assert_allclose(column_sums, (np.asarray(x) @ np.asarray(w)).sum(0), rtol=1e-6)
    np.testing.assert_allclose(dx, np.asarray(g) @ np.asarray(w).T, rtol=1e-6)
    np.testing.assert_allclose(dw, np.asarray(x).T @ np.asarray(g), rtol=1e-6)
    # Compiled, the three products are all there (2 N D V flops each).
    cost = jax.jit(floor).lower(x, w, labels, g).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost["flops"] >= 3 * 2 * 3 * 2 * 5


# --------------------------------------------------------------------------------------------
# Outputs


def test_units_stay_readable():
    assert bench.format_seconds(41.23e-6) == "41.2 µs"
    assert bench.format_seconds(3e-7) == "0.30 µs"
    assert bench.format_seconds(1.5e-3) == "1.50 ms"
    assert bench.format_seconds(0.25) == "250 ms"
    assert bench.format_seconds(12.34) == "12.3 s"
    assert bench.format_seconds(41e-6, micro="us") == "41.0 us"
    assert bench.format_seconds(None) == "-"
    assert bench.format_bytes(0) == "0 B"
    assert bench.format_bytes(1536) == "1.50 KiB"
    assert bench.format_bytes(48 * 2**20) == "48.0 MiB"
    assert bench.format_bytes(2**32) == "4.00 GiB"
    assert bench.format_bytes(None) == "-"


def test_table_and_markdown(results):
    header = bench.describe(bench.environment(), 1)
    assert f"JAX {jax.__version__}" in header and "optax" in header
    table = bench.format_table(results, header)
    assert table.startswith(header)
    for name in bench.DEFAULT_BENCHMARKS:
        assert f"{name}: {bench.BENCHMARKS[name].summary}" in table
    assert "8x4x16" in table and "x floor" in table and "speed-up vs optax" in table
    markdown = bench.format_markdown(results, header)
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    tables = len(bench.DEFAULT_BENCHMARKS)
    assert len(rows) == len(results) + 2 * tables  # a header and a rule per table
    assert len({row.count(" | ") for row in rows if not row.startswith("|-")}) == 1
    assert "| 8x16 | float32 | jaxce" in markdown


def test_command_line_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    json_path, png_path = tmp_path / "out.json", tmp_path / "out.png"
    argv = ["cross_entropy", "--shape", "8x16", "--dtype", "bfloat16", "--repeats", "2"]
    argv += ["--no-progress", "--json", str(json_path), "--plot", str(png_path)]
    assert bench.main(argv) == 0
    out, err = capsys.readouterr()
    assert "cross_entropy: integer-label" in out and "jaxce, all options" in out
    assert err == f"wrote {json_path}\nwrote {png_path}\n"  # --no-progress: nothing else

    data = json.loads(json_path.read_text())
    env = data["environment"]
    for key in ("date", "processor", "cpu_count", "device_kind", "jax", "jaxlib", "optax"):
        assert env[key] is not None, key
    assert env["repeats"] == 2 and env["compile_samples"] == bench.COMPILE_SAMPLES
    assert [r["program"] for r in data["results"]] == [
        p.name for p in bench.BENCHMARKS["cross_entropy"].programs
    ]
    jaxce_row = data["results"][0]
    assert jaxce_row["shape"] == [8, 16] and jaxce_row["dtype"] == "bfloat16"
    assert len(jaxce_row["times"]) == 2
    assert jaxce_row["median_seconds"] == pytest.approx(np.median(jaxce_row["times"]))
    for key in ("min_seconds", "compile_seconds", "temp_bytes", "x_floor", "speedup"):
        assert isinstance(jaxce_row[key], (int, float)), key
    assert isinstance(jaxce_row["missed"], list) and jaxce_row["error"] is None

    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_tells_every_program_apart_and_its_title_fits(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: drawn.append(fig))
    results = []
    for name in ("options", "cross_entropy", "linear"):
        programs = bench.BENCHMARKS[name].programs
        for shape in ((8, 4, 16), (8, 4, 32)) if name == "linear" else ((8, 16), (8, 32)):
            for dtype in ("float32", "bfloat16"):
                results += [
                    _result(
                        p.name,
                        p.role,
                        [1.0 + k],
                        0.1,
                        dtype,
                        compare_to=p.compare_to,
                        benchmark=name,
                        shape=shape,
                        temp_bytes=1024 * k,
                    )
                    for k, p in enumerate(programs)
                ]
    header = bench.describe(bench.environment(), 5, 3, False)
    bench.plot(tmp_path / "plot.png", results, header)
    (fig,) = drawn
    for ax in fig.axes:
        lines = ax.get_lines()
        if not lines:
            continue
        colors = {}
        for line in lines:
            program = line.get_label().rsplit(", ", 1)[0]
            colors.setdefault(program, set()).add(to_rgba(line.get_color()))
        assert all(len(c) == 1 for c in colors.values())  # a program's colour in every dtype
        assert len({c.pop() for c in colors.values()}) == len(colors)  # and no other's
    renderer = FigureCanvasAgg(fig).get_renderer()
    title = fig.get_suptitle()
    assert title.replace("\n", " ") == header
    assert fig._suptitle.get_window_extent(renderer).width <= fig.bbox.width


def _saved_run(tmp_path):
    """A run of two benchmarks written by write_json, and the results it was written from."""
    results = bench.compute_ratios(
        [
            _result("jaxce", bench.JAXCE, [2.0, 1.0, 1.0], 0.2, compare_to="optax", temp_bytes=64),
            _result("optax", bench.OPTAX, [1.0, 1.1, 0.8], 0.1, temp_bytes=4096),
            _result("floor", bench.FLOOR, [0.5, 0.5, 0.5], 0.1, temp_bytes=0),
            _result(
                "jaxce", bench.JAXCE, [1.0, 1.0, 1.0], 0.1, compare_to="optax", benchmark="binary"
            ),
            _result("optax", bench.OPTAX, [3.0, 3.0, 3.0], 0.1, benchmark="binary"),
            _result(
                "jaxce",
                bench.JAXCE,
                [],
                None,
                compare_to="optax",
                benchmark="binary",
                shape=(2, 2),
                error="RESOURCE_EXHAUSTED: out of memory",
            ),
        ]
    )
    env = {**bench.environment(), "date": "2026-01-02 03:04 UTC", "repeats": 3}
    env |= {"compile_samples": 2, "compile_warm_up_every_case": False}
    path = tmp_path / "run.json"
    bench.write_json(path, results, env)
    return path, results, env


def test_a_saved_run_reads_back_as_it_was_written(tmp_path):
    path, results, env = _saved_run(tmp_path)
    read, read_env = bench.read_json(path)
    assert read == results and read_env == env
    assert read[0].speedup_range == pytest.approx((0.5, 1.1))
    assert read[0].missed[0].endswith("0.50-1.10 over the 3 rounds)")
    # A file written before the spread was recorded gets it, and the targets, computed again.
    data = json.loads(path.read_text())
    for row in data["results"]:
        del row["speedup_range"]
        row["missed"] = []
    path.write_text(json.dumps(data))
    assert bench.read_json(path)[0] == results


def test_from_json_prints_the_saved_runs_tables(tmp_path, capsys):
    path, results, env = _saved_run(tmp_path)
    assert bench.main(["--from-json", str(path), "--markdown"]) == 1  # a program failed
    out = capsys.readouterr().out
    # Saved without how it ordered its rounds: from before they were shuffled.
    header = bench.describe(bench.environment() | {"date": env["date"]}, 3, 2, False, "round-robin")
    assert "median of 3 runs after a warm-up, round-robin;" in header
    assert out.startswith(header + "\n")
    assert out == bench.format_markdown(results, header) + "\n"
    # BENCHMARK, --shape and --dtype choose rows; nothing is measured.
    assert bench.main(["binary", "--from-json", str(path), "--shape", "4x8"]) == 0
    out = capsys.readouterr().out
    assert "binary: sigmoid" in out and "cross_entropy" not in out and "2x2" not in out
    saved = tmp_path / "again.json"
    assert bench.main(["--from-json", str(path), "--json", str(saved), "--dtype", "float32"]) == 1
    capsys.readouterr()
    assert bench.read_json(saved) == (results, env | {"round_order": "round-robin"})
    bench.write_json(path, results, env | {"round_order": bench.ROUND_ORDER})
    assert bench.main(["--from-json", str(path), "--markdown"]) == 1
    assert "median of 3 runs after a warm-up, shuffled;" in capsys.readouterr().out


def test_from_json_with_a_shape_keeps_every_benchmark_of_the_files(tmp_path, capsys):
    """Naming no benchmark, --from-json --shape keeps the rows of options and step, which a run
    measures only when named, as well as those of the default benchmarks."""
    rows = []
    for name in ("cross_entropy", "options", "step"):
        rows += [
            _result("jaxce", bench.JAXCE, [1.0], 0.1, compare_to="optax", benchmark=name),
            _result("optax", bench.OPTAX, [2.0], 0.1, benchmark=name),
        ]
    path = tmp_path / "run.json"
    bench.write_json(path, bench.compute_ratios(rows), {**bench.environment(), "repeats": 1})
    assert bench.main(["--from-json", str(path), "--shape", "4x8"]) == 0
    out = capsys.readouterr().out
    for name in ("cross_entropy", "options", "step"):
        assert f"{name}: {bench.BENCHMARKS[name].summary}" in out


def _split_run(tmp_path, results, env, later_env):
    """A saved run's results written again as two files, one per benchmark: the first with
    ``env``, the second with ``later_env``."""
    paths = []
    for name, part_env in (("cross_entropy", env), ("binary", later_env)):
        part = tmp_path / f"{name}.json"
        bench.write_json(part, [r for r in results if r.benchmark == name], part_env)
        paths.append(part)
    return paths


def test_from_json_joins_runs_of_one_machine(tmp_path, capsys):
    """Runs saved one benchmark at a time (a machine lent for minutes) print as one run."""
    path, results, env = _saved_run(tmp_path)
    later = env | {"date": "2026-01-02 03:09 UTC"}
    first, second = _split_run(tmp_path, results, env, later)
    assert bench.main(["--from-json", str(first), "--from-json", str(second), "--markdown"]) == 1
    out = capsys.readouterr().out
    dated = env | {"date": "2026-01-02 03:04 UTC to 2026-01-02 03:09 UTC"}
    header = bench.describe(dated, 3, 2, False, "round-robin")
    assert out == bench.format_markdown(results, header) + "\n"
    assert bench.join_runs([bench.read_json(first), bench.read_json(second)]) == (results, dated)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"jax": "0.0.1"}, "the runs differ in jax ("),
        ({"repeats": 7}, "the runs differ in repeats (3 against 7)"),
        ({}, "binary jaxce 4x8 float32 is in two runs"),
    ],
)
def test_from_json_joins_only_runs_of_one_machine_and_settings(tmp_path, capsys, change, message):
    path, results, env = _saved_run(tmp_path)
    first, second = _split_run(tmp_path, results, env, env | change)
    again = second if change else path  # with no change: the whole run beside its own part
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--from-json", str(first if change else second), "--from-json", str(again)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --from-json:" in err and message in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats", "2"], "--from-json measures nothing"),
        (["--quick"], "--from-json measures nothing"),
        (["--dtype", "bfloat16"], "no result in"),
        (["linear", "--shape", "8x4x16"], "no result in"),
    ],
)
def test_from_json_refuses_what_it_cannot_do(tmp_path, capsys, argv, message):
    path, _, _ = _saved_run(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--from-json", str(path), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no file"),
        ("not json", "is not a result file of python -m jaxce.bench --json"),
        ('{"results": []}', "is not a result file of python -m jaxce.bench --json: 'environment'"),
        ('{"environment": {}, "results": [{"program": "x"}]}', "is not a result file"),
    ],
)
def test_from_json_names_a_file_it_cannot_read(tmp_path, capsys, content, message):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--from-json", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --from-json:" in err and message in err and "Traceback" not in err


def test_markdown_flag(capsys):
    argv = ["binary", "--shape", "4x8", "--dtype", "float32", "--repeats", "1", "--markdown"]
    assert bench.main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(
        "median of 1 runs after a warm-up, shuffled; compile time: median of 3 compilations"
        " after a warm-up one"
    )
    assert "| shape | dtype | program | time | x floor |" in out


def test_each_round_times_the_programs_in_a_fresh_order(monkeypatch):
    # Which program ran just before changes a program's time (a large output reuses the pages
    # that one just freed): the warm-up round in the listed order, then no program twice in a
    # row, and no program after the same one in every round.
    def program(k):
        return bench.Program(f"p{k}", bench.JAXCE, lambda: lambda logits: logits * k)

    floor = bench.Program("floor", bench.FLOOR, lambda: lambda x: x + x)
    _install_fake(monkeypatch, "fake", "three programs", program(1), program(2), floor)
    ran = []
    names = {}

    def timed(executable, args, calls):
        if id(executable) not in names:  # programs are timed first in their listed order
            names[id(executable)] = ("p1", "p2", "floor")[len(names)]
        ran.append(names[id(executable)])
        return 1.0  # slow enough for one call per sample

    monkeypatch.setattr(bench, "_seconds_per_call", timed)
    bench.run(["fake"], [(2, 3)], ["float32"], repeats=5, progress=False)
    rounds = [ran[i : i + 3] for i in range(0, len(ran), 3)]
    assert rounds == bench.round_orders(["p1", "p2", "floor"], 6)
    assert all(a != b for a, b in zip(ran, ran[1:], strict=False))
    assert all(sorted(r) == ["floor", "p1", "p2"] for r in rounds)
    timed = ran[2:]  # from the warm-up's last program on
    for name in ("p1", "p2", "floor"):
        before = {a for a, b in zip(timed, timed[1:], strict=False) if b == name}
        assert before == {"p1", "p2", "floor"} - {name}


def test_a_program_that_fails_while_timed_leaves_the_others_in_fresh_orders(monkeypatch):
    def program(k):
        return bench.Program(f"p{k}", bench.JAXCE, lambda: lambda logits: logits * k)

    _install_fake(monkeypatch, "fake", "four programs", *(program(k) for k in range(4)))
    ran = []
    names = {}

    def timed(executable, args, calls):
        if id(executable) not in names:
            names[id(executable)] = f"p{len(names)}"
        name = names[id(executable)]
        ran.append(name)
        if name == "p2" and ran.count("p2") == 2:  # the second round
            raise RuntimeError("out of memory, say")
        return 1.0

    monkeypatch.setattr(bench, "_seconds_per_call", timed)
    results = bench.run(["fake"], [(2, 3)], ["float32"], repeats=4, progress=False)
    assert [r.error is None for r in results] == [True, True, False, True]
    assert [len(r.times) for r in results] == [4, 4, 0, 4]
    assert ran.count("p2") == 2
    assert all(a != b for a, b in zip(ran, ran[1:], strict=False))


def test_a_case_whose_every_program_fails_is_reported(monkeypatch):
    def broken():
        def program(logits):
            raise RuntimeError("out of memory, say")

        return program

    programs = [bench.Program(f"p{k}", bench.JAXCE, broken) for k in range(2)]
    _install_fake(monkeypatch, "fake", "two failing programs", *programs)
    results = bench.run(["fake"], [(2, 3)], ["float32"], repeats=1, progress=False)
    assert [r.error for r in results] == ["RuntimeError: out of memory, say"] * 2


def test_round_orders_vary_what_runs_before_each_program():
    names = [f"p{k}" for k in range(7)]  # the cross-entropy benchmark's seven programs
    orders = bench.round_orders(names, 8)
    assert orders == bench.round_orders(names, 8)  # the same in every run
    assert orders[0] == names and all(sorted(o) == names for o in orders)
    assert len({tuple(o) for o in orders}) == 8
    flat = [name for order in orders for name in order]
    assert all(a != b for a, b in zip(flat, flat[1:], strict=False))
    before = {name: [] for name in names}  # the previous round's last counts for the first
    for previous, order in zip(orders, orders[1:], strict=False):
        for a, b in zip([previous[-1], *order[:-1]], order, strict=True):
            before[b].append(a)
    # Each program follows a given one in at most 2 of the 7 timed rounds (in every round, with
    # each round starting one program further on).
    assert max(runs.count(a) for runs in before.values() for a in runs) == 2


@pytest.mark.parametrize("count, most", [(3, 4), (4, 3), (5, 2)])
def test_round_orders_of_fewer_programs_reach_the_least_possible(count, most):
    # Over 7 timed rounds of ``count`` programs, some program follows a given one in at least
    # ceil(7 / (count - 1)) of them.
    names = [f"p{k}" for k in range(count)]
    orders = bench.round_orders(names, 8)
    flat = [name for order in orders for name in order]
    assert all(a != b for a, b in zip(flat, flat[1:], strict=False))
    pairs = list(zip(flat[count - 1 :], flat[count:], strict=False))
    assert max(pairs.count(p) for p in set(pairs)) == most == -(-7 // (count - 1))


def test_round_orders_of_two_programs_or_fewer():
    assert bench.round_orders(["a", "b"], 4) == [["a", "b"]] * 4
    assert bench.round_orders(["a"], 3) == [["a"]] * 3
    assert bench.round_orders([], 2) == [[], []]


def test_quick_compiles_each_program_once(tmp_path, capsys):
    json_path = tmp_path / "out.json"
    argv = ["binary", "--quick", "--shape", "4x8", "--dtype", "float32", "--no-progress"]
    assert bench.main([*argv, "--json", str(json_path)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.endswith(
        "compile time: median of 1 compilations after a warm-up one"
        + (
            ""
            if bench.warms_up_every_case(True)
            else " in each benchmark's first case, none in the others"
        )
    )
    env = json.loads(json_path.read_text())["environment"]
    assert env["repeats"] == 3 and env["compile_samples"] == 1
    assert env["compile_warm_up_every_case"] == bench.warms_up_every_case(True)
