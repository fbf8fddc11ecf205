"""The SQLite store: jobs, their events and checkpoints in one file, on ``db.py`` and
``sql/queries.sql``; builtin:manifest's manifests as files beside it
(``<state dir>/manifests/<user>/<project>.json``, ``manifest_file``).

The rules of every transition are ``base.BaseStore``'s; this module opens the file
(creating, migrating, checking it after an unclean stop), reads on a connection per
thread, and keeps the queued counts the limits are checked against in memory, kept by the
writer thread (the only one that changes them) and undone with a write that fails.
``seq`` is the rowid.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog

from jobd.paths import segment
from jobd.state import make_private_dir
from jobd.store.base import (CLEANUP_CHUNK, WEIGHT_BYTES, BaseStore, Listeners, Sweeps, _dumps,
                             now_us)
from jobd.store.db import Checkpointer, SqliteDriver, connect, create_private, migrate
from jobd.store.errors import Corrupt, StoreClosed, StoreError, from_sqlite
from jobd.store.sql import QUERIES
from jobd.store.writer import Tx, Writer

__all__ = ["CLEANUP_CHUNK", "Listeners", "ORDER_KEYS", "SqliteStore", "Store", "WEIGHT_BYTES",
           "manifest_file", "now_us"]

log = structlog.get_logger()

#: jobs.list's orders by time: the sort key of each (newest first; -1, no time, sorts last)
ORDER_KEYS = {"created": "seq", "started": "ifnull(started_at, -1)",
              "completed": "ifnull(completed_at, -1)"}


def repaired(text: str | None) -> str | None:
    """``text`` (None: valid as it is) as valid JSON, for the repairs of migrations 3 and 9.

    Before numbers were checked, NaN and Infinity could be stored, and every jobs.list page
    holding such a row failed. Python's parser takes them: non-finite numbers become null
    and the rest stays as it was (a string holding "NaN" too). Text that does not parse
    even so becomes ``{"unreadable": "<the text>"}``, so nothing is lost silently.
    """
    if text is None:
        return None
    try:
        value = json.loads(text)  # its NaN and infinities become null (``_dumps``)
    except (ValueError, RecursionError):
        value = {"unreadable": text}
    return _dumps(value)


def manifest_file(state_dir: Path, user_id: str, project_id: str) -> Path:
    """``<state dir>/manifests/<user>/<project>.json``: where a SQLite jobd keeps the
    manifest of (``user_id``, ``project_id``), each id one segment as ``paths.segment``
    encodes it (``org/repo`` is ``org%2Frepo.json``). ValueError if an id cannot name one."""
    return _user_manifests(state_dir, user_id) / f"{segment(project_id)}.json"


def _user_manifests(state_dir: Path, user_id: str) -> Path:
    """``<state dir>/manifests/<user>``: the folder of every manifest of ``user_id``."""
    return state_dir / "manifests" / segment(user_id)


class SqliteStore(BaseStore):
    """Jobs, their events and checkpoints in one SQLite file; manifests as files under
    ``state_dir`` (by default the file's folder, as ``Config.state_dir``)."""

    queries = QUERIES
    order_keys = ORDER_KEYS
    _param = ":{}".format
    _integrity = sqlite3.IntegrityError

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "full",
                 clock: Callable[[], int] = now_us, listeners: Listeners | None = None,
                 max_stored_per_user: int | None = None,
                 state_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(clock=clock, listeners=listeners,
                         max_stored_per_user=max_stored_per_user)
        self.path = Path(path)
        self.state_dir = Path(state_dir) if state_dir is not None else self.path.parent
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

    # -- manifests: files, outside the database -----------------------------------------

    def _manifest(self, user_id: str, project_id: str) -> Path:
        try:
            return manifest_file(self.state_dir, user_id, project_id)
        except ValueError as e:
            raise StoreError(f"{user_id!r}/{project_id!r} cannot name a manifest file: {e}"
                             ) from None

    def load_manifest(self, user_id: str, project_id: str) -> str | None:
        """The manifest document of (``user_id``, ``project_id``) (None: none yet); bytes
        that are not UTF-8 are replaced, for the reader to find it unreadable."""
        path = self._manifest(user_id, project_id)
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{path}: cannot read the manifest: {e.strerror}") from None

    def save_manifest(self, job_id: str, user_id: str, project_id: str, document: str
                      ) -> None:
        """Replace the manifest of (``user_id``, ``project_id``) with ``document``: written
        to a temporary file and renamed, so a reader sees the old or the new one, never
        half of one. One jobd owns the file: no fence (``job_id`` names no more)."""
        path = self._manifest(user_id, project_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(document)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise StoreError(f"{path}: cannot write the manifest: {e.strerror}") from None

    def purge_manifests(self, user_id: str) -> None:
        """Delete every manifest of ``user_id`` (admin.purge): its folder."""
        try:
            folder = _user_manifests(self.state_dir, user_id)
        except ValueError:  # an id that names no folder has none
            return
        shutil.rmtree(folder, ignore_errors=True)

    def _sweeps(self) -> Sweeps:
        if self._driver is None:
            raise StoreClosed()
        return self._driver.checkpointer


#: the backend jobd runs on (``from jobd.store import Store``)
Store = SqliteStore
