"""Edge configuration (edge.yaml), validated at load time.

Durations are seconds (``60``, ``0.5``) or ISO 8601 (``PT1M``). Unknown keys are
errors, so a typo fails at start instead of being silently ignored.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from connectors.common.address import parse_host_port
from connectors.common.yamlfile import read_yaml
from operators.spectral import SpectralConfig
from operators.threshold import Rule

__all__ = [
    "ConfigError",
    "DeadbandSection",
    "CloudSection",
    "EdgeConfig",
    "ListenSection",
    "MqttSection",
    "ParquetSection",
    "TelemetrySection",
    "VibrationSection",
    "WindowSection",
    "load_config",
    "parse_config",
]


class ConfigError(ValueError):
    """The edge configuration is invalid; the message names the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttSection(_Section):
    """``transports.mqtt``: the broker the edge subscribes to."""

    url: str = "mqtt://127.0.0.1:1883"
    qos: Literal[0, 1] = 1
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    persistent: bool = True
    keepalive: int = Field(30, gt=0)
    buffer_messages: int = Field(10_000, gt=0)


class ListenSection(_Section):
    """``transports.http`` / ``transports.coap``: where the device server listens."""

    listen: str

    @model_validator(mode="after")
    def _host_port(self) -> ListenSection:
        parse_host_port(self.listen, key="listen")
        return self


class TransportsSection(_Section):
    """``transports``: how devices reach the edge."""

    mqtt: MqttSection | None = None
    http: ListenSection | None = None
    coap: ListenSection | None = None
    queue_messages: int = Field(10_000, gt=0)
    """Bound of the hand-off queue of the HTTP and CoAP servers (503 / 5.03 beyond)."""


class DeadbandSection(_Section):
    """``telemetry.deadband``: a reading passes when it moves more than this."""

    absolute: float | None = Field(0.1, ge=0)
    percent: float | None = Field(None, ge=0)
    max_silence: timedelta | None = timedelta(minutes=10)

    @model_validator(mode="after")
    def _one_tolerance(self) -> DeadbandSection:
        if self.absolute is None and self.percent is None:
            msg = "set absolute or percent (or both); a deadband needs a tolerance"
            raise ValueError(msg)
        return self


class WindowSection(_Section):
    """``telemetry.window``: event-time window aggregates per device and key."""

    length: timedelta = timedelta(minutes=1)
    slide: timedelta | None = None
    allowed_lateness: timedelta = timedelta(seconds=5)


class TelemetrySection(_Section):
    """``telemetry``: settings of the standard telemetry flow."""

    deadband: DeadbandSection = DeadbandSection()
    window: WindowSection = WindowSection()


class AlarmRuleSection(_Section):
    """One entry of ``vibration.alarms``: a threshold rule on a feature column."""

    name: str
    field: str = "velocity_rms_mm_s"
    raise_above: float | None = None
    clear_below: float | None = None
    raise_below: float | None = None
    clear_above: float | None = None
    min_duration: timedelta = timedelta(0)
    min_count: int = 1
    severity: str = "warning"

    def rule(self) -> Rule:
        """The operator's rule (its checks run here)."""
        return Rule(**self.model_dump())


class VibrationSection(_Section):
    """``vibration``: spectral features and alarms of the vibration flow."""

    fft_size: int = 4096
    overlap: float = 0.0
    frames_per_row: int = 6
    bands_hz: tuple[tuple[float, float], ...] = ((10, 100), (100, 1000), (1000, 5000))
    velocity_band_hz: tuple[float, float] = (10.0, 1000.0)
    iso_thresholds_mm_s: tuple[float, float, float] = (1.4, 2.8, 4.5)
    alarms: tuple[AlarmRuleSection, ...] | None = None
    """None: warn in ISO zone C, critical in zone D (10 % hysteresis), and warn on
    impacts (kurtosis above 8 for 3 rows, cleared below 5; Gaussian noise is 3)."""

    @model_validator(mode="after")
    def _check(self) -> VibrationSection:
        self.spectral()
        self.rules()
        return self

    def spectral(self) -> SpectralConfig:
        """The spectral operator's settings (its checks run here)."""
        return SpectralConfig(
            fft_size=self.fft_size,
            overlap=self.overlap,
            frames_per_row=self.frames_per_row,
            bands_hz=self.bands_hz,
            velocity_band_hz=self.velocity_band_hz,
            iso_thresholds_mm_s=self.iso_thresholds_mm_s,
        )

    def rules(self) -> tuple[Rule, ...]:
        """The alarm rules: configured ones, or the defaults (ISO zones C/D, impacts)."""
        if self.alarms is not None:
            return tuple(a.rule() for a in self.alarms)
        _, zone_c, zone_d = self.iso_thresholds_mm_s
        return (
            Rule(
                "iso_zone_c",
                "velocity_rms_mm_s",
                raise_above=zone_c,
                clear_below=0.9 * zone_c,
                min_count=2,
                severity="warning",
            ),
            Rule(
                "iso_zone_d",
                "velocity_rms_mm_s",
                raise_above=zone_d,
                clear_below=0.9 * zone_d,
                min_count=2,
                severity="critical",
            ),
            Rule(
                "impacts_kurtosis",
                "kurtosis",
                raise_above=8.0,
                clear_below=5.0,
                min_count=3,
                severity="warning",
            ),
        )


