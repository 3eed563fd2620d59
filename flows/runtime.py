"""Running flows: loading a flow, clean shutdown on signals, metrics, Bytewax's runner.

A clean stop works through the dataflow itself: ``SIGTERM``/``SIGINT`` set a
stop event, the ingest process stops accepting and commits what it accepted
to the journal, the journal source drains it and ends its input, Bytewax then
closes every open window (end of input), and sinks flush on close.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from connectors.common.address import parse_host_port
from flows.config import ConfigError, EdgeConfig, check_environment, listen_problem, load_config

if TYPE_CHECKING:
    from flows.api import Edge, RunResult
    from flows.status import StatusServer

__all__ = [
    "CONFIG_ENV",
    "FlowBuilder",
    "install_stop_handlers",
    "lazy_flow",
    "load_flow_builder",
    "run_flow",
    "lifecycle",
    "serve_status",
    "stop_on_signals",
]

log = logging.getLogger("edgesieve.run")
lifecycle = logging.getLogger("edgesieve.lifecycle")
"""Start, ready, stopping, stopped: the INFO lines the console shows without ``-v``."""

CONFIG_ENV = "EDGESIEVE_CONFIG"

FlowBuilder = Callable[["Edge"], None]
"""What a flow provides: ``build(edge)``, declaring its inputs, steps and outputs."""


def install_stop_handlers(stop: threading.Event) -> None:
    """Make SIGTERM and SIGINT request a clean stop (a second SIGINT aborts)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("%s received: stopping cleanly", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """:func:`install_stop_handlers` for a block; the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    install_stop_handlers(stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_status(
    config: EdgeConfig, registry: CollectorRegistry, status: Callable[[], dict[str, Any]]
) -> StatusServer | None:
    """Serve ``/`` (status page), ``/status`` and ``/metrics`` on ``metrics_listen``, if set.

    :raises ConfigError: when the address cannot be bound (one line naming the key).
    """
    from flows.status import StatusServer

    if not config.metrics_listen:
        return None
    host, port = parse_host_port(config.metrics_listen, key="metrics_listen")
    try:
        server = StatusServer(host, port, registry, status)
    except OSError as exc:
        raise ConfigError(listen_problem("metrics_listen", config.metrics_listen, exc)) from None
    log.info("status page on http://%s/ (JSON /status, Prometheus /metrics)", config.metrics_listen)
    return server.start()


def load_flow_builder(flow: str) -> FlowBuilder:
    """Find ``build`` in a flow module name (``flows.telemetry``), a ``.py`` path or a flow file.

    A flow file (``.yaml``/``.yml``) is checked here, before anything starts; a
    bare name such as ``telemetry.flow.yaml`` that is not in the current
    directory is looked up among the standard flow files.
    """
    from flows.flowfile import is_flow_file, load_flow_file

    if is_flow_file(flow):
        from flows.standard import STANDARD_DIR

        path = Path(flow)
        if not path.exists() and path.name == flow and (STANDARD_DIR / flow).is_file():
            path = STANDARD_DIR / flow
        return load_flow_file(path).builder()
    module: ModuleType
    if flow.endswith(".py") or os.sep in flow:
        path = Path(flow)
        if not path.is_file():
            msg = (
                f"flow file {flow!r} does not exist; "
                "hint: give a module such as flows.telemetry or a .py path"
            )
            raise ConfigError(msg)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(flow)
        except ModuleNotFoundError as exc:
            if exc.name and flow.startswith(exc.name):
                msg = (
                    f"flow module {flow!r} not found; hint: standard flows are "
                    "flows.telemetry, flows.vibration and flows.edge, or give a .py path"
                )
                raise ConfigError(msg) from None
            raise
    build = getattr(module, "build", None)
    if not callable(build):
        msg = f"flow {flow!r} has no build(edge) function; hint: see examples/custom_flow.py"
        raise ConfigError(msg)
    return build  # type: ignore[no-any-return]


def flow_name(build: FlowBuilder) -> str:
    """A flow's name: a flow file's ``flow:``, else its module's (``flows.telemetry``)."""
    name = getattr(build, "flow_name", None)
    if isinstance(name, str):
        return name
    module = getattr(build, "__module__", None) or "flow"
    return module.rsplit(".", 1)[-1]


def run_flow(
    build: FlowBuilder,
    config: EdgeConfig,
    *,
    workers: int = 1,
    stop: threading.Event | None = None,
    name: str | None = None,
    status_every: float | None = None,
) -> RunResult:
    """Build ``build`` on a new :class:`~flows.api.Edge` and run it until its input ends or stop.

    With ``status_every`` the console shows the flow's status while it runs
    (:class:`~flows.console.StatusConsole`: a live block on a terminal, else a
    line every ``status_every`` seconds).

    :raises ConfigError: when the ingest process could not start (its one-line
        reason: a port taken after the start checks, an unusable journal).
    """
    from flows.api import Edge

    edge = Edge(config, name=name or flow_name(build), stop=stop)
    build(edge)
    if status_every is None:
        result = edge.run(workers=workers)
    else:
        from flows.console import StatusConsole

        with StatusConsole(edge, every=status_every):
            result = edge.run(workers=workers)
    ingest = edge._shared.ingest  # noqa: SLF001 - the ingest feed of this run
    if ingest is not None and ingest.failure is not None:
        raise ConfigError(ingest.failure)
    return result


def one_line(exc: BaseException) -> str:
    """An exception as one line: the innermost ``OSError`` it wraps, else its own text.

    Bytewax wraps what a step raised (and its own storage errors) in
    ``RuntimeError`` with Rust locations; what the user can act on is the
    operating system's error at the bottom, e.g. ``No space left on device``.
    """
    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in seen:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    for err in reversed(seen):
        if isinstance(err, OSError):
            where = f" ({err.filename})" if err.filename else ""
            return f"{err.strerror or err}{where}"
    text = " ".join(str(exc).split())
    if "disk is full" in text or "DiskFull" in text:
        return "No space left on device (database or disk is full)"
    return text or type(exc).__name__


def failure_line(flow: str, config: EdgeConfig, exc: BaseException) -> str:
    """The one line that says a running flow stopped on ``exc``, what is kept, what to do."""
    reason = one_line(exc)
    hint = (
        f"free space on the disk of {config.data_dir}, then start the edge again"
        if "No space left on device" in reason
        else "start the edge again; run with -v for the traceback"
    )
    return (
        f"edgesieve: error: flow {flow} stopped: {reason}; what devices were told accepted is "
        f"kept in {config.data_dir / 'journal'} and processed by the next start; hint: {hint}"
    )


def _note_uncaught_exceptions(edge: Edge) -> threading.Event:
    """An event set when the process ends on an uncaught exception (atexit cannot tell).

    The exception is one line (:func:`failure_line`), its traceback logged at
    DEBUG; a KeyboardInterrupt (a second Ctrl-C) keeps Python's own report.
    """
    failed = threading.Event()
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        failed.set()
        if not isinstance(value, Exception):
            previous(kind, value, tb)
            return
        log.debug("the flow failed", exc_info=(kind, value, tb))
        print(failure_line(edge.name, edge.config, value), file=sys.stderr)

    sys.excepthook = hook
    return failed


def _close_at_exit(edge: Edge, failed: threading.Event) -> None:
    """Close ``edge`` when ``python -m bytewax.run`` ends, exiting as ``edgesieve run`` would.

    Status 2 when the ingest process could not start (its line is printed here),
    3 when the flow failed (its line was printed by the exception hook).
    """
    edge.close(completed=not failed.is_set())
    ingest = edge._shared.ingest  # noqa: SLF001 - the ingest feed of this run
    code = None
    if ingest is not None and ingest.failure is not None:
        print(f"edgesieve: error: {ingest.failure}", file=sys.stderr)
        code = 2
    elif failed.is_set():
        code = 3
    if code is not None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # an atexit handler cannot change the exit status otherwise


def lazy_flow(module: str, build: FlowBuilder) -> Callable[[str], Any]:
    """A module ``__getattr__`` that builds ``flow`` on first access.

    This lets ``python -m bytewax.run flows.telemetry -r DATA_DIR/recovery/telemetry
    -s 5`` work: the config comes from ``$EDGESIEVE_CONFIG`` (default
    ``edge.yaml``), the recovery directory is created if missing (pass it with
    ``-r`` and the snapshot interval with ``-s``: the journal is released only
    past the snapshots stored there), the ingest process starts
    with the flow, SIGTERM/SIGINT stop ingest and then drain the journal through
    the flow, and at exit ingest is stopped and, unless the run failed with an
    uncaught exception, what the flow read is released from the journal. A
    config or environment problem (:func:`~flows.config.check_environment`), or
    an ingest process that cannot start, is one ``edgesieve: error:`` line on
    stderr and exit status 2, a failure of the running flow (a full disk) one
    line and status 3, as with ``edgesieve run``.
    """
    built: dict[str, Any] = {}

    def __getattr__(name: str) -> Any:  # noqa: N807
        if name != "flow":
            msg = f"module {module!r} has no attribute {name!r}"
            raise AttributeError(msg)
        if "flow" not in built:
            from flows.api import Edge

            path = os.environ.get(CONFIG_ENV, "edge.yaml")
            try:
                config = load_config(path)
                check_environment(config, source=path)
            except ConfigError as exc:
                print(f"edgesieve: error: {exc}", file=sys.stderr)
                sys.exit(2)
            edge = Edge(config, name=module.rsplit(".", 1)[-1])
            install_stop_handlers(edge.stop)
            build(edge)
            built["flow"] = edge.dataflow()
            edge.recovery_config()
            failed = _note_uncaught_exceptions(edge)
            atexit.register(_close_at_exit, edge, failed)
            edge.start_ingest()
        return built["flow"]

    return __getattr__
