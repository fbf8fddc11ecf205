"""The offline tools behind ``jobd db check | backup | recover`` (imported only by the CLI).

On SQLite they work on the file itself, with or without a daemon running (``backup``
reads one snapshot of a live database; ``recover`` wants the daemon stopped). On
PostgreSQL (SPEC §11) ``backup_postgres`` runs ``pg_dump`` beside running nodes (the
check is ``postgres.check``, beside the schema it checks); ``recover`` is SQLite's alone.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from jobd.config import mask_dsn
from jobd.store.db import connect, create_private, migrate
from jobd.store.errors import StoreError
from jobd.store.sql import MIGRATIONS, QUERIES

__all__ = ["backup", "backup_postgres", "check", "recover"]

#: where Debian's postgresql-client-<version> packages put pg_dump, when it is not on PATH
PG_BINDIRS = "/usr/lib/postgresql/*/bin"


def check(path: Path) -> list[str]:
    """``PRAGMA integrity_check``: ``["ok"]`` or the problems found."""
    if not path.exists():
        raise StoreError(f"{path}: no such database")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return [r[0] for r in conn.execute("PRAGMA integrity_check")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        return [str(e)]


def backup(path: Path, target: Path) -> int:
    """Copy a live database with SQLite's online backup API; returns the bytes written."""
    if not path.exists():
        raise StoreError(f"{path}: no such database")
    _check_target(target)
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        # a copy of every job's options and results: the daemon's alone, as its database
        dst = sqlite3.connect(create_private(target))
    except sqlite3.Error as e:
        raise StoreError(f"{target}: cannot back up {path} there: {e}") from None
    try:
        # one step, from one read snapshot: copied in slices, a backup starts over after
        # every commit of the live daemon and never ends on a busy database
        src.backup(dst)
    except sqlite3.Error as e:
        dst.close()
        target.unlink(missing_ok=True)
        raise StoreError(f"{path}: backup to {target} failed: {e}") from None
    finally:
        src.close()
    dst.close()
    return target.stat().st_size


def _check_target(target: Path) -> None:
    """Refuse a backup target that exists or whose folder cannot take it."""
    if target.exists():
        raise StoreError(f"{target}: already exists; choose a new file")
    if not target.parent.is_dir():
        raise StoreError(f"{target}: no such folder {target.parent}; create it first")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise StoreError(f"{target}: cannot write in {target.parent} (permission denied)")


def recover(path: Path) -> dict[str, Any]:
    """Copy every readable row into a fresh database and move the damaged file aside.

    Returns ``{"saved": {table: rows}, "lost": {table: rows or "unknown"}, "moved_to": path}``.
    """
    if not path.exists():
        raise StoreError(f"{path}: no such database")
    fresh = path.with_name(path.name + ".recovering")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{fresh}{suffix}").unlink(missing_ok=True)
    saved: dict[str, int] = {}
    lost: dict[str, Any] = {}
    totals: dict[str, int | str] = {}
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: cannot be opened at all: {e}") from None
    try:
        version = src.execute("PRAGMA user_version").fetchone()[0] or len(MIGRATIONS)
    except sqlite3.DatabaseError:
        version = len(MIGRATIONS)
    # the fresh file takes the rows at their own schema, then the later migrations run on
    # them as an upgrade would (repairing rows a later schema refuses, not dropping them)
    dst = connect(create_private(fresh))
    migrate(dst, fresh, to=min(version, len(MIGRATIONS)))
    dst.execute("PRAGMA foreign_keys = OFF")
    # what the store keeps beside the jobs, where the source's schema has it: the folded
    # submits' keys and the finished counts (their daily sums come back by trigger)
    new_columns = {t: [r[1] for r in dst.execute(f"PRAGMA table_info({t})")]
                   for t in ("jobs", "job_events", "job_checkpoints", "meta", "job_keys",
                             "finished_hours")}
    for table, columns in new_columns.items():
        if not columns:  # a table of a later schema than the source's
            continue
        saved[table] = 0
        try:
            old_columns = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
            cols = [c for c in columns if c in old_columns]
            total = totals[table] = _safe_count(src, table)
            key = "seq" if table == "jobs" else "rowid" if table == "job_events" else None
            rows = _readable_rows(src, table, cols, key)
            names = ", ".join(cols)
            dst.execute("BEGIN")
            for row in rows:
                try:
                    saved[table] += dst.execute(
                        f"INSERT OR IGNORE INTO {table} ({names}) VALUES "
                        f"({', '.join('?' * len(cols))})", row).rowcount
                except sqlite3.Error:
                    pass
            dst.execute("COMMIT")
            lost[table] = (total - saved[table]) if isinstance(total, int) else "unknown"
        except sqlite3.DatabaseError as e:
            if dst.in_transaction:
                dst.execute("COMMIT")
            lost[table] = f"unknown ({e})"
    src.close()
    # orphans whose job was lost are no use without it: they count as lost
    for table in ("job_events", "job_checkpoints", "job_keys"):
        if not new_columns[table]:
            continue
        dst.execute(f"DELETE FROM {table} WHERE job NOT IN (SELECT seq FROM jobs)")
        saved[table] = dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        before = totals.get(table)
        if isinstance(before, int):
            lost[table] = before - saved[table]
    migrate(dst, fresh)
    # the weights are kept by triggers on changes, never on an insert (the status counts
    # are, and were kept by the copy)
    dst.execute(QUERIES["restore_user_stored"])
    dst.execute(QUERIES["set_meta"], {"key": "clean", "value": "1"})
    dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    dst.close()
    stamp = time.strftime('%Y%m%dT%H%M%S')
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():  # recovered twice within a second
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    # the damaged file stays where jobd looks until the fresh one replaces it in one
    # rename: killed in between, the recovery leaves a database there, never none (which
    # a start would take for a new install and create empty); its WAL goes aside first,
    # so that the fresh file never meets it
    os.link(path, aside)
    for suffix in ("-wal", "-shm"):
        p = Path(f"{path}{suffix}")
        if p.exists():
            os.replace(p, f"{aside}{suffix}")
    os.replace(fresh, path)
    for suffix in ("-wal", "-shm"):
        Path(f"{fresh}{suffix}").unlink(missing_ok=True)
    return {"saved": saved, "lost": lost, "moved_to": str(aside)}


