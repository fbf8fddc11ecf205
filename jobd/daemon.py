"""The daemon's life: put the parts together, serve until SIGTERM, stop cleanly.

Start: take the state folder's lock (a second daemon on the same database refuses there,
before it touches anything), bind the socket (a live daemon there means "already
running"), open the store the config names (SQLite, or PostgreSQL, whose module and
psycopg are imported only then; migrations; ``quick_check`` after an unclean stop of a
SQLite file), with PostgreSQL register this start as a cluster node (``jobd.cluster``:
its lease, heartbeat and claims), recover what a crash left running, start the workers and the scheduler, tell
systemd ``READY=1``. Stop (SIGTERM/SIGINT, whose handlers only set a flag): stop
accepting and dispatching, stop running jobs and requeue the resumable ones, close the
database cleanly, remove the socket, exit 0. SIGHUP reloads the config file: the
settings SPEC §1 calls reloadable apply to new decisions at once; the others are logged
as needing a restart and kept; a file that no longer loads is logged and the old config
stays. Running jobs are never touched by a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import os
import signal
import socket
from typing import Any, Callable

import structlog

from jobd import __version__
from jobd import errors, joblogs, logs
from jobd.changes import ChangeLog
from jobd.config import Config, ConfigError, ConfigState
from jobd.engine import Engine
from jobd.handlers import load_handlers
from jobd.maintenance import Maintenance
from jobd.metrics import Metrics
from jobd.manager import Hub, Manager
from jobd.models import Job
from jobd.rpc import Rpc, error_line
from jobd.server import Server, notify, watchdog_loop
from jobd.state import locked
from jobd.store import Listeners, Store
from jobd.store.interface import JobStore

__all__ = ["run"]

log = structlog.get_logger()


#: what only a restart changes (SPEC §1): kept as they were when a reload changes them
_RESTART_ONLY = ("socket", "db", "storage", "cluster", "log_format")


#: glibc's mallopt parameters: M_TRIM_THRESHOLD, M_MMAP_THRESHOLD and M_ARENA_MAX
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
#: the free memory a heap keeps at its top; the size from which a block gets its own
#: mapping; the heaps threads share
_KEEP_TOP, _MMAP_FROM, _ARENAS = 4 << 20, 256 * 1024, 2
#: the net new objects that make the cycle collector look at the youngest ones (Python's
#: default is 700)
_GC_YOUNG = 10_000


def run(config: Config, reload: Callable[[], Config]) -> int:
    """Serve until told to stop; the exit status. ``reload`` loads the config anew (SIGHUP)."""
    if config.db_ignored:
        log.warning("db_option_ignored", given=config.db_ignored,
                    backend=config.storage.backend, database=config.database)
    with locked(config):
        _tune_malloc()
        return asyncio.run(_serve(config, reload))


def _tune_malloc() -> None:
    """Keep the heap from holding on to memory after bursts of big answers (glibc only).

    glibc raises its mmap threshold each time a big block is freed, after which big
    answers come from the heap, which fragments and is not given back: a fixed threshold
    gives each its own mapping, returned when freed. And by default every thread that
    allocates gets a heap (arena) of its own, up to 8 per core; the RPC and worker threads
    then keep freed memory in many heaps at once. Two suffice: the interpreter lock
    serialises most allocation anyway. Together they took the peak of a fuzzed run of
    unread answers from 184 to about 155 MB, and the SPEC's hostile-answers figure from
    161 to about 105 MB after the burst.

    A fixed threshold also fixes the trim threshold (the free memory at a heap's top
    that glibc gives back at once) at its default of 128 KB, which SQLite's statements
    cross back and forth: the heap was cut and grown again, page fault after page
    fault, within one write (a job's end cost SQLite 250-300 µs instead of 36-55 in
    loops of the store's statements alone). 4 MB kept at the top ends that.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TOP)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM)
        libc.mallopt(_M_ARENA_MAX, _ARENAS)
    except (OSError, AttributeError):  # not glibc
        pass


def _tune_gc() -> None:
    """Keep the cycle collector off the writer's path, once the daemon has started.

    Nearly nothing jobd makes while it serves is cyclic garbage (a 10,000-job run freed
    about 1,600 objects that way), yet with Python's defaults the collector looked at the
    youngest objects about 640 times in that run and at all of them five times, 40-50 ms
    each: about 3 % of the daemon's CPU, and each full pass a stall of whichever thread
    ran it, the store's writer as often as not. What start-up made (modules, config,
    handlers, the queued jobs) lives as long as the daemon: frozen, no pass looks at it
    again. And the youngest are looked at once per 10,000 new objects rather than 700.
    In the same run: 520 ms of collection in 700 passes, 115 ms in 140.
    """
    gc.collect()  # what start-up left as cyclic garbage goes, rather than frozen for good
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG, middle, oldest)


