"""The ``jobd`` command: ``serve`` (also plain ``jobd``), ``db check|backup|recover``, ``version``.

A start-up failure (bad config, a damaged database, a daemon already running, a socket
that cannot be bound) is one line on stderr and exit status 1.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import click

from jobd import __version__
from jobd.config import Config, ConfigError, load

__all__ = ["main"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str) -> None:
    click.echo(f"jobd: {message}", err=True)
    sys.exit(1)


def _answers(path: Path) -> bool:
    """Whether a daemon listens on the socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _config(ctx: click.Context) -> Config:
    try:
        return load(**ctx.obj)
    except ConfigError as e:
        _fail(str(e))
        raise  # unreachable


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="Config file (default /etc/jobd/jobd.toml as root, else "
                   "$XDG_CONFIG_HOME/jobd/jobd.toml; env JOBD_CONFIG).")
@click.option("--socket", help="Unix socket to listen on (env JOBD_SOCKET).")
@click.option("--db", help="SQLite database file (env JOBD_DB).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Log level (env JOBD_LOG_LEVEL; default info).")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]),
              help="json lines for journald, console for people; auto picks by terminal.")
@click.pass_context
def main(ctx: click.Context, **options: Any) -> None:
    """jobd: the job manager daemon of a CIDX server.

    Without a command it serves: JSON-RPC 2.0 over a Unix socket, jobs in SQLite.

    \b
    Examples:
      jobd --socket /tmp/jobd.sock --db /tmp/jobd.db   # serve
      jobd db check                                    # integrity check
      jobd db backup /backups/jobd-$(date +%F).db      # safe while serving
    """
    ctx.obj = {k: v for k, v in options.items() if v is not None}
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@main.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the daemon until SIGTERM (what systemd starts)."""
    from jobd import daemon, logs
    from jobd.errors import JobdError
    from jobd.server import AlreadyRunning
    from jobd.store import StoreError

    config = _config(ctx)
    logs.setup(config.log_level, config.log_format)
    try:
        code = daemon.run(config)
    except (AlreadyRunning, StoreError, OSError, JobdError) as e:
        _fail(str(e))
    # the database is closed and every job recorded: do not wait at exit for a worker
    # thread whose handler ignores stop requests (its processes are already killed)
    sys.stderr.flush()
    os._exit(code)


@main.command()
def version() -> None:
    """Print jobd's version."""
    click.echo(f"jobd {__version__}")


@main.group()
def db() -> None:
    """Check, back up or recover the database (see --db)."""


@db.command("check")
@click.pass_context
def db_check(ctx: click.Context) -> None:
    """Run SQLite's integrity_check; exit 1 if the database is damaged."""
    from jobd.store import StoreError, check

    path = _config(ctx).db
    try:
        problems = check(path)
    except StoreError as e:
        _fail(str(e))
    if problems == ["ok"]:
        click.echo(f"{path}: ok")
        return
    for line in problems[:50]:
        click.echo(f"{path}: {line}", err=True)
    _fail(f"{path}: damaged; stop jobd and run `jobd db recover`")


@db.command("backup")
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def db_backup(ctx: click.Context, target: Path) -> None:
    """Copy the database to TARGET with SQLite's online backup (safe while serving)."""
    from jobd.store import StoreError, backup

    path = _config(ctx).db
    try:
        size = backup(path, target)
    except StoreError as e:
        _fail(str(e))
    click.echo(f"{path} -> {target}: {size} bytes")


@db.command("recover")
@click.pass_context
def db_recover(ctx: click.Context) -> None:
    """Copy every readable row into a fresh database; keep the damaged file aside.

    Stop jobd first.
    """
    from jobd.store import StoreError, recover

    config = _config(ctx)
    path = config.db
    if _answers(config.socket):
        _fail(f"jobd is running on {config.socket}; stop it first (systemctl stop jobd)")
    try:
        report = recover(path)
    except StoreError as e:
        _fail(str(e))
    for table, n in report["saved"].items():
        click.echo(f"{table}: saved {n}, lost {report['lost'].get(table, 0)}")
    click.echo(f"the damaged file is now {report['moved_to']}")
