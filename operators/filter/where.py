"""The ``where`` expression language of :func:`operators.filter.filter_items`.

Parsed with :mod:`ast` against a whitelist (no ``eval``) and compiled into one
function over a micro-batch of items, evaluated with NumPy arrays, one per
field used; see the package documentation for the language.
"""

from __future__ import annotations

import ast
import fnmatch
import math
import operator as _op
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from itertools import repeat
from operator import attrgetter
from typing import Any

import numpy as np

__all__ = ["FUNCTIONS", "Where", "WhereError", "compile_where", "is_number"]

FUNCTIONS = ("abs", "isnan", "matches", "max", "min", "round", "startswith")

_MISSING = object()

# An evaluated sub-expression: its values (array or scalar) and where it is unknown (or None).
_Value = tuple[Any, np.ndarray | None]

NUM, TEXT, BOOL, ANY = "number", "text", "condition", "any"


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


class _Batch:
    """The items of one micro-batch and the columns read from them, each read once.

    ``types`` are the record classes in the batch: a field a dataclass
    declares ``str`` (``float``, ``int``) in every one of them is taken as
    text (a number) without looking at each value.
    """

    __slots__ = ("items", "n", "types", "raw", "_num", "_text", "missing")

    def __init__(self, items: list[Any], types: set[type]) -> None:
        self.items = items
        self.n = len(items)
        self.types = types
        self.raw: dict[str, list[Any]] = {}
        self._num: dict[str, _Value] = {}
        self._text: dict[str, _Value] = {}
        self.missing: set[str] = set()

    def column(self, name: str) -> list[Any]:
        col = self.raw.get(name)
        if col is None:
            try:
                col = list(map(attrgetter(name), self.items))
            except AttributeError:
                col = [getattr(x, name, _MISSING) for x in self.items]
                self.missing.add(name)
            self.raw[name] = col
        return col

    def declared(self, name: str) -> str | None:
        kinds = {_declared(t, name) for t in self.types}
        return kinds.pop() if len(kinds) == 1 else None

    def number(self, name: str) -> _Value:
        got = self._num.get(name)
        if got is None:
            col = self.column(name)
            try:
                arr = np.array(col, np.float64) if self.declared(name) == NUM else np.array(col)
            except (TypeError, ValueError):
                arr = np.array(())
            if arr.dtype.kind in "fiub" and arr.shape == (self.n,):
                got = (arr.astype(np.float64, copy=False), None)
            else:  # text, None or missing among the numbers: unknown there
                bad = np.fromiter((not is_number(x) for x in col), bool, self.n)
                clean = [math.nan if b else x for x, b in zip(col, bad, strict=True)]
                got = (np.array(clean, dtype=np.float64), bad)
            self._num[name] = got
        return got

    def text(self, name: str) -> _Value:
        got = self._text.get(name)
        if got is None:
            col = self.column(name)
            if self.declared(name) == TEXT or set(map(type, col)) == {str}:
                got = (col, None)
            else:
                bad = np.fromiter((type(x) is not str for x in col), bool, self.n)
                got = ([x if type(x) is str else "" for x in col], bad)
            self._text[name] = got
        return got


@cache
def _declared(cls: type, name: str) -> str | None:
    """``NUM`` or ``TEXT`` when dataclass ``cls`` declares ``name`` exactly float/int or str."""
    if not is_dataclass(cls):
        return None
    for f in fields(cls):
        if f.name == name:
            t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            return TEXT if t == "str" else NUM if t in ("float", "int") else None
    return None


def is_number(x: object) -> bool:
    """Whether ``x`` is a number (booleans are 1 and 0)."""
    return isinstance(x, int | float | np.number)


