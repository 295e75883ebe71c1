"""tether in a web page: js/tether-peer.js and the demo page in a real headless Chromium.

Chromium runs in a network namespace joined by a veth to a second one (tests/browser/
chromium.py) where this test's thread runs a real relay (serving the demo page under /web/,
as ``tether serve --web`` does), a TCP echo server and a real ``tether expose`` process
(started with ``ip netns exec``) that dials the echo server per stream. The page joins the
relay as the connecting side, seals its signals with WebCrypto, offers a tube, opens one
stream and echoes 1,000 messages through it; every byte is checked in order.

The seal test vectors run the module's Sealer in the same Chromium: sealed in JS with a
fixed session, counter, time and nonce, the blob must equal what tether.sealing makes from
the same inputs byte for byte, and open in Python; Python's signals open in JS; changed or
replayed ones are refused on both sides.

The relay here is SignalingServer plus the browser wiring of tether.web (the page as plain
HTTP GETs, the token offered as a WebSocket subprotocol), exactly the calls the relay needs
for ``--web``. Timings are printed (run with ``-s``), never asserted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import pytest
import pytest_asyncio

from tether import sealing
from tether.signaling import SignalingServer
from tether.signals import make_signal
from tether.web import (
    credentials_from_subprotocols, select_subprotocol, token_subprotocol, web_response,
)

from .browser.chromium import TETHER_ADDRESS, CdpError, Chromium, chromium_path

if chromium_path() is None:
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium)",
                allow_module_level=True)
if os.geteuid() != 0 or shutil.which("ip") is None:
    pytest.skip("the web peer tests need root and iproute2 to make network namespaces",
                allow_module_level=True)

from .browser.chromium import inside, namespaces  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

NAME = "web-echo"
SECRET = sealing.new_secret()
TOKEN = "relay token / with: odd characters " + secrets.token_hex(8)
MESSAGES = 1000
CONNECT_TIMEOUT = 60.0
TETHER = Path(sys.executable).with_name("tether")
WEB_DIR = Path(__file__).resolve().parents[1] / "src" / "tether" / "web"


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def until(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def web():
    """Namespaces, relay, echo server, `tether expose`, and Chromium on the demo page."""
    with namespaces() as (browser_ns, tether_ns), inside(tether_ns):
        relay = SignalingServer(TETHER_ADDRESS, 0, TOKEN, web=True)  # `tether serve --web`
        await relay.start()
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        log_path = Path(tempfile.gettempdir()) / f"tether-web-expose-{secrets.token_hex(3)}.log"
        log = open(log_path, "wb")  # noqa: SIM115 (closed below)
        runtime = tempfile.mkdtemp(prefix="tether-web-run-")
        os.chmod(runtime, 0o700)
        env = {**os.environ, "TETHER_TOKEN": TOKEN, "TETHER_SECRET": SECRET,
               "TETHER_RUNTIME_DIR": runtime}
        exposes: list[asyncio.subprocess.Process] = []

        async def start_expose() -> None:
            exposes.append(await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", tether_ns, str(TETHER), "expose", NAME,
                "--target", f"127.0.0.1:{echo_port}", "--signal", relay.url, "-v",
                env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True))

        async def stop_expose() -> None:
            for expose in exposes:
                if expose.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        expose.terminate()
                    try:
                        await asyncio.wait_for(expose.wait(), 10)
                    except TimeoutError:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(expose.pid, 9)
                        await expose.wait()

        await start_expose()
        origin = f"http://{TETHER_ADDRESS}:{relay.port}"
        # WebCrypto exists only in secure contexts (https, localhost): a real deployment
        # serves the page over TLS; here the test's own origin is declared secure.
        chromium = Chromium(browser_ns, (f"--unsafely-treat-insecure-origin-as-secure={origin}",))
        try:
            started = time.monotonic()
            await chromium.start()
            page = f"{origin}/web/"
            await chromium.send("Page.navigate", session=True, url=page)
            for _ in range(400):
                with contextlib.suppress(CdpError):
                    if await chromium.evaluate("typeof window.demo === 'object'"):
                        break
                await asyncio.sleep(0.05)
            else:
                raise CdpError(f"the demo page did not load: {chromium.console[-5:]}")
            print(f"\nChromium up with the demo page in {time.monotonic() - started:.2f} s")
            chromium.relay = relay
            chromium.expose_log = log_path
            chromium.env = env
            chromium.start_expose, chromium.stop_expose = start_expose, stop_expose
            yield chromium
        finally:
            await chromium.close()
            await stop_expose()
            log.close()
            echo.close()
            await echo.wait_closed()
            await relay.close()
            shutil.rmtree(runtime, ignore_errors=True)
            if os.environ.get("TETHER_KEEP_LOGS") is None:
                log_path.unlink(missing_ok=True)


# -- tether.web, pure ---------------------------------------------------------------------


async def test_web_paths_are_served_and_others_are_not():
    status, headers, body = web_response("/web/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert body == (WEB_DIR / "index.html").read_bytes()
    assert b'src="page.js"' in body
    status, headers, body = web_response("/web/tether-peer.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"export class TetherPeer" in body
    assert web_response("/web/page.js")[0] == 200
    assert web_response("/web")[0] == 308 and web_response("/web")[1]["Location"] == "/web/"
    assert web_response("/web/../sealing.py")[0] == 404
    assert web_response("/web/__init__.py")[0] == 404
    for path in ("/", "/healthz", "/metrics", "/webx", ""):
        assert web_response(path) is None
    assert "script-src 'self'" in web_response("/web/")[1]["Content-Security-Policy"]
    link = Path(__file__).resolve().parents[1] / "js" / "tether-peer.js"
    assert link.is_symlink() and link.resolve() == (WEB_DIR / "tether-peer.js").resolve()


async def test_token_as_subprotocol_round_trips():
    offered = [f"tether.v1, {token_subprotocol(TOKEN)}, tether.resume.tr1_abc"]
    assert credentials_from_subprotocols(offered) == (TOKEN, "tr1_abc")
    assert credentials_from_subprotocols([]) == (None, None)
    assert credentials_from_subprotocols(["tether.v1"]) == (None, None)
    assert credentials_from_subprotocols(["tether.bearer."]) == (None, None)
    assert credentials_from_subprotocols(["tether.bearer.%%%"]) == (None, None)
    assert select_subprotocol(None, ["x", "tether.v1"]) == "tether.v1"
    assert select_subprotocol(None, []) is None


# -- seal test vectors across JS and Python ------------------------------------------------

IMPORT = "const m = await import('./tether-peer.js');"


async def js(chromium: Chromium, body: str, timeout: float = 60) -> object:
    return await chromium.evaluate(f"(async () => {{ {IMPORT} {body} }})()", timeout=timeout)


async def test_conversation_ids_match(web):
    for secret, name in ((SECRET, NAME), ("sixteen chars!!!", "ünïcode näme ✓"),
                         ("x" * 200, "a")):
        got = await js(web, f"return await m.conversationId({json.dumps(secret)}, "
                            f"{json.dumps(name)});")
        assert got == sealing.conversation_id(secret, name)
    with pytest.raises(CdpError, match="too short"):
        await js(web, "return await m.conversationId('short', 'x');")


async def test_sealed_in_js_is_byte_for_byte_python_and_opens_there(web):
    session, nonce = bytes(range(16)), bytes(range(100, 112))
    stamp = int(time.time() * 1_000_000)
    signal = make_signal("tube-ä", NAME, "ice_restart_answer", "v=0\r\nsdp ü ✓\r\n",
                         restart_id=7, note="caf\u00e9 \u2028 \"q\"\n")
    fixed = (f"{{session: new Uint8Array({list(session)}), nonce: new Uint8Array({list(nonce)}),"
             f" counter: 5, stamp: {stamp}}}")
    wire = await js(web, f"""
        const s = await m.Sealer.create({json.dumps(SECRET)}, {json.dumps(NAME)}, 'connect');
        return await s.seal({json.dumps(signal)}, {fixed});""")
    # What tether.sealing makes from the same inputs.
    python = sealing.Sealer(SECRET, NAME, "connect")
    header = struct.pack(">B16sQQ", sealing.VERSION, session, 5, stamp)
    hidden = {k: v for k, v in signal.items() if k not in sealing._OPEN_KEYS}
    meta = json.dumps(hidden, separators=(",", ":")).encode("ascii")
    plaintext = struct.pack(">I", len(meta)) + meta + signal["data"].encode()
    blob = header + nonce + python._seal_key.encrypt(
        nonce, plaintext, python._ad(header, signal["tube_id"], signal["kind"]))
    assert wire == {"tube_id": "tube-ä", "kind": "ice_restart_answer",
                    "conversation_id": python.conversation_id,
                    "data": base64.b64encode(blob).decode(), "sealed": 2}
    expose = sealing.Sealer(SECRET, NAME, "expose")
    assert expose.open(wire) == signal
    with pytest.raises(sealing.SealError) as info:
        expose.open(wire)
    assert info.value.reason == sealing.REPLAYED
    # A JS-sealed signal with its own random session and nonce opens too, transport keys kept.
    wire = await js(web, f"""
        const s = await m.Sealer.create({json.dumps(SECRET)}, {json.dumps(NAME)}, 'connect');
        await s.seal({{tube_id: 't', kind: 'offer', data: 'a'}});
        return await s.seal({{tube_id: 't', kind: 'offer', data: 'b', seq: 3, prev: 2}});""")
    assert expose.open(wire) == {"tube_id": "t", "kind": "offer", "data": "b", "seq": 3, "prev": 2}


async def test_sealed_in_python_opens_in_js_and_tampering_is_refused(web):
    python = sealing.Sealer(SECRET, NAME, "expose")
    signals = [make_signal("tube-1", NAME, "answer", "v=0\r\nä\r\n"),
               make_signal("tube-1", NAME, "icecandidate", "candidate:1 1 udp 1 10.0.0.1 9 typ host ufrag ab"),
               make_signal("tube-1", NAME, "ice_restart_offer", "x" * 5000, restart_id=3)]
    wires = [python.seal(s) for s in signals]
    tampered = dict(wires[0], tube_id="tube-2")
    flipped = base64.b64decode(wires[1]["data"])
    flipped = flipped[:-1] + bytes([flipped[-1] ^ 1])
    flipped = dict(wires[1], data=base64.b64encode(flipped).decode())
    wrong = sealing.Sealer(sealing.new_secret(), NAME, "expose").seal(signals[0])
    own = sealing.Sealer(SECRET, NAME, "connect").seal(signals[0])  # reflected back
    result = await js(web, f"""
        const s = await m.Sealer.create({json.dumps(SECRET)}, {json.dumps(NAME)}, 'connect');
        const out = {{opened: [], refused: []}};
        for (const w of {json.dumps(wires)}) out.opened.push(await s.open(w));
        const bad = [{json.dumps(tampered)}, {json.dumps(flipped)},
                     {json.dumps({**wrong, "conversation_id": wires[0]["conversation_id"]})},
                     {json.dumps(own)}, {json.dumps(wires[0])}, {json.dumps(dict(wires[0], sealed=1))},
                     {json.dumps(signals[0])}];
        for (const w of bad) {{
          try {{ await s.open(w); out.refused.push('opened!'); }}
          catch (err) {{ out.refused.push(err.reason); }}
        }}
        return out;""")
    assert result["opened"] == signals
    assert result["refused"] == ["unauthentic", "unauthentic", "unauthentic", "unauthentic",
                                 "replayed", "version", "unsealed"]


# -- the demo page through a real tunnel ---------------------------------------------------


async def test_demo_page_echoes_through_a_real_tunnel(web):
    started = time.monotonic()
    ms = await connect_page(web)
    print(f"\n  page: tunnel and stream open in {ms:.0f} ms "
          f"({time.monotonic() - started:.2f} s with the DevTools round trips)")
    assert await web.evaluate("document.getElementById('send').disabled") is False

    lines = [f"{i:04d} {'é' if i % 7 == 0 else 'e'} {secrets.token_hex(i % 40)}\n"
             for i in range(MESSAGES)]
    expected = "".join(lines)
    started = time.monotonic()
    sent = await web.evaluate(f"""(async () => {{
        const lines = {json.dumps(lines)};
        for (const line of lines) await demo.send(line);
        return lines.length; }})()""", timeout=60)
    assert sent == MESSAGES
    total = len(expected.encode())

    async def all_back() -> bool:
        return await web.evaluate("demo.receivedBytes") >= total

    await until(all_back, 60, f"{total} echoed bytes")
    elapsed = time.monotonic() - started
    received = await web.evaluate("demo.received")
    assert received == expected  # every byte, in order, nothing more
    # `tether expose` announced its larger DATA frames (SETTINGS), and the page took it.
    assert await web.evaluate("demo.peer.tube.tunnel.peerMaxData") == 60 * 1024
    print(f"  page: {MESSAGES} messages ({total} bytes) echoed through `tether expose` in "
          f"{elapsed * 1000:.0f} ms")

    async def has_rtt() -> bool:
        status = await web.evaluate("demo.status()")
        return status.get("rttMs") is not None and status.get("path") is not None

    await until(has_rtt, 15, "a path and an RTT from getStats")
    status = await web.evaluate("demo.status()")
    assert status["state"] == "connected" and status["signaling"] is True
    assert TETHER_ADDRESS in status["path"]
    await asyncio.sleep(1.2)  # the page refreshes its table every second
    shown = await web.evaluate("['state', 'path', 'rtt'].map((id) => "
                               "document.getElementById(id).textContent)")
    assert shown[0].startswith("connected") and TETHER_ADDRESS in shown[1]
    assert shown[2].endswith(" ms")
    print(f"  page shows: state {shown[0]!r}, path {shown[1]!r}, RTT {shown[2]!r}")
    screenshot = os.environ.get("TETHER_WEB_SCREENSHOT")  # a PNG of the page, to look at
    if screenshot:
        await web.evaluate("document.getElementById('text').value = 'hello through tether';"
                           "document.getElementById('send').click(); true")
        await asyncio.sleep(1.2)
        shot = await web.send("Page.captureScreenshot", session=True, format="png",
                              captureBeyondViewport=True)
        Path(screenshot).write_bytes(base64.b64decode(shot["data"]))

    # Our half-close reaches the echo server, whose FIN comes back: the stream ends cleanly.
    await web.evaluate("demo.stream.close()")

    async def stream_closed() -> bool:
        return await web.evaluate("demo.stream === null")

    await until(stream_closed, 15, "the stream to end after both FINs")
    await web.evaluate("demo.disconnect()")
    assert await web.evaluate("demo.peer === null")


async def connect_page(web) -> float:
    relay_url = f"ws://{TETHER_ADDRESS}:{web.relay.port}/"
    try:
        return await web.evaluate(
            f"demo.connect({json.dumps(relay_url)}, {json.dumps(TOKEN)}, {json.dumps(NAME)}, "
            f"{json.dumps(SECRET)})", timeout=CONNECT_TIMEOUT + 10)
    except CdpError:
        logs = await web.evaluate("demo.peer ? demo.peer.logs : []")
        expose = web.expose_log.read_text(errors="replace")[-3000:]
        raise AssertionError(f"page log: {logs}\n`tether expose` log:\n{expose}") from None


async def test_page_answers_restarts_of_the_exposing_side_while_echoing(web):
    """`tether restart NAME` five times in a row while the page echoes (its signaling
    connection dropped and made again halfway): the page answers each ICE restart offer,
    the tube stays up, and every byte comes back in order."""
    await connect_page(web)
    # The page sends a numbered line every 5 ms until told to stop.
    await web.evaluate("""window.pumping = (async () => {
        window.stopPump = false; window.pumped = "";
        for (let i = 0; !window.stopPump; i++) {
          const line = `restart-test ${i}\\n`;
          window.pumped += line;
          await demo.send(line);
          await new Promise((r) => setTimeout(r, 5));
        }
        return window.pumped.length; })(); true""")
    timings = []
    ufrags = [await web.evaluate(
        "/a=ice-ufrag:(\\S+)/.exec(demo.peer.tube.pc.remoteDescription.sdp)[1]")]
    paths = [(await web.evaluate("demo.status()"))["path"]]
    for attempt in range(1, 6):
        if attempt == 3:
            # The page's signaling connection drops (as after a network change): it
            # reconnects, and the next restarts' signals go over the new connection.
            await web.evaluate("demo.peer.link.reconnect()")

            async def relinked() -> bool:
                return await web.evaluate("demo.peer.link.connected && "
                                          "demo.peer.link.peerPresent === true")

            await until(relinked, 30, "the page's signaling to reconnect")
        before = await web.evaluate("demo.receivedBytes")
        started = time.monotonic()
        done = await asyncio.create_subprocess_exec(
            str(TETHER), "restart", NAME, env=web.env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(done.communicate(), 30)
        assert done.returncode == 0, out.decode(errors="replace")

        async def answered(attempt=attempt) -> bool:
            return await web.evaluate("demo.peer.restarts") >= attempt

        await until(answered, 30, f"the page to answer restart {attempt}")
        answered_at = time.monotonic() - started

        async def flowing(before=before) -> bool:
            status = await web.evaluate("demo.status()")
            return (status["state"] == "connected"
                    and await web.evaluate("demo.receivedBytes") > before + 200)

        await until(flowing, 30, f"echoes to flow after restart {attempt}")
        timings.append((answered_at, time.monotonic() - started))
        ufrags.append(await web.evaluate(
            "/a=ice-ufrag:(\\S+)/.exec(demo.peer.tube.pc.remoteDescription.sdp)[1]"))

        async def new_path(previous=paths[-1]) -> bool:
            return (await web.evaluate("demo.status()"))["path"] not in (None, previous)

        await until(new_path, 30, f"the new generation's path after restart {attempt}")
        paths.append((await web.evaluate("demo.status()"))["path"])
    await web.evaluate("window.stopPump = true")
    await web.evaluate("window.pumping", timeout=30)
    sent = await web.evaluate("window.pumped")

    async def all_back() -> bool:
        return await web.evaluate("demo.receivedBytes") >= len(sent)

    await until(all_back, 30, "every pumped byte to come back")
    assert await web.evaluate("demo.received") == sent
    assert await web.evaluate("demo.peer.restarts") == 5
    assert len(set(ufrags)) == 6  # six ICE generations of the exposing side, one tube
    answers = await web.evaluate("demo.peer.restartTimes")
    print("\n  the page's answers took " + ", ".join(f"{ms:.0f}" for ms in answers)
          + " ms (offer in, its SDP applied, candidates gathered, answer sealed and sent)")
    print("\n  paths: " + " | ".join(paths))
    for n, (answer, flow) in enumerate(timings, 1):
        print(f"  restart {n}: the page answered {answer * 1000:.0f} ms after `tether restart`"
              " (a CLI process start included),"
              f" echoes flowing again within {flow * 1000:.0f} ms")
    print(f"  {sent.count(chr(10))} lines echoed across 5 restarts, none lost or reordered")
    await web.evaluate("demo.disconnect()")


async def test_page_offers_a_new_tube_when_tether_expose_restarts(web):
    """`tether expose` stops and starts again: the page's stream ends, the new process
    joins the relay, the page asks about its tube (keepalive), learns it is unknown
    (channel_closed) and offers a new tube; a new stream echoes again."""
    await connect_page(web)
    await web.evaluate("demo.send('before\\n')")

    async def echoed(text: str) -> bool:
        return (await web.evaluate("demo.received")).endswith(text)

    await until(lambda: echoed("before\n"), 15, "the first echo")
    old_tube = await web.evaluate("demo.peer.tube.id")
    await web.stop_expose()
    started = time.monotonic()
    await web.start_expose()

    async def new_tube() -> bool:
        return await web.evaluate(
            f"!!(demo.peer.tube && demo.peer.tube.id !== {json.dumps(old_tube)} && "
            "demo.peer.tube.tunnelChannel.readyState === 'open')")

    await until(new_tube, 60, "a new tube to the new `tether expose`")
    took = time.monotonic() - started
    result = await web.evaluate("""(async () => {
        const stream = await demo.peer.openStream();
        let text = "";
        const done = new Promise((resolve) => {
          stream.onData = (b) => { text += new TextDecoder().decode(b); if (text.endsWith("after\\n")) resolve(); };
        });
        await stream.send("after\\n");
        await done;
        stream.close();
        return text; })()""", timeout=30)
    assert result == "after\n"
    print(f"\n  page: new tube to the restarted `tether expose` open {took:.2f} s after its "
          "start (its process start included)")
    await web.evaluate("demo.disconnect()")


async def test_binary_megabytes_round_trip_within_credit(web):
    """4 MiB of bytes, 16 times the page's window each way: the page sends only within the
    credit `tether expose` grants, grants its own window back as it reads, and every byte
    comes back in order."""
    relay_url = f"ws://{TETHER_ADDRESS}:{web.relay.port}/"
    result = await js(web, f"""
        const p = new m.TetherPeer();
        try {{
          await p.connect({json.dumps(relay_url)}, {json.dumps(TOKEN)}, {json.dumps(NAME)},
                          {json.dumps(SECRET)});
          const stream = await p.openStream();
          const size = 4 * 1024 * 1024;
          const data = new Uint8Array(size);
          for (let i = 0, x = 7; i < size; i++) {{ x = (x * 1103515245 + 12345) >>> 0; data[i] = x >>> 24; }}
          const got = new Uint8Array(size);
          let at = 0, extra = 0, maxCredit = 0;
          const back = new Promise((resolve) => {{
            stream.onData = (bytes) => {{
              if (at + bytes.length > size) extra += bytes.length; else got.set(bytes, at);
              at += bytes.length;
              if (at >= size) resolve();
            }};
          }});
          const started = performance.now();
          const sending = (async () => {{
            for (let i = 0; i < size; i += 100000) {{
              await stream.send(data.subarray(i, i + 100000));
              maxCredit = Math.max(maxCredit, stream.credit);
            }}
          }})();
          await Promise.all([sending, back]);
          const ms = performance.now() - started;
          let same = at === size && extra === 0;
          for (let i = 0; same && i < size; i++) if (got[i] !== data[i]) same = false;
          return {{ms, same, received: at, peerWindow: stream.peerWindow, maxCredit,
                   window: stream.window}};
        }} finally {{ await p.close(); }}""", timeout=120)
    assert result["same"] and result["received"] == 4 * 1024 * 1024
    assert result["maxCredit"] <= result["peerWindow"] < 4 * 1024 * 1024
    assert result["window"] == 256 * 1024
    rate = 4 * 1024 * 1024 / (result["ms"] / 1000) / 1e6
    print(f"\n  page: 4 MiB echoed in {result['ms']:.0f} ms ({rate:.1f} MB/s each way; "
          f"peer window {result['peerWindow']}, page window {result['window']})")


async def test_wrong_token_and_wrong_secret_fail_clearly(web):
    relay_url = f"ws://{TETHER_ADDRESS}:{web.relay.port}/"
    wrong_token = await js(web, f"""
        const p = new m.TetherPeer();
        try {{ await p.connect({json.dumps(relay_url)}, 'not the token', {json.dumps(NAME)},
                               {json.dumps(SECRET)}, 5000); return 'connected!'; }}
        catch (err) {{ return err.message; }} finally {{ await p.close(); }}""")
    assert "check the relay URL and the token" in wrong_token
    # Another secret derives another conversation: the page never meets `tether expose`.
    wrong_secret = await js(web, f"""
        const p = new m.TetherPeer();
        try {{ await p.connect({json.dumps(relay_url)}, {json.dumps(TOKEN)}, {json.dumps(NAME)},
                               'another secret of enough length', 3000); return 'connected!'; }}
        catch (err) {{ return err.message; }} finally {{ await p.close(); }}""")
    assert "no tube to" in wrong_secret and "same secret" in wrong_secret
    short = await js(web, f"""
        try {{ await new m.TetherPeer().connect({json.dumps(relay_url)}, 't', 'n', 'short');
              return 'connected!'; }}
        catch (err) {{ return err.message; }}""")
    assert "too short" in short
