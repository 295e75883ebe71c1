"""The SDP rules of tether's restart descriptions (src/tether/cores/sdp.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.cores import sdp
from tether.cores.aiortc_core import decode_sdp, encode_sdp

from .tube_pair import Wire, connect_tubes, until

# aiortc's first offer, as a tube makes it (candidates stripped, as the core does).
OFFER = "\r\n".join([
    "v=0",
    "o=- 4004656888 4004656888 IN IP4 0.0.0.0",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0",
    "a=msid-semantic:WMS *",
    "m=application 36473 UDP/DTLS/SCTP webrtc-datachannel",
    "c=IN IP4 10.213.7.1",
    "a=mid:0",
    "a=sctp-port:5000",
    "a=max-message-size:262144",
    "a=ice-ufrag:yEd6",
    "a=ice-pwd:uszdfI8M4LarKCjDvbnpwC",
    "a=fingerprint:sha-256 64:4F:87:F4:3D:2F:A6:96:47:59:96:92:65:77:79:04:AC:BD:2F:BE:6F:B1",
    "a=setup:actpass",
]) + "\r\n"
ANSWER = OFFER.replace("a=setup:actpass", "a=setup:active")
HOST = "candidate:7f3c 1 udp 2130706431 10.0.0.1 40000 typ host"
SRFLX = "candidate:9a1b 1 udp 1694498815 198.51.100.7 50000 typ srflx raddr 10.0.0.1 rport 40000"
RELAY = "candidate:77aa 1 udp 16777215 203.0.113.9 3478 typ relay raddr 0.0.0.0 rport 0"
MDNS = "candidate:1006 1 udp 2113937151 e6493ef5-90b0-474f-995d-18f91357b358.local 5965 typ host"


def test_answer_setup_follows_the_dtls_role():
    assert sdp.answer_setup("client") == "active"
    assert sdp.answer_setup("server") == "passive"
    with pytest.raises(ValueError, match="not negotiated"):
        sdp.answer_setup("auto")


def test_restart_offer_made_from_an_answer_says_actpass():
    """tether answered first; its restart offer must not repeat the answer's 'active'."""
    out = sdp.restart_description(ANSWER, offer=True, ufrag="u2", pwd="p" * 22, version=7,
                                  candidates=[HOST])
    assert sdp.setup_attribute(out) == "actpass"


@pytest.mark.parametrize("role,setup", [("client", "active"), ("server", "passive")])
def test_restart_answer_made_from_an_offer_says_the_negotiated_role(role, setup):
    """tether offered first; its restart answer must not say 'actpass' (Chromium refuses)."""
    out = sdp.restart_description(OFFER, offer=False, ufrag="u2", pwd="p" * 22, version=7,
                                  candidates=[HOST], dtls_role=role)
    assert sdp.setup_attribute(out) == setup
    assert "a=setup:actpass" not in out


def test_restart_description_credentials_version_address_and_trickle():
    out = sdp.restart_description(OFFER, offer=True, ufrag="nEw1", pwd="x" * 22, version=4004656890,
                                  candidates=[HOST, SRFLX])
    assert "a=ice-ufrag:nEw1\r\n" in out and f"a=ice-pwd:{'x' * 22}\r\n" in out
    assert sdp.origin_version(out) == 4004656890
    assert "m=application 50000 UDP/DTLS/SCTP webrtc-datachannel" in out
    assert "c=IN IP4 198.51.100.7" in out
    assert out.count("a=ice-options:trickle") == 1
    # The ICE options sit with the credentials, before them; nothing else moved.
    lines = out.splitlines()
    assert lines.index("a=ice-options:trickle") + 1 == lines.index("a=ice-ufrag:nEw1")
    assert len(lines) == len(OFFER.splitlines()) + 1
    assert out.endswith("\r\n") and "\r\n\r\n" not in out


