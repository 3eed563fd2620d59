"""The flow file's shape: pydantic models, durations, reading YAML and describing errors."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)

from flows.config import ConfigError
from flows.config.parse import TYPE_HINTS
from flows.ingest import CHANNELS

__all__ = [
    "Duration",
    "FlowFileError",
    "FlowFileModel",
    "InputSpec",
    "OutputSpec",
    "PartSpec",
    "PositiveDuration",
    "Settings",
    "describe",
    "read_flow_yaml",
]

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_HINT = 'a duration like "10s", "5m", "1h", "250ms" or a number of seconds'


class FlowFileError(ConfigError):
    """A flow file is invalid: one line per problem, each naming the file and the key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _duration(minimum: float, strict: bool) -> Any:
    def parse(value: object) -> timedelta:
        seconds: float | None = None
        if isinstance(value, timedelta):
            seconds = value.total_seconds()
        elif isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.match(value)):
            seconds = float(m[1]) * _UNITS[m[2]]
        if seconds is None:
            msg = f"must be {_DURATION_HINT} (got {value!r}); hint: e.g. 10s"
            raise ValueError(msg)
        if seconds < minimum or (strict and seconds == minimum):
            bound = "> 0" if strict else ">= 0"
            msg = f"must be a duration {bound} (got {value!r}); hint: {_DURATION_HINT}"
            raise ValueError(msg)
        return timedelta(seconds=seconds)

    return parse


_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number"},
        {"type": "string", "pattern": r"^\s*-?\d+(\.\d+)?\s*(ms|s|m|h|d)\s*$"},
    ],
    "description": _DURATION_HINT,
}
PositiveDuration = Annotated[
    timedelta, BeforeValidator(_duration(0, True)), WithJsonSchema(_DURATION_SCHEMA)
]
"""A duration > 0: ``"10s"``, ``"5m"``, ``"1h"``, ``"250ms"``, ``"2d"`` or seconds."""
Duration = Annotated[
    timedelta, BeforeValidator(_duration(0, False)), WithJsonSchema(_DURATION_SCHEMA)
]
"""A duration >= 0."""

Channel = Literal[CHANNELS]  # type: ignore[valid-type]


def _refs(value: object) -> object:
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    ):
        return value
    msg = (
        f"must name a stream or a list of streams (got {value!r}); "
        "hint: from: in.series, or from: [window.late, spectral.errors]"
    )
    raise ValueError(msg)


Refs = Annotated[str | list[str], BeforeValidator(_refs)]
"""``from:``: one stream (``in.series``, ``window``, ``window.late``) or a list, merged."""


class Settings(BaseModel):
    """Base of a step kind's settings: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class InputSpec(Settings):
    """``inputs.NAME``: the flow's device input (``edge.devices``)."""

    channels: list[Channel] = Field(min_length=1)  # type: ignore[valid-type]


class PartSpec(Settings):
    """``parts.NAME``: a part with its own report, counting these channels."""

    channels: list[Channel] = Field(min_length=1)  # type: ignore[valid-type]


class OutputSpec(Settings):
    """``outputs.STREAM``: where rows go (``edge.output``, ``edge.dead_letters``)."""

    from_: Refs = Field(alias="from")
    cloud_from: Refs | None = Field(
        None,
        description="rows sent to the cloud instead of from's, which then stay local "
        "(e.g. the rows a report_by_exception step passes)",
    )
    like: str | None = None
    cloud: bool | None = None
    priority: int | None = Field(None, ge=0)
    max_file_age: PositiveDuration | None = None
    part: str | None = None
    reason: str | None = Field(None, min_length=1)
    publish: bool = False


class FlowFileModel(Settings):
    """A whole flow file."""

    flow: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    inputs: dict[str, InputSpec] = Field(min_length=1)
    parts: dict[str, PartSpec] = {}
    steps: dict[str, dict[str, Any]] = {}
    outputs: dict[str, OutputSpec] = Field(min_length=1)


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} given twice (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_flow_yaml(path: Path) -> object:
    """The parsed flow file; a missing file or bad YAML is a :class:`FlowFileError` (with line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        msg = f"{path}: the flow file does not exist; hint: check the path"
        raise FlowFileError([msg]) from None
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"{path}: the flow file cannot be read ({exc}); hint: a UTF-8 YAML file"
        raise FlowFileError([msg]) from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "syntax error"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        msg = (
            f"{path}: not valid YAML{where}: {problem}; hint: check the indentation and "
            "quote values with ':' or '#' in them"
        )
        raise FlowFileError([msg]) from None


_TYPE_HINTS = {
    **TYPE_HINTS,
    "dict_type": "write a mapping of keys, e.g. {key: value}",
    "list_type": "write a list, e.g. [a, b]",
    "string_pattern_mismatch": "letters, digits, _ and -, e.g. telemetry",
    "greater_than_equal": "a value at or above the bound",
    "too_short": "give at least one",
    "literal_error": "one of the values listed",
}


def describe(
    exc: ValidationError, prefix: tuple[str | int, ...], model: type[BaseModel]
) -> list[str]:
    """Each pydantic error as ``path: problem (got X); hint: ...`` (``prefix`` leads the path)."""
    out = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p not in ("str", "list[str]"))
        where = ".".join(str(p) for p in (*prefix, *loc))
        kind = err["type"]
        if kind == "extra_forbidden":
            keys = ", ".join(_fields(model, loc[:-1]))
            out.append(f"{where}: unknown key; hint: the keys here are {keys}")
            continue
        if kind == "missing":
            out.append(f"{where}: required key is missing; hint: add {loc[-1]}:")
            continue
        text = err["msg"].removeprefix("Value error, ")
        if kind == "value_error":
            out.append(f"{where}: {text}")
            continue
        got = err.get("input")
        problem = re.sub(r"^\w+ should ", "must ", text)
        line = f"{where}: {problem}"
        if not isinstance(got, dict):
            line += f" (got {got!r})"
        hint = _TYPE_HINTS.get(kind)
        out.append(f"{line}; hint: {hint}" if hint else line)
    return out


def _fields(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The keys (aliases) valid at ``loc`` inside ``model``."""
    current: Any = model
    for part in loc:  # a dict key or list index keeps the model of its values
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is not None:
                current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(f.alias or name for name, f in current.model_fields.items())
    return []


def _model_in(annotation: object) -> type[BaseModel] | None:
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None
