"""The README's Python examples run as written (a block after `<!-- skip-test -->` is skipped)."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- skip-test -->\s*)?```python\n(.*?)```", re.DOTALL)


def _blocks():
    skip_mark = pytest.mark.skip("marked not standalone in the README")
    return [
        pytest.param(code, id=f"block{i}", marks=[skip_mark] if skip else [])
        for i, (skip, code) in enumerate(BLOCK.findall(README.read_text()))
    ]


def _device_count_blocks():
    """The examples that adapt to ``jax.device_count()``, i.e. promise to run on any number."""
    return [
        pytest.param(code, id=f"block{i}")
        for i, (skip, code) in enumerate(BLOCK.findall(README.read_text()))
        if not skip and "jax.device_count()" in code
    ]


def test_readme_has_examples():
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("code", _blocks())
def test_readme_example_runs(code):
    # README code is user code: run it under JAX's default promotion rules, not the strict ones
    # the library's own tests use.
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def test_readme_has_a_multi_device_example():
    assert _device_count_blocks()


@pytest.mark.parametrize("code", _device_count_blocks())
def test_readme_multi_device_example_runs_on_six_devices(code):
    """6 devices = a model axis of 2 and a data axis of 3, which divides no power of two."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        [env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=6"]
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-c", "import jax; assert jax.device_count() == 6\n" + code],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
