"""The error metric of the property tests and the precision table of ``docs/precision.md``.

Every property test that compares jaxce with a float64 reference goes through :func:`compare`:

* ``want`` is the float64 reference evaluated on the inputs as given (the low-precision values
  cast to float64), so only jaxce's own arithmetic is measured;
* the error of an element is ``|got - want| / max(scale, floor)`` in units of ``unit``, the
  machine epsilon of the dtype jaxce computes in (float32 for float16, bfloat16 and float32
  inputs, float64 for float64) or, for a result returned in a narrower dtype, of that dtype;
* ``scale`` is the sum of the magnitudes of the terms of the formula (each logsumexp counted as
  at least 1, see docs/precision.md), ``floor`` the smallest normal number of the result's dtype.

Where the reference is NaN the result must be NaN, where it is infinite it must be the same
infinity, and where its magnitude is beyond the result dtype's range (the true value cannot be
represented) an infinity of the right sign is accepted. Everywhere else the result must be finite
and within the bound of :data:`BOUNDS`.

The worst error seen per (function, dtype) is recorded. Each one must also stay within
``MARGIN`` times the worst error that docs/precision.md reports, so that the page cannot
silently fall out of date. To measure the table again (with the thorough profile, one process)::

    python tests/_precision.py

which runs ``tests/test_properties.py`` and rewrites the table in docs/precision.md.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

F64 = np.float64
ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "precision.md"
OUT_ENV = "JAXCE_PRECISION_OUT"  # where a measuring run writes its worst errors (JSON)
MARGIN = 2.0  # a CI run may see up to MARGIN x the documented worst error (at least 1 unit)
DTYPES = ("float16", "bfloat16", "float32", "float64")

# The asserted bound, in units, per table row: the dtype-derived tolerance of every example.
BOUNDS = {
    "log_softmax": 8,
    "softmax": 8,
    "logsumexp": 8,
    "log_softmax (gradient)": 8,
    "softmax (gradient)": 8,
    "logsumexp (gradient)": 8,
    "sigmoid": 4,
    "log_sigmoid": 4,
    "logit_soft_cap": 4,
    "sigmoid (gradient)": 4,
    "log_sigmoid (gradient)": 4,
    "logit_soft_cap (gradient)": 4,
    "logit_soft_cap (cap gradient)": 16,
    "softmax_cross_entropy_with_integer_labels": 16,
    "softmax_cross_entropy_with_integer_labels (gradient)": 16,
    "softmax_cross_entropy": 16,
    "softmax_cross_entropy (gradient)": 16,
    "nll_loss": 2,
    "nll_loss (gradient)": 2,
    "sigmoid_binary_cross_entropy": 8,
    "sigmoid_binary_cross_entropy (gradient)": 8,
    "binary_cross_entropy": 16,
    "binary_cross_entropy (gradient)": 16,
    "entropy": 16,
    "entropy (gradient)": 8,
    "softmax_entropy": 16,
    "softmax_entropy (gradient)": 16,
    "kl_divergence": 16,
    "kl_divergence (gradient)": 8,
    "sigmoid_focal_loss": 16,
    "softmax_focal_loss": 16,
    "linear_softmax_cross_entropy": 16,
    "linear_softmax_cross_entropy (gradient)": 16,
    "linear_softmax_cross_entropy (unfused)": 16,
    "linear_softmax_cross_entropy (unfused, gradient)": 16,
}


# ------------------------------------------------------------------------------------ dtypes
def finfo(dtype):
    import jax.numpy as jnp

    return jnp.finfo(jnp.dtype(dtype))


def compute_dtype(dtype) -> str:
    """The dtype jaxce computes in for an input dtype."""
    return "float64" if np.dtype(dtype) == np.float64 else "float32"


def to_f64(x) -> np.ndarray:
    """Any array (jax or numpy, any float dtype) as float64 numpy."""
    return np.asarray(x).astype(F64)


# ------------------------------------------------------------------------------------ metric
class Recorder:
    """The worst error (in units) and the number of examples per (function, dtype)."""

    def __init__(self):
        self.worst: dict[tuple[str, str], float] = {}
        self.examples: dict[tuple[str, str], int] = {}
        self.documented = read_page()

    def add(self, function: str, dtype: str, units: float) -> None:
        key = (function, dtype)
        self.worst[key] = max(self.worst.get(key, 0.0), units)
        self.examples[key] = self.examples.get(key, 0) + 1
        if os.environ.get(OUT_ENV):  # a measuring run: the page is about to be rewritten
            return
        assert key in self.documented, (
            f"{function} ({dtype}) is measured but missing from docs/precision.md; run"
            " `python tests/_precision.py` to measure the table again."
        )
        allowed = MARGIN * max(self.documented[key], 1.0)
        assert units <= allowed, (
            f"{function} ({dtype}): error {units:.3g} units exceeds {MARGIN:g} x the"
            f" {self.documented[key]:.3g} units documented in docs/precision.md"
        )

    def dump(self, path: str) -> None:
        rows = [
            {"function": f, "dtype": d, "units": u, "examples": self.examples[(f, d)]}
            for (f, d), u in sorted(self.worst.items())
        ]
        Path(path).write_text(json.dumps(rows, indent=1))


def _describe(i, got, want, scale):
    return f"element {i}: got {got!r}, want {want!r} (scale {scale:.3g})"


def compare(
    function, dtype, got, want, scale, *, unit_dtype, out_dtype=None, mask=None, overflow=None
):
    """Checks ``got`` (any array) against the float64 ``want`` with the metric of this module,
    records the worst error for ``(function, dtype)`` and asserts it is within ``BOUNDS``.

    ``unit_dtype``: the dtype whose epsilon is the unit; ``out_dtype``: the dtype of ``got``
    (its range and smallest normal number; default ``unit_dtype``); ``mask``: the elements to
    check (default all); ``overflow``: elements where a term of the formula is beyond the
    range, so that an infinite or NaN result is accepted there.
    """
    out_dtype = unit_dtype if out_dtype is None else out_dtype
    bound = BOUNDS[function]
    info = finfo(out_dtype)
    unit, floor, top = float(finfo(unit_dtype).eps), float(info.smallest_normal), float(info.max)
    want = np.asarray(want, F64)
    scale = np.broadcast_to(np.asarray(scale, F64), want.shape).ravel()
    keep = np.ones(want.size, bool) if mask is None else np.broadcast_to(mask, want.shape).ravel()
    beyond = np.zeros(want.size, bool)
    if overflow is not None:
        beyond = np.broadcast_to(overflow, want.shape).ravel()
    got, want = to_f64(got).ravel(), want.ravel()
    assert got.shape == want.shape, (got.shape, want.shape)
    worst = 0.0
    for i in np.flatnonzero(keep):
        g, w, s = got[i], want[i], scale[i]
        where = f"{function} ({dtype}): {_describe(i, g, w, s)}"
        if np.isnan(w):
            assert np.isnan(g), where
            continue
        if np.isinf(w):
            assert g == w, where
            continue
        if beyond[i] or abs(w) >= top * (1 - bound * unit):  # beyond the range:
            if np.isnan(g) or np.isinf(g) and np.sign(g) == np.sign(w):  # inf, or inf - inf
                continue
        assert np.isfinite(g), f"non-finite result; {where}"
        err = abs(g - w) / max(s * unit, floor)
        assert err <= bound, f"error {err:.3g} units > {bound}; {where}"
        worst = max(worst, err)
    if keep.any():
        RECORDER.add(function, dtype, worst)


def assert_finite(name, *arrays):
    for a in arrays:
        a = to_f64(a)
        assert np.all(np.isfinite(a)), (
            f"{name}: non-finite values at {np.argwhere(~np.isfinite(a))}"
        )


# ------------------------------------------------------------------------------------ page
_BEGIN = "<!-- precision-table begin: written by `python tests/_precision.py` -->"
_END = "<!-- precision-table end -->"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def read_page(path: Path = PAGE) -> dict[tuple[str, str], float]:
    """``{(function, dtype): worst units}`` from the page's table ({} if there is none)."""
    if not path.exists():
        return {}
    text = path.read_text()
    if _BEGIN not in text:
        return {}
    body = text.split(_BEGIN, 1)[1].split(_END, 1)[0]
    table = {}
    for line in body.splitlines():
        cells = _cells(line)
        if len(cells) < 4 or not line.startswith("| ") or cells[0] in ("function", "---"):
            continue
        if set(cells[0]) <= {"-"}:
            continue
        function = cells[0].replace("`", "")
        for dtype, cell in zip(DTYPES, cells[1:5], strict=True):
            if cell not in ("", "n/a"):
                table[(function, dtype)] = float(cell.split()[0])
    return table


