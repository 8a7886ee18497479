"""Symbolic dims as canonical expressions over size symbols.

A symbolic dim is a `str`: a polynomial with integer coefficients in symbols that stand for
nonnegative integer sizes (`batch`, `past + seq`, `2*heads`, `seq - 1`), written in one
canonical form, sympy's text of the expanded expression, so two dims that are the same
expression are the same string. A plain symbol is its own name. A string that is not such an
expression (ONNX dim params are free text: `"batch size"`, `"N/A"`) is an opaque symbol: it
equals only itself, and arithmetic on it gives unknown (None) except for the identities
(x + 0, x * 1, x * 0, x - x).

The grammar read by `canonical_dim`: identifiers (Python's, keywords excepted), nonnegative
integers, `+`, `-` (binary and unary), `*`, `**` with an integer exponent up to 16, `//` where the
division is exact as polynomials (`(a*b)//b` is `a`; `a//2` does not parse) and parentheses.

sympy is imported on the first expression that needs it (`import graphopt` does not load it);
parsing and each operation are cached, since shape inference calls them for every node.
"""

from __future__ import annotations

import ast
import functools
import keyword
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from graphopt.ir.types import Dim

_CACHE_SIZE = 8192
_MAX_POWER = 16


def canonical_dim(text: "Dim") -> "Dim":
    """The canonical form of a dim: an expression text becomes its canonical text (or an int
    when it is a number, `"2*3"` -> 6); any other string is kept as an opaque symbol; ints and
    None are returned as they are."""
    if not isinstance(text, str) or _is_name(text):
        return text
    expr = _parse(text)
    return text if expr is None else _dim(expr)


def parse_dim(text: str) -> "Dim":
    """The canonical dim of an expression text, None when `text` is not an expression of the
    grammar above (unlike `canonical_dim`, which keeps such text as an opaque symbol)."""
    if _is_name(text):
        return text
    expr = _parse(text)
    return None if expr is None else _dim(expr)


def dim_symbols(dim: "Dim") -> tuple[str, ...]:
    """The symbols an expression dim is made of, sorted (`"past + seq"` -> ("past", "seq"));
    an opaque symbol is its own one symbol; () for ints and None."""
    if not isinstance(dim, str):
        return ()
    expr = None if _is_name(dim) else _parse(dim)
    if expr is None:
        return (dim,)
    return tuple(sorted(str(symbol) for symbol in expr.free_symbols))


def evaluate_dim(dim: "Dim", sizes: "dict[str, int]") -> Optional[int]:
    """The value of `dim` with each symbol given its size in `sizes` (every symbol of
    `dim_symbols(dim)` must be there); None for an unknown dim."""
    if dim is None or isinstance(dim, int):
        return dim
    if _is_name(dim) or _parse(dim) is None:
        return sizes[dim]
    return int(_parse(dim).subs({_symbol(name): sizes[name] for name in dim_symbols(dim)}))


def add_dims(a: "Dim", b: "Dim") -> "Dim":
    """a + b; None when either is unknown or the sum has no canonical form."""
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if b == 0:
        return a
    if a == 0:
        return b
    return _binary("+", a, b)


def sub_dims(a: "Dim", b: "Dim") -> "Dim":
    """a - b; None when either is unknown or the difference has no canonical form."""
    if isinstance(a, int) and isinstance(b, int):
        return a - b
    if b == 0:
        return a
    if a is not None and a == b:
        return 0
    return _binary("-", a, b)


def mul_dims(a: "Dim", b: "Dim") -> "Dim":
    """a * b; 0 when either is 0, else None when either is unknown or has no canonical form."""
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    if a == 0 or b == 0:
        return 0
    if b == 1:
        return a
    if a == 1:
        return b
    return _binary("*", a, b)


def floordiv_dims(a: "Dim", b: "Dim") -> "Dim":
    """a // b when it is known: ints (b != 0), or expressions where b divides a exactly as
    polynomials with integer coefficients (`(a*b)//b` is `a`, `(2*a + 2)//2` is `a + 1`);
    else None (`a//2` has no canonical form)."""
    if isinstance(a, int) and isinstance(b, int):
        return None if b == 0 else a // b
    if b == 1:
        return a
    if b == 0:
        return None
    if a == 0:
        return 0
    if a is not None and a == b:
        return 1
    return _binary("//", a, b)


