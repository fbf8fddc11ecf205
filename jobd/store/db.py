"""SQLite plumbing: connections and their pragmas, migrations, the writer's driver, the
checkpointer.

The group-commit loop itself is ``writer.Writer``; ``SqliteDriver`` is its SQLite side
(``BEGIN IMMEDIATE``, savepoints, ``total_changes``, errors by their result code's name).
Reads use a connection per thread and never wait for the writer (WAL). The checkpointer
copies the WAL back off the writer's path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import structlog

from jobd.store import writer
from jobd.store.errors import StoreError, from_sqlite
from jobd.store.interface import FINISHED_KEEP_US
from jobd.store.sql import MIGRATIONS, QUERIES

__all__ = ["Checkpointer", "SqliteDriver", "Tx", "connect", "count_finished",
           "create_private", "migrate"]

log = structlog.get_logger()

#: the page size of a new database. A job's writes change a page of each of several
#: indexes whose keys are random to its age (its id, its user's jobs), and the WAL, its
#: fsync and the checkpoint copy whole pages: 1 KiB pages write a quarter of the bytes of
#: SQLite's 4 KiB for the same entries (a cleanup of 100k jobs among 1M took half the
#: time; README, Performance). Rows past a page (metadata, results) overflow as before.
PAGE_BYTES = 1024


class Tx(writer.Tx):
    """A write's transaction on SQLite: ``run`` takes the names of ``queries.sql``."""

    conn: sqlite3.Connection

    def run(self, query: str, **params: Any) -> sqlite3.Cursor:
        """Run the named query of ``queries.sql`` (``now`` is the transaction's time)."""
        return self.conn.execute(QUERIES[query], dict(params, now=self.now))

    def insert(self, query: str, **params: Any) -> int:
        return self.conn.execute(  # type: ignore[return-value]  # an insert has a rowid
            QUERIES[query], dict(params, now=self.now)).lastrowid


