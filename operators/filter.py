"""Keep or drop items by device, key, value range and a safe expression.

:func:`filter_items` tests each item of a stream, in this order, and drops it
at the first test it fails, with that test as the reason:

1. ``device`` -- ``devices``: the item's ``device`` matches one of these
   names or shell patterns (``"pump-*"``, ``"line-[12]-*"``; case-sensitive).
2. ``key`` -- ``keys``: the item's ``key`` matches one of these.
3. ``range`` -- ``min_value`` / ``max_value``: ``min_value <= value <=
   max_value`` (inclusive); NaN, text and a missing ``value`` are outside
   any range.
4. ``where`` -- an expression over the item's fields, e.g.
   ``value > 3 and key in ("temp", "hum")``.

Items are any records with attributes (``Reading``, vibration ``Features``,
window ``Summary``, ``LogLine``...), keyed or not. An
:class:`~operators.records.Evict` always passes untouched, in order, so a
filter can sit between ``Devices.series`` and a stateful operator.

The expression language
-----------------------
Parsed with :mod:`ast` and checked against a whitelist when the flow is
built; never run by ``eval``. It has

- field names (the item's attributes: ``value``, ``device``, ``key``,
  ``velocity_rms_mm_s``...), number, string, ``True``/``False`` literals;
- comparisons ``== != < <= > >=``, chained ones (``2 < value <= 8``),
  ``in`` / ``not in`` a literal tuple or list (``key in ("temp", "hum")``),
  ``field == None`` / ``field != None``;
- ``and``, ``or``, ``not``; arithmetic ``+ - * / %`` and unary ``-``;
- functions ``abs(x)``, ``min(x, y, ...)``, ``max(x, y, ...)``,
  ``round(x[, digits])`` (half to even), ``isnan(x)``,
  ``matches(field, "glob*")`` (shell pattern) and ``startswith(field, "prefix")``.

A field is a number or text by how the expression uses it (compared with a
number or in arithmetic: a number; compared with a string, ``in`` strings,
``matches``: text); using one field both ways is a build-time error. Division
by zero gives IEEE infinities or NaN, NaN compares false (``!=`` true).

Missing values follow SQL's NULL rules: where an item has no such field,
the field is ``None``, or it holds text where a number is needed (or the
reverse), the comparison is *unknown*; ``unknown or True`` is true,
``unknown and False`` is false, ``not unknown`` is unknown, and an item
whose expression ends unknown is dropped (reason ``where``). Records are not
typed in a Bytewax stream, so a field name is checked against the items only
when they arrive: a misspelt field drops every item (reason ``where``) and
is logged once per step and record type, naming the field.

Why NumPy over micro-batches (measured)
--------------------------------------
Each micro-batch is evaluated at once: the fields the expression uses are
read into one array each (``map(attrgetter(...))``, a C loop), the
expression runs as a few NumPy operations over the arrays whatever its
size, and the kept items are picked by the mask (``itertools.compress``).
``benchmarks/bench_filter.py`` runs this, a hand-written per-item Python
predicate (``op.filter``, and ``op.branch`` with the dropped items sent to a
sink) and DuckDB SQL over an Arrow table of each batch, on the same seeded
readings in one run. Measured on 100,000 readings (CPU time, best of 3):

- DuckDB is 2.4-2.6x slower at source batches of 1,000 and 15-17x slower at
  100: each batch pays a fixed cost (Arrow table, registering it, planning
  the query, fetching the result) that a micro-batch never earns back.
- With nothing to drop (``value > -1000``) the operator runs at 1.1x the
  speed of ``op.branch`` and 1.4x ``op.filter`` with a hand-written lambda:
  the vectorised expression costs no more than compiled Python bytecode.
  A text expression could only be run per item by an interpreter of its
  own (``eval`` of user text is ruled out): a Python call per node and item.
- With half the items dropped the operator runs at 0.4-0.6x of a bare
  ``op.filter`` / ``op.branch``: the difference is the dropped items
  themselves, each a ``Dropped`` record on a second stream so it can be
  counted per reason, where ``op.filter`` discards them uncounted.
"""

from __future__ import annotations

