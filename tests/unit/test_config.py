"""Configuration: SPEC §1 defaults for root and ordinary users, the TOML file, ``JOBD_*``
environment and flags in that order, durations, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import OTHER_UID_PYTHON

from jobd import config
from jobd.config import ConfigError, default_socket_paths, load, parse_duration


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- defaults ----------------------------------------------------------------------------

def test_section_defaults_are_the_spec_values(tmp_path: Path) -> None:
    c = load(write(tmp_path / "empty.toml", ""), env={})
    assert (c.server.socket_mode, c.server.max_connections, c.server.max_connections_per_uid,
            c.server.max_message_bytes, c.server.max_batch, c.server.line_timeout,
            c.server.idle_timeout) == ("0660", 1024, 64, 1_048_576, 100, 30.0, 600.0)
    assert c.storage.synchronous == "full"
    e = c.execution
    assert (e.workers, e.max_running_per_user, e.max_queued_per_user, e.max_queued_total,
            e.max_log_bytes, e.max_recoveries, e.default_timeout, e.cancel_grace,
            e.shutdown_grace) == (4, 3, 1000, 100_000, 10_485_760, 3, 6 * 3600.0, 3.0, 10.0)
    assert (c.retention.keep, c.retention.keep_failed, c.retention.cleanup_every) == (
        7 * 86400.0, 30 * 86400.0, 3600.0)
    assert (c.auth.admins, c.auth.services) == (("root", "@jobd-admin"), ("cidx",))
    s = c.sync
    assert (s.repo_path_template, s.allowed_roots, s.index_command, s.full_index_command,
            s.remote) == ("{state_dir}/repos/{user_id}/{project_id}", ("{state_dir}/repos",),
                          "builtin:manifest", "builtin:manifest", "origin")
    assert (c.log_level, c.log_format) == ("info", "auto")


@pytest.mark.skipif(os.geteuid() != 0, reason="the system paths are root's defaults")
def test_root_defaults() -> None:
    if Path("/etc/jobd/jobd.toml").exists():
        pytest.skip("this machine has an /etc/jobd/jobd.toml that would be read")
    c = load(env={})
    assert (c.socket, c.db, c.config_file) == (
        Path("/run/jobd/jobd.sock"), Path("/var/lib/jobd/jobd.db"), None)
    assert (c.state_dir, c.log_dir) == (Path("/var/lib/jobd"), Path("/var/lib/jobd/logs"))


def test_systemd_directories_win(tmp_path: Path) -> None:
    env = {"RUNTIME_DIRECTORY": f"{tmp_path}/run:{tmp_path}/other",
           "STATE_DIRECTORY": f"{tmp_path}/state", "JOBD_CONFIG": str(
               write(tmp_path / "jobd.toml", ""))}
    c = load(env=env)
    assert (c.socket, c.db) == (tmp_path / "run" / "jobd.sock", tmp_path / "state" / "jobd.db")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged user can read (pytest's tmp_path is private to root)."""
    top = Path(tempfile.mkdtemp(prefix="jobd-config-"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top)


@pytest.fixture
def load_as_ordinary_user(readable_jobd: dict[str, str]) -> Callable[[dict[str, str]], dict[str, Any]]:
    return lambda env: _load_as_ordinary_user(env, readable_jobd)


def _load_as_ordinary_user(env: dict[str, str], readable: dict[str, str]) -> dict[str, Any]:
    """``load(env=env)`` run by an ordinary user: here, or as nobody when the tests are root."""
    script = textwrap.dedent("""
        import json, os, sys
        from jobd import config
        c = config.load(env=json.loads(sys.argv[1]))
        print(json.dumps({"socket": str(c.socket), "db": str(c.db),
                          "config_file": str(c.config_file), "workers": c.execution.workers,
                          "uid": os.getuid()}))
    """)
    command = [OTHER_UID_PYTHON, "-c", script, json.dumps(env)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("setpriv (util-linux) is needed to test an ordinary user's defaults")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/",
                         env={**os.environ, **readable})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_ordinary_user_defaults_follow_xdg(shared_dir: Path, load_as_ordinary_user: Any) -> None:
    conf = write(shared_dir / "conf" / "jobd" / "jobd.toml", "[execution]\nworkers = 7\n")
    out = load_as_ordinary_user({
        "HOME": str(shared_dir / "home"), "XDG_RUNTIME_DIR": str(shared_dir / "run"),
        "XDG_STATE_HOME": str(shared_dir / "state"), "XDG_CONFIG_HOME": str(shared_dir / "conf"),
    })
    assert out["socket"] == str(shared_dir / "run" / "jobd" / "jobd.sock")
    assert out["db"] == str(shared_dir / "state" / "jobd" / "jobd.db")
    assert (out["config_file"], out["workers"]) == (str(conf), 7)


def test_ordinary_user_defaults_without_xdg(shared_dir: Path, load_as_ordinary_user: Any) -> None:
    home = shared_dir / "home"
    conf = write(home / ".config" / "jobd" / "jobd.toml", "[execution]\nworkers = 5\n")
    out = load_as_ordinary_user({"HOME": str(home)})
    assert out["socket"] == f"/tmp/jobd-{out['uid']}/jobd.sock"
    assert out["db"] == str(home / ".local" / "state" / "jobd" / "jobd.db")
    assert (out["config_file"], out["workers"]) == (str(conf), 5)


def test_an_ordinary_user_under_systemd_uses_its_directories(shared_dir: Path, load_as_ordinary_user: Any) -> None:
    out = load_as_ordinary_user({"HOME": str(shared_dir), "STATE_DIRECTORY": str(shared_dir),
                                 "JOBD_CONFIG": str(write(shared_dir / "j.toml", ""))})
    assert (out["socket"], out["db"]) == ("/run/jobd/jobd.sock", str(shared_dir / "jobd.db"))


def test_client_socket_search_order(tmp_path: Path) -> None:
    assert default_socket_paths({"XDG_RUNTIME_DIR": str(tmp_path)}) == [
        tmp_path / "jobd" / "jobd.sock", Path("/run/jobd/jobd.sock")]
    assert default_socket_paths({}) == [Path(f"/tmp/jobd-{os.getuid()}/jobd.sock"),
                                        Path("/run/jobd/jobd.sock")]


# -- file < environment < flags ------------------------------------------------------------

SAMPLE = """
    [server]
    socket_mode = "0600"
    idle_timeout = "2m"
    [storage]
    synchronous = "normal"
    [execution]
    workers = 8
    max_running_per_user = 10
    cancel_grace = "5s"
    [retention]
    keep = "2d"
    keep_failed = "1w"
    [auth]
    admins = ["alice", "@ops"]
    services = []
    [sync]
    index_command = ["cidx", "index", "--progress-json"]
    allowed_roots = ["{state_dir}/repos", "/srv/git"]
"""


def test_file_overrides_defaults(tmp_path: Path) -> None:
    c = load(write(tmp_path / "jobd.toml", SAMPLE), env={})
    assert (c.server.socket_mode, c.server.idle_timeout, c.server.max_batch) == (
        "0600", 120.0, 100)
    assert c.storage.synchronous == "normal"
    assert (c.execution.workers, c.execution.max_running_per_user,
            c.execution.cancel_grace, c.execution.max_queued_per_user) == (8, 10, 5.0, 1000)
    assert (c.retention.keep, c.retention.keep_failed) == (2 * 86400.0, 7 * 86400.0)
    assert (c.auth.admins, c.auth.services) == (("alice", "@ops"), ())
    assert c.sync.index_command == ("cidx", "index", "--progress-json")
    assert c.sync.full_index_command == "builtin:manifest"
    assert c.config_file == tmp_path / "jobd.toml"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "jobd.toml", SAMPLE)
    c = load(env={"JOBD_CONFIG": str(path), "JOBD_EXECUTION_WORKERS": "16",
                  "JOBD_RETENTION_KEEP": "3h", "JOBD_AUTH_ADMINS": '["bob"]',
                  "JOBD_SERVER_SOCKET_MODE": "660", "JOBD_SYNC_REMOTE": "true",
                  "JOBD_STORAGE_SYNCHRONOUS": "FULL",
                  "JOBD_SOCKET": "/e/jobd.sock", "JOBD_DB": "/e/jobd.db",
                  "JOBD_LOG_LEVEL": "WARNING", "JOBD_LOG_FORMAT": "json"})
    assert c.config_file == path
    assert (c.execution.workers, c.retention.keep, c.auth.admins) == (16, 3 * 3600.0, ("bob",))
    # text settings take the variable as written, even when it looks like a number
    assert (c.server.socket_mode, c.sync.remote) == ("660", "true")
    assert c.storage.synchronous == "full"
    assert c.execution.max_running_per_user == 10  # still from the file
    assert (c.socket, c.db, c.log_level, c.log_format) == (
        Path("/e/jobd.sock"), Path("/e/jobd.db"), "warning", "json")


