"""SQLite plumbing: connections and their pragmas, migrations, the writer, the checkpointer.

One writer thread owns the one write connection and commits whatever writes are waiting
in one transaction (group commit: with ``synchronous=full`` one fsync covers many
submissions); no caller is answered before the commit that holds its write. A batch runs
plainly; a write refused before it wrote (a lost compare-and-set, a rule) is simply
answered with its error, and only when one raises after writing is the batch rolled back
and run again with a savepoint per write, so that one refused change does not undo its
neighbours and savepoints cost nothing while none is needed. The answers of writes
submitted from an asyncio loop are handed back with one ``call_soon_threadsafe`` per
commit, not one wake-up of the loop per write. Reads use a connection per thread and
never wait for the writer (WAL). The checkpointer copies the WAL back off the writer's
path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import structlog

from jobd.store.errors import StoreClosed, StoreError, from_sqlite
from jobd.store.interface import FINISHED_KEEP_US
from jobd.store.sql import MIGRATIONS, QUERIES

__all__ = ["Checkpointer", "Tx", "Writer", "connect", "count_finished", "create_private",
           "migrate"]

log = structlog.get_logger()
T = TypeVar("T")

#: a write: run on the writer's connection inside its transaction
Write = Callable[["Tx"], Any]


@dataclasses.dataclass
class Tx:
    """What a write sees: the connection, the transaction's time, and hooks that run once
    the commit holds."""

    conn: sqlite3.Connection
    now: int
    after_commit: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    #: reverts in-memory changes made by a write whose savepoint (or commit) failed
    undo: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    #: the last state of each row the transaction's writes changed, by key (the store
    #: tells its listener of a job once per commit, as the commit leaves it)
    latest: dict[Any, Any] = dataclasses.field(default_factory=dict)

    def run(self, query: str, **params: Any) -> sqlite3.Cursor:
        """Run the named query of ``queries.sql`` (``now`` is the transaction's time)."""
        return self.conn.execute(QUERIES[query], dict(params, now=self.now))

    def rollback_to(self, hooks: int, undos: int) -> None:
        for fn in reversed(self.undo[undos:]):
            fn()
        del self.after_commit[hooks:], self.undo[undos:]


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


def count_finished(conn: sqlite3.Connection, now: int | None = None) -> None:
    """Migration 8's Python step, after its SQL: count the stored jobs that ended in the
    35 days before ``now`` (µs) in ``admin.stats``' finished counts, as their ends would
    have been."""
    now = time.time_ns() // 1000 if now is None else now
    conn.execute(QUERIES["count_finished"], {"since": now - FINISHED_KEEP_US})


#: Python run before a migration's SQL, by migration number
PYTHON_STEPS: dict[int, Callable[[sqlite3.Connection], None]] = {3: repair_json}
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
    fsync. Here the writer only notices the size and wakes this thread; a passive
    checkpoint never blocks the writer.

    A long sweep (cleanup) holds it off: its commits do not wake it, and between two of
    its chunks, once the WAL has grown by SWEEP_BYTES, the sweep asks for a checkpoint
    (``catch_up``) and waits for it. Run beside the sweep's next chunk, a checkpoint never
    ended before that chunk began, so the WAL could never start over: it grew by every
    chunk (850 MB for a cleanup of 100k jobs at 1M) while the checkpoints copied the same
    pages again and again, and their fsyncs met the chunks' commits. Between chunks, the
    sweep's next transaction starts the WAL over, unless another client's write began
    during the checkpoint (holding writes off for the checkpoint's fsync would stall them
    for 50 ms and more). One checkpoint follows the sweep.
    """

    #: the WAL size that starts a checkpoint
    START_BYTES = 4 << 20
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

    def _wal_bytes(self) -> int:
        try:
            return os.stat(self._wal_name).st_size
        except OSError:  # never stop the writer over a size
            return 0

    def poke(self) -> None:
        """After a commit: start a checkpoint once the WAL has grown past its bound (not
        during a sweep, which asks for its own)."""
        if not self._holds and self._wal_bytes() >= self.START_BYTES:
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
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as e:
                log.warning("store_checkpoint_failed", error=str(e))
            with self._runs:
                self._ended += 1
                self._runs.notify_all()


class _LoopAnswer:
    """Where the answer of a write submitted on an asyncio loop goes: its future there.
    The writer resolves every such answer of one commit in one hop onto the loop."""

    __slots__ = ("loop", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()

    def set_running_or_notify_cancel(self) -> bool:
        return True  # a caller gone meanwhile is seen when answered (``_resolve``)

    def done(self) -> bool:
        return False


#: a write's answer: a concurrent future (any thread) or a future on an asyncio loop
Answer = concurrent.futures.Future[Any] | _LoopAnswer


def _answer(answers: list[tuple[Answer, Any, BaseException | None]]) -> None:
    """Hand each answer to its future: those on a loop first, in one
    ``call_soon_threadsafe`` per loop (the loop answers its clients meanwhile), then the
    concurrent ones (their callbacks run here)."""
    on_loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any,
                                                          BaseException | None]]] = {}
    others: list[tuple[concurrent.futures.Future[Any], Any, BaseException | None]] = []
    for fut, value, exc in answers:
        if isinstance(fut, _LoopAnswer):
            on_loops.setdefault(fut.loop, []).append((fut.future, value, exc))
        else:
            others.append((fut, value, exc))
    for loop, items in on_loops.items():
        try:
            loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:  # the loop is closed: no one is left to answer
            pass
    for fut, value, exc in others:
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)


def _resolve(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """On the loop: resolve the futures of one commit's writes."""
    for fut, value, exc in items:
        if fut.cancelled():  # the caller went away (its connection closed)
            continue
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)