import ast
import fnmatch
import logging
import math
import operator as _op
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache, partial
from itertools import compress, repeat
from operator import attrgetter, itemgetter
from typing import Any, NamedTuple

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import Stream, operator

from operators.records import Evict

__all__ = ["REASONS", "Dropped", "FilterConfig", "FilterOut", "compile_where", "filter_items"]

log = logging.getLogger("edgesieve.filter")

REASONS = ("device", "key", "range", "where")
"""Why an item was dropped: the first test it failed."""

FUNCTIONS = ("abs", "isnan", "matches", "max", "min", "round", "startswith")

_MISSING = object()

# An evaluated sub-expression: its values (array or scalar) and where it is unknown (or None).
_Value = tuple[Any, np.ndarray | None]

NUM, TEXT, BOOL, ANY = "number", "text", "condition", "any"


class Dropped(NamedTuple):
    """An item a filter dropped: the filter's ``step_id``, the ``reason`` and the item itself.

    ``reason`` is one of :data:`REASONS`; ``detail`` says more when there is
    more to say (a field the item does not have). Immutable; a named tuple
    rather than a dataclass because one is made per dropped item and a tuple
    is made without running Python code (see :func:`_new_dropped`).
    """

    step_id: str
    reason: str
    item: Any
    detail: str = ""


_new_dropped = partial(tuple.__new__, Dropped)
"""``Dropped`` from a 4-tuple, in C: what ``map`` calls once per dropped item."""


@dataclass(frozen=True)
class FilterOut:
    """Streams returned from :func:`filter_items`.

    ``kept``: the items that passed (and every ``Evict``), with their keys, in
    order. ``dropped``: ``(key, Dropped)`` for the others; unkeyed items are
    keyed by their ``device``. Count them with ``Edge.count_dropped``.
    """

    kept: Stream[Any]
    dropped: Stream[tuple[str, Dropped]]


# -- the expression language ------------------------------------------------------------------


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
                bad = np.fromiter((not _is_number(x) for x in col), bool, self.n)
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


def _is_number(x: object) -> bool:
    return isinstance(x, int | float | np.number)  # booleans are 1 and 0


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
    return NUM if _is_number(x) else None


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


# -- settings ---------------------------------------------------------------------------------


def _patterns(name: str, got: object, hint: str) -> tuple[str, ...] | None:
    if got is None:
        return None
    items = (got,) if isinstance(got, str) else got
    if not isinstance(items, Iterable) or isinstance(items, bytes | dict):
        msg = f"filter: {name} must be a list of names or patterns, got {got!r}; hint: {hint}"
        raise TypeError(msg)
    items = tuple(items)
    for one in items:
        if not isinstance(one, str) or not one:
            msg = (
                f"filter: {name} must hold non-empty strings, got {one!r} in {got!r}; hint: {hint}"
            )
            raise TypeError(msg)
    if not items:
        msg = f"filter: {name} is empty, which would drop everything; hint: {hint}"
        raise ValueError(msg)
    return items


def _bound(name: str, got: object) -> float | None:
    if got is None:
        return None
    if isinstance(got, bool) or not isinstance(got, int | float):
        msg = (
            f"filter: {name} must be a number, got {got!r} ({type(got).__name__}); "
            f"hint: {name}=0.5, or leave it unset for no bound"
        )
        raise TypeError(msg)
    if math.isnan(got):
        msg = f"filter: {name} is NaN; hint: give a number, or leave it unset for no bound"
        raise ValueError(msg)
    return float(got)


class _Matcher:
    """Names and shell patterns: exact names by set lookup, patterns by one regex."""

    __slots__ = ("exact", "regex")

    def __init__(self, patterns: Sequence[str]) -> None:
        exact = [p for p in patterns if not any(c in p for c in "*?[")]
        globs = [fnmatch.translate(p) for p in patterns if p not in exact]
        self.exact = frozenset(exact).__contains__
        self.regex = re.compile("|".join(f"(?:{g})" for g in globs)).match if globs else None

    def mask(self, names: list[Any], n: int) -> np.ndarray:
        names = [x if type(x) is str else "\0" for x in names]
        hit = np.fromiter(map(self.exact, names), bool, n)
        if self.regex is not None:
            hit |= np.array(list(map(self.regex, names)), dtype=bool)
        return hit


