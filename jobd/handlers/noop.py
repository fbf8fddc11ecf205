"""The ``noop`` job type: wait a while, doing nothing (admins only).

For health checks and benchmarks: with ``seconds`` 0 (the default) it returns at once,
so thousands can run per second; otherwise it sleeps in short steps, reporting
progress and stopping as soon as it is cancelled.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from jobd.params import number
from jobd.handlers import ADMINS, Cancelled, Handler, JobContext, reject_unknown

if TYPE_CHECKING:
    from jobd.config import Config

__all__ = ["MAX_SECONDS", "NoopHandler"]

#: the longest a noop job may sleep
MAX_SECONDS = 86400
# how long a cancel may go unnoticed
_STEP = 0.05


class NoopHandler(Handler):
    """Sleep ``seconds``; the result says how long it really slept."""

    name = "noop"
    resumable = True
    roles = ADMINS

    def validate(self, options: dict[str, Any], *, user_id: str, project_id: str | None,
                 trusted: bool, config: Config) -> dict[str, Any]:
        reject_unknown(options, ("seconds",))
        seconds = options.get("seconds", 0)
        number(seconds, "options.seconds", 0, MAX_SECONDS)
        return {"seconds": seconds}

    def run(self, ctx: JobContext) -> dict[str, Any]:
        seconds = float(ctx.job.options.get("seconds", 0))
        if seconds <= 0:
            return {"slept_s": 0.0}
        started = time.monotonic()
        end = started + seconds
        while (left := end - time.monotonic()) > 0:
            if ctx.cancelled:
                raise Cancelled(f"cancelled after {time.monotonic() - started:.2f}s "
                                f"of {seconds:g}s")
            time.sleep(min(_STEP, left))
            slept = time.monotonic() - started
            ctx.set_progress(min(100.0, 100.0 * slept / seconds),
                             f"slept {slept:.1f}s of {seconds:g}s")
        return {"slept_s": round(time.monotonic() - started, 3)}