def test_origin_keeps_session_id_and_rejects_bad_lines():
    out = sdp.with_origin_version(OFFER, 12)
    assert "o=- 4004656888 12 IN IP4 0.0.0.0" in out
    with pytest.raises(ValueError, match="o= line"):
        sdp.origin_version("v=0\r\no=- x\r\n")
    with pytest.raises(ValueError, match="no o= line"):
        sdp.origin_version("v=0\r\n")
    with pytest.raises(ValueError, match="negative"):
        sdp.with_origin_version(OFFER, -1)


def test_default_candidate_prefers_relay_then_srflx_then_host():
    assert sdp.default_candidate([HOST, SRFLX, RELAY]) == ("203.0.113.9", 3478)
    assert sdp.default_candidate([HOST, SRFLX]) == ("198.51.100.7", 50000)
    assert sdp.default_candidate([HOST]) == ("10.0.0.1", 40000)
    assert sdp.default_candidate([MDNS]) is None  # a .local name is no default address
    assert sdp.default_candidate([]) is None
    assert sdp.default_candidate([HOST.replace(" 1 udp", " 2 udp")]) is None  # RTCP only


def test_no_candidates_means_the_trickle_placeholder():
    out = sdp.restart_description(OFFER, offer=True, ufrag="u", pwd="p" * 22, version=1,
                                  candidates=[MDNS])
    assert "m=application 9 UDP/DTLS/SCTP" in out and "c=IN IP4 0.0.0.0" in out


def test_ipv6_default_address():
    v6 = "candidate:1 1 udp 2130706431 2001:db8::5 4000 typ host"
    out = sdp.with_default_address(OFFER, *sdp.default_candidate([v6]))
    assert "c=IN IP6 2001:db8::5" in out and "m=application 4000 " in out


def test_ice_option_merges_into_an_existing_line():
    once = sdp.with_ice_option(OFFER, "trickle")
    assert sdp.with_ice_option(once, "trickle") == once
    both = sdp.with_ice_option(once, "ice2")
    assert "a=ice-options:trickle ice2" in both and both.count("a=ice-options") == 1
    with pytest.raises(ValueError, match="ice-ufrag"):
        sdp.with_ice_option("v=0\r\n", "trickle")


def test_bad_setup_value():
    with pytest.raises(ValueError, match="a=setup"):
        sdp.with_setup(OFFER, "sideways")


@given(st.integers(min_value=0, max_value=2**63), st.sampled_from(["client", "server"]),
       st.booleans())
def test_versions_grow_and_setup_is_always_legal(version, role, offer):
    out = sdp.restart_description(OFFER, offer=offer, ufrag="abcd", pwd="q" * 22,
                                  version=version, candidates=[HOST], dtls_role=role)
    assert sdp.origin_version(out) == version
    assert sdp.setup_attribute(out) == ("actpass" if offer else sdp.answer_setup(role))


async def test_core_restart_descriptions_both_ways(fast_cores):
    """Real aiortc tubes: every description the core sends follows the rules, and the
    tie-breaker stays the session's across generations."""
    a, b = fast_cores
    tube_id = await connect_tubes(a, b, Wire(a, b))
    tie = {core: core._tubes[tube_id].path.current._tie_breaker for core in (a, b)}
    versions = {a: [], b: []}
    for offerer, answerer in ((a, b), (b, a), (a, b)):
        before = offerer._tubes[tube_id].path.generation
        offer = decode_sdp(await offerer.restart_ice(tube_id))
        answer = decode_sdp(await answerer.set_remote_description(tube_id, encode_sdp(offer)))
        await offerer.set_remote_description(tube_id, encode_sdp(answer), is_answer=True)
        await until(lambda: offerer._tubes[tube_id].path.generation > before
                    and answerer._tubes[tube_id].path.generation > before)
        assert sdp.setup_attribute(offer) == "actpass"
        assert sdp.setup_attribute(answer) in ("active", "passive")
        assert "a=ice-options:trickle" in offer and "a=ice-options:trickle" in answer
        versions[offerer].append(sdp.origin_version(offer))
        versions[answerer].append(sdp.origin_version(answer))
    for core in (a, b):
        assert versions[core] == sorted(versions[core])
        assert len(set(versions[core])) == len(versions[core])
        assert core._tubes[tube_id].path.current._tie_breaker == tie[core]

