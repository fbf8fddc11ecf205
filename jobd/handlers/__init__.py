"""The job types: the Handler base, the context a handler runs with, and the registry.

A handler checks its options when a job is submitted (``validate``) and does the work
when a worker runs it (``run``); its ``roles`` say who may submit and retry its jobs.
The built-in types are ``sync``, ``index``, ``command`` and ``noop``; more come from
Python entry points in the group ``jobd.handlers``, each naming a Handler subclass (or
instance), and from the config's ``[types.NAME]`` entries (``jobd.handlers.program``),
which a reload replaces (``Registry.reconfigure``). The engine owns the context;
handlers only see the ``JobContext`` interface below and raise ``JobFailed`` or
``Cancelled``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol

import structlog

from jobd import errors
from jobd.config import ROLES, Config, ConfigError

if TYPE_CHECKING:
    from jobd.auth import Scope
    from jobd.models import Job
    from jobd.joblogs import JobLog
    from jobd.process import Completed

__all__ = ["ADMINS", "ENTRY_POINT_GROUP", "EVERYONE", "Aftermath", "Cancelled", "Handler",
           "JobContext", "JobFailed", "Registry", "load_handlers", "progress_between",
           "reject_unknown", "role_of"]

#: Python entry points in this group add job types
ENTRY_POINT_GROUP = "jobd.handlers"
#: ``roles`` of a type anyone may submit, and of one only admins may
EVERYONE = frozenset(ROLES)
ADMINS = frozenset({"admin"})

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

    def load_manifest(self) -> str | None: ...

    def save_manifest(self, document: str) -> None: ...

    def run(self, argv: list[str], *, cwd: str | None = None,
            env: dict[str, str] | None = None,
            on_progress: Callable[[float | None, str | None], None] | None = None,
            capture: bool = False, check: bool = True, whole: bool = False) -> Completed:
        """Run a program of the job. ``whole``: the program is the job's whole work (a
        ``command``, a ``[types]`` entry), so one that a shutdown asked to stop and that
        exits 0 has finished the job; of any other step that is still an interruption."""


@dataclasses.dataclass
class Aftermath:
    """What ``Handler.abandon`` sees of a job no attempt runs any more: the job, the
    config, a logger bound to the job, and its log (for ``joblog.note``)."""

    job: Job
    config: Config
    log: Any
    joblog: JobLog


class Handler:
    """One job type. Subclasses set ``name`` and override ``validate`` and ``run``."""

    name: str
    #: who may submit and retry it (SPEC §3): any of "user", "service", "admin"
    roles: frozenset[str] = EVERYONE
    #: after a daemon crash it is requeued to resume (else it fails: a plugin must opt in)
    resumable: bool = False
    #: one at a time per repository, and a queued duplicate is folded into the job
    #: already queued. The one source of a type's exclusivity: the engine hands it to the
    #: dispatcher with each queued job.
    exclusive: bool = False

    def may_submit(self, scope: Scope) -> bool:
        """Whether the call's role is among ``roles`` (submit and retry alike)."""
        return role_of(scope) in self.roles

    def refusal(self, verb: str) -> str:
        """What a caller gets whom ``may_submit`` refuses; ``verb`` is submit or retry."""
        if self.roles == ADMINS:
            return f"only admins may {verb} {self.name} jobs"
        plural = {"user": "plain users", "service": "services", "admin": "admins"}
        who = " and ".join(plural[r] for r in ROLES if r in self.roles)
        return f"only {who} may {verb} {self.name} jobs (the type's roles)"

    def default_timeout(self, config: Config) -> float | None:
        """The run-time limit of a job of this type that asks none (``timeout_s``)."""
        return config.execution.default_timeout

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

    def abandon(self, ctx: Aftermath, checkpoints: dict[str, dict[str, Any]]) -> None:
        """A crash of the daemon (or of a cluster node) stopped an attempt, and none will
        run the job again (it ends failed or cancelled): undo what the attempt left
        half-done, as ``run`` would have on its way out. ``checkpoints``: what it saved.
        Nothing by default."""


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


def role_of(scope: Scope) -> str:
    """The role a call acts with (SPEC §3): an admin's (also acting for a user), a
    service's (also with as_admin), or a plain user's (also a service or admin sending
    ``as_role: "user"``)."""
    if scope.may_admin_types:
        return "admin"
    return "service" if scope.may_repo_path else "user"


class Registry(Mapping[str, Handler]):
    """The job types in force, by name: built-ins and plugins, fixed at start, and the
    config's ``[types]``, which ``reconfigure`` replaces. Read from any thread; a reload
    swaps the whole table at once."""

    def __init__(self, fixed: dict[str, Handler], config: Config | None = None) -> None:
        self.fixed = fixed
        self._all = dict(fixed)
        if config is not None:
            self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Put ``config``'s ``[types]`` in force: a removed type's queued jobs fail when
        they come to run, a running job keeps the definition it started with. A name a
        built-in or plugin type has is refused (ConfigError) and nothing changes."""
        from jobd.handlers.program import ProgramHandler

        self.check(config)
        self._all = {**self.fixed, **{name: ProgramHandler(name, spec)
                                      for name, spec in config.types.items()}}

    def check(self, config: Config) -> None:
        """What ``reconfigure`` refuses, refused without changing anything."""
        where = config.config_file or "the config"
        for name in config.types:
            if name in self.fixed:
                raise ConfigError(f"{where}: types.{name}: a plugin job type has that name "
                                  "(entry point group jobd.handlers); give this one another")

    def __getitem__(self, name: str) -> Handler:
        return self._all[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all)

    def __len__(self) -> int:
        return len(self._all)


def load_handlers(config: Config | None = None) -> Registry:
    """The built-in handlers, every plugin that loads (a broken plugin is logged and
    skipped), and ``config``'s ``[types]``; ConfigError if one of those has a plugin's
    name."""
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
    for handler in handlers.values():
        if getattr(type(handler), "admin_only", None) is True:
            # a plugin written before roles (``admin_only = True``): still admins only
            handler.roles = ADMINS
    return Registry(handlers, config)
