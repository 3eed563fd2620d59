"""Edge configuration (edge.yaml), validated at load time.

Durations are seconds (``60``, ``0.5``) or ISO 8601 (``PT1M``). Unknown keys are
errors, so a typo fails at start instead of being silently ignored.
"""

from flows.config.environment import (
    bind_problem,
    check_environment,
    data_dir_problem,
    environment_problems,
    listen_addresses,
    listen_problem,
)
from flows.config.parse import load_config, parse_config
from flows.config.sections import (
    CloudSection,
    CoapSection,
    ConfigError,
    DeadbandSection,
    EdgeConfig,
    HttpSection,
    JournalSection,
    LimitsSection,
    ListenSection,
    LogsSection,
    MqttSection,
    MqttServerSection,
    ParquetSection,
    RecoverySection,
    ReportSection,
    SinksSection,
    TelemetrySection,
    VibrationSection,
    WindowSection,
)

__all__ = [
    "ConfigError",
    "DeadbandSection",
    "CloudSection",
    "CoapSection",
    "EdgeConfig",
    "HttpSection",
    "ListenSection",
    "MqttServerSection",
    "MqttSection",
    "JournalSection",
    "LimitsSection",
    "LogsSection",
    "ParquetSection",
    "RecoverySection",
    "ReportSection",
    "SinksSection",
    "TelemetrySection",
    "VibrationSection",
    "WindowSection",
    "bind_problem",
    "check_environment",
    "data_dir_problem",
    "environment_problems",
    "listen_addresses",
    "listen_problem",
    "load_config",
    "parse_config",
]
