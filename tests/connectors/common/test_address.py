from __future__ import annotations

import re

import pytest

from connectors.common.address import join_host_port, parse_host_port

FORMAT = "key: must be HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:8080", ("::1", 8080)),
        ("localhost:80", ("localhost", 80)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[fe80::1%eth0]:5683", ("fe80::1%eth0", 5683)),
        ("edge.example:65535", ("edge.example", 65535)),
    ],
)
def test_parses_host_and_port(value, expected):
    assert parse_host_port(value, key="key") == expected


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        (8080, 'write it as a quoted string, e.g. "127.0.0.1:8080"'),
        ("", "give a host and a port without spaces"),
        ("host 1:80", "give a host and a port without spaces"),
        ("localhost", "give both a host and a port, separated by ':'"),
        (":8080", "give both a host and a port, separated by ':'"),
        ("127.0.0.1:", "the port must be a number 0-65535, not ''"),
        ("127.0.0.1:http", "the port must be a number 0-65535, not 'http'"),
        ("127.0.0.1:70000", "the port must be a number 0-65535, not '70000'"),
        ("127.0.0.1:\u0661\u0662", "the port must be a number 0-65535, not '\u0661\u0662'"),
        ("::1:8080", "put an IPv6 address in brackets: [::1]:8080"),
        ("[127.0.0.1]:8080", "brackets are only for IPv6 addresses; '127.0.0.1' is not one"),
        ("[]:1", "brackets are only for IPv6 addresses; '' is not one"),
        ("[::1:80", "brackets go around a whole IPv6 address, e.g. [::1]:8080"),
    ],
)
def test_errors_name_the_key_the_value_and_a_hint(value, hint):
    with pytest.raises(ValueError) as info:
        parse_host_port(value, key="key")
    assert str(info.value) == f"{FORMAT} (got {value!r}); hint: {hint}"


def test_port_zero_is_refused_for_a_connect_target():
    assert parse_host_port("127.0.0.1:0", key="key") == ("127.0.0.1", 0)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{FORMAT} (got '127.0.0.1:0'); hint: give the port the server listens on; "
            "0 is not a real port"
        ),
    ):
        parse_host_port("127.0.0.1:0", key="key", allow_port_zero=False)


def test_join_brackets_ipv6_only():
    assert join_host_port("::1", 8080) == "[::1]:8080"
    assert join_host_port("127.0.0.1", 8080) == "127.0.0.1:8080"
    for value in ("[::1]:8080", "localhost:80"):
        assert join_host_port(*parse_host_port(value, key="key")) == value
