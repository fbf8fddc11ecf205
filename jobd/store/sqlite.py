"""The SQLite store: jobs, their events and checkpoints in one file, on ``db.py`` and
``sql/queries.sql``.

The rules of every transition are ``base.BaseStore``'s; this module opens the file
(creating, migrating, checking it after an unclean stop), reads on a connection per
thread, and keeps the queued counts the limits are checked against in memory, kept by the
writer thread (the only one that changes them) and undone with a write that fails.
``seq`` is the rowid.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog

from jobd.state import make_private_dir
from jobd.store.base import (CLEANUP_CHUNK, WEIGHT_BYTES, BaseStore, Listeners, Sweeps, _dumps,
                             now_us)
from jobd.store.db import Checkpointer, SqliteDriver, connect, create_private, migrate
from jobd.store.errors import Corrupt, StoreClosed, StoreError, from_sqlite
from jobd.store.sql import QUERIES
from jobd.store.writer import Tx, Writer

__all__ = ["CLEANUP_CHUNK", "Listeners", "ORDER_KEYS", "SqliteStore", "Store", "WEIGHT_BYTES",
           "now_us"]

log = structlog.get_logger()

#: jobs.list's orders by time: the sort key of each (newest first; -1, no time, sorts last)
ORDER_KEYS = {"created": "seq", "started": "ifnull(started_at, -1)",
              "completed": "ifnull(completed_at, -1)"}


def repaired(text: str | None) -> str | None:
    """``text`` (None: valid as it is) as valid JSON, for migration 3's repair.

    Before numbers were checked, NaN and Infinity could be stored, and every jobs.list page
    holding such a row failed. Python's parser takes them: non-finite numbers become null
    and the rest stays as it was (a string holding "NaN" too). Text that does not parse
    even so becomes ``{"unreadable": "<the text>"}``, so nothing is lost silently.
    """
    if text is None:
        return None
    try:
        value = _finite(json.loads(text))
    except (ValueError, RecursionError):
        value = {"unreadable": text}
    return _dumps(value)


def _finite(value: Any) -> Any:
    """``value`` with every NaN and infinite number replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class SqliteStore(BaseStore):
    """Jobs, their events and checkpoints in one SQLite file."""

    queries = QUERIES
    order_keys = ORDER_KEYS
    _param = ":{}".format
    _integrity = sqlite3.IntegrityError

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "full",
                 clock: Callable[[], int] = now_us, listeners: Listeners | None = None,
                 max_stored_per_user: int | None = None) -> None:
        super().__init__(clock=clock, listeners=listeners,
                         max_stored_per_user=max_stored_per_user)
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._driver: SqliteDriver | None = None
        # queued counts per user, kept by the writer thread (the limits are checked there)
        self._queued: Counter[str] = Counter()
        self._queued_total = 0  # their sum, asked by every submit under max_queued_total

    # -- opening and closing -------------------------------------------------------------

    def open(self) -> SqliteStore:
        """Open (creating if need be), migrate, and check the file after an unclean stop."""
        try:
            make_private_dir(self.path.parent)
        except OSError as e:
            raise StoreError(f"{self.path.parent}: cannot create the database directory: "
                             f"{e.strerror}") from None
        if not os.access(self.path.parent, os.W_OK | os.X_OK):
            raise StoreError(f"{self.path.parent}: no write permission for the database "
                             f"directory (SQLite needs it for its journal)")
        create_private(self.path)
        conn = self._connect()
        try:
            migrate(conn, self.path)
            clean = conn.execute(QUERIES["get_meta"], {"key": "clean"}).fetchone()
            self.was_clean = clean is None or clean[0] == "1"
            if not self.was_clean:
                problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
                if problems != ["ok"]:
                    raise Corrupt(f"{self.path}: the database is damaged ({problems[0].splitlines()[0]}); "
                                  f"stop jobd and run `jobd db recover`")
            conn.execute(QUERIES["set_meta"], {"key": "clean", "value": "0"})
            self._queued = Counter(dict(conn.execute(QUERIES["queued_per_user"])))
            self._queued_total = sum(self._queued.values())
            checkpointer = Checkpointer(self._connect(), Path(f"{self.path}-wal"))
        except sqlite3.DatabaseError as e:
            conn.close()
            raise from_sqlite(e, self.path, opening=True) from None
        except BaseException:
            conn.close()
            raise
        checkpointer.start()
        self._driver = SqliteDriver(conn, self.path, checkpointer)
        self._writer = Writer(self._driver, self.clock)
        self._writer.start()
        return self

    def _connect(self, *, readonly: bool = False) -> sqlite3.Connection:
        return connect(self.path, synchronous=self.synchronous, readonly=readonly)

    def close(self) -> None:
        """Stop the writer after its queue drains, and mark the stop clean."""
        if self._writer is None or self._driver is None:
            return
        writer, driver, self._writer, self._driver = self._writer, self._driver, None, None
        writer.stop()
        driver.checkpointer.stop()
        try:
            driver.conn.execute("PRAGMA optimize")
            driver.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            driver.conn.execute(QUERIES["set_meta"], {"key": "clean", "value": "1"})
        except sqlite3.Error as e:
            log.warning("store_close_incomplete", error=str(e))
        driver.conn.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._local = threading.local()

    def _optimize(self) -> None:
        """Refresh planner statistics, fold the WAL back."""
        self.write(lambda tx: tx.conn.execute("PRAGMA optimize"))
        # a checkpoint cannot run inside the writer's transaction; any connection may run it
        conn = sqlite3.connect(self.path, timeout=10.0)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    # -- what the rules read and count ---------------------------------------------------

    def _read(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(readonly=True)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        return self._read().execute(sql, params or {}).fetchall()

    def _one(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        return self._read().execute(sql, params or {}).fetchone()

    def _duplicate(self, e: Exception, job_id: str) -> Exception:
        assert isinstance(e, sqlite3.Error)
        return from_sqlite(e, self.path, job_id=job_id)

    def _count_queued(self, tx: Tx, user_id: str, delta: int) -> None:
        # applied now (later writes in the same batch must see it), undone if the write fails
        def add(n: int) -> None:
            self._queued[user_id] += n
            self._queued_total += n
        add(delta)
        tx.undo.append(lambda: add(-delta))

    def _queued_in(self, tx: Tx, user_id: str | None) -> int:
        # the counters already hold this batch's changes (a submit asks twice: no hop)
        return self._queued[user_id] if user_id is not None else self._queued_total

    def queued_count(self, user_id: str | None = None) -> int:
        return self._queued[user_id] if user_id is not None else self._queued_total

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal"))
                   if p.exists())

    def _sweeps(self) -> Sweeps:
        if self._driver is None:
            raise StoreClosed()
        return self._driver.checkpointer


#: the backend jobd runs on (``from jobd.store import Store``)
Store = SqliteStore
