from datetime import timedelta
from pathlib import Path

import pytest

from flows.config import ConfigError, EdgeConfig, load_config, parse_config


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


def test_missing_file_is_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; pass --config PATH"):
        load_config(tmp_path / "nope.yaml")


def test_bad_yaml_names_line_and_column(tmp_path):
    path = write(tmp_path, "edge_id: x\ntransports: {mqtt: [\n")
    with pytest.raises(ConfigError, match=r"edge.yaml: not valid YAML at line \d+, column \d+"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match=r"must be a mapping of keys \(got list\)"):
        load_config(path)


def test_unknown_key_is_an_error_with_its_location(tmp_path):
    path = write(tmp_path, "transports:\n  mqtt: {urll: x}\n")
    with pytest.raises(ConfigError, match=r"transports\.mqtt\.urll: unknown key"):
        load_config(path)


def test_wrong_value_shows_what_was_got(tmp_path):
    path = write(tmp_path, "transports:\n  mqtt: {qos: 2}\n")
    with pytest.raises(
        ConfigError, match=r"edge.yaml: invalid configuration: transports\.mqtt\.qos: .*\(got 2\)"
    ):
        load_config(path)


def test_deadband_needs_a_tolerance():
    with pytest.raises(ConfigError, match=r"telemetry\.deadband: set absolute or percent"):
        parse_config({"telemetry": {"deadband": {"absolute": None, "percent": None}}})


def test_negative_tolerance_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"telemetry\.deadband\.absolute: .*greater than or equal to 0.*\(got -1\)",
    ):
        parse_config({"telemetry": {"deadband": {"absolute": -1}}})


def test_http_and_coap_need_a_registry():
    with pytest.raises(ConfigError, match=r"transports\.http/coap need a device registry"):
        parse_config({"transports": {"http": {"listen": "127.0.0.1:8080"}}})


def test_listen_must_be_host_port():
    with pytest.raises(
        ConfigError,
        match=r"transports\.coap: listen: must be HOST:PORT, .* \(got '5683'\); hint: give both",
    ):
        parse_config({"devices": "d.yaml", "transports": {"coap": {"listen": "5683"}}})


def test_metrics_listen_must_be_host_port():
    assert parse_config({"metrics_listen": "localhost:9100"}).metrics_listen == "localhost:9100"
    with pytest.raises(
        ConfigError,
        match=r"metrics_listen: must be HOST:PORT, .* \(got 'localhost'\); hint: give both",
    ):
        parse_config({"metrics_listen": "localhost"})


def test_listen_accepts_ipv6_and_queue_bound(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text(
        "devices: devices.yaml\n"
        "transports: {http: {listen: '[::1]:8080'}, coap: {listen: '127.0.0.1:5683'}, queue_messages: 50}\n"
    )
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
    cloud = load_config(path).cloud
    assert cloud is not None and cloud.send_points and cloud.outbox_ttl == timedelta(days=1)
    assert cloud.tls is not None and cloud.tls.ca == tmp_path / "ca.pem" and cloud.tls.key == tmp_path / "edge.key"
    assert "s3cret" not in repr(cloud)


def test_cloud_tls_needs_cert_and_key_together():
    with pytest.raises(ConfigError, match=r"cloud\.tls: set both cert and key for mutual TLS, or neither"):
        parse_config({"cloud": {"target": "h:1", "key": "k", "secret": "s", "tls": {"ca": "ca.pem", "cert": "c.pem"}}})


def test_cloud_backoff_has_a_floor():
    with pytest.raises(ConfigError, match=r"cloud: backoff_max must be at least 0\.5 seconds"):
        parse_config({"cloud": {"target": "h:1", "key": "k", "secret": "s", "backoff_max": 0.1}})
