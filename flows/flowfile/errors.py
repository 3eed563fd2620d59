"""Operator errors in flow file terms."""

from __future__ import annotations

import re

from flows.config.parse import _plain

__all__ = ["operator_error"]

_OPERATOR = re.compile(
    r"^(?:[a-z_]+|threshold rule)(?: '[^']*')?:? `(?P<key>[\w\[\]]+)` "
    r"(?P<problem>.*?); got (?P<got>.*?)\. Hint: (?P<hint>.*?)\.?$",
    re.DOTALL,
)

_KEYED = re.compile(r"^[a-z_]+ '[^']*': (?P<key>[a-z_]+): (?P<rest>.*)$", re.DOTALL)


def operator_error(text: str) -> tuple[str | None, str]:
    """An operator's check message as ``(setting, "problem (got X); hint: ...")``.

    Operators word their errors for Python (``deadband `absolute` must be ...;
    got -1. Hint: ...``); a flow file names the setting in its path and
    writes values the YAML way (null, seconds).
    """
    text = " ".join(text.split())
    m = _OPERATOR.match(text)
    if m is None:
        if (m := _KEYED.match(text)) is not None:  # filter 'f.hot': where: ...; hint: ...
            return m["key"], m["rest"]
        return None, _plain(text)
    key = re.sub(r"\[(\d+)\]", r".\1", m["key"])
    got = m["got"].removeprefix(f"{m['key']}=")
    return key, f"{_plain(m['problem'])} (got {_plain(got)}); hint: {_plain(m['hint'])}"
