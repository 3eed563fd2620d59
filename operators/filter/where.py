"""The ``where`` expression language of :func:`operators.filter.filter_items`.

Parsed with :mod:`ast` against a whitelist (no ``eval``) and compiled into one
function over a micro-batch of items, evaluated with NumPy arrays, one per
field used (:mod:`operators.filter.arrays`); see the package documentation
for the language.
"""

from __future__ import annotations

import ast
import fnmatch
import operator as _op
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from operators.filter.arrays import (
    MISSING,
    NUM,
    TEXT,
    Batch,
    Value,
    and_all,
    binary,
    full,
    is_number,
    negate,
    or_all,
    reduce_values,
    same,
    text_compare,
    text_test,
    unary,
)

__all__ = ["FUNCTIONS", "Where", "WhereError", "compile_where", "is_number"]

FUNCTIONS = ("abs", "isnan", "matches", "max", "min", "round", "startswith")

BOOL, ANY = "condition", "any"


class WhereError(ValueError):
    """An expression outside the filter's language, with the column it starts at."""

    def __init__(self, what: str, node: ast.AST | int | None, hint: str) -> None:
        column = node if isinstance(node, int) or node is None else node.col_offset + 1
        self.what, self.column, self.hint = what, column, hint
        super().__init__(what)

    def render(self, where: str) -> str:
        """One line: what, at which column, in which expression, and the hint."""
        at = f" at column {self.column}" if self.column is not None else ""
        return f"{self.what}{at} in {_quote(where)}; hint: {self.hint}"


def _quote(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


_SYNTAX_NAMES = {
    ast.Lambda: "lambda",
    ast.Attribute: "attribute access",
    ast.Subscript: "subscript",
    ast.IfExp: "if-else",
    ast.NamedExpr: "':='",
    ast.Await: "await",
    ast.Dict: "dict",
    ast.Set: "set",
    ast.ListComp: "comprehension",
    ast.SetComp: "comprehension",
    ast.DictComp: "comprehension",
    ast.GeneratorExp: "comprehension",
    ast.JoinedStr: "f-string",
    ast.Starred: "'*'",
    ast.Slice: "slice",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}
_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.Div: np.true_divide,
    ast.Mod: np.mod,
}
_CMPOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: _op.eq,
    ast.NotEq: _op.ne,
    ast.Lt: _op.lt,
    ast.LtE: _op.le,
    ast.Gt: _op.gt,
    ast.GtE: _op.ge,
}
_LANGUAGE = (
    "use fields, numbers, strings, comparisons, in (...), and/or/not, + - * / % and "
    f"the functions {', '.join(FUNCTIONS)}"
)


_OPERATORS = {
    ast.Pow: "**",
    ast.FloorDiv: "//",
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.Invert: "~",
    ast.UAdd: "unary +",
    ast.Is: "is",
    ast.IsNot: "is not",
}


def _syntax_name(node: ast.AST) -> str:
    return _SYNTAX_NAMES.get(type(node), type(node).__name__.lower())


def _unsupported(node: ast.AST) -> str:
    """``unsupported operator '**'`` or ``unsupported syntax 'lambda'``."""
    if isinstance(node, ast.BinOp | ast.UnaryOp | ast.Compare):
        ops = node.ops if isinstance(node, ast.Compare) else [node.op]
        for one in ops:
            if type(one) in _OPERATORS:
                return f"unsupported operator {_OPERATORS[type(one)]!r}"
    return f"unsupported syntax {_syntax_name(node)!r}"


_Node = Callable[[Batch], Value]


