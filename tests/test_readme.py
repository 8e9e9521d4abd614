"""The README's Python examples run as written (a block after `<!-- skip-test -->` is skipped)."""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- skip-test -->\s*)?```python\n(.*?)```", re.DOTALL)


def _blocks():
    skip_mark = pytest.mark.skip("marked not standalone in the README")
    return [
        pytest.param(code, id=f"block{i}", marks=[skip_mark] if skip else [])
        for i, (skip, code) in enumerate(BLOCK.findall(README.read_text()))
    ]


def test_readme_has_examples():
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("code", _blocks())
def test_readme_example_runs(code):
    # README code is user code: run it under JAX's default promotion rules, not the strict ones
    # the library's own tests use.
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
