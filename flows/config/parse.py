"""Loading edge.yaml: validation errors as one line per problem, with the key path and a hint."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args

from pydantic import (
    BaseModel,
    ValidationError,
)

from connectors.common.yamlfile import read_yaml
from flows.config.sections import ConfigError, EdgeConfig

TYPE_HINTS = {
    "time_delta_parsing": "seconds or ISO 8601 like PT5M",
    "time_delta_type": "seconds or ISO 8601 like PT5M",
    "int_parsing": "a whole number, e.g. 10",
    "int_from_float": "a whole number, e.g. 10",
    "int_type": "a whole number, e.g. 10",
    "float_parsing": "a number, e.g. 0.5",
    "float_type": "a number, e.g. 0.5",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": 'quote the value, e.g. "5"',
    "string_too_short": "give a non-empty value or leave the key out",
    "model_type": "write a mapping of keys, e.g. {key: value}",
    "dataclass_type": "write a mapping of keys, e.g. {key: value}",
    "tuple_type": "write a list, e.g. [1, 2]",
}
"""The hint of a pydantic error, by its type (edge.yaml and flow files)."""
_OPERATOR = re.compile(
    r"^(?:spectral|window_aggregate|logs|threshold rule(?: '[^']*')?:?) (?:`(?P<key>[\w\[\]]+)` )?"
    r"(?P<problem>.*?); got (?P<got>.*?)\. Hint: (?P<hint>.*?)\.?$",
    re.DOTALL,
)
_SUBKEY = re.compile(r"^(?P<key>[A-Za-z_][\w.]*): (?P<rest>.*)$", re.DOTALL)
_TIMEDELTA = re.compile(r"datetime\.timedelta\((?P<args>[^)]*)\)")


def _seconds(match: re.Match[str]) -> str:
    args = dict(arg.split("=") for arg in match["args"].split(", ") if "=" in arg)
    return f"{timedelta(**{k: int(v) for k, v in args.items()}).total_seconds():g}"


def _plain(text: str) -> str:
    """Operator wording in YAML terms: ``key: value``, null, durations in seconds."""
    text = _TIMEDELTA.sub(_seconds, text.replace("`", ""))
    text = re.sub(r"\btimedelta\((?:seconds=)?([\d.]+)\)", r"\1", text)
    return re.sub(r"\bNone\b", "null", re.sub(r"\b(\w+)=(?!=)", r"\1: ", text))


def _section_type(annotation: object) -> type | None:
    """The model or dataclass inside a field's type (``X | None``, ``tuple[X, ...]``)."""
    if isinstance(annotation, type) and (
        issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)
    ):
        return annotation
    for arg in get_args(annotation):
        if (found := _section_type(arg)) is not None:
            return found
    return None


def _keys(loc: tuple[int | str, ...]) -> list[str]:
    """The valid keys of the section at ``loc``."""
    section: type | None = EdgeConfig
    for part in loc:
        if isinstance(part, str) and section is not None:
            section = _section_type(_fields(section).get(part))
    return sorted(_fields(section)) if section is not None else []


def _fields(section: type) -> dict[str, object]:
    if issubclass(section, BaseModel):
        return {name: f.annotation for name, f in section.model_fields.items()}
    return {f.name: f.type for f in dataclasses.fields(section)}


def _path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _message(where: str, problem: str, got: str | None = None, hint: str | None = None) -> str:
    """One configuration problem: ``key.path: problem (got X); hint: ...``."""
    text = f"{where or '(top level)'}: {problem}"
    if got is not None:
        text += f" (got {got})"
    return f"{text}; hint: {hint}" if hint else text


def _describe(err: Any) -> str:
    loc = tuple(err["loc"])
    where = _path(loc)
    section = _path(loc[:-1]) or "the top level"
    kind = err["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        keys = ", ".join(_keys(loc[:-1]))
        return _message(where, "unknown key", hint=f"the keys of {section} are {keys}")
    if kind in ("missing", "missing_argument"):
        return _message(where, "required key is missing", hint=f"add {loc[-1]}: to {section}")
    text = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "value_error":
        if (m := _OPERATOR.match(text)) is not None:
            key = m["key"]
            got = m["got"]
            if key:
                where = ".".join(p for p in (where, re.sub(r"\[(\d+)\]", r".\1", key)) if p)
                got = got.removeprefix(f"{key}=")
            return _message(where, _plain(m["problem"]), _plain(got), _plain(m["hint"]))
        if (m := _SUBKEY.match(text)) is not None:
            where = ".".join(p for p in (where, m["key"]) if p)
            text = m["rest"]
        return f"{where or '(top level)'}: {text}"
    got = err.get("input")
    problem = re.sub(r"^\w+ should ", "must ", text)
    shown = None if isinstance(got, dict) else repr(got)
    hint = TYPE_HINTS.get(kind)
    if kind == "literal_error" and "'" in err["ctx"]["expected"] and not isinstance(got, str):
        hint = f'write it quoted: "{got}"'
    return _message(where, problem, shown, hint)


def _unreadable(key: str, path: Path) -> str | None:
    try:
        path.open("rb").close()
    except OSError as exc:
        return _message(
            key,
            f"the file cannot be read: {exc.strerror or exc}",
            repr(str(path)),
            "check the path; a relative path is relative to the config file's directory",
        )
    return None


def parse_config(
    data: object, *, source: str | None = None, base_dir: Path | None = None
) -> EdgeConfig:
    """Validate already-parsed YAML/JSON data; relative paths resolve against ``base_dir``.

    Every problem is one ``key.path: problem (got X); hint: ...``, several joined
    with ``; ``, prefixed with ``source: `` when given. The files the
    configuration names (``devices``, ``cloud.tls``) must be readable.
    """
    prefix = f"{source}: " if source else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        msg = prefix + _message(
            "",
            "the configuration must be a mapping of keys",
            type(data).__name__,
            "start with a key such as edge_id: edge-01; docs/config.md has an example",
        )
        raise ConfigError(msg)
    try:
        config = EdgeConfig.model_validate(data)
    except ValidationError as exc:
        msg = prefix + "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(msg) from None
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
    files = {"devices": config.devices}
    if config.cloud is not None and config.cloud.tls is not None:
        tls = config.cloud.tls
        files.update({"cloud.tls.ca": tls.ca, "cloud.tls.cert": tls.cert, "cloud.tls.key": tls.key})
    problems = [p for key, path in files.items() if path and (p := _unreadable(key, path))]
    if problems:
        raise ConfigError(prefix + "; ".join(problems))
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
