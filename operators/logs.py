"""Device logs: every important line as an event, everything else counted by template.

:func:`logs` takes log lines keyed by device and gives three streams:

- ``events``: every line at or above ``level`` (default ``warning``), as a
  :class:`LogEvent` with its template. Never dropped, never rate-limited,
  late or not.
- ``summary``: every line (all levels) counted per device, per event-time
  window and per *template*, as :class:`LogSummary` rows. The template is the
  message with its variable parts (numbers, hex ids, UUIDs, IP addresses,
  quoted strings, paths or names holding digits...) replaced by ``<*>`` (see
  :func:`template`), so ``disk sda1 at 91%`` and ``disk sdb2 at 97%`` count as
  one. ``max_templates`` bounds the rows of one device and window: the lines
  of templates beyond it are counted in one row with template ``<other>``, so
  a device logging endless distinct messages costs bounded state and uplink.
- ``late``: lines older than their device's newest timestamp minus
  ``allowed_lateness``, below ``level``; they are not counted (a late line at
  or above ``level`` still goes to ``events``, and nowhere else).

Event time is per device, as in :mod:`operators.windows`: lateness and the
closing of windows follow the device's newest line timestamp, in arrival
order, so a replay makes the same decisions; a window closes when its end is
at or before ``newest - allowed_lateness``. A device gone quiet has its open
windows flushed after ``end - newest + allowed_lateness`` of wall-clock
silence, and every open window is flushed at end of input (a clean stop); a
flushed window that counts more lines later is emitted again when it closes.
For each ``(device, template, window_start)`` the row with the highest
``count`` is the final one. Each device's newest timestamp and open windows
are part of the Bytewax recovery snapshot.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import operator
from bytewax.operators import KeyedStream, StatefulBatchLogic

from operators.quiet_flush import QuietFlush, wall_clock
from operators.records import LEVELS, LogLine

__all__ = [
    "MAX_EXAMPLE_CHARS",
    "MAX_TEMPLATE_CHARS",
    "OTHER",
    "LogEvent",
    "LogSummary",
    "LogsConfig",
    "LogsOut",
    "logs",
    "template",
]

OTHER = "<other>"
"""Template of the row counting a window's lines beyond ``max_templates`` templates."""
MAX_TEMPLATE_CHARS = 256
"""Longest template kept; a longer one is cut and ends with ``…``."""
MAX_EXAMPLE_CHARS = 512
"""Longest example message kept in a summary row; a longer one is cut and ends with ``…``."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ZERO = timedelta(0)
_RANK = {level: rank for rank, level in enumerate(LEVELS)}
_ENDS = r"\s\"'=:,;()\[\]{}<>"
"""What ends a token (a class body): whitespace, quotes and ``= : , ; ( ) [ ] { } < >``."""
_VARIABLE = re.compile(
    r'"[^"]*"'  # a double-quoted string
    r"|(?<![\w'])'[^']*'"  # a single-quoted one (not the apostrophe of "can't")
    r"|(?<![\w:])[0-9a-fA-F]{0,4}(?::[0-9a-fA-F]{0,4}){2,7}(?![\w:])"  # MAC, IPv6, 08:26:40
    r"|\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
    rf"|(?<![^{_ENDS}])[^{_ENDS}]*\d[^{_ENDS}]*"  # a token holding a digit, from its start
)
_CACHE_SIZE = 4096


def template(msg: str) -> str:
    """``msg`` with its variable parts replaced by ``<*>``; stable when only they change.

    A double- or single-quoted string, a token holding a digit (numbers,
    ``0x1f``, ``sda1``, ``10.0.0.7``, ``/var/log/app.3``, UUIDs, versions),
    and colon-separated hex groups (MAC and IPv6 addresses) are variable. Tokens
    end at whitespace, quotes, ``= : , ; ( ) [ ] { } < >``. At most
    :data:`MAX_TEMPLATE_CHARS` characters are kept.
    """
    out = _VARIABLE.sub("<*>", msg)
    if len(out) > MAX_TEMPLATE_CHARS:
        out = out[: MAX_TEMPLATE_CHARS - 1] + "…"
    return out


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


@dataclass(frozen=True)
class LogsConfig:
    """Settings of :func:`logs`, checked when the flow is built.

    :arg level: Lines at or above it go to ``events``: one of ``trace debug
        info notice warning error critical``.
    :arg window: Length of the tumbling event-time windows of the summary (``> 0``).
    :arg max_templates: Summary rows per device and window (``>= 1``); lines
        of further templates are counted in one ``<other>`` row.
    :arg allowed_lateness: How far behind its device's newest line a line may
        be and still be counted (``>= 0``).
    """

    level: str = "warning"
    window: timedelta = timedelta(minutes=1)
    max_templates: int = 100
    allowed_lateness: timedelta = timedelta(seconds=10)

    def __post_init__(self) -> None:
        if self.level not in _RANK:
            msg = (
                f"logs `level` must be one of {', '.join(LEVELS)}; got {_describe(self.level)}. "
                'Hint: level="warning" sends warnings, errors and critical lines as events.'
            )
            raise ValueError(msg)
        for name in ("window", "allowed_lateness"):
            value = getattr(self, name)
            if not isinstance(value, timedelta):
                msg = (
                    f"logs `{name}` must be a datetime.timedelta; got {_describe(value)}. "
                    f"Hint: {name}=timedelta(seconds=60)."
                )
                raise TypeError(msg)
        if self.window <= _ZERO:
            msg = (
                f"logs `window` must be longer than zero; got {self.window!r}. "
                "Hint: window=timedelta(seconds=60)."
            )
            raise ValueError(msg)
        if self.allowed_lateness < _ZERO:
            msg = (
                f"logs `allowed_lateness` must be >= 0; got {self.allowed_lateness!r}. "
                "Hint: timedelta(0) counts no line older than its device's newest one."
            )
            raise ValueError(msg)
        count = self.max_templates
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            msg = (
                f"logs `max_templates` must be an int >= 1; got {_describe(count)}. "
                "Hint: max_templates=100 summary rows per device and window."
            )
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class LogEvent:
    """A line at or above the events level (the ``log_events`` row)."""

    device: str
    ts: datetime
    level: str
    msg: str
    template: str
    transport: str
    fields: str | None


@dataclass(frozen=True, slots=True)
class LogSummary:
    """Lines of one template of one device in one window (the ``log_summary`` row).

    ``level`` is the most severe level among them, ``first_ts`` / ``last_ts``
    their earliest and latest timestamps, ``example`` the message of the first
    one that arrived (at most :data:`MAX_EXAMPLE_CHARS` characters).
    """

    device: str
    template: str
    level: str
    window_start: datetime
    window_end: datetime
    count: int
    first_ts: datetime
    last_ts: datetime
    example: str


@dataclass(frozen=True)
class LogsOut:
    """Streams returned from :func:`logs`, all keyed by device."""

    events: KeyedStream[LogEvent]
    summary: KeyedStream[LogSummary]
    late: KeyedStream[LogLine]


_Entry = list[Any]
"""One summary row being counted: ``[count, level rank, first_ts, last_ts, example, count
when last emitted]``."""
_State = tuple[
    str, datetime | None, dict[int, dict[str, tuple[int, int, datetime, datetime, str, int]]]
]
"""Snapshot of one device: ``(device, newest ts, {window id: {template: entry}})``."""
_Out = tuple[str, object]
"""``("event", LogEvent)``, ``("row", LogSummary)`` or ``("late", LogLine)``."""


class _DeviceLogs(QuietFlush[LogLine, _Out, _State]):
    """One device's event time and open windows (see the module docstring)."""

    __slots__ = (
        "config",
        "device",
        "newest",
        "now",
        "quiet_since",
        "span",
        "templates",
        "threshold",
        "windows",
    )

    def __init__(
        self,
        config: LogsConfig,
        templates: Callable[[str], str],
        resume_state: _State | None,
        now: Callable[[], datetime] = wall_clock,
    ) -> None:
        self.config = config
        self.templates = templates
        self.threshold = _RANK[config.level]
        self.now = now
        self.newest: datetime | None = None
        self.windows: dict[int, dict[str, _Entry]] = {}
        self.device = ""
        self.span = (0, _EPOCH, _EPOCH)  # (window id, start, end) of the last line's window
        if resume_state is not None:
            self.device, self.newest, windows = resume_state
            self.windows = {w: {t: list(e) for t, e in rows.items()} for w, rows in windows.items()}
        self.quiet_since = now()

    def on_batch(self, values: list[LogLine]) -> tuple[list[_Out], bool]:
        out: list[_Out] = []
        config = self.config
        lateness = config.allowed_lateness
        threshold = self.threshold
        limit = config.max_templates
        templates = self.templates
        windows = self.windows
        newest = self.newest
        cutoff = None if newest is None else _minus(newest, lateness)
        window_id, start, end = self.span
        rows: dict[str, _Entry] | None = windows.get(window_id)
        for line in values:
            ts = line.ts
            rank = _RANK[line.level]
            shape = templates(line.msg)
            if rank >= threshold:
                out.append(
                    (
                        "event",
                        LogEvent(
                            line.device,
                            ts,
                            line.level,
                            line.msg,
                            shape,
                            line.transport,
                            line.fields,
                        ),
                    )
                )
            if newest is None or ts > newest:
                newest = ts
                cutoff = _minus(ts, lateness)
            elif cutoff is not None and ts < cutoff:
                if rank < threshold:
                    out.append(("late", line))
                continue
            if not start <= ts < end or rows is None:
                try:
                    window_id = (ts - _EPOCH) // config.window
                    start = _EPOCH + config.window * window_id
                    end = start + config.window
                except OverflowError:  # a window ending past datetime.max: cannot be counted
                    if rank < threshold:
                        out.append(("late", line))
                    rows = None
                    continue
                rows = windows.get(window_id)
                if rows is None:
                    rows = windows[window_id] = {}
            entry = rows.get(shape)
            if entry is None:
                if len(rows) >= limit + (OTHER in rows) and shape != OTHER:
                    shape = OTHER
                    entry = rows.get(OTHER)
                if entry is None:
                    example = line.msg
                    if len(example) > MAX_EXAMPLE_CHARS:
                        example = example[: MAX_EXAMPLE_CHARS - 1] + "…"
                    rows[shape] = [1, rank, ts, ts, example, 0]
                    continue
            entry[0] += 1
            if rank > entry[1]:
                entry[1] = rank
            if ts < entry[2]:
                entry[2] = ts
            elif ts > entry[3]:
                entry[3] = ts
        if values:
            self.device = values[0].device
        self.span = (window_id, start, end)
        self.newest = newest
        self.quiet_since = self.now()
        if cutoff is not None:
            for closing in sorted(w for w in windows if self._end(w) <= cutoff):
                self._emit(closing, out)
                del windows[closing]
        return out, StatefulBatchLogic.RETAIN

    def _end(self, window_id: int) -> datetime:
        return _EPOCH + self.config.window * (window_id + 1)

    def _emit(self, window_id: int, out: list[_Out]) -> None:
        """Emit the rows of ``window_id`` that counted lines since they were last emitted."""
        window = self.config.window
        start = _EPOCH + window * window_id
        end = start + window
        for shape, entry in self.windows[window_id].items():
            count, rank, first_ts, last_ts, example, emitted = entry
            if count > emitted:
                row = LogSummary(
                    self.device, shape, LEVELS[rank], start, end, count, first_ts, last_ts, example
                )
                out.append(("row", row))
                entry[5] = count

    def _due(self) -> list[int]:
        """Open windows with rows not emitted yet, oldest first."""
        return sorted(
            w for w, rows in self.windows.items() if any(e[0] > e[5] for e in rows.values())
        )

    def snapshot(self) -> _State:
        """The device's event time and open windows (with what each row last emitted)."""
        return (
            self.device,
            self.newest,
            {w: {t: tuple(e) for t, e in rows.items()} for w, rows in self.windows.items()},
        )  # type: ignore[return-value]


