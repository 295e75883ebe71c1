"""A whole tunnel of real `tether` processes, as a user runs it: a TLS relay, a sealed
tunnel, an intruder who holds the relay token but not the tunnel secret, and a peer that
stops with SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path



from .certs import certificate
from .tube_pair import until

TETHER = [sys.executable, "-m", "tether.cli"]
TOKEN = "relay-token-for-the-test"
SECRET = "the-tunnel-secret-only-peers-know"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A tether process whose stdout lines are collected as they come."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, name: str, tmp: Path, *args: str, env: dict | None = None) -> "Process":
        log = tmp / f"{name}.log"
        process = await asyncio.create_subprocess_exec(
            *TETHER, *args, stdout=asyncio.subprocess.PIPE, stderr=open(log, "wb"),
            env={"COLUMNS": "200", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                 **(env or {})},
        )
        return cls(name, process, log)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode().rstrip())

    async def line(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if match := regex.search(line):
                        return match
                if self.process.returncode is not None:
                    raise AssertionError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
                await asyncio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        try:
            code = await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        await self._reader
        return code


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def echo(port: int, payload: bytes, timeout: float = 20.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_sealed_tunnel_over_a_tls_relay_with_an_intruder(tmp_path, echo_port):
    cert, key = certificate(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    port = free_port()
    url = f"wss://127.0.0.1:{port}"
    common = ["--signal", url, "--ca", cert, "--loopback"]
    env = {"TETHER_TOKEN": TOKEN}
    procs: list[Process] = []
    try:
        serve = await Process.start("serve", tmp_path, "serve", "--port", str(port),
                                    "--token-file", str(token_file), "--cert", cert,
                                    "--key", key)
        procs.append(serve)
        await until(lambda: "wss://" in (serve.log.read_text() + "".join(serve.lines)), 20)
        expose = await Process.start("expose", tmp_path, "expose", "db", "--target",
                                     f"127.0.0.1:{echo_port}", "--secret-file",
                                     str(secret_file), "--events",
                                     str(tmp_path / "expose.events"), *common, env=env)
        procs.append(expose)
        connect = await Process.start("connect", tmp_path, "connect", "db", "--listen",
                                      "127.0.0.1:0", "--events", str(tmp_path / "connect.events"),
                                      *common, env={**env, "TETHER_SECRET": SECRET})
        procs.append(connect)
        listen = int((await connect.line(r"listening on 127\.0\.0\.1:(\d+)")).group(1))
        payload = os.urandom(1 << 20)
        assert await echo(listen, payload) == payload

        # An intruder with the relay token and a guessed secret on the same name.
        intruder = await Process.start(
            "intruder", tmp_path, "connect", "db", "--listen", "127.0.0.1:0", "--events",
            str(tmp_path / "intruder.events"), *common,
            env={**env, "TETHER_SECRET": "a-guess-at-the-tunnel-secret"})
        procs.append(intruder)
        stolen = int((await intruder.line(r"listening on 127\.0\.0\.1:(\d+)")).group(1))
        attempt = asyncio.create_task(echo(stolen, b"let me in", timeout=30))
        # The real tunnel keeps working meanwhile.
        for _ in range(3):
            assert await echo(listen, b"still mine") == b"still mine"
            await asyncio.sleep(1.0)
        assert await attempt == b""  # never reached the target: closed for want of a tube
        assert not [e for e in events(tmp_path / "intruder.events") if e.get("what") == "open"]
        opened = [e for e in events(tmp_path / "expose.events") if e.get("what") == "open"]
        assert len(opened) == 1, "the exposing side opened a tube for someone else"

        # SIGTERM on the exposing side: it says goodbye; the other side closes the tube at once.
        stopped_at = asyncio.get_running_loop().time()
        assert await expose.stop() == 0
        await until(lambda: any(e.get("what") == "closed" for e in
                                events(tmp_path / "connect.events")), 3.0)
        print(f"\ngoodbye noticed {asyncio.get_running_loop().time() - stopped_at:.2f} s "
              "after SIGTERM")
    finally:
        for proc in reversed(procs):
            await proc.stop()
    assert TOKEN not in "".join(p.log.read_text() for p in procs)