def _units(u: float) -> str:
    return f"{u:.2f}" if u < 100 else f"{u:.0f}"


def render_table(rows: list[dict]) -> str:
    """The markdown table: one line per function, one column per input dtype, each cell the
    worst error in units and the relative error it corresponds to."""
    worst = {(r["function"], r["dtype"]): r for r in rows}
    lines = [
        "| function | float16 | bfloat16 | float32 | float64 | bound (units) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for function in BOUNDS:
        cells = []
        for dtype in DTYPES:
            r = worst.get((function, dtype))
            if r is None:
                cells.append("n/a")
                continue
            units = r["units"]
            rel = units * _unit_of(function, dtype)
            cells.append(f"{_units(units)} ({rel:.1e})")
        name = function.replace(" (gradient)", "")
        label = f"`{name}`" + (" (gradient)" if function.endswith("(gradient)") else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {BOUNDS[function]} |")
    return "\n".join(lines)


# Results returned in the input dtype (the primitives and every gradient) are measured in units
# of that dtype's epsilon; losses are returned in float32 (float64) and measured in its epsilon.
_INPUT_DTYPE_RESULTS = ("log_softmax", "softmax", "logsumexp", "sigmoid", "log_sigmoid")


def unit_dtype(function: str, dtype: str) -> str:
    if function.endswith("(gradient)") or function in _INPUT_DTYPE_RESULTS + ("logit_soft_cap",):
        return dtype
    return compute_dtype(dtype)


def _unit_of(function: str, dtype: str) -> float:
    return float(finfo(unit_dtype(function, dtype)).eps)


def write_page(rows: list[dict], meta: str, path: Path = PAGE) -> None:
    text = path.read_text()
    head, rest = text.split(_BEGIN, 1)
    tail = rest.split(_END, 1)[1]
    path.write_text(f"{head}{_BEGIN}\n{meta}\n\n{render_table(rows)}\n{_END}{tail}")


def merge_worse(rows: list[dict], previous: dict[tuple[str, str], float]) -> list[dict]:
    """``rows`` (this run's measurements) with each cell the worse of this run's and
    ``previous``'s (the page's table), and the previous cells this run did not measure (a test
    that failed stops early); those count no examples."""
    merged = {(r["function"], r["dtype"]): dict(r) for r in rows}
    for key, units in previous.items():
        row = merged.setdefault(
            key, {"function": key[0], "dtype": key[1], "units": 0.0, "examples": 0}
        )
        row["units"] = max(row["units"], units)
    return [merged[key] for key in sorted(merged)]


def main(argv: list[str]) -> int:
    """Runs the property tests with the thorough profile in one process and rewrites the
    table of docs/precision.md with the worst errors they measured; with ``--merge``, the worse
    of those and the table's."""
    import jax

    merge = "--merge" in argv
    argv = [a for a in argv if a != "--merge"]
    previous = read_page() if merge else {}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "precision.json")
        env = dict(os.environ, **{OUT_ENV: out})
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:xdist",
            "-q",
            "--hypothesis-profile=thorough",
            str(ROOT / "tests" / "test_properties.py"),
            *argv,
        ]
        start = datetime.datetime.now()
        result = subprocess.run(command, env=env, cwd=ROOT, check=False)
        minutes = (datetime.datetime.now() - start).total_seconds() / 60
        if not os.path.exists(out):
            print("the test run wrote no measurements", file=sys.stderr)
            return result.returncode or 1
        rows = json.loads(Path(out).read_text())
    examples = sum(r["examples"] for r in rows)
    rows = merge_worse(rows, previous)
    meta = (
        f"Measured on {start:%Y-%m-%d} with the `thorough` profile: {examples} comparisons"
        f" ({len(rows)} function and dtype pairs) in {minutes:.0f} minutes, JAX"
        f" {jax.__version__}, NumPy {np.__version__}, {platform.machine()} CPU"
        f" ({os.cpu_count()} cores), Python {platform.python_version()}."
        + ("" if result.returncode == 0 else " **Some property tests failed in this run.**")
        + (
            " Each cell is the worse of this run's error and the one the table held before"
            " (`--merge`), which covers the functions a failing test stopped before measuring."
            if merge
            else ""
        )
        + (f" The tests run: `{' '.join(argv)}`." if argv else "")
    )
    write_page(rows, meta)
    print(f"wrote {PAGE} ({examples} comparisons); pytest exit status {result.returncode}")
    return result.returncode


RECORDER = Recorder()

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
