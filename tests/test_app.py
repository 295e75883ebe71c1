"""End to end: two sides meet through a real signaling server and carry real TCP streams."""

from __future__ import annotations

import asyncio
import os
import secrets

import pytest

from tether.app import ConnectSide, ExposeSide
from tether.connection_manager import ConnectionState
from tether.cores.gathering import LOOPBACK
from tether.echo import start_echo_server
from tether.signaling import SignalingServer

from .tube_pair import until


@pytest.fixture
async def echo_address():
    server = await start_echo_server("127.0.0.1", 0)
    yield server.sockets[0].getsockname()[:2]
    server.close()
    await server.wait_closed()


@pytest.fixture
async def relay():
    server = SignalingServer(host="127.0.0.1", port=0, token="t0ken")
    await server.start()
    yield server
    await server.close()


def sides(relay_port: int, target, name: str = "db"):
    url = f"ws://127.0.0.1:{relay_port}"
    common = {"signal_url": url, "token": "t0ken", "host_addresses": LOOPBACK}
    expose = ExposeSide(name, target=target, **common)
    connect = ConnectSide(name, listen=("127.0.0.1", 0), **common)
    return expose, connect


async def echo_once(address, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(payload)
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    await writer.wait_closed()
    return data


async def test_tube_connects_and_carries_a_stream(relay, echo_address):
    expose, connect = sides(relay.port, echo_address)
    states: list[ConnectionState] = []
    async with expose, connect:
        handle = await connect.wait_ready(timeout=20)
        states.append(handle.manager.state)
        payload = os.urandom(200_000)
        assert await echo_once(connect.listen_address, payload) == payload
        assert handle.connect_ms is not None and handle.connect_ms > 0
        # The exposing side has one tube with the same id, managed and connected.
        assert list(expose.tubes) == [handle.tube_id]
        remote = expose.managers.get(handle.tube_id)
        assert remote is not None and remote.state is ConnectionState.CONNECTED
        rows = connect.snapshot()
        assert rows[0]["tube_id"] == handle.tube_id and rows[0]["state"] == "connected"
    assert states == [ConnectionState.CONNECTED]
    # Closing the sides closed every tube and unregistered every manager.
    assert connect.core.tube_ids == [] and expose.core.tube_ids == []
    assert connect.managers.get(handle.tube_id) is None


async def test_relay_restart_during_setup(echo_address):
    """The relay dies right after the offer reached the exposing side; the tube still comes up."""
    server = SignalingServer(host="127.0.0.1", port=0, token="t0ken")
    await server.start()
    port = server.port
    expose, connect = sides(port, echo_address, name="restart")
    restarted = asyncio.Event()
    answer_offer = expose.router._on_unknown_tube

    async def offer_then_relay_dies(signal):
        if signal["kind"] == "offer" and not restarted.is_set():
            await server.close()
            restarted.set()
        return await answer_offer(signal)

    expose.router._on_unknown_tube = offer_then_relay_dies
    second = None
    try:
        async with expose, connect:
            await asyncio.wait_for(restarted.wait(), 20)
            second = SignalingServer(host="127.0.0.1", port=port, token="t0ken")
            await second.start()
            handle = await connect.wait_ready(timeout=30)
            payload = secrets.token_bytes(50_000)
            assert await echo_once(connect.listen_address, payload) == payload
            assert handle.manager.state is ConnectionState.CONNECTED
    finally:
        if second is not None:
            await second.close()


async def test_refused_target_ends_only_that_stream(relay):
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead_port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    expose, connect = sides(relay.port, ("127.0.0.1", dead_port), name="refused")
    async with expose, connect:
        handle = await connect.wait_ready(timeout=20)
        assert await echo_once(connect.listen_address, b"hello") == b""
        # The tube itself is fine and a later stream is tried again.
        assert handle.manager.state is ConnectionState.CONNECTED
        assert handle.tunnel.stats["open_failures"] >= 1


async def test_wrong_token_is_refused(relay, echo_address):
    from tether.signaling.client import AuthenticationError

    expose = ExposeSide("x", target=echo_address, signal_url=f"ws://127.0.0.1:{relay.port}",
                        token="wrong", host_addresses=LOOPBACK)
    with pytest.raises(AuthenticationError):
        await asyncio.wait_for(expose.start(), 10)
    await expose.close()


async def test_network_change_restarts_ice_and_the_stream_survives(relay, echo_address):
    """A network change on the connecting side: the manager restarts ICE through the relay,
    the path moves to new sockets, and a TCP stream running across it loses no byte."""
    from tether.connection_manager import NetworkChangeType

    expose, connect = sides(relay.port, echo_address, name="restart-ice")
    async with expose, connect:
        handle = await connect.wait_ready(timeout=20)
        path = connect.core._tubes[handle.tube_id].path
        old_pair = path.current._nominated[1].local_addr
        reader, writer = await asyncio.open_connection(*connect.listen_address)
        payload = secrets.token_bytes(4 * 1024 * 1024)

        async def send() -> None:
            for i in range(0, len(payload), 65536):
                writer.write(payload[i:i + 65536])
                await writer.drain()
                if i == 1024 * 1024:
                    await handle.manager.handle_network_change(
                        NetworkChangeType.IP_ADDRESS_CHANGE)
            writer.write_eof()

        sending = asyncio.create_task(send())
        echoed = await asyncio.wait_for(reader.read(-1), 60)
        await sending
        writer.close()
        assert echoed == payload
        async with asyncio.timeout(20):
            while handle.manager.state is not ConnectionState.CONNECTED or path.generation < 2:
                await asyncio.sleep(0.05)
        assert path.current._nominated[1].local_addr != old_pair
        assert handle.manager.metrics.restarts_succeeded == 1
        remote = expose.managers.get(handle.tube_id)
        assert remote.state is ConnectionState.CONNECTED


# -- peer restarts and goodbyes -------------------------------------------------------------


async def open_echo_stream(address):
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    return reader, writer


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the local connection ends (FIN or RST) within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def test_a_killed_and_restarted_peer_gets_a_new_tube_at_once(relay, echo_address):
    """The exposing process dies without a word (its path goes silent) and a new one starts.

    The connecting side learns at once that the new process does not know the tube, closes
    the old streams cleanly and offers a new tube; new connections go through it."""
    url = f"ws://127.0.0.1:{relay.port}"
    common = {"signal_url": url, "token": "t0ken", "host_addresses": LOOPBACK}
    first = ExposeSide("restart-peer", target=echo_address, **common)
    connect = ConnectSide("restart-peer", listen=("127.0.0.1", 0), **common)
    second = None
    async with connect:
        await first.start()
        old = await connect.wait_ready(timeout=20)
        reader, writer = await open_echo_stream(connect.listen_address)
        # A kill: nothing more leaves the first process, not even goodbyes.
        first.core.drop_traffic(old.tube_id, True)
        await first.client.close()
        await first.close()
        second = ExposeSide("restart-peer", target=echo_address, **common)
        loop = asyncio.get_running_loop()
        back = loop.time()
        await second.start()
        try:
            assert await closed_within(reader, 3.0), "the old stream was not closed"
            writer.close()
            new = await connect.wait_ready(timeout=5)
            assert new.tube_id != old.tube_id
            assert await echo_once(connect.listen_address, b"after") == b"after"
            elapsed = loop.time() - back
            print(f"\nnew tube echoing {elapsed * 1000:.0f} ms after the peer came back")
            assert elapsed < 5.0
            assert list(second.tubes) == [new.tube_id]
        finally:
            await second.close()


async def test_a_stopping_peer_says_goodbye_and_streams_close_at_once(relay, echo_address):
    expose, connect = sides(relay.port, echo_address, name="goodbye")
    async with connect:
        await expose.start()
        old = await connect.wait_ready(timeout=20)
        reader, writer = await open_echo_stream(connect.listen_address)
        await expose.close()
        assert await closed_within(reader, 1.5), "the stream outlived the peer's goodbye"
        writer.close()
        assert old.tube_id not in connect.tubes
        # Clients that arrive meanwhile wait for the next tube, which comes with the peer.
        pending = asyncio.create_task(echo_once(connect.listen_address, b"queued"))
        again = ExposeSide("goodbye", target=echo_address,
                           signal_url=f"ws://127.0.0.1:{relay.port}", token="t0ken",
                           host_addresses=LOOPBACK)
        async with again:
            assert await asyncio.wait_for(pending, 15) == b"queued"


# -- only the two peers control a tunnel ---------------------------------------------------

SECRET = "a-strong-shared-tunnel-secret"


def sealed_sides(relay_port: int, target, name: str, secret: str = SECRET,
                 connect_secret: str | None = None):
    url = f"ws://127.0.0.1:{relay_port}"
    common = {"signal_url": url, "token": "t0ken", "host_addresses": LOOPBACK}
    expose = ExposeSide(name, target=target, secret=secret, **common)
    connect = ConnectSide(name, listen=("127.0.0.1", 0), secret=connect_secret or secret,
                          **common)
    return expose, connect


class TamperingRelay(SignalingServer):
    """A relay that changes one character of every offer it passes on."""

    async def _on_message(self, endpoint, message):
        if isinstance(message, str) and '"kind":"offer"' in message:
            at = message.index('"data":"') + 20
            flipped = "A" if message[at] != "A" else "B"
            message = message[:at] + flipped + message[at + 1:]
        return await super()._on_message(endpoint, message)


async def test_sealed_signals_connect_and_the_relay_never_sees_the_name(relay, echo_address):
    expose, connect = sealed_sides(relay.port, echo_address, "secret-db")
    async with expose, connect:
        await connect.wait_ready(timeout=20)
        assert await echo_once(connect.listen_address, b"sealed") == b"sealed"
        assert connect.client.conversation_id != "secret-db"
        assert relay.table.peers("secret-db") == []
        assert len(relay.table.peers(connect.client.conversation_id)) == 2
        assert expose.refused == {} and connect.refused == {}


async def test_a_relay_that_changes_a_signal_is_refused_not_obeyed(echo_address):
    relay = TamperingRelay(host="127.0.0.1", port=0, token="t0ken")
    await relay.start()
    try:
        expose, connect = sealed_sides(relay.port, echo_address, "tampered")
        async with expose, connect:
            with pytest.raises(TimeoutError):
                await connect.wait_ready(timeout=3)
            assert expose.refused.get("unauthentic", 0) >= 1
            assert expose.tubes == {}  # no tube was made from the changed offer
    finally:
        await relay.close()


async def test_a_wrong_secret_never_meets_the_tunnel(relay, echo_address):
    expose, connect = sealed_sides(relay.port, echo_address, "guarded",
                                   connect_secret="an-attacker-guess-of-the-secret")
    async with expose, connect:
        with pytest.raises(TimeoutError):
            await connect.wait_ready(timeout=3)
        # Different secrets, different conversations: they never even met at the relay.
        assert expose.client.conversation_id != connect.client.conversation_id
        assert expose.tubes == {}


async def test_forged_signals_from_a_token_holder_change_nothing(relay, echo_address):
    """An intruder who even learned the conversation id joins while the connecting side is
    away and sends an unsealed offer, a forged close and a replayed sealed signal."""
    from tether.signaling import SignalingClient

    expose, connect = sealed_sides(relay.port, echo_address, "forged")
    async with expose:
        got: list[dict] = []
        intruder = SignalingClient(f"ws://127.0.0.1:{relay.port}", "t0ken",
                                   expose.client.conversation_id, got.append)
        await intruder.start()
        await intruder.send([
            {"tube_id": "evil", "kind": "offer", "data": "ZXZpbA=="},
            {"tube_id": "evil", "kind": "channel_closed", "data": "x", "reason": "shutdown"},
        ])
        await until(lambda: expose.refused.get("unsealed", 0) >= 2, timeout=10)
        assert expose.tubes == {}
        await intruder.close()
        # The real peer still gets its tunnel.
        async with connect:
            await connect.wait_ready(timeout=20)
            assert await echo_once(connect.listen_address, b"mine") == b"mine"


async def test_connect_waits_for_an_absent_peer_instead_of_offering(relay, echo_address):
    """The relay says the exposing side is not there: no tube is offered (no offer to go
    stale, no connect timeout to warn about) until it joins; then one tube connects."""
    expose, connect = sides(relay.port, echo_address, name="later")
    async with connect:
        await until(lambda: connect.client.peer_present is False, 10)
        await asyncio.sleep(0)  # let the tube keeper run once
        assert connect.tubes == {} and connect.current is None
        async with expose:
            handle = await connect.wait_ready(timeout=20)
            assert handle.manager.state is ConnectionState.CONNECTED
            assert list(connect.tubes) == [handle.tube_id]
            payload = os.urandom(10_000)
            assert await echo_once(connect.listen_address, payload) == payload


async def test_a_failed_offer_is_retried_when_signaling_is_back(relay, echo_address):
    """An offer that went nowhere fails; the retry would wait 600 s, but our signaling
    coming back (the peer never left, so no 'joined' wakes us) retries it at once."""
    from tether.connection_manager import ICERestartPolicy

    url = f"ws://127.0.0.1:{relay.port}"
    common = {"signal_url": url, "token": "t0ken", "host_addresses": LOOPBACK}
    expose = ExposeSide("retry", target=echo_address, **common)
    connect = ConnectSide("retry", listen=("127.0.0.1", 0), retry_delays=(600.0,),
                          policy=ICERestartPolicy(connect_timeout=1.0), **common)
    answer_offer = expose.router._on_unknown_tube
    dropped: list[str] = []

    async def drop_first_offer(signal):
        if signal["kind"] == "offer" and not dropped:
            dropped.append(signal["tube_id"])  # lost on the way, as if our network was down
            return True
        return await answer_offer(signal)

    expose.router._on_unknown_tube = drop_first_offer
    async with expose, connect:
        await until(lambda: dropped and dropped[0] not in connect.tubes, 20)
        assert connect.current is None or connect.current.tube_id == dropped[0]
        connect.client.reconnect("test: our network came back")
        handle = await connect.wait_ready(timeout=20)
        assert handle.tube_id != dropped[0]
        payload = os.urandom(10_000)
        assert await echo_once(connect.listen_address, payload) == payload