def _either(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return b
    if b is None:
        return a
    return a | b


_Node = Callable[[_Batch], _Value]


class _Compiler:
    """Turns a checked expression into one function over a :class:`_Batch`."""

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
            return BOOL, lambda b: _not(inner(b))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = self.number(node.operand)
            return NUM, lambda b: _unary(np.negative, inner(b))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            fn = _BINOPS[type(node.op)]
            left, right = self.number(node.left), self.number(node.right)
            return NUM, lambda b: _binary(fn, left(b), right(b))
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
        return lambda b: _and_all([p(b) for p in parts])

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
            return lambda b: _same(fn, a(b), b_(b), b.n)
        kind = self.operand_kind(left, right)
        a, b_ = self.typed(left, kind), self.typed(right, kind)
        if kind == NUM:
            return lambda b: _full(_binary(fn, a(b), b_(b)), b.n)
        return lambda b: _text_compare(fn, a(b), b_(b), b.n)

    def is_none(self, node: ast.Name, *, negate: bool) -> _Node:
        name = node.id
        if name.startswith("_") or name in FUNCTIONS:
            self.name(node, ANY)  # raises
        self.fields.add(name)

        def none(b: _Batch) -> _Value:
            col = b.column(name)
            got = np.fromiter((x is None or x is _MISSING for x in col), bool, b.n)
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

            def text_in(b: _Batch) -> _Value:
                col, bad = a(b)
                if isinstance(col, str):
                    hit = np.full(b.n, member(col))
                else:
                    hit = np.fromiter(map(member, col), bool, b.n)
                return (~hit if negate else hit), bad

            return text_in
        numbers = np.array(values, dtype=np.float64)
        x = self.number(left)

        def number_in(b: _Batch) -> _Value:
            col, bad = x(b)
            hit = np.isin(col, numbers)
            return _full(((~hit if negate else hit), bad), b.n)

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
                return BOOL, lambda b: _text_test(test, col(b), b.n)
            prefix = pattern.value
            return BOOL, lambda b: _text_test(lambda s: s.startswith(prefix), col(b), b.n)
        if name == "round":
            digits = 0
            if len(args) == 2:
                if not isinstance(args[1], ast.Constant) or type(args[1].value) is not int:
                    raise WhereError(
                        "round()'s digits must be an integer literal", args[1], _usage(name)
                    )
                digits = args[1].value
            x = self.number(args[0])
            return NUM, lambda b: _unary(lambda v: np.round(v, digits), x(b))
        xs = [self.number(a) for a in args]
        if name == "abs":
            return NUM, lambda b: _unary(np.abs, xs[0](b))
        if name == "isnan":
            return BOOL, lambda b: _full(_unary(np.isnan, xs[0](b)), b.n)
        reduce = np.minimum if name == "min" else np.maximum
        return NUM, lambda b: _reduce(reduce, [x(b) for x in xs])

    def boolop(self, node: ast.BoolOp) -> _Node:
        parts = [self.condition(v) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda b: _and_all([p(b) for p in parts])
        return lambda b: _or_all([p(b) for p in parts])


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


# -- vectorised evaluation (values are arrays or scalars; unknown masks or None) --------------


def _unary(fn: Callable[[Any], Any], x: _Value) -> _Value:
    with np.errstate(all="ignore"):
        return fn(x[0]), x[1]


def _binary(fn: Callable[[Any, Any], Any], a: _Value, b: _Value) -> _Value:
    with np.errstate(all="ignore"):
        return fn(a[0], b[0]), _either(a[1], b[1])


def _reduce(fn: Any, xs: list[_Value]) -> _Value:
    with np.errstate(all="ignore"):
        out = xs[0][0]
        bad = xs[0][1]
        for v, unk in xs[1:]:
            out = fn(out, v)
            bad = _either(bad, unk)
        return out, bad


def _full(x: _Value, n: int) -> _Value:
    """A condition as an array of ``n`` (a comparison of literals is one bool)."""
    value = np.asarray(x[0], dtype=bool)
    return (np.full(n, bool(value)) if value.ndim == 0 else value), x[1]


def _text_compare(fn: Callable[[Any, Any], bool], a: _Value, b: _Value, n: int) -> _Value:
    left, right = a[0], b[0]
    if isinstance(left, str) and isinstance(right, str):
        return np.full(n, fn(left, right)), None
    lefts = repeat(left, n) if isinstance(left, str) else left
    rights = repeat(right, n) if isinstance(right, str) else right
    return np.fromiter(map(fn, lefts, rights), bool, n), _either(a[1], b[1])


def _same(fn: Callable[[Any, Any], bool], a: _Value, b: _Value, n: int) -> _Value:
    """``==`` / ``!=`` of two fields of any kind: unknown unless both are numbers or both text."""
    lefts, rights = a[0], b[0]
    kinds = [(_kind(x), _kind(y)) for x, y in zip(lefts, rights, strict=True)]
    unknown = np.fromiter((k is None or k != j for k, j in kinds), bool, n)
    return np.fromiter(map(fn, lefts, rights), bool, n) & ~unknown, unknown


def _kind(x: object) -> str | None:
    if type(x) is str:
        return TEXT
    return NUM if is_number(x) else None


def _text_test(test: Callable[[str], Any], a: _Value, n: int) -> _Value:
    col, bad = a
    if isinstance(col, str):
        return np.full(n, bool(test(col))), None
    return np.array(list(map(test, col)), dtype=bool), bad


def _not(x: _Value) -> _Value:
    value, unk = x
    return ~value, unk


def _and_all(xs: list[_Value]) -> _Value:
    """Kleene ``and``: false where any side is known false, unknown where not and any is unknown."""
    value = xs[0][0]
    for v, _ in xs[1:]:
        value = value & v
    unks = [u for _, u in xs if u is not None]
    if not unks:
        return value, None
    known_false = np.zeros(len(value), bool)
    unknown = np.zeros(len(value), bool)
    for v, u in xs:
        if u is None:
            known_false |= ~v
        else:
            known_false |= ~v & ~u
            unknown |= u
    return value & ~unknown, unknown & ~known_false


def _or_all(xs: list[_Value]) -> _Value:
    """Kleene ``or``: true where any side is known true, unknown where not and any is unknown."""
    unks = [u for _, u in xs if u is not None]
    true = np.zeros(len(xs[0][0]), bool)
    for v, u in xs:
        true |= v if u is None else v & ~u
    if not unks:
        return true, None
    unknown = np.zeros(len(true), bool)
    for u in unks:
        unknown |= u
    return true, unknown & ~true


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
        batch = _Batch(items, set(map(type, items)) if types is None else types)
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
