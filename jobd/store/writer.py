"""The writer: group commit of the store's writes, over a backend's small driver.

One writer thread owns the one write connection and commits whatever writes are waiting
in one transaction (group commit: one durable commit covers many submissions); no caller
is answered before the commit that holds its write. A batch runs plainly; a write refused
before it wrote (a lost compare-and-set, a rule) is simply answered with its error, and
only when one raises after writing is the batch rolled back and run again with a
savepoint per write, so that one refused change does not undo its neighbours and
savepoints cost nothing while none is needed. A failure the backend says is passing
(a deadlock between two writers of one database) runs the whole batch again. The writes
queued while a batch's transaction began join it (a cluster node's begin waits for the
queue lock other nodes hold). The answers of writes submitted from an asyncio loop are
handed back with one ``call_soon_threadsafe`` per commit, not one wake-up of the loop per
write.

A backend gives the writer a ``Driver`` (``db.SqliteDriver``, ``postgres.PgDriver``):
its transaction control, how many rows its connection has changed, and which of its
errors are which. Nothing else here knows a backend.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Protocol, TypeVar

import structlog

from jobd.metrics import WRITE_BUCKETS, Histogram
from jobd.store.errors import StoreClosed

__all__ = ["Driver", "Tx", "Writer"]

log = structlog.get_logger()
T = TypeVar("T")

#: a write: run on the writer's connection inside its transaction
Write = Callable[["Tx"], Any]


@dataclasses.dataclass
class Tx(abc.ABC):
    """What a write sees: the connection, the transaction's time, and hooks that run once
    the commit holds. Each backend's subclass runs its own named queries (``run``)."""

    conn: Any
    now: int
    after_commit: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    #: reverts in-memory changes made by a write whose savepoint (or commit) failed
    undo: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    #: the last state of each row the transaction's writes changed, by key (the store
    #: tells its listener of a job once per commit, as the commit leaves it)
    latest: dict[Any, Any] = dataclasses.field(default_factory=dict)

    @property
    def version(self) -> int:
        """What a job's version is at least after a change in this transaction: its time
        (SQLite; PostgreSQL's is a value of the versions sequence)."""
        return self.now

    @abc.abstractmethod
    def run(self, query: str, **params: Any) -> Any:
        """Run the named query (``now`` is the transaction's time); its cursor."""

    @abc.abstractmethod
    def insert(self, query: str, **params: Any) -> int:
        """Run the named insert; the new row's ``seq``."""

    def rollback_to(self, hooks: int, undos: int) -> None:
        for fn in reversed(self.undo[undos:]):
            fn()
        del self.after_commit[hooks:], self.undo[undos:]


