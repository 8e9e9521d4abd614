"""Sphinx configuration of the jaxce documentation site.

The site is the README (the guide), an API reference generated from the docstrings of every name
in ``jaxce.__all__`` and ``jaxce.sharded.__all__``, and the notebooks, rendered with the outputs
they are committed with (nothing is executed). Build it with

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import shutil

from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

import jaxce

DOCS = pathlib.Path(__file__).resolve().parent
REPO = DOCS.parent

project = "jaxce"
author = "The jaxce authors"
copyright = "2026, The jaxce authors"
release = jaxce.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
]
exclude_patterns = ["_build"]
root_doc = "index"

# Docstrings are Google style (Args, Returns, Examples, References).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "signature"
autosummary_generate = False
python_maximum_signature_line_length = 88

# Markdown (the README) and notebooks: rendered as committed, never executed.
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"jaxce {release}"


def _copy_notebooks() -> None:
    """Copies the repository's notebooks into the source tree (``docs/notebooks``, ignored by git).

    Sphinx reads sources from ``docs/`` only; the notebooks stay where the README and the tests
    expect them. ``copy2`` keeps modification times, so an unchanged notebook is not re-read.
    """
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    sources = sorted((REPO / "notebooks").glob("*.ipynb"))
    for stale in set(target.glob("*.ipynb")) - {target / s.name for s in sources}:
        stale.unlink()
    for source in sources:
        destination = target / source.name
        if not destination.exists() or destination.stat().st_mtime != source.stat().st_mtime:
            shutil.copy2(source, destination)


_copy_notebooks()


class PublicApi(SphinxDirective):
    """``.. public-api:: module``: a summary table, then every name in ``module.__all__``.

    Generated from ``__all__``, so a new public function appears without editing the docs.
    """

    required_arguments = 1

    def run(self) -> list:  # of docutils nodes
        module_name = self.arguments[0]
        module = importlib.import_module(module_name)
        # The table names are relative to the current module, which the page's automodule sets.
        lines = [".. autosummary::", "   :nosignatures:", ""]
        lines += [f"   {name}" for name in module.__all__]
        lines.append("")
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                directive = "autoclass"
            elif callable(obj):
                directive = "autofunction"
            else:
                directive = "autodata"
            lines += [f".. {directive}:: {module_name}.{name}", ""]
        return self.parse_text_to_nodes("\n".join(lines))


class _AsWritten(str):
    """An annotation shown as its source text, not as a quoted string."""

    def __repr__(self) -> str:
        return str(self)


def _signature_as_written(
    app: Sphinx, what: str, name: str, obj: object, options, signature, return_annotation
) -> tuple[str, str | None] | None:
    """Shows a function's annotations as written (``jax.typing.ArrayLike``), not expanded.

    Evaluated, ``ArrayLike`` becomes a union of eight types on every argument; the modules use
    ``from __future__ import annotations``, so the source text is at hand.
    """
    if what != "function" or not callable(obj):
        return None
    try:
        sig = inspect.signature(obj, eval_str=False)
    except (TypeError, ValueError):
        return None
    params = [
        p.replace(annotation=_AsWritten(p.annotation)) if isinstance(p.annotation, str) else p
        for p in sig.parameters.values()
    ]
    returned = sig.return_annotation
    sig = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)
    return str(sig), (None if returned is inspect.Signature.empty else str(returned))


def setup(app: Sphinx) -> None:
    app.add_directive("public-api", PublicApi)
    app.connect("autodoc-process-signature", _signature_as_written)
