"""Every error jobd can answer with: one root, one child per row of SPEC §4's table.

Each class carries its JSON-RPC ``code`` and the ``http_status`` a web server maps it
to; the docstring is the default message. ``rpc.py`` turns these into JSON-RPC errors,
``client.py`` turns JSON-RPC errors back into these.
"""

from __future__ import annotations

from typing import Any


class JobdError(Exception):
    """jobd could not do what was asked."""

    code: int = -32603
    http_status: int = 500

    def __init__(self, message: str | None = None, *, field: str | None = None,
                 detail: Any = None, job_id: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.field = field
        self.detail = detail
        #: the job the error is about, when it is another than the one asked for
        self.job_id = job_id
        super().__init__(self.message)

    def data(self) -> dict[str, Any]:
        """The JSON-RPC error ``data`` object: always ``http_status``, then what is known."""
        out: dict[str, Any] = {"http_status": self.http_status}
        if self.field is not None:
            out["field"] = self.field
        if self.detail is not None:
            out["detail"] = self.detail
        if self.job_id is not None:
            out["job_id"] = self.job_id
        return out


class ParseError(JobdError):
    """The request is not valid JSON."""

    code, http_status = -32700, 400


class InvalidRequest(JobdError):
    """The request is not a valid JSON-RPC 2.0 request."""

    code, http_status = -32600, 400


class MethodNotFound(JobdError):
    """No such method."""

    code, http_status = -32601, 404


class InvalidParams(JobdError):
    """Invalid params."""

    code, http_status = -32602, 422


class Unauthenticated(JobdError):
    """A service must say whom it acts for (as_user)."""

    code, http_status = -32001, 401


class Forbidden(JobdError):
    """Not allowed."""

    code, http_status = -32003, 403


class NotFound(JobdError):
    """No such job."""

    code, http_status = -32004, 404


class Conflict(JobdError):
    """The job's state does not allow this."""

    code, http_status = -32009, 409


class LimitExceeded(JobdError):
    """Too many jobs."""

    code, http_status = -32029, 429


class Unavailable(JobdError):
    """jobd is unavailable: shutting down, or its storage is full or read-only."""

    code, http_status = -32050, 503


class InternalError(JobdError):
    """Internal error; the daemon's log has the details."""

    code, http_status = -32603, 500


class Unreachable(JobdError):
    """No jobd daemon answers."""

    code, http_status = 0, 503


#: every error a JSON-RPC answer can carry, by code (client side of rpc.py's mapping)
BY_CODE: dict[int, type[JobdError]] = {
    cls.code: cls
    for cls in (ParseError, InvalidRequest, MethodNotFound, InvalidParams, Unauthenticated,
                Forbidden, NotFound, Conflict, LimitExceeded, Unavailable, InternalError)
}
