"""Plain WebSocket data frames read without websockets' generator parser (issue 9).

websockets' sans-I/O parser handles each frame with a chain of generators
(``Protocol.parse`` -> ``Frame.parse`` -> ``StreamReader.read_exact``, three of them per
frame), an events list and a ``send_data`` per read. On the relay, which is CPU-bound at
one small signal per frame, that was a third of its CPU.

:class:`FastServerConnection` and :class:`FastClientConnection` read the frames of an
established connection that are plain (a whole text or binary message in one frame: FIN
set, no RSV bits, masked exactly when the peer is a client, within the size limit)
themselves: the header from the bytes, the payload unmasked with websockets' own
``apply_mask``, and the frame put into the connection's message assembler, where
websockets' ``process_event`` would put it. Everything else - control frames (ping, pong,
close), fragments, extensions such as permessage-deflate, oversized or malformed
frames, the handshake, debug logging - is handed, as whole frames and in order, to
websockets' parser, which does what it always does. That is why this is safe:

- websockets' parser only ever gets whole frames from us, so after each one it is back
  at a frame boundary (suspended in ``StreamReader.at_eof`` with an empty buffer), and
  we only read frames ourselves when it is exactly there (checked on every read);
- a plain frame changes nothing in websockets' protocol state (``Protocol.recv_frame``
  only appends it to the events), so putting it into the assembler is all that parsing
  it would have done; UTF-8 is checked where it always is, when the message is read;
- a frame split across reads waits in ``_held`` (bounded by the size limit: a header
  declaring more goes to websockets at once, which refuses it; grown in place, and looked
  at again only once the whole frame is there), and at EOF what is held goes to
  websockets first, so a truncated frame ends the connection as before.

Relies on websockets' private structure (``Protocol.parser``, ``reader``,
``current_size``, ``Connection.recv_messages``), so websockets is pinned exactly;
tests/test_ws_fastpath.py checks that random byte streams, cut anywhere, give the same
messages and the same close as websockets alone. Upstream: websockets could parse
frames without generators when a whole frame is buffered.
"""

from __future__ import annotations

from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.streams import StreamReader

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

_OPEN = State.OPEN
_AT_BOUNDARY = StreamReader.at_eof.__code__
_PLAIN = {0x81: Opcode.TEXT, 0x82: Opcode.BINARY}  # FIN, no RSV bits, text or binary
_TEXT = Opcode.TEXT
_WHOLE = (Opcode.TEXT, Opcode.BINARY)


