"""Reading YAML files: the edge config and the credential files (device registry, auth)."""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["read_entries", "read_yaml"]


def read_yaml(
    path: Path,
    *,
    what: str,
    missing_hint: str,
    error: type[ValueError],
    yaml_hint: str = "",
    secret: bool = False,
) -> object:
    """The parsed YAML document in ``path`` (None for an empty file).

    Every failure raises ``error`` naming the file (as ``what``). A YAML
    syntax error gives its line, column and the parser's problem, then
    ``yaml_hint``; with ``secret`` (a file of credentials) only the line, as
    the parser's words may quote a token.
    """
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        msg = f"{what} {str(path)!r} does not exist; {missing_hint}"
        raise error(msg) from None
    except UnicodeDecodeError:
        msg = f"{what} {str(path)!r} is not UTF-8 text; save it as UTF-8 YAML"
        raise error(msg) from None
    except OSError as exc:
        msg = f"{what} {str(path)!r} cannot be read: {exc.strerror or type(exc).__name__}"
        raise error(msg) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None)
        if secret:
            where = f" at line {mark.line + 1}" if mark else ""
        else:
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            where += f": {problem}" if problem else ""
        msg = f"{path}: not valid YAML{where}{yaml_hint}"
        raise error(msg) from None


def read_entries(
    path: Path,
    key: str,
    fields: tuple[str, ...],
    *,
    what: str,
    missing_hint: str,
    example: str,
    error: type[ValueError],
    yaml_hint: str = "",
    optional: tuple[str, ...] = (),
) -> list[dict[str, object]]:
    """The ``key:`` list of mappings in ``path``, each with ``fields`` and any of ``optional``.

    Every failure raises ``error`` naming the file (as ``what``) and the entry;
    values are never quoted, so secrets stay out of messages (see
    :func:`read_yaml` for the reading errors).
    """
    data = read_yaml(
        path,
        what=what,
        missing_hint=missing_hint,
        error=error,
        yaml_hint=yaml_hint,
        secret=True,
    )
    entries = data.get(key) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        article = "an" if key[0] in "aeiou" else "a"
        msg = f"{path}: expected a mapping with {article} `{key}:` list, e.g. {example}"
        raise error(msg)
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not set(fields) <= set(entry) <= {*fields, *optional}:
            got = sorted(str(k) for k in entry) if isinstance(entry, dict) else type(entry).__name__
            wanted = " and ".join(f"`{f}`" for f in fields)
            if optional:
                wanted += ", optionally " + " and ".join(f"`{f}`" for f in optional)
            msg = f"{path}: {key}[{index}] must have exactly {wanted} (got {got})"
            raise error(msg)
    return entries
