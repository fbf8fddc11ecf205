"""The offline tools behind ``jobd db check | backup | recover`` (imported only by the CLI).

On SQLite they work on the file itself, with or without a daemon running (``backup``
reads one snapshot of a live database; ``recover`` wants the daemon stopped). On
PostgreSQL (SPEC §11) ``check_postgres`` connects and reads the schema version and
jobd's invariants that no constraint holds (the counts kept beside the jobs, rows of
gone jobs), and ``backup_postgres`` runs ``pg_dump`` on jobd's schema; both work beside
running nodes, and both import psycopg only when called. ``recover`` is SQLite's alone.
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

__all__ = ["backup", "backup_postgres", "check", "check_postgres", "recover"]

#: where Debian's postgresql-client-<version> packages put pg_dump, when it is not on PATH
PG_BINDIRS = "/usr/lib/postgresql/*/bin"
#: how long a connection to PostgreSQL may take to open, in seconds
CONNECT_TIMEOUT = 10

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
        dst = sqlite3.connect(target)
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
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{path}{suffix}")
        if p.exists():
            shutil.move(p, f"{aside}{suffix}")
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

def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _pg_connect(dsn: str) -> Any:
    """A read-only connection to jobd's PostgreSQL database, or StoreError saying why not."""
    import psycopg
    try:
        conn = psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT)
    except psycopg.Error as e:
        raise StoreError(f"{mask_dsn(dsn)}: cannot connect to PostgreSQL: {_first_line(e)}; "
                         "check the dsn and that the server runs") from None
    # every check reads one snapshot, and none can write
    conn.read_only = True
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    return conn


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
    """``pg_dump`` of jobd's tables into ``target`` (custom format, for ``pg_restore``),
    from one snapshot of the live database; returns the bytes written."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    _check_target(target)
    pg_dump = _program("pg_dump")
    params = conninfo_to_dict(dsn)
    # the password goes by the environment: a command line is readable by every user
    password = params.pop("password", None)
    env = {**os.environ, **({"PGPASSWORD": str(password)} if password else {})}
    partial = target.with_name(f".{target.name}.partial")
    # made first, 0600: the dump holds every job's options and output
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    try:
        proc = subprocess.run(
            [pg_dump, "--format=custom", "--no-password", f"--file={partial}",
             *_JOBD_OBJECTS, f"--dbname={make_conninfo(**params)}"],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [re.sub(r"^pg_dump: (error: )?", "", line)
                     for line in proc.stderr.strip().splitlines()[-3:]]
            why = " ".join(lines) or f"exit status {proc.returncode}"
            raise StoreError(f"{mask_dsn(dsn)}: pg_dump failed: {why}")
        _check_target(target)  # again: the dump may have taken long
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target.stat().st_size


#: jobd's invariants that no constraint holds, as (what a row of the query means, the
#: query): the counts kept beside the jobs by triggers (which a restore with triggers off,
#: or session_replication_role = replica, skips), and rows whose job is gone (foreign keys
#: are triggers too). Each query returns the offending rows, at most a few.
_PG_INVARIANTS: tuple[tuple[str, str], ...] = (
    ("job_events: {} events of job seq {} that has no job row",
     "SELECT count(*), e.job FROM job_events e WHERE NOT EXISTS "
     "(SELECT 1 FROM jobs j WHERE j.seq = e.job) GROUP BY e.job LIMIT 5"),
    ("job_checkpoints: {} checkpoints of job seq {} that has no job row",
     "SELECT count(*), c.job FROM job_checkpoints c WHERE NOT EXISTS "
     "(SELECT 1 FROM jobs j WHERE j.seq = c.job) GROUP BY c.job LIMIT 5"),
    ("job_keys: {} idempotency keys of job seq {} that has no job row",
     "SELECT count(*), k.job FROM job_keys k WHERE NOT EXISTS "
     "(SELECT 1 FROM jobs j WHERE j.seq = k.job) GROUP BY k.job LIMIT 5"),
    ("type_counts: type {} status {} counts {} jobs, but {} are stored",
     "SELECT coalesce(c.type, j.type), coalesce(c.status, j.status), coalesce(c.n, 0), "
     "coalesce(j.n, 0) FROM type_counts c FULL JOIN "
     "(SELECT type, status, count(*) AS n FROM jobs GROUP BY type, status) j "
     "ON (c.type, c.status) = (j.type, j.status) "
     "WHERE coalesce(c.n, 0) <> coalesce(j.n, 0) LIMIT 5"),
    ("user_stored: user {} weighs {} finished jobs, but theirs weigh {}",
     "SELECT coalesce(s.user_id, j.user_id), coalesce(s.weight, 0), coalesce(j.weight, 0) "
     "FROM user_stored s FULL JOIN (SELECT user_id, sum(weight) AS weight FROM jobs "
     "WHERE status IN ('completed', 'failed', 'cancelled') GROUP BY user_id) j "
     "ON s.user_id = j.user_id WHERE coalesce(s.weight, 0) <> coalesce(j.weight, 0) LIMIT 5"),
)


def check_postgres(dsn: str) -> list[str]:
    """Connect, read the schema version, check jobd's invariants: ``["ok"]`` or the
    problems found, each a line saying what is wrong."""
    import psycopg

    from jobd.store.sql.postgres import MIGRATIONS as PG_MIGRATIONS

    known = len(PG_MIGRATIONS)
    with _pg_connect(dsn) as conn:
        try:
            version = _pg_schema_version(conn)
            if version is None:
                return ["no jobd schema in this database: check the dsn's dbname (jobd "
                        "makes its tables at its first start)"]
            if version > known:
                return [f"schema version {version} is newer than this jobd's ({known}): "
                        "check it with the newer jobd that migrated it"]
            problems = []
            if version < known:
                # its tables are not all this jobd's yet: the invariants may not hold
                return [f"schema version {version} is older than this jobd's ({known}): "
                        "`jobd serve` migrates it at start; check it with the jobd that "
                        "runs on it"]
            for what, query in _PG_INVARIANTS:
                problems += [what.format(*row) for row in conn.execute(query)]
        except psycopg.Error as e:
            raise StoreError(f"{mask_dsn(dsn)}: the check failed: {_first_line(e)}") from None
    return problems or ["ok"]
