import os
import re
import socket
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from flows.config import (
    ConfigError,
    EdgeConfig,
    check_environment,
    listen_addresses,
    load_config,
    parse_config,
)
from operators.logs import LogsConfig
from operators.spectral import SpectralConfig
from operators.threshold import Rule
from tests.conftest import write_devices


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge.yaml"
    path.write_text(text)
    return path


def test_full_example_loads_and_resolves_paths(tmp_path):
    path = write(
        tmp_path,
        """
edge_id: edge-07
data_dir: ./var
devices: devices.yaml
transports:
  mqtt: {url: "mqtt://127.0.0.1:1884", qos: 0, protocol: "5", username: edge, password: s3cret}
telemetry:
  deadband: {absolute: 0.5, percent: 1, max_silence: PT5M}
  window: {length: 30, slide: 10, allowed_lateness: 2.5}
parquet: {max_file_bytes: 1000, max_file_age: 5}
""",
    )
    (tmp_path / "devices.yaml").write_text("devices: []\n")
    config = load_config(path)
    assert config.edge_id == "edge-07"
    assert config.data_dir == tmp_path / "var"
    assert config.devices == tmp_path / "devices.yaml"
    mqtt = config.transports.mqtt
    assert mqtt is not None and mqtt.qos == 0 and mqtt.protocol == "5"
    assert config.telemetry.deadband.max_silence == timedelta(minutes=5)
    assert config.telemetry.window.slide == timedelta(seconds=10)
    assert config.telemetry.window.allowed_lateness == timedelta(seconds=2.5)
    assert config.parquet.max_file_age == timedelta(seconds=5)


def test_defaults_have_a_nonzero_deadband():
    config = parse_config({})
    assert config == EdgeConfig()
    assert config.telemetry.deadband.absolute and config.telemetry.deadband.absolute > 0
    assert config.max_payload_bytes == 1024 * 1024


def fails(data: object, message: str) -> None:
    """parse_config refuses ``data`` with exactly ``message`` (a literal string)."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        parse_config(data)


CLOUD = {"target": "h:1", "key": "edge-01", "secret": "s"}


def test_recovery_and_sinks_sections():
    config = parse_config(
        {"recovery": {"snapshot_interval": 2, "partitions": 8}, "sinks": {"duckdb": False}}
    )
    assert config.recovery.enabled and config.recovery.snapshot_interval == timedelta(seconds=2)
    assert config.recovery.partitions == 8
    assert config.sinks.parquet and not config.sinks.duckdb
    defaults = parse_config({})
    assert defaults.recovery.snapshot_interval == timedelta(seconds=5)
    assert defaults.sinks.parquet and defaults.sinks.duckdb


@pytest.mark.parametrize("interval", [0, 0.05, 7200])
def test_snapshot_interval_out_of_range_is_explained(interval):
    fails(
        {"recovery": {"snapshot_interval": interval}},
        "recovery.snapshot_interval: must be between 0.1 seconds and 1 hour (got "
        f"{interval:g} s); hint: 5 replays at most 5 seconds of input after a crash",
    )


def test_missing_file_is_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; pass --config PATH"):
        load_config(tmp_path / "nope.yaml")


def test_bad_yaml_names_line_and_column(tmp_path):
    path = write(tmp_path, "edge_id: x\ntransports: {mqtt: [\n")
    with pytest.raises(ConfigError, match=r"^.*edge\.yaml: not valid YAML at line \d+, column \d+"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(
        ConfigError,
        match=r"^.*edge\.yaml: \(top level\): the configuration must be a mapping of keys "
        r"\(got list\); hint: start with a key such as edge_id: edge-01; "
        r"docs/config\.md has an example$",
    ):
        load_config(path)


def test_unknown_key_lists_the_keys_of_its_section(tmp_path):
    path = write(tmp_path, "transports:\n  mqtt: {urll: x}\n")
    with pytest.raises(
        ConfigError,
        match=r"^.*edge\.yaml: transports\.mqtt\.urll: unknown key; hint: the keys of "
        r"transports\.mqtt are client_id, keepalive, password, persistent, "
        r"protocol, qos, url, username$",
    ):
        load_config(path)
    fails(
        {"telemetry": {"windw": {}}},
        "telemetry.windw: unknown key; hint: the keys of telemetry are deadband, window",
    )


def test_wrong_value_shows_what_was_got(tmp_path):
    path = write(tmp_path, "transports:\n  mqtt: {qos: 2}\n")
    with pytest.raises(
        ConfigError, match=r"^.*edge\.yaml: transports\.mqtt\.qos: must be 0 or 1 \(got 2\)$"
    ):
        load_config(path)
    fails(
        {"transports": {"mqtt": {"protocol": 5}}},
        """transports.mqtt.protocol: must be '3.1.1' or '5' (got 5); hint: write it quoted: "5\"""",
    )
    fails(
        {"max_payload_bytes": "big"},
        "max_payload_bytes: must be a valid integer, unable to parse string as an integer "
        "(got 'big'); hint: a whole number, e.g. 10",
    )


