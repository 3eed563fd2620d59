"""The console of ``edgesieve run`` and ``edgesieve demo``: quiet logs and a live status.

Logs go to ``data_dir/logs/edgesieve.log`` (the ingest process's to
``ingest.log`` beside it), rotated at :data:`LOG_FILE_BYTES` with
:data:`LOG_FILE_COUNT` old files kept. The console shows warnings and errors,
and the lifecycle lines (``edgesieve.lifecycle``: starting, ready, stopping,
stopped) and status lines; with ``-v`` every INFO and DEBUG line too. The HTTP
access log (``edgesieve.http.access``, one line per device request) is kept
only with ``-v``, on the console and in the files.

:class:`StatusConsole` shows :func:`flows.status.edge_status` while a flow
runs: on a terminal one live block (rich), redrawn every second; without one
(CI, systemd, a pipe) one status line every ``every`` seconds (0 or less: never).
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Final

from flows.accounting import ratio_text
from flows.status import status_line

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from flows.api import Edge

__all__ = [
    "ACCESS_LOGGER",
    "LIFECYCLE_LOGGER",
    "LOG_FILE",
    "LogSetup",
    "StatusConsole",
    "current_log_setup",
]

LIFECYCLE_LOGGER: Final = "edgesieve.lifecycle"
STATUS_LOGGER: Final = "edgesieve.lifecycle.status"
ACCESS_LOGGER: Final = "edgesieve.http.access"
LOG_FILE: Final = "edgesieve.log"
LOG_FILE_BYTES: Final = 10 * 1024 * 1024
LOG_FILE_COUNT: Final = 5
FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REFRESH_S: Final = 1.0
"""How often the live block is redrawn on a terminal."""

status_log = logging.getLogger(STATUS_LOGGER)

_current: LogSetup | None = None


class _ConsoleFilter(logging.Filter):
    """Warnings and lifecycle lines; with ``verbose`` every record."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        return record.levelno >= logging.WARNING or record.name.startswith(LIFECYCLE_LOGGER)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now (rich's live display redirects it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> IO[str]:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


class _LogFile(logging.handlers.RotatingFileHandler):
    """The rotating log file; a write that fails (a full disk) drops that line, no traceback.

    The first failure is one WARNING on the console; the file resumes when writes work again.
    """

    warned = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if self.warned:
            return
        self.warned = True
        exc = sys.exc_info()[1]
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        logging.getLogger("edgesieve.run").warning(
            "log file %s: cannot write (%s); log lines are dropped until it can; "
            "hint: free space on that disk",
            self.baseFilename,
            reason,
        )


@dataclass(frozen=True)
class LogSetup:
    """Where logs go: the console (quiet unless ``verbose``) and, with ``log_dir``, files there."""

    verbose: bool = False
    log_dir: Path | None = None

    def apply(self, file_name: str = LOG_FILE) -> None:
        """Replace the root logger's handlers: the console, and ``log_dir/file_name`` if set.

        :raises OSError: when ``log_dir`` cannot be created or the file opened.
        """
        global _current
        root = logging.getLogger()
        for handler in list(root.handlers):
            if getattr(handler, "_edgesieve", False):
                root.removeHandler(handler)
                handler.close()
        root.setLevel(logging.DEBUG if self.verbose else logging.INFO)
        # One line per device request: thousands a second under load, which would rotate the
        # files' history out within minutes (and cost the server ~15% of its rate). -v only.
        access = logging.getLogger(ACCESS_LOGGER)
        access.setLevel(logging.NOTSET if self.verbose else logging.WARNING)
        formatter = logging.Formatter(FORMAT)
        console = _Stderr()
        console.setFormatter(formatter)
        console.addFilter(_ConsoleFilter(self.verbose))
        handlers: list[logging.Handler] = [console]
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            rotating = _LogFile(
                self.log_dir / file_name,
                maxBytes=LOG_FILE_BYTES,
                backupCount=LOG_FILE_COUNT,
                encoding="utf-8",
            )
            rotating.setFormatter(formatter)
            handlers.append(rotating)
        for handler in handlers:
            handler._edgesieve = True  # type: ignore[attr-defined]
            root.addHandler(handler)
        _current = self


def current_log_setup() -> LogSetup | None:
    """The setup applied in this process (the ingest process is given the same), if any."""
    return _current


