from __future__ import annotations

import pytest

from connectors.common.yamlfile import read_entries, read_yaml


class FileError(ValueError):
    pass


def read(path, **kwargs):
    return read_yaml(
        path, what="some file", missing_hint="pass --some FILE", error=FileError, **kwargs
    )


def test_reads_a_document_and_an_empty_file(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("a: [1, 2]\n", encoding="utf-8")
    assert read(path) == {"a": [1, 2]}
    path.write_text("", encoding="utf-8")
    assert read(path) is None


def test_reading_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(FileError) as info:
        read(missing)
    assert str(info.value) == f"some file {str(missing)!r} does not exist; pass --some FILE"
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("a: caf\xe9\n".encode("latin-1"))
    with pytest.raises(FileError) as info:
        read(latin)
    assert str(info.value) == f"some file {str(latin)!r} is not UTF-8 text; save it as UTF-8 YAML"
    with pytest.raises(FileError) as info:
        read(tmp_path)
    assert str(info.value) == f"some file {str(tmp_path)!r} cannot be read: Is a directory"


def test_yaml_errors_give_line_column_and_problem_unless_secret(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: [\n", encoding="utf-8")
    with pytest.raises(FileError) as info:
        read(path, yaml_hint="; hint: close the list")
    assert str(info.value) == (
        f"{path}: not valid YAML at line 3, column 1: expected the node content, but found '<stream end>'"
        "; hint: close the list"
    )
    path.write_text("token: *s3cr3t\n", encoding="utf-8")
    with pytest.raises(FileError) as info:
        read(path)
    assert "s3cr3t" in str(info.value)  # the parser quotes the text it stumbled on
    with pytest.raises(FileError) as info:
        read(path, secret=True)
    assert str(info.value) == f"{path}: not valid YAML at line 1"


def test_read_entries_never_quotes_the_parser(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - {id: a, token: *s3cr3t}\n", encoding="utf-8")
    with pytest.raises(FileError) as info:
        read_entries(
            path,
            "keys",
            ("id", "token"),
            what="key file",
            missing_hint="-",
            example="-",
            error=FileError,
        )
    assert str(info.value) == f"{path}: not valid YAML at line 2"
