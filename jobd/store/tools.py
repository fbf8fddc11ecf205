"""The offline tools behind ``jobd db check | backup | recover`` (imported only by the CLI).

They work on the file itself, with or without a daemon running (``backup`` reads one
snapshot of a live database; ``recover`` wants the daemon stopped).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from jobd.store.db import connect, create_private, migrate
from jobd.store.errors import StoreError
from jobd.store.sql import MIGRATIONS, QUERIES

__all__ = ["backup", "check", "recover"]

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
    if target.exists():
        raise StoreError(f"{target}: already exists; choose a new file")
    if not target.parent.is_dir():
        raise StoreError(f"{target}: no such folder {target.parent}; create it first")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise StoreError(f"{target}: cannot write in {target.parent} (permission denied)")
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