def test_several_problems_are_one_message():
    fails(
        {"cloud": {"target": "h:1"}},
        "cloud.key: required key is missing; hint: add key: to cloud; "
        "cloud.secret: required key is missing; hint: add secret: to cloud",
    )


def test_bad_duration_names_both_forms():
    fails(
        {"telemetry": {"window": {"length": "5 min"}}},
        "telemetry.window.length: must be a valid timedelta, invalid character in hour "
        "(got '5 min'); hint: seconds or ISO 8601 like PT5M",
    )


def test_empty_edge_id_is_refused():
    fails(
        {"edge_id": ""},
        "edge_id: must have at least 1 character (got ''); "
        "hint: give a non-empty value or leave the key out",
    )


def test_deadband_needs_a_tolerance():
    fails(
        {"telemetry": {"deadband": {"absolute": None, "percent": None}}},
        "telemetry.deadband: needs a tolerance (got absolute: null, percent: null); "
        "hint: set absolute or percent (or both)",
    )


def test_negative_tolerance_is_refused():
    fails(
        {"telemetry": {"deadband": {"absolute": -1}}},
        "telemetry.deadband.absolute: must be greater than or equal to 0 (got -1)",
    )


def test_window_is_checked_at_load_by_the_window_operator():
    fails(
        {"telemetry": {"window": {"length": 10, "slide": 20}}},
        "telemetry.window.slide: must be > 0 and <= length (10) (got 20); hint: a slide longer "
        "than the window would leave gaps that no window covers; leave slide: null for "
        "tumbling windows",
    )
    fails(
        {"telemetry": {"window": {"length": 0}}},
        "telemetry.window.length: must be longer than zero (got 0); hint: length: 10",
    )
    fails(
        {"telemetry": {"window": {"allowed_lateness": -1}}},
        "telemetry.window.allowed_lateness: must be >= 0 (got -1); hint: 0 treats any reading "
        "older than the newest one of its series as late",
    )


def test_logs_section_defaults_are_the_operators_and_are_checked_by_it():
    assert parse_config({}).logs.settings() == LogsConfig()
    logs = parse_config(
        {"logs": {"level": "error", "window": 30, "max_templates": 5, "allowed_lateness": "PT2S"}}
    ).logs
    assert logs.settings() == LogsConfig(
        level="error",
        window=timedelta(seconds=30),
        max_templates=5,
        allowed_lateness=timedelta(seconds=2),
    )
    fails(
        {"logs": {"level": "loud"}},
        "logs.level: must be one of trace, debug, info, notice, warning, error, critical "
        "(got 'loud' (str)); hint: level: \"warning\" sends warnings, errors and critical lines "
        "as events",
    )
    fails(
        {"logs": {"window": 0}},
        "logs.window: must be longer than zero (got 0); hint: window: 60",
    )
    fails(
        {"logs": {"max_templates": 0}},
        "logs.max_templates: must be an int >= 1 (got 0 (int)); hint: max_templates: 100 summary "
        "rows per device and window",
    )
    fails(
        {"logs": {"allowed_lateness": -1}},
        "logs.allowed_lateness: must be >= 0 (got -1); hint: 0 counts no line older than its "
        "device's newest one",
    )


