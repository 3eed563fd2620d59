"""The settings of :func:`operators.windows.window_aggregate` and the window arithmetic.

:class:`WindowConfig` checks the settings when the flow is built (each error
names the setting, what it got and a hint) and numbers windows as Bytewax's
sliding windower does: window ``i`` starts at ``align_to + i * step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = ["EPOCH", "WindowConfig"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
"""The default ``align_to``: windows start at whole multiples of their step since 1970."""
_ZERO = timedelta(0)


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


@dataclass(frozen=True)
class WindowConfig:
    """Settings of :func:`window_aggregate`, checked when the flow is built.

    :arg length: Window length (``> 0``).
    :arg slide: Distance between the starts of adjacent windows, ``0 < slide
        <= length``; ``None`` means tumbling windows (``slide = length``).
    :arg allowed_lateness: How far behind its key's newest timestamp a reading
        may be and still be aggregated (``>= 0``). Event time only: how long
        after its timestamp a reading arrives does not matter.
    :arg align_to: An instant that starts a window; timezone-aware UTC.
    """

    length: timedelta
    slide: timedelta | None = None
    allowed_lateness: timedelta = timedelta(seconds=5)
    align_to: datetime = EPOCH

    def __post_init__(self) -> None:
        for name in ("length", "slide", "allowed_lateness"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) and not (name == "slide" and value is None):
                msg = (
                    f"window_aggregate `{name}` must be a datetime.timedelta; got "
                    f"{_describe(value)}. Hint: {name}=timedelta(seconds=10)."
                )
                raise TypeError(msg)
        if self.length <= _ZERO:
            msg = (
                f"window_aggregate `length` must be longer than zero; got {self.length!r}. "
                "Hint: length=timedelta(seconds=10)."
            )
            raise ValueError(msg)
        if self.slide is not None and not _ZERO < self.slide <= self.length:
            msg = (
                f"window_aggregate `slide` must be > 0 and <= `length` ({self.length!r}); "
                f"got {self.slide!r}. Hint: a slide longer than the window would leave "
                "gaps that no window covers; leave slide=None for tumbling windows."
            )
            raise ValueError(msg)
        if self.allowed_lateness < _ZERO:
            msg = (
                f"window_aggregate `allowed_lateness` must be >= 0; got "
                f"{self.allowed_lateness!r}. Hint: timedelta(0) treats any reading older "
                "than the newest one of its series as late."
            )
            raise ValueError(msg)
        if not isinstance(self.align_to, datetime):
            msg = (
                f"window_aggregate `align_to` must be a datetime; got "
                f"{_describe(self.align_to)}. Hint: datetime(1970, 1, 1, tzinfo=UTC)."
            )
            raise TypeError(msg)
        if self.align_to.utcoffset() != _ZERO:
            msg = (
                f"window_aggregate `align_to` must be timezone-aware UTC; got "
                f"{self.align_to.isoformat()} (tzinfo={self.align_to.tzinfo!r}). "
                "Hint: datetime(..., tzinfo=UTC), or .astimezone(UTC) for an aware time."
            )
            raise ValueError(msg)
        object.__setattr__(self, "align_to", self.align_to.astimezone(UTC))

    @property
    def step(self) -> timedelta:
        """Distance between window starts (``slide``, or ``length`` if tumbling)."""
        return self.length if self.slide is None else self.slide

    def bounds(self, window_id: int) -> tuple[datetime, datetime]:
        """``(start, end)`` of a window (the IDs of Bytewax's sliding windower)."""
        start = self.align_to + self.step * window_id
        return start, start + self.length

    def first_window(self, ts: datetime) -> int:
        """ID of the earliest window that contains ``ts``."""
        return (ts - self.align_to - self.length) // self.step + 1

    def last_window(self, ts: datetime) -> int:
        """ID of the latest window that contains ``ts``."""
        return (ts - self.align_to) // self.step
