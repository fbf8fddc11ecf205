"""The REST API over jobd's socket (SPEC §10): a FastAPI router a web server mounts.

This module owns the endpoints of SPEC §10's table, how a web identity becomes a call's
``as_user`` with ``as_role: "user"`` or ``as_admin`` (SPEC §3), the connections it uses
(one pool for short calls, a connection of its own for each stream and each cancel that
waits, at most ``max_streams`` at once), reading camelCase and snake_case input alike,
and the one error shape every endpoint answers with. It is a client of the socket like
jobctl: nothing of the daemon is imported here, and the daemon imports nothing of this.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from typing import Any, AsyncIterator, Callable, Mapping

import pydantic
import structlog
from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from jobd import errors
from jobd.client import AsyncClient, AsyncClientPool, JobdError
from jobd.models import TERMINAL

__all__ = ["Principal", "SCRAPER", "error_body", "failure", "metrics_router", "router",
           "snake_keys"]

log = structlog.get_logger()

#: how long one long poll of a stream waits; a heartbeat comment is sent when it ends unchanged
HEARTBEAT_S = 15.0
#: the largest request body taken: a submit's options, metadata and description at their
#: limits (16 KiB, 64 KiB, 1 KiB) with room for JSON escapes, well under jobd's line limit
MAX_BODY_BYTES = 256 * 1024
_UPPER = re.compile(r"(?<=[a-z0-9])([A-Z])")
#: SPEC §4's JSON-RPC code for an HTTP status, for errors that FastAPI raises itself (the
#: last class of a status wins: 400 is an invalid request; a 404 of its own is a URL it
#: does not serve, like an unknown method, never an unknown job)
_CODE_OF_STATUS = {**{cls.http_status: cls.code for cls in errors.BY_CODE.values()},
                   404: errors.MethodNotFound.code}


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is asking, as the web server's own login decided: a user, or one of its admins."""

    user: str
    admin: bool = False


