"""The ``jobd`` command: ``serve`` (also plain ``jobd``), ``db check|backup|recover``,
``config check``, ``version``.

A start-up failure (bad config, a damaged database, a daemon already running, a socket
that cannot be bound) is one line on stderr and exit status 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import click

from jobd import __version__
from jobd.config import Config, ConfigError, load, mask_dsn

__all__ = ["main"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _one_line(text: str) -> str:
    """``text`` on one line: a library's message may have several (libpq puts its hints
    on their own)."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _fail(message: str) -> None:
    click.echo(f"jobd: {_one_line(message)}", err=True)
    sys.exit(1)


def _config(ctx: click.Context) -> Config:
    try:
        return load(**_flags(ctx))
    except ConfigError as e:
        _fail(str(e))
        raise  # unreachable


def _flags(ctx: click.Context) -> dict[str, Any]:
    """The global options given anywhere on the command line (after the command wins)."""
    # ctx.meta is shared by the group's context and the command's; callbacks run in
    # command-line order, so a later option overwrites an earlier one
    return dict(ctx.meta.get(_FLAGS, {}))


_FLAGS = "jobd.flags"


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and param.name:
        ctx.meta.setdefault(_FLAGS, {})[param.name] = value
    return value


def global_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options SPEC §1 lets go anywhere: before the command or after it."""
    options = [
        click.option("--config", "config_file", expose_value=False,
                     callback=_remember, help="Config file (default /etc/jobd/jobd.toml as root, "
                     "else $XDG_CONFIG_HOME/jobd/jobd.toml; env JOBD_CONFIG)."),
        click.option("--socket", expose_value=False, callback=_remember,
                     help="Unix socket to listen on (env JOBD_SOCKET)."),
        click.option("--db", expose_value=False, callback=_remember,
                     help="SQLite database file (env JOBD_DB); unused with [storage] "
                     "backend = \"postgres\"."),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
                     expose_value=False, callback=_remember,
                     help="Log level (env JOBD_LOG_LEVEL; else [server] log_level; default info)."),
        click.option("--log-format", type=click.Choice(["auto", "json", "console"]),
                     expose_value=False, callback=_remember,
                     help="json lines for journald, console for people; auto picks by terminal."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@global_options
@click.version_option(__version__, "--version", prog_name="jobd", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context) -> None:
    """jobd: the job manager daemon of a CIDX server.

    Without a command it serves: JSON-RPC 2.0 over a Unix socket, jobs in SQLite (or
    PostgreSQL: [storage] in the config). The options below also work after the command
    (`jobd serve --db D`).

    \b
    Examples:
      jobd --socket /tmp/jobd.sock --db /tmp/jobd.db   # serve
      jobd db check                                    # integrity check
      jobd db backup /backups/jobd-$(date +%F).db      # safe while serving
    """
    if ctx.invoked_subcommand not in (None, "serve"):
        _release_hangup()
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


def _release_hangup() -> None:
    """A command other than ``serve``: SIGHUP ends it again, one held at start now."""
    held = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if getattr(held, "heard", False):
        os.kill(os.getpid(), signal.SIGHUP)


@main.command()
@global_options
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the daemon until SIGTERM (what systemd starts); SIGHUP reloads the config."""
    from jobd import daemon, logs
    from jobd.errors import JobdError
    from jobd.server import AlreadyRunning
    from jobd.state import InUse
    from jobd.store import StoreError

    config = _config(ctx)
    logs.setup(config.log_level, config.log_format)
    flags = _flags(ctx)
    try:
        code = daemon.run(config, reload=lambda: load(**flags))
    except (AlreadyRunning, InUse, StoreError, OSError, JobdError, ConfigError) as e:
        _fail(str(e))
    # the database is closed and every job recorded: do not wait at exit for a worker
    # thread whose handler ignores stop requests (its processes are already killed)
    sys.stderr.flush()
    os._exit(code)


@main.command()
@global_options
def version() -> None:
    """Print jobd's version."""
    click.echo(f"jobd {__version__}")


@main.group()
@global_options
def db() -> None:
    """Check, back up or recover the database ([storage] in the config, or --db)."""


@db.command("check")
@global_options
@click.pass_context
def db_check(ctx: click.Context) -> None:
    """Check the database: SQLite's integrity_check, or on PostgreSQL the connection, the
    schema version and the counts jobd keeps; exit 1 on a problem (safe while serving)."""
    from jobd.store import StoreError

    config = _config(ctx)
    if config.storage.backend == "postgres":
        from jobd.store.postgres import check as check_postgres
        problems = check_postgres(config.storage.dsn)  # each line names the database
        if not problems:
            click.echo(f"{config.database}: ok")
            return
        for line in problems[:50]:
            click.echo(_one_line(line), err=True)
        _fail(f"{config.database}: the check found problems (above)")
    from jobd.store.tools import check
    try:
        problems = check(config.db)
    except StoreError as e:
        _fail(str(e))
    if problems == ["ok"]:
        click.echo(f"{config.db}: ok")
        return
    for line in problems[:50]:
        click.echo(f"{config.db}: {line}", err=True)
    _fail(f"{config.db}: damaged; stop jobd and run `jobd db recover`")


