"""End-to-end sealing of signals with a tunnel secret the relay never sees.

Threat model: whoever runs the relay or holds its token can read, drop, reorder, replay,
forge and change signals in flight. Unsealed, that means swapping the DTLS fingerprint in
an SDP (a man in the middle of every tunnelled byte), injecting signals and squatting a
tunnel name. With sealing the two peers share ``secret``; from it and the tunnel name HKDF
derives the conversation id the relay sees (the name stays private and unguessable) and one
AES-256-GCM key per direction, so a signal cannot be read, changed, forged, reflected
back to its sender or moved to another tunnel. The relay still sees ``tube_id``, ``kind``,
sizes and timing, and can still drop signals (that is denial of service, not compromise).

Wire form: the signal's ``tube_id`` and ``kind`` stay readable (the relay and routers need
them) but are bound into the associated data with the conversation id and the version;
every other key except the transport keys (``peer``, ``session``, ``seq``, ``prev``, added
and read by the signaling client, unauthenticated) is encrypted into ``data``::

    {"tube_id", "kind", "conversation_id": <derived>, "sealed": 1,
     "data": base64(version | sender session | counter | timestamp | nonce | ciphertext)}

The plaintext is the other keys as JSON followed by ``data`` as raw UTF-8 (JSON-escaping a
4 KB SDP would cost more than the encryption).

AES-256-GCM (not ChaCha20-Poly1305, version 1) because WebCrypto has it: a web page
(src/tether/web/tether-peer.js) derives and seals byte for byte the same way. Version 2 has
its own HKDF label, so its conversation ids differ from version 1's and the two never meet
on a relay; a version-1 signal is refused as an unknown version, never misread.

Replay: each :class:`Sealer` has a random sender session and counts its signals; a receiver
accepts a (session, counter) once and only increasing, remembers ``max_sessions`` sessions
(least recently used go first, and no unknown session older than a forgotten one is let in)
and refuses signals stamped more than ``max_age`` seconds away from its clock.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tether.signals import KINDS, SignalError, validate_signal

VERSION = 2
LABEL = b"tether-seal-v2"
CONVERSATION_PREFIX = "t2-"
SEALED_FIELD = "sealed"
TRANSPORT_KEYS = frozenset({"peer", "session", "seq", "prev"})
"""Added by the signaling client after sealing; copied through, never sealed."""
_TRANSPORT_ORDER = ("peer", "session", "seq", "prev")
_SCALARS = frozenset({str, int, float, bool, type(None)})
_loads = json.JSONDecoder().decode
_OPEN_KEYS = TRANSPORT_KEYS | {"tube_id", "kind", "data"}  # not in the plaintext's JSON part
MAX_BLOB = 256 * 1024
"""Largest decoded blob accepted; larger ``data`` is refused before decoding."""
MAX_DATA_CHARS = (MAX_BLOB + 2) // 3 * 4
MAX_TUBE_ID = 1024
MIN_SECRET_CHARS = 16
ROLES = ("connect", "expose")

_HEADER = struct.Struct(">B16sQQ")  # version, sender session, counter, timestamp (us)
_META_LEN = struct.Struct(">I")  # length of the JSON part of the plaintext
_NONCE = 12
_TAG = 16
_MIN_BLOB = _HEADER.size + _NONCE + _TAG

# SealError.reason values
INPUT = "input"
UNSEALED = "unsealed"
MALFORMED = "malformed"
VERSION_UNKNOWN = "version"
UNAUTHENTIC = "unauthentic"
SAME_ROLE = "same_role"
"""Sealed with this tunnel's secret by another peer of our own role (two `connect`s on one
name), or our own signal reflected back; refused all the same, but worth saying apart."""
REPLAYED = "replayed"
STALE = "stale"


class SealError(ValueError):
    """A signal could not be sealed or opened; ``reason`` is one of the constants above."""

    def __init__(self, message: str, reason: str = INPUT) -> None:
        super().__init__(message)
        self.reason = reason


_UNAUTHENTIC_MSG = "does not authenticate: wrong secret or changed in transit"


def new_secret() -> str:
    """A fresh 256-bit tunnel secret as URL-safe text (43 characters)."""
    return secrets.token_urlsafe(32)


def _encode(text: Any, what: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise SealError(f"{what} must be a non-empty string")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise SealError(f"{what} is not valid Unicode text") from None


def _derive(secret: bytes, purpose: bytes, name: bytes) -> bytes:
    # The name goes last, after a NUL-terminated purpose: distinct inputs, distinct info.
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=LABEL, info=purpose + b"\0" + name)
    return hkdf.derive(secret)


def _check_secret(secret: Any) -> bytes:
    raw = _encode(secret, "the tunnel secret")
    if len(secret) < MIN_SECRET_CHARS:
        # HKDF does not stretch weak secrets; refuse the obviously guessable ones.
        raise SealError(
            f"the tunnel secret is too short (at least {MIN_SECRET_CHARS} characters; "
            "use the one `tether expose` prints)"
        )
    return raw


def conversation_id(secret: str, name: str) -> str:
    """The id the relay sees for tunnel ``name``: unlinkable to the name without the secret."""
    digest = _derive(_check_secret(secret), b"conversation", _encode(name, "the tunnel name"))
    return CONVERSATION_PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class Sealer:
    """Seals this side's signals and opens the other side's, for one tunnel."""

    def __init__(
        self,
        secret: str,
        name: str,
        role: str,
        *,
        clock: Callable[[], float] = time.time,
        max_age: float = 600.0,
        max_sessions: int = 64,
    ) -> None:
        if role not in ROLES:
            raise SealError(f"role must be 'connect' or 'expose', not {role!r}")
        if not (isinstance(max_age, (int, float)) and math.isfinite(max_age) and max_age > 0):
            raise SealError("max_age must be a positive number of seconds")
        if not isinstance(max_sessions, int) or max_sessions < 1:
            raise SealError("max_sessions must be a positive integer")
        raw_secret, raw_name = _check_secret(secret), _encode(name, "the tunnel name")
        self.conversation_id = conversation_id(secret, name)
        peer = ROLES[1 - ROLES.index(role)]
        self._seal_key = AESGCM(_derive(raw_secret, f"{role}>{peer}".encode(), raw_name))
        self._open_key = AESGCM(_derive(raw_secret, f"{peer}>{role}".encode(), raw_name))
        self._clock = clock
        cid = self.conversation_id.encode("ascii")
        self._ad_prefix = LABEL + bytes([len(cid)]) + cid
        self._max_age_us = int(max_age * 1_000_000)
        self._max_sessions = max_sessions
        self._session = os.urandom(16)
        self._counter = 0
        # sender session -> (last counter, its timestamp), least recently used first
        self._seen: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self._forgotten_until = 0  # newest timestamp (us) of a session LRU forgot
        # The last opened signal's sealed extra keys, parsed (only scalars: shared safely).
        self._last_meta = b"\0"
        self._last_hidden: dict[str, Any] = {}

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    def _ad(self, header: bytes, tube_id: str, kind: str) -> bytes:
        # label | header | conversation id | len(tube_id) | tube_id | kind: unambiguous.
        tube = tube_id.encode("utf-8", "surrogatepass")
        return self._ad_prefix + header + _META_LEN.pack(len(tube)) + tube + kind.encode("ascii")

    def seal(self, signal: dict[str, Any]) -> dict[str, Any]:
        """Return the wire form of ``signal`` (see the module docstring)."""
        if not isinstance(signal, dict):
            raise SealError(f"a signal must be a dict, not {type(signal).__name__}")
        try:
            validate_signal(signal)
        except SignalError as exc:
            raise SealError(f"cannot seal: {exc}") from None
        tube_id, kind = signal["tube_id"], signal["kind"]
        if len(tube_id) > MAX_TUBE_ID:
            raise SealError(f"cannot seal: 'tube_id' longer than {MAX_TUBE_ID} characters")
        hidden = {k: v for k, v in signal.items() if k not in _OPEN_KEYS}
        if not all(isinstance(key, str) for key in hidden):
            raise SealError("cannot seal: every key must be a string")
        try:
            meta = json.dumps(hidden, separators=(",", ":"), allow_nan=False).encode("ascii")
        except (TypeError, ValueError, RecursionError) as exc:
            raise SealError(f"cannot seal: not JSON-serializable ({exc})") from None
        # surrogatepass: any Python str (even a lone surrogate from JSON) round-trips.
        data = signal.get("data", "").encode("utf-8", "surrogatepass")
        plaintext = _META_LEN.pack(len(meta)) + meta + data
        if len(plaintext) > MAX_BLOB - _MIN_BLOB:
            raise SealError(f"cannot seal: signal larger than {MAX_BLOB} bytes")
        try:
            header = _HEADER.pack(VERSION, self._session, self._counter + 1, self._now_us())
        except (struct.error, TypeError, ValueError, OverflowError) as exc:
            raise SealError(f"cannot seal: clock gave an unusable time ({exc})") from None
        self._counter += 1
        nonce = os.urandom(_NONCE)
        ciphertext = self._seal_key.encrypt(nonce, plaintext, self._ad(header, tube_id, kind))
        blob = binascii.b2a_base64(header + nonce + ciphertext, newline=False)
        wire = {k: v for k, v in signal.items() if k in TRANSPORT_KEYS}
        wire.update(tube_id=tube_id, kind=kind, conversation_id=self.conversation_id)
        wire.update({"data": blob.decode("ascii"), SEALED_FIELD: VERSION})
        return wire

    def open(self, wire: Any) -> dict[str, Any]:
        """Return the signal sealed in ``wire`` (plus its transport keys) or raise SealError."""
        if not isinstance(wire, dict):
            raise SealError(f"a signal must be a JSON object, not {type(wire).__name__}", MALFORMED)
        marker = wire.get(SEALED_FIELD)
        if marker is None:
            raise SealError("unsealed signal: the other side has no secret or a relay forged it",
                            UNSEALED)
        if type(marker) is not int or marker != VERSION:
            raise SealError("sealed with an unknown version", VERSION_UNKNOWN)
        tube_id, kind, data = wire.get("tube_id"), wire.get("kind"), wire.get("data")
        if not isinstance(tube_id, str) or not tube_id or len(tube_id) > MAX_TUBE_ID:
            raise SealError("malformed sealed signal: bad 'tube_id'", MALFORMED)
        if not isinstance(kind, str) or kind not in KINDS:
            raise SealError("malformed sealed signal: bad 'kind'", MALFORMED)
        if not isinstance(data, str):
            raise SealError("malformed sealed signal: 'data' is not a string", MALFORMED)
        if len(data) > MAX_DATA_CHARS:
            raise SealError(f"malformed sealed signal: larger than {MAX_BLOB} bytes", MALFORMED)
        if wire.get("conversation_id") != self.conversation_id:
            raise SealError(_UNAUTHENTIC_MSG + " (conversation id differs)", UNAUTHENTIC)
        blob = self._decode(data)
        if blob[0] != VERSION:
            raise SealError("sealed with an unknown version", VERSION_UNKNOWN)
        header, nonce, ciphertext = (
            blob[: _HEADER.size], blob[_HEADER.size : _MIN_BLOB - _TAG], blob[_MIN_BLOB - _TAG :]
        )
        try:
            plaintext = self._open_key.decrypt(nonce, ciphertext, self._ad(header, tube_id, kind))
        except InvalidTag:
            # Only on failure: does it open with our own direction's key?
            try:
                self._seal_key.decrypt(nonce, ciphertext, self._ad(header, tube_id, kind))
            except InvalidTag:
                raise SealError(_UNAUTHENTIC_MSG, UNAUTHENTIC) from None
            raise SealError("sealed by a peer of our own role (or our own signal sent back)",
                            SAME_ROLE) from None
        _, session, counter, stamp = _HEADER.unpack(header)
        try:
            (size,) = _META_LEN.unpack_from(plaintext)
            meta = plaintext[_META_LEN.size : _META_LEN.size + size]
            if meta == self._last_meta:  # a peer's signals mostly carry the same extra keys
                hidden = self._last_hidden
            else:
                hidden = _loads(meta.decode("utf-8"))
                if type(hidden) is dict and all(type(v) in _SCALARS for v in hidden.values()):
                    self._last_meta, self._last_hidden = meta, hidden  # copied below
            text = plaintext[_META_LEN.size + size :].decode("utf-8", "surrogatepass")
        except (ValueError, RecursionError, struct.error):
            hidden = None
        if not isinstance(hidden, dict):
            raise SealError("malformed sealed signal: contents are not a JSON object", MALFORMED)
        self._check_fresh(session, counter, stamp)
        signal = {**hidden, "tube_id": tube_id, "kind": kind, "data": text}
        for key in _TRANSPORT_ORDER:
            if key in wire:
                signal[key] = wire[key]
        return signal

    @staticmethod
    def _decode(data: str) -> bytes:
        # Only the canonical encoding passes, so every character change is refused. Faster
        # than strict_mode: the lenient decoder skips stray characters and stops at padding,
        # which makes the output shorter than the length implies; the last group is
        # re-encoded to catch set unused bits.
        try:
            blob = binascii.a2b_base64(data) if len(data) % 4 == 0 else b""
        except (binascii.Error, ValueError):
            blob = b""
        expected = len(data) // 4 * 3 - data.endswith("=") - data.endswith("==")
        tail = blob[-(len(blob) % 3 or 3) :]
        if (
            not blob
            or len(blob) != expected
            or binascii.b2a_base64(tail, newline=False).decode("ascii") != data[-4:]
        ):
            raise SealError("malformed sealed signal: 'data' is not base64", MALFORMED)
        if len(blob) < _MIN_BLOB:
            raise SealError("malformed sealed signal: 'data' too short", MALFORMED)
        return blob

    def _check_fresh(self, session: bytes, counter: int, stamp: int) -> None:
        """Refuse stale or replayed signals; remember this one only if it is accepted."""
        now = self._now_us()
        if stamp < now - self._max_age_us:
            raise SealError(f"too old: sealed {(now - stamp) / 1e6:.0f} s ago", STALE)
        if stamp > now + self._max_age_us:
            raise SealError(
                f"from the future: sealed {(stamp - now) / 1e6:.0f} s ahead (clock skew?)", STALE
            )
        seen = self._seen.get(session)
        if seen is not None and counter <= seen[0]:
            raise SealError(f"replayed signal (counter {counter}, already at {seen[0]})", REPLAYED)
        if seen is None and stamp <= self._forgotten_until:
            raise SealError("replayed signal (from a session too old to remember)", REPLAYED)
        self._seen[session] = (counter, stamp)
        self._seen.move_to_end(session)
        if len(self._seen) > self._max_sessions:
            # A replay of the forgotten session is no newer than its last signal: refuse
            # unknown sessions up to that time from now on.
            _, (_, last_stamp) = self._seen.popitem(last=False)
            self._forgotten_until = max(self._forgotten_until, last_stamp)