class _Compiler:
    """Turns a checked expression into one function over a :class:`Batch`."""

    def __init__(self, tree: ast.AST) -> None:
        self.kinds: dict[str, tuple[str, int]] = {}
        self.fields: set[str] = set()
        self.hints = _text_fields(tree)

    # kinds: what a node yields (NUM, TEXT, BOOL) given what it must yield.

    def condition(self, node: ast.expr) -> _Node:
        kind, fn = self.expr(node)
        if kind != BOOL:
            raise WhereError(
                f"{_describe(node)} is not a condition",
                node,
                "compare it, e.g. value > 3, or combine comparisons with and/or",
            )
        return fn

    def expr(self, node: ast.expr) -> tuple[str, _Node]:
        if isinstance(node, ast.BoolOp):
            return BOOL, self.boolop(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner = self.condition(node.operand)
            return BOOL, lambda b: negate(inner(b))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = self.number(node.operand)
            return NUM, lambda b: unary(np.negative, inner(b))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            fn = _BINOPS[type(node.op)]
            left, right = self.number(node.left), self.number(node.right)
            return NUM, lambda b: binary(fn, left(b), right(b))
        if isinstance(node, ast.Compare):
            return BOOL, self.compare(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.Name):
            if node.id in FUNCTIONS:
                raise WhereError(
                    f"function {node.id!r} used without calling it", node, f"{node.id}(...)"
                )
            raise WhereError(
                f"field {node.id!r} alone is not a condition",
                node,
                f'compare it, e.g. {node.id} != 0 or {node.id} == "on"',
            )
        raise WhereError(_unsupported(node), node, _LANGUAGE)

    def constant(self, node: ast.Constant) -> tuple[str, _Node]:
        value = node.value
        if isinstance(value, bool):
            return BOOL, lambda b: (np.full(b.n, value), None)
        if isinstance(value, int | float):
            return NUM, lambda b: (float(value), None)
        if isinstance(value, str):
            return TEXT, lambda b: (value, None)
        raise WhereError(
            f"unsupported literal {value!r}",
            node,
            "literals are numbers, strings, True, False (None only in == None / != None)",
        )

    def name(self, node: ast.Name, kind: str) -> _Node:
        name = node.id
        if name.startswith("_"):
            raise WhereError(
                f"field {name!r} is private", node, "use the record's public fields, e.g. value"
            )
        if name in FUNCTIONS:
            raise WhereError(f"function {name!r} used without calling it", node, f"{name}(...)")
        seen = self.kinds.get(name) if kind != ANY else None
        if seen is not None and seen[0] != kind:
            raise WhereError(
                f"field {name!r} is used as {_a(seen[0])} at column {seen[1]} and as {_a(kind)}",
                node,
                "a field holds one kind of value; compare it with numbers or with strings",
            )
        if kind != ANY:
            self.kinds.setdefault(name, (kind, node.col_offset + 1))
        self.fields.add(name)
        if kind == NUM:
            return lambda b: b.number(name)
        if kind == ANY:
            return lambda b: (b.column(name), None)
        return lambda b: b.text(name)

    def number(self, node: ast.expr) -> _Node:
        return self.typed(node, NUM)

    def text(self, node: ast.expr) -> _Node:
        return self.typed(node, TEXT)

    def typed(self, node: ast.expr, kind: str) -> _Node:
        if isinstance(node, ast.Name):
            return self.name(node, kind)
        got, fn = self.expr(node)
        if got != kind:
            raise WhereError(
                f"{_describe(node)} is {_a(got)} where {_a(kind)} is needed",
                node,
                'numbers go with numbers (value > 3), text with strings (key == "temp")',
            )
        return fn

    def operand_kind(self, node: ast.expr, other: ast.expr) -> str:
        """The kind a comparison operand has, judged by itself or else by the other side."""
        for one in (node, other):
            if isinstance(one, ast.Name):
                continue
            if isinstance(one, ast.Constant) and isinstance(one.value, str):
                return TEXT
            if isinstance(one, ast.Constant) and one.value is None:
                continue
            if isinstance(one, ast.Constant | ast.BinOp | ast.UnaryOp):
                return NUM
            if isinstance(one, ast.Call) and isinstance(one.func, ast.Name):
                if one.func.id in ("abs", "min", "max", "round"):
                    return NUM
        for one in (node, other):
            if isinstance(one, ast.Name) and one.id in self.kinds:
                return self.kinds[one.id][0]
            if isinstance(one, ast.Name) and one.id in self.hints:
                return TEXT
        return NUM

    def compare(self, node: ast.Compare) -> _Node:
        parts: list[_Node] = []
        left = node.left
        for cmp, right in zip(node.ops, node.comparators, strict=True):
            parts.append(self.compare_one(cmp, left, right, node))
            left = right
        if len(parts) == 1:
            return parts[0]
        return lambda b: and_all([p(b) for p in parts])

    def compare_one(self, cmp: ast.cmpop, left: ast.expr, right: ast.expr, at: ast.AST) -> _Node:
        if isinstance(cmp, ast.In | ast.NotIn):
            return self.membership(left, right, negate=isinstance(cmp, ast.NotIn))
        if type(cmp) not in _CMPOPS:
            raise WhereError(_unsupported(at), at, _LANGUAGE)
        fn = _CMPOPS[type(cmp)]
        for side, other in ((left, right), (right, left)):
            if isinstance(side, ast.Constant) and side.value is None:
                if not isinstance(cmp, ast.Eq | ast.NotEq) or not isinstance(other, ast.Name):
                    raise WhereError(
                        "None compares only as field == None or field != None",
                        side,
                        "write e.g. crest_factor != None",
                    )
                return self.is_none(other, negate=isinstance(cmp, ast.NotEq))
        if (
            isinstance(cmp, ast.Eq | ast.NotEq)
            and isinstance(left, ast.Name)
            and isinstance(right, ast.Name)
            and not ({left.id, right.id} & (set(self.kinds) | self.hints))
        ):
            a, b_ = self.name(left, ANY), self.name(right, ANY)
            return lambda b: same(fn, a(b), b_(b), b.n)
        kind = self.operand_kind(left, right)
        a, b_ = self.typed(left, kind), self.typed(right, kind)
        if kind == NUM:
            return lambda b: full(binary(fn, a(b), b_(b)), b.n)
        return lambda b: text_compare(fn, a(b), b_(b), b.n)

    def is_none(self, node: ast.Name, *, negate: bool) -> _Node:
        name = node.id
        if name.startswith("_") or name in FUNCTIONS:
            self.name(node, ANY)  # raises
        self.fields.add(name)

        def none(b: Batch) -> Value:
            col = b.column(name)
            got = np.fromiter((x is None or x is MISSING for x in col), bool, b.n)
            return (~got if negate else got), None

        return none

    def membership(self, left: ast.expr, right: ast.expr, *, negate: bool) -> _Node:
        if not isinstance(right, ast.Tuple | ast.List) or not all(
            isinstance(e, ast.Constant) and not isinstance(e.value, bool | type(None))
            for e in right.elts
        ):
            raise WhereError(
                "'in' takes a literal tuple or list of numbers or strings",
                right,
                'write e.g. key in ("temp", "hum")',
            )
        values = [e.value for e in right.elts]  # type: ignore[attr-defined]
        strings = [v for v in values if isinstance(v, str)]
        if strings and len(strings) != len(values):
            raise WhereError(
                "'in' list mixes numbers and strings", right, "use only strings or only numbers"
            )
        if strings:
            member = frozenset(strings).__contains__
            a = self.text(left)

            def text_in(b: Batch) -> Value:
                col, bad = a(b)
                if isinstance(col, str):
                    hit = np.full(b.n, member(col))
                else:
                    hit = np.fromiter(map(member, col), bool, b.n)
                return (~hit if negate else hit), bad

            return text_in
        numbers = np.array(values, dtype=np.float64)
        x = self.number(left)

        def number_in(b: Batch) -> Value:
            col, bad = x(b)
            hit = np.isin(col, numbers)
            return full(((~hit if negate else hit), bad), b.n)

        return number_in

    def call(self, node: ast.Call) -> tuple[str, _Node]:
        if not isinstance(node.func, ast.Name):
            raise WhereError(_unsupported(node.func), node.func, _LANGUAGE)
        if node.func.id not in FUNCTIONS:
            raise WhereError(
                f"unknown function {node.func.id!r}",
                node,
                f"functions are {', '.join(FUNCTIONS)}",
            )
        name = node.func.id
        if node.keywords:
            raise WhereError(
                f"{name}() takes no keyword arguments", node.keywords[0].value, f"{name}(x)"
            )
        args = node.args
        arity = {"abs": (1, 1), "isnan": (1, 1), "round": (1, 2), "min": (2, 99), "max": (2, 99)}
        low, high = arity.get(name, (2, 2))
        if not low <= len(args) <= high:
            want = str(low) if low == high else f"{low} to {high}" if high < 99 else f"{low}+"
            raise WhereError(
                f"{name}() takes {want} argument{'' if want == '1' else 's'}, got {len(args)}",
                node,
                _usage(name),
            )
        if name in ("matches", "startswith"):
            pattern = args[1]
            if not isinstance(pattern, ast.Constant) or not isinstance(pattern.value, str):
                raise WhereError(
                    f"{name}()'s second argument must be a string literal", pattern, _usage(name)
                )
            col = self.text(args[0])
            if name == "matches":
                test = re.compile(fnmatch.translate(pattern.value)).match
                return BOOL, lambda b: text_test(test, col(b), b.n)
            prefix = pattern.value
            return BOOL, lambda b: text_test(lambda s: s.startswith(prefix), col(b), b.n)
        if name == "round":
            digits = 0
            if len(args) == 2:
                if not isinstance(args[1], ast.Constant) or type(args[1].value) is not int:
                    raise WhereError(
                        "round()'s digits must be an integer literal", args[1], _usage(name)
                    )
                digits = args[1].value
            x = self.number(args[0])
            return NUM, lambda b: unary(lambda v: np.round(v, digits), x(b))
        xs = [self.number(a) for a in args]
        if name == "abs":
            return NUM, lambda b: unary(np.abs, xs[0](b))
        if name == "isnan":
            return BOOL, lambda b: full(unary(np.isnan, xs[0](b)), b.n)
        reduce = np.minimum if name == "min" else np.maximum
        return NUM, lambda b: reduce_values(reduce, [x(b) for x in xs])

    def boolop(self, node: ast.BoolOp) -> _Node:
        parts = [self.condition(v) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda b: and_all([p(b) for p in parts])
        return lambda b: or_all([p(b) for p in parts])


def _text_fields(tree: ast.AST) -> set[str]:
    """Fields the expression plainly uses as text (so ``device == key`` compares text)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            texty = any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides)
            texty |= any(
                isinstance(s, ast.Tuple | ast.List)
                and any(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in s.elts)
                for s in sides
            )
            if texty:
                out.update(s.id for s in sides if isinstance(s, ast.Name))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("matches", "startswith")
            and node.args
            and isinstance(node.args[0], ast.Name)
        ):
            out.add(node.args[0].id)
    return out


def _usage(name: str) -> str:
    return {
        "abs": "abs(value - 20) >= 2.5",
        "isnan": "not isnan(value)",
        "round": "round(value, 1) == 20.5",
        "min": "min(value, 100) > 3",
        "max": "max(value, 0) > 3",
        "matches": 'matches(device, "pump-*")',
        "startswith": 'startswith(key, "temp")',
    }[name]


def _a(kind: str) -> str:
    return {NUM: "a number", TEXT: "text", BOOL: "a condition", ANY: "anything"}[kind]


def _describe(node: ast.AST) -> str:
    return f"`{ast.unparse(node)}`"


@dataclass(frozen=True)
class Where:
    """A compiled ``where`` expression: ``mask(items)`` says which items it keeps."""

    text: str
    fields: frozenset[str]
    _root: _Node = field(repr=False, compare=False)

    def mask(self, items: list[Any], types: set[type] | None = None) -> tuple[np.ndarray, set[str]]:
        """Which of ``items`` the expression keeps, and the fields some item lacked.

        ``types``: the classes of ``items``, if the caller has them already.
        """
        batch = Batch(items, set(map(type, items)) if types is None else types)
        value, unknown = self._root(batch)
        keep = np.broadcast_to(np.asarray(value, dtype=bool), (batch.n,))
        if unknown is not None:
            keep = keep & ~unknown
        return keep, batch.missing


def compile_where(text: str) -> Where:
    """Parse and check ``text``; raise :class:`WhereError` outside the language."""
    if not text.strip():
        raise WhereError("is empty", None, 'e.g. where="value > 3"')
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        end = len(text.strip())
        column = end if not exc.offset or exc.offset > end else exc.offset  # 0: at the end
        raise WhereError(
            f"not a valid expression ({exc.msg})", column, "check brackets, quotes and operators"
        ) from None
    compiler = _Compiler(tree)
    root = compiler.condition(tree.body)
    return Where(text, frozenset(compiler.fields), root)