class CloudTlsSection(_Section):
    """``cloud.tls``: verify the receiver with ``ca``; ``cert``/``key`` for mutual TLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> CloudTlsSection:
        if (self.cert is None) != (self.key is None):
            msg = "set both cert and key for mutual TLS, or neither"
            raise ValueError(msg)
        return self


class CloudSection(_Section):
    """``cloud``: the gRPC receiver that reduced streams are sent to, through the outbox."""

    target: str
    key: str = Field(min_length=1)
    secret: str = Field(min_length=1, repr=False)
    tls: CloudTlsSection | None = None
    send_points: bool = False
    """Also send ``telemetry_points`` (summaries, features and alarms are always sent)."""
    batch_rows: int = Field(10_000, gt=0)
    batch_age: timedelta = timedelta(seconds=10)
    outbox_max_bytes: int = Field(256 * 1024 * 1024, gt=0)
    outbox_ttl: timedelta = timedelta(days=7)
    backoff_max: timedelta = timedelta(seconds=60)
    stop_timeout: timedelta = timedelta(seconds=10)
    """How long a clean stop waits for the cloud to acknowledge the outbox (the rest stays)."""
    bandwidth_bytes_per_s: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _backoff(self) -> CloudSection:
        if self.backoff_max < timedelta(seconds=0.5):
            msg = "backoff_max must be at least 0.5 seconds (the first retry waits up to 0.5 s)"
            raise ValueError(msg)
        return self


class ParquetSection(_Section):
    """``parquet``: local Parquet files."""

    max_file_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_file_age: timedelta = timedelta(seconds=60)


class EdgeConfig(_Section):
    """The whole edge configuration file."""

    edge_id: str = Field("edge-01", min_length=1)
    data_dir: Path = Path("./var")
    devices: Path | None = None
    max_payload_bytes: int = Field(1024 * 1024, gt=0)
    metrics_listen: str | None = None
    transports: TransportsSection = TransportsSection()
    telemetry: TelemetrySection = TelemetrySection()
    vibration: VibrationSection = VibrationSection()
    parquet: ParquetSection = ParquetSection()
    cloud: CloudSection | None = None

    @model_validator(mode="after")
    def _metrics_host_port(self) -> EdgeConfig:
        if self.metrics_listen is not None:
            parse_host_port(self.metrics_listen, key="metrics_listen")
        return self


def _describe(err: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    got = err.get("input")
    text = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key; check the spelling against the documented keys"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    if isinstance(got, dict):
        return f"{where}: {text}"
    return f"{where}: {text} (got {got!r})"


def parse_config(
    data: object, *, source: str = "<config>", base_dir: Path | None = None
) -> EdgeConfig:
    """Validate already-parsed YAML/JSON data; relative paths resolve against ``base_dir``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        msg = (
            f"{source}: the configuration must be a mapping of keys "
            f"(got {type(data).__name__}); see the README for an example edge.yaml"
        )
        raise ConfigError(msg)
    try:
        config = EdgeConfig.model_validate(data)
    except ValidationError as exc:
        lines = "; ".join(_describe(e) for e in exc.errors())
        msg = f"{source}: invalid configuration: {lines}"
        raise ConfigError(msg) from None
    transports = config.transports
    if (transports.http or transports.coap) and config.devices is None:
        msg = (
            f"{source}: transports.http/coap need a device registry; "
            "set devices: devices.yaml (a list of {id, token})"
        )
        raise ConfigError(msg)
    if base_dir is not None:
        update: dict[str, Path] = {}
        if not config.data_dir.is_absolute():
            update["data_dir"] = base_dir / config.data_dir
        if config.devices is not None and not config.devices.is_absolute():
            update["devices"] = base_dir / config.devices
        tls = config.cloud.tls if config.cloud is not None else None
        if config.cloud is not None and tls is not None:
            paths = {
                name: (p if p is None or p.is_absolute() else base_dir / p)
                for name, p in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key))
            }
            update["cloud"] = config.cloud.model_copy(update={"tls": tls.model_copy(update=paths)})
        config = config.model_copy(update=update)
    return config


def load_config(path: str | Path) -> EdgeConfig:
    """Read and validate an edge configuration file."""
    path = Path(path)
    data = read_yaml(
        path,
        what="config file",
        missing_hint="pass --config PATH (see README)",
        error=ConfigError,
    )
    return parse_config(data, source=str(path), base_dir=path.parent.resolve())
