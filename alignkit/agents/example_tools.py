"""Example tools (`--tools alignkit.agents.example_tools:calculator`).

`calculator` evaluates arithmetic safely: the expression is parsed with `ast` and only numbers,
`+ - * / // % **`, unary signs and parentheses are evaluated; names, calls, attributes,
subscripts, strings and every other construct are refused, so no code runs. Sizes are bounded
(expression length, exponent, the bits of an integer result) so one call cannot eat the machine.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 1000  # |b| in a ** b
MAX_INT_BITS = 4096  # an integer result wider than this (about 1233 digits) is refused

BINARY_OPERATORS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
UNARY_OPERATORS: dict[type[ast.unaryop], Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"exponent {exponent:g} is too large (at most {MAX_EXPONENT} in absolute value)")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 \
            and (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:
        raise ValueError(f"{base} ** {exponent} is too large")


def _check_size(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError("the result is too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is not a finite number")
    return value


def _evaluate(node: ast.AST) -> int | float:
    """The value of an arithmetic expression tree; any other node is a ValueError."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"only numbers are allowed, not {node.value!r}")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPERATORS:
        return UNARY_OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            value = BINARY_OPERATORS[type(node.op)](left, right)
        except OverflowError:
            raise ValueError("the result is too large") from None
        if isinstance(value, complex):  # (-8) ** (1/3)
            raise ValueError("the result is not a real number")
        return _check_size(value)
    raise ValueError(f"{type(node).__name__} is not allowed: use numbers, + - * / // % ** and parentheses")


def format_number(value: int | float) -> str:
    """An int as is; a float that is a whole number (below 1e15) without ".0"; else its repr."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value.

    Supports numbers, + - * / // % ** (exponent at most 1000), unary minus and parentheses.

    Args:
        expression: The arithmetic expression to evaluate, for example "(2 + 3) * 4 / 5".
    """
    if not isinstance(expression, str):
        raise ValueError(f"the expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as err:
        raise ValueError(f"not an arithmetic expression: {getattr(err, 'msg', err)}") from None
    try:
        return format_number(_evaluate(tree))
    except RecursionError:
        raise ValueError("the expression is nested too deeply") from None