def _adopted_name() -> str:
    """The address of the socket systemd passed on fd 3, which the server adopted: what
    clients reach, whatever ``config.socket`` says."""
    with socket.socket(fileno=os.dup(3)) as sock:  # a copy: closing it leaves fd 3 open
        name = sock.getsockname()
    return name if isinstance(name, str) and name else "(unnamed socket on fd 3)"


def _status(queued: int, paused: bool, manager: Manager) -> str:
    """systemd's STATUS= line at start: what is queued, and the switches left on."""
    parts = [f"serving; {queued} jobs queued"]
    if paused:
        parts.append("dispatch paused (jobctl resume)")
    if manager.maintenance_on:
        why = f" ({manager.maintenance_reason})" if manager.maintenance_reason else ""
        parts.append(f"maintenance{why}: submits refused (jobctl maintenance off)")
    return "; ".join(parts)


def reloaded(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with what only a restart may change put back as in ``old``; the keys kept."""
    kept = [name for name in _RESTART_ONLY if getattr(old, name) != getattr(new, name)]
    if old.server.socket_mode != new.server.socket_mode:
        kept.append("server.socket_mode")
    config = dataclasses.replace(
        new, **{name: getattr(old, name) for name in _RESTART_ONLY},
        server=dataclasses.replace(new.server, socket_mode=old.server.socket_mode))
    return config, kept


def make_store(config: Config, listeners: Listeners) -> JobStore:
    """The store ``[storage]`` names, not yet opened."""
    if config.storage.backend == "postgres":
        # here only: a SQLite daemon never loads psycopg or libpq (the config checked
        # that they import)
        from jobd.store.postgres import PostgresStore
        return PostgresStore(config.storage.dsn, listeners=listeners,
                             max_stored_per_user=config.execution.max_stored_per_user,
                             cluster=True, stuck_s=config.cluster.lease)
    return Store(config.db, synchronous=config.storage.synchronous,
                 max_stored_per_user=config.execution.max_stored_per_user,
                 listeners=listeners, state_dir=config.state_dir)


def make_node(config: Config, store: JobStore, handlers: Any) -> Any:
    """Cluster mode's node (``jobd.cluster.Node``) with PostgreSQL; None with SQLite,
    which never imports it."""
    if config.storage.backend != "postgres":
        return None
    from jobd.cluster import Node
    return Node(config, store, handlers)  # type: ignore[arg-type]


async def _serve(config: Config, reload: Callable[[], Config]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    hup = asyncio.Event()
    # SIGHUP never stops the daemon: it reloads the config; one that came while jobd
    # started was held (``jobd.__main__``), and reloads once it serves
    held = signal.getsignal(signal.SIGHUP)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    if getattr(held, "heard", False):
        hup.set()
    current = ConfigState(config)

    hub = Hub(loop)
    change_log = ChangeLog()
    handlers = load_handlers(config)
    telemetry = Metrics(types=lambda: handlers, codes=errors.BY_CODE)
    engine: Engine | None = None

    def changed(job: Any) -> None:
        change_log.record(job)
        telemetry.job_changed(job)
        if engine is not None:
            engine.on_changed(job)

    def followed(jobs: list[Job], gone: list[str]) -> None:
        """Cluster mode: other nodes changed ``jobs`` (as read since) and ``gone`` (no
        longer stored). This node's waiters, queue mirror (positions, wait reasons,
        counts) and ``jobs.changes`` follow them as they follow this node's own commits;
        the metrics stay this node's."""
        for job_id in gone:
            if engine is not None:
                engine.forgotten(job_id)
            hub.notify(job_id)
        for job in jobs:
            if node is not None and node.store.echoes.own(job.id, job.version):
                continue  # read before this node's own later write of it, already heard
            change_log.record(job)
            if engine is not None:
                engine.on_changed(job)

    def deleted(job_ids: list[str]) -> None:
        """Jobs the store forgot (retention, max_stored_per_user): their logs go too."""
        joblogs.delete(config.log_dir, job_ids)

    store = make_store(config, Listeners(changed=changed, deleted=deleted))
    node = make_node(config, store, handlers)
    engine = Engine(config, store, handlers, notify=hub.notify, live_changed=change_log.record,
                    cluster=node)
    manager = Manager(config, store, engine, handlers, hub, config_state=current,
                      change_log=change_log, telemetry=telemetry)
    rpc = Rpc(manager)
    server = Server(config, rpc.dispatch, error_line=error_line)

    adopted = "LISTEN_FDS" in os.environ and os.environ.get("LISTEN_PID") == str(os.getpid())
    await server.start(accept=False)
    listening = _adopted_name() if adopted else str(config.socket)
    try:
        store.open()
    except BaseException:
        await server.stop()
        raise
    if node is not None:
        try:
            node.register()
        except BaseException:
            await server.stop()
            store.close()
            raise
        node.on_cancel, node.on_lost, node.on_claimable = (engine.cancel,
                                                           engine.drop_attempts, engine.kick)
        node.on_jobs, node.on_resync = followed, hub.notify_all
        node.on_meta = lambda: engine.set_paused(manager.restore())
        node.on_reported, node.on_beat = engine.reported, engine.cluster_beat
        node.start()
    if not store.was_clean:
        log.warning("unclean_stop_detected", backend=config.storage.backend,
                    database=config.database)
    try:
        # the pause and maintenance an operator set stay set across the restart
        paused = manager.restore()
        engine.start(paused=paused)
    except BaseException:
        # recovery failed: leave the socket and the database as a stop would
        await server.stop()
        if node is not None:
            node.stop()
        store.close()
        raise
    await server.accept()
    if not store.was_clean:
        # the logs of jobs forgotten just before the crash (their rows went first)
        loop.run_in_executor(None, joblogs.sweep_strays, config.log_dir, store.known_ids)
    maintenance = Maintenance(
        cleanup=manager.run_cleanup, upkeep=store.upkeep,
        cleanup_every=config.retention.cleanup_every)
    maintenance.start()
    watchdog = asyncio.create_task(watchdog_loop())
    queued = engine.stats()["queued"]
    log.info("jobd_started", version=__version__, socket=listening,
             backend=config.storage.backend, database=config.database,
             state_dir=str(config.state_dir), workers=config.execution.workers, queued=queued,
             handlers=sorted(handlers), paused=paused, maintenance=manager.maintenance_on,
             maintenance_reason=manager.maintenance_reason)
    _tune_gc()
    notify(f"READY=1\nSTATUS={_status(queued, paused, manager)}")

    def apply(new: Config) -> None:
        """Put a reloaded config in force for every part that decides something."""
        config, kept = reloaded(current.config, new)
        for key in kept:
            log.warning("config_change_needs_restart", key=key)
        manager.config = config
        engine.reconfigure(config)
        server.reconfigure(config)
        store.max_stored_per_user = config.execution.max_stored_per_user
        maintenance.reschedule(cleanup_every=config.retention.cleanup_every)
        if config.log_level != current.config.log_level:
            logs.setup(config.log_level, config.log_format)
        current.loaded(config)
        log.info("config_reloaded", file=str(config.config_file or ""),
                 workers=config.execution.workers, log_level=config.log_level)

    while not stop.is_set():
        stopping = asyncio.ensure_future(stop.wait())
        hupped = asyncio.ensure_future(hup.wait())
        await asyncio.wait({stopping, hupped}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        hupped.cancel()
        if hup.is_set() and not stop.is_set():
            hup.clear()
            try:
                new = await loop.run_in_executor(None, reload)
                handlers.check(new)  # refuses a [types] name a plugin has
                if node is not None:  # the same cluster-wide settings as every other node
                    # (and, passed, this node's row says it uses them: nothing refuses now)
                    await loop.run_in_executor(None, node.check_reload, new)
                handlers.reconfigure(new)
            except Exception as e:  # noqa: BLE001 - SIGHUP never stops the daemon (SPEC §1)
                problem = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
                current.failed(problem)
                log.error("config_reload_failed", error=problem, kept="the config in force",
                          exc_info=not isinstance(e, ConfigError))
                continue
            apply(new)

    log.info("jobd_stopping")
    notify("STOPPING=1\nSTATUS=stopping: finishing running jobs")
    rpc.shutting_down = True
    engine.stop_dispatching()  # before the server's last calls end, which may take seconds
    hub.close()  # long polls answer now, so they do not hold up the stop
    change_log.close()
    watchdog.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watchdog
    await server.stop()
    maintenance.stop()
    await loop.run_in_executor(None, engine.stop)
    if node is not None:
        node.stop()  # after the ends of its jobs, which its lease fences
    rpc.close()
    store.close()
    log.info("jobd_stopped")
    return 0