class Driver(Protocol):
    """A backend's side of the writer, on its one write connection."""

    # read-only members: SQLite's are C-level callables made once (no Python frame per
    # write on its commit path), PostgreSQL's plain methods

    @property
    def error(self) -> type[Exception]:
        """The backend's own error class: what the driver may map or pass on."""
    @property
    def changes(self) -> Callable[[], int]:
        """How many rows the connection has changed so far (a write that changed none
        and raised leaves nothing to undo); read once per write."""
    @property
    def committed(self) -> Callable[[], object]:
        """Called after each commit's hooks (SQLite: wake the checkpointer)."""
    @property
    def commit(self) -> Callable[[], object]: ...
    @property
    def savepoint(self) -> Callable[[], object]:
        """A savepoint before each write (once a write failed after writing)."""
    @property
    def rollback_to_savepoint(self) -> Callable[[], object]: ...
    @property
    def release(self) -> Callable[[], object]: ...

    def begin(self, now: int) -> Tx:
        """Begin the batch's transaction: what its writes see."""
        ...
    def rollback(self) -> None:
        """Roll the transaction back, if one is open."""
        ...
    def ended(self, e: Exception) -> bool:
        """``e`` ended the transaction itself (or must run the batch again): the batch
        cannot go on past it."""
        ...
    def again(self, e: Exception) -> bool:
        """``e`` passes if the batch runs again (a deadlock, a serialization failure)."""
        ...
    def mapped(self, e: Exception) -> Exception:
        """``e`` as the store's exception (a bug's error passed on as it is)."""
        ...


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
    """Runs writes in order on the driver's one connection, many per transaction."""

    MAX_BATCH = 512
    #: how many times a batch runs again after a passing failure before it fails
    AGAIN = 5

    def __init__(self, driver: Driver, clock: Callable[[], int]) -> None:
        super().__init__(name="jobd-store-writer", daemon=True)
        self.driver = driver
        self.clock = clock
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: each transaction's time, begin to commit (``admin.metrics``), and the longest
        self.times = Histogram(WRITE_BUCKETS)
        self.longest_tx_s = 0.0
        # a write queued behind stop()'s end mark would wait for ever: submit and stop
        # take turns, and no write is queued once the mark is
        self._closing = threading.Lock()
        self._closed = False
        #: stop()'s end mark was taken by ``_join`` into a batch begun before it
        self._ending = False

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
            stopping = stopping or self._ending

    def _join(self, batch: list[tuple[Write, Answer]]) -> None:
        """The writes queued while the batch's transaction began join it (up to MAX_BATCH):
        a cluster node's begin waits for the queue lock, which the other nodes' batches
        hold one after the other, and the ends of its attempts that came meanwhile would
        otherwise wait for the lock once more, each in a batch of its own."""
        while len(batch) < self.MAX_BATCH:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self._ending = True
                return
            if item[1].set_running_or_notify_cancel():
                batch.append(item)

    def _commit(self, batch: list[tuple[Write, Answer]]) -> None:
        driver = self.driver
        now = self.clock()
        started = time.perf_counter()
        tx: Tx | None = None
        tries = 0
        try:
            while True:
                try:
                    attempt = self._run(batch, now, savepoints=False)
                    if attempt is None:  # a write was refused: again, each in its own savepoint
                        attempt = self._run(batch, now, savepoints=True)
                    assert attempt is not None
                    tx, outcomes = attempt
                    driver.commit()
                    break
                except driver.error as e:
                    if tries >= self.AGAIN or not driver.again(e):
                        raise
                    tries += 1
                    self._rollback()
                    if tx is not None:
                        tx.rollback_to(0, 0)
                        tx = None
                    log.warning("store_batch_rerun", error=str(e), writes=len(batch),
                                attempt=tries)
        except driver.error as e:
            self._rollback()
            if tx is not None:
                tx.rollback_to(0, 0)
            failure = driver.mapped(e)
            log.error("store_write_failed", error=str(e), writes=len(batch))
            _answer([(fut, None, failure) for _, fut in batch if not fut.done()])
            return
        finally:
            took = time.perf_counter() - started
            self.times.observe(took)
            self.longest_tx_s = max(self.longest_tx_s, took)
        for hook in tx.after_commit:
            try:
                hook()
            except Exception:  # a listener's bug must not stall the writer
                log.exception("store_listener_failed")
        _answer(outcomes)
        driver.committed()

    def _rollback(self) -> None:
        try:
            self.driver.rollback()
        except self.driver.error as again:
            # the writer must live on: the next begin finds out whether storage recovered
            log.error("store_rollback_failed", error=str(again))

    def _run(self, batch: list[tuple[Write, Answer]], now: int, *,
             savepoints: bool) -> tuple[Tx, list[tuple[Any, Any, BaseException | None]]] | None:
        """Run ``batch`` in a new transaction, left open for the commit. A write refused
        before it wrote anything (a compare-and-set that matched no row, a rule) leaves
        nothing to undo: its error is kept for its caller and the batch goes on. Without
        ``savepoints``: None (all rolled back) as soon as a write raises after writing.
        With them: such a write is undone alone and its error kept. A failure that ended
        the transaction itself (disk full, I/O, a lost connection) is raised."""
        driver = self.driver
        changed = driver.changes
        tx = driver.begin(now)
        self._join(batch)
        # a write that joined was queued after ``now`` was read, perhaps after a live
        # version from the clock (a running job's progress): its version must pass that
        tx.now = max(tx.now, self.clock())
        outcomes: list[tuple[Any, Any, BaseException | None]] = []
        try:
            for fn, fut in batch:
                marks = len(tx.after_commit), len(tx.undo)
                changes = changed()
                if savepoints:
                    driver.savepoint()
                try:
                    outcomes.append((fut, fn(tx), None))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    if isinstance(e, driver.error):
                        if driver.ended(e):
                            raise  # the whole transaction is gone (or must run again)
                        e = driver.mapped(e)
                    if not savepoints and changed() == changes and marks == (
                            len(tx.after_commit), len(tx.undo)):
                        outcomes.append((fut, None, e))  # refused before it wrote
                        continue
                    if not savepoints:
                        driver.rollback()
                        tx.rollback_to(0, 0)
                        return None
                    driver.rollback_to_savepoint()
                    tx.rollback_to(*marks)
                    outcomes.append((fut, None, e))
                if savepoints:
                    driver.release()
        except BaseException:
            tx.rollback_to(0, 0)
            raise
        return tx, outcomes
