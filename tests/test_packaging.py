"""The distributions hold what they promise: the sdist runs its own tests, the wheel is the package.

The file lists come from hatchling, the build backend, without building anything; without it
(it is in the dev extra) those tests are skipped.
"""

from __future__ import annotations

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _distribution_files(target: str) -> set[str]:
    builders = pytest.importorskip(
        f"hatchling.builders.{target}", reason="hatchling (the dev extra) lists the files"
    )
    builder_class = builders.SdistBuilder if target == "sdist" else builders.WheelBuilder
    builder = builder_class(str(REPO))
    return {file.distribution_path for file in builder.recurse_included_files()}


def _relative(paths) -> set[str]:
    return {path.relative_to(REPO).as_posix() for path in paths}


def test_sdist_holds_the_tests_and_what_they_read() -> None:
    files = _distribution_files("sdist")
    needed = (
        _relative((REPO / "tests").glob("*.py"))  # conftest.py and the helpers too
        | _relative((REPO / "notebooks").glob("*.ipynb"))
        | _relative((REPO / "jaxce").glob("*.py"))
        | _relative((REPO / "docs").glob("*.*"))
        | {"README.md", "LICENSE", "pyproject.toml", "jaxce/py.typed"}
    )
    assert {"tests/conftest.py", "tests/_reference.py", "tests/_sharded_checks.py"} <= needed
    assert needed - files == set()


def test_sdist_holds_nothing_else() -> None:
    top_level = {path.split("/")[0] for path in _distribution_files("sdist")}
    expected = {"jaxce", "tests", "notebooks", "docs", "README.md", "LICENSE", "pyproject.toml"}
    assert top_level <= expected | {".gitignore"}
    files = _distribution_files("sdist")
    assert not [path for path in files if path.startswith(("docs/_build/", "docs/notebooks/"))]


def test_wheel_is_the_package_and_its_type_marker() -> None:
    files = _distribution_files("wheel")
    assert all(path.startswith("jaxce/") for path in files), sorted(files)
    assert _relative((REPO / "jaxce").glob("*.py")) | {"jaxce/py.typed"} <= files


def test_license_is_the_full_apache_text() -> None:
    text = (REPO / "LICENSE").read_text()
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_readme_links_work_on_a_package_index_page() -> None:
    """The README is the project's page on the package index, where relative links break."""
    targets = re.findall(r"\]\(([^)\s]+)\)", (REPO / "README.md").read_text())
    relative = [t for t in targets if not t.startswith(("https://", "http://", "#"))]
    assert not relative


def test_lower_bounds_are_the_versions_ci_tests() -> None:
    """Each dependency's lower bound in pyproject.toml is the version `.ci/run` pins for its run
    on the oldest supported versions (.ci/constraints-oldest.txt), and there is no upper bound."""
    import tomllib

    constraints = REPO / ".ci" / "constraints-oldest.txt"
    if not constraints.exists():
        pytest.skip("the CI files are in the repository, not in the sdist")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = dict(
        line.split("==")
        for line in constraints.read_text().splitlines()
        if line and not line.startswith("#")
    )
    bounds = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
        assert match, f"{requirement!r}: a lower bound only"
        name, lower = match.groups()
        bounds[name] = lower
    assert set(bounds) == {"jax", "jaxlib", "optax", "chex", "numpy"}
    for name, lower in bounds.items():
        assert pins[name] == lower or pins[name].startswith(lower + "."), (name, lower, pins)
