"""The sections of edge.yaml: one pydantic model each, checked when the file is loaded."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from connectors.common.address import parse_host_port
from operators.exception import ReportConfig
from operators.logs import LogsConfig
from operators.spectral import SpectralConfig
from operators.threshold import Rule
from operators.windows import WindowConfig


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


class ListenSection(_Section):
    """``transports.http`` / ``transports.coap``: where the device server listens."""

    listen: str

    @model_validator(mode="after")
    def _host_port(self) -> ListenSection:
        parse_host_port(self.listen, key="listen")
        return self


class HttpSection(ListenSection):
    """``transports.http``: the HTTP device API."""

    max_requests_per_device: int = Field(8, gt=0)
    """Requests one device may have in progress at once (503 beyond)."""


class CoapSection(ListenSection):
    """``transports.coap``: the CoAP device server and its block-wise upload limits."""

    max_transfers: int = Field(16, ge=1, le=4096)
    """Block-wise uploads held at once by the whole server (5.03 beyond)."""
    max_device_transfers: int = Field(2, ge=1)
    """Block-wise uploads one device may hold at once (5.03 beyond, other devices unaffected)."""
    transfer_timeout: timedelta = timedelta(seconds=93)
    """An upload with no block for this long is dropped (RFC 7252 MAX_TRANSMIT_WAIT)."""
    transfer_deadline: timedelta = timedelta(minutes=5)
    """An upload is dropped this long after its first block, however steadily blocks come."""

    @model_validator(mode="after")
    def _limits(self) -> CoapSection:
        if self.max_device_transfers > self.max_transfers:
            msg = (
                f"max_device_transfers: must be at most max_transfers ({self.max_transfers}) "
                f"(got {self.max_device_transfers}); hint: one device's part of the uploads held"
            )
            raise ValueError(msg)
        for name in ("transfer_timeout", "transfer_deadline"):
            seconds = getattr(self, name).total_seconds()
            if seconds <= 0:
                msg = (
                    f"{name}: must be more than 0 seconds (got {seconds:g}); "
                    "hint: seconds, e.g. 93 and 300"
                )
                raise ValueError(msg)
        return self


class MqttServerSection(ListenSection):
    """``transports.mqtt_server``: the edge's own MQTT endpoint, ThingsBoard semantics."""

    max_inflight: int = Field(16, gt=0)
    """Messages of one connection waiting for their journal commit; reading waits beyond."""
    max_connections: int = Field(1024, gt=0)
    """Connections at once (CONNACK 3, server unavailable, beyond)."""
    max_device_connections: int = Field(4, gt=0)
    """Connections of one access token at once (CONNACK 3 beyond)."""


class TransportsSection(_Section):
    """``transports``: how devices reach the edge."""

    mqtt: MqttSection | None = None
    http: HttpSection | None = None
    coap: CoapSection | None = None
    mqtt_server: MqttServerSection | None = None
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
            msg = (
                "needs a tolerance (got absolute: null, percent: null); "
                "hint: set absolute or percent (or both)"
            )
            raise ValueError(msg)
        return self


class WindowSection(_Section):
    """``telemetry.window``: event-time window aggregates per device and key."""

    length: timedelta = timedelta(minutes=1)
    slide: timedelta | None = WindowConfig.slide
    allowed_lateness: timedelta = WindowConfig.allowed_lateness

    @model_validator(mode="after")
    def _check(self) -> WindowSection:
        self.window()
        return self

    def window(self) -> WindowConfig:
        """The window operator's settings (its checks run here)."""
        return WindowConfig(self.length, self.slide, self.allowed_lateness)


class TelemetrySection(_Section):
    """``telemetry``: settings of the standard telemetry flow."""

    deadband: DeadbandSection = DeadbandSection()
    window: WindowSection = WindowSection()


class LogsSection(_Section):
    """``logs``: settings of the logs step of the standard flows (:func:`operators.logs.logs`)."""

    level: str = LogsConfig.level
    window: timedelta = LogsConfig.window
    max_templates: int = LogsConfig.max_templates
    allowed_lateness: timedelta = LogsConfig.allowed_lateness

    @model_validator(mode="after")
    def _check(self) -> LogsSection:
        self.settings()
        return self

    def settings(self) -> LogsConfig:
        """The logs operator's settings (its checks run here)."""
        return LogsConfig(
            level=self.level,
            window=self.window,
            max_templates=self.max_templates,
            allowed_lateness=self.allowed_lateness,
        )


def _alarm_rule(value: object) -> object:
    """An ``alarms`` entry watches ``velocity_rms_mm_s`` unless it names a ``field``."""
    if isinstance(value, dict):
        return {"field": "velocity_rms_mm_s", **value}
    return value


AlarmRule = Annotated[Rule, BeforeValidator(_alarm_rule)]
"""One entry of ``vibration.alarms``: the threshold operator's :class:`Rule`, checked by it."""


