"""Rewriting tether's SDP so that any standard WebRTC peer (a browser first) accepts it.

aiortc writes the first offer or answer; tether's ICE restarts (ice_path.py) happen below
aiortc, so the core builds each restart description itself from the first one. Pure text
rules, one function each, so they are tested without a peer connection:

- credentials: fresh ``a=ice-ufrag``/``a=ice-pwd`` per generation (RFC 8839 section 4.4.1.1.1);
- ``a=setup``: ``actpass`` in every offer, the negotiated ``active``/``passive`` in every
  answer (RFC 8842 section 5: an answer must not say ``actpass``; Chromium rejects it);
- ``o=``: the session version grows with each new description (RFC 3264 section 8,
  RFC 8866 section 5.2);
- the ``m=`` port and ``c=`` address: the generation's current default candidate
  (RFC 8839 section 4.2.1.2: relayed, else server-reflexive, else host);
- ``a=ice-options:trickle``: tether accepts trickled candidates (RFC 8840 section 4.1.1).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

SETUP_VALUES = frozenset({"active", "passive", "actpass", "holdconn"})
# Default candidate preference: the one most likely to work (RFC 8839 section 4.2.1.2).
DEFAULT_TYPE_ORDER = {"relay": 0, "srflx": 1, "prflx": 2, "host": 3}
NO_ADDRESS = ("0.0.0.0", 9)  # RFC 8840 section 4.1.1: no candidate yet


def _lines(sdp: str) -> list[str]:
    return [line for line in sdp.splitlines() if line]


def _join(lines: Iterable[str]) -> str:
    return "\r\n".join(lines) + "\r\n"


def setup_attribute(sdp: str) -> str | None:
    """The first ``a=setup`` value of ``sdp`` (None without one)."""
    for line in _lines(sdp):
        if line.startswith("a=setup:"):
            return line.split(":", 1)[1].strip()
    return None


def with_setup(sdp: str, value: str) -> str:
    """``sdp`` with every ``a=setup`` line set to ``value``."""
    if value not in SETUP_VALUES:
        raise ValueError(f"bad a=setup value {value!r}; known: {sorted(SETUP_VALUES)}")
    return _join(f"a=setup:{value}" if line.startswith("a=setup:") else line
                 for line in _lines(sdp))


def answer_setup(dtls_role: str) -> str:
    """The ``a=setup`` an answer carries for our negotiated DTLS role (RFC 8842 section 5):
    the DTLS client is ``active``, the server ``passive``."""
    if dtls_role == "client":
        return "active"
    if dtls_role == "server":
        return "passive"
    raise ValueError(f"DTLS role {dtls_role!r} is not negotiated yet (client or server)")


def origin_version(sdp: str) -> int:
    """The session version of the ``o=`` line."""
    for line in _lines(sdp):
        if line.startswith("o="):
            fields = line[2:].split()
            if len(fields) == 6 and fields[2].isdigit():
                return int(fields[2])
            raise ValueError(f"bad o= line {line!r}")
    raise ValueError("SDP has no o= line")


def with_origin_version(sdp: str, version: int) -> str:
    """``sdp`` with the ``o=`` line's session version set to ``version``."""
    if version < 0:
        raise ValueError(f"an SDP session version is not negative: {version}")
    out = []
    for line in _lines(sdp):
        if line.startswith("o="):
            fields = line[2:].split()
            if len(fields) != 6:
                raise ValueError(f"bad o= line {line!r}")
            fields[2] = str(version)
            line = "o=" + " ".join(fields)
        out.append(line)
    return _join(out)


