"""The CLI starts fast (issue 9): registering the commands imports nothing heavy.

The tests run each command in a fresh interpreter and check which modules it imported
(no timing assertions: the machine is shared). Run this file as a script to measure:

    .venv/bin/python -m tests.test_startup [RUNS]

Wall time of `tether --version`, `tether --help`, `tether status` (no tunnels), time to the
relay's listening line of `tether serve`, and for `tether connect --loopback` (against a
running serve + expose on loopback) the time to its first output line and to the first
echo through the tunnel; plus `python -X importtime -c "import tether.cli"`. Prints
min / median of RUNS (default 5) runs: other load on the machine makes single runs noisy.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Never needed to register the commands, print the version or the help. (rich.console and
# rich.table are not listed yet: tether.bench.command imports them at its top.)
HEAVY = ("asyncio", "aiortc", "aioice", "av", "websockets", "prometheus_client", "cryptography",
         "OpenSSL", "redis", "rich.live", "rich.console", "rich.table", "pydantic", "tether.connection_manager",
         "tether.machine", "tether.app", "tether.signaling", "tether.tunnel", "tether.exporter",
         "tether.logs", "tether.config", "tether.lab.runner", "tether.lab.scenarios",
         "tether.lab.metrics", "tether.cores")
# `status`/`stop`/`restart` talk to the control socket (asyncio) and print their answer
# (rich's console), nothing else of tether.
NOT_FOR_CONTROL = tuple(m for m in HEAVY if m not in ("asyncio", "rich.console"))

PROBE = """
import json, sys
argv = json.loads(sys.argv[1])
code = None
if argv is None:
    import tether.cli
else:
    from tether.cli import app
    try:
        app(argv, prog_name="tether")
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def imported(argv: list[str] | None, tmp_path: Path) -> tuple[int | None, set[str], str]:
    """Run the CLI with ``argv`` (None: only import tether.cli) in a fresh interpreter;
    its exit code, every module it had imported at the end, and its output."""
    env = {**os.environ, "TETHER_RUNTIME_DIR": str(tmp_path), "COLUMNS": "200"}
    env.pop("TETHER_CONFIG", None)
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["code"], set(result["modules"]), done.stdout + done.stderr


def loaded(modules: set[str], heavy: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m in heavy or m.startswith(tuple(h + "." for h in heavy)))


def test_registering_the_commands_is_light(tmp_path: Path) -> None:
    _, modules, _ = imported(None, tmp_path)
    assert "tether.cli.tunnels" in modules and "tether.lab.command" in modules
    assert loaded(modules, HEAVY) == []


def test_version_and_help_are_light(tmp_path: Path) -> None:
    code, modules, output = imported(["--version"], tmp_path)
    assert code == 0 and "0.1.0" in output
    assert loaded(modules, HEAVY) == []
    for argv in (["--help"], ["connect", "--help"], ["lab", "--help"], ["serve", "--help"]):
        code, modules, output = imported(argv, tmp_path)
        assert code == 0 and "Usage: tether" in output, output
        assert loaded(modules, HEAVY) == [], argv


def test_status_and_stop_load_no_tunnel_machinery(tmp_path: Path) -> None:
    for argv in (["status"], ["status", "--json"], ["stop", "nothing"],
                 ["restart", "nothing"]):
        code, modules, output = imported(argv, tmp_path)
        assert code == 1 and "no running tunnel" in output, (argv, output)
        assert loaded(modules, NOT_FOR_CONTROL) == [], argv


def test_a_real_command_still_loads_what_it_needs(tmp_path: Path) -> None:
    """The lazy imports happen: a bad --allow is reported by the real parser (tether.allow),
    after the config, logs and signaling loaded; aiortc is still not needed for that."""
    code, modules, output = imported(
        ["expose", "x", "--signal", "ws://127.0.0.1:1", "--token", "t", "--allow", "nonsense"],
        tmp_path)
    assert code == 2 and "--allow" in output, output
    assert {"tether.config", "tether.allow", "tether.logs"} <= modules
    assert "aiortc" not in modules


def test_package_exports_load_on_first_use() -> None:
    code = """
import sys, tether
assert "asyncio" not in sys.modules and "tether.connection_manager" not in sys.modules
assert set(tether.__all__) <= set(dir(tether))
from tether import TunnelConnectionManager, ConnectionState
assert TunnelConnectionManager.__module__ == "tether.connection_manager"
assert tether.ConnectionState is ConnectionState
assert "aiortc" not in sys.modules
assert callable(tether.connect) and tether.Exposure.__module__ == "tether.api"
try:
    tether.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise AssertionError("no AttributeError")
import tether.lab
assert "tether.lab.runner" not in sys.modules
from tether.lab import SCENARIOS, LabOptions, run_scenario
assert "link_cut" in SCENARIOS and set(tether.lab.__all__) <= set(dir(tether.lab))
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_plain_coercion_gives_what_typers_own_gives() -> None:
    """Every parameter of every command: the pydantic-free coercion (cli/coercion.py)
    returns exactly what typer's own returns for plain values, and leaves the rest
    (numbers typed as text, values out of range, wrong types) to typer's, errors included."""
    import typer.main
    from typer._click import Context
    from typer._click.exceptions import BadParameter
    from typer._coercion import build_runtime_param

    from tether.cli import app, coercion

    group = typer.main.get_command(app)
    checked = 0
    for name in group.list_commands(Context(group)):
        command = group.get_command(Context(group), name)
        ctx = Context(command, info_name=name)
        for param in command.get_params(ctx):
            descriptor = getattr(param, "type_descriptor", None)
            if descriptor is None:
                continue
            ours, theirs = coercion._build(descriptor), build_runtime_param(descriptor)
            for value in (param.default, "x", "12", "-3", "+4", "007", "1.5", "-0.5", ".5",
                          "5.", "1e3", "2E-2", "70000", "65535", "1_000", " 5", "5 ", "inf",
                          "nan", "0x10", "", "1" * 40, ("a", "b"), ("a", 1), (), True, False,
                          0, 7, 2.5, -1.0, None, b"x"):
                def run(runtime):  # noqa: ANN001, ANN202
                    try:
                        return ("ok", runtime.coerce(value, param=param, ctx=ctx))
                    except BadParameter as exc:
                        return ("error", exc.message)
                    except Exception as exc:  # noqa: BLE001 - the same failure either way
                        return ("raised", type(exc).__name__)
                param._runtime_param = None
                got, want = run(ours), run(theirs)
                assert repr(got) == repr(want) and type(got[1]) is type(want[1]), (
                    name, param.name, value)
                checked += 1
    assert checked > 500