def test_flags_override_the_environment(tmp_path: Path) -> None:
    from_env = write(tmp_path / "env.toml", "[execution]\nworkers = 2\n")
    from_flag = write(tmp_path / "flag.toml", "[execution]\nworkers = 3\n")
    c = load(from_flag, socket="/f/jobd.sock", db="/f/jobd.db", log_level="DEBUG",
             log_format="console",
             env={"JOBD_CONFIG": str(from_env), "JOBD_SOCKET": "/e/jobd.sock",
                  "JOBD_DB": "/e/jobd.db", "JOBD_LOG_LEVEL": "warning"})
    assert (c.config_file, c.execution.workers) == (from_flag, 3)
    assert (c.socket, c.db, c.log_level, c.log_format) == (
        Path("/f/jobd.sock"), Path("/f/jobd.db"), "debug", "console")
    assert (c.state_dir, c.log_dir) == (Path("/f"), Path("/f/logs"))


def test_paths_derived_from_the_state_dir(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "repos").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    c = load(write(tmp_path / "jobd.toml", ""), db=str(tmp_path / "link" / "jobd.db"), env={})
    assert c.expand(c.sync.repo_path_template, user_id="alice", project_id="p1") == (
        f"{tmp_path}/link/repos/alice/p1")
    assert c.allowed_roots == (real / "repos",)  # resolved, so a symlink cannot escape