def snake_keys(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``data`` with camelCase keys written in snake_case (``projectId`` → ``project_id``).

    The one converter of every input: bodies, their ``options`` and query strings. A key
    given in both spellings is refused, naming it. Option names are therefore snake_case,
    as jobd's own are (a ``[types]`` option named in camelCase cannot be sent over HTTP).
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _UPPER.sub(lambda m: "_" + m.group(1).lower(), key)
        if name in out:
            # an option is named as a field of the body's options
            raise errors.InvalidParams(f"{where}: {name} is given twice ({key!r} and another "
                                       "spelling); send it once",
                                       field=f"options.{name}" if where == "options" else name)
        out[name] = value
    return out


def error_body(e: JobdError) -> dict[str, Any]:
    """The one error shape of the HTTP face: ``{"error": {code, message, field?, jobId?}}``."""
    inner: dict[str, Any] = {"code": e.code or errors.Unavailable.code, "message": e.message}
    if e.field is not None:
        inner["field"] = e.field
    if e.job_id is not None:
        inner["jobId"] = e.job_id
    return {"error": inner}


def _public(e: Exception) -> JobdError:
    """What went wrong, as the web user may be told it."""
    if isinstance(e, errors.Unreachable):
        # the socket paths tried are the operator's business, not the web user's
        log.warning("jobd_unreachable", error=e.message)
        return errors.Unreachable("jobd is not reachable; try again in a moment")
    if isinstance(e, (RequestValidationError, pydantic.ValidationError)):
        return _invalid(e.errors())
    if isinstance(e, HTTPException):
        error = errors.JobdError(str(e.detail))
        error.http_status = e.status_code
        error.code = _CODE_OF_STATUS.get(e.status_code,
                                         -32600 if e.status_code < 500 else -32603)
        return error
    assert isinstance(e, JobdError)
    return e


def failure(e: Exception) -> JSONResponse:
    """The HTTP answer for what went wrong in an endpoint or while reading its input."""
    error = _public(e)
    headers = e.headers if isinstance(e, HTTPException) else None
    return JSONResponse(error_body(error), status_code=error.http_status, headers=headers)


def _invalid(problems: Any) -> errors.InvalidParams:
    """FastAPI's or pydantic's list of validation problems as one InvalidParams: the first
    names the field, all are in the message."""
    fields, lines = [], []
    for problem in problems:
        loc = [str(p) for p in problem.get("loc", ()) if p not in ("body", "query", "path",
                                                                  "header")]
        field = ".".join(loc) or "body"
        fields.append(field)
        lines.append(f"{field}: {problem.get('msg', 'invalid')}")
    return errors.InvalidParams("; ".join(lines), field=fields[0] if fields else None)


async def _bounded(request: Request) -> None:
    """Refuse a body over MAX_BODY_BYTES before it is parsed, or sent to jobd (whose
    answer to an overlong line is to close the connection). A body without a
    Content-Length (chunked) is read only up to the bound: nobody, signed in or not,
    makes the gateway hold more."""
    length = request.headers.get("content-length", "")
    if length.isdigit():
        if int(length) > MAX_BODY_BYTES:
            raise _too_large(f"is {int(length)} bytes")
        return
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large(f"goes past {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    # Starlette keeps a body it read here: the route's own reading gets it from there
    request._body = b"".join(chunks)


def _too_large(how: str) -> HTTPException:
    return HTTPException(413, f"the request body {how}; the most taken is {MAX_BODY_BYTES} "
                              "bytes (options ≤ 16 KiB, metadata ≤ 64 KiB, "
                              "description ≤ 1 KiB)")


class _ShapedRoute(APIRoute):
    """A route whose every failure is answered in the one error shape.

    The router shapes its own errors (FastAPI's validation errors, the principal's
    HTTPException, jobd's errors) rather than asking the host app to install exception
    handlers: the CIDX app keeps its own error shapes for its own routes.
    """

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def shaped(request: Request) -> Response:
            try:
                await _bounded(request)
                return await handler(request)
            except (JobdError, RequestValidationError, pydantic.ValidationError,
                    HTTPException) as e:
                return failure(e)

        return shaped


class _Input(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class _Body(_Input):
    """A JSON body: its values are taken as jobd takes them (``"yes"`` is no boolean and
    ``"7"`` no priority), where a query string's are all text."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)


class _SyncBody(_Body):
    project_id: str
    options: dict[str, Any] | None = None


class _JobBody(_Body):
    type: str
    project_id: str | None = None
    options: dict[str, Any] | None = None
    priority: int | None = None
    metadata: dict[str, Any] | None = None
    description: str | None = None


class _MaintenanceBody(_Body):
    enabled: bool | None = None
    reason: str | None = None


class _ListQuery(_Input):
    status: str | list[str] | None = None
    type: str | list[str] | None = None
    project_id: str | None = None
    user_id: str | None = None
    id_prefix: str | None = None
    created_after: str | None = None
    created_before: str | None = None
    limit: int | None = None
    cursor: str | None = None
    offset: int | None = None
    order: str | None = None
    with_total: bool | None = None


class _LogsQuery(_Input):
    offset: int | None = None
    limit: int | None = None


class _StatsQuery(_Input):
    since: str | None = None


class _CancelQuery(_Input):
    wait: bool = False


def _query(request: Request, model: type[_Input]) -> Any:
    """The query string read into ``model``: a repeated key is a list."""
    values: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        values.setdefault(key, []).append(value)
    flat = {k: v[0] if len(v) == 1 else v for k, v in values.items()}
    return model.model_validate(snake_keys(flat, "query"))


async def _body(model: type[_Body], request: Request) -> Any:
    """The request's JSON body read into ``model``. Read by the endpoint, once its caller
    is known: a request without a good token is a 401, whatever its body."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        # as FastAPI's own body reading did: a form a cross-site page posts is no JSON
        raise errors.InvalidParams(f"body: Content-Type must be application/json, not "
                                   f"{kind or 'none'}", field="body")
    try:
        body = json.loads(await request.body())
    except json.JSONDecodeError as e:
        raise errors.InvalidParams(f"body: not valid JSON ({e.msg}) at character {e.pos}",
                                   field="body") from None
    except UnicodeDecodeError:
        raise errors.InvalidParams("body: not UTF-8 text", field="body") from None
    except (ValueError, RecursionError) as e:  # an integer past 4,300 digits, deep nesting
        raise errors.InvalidParams(f"body: not JSON jobd takes ({e})"[:200],
                                   field="body") from None
    if not isinstance(body, dict):
        raise errors.InvalidParams(f"body must be a JSON object, not {type(body).__name__}",
                                   field="body")
    return model.model_validate(snake_keys(body, "body"))


def _acting(who: Principal) -> dict[str, Any]:
    """Whom a client acts for, for ``who`` (SPEC §3): a plain user's rights for an
    ordinary user, the web server's admin rights for one of its admins."""
    if who.admin:
        return {"as_user": who.user, "as_admin": True}
    return {"as_user": who.user, "as_role": "user"}


def _options(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """A submit's options as jobd takes them; a repository path is never forwarded."""
    if options is None:
        return None
    options = snake_keys(options, "options")
    if "repo_path" in options:
        raise errors.InvalidParams("options.repo_path is not accepted over HTTP: jobd finds "
                                   "the repository from projectId; leave it out",
                                   field="options.repo_path")
    return options


def _priority(who: Principal, priority: int | None) -> int | None:
    """Capped at 0 for ordinary users (SPEC §10): a web user never jumps the queue."""
    return priority if who.admin or priority is None else min(priority, 0)


def _status(job: dict[str, Any]) -> dict[str, Any]:
    """The seed's status answer, in camelCase."""
    return {"jobId": job["id"], "status": job["status"], "progress": job["progress"],
            "phase": job["phase"], "message": job["message"], "error": job["error"],
            "queuePosition": job["queue_position"], "waitReason": job["wait_reason"],
            "etaS": job["eta_s"], "startedAt": job["started_at"],
            "completedAt": job["completed_at"]}


class _Jobd:
    """The connections of one router: a pool for short calls, and counted own connections."""

    def __init__(self, socket: str | None, pool_size: int, max_streams: int) -> None:
        self.socket = socket
        self.pool = AsyncClientPool(pool_size, socket)
        self.max_streams = max_streams
        self.streams = 0

    async def call(self, who: Principal, method: str, **params: Any) -> Any:
        return await self.pool.acting(**_acting(who)).call(method, **params)

    @contextlib.asynccontextmanager
    async def own(self, who: Principal) -> AsyncIterator[AsyncClient]:
        """A connection of its own, for a call that waits; Unavailable past ``max_streams``."""
        if self.streams >= self.max_streams:
            raise errors.Unavailable(f"{self.max_streams} streams and waiting calls are open "
                                     "already; try again in a moment")
        self.streams += 1
        client = AsyncClient(self.socket, **_acting(who))
        try:
            yield client
        finally:
            self.streams -= 1
            await client.close()


class _EventStream(StreamingResponse):
    """Server-sent events that give their connection back however the response ends
    (finished, client gone, or cancelled before the first byte)."""

    def __init__(self, events: AsyncIterator[str], hold: contextlib.AsyncExitStack) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._hold = hold

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._hold.aclose()


def _event(job: dict[str, Any]) -> str:
    return f"id: {job['version']}\nevent: job\ndata: {json.dumps(job, separators=(',', ':'))}\n\n"


def _last_event_id(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        version = int(value)
    except ValueError:
        version = -1
    if version < 0:
        raise errors.InvalidParams(f"Last-Event-ID {value!r} is not a version this stream sent "
                                   "(a whole number); drop it to start over",
                                   field="Last-Event-ID")
    return version


def router(principal: Callable[..., Any], socket: str | None = None, pool_size: int = 8,
           max_streams: int = 200, heartbeat_s: float = HEARTBEAT_S) -> APIRouter:
    """The routes of SPEC §10 acting for whoever ``principal`` (a FastAPI dependency that
    returns a Principal, or raises HTTPException 401) says is asking.

    ``socket``: jobd's socket (default: SPEC §1's search). ``pool_size`` connections serve
    the short calls; streams and cancels that wait take one of their own, up to
    ``max_streams`` (then 503). ``heartbeat_s``: the longest pause between two writes of
    a stream.
    """
    jobd = _Jobd(socket, pool_size, max_streams)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await jobd.pool.close()

    r = APIRouter(route_class=_ShapedRoute, lifespan=lifespan)
    Who = Depends(principal)

    async def admin(request: Request, who: Principal = Who) -> Principal:
        if not who.admin:
            raise errors.Forbidden(f"{request.method} {request.url.path} is for admins; "
                                   f"{who.user} is not one")
        return who

    Admin = Depends(admin)

    @r.post("/api/sync", status_code=202)
    async def sync(request: Request, response: Response,
                   idempotency_key: str | None = Header(None), who: Principal = Who
                   ) -> dict[str, Any]:
        data = await _body(_SyncBody, request)
        job = await jobd.call(who, "jobs.submit", type="sync", project_id=data.project_id,
                              options=_options(data.options), idempotency_key=idempotency_key)
        response.headers["Location"] = request.url_for("jobd_get_job", job_id=job["id"]).path
        return {"jobId": job["id"], "status": job["status"],
                "deduplicated": job["deduplicated"]}

    @r.post("/api/jobs", status_code=202)
    async def submit(request: Request, who: Principal = Who) -> Any:
        data = await _body(_JobBody, request)
        return await jobd.call(who, "jobs.submit", type=data.type, project_id=data.project_id,
                               options=_options(data.options),
                               priority=_priority(who, data.priority),
                               metadata=data.metadata, description=data.description)

    @r.get("/api/jobs")
    async def list_jobs(request: Request, who: Principal = Who) -> Any:
        filters = _query(request, _ListQuery).model_dump(exclude_none=True)
        return await jobd.call(who, "jobs.list", **filters)

    @r.get("/api/jobs/{job_id}/status")
    async def status(job_id: str, who: Principal = Who) -> dict[str, Any]:
        return _status(await jobd.call(who, "jobs.get", job_id=job_id))

    # a name only jobd's router uses: url_for looks names up across the host's whole app
    @r.get("/api/jobs/{job_id}", name="jobd_get_job")
    async def get_job(job_id: str, who: Principal = Who) -> dict[str, Any]:
        job = await jobd.call(who, "jobs.get", job_id=job_id)
        return {**job, "progress_percentage": job["progress"]}

    @r.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str, request: Request, who: Principal = Who) -> Any:
        if not _query(request, _CancelQuery).wait:
            return await jobd.call(who, "jobs.cancel", job_id=job_id)
        async with jobd.own(who) as client:
            return await client.call("jobs.cancel", job_id=job_id, wait=True)

    @r.post("/api/jobs/{job_id}/retry")
    async def retry(job_id: str, who: Principal = Who) -> Any:
        return await jobd.call(who, "jobs.retry", job_id=job_id)

    @r.get("/api/jobs/{job_id}/events")
    async def events(job_id: str, who: Principal = Who) -> Any:
        return await jobd.call(who, "jobs.events", job_id=job_id)

    @r.get("/api/jobs/{job_id}/logs")
    async def logs(job_id: str, request: Request, who: Principal = Who) -> Any:
        q = _query(request, _LogsQuery)
        try:
            return await jobd.call(who, "jobs.logs", job_id=job_id, offset=q.offset,
                                   limit_bytes=q.limit)
        except errors.InvalidParams as e:
            if e.field != "limit_bytes":
                raise
            # the query's name for it, not the RPC's
            raise errors.InvalidParams(e.message.replace("limit_bytes", "limit", 1),
                                       field="limit") from None

    @r.get("/api/jobs/{job_id}/stream")
    async def stream(job_id: str, last_event_id: str | None = Header(None),
                     who: Principal = Who) -> Response:
        last = _last_event_id(last_event_id)
        hold = contextlib.AsyncExitStack()
        try:
            client = await hold.enter_async_context(jobd.own(who))
            # the first answer comes before the response starts: an unknown or foreign
            # job is a 404 or 403, not a stream that says so
            # at once, also when resuming: the headers go out now, not after a long poll
            job = await client.call("jobs.wait", job_id=job_id, after_version=last,
                                    timeout_s=None if last is None else 0)
        except BaseException:
            await hold.aclose()
            raise
        return _EventStream(_follow(client, job, last, heartbeat_s), hold)

    @r.get("/api/admin/jobs/stats")
    async def stats(request: Request, who: Principal = Admin) -> Any:
        return await jobd.call(who, "admin.stats",
                               since=_query(request, _StatsQuery).since)

    @r.post("/api/admin/pause")
    async def pause(who: Principal = Admin) -> Any:
        return await jobd.call(who, "admin.pause")

    @r.post("/api/admin/resume")
    async def resume(who: Principal = Admin) -> Any:
        return await jobd.call(who, "admin.resume")

    @r.get("/metrics")
    async def metrics(who: Principal = Admin) -> Response:
        return await _metrics(jobd, who)

    @r.get("/api/admin/maintenance")
    async def maintenance_report(who: Principal = Admin) -> Any:
        return await jobd.call(who, "admin.maintenance")

    @r.post("/api/admin/maintenance")
    async def maintenance(request: Request, who: Principal = Admin) -> Any:
        data = await _body(_MaintenanceBody, request)
        return await jobd.call(who, "admin.maintenance", enabled=data.enabled,
                               reason=data.reason)

    return r


#: whom the calls of the metrics listener act for: anyone who reaches that address may
#: read the metrics (SPEC §10), and nothing else
SCRAPER = Principal("jobd-http-metrics", admin=True)


async def _metrics(jobd: _Jobd, who: Principal) -> Response:
    text = (await jobd.call(who, "admin.metrics"))["text"]
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def metrics_router(socket: str | None = None) -> APIRouter:
    """``GET /metrics`` alone, with no sign-in: for ``jobd-http --metrics-listen``, an
    address only a scraper reaches."""
    jobd = _Jobd(socket, 1, 0)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await jobd.pool.close()

    r = APIRouter(route_class=_ShapedRoute, lifespan=lifespan)

    @r.get("/metrics")
    async def metrics() -> Response:
        return await _metrics(jobd, SCRAPER)
    return r


async def _follow(client: AsyncClient, job: dict[str, Any], last: int | None,
                  heartbeat_s: float) -> AsyncIterator[str]:
    """The events of a stream: the job at each version the long poll returns, a heartbeat
    comment when one returned unchanged, until the job's end has been sent."""
    try:
        # a Last-Event-ID past the job's version was not sent by its stream (another
        # job's, or made up): the job as it is now, as if the stream started over
        if last is None or job["version"] != last:
            yield _event(job)
        else:
            yield ": heartbeat\n\n"
        while job["status"] not in TERMINAL:
            fresh = await client.call("jobs.wait", job_id=job["id"],
                                      after_version=job["version"], timeout_s=heartbeat_s)
            yield _event(fresh) if fresh["version"] > job["version"] else ": heartbeat\n\n"
            job = fresh
    except JobdError as e:
        # the status line went out long ago: the failure is the stream's last event
        yield f"event: error\ndata: {json.dumps(error_body(_public(e)))}\n\n"
