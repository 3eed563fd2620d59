"""Who may push to the cloud receiver: the auth file and the check of every ``Push`` call.

Every ``Push`` carries the call metadata ``x-edgesieve-key`` and
``x-edgesieve-secret`` (:mod:`connectors.uplink.wire`), checked against the
auth file (:func:`load_auth`) with a constant-time comparison before any batch
is read. Secrets never appear in logs, errors or ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.common.yamlfile import read_entries
from connectors.uplink.wire import KEY_HEADER, SECRET_HEADER

__all__ = [
    "AuthError",
    "EdgeAuth",
    "EdgeCredentials",
    "load_auth",
]

EDGE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""An edge key: it is also the ``edge_id`` stored with every row."""
MIN_SECRET_LENGTH = 16
MAX_SECRET_LENGTH = 1024
_SECRET_CHARS = re.compile(r"[\x21-\x7e]+")
_SECRET_HINT = "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"


class AuthError(ValueError):
    """The receiver's edge credentials are invalid; the message names the file and entry."""


@dataclass(frozen=True)
class EdgeCredentials:
    """One edge allowed to push: its key (also its ``edge_id``) and secret."""

    key: str
    secret: str = field(repr=False)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def _check_credentials(where: str, key: object, secret: object) -> None:
    """Raise :class:`AuthError` for a malformed key or secret (never showing the secret)."""
    if not isinstance(key, str) or not EDGE_KEY.fullmatch(key):
        msg = (
            f"{where}: key {key!r} is not a valid edge key; use 1-128 letters, digits, '.', "
            "'_', ':' or '-', starting with a letter or digit (it is the edge_id of its rows)"
        )
        raise AuthError(msg)
    if not isinstance(secret, str):
        msg = (
            f"{where} ({key}): secret must be a string, but got "
            f'{type(secret).__name__}; quote it in YAML, e.g. secret: "..."'
        )
        raise AuthError(msg)
    if not MIN_SECRET_LENGTH <= len(secret) <= MAX_SECRET_LENGTH:
        msg = (
            f"{where} ({key}): secret must be {MIN_SECRET_LENGTH}-{MAX_SECRET_LENGTH} "
            f"characters (got {len(secret)}); {_SECRET_HINT}"
        )
        raise AuthError(msg)
    if not _SECRET_CHARS.fullmatch(secret):
        msg = (
            f"{where} ({key}): secret contains spaces or characters outside printable ASCII, "
            f"which gRPC metadata cannot carry; {_SECRET_HINT}"
        )
        raise AuthError(msg)


def _check_edges(where: str, credentials: Iterable[EdgeCredentials]) -> dict[str, str]:
    """Check every entry, unique keys and unique secrets; return ``{key: secret}``."""
    edges: dict[str, str] = {}
    by_digest: dict[bytes, str] = {}
    for index, creds in enumerate(credentials):
        entry = f"{where}[{index}]"
        _check_credentials(entry, creds.key, creds.secret)
        if creds.key in edges:
            msg = f"{entry}: edge key {creds.key!r} is listed twice; keys must be unique"
            raise AuthError(msg)
        digest = _digest(creds.secret)
        if digest in by_digest:
            msg = (
                f"{entry} ({creds.key}): secret is the same as edge {by_digest[digest]!r}'s; "
                f"every edge needs its own secret; {_SECRET_HINT}"
            )
            raise AuthError(msg)
        edges[creds.key] = creds.secret
        by_digest[digest] = creds.key
    if not edges:
        msg = (
            f"{where}: no edges are listed, so every Push would be refused; add one, e.g. "
            'edges: [{key: edge-01, secret: "..."}]'
        )
        raise AuthError(msg)
    return edges


_AUTH_EXAMPLE = 'edges: [{key: edge-01, secret: "..."}]'


def load_auth(path: str | Path) -> dict[str, str]:
    """Read and check the receiver's auth file; return ``{edge key: secret}``.

    The file is YAML ``edges: [{key: edge-01, secret: "..."}]``. Keys must be
    unique edge ids, secrets unique strings of printable ASCII of at least
    :data:`MIN_SECRET_LENGTH` characters. Raises :class:`AuthError` naming the
    file and the entry; secrets never appear in the message.
    """
    path = Path(path)
    entries = read_entries(
        path,
        "edges",
        ("key", "secret"),
        what="auth file",
        missing_hint=f"pass `--auth FILE` with a YAML file like {_AUTH_EXAMPLE}",
        example=_AUTH_EXAMPLE,
        error=AuthError,
        yaml_hint="; expected edges: [{key: ..., secret: ...}]",
    )
    credentials = []
    for index, entry in enumerate(entries):
        key = entry["key"]
        if not isinstance(key, str):
            msg = (
                f"{path}: edges[{index}]: key must be a string, but YAML read {key!r} "
                f'({type(key).__name__}); quote it, e.g. key: "edge-01"'
            )
            raise AuthError(msg)
        credentials.append(EdgeCredentials(key, entry["secret"]))
    return _check_edges(f"{path}: edges", credentials)


class EdgeAuth:
    """The edges allowed to push, checked in constant time; built from ``{key: secret}``."""

    def __init__(self, edges: Mapping[str, str], *, where: str = "CloudReceiver edges") -> None:
        if not isinstance(edges, Mapping):
            msg = (
                f"{where} must be a mapping of edge key to secret; got "
                f"{type(edges).__name__}. Hint: edges=load_auth(path)"
            )
            raise TypeError(msg)
        checked = _check_edges(where, (EdgeCredentials(k, s) for k, s in edges.items()))
        self._secrets = {key: secret.encode("ascii") for key, secret in checked.items()}
        self._decoy = secrets.token_urlsafe(32).encode("ascii")

    def __len__(self) -> int:
        return len(self._secrets)

    def authenticate(self, metadata: Iterable[tuple[str, Any]]) -> str | None:
        """The edge key the call metadata proves, or None; secrets compared in constant time."""
        given = {name.lower(): value for name, value in metadata}
        key = given.get(KEY_HEADER)
        secret = given.get(SECRET_HEADER)
        if not isinstance(key, str) or not isinstance(secret, str):
            return None
        expected = self._secrets.get(key)
        ok = hmac.compare_digest(
            expected if expected is not None else self._decoy,
            secret.encode("utf-8", "surrogatepass"),
        )
        return key if ok and expected is not None else None

    def refusal(self, metadata: Iterable[tuple[str, Any]]) -> str:
        """Why a call was refused, for the log: never the secret, unknown keys cut to 64."""
        given = {name.lower(): value for name, value in metadata}
        key = given.get(KEY_HEADER)
        if key is None or SECRET_HEADER not in given:
            return f"no {KEY_HEADER} / {SECRET_HEADER} metadata"
        if isinstance(key, str) and key in self._secrets:
            return f"wrong secret for edge {key!r}"
        shown = key[:64] if isinstance(key, str) else type(key).__name__
        return f"unknown edge key {shown!r}"