def _bar_rows(status: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for name, f in status["flows"].items():
        ratio = f["ratio"]
        rows.append(
            (
                name,
                f"{f['messages_in']:,}",
                f"{f['raw_bytes']:,}",
                f"{f['rows_out']:,}",
                f"{f['wire_bytes']:,}",
                ratio_text(ratio) if ratio is not None else "n/a",
                f"{f['alarms']:,}",
                f"{f['dead_letters']:,}",
            )
        )
    return rows


def render_block(status: dict[str, Any], *, left_s: float | None = None) -> RenderableType:
    """The live block: one row per flow, then devices, journal, outbox, cloud and alarms."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = f"edgesieve {status['edge_id']}: {status['state']}, up {status['uptime_s']:.0f}s"
    if left_s is not None:
        head += f", devices send for {left_s:.0f}s more"
    table = Table(box=None, pad_edge=False, header_style="bold")
    for title in (
        "flow",
        "messages in",
        "raw bytes",
        "rows out",
        "wire bytes",
        "reduction",
        "alarms",
        "dead letters",
    ):
        table.add_column(title, justify="left" if title == "flow" else "right")
    for row in _bar_rows(status):
        table.add_row(*row)
    journal, outbox, cloud = status["journal"], status["outbox"], status["cloud"]
    tail = (
        f"devices seen {status['devices_seen']:,}   journal {journal['messages']:,} messages "
        f"({journal['bytes']:,} bytes, oldest {journal['oldest_age_s']:.1f}s)"
    )
    if cloud["configured"]:
        state = "connected" if cloud["connected"] else "disconnected"
        tail += (
            f"   outbox {outbox['batches']:,} batches ({outbox['bytes']:,} bytes)   "
            f"cloud {state}, {cloud['acked_batches']:,} batches acknowledged"
        )
    else:
        tail += "   cloud not configured"
    lines: list[Any] = [Text(head, style="bold"), table, Text(tail)]
    for alarm in status["recent_alarms"][:3]:
        value = alarm["value"]
        lines.append(
            Text(
                f"alarm {alarm['state']} {alarm['severity']}: {alarm['device']} {alarm['key']} "
                f"{alarm['rule']} = {'n/a' if value is None else f'{value:.3g}'} at {alarm['ts']}",
                style="red" if alarm["state"] == "raised" else "green",
            )
        )
    return Group(*lines)


class StatusConsole:
    """Show an edge's status while it runs (a context manager around the run).

    On a terminal (``live=None`` asks ``console``) one rich live block redrawn
    every :data:`REFRESH_S`; otherwise a status line every ``every`` seconds
    (0: never). ``left`` gives the seconds left to show (the demo's devices).
    """

    def __init__(
        self,
        edge: Edge,
        *,
        every: float = 10.0,
        live: bool | None = None,
        left: Callable[[], float] | None = None,
        console: Console | None = None,
    ) -> None:
        from rich.console import Console

        self.edge = edge
        self.every = every
        self.left = left
        self.console = console if console is not None else Console(stderr=True)
        self.live = self.console.is_terminal if live is None else live
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgesieve-console", daemon=True)

    def __enter__(self) -> StatusConsole:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _left(self) -> float | None:
        return max(0.0, self.left()) if self.left is not None else None

    def _run(self) -> None:
        if self.live:
            from rich.live import Live

            with Live(
                console=self.console,
                auto_refresh=False,
                redirect_stdout=True,
                redirect_stderr=True,
                transient=False,
            ) as live:
                self._loop(lambda: live.update(self._block(), refresh=True), REFRESH_S)
                live.update(self._block(), refresh=True)  # the last figures stay on screen
        elif self.every > 0:
            self._loop(self._line, self.every)

    def _line(self) -> None:
        status_log.info("%s", status_line(self.edge.status(), left_s=self._left()))

    def _block(self) -> RenderableType:
        return render_block(self.edge.status(), left_s=self._left())

    def _loop(self, show: Callable[[], None] | None, period: float) -> None:
        next_show = time.monotonic() + (0 if self.live else period)
        while not self._stop.wait(0.2):
            if show is not None and time.monotonic() >= next_show:
                next_show = time.monotonic() + period
                try:
                    show()
                except Exception:  # noqa: BLE001 - the console must never stop the flow
                    logging.getLogger("edgesieve.run").debug("status failed", exc_info=True)
