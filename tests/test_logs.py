"""Logs for services: JSON and text lines with timestamps, never wrapped, no secrets (even at
-vv, where websockets logs its headers), and a periodic status line when not on a terminal;
real processes over a real relay. Plus the formatters on their own."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest

from tether import logs
from tether.echo import start_echo_server
from tether.signaling import redact

from .test_cli_tunnel import Process, echo, free_port
from .tube_pair import until

TOKEN = "relay-token-that-must-never-be-logged"
SECRET = "tunnel-secret-that-must-never-be-logged"
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|"
                       r"CRITICAL) [\w.]+: ")


async def test_json_and_text_logs_without_secrets_and_a_status_line(tmp_path):
    server = await start_echo_server("127.0.0.1", 0)
    echo_port = server.sockets[0].getsockname()[1]
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    env = {"TETHER_TOKEN": TOKEN, "TETHER_SECRET": SECRET,
           "TETHER_RUNTIME_DIR": str(tmp_path / "run")}
    procs: list[Process] = []
    try:
        serve = await Process.start("serve", tmp_path, "serve", "--port", str(port),
                                    env={**env, "TETHER_LOG_FORMAT": "json"})
        procs.append(serve)
        await until(lambda: "ws://" in serve.log.read_text(), 20)
        expose = await Process.start("expose", tmp_path, "expose", "db", "--target",
                                     f"127.0.0.1:{echo_port}", "--signal", url, "--loopback",
                                     "--log-format", "json", "-vv", env=env)
        procs.append(expose)
        connect = await Process.start("connect", tmp_path, "connect", "db", "--listen",
                                      "127.0.0.1:0", "--signal", url, "--loopback",
                                      "--status-interval", "1", env=env)
        procs.append(connect)
        listen = int((await connect.line(r"listening on 127\.0\.0\.1:(\d+)")).group(1))
        await until(lambda: "tunnel open" in connect.log.read_text(), 60)  # a loaded machine
        assert await echo(listen, b"x" * 100_000) == b"x" * 100_000
        await until(lambda: "status: connect db" in connect.log.read_text(), 20)
    finally:
        for proc in reversed(procs):
            await proc.stop()
        server.close()
        await server.wait_closed()

    everything = "".join(p.log.read_text() + "\n".join(p.lines) for p in procs)
    assert TOKEN not in everything and SECRET not in everything

    # JSON: every stderr line one object, with time, level, logger and message; -vv shows
    # aiortc/aioice/websockets debug (and websockets' Authorization header, redacted).
    records = [json.loads(line) for line in expose.log.read_text().splitlines()
               if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    loggers = {r["logger"].split(".")[0] for r in records}
    assert {"tether", "aioice"} <= loggers or {"tether", "aiortc"} <= loggers, loggers
    assert any(r["level"] == "DEBUG" and r["logger"].startswith("tether") for r in records)
    stray = [line for line in expose.log.read_text().splitlines()
             if line and not line.startswith("{")]
    assert all(not TEXT_LINE.match(line) for line in stray)  # no text log lines mixed in
    serve_records = [json.loads(line) for line in serve.log.read_text().splitlines()
                     if line.startswith("{")]
    assert serve_records, "TETHER_LOG_FORMAT=json is honoured by serve too"

    # Text: one timestamped line per event, long ones unwrapped; no debug without -v; the
    # periodic status line, since stderr is not a terminal.
    lines = [line for line in connect.log.read_text().splitlines() if TEXT_LINE.match(line)]
    assert lines and not any(" DEBUG " in line for line in lines)
    assert max(len(line) for line in lines) > 100  # would have been wrapped at 80 before
    status = [line for line in lines if "tether.status: status: connect db" in line]
    assert status and "tube" in status[-1] and "sent" in status[-1]
    for line in connect.log.read_text().splitlines():
        if line and not TEXT_LINE.match(line):  # the rest: short console notes, no fragments
            assert not line.startswith(" "), line


def _record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("tether.x", logging.ERROR, __file__, 1, msg, args, exc_info)


def _raised() -> BaseException:
    try:
        raise OSError("boom\nsecond line")
    except OSError as exc:
        return exc


def test_text_formatter_one_line_and_tracebacks_only_when_verbose():
    quiet = logs.LineFormatter(tracebacks=False).format(_record("a\nb %s", 1, exc=_raised()))
    assert "\n" not in quiet
    assert quiet.endswith("ERROR tether.x: a | b 1: OSError: boom | second line")
    loud = logs.LineFormatter(tracebacks=True).format(_record("oops", exc=_raised()))
    assert "Traceback (most recent call last)" in loud


def test_json_formatter():
    entry = json.loads(logs.JsonFormatter(tracebacks=False).format(
        _record("x=%d", 5, exc=_raised())))
    assert entry["msg"] == "x=5" and entry["level"] == "ERROR" and entry["logger"] == "tether.x"
    assert entry["error"].startswith("OSError: boom") and "exc" not in entry
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", entry["ts"])


def test_secrets_are_redacted_in_every_logger(capsys: pytest.CaptureFixture[str]):
    logs.setup(0, "text")
    try:
        logs.add_secret("s3cr3t-value-xyz")
        logging.getLogger("some.library").warning("connecting with s3cr3t-value-xyz")
        logging.getLogger("websockets.client").warning("> %s: %s", "Authorization",
                                                       "Bearer abc")
        err = capsys.readouterr().err
        assert "s3cr3t-value-xyz" not in err and "Bearer abc" not in err
        assert err.count(redact.REDACTED) == 2
        assert logs.RECENT.matching(limit=2)[-1]["message"].endswith(redact.REDACTED)
    finally:
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)


def test_verbosity_levels():
    try:
        logs.setup(0, "json")
        assert logging.getLogger("tether").level == logging.INFO
        assert logging.getLogger("aiortc").level == logging.WARNING
        logs.setup(1, "json")
        assert logging.getLogger("tether").level == logging.DEBUG
        assert logging.getLogger("aiortc").level == logging.WARNING  # -v is tether's story
        logs.setup(2, "json")
        assert logging.getLogger("aiortc").level == logging.DEBUG
        with pytest.raises(ValueError):
            logs.setup(0, "xml")
    finally:
        logs.setup(0, "text")
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)
        for name in ("tether", *logs.LIBRARIES):
            logging.getLogger(name).setLevel(logging.NOTSET)


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("Linux only")