def test_lab_help_names_every_scenario() -> None:
    from tether.lab.command import SCENARIO_NAMES
    from tether.lab.scenarios import SCENARIOS

    assert SCENARIO_NAMES == tuple(SCENARIOS)


# -- measuring (python -m tests.test_startup) -------------------------------------------------

TETHER = [str(Path(sys.executable).with_name("tether"))]
TOKEN = "startup-measure-token"
SECRET = "startup-measure-tunnel-secret-0123456789"


def wall(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run: CPU time is the steadier figure
    on a loaded machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([*TETHER, *args], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def until_line(process: subprocess.Popen[bytes], pattern: str, timeout: float = 60.0
               ) -> tuple[float, re.Match[bytes]]:
    """Seconds until a line of stdout or stderr matches ``pattern`` (from now)."""
    regex = re.compile(pattern.encode())
    start = time.perf_counter()
    streams = [s for s in (process.stdout, process.stderr) if s is not None]
    buffered = {s: b"" for s in streams}
    while time.perf_counter() - start < timeout:
        ready, _, _ = select.select(streams, [], [], 0.5)
        for stream in ready:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                streams.remove(stream)
                continue
            buffered[stream] += chunk
            for line in buffered[stream].split(b"\n"):
                if match := regex.search(line):
                    return time.perf_counter() - start, match
        if not streams:
            break
    raise TimeoutError(f"no line matching {pattern!r}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def first_echo(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"ping\n")
                if s.recv(16) == b"ping\n":
                    return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError("no echo through the tunnel")


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*TETHER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def show(what: str, samples: list[float]) -> None:
    print(f"{what:<44} min {min(samples) * 1000:7.0f} ms   median "
          f"{statistics.median(samples) * 1000:7.0f} ms   (n={len(samples)})", flush=True)


def main(runs: int) -> None:
    runtime = tempfile.mkdtemp(prefix="tether-startup-")
    env = {**os.environ, "TETHER_RUNTIME_DIR": runtime, "TETHER_TOKEN": TOKEN,
           "TETHER_SECRET": SECRET, "COLUMNS": "200"}
    env.pop("TETHER_CONFIG", None)
    imports = subprocess.run([sys.executable, "-X", "importtime", "-c", "import tether.cli"],
                             capture_output=True, text=True, check=True).stderr
    total = [int(line.split("|")[1]) for line in imports.splitlines()
             if line.rstrip().endswith("| tether.cli")]
    print(f"import tether.cli (importtime, cumulative): {total[0] / 1000:.0f} ms, "
          f"{len(imports.splitlines())} modules imported")
    for args in (["--version"], ["--help"], ["status"], ["stop", "nothing"]):
        samples = [wall(args, env) for _ in range(runs)]
        show("tether " + " ".join(args) + " (wall)", [w for w, _ in samples])
        show("tether " + " ".join(args) + " (CPU)", [c for _, c in samples])

    serve_times = []
    for _ in range(runs):
        serve = spawn(["serve", "--port", "0"], env)
        try:
            serve_times.append(until_line(serve, r"signaling server on")[0])
        finally:
            stop(serve)
    show("tether serve -> listening line", serve_times)

    echo, echo_port = echo_server()
    serve = spawn(["serve", "--port", "0"], env)
    expose = None
    try:
        _, match = until_line(serve, r"signaling server on (ws://\S+)")
        url = match.group(1).decode()
        expose = spawn(["expose", "m", "--target", f"127.0.0.1:{echo_port}", "--signal", url,
                        "--loopback"], env)
        until_line(expose, r"exposing")
        first, echoed = [], []
        for _ in range(runs):
            start = time.perf_counter()
            connect = spawn(["connect", "m", "--listen", "127.0.0.1:0", "--signal", url,
                             "--loopback", "--status-interval", "0"], env)
            try:
                first.append(until_line(connect, r".")[0])
                _, match = until_line(connect, r"listening on \S+:(\d+)")
                first_echo(int(match.group(1)))
                echoed.append(time.perf_counter() - start)
            finally:
                stop(connect)
        show("tether connect -> first output line", first)
        show("tether connect -> first echo through tunnel", echoed)
    finally:
        for process in (expose, serve):
            if process is not None:
                stop(process)
        echo.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
