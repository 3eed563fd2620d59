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

from operators.filter.operator import REASONS, Dropped, FilterConfig, FilterOut, filter_items
from operators.filter.where import FUNCTIONS, Where, WhereError, compile_where

__all__ = [
    "FUNCTIONS",
    "REASONS",
    "Dropped",
    "FilterConfig",
    "FilterOut",
    "Where",
    "WhereError",
    "compile_where",
    "filter_items",
]
