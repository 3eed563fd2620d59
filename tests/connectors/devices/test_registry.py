"""The device registry: loading devices.yaml, every error it can report, token lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.devices.registry import (
    DEVICE_ID,
    MAX_TOKEN_LENGTH,
    MIN_TOKEN_LENGTH,
    Device,
    DeviceRegistry,
    RegistryError,
)
from tests.conftest import assert_not_printed, write_devices

TOKEN_7 = "s3cr3t-token-7"
TOKEN_8 = "Zq8xW3vK-pump-8"
TOKEN_FAN = "tök€n_fän:42.ok"
VALID_YAML = f"""\
# the devices of line 3
devices:
  - {{id: pump-7, token: "{TOKEN_7}"}}
  - id: pump-8
    token: {TOKEN_8}
  - {{id: "site:fan_1.b", token: "{TOKEN_FAN}"}}
  - {{id: "42", token: "numeric-id-token"}}
"""
ID_HINT = "use 1-128 letters, digits, '.', '_', ':' or '-' (it becomes an MQTT topic level)"
TOKEN_HINT = "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(24))'`"
URL_HINT = (
    "token contains whitespace, '/', '?' or '#', which cannot travel in a URL path; "
    "use URL-safe characters"
)


def load_error(path: Path) -> RegistryError:
    with pytest.raises(RegistryError) as info:
        DeviceRegistry.load(path)
    return info.value


# --- a valid registry ------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> DeviceRegistry:
    return DeviceRegistry.load(write_devices(tmp_path, VALID_YAML))


def test_load_a_valid_registry(registry: DeviceRegistry) -> None:
    assert len(registry) == 4
    assert [d.id for d in registry] == ["pump-7", "pump-8", "site:fan_1.b", "42"]
    assert list(registry)[0] == Device("pump-7", TOKEN_7)
    assert "pump-7" in registry and "42" in registry
    assert "pump-9" not in registry and 42 not in registry and None not in registry
    assert TOKEN_7 not in registry  # membership is by id, never by token


def test_load_accepts_a_str_path(tmp_path: Path) -> None:
    path = write_devices(tmp_path, VALID_YAML)
    assert len(DeviceRegistry.load(str(path))) == 4


@pytest.mark.parametrize(
    ("token", "device_id"),
    [
        (TOKEN_7, "pump-7"),
        (TOKEN_8, "pump-8"),
        (TOKEN_FAN, "site:fan_1.b"),
        ("numeric-id-token", "42"),
    ],
    ids=["pump-7", "pump-8", "site:fan_1.b", "42"],
)
def test_authenticate_returns_the_device_of_each_token(
    registry: DeviceRegistry, token: str, device_id: str
) -> None:
    assert registry.authenticate(token) == device_id


@pytest.mark.parametrize(
    "token",
    [
        "",
        "unknown-token-123",
        "pump-7",  # an id is not a token
        "t3cr3t-token-7",  # first character off
        "s3cr3t-tokEn-7",  # one in the middle
        "s3cr3t-token-8",  # last one
        TOKEN_7[:-1],  # a prefix
        TOKEN_7[1:],  # a suffix
        TOKEN_7 + "7",  # longer
        " " + TOKEN_7,
        TOKEN_7 + "\n",
        TOKEN_7.upper(),
        TOKEN_7 + TOKEN_8,
        "tok€n_fän:42.ok",  # the fan's token without its umlaut
        "\ud800" + TOKEN_7,  # a lone surrogate, as a badly decoded path might carry
    ],
)
def test_authenticate_refuses_near_misses(registry: DeviceRegistry, token: str) -> None:
    assert registry.authenticate(token) is None


def test_a_token_with_a_lone_surrogate_authenticates() -> None:
    token = "\udcff-surrogate-token"
    registry = DeviceRegistry([Device("odd", token)])
    assert registry.authenticate(token) == "odd"
    assert registry.authenticate("\udcfe-surrogate-token") is None


def test_tokens_never_appear_in_repr(registry: DeviceRegistry) -> None:
    assert repr(registry) == "DeviceRegistry(4 devices)"
    assert str(registry) == repr(registry)
    device = next(iter(registry))
    assert repr(device) == "Device(id='pump-7')"
    shown = repr(registry) + repr(list(registry)) + str(list(registry))
    for token in (TOKEN_7, TOKEN_8, TOKEN_FAN):
        assert token not in shown


def test_length_limits_are_inclusive() -> None:
    shortest, longest = "a" * MIN_TOKEN_LENGTH, "b" * MAX_TOKEN_LENGTH
    registry = DeviceRegistry([Device("x" * 128, shortest), Device("y", longest)])
    assert registry.authenticate(shortest) == "x" * 128
    assert registry.authenticate(longest) == "y"


def test_an_empty_device_list_is_a_valid_registry(tmp_path: Path) -> None:
    registry = DeviceRegistry.load(write_devices(tmp_path, "devices: []\n"))
    assert len(registry) == 0 and list(registry) == []
    assert registry.authenticate(TOKEN_7) is None


# --- errors of the file as a whole ----------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    exc = load_error(path)
    assert str(exc) == (
        f"device registry {str(path)!r} does not exist; set `devices:` in the config"
    )
    assert exc.__cause__ is None and exc.__suppress_context__


def test_invalid_yaml_names_the_line_and_hides_the_text(tmp_path: Path) -> None:
    path = write_devices(
        tmp_path,
        f'devices:\n  - {{id: pump-7, token: "{TOKEN_7}"}}\n  - {{id: pump-8, token: {TOKEN_8}]}}\n',
    )
    exc = load_error(path)
    assert str(exc) == f"{path}: not valid YAML at line 3"
    assert exc.__suppress_context__  # the parser's message quotes the line, token included
    assert_not_printed(exc, TOKEN_7, TOKEN_8)


def test_invalid_yaml_without_a_position(tmp_path: Path) -> None:
    path = write_devices(tmp_path, f"devices:\n  - {{id: pump-7, token: {TOKEN_7}\x07}}\n")
    exc = load_error(path)
    assert str(exc) == f"{path}: not valid YAML"
    assert_not_printed(exc, TOKEN_7)


@pytest.mark.parametrize(
    "text",
    [
        "",  # an empty file
        "# only a comment\n",
        "- {id: pump-7, token: s3cr3t-token-7}\n",  # the list without `devices:`
        "pump-7\n",
        "device:\n  - {id: pump-7, token: s3cr3t-token-7}\n",  # a typo in the key
        "devices:\n",
        "devices: pump-7\n",
        "devices: {pump-7: s3cr3t-token-7}\n",
    ],
)
def test_not_a_mapping_with_a_devices_list(tmp_path: Path, text: str) -> None:
    path = write_devices(tmp_path, text)
    exc = load_error(path)
    assert str(exc) == (
        f"{path}: expected a mapping with a `devices:` list, e.g. "
        "devices: [{id: pump-7, token: ...}]"
    )
    assert_not_printed(exc, TOKEN_7)


# --- errors of one entry --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "got"),
    [
        ("{id: pump-8}", "['id']"),
        (f"{{token: {TOKEN_8}}}", "['token']"),
        (f"{{id: pump-8, token: {TOKEN_8}, role: pump}}", "['id', 'role', 'token']"),
        (f"{{id: pump-8, password: {TOKEN_8}}}", "['id', 'password']"),
        ("{}", "[]"),
        ("pump-8", "str"),
        (f"[pump-8, {TOKEN_8}]", "list"),
        ("", "NoneType"),
    ],
)
def test_entry_needs_exactly_id_and_token(tmp_path: Path, entry: str, got: str) -> None:
    path = write_devices(
        tmp_path, f'devices:\n  - {{id: pump-7, token: "{TOKEN_7}"}}\n  - {entry}\n'
    )
    exc = load_error(path)
    assert (
        str(exc)
        == f"{path}: devices[1] must have exactly `id` and `token`, optionally `gateway` (got {got})"
    )
    assert_not_printed(exc, TOKEN_7, TOKEN_8)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("12:30", "750 (int)"),  # YAML 1.1 reads this as a base-60 number
        ("010", "8 (int)"),  # and this as octal
        ("7", "7 (int)"),
        ("1.10", "1.1 (float)"),
        ("null", "None (NoneType)"),
        ("", "None (NoneType)"),
        ("true", "True (bool)"),
        ("[pump-8]", "['pump-8'] (list)"),
    ],
)
def test_an_id_yaml_does_not_read_as_a_string_is_refused(
    tmp_path: Path, value: str, shown: str
) -> None:
    path = write_devices(tmp_path, f"devices:\n  - {{id: {value}, token: {TOKEN_8}}}\n")
    exc = load_error(path)
    assert str(exc) == (
        f"{path}: devices[0]: id must be a string, but YAML read {shown}; "
        'quote it, e.g. id: "pump-7"'
    )
    assert_not_printed(exc, TOKEN_8)


def test_quoted_ids_that_look_like_numbers_are_kept_as_written(tmp_path: Path) -> None:
    path = write_devices(
        tmp_path,
        f'devices:\n  - {{id: "12:30", token: {TOKEN_7}}}\n  - {{id: "010", token: {TOKEN_8}}}\n',
    )
    registry = DeviceRegistry.load(path)
    assert [d.id for d in registry] == ["12:30", "010"]


@pytest.mark.parametrize(
    "device_id",
    ["a/b", "+", "#", "", "x" * 129, "-pump", ".pump", "pump 7", "pump-7\n", "pümp", "v1/devices"],
)
def test_invalid_device_id(tmp_path: Path, device_id: str) -> None:
    path = write_devices(
        tmp_path, f"devices:\n  - {{id: {json.dumps(device_id)}, token: {TOKEN_8}}}\n"
    )
    exc = load_error(path)
    assert str(exc) == f"{path}: devices[0]: id {device_id!r} is not a valid device id; {ID_HINT}"
    assert_not_printed(exc, TOKEN_8)


@pytest.mark.parametrize(
    ("devices", "source", "error"),
    [
        (
            [Device("pump-7", TOKEN_7), Device(7, TOKEN_8)],  # type: ignore[arg-type]
            None,
            f"devices: devices[1]: id 7 is not a valid device id; {ID_HINT}",
        ),
        (
            [Device("a+b", TOKEN_8)],
            "demo",
            f"demo: devices[0]: id 'a+b' is not a valid device id; {ID_HINT}",
        ),
    ],
    ids=["int id", "named source"],
)
def test_invalid_device_id_given_in_code(
    devices: list[Device], source: str | None, error: str
) -> None:
    kwargs = {} if source is None else {"source": source}
    with pytest.raises(RegistryError) as info:
        DeviceRegistry(devices, **kwargs)
    assert str(info.value) == error
    assert_not_printed(info.value, TOKEN_7, TOKEN_8)


@pytest.mark.parametrize(
    ("token_yaml", "secret", "got"),
    [
        ('"short-7"', "short-7", "7 chars"),
        ('""', None, "0 chars"),
        ("x" * (MAX_TOKEN_LENGTH + 1), "x" * (MAX_TOKEN_LENGTH + 1), "257 chars"),
        ("12345678", "12345678", "int"),
        ("1234.5678", "1234.5678", "float"),
        ("null", None, "NoneType"),
        ("[s3cr3t-token-9]", "s3cr3t-token-9", "list"),
        ("!!binary czNjcjN0LXRva2VuLTk=", "s3cr3t-token-9", "bytes"),
    ],
)
def test_token_of_the_wrong_type_or_length(
    tmp_path: Path, token_yaml: str, secret: str | None, got: str
) -> None:
    path = write_devices(tmp_path, f"devices:\n  - {{id: pump-9, token: {token_yaml}}}\n")
    exc = load_error(path)
    assert str(exc) == (
        f"{path}: devices[0] (pump-9): token must be a string of 8-256 characters "
        f"(got {got}); {TOKEN_HINT}"
    )
    if secret is not None:
        assert_not_printed(exc, secret)


@pytest.mark.parametrize(
    "token",
    [
        "s3cr3t token-9",
        "s3cr3t\ttoken-9",
        "s3cr3t-token-9\n",
        "s3cr3t/token-9",
        "s3cr3t?token=9",
        "s3cr3t#token-9",
        "s3cr3t\u00a0token-9",
        "s3cr3t\u2028token-9",
    ],
)
def test_token_that_cannot_travel_in_a_url_path(tmp_path: Path, token: str) -> None:
    escaped = token.encode("unicode_escape").decode()
    path = write_devices(tmp_path, f'devices:\n  - {{id: pump-9, token: "{escaped}"}}\n')
    exc = load_error(path)
    assert str(exc) == f"{path}: devices[0] (pump-9): {URL_HINT}"
    assert_not_printed(exc, token)


@pytest.mark.parametrize(
    ("third", "error"),
    [
        (
            f"{{id: pump-7, token: {TOKEN_7}-b}}",
            "devices[2]: device id 'pump-7' is listed twice; ids must be unique",
        ),
        (
            f"{{id: fan-1, token: {TOKEN_7}}}",
            "devices[2] (fan-1): token is the same as device 'pump-7''s; "
            "every device needs its own token",
        ),
    ],
    ids=["duplicate id", "duplicate token"],
)
def test_duplicate_id_or_token(tmp_path: Path, third: str, error: str) -> None:
    path = write_devices(
        tmp_path,
        f"devices:\n  - {{id: pump-7, token: {TOKEN_7}}}\n  - {{id: pump-8, token: {TOKEN_8}}}\n"
        f"  - {third}\n",
    )
    exc = load_error(path)
    assert str(exc) == f"{path}: {error}"
    assert_not_printed(exc, TOKEN_7, TOKEN_8)


def test_registry_error_is_a_value_error() -> None:
    assert issubclass(RegistryError, ValueError)


# --- property: lookups agree with the entries -------------------------------------------------

ids = st.from_regex(DEVICE_ID, fullmatch=True)
token_chars = st.characters(exclude_categories=()).filter(
    lambda c: not c.isspace() and c not in "/?#"
)
tokens = st.text(token_chars, min_size=MIN_TOKEN_LENGTH, max_size=40) | st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
    min_size=MIN_TOKEN_LENGTH,
    max_size=MAX_TOKEN_LENGTH,
)
entries = st.lists(
    st.tuples(ids, tokens),
    min_size=1,
    max_size=8,
    unique_by=(lambda e: e[0], lambda e: e[1]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=entries, others=st.lists(st.text(st.characters(exclude_categories=())), max_size=5))
def test_authenticate_agrees_with_the_entries(
    entries: list[tuple[str, str]], others: list[str]
) -> None:
    registry = DeviceRegistry(Device(device_id, token) for device_id, token in entries)
    by_token = {token: device_id for device_id, token in entries}
    assert len(registry) == len(entries)
    assert [d.id for d in registry] == [device_id for device_id, _ in entries]
    for device_id, token in entries:
        assert device_id in registry
        assert registry.authenticate(token) == device_id
        for near in (token[:-1], token[1:], token + token[-1], token[::-1]):
            assert registry.authenticate(near) == by_token.get(near)
        assert token not in repr(registry)
    for other in others:
        assert registry.authenticate(other) == by_token.get(other)


@pytest.mark.parametrize(
    ("directory", "match"),
    [
        (False, r"devices\.yaml' is not UTF-8 text; save it as UTF-8 YAML"),
        (True, r"device registry '.*' cannot be read: Is a directory"),
    ],
    ids=["not UTF-8", "a directory"],
)
def test_unreadable_registry_names_the_file(tmp_path: Path, directory: bool, match: str) -> None:
    binary = write_devices(tmp_path, b"devices:\n  - {id: a, token: \xff\xfe\xfa}\n")
    with pytest.raises(RegistryError, match=match):
        DeviceRegistry.load(tmp_path if directory else binary)


def test_a_gateway_entry_speaks_for_the_names_matching_its_patterns(tmp_path: Path) -> None:
    path = tmp_path / "devices.yaml"
    path.write_text(
        "devices:\n"
        "  - {id: pump-7, token: tok-pump-7-abcdef}\n"
        '  - {id: gw-1, token: tok-gw-1-abcdefgh, gateway: {devices: ["line-1-*", "kiln"]}}\n'
    )
    registry = DeviceRegistry.load(path)
    gateway = registry.lookup("tok-gw-1-abcdefgh")
    assert (
        gateway is not None and repr(gateway) == "Device(id='gw-1', gateway=['line-1-*', 'kiln'])"
    )
    assert gateway.speaks_for("line-1-a") and gateway.speaks_for("kiln")
    assert not gateway.speaks_for("line-2-a") and not gateway.speaks_for("Kiln")
    plain = registry.lookup("tok-pump-7-abcdef")
    assert plain is not None and plain.gateway is None and not plain.speaks_for("pump-7")
    assert registry.lookup("tok-nobody-abcdef") is None


@pytest.mark.parametrize(
    ("gateway", "got"),
    [
        ("yes", "True"),  # YAML 1.1 reads yes as a boolean
        ("{devices: []}", "{'devices': []}"),
        ("{devices: [1]}", "{'devices': [1]}"),
        ("{names: [a]}", "{'names': ['a']}"),
    ],
)
def test_a_bad_gateway_entry_is_refused(tmp_path: Path, gateway: str, got: str) -> None:
    path = tmp_path / "devices.yaml"
    path.write_text(f"devices:\n  - {{id: gw-1, token: tok-gw-1-abcdefgh, gateway: {gateway}}}\n")
    with pytest.raises(RegistryError) as info:
        DeviceRegistry.load(path)
    assert str(info.value) == (
        f"{path}: devices[0]: gateway must be a mapping with a non-empty `devices:` list of "
        f'device name patterns (got {got}); e.g. gateway: {{devices: ["line-1-*"]}}'
    )
