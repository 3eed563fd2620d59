"""The CPU priority of the threads that read the ingest journal: below ingest while caught up.

A device waits for its answer until the ingest process has committed its
message; nobody waits for the flow, which reads the journal afterwards. On a
machine with few cores the flow's batches (milliseconds of CPU every
``GATHER``) land on the core an ingest thread wakes up on, and every request
of that group commit waits for them: in ``benchmarks/bench_transports.py``
(HTTP, 2 cores) the slowest requests came at the flow's reading cadence.

So while every journal partition this process reads is caught up, the
threads that read it (Bytewax's workers) and the
threads they started (their helpers: sink pools, the uplink sender; a thread
is recognised by the OS name it inherited from its worker, ``timely:work-N``)
run at Linux's ``SCHED_IDLE`` policy: they use the CPU whenever ingest does
not want it, and an ingest thread that wakes takes the core at once. When a
read finds a backlog (messages received over ``BEHIND_AGE`` ago), they
return to ``SCHED_OTHER`` before processing it, so a busy ingest process (or
any other busy process) cannot starve the flow: it falls behind by a quarter
of a second, then shares the CPU as before. The thread that waits for the
workers (:meth:`ReaderPriority.adopted`) follows them.

Returning from ``SCHED_IDLE`` needs ``CAP_SYS_NICE`` (root has it) or an
``RLIMIT_NICE`` of at least 20 (systemd: ``LimitNICE=+0``). Without it, or off
Linux, nothing is changed (checked once per process; one INFO line says so).

The ingest process resets a ``SCHED_IDLE`` it inherited (:func:`reset_inherited`).

On by default; :meth:`ReaderPriority.disable` on :data:`PRIORITY` turns it
off (a flow module may call it; ``benchmarks/bench_transports.py
--reader-priority off`` does).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

__all__ = ["PRIORITY", "ReaderPriority", "reset_inherited"]

log = logging.getLogger("edgesieve.journal")

_IDLE: Final = getattr(os, "SCHED_IDLE", None)
_OTHER: Final = getattr(os, "SCHED_OTHER", None)
_TASKS: Final = Path("/proc/self/task")


def _comm(tid: int) -> str | None:
    """The OS name of thread ``tid`` of this process (None once it is gone)."""
    try:
        return (_TASKS / str(tid) / "comm").read_text().rstrip("\n")
    except OSError:
        return None


def _set_policy(tid: int, idle: bool) -> None:
    """Thread ``tid``'s policy; a thread that is gone is skipped."""
    try:
        os.sched_setscheduler(tid, _IDLE if idle else _OTHER, os.sched_param(0))
    except ProcessLookupError:
        pass


def _threads() -> set[int]:
    """The native ids of this process's threads."""
    return {int(entry) for entry in os.listdir(_TASKS)}


def _is_idle(tid: int) -> bool:
    if _IDLE is None:
        return False
    try:
        return os.sched_getscheduler(tid) == _IDLE
    except ProcessLookupError:
        return False


def _can_return() -> str | None:
    """Why a thread could not go to SCHED_IDLE and back (tried on a thread of its own), or None."""
    if _IDLE is None or _OTHER is None or not _TASKS.is_dir():
        return "the SCHED_IDLE policy is Linux's"
    problem: list[str] = []

    def probe() -> None:
        tid = threading.get_native_id()
        try:
            _set_policy(tid, idle=True)
            _set_policy(tid, idle=False)
        except OSError as exc:
            problem.append(f"{type(exc).__name__}: {exc.strerror or exc}")

    thread = threading.Thread(target=probe, name="edgesieve-priority-probe", daemon=True)
    thread.start()
    thread.join()
    return problem[0] if problem else None