class Writer(threading.Thread):
    """Runs writes in order on the one write connection, many per transaction."""

    MAX_BATCH = 512

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Callable[[], int],
                 checkpointer: Checkpointer) -> None:
        super().__init__(name="jobd-store-writer", daemon=True)
        self.conn = conn
        self.path = path
        self.clock = clock
        self.checkpointer = checkpointer
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.longest_tx_s = 0.0
        # a write queued behind stop()'s end mark would wait for ever: submit and stop
        # take turns, and no write is queued once the mark is
        self._closing = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[[Tx], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._put(fn, fut)
        return fut

    def submit_on(self, loop: asyncio.AbstractEventLoop, fn: Callable[[Tx], T]
                  ) -> asyncio.Future[T]:
        """``submit`` for a caller on ``loop`` (its thread): the future is the loop's."""
        answer = _LoopAnswer(loop)
        self._put(fn, answer)
        return answer.future

    def _put(self, fn: Callable[[Tx], Any], fut: Answer) -> None:
        with self._closing:
            if self._closed:
                raise StoreClosed()
            self.queue.put((fn, fut))

    def stop(self) -> None:
        with self._closing:
            self._closed = True
            self.queue.put(None)
        self.join()

    def run(self) -> None:
        stopping = False
        while not stopping:
            item = self.queue.get()
            batch = []
            while item is not None:
                batch.append(item)
                if len(batch) >= self.MAX_BATCH:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            else:
                stopping = True
            live = [(fn, fut) for fn, fut in batch if fut.set_running_or_notify_cancel()]
            if live:
                self._commit(live)

    def _commit(self, batch: list[tuple[Write, Answer]]) -> None:
        conn = self.conn
        now = self.clock()
        started = time.perf_counter()
        tx: Tx | None = None
        try:
            attempt = self._run(batch, now, savepoints=False)
            if attempt is None:  # a write was refused: again, each in its own savepoint
                attempt = self._run(batch, now, savepoints=True)
            assert attempt is not None
            tx, outcomes = attempt
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error as again:
                # the writer must live on: the next BEGIN finds out whether the file recovered
                log.error("store_rollback_failed", error=str(again))
            if tx is not None:
                tx.rollback_to(0, 0)
            failure = from_sqlite(e, self.path)
            log.error("store_write_failed", error=str(e), writes=len(batch))
            _answer([(fut, None, failure) for _, fut in batch if not fut.done()])
            return
        finally:
            self.longest_tx_s = max(self.longest_tx_s, time.perf_counter() - started)
        for hook in tx.after_commit:
            try:
                hook()
            except Exception:  # a listener's bug must not stall the writer
                log.exception("store_listener_failed")
        _answer(outcomes)
        self.checkpointer.poke()

    def _run(self, batch: list[tuple[Write, Answer]], now: int, *,
             savepoints: bool) -> tuple[Tx, list[tuple[Any, Any, BaseException | None]]] | None:
        """Run ``batch`` in a new transaction, left open for the commit. A write refused
        before it wrote anything (a compare-and-set that matched no row, a rule) leaves
        nothing to undo: its error is kept for its caller and the batch goes on. Without
        ``savepoints``: None (all rolled back) as soon as a write raises after writing.
        With them: such a write is undone alone and its error kept. A failure that ended
        the transaction itself (disk full, I/O) is raised."""
        conn = self.conn
        tx = Tx(conn, now)
        outcomes: list[tuple[Any, Any, BaseException | None]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for fn, fut in batch:
                marks = len(tx.after_commit), len(tx.undo)
                changes = conn.total_changes
                if savepoints:
                    conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((fut, fn(tx), None))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    if isinstance(e, sqlite3.Error):
                        if not conn.in_transaction:
                            raise  # SQLite rolled back the whole transaction
                        e = from_sqlite(e, self.path)
                    if not savepoints and conn.total_changes == changes and marks == (
                            len(tx.after_commit), len(tx.undo)):
                        outcomes.append((fut, None, e))  # refused before it wrote
                        continue
                    if not savepoints:
                        conn.execute("ROLLBACK")
                        tx.rollback_to(0, 0)
                        return None
                    conn.execute("ROLLBACK TO op")
                    tx.rollback_to(*marks)
                    outcomes.append((fut, None, e))
                if savepoints:
                    conn.execute("RELEASE op")
        except BaseException:
            tx.rollback_to(0, 0)
            raise
        return tx, outcomes
