"""Targets named per stream (OPEN with a host:port), over real aiortc channels and TCP:
the dial policy decides, refusals come back coded, and the opener learns the outcome
before any byte of the stream reaches its client."""

from __future__ import annotations

import asyncio
import contextlib

from tether.allow import AllowList
from tether.tunnel import Tunnel, reasons

from .tunnel_peers import channel_pair, echo_server, refused_port


@contextlib.asynccontextmanager
async def pair(target, allow: str | None):
    policy = AllowList.parse(allow).resolve if allow else None
    async with channel_pair() as (ca, cb):
        connect = Tunnel(ca, name="c")
        expose = Tunnel(cb, name="e", target=target, dial_policy=policy)
        connect.start()
        expose.start()
        try:
            yield connect, expose
        finally:
            await connect.close()
            await expose.close()


async def carry_to(connect: Tunnel, target, payload: bytes) -> tuple[str | None, bytes]:
    """A local socket pair: one end carried to ``target``, the other is the 'client'."""
    outcome: list[str | None] = []
    opened = asyncio.Event()
    received = bytearray()

    async def on_client(reader, writer):
        def on_open(reason):
            outcome.append(reason)
            # Written before any byte from the target: the client sees this first.
            writer.write(b"OK:" if reason is None else b"NO:")
            opened.set()
        await connect.carry(reader, writer, target, on_open)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(payload)
        writer.write_eof()
        received += await asyncio.wait_for(reader.read(), 30)
        writer.close()
        await asyncio.wait_for(opened.wait(), 10)
    finally:
        server.close()
    return outcome[0], bytes(received)


async def test_named_targets_are_dialed_only_if_allowed():
    async with echo_server() as fixed, echo_server() as other:
        closed = refused_port()
        async with pair(fixed, f"localhost:{other[1]},127.0.0.1:{closed}") as (c, e):
            # Named and allowed (by name; "localhost" may resolve to ::1 first: refused,
            # then 127.0.0.1 answers).
            reason, got = await carry_to(c, ("localhost", other[1]), b"named")
            assert (reason, got) == (None, b"OK:named")
            # No target named: the fixed one, as always.
            reason, got = await carry_to(c, None, b"fixed")
            assert (reason, got) == (None, b"OK:fixed")
            # Not allowed: the fixed target's address on another port is not a loophole.
            reason, got = await carry_to(c, ("127.0.0.1", fixed[1]), b"x")
            assert got == b"NO:" and reasons.code_of(reason) == reasons.DENIED
            # Allowed, nothing listening.
            reason, got = await carry_to(c, ("127.0.0.1", closed), b"x")
            assert got == b"NO:" and reasons.code_of(reason) == reasons.REFUSED
            assert e.stats["opens_refused_denied"] == 1


async def test_without_an_allow_list_named_targets_are_refused():
    async with echo_server() as fixed:
        async with pair(fixed, None) as (c, e):
            reason, got = await carry_to(c, fixed, b"x")
            assert got == b"NO:" and reasons.code_of(reason) == reasons.DENIED
            assert "dynamic targets are not supported" in reason
            reason, got = await carry_to(c, None, b"plain")
            assert (reason, got) == (None, b"OK:plain")


async def test_an_allow_list_alone_refuses_unnamed_streams():
    async with echo_server() as other:
        async with pair(None, f"127.0.0.1:{other[1]}") as (c, e):
            assert e.accepts_streams
            reason, got = await carry_to(c, None, b"x")
            assert got == b"NO:" and reasons.code_of(reason) == reasons.BAD_TARGET
            reason, got = await carry_to(c, other, b"ok")
            assert (reason, got) == (None, b"OK:ok")
