"""A network namespace whose only address is a 10.x/32 on lo, for Rust-core tests.

The Rust core never gathers 127.0.0.1 and gathers nothing on a bare lo; a /32 on lo is a
non-loopback address no packet can leave, so its tubes stay inside the namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def need_namespaces() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (network namespaces)")
    pytest.importorskip("keeper_pam_webrtc_rs")


@contextmanager
def lo_namespace() -> Iterator[tuple[str, str]]:
    """(name, address): a fresh namespace, removed after, also when the test fails."""
    name = f"tk-{secrets.token_hex(3)}"
    address = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                       capture_output=True)
        subprocess.run(["ip", "-n", name, "addr", "add", f"{address}/32", "dev", "lo"],
                       check=True, capture_output=True)
        yield name, address
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                              check=False).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def run_in(namespace: str, *args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    """Run ``python args...`` from the repository root inside ``namespace``."""
    return subprocess.run(["ip", "netns", "exec", namespace, sys.executable, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False)


def last_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1])
