"""A micro-batch's fields as NumPy columns, and three-valued logic over them.

The ``where`` language (:mod:`operators.filter.where`) compiles an expression
into functions over a :class:`Batch`. Each evaluates to a :data:`Value`: the
values (an array with one entry per item, or a scalar for a literal) and a
mask of the items where the result is unknown (a field missing, ``None``, or
of the wrong kind), or None when it is known everywhere. Conditions combine
unknowns as Kleene logic does (:func:`and_all`, :func:`or_all`); an item is
kept only where its condition is known and true.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from functools import cache
from itertools import repeat
from operator import attrgetter
from typing import Any

import numpy as np

__all__ = [
    "MISSING",
    "NUM",
    "TEXT",
    "Batch",
    "Value",
    "and_all",
    "binary",
    "either",
    "full",
    "is_number",
    "kind_of",
    "negate",
    "or_all",
    "reduce_values",
    "same",
    "text_compare",
    "text_test",
    "unary",
]

NUM, TEXT = "number", "text"
"""The kinds of a field's values the language tells apart (besides conditions)."""
MISSING = object()
"""A field an item does not have (its entry in :meth:`Batch.column`)."""

Value = tuple[Any, np.ndarray | None]
"""An evaluated sub-expression: its values (array or scalar) and where it is unknown (or None)."""


class Batch:
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
        self._num: dict[str, Value] = {}
        self._text: dict[str, Value] = {}
        self.missing: set[str] = set()

    def column(self, name: str) -> list[Any]:
        """The values of field ``name``, one per item (``MISSING`` where an item lacks it)."""
        col = self.raw.get(name)
        if col is None:
            try:
                col = list(map(attrgetter(name), self.items))
            except AttributeError:
                col = [getattr(x, name, MISSING) for x in self.items]
                self.missing.add(name)
            self.raw[name] = col
        return col

    def declared(self, name: str) -> str | None:
        """``NUM`` or ``TEXT`` when every record class here declares ``name`` so, else None."""
        kinds = {_declared(t, name) for t in self.types}
        return kinds.pop() if len(kinds) == 1 else None

    def number(self, name: str) -> Value:
        """Field ``name`` as float64, unknown where a value is not a number."""
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

    def text(self, name: str) -> Value:
        """Field ``name`` as strings, unknown (and ``""``) where a value is not text."""
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


def either(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """Unknown where either mask is (None: known everywhere)."""
    if a is None:
        return b
    if b is None:
        return a
    return a | b


# -- evaluation (values are arrays or scalars; unknown masks or None) ----------------------


def unary(fn: Callable[[Any], Any], x: Value) -> Value:
    """``fn`` of the values; unknown where ``x`` is."""
    with np.errstate(all="ignore"):
        return fn(x[0]), x[1]


def binary(fn: Callable[[Any, Any], Any], a: Value, b: Value) -> Value:
    """``fn`` of both values; unknown where either side is."""
    with np.errstate(all="ignore"):
        return fn(a[0], b[0]), either(a[1], b[1])


def reduce_values(fn: Any, xs: list[Value]) -> Value:
    """``fn`` folded over ``xs`` (``min``, ``max``); unknown where any of them is."""
    with np.errstate(all="ignore"):
        out = xs[0][0]
        bad = xs[0][1]
        for v, unk in xs[1:]:
            out = fn(out, v)
            bad = either(bad, unk)
        return out, bad


def full(x: Value, n: int) -> Value:
    """A condition as an array of ``n`` (a comparison of literals is one bool)."""
    value = np.asarray(x[0], dtype=bool)
    return (np.full(n, bool(value)) if value.ndim == 0 else value), x[1]


def text_compare(fn: Callable[[Any, Any], bool], a: Value, b: Value, n: int) -> Value:
    """``fn`` of two texts (a column or a literal each) per item; unknown where either is."""
    left, right = a[0], b[0]
    if isinstance(left, str) and isinstance(right, str):
        return np.full(n, fn(left, right)), None
    lefts = repeat(left, n) if isinstance(left, str) else left
    rights = repeat(right, n) if isinstance(right, str) else right
    return np.fromiter(map(fn, lefts, rights), bool, n), either(a[1], b[1])


def same(fn: Callable[[Any, Any], bool], a: Value, b: Value, n: int) -> Value:
    """``==`` / ``!=`` of two fields of any kind: unknown unless both are numbers or both text."""
    lefts, rights = a[0], b[0]
    kinds = [(kind_of(x), kind_of(y)) for x, y in zip(lefts, rights, strict=True)]
    unknown = np.fromiter((k is None or k != j for k, j in kinds), bool, n)
    return np.fromiter(map(fn, lefts, rights), bool, n) & ~unknown, unknown


def kind_of(x: object) -> str | None:
    """``TEXT``, ``NUM``, or None for anything else (``None``, ``MISSING``)."""
    if type(x) is str:
        return TEXT
    return NUM if is_number(x) else None


def text_test(test: Callable[[str], Any], a: Value, n: int) -> Value:
    """``test`` of each text (``matches``, ``startswith``); unknown where the text is."""
    col, bad = a
    if isinstance(col, str):
        return np.full(n, bool(test(col))), None
    return np.array(list(map(test, col)), dtype=bool), bad


def negate(x: Value) -> Value:
    """``not``: unknown stays unknown."""
    value, unk = x
    return ~value, unk


def and_all(xs: list[Value]) -> Value:
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


def or_all(xs: list[Value]) -> Value:
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
