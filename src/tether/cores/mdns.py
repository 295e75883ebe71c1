"""Reading the addresses out of mDNS answers, whatever else the packet carries.

Browsers hide their host addresses behind random ``<uuid>.local`` names
(draft-ietf-mmusic-mdns-ice-candidates) and answer mDNS queries for them. Chromium's
answer carries an NSEC record (RFC 6762 section 6.1) whose next-domain name is
compressed; dnspython refuses that (``DecompressionForbidden``, a FormError), so aioice
0.13 drops the whole packet and the ``.local`` candidate never resolves. This parser reads
only what resolution needs: the A and AAAA records of the answer and additional sections
(RFC 6762 section 6: an answer may come in either), skipping every other record by its
length, following name compression pointers with a bound on the number of jumps.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

HEADER = struct.Struct("!HHHHHH")
RR_FIXED = struct.Struct("!HHIH")  # type, class, TTL, data length
TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1
CACHE_FLUSH = 0x8000  # the top bit of an mDNS record's class (RFC 6762 section 10.2)
FLAG_RESPONSE = 0x8000
MAX_POINTER_JUMPS = 32
MAX_NAME_LENGTH = 255


class AddressRecord(NamedTuple):
    """One A or AAAA record: ``name`` in lower case without the trailing dot."""

    name: str
    address: str
    ttl: int


class MdnsFormatError(ValueError):
    """The packet is not a well-formed DNS message (where it matters for us)."""


def is_response(packet: bytes) -> bool:
    """Whether ``packet`` is a DNS response (QR bit set)."""
    return len(packet) >= HEADER.size and bool(HEADER.unpack_from(packet)[1] & FLAG_RESPONSE)


def read_name(packet: bytes, offset: int) -> tuple[str, int]:
    """The name at ``offset`` (lower case, no trailing dot) and the offset after it."""
    labels: list[str] = []
    end: int | None = None
    jumps = 0
    length = 0
    while True:
        if offset >= len(packet):
            raise MdnsFormatError("name runs past the end of the packet")
        size = packet[offset]
        if size & 0xC0 == 0xC0:  # a compression pointer (RFC 1035 section 4.1.4)
            if offset + 1 >= len(packet):
                raise MdnsFormatError("truncated compression pointer")
            if end is None:
                end = offset + 2
            jumps += 1
            if jumps > MAX_POINTER_JUMPS:
                raise MdnsFormatError("compression pointer loop")
            offset = ((size & 0x3F) << 8) | packet[offset + 1]
            continue
        if size & 0xC0:
            raise MdnsFormatError(f"unknown label type 0x{size:02x}")
        offset += 1
        if size == 0:
            break
        label = packet[offset:offset + size]
        if len(label) != size:
            raise MdnsFormatError("label runs past the end of the packet")
        length += size + 1
        if length > MAX_NAME_LENGTH:
            raise MdnsFormatError("name longer than 255 octets")
        labels.append(label.decode("ascii", errors="replace").lower())
        offset += size
    return ".".join(labels), (end if end is not None else offset)


def parse_addresses(packet: bytes) -> list[AddressRecord]:
    """The records of every IN A/AAAA record in an mDNS response's answer
    and additional sections, in packet order. A query yields nothing. Raises
    MdnsFormatError when the packet is malformed before the records are read."""
    if len(packet) < HEADER.size:
        raise MdnsFormatError("shorter than a DNS header")
    _, flags, questions, answers, authority, additional = HEADER.unpack_from(packet)
    if not flags & FLAG_RESPONSE:
        return []
    offset = HEADER.size
    for _ in range(questions):
        _, offset = read_name(packet, offset)
        offset += 4  # type, class
    found: list[AddressRecord] = []
    for index in range(answers + authority + additional):
        name, offset = read_name(packet, offset)
        if offset + RR_FIXED.size > len(packet):
            raise MdnsFormatError("truncated resource record")
        rtype, rclass, ttl, size = RR_FIXED.unpack_from(packet, offset)
        offset += RR_FIXED.size
        data = packet[offset:offset + size]
        if len(data) != size:
            raise MdnsFormatError("resource record data runs past the end of the packet")
        offset += size
        in_authority = answers <= index < answers + authority
        if in_authority or rclass & ~CACHE_FLUSH != CLASS_IN:
            continue
        if rtype == TYPE_A and size == 4:
            found.append(AddressRecord(name, str(ipaddress.IPv4Address(data)), ttl))
        elif rtype == TYPE_AAAA and size == 16:
            found.append(AddressRecord(name, str(ipaddress.IPv6Address(data)), ttl))
    return found


class AddressCache:
    """Addresses learnt from mDNS answers, until their TTL runs out (RFC 6762 section 10).

    A responder multicasts a record at most once a second (RFC 6762 section 6), so a
    browser's answer to a second query for the same name within a second comes up to a
    second late, and every ICE restart asks again for the same ``.local`` names. Bounded:
    the oldest entry goes first. Pure: the caller passes the time.
    """

    def __init__(self, limit: int = 256) -> None:
        if limit < 1:
            raise ValueError(f"an mDNS cache holds at least one name, not {limit}")
        self.limit = limit
        self._entries: dict[str, tuple[str, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def learn(self, record: AddressRecord, now: float) -> None:
        """Remember ``record``; a TTL of 0 (a goodbye) forgets the name."""
        self._entries.pop(record.name, None)
        if record.ttl <= 0 or ipaddress.ip_address(record.address).is_unspecified:
            return
        self._entries[record.name] = (record.address, now + record.ttl)
        while len(self._entries) > self.limit:
            del self._entries[next(iter(self._entries))]

    def lookup(self, name: str, now: float) -> str | None:
        """The address of ``name`` (any case, trailing dot or not), if still fresh."""
        key = name.lower().rstrip(".")
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry[1]:
            del self._entries[key]
            return None
        return entry[0]