def dims_equal(a: "Dim", b: "Dim") -> Optional[bool]:
    """True when a and b are proven equal, False when proven different (different ints, or
    expressions whose difference is a nonzero constant or has a known sign, such as
    `seq + 1` and `seq`, or `past + seq + 1` and 0), None when unknown (None, an opaque symbol
    against anything else, or two different symbols: `batch` may equal `seq` at run time)."""
    if a is None or b is None:
        return None
    if a == b:
        return True
    if isinstance(a, int) and isinstance(b, int):
        return False
    return _expr_equal(a, b)


def dim_at_most(a: "Dim", b: "Dim") -> Optional[bool]:
    """True when a <= b is proven (symbols are nonnegative: `past <= past + seq`), False when
    a > b is proven, None when unknown (None, opaque symbols, `seq - 1` against 0)."""
    if a is None or b is None:
        return None
    if isinstance(a, int) and isinstance(b, int):
        return a <= b
    if a == b:
        return True
    return _expr_at_most(a, b)


# --------------------------------------------------------------------------------------
# sympy side (everything below imports sympy lazily and is cached)
# --------------------------------------------------------------------------------------


def _is_name(text: str) -> bool:
    return text.isidentifier() and not keyword.iskeyword(text)


def _dim(expr: Any) -> "Dim":
    """The dim of a sympy expression: an int for a number, else its canonical text."""
    return int(expr) if expr.is_Integer else str(expr)


def _as_expr(dim: "Dim") -> Any:
    """A sympy expression for an int or a parsable dim; None for None or an opaque symbol."""
    if dim is None:
        return None
    if isinstance(dim, int):
        import sympy

        return sympy.Integer(dim)
    return _parse(dim)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _symbol(name: str) -> Any:
    import sympy

    return sympy.Symbol(name, integer=True, nonnegative=True)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse(text: str) -> Any:
    """The expanded sympy expression of `text`, or None when it is not in the grammar."""
    if _is_name(text):
        return _symbol(text)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    import sympy

    expr = _build(tree.body)
    return None if expr is None else sympy.expand(expr)


def _build(node: ast.AST) -> Any:
    """A sympy expression of one parsed node, None when outside the grammar."""
    if isinstance(node, ast.Name):
        return _symbol(node.id)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        import sympy

        return sympy.Integer(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _build(node.operand)
        if operand is None:
            return None
        return -operand if isinstance(node.op, ast.USub) else operand
    if not isinstance(node, ast.BinOp):
        return None
    left, right = _build(node.left), _build(node.right)
    if left is None or right is None:
        return None
    if isinstance(node.op, ast.Add):
        return left + right
    if isinstance(node.op, ast.Sub):
        return left - right
    if isinstance(node.op, ast.Mult):
        return left * right
    if isinstance(node.op, ast.Pow):
        return left**right if right.is_Integer and 0 <= right <= _MAX_POWER else None
    if isinstance(node.op, ast.FloorDiv):
        return _exact_quotient(left, right)
    return None


def _exact_quotient(a: Any, b: Any) -> Any:
    """a / b when it is a polynomial with integer coefficients, else None."""
    import sympy

    if b == 0:
        return None
    if a.is_Integer and b.is_Integer:
        return a // b
    quotient = sympy.cancel(a / b)
    symbols = sorted(quotient.free_symbols, key=str)
    if not symbols:
        return quotient if quotient.is_Integer else None
    if not quotient.is_polynomial(*symbols):
        return None
    poly = sympy.Poly(quotient, *symbols)
    return sympy.expand(quotient) if all(c.is_Integer for c in poly.coeffs()) else None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _binary(op: str, a: "Dim", b: "Dim") -> "Dim":
    import sympy

    left, right = _as_expr(a), _as_expr(b)
    if left is None or right is None:
        return None
    if op == "+":
        result = left + right
    elif op == "-":
        result = left - right
    elif op == "*":
        result = left * right
    else:
        result = _exact_quotient(left, right)
        if result is None:
            return None
    return _dim(sympy.expand(result))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _expr_equal(a: "Dim", b: "Dim") -> Optional[bool]:
    import sympy

    left, right = _as_expr(a), _as_expr(b)
    if left is None or right is None:
        return None
    difference = sympy.expand(left - right)
    if difference == 0:
        return True
    if difference.is_number or difference.is_positive or difference.is_negative:
        return False
    return None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _expr_at_most(a: "Dim", b: "Dim") -> Optional[bool]:
    import sympy

    left, right = _as_expr(a), _as_expr(b)
    if left is None or right is None:
        return None
    difference = sympy.expand(right - left)
    if difference.is_nonnegative:
        return True
    return False if difference.is_negative else None
