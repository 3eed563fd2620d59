"""The step kinds of a flow file: one small entry per operator.

Each entry names the Python function it calls (imported when the flow is
built, so a kind whose operator is not installed fails only the files that
use it), its settings (exactly the function's keyword settings), which
streams it takes and gives, where omitted settings come from in the edge
config, and how it is called.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import bytewax.operators as op
from bytewax.dataflow import Stream
from pydantic import Field

from flows.config import EdgeConfig
from flows.flowfile.model import Duration, PositiveDuration, Refs, Settings

__all__ = ["KINDS", "LETTERABLE", "MODELS", "Built", "Call", "Kind", "SettingError"]

MODELS: dict[str, str | None] = {
    "series": "telemetry_points",
    "readings": "telemetry_points",
    "text": "telemetry_text",
    "attributes": "device_attributes",
    "blocks": None,
    "summaries": "telemetry_summary",
    "features": "vibration_features",
    "alarms": "alarms",
    "letters": "dead_letters",
    "logs": None,
    "log_events": "log_events",
    "log_summary": "log_summary",
    "dropped": None,
}
"""The kind of record a stream carries, and the standard stream whose columns it has."""

LETTERABLE = frozenset({"series", "readings", "text", "attributes", "blocks", "logs"})
"""Records ``dead_letters`` takes with a ``reason`` (they keep their device API payload)."""


class SettingError(ValueError):
    """A step setting is wrong: ``path`` is relative to the step (``rules.0.field``)."""

    def __init__(self, path: str, text: str) -> None:
        super().__init__(f"{path}: {text}")
        self.path = path
        self.text = text


def _given(settings: Settings) -> dict[str, Any]:
    """The settings written in the file (lists as tuples, like the Python defaults)."""
    out = {}
    for name in settings.model_fields_set - {"op", "from_"}:
        value = getattr(settings, name)
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _section(section: object, settings: type[Settings]) -> dict[str, Any]:
    """The settings of ``settings`` that an edge config section also has."""
    if section is None:
        return {}
    return {
        name: getattr(section, name) for name in settings.model_fields if hasattr(section, name)
    }


# -- settings --------------------------------------------------------------------------------

_CONFIG = "omitted: from the edge config"


class DeadbandSettings(Settings):
    """``op: deadband`` (``operators.deadband.deadband``); defaults: ``telemetry.deadband``."""

    absolute: float | None = Field(None, description=f"band in the series' units; {_CONFIG}")
    percent: float | None = Field(None, description=f"band in % of the last kept value; {_CONFIG}")
    max_silence: PositiveDuration | None = Field(None, description=f"heartbeat; {_CONFIG}")


class WindowSettings(Settings):
    """``op: window`` (``operators.windows.window_aggregate``); defaults: ``telemetry.window``."""

    length: PositiveDuration = Field(None, description=f"window length; {_CONFIG}")  # type: ignore[assignment]
    slide: PositiveDuration | None = Field(None, description="null: tumbling windows")
    allowed_lateness: Duration = Field(None, description=_CONFIG)  # type: ignore[assignment]
    align_to: datetime = Field(None, description="an instant that starts a window (UTC)")  # type: ignore[assignment]


class SpectralSettings(Settings):
    """``op: spectral`` (``operators.spectral.spectral``); defaults: ``vibration``."""

    fft_size: int = Field(None, description=f"samples per frame, a power of two; {_CONFIG}")  # type: ignore[assignment]
    overlap: float = Field(None, description=_CONFIG)  # type: ignore[assignment]
    frames_per_row: int = Field(None, description=_CONFIG)  # type: ignore[assignment]
    bands_hz: list[tuple[float, float]] = Field(None, description=_CONFIG)  # type: ignore[assignment]
    velocity_band_hz: tuple[float, float] = Field(None, description=_CONFIG)  # type: ignore[assignment]
    iso_thresholds_mm_s: tuple[float, float, float] = Field(None, description=_CONFIG)  # type: ignore[assignment]
    max_gap: PositiveDuration | None = Field(None, description="null: half a sample period")


class RuleSpec(Settings):
    """One alarm rule (``operators.threshold.Rule``)."""

    name: str
    field: str
    raise_above: float | None = None
    clear_below: float | None = None
    raise_below: float | None = None
    clear_above: float | None = None
    min_duration: Duration = timedelta(0)
    min_count: int = 1
    severity: Literal["info", "warning", "critical"] = "warning"


class ThresholdSettings(Settings):
    """``op: threshold`` (``operators.threshold.threshold``); default rules: ``vibration``."""

    rules: list[RuleSpec] = Field(None, min_length=1, description=_CONFIG)  # type: ignore[assignment]


class FilterSettings(Settings):
    """``op: filter`` (``operators.filter.filter_items``)."""

    devices: list[str] | None = Field(None, description="device name patterns to keep")
    keys: list[str] | None = Field(None, description="telemetry keys to keep")
    min_value: float | None = None
    max_value: float | None = None
    where: str | None = Field(None, description='an expression, e.g. "value > 3"')


class LogsSettings(Settings):
    """``op: logs`` (``operators.logs.logs``); defaults: ``logs``."""

    level: Literal["trace", "debug", "info", "notice", "warning", "error", "critical"] = Field(
        None,  # type: ignore[assignment]
        description=f"lowest level kept; {_CONFIG}",
    )
    window: PositiveDuration = Field(None, description=_CONFIG)  # type: ignore[assignment]
    max_templates: int = Field(None, description=_CONFIG)  # type: ignore[assignment]
    allowed_lateness: Duration = Field(None, description=_CONFIG)  # type: ignore[assignment]


class ReportSettings(Settings):
    """``op: report_by_exception`` (``operators.exception``); defaults: ``vibration.report``."""

    tolerance: float = Field(None, ge=0, description=_CONFIG)  # type: ignore[assignment]
    heartbeat: PositiveDuration | None = Field(None, description=_CONFIG)
    floors: dict[str, float] | None = Field(
        None, description="absolute floor per watched feature (omitted: the operator's own)"
    )
    alarms: str | None = Field(None, description="a stream of alarms that force a report")


# -- calling ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """What a kind's ``call`` gets: the step, its merged input and its settings."""

    step_id: str
    up: Stream[Any]
    kwargs: dict[str, Any]
    """Settings: the file's, then the edge config's, as keyword arguments."""
    takes: str
    """The kind of record ``up`` carries (see :data:`MODELS`)."""
    function: Callable[..., Any]


