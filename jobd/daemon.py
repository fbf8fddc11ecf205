"""The daemon's life: put the parts together, serve until SIGTERM, stop cleanly.

Start: bind the socket first (a live daemon there means "already running", before this
one touches the database), open the store (migrations; ``quick_check`` after an unclean
stop), recover what a crash left running, start the workers and the scheduler, tell
systemd ``READY=1``. Stop (SIGTERM/SIGINT, whose handlers only set a flag): stop
accepting and dispatching, stop running jobs and requeue the resumable ones, close the
database cleanly, remove the socket, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import structlog

from jobd import __version__
from jobd.config import Config
from jobd.engine import Engine
from jobd.handlers import load_handlers
from jobd.maintenance import Maintenance
from jobd.manager import Hub, Manager
from jobd.rpc import Rpc, error_line
from jobd.server import Server, notify, watchdog_loop
from jobd.store import Listeners, Store

__all__ = ["run"]

log = structlog.get_logger()


def run(config: Config) -> int:
    """Serve until told to stop; the exit status."""
    return asyncio.run(_serve(config))


async def _serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    hub = Hub(loop)
    handlers = load_handlers()
    engine: Engine | None = None

    def changed(job: Any) -> None:
        if engine is not None:
            engine.on_changed(job)

    store = Store(config.db, synchronous=config.storage.synchronous,
                  listeners=Listeners(changed=changed))
    engine = Engine(config, store, handlers, notify=hub.notify)
    manager = Manager(config, store, engine, handlers, hub)
    rpc = Rpc(manager, max_batch=config.server.max_batch)
    server = Server(config, rpc.dispatch, error_line=error_line)

    await server.start(accept=False)
    try:
        store.open()
    except BaseException:
        await server.stop()
        raise
    if not store.was_clean:
        log.warning("unclean_stop_detected", db=str(config.db), check="quick_check passed")
    try:
        engine.start()
    except BaseException:
        # recovery failed: leave the socket and the database as a stop would
        await server.stop()
        store.close()
        raise
    await server.accept()
    maintenance = Maintenance(
        cleanup=manager.run_cleanup, upkeep=store.upkeep,
        cleanup_every=config.retention.cleanup_every)
    maintenance.start()
    watchdog = asyncio.create_task(watchdog_loop())
    queued = engine.dispatcher.queued_count()
    log.info("jobd_started", version=__version__, socket=str(config.socket),
             db=str(config.db), workers=config.execution.workers, queued=queued,
             handlers=sorted(handlers))
    notify(f"READY=1\nSTATUS=serving; {queued} jobs queued")

    await stop.wait()

    log.info("jobd_stopping")
    notify("STOPPING=1\nSTATUS=stopping: finishing running jobs")
    rpc.shutting_down = True
    hub.close()  # long polls answer now, so they do not hold up the stop
    watchdog.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watchdog
    await server.stop()
    maintenance.stop()
    await loop.run_in_executor(None, engine.stop)
    rpc.close()
    store.close()
    log.info("jobd_stopped")
    return 0
