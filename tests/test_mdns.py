"""mDNS answers read robustly (src/tether/cores/mdns.py), with packets Chromium 156 sent.

The three packets were captured in the browser test's namespaces: Chromium's answers to
an A and an AAAA query for its ``.local`` host candidate name. Each carries an NSEC
record with a compressed name, which dnspython refuses (so aioice 0.13 dropped them).
"""

from __future__ import annotations

import asyncio

import aioice.mdns
import dns.exception
import dns.message
import dns.name
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.cores import gathering, mdns

NAME = "ce626b7c-a1ed-45a4-8e65-d98b5fdf614c.local"
# Answer to an A query: the A record, then an NSEC (next name compressed) as additional.
A_ANSWER = bytes.fromhex(
    "0000840000000001000000012463653632366237632d613165642d343561342d386536352d6439386235"
    "66646636313463056c6f63616c00000180010000007800040ad507022463653632366237632d61316564"
    "2d343561342d386536352d643938623566646636313463056c6f63616c00002f8001000000780005c046"
    "000140")
# Answer to an AAAA query for the same name: NSEC (no AAAA) first, the A as additional.
AAAA_ANSWER = bytes.fromhex(
    "0000840000000001000000012463653632366237632d613165642d343561342d386536352d6439386235"
    "66646636313463056c6f63616c00002f8001000000780005c00c0001402463653632366237632d613165"
    "642d343561342d386536352d643938623566646636313463056c6f63616c00000180010000007800040a"
    "d50702")
# An announcement for another name: AAAA :: (no usable address).
UNSPECIFIED = bytes.fromhex(
    "0000840000000001000000012439383036613238382d313364332d346230352d623434372d3138626335"
    "64306339666433056c6f63616c00001c80010000007800100000000000000000000000000000000024"
    "39383036613238382d313364332d346230352d623434372d313862633564306339666433056c6f63616c"
    "00002f8001000000780008c052000400000008")


@pytest.mark.parametrize("packet", [A_ANSWER, AAAA_ANSWER, UNSPECIFIED])
def test_dnspython_refuses_chromium_answers(packet):
    """The bug this module works around: still there with the pinned dnspython."""
    with pytest.raises(dns.exception.FormError):
        dns.message.from_wire(packet)


def test_a_answer():
    assert mdns.is_response(A_ANSWER)
    assert mdns.parse_addresses(A_ANSWER) == [mdns.AddressRecord(NAME, "10.213.7.2", 120)]


def test_address_in_the_additional_section():
    assert mdns.parse_addresses(AAAA_ANSWER) == [mdns.AddressRecord(NAME, "10.213.7.2", 120)]


def test_unspecified_address_is_reported_as_is():
    [record] = mdns.parse_addresses(UNSPECIFIED)
    assert record.address == "::" and record.name.endswith(".local")


def test_query_yields_nothing():
    query = dns.message.make_query(dns.name.from_text(NAME), "A")
    query.id = 0
    query.flags = 0
    wire = query.to_wire()
    assert not mdns.is_response(wire)
    assert mdns.parse_addresses(wire) == []


def test_compression_loop_is_an_error():
    # One answer whose name is a pointer to itself.
    packet = bytes.fromhex("000084000000000100000000") + b"\xc0\x0c" + bytes(10)
    with pytest.raises(mdns.MdnsFormatError, match="loop"):
        mdns.parse_addresses(packet)


@pytest.mark.parametrize("cut", [5, 20, 60, len(A_ANSWER) - 3])
def test_truncated_packets_are_errors(cut):
    with pytest.raises(mdns.MdnsFormatError):
        mdns.parse_addresses(A_ANSWER[:cut])


@given(st.binary(max_size=600))
def test_any_bytes_parse_or_fail_cleanly(data):
    try:
        records = mdns.parse_addresses(data)
    except mdns.MdnsFormatError:
        return
    assert all(isinstance(r, mdns.AddressRecord) for r in records)


@given(st.integers(min_value=0, max_value=len(A_ANSWER) - 1), st.integers(0, 255))
def test_corrupted_answers_parse_or_fail_cleanly(index, value):
    packet = bytearray(A_ANSWER)
    packet[index] = value
    try:
        mdns.parse_addresses(bytes(packet))
    except mdns.MdnsFormatError:
        pass


def test_cache_keeps_addresses_for_their_ttl():
    cache = mdns.AddressCache(limit=2)
    cache.learn(mdns.AddressRecord(NAME, "10.213.7.2", 120), now=100.0)
    assert cache.lookup(NAME.upper() + ".", now=219.0) == "10.213.7.2"
    assert cache.lookup(NAME, now=220.0) is None  # expired, and forgotten
    assert len(cache) == 0


def test_cache_forgets_on_goodbye_and_is_bounded():
    cache = mdns.AddressCache(limit=2)
    cache.learn(mdns.AddressRecord("a.local", "10.0.0.1", 120), 0.0)
    cache.learn(mdns.AddressRecord("a.local", "10.0.0.1", 0), 1.0)  # goodbye
    assert cache.lookup("a.local", 2.0) is None
    for n in range(5):
        cache.learn(mdns.AddressRecord(f"n{n}.local", "10.0.0.2", 120), 3.0)
    assert len(cache) == 2 and cache.lookup("n4.local", 4.0) == "10.0.0.2"
    assert cache.lookup("n0.local", 4.0) is None
    cache.learn(mdns.AddressRecord("z.local", "::", 120), 5.0)  # unusable: not kept
    assert cache.lookup("z.local", 5.0) is None


async def test_aioice_resolver_reads_chromium_answers():
    """aioice's own mDNS protocol object, with tether's receive handler installed."""
    gathering.install()
    protocol = aioice.mdns.MDnsProtocol()
    waiting = asyncio.get_running_loop().create_future()
    protocol.queries[dns.name.from_text(NAME)] = {waiting}
    protocol.datagram_received(AAAA_ANSWER, ("10.213.7.2", 5353))
    assert waiting.done() and waiting.result() == "10.213.7.2"
    assert not protocol.queries  # the query is answered and forgotten