@dataclass(frozen=True)
class FilterConfig:
    """Settings of :func:`filter_items`, checked when the flow is built.

    :arg devices: Keep items whose ``device`` matches one of these names or
        shell patterns (``"pump-*"``). A single string is one pattern.
    :arg keys: Keep items whose ``key`` matches one of these names or patterns.
    :arg min_value: Keep items with ``value >= min_value``.
    :arg max_value: Keep items with ``value <= max_value``.
    :arg where: Keep items for which this expression is true (see the module
        documentation for the language).

    At least one must be set; an item must pass every one that is.
    """

    devices: Sequence[str] | str | None = None
    keys: Sequence[str] | str | None = None
    min_value: float | None = None
    max_value: float | None = None
    where: str | None = None
    compiled: Where | None = field(default=None, init=False, repr=False, compare=False)
    _devices: _Matcher | None = field(default=None, init=False, repr=False, compare=False)
    _keys: _Matcher | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if all(
            getattr(self, f) is None for f in ("devices", "keys", "min_value", "max_value", "where")
        ):
            msg = (
                "filter: needs at least one of devices, keys, min_value, max_value, where; "
                'got none; hint: e.g. where="value > 3" or devices=["pump-*"]'
            )
            raise ValueError(msg)
        set_ = object.__setattr__
        set_(self, "devices", _patterns("devices", self.devices, 'devices=["pump-*", "fan-2"]'))
        set_(self, "keys", _patterns("keys", self.keys, 'keys=["temp", "hum*"]'))
        low, high = _bound("min_value", self.min_value), _bound("max_value", self.max_value)
        if low is not None and high is not None and low > high:
            msg = (
                f"filter: min_value {low:g} is above max_value {high:g}, which would drop "
                "everything; hint: swap them"
            )
            raise ValueError(msg)
        set_(self, "min_value", low)
        set_(self, "max_value", high)
        if self.where is not None:
            if not isinstance(self.where, str):
                msg = (
                    f"filter: where must be an expression string, got {self.where!r} "
                    f'({type(self.where).__name__}); hint: where="value > 3"'
                )
                raise TypeError(msg)
            try:
                set_(self, "compiled", compile_where(self.where))
            except WhereError as exc:
                if exc.column is None:
                    msg = f"filter: where: {exc.what}; hint: {exc.hint}"
                else:
                    msg = f"filter: where: {exc.render(self.where.strip())}"
                raise ValueError(msg) from None
        match = _Matcher(self.devices) if self.devices is not None else None
        set_(self, "_devices", match)
        set_(self, "_keys", _Matcher(self.keys) if self.keys is not None else None)

    def split(self, step_id: str, batch: list[Any]) -> tuple[list[Any], list[Any]]:
        """``(kept, dropped)`` of one batch, each in input order."""
        if not batch:
            return [], []
        keyed = type(batch[0]) is tuple
        values = list(map(_second, batch)) if keyed else batch
        n = len(values)
        evict = None
        types = set(map(type, values))
        if Evict in types:
            evict = np.fromiter((type(v) is Evict for v in values), bool, n)
            types.discard(Evict)
        reason = np.zeros(n, np.int8)  # 0 kept, else 1 + index in REASONS
        missing: set[str] = set()
        records = values
        if self._devices is not None:
            hit = self._devices.mask([getattr(v, "device", None) for v in values], n)
            reason[~hit] = 1
        if self._keys is not None:
            hit = self._keys.mask([getattr(v, "key", None) for v in values], n)
            reason[(reason == 0) & ~hit] = 2
        if self.min_value is not None or self.max_value is not None:
            got = [getattr(v, "value", None) for v in values]
            if set(map(type, got)) <= {float, int}:
                x = np.array(got, dtype=np.float64)
            else:
                x = np.array([v if _is_number(v) else math.nan for v in got], dtype=np.float64)
            inside = ~np.isnan(x)
            if self.min_value is not None:
                inside &= x >= self.min_value
            if self.max_value is not None:
                inside &= x <= self.max_value
            reason[(reason == 0) & ~inside] = 3
        if self.compiled is not None:
            if evict is not None:  # evictions pass: the expression is not about them
                records = list(compress(values, (~evict).tolist()))
            hit, missing = self.compiled.mask(records, types)
            if evict is not None:
                hit = _scatter(hit, ~evict)
            reason[(reason == 0) & ~hit] = 4
        if evict is not None:
            reason[evict] = 0
        gone = reason != 0
        if not gone.any():
            return batch, []
        kept = list(compress(batch, (~gone).tolist()))
        selected = gone.tolist()
        codes = reason[gone].tolist()
        items = list(compress(values, selected))
        if keyed:
            keys: Iterable[str] = compress(map(_first, batch), selected)
        else:
            keys = (str(getattr(item, "device", "") or "") for item in items)
        if missing:
            detail = _missing_detail(step_id, records, missing)
            details: Iterable[str] = (detail if code == 4 else "" for code in codes)
        else:
            details = repeat("")
        why = map(_REASON_OF.__getitem__, codes)
        dropped = map(_new_dropped, zip(repeat(step_id), why, items, details))
        return kept, list(zip(keys, dropped, strict=True))