def default_candidate(candidates: Sequence[str]) -> tuple[str, int] | None:
    """The address and port of the default candidate among component-1 UDP ``candidates``
    ('candidate:...' lines): relayed first, then reflexive, then host; the highest
    priority within a type. None when there is none (or only ``.local`` names)."""
    best: tuple[tuple[int, int], str, int] | None = None
    for line in candidates:
        text = line[len("candidate:"):] if line.startswith("candidate:") else line
        bits = text.split()
        if len(bits) < 8 or bits[1] != "1" or bits[2].lower() != "udp" or bits[6] != "typ":
            continue
        try:
            priority, port = int(bits[3]), int(bits[5])
            ipaddress.ip_address(bits[4])
        except ValueError:  # an mDNS name cannot be a default address
            continue
        rank = (DEFAULT_TYPE_ORDER.get(bits[7], len(DEFAULT_TYPE_ORDER)), -priority)
        if best is None or rank < best[0]:
            best = (rank, bits[4], port)
    return None if best is None else (best[1], best[2])


def with_default_address(sdp: str, host: str, port: int) -> str:
    """``sdp`` with each ``m=`` line's port and each ``c=`` line set to ``host``/``port``."""
    family = "IP6" if ipaddress.ip_address(host).version == 6 else "IP4"
    out = []
    for line in _lines(sdp):
        if line.startswith("m="):
            fields = line[2:].split()
            if len(fields) < 3:
                raise ValueError(f"bad m= line {line!r}")
            fields[1] = str(port)
            line = "m=" + " ".join(fields)
        elif line.startswith("c="):
            line = f"c=IN {family} {host}"
        out.append(line)
    return _join(out)


def with_ice_option(sdp: str, option: str) -> str:
    """``sdp`` with ``option`` in its ``a=ice-options``: added to the line that exists, or
    a new line at the level of the ICE credentials (before the first ``a=ice-ufrag``)."""
    lines = _lines(sdp)
    for i, line in enumerate(lines):
        if line.startswith("a=ice-options:"):
            options = line.split(":", 1)[1].split()
            if option not in options:
                lines[i] = f"{line} {option}"
            return _join(lines)
    for i, line in enumerate(lines):
        if line.startswith("a=ice-ufrag:"):
            return _join([*lines[:i], f"a=ice-options:{option}", *lines[i:]])
    raise ValueError("SDP has no a=ice-ufrag line to put a=ice-options next to")


def with_session_attribute(sdp: str, attribute: str) -> str:
    """``sdp`` with ``a=<attribute>`` at session level (before the first ``m=`` line),
    where peers that do not know it ignore it (RFC 8866 section 5.13)."""
    lines = _lines(sdp)
    at = next((i for i, line in enumerate(lines) if line.startswith("m=")), len(lines))
    return _join([*lines[:at], f"a={attribute}", *lines[at:]])


def session_attribute(sdp: str, name: str) -> str | None:
    """The value of the session-level ``a=<name>:<value>`` of ``sdp`` (None without one)."""
    prefix = f"a={name}:"
    for line in _lines(sdp):
        if line.startswith("m="):
            return None
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


def with_credentials(sdp: str, ufrag: str, pwd: str) -> str:
    """``sdp`` with its ICE credentials replaced."""
    out = []
    for line in _lines(sdp):
        if line.startswith("a=ice-ufrag:"):
            line = f"a=ice-ufrag:{ufrag}"
        elif line.startswith("a=ice-pwd:"):
            line = f"a=ice-pwd:{pwd}"
        out.append(line)
    return _join(out)


def restart_description(
    base: str,
    *,
    offer: bool,
    ufrag: str,
    pwd: str,
    version: int,
    candidates: Sequence[str],
    dtls_role: str | None = None,
) -> str:
    """A new generation's offer or answer, built from ``base`` (our first description,
    without candidates): fresh credentials, ``a=setup`` per role (offers ``actpass``,
    answers from ``dtls_role``), session ``version``, the default address from
    ``candidates`` and ``a=ice-options:trickle``. Candidates are not added."""
    sdp = with_credentials(base, ufrag, pwd)
    sdp = with_setup(sdp, "actpass" if offer else answer_setup(dtls_role or ""))
    sdp = with_origin_version(sdp, version)
    sdp = with_default_address(sdp, *(default_candidate(candidates) or NO_ADDRESS))
    return with_ice_option(sdp, "trickle")
