"""Every public function is documented (Args, Returns, Examples) and its examples run."""

import doctest
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce

PUBLIC_FUNCTIONS = sorted(
    name
    for name in jaxce.__all__
    if callable(getattr(jaxce, name)) and not inspect.isclass(getattr(jaxce, name))
)


def test_all_names_exist():
    assert PUBLIC_FUNCTIONS, "jaxce.__all__ lists no functions"
    for name in jaxce.__all__:
        assert hasattr(jaxce, name), name


def test_issue_api_is_public():
    expected = {
        "log_softmax",
        "softmax",
        "logsumexp",
        "sigmoid",
        "log_sigmoid",
        "logit_soft_cap",
        "softmax_cross_entropy",
        "softmax_cross_entropy_with_integer_labels",
        "sigmoid_binary_cross_entropy",
        "binary_cross_entropy",
        "nll_loss",
        "entropy",
        "softmax_entropy",
        "kl_divergence",
        "sigmoid_focal_loss",
        "softmax_focal_loss",
        "check_labels",
    }
    assert expected <= set(jaxce.__all__), expected - set(jaxce.__all__)


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_docstring_sections(name):
    doc = inspect.getdoc(getattr(jaxce, name))
    assert doc, f"{name} has no docstring"
    for section in ("Args:", "Returns:", "Examples:"):
        assert section in doc, f"{name} docstring lacks {section}"
    assert ">>>" in doc, f"{name} docstring has no runnable example"


def _globs(obj):
    module = inspect.getmodule(obj)
    globs = dict(vars(module)) if module is not None else {}
    globs.update({"jax": jax, "jnp": jnp, "np": np, "jaxce": jaxce})
    return globs


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_docstring_examples_run(name):
    # Examples are written for users' default configuration: float32, standard promotion.
    obj = getattr(jaxce, name)
    finder = doctest.DocTestFinder(recurse=False)
    tests = finder.find(obj, name=f"jaxce.{name}", globs=_globs(obj))
    tests = [t for t in tests if t.examples]
    assert tests, f"no doctest examples found for {name}"
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    with (
        jax.enable_x64(False),
        jax.numpy_dtype_promotion("standard"),
        jax.numpy_rank_promotion("allow"),
    ):
        for t in tests:
            runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"


def test_module_doctests_run():
    """Doctests anywhere in the private modules (helpers included) also pass."""
    modules = {inspect.getmodule(getattr(jaxce, n)) for n in PUBLIC_FUNCTIONS}
    modules.discard(None)
    failed = {}
    with (
        jax.enable_x64(False),
        jax.numpy_dtype_promotion("standard"),
        jax.numpy_rank_promotion("allow"),
    ):
        for module in sorted(modules, key=lambda m: m.__name__):
            res = doctest.testmod(
                module,
                optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                extraglobs={"jax": jax, "jnp": jnp, "np": np, "jaxce": jaxce},
                report=False,
            )
            if res.failed:
                failed[module.__name__] = res.failed
    assert not failed, failed