def test_vibration_defaults_are_the_operators():
    vibration = parse_config({}).vibration
    assert vibration.spectral() == SpectralConfig()
    rules = parse_config(
        {"vibration": {"alarms": [{"name": "x", "raise_above": 1}]}}
    ).vibration.rules()
    assert rules == (Rule("x", "velocity_rms_mm_s", raise_above=1.0),)
    assert [r.name for r in vibration.rules()] == ["iso_zone_c", "iso_zone_d", "impacts_kurtosis"]


def test_spectral_settings_are_checked_by_the_operator():
    fails(
        {"vibration": {"fft_size": 1000}},
        "vibration.fft_size: must be a power of two from 64 to 1048576 (got 1000); "
        "hint: round to 1024",
    )
    fails(
        {"vibration": {"overlap": 0.99}},
        "vibration.overlap: must be a fraction in [0, 0.95] (got 0.99); "
        "hint: 0.5 means 50% (not 50); 0 means no overlap",
    )
    fails(
        {"vibration": {"frames_per_row": 0}},
        "vibration.frames_per_row: must be at least 1 (got 0); hint: 1 emits one row per frame",
    )
    fails(
        {"vibration": {"bands_hz": [[10, 100], [10, 5]]}},
        "vibration.bands_hz.1: needs lo < hi (got (10, 5)); hint: give the lower edge first; "
        "bands_hz: ((10, 100), (100, 1000), (1000, 5000))",
    )
    fails(
        {"vibration": {"iso_thresholds_mm_s": [3, 2, 1]}},
        "vibration.iso_thresholds_mm_s: must be finite, > 0 and strictly increasing "
        "(got (3.0, 2.0, 1.0)); hint: iso_thresholds_mm_s: (1.4, 2.8, 4.5) (A/B, B/C, C/D in mm/s)",
    )


def test_alarm_rules_are_checked_by_the_threshold_operator():
    def alarm(**rule: object) -> dict:
        return {"vibration": {"alarms": [{"name": "x", "raise_above": 1, **rule}]}}

    fails(
        alarm(clear_below=2),
        "vibration.alarms.0.clear_below: must be <= raise_above (1.0) (got 2.0); hint: the "
        "clear level sits on the safe side of the raise level and the gap between them is the "
        "hysteresis, e.g. raise_above: 7.1, clear_below: 6.5",
    )
    fails(
        {"vibration": {"alarms": [{"name": "x"}]}},
        "vibration.alarms.0: needs raise_above (high alarm) or raise_below (low alarm) "
        "(got neither); hint: raise_above: 7.1, clear_below: 6.5 raises above 7.1 and clears "
        "below 6.5",
    )
    fails(
        alarm(severity="bad"),
        "vibration.alarms.0.severity: must be one of 'info', 'warning', 'critical' "
        """(got 'bad' (str)); hint: severity: "critical" for alarms that need action now""",
    )
    fails(
        alarm(min_count=0),
        "vibration.alarms.0.min_count: must be >= 1 (got 0); "
        "hint: min_count: 1 (the default) raises on the first item beyond the level",
    )
    fails(
        alarm(bogus=2),
        "vibration.alarms.0.bogus: unknown key; hint: the keys of vibration.alarms.0 are "
        "clear_above, clear_below, field, min_count, min_duration, name, raise_above, "
        "raise_below, severity",
    )
    fails(
        {"vibration": {"alarms": [{"raise_above": 1}]}},
        "vibration.alarms.0.name: required key is missing; hint: add name: to vibration.alarms.0",
    )
    fails(
        {"vibration": {"alarms": []}},
        "vibration.alarms: is empty (got []); hint: leave alarms out for the default rules",
    )
    fails(
        {
            "vibration": {
                "alarms": [{"name": "x", "raise_above": 1}, {"name": "x", "raise_below": 0}]
            }
        },
        "vibration.alarms: rule names must be unique (got 'x' twice); "
        "hint: rename one, the name is the rule column of its alarms",
    )


def test_http_and_coap_need_a_registry():
    fails(
        {"transports": {"http": {"listen": "127.0.0.1:8080"}}},
        "devices: is required by transports.http, transports.coap and "
        "transports.mqtt_server (got null); "
        "hint: set devices: devices.yaml (a list of {id, token})",
    )


