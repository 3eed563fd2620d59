"""The ``filter_items`` operator and its settings (see the package documentation)."""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import compress, repeat
from operator import itemgetter
from typing import Any, NamedTuple

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import Stream, operator

from operators.filter.where import Where, WhereError, compile_where, is_number
from operators.records import Evict

__all__ = ["REASONS", "Dropped", "FilterConfig", "FilterOut", "filter_items"]

log = logging.getLogger("edgesieve.filter")

REASONS = ("device", "key", "range", "where")
"""Why an item was dropped: the first test it failed."""


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
                x = np.array([v if is_number(v) else math.nan for v in got], dtype=np.float64)
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
