"""One frozen Config: defaults, then the TOML file, then ``JOBD_*`` environment, then flags.

SPEC §1 fixes the defaults and the file's shape. A bad file (unknown key, wrong type,
bad duration) raises ``ConfigError`` whose message is one line naming the file, the key
and the problem. ``[types.NAME]`` tables (SPEC §5: job types that run a program) are
read into ``TypeSpec``s here, every rule of their templates checked, so a bad one stops
jobd at start or is refused by a reload. ``[storage]`` picks the backend: with
``"postgres"`` it needs a dsn, a ``state_dir`` (no database file lies beside the logs)
and psycopg installed, and ``--db``/``JOBD_DB`` are unused (``Config.db_ignored`` says
which was given, for the daemon to log). ``[cluster]`` (lease, heartbeat, poll) is the
node's lease with PostgreSQL; its heartbeat must be shorter than its lease.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import time
import tomllib
from pathlib import Path
from typing import Any, Mapping

from jobd.models import iso
from jobd.paths import segment

__all__ = ["BUILTIN_TYPES", "Config", "ConfigError", "ConfigState", "Duration", "ROLES",
           "TypeSpec", "default_socket_paths", "load", "mask_dsn", "parse_duration",
           "parse_limit", "placeholder"]


class ConfigError(Exception):
    """The configuration cannot be used."""


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")


#: the longest duration a setting takes: a hundred years (times are µs in 64 bits)
_LONGEST_S = 100 * 366 * 86400


def parse_duration(value: str | int | float) -> float:
    """``30s``, ``5m``, ``2h``, ``7d`` (or a bare number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a duration (a finite number of seconds)")
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        seconds = float(value)
    else:
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration (write e.g. 30s, 5m, 2h, 7d)")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds > _LONGEST_S:
        raise ValueError(f"{value!r} is longer than a hundred years")
    return seconds


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
    #: limits: "none" (or "0") is none, as for every limit (SPEC §1)
    line_timeout: float | None = _Limit(30)
    idle_timeout: float | None = _Limit(600)


@dataclasses.dataclass(frozen=True)
class Storage:
    synchronous: str = "full"
    #: "sqlite" (embedded, the default) or "postgres" (SPEC §11)
    backend: str = "sqlite"
    #: postgres: a libpq connection string or URL
    dsn: str = ""
    #: logs, repositories, the lock (and SQLite's manifests); "": the database's folder (SQLite only)
    state_dir: str = ""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """``[cluster]``: the node's lease with ``backend = "postgres"`` (SPEC §11)."""

    #: how long a node's heartbeat keeps its lease (by the database's clock)
    lease: Duration = Duration(10)
    #: how often a node renews its lease; its job processes stop at lease - heartbeat
    #: after the last renewal that held
    heartbeat: Duration = Duration(2)
    #: how often a node claims and re-reads what it waits on, whatever notifications say
    poll: Duration = Duration(1)


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
    #: how many times the indexer counts over the files (CIDX: 2, hashing then embedding)
    index_passes: int = 1
    #: added to the indexer's environment
    index_env: dict[str, str] = dataclasses.field(default_factory=dict)
    remote: str = "origin"


@dataclasses.dataclass(frozen=True)
class Http:
    """``[http]``: the settings of the ``jobd-http`` gateway (SPEC §10). The daemon checks
    them as it checks every section, and uses none."""

    listen: str = "127.0.0.1:8095"
    jwt_secret_file: str = ""      #: HS256
    jwt_public_key_file: str = ""  #: RS256 or ES256
    algorithm: str = ""            #: "": the key's own
    user_claim: str = "username"
    admin_claim: str = "role=admin"
    audience: str = ""             #: "": not checked
    issuer: str = ""               #: "": not checked
    metrics_listen: str = ""       #: HOST:PORT serving GET /metrics with no sign-in; "": none


#: the job types jobd has itself: no ``[types]`` entry may take their names
BUILTIN_TYPES = frozenset({"sync", "index", "command", "noop"})
#: who may submit a job type (SPEC §3)
ROLES = ("user", "service", "admin")
#: a ``[types]`` entry's ``project``: whether its jobs take a project_id
_PROJECT_MODES = ("required", "optional", "none")
#: the values jobd itself fills into a ``[types]`` argv
_ARGV_VALUES = ("user_id", "project_id", "repo_path", "job_id")
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_WHOLE = re.compile(rf"\{{({_NAME})\}}")
_TYPE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def placeholder(element: str) -> str | None:
    """The name an argv element stands for when it is one whole ``{name}``, else None."""
    m = _WHOLE.fullmatch(element)
    return m.group(1) if m else None


@dataclasses.dataclass(frozen=True)
class TypeSpec:
    """One ``[types.NAME]`` entry (SPEC §5): a program jobd runs like ``command``."""

    #: the program and its arguments; a ``{name}`` element is an option's value or one of
    #: user_id, project_id, repo_path, job_id
    argv: tuple[str, ...] = ()
    #: string options the submitter must give
    options: tuple[str, ...] = ()
    #: string options that may be left out (their ``{name}`` elements are then dropped)
    optional_options: tuple[str, ...] = ()
    #: the options whose value may start with "-" (``true`` in the file: all of them)
    allow_dash: tuple[str, ...] = ()
    #: who may submit and retry it
    roles: tuple[str, ...] = ("admin",)
    #: "required", "optional" or "none": whether its jobs take a project_id
    project: str = "none"
    #: the repository it works on when not the project's: a path template of options,
    #: {state_dir}, {user_id} and {project_id} ("": none)
    repo: str = ""
    #: one at a time per repository, and a queued duplicate is folded
    exclusive: bool = False
    #: its jobs' run-time limit when they ask none (``timeout_s``); None: no limit
    timeout: float | None = _Limit(6 * 3600)
    #: added to the daemon's environment
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    #: its working directory, a path template of {state_dir} and {repo_path} ("": jobd's)
    cwd: str = ""
    #: after a daemon crash it runs again from the start (else it fails)
    resumable: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """Every option it takes."""
        return self.options + self.optional_options

    @property
    def has_repository(self) -> bool:
        """Whether its jobs work on a repository (the ``{repo_path}``): its ``repo``, or
        the project's."""
        return bool(self.repo) or self.project == "required"


_SECTIONS: dict[str, type] = {
    "server": Server, "storage": Storage, "cluster": Cluster, "execution": Execution,
    "retention": Retention, "auth": Auth, "sync": Sync, "http": Http,
}

_CHOICES = {("storage", "synchronous"): ("off", "normal", "full", "extra"),
            ("storage", "backend"): ("sqlite", "postgres"),
            ("server", "log_level"): ("debug", "info", "warning", "error"),
            ("http", "algorithm"): ("", "hs256", "rs256", "es256")}


@dataclasses.dataclass(frozen=True)
class Config:
    socket: Path
    db: Path
    config_file: Path | None = None
    log_level: str = "info"
    log_format: str = "auto"
    server: Server = Server()
    storage: Storage = Storage()
    cluster: Cluster = Cluster()
    execution: Execution = Execution()
    retention: Retention = Retention()
    auth: Auth = Auth()
    sync: Sync = Sync()
    http: Http = Http()
    #: the ``[types.NAME]`` entries, by name
    types: dict[str, TypeSpec] = dataclasses.field(default_factory=dict)
    #: with PostgreSQL: the ``--db`` or ``JOBD_DB`` given, which names no database then
    db_ignored: str | None = None

    @property
    def state_dir(self) -> Path:
        """Where repositories, manifests, logs and the lock live: ``[storage] state_dir``,
        else the SQLite database's folder."""
        return Path(self.storage.state_dir) if self.storage.state_dir else self.db.parent

    @property
    def database(self) -> str:
        """The database as logs and messages name it: the SQLite file, or the PostgreSQL
        dsn with its password masked."""
        if self.storage.backend == "postgres":
            return mask_dsn(self.storage.dsn)
        return str(self.db)

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


def mask_dsn(dsn: str) -> str:
    """A libpq connection string or URL with its password shown as ``***``."""
    if re.match(r"postgres(?:ql)?://", dsn.strip()):
        # the user info's password, and a password parameter of the query
        text = re.sub(r"(://[^:/@?\s]*:)[^@/?\s]*@", r"\1***@", dsn)
        return re.sub(r"([?&]password=)[^&#\s]*", r"\1***", text)
    # key = value pairs: a value is a word, or quoted with backslash escapes
    return re.sub(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)


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
        seconds = parse_duration(value)
        if key == "cleanup_every" and seconds < 1:
            raise ValueError(f"must be at least 1s (how often cleanup runs), not {value!r}")
        return Duration(seconds)
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
    if isinstance(default, dict):
        return _environment(value)
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


def _environment(value: Any) -> dict[str, str]:
    """A table of environment variables: names (no "=") to strings."""
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and k and "=" not in k and "\0" not in k
            and isinstance(v, str) and "\0" not in v for k, v in value.items()):
        raise ValueError("must be a table of variable names (without '=') to strings, "
                         'e.g. { VOYAGE_API_KEY = "..." }')
    return dict(value)


