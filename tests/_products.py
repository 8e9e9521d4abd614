"""The matrix products of a lowered program, with the element types of their operands."""

import re

_DOT = re.compile(
    r"stablehlo\.dot_general .*"
    r": \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>"
)


def product_types(stablehlo: str) -> list[tuple[str, str, str]]:
    """``(lhs, rhs, result)`` element types (``"bf16"``, ``"f32"``, ...) of every
    ``dot_general`` in the StableHLO text of a lowered program (``jit(f).lower(...).as_text()``),
    loop and branch bodies included."""
    return _DOT.findall(stablehlo)


def assert_products(stablehlo: str, operand: str, at_least: int) -> None:
    """At least ``at_least`` products, every one of two ``operand`` operands with a float32
    result."""
    dots = product_types(stablehlo)
    assert len(dots) >= at_least, dots
    assert all(d == (operand, operand, "f32") for d in dots), dots