def test_listen_must_be_host_port():
    fails(
        {"devices": "d.yaml", "transports": {"coap": {"listen": "5683"}}},
        "transports.coap.listen: must be HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080 "
        "(got '5683'); hint: give both a host and a port, separated by ':'",
    )


def test_metrics_listen_must_be_host_port():
    assert parse_config({"metrics_listen": "localhost:9100"}).metrics_listen == "localhost:9100"
    fails(
        {"metrics_listen": "localhost"},
        "metrics_listen: must be HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080 "
        "(got 'localhost'); hint: give both a host and a port, separated by ':'",
    )


def test_listen_accepts_ipv6_and_queue_bound(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text(
        "devices: devices.yaml\n"
        "transports: {http: {listen: '[::1]:8080'}, coap: {listen: '127.0.0.1:5683'}, queue_messages: 50}\n"
    )
    (tmp_path / "devices.yaml").write_text("devices: []\n")
    config = load_config(path)
    assert config.transports.http is not None and config.transports.http.listen == "[::1]:8080"
    assert config.transports.queue_messages == 50
    assert config.devices == tmp_path / "devices.yaml"


def test_cloud_section(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text(
        "cloud: {target: '127.0.0.1:50051', key: edge-01, secret: s3cret,"
        " tls: {ca: ca.pem, cert: edge.pem, key: edge.key}, send_points: true, outbox_ttl: P1D}\n"
    )
    for name in ("ca.pem", "edge.pem", "edge.key"):
        (tmp_path / name).write_text("PEM\n")
    cloud = load_config(path).cloud
    assert cloud is not None and cloud.send_points and cloud.outbox_ttl == timedelta(days=1)
    assert (
        cloud.tls is not None
        and cloud.tls.ca == tmp_path / "ca.pem"
        and cloud.tls.key == tmp_path / "edge.key"
    )
    assert "s3cret" not in repr(cloud)


def test_cloud_key_must_equal_edge_id():
    fails(
        {"edge_id": "a", "cloud": {**CLOUD, "key": "b"}},
        "cloud.key: must equal edge_id, the receiver checks batches against the key "
        "(got 'b', edge_id 'a'); hint: set cloud.key: a (and that key in the receiver's edges "
        "file), or edge_id: b",
    )


def test_cloud_tls_needs_cert_and_key_together():
    fails(
        {"cloud": {**CLOUD, "tls": {"ca": "ca.pem", "cert": "c.pem"}}},
        "cloud.tls.key: is missing, mutual TLS needs both cert and key (got only cert); "
        "hint: add key: or remove cert: for one-way TLS",
    )


def test_cloud_backoff_has_a_floor():
    fails(
        {"cloud": {**CLOUD, "backoff_max": 0.1}},
        "cloud.backoff_max: must be at least 0.5 seconds, the first retry waits up to 0.5 s "
        "(got 0.1); hint: 60 is a good default",
    )


@pytest.mark.parametrize("key", ["batch_age", "alarm_batch_age"])
def test_cloud_batch_ages_must_be_positive(key):
    fails(
        {"cloud": {**CLOUD, key: 0}},
        f"cloud.{key}: must be longer than zero (got 0); hint: seconds a batch may gather rows, "
        "e.g. 60 (alarm_batch_age: 1)",
    )


def test_cloud_batches_default_to_one_partition_a_minute_and_alarms_at_once():
    cloud = parse_config({"cloud": CLOUD}).cloud
    assert (cloud.partitions, cloud.batch_age, cloud.alarm_batch_age) == (
        1,
        timedelta(seconds=60),
        timedelta(seconds=1),
    )
    fails(
        {"cloud": {**CLOUD, "partitions": 0}},
        "cloud.partitions: must be greater than or equal to 1 (got 0)",
    )


def test_named_files_must_be_readable(tmp_path):
    (tmp_path / "ca.pem").write_text("PEM\n")
    (tmp_path / "edge.yaml").write_text(
        "devices: devices.yaml\n"
        "cloud: {target: 'h:1', key: edge-01, secret: s, tls: {ca: ca.pem, cert: certs, key: edge.key}}\n"
    )
    (tmp_path / "certs").mkdir()
    hint = "hint: check the path; a relative path is relative to the config file's directory"
    with pytest.raises(
        ConfigError,
        match="^"
        + re.escape(
            f"{tmp_path / 'edge.yaml'}: "
            f"devices: the file cannot be read: No such file or directory "
            f"(got '{tmp_path / 'devices.yaml'}'); {hint}; "
            f"cloud.tls.cert: the file cannot be read: Is a directory "
            f"(got '{tmp_path / 'certs'}'); {hint}; "
            f"cloud.tls.key: the file cannot be read: No such file or directory "
            f"(got '{tmp_path / 'edge.key'}'); {hint}"
        )
        + "$",
    ):
        load_config(tmp_path / "edge.yaml")


def environment(tmp_path: Path, **data: object) -> EdgeConfig:
    (tmp_path / "devices.yaml").write_text("devices: []\n")
    return parse_config({"data_dir": str(tmp_path / "var"), **data}, base_dir=tmp_path)


def test_environment_is_fine_with_free_ports_and_no_data_dir_yet(tmp_path):
    check_environment(
        environment(
            tmp_path,
            devices="devices.yaml",
            metrics_listen="127.0.0.1:0",
            transports={"http": {"listen": "127.0.0.1:0"}, "coap": {"listen": "127.0.0.1:0"}},
        )
    )


def test_data_dir_must_not_be_a_file(tmp_path):
    (tmp_path / "var").write_text("")
    with pytest.raises(
        ConfigError,
        match="^"
        + re.escape(
            f"data_dir: {tmp_path / 'var'} is a file, not a directory; hint: point data_dir at "
            "a directory the edge may write to (it is created if missing) or move the file away"
        )
        + "$",
    ):
        check_environment(environment(tmp_path))


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("transports.http.listen", socket.SOCK_STREAM),
        ("transports.coap.listen", socket.SOCK_DGRAM),
        ("metrics_listen", socket.SOCK_STREAM),
    ],
)
def test_listen_ports_must_be_free(tmp_path, key, kind):
    with socket.socket(socket.AF_INET, kind) as busy:
        busy.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        if key == "metrics_listen":
            config = environment(tmp_path, metrics_listen=address)
        else:
            section = key.split(".")[1]
            config = environment(
                tmp_path, devices="devices.yaml", transports={section: {"listen": address}}
            )
        with pytest.raises(
            ConfigError,
            match="^"
            + re.escape(
                f"{key}: {address} is in use (Address already in use); hint: stop the program "
                f"that holds port {address.rsplit(':', 1)[1]} or choose another port"
            )
            + "$",
        ):
            check_environment(config)