# -- durations -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [
    ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("7d", 604800.0), ("1.5h", 5400.0),
    ("250ms", 0.25), ("2w", 1_209_600.0), ("45", 45.0), (45, 45.0), (0.5, 0.5), (" 10m ", 600.0),
])
def test_durations(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "s", "5x", "-1s", "1h30m", "ten minutes", "5 mins",
                                 -3, True, float("inf"), float("nan"), "40000d", 1e300])
def test_bad_durations(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


# -- errors: one line, naming the file, the key and the problem ------------------------------

@pytest.mark.parametrize("text,key,problem", [
    ("[bogus]\nx = 1\n", "[bogus]", "unknown section"),
    ("[server]\nsockt_mode = \"0660\"\n", "server.sockt_mode", "unknown key"),
    ("[retention]\nkeep = \"7x\"\n", "retention.keep", "not a duration"),
    ("[retention]\nkeep = \"-1d\"\n", "retention.keep", "not a duration"),
    ("[execution]\nworkers = \"4\"\n", "execution.workers", "must be an integer"),
    ("[execution]\nworkers = 0\n", "execution.workers", "must be positive"),
    ("[execution]\nworkers = true\n", "execution.workers", "must be an integer"),
    ("[execution]\nworkers = 2.5\n", "execution.workers", "must be an integer"),
    ("[auth]\nadmins = \"root\"\n", "auth.admins", "must be a list of strings"),
    ("[auth]\nservices = [\"cidx\", 3]\n", "auth.services", "must be a list of strings"),
    ("[storage]\nsynchronous = \"fast\"\n", "storage.synchronous", "must be one of"),
    ("[server]\nsocket_mode = \"rw-rw----\"\n", "server.socket_mode", "octal mode"),
    ("[sync]\nindex_command = \"builtin:other\"\n", "sync.index_command",
     "unknown built-in indexer"),
    ("[sync]\nindex_command = []\n", "sync.index_command", "non-empty list"),
    ("[sync]\nremote = 5\n", "sync.remote", "must be a string"),
    ("[retention]\ncleanup_every = inf\n", "retention.cleanup_every", "not a duration"),
    ("[retention]\ncleanup_every = \"0\"\n", "retention.cleanup_every", "at least 1s"),
    ("[retention]\ncleanup_every = \"0.5s\"\n", "retention.cleanup_every", "at least 1s"),
    ("[retention]\nkeep = nan\n", "retention.keep", "not a duration"),
    ("[sync]\nallowed_roots = [\"{nope}/x\"]\n", "sync.allowed_roots", "names {nope}"),
    ("[sync]\nallowed_roots = [\"{\"]\n", "sync.allowed_roots", "has a brace"),
    ("[sync]\nrepo_path_template = \"/r/{user}/{project_id}\"\n", "sync.repo_path_template",
     "names {user}"),
    ("server = 5\n", "server", "must be a table"),
    ("[server\n", "not valid TOML", "line 1"),
])
def test_each_file_error_is_one_line_naming_file_key_and_problem(
        tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = write(tmp_path / "jobd.toml", text)
    with pytest.raises(ConfigError) as refused:
        load(path, env={})
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert key in message and problem in message


def test_environment_errors_name_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path / "jobd.toml", "")
    with pytest.raises(ConfigError, match=r"^environment JOBD_EXECUTION_WORKERS: "
                                          r"execution\.workers must be an integer"):
        load(path, env={"JOBD_EXECUTION_WORKERS": "many"})
    with pytest.raises(ConfigError, match=r"^environment JOBD_EXECUTION_WORKRS: unknown key "
                                          r"execution\.workrs"):
        load(path, env={"JOBD_EXECUTION_WORKRS": "4"})
    with pytest.raises(ConfigError, match=r"JOBD_RETENTION_KEEP: retention\.keep .*duration"):
        load(path, env={"JOBD_RETENTION_KEEP": "soon"})
    with pytest.raises(ConfigError, match=r"^environment JOBD_LOG_LEVEL: 'bogus' is not one "
                                          r"of debug, info, warning, error$"):
        load(path, env={"JOBD_LOG_LEVEL": "bogus"})


def test_a_missing_named_file_is_an_error_but_a_missing_default_is_not(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^{tmp_path}/nope.toml: no such config file$"):
        load(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="no such config file"):
        load(env={"JOBD_CONFIG": str(tmp_path / "nope.toml")})
    if Path("/etc/jobd/jobd.toml").exists():
        pytest.skip("this machine has an /etc/jobd/jobd.toml that would be read")
    c = load(env={"STATE_DIRECTORY": str(tmp_path)})  # the default file is /etc/jobd/jobd.toml
    assert c.config_file is None and c.execution.workers == 4


def test_config_is_frozen(tmp_path: Path) -> None:
    c = load(write(tmp_path / "jobd.toml", ""), env={})
    with pytest.raises(AttributeError):
        c.execution.workers = 9  # type: ignore[misc]
    assert isinstance(c, config.Config)


# -- [types.NAME] and the indexer's settings ------------------------------------------------

_GOOD_TYPE = '''
[types.refresh]
argv = ["cidx-admin", "refresh", "{alias}", "{branch}", "{job_id}", "{user_id}"]
options = ["alias"]
optional_options = ["branch"]
allow_dash = ["branch"]
roles = ["service", "admin"]
repo = "{state_dir}/repos/golden/{alias}"
exclusive = true
timeout = "none"
env = { KEY = "v" }
cwd = "{repo_path}"

[types.activate]
argv = ["cidx-admin", "activate", "{project_id}", "{repo_path}"]
project = "required"
roles = ["user", "service", "admin"]
timeout = "90s"
resumable = true
'''


def test_types_and_the_indexers_settings_are_read(tmp_path: Path) -> None:
    path = write(tmp_path / "jobd.toml", _GOOD_TYPE + '''
[sync]
index_passes = 2
index_env = { VOYAGE_API_KEY = "k" }
[execution]
default_timeout = "2h"
''')
    c = load(path, env={})
    assert (c.sync.index_passes, c.sync.index_env) == (2, {"VOYAGE_API_KEY": "k"})
    refresh, activate = c.types["refresh"], c.types["activate"]
    assert refresh.argv[2] == "{alias}" and refresh.options == ("alias",)
    assert (refresh.optional_options, refresh.allow_dash, refresh.roles) == (
        ("branch",), ("branch",), ("service", "admin"))
    assert (refresh.project, refresh.exclusive, refresh.timeout, refresh.env, refresh.cwd) == (
        "none", True, None, {"KEY": "v"}, "{repo_path}")
    assert refresh.has_repository and not refresh.resumable
    assert (activate.project, activate.timeout, activate.resumable, activate.roles) == (
        "required", 90.0, True, ("user", "service", "admin"))
    # a type that says no timeout has the configured default; allow_dash = true is all
    c = load(write(tmp_path / "b.toml", '''
[execution]
default_timeout = "2h"
[types.t]
argv = ["prog", "{a}"]
options = ["a"]
allow_dash = true
'''), env={})
    assert (c.types["t"].timeout, c.types["t"].allow_dash, c.types["t"].roles) == (
        7200.0, ("a",), ("admin",))
    assert load(write(tmp_path / "none.toml", ""), env={}).types == {}


_T = '[types.t]\nargv = ["prog", "{a}"]\noptions = ["a"]\n'


@pytest.mark.parametrize("text,key,problem", [
    ("[sync]\nindex_passes = 0\n", "sync.index_passes", "must be positive"),
    ("[sync]\nindex_passes = \"2\"\n", "sync.index_passes", "must be an integer"),
    ("[sync]\nindex_env = { A = 1 }\n", "sync.index_env", "table of variable names"),
    ("[sync]\nindex_env = [\"A=1\"]\n", "sync.index_env", "table of variable names"),
    ("types = 3\n", "types", "must hold tables"),
    ("[types]\nt = 3\n", "types.t", "must be a table"),
    ("[types.sync]\nargv = [\"x\"]\n", "types.sync", "is a built-in job type"),
    ("[types.\"-x\"]\nargv = [\"x\"]\n", "types.-x", "a type name is"),
    ("[types.t]\noptions = [\"a\"]\n", "types.t.argv", "missing"),
    ("[types.t]\nargv = []\n", "types.t.argv", "non-empty list of strings"),
    ("[types.t]\nargv = \"prog {a}\"\n", "types.t.argv", "non-empty list of strings"),
    ("[types.t]\nargv = [\"{a}\"]\noptions = [\"a\"]\n", "types.t.argv",
     "the program (its first element) must be written out"),
    ("[types.t]\nargv = [\"prog\", \"--alias={a}\"]\noptions = [\"a\"]\n", "types.t.argv",
     "must be a whole element"),
    ("[types.t]\nargv = [\"prog\", \"{b}\"]\noptions = [\"a\"]\n", "types.t.argv",
     "{b} is not one of its options"),
    ("[types.t]\nargv = [\"prog\", \"{repo_path}\"]\n", "types.t.argv",
     "{repo_path} needs a repository"),
    ("[types.t]\nargv = [\"prog\", \"{project_id}\"]\n", "types.t.argv",
     "{project_id} needs project"),
    (_T + "colour = \"red\"\n", "types.t", "unknown key 'colour'"),
    (_T + "optional_options = [\"a\"]\n", "types.t.optional_options", "'a' is in options too"),
    ("[types.t]\nargv = [\"prog\"]\noptions = [\"job_id\"]\n", "types.t.options",
     "'job_id' is filled in by jobd"),
    ("[types.t]\nargv = [\"prog\"]\noptions = [\"a-b\"]\n", "types.t.options", "is not a name"),
    ("[types.t]\nargv = [\"prog\"]\noptions = [\"a\", \"a\"]\n", "types.t.options", "twice"),
    (_T + "allow_dash = [\"b\"]\n", "types.t.allow_dash", "'b' is not one of its options"),
    (_T + "roles = [\"guest\"]\n", "types.t.roles", "'guest' is not a role"),
    (_T + "roles = []\n", "types.t.roles", "at least one"),
    (_T + "project = \"maybe\"\n", "types.t.project", "must be one of required, optional"),
    (_T + "exclusive = true\n", "types.t.exclusive", "needs a repository"),
    (_T + "exclusive = \"yes\"\n", "types.t.exclusive", "must be true or false"),
    (_T + "timeout = \"soon\"\n", "types.t.timeout", "not a duration"),
    (_T + "env = { A = 2 }\n", "types.t.env", "table of variable names"),
    (_T + "cwd = \"relative\"\n", "types.t.cwd", "must be an absolute path"),
    (_T + "cwd = \"{repo_path}\"\n", "types.t.cwd", "{repo_path} may not be used here"),
    (_T + "repo = \"golden/{a}\"\n", "types.t.repo", "must be an absolute path"),
    (_T + "repo = \"{state_dir}/repos/{b}\"\n", "types.t.repo", "{b} is not one of its options"),
    ("[types.t]\nargv = [\"prog\"]\noptional_options = [\"a\"]\nrepo = \"{state_dir}/repos/{a}\"\n",
     "types.t.repo", "{a} is an optional option"),
    (_T + "repo = \"{state_dir}/repos/{a\"\n", "types.t.repo", "a brace"),
    (_T + "repo = \"{state_dir}/golden/{a}\"\n", "types.t.repo", "lies outside sync.allowed_roots"),
    (_T + "resumable = 1\n", "types.t.resumable", "must be true or false"),
])
def test_each_bad_type_entry_is_one_line_naming_its_key(
        tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = write(tmp_path / "jobd.toml", text)
    with pytest.raises(ConfigError) as refused:
        load(path, env={})
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}")
    assert problem in message, message


def test_a_type_may_name_the_repository_under_the_roots_or_the_projects(tmp_path: Path) -> None:
    c = load(write(tmp_path / "jobd.toml", '''
[sync]
allowed_roots = ["{state_dir}/repos", "/srv/golden"]
[types.g]
argv = ["prog", "{repo_path}"]
options = ["a"]
repo = "/srv/golden/{a}"
exclusive = true
[types.p]
argv = ["prog", "{repo_path}", "{project_id}"]
project = "required"
exclusive = true
'''), env={})
    assert c.types["g"].has_repository and c.types["p"].has_repository


# -- [storage]: the backend, the dsn, the state folder -----------------------------------------

POSTGRES = """
    [storage]
    backend = "postgres"
    dsn = "host=/run/postgresql dbname=jobd user=jobd password=s3cret"
    state_dir = "/srv/jobd"
"""


def test_sqlite_is_the_default_and_its_state_folder_is_the_databases(tmp_path: Path) -> None:
    c = load(write(tmp_path / "jobd.toml", ""), db=str(tmp_path / "db" / "jobd.db"), env={})
    assert (c.storage.backend, c.storage.dsn, c.storage.state_dir) == ("sqlite", "", "")
    assert (c.state_dir, c.database, c.db_ignored) == (
        tmp_path / "db", str(tmp_path / "db" / "jobd.db"), None)


def test_a_state_dir_moves_logs_repos_and_manifests_but_not_the_sqlite_file(
        tmp_path: Path) -> None:
    c = load(write(tmp_path / "jobd.toml", f'[storage]\nstate_dir = "{tmp_path}/state"\n'),
             db=str(tmp_path / "db" / "jobd.db"), env={})
    assert (c.state_dir, c.log_dir, c.db) == (
        tmp_path / "state", tmp_path / "state" / "logs", tmp_path / "db" / "jobd.db")
    assert c.expand(c.sync.repo_path_template, user_id="u", project_id="p") == (
        f"{tmp_path}/state/repos/u/p")


def test_postgres_reads_dsn_and_state_dir_and_ignores_db(tmp_path: Path) -> None:
    path = write(tmp_path / "jobd.toml", POSTGRES)
    c = load(path, db="/f/jobd.db", env={})
    assert (c.storage.backend, c.state_dir, c.log_dir) == (
        "postgres", Path("/srv/jobd"), Path("/srv/jobd/logs"))
    assert c.storage.dsn.endswith("password=s3cret")
    # what logs and messages show of the database: never its password
    assert c.database == "host=/run/postgresql dbname=jobd user=jobd password=***"
    assert c.db_ignored == "--db /f/jobd.db" and c.db != Path("/f/jobd.db")
    from_env = load(path, env={"JOBD_DB": "/e/jobd.db"})
    assert from_env.db_ignored == "JOBD_DB=/e/jobd.db"
    assert load(path, env={}).db_ignored is None  # nothing given, nothing to say


def test_the_storage_block_comes_from_the_environment_too(tmp_path: Path) -> None:
    c = load(write(tmp_path / "jobd.toml", ""), env={
        "JOBD_STORAGE_BACKEND": "postgres", "JOBD_STORAGE_DSN": "postgresql://jobd:pw@db/jobd",
        "JOBD_STORAGE_STATE_DIR": "/srv/node1"})
    assert (c.storage.backend, c.state_dir, c.database) == (
        "postgres", Path("/srv/node1"), "postgresql://jobd:***@db/jobd")


@pytest.mark.parametrize("dsn,shown", [
    ("host=/run/postgresql password=s3cret dbname=jobd",
     "host=/run/postgresql password=*** dbname=jobd"),
    ("dbname=jobd password = 'a b\\' c' user=jobd", "dbname=jobd password = *** user=jobd"),
    ("postgresql://jobd:s3cret@db:5432/jobd", "postgresql://jobd:***@db:5432/jobd"),
    ("postgres://jobd:s3cret@db/jobd?sslmode=require", "postgres://jobd:***@db/jobd?sslmode=require"),
    ("postgresql:///jobd?host=/tmp&password=s3cret&user=u",
     "postgresql:///jobd?host=/tmp&password=***&user=u"),
    ("postgresql://jobd@db/jobd", "postgresql://jobd@db/jobd"),
    ("host=/run/postgresql dbname=jobd", "host=/run/postgresql dbname=jobd"),
])
def test_a_dsn_is_shown_with_its_password_masked(dsn: str, shown: str) -> None:
    assert config.mask_dsn(dsn) == shown


@pytest.mark.parametrize("text,key,problem", [
    ('backend = "mysql"', "storage.backend", "must be one of sqlite, postgres, not 'mysql'"),
    ('backend = "postgres"\nstate_dir = "/srv/jobd"', "storage.dsn",
     'is empty, but backend = "postgres" needs a libpq connection string'),
    ('backend = "postgres"\ndsn = "  "\nstate_dir = "/srv/jobd"', "storage.dsn", "is empty"),
    ('backend = "postgres"\ndsn = "dbname=jobd"', "storage.state_dir",
     'is not set, but backend = "postgres" needs it'),
    ('state_dir = "relative/state"', "storage.state_dir",
     "must be an absolute path, not 'relative/state'"),
    ('backend = "postgres"\ndsn = "dbname=jobd"\nstate_dir = "state"', "storage.state_dir",
     "must be an absolute path"),
    ("dsn = 5", "storage.dsn", "must be a string"),
    ('backend = "postgres"\ndsn = "host=/x password=s3cret colour=red"\nstate_dir = "/srv/jobd"',
     "storage.dsn",
     'is not a libpq connection string or URL: invalid connection option "colour"'),
    ('backend = "postgres"\ndsn = "dbname=jobd password"\nstate_dir = "/srv/jobd"',
     "storage.dsn", 'missing "=" after "password"'),
])
def test_each_storage_error_is_one_line_naming_file_key_and_problem(
        tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = write(tmp_path / "jobd.toml", f"[storage]\n{text}\n")
    with pytest.raises(ConfigError) as refused:
        load(path, env={})
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path}: {key} ")
    assert problem in message and "s3cret" not in message


def test_a_storage_error_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^environment JOBD_STORAGE_BACKEND: storage\.dsn "
                                          r"is empty"):
        load(write(tmp_path / "jobd.toml", ""), env={"JOBD_STORAGE_BACKEND": "postgres"})


def test_postgres_without_psycopg_says_how_to_install_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "jobd.toml", POSTGRES)
    # None in sys.modules is how Python marks a module as not importable
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigError) as refused:
        load(path, env={})
    message = str(refused.value)
    assert message.startswith(f'{path}: storage.backend = "postgres" needs psycopg with its '
                              "pool, which cannot be imported (")
    assert message.endswith("): pip install 'jobd[postgres]'") and "\n" not in message
    # a SQLite daemon needs none of it
    assert load(write(tmp_path / "sqlite.toml", ""), env={}).storage.backend == "sqlite"