class ReportSection(_Section):
    """``vibration.report``: which feature rows the vibration flow sends to the cloud.

    Every row stays in local Parquet/DuckDB; the cloud gets a row when a
    feature moved by more than ``tolerance`` (relative), the ISO zone changed,
    an alarm fired on it, or ``heartbeat`` passed. ``enabled: false`` sends every row.
    """

    enabled: bool = True
    tolerance: float = Field(ReportConfig.tolerance, ge=0, allow_inf_nan=False)
    heartbeat: timedelta | None = ReportConfig.heartbeat

    @model_validator(mode="after")
    def _check(self) -> ReportSection:
        heartbeat = self.heartbeat
        if heartbeat is not None and heartbeat <= timedelta(0):
            msg = (
                f"heartbeat: must be longer than zero (got {heartbeat.total_seconds():g}); "
                "hint: 600 sends a row of a steady machine every 10 minutes, null never"
            )
            raise ValueError(msg)
        self.report()
        return self

    def report(self) -> ReportConfig:
        """The report_by_exception step's settings (its checks run here)."""
        return ReportConfig(tolerance=self.tolerance, heartbeat=self.heartbeat)


class VibrationSection(_Section):
    """``vibration``: spectral features and alarms of the vibration flow."""

    fft_size: int = SpectralConfig.fft_size
    overlap: float = SpectralConfig.overlap
    frames_per_row: int = SpectralConfig.frames_per_row
    bands_hz: tuple[tuple[float, float], ...] = SpectralConfig.bands_hz
    velocity_band_hz: tuple[float, float] = SpectralConfig.velocity_band_hz
    iso_thresholds_mm_s: tuple[float, float, float] = SpectralConfig.iso_thresholds_mm_s
    alarms: tuple[AlarmRule, ...] | None = None
    """None: warn in ISO zone C, critical in zone D (10 % hysteresis), and warn on
    impacts (kurtosis above 8 for 3 rows, cleared below 5; Gaussian noise is 3)."""
    report: ReportSection = ReportSection()

    @model_validator(mode="after")
    def _check(self) -> VibrationSection:
        self.spectral()
        if self.alarms is not None:
            names = [rule.name for rule in self.alarms]
            twice = [name for i, name in enumerate(names) if name in names[:i]]
            if not names:
                msg = "alarms: is empty (got []); hint: leave alarms out for the default rules"
                raise ValueError(msg)
            if twice:
                msg = (
                    f"alarms: rule names must be unique (got {twice[0]!r} twice); "
                    "hint: rename one, the name is the rule column of its alarms"
                )
                raise ValueError(msg)
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
            return self.alarms
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


class LimitsSection(_Section):
    """``limits``: what one device may make the edge hold (docs/config.md explains the numbers)."""

    keys_per_message: int = Field(1000, gt=0)
    """Distinct telemetry keys one message may carry; a message with more is a dead letter."""
    series_per_device: int = Field(1000, gt=0)
    """Distinct keys a device may have in the flow's state; new keys beyond are dead letters."""
    state_bytes_per_device: int = Field(4 * 1024 * 1024, gt=0)
    """Estimated operator state a device's series may take (long keys cost more)."""
    series_total: int = Field(50_000, gt=0)
    """Series the edge holds over all devices (per flow worker)."""
    series_idle_evict: timedelta | None = timedelta(hours=24)
    """Forget a series its device has not sent for this long (device receive time); null: never."""

    @model_validator(mode="after")
    def _evict(self) -> LimitsSection:
        idle = self.series_idle_evict
        if idle is not None and idle <= timedelta(0):
            msg = (
                f"series_idle_evict: must be longer than zero (got {idle.total_seconds():g}); "
                "hint: null keeps idle series forever, 86400 forgets them after a day"
            )
            raise ValueError(msg)
        return self


