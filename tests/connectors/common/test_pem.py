from __future__ import annotations

import pytest

from connectors.common.pem import read_pem

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_reads_a_pem_file(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_bytes(PEM)
    assert read_pem(path, key="tls.ca") == PEM


def test_errors_name_the_setting_and_the_path(tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError) as info:
        read_pem(missing, key="tls.ca")
    assert str(info.value) == (
        f"tls.ca: the PEM file does not exist (got {str(missing)!r}); hint: check the path"
    )
    with pytest.raises(ValueError) as info:
        read_pem(tmp_path, key="tls.key")
    assert str(info.value) == (
        f"tls.key: the PEM file cannot be read: Is a directory (got {str(tmp_path)!r}); "
        "hint: it must be a readable file"
    )
    der = tmp_path / "ca.der"
    der.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(ValueError) as info:
        read_pem(der, key="tls.ca")
    assert str(info.value) == (
        f"tls.ca: the file is not PEM, 4 bytes without a '-----BEGIN' line (got {str(der)!r}); "
        "hint: convert DER with `openssl x509 -inform der -in FILE.der -out FILE.pem`"
    )