@db.command("backup")
@global_options
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def db_backup(ctx: click.Context, target: Path) -> None:
    """Copy the database to TARGET, safe while serving: SQLite's online backup, or on
    PostgreSQL pg_dump of jobd's database (custom format: restore with pg_restore)."""
    from jobd.store import StoreError
    from jobd.store.tools import backup, backup_postgres

    config = _config(ctx)
    try:
        size = (backup_postgres(config.storage.dsn, target)
                if config.storage.backend == "postgres" else backup(config.db, target))
    except StoreError as e:
        _fail(str(e))
    click.echo(f"{config.database} -> {target}: {size} bytes")


@db.command("recover")
@global_options
@click.pass_context
def db_recover(ctx: click.Context) -> None:
    """Copy every readable row into a fresh database; keep the damaged file aside.

    SQLite only. Refuses while jobd runs on this database (it holds the state folder's
    lock); on a healthy database it says so and changes nothing. Exit status 1 when rows
    were lost.
    """
    from jobd.state import InUse, locked
    from jobd.store import StoreError
    from jobd.store.tools import check, recover

    config = _config(ctx)
    if config.storage.backend == "postgres":
        _fail("db recover works on a SQLite file only; a PostgreSQL database is repaired "
              "with PostgreSQL's own tools (restore a pg_dump made by `jobd db backup` "
              "with pg_restore); `jobd db check` shows what is wrong")
    path = config.db
    if not path.exists():  # before the lock, which would leave a jobd.lock behind
        _fail(f"{path}: no such database; name the database jobd serves with --db")
    try:
        # a tool on an existing database: it makes no folder
        with locked(config, create=False):
            if check(path) == ["ok"]:
                click.echo(f"{path}: integrity check ok; nothing to recover")
                return
            report = recover(path)
    except InUse as e:
        _fail(f"{e}; recover works on a stopped database only")
    except (StoreError, OSError) as e:
        _fail(str(e))
    lost_any = False
    for table, n in report["saved"].items():
        lost = report["lost"].get(table, 0)
        lost_any = lost_any or lost != 0
        click.echo(f"{table}: saved {n}, lost {lost}")
    click.echo(f"the damaged file is now {report['moved_to']}")
    if lost_any:
        _fail(f"{path}: recovered with losses (above); the damaged file is kept for study")


@main.group("config")
@global_options
def config_group() -> None:
    """Check the config file (see --config)."""


@config_group.command("check")
@global_options
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Load the config as `serve` would: print what is wrong (exit 1), or the effective
    settings, every section and key, with secrets shown as ***."""
    click.echo(effective(_config(ctx)), nl=False)


def _masked_values(value: Any) -> Any:
    """An environment table: its names shown, every value ***."""
    return {name: "***" for name in value} if isinstance(value, dict) else "***"


#: settings whose values are secrets, by (section, key): how each is shown. Keys a
#: config does not have are skipped, so a new secret is one line here.
_SECRETS: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("storage", "dsn"): mask_dsn, ("sync", "index_env"): _masked_values,
    ("types", "env"): _masked_values}


def _toml(value: Any, duration: bool = False) -> str:
    """``value`` as a TOML value; seconds of a duration field as a duration string."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if duration and isinstance(value, (int, float)):
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if value >= size and value % size == 0:
                return f'"{int(value // size)}{unit}"'
        return f'"{value:g}s"'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}"
                                for k, v in value.items()) + " }" if value else "{}"
    return json.dumps(str(value), ensure_ascii=False)


def _section(name: str, values: Any) -> list[str]:
    """The lines of one section (a config dataclass), secrets masked."""
    from jobd.config import Duration
    lines = [f"[{name}]"]
    for field in dataclasses.fields(values):
        value = getattr(values, field.name)
        mask = _SECRETS.get((name.split(".")[0], field.name))
        if mask is not None and value not in (None, "", {}, ()):
            value = mask(value)
        lines.append(f"{field.name} = {_toml(value, isinstance(field.default, Duration))}")
    return lines


def effective(config: Config) -> str:
    """The settings ``config`` holds, TOML-like: where they came from, then each section."""
    source = config.config_file if config.config_file and config.config_file.exists() else None
    if config.storage.backend == "postgres":
        given = f" ({config.db_ignored} given)" if config.db_ignored else ""
        db = f'# db: unused with backend = "postgres"{given}'
    else:
        db = f"db = {_toml(str(config.db))}"
    lines = [f"# {source}" if source else "# no config file: the defaults", "",
             f"socket = {_toml(str(config.socket))}", db,
             f"state_dir = {_toml(str(config.state_dir))}",
             f"log_level = {_toml(config.log_level)}"]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            lines += ["", *_section(field.name, value)]
        elif isinstance(value, dict):  # named tables, such as [types.NAME]
            for name, entry in value.items():
                if dataclasses.is_dataclass(entry):
                    lines += ["", *_section(f"{field.name}.{name}", entry)]
    return "\n".join(lines) + "\n"
