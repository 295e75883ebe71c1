"""--allow parsing and matching; resolution through the system resolver (localhost only)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.allow import AllowList, parse_rule
from tether.tunnel.reasons import DENIED, NO_SUCH_HOST, Refusal


def test_rule_forms():
    assert str(parse_rule("10.0.0.0/8:22")) == "10.0.0.0/8:22"
    assert str(parse_rule("10.1.2.3:8000-8100")) == "10.1.2.3:8000-8100"
    assert str(parse_rule("[fd00::/8]:*")) == "[fd00::/8]:*"
    assert str(parse_rule("[::1]:443")) == "[::1]:443"
    assert str(parse_rule("DB.Internal.:5432")) == "db.internal:5432"
    assert str(parse_rule("*.internal:443")) == "*.internal:443"
    assert str(parse_rule("*:*")) == "*:*"
    assert parse_rule("10.0.0.7/8:22").network == ipaddress.ip_network("10.0.0.0/8")


@pytest.mark.parametrize("bad, message", [
    ("", "no --allow rules"),
    ("10.0.0.0/8", "expected HOST:PORTS"),
    ("::1:22", "brackets"),
    ("[::1:22", r"\[IPV6\]"),
    ("10.0.0.0/33:22", "10.0.0.0/33"),
    ("host:0", "within 1-65535"),
    ("host:9000-8000", "low to high"),
    ("host:70000", "within 1-65535"),
    ("host:http", "must be a port"),
    ("bad_host!:22", "not a valid host name"),
    ("a..b:22", "not a valid host name"),
    ("[zz::/8]:1", "zz"),
])
def test_bad_rules_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        AllowList.parse(bad)


def test_list_parsing_and_matching():
    allow = AllowList.parse(["10.0.0.0/8:22,db.internal:5432", "*.svc:8000-8100",
                             "[fd00::/8]:443,"])
    assert len(allow.rules) == 4
    assert allow.permits_address("10.9.9.9", 22)
    assert not allow.permits_address("10.9.9.9", 23)
    assert not allow.permits_address("11.0.0.1", 22)
    assert allow.permits_address("fd00::5", 443) and not allow.permits_address("fe80::1", 443)
    assert allow.permits_address("::ffff:10.0.0.1", 22)  # IPv4-mapped: the IPv4 rule
    assert allow.permits_name("DB.internal.", 5432) and not allow.permits_name("db.internal", 22)
    assert allow.permits_name("a.b.svc", 8050) and not allow.permits_name("svc", 8050)
    assert not allow.permits_name("evil-db.internal", 5432)
    with pytest.raises(ValueError, match="no --allow rules"):
        AllowList.parse(" , ")


@given(st.ip_addresses(), st.integers(1, 65535))
def test_star_permits_everything_and_nothing_permits_nothing(address, port):
    assert AllowList.parse("*:*").permits_address(address, port)
    assert not AllowList.parse("192.0.2.1:1").permits_address(address, port) or (
        str(address) == "192.0.2.1" and port == 1)


@given(st.ip_addresses(v=4), st.integers(0, 32), st.ip_addresses(v=4))
def test_cidr_matching_agrees_with_ipaddress(base, bits, probe):
    network = ipaddress.ip_network(f"{base}/{bits}", strict=False)
    allow = AllowList.parse(f"{network}:80")
    assert allow.permits_address(probe, 80) == (probe in network)


async def test_resolve_checks_every_address_it_would_dial():
    # "localhost" resolves to 127.0.0.1 (and ::1 where configured): only permitted ones.
    allow = AllowList.parse("127.0.0.0/8:80")
    assert await allow.resolve("localhost", 80) == [("127.0.0.1", 80)]
    with pytest.raises(Refusal) as refused:
        await AllowList.parse("10.0.0.0/8:80").resolve("localhost", 80)
    assert refused.value.code == DENIED and "127.0.0.1" in str(refused.value)
    # A name rule permits the name, whatever it resolves to.
    by_name = await AllowList.parse("localhost:80").resolve("localhost", 80)
    assert ("127.0.0.1", 80) in by_name
    # Literals are checked without resolving.
    assert await allow.resolve("127.0.0.9", 80) == [("127.0.0.9", 80)]
    with pytest.raises(Refusal):
        await allow.resolve("127.0.0.1", 81)
    # A name no rule can permit is refused before any lookup; a permitted one that does
    # not resolve says so.
    with pytest.raises(Refusal) as refused:
        await AllowList.parse("localhost:80").resolve("no-such-host.invalid", 80)
    assert refused.value.code == DENIED
    with pytest.raises(Refusal) as refused:
        await AllowList.parse("*.invalid:80").resolve("no-such-host.invalid", 80)
    assert refused.value.code == NO_SUCH_HOST


@given(st.text(max_size=80))
def test_any_text_is_a_rule_or_a_value_error(text):
    try:
        rule = parse_rule(text)
    except ValueError:
        return
    # A rule that parses prints as a rule that parses to the same thing.
    assert parse_rule(str(rule)) == rule