def _safe_count(conn: sqlite3.Connection, table: str) -> int | str:
    """How many rows ``table`` held: the higher count of its table scan and of an index.

    Either may be damaged; an index still counts the rows of a damaged table page.
    """
    counts = []
    for how in ("NOT INDEXED", ""):
        try:
            counts.append(conn.execute(f"SELECT count(*) FROM {table} {how}").fetchone()[0])
        except sqlite3.DatabaseError:
            pass
    return max(counts) if counts else "unknown"


def _readable_rows(conn: sqlite3.Connection, table: str, cols: list[str],
                   key: str | None) -> Iterator[tuple[Any, ...]]:
    """Every row that can be read, stepping over damaged pages by key where possible."""
    # NOT INDEXED: rows are read from the table's own b-tree, never through an index,
    # which may be the damaged part
    names = ", ".join(cols)
    if key is None:
        try:
            yield from conn.execute(f"SELECT {names} FROM {table} NOT INDEXED").fetchall()
        except sqlite3.DatabaseError:
            return
        return
    select = f"SELECT {key}, {names} FROM {table} NOT INDEXED WHERE {key} >= ? ORDER BY {key}"
    after, failures = -(1 << 63), 0
    while True:
        try:
            for row in conn.execute(select, (after,)):
                after, failures = row[0] + 1, 0
                yield row[1:]
            return
        except sqlite3.DatabaseError:
            # the page holding ``after`` (or the next one) is damaged: step over it a key at
            # a time, so that no readable row is skipped, then in growing strides across a
            # long damaged range
            failures += 1
            after += 1 if failures <= 1024 else 1 << min(failures - 1024, 62)
            if after >= 1 << 63:
                return


# -- PostgreSQL ------------------------------------------------------------------------------

def _program(name: str) -> str:
    """The path of PostgreSQL's client program ``name``: on PATH, else the newest of
    Debian's version folders; StoreError when there is none."""
    found = shutil.which(name)
    if found:
        return found
    # "9.6" < "15": compare the version folder's numbers, not its text
    versions = sorted((p for p in glob.glob(f"{PG_BINDIRS}/{name}") if os.access(p, os.X_OK)),
                      key=lambda p: [int(n) for n in re.findall(r"\d+", Path(p).parent.parent.name)])
    if not versions:
        raise StoreError(f"{name} not found on PATH nor in {PG_BINDIRS}: install PostgreSQL's "
                         "client programs (apt-get install postgresql-client), as new as the "
                         "server")
    return versions[-1]


def backup_postgres(dsn: str, target: Path) -> int:
    """``pg_dump`` of jobd's database into ``target`` (custom format, for ``pg_restore``),
    from one snapshot of the live database; returns the bytes written.

    The whole database, not ``--table`` by table: a table dump leaves out the functions
    its triggers call (they keep the counts), so it does not restore by itself; jobd is
    given a database of its own (README: PostgreSQL).
    """
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    _check_target(target)
    pg_dump = _program("pg_dump")
    params = conninfo_to_dict(dsn)
    # the password goes by the environment: a command line is readable by every user
    password = params.pop("password", None)
    env = {**os.environ, **({"PGPASSWORD": str(password)} if password else {})}
    partial = target.with_name(f".{target.name}.partial")
    # made first, 0600: the dump holds every job's options and results
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    try:
        proc = subprocess.run(
            [pg_dump, "--format=custom", "--no-password", f"--file={partial}",
             f"--dbname={make_conninfo('', **params)}"],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [re.sub(r"^pg_dump: (error: )?", "", line.strip())
                     for line in proc.stderr.strip().splitlines()[-3:]]
            why = " ".join(lines) or f"exit status {proc.returncode}"
            raise StoreError(f"{mask_dsn(dsn)}: pg_dump failed: {why}")
        _check_target(target)  # again: the dump may have taken long
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target.stat().st_size
