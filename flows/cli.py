"""The ``edgesieve`` command line."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flows.config import ConfigError, check_environment, data_dir_problem, load_config

EXIT_CONFIG = 2
"""Bad options, config or environment (a port in use, an unusable data_dir): nothing ran."""
EXIT_FAILED = 3
"""The flow started and then stopped on an error (e.g. a full disk). What devices were told
"accepted" stays in the journal and is processed, exactly once, by the next start."""


if TYPE_CHECKING:
    from flows.config import EdgeConfig
    from flows.console import LogSetup
    from flows.runtime import FlowBuilder

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesieve",
        description="Edge stream processing for IoT telemetry.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="every log line on the console (INFO and DEBUG, HTTP access logs included)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a flow until SIGTERM/SIGINT")
    run.add_argument(
        "flow", help="flow module (flows.telemetry), a .py file or a flow file (x.flow.yaml)"
    )
    run.add_argument("--config", "-c", type=Path, default=Path("edge.yaml"), help="edge.yaml")
    run.add_argument("--workers", "-w", type=int, default=1, help="Bytewax workers (threads)")
    _status_every(run)

    cloud = sub.add_parser("cloud", help="run the reference cloud receiver until SIGTERM/SIGINT")
    cloud.add_argument("--listen", required=True, help="HOST:PORT, e.g. 127.0.0.1:50051")
    cloud.add_argument("--db", type=Path, required=True, help="DuckDB file, e.g. cloud.duckdb")
    cloud.add_argument("--auth", type=Path, required=True, help="YAML: edges: [{key, secret}]")
    cloud.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for TLS")
    cloud.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    cloud.add_argument("--client-ca", type=Path, help="require client certificates from this CA")
    from connectors.cloud.limits import LIMIT_OPTIONS

    for name, (default, text) in LIMIT_OPTIONS.items():
        cloud.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=default, help=f"{text} ({default})"
        )

    devices = sub.add_parser("devices", help="device registry tools")
    devices_sub = devices.add_subparsers(dest="devices_command", required=True)
    mosq = devices_sub.add_parser(
        "mosquitto-config",
        help="write mosquitto passwd, ACL and edgesieve.conf from the registry and edge account",
    )
    mosq.add_argument("--config", "-c", type=Path, default=Path("edge.yaml"), help="edge.yaml")
    mosq.add_argument(
        "--out", type=Path, required=True, help="directory for passwd, acl and edgesieve.conf"
    )

    flows = sub.add_parser("flows", help="flow file tools")
    flows_sub = flows.add_subparsers(dest="flows_command", required=True)
    check = flows_sub.add_parser(
        "check", help="check flow files (every problem with its key path), nothing starts"
    )
    check.add_argument("files", nargs="+", type=Path, help="flow files (x.flow.yaml)")
    check.add_argument(
        "--config", "-c", type=Path, help="edge.yaml whose settings are the steps' defaults"
    )
    show = flows_sub.add_parser("show", help="print a flow file's graph as Mermaid")
    show.add_argument("file", type=Path, help="a flow file (x.flow.yaml)")

    rep = sub.add_parser(
        "report", help="write one self-contained HTML report (charts, tables) of a data_dir"
    )
    rep.add_argument("data_dir", type=Path, help="the edge's data_dir (Parquet, report-*.json)")
    rep.add_argument(
        "--cloud", type=Path, help="the receiver's DuckDB file: ratios from its uplink_batches"
    )
    rep.add_argument("--out", type=Path, help="HTML file to write (default DATA_DIR/report.html)")
    rep.add_argument(
        "--edge-id", help="this edge's id in --cloud (default: --config's edge_id, or the only one)"
    )
    rep.add_argument(
        "--series",
        action="append",
        default=[],
        metavar="DEVICE/KEY",
        help="telemetry series to plot (repeatable; default the 3 busiest)",
    )
    rep.add_argument("--top", type=int, default=10, help="devices in the per-device table (10)")
    rep.add_argument(
        "--config", "-c", type=Path, help="edge.yaml: ISO zone thresholds and bands (else defaults)"
    )

    demo = sub.add_parser("demo", help="everything on loopback, then the reduction report")
    demo.add_argument("--devices", type=int, default=20, help="simulated sensors (default 20)")
    demo.add_argument("--machines", type=int, default=3, help="vibrating machines (default 3)")
    demo.add_argument("--http-devices", type=int, default=3, help="HTTP sensors (default 3)")
    demo.add_argument("--coap-devices", type=int, default=3, help="CoAP sensors (default 3)")
    demo.add_argument(
        "--log-devices", type=int, default=2, help="services posting log lines (default 2)"
    )
    demo.add_argument("--seconds", type=float, default=15.0, help="how long devices send")
    demo.add_argument("--rate", type=float, default=10.0, help="messages/s per device")
    demo.add_argument("--data-dir", type=Path, default=None, help="where outputs go")
    demo.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "embedded"],
        default="auto",
        help="MQTT broker: mosquitto when installed (auto), or the embedded one",
    )
    _status_every(demo)
    return parser


def _status_every(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--status-every",
        type=float,
        default=10.0,
        metavar="S",
        help="without a terminal, one status line every S seconds (0: never; default 10); "
        "on a terminal a live status block instead",
    )


def _check_status_every(every: float) -> None:
    if not every >= 0:
        msg = (
            f"--status-every must be 0 (never) or a number of seconds (got {every:g}); "
            "hint: --status-every 10"
        )
        raise ConfigError(msg)


def _cloud(args: argparse.Namespace) -> None:
    import threading

    from connectors.cloud import ReceiverLimits, ReceiverTls, serve
    from connectors.cloud.limits import LIMIT_OPTIONS
    from connectors.cloud.store import ReceiverError
    from flows.config import bind_problem
    from flows.runtime import stop_on_signals

    if problem := bind_problem("--listen", args.listen, socket.SOCK_STREAM):
        raise ConfigError(problem)
    tls = None
    if args.tls_cert or args.tls_key or args.client_ca:
        if not (args.tls_cert and args.tls_key):
            msg = "TLS needs both --tls-cert and --tls-key (--client-ca adds mutual TLS)"
            raise ConfigError(msg)
        tls = ReceiverTls(args.tls_cert, args.tls_key, args.client_ca)
    limits = ReceiverLimits(**{name: getattr(args, name) for name in LIMIT_OPTIONS})
    stop = threading.Event()
    with stop_on_signals(stop):
        try:
            serve(args.listen, args.db, args.auth, tls=tls, limits=limits, stop=stop)
        except ReceiverError as exc:
            raise ConfigError(" ".join(str(exc).split())) from None


def _mosquitto_config(config_path: Path, out: Path) -> None:
    from connectors.devices.broker_auth import CONF_FILE, EdgeAccount, write_mosquitto_config
    from connectors.devices.registry import DeviceRegistry

    config = load_config(config_path)
    mqtt = config.transports.mqtt
    if config.devices is None:
        msg = (
            f"{config_path}: devices: is required to write the broker files (got null); "
            "hint: set devices: devices.yaml (a list of {id, token})"
        )
        raise ConfigError(msg)
    if mqtt is None or mqtt.username is None or mqtt.password is None:
        msg = (
            f"{config_path}: transports.mqtt: needs username and password, they become the "
            "edge's own broker account (it reads device topics and publishes alarms); "
            "hint: add username: edge and password: (8-256 characters) to transports.mqtt"
        )
        raise ConfigError(msg)
    registry = DeviceRegistry.load(config.devices)
    passwd, acl = write_mosquitto_config(registry, EdgeAccount(mqtt.username, mqtt.password), out)
    conf = passwd.parent / CONF_FILE
    print(f"wrote {passwd} ({len(registry)} devices + edge account {mqtt.username!r}) and {acl}")
    print(f"wrote {conf}:")
    print("".join(f"  {line}\n" for line in conf.read_text(encoding="utf-8").splitlines()), end="")
    print("add to mosquitto.conf (mosquitto loads every *.conf file of that directory):")
    print(f"  include_dir {passwd.parent.resolve()}")
    print(
        "and remove any other allow_anonymous, password_file, acl_file, max_inflight_messages "
        "and max_queued_messages lines from it"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgesieve`` console script."""
    args = _parser().parse_args(argv)
    from flows.console import LogSetup

    if args.command in ("run", "demo"):  # quiet: warnings and lifecycle lines, logs to files
        LogSetup(verbose=args.verbose).apply()
    else:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        if args.command == "run":
            from flows.runtime import load_flow_builder

            if args.workers < 1:
                msg = f"--workers must be at least 1 (got {args.workers})"
                raise ConfigError(msg)
            _check_status_every(args.status_every)
            config = load_config(args.config)
            build = load_flow_builder(args.flow)
            check_environment(config, source=str(args.config))  # creates data_dir: last
            _log_to(LogSetup(verbose=args.verbose, log_dir=config.data_dir / "logs"))
            return _run(build, config, args.workers, args.status_every)
        elif args.command == "cloud":
            _cloud(args)
        elif args.command == "devices":
            _mosquitto_config(args.config, args.out)
        elif args.command == "flows":
            return _flows(args)
        elif args.command == "report":
            _report(args)
        elif args.command == "demo":
            from flows.demo import DemoSettings, run_demo

            _check_status_every(args.status_every)
            if args.data_dir is not None and (
                problem := data_dir_problem(args.data_dir, key="--data-dir")
            ):
                raise ConfigError(problem)
            run_demo(
                DemoSettings(
                    devices=args.devices,
                    seconds=args.seconds,
                    rate_per_device=args.rate,
                    data_dir=args.data_dir,
                    broker=args.broker,
                    machines=args.machines,
                    http_devices=args.http_devices,
                    coap_devices=args.coap_devices,
                    log_devices=args.log_devices,
                ),
                status_every=args.status_every,
                logs=LogSetup(verbose=args.verbose),
            )
    except (ConfigError, ValueError) as exc:
        for line in str(exc).splitlines():  # a flow file's problems: one line each
            print(f"edgesieve: error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _report(args: argparse.Namespace) -> None:
    from flows.report import build_report

    config = load_config(args.config) if args.config is not None else None
    vibration = config.vibration if config is not None else None
    edge_id = args.edge_id or (config.edge_id if config is not None and args.cloud else None)
    path = build_report(
        args.data_dir,
        args.out,
        cloud=args.cloud,
        edge_id=edge_id,
        series=args.series,
        top=args.top,
        **(
            {"iso_thresholds_mm_s": vibration.iso_thresholds_mm_s, "bands_hz": vibration.bands_hz}
            if vibration is not None
            else {}
        ),
    )
    print(
        f"report: {path} ({path.stat().st_size:,} bytes; open it in a browser, it needs no network)"
    )


def _flows(args: argparse.Namespace) -> int:
    """``edgesieve flows check|show``: one line per good file, every problem of a bad one."""
    from flows.flowfile import FlowFileError, check_flow_file

    if args.flows_command == "show":
        print(check_flow_file(args.file).mermaid(), end="")
        return 0
    config = load_config(args.config) if args.config is not None else None
    failed = False
    for path in args.files:
        try:
            flow = check_flow_file(path, config)
        except FlowFileError as exc:
            failed = True
            for problem in exc.problems:
                print(f"edgesieve: error: {problem}", file=sys.stderr)
            continue
        print(
            f"{path}: ok: flow {flow.name}, input {flow.input} ({', '.join(flow.channels)}), "
            f"{len(flow.steps)} step{'' if len(flow.steps) == 1 else 's'}, "
            f"outputs {', '.join(o.stream for o in flow.outputs)}"
        )
    return EXIT_CONFIG if failed else 0


def _log_to(logs: LogSetup) -> None:
    """Apply ``logs`` (files under its ``log_dir``); a directory that cannot be used is status 2."""
    try:
        logs.apply()
    except OSError as exc:
        msg = (
            f"log directory {logs.log_dir}: cannot write the log file there "
            f"({exc.strerror or exc}); hint: check the permissions and free space of data_dir"
        )
        raise ConfigError(msg) from None


def _run(build: FlowBuilder, config: EdgeConfig, workers: int, status_every: float) -> int:
    """``edgesieve run``: run the flow, print its reports; a failure is one line and status 3."""
    from flows.runtime import failure_line, flow_name, run_flow

    try:
        result = run_flow(build, config, workers=workers, status_every=status_every)
    except ValueError:
        raise  # a config error, or a setting checked when the flow was built: status 2
    except Exception as exc:  # noqa: BLE001 - any failure of a running flow: one line
        logging.getLogger("edgesieve.run").debug("the flow failed", exc_info=True)
        print(failure_line(flow_name(build), config, exc), file=sys.stderr)
        return EXIT_FAILED
    for rep in result.reports.values():
        print(rep.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
