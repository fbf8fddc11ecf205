"""The job types: the Handler base, the context a handler runs with, and the registry.

A handler checks its options when a job is submitted (``validate``) and does the work
when a worker runs it (``run``). The built-in types are ``sync``, ``index``, ``command``
and ``noop``; more come from Python entry points in the group ``jobd.handlers``, each
naming a Handler subclass (or instance). The engine owns the context; handlers only
see the ``JobContext`` interface below and raise ``JobFailed`` or ``Cancelled``.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import structlog

from jobd import errors

if TYPE_CHECKING:
    from jobd.config import Config
    from jobd.models import Job
    from jobd.joblogs import JobLog
    from jobd.process import Completed

__all__ = ["ENTRY_POINT_GROUP", "Cancelled", "Handler", "JobContext", "JobFailed",
           "load_handlers", "progress_between", "reject_unknown"]

#: Python entry points in this group add job types
ENTRY_POINT_GROUP = "jobd.handlers"

log = structlog.get_logger()


class JobFailed(Exception):
    """The job cannot finish; the message becomes the job's ``error``."""


class Cancelled(Exception):
    """The job stopped because it was cancelled, timed out, or the daemon is stopping."""


class JobContext(Protocol):
    """What the engine gives a running handler (``jobd.engine`` implements it)."""

    job: Job
    config: Config
    log: Any
    joblog: JobLog

    @property
    def cancelled(self) -> bool: ...

    def set_phase(self, phase: str, message: str | None = None) -> None: ...

    def set_progress(self, percent: float, message: str | None = None) -> None: ...

    def set_message(self, message: str) -> None: ...

    def save_checkpoint(self, phase: str, data: dict[str, Any]) -> None: ...

    def load_checkpoints(self) -> dict[str, dict[str, Any]]: ...

    def run(self, argv: list[str], *, cwd: str | None = None,
            env: dict[str, str] | None = None,
            on_progress: Callable[[float | None, str | None], None] | None = None,
            capture: bool = False, check: bool = True) -> Completed: ...


class Handler:
    """One job type. Subclasses set ``name`` and override ``validate`` and ``run``."""

    name: ClassVar[str]
    #: only admins may submit or retry it
    admin_only: ClassVar[bool] = False
    #: after a daemon crash it is requeued to resume (else it fails: a plugin must opt in)
    resumable: ClassVar[bool] = False
    #: one at a time per (user, project), and a queued duplicate is folded into the job
    #: already queued; project_id is required. The one source of a type's exclusivity:
    #: the engine hands it to the dispatcher with each queued job.
    exclusive: ClassVar[bool] = False

    def validate(self, options: dict[str, Any], *, user_id: str, project_id: str | None,
                 trusted: bool, config: Config) -> dict[str, Any]:
        """Check options at submit time; return the normalised options stored with the job.

        Raises ``errors.InvalidParams`` naming the field (``options.<key>`` or
        ``project_id``). ``trusted`` means the caller is an admin or a service.
        """
        reject_unknown(options, ())
        return {}

    def run(self, ctx: JobContext) -> dict[str, Any] | None:
        """Do the work; the return value is the job's result."""
        raise NotImplementedError


def reject_unknown(options: dict[str, Any], known: tuple[str, ...]) -> None:
    """Refuse option keys the handler does not know, naming the first one."""
    for key in options:
        if key not in known:
            allowed = ", ".join(known) if known else "none"
            raise errors.InvalidParams(f"unknown option {key!r} (allowed: {allowed})",
                                       field=f"options.{key}")


def progress_between(ctx: JobContext, low: float, high: float
                     ) -> Callable[[float | None, str | None], None]:
    """An ``on_progress`` callback: a step's own 0–100 onto ``low``–``high`` of the job."""
    def report(percent: float | None, message: str | None) -> None:
        if percent is not None:
            percent = min(max(percent, 0.0), 100.0)
            ctx.set_progress(low + (high - low) * percent / 100.0, message)
        elif message:
            ctx.set_message(message)
    return report


def load_handlers() -> dict[str, Handler]:
    """The built-in handlers plus every plugin that loads; a broken plugin is logged and skipped."""
    from jobd.handlers.command import CommandHandler
    from jobd.handlers.index import IndexHandler
    from jobd.handlers.noop import NoopHandler
    from jobd.handlers.sync import SyncHandler

    handlers: dict[str, Handler] = {
        h.name: h for h in (SyncHandler(), IndexHandler(), CommandHandler(), NoopHandler())}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            handler = obj() if isinstance(obj, type) else obj
            if not isinstance(handler, Handler):
                raise TypeError(f"{ep.value} is not a jobd.handlers.Handler")
            name = getattr(handler, "name", None)
            if not isinstance(name, str) or not name:
                raise TypeError(f"{ep.value} has no name")
        except Exception as e:  # a plugin may fail in any way; the daemon must still start
            log.error("handler_plugin_failed", entry_point=ep.name, value=ep.value,
                      error=f"{type(e).__name__}: {e}")
            continue
        if name in handlers:
            log.warning("handler_plugin_skipped", entry_point=ep.name, handler=name,
                        reason="a handler of that name is already registered")
            continue
        handlers[name] = handler
        log.info("handler_plugin_loaded", entry_point=ep.name, handler=name)
    return handlers