@dataclass(frozen=True)
class Built:
    """A step's output streams (the first is the step's own) and how rejects become letters."""

    streams: dict[str, Stream[Any]]
    letters: dict[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Kind:
    """One step kind: ``op:`` in the file."""

    op: str
    function: str
    """``module:function`` of the operator."""
    settings: type[Settings]
    takes: frozenset[str]
    gives: Callable[[str], dict[str, str]]
    """The output streams and their records, by the records taken; the first is the main one."""
    call: Callable[[Call], Built]
    defaults: Callable[[EdgeConfig], dict[str, Any]] = lambda _config: {}
    rejects: frozenset[str] = frozenset()
    """Outputs that go to ``dead_letters`` when no step or output takes them."""
    streams: tuple[str, ...] = ()
    """Settings that name a stream of the flow rather than a value."""
    off: Callable[[EdgeConfig], bool] = lambda _config: False
    """Whether the edge config switches the step off: it then passes its input on unchanged."""

    def load(self) -> Callable[..., Any]:
        """The operator function (imported now)."""
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]

    def available(self) -> bool:
        """Whether the operator's module is installed."""
        try:
            self.load()
        except (ImportError, AttributeError):
            return False
        return True

    def kwargs(self, settings: Settings, config: EdgeConfig) -> dict[str, Any]:
        """Keyword settings for the function: the file's, else the edge config's."""
        given = _given(settings)
        for name in self.streams:
            given.pop(name, None)
        if isinstance(settings, ThresholdSettings) and "rules" in given:
            given["rules"] = _rules(settings.rules)
        return {**self.defaults(config), **given}


def _rules(specs: list[RuleSpec]) -> tuple[Any, ...]:
    from flows.flowfile.errors import operator_error
    from operators.threshold import Rule

    rules = []
    for i, spec in enumerate(specs):
        try:
            rules.append(Rule(**spec.model_dump()))
        except (TypeError, ValueError) as exc:
            key, text = operator_error(str(exc))
            raise SettingError(f"rules.{i}" + (f".{key}" if key else ""), text) from None
    return tuple(rules)


def _same(takes: str) -> dict[str, str]:
    return {"kept": takes, "dropped": "dropped"}


def _late_letter(allowed_lateness: timedelta) -> Callable[[Any], Any]:
    from flows.telemetry import late_letter

    return lambda reading: late_letter(reading, allowed_lateness)


def _window(c: Call) -> Built:
    from operators.windows import WindowConfig

    agg = c.function(c.step_id, c.up, **c.kwargs)
    lateness = c.kwargs.get("allowed_lateness", WindowConfig.allowed_lateness)
    return Built({"down": agg.down, "late": agg.late}, {"late": _late_letter(lateness)})


def _logs(c: Call) -> Built:
    from flows.logs import late_letter
    from operators.logs import LogsConfig

    out = c.function(c.step_id, c.up, **c.kwargs)
    lateness = c.kwargs.get("allowed_lateness", LogsConfig.allowed_lateness)
    return Built(
        {"events": out.events, "summary": out.summary, "late": out.late},
        {"late": lambda line: late_letter(line, lateness)},
    )


