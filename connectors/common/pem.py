"""Reading PEM files (TLS certificates, keys and CAs) with errors naming the setting."""

from __future__ import annotations

from pathlib import Path

__all__ = ["read_pem"]


def read_pem(path: Path, *, key: str) -> bytes:
    """The bytes of the PEM file at ``path``, which setting ``key`` names.

    Raises ``ValueError`` as ``key: problem (got 'path'); hint: ...`` when the
    file is missing, unreadable, or holds no ``-----BEGIN`` line (e.g. DER).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        msg = f"{key}: the PEM file does not exist (got {str(path)!r}); hint: check the path"
        raise ValueError(msg) from None
    except OSError as exc:
        msg = (
            f"{key}: the PEM file cannot be read: {exc.strerror or type(exc).__name__} "
            f"(got {str(path)!r}); hint: it must be a readable file"
        )
        raise ValueError(msg) from None
    if b"-----BEGIN " not in data:
        msg = (
            f"{key}: the file is not PEM, {len(data)} bytes without a '-----BEGIN' line "
            f"(got {str(path)!r}); hint: convert DER with "
            "`openssl x509 -inform der -in FILE.der -out FILE.pem`"
        )
        raise ValueError(msg)
    return data