class _FastFrames:
    """The fast read, shared by the server's and the client's connection class."""

    _masked = 0
    """0x80 if the peer must mask its frames (it is a client), else 0."""
    _held: bytearray | None = None
    """The start of a frame whose end has not arrived yet (only when read here); it grows
    in place, so a frame arriving a byte at a time costs no more than websockets' buffer."""
    _need = 0
    """How long ``_held`` must be before it is worth looking at again."""

    protocol: Any
    recv_messages: Any

    def _frame_limit(self) -> int | None:
        """None unless websockets is at a frame boundary of an open connection with
        nothing special going on: then the largest plain frame it would accept."""
        protocol = self.protocol
        if (protocol.state is not _OPEN or protocol.current_size is not None
                or protocol.extensions or protocol.debug):
            return None
        waiting = protocol.parser  # (the server's parse() delegates to Protocol.parse)
        while (inner := waiting.gi_yieldfrom) is not None:
            waiting = inner
        if waiting.gi_code is not _AT_BOUNDARY:
            return None
        limit = protocol.max_message_size
        fragment = protocol.max_fragment_size
        if limit is None:
            limit = fragment
        elif fragment is not None and fragment < limit:
            limit = fragment
        return (1 << 63) if limit is None else limit

    def data_received(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            held += data
            if len(held) < self._need:
                return
            data = bytes(held)
            self._held = None
        limit = self._frame_limit()
        if limit is None:
            super().data_received(data)  # type: ignore[misc]
            return
        masked = self._masked
        put = self.recv_messages.put
        end = len(data)
        at = 0
        refused = False
        while end - at >= 2:
            head1 = data[at]
            head2 = data[at + 1]
            length = head2 & 0x7F
            start = at + 2
            if length == 126:
                if end - at < 4:
                    break
                length = (data[start] << 8) | data[start + 1]
                start += 2
            elif length == 127:
                if end - at < 10:
                    break
                length = int.from_bytes(data[start:start + 8], "big")
                start += 8
            if length > limit:
                refused = True  # websockets refuses it (PayloadTooBig) as soon as it sees the header
                break
            payload_at = start + 4 if head2 & 0x80 else start
            stop = payload_at + length
            if stop > end:
                self._hold(data[at:], stop - at)  # the rest of this frame is on its way
                return
            opcode = _PLAIN.get(head1)
            if opcode is not None and head2 & 0x80 == masked:
                payload = data[payload_at:stop]
                if masked:
                    payload = apply_mask(payload, data[start:payload_at])
                put(Frame(opcode, payload))
                at = stop
                continue
            # A control frame, a fragment or anything websockets must judge: hand it this
            # whole frame, then go on only if it is back where we may read again.
            super().data_received(data[at:stop])  # type: ignore[misc]
            at = stop
            limit = self._frame_limit()
            if limit is None:
                break
        if at < end:
            if limit is None or refused:
                super().data_received(data[at:])  # type: ignore[misc]
            else:
                self._hold(data[at:], end - at + 1)  # a header cut short

    def _hold(self, start: bytes, need: int) -> None:
        self._held = bytearray(start)
        self._need = need

    async def recv_batch(self, most: int = 64) -> list[str | bytes]:
        """``recv()``, and with it up to ``most - 1`` whole messages already waiting behind
        the first, without a ``recv`` each (one wake-up of the reader per read from the
        network, not per message). A fragmented message, or text that is not valid UTF-8,
        is left for the next ``recv()``, which assembles it or fails the connection exactly
        as websockets does. Raises what ``recv()`` raises."""
        batch: list[str | bytes] = [await self.recv()]  # type: ignore[attr-defined]
        assembler = self.recv_messages
        waiting = assembler.frames.queue
        while waiting and len(batch) < most:
            frame = waiting[0]
            if not frame.fin or frame.opcode not in _WHOLE:
                break
            if frame.opcode is _TEXT:
                try:
                    batch.append(frame.data.decode())
                except UnicodeDecodeError:
                    break
            else:
                batch.append(bytes(frame.data))
            waiting.popleft()
        assembler.maybe_resume()
        return batch

    def eof_received(self) -> bool | None:
        held = self._held
        if held is not None:
            self._held = None
            super().data_received(bytes(held))  # type: ignore[misc]
        return super().eof_received()  # type: ignore[misc]


class FastServerConnection(_FastFrames, ServerConnection):
    """websockets' server connection with plain frames read by :class:`_FastFrames`, and
    text frames written in batches by :meth:`write_texts`."""

    _masked = 0x80

    def write_texts(self, texts: list[str]) -> None:
        """Send each of ``texts`` as one text frame, all in one transport write, on an open
        connection. A server's frames are not masked, so a plain frame is a 2-10 byte
        header and the UTF-8 payload (RFC 6455 section 5.2): we write those ourselves,
        after whatever websockets has waiting to send. With an extension (deflate) or
        debug logging, websockets frames them (``send_text``), as always."""
        protocol = self.protocol
        chunks = protocol.data_to_send()
        if protocol.extensions or protocol.debug:
            for text in texts:
                protocol.send_text(text.encode())
            chunks += protocol.data_to_send()
        else:
            append = chunks.append
            for text in texts:
                payload = text.encode()
                append(text_frame_header(len(payload)))
                append(payload)
        self.transport.write(b"".join(chunks))


_SHORT_HEADERS = [bytes((0x81, n)) for n in range(126)]


def text_frame_header(length: int) -> bytes:
    """The header of an unmasked, unfragmented text frame carrying ``length`` bytes."""
    if length < 126:
        return _SHORT_HEADERS[length]
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big")
    return b"\x81\x7f" + length.to_bytes(8, "big")


class FastClientConnection(_FastFrames, ClientConnection):
    """websockets' client connection with plain frames read by :class:`_FastFrames`."""
