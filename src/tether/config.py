"""The TOML config file: the relay, secrets, tunnels to run, and every policy knob.

``tether up`` runs every tunnel the file lists, in one process; ``tether expose`` and
``tether connect`` take the relay, token and knobs from it when their flags do not say.
The file is ``--config PATH``, else ``$XDG_CONFIG_HOME/tether/config.toml`` (usually
``~/.config/tether/config.toml``), used only if it exists. Relative paths in it are
relative to the file. Unknown keys are errors that name the key, so a typo never
silently means a default. Example (docs/config.md has all keys)::

    signal = "wss://relay.example.net:8765"
    token_file = "/etc/tether/token"

    [policy]
    keepalive_interval = 60
    restart_max = 30

    [[expose]]
    name = "db"
    target = "127.0.0.1:5432"
    secret_file = "/etc/tether/db.secret"

    [[connect]]
    name = "web"
    listen = "127.0.0.1:8080"
    socks = "127.0.0.1:1080"
    secret_file = "/etc/tether/web.secret"
    policy = { connect_timeout = 30 }

Loading is pure (a path in, a :class:`Config` out, :class:`ConfigError` on anything
wrong); running the tunnels is :mod:`tether.fleet`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .allow import AllowList
from .machine import ICERestartPolicy
from .sealing import MIN_SECRET_CHARS
from .tunnel import parse_hostport

#: Policy knobs: config key -> (where it goes, its name there, type). "policy" is an
#: ICERestartPolicy field, "liveness" a key of the aiortc core's liveness settings.
KNOBS: dict[str, tuple[str, str, type]] = {
    "keepalive_interval": ("policy", "keepalive_interval", float),
    "liveness_interval": ("liveness", "interval", float),
    "liveness_misses": ("liveness", "misses", int),
    "restart_base": ("policy", "restart_backoff_base", float),
    "restart_max": ("policy", "restart_backoff_max", float),
    "restart_attempts": ("policy", "max_restart_attempts", int),
    "connect_timeout": ("policy", "connect_timeout", float),
    "answer_timeout": ("policy", "answer_timeout", float),
}

TOP_KEYS = frozenset({"signal", "token", "token_file", "ca", "loopback", "ice_servers",
                      "turn_user", "turn_password", "turn_password_file", "policy", "core",
                      "expose", "connect"})
EXPOSE_KEYS = frozenset({"name", "target", "allow", "secret", "secret_file", "policy",
                         "core"})
CONNECT_KEYS = frozenset({"name", "listen", "socks", "socks_users", "secret", "secret_file",
                          "policy", "core"})
CORES = ("aiortc", "keeper")
"""WebRTC cores a tunnel may use (``core = "keeper"``, globally or per tunnel)."""


class ConfigError(ValueError):
    """The config file cannot be used; the message names the file and the key."""


def default_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "tether" / "config.toml"


@dataclass(frozen=True)
class Policy:
    """The knobs that were set (config key -> value); unset ones keep tether's defaults."""

    values: Mapping[str, float | int] = field(default_factory=dict)

    def over(self, base: Policy) -> Policy:
        """These values, the rest from ``base``."""
        return Policy({**base.values, **self.values})

    def restart_policy(self) -> ICERestartPolicy:
        """tether's default policy (which never gives up on a tube that worked) + knobs."""
        fields = {KNOBS[k][1]: v for k, v in self.values.items() if KNOBS[k][0] == "policy"}
        try:
            return ICERestartPolicy(keep_trying=True, **fields)
        except ValueError as exc:
            raise ConfigError(f"policy: {exc}") from None

    def liveness(self) -> dict[str, float]:
        return {KNOBS[k][1]: v for k, v in self.values.items() if KNOBS[k][0] == "liveness"}


