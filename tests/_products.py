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