def _threshold(c: Call) -> Built:
    up = c.up
    if c.takes == "features":  # one monitored entity per device and axis
        up = op.map(f"{c.step_id}_by_axis", up, lambda kv: (f"{kv[1].device}/{kv[1].axis}", kv[1]))
    raised = c.function(c.step_id, up, **c.kwargs)
    rows = op.map(f"{c.step_id}_rows", raised, lambda kv: dataclasses.replace(kv[1], key=kv[0]))
    return Built({"down": rows})


def _threshold_defaults(config: EdgeConfig) -> dict[str, Any]:
    return {"rules": config.vibration.rules()}


def _report(c: Call) -> Built:
    kwargs = dict(c.kwargs)
    alarms = kwargs.get("alarms")
    if alarms is not None:  # threshold rows carry their monitored entity as key
        kwargs["alarms"] = op.map(f"{c.step_id}_alarms_by_key", alarms, lambda a: (a.key, a))
    up = op.map(f"{c.step_id}_by_axis", c.up, lambda kv: (f"{kv[1].device}/{kv[1].axis}", kv[1]))
    return Built({"down": c.function(c.step_id, up, **kwargs)})


def _plain(c: Call) -> Built:
    return Built({"down": c.function(c.step_id, c.up, **c.kwargs)})


def _several(*names: str) -> Callable[[Call], Built]:
    def call(c: Call) -> Built:
        out = c.function(c.step_id, c.up, **c.kwargs)
        return Built({name: getattr(out, name) for name in names})

    return call


_NUMBERS = frozenset({"series", "readings"})

KINDS: dict[str, Kind] = {
    kind.op: kind
    for kind in (
        Kind(
            "filter",
            "operators.filter:filter_items",
            FilterSettings,
            frozenset(MODELS),
            _same,
            _several("kept", "dropped"),
            rejects=frozenset({"dropped"}),
        ),
        Kind(
            "deadband",
            "operators.deadband:deadband",
            DeadbandSettings,
            _NUMBERS,
            lambda _t: {"down": "readings"},
            _plain,
            lambda config: _section(config.telemetry.deadband, DeadbandSettings),
        ),
        Kind(
            "window",
            "operators.windows:window_aggregate",
            WindowSettings,
            _NUMBERS,
            lambda _t: {"down": "summaries", "late": "readings"},
            _window,
            lambda config: _section(config.telemetry.window, WindowSettings),
            rejects=frozenset({"late"}),
        ),
        Kind(
            "spectral",
            "operators.spectral:spectral",
            SpectralSettings,
            frozenset({"blocks"}),
            lambda _t: {"features": "features", "errors": "letters"},
            _several("features", "errors"),
            lambda config: _section(config.vibration, SpectralSettings),
            rejects=frozenset({"errors"}),
        ),
        Kind(
            "threshold",
            "operators.threshold:threshold",
            ThresholdSettings,
            frozenset({"features", "readings", "series", "summaries"}),
            lambda _t: {"down": "alarms"},
            _threshold,
            _threshold_defaults,
        ),
        Kind(
            "logs",
            "operators.logs:logs",
            LogsSettings,
            frozenset({"logs"}),
            lambda _t: {"events": "log_events", "summary": "log_summary", "late": "logs"},
            _logs,
            lambda config: _section(config.logs, LogsSettings),
            rejects=frozenset({"late"}),
        ),
        Kind(
            "report_by_exception",
            "operators.exception:report_by_exception",
            ReportSettings,
            frozenset({"features"}),
            lambda _t: {"down": "features"},
            _report,
            lambda config: _section(getattr(config.vibration, "report", None), ReportSettings),
            streams=("alarms",),
            off=lambda config: not config.vibration.report.enabled,
        ),
    )
}
"""Every step kind, by its ``op:`` name."""

STEP_MODELS: dict[str, type[Settings]] = {}
"""Each kind's settings plus ``op`` and ``from``: what one entry of ``steps`` is checked against."""


def step_model(kind: Kind) -> type[Settings]:
    """The model of one ``steps`` entry of ``kind`` (settings, ``op`` and ``from``)."""
    from pydantic import create_model

    model = STEP_MODELS.get(kind.op)
    if model is None:
        name = "".join(part.title() for part in kind.op.split("_")) + "Step"
        model = create_model(  # type: ignore[call-overload]
            name,
            __base__=kind.settings,
            __doc__=kind.settings.__doc__,
            op=(Literal[kind.op], Field(description="the step kind")),  # type: ignore[valid-type]
            from_=(Refs, Field(alias="from", description="the stream(s) it takes, merged")),
        )
        STEP_MODELS[kind.op] = model
    return model