def _minus(ts: datetime, delta: timedelta) -> datetime | None:
    """``ts - delta``, or ``None`` (nothing is late) below ``datetime.min``."""
    try:
        return ts - delta
    except OverflowError:
        return None


def _cached(fn: Callable[[str], str]) -> Callable[[str], str]:
    """``fn`` with a bounded memo: devices repeat their messages word for word."""
    memo: dict[str, str] = {}

    def lookup(msg: str) -> str:
        found = memo.get(msg)
        if found is None:
            if len(memo) >= _CACHE_SIZE:
                memo.clear()
            found = memo[msg] = fn(msg)
        return found

    return lookup


@operator
def logs(
    step_id: str,
    up: KeyedStream[LogLine],
    *,
    level: str = LogsConfig.level,
    window: timedelta = LogsConfig.window,
    max_templates: int = LogsConfig.max_templates,
    allowed_lateness: timedelta = LogsConfig.allowed_lateness,
) -> LogsOut:
    """Pass on the important log lines; count all of them by template per window.

    See the module docstring for the rules. Every setting defaults to the
    :class:`LogsConfig` default.

    :arg step_id: Unique ID.
    :arg up: Log lines keyed by device (``Devices.logs``).
    :arg level: Lines at or above it go to ``events``.
    :arg window: Length of the summary's tumbling event-time windows.
    :arg max_templates: Summary rows per device and window before ``<other>``.
    :arg allowed_lateness: How far behind its device's newest line a line may be
        and still be counted.
    :returns: ``events``, ``summary`` and ``late``, keyed by device.
    :raises ValueError: When a setting is out of range (while the flow is built).
    :raises TypeError: When a duration is not a ``timedelta``.
    """
    config = LogsConfig(
        level=level, window=window, max_templates=max_templates, allowed_lateness=allowed_lateness
    )
    shapes = _cached(template)

    def build(resume_state: _State | None) -> _DeviceLogs:
        return _DeviceLogs(config, shapes, resume_state)

    tagged = op.stateful_batch("logs", up, build)

    def pick(tag: str) -> Callable[[_Out], object | None]:
        return lambda item: item[1] if item[0] == tag else None

    return LogsOut(
        events=op.filter_map_value("events", tagged, pick("event")),  # type: ignore[arg-type]
        summary=op.filter_map_value("summary", tagged, pick("row")),  # type: ignore[arg-type]
        late=op.filter_map_value("late", tagged, pick("late")),  # type: ignore[arg-type]
    )
