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

#: structlog's JSON, as its ``json.dumps(event, default=…)`` writes it, but with one
#: encoder made once rather than one per line (``jobd.jsonenc``)
_dumps_json = jsonenc.encoder(default=structlog.processors._json_fallback_handler)


def _render_json(event: dict[str, Any], **_: Any) -> str:
    """``JSONRenderer``'s serializer (it passes its ``default``, already in the encoder)."""
    return _dumps_json(event)


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
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        cache_logger_on_first_use=True,
    )
    _forget_first_use()


def _forget_first_use() -> None:
    """A module's ``structlog.get_logger()`` keeps what its first call assembled, the
    level filter with it: after a second ``setup`` (a reload's new ``log_level``) each
    assembles anew at its next call. Loggers bound from them before (a running job's)
    keep the old level until they go."""
    proxy = type(structlog.get_logger())
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] in ("jobd", "jobctl") and module is not None:
            for value in list(vars(module).values()):
                if isinstance(value, proxy):
                    vars(value).pop("bind", None)
