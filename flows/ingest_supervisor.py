"""The flow process's side of ingest: starting, restarting and stopping the ingest process.

:class:`IngestSupervisor` runs :func:`~flows.ingest_process.run_ingest` in a child process (the
``spawn`` start method; the child stays in the parent's process group, so a
``kill -9`` of the group takes it too) and starts it again, after 0.5 s doubling
to 5 s, whenever it dies. The child exits by itself when its parent is gone.
The child ignores SIGINT (Ctrl-C reaches the whole group; the parent decides)
and takes SIGTERM as a clean stop, so a SIGTERM to the whole group (systemd's
``KillMode=control-group``, ``kill -TERM -<pgid>``) stops the edge as cleanly as
a SIGTERM to the flow process alone. Parent and child share no lock (the stop
word goes through a pipe, "ready" through a shared byte), so either dying at
any moment cannot leave the other waiting.

:class:`JournalFeed` ties it to a flow's :class:`~connectors.devices.journal_source.JournalSource`:
on stop, ingest stops first (it commits what it accepted), then the source
drains the journal and ends.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from connectors.devices.journal_source import JournalSource
from flows.config import EdgeConfig
from flows.console import current_log_setup
from flows.ingest_process import START_FAILED, ingest_child, journal_settings
from flows.ingest_stats import remove_snapshot

__all__ = ["IngestSupervisor", "JournalFeed"]

logger = logging.getLogger("edgesieve.ingest")
lifecycle = logging.getLogger("edgesieve.lifecycle")

BACKOFF_MIN_S: Final = 0.5
BACKOFF_MAX_S: Final = 5.0
_POLL_S: Final = 0.05
_STOP_GRACE_S: Final = 1.0
"""How long the supervisor waits for its own stop after a child stopped cleanly (on a SIGTERM)."""


class IngestSupervisor:
    """Runs :func:`run_ingest` in a child process and restarts it when it dies.

    :meth:`start` spawns it; a monitor thread waits for it and, unless
    :meth:`stop` was called, starts it again after a backoff (0.5 s doubling
    to 5 s, back to 0.5 s once a process became ready), logging how it ended.
    When the first process fails to start for a lasting reason (a port in
    use, a bad registry or config) nothing is restarted: :attr:`failure` holds
    its one-line reason and ``on_failure`` is called with it. Other start
    failures (the journal still locked by a previous ingest process finishing
    its stop), and a process that ran before and fails to come back, are
    retried.
    """

    def __init__(
        self,
        config: EdgeConfig,
        *,
        channels: tuple[str, ...],
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.channels = channels
        self.failure: str | None = None
        """Why the first ingest process could not start (None: it did, or has not ended)."""
        self._on_failure = on_failure
        self._failed: multiprocessing.connection.Connection | None = None
        self._ever_ready = False
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._ready: Any = None  # a shared byte the child sets to 1 once ready
        self._stop_child: multiprocessing.connection.Connection | None = None
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._restarts = 0

    @property
    def ready(self) -> bool:
        """Whether the current ingest process is subscribed and listening."""
        with self._lock:
            proc, ready = self._proc, self._ready
        return proc is not None and ready is not None and bool(ready.value) and proc.is_alive()

    @property
    def restarts(self) -> int:
        """How many times the ingest process was started again after it died."""
        return self._restarts

    @property
    def pid(self) -> int | None:
        """The current ingest process's id (None before :meth:`start` or between restarts)."""
        with self._lock:
            proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    def start(self) -> None:
        """Spawn the ingest process and the thread that restarts it."""
        if self._monitor is not None:
            msg = "IngestSupervisor.start: already started; hint: call stop() first"
            raise RuntimeError(msg)
        remove_snapshot(journal_settings(self.config).root)  # this run's counters start at 0
        with self._lock:
            self._spawn()
        self._monitor = threading.Thread(
            target=self._supervise, name="edgesieve-ingest-supervisor", daemon=True
        )
        self._monitor.start()

    def _spawn(self) -> None:
        """Start a child (hold ``_lock``: :meth:`stop` then sees either no child or this one)."""
        # No multiprocessing.Event: its set() waits until every process sleeping in wait() has
        # woken, so a child killed inside wait() (a SIGTERM to the process group did that) would
        # block the stop forever. A pipe and a lock-free shared byte cannot wait for the dead.
        ready = self._ctx.RawValue("b", 0)
        child_end, stop_child = self._ctx.Pipe(duplex=False)
        failed, child_failed = self._ctx.Pipe(duplex=False)
        level = logging.getLogger().level
        logs = current_log_setup()
        proc = self._ctx.Process(
            target=ingest_child,
            args=(self.config, self.channels, child_end, ready, level, child_failed, logs),
            name="edgesieve-ingest",
            daemon=True,
        )
        try:
            proc.start()
        finally:
            child_end.close()  # the child has its own copies
            child_failed.close()
        for previous in (self._stop_child, self._failed):
            if previous is not None:
                previous.close()  # the previous child's, which is gone
        self._proc, self._ready, self._stop_child, self._failed = proc, ready, stop_child, failed
        lifecycle.info("ingest process started (pid %d)", proc.pid)

    def _supervise(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            with self._lock:
                proc, ready = self._proc, self._ready
            assert proc is not None
            while proc.is_alive():
                proc.join(_POLL_S * 4)
            if self._stopping.is_set():
                return
            if ready.value:
                backoff = BACKOFF_MIN_S
                self._ever_ready = True
            code = proc.exitcode
            if code == START_FAILED and not self._ever_ready and self._give_up():
                return
            if code == 0 and self._stopping.wait(_STOP_GRACE_S):
                return  # a clean stop on its own SIGTERM: the whole group is likely stopping
            how = (
                f"was killed by signal {-code}"
                if code is not None and code < 0
                else f"exited with status {code}"
            )
            hint = " (the reason is logged above)" if code == START_FAILED else ""
            logger.error(
                "ingest process (pid %d) %s%s; restarting it in %gs", proc.pid, how, hint, backoff
            )
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, BACKOFF_MAX_S)
            with self._lock:
                if self._stopping.is_set():
                    return
                self._restarts += 1
                self._spawn()

    def _give_up(self) -> bool:
        """Whether the first process failed for good; then keep its reason, tell ``on_failure``."""
        failed = self._failed
        try:
            if failed is None or not failed.poll(0):
                return False  # a failure that may pass: restart as after any other exit
            reason = failed.recv_bytes().decode("utf-8", "replace")
        except (OSError, EOFError):
            return False
        self.failure = reason
        logger.debug("ingest process could not start, not restarting it: %s", reason)
        if self._on_failure is not None:
            self._on_failure(reason)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the ingest process cleanly (no restart after); kill it after ``timeout`` s."""
        self._stopping.set()
        with self._lock:
            proc, stop_child = self._proc, self._stop_child
        if proc is not None and stop_child is not None:
            try:
                stop_child.send_bytes(b"stop")  # never blocks: one word into an empty pipe
            except OSError:
                pass  # the child is gone (broken pipe)
            stop_child.close()
            deadline = time.monotonic() + timeout
            proc.join(timeout)
            # The monitor thread may reap the child first: this join then returns at once and
            # sees no exit status until that thread has recorded it.
            while proc.exitcode is None and time.monotonic() < deadline:
                proc.join(_POLL_S)
            if proc.exitcode is None:
                logger.error(
                    "ingest process (pid %d) did not stop within %gs; killing it",
                    proc.pid,
                    timeout,
                )
                proc.kill()
                proc.join(5.0)
        if self._monitor is not None:
            self._monitor.join(5.0)


class JournalFeed:
    """The ingest process of a flow reading the journal, and the journal source it feeds.

    :meth:`start` spawns the ingest process and a thread that, once ``stop`` is
    set, stops ingest (it stops accepting and commits) and only then tells the
    source to drain the journal and end. :meth:`stop` does the same at once.
    """

    def __init__(
        self, config: EdgeConfig, channels: tuple[str, ...], source: JournalSource
    ) -> None:
        self.config = config
        self.channels = channels
        self.source = source
        self._lock = threading.Lock()
        self._supervisor: IngestSupervisor | None = None
        self._stopped = False

    @property
    def ready(self) -> bool:
        """Whether the ingest process is subscribed and listening."""
        supervisor = self._supervisor
        return supervisor is not None and bool(supervisor.ready)

    @property
    def restarts(self) -> int:
        """How many times the ingest process was started again after it died."""
        supervisor = self._supervisor
        return int(supervisor.restarts) if supervisor is not None else 0

    @property
    def failure(self) -> str | None:
        """Why the ingest process could not start (then ``stop`` was set), else None."""
        supervisor = self._supervisor
        return supervisor.failure if supervisor is not None else None

    def start(self, stop: threading.Event) -> None:
        """Spawn the ingest process (once) and watch ``stop`` (set too if ingest cannot start)."""
        with self._lock:
            if self._supervisor is not None or self._stopped:
                return
            self._supervisor = IngestSupervisor(
                self.config, channels=self.channels, on_failure=lambda _reason: stop.set()
            )
            self._supervisor.start()
        threading.Thread(
            target=self._watch, args=(stop,), name="edgesieve-ingest-stop", daemon=True
        ).start()

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(0.1):
            if self._stopped:
                return
        self.stop()

    def stop(self) -> None:
        """Stop ingest (it commits what it accepted), then let the source drain and end."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            supervisor = self._supervisor
            try:
                if supervisor is not None:
                    lifecycle.info("stopping ingest, then draining the journal through the flow")
                    supervisor.stop()
            finally:
                self.source.drain.set()
