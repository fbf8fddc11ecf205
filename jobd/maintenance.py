"""Scheduled upkeep on APScheduler 3: retention cleanup and database housekeeping.

Both jobs coalesce and never overlap (``max_instances=1``); the scheduler runs on its
own thread and shuts down with the daemon.
"""

from __future__ import annotations

from typing import Callable

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

__all__ = ["Maintenance"]

log = structlog.get_logger()


class Maintenance:
    def __init__(self, *, cleanup: Callable[[], object], upkeep: Callable[[], None],
                 cleanup_every: float, upkeep_every: float = 3600.0) -> None:
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": None})
        self.scheduler.add_job(self._guard(cleanup, "cleanup"), "interval",
                               seconds=cleanup_every, id="cleanup", name="retention cleanup")
        self.scheduler.add_job(self._guard(upkeep, "upkeep"), "interval",
                               seconds=upkeep_every, id="upkeep", name="database upkeep")

    @staticmethod
    def _guard(fn: Callable[[], object], name: str) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("maintenance_failed", task=name)
        return run

    def reschedule(self, *, cleanup_every: float) -> None:
        """A reloaded ``retention.cleanup_every``: the next cleanup is that far from now."""
        job = self.scheduler.get_job("cleanup")
        if job is not None and job.trigger.interval.total_seconds() != cleanup_every:
            self.scheduler.reschedule_job("cleanup", trigger="interval", seconds=cleanup_every)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
