"""One frozen Config: defaults, then the TOML file, then ``JOBD_*`` environment, then flags.

SPEC §1 fixes the defaults and the file's shape. A bad file (unknown key, wrong type,
bad duration) raises ``ConfigError`` whose message is one line naming the file, the key
and the problem.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import tomllib
from pathlib import Path
from typing import Any, Mapping

from jobd.models import iso
from jobd.paths import segment

__all__ = ["Config", "ConfigError", "ConfigState", "Duration", "default_socket_paths", "load",
           "parse_duration", "parse_limit"]


class ConfigError(Exception):
    """The configuration cannot be used."""


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")


def parse_duration(value: str | int | float) -> float:
    """``30s``, ``5m``, ``2h``, ``7d`` (or a bare number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a duration (write e.g. 30s, 5m, 2h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


class Duration(float):
    """Marks a field whose file form is a duration string (``jobd config check`` prints
    such a field as one)."""


class _Limit(Duration):
    """Marks a duration that is a limit: ``"none"`` (or ``"0"``, ``0``) means no limit (None)."""


def parse_limit(value: str | int | float) -> float | None:
    """A limit duration -> seconds, or None for ``"none"``, ``"0"`` or ``0`` (no limit)."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    seconds = parse_duration(value)
    return seconds or None


@dataclasses.dataclass(frozen=True)
class Server:
    socket_mode: str = "0660"
    max_connections: int = 1024
    max_connections_per_uid: int = 64
    max_message_bytes: int = 1_048_576
    max_batch: int = 100
    max_response_bytes: int = 8_388_608
    log_level: str = "info"
    line_timeout: Duration = Duration(30)
    idle_timeout: Duration = Duration(600)


@dataclasses.dataclass(frozen=True)
class Storage:
    synchronous: str = "full"


@dataclasses.dataclass(frozen=True)
class Execution:
    workers: int = 4
    max_running_per_user: int = 3
    max_queued_per_user: int = 1000
    max_queued_total: int = 100_000
    max_stored_per_user: int = 10_000
    max_log_bytes: int = 10_485_760
    max_recoveries: int = 3
    #: None: no limit
    default_timeout: float | None = _Limit(6 * 3600)
    #: the most a plain user's timeout_s may ask; None: no limit
    max_timeout: float | None = _Limit(6 * 3600)
    cancel_grace: Duration = Duration(3)
    shutdown_grace: Duration = Duration(10)


@dataclasses.dataclass(frozen=True)
class Retention:
    keep: Duration = Duration(7 * 86400)
    keep_failed: Duration = Duration(30 * 86400)
    cleanup_every: Duration = Duration(3600)


@dataclasses.dataclass(frozen=True)
class Auth:
    admins: tuple[str, ...] = ("root", "@jobd-admin")
    services: tuple[str, ...] = ("cidx",)


@dataclasses.dataclass(frozen=True)
class Sync:
    repo_path_template: str = "{state_dir}/repos/{user_id}/{project_id}"
    allowed_roots: tuple[str, ...] = ("{state_dir}/repos",)
    index_command: str | tuple[str, ...] = "builtin:manifest"
    full_index_command: str | tuple[str, ...] = "builtin:manifest"
    remote: str = "origin"


_SECTIONS: dict[str, type] = {
    "server": Server, "storage": Storage, "execution": Execution,
    "retention": Retention, "auth": Auth, "sync": Sync,
}

_CHOICES = {("storage", "synchronous"): ("off", "normal", "full", "extra"),
            ("server", "log_level"): ("debug", "info", "warning", "error")}


@dataclasses.dataclass(frozen=True)
class Config:
    socket: Path
    db: Path
    config_file: Path | None = None
    log_level: str = "info"
    log_format: str = "auto"
    server: Server = Server()
    storage: Storage = Storage()
    execution: Execution = Execution()
    retention: Retention = Retention()
    auth: Auth = Auth()
    sync: Sync = Sync()

    @property
    def state_dir(self) -> Path:
        """Where the database lives; repositories, manifests and logs live beside it."""
        return self.db.parent

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def expand(self, template: str, **values: str) -> str:
        """Fill ``{state_dir}``, and each of ``values`` (ids, options), into a path template.

        Each value fills its placeholder as one path segment (``paths.segment``):
        ``org/repo`` is ``org%2Frepo``, so no value can name a parent folder or another
        value's folder.
        """
        segments = {name: segment(value) for name, value in values.items()}
        return template.format(state_dir=str(self.state_dir), **segments)

    @property
    def allowed_roots(self) -> tuple[Path, ...]:
        return tuple(Path(os.path.realpath(self.expand(r))) for r in self.sync.allowed_roots)


class ConfigState:
    """The config in force, and how the last reload went (``admin.stats`` shows it)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loaded_at = time.time()
        self.error: str | None = None

    def loaded(self, config: Config) -> None:
        self.config, self.loaded_at, self.error = config, time.time(), None

    def failed(self, error: str) -> None:
        """A reload that did not load: the config in force stays."""
        self.error = error

    def to_dict(self) -> dict[str, Any]:
        file = self.config.config_file
        return {"file": str(file) if file else None, "loaded_at": iso(int(self.loaded_at * 1e6)),
                "error": self.error}


def _is_system(env: Mapping[str, str]) -> bool:
    return os.geteuid() == 0 or "RUNTIME_DIRECTORY" in env or "STATE_DIRECTORY" in env


def _user_socket(env: Mapping[str, str]) -> Path:
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "jobd" / "jobd.sock"
    return Path(f"/tmp/jobd-{os.getuid()}") / "jobd.sock"


def default_socket_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """Where a client looks for the daemon, in order, after ``--socket``/``JOBD_SOCKET``."""
    env = os.environ if env is None else env
    paths = [_user_socket(env), Path("/run/jobd/jobd.sock")]
    return list(dict.fromkeys(paths))


def _defaults(env: Mapping[str, str]) -> tuple[Path, Path, Path]:
    """(socket, db, config file) for this process, SPEC §1."""
    if _is_system(env):
        runtime = env.get("RUNTIME_DIRECTORY", "/run/jobd").split(":")[0]
        state = env.get("STATE_DIRECTORY", "/var/lib/jobd").split(":")[0]
        return (Path(runtime) / "jobd.sock", Path(state) / "jobd.db",
                Path("/etc/jobd/jobd.toml"))
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    state_home = Path(env.get("XDG_STATE_HOME") or home / ".local" / "state")
    config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    return (_user_socket(env), state_home / "jobd" / "jobd.db",
            config_home / "jobd" / "jobd.toml")


def _coerce(where: str, key: str, default: Any, value: Any, section: str) -> Any:
    """Check ``value`` against the type of ``default``; raise ValueError saying why not."""
    if isinstance(default, _Limit):
        limit = parse_limit(value)
        return None if limit is None else _Limit(limit)
    if isinstance(default, Duration):
        return Duration(parse_duration(value))
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, not {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, not {value!r}")
        if value < (0 if key == "max_recoveries" else 1):
            raise ValueError(f"must be positive, not {value}")
        return value
    if key in ("index_command", "full_index_command"):
        if isinstance(value, str) and value.startswith("builtin:"):
            if value != "builtin:manifest":
                raise ValueError(f"unknown built-in indexer {value!r} (only builtin:manifest)")
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError('must be "builtin:manifest" or a non-empty list of strings (argv)')
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"must be a list of strings, not {value!r}")
        return tuple(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {value!r}")
        choices = _CHOICES.get((section, key))
        if choices and value.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")
        if key == "socket_mode" and not re.fullmatch(r"0?[0-7]{3}", value):
            raise ValueError(f"must be an octal mode like \"0660\", not {value!r}")
        return value.lower() if choices else value
    raise ValueError(f"unexpected value {value!r}")


def _env_value(raw: str, default: Any, key: str) -> Any:
    """An environment value as TOML would read it (so ``8`` is an int, ``[..]`` a list),
    but as it stands for a text setting (so ``JOBD_SERVER_SOCKET_MODE=600`` is ``"600"``)."""
    if isinstance(default, str) and key not in ("index_command", "full_index_command"):
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def load(config_file: str | os.PathLike[str] | None = None, *, socket: str | None = None,
         db: str | None = None, log_level: str | None = None, log_format: str | None = None,
         env: Mapping[str, str] | None = None) -> Config:
    """Build the Config: defaults < file < ``JOBD_<SECTION>_<KEY>`` environment < flags."""
    env = os.environ if env is None else env
    d_socket, d_db, d_conf = _defaults(env)
    explicit = config_file or env.get("JOBD_CONFIG")
    path = Path(explicit) if explicit else d_conf
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}

    if path.exists() or explicit:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for name, table in raw.items():
            if name not in _SECTIONS:
                raise ConfigError(f"{path}: unknown section [{name}] "
                                  f"(known: {', '.join(_SECTIONS)})")
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: {name} must be a table [{name}]")
            sections[name].update((k, (str(path), v, False)) for k, v in table.items())

    for key, raw_value in env.items():
        m = re.fullmatch(r"JOBD_([A-Z]+)_([A-Z_]+)", key)
        if m and m.group(1).lower() in _SECTIONS:
            sections[m.group(1).lower()][m.group(2).lower()] = (f"environment {key}",
                                                                raw_value, True)

    built: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        defaults = cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, (where, value, from_env) in sections[name].items():
            if key not in fields:
                raise ConfigError(f"{where}: unknown key {name}.{key} "
                                  f"(known: {', '.join(sorted(fields))})")
            default = getattr(defaults, key)
            if from_env:
                value = _env_value(value, default, key)
            try:
                values[key] = _coerce(where, key, default, value, name)
            except ValueError as e:
                raise ConfigError(f"{where}: {name}.{key} {e}") from None
        built[name] = dataclasses.replace(defaults, **values)

    return Config(
        socket=Path(socket or env.get("JOBD_SOCKET") or d_socket),
        db=Path(db or env.get("JOBD_DB") or d_db),
        config_file=path if path.exists() else None,
        log_level=(log_level or env.get("JOBD_LOG_LEVEL") or built["server"].log_level).lower(),
        log_format=(log_format or env.get("JOBD_LOG_FORMAT") or "auto").lower(),
        **built,
    )