class CloudTlsSection(_Section):
    """``cloud.tls``: verify the receiver with ``ca``; ``cert``/``key`` for mutual TLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> CloudTlsSection:
        if (self.cert is None) != (self.key is None):
            given, missing = ("cert", "key") if self.key is None else ("key", "cert")
            msg = (
                f"{missing}: is missing, mutual TLS needs both cert and key (got only {given}); "
                f"hint: add {missing}: or remove {given}: for one-way TLS"
            )
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
    batch_age: timedelta = timedelta(seconds=60)
    """Seal a batch when its oldest row has waited this long (each batch costs ~1 KB of headers)."""
    alarm_batch_age: timedelta = timedelta(seconds=1)
    """``batch_age`` of priority-0 streams (alarms): they leave at once."""
    partitions: int = Field(1, ge=1, le=64)
    """Partitions of the cloud sinks: each seals its own batches (fewer, larger batches with 1)."""
    outbox_max_bytes: int = Field(256 * 1024 * 1024, gt=0)
    outbox_ttl: timedelta = timedelta(days=7)
    backoff_max: timedelta = timedelta(seconds=60)
    stop_timeout: timedelta = timedelta(seconds=10)
    """How long a clean stop waits for the cloud to acknowledge the outbox (the rest stays)."""
    bandwidth_bytes_per_s: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _backoff(self) -> CloudSection:
        if self.backoff_max < timedelta(seconds=0.5):
            msg = (
                "backoff_max: must be at least 0.5 seconds, the first retry waits up to 0.5 s "
                f"(got {self.backoff_max.total_seconds():g}); hint: 60 is a good default"
            )
            raise ValueError(msg)
        for name in ("batch_age", "alarm_batch_age"):
            age = getattr(self, name)
            if age <= timedelta(0):
                msg = (
                    f"{name}: must be longer than zero (got {age.total_seconds():g}); hint: "
                    "seconds a batch may gather rows, e.g. 60 (alarm_batch_age: 1)"
                )
                raise ValueError(msg)
        return self


class ParquetSection(_Section):
    """``parquet``: local Parquet files."""

    max_file_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_file_age: timedelta = timedelta(seconds=60)


class JournalSection(_Section):
    """``journal``: the ingest journal under ``data_dir/journal`` that devices are acked from."""

    sync: Literal["full", "normal"] = "full"
    """``full`` survives power loss (fsync per group commit); ``normal`` survives a crash."""
    max_bytes: int = Field(1024 * 1024 * 1024, gt=0)
    """Payload bytes the journal may hold before devices are pushed back (503, 5.03, no PUBACK)."""
    device_share: float = Field(0.25, gt=0, le=1)
    """The most of ``max_bytes`` and of the commit queue one device's messages may hold.

    Beyond it that device alone is pushed back (HTTP 503, CoAP 5.03); MQTT
    messages are kept while the journal has room beyond one share (see
    docs/config.md). 1 turns the per-device limit off.
    """
    partitions: int | None = Field(None, ge=1, le=64)
    """SQLite files the journal is split into by device, fixed when it is created.

    None: an existing journal's own count, else 1 (one fsync per group commit;
    raise it only with several flow workers reading in parallel).
    """


class RecoverySection(_Section):
    """``recovery``: Bytewax recovery snapshots under ``data_dir/recovery/<flow>``."""

    enabled: bool = True
    """Off only to measure its cost: a crash then loses window state and buffered rows."""
    snapshot_interval: timedelta = timedelta(seconds=5)
    """How often operator, source and sink state is snapshotted (Bytewax's epoch length)."""
    partitions: int = Field(4, ge=1, le=64)
    """Recovery database files, created on first start; the most workers a flow may run with."""

    @model_validator(mode="after")
    def _interval(self) -> RecoverySection:
        if not timedelta(seconds=0.1) <= self.snapshot_interval <= timedelta(hours=1):
            msg = (
                "snapshot_interval: must be between 0.1 seconds and 1 hour (got "
                f"{self.snapshot_interval.total_seconds():g} s); hint: 5 replays at most "
                "5 seconds of input after a crash"
            )
            raise ValueError(msg)
        return self


class SinksSection(_Section):
    """``sinks``: which local outputs every stream is written to under ``data_dir``."""

    parquet: bool = True
    """``data_dir/parquet/<stream>/date=YYYY-MM-DD/*.parquet``."""
    duckdb: bool = True
    """``data_dir/edge.duckdb``, one table per stream."""
    duckdb_copy_every: timedelta | None = None
    """Also copy it to ``data_dir/edge-copy.duckdb`` this often, for readers while the edge runs."""
    raw_readings: bool = False
    """Also keep every numeric reading in the local-only stream ``raw_readings`` (the report
    plots them against the kept points); not reduction, so not in the ratio."""

    @model_validator(mode="after")
    def _copy_every(self) -> SinksSection:
        every = self.duckdb_copy_every
        if every is not None and every < timedelta(seconds=1):
            msg = (
                "duckdb_copy_every: must be at least 1 second (got "
                f"{every.total_seconds():g} s); hint: each copy writes the whole database, "
                "e.g. 60"
            )
            raise ValueError(msg)
        return self


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
    logs: LogsSection = LogsSection()
    parquet: ParquetSection = ParquetSection()
    journal: JournalSection = JournalSection()
    recovery: RecoverySection = RecoverySection()
    sinks: SinksSection = SinksSection()
    limits: LimitsSection = LimitsSection()
    cloud: CloudSection | None = None

    @model_validator(mode="after")
    def _across_sections(self) -> EdgeConfig:
        if self.metrics_listen is not None:
            parse_host_port(self.metrics_listen, key="metrics_listen")
        transports = self.transports
        if (transports.http or transports.coap or transports.mqtt_server) and self.devices is None:
            msg = (
                "devices: is required by transports.http, transports.coap and "
                "transports.mqtt_server (got null); "
                "hint: set devices: devices.yaml (a list of {id, token})"
            )
            raise ValueError(msg)
        if self.cloud is not None and self.cloud.key != self.edge_id:
            msg = (
                "cloud.key: must equal edge_id, the receiver checks batches against the key "
                f"(got {self.cloud.key!r}, edge_id {self.edge_id!r}); "
                f"hint: set cloud.key: {self.edge_id} (and that key in the receiver's edges "
                f"file), or edge_id: {self.cloud.key}"
            )
            raise ValueError(msg)
        return self