def create_private(path: Path) -> Path:
    """``path``, created empty if need be with mode 0600: a database is the daemon's alone
    (SQLite would make it 0644 less the umask), and its -wal and -shm files take its mode."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    except OSError as e:
        raise StoreError(f"{path}: cannot create the database: {e.strerror}") from None
    return path


def connect(path: Path, *, synchronous: str = "FULL", readonly: bool = False
            ) -> sqlite3.Connection:
    """A connection with jobd's pragmas; the writer's (not ``readonly``) in WAL mode with
    checkpoints left to the ``Checkpointer``."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                               timeout=10.0)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA foreign_keys = ON")
        if readonly:
            conn.execute("PRAGMA query_only = ON")
        else:
            # a new database only (an existing one keeps its pages): see PAGE_BYTES
            conn.execute(f"PRAGMA page_size = {PAGE_BYTES}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{path}: cannot switch to WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute(f"PRAGMA journal_size_limit = {Checkpointer.LIMIT_BYTES}")
    except sqlite3.DatabaseError as e:
        raise from_sqlite(e, path, opening=True) from None
    return conn


def repair_json(conn: sqlite3.Connection) -> None:
    """Migration 3's Python step: make stored options and metadata that SQLite's JSON
    functions refuse valid again (``jobd.store.sqlite.repaired`` says how)."""
    from jobd.store.sqlite import repaired
    for seq, options, metadata in conn.execute(QUERIES["find_broken_json"]).fetchall():
        conn.execute(QUERIES["repair_json"], {"seq": seq, "options": repaired(options),
                                              "metadata": repaired(metadata)})
        log.warning("store_json_repaired", seq=seq)


def repair_results(conn: sqlite3.Connection) -> None:
    """Migration 9's Python step: make stored results that SQLite's JSON functions refuse
    valid again, as ``repair_json`` does options and metadata."""
    from jobd.store.sqlite import repaired
    for seq, result in conn.execute(QUERIES["find_broken_results"]).fetchall():
        conn.execute(QUERIES["repair_result"], {"seq": seq, "result": repaired(result)})
        log.warning("store_json_repaired", seq=seq, column="result")


def count_finished(conn: sqlite3.Connection, now: int | None = None) -> None:
    """Migration 8's Python step, after its SQL: count the stored jobs that ended in the
    35 days before ``now`` (µs) in ``admin.stats``' finished counts, as their ends would
    have been."""
    now = time.time_ns() // 1000 if now is None else now
    conn.execute(QUERIES["count_finished"], {"since": now - FINISHED_KEEP_US})


#: Python run before a migration's SQL, by migration number
PYTHON_STEPS: dict[int, Callable[[sqlite3.Connection], None]] = {3: repair_json,
                                                                9: repair_results}
#: Python run after a migration's SQL, by migration number
PYTHON_AFTER: dict[int, Callable[[sqlite3.Connection], None]] = {8: count_finished}


def migrate(conn: sqlite3.Connection, path: Path, *, to: int = len(MIGRATIONS)) -> None:
    """Apply the migrations ``user_version`` has not counted yet, up to number ``to``
    (``jobd db recover`` stops at its source's schema), each in its own transaction, with
    foreign keys off (a table rebuild drops the old table) and checked before the commit."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(f"{path}: schema version {version} is newer than this jobd "
                         f"knows ({len(MIGRATIONS)}); upgrade jobd")
    if version >= to:
        return
    conn.execute("PRAGMA foreign_keys = OFF")
    try:
        for number, name, script in MIGRATIONS[version:to]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if number in PYTHON_STEPS:
                    PYTHON_STEPS[number](conn)
                for statement in _statements(script):
                    conn.execute(statement)
                if number in PYTHON_AFTER:
                    PYTHON_AFTER[number](conn)
                broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise StoreError(f"{path}: migration {name} left {len(broken)} rows "
                                     f"pointing at no job (first: {broken[0]})")
                conn.execute(f"PRAGMA user_version = {number}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            log.info("store_migrated", path=str(path), version=number, migration=name)
    finally:
        conn.execute("PRAGMA foreign_keys = ON")


def _statements(script: str) -> list[str]:
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    return out


class Checkpointer(threading.Thread):
    """Copies the WAL back into the database file on its own connection.

    Left to itself SQLite checkpoints inside whichever commit takes the WAL past 1000
    pages: that commit, and every write queued behind it, then waits for the copy and its
    fsync. Here the writer only notices the size and wakes this thread, whose passive
    checkpoint never blocks the writer (but for the rest of a pass, below).

    A long sweep (cleanup) holds it off: its commits do not wake it, and between two of
    its chunks, once the WAL has grown by SWEEP_BYTES, the sweep asks for a checkpoint
    (``catch_up``) and waits for it. Run beside the sweep's next chunk, a checkpoint never
    ended before that chunk began, so the WAL could never start over: it grew by every
    chunk (850 MB for a cleanup of 100k jobs at 1M) while the checkpoints copied the same
    pages again and again, and their fsyncs met the chunks' commits. Between chunks, the
    sweep's next transaction starts the WAL over, unless another client's write began
    during the checkpoint (holding writes off for the checkpoint's fsync would stall them
    for 50 ms and more). One checkpoint follows the sweep.

    Under a steady stream of writes a passive checkpoint never ends with the WAL wholly
    copied (the writer committed more meanwhile), and a WAL that is not wholly copied
    cannot start over: it grew without bound (110 MB in 30 s of end-to-end jobs), each
    commit appending to new file space, whose fdatasync also writes the file's size.
    So once a pass has ended having copied all it found, the writer copies the rest
    itself between two batches (``committed``): only what was committed during the pass
    (a few milliseconds' work), after which its next write starts the WAL over.
    """

    #: the WAL size that starts a checkpoint: each costs two fsyncs, and copies each page
    #: once however often the WAL holds it (a job's writes change the same index and count
    #: pages as its neighbours'), so a larger bound copies less per job (4 MB cost the
    #: checkpointer twice the CPU per job of 16 MB)
    START_BYTES = 16 << 20
    #: the size the WAL is cut back to when it restarts after a complete checkpoint
    LIMIT_BYTES = 1 << 20
    #: the WAL growth after which a sweep waits for a checkpoint between two chunks
    SWEEP_BYTES = 40 << 20

    def __init__(self, conn: sqlite3.Connection, wal: Path) -> None:
        super().__init__(name="jobd-store-checkpointer", daemon=True)
        self.conn = conn
        self.wal = wal
        self._wal_name = str(wal)  # looked at after every commit: no Path work each time
        self.wake = threading.Event()
        self.stopping = False
        self._holds = 0
        self._lock = threading.Lock()
        # checkpoints begun and ended, for a catch_up to wait for one begun after it asked
        self._runs = threading.Condition()
        self._begun = self._ended = 0
        #: the WAL's size after a sweep's last checkpoint
        self._swept = 0
        #: a pass has ended: the writer copies what was committed meanwhile (``committed``)
        self.passed = False

    def _wal_bytes(self) -> int:
        try:
            return os.stat(self._wal_name).st_size
        except OSError:  # never stop the writer over a size
            return 0

    def committed(self, conn: sqlite3.Connection) -> None:
        """After each commit, on the writer's connection (``conn``), between two batches;
        not during a sweep, which asks for its own checkpoints.

        Once a pass has ended having copied all it found, copy what was committed during
        it: no commit can come in between, so the next write starts the WAL over. Tried
        again after the next batch while another checkpoint runs, and no other pass
        starts meanwhile: started after every commit while the WAL is past its bound,
        passes would run back to back, and one running holds the restart off. Otherwise,
        start a pass once the WAL has grown past its bound."""
        if self._holds:
            return
        if self.passed:
            if self._begun != self._ended:
                return
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as e:
                log.warning("store_checkpoint_failed", error=str(e))
                return
            # another checkpoint was running: again after the next batch. (Left short by
            # a reader's snapshot, the WAL goes on to the next pass.)
            self.passed = bool(busy)
        elif self._wal_bytes() >= self.START_BYTES:
            self.wake.set()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold checkpoints off meanwhile, but for those asked by ``catch_up``; one follows."""
        with self._lock:
            self._holds += 1
        try:
            yield
        finally:
            with self._lock:
                self._holds -= 1
            self.wake.set()

    def catch_up(self) -> None:
        """Between two writes of a sweep: once the WAL has grown by SWEEP_BYTES since the
        last, checkpoint and wait for it, so that the sweep's next transaction can start
        the WAL over. (Not after every chunk once past the bound: a WAL that could not
        start over would then cost a checkpoint, and its fsync, per chunk.)"""
        size = self._wal_bytes()
        if size < self._swept:  # it started over
            self._swept = 0
        if size - self._swept < self.SWEEP_BYTES or not self.is_alive():
            return
        with self._runs:
            wanted = self._begun + 1
            self.wake.set()
            self._runs.wait_for(lambda: self._ended >= wanted or self.stopping, timeout=10.0)
        self._swept = self._wal_bytes()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.join()
        self.conn.close()

    def run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.stopping:
                with self._runs:
                    self._runs.notify_all()
                return
            with self._runs:
                self._begun += 1
            try:
                # (busy, frames in the WAL, frames copied): the rest for the writer is only
                # what was committed during the pass if the pass copied all it found (a
                # reader's snapshot left nothing larger for the writer to take over)
                _, frames, copied = self.conn.execute(
                    "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.passed = frames >= 0 and copied == frames
            except sqlite3.Error as e:
                log.warning("store_checkpoint_failed", error=str(e))
            with self._runs:
                self._ended += 1
                self._runs.notify_all()


class SqliteDriver:
    """The writer's side of SQLite (``writer.Driver``), on the one write connection."""

    error: type[Exception] = sqlite3.Error

    def __init__(self, conn: sqlite3.Connection, path: Path,
                 checkpointer: Checkpointer) -> None:
        self.conn = conn
        self.path = path
        self.checkpointer = checkpointer
        # read once per write: C-level callables, no Python frame on the commit path
        self.changes: Callable[[], int] = functools.partial(getattr, conn, "total_changes")
        self.commit: Callable[[], object] = functools.partial(conn.execute, "COMMIT")
        self.savepoint: Callable[[], object] = functools.partial(conn.execute, "SAVEPOINT op")
        self.rollback_to_savepoint: Callable[[], object] = functools.partial(
            conn.execute, "ROLLBACK TO op")
        self.release: Callable[[], object] = functools.partial(conn.execute, "RELEASE op")
        self._begin = functools.partial(conn.execute, "BEGIN IMMEDIATE")
        #: after each commit's hooks (once per commit, not per write)
        self.committed: Callable[[], object] = functools.partial(checkpointer.committed, conn)

    def begin(self, now: int) -> Tx:
        self._begin()
        return Tx(self.conn, now)

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def ended(self, e: Exception) -> bool:
        return not self.conn.in_transaction  # SQLite rolled back the whole transaction

    def again(self, e: Exception) -> bool:
        return False  # one writer: nothing to wait out by running again

    def mapped(self, e: Exception) -> Exception:
        assert isinstance(e, sqlite3.Error)
        return from_sqlite(e, self.path)