def test_a_sqlite_file_outside_the_state_dir_is_locked_in_both_folders(tmp_path: Path) -> None:
    from jobd.state import InUse, locked
    shared_db = str(tmp_path / "db" / "jobd.db")
    first = load(write(tmp_path / "a.toml", f'[storage]\nstate_dir = "{tmp_path}/a"\n'),
                 db=shared_db, env={})
    # another state folder, the same database file: refused by the file's folder
    second = load(write(tmp_path / "b.toml", f'[storage]\nstate_dir = "{tmp_path}/b"\n'),
                  db=shared_db, env={})
    # the same state folder, another database: refused by the state folder
    third = load(write(tmp_path / "c.toml", f'[storage]\nstate_dir = "{tmp_path}/a"\n'),
                 db=str(tmp_path / "other" / "jobd.db"), env={})
    with locked(first):
        assert (tmp_path / "a" / "jobd.lock").exists() and (tmp_path / "db" / "jobd.lock").exists()
        with pytest.raises(InUse) as same_file:
            with locked(second):
                pass
        assert str(same_file.value) == (
            f"database {shared_db} is in use by jobd (pid {os.getpid()}); stop it first "
            "(systemctl stop jobd), or give this one a folder of its own (--db)")
        with pytest.raises(InUse) as same_folder:
            with locked(third):
                pass
        assert str(same_folder.value).startswith(
            f"state folder {tmp_path}/a is in use by jobd (pid {os.getpid()}, database "
            f"{shared_db}); ")
        assert str(same_folder.value).endswith("a folder of its own ([storage] state_dir)")
        assert not (tmp_path / "b").exists()  # refused before it made anything
    with locked(second):  # free again once the first let go
        pass