def parse_policy(raw: Any, where: str) -> Policy:
    """Check a policy table: known keys, numbers, positive where it matters."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a table of knobs ({', '.join(KNOBS)})")
    values: dict[str, float | int] = {}
    for key, value in raw.items():
        if key not in KNOBS:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(KNOBS)}")
        kind = KNOBS[key][2]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and not isinstance(value, int)):
            raise ConfigError(f"{where}.{key}: expected {'an integer' if kind is int else 'a number'}"
                              f", got {value!r}")
        if value <= 0:
            raise ConfigError(f"{where}.{key}: must be positive, got {value!r}")
        values[key] = kind(value)
    policy = Policy(values)
    try:
        policy.restart_policy()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return policy


@dataclass(frozen=True)
class TunnelConfig:
    """One tunnel to run: ``kind`` is "expose" or "connect"."""

    kind: str
    name: str
    secret: str
    policy: Policy = Policy()
    target: tuple[str, int] | None = None  # expose
    allow: tuple[str, ...] = ()  # expose: the rules, as written
    listen: tuple[str, int] | None = None  # connect
    socks: tuple[str, int] | None = None  # connect
    socks_users: Mapping[str, str] | None = None  # connect
    core: str | None = None
    """This tunnel's WebRTC core (None: the config's)."""

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.name

    def allow_list(self) -> AllowList | None:
        return AllowList.parse(list(self.allow)) if self.allow else None


@dataclass(frozen=True)
class Config:
    """A loaded config file (or the defaults when there is none)."""

    path: Path | None = None
    signal: tuple[str, ...] = ()  # relay URLs, tried in turn
    token: str | None = None
    ca: str | None = None
    loopback: bool = False
    ice_servers: tuple[str, ...] = ()
    turn_user: str | None = None
    turn_password: str | None = None
    policy: Policy = Policy()
    tunnels: tuple[TunnelConfig, ...] = ()
    core: str = "aiortc"

    def find(self, kind: str, name: str) -> TunnelConfig | None:
        for tunnel in self.tunnels:
            if tunnel.key == (kind, name):
                return tunnel
        return None

    def common(self) -> tuple[Any, ...]:
        """What every tunnel depends on: a change restarts them all on reload."""
        return (self.signal, self.token, self.ca, self.loopback, self.ice_servers,
                self.turn_user, self.turn_password, self.core)

    def core_of(self, tunnel: TunnelConfig) -> str:
        return tunnel.core or self.core


def load(path: str | os.PathLike[str] | None = None, *, required: bool = True) -> Config:
    """Load ``path`` (default: :func:`default_path`). With ``required=False`` a missing
    file gives an empty :class:`Config`; any other problem is a :class:`ConfigError`."""
    file = Path(path) if path is not None else default_path()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required and path is not None:
            raise ConfigError(f"{file}: no such file") from None
        return Config()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read it: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    try:
        return _parse(raw, file)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None


def parse(raw: Mapping[str, Any], path: str | os.PathLike[str] = "config.toml") -> Config:
    """A config from already-parsed TOML (for tests and the library)."""
    return _parse(raw, Path(path))


def _parse(raw: Mapping[str, Any], file: Path) -> Config:
    base = file.parent
    _known(raw, TOP_KEYS, "")
    token = _secret_value(raw, "token", "token_file", base, "", minimum=1)
    turn_password = _secret_value(raw, "turn_password", "turn_password_file", base, "",
                                  minimum=1)
    signal = raw.get("signal", [])
    if isinstance(signal, str):
        signal = [signal]
    if not isinstance(signal, list) or not all(isinstance(u, str) for u in signal):
        raise ConfigError("signal: expected a relay URL or a list of them")
    for url in signal:
        if not url.startswith(("ws://", "wss://")):
            raise ConfigError(f"signal: {url!r} is not a WebSocket URL "
                              "(ws://HOST:PORT or wss://HOST:PORT)")
    ca = _opt_str(raw, "ca", "")
    if ca is not None:
        ca = str(base / ca)
    loopback = raw.get("loopback", False)
    if not isinstance(loopback, bool):
        raise ConfigError(f"loopback: expected true or false, got {loopback!r}")
    ice = raw.get("ice_servers", [])
    if not isinstance(ice, list) or not all(isinstance(s, str) for s in ice):
        raise ConfigError("ice_servers: expected a list of URLs")
    policy = parse_policy(raw.get("policy", {}), "policy")
    core = _core(raw, "") or "aiortc"
    tunnels: list[TunnelConfig] = []
    for kind in ("expose", "connect"):
        entries = raw.get(kind, [])
        if not isinstance(entries, list):
            raise ConfigError(f"{kind}: expected [[{kind}]] tables")
        for i, entry in enumerate(entries):
            tunnels.append(_tunnel(kind, entry, f"{kind}[{i}]", base))
    seen: set[tuple[str, str]] = set()
    for tunnel in tunnels:
        if tunnel.key in seen:
            raise ConfigError(f"{tunnel.kind} {tunnel.name!r} is listed twice")
        seen.add(tunnel.key)
    return Config(path=file, signal=tuple(signal), token=token, ca=ca, loopback=loopback,
                  ice_servers=tuple(ice), turn_user=_opt_str(raw, "turn_user", ""),
                  turn_password=turn_password, policy=policy, tunnels=tuple(tunnels),
                  core=core)


def _core(table: Mapping[str, Any], where: str) -> str | None:
    core = _opt_str(table, "core", where)
    if core is not None and core not in CORES:
        at = f"{where}." if where else ""
        raise ConfigError(f"{at}core: {core!r} is not a core; known: {', '.join(CORES)}")
    return core


def _tunnel(kind: str, entry: Any, where: str, base: Path) -> TunnelConfig:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a table")
    _known(entry, EXPOSE_KEYS if kind == "expose" else CONNECT_KEYS, where)
    name = _opt_str(entry, "name", where)
    if not name:
        raise ConfigError(f"{where}: missing key 'name'")
    where = f"{kind} {name!r}"
    secret = _secret_value(entry, "secret", "secret_file", base, where,
                           minimum=MIN_SECRET_CHARS)
    if secret is None:
        raise ConfigError(f"{where}: give 'secret_file' (or 'secret'): the tunnel secret "
                          f"both peers share, at least {MIN_SECRET_CHARS} characters")
    policy = parse_policy(entry.get("policy", {}), f"{where}.policy")
    core = _core(entry, where)
    if kind == "expose":
        target = _address(entry, "target", where)
        allow = entry.get("allow", [])
        if isinstance(allow, str):
            allow = [allow]
        if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
            raise ConfigError(f"{where}.allow: expected a list of HOST:PORTS rules")
        try:
            if allow:
                AllowList.parse(allow)
        except ValueError as exc:
            raise ConfigError(f"{where}.allow: {exc}") from None
        if target is None and not allow:
            raise ConfigError(f"{where}: give 'target' (HOST:PORT), 'allow' (rules for "
                              "targets the peer names), or both")
        return TunnelConfig(kind, name, secret, policy, target=target, allow=tuple(allow),
                            core=core)
    listen = _address(entry, "listen", where)
    socks = _address(entry, "socks", where)
    if listen is None and socks is None:
        raise ConfigError(f"{where}: give 'listen' (HOST:PORT), 'socks' (HOST:PORT), or both")
    users = None
    users_file = _opt_str(entry, "socks_users", where)
    if users_file is not None:
        from .socks import read_users

        try:
            users = read_users(str(base / users_file))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}.socks_users: {exc}") from None
    if socks is not None and users is None:
        from .socks import is_loopback

        if not is_loopback(socks[0]):
            raise ConfigError(f"{where}.socks: {socks[0]} is not loopback: give "
                              "'socks_users' (a file of user:password lines)")
    return TunnelConfig(kind, name, secret, policy, listen=listen, socks=socks,
                        socks_users=users, core=core)


def _known(table: Mapping[str, Any], keys: frozenset[str], where: str) -> None:
    for key in table:
        if key not in keys:
            at = f"{where}: " if where else ""
            raise ConfigError(f"{at}unknown key {key!r}; known: {', '.join(sorted(keys))}")


def _opt_str(table: Mapping[str, Any], key: str, where: str) -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        at = f"{where}." if where else ""
        raise ConfigError(f"{at}{key}: expected a string, got {value!r}")
    return value


def _address(table: Mapping[str, Any], key: str, where: str) -> tuple[str, int] | None:
    value = _opt_str(table, key, where)
    if value is None:
        return None
    try:
        return parse_hostport(value)
    except ValueError as exc:
        raise ConfigError(f"{where}.{key}: {exc}") from None


def _secret_value(table: Mapping[str, Any], key: str, file_key: str, base: Path, where: str,
                  *, minimum: int) -> str | None:
    at = f"{where}." if where else ""
    value = _opt_str(table, key, where)
    path = _opt_str(table, file_key, where)
    if value is not None and path is not None:
        raise ConfigError(f"{at}{key} and {at}{file_key}: give one of them")
    if path is not None:
        try:
            value = (base / path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{at}{file_key}: cannot read {base / path}: "
                              f"{exc.strerror}") from None
    if value is not None and len(value) < minimum:
        raise ConfigError(f"{at}{key}: must have at least {minimum} characters")
    return value


def replace(config: Config, **changes: Any) -> Config:
    return dataclasses.replace(config, **changes)