def test_listen_address_must_belong_to_this_machine(tmp_path):
    config = environment(tmp_path, metrics_listen="192.0.2.1:9108")
    with pytest.raises(
        ConfigError,
        match=r"^metrics_listen: 192\.0\.2\.1:9108 cannot be bound \(Cannot assign requested "
        r"address\); hint: use an address of this machine, e\.g\. 127\.0\.0\.1:9108$",
    ):
        check_environment(config)


DATA_DIR_HINT = (
    "hint: point data_dir at a directory the edge may write to (it is created if missing)"
)


def test_data_dir_is_created_when_missing(tmp_path):
    check_environment(environment(tmp_path, data_dir=str(tmp_path / "a" / "b")))
    assert (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the write test leaves nothing


def test_data_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "a").write_text("")
    with pytest.raises(
        ConfigError,
        match="^"
        + re.escape(
            f"data_dir: {tmp_path / 'a' / 'var'} cannot be created (Not a directory); {DATA_DIR_HINT}"
        )
        + "$",
    ):
        check_environment(environment(tmp_path, data_dir=str(tmp_path / "a" / "var")))


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory the edge cannot write to: a read-only tmpfs as root, mode 0o500 otherwise."""
    at = tmp_path / "ro"
    at.mkdir()
    if os.geteuid() != 0:
        at.chmod(0o500)
        yield at
        at.chmod(0o700)
        return
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(at)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {done.stderr.decode().strip()}")
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], capture_output=True)


def test_data_dir_must_be_writable(tmp_path, read_only_dir):
    with pytest.raises(
        ConfigError,
        match=r"^data_dir: " + re.escape(str(read_only_dir)) + r" is not writable "
        r"\((Read-only file system|Permission denied)\); " + re.escape(DATA_DIR_HINT) + "$",
    ):
        check_environment(environment(tmp_path, data_dir=str(read_only_dir)))


def test_a_bad_device_registry_fails_at_start_naming_devices(tmp_path):
    (tmp_path / "devices.yaml").write_text("devices: [{id: d1, token: short}]\n")
    config = parse_config(
        {"data_dir": str(tmp_path / "var"), "devices": "devices.yaml"}, base_dir=tmp_path
    )
    with pytest.raises(
        ConfigError,
        match="^"
        + re.escape(f"edge.yaml: devices: {tmp_path / 'devices.yaml'}: devices[0] (d1): token must")
        + ".*",
    ):
        check_environment(config, source="edge.yaml")


def test_every_problem_is_reported_at_once_after_the_config_file(tmp_path):
    (tmp_path / "var").write_text("")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(ConfigError) as err:
            check_environment(environment(tmp_path, metrics_listen=address), source="edge.yaml")
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"edge.yaml: data_dir: {tmp_path / 'var'} is a file")
    assert f"; metrics_listen: {address} is in use (Address already in use)" in text


def test_a_listen_host_that_does_not_resolve(tmp_path):
    config = environment(tmp_path, metrics_listen="no-such-host.invalid:9108")
    with pytest.raises(
        ConfigError,
        match=r"^metrics_listen: no-such-host\.invalid:9108 names a host that does not resolve "
        r"\(.+\); hint: use an address of this machine, e\.g\. 127\.0\.0\.1:9108$",
    ):
        check_environment(config)


def test_listen_addresses_finds_every_listen_key(tmp_path):
    config = environment(
        tmp_path,
        **{
            "metrics_listen": "127.0.0.1:9108",
            "devices": "devices.yaml",
            "transports": {
                "http": {"listen": "127.0.0.1:8080"},
                "coap": {"listen": "[::1]:5683"},
            },
        },
    )
    assert listen_addresses(config) == [
        ("metrics_listen", "127.0.0.1:9108", socket.SOCK_STREAM),
        ("transports.http.listen", "127.0.0.1:8080", socket.SOCK_STREAM),
        ("transports.coap.listen", "[::1]:5683", socket.SOCK_DGRAM),
    ]


def test_journal_partitions_default_to_an_existing_journals_count_else_one(tmp_path):
    from connectors.devices.journal import Journal, JournalSettings
    from flows.ingest_process import journal_partition_count

    config = parse_config({"data_dir": str(tmp_path)})
    assert config.journal.partitions is None
    assert journal_partition_count(config) == 1
    Journal(JournalSettings(root=tmp_path / "journal", partitions=3)).close()
    assert journal_partition_count(config) == 3
    assert (
        journal_partition_count(
            parse_config({"data_dir": str(tmp_path), "journal": {"partitions": 3}})
        )
        == 3
    )


def test_http_max_requests_per_device(tmp_path):
    devices = str(write_devices(tmp_path, "devices: []\n"))
    http = {"listen": "127.0.0.1:8080"}
    config = parse_config({"transports": {"http": http}, "devices": devices})
    assert (
        config.transports.http is not None and config.transports.http.max_requests_per_device == 8
    )
    config = parse_config(
        {"transports": {"http": {**http, "max_requests_per_device": 2}}, "devices": devices}
    )
    assert (
        config.transports.http is not None and config.transports.http.max_requests_per_device == 2
    )
    fails(
        {"transports": {"http": {**http, "max_requests_per_device": 0}}, "devices": devices},
        "transports.http.max_requests_per_device: must be greater than 0 (got 0)",
    )


def test_coap_transfer_limits_and_journal_share_reach_the_ingest_process(tmp_path):
    from flows.ingest_process import _servers, journal_settings

    path = tmp_path / "edge.yaml"
    path.write_text(
        "devices: devices.yaml\n"
        "transports:\n"
        "  coap: {listen: '127.0.0.1:0', max_transfers: 8, max_device_transfers: 3,\n"
        "         transfer_timeout: 20, transfer_deadline: PT2M}\n"
        "journal: {device_share: 0.5}\n"
    )
    (tmp_path / "devices.yaml").write_text("devices: []\n")
    config = load_config(path)
    assert journal_settings(config).device_share == 0.5
    [server] = _servers(config, None)  # type: ignore[arg-type]
    api = server._api
    assert (api._max_transfers, api._max_device_transfers) == (8, 3)
    assert (api._transfer_timeout_s, api._transfer_deadline_s) == (20.0, 120.0)
    assert parse_config({}).journal.device_share == 0.25
    from connectors.devices import coap
    from flows.config import CoapSection

    section = CoapSection(listen="127.0.0.1:0")  # the server's own defaults
    assert (section.max_transfers, section.max_device_transfers) == (
        coap.DEFAULT_MAX_TRANSFERS,
        coap.DEFAULT_MAX_DEVICE_TRANSFERS,
    )
    assert section.transfer_timeout.total_seconds() == coap.DEFAULT_TRANSFER_TIMEOUT_S
    assert section.transfer_deadline.total_seconds() == coap.DEFAULT_TRANSFER_DEADLINE_S


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"coap": {"listen": "127.0.0.1:0", "max_transfers": 2, "max_device_transfers": 3}},
            "transports.coap.max_device_transfers: must be at most max_transfers (2) (got 3); "
            "hint: one device's part of the uploads held",
        ),
        (
            {"coap": {"listen": "127.0.0.1:0", "transfer_deadline": 0}},
            "transports.coap.transfer_deadline: must be more than 0 seconds (got 0); "
            "hint: seconds, e.g. 93 and 300",
        ),
        (
            {"coap": {"listen": "127.0.0.1:0", "max_device_transfers": 0}},
            "transports.coap.max_device_transfers: must be greater than or equal to 1 (got 0)",
        ),
    ],
)
def test_coap_transfer_limits_are_checked(data, message):
    fails({"transports": data}, message)


@pytest.mark.parametrize(
    ("share", "message"),
    [
        (0, "journal.device_share: must be greater than 0 (got 0)"),
        (1.5, "journal.device_share: must be less than or equal to 1 (got 1.5)"),
    ],
)
def test_journal_device_share_is_a_fraction(share, message):
    fails({"journal": {"device_share": share}}, message)


def test_mqtt_server_settings_reach_the_ingest_process(tmp_path):
    from connectors.devices import mqtt_server
    from flows.config import MqttServerSection
    from flows.ingest_process import _servers

    path = tmp_path / "edge.yaml"
    path.write_text(
        "devices: devices.yaml\n"
        "transports:\n"
        "  mqtt_server: {listen: '127.0.0.1:0', max_inflight: 8, max_connections: 10,\n"
        "                max_device_connections: 2}\n"
    )
    (tmp_path / "devices.yaml").write_text("devices: []\n")
    [server] = _servers(load_config(path), None)  # type: ignore[arg-type]
    assert isinstance(server, mqtt_server.MqttServer)
    assert (server.max_inflight, server.max_connections, server.max_device_connections) == (
        8,
        10,
        2,
    )
    section = MqttServerSection(listen="127.0.0.1:0")  # the server's own defaults
    assert (section.max_inflight, section.max_connections, section.max_device_connections) == (
        mqtt_server.DEFAULT_MAX_INFLIGHT,
        mqtt_server.DEFAULT_MAX_CONNECTIONS,
        mqtt_server.DEFAULT_MAX_DEVICE_CONNECTIONS,
    )
    fails(
        {"transports": {"mqtt_server": {"listen": "127.0.0.1:1884"}}},
        "devices: is required by transports.http, transports.coap and "
        "transports.mqtt_server (got null); "
        "hint: set devices: devices.yaml (a list of {id, token})",
    )
    devices = str(tmp_path / "devices.yaml")
    fails(
        {
            "transports": {"mqtt_server": {"listen": "127.0.0.1:1884", "max_inflight": 0}},
            "devices": devices,
        },
        "transports.mqtt_server.max_inflight: must be greater than 0 (got 0)",
    )