def _names(value: Any, what: str) -> tuple[str, ...]:
    """A list of distinct names (option names, roles)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a list of {what}, not {value!r}")
    for v in value:
        if not re.fullmatch(_NAME, v):
            raise ValueError(f"{v!r} is not a name (letters, digits and '_', not starting "
                             "with a digit)")
    if len(set(value)) != len(value):
        raise ValueError(f"names {what} twice")
    return tuple(value)


def _template_names(template: str, key: str) -> list[str]:
    """The ``{name}``s of the path template at ``key``; a brace outside one is refused."""
    rest = _WHOLE.sub("", template)
    if "{" in rest or "}" in rest:
        raise ValueError(f".{key}: {template!r} has a brace that is not part of a {{name}}")
    return [m.group(1) for m in _WHOLE.finditer(template)]


#: the keys of a [types.NAME] table, and how each is read
_TYPE_KEYS = {f.name for f in dataclasses.fields(TypeSpec)}


def _type_spec(name: str, table: Any, default_timeout: float | None) -> TypeSpec:
    """One ``[types.NAME]`` table checked; ValueError("<key>: <problem>") naming the key."""
    if name in BUILTIN_TYPES:
        raise ValueError(f": {name} is a built-in job type; give this one another name")
    if not _TYPE_NAME.fullmatch(name):
        raise ValueError(": a type name is 1-64 letters, digits, '_', '.' or '-', "
                         "not starting with '.' or '-'")
    if not isinstance(table, dict):
        raise ValueError(f" must be a table [types.{name}]")
    for key in table:
        if key not in _TYPE_KEYS:
            raise ValueError(f": unknown key {key!r} (known: {', '.join(sorted(_TYPE_KEYS))})")
    values: dict[str, Any] = {}

    def field(key: str, read: Any) -> Any:
        if key in table:
            try:
                values[key] = read(table[key])
            except ValueError as e:
                raise ValueError(f".{key}: {e}") from None
        return values.get(key, getattr(TypeSpec, key, None))

    def text(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {value!r}")
        return value

    def boolean(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, not {value!r}")
        return value

    def choice(choices: tuple[str, ...]) -> Any:
        def read(value: Any) -> str:
            if value not in choices:
                raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")
            return str(value)
        return read

    def argv(value: Any) -> tuple[str, ...]:
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and "\0" not in v for v in value)):
            raise ValueError('must be a non-empty list of strings, the program first, e.g. '
                             '["cidx-admin", "refresh", "{alias}"]')
        if not value[0] or "{" in value[0]:
            raise ValueError(f"the program (its first element) must be written out, "
                             f"not {value[0]!r}")
        return tuple(value)

    options = field("options", lambda v: _names(v, "option names"))
    optional = field("optional_options", lambda v: _names(v, "option names"))
    if "optional_options" in values:
        both = set(options) & set(optional)
        if both:
            raise ValueError(f".optional_options: {sorted(both)[0]!r} is in options too")
    taken = set(options) | set(optional)
    for key in ("options", "optional_options"):
        clash = [o for o in values.get(key, ()) if o in (*_ARGV_VALUES, "state_dir")]
        if clash:
            raise ValueError(f".{key}: {clash[0]!r} is filled in by jobd; name the option "
                             "otherwise")
    project = field("project", choice(_PROJECT_MODES))
    if "argv" not in table:
        raise ValueError(".argv: missing: the program to run, e.g. "
                         '["cidx-admin", "refresh", "{alias}"]')
    program = field("argv", argv)
    repo = field("repo", text)

    def dash(value: Any) -> tuple[str, ...]:
        if isinstance(value, bool):
            return tuple(sorted(taken)) if value else ()
        allowed = _names(value, "option names")
        for o in allowed:
            if o not in taken:
                raise ValueError(f"{o!r} is not one of its options")
        return allowed

    field("allow_dash", dash)

    def roles(value: Any) -> tuple[str, ...]:
        listed = _names(value, "roles")
        if not listed:
            raise ValueError(f"must name at least one of {', '.join(ROLES)}")
        for role in listed:
            if role not in ROLES:
                raise ValueError(f"{role!r} is not a role (roles: {', '.join(ROLES)})")
        return listed

    field("roles", roles)
    exclusive = field("exclusive", boolean)
    field("resumable", boolean)
    field("env", _environment)
    cwd = field("cwd", text)

    def timeout(value: Any) -> float | None:
        limit = parse_limit(value)
        return None if limit is None else _Limit(limit)

    values["timeout"] = field("timeout", timeout) if "timeout" in table else (
        None if default_timeout is None else _Limit(default_timeout))

    spec = TypeSpec(**values)
    # the names each template may use
    for element in program:
        used = placeholder(element)
        if used is None:
            if partial := _WHOLE.search(element):
                raise ValueError(f".argv: {element!r}: {partial.group()} must be a whole "
                                 "element (jobd passes it as one argument, never through a "
                                 "shell)")
            continue  # other braces are the program's own
        if used in taken or used in ("user_id", "job_id"):
            continue
        if used == "project_id" and project != "none":
            continue
        if used == "repo_path" and spec.has_repository:
            continue
        raise ValueError(f".argv: {{{used}}} " + (
            "needs a repository: set repo, or project = \"required\""
            if used == "repo_path" else
            "needs project = \"required\" or \"optional\"" if used == "project_id" else
            f"is not one of its options ({', '.join(sorted(taken)) or 'none'}) nor "
            f"{', '.join(_ARGV_VALUES)}"))
    if repo:
        for used in _template_names(repo, "repo"):
            if used in options or used in ("state_dir", "user_id"):
                continue
            if used == "project_id" and project == "required":
                continue
            raise ValueError(f".repo: {{{used}}} " + (
                "is an optional option; a repository path needs a value always"
                if used in optional else
                "needs project = \"required\"" if used == "project_id" else
                "is not one of its options nor state_dir, user_id, project_id"))
        if not os.path.isabs(repo.replace("{state_dir}", "/")):
            raise ValueError(f".repo: {repo!r} must be an absolute path (it may start with "
                             "{state_dir})")
    if cwd:
        for used in _template_names(cwd, "cwd"):
            if used == "state_dir" or (used == "repo_path" and spec.has_repository):
                continue
            raise ValueError(f".cwd: {{{used}}} may not be used here (only {{state_dir}}, "
                             "and {repo_path} for a type with a repository)")
        if not os.path.isabs(cwd.replace("{state_dir}", "/").replace("{repo_path}", "/")):
            raise ValueError(f".cwd: {cwd!r} must be an absolute path")
    if exclusive and not spec.has_repository:
        raise ValueError('.exclusive: needs a repository to be exclusive on: set repo, or '
                         'project = "required"')
    return spec


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
    types: dict[str, Any] = {}

    if path.exists() or explicit:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}"
                              ) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for name, table in raw.items():
            if name == "types":
                if not isinstance(table, dict):
                    raise ConfigError(f"{path}: types must hold tables [types.NAME]")
                types = table
                continue
            if name not in _SECTIONS and not isinstance(table, dict):
                raise ConfigError(f"{path}: {name} = … is outside any section: every key "
                                  f"belongs in one (known: {', '.join(_SECTIONS)})")
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

    _check_storage(built["storage"], {k: w for k, (w, _, _) in sections["storage"].items()},
                   str(path))
    _check_cluster(built["cluster"], {k: w for k, (w, _, _) in sections["cluster"].items()},
                   str(path))
    _check_sync(built["sync"], {k: w for k, (w, _, _) in sections["sync"].items()}, str(path))
    postgres = built["storage"].backend == "postgres"
    given_db = db or env.get("JOBD_DB")
    specs: dict[str, TypeSpec] = {}
    for name, table in types.items():
        try:
            specs[name] = _type_spec(name, table, built["execution"].default_timeout)
        except ValueError as e:
            raise ConfigError(f"{path}: types.{name}{e}") from None
    config = Config(
        socket=Path(socket or env.get("JOBD_SOCKET") or d_socket),
        # with PostgreSQL no file is the database: a --db given stays unused
        db=Path(given_db if given_db and not postgres else d_db),
        db_ignored=(f"--db {db}" if db else f"JOBD_DB={given_db}") if given_db and postgres
        else None,
        config_file=path if path.exists() else None,
        log_level=(log_level or env.get("JOBD_LOG_LEVEL") or built["server"].log_level).lower(),
        log_format=(log_format or env.get("JOBD_LOG_FORMAT") or "auto").lower(),
        types=specs,
        **built,
    )
    for name, spec in specs.items():
        if problem := _repo_outside(config, spec):
            raise ConfigError(f"{path}: types.{name}.repo: {problem}")
    # the command line's options are click's choices; the environment's are checked here
    for var, value, choices in (
            ("JOBD_LOG_LEVEL", config.log_level, _CHOICES[("server", "log_level")]),
            ("JOBD_LOG_FORMAT", config.log_format, ("auto", "json", "console"))):
        if value not in choices:
            raise ConfigError(f"environment {var}: {value!r} is not one of {', '.join(choices)}")
    return config


#: the names each of ``[sync]``'s path templates may use
_SYNC_TEMPLATES = {"allowed_roots": {"state_dir"},
                   "repo_path_template": {"state_dir", "user_id", "project_id"}}


def _check_sync(sync: Sync, where: dict[str, str], file: str) -> None:
    """Raise ConfigError for a ``[sync]`` path template with a name jobd does not fill, or
    a stray brace (it would fail each time a path is made from it)."""
    for key, allowed in _SYNC_TEMPLATES.items():
        value = getattr(sync, key)
        for template in (value,) if isinstance(value, str) else value:
            try:
                unknown = sorted(set(_template_names(template, key)) - allowed)
            except ValueError as e:
                raise ConfigError(f"{where.get(key, file)}: sync{e}") from None
            if unknown:
                raise ConfigError(
                    f"{where.get(key, file)}: sync.{key}: {template!r} names "
                    f"{', '.join('{' + n + '}' for n in unknown)}; it may use "
                    f"{', '.join('{' + n + '}' for n in sorted(allowed))}")


def _check_cluster(cluster: Cluster, where: dict[str, str], file: str) -> None:
    """Raise ConfigError for a ``[cluster]`` whose heartbeat could not keep its lease."""
    if not 0 < cluster.heartbeat < cluster.lease:
        key = "heartbeat" if "heartbeat" in where else "lease"
        raise ConfigError(f"{where.get(key, file)}: cluster.{key}: the heartbeat "
                          f"({cluster.heartbeat:g}s) must be above 0 and below the lease "
                          f"({cluster.lease:g}s), which it renews")
    if cluster.poll <= 0:
        raise ConfigError(f"{where.get('poll', file)}: cluster.poll must be above 0")


def _check_storage(storage: Storage, where: dict[str, str], file: str) -> None:
    """Raise ConfigError for a ``[storage]`` block jobd cannot start on. ``where``: the
    origin (file or variable) of each key set; a missing key is the file's problem."""
    def refuse(key: str, problem: str) -> None:
        raise ConfigError(f"{where.get(key, where.get('backend', file))}: storage.{key} "
                          f"{problem}")

    if storage.state_dir and not os.path.isabs(storage.state_dir):
        refuse("state_dir", f"must be an absolute path, not {storage.state_dir!r}")
    if storage.backend != "postgres":
        return
    if not storage.dsn.strip():
        refuse("dsn", 'is empty, but backend = "postgres" needs a libpq connection '
               'string, e.g. dsn = "host=/run/postgresql dbname=jobd"')
    if not storage.state_dir:
        refuse("state_dir", 'is not set, but backend = "postgres" needs it: the folder '
               "of this node's logs, repositories and lock, e.g. "
               'state_dir = "/var/lib/jobd"')
    try:  # only here: a SQLite daemon never loads psycopg or libpq
        import psycopg.conninfo
        importlib.import_module("psycopg_pool")  # the store's read pool
    except ImportError as e:
        refuse("backend", f'= "postgres" needs psycopg with its pool, which cannot be '
               f"imported ({e}): pip install 'jobd[postgres]'")
    try:
        psycopg.conninfo.conninfo_to_dict(storage.dsn)
    except psycopg.Error as e:  # its text names keys, never values (no password shown)
        refuse("dsn", f"is not a libpq connection string or URL: {str(e).strip()}")


def _repo_outside(config: Config, spec: TypeSpec) -> str | None:
    """Why no value could put a type's ``repo`` under ``allowed_roots``, or None.

    What comes before its first option (or id) is fixed: that folder must lie under a root.
    """
    if not spec.repo:
        return None
    fixed = spec.repo.replace("{state_dir}", str(config.state_dir)).split("{", 1)[0]
    folder = Path(os.path.realpath(fixed if fixed.endswith("/") else os.path.dirname(fixed)))
    roots = config.allowed_roots
    if any(folder == root or root in folder.parents for root in roots):
        return None
    return (f"{folder} lies outside sync.allowed_roots ({', '.join(map(str, roots))}); "
            "add a root that holds it")
