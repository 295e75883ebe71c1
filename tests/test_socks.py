"""SOCKS5 through a real tunnel (real relay, real aiortc peers on loopback, curl as the
client, a real HTTP server as the target), plus the handshake's unit tests."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import ipaddress
import shutil
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tether
from tether import socks
from tether.signaling import SignalingServer

from .tunnel_peers import ipv6_available, refused_port

TOKEN = "socks-test-token"
SECRET = "a-socks-test-secret-long-enough"
CURL = shutil.which("curl")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = f"hello from {self.server.server_address[0]} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@contextlib.contextmanager
def http_server(host: str) -> Iterator[int]:
    """A small HTTP server in a thread (it touches no asyncio object)."""
    cls = V6Server if ":" in host else http.server.ThreadingHTTPServer
    server = cls((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


async def curl(proxy: str, url: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        CURL, "-sS", "--max-time", "40", "-x", proxy, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def relay():
    server = SignalingServer(host="127.0.0.1", port=0, token=TOKEN)
    await server.start()
    yield f"ws://127.0.0.1:{server.port}"
    await server.close()


@contextlib.asynccontextmanager
async def socks_tunnel(relay: str, allow: str, users: dict[str, str] | None = None):
    common = {"signal": relay, "token": TOKEN, "secret": SECRET, "loopback": True}
    async with tether.expose("socks", allow=allow, **common):
        async with tether.connect("socks", listen=None, socks="127.0.0.1:0",
                                  socks_users=users, **common) as t:
            assert t.socks_address is not None
            host, port = t.socks_address
            yield t, f"{host}:{port}"


# ---------------------------------------------------------------------------- end to end

needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


@needs_curl
async def test_curl_through_socks_to_a_name_an_ipv4_and_an_ipv6_address(relay):
    v6 = ipv6_available()
    with http_server("127.0.0.1") as port4, \
            (http_server("::1") if v6 else contextlib.nullcontext(0)) as port6:
        allow = f"localhost:{port4},127.0.0.1:{port4}" + (f",[::1]:{port6}" if v6 else "")
        async with socks_tunnel(relay, allow) as (t, proxy):
            code, out, err = await curl(f"socks5h://{proxy}", f"http://localhost:{port4}/by-name")
            assert code == 0, err
            assert out == "hello from 127.0.0.1 /by-name\n"
            code, out, err = await curl(f"socks5h://{proxy}", f"http://127.0.0.1:{port4}/v4")
            assert (code, out) == (0, "hello from 127.0.0.1 /v4\n"), err
            if v6:
                code, out, err = await curl(f"socks5h://{proxy}", f"http://[::1]:{port6}/v6")
                assert (code, out) == (0, "hello from ::1 /v6\n"), err
            stats = t.side.socks.stats
            assert stats["connected"] == (3 if v6 else 2)


@needs_curl
async def test_refused_targets_get_the_right_socks_reply(relay):
    closed = refused_port()
    with http_server("127.0.0.1") as port:
        allow = f"127.0.0.1:{closed},localhost:{port},no-such-host.invalid:*,10.0.0.0/8:*"
        async with socks_tunnel(relay, allow) as (t, proxy):
            cases = [
                # Not on the list at all.
                (f"http://127.0.0.1:{port}/", socks.NOT_ALLOWED),
                # On the list, nothing listening.
                (f"http://127.0.0.1:{closed}/", socks.CONNECTION_REFUSED),
                # On the list by name, the name does not resolve.
                ("http://no-such-host.invalid/", socks.HOST_UNREACHABLE),
                # A name whose addresses (127.0.0.1, ::1) no rule permits on this port:
                # only 10.0.0.0/8:* covers port 1, and "localhost" must not slip through.
                ("http://localhost:1/", socks.NOT_ALLOWED),
            ]
            for url, reply in cases:
                code, out, err = await curl(f"socks5h://{proxy}", url)
                assert code == 97, (url, code, err)  # CURLE_PROXY
                assert f"({reply})" in err, (url, err)
            # The tunnel goes on.
            code, out, err = await curl(f"socks5h://{proxy}", f"http://localhost:{port}/ok")
            assert (code, out) == (0, "hello from 127.0.0.1 /ok\n"), err
            assert t.side.socks.stats["open_failures"] == len(cases)


@needs_curl
async def test_username_and_password(relay):
    with http_server("127.0.0.1") as port:
        async with socks_tunnel(relay, f"127.0.0.1:{port}",
                                users={"alice": "s3cret"}) as (t, proxy):
            code, _, err = await curl(f"socks5h://alice:wrong@{proxy}", f"http://127.0.0.1:{port}/")
            assert code != 0
            code, _, err = await curl(f"socks5h://{proxy}", f"http://127.0.0.1:{port}/")
            assert code != 0  # no credentials offered: no acceptable method
            code, out, err = await curl(f"socks5h://alice:s3cret@{proxy}",
                                        f"http://127.0.0.1:{port}/in")
            assert (code, out) == (0, "hello from 127.0.0.1 /in\n"), err
            assert t.side.socks.stats["auth_failures"] == 1


async def test_a_silent_client_is_dropped_after_the_handshake_timeout():
    async def never(*args):  # pragma: no cover - never reached
        raise AssertionError("no stream expected")

    server = socks.SocksServer(never, "127.0.0.1", 0, handshake_timeout=0.3)
    async with server:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"\x05")  # half a greeting, then silence
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert server.stats["bad_handshakes"] == 1


def test_no_authentication_only_on_loopback():
    async def opener(*args):  # pragma: no cover
        pass

    for host in ("0.0.0.0", "::", "192.0.2.1"):
        with pytest.raises(ValueError, match="needs username/password"):
            socks.SocksServer(opener, host, 1080)
    for host in ("127.0.0.1", "::1", "localhost", "127.1.2.3"):
        socks.SocksServer(opener, host, 1080)
    socks.SocksServer(opener, "0.0.0.0", 1080, users={"u": "p"})


# ---------------------------------------------------------------------------- handshake


async def run_handshake(data: bytes, users=None):
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    written: list[bytes] = []
    try:
        return await socks.handshake(reader, written.append, users), b"".join(written)
    except socks.SocksError as exc:
        return exc, b"".join(written)


def request(atyp: int, addr: bytes, port: int, cmd: int = 1) -> bytes:
    return bytes((5, cmd, 0, atyp)) + addr + struct.pack(">H", port)


async def test_handshake_parses_every_address_type():
    greet = b"\x05\x01\x00"
    req, out = await run_handshake(greet + request(1, bytes([10, 1, 2, 3]), 22))
    assert (req.host, req.port, out) == ("10.1.2.3", 22, b"\x05\x00")
    v6 = ipaddress.IPv6Address("fd00::1").packed
    req, _ = await run_handshake(greet + request(4, v6, 443))
    assert (req.host, req.port) == ("fd00::1", 443)
    req, _ = await run_handshake(greet + request(3, b"\x0bexample.org", 80))
    assert (req.host, req.port) == ("example.org", 80)


async def test_handshake_refusals_carry_the_right_reply():
    greet = b"\x05\x01\x00"
    exc, _ = await run_handshake(greet + request(1, b"\0\0\0\0", 80, cmd=2))
    assert exc.reply == socks.COMMAND_NOT_SUPPORTED
    exc, _ = await run_handshake(greet + bytes((5, 1, 0, 9)))
    assert exc.reply == socks.ADDRESS_TYPE_NOT_SUPPORTED
    exc, _ = await run_handshake(greet + request(3, b"\x07a b:c/d", 80))
    assert exc.reply == socks.ADDRESS_TYPE_NOT_SUPPORTED
    exc, out = await run_handshake(b"\x05\x01\x00", users={"u": "p"})  # offers no user/pass
    assert out == b"\x05\xff" and exc.reply is None
    exc, out = await run_handshake(b"\x05\x01\x02\x01\x01u\x01x", users={"u": "p"})
    assert out == b"\x05\x02\x01\x01" and exc.auth
    req, out = await run_handshake(b"\x05\x01\x02\x01\x01u\x01p"
                                   + request(1, bytes([127, 0, 0, 1]), 5), users={"u": "p"})
    assert out == b"\x05\x02\x01\x00" and req.user == "u"
    exc, _ = await run_handshake(b"\x04\x01\x00\x50")  # SOCKS4
    assert isinstance(exc, socks.SocksError) and exc.reply is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.booleans())
def test_malformed_input_never_escapes_as_anything_else(data, with_users):
    users = {"user": "pass"} if with_users else None

    async def attempt():
        try:
            result, written = await asyncio.wait_for(run_handshake(data, users), 5)
        except asyncio.IncompleteReadError:
            return
        if isinstance(result, socks.Request):
            assert 0 < result.port <= 65535 and result.host
        assert len(written) <= 4  # method choice + auth status at most

    asyncio.run(attempt())


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([1, 3, 4]), st.integers(1, 65535),
       st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,60}[a-z0-9])?", fullmatch=True),
       st.ip_addresses())
def test_well_formed_requests_round_trip(atyp, port, name, ip):
    if atyp == 3:
        raw, host = bytes([len(name)]) + name.encode(), name
    else:
        addr = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if atyp == 1 else \
            ipaddress.IPv6Address(int(ip))
        raw, host = addr.packed, str(addr)
    result, _ = asyncio.run(run_handshake(b"\x05\x02\x01\x00" + request(atyp, raw, port)))
    assert isinstance(result, socks.Request) and (result.host, result.port) == (host, port)


def test_reply_codes_for_open_fail_reasons():
    from tether.tunnel import reasons

    assert socks.reply_for("x [denied]") == socks.NOT_ALLOWED
    assert socks.reply_for("x [refused]") == socks.CONNECTION_REFUSED
    assert socks.reply_for("x [no-such-host]") == socks.HOST_UNREACHABLE
    assert socks.reply_for("x [timeout]") == socks.HOST_UNREACHABLE
    assert socks.reply_for("x [net-unreachable]") == socks.NETWORK_UNREACHABLE
    assert socks.reply_for("an older peer's reason") == socks.GENERAL_FAILURE
    assert socks.reply_for("x [made-up]") == socks.GENERAL_FAILURE
    assert reasons.split("a [b] [refused]") == ("a [b]", "refused")
    assert socks.encode_reply(5) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"


# ---------------------------------------------------------------------------- the CLI


@needs_curl
async def test_the_cli_socks_mode_with_curl(tmp_path, relay):
    from .test_cli_tunnel import Process

    env = {"TETHER_TOKEN": TOKEN, "TETHER_SECRET": SECRET}
    with http_server("127.0.0.1") as port:
        expose = await Process.start("expose", tmp_path, "expose", "cli", "--signal", relay,
                                     "--loopback", "--allow", f"localhost:{port}", env=env)
        connect = await Process.start("connect", tmp_path, "connect", "cli", "--signal",
                                      relay, "--loopback", "--socks", "127.0.0.1:0", env=env)
        try:
            proxy = (await connect.line(r"SOCKS5 on (127\.0\.0\.1:\d+)")).group(1)
            code, out, err = await curl(f"socks5h://{proxy}", f"http://localhost:{port}/cli")
            assert (code, out) == (0, "hello from 127.0.0.1 /cli\n"), (
                err, connect.log.read_text()[-2000:], expose.log.read_text()[-2000:])
            code, out, err = await curl(f"socks5h://{proxy}", "http://127.0.0.1:1/")
            assert code == 97 and f"({socks.NOT_ALLOWED})" in err, err
        finally:
            await connect.stop()
            await expose.stop()
        assert "not allowed by the exposing side's --allow list" in expose.log.read_text()


async def test_clients_beyond_the_limit_are_closed_at_once():
    async def never(*args):  # pragma: no cover
        raise AssertionError("no stream expected")

    server = socks.SocksServer(never, "127.0.0.1", 0, max_clients=2, handshake_timeout=30)
    async with server:
        held = [await asyncio.open_connection(*server.address) for _ in range(2)]
        await asyncio.sleep(0.2)  # both are being served (waiting for their greeting)
        reader, writer = await asyncio.open_connection(*server.address)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert server.stats["refused_busy"] == 1
        for _, w in held:
            w.close()