_first, _second = itemgetter(0), itemgetter(1)
_REASON_OF = dict(enumerate(REASONS, start=1))


_warned: set[tuple[str, str, str]] = set()


def _scatter(hit: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``hit`` at the positions ``where`` is true, true elsewhere."""
    out = np.ones(len(where), bool)
    out[where] = hit
    return out


def _missing_detail(step_id: str, records: list[Any], missing: set[str]) -> str:
    names = ", ".join(sorted(missing))
    for name in sorted(missing):
        for kind in sorted({type(x).__name__ for x in records if not hasattr(x, name)}):
            if (step_id, kind, name) not in _warned:
                _warned.add((step_id, kind, name))
                log.warning(
                    "filter %r: some %s items have no field %r; the expression is unknown "
                    "for them and they are dropped (reason where)",
                    step_id,
                    kind,
                    name,
                )
    return f"no field {names} on some items"


# -- the operator -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Split:
    kept: list[Any]
    dropped: list[Any]


def _kept(splits: list[_Split]) -> list[Any]:
    if len(splits) == 1:
        return splits[0].kept
    return [x for s in splits for x in s.kept]


def _dropped(splits: list[_Split]) -> list[Any]:
    if len(splits) == 1:
        return splits[0].dropped
    return [x for s in splits for x in s.dropped]


@operator
def filter_items(
    step_id: str,
    up: Stream[Any],
    *,
    devices: Sequence[str] | str | None = None,
    keys: Sequence[str] | str | None = None,
    min_value: float | None = None,
    max_value: float | None = None,
    where: str | None = None,
) -> FilterOut:
    """Keep the items of ``up`` that pass every configured test; the rest go to ``dropped``.

    ``up`` is keyed or not; ``kept`` keeps each item's key and the input
    order, ``dropped`` yields ``(key, Dropped(step_id, reason, item))`` with
    the first test the item failed (``device``, ``key``, ``range``,
    ``where``). See :class:`FilterConfig` for the settings and the module
    documentation for the expression language. Stateless: the tests run a
    micro-batch at a time, vectorised with NumPy.

    Errors in the settings are raised here, when the flow is built, prefixed
    with the step id: ``filter 'hot': where: ...``.
    """
    name = step_id.rsplit(".", 1)[-1]  # the step's own id, without its dataflow's path
    try:
        config = FilterConfig(
            devices=devices, keys=keys, min_value=min_value, max_value=max_value, where=where
        )
    except (TypeError, ValueError) as exc:
        msg = str(exc).replace("filter:", f"filter {name!r}:", 1)
        raise type(exc)(msg) from None

    def split(batch: list[Any]) -> list[_Split]:
        kept, dropped = config.split(name, batch)
        return [_Split(kept, dropped)]

    splits = op.flat_map_batch("split", up, split)
    return FilterOut(
        op.flat_map_batch("kept", splits, _kept), op.flat_map_batch("dropped", splits, _dropped)
    )
