"""structlog set-up: one pipeline for jobd's own events and the stdlib loggers it uses.

JSON lines on stderr for journald, or structlog's console renderer on a terminal.
Events from ``logging`` (jsonrpcserver, apscheduler, asyncio) pass through the same
processors, so every line has the same shape; ``job_id``/``user_id``/``method`` bound
with ``structlog.contextvars`` appear on every line logged inside a call.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

from jobd import jsonenc

__all__ = ["setup"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}
_FORMATS = ("auto", "json", "console")

_handler: logging.Handler | None = None   # ours, replaced (not added to) on a second setup

#: the level in force (``setup``), which every logger reads at each call: a reload's new
#: ``log_level`` applies at once to loggers made or bound before it, plugins' as well
#: (structlog's filtering loggers fix theirs when first used)
_level = [logging.INFO]

#: structlog's JSON, as its ``json.dumps(event, default=…)`` writes it, but with one
#: encoder made once rather than one per line (``jobd.jsonenc``)
_dumps_json = jsonenc.encoder(default=structlog.processors._json_fallback_handler)


def _render_json(event: dict[str, Any], **_: Any) -> str:
    """``JSONRenderer``'s serializer (it passes its ``default``, already in the encoder)."""
    return _dumps_json(event)


def _leveled() -> type:
    """structlog's filtering bound logger, its level read from ``_level`` at each call."""
    base: Any = structlog.make_filtering_bound_logger(logging.DEBUG)

    def gate(name: str, level: int) -> Any:
        inner = getattr(base, name)

        def method(self: Any, *args: Any, **kw: Any) -> Any:
            return None if level < _level[0] else inner(self, *args, **kw)
        method.__name__ = name
        return method

    names = {"debug": logging.DEBUG, "info": logging.INFO, "msg": logging.INFO,
             "warning": logging.WARNING, "warn": logging.WARNING, "error": logging.ERROR,
             "exception": logging.ERROR, "critical": logging.CRITICAL,
             "fatal": logging.CRITICAL}
    methods = {name: gate(name, level) for name, level in names.items()}

    def log(self: Any, level: int, *args: Any, **kw: Any) -> Any:
        return None if level < _level[0] else base.log(self, level, *args, **kw)
    methods.update(log=log, is_enabled_for=lambda self, level: level >= _level[0],
                   get_effective_level=lambda self: _level[0])
    return type("LeveledBoundLogger", (base,), methods)


_Leveled = _leveled()


def setup(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the root logger; calling it again replaces the set-up."""
    global _handler
    levelno = _LEVELS.get(level.lower())
    if levelno is None:
        raise ValueError(f"log level {level!r}: use one of {', '.join(_LEVELS)}")
    if fmt not in _FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(_FORMATS)}")
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"

    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: list[structlog.typing.Processor]
    if fmt == "json":
        renderer = [structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(serializer=_render_json)]
    else:
        colors = sys.stderr.isatty() and "NO_COLOR" not in os.environ
        # plain tracebacks: frame locals of a job could hold secrets and flood the log
        renderer = [structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback)]

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(levelno)
    _handler = handler
    _level[0] = levelno
    # APScheduler says "Adding job tentatively", "Added job", "Scheduler started" at INFO
    # on every start: chatter for an operator, shown only when debugging
    logging.getLogger("apscheduler").setLevel(levelno if levelno <= logging.DEBUG
                                              else logging.WARNING)

    # jobd's own events skip the stdlib logging machinery (a third of the cost of a
    # no-op job went there); other libraries' loggers still render through the formatter
    structlog.configure(
        processors=[*shared, *renderer],
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        # filtered-out calls return at once, so debug events cost nothing in production
        wrapper_class=_Leveled,
        cache_logger_on_first_use=True,
    )
