"""DTLS 1.2 record protection for AES-GCM suites, done with ``cryptography``'s AESGCM.

Why: after the handshake, aiortc protects each SCTP packet through pyOpenSSL's memory
BIOs (SSL_write + BIO_read to send, BIO_write + SSL_read to receive): four cffi calls
and their error checks per datagram, most of the DTLS cost. The record format itself is
simple, so once OpenSSL has negotiated the keys we seal and open application-data
records here and leave everything else (handshake, alerts, other suites) to OpenSSL.

- Keys: the TLS 1.2 PRF (RFC 5246 section 5) over the master secret, "key expansion",
  server_random + client_random gives client/server write keys and 4-byte salts
  (RFC 5246 section 6.3; AEAD suites have no MAC keys).
- Records (RFC 6347 section 4.1): type, version, epoch, 48-bit sequence number, length;
  AES-GCM per RFC 5288: nonce = salt + 8-byte explicit nonce (sent in the record; we use
  epoch + sequence number, as OpenSSL does), additional data = epoch + sequence number +
  type + version + plaintext length.
- Anti-replay (RFC 6347 section 4.1.2.6): a 64-record sliding window, updated only after a
  record authenticated; a record that fails to authenticate is dropped silently (section
  4.1.2.7).
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HEADER = struct.Struct("!BHHHIH")  # type, version, epoch, seq (16 + 32 bits), length
HEADER_SIZE = HEADER.size  # 13
_FAST_HEADER = struct.Struct("!BHQH")  # type, version, epoch << 48 | seq, length
_TYPE_VERSION = struct.Struct("!BH")
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_SEQ_MASK = (1 << 48) - 1
EXPLICIT_NONCE = 8
TAG = 16
APPLICATION_DATA = 23
DTLS12 = 0xFEFD
WINDOW = 64

# OpenSSL cipher name -> (key length, PRF hash).
SUITES: dict[str, tuple[int, str]] = {
    "ECDHE-ECDSA-AES128-GCM-SHA256": (16, "sha256"),
    "ECDHE-RSA-AES128-GCM-SHA256": (16, "sha256"),
    "ECDHE-ECDSA-AES256-GCM-SHA384": (32, "sha384"),
    "ECDHE-RSA-AES256-GCM-SHA384": (32, "sha384"),
}


class RecordError(ValueError):
    """A datagram is not a well-formed DTLS 1.2 record for this layer."""


def prf(secret: bytes, label: bytes, seed: bytes, size: int, digest: str = "sha256") -> bytes:
    """The TLS 1.2 PRF, P_hash(secret, label + seed) cut to ``size`` bytes (RFC 5246 section 5)."""
    seed = label + seed
    out = b""
    a = seed
    while len(out) < size:
        a = hmac.digest(secret, a, digest)
        out += hmac.digest(secret, a + seed, digest)
    return out[:size]


@dataclass(frozen=True)
class Keys:
    client_key: bytes
    server_key: bytes
    client_salt: bytes
    server_salt: bytes


def derive_keys(master: bytes, client_random: bytes, server_random: bytes,
                key_length: int, digest: str) -> Keys:
    block = prf(master, b"key expansion", server_random + client_random,
                2 * key_length + 8, digest)
    k = key_length
    return Keys(block[:k], block[k:2 * k], block[2 * k:2 * k + 4], block[2 * k + 4:2 * k + 8])


class ReplayWindow:
    """RFC 6347 section 4.1.2.6: accept each sequence number once, and none older than
    the window's 64 records."""

    __slots__ = ("highest", "bits")

    def __init__(self) -> None:
        self.highest = -1
        self.bits = 0  # bit i: highest - i was received

    def fresh(self, seq: int) -> bool:
        if seq > self.highest:
            return True
        offset = self.highest - seq
        return offset < WINDOW and not (self.bits >> offset) & 1

    def mark(self, seq: int) -> None:
        if seq > self.highest:
            shift = seq - self.highest
            self.bits = ((self.bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self.highest = seq
        else:
            self.bits |= 1 << (self.highest - seq)


class RecordLayer:
    """Seals and opens one epoch's application-data records for one side of a DTLS 1.2
    association (``is_client``: this side did the client handshake)."""

    def __init__(self, keys: Keys, is_client: bool, epoch: int, next_seq: int) -> None:
        write_key, read_key = ((keys.client_key, keys.server_key) if is_client
                               else (keys.server_key, keys.client_key))
        self._write = AESGCM(write_key)
        self._read = AESGCM(read_key)
        self._write_salt = keys.client_salt if is_client else keys.server_salt
        self._read_salt = keys.server_salt if is_client else keys.client_salt
        self.epoch = epoch
        self.next_seq = next_seq
        self.window = ReplayWindow()
        self.opened = 0  # records that authenticated (proves the keys)
        self.rejected = 0

    @classmethod
    def for_suite(cls, cipher: str, master: bytes, client_random: bytes,
                  server_random: bytes, is_client: bool, epoch: int,
                  next_seq: int) -> RecordLayer | None:
        """A layer for ``cipher``, or None when it is not a suite we handle."""
        suite = SUITES.get(cipher)
        if suite is None:
            return None
        keys = derive_keys(master, client_random, server_random, *suite)
        return cls(keys, is_client, epoch, next_seq)

    def seal(self, content_type: int, plain: bytes) -> bytes:
        """One record carrying ``plain``, with the next sequence number."""
        seq = self.next_seq
        self.next_seq = seq + 1
        seq_num = _U64.pack((self.epoch << 48) | seq)
        type_version = _TYPE_VERSION.pack(content_type, DTLS12)
        sealed = self._write.encrypt(self._write_salt + seq_num, plain,
                                     seq_num + type_version + _U16.pack(len(plain)))
        return b"".join((type_version, seq_num, _U16.pack(EXPLICIT_NONCE + len(sealed)),
                         seq_num, sealed))

    def open(self, record: bytes, check_replay: bool = True) -> bytes | None:
        """The plaintext of one whole record of this epoch, or None if it does not
        authenticate or is a replay (it is then to be dropped)."""
        _, _, epoch_seq, length = _FAST_HEADER.unpack_from(record)
        if epoch_seq >> 48 != self.epoch or length != len(record) - HEADER_SIZE:
            raise RecordError("not a whole record of this epoch")
        if length < EXPLICIT_NONCE + TAG:
            return None
        seq = epoch_seq & _SEQ_MASK
        if check_replay and not self.window.fresh(seq):
            self.rejected += 1
            return None
        aad = record[3:11] + record[:3] + _U16.pack(length - EXPLICIT_NONCE - TAG)
        try:
            plain = self._read.decrypt(self._read_salt + record[13:21], record[21:], aad)
        except InvalidTag:
            self.rejected += 1
            return None
        if check_replay:
            self.window.mark(seq)
        self.opened += 1
        return plain

    def reseal(self, record: bytes) -> bytes | None:
        """A record this side's OpenSSL sealed (with its own sequence number) sealed again
        with ours, so the peer's replay window never sees our sequence go back."""
        content_type, version, epoch, seq_hi, seq_lo, length = HEADER.unpack_from(record)
        explicit = record[HEADER_SIZE:HEADER_SIZE + EXPLICIT_NONCE]
        aad = struct.pack("!HHIBHH", epoch, seq_hi, seq_lo, content_type, version,
                          length - EXPLICIT_NONCE - TAG)
        try:
            plain = self._write.decrypt(self._write_salt + explicit,
                                        record[HEADER_SIZE + EXPLICIT_NONCE:], aad)
        except InvalidTag:
            return None
        return self.seal(content_type, plain)


def split_records(datagram: bytes) -> list[bytes] | None:
    """The DTLS records in one datagram (RFC 6347 section 4.1.1 lets several share one),
    or None if the datagram does not split into whole records."""
    records = []
    pos, end = 0, len(datagram)
    while pos < end:
        if end - pos < HEADER_SIZE:
            return None
        length = int.from_bytes(datagram[pos + 11:pos + 13], "big")
        stop = pos + HEADER_SIZE + length
        if stop > end:
            return None
        records.append(datagram[pos:stop])
        pos = stop
    return records


def record_seq(record: bytes) -> tuple[int, int]:
    """(epoch, sequence number) of a record."""
    _, _, epoch, seq_hi, seq_lo, _ = HEADER.unpack_from(record)
    return epoch, (seq_hi << 32) | seq_lo