class ReaderPriority:
    """The policy of this process's journal-reading threads (one instance: :data:`PRIORITY`).

    A partition reports :meth:`caught_up` after a read that saw everything
    committed, :meth:`behind` after a read that found a backlog, :meth:`forget` when closed.
    The threads go to ``SCHED_IDLE`` while every known partition is caught
    up and back to ``SCHED_OTHER`` as soon as one is behind or none is left.
    A switch costs a system call per thread (tens of microseconds), so a
    flow that is just keeping up may switch at every read.
    Reports from the main thread (Bytewax's ``run_main``) change nothing;
    a thread follows the readers only inside :meth:`adopted`.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self._lock = threading.Lock()
        self._behind: dict[object, bool] = {}
        """Per partition (its key): whether its last read found a backlog."""
        self._readers: dict[int, str | None] = {}
        """Native id of each thread that reported, and its OS name."""
        self._idle = False
        self._members: dict[int, bool] = {}
        """Every thread of the process seen so far: whether it is a reader or a helper."""
        self._usable: bool | None = None if enabled else False
        """Whether the policy can be changed and changed back here (None: not checked yet)."""
        self._adopted: set[int] = set()
        """Native ids of the threads that follow the readers (:meth:`adopted`)."""

    def enable(self) -> None:
        """Change the reading threads' policy from now on (checked first: see the module)."""
        with self._lock:
            self._usable = None

    def disable(self) -> None:
        """Leave the reading threads' policy alone from now on (they return to SCHED_OTHER)."""
        with self._lock:
            self._apply(idle=False)
            self._usable = False

    @property
    def idle(self) -> bool:
        """Whether the reading threads run at SCHED_IDLE now."""
        return self._idle

    @contextmanager
    def adopted(self) -> Iterator[None]:
        """The calling thread follows the readers' policy for a block (and is normal after it).

        For the thread that runs Bytewax's ``cluster_main`` (the main thread
        in :meth:`flows.api.Edge.run`): it only waits for the workers, but
        wakes every millisecond to check for signals. At normal priority those
        wake-ups land on a core an ingest thread wants while the flow is
        caught up. At ``SCHED_IDLE`` a signal is still handled, once the CPU
        is free or the flow is behind.
        """
        tid = threading.get_native_id()
        with self._lock:
            self._adopted.add(tid)
            if self._idle:
                self._set([tid], idle=True)
        try:
            yield
        finally:
            with self._lock:
                self._adopted.discard(tid)
                if _is_idle(tid):
                    self._set([tid], idle=False)

    def caught_up(self, key: object) -> None:
        """Partition ``key`` read everything committed (called on its reading thread)."""
        self._report(key, behind=False)

    def behind(self, key: object) -> None:
        """Partition ``key`` read a backlog: it is behind (called on its reading thread)."""
        self._report(key, behind=True)

    def forget(self, key: object) -> None:
        """Partition ``key`` is closed; with none left, the threads return to SCHED_OTHER."""
        with self._lock:
            if self._behind.pop(key, None) is None:
                return
            if not self._behind:
                self._apply(idle=False)
                self._readers.clear()
            elif any(self._behind.values()):
                self._apply(idle=False)

    def _report(self, key: object, *, behind: bool) -> None:
        if self._usable is False or threading.current_thread() is threading.main_thread():
            return  # the main thread runs the program (signals, supervision): never lowered
        tid = threading.get_native_id()
        with self._lock:
            if self._usable is None:
                self._usable = self._check()
                if not self._usable:
                    return
            self._behind[key] = behind
            idle = not behind and not any(self._behind.values())
            if tid not in self._readers:
                self._readers[tid] = _comm(tid)
                self._apply(idle, force=True)
            elif idle != self._idle:
                self._apply(idle)

    @staticmethod
    def _check() -> bool:
        problem = _can_return()
        if problem is not None:
            log.info(
                "journal readers keep the CPU priority of ingest (%s; returning from "
                "SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE 20): on few cores the flow's "
                "batches can delay device answers",
                problem,
            )
        return problem is None

    def _apply(self, idle: bool, *, force: bool = False) -> None:
        """Move every reading thread and its helpers to ``idle`` (hold ``_lock``).

        Back to normal, every thread of the process at SCHED_IDLE returns: a
        thread a reader started while idle inherited the policy, and one that
        renamed itself (gRPC's ``event_engine``) is not known by its name.
        """
        if idle == self._idle and not force:
            return
        tids = self._family(renamed=force)  # also when not idle: a new reader's helpers
        if not idle:
            tids = [tid for tid in _threads() if _is_idle(tid)]
        if self._set(tids, idle=idle):
            self._idle = idle

    def _set(self, tids: list[int], *, idle: bool) -> bool:
        """Move ``tids`` to ``idle`` (hold ``_lock``); False, and no more tries, if refused."""
        try:
            for tid in tids:
                _set_policy(tid, idle)
        except OSError as exc:  # a capability dropped meanwhile: stop trying
            log.info("journal readers: cannot change the CPU policy any more (%s)", exc)
            self._usable = False
            return False
        return True

    def _family(self, *, renamed: bool) -> list[int]:
        """The reading threads, and every thread that carries one's OS name (its helpers).

        Only threads not seen before have their name read (``renamed``: a
        reader is new, so every thread's). A reader that is the process's
        main thread shares its name with every thread the program started:
        only that reader itself is meant then.
        """
        if renamed:
            self._members.clear()
        main = _comm(os.getpid())
        names = {name for name in self._readers.values() if name is not None and name != main}
        tids = _threads()
        members = self._members
        for tid in tids - members.keys():
            members[tid] = tid in self._readers or (bool(names) and _comm(tid) in names)
        for tid in members.keys() - tids:
            del members[tid]
        return sorted({tid for tid, member in members.items() if member} | self._adopted & tids)


PRIORITY: Final = ReaderPriority()


def reset_inherited() -> None:
    """Return this thread to SCHED_OTHER if it inherited SCHED_IDLE (the ingest process's start).

    A process started by a reading thread while it was caught up would
    otherwise serve devices at the flow's background priority.
    """
    if _IDLE is None or _OTHER is None:
        return
    try:
        if os.sched_getscheduler(0) == _IDLE:
            os.sched_setscheduler(0, _OTHER, os.sched_param(0))
    except OSError as exc:
        log.warning(
            "ingest: started at the SCHED_IDLE CPU policy and cannot leave it (%s); "
            "hint: start it from a normal-priority process, or grant CAP_SYS_NICE",
            exc,
        )
