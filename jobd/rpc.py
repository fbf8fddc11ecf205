"""The JSON-RPC method table, and the one place where errors become JSON-RPC errors.

Built on jsonrpcserver 5: its dispatcher binds named params to each method's signature
(a missing or unknown param is -32602 naming it) and calls it with the connection's
``Caller`` as context. Its schema validator (about 140 µs a call) is replaced by a cheap
check of the envelope; batches are split here so each item is answered on its own.
Every error's ``data`` is an object ``{http_status, field?, detail?}``, and no code
outside SPEC §4's table is ever sent. Database work runs on a thread pool, never on the
event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import json
import re
from typing import Any, Awaitable, Callable

import structlog
from jsonrpcserver import Error, Success, async_dispatch_to_response
from jsonrpcserver.response import to_serializable_one

from jobd import auth, errors
from jobd.auth import Caller
from jobd.models import RawJSON
from jobd.manager import Manager

__all__ = ["Rpc", "error_line"]

log = structlog.get_logger()

_FIELD = re.compile(r"argument:? '(\w+)'")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def error_line(err: errors.JobdError, id: Any = None) -> str:
    """A JSON-RPC error response line (no newline) for ``err``."""
    return _dumps({"jsonrpc": "2.0", "id": id,
                   "error": {"code": err.code, "message": err.message, "data": err.data()}})


def _envelope_problem(item: Any) -> str | None:
    """Why ``item`` is not a JSON-RPC 2.0 request with named params, or None."""
    if not isinstance(item, dict):
        return "a request must be a JSON object"
    if item.get("jsonrpc") != "2.0":
        return 'a request must have "jsonrpc": "2.0"'
    if not isinstance(item.get("method"), str):
        return 'a request must have a "method" string'
    if "id" in item and not (item["id"] is None or isinstance(item["id"], (str, int))
                             and not isinstance(item["id"], bool)):
        return 'a request\'s "id" must be a string, an integer or null'
    extra = set(item) - {"jsonrpc", "method", "params", "id"}
    if extra:
        return f"unknown request member {sorted(extra)[0]!r}"
    return None


class Rpc:
    """Maps JSON-RPC methods onto the manager for one daemon."""

    def __init__(self, manager: Manager, *, max_batch: int, threads: int = 16) -> None:
        self.manager = manager
        self.max_batch = max_batch
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, "jobd-rpc")
        self.shutting_down = False
        self.methods = self._table()

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    async def offload(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run blocking work (the database) on the pool, with the call's log context."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(ctx.run, fn, *args, **kw))

    # -- the protocol --------------------------------------------------------------------

    async def dispatch(self, line: str, caller: Caller) -> str | None:
        """One request line -> one response line, or None (notifications only)."""
        try:
            doc = json.loads(line)
        except ValueError as e:
            return error_line(errors.ParseError(f"not valid JSON: {e}"))
        if not isinstance(doc, list):
            return await self._one(doc, caller)
        if not doc:
            return error_line(errors.InvalidRequest("an empty batch is not a request"))
        if len(doc) > self.max_batch:
            return error_line(errors.InvalidRequest(
                f"a batch holds at most {self.max_batch} requests (got {len(doc)})"))
        answers = [a for a in [await self._one(item, caller) for item in doc] if a is not None]
        return f"[{','.join(answers)}]" if answers else None

    async def _one(self, item: Any, caller: Caller) -> str | None:
        problem = _envelope_problem(item)
        if problem is not None:
            ident = item.get("id") if isinstance(item, dict) else None
            return error_line(errors.InvalidRequest(problem),
                              ident if isinstance(ident, (str, int)) else None)
        params = item.get("params", {})
        if not isinstance(params, dict):
            err = errors.InvalidParams("params must be an object of named params", field="params")
            return error_line(err, item.get("id"))
        if self.shutting_down and "id" in item:
            return error_line(errors.Unavailable("jobd is shutting down; retry shortly"),
                              item["id"])
        response = await async_dispatch_to_response(
            item, self.methods, context=caller, deserializer=lambda x: x,
            validator=lambda x: x, post_process=to_serializable_one)
        if response is None:
            return None
        if "error" in response:
            return self._error(response["error"], response["id"])
        if isinstance(response["result"], RawJSON):
            return f'{{"jsonrpc":"2.0","id":{_dumps(response["id"])},"result":{response["result"]}}}'
        return _dumps(response)

    @staticmethod
    def _error(error: dict[str, Any], ident: Any) -> str:
        """An error in our shape: ours pass as they are, jsonrpcserver's own are mapped."""
        data = error.get("data")
        if isinstance(data, dict) and "http_status" in data:
            return _dumps({"jsonrpc": "2.0", "id": ident, "error": error})
        detail = data if isinstance(data, str) else None
        if error["code"] == errors.MethodNotFound.code:
            err: errors.JobdError = errors.MethodNotFound(f"no such method: {detail}")
        elif error["code"] == errors.InvalidParams.code:
            m = _FIELD.search(detail or "")
            err = errors.InvalidParams(f"invalid params: {detail}",
                                       field=m.group(1) if m else None)
        else:
            log.error("rpc_library_error", code=error["code"], detail=detail)
            err = errors.InternalError()
        return error_line(err, ident)

    # -- the methods -----------------------------------------------------------------------

    def _table(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        m = self.manager

        def scoped(name: str, fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
            """A user-scoped method: takes as_user/as_admin, runs ``fn(scope, ...)`` off-loop."""
            @functools.wraps(fn)
            async def method(caller: Caller, *, as_user: Any = None, as_admin: Any = False,
                             **params: Any) -> Any:
                structlog.contextvars.clear_contextvars()
                structlog.contextvars.bind_contextvars(method=name, caller=caller.user)
                if isinstance(params.get("job_id"), str):
                    structlog.contextvars.bind_contextvars(job_id=params["job_id"])
                scope = auth.scope(caller, as_user, as_admin)
                if asyncio.iscoroutinefunction(fn):
                    return await fn(scope, **params)
                return await self.offload(fn, scope, **params)
            return _answer(method, fn)

        async def ping(caller: Caller) -> Any:
            return m.ping(caller)

        async def cancel(scope: auth.Scope, job_id: Any, wait: Any = False) -> Any:
            if not isinstance(wait, bool):
                raise errors.InvalidParams("wait must be true or false", field="wait")
            job = await self.offload(m.cancel, scope, job_id)
            if wait and job["status"] == "running":
                job = await m.wait_stopped(scope, job_id)
            return job

        scoped_methods = {
            "jobs.submit": m.submit, "jobs.get": m.get, "jobs.list": m.list,
            "jobs.cancel": cancel, "jobs.retry": m.retry, "jobs.wait": m.wait,
            "jobs.events": m.events, "jobs.logs": m.logs, "admin.stats": m.stats,
            "admin.cleanup": m.cleanup, "admin.pause": m.pause, "admin.resume": m.resume,
        }
        return {"ping": _answer(ping, ping),
                **{name: scoped(name, fn) for name, fn in scoped_methods.items()}}


def _answer(method: Callable[..., Awaitable[Any]], signature_of: Callable[..., Any]
            ) -> Callable[..., Awaitable[Any]]:
    """Wrap a method so a JobdError or a crash becomes a JSON-RPC error in our shape.

    The wrapper shows jsonrpcserver the signature of ``signature_of`` plus the context
    and as_user/as_admin, so missing or unknown params are refused before the call.
    """
    @functools.wraps(method)
    async def answer(caller: Caller, **params: Any) -> Any:
        try:
            return Success(await method(caller, **params))
        except errors.JobdError as e:
            return Error(e.code, e.message, e.data())
        except Exception:
            log.exception("rpc_method_crashed", method=getattr(signature_of, "__name__", "?"))
            crash = errors.InternalError()  # the client gets no traceback
            return Error(crash.code, crash.message, crash.data())
    answer.__signature__ = _signature(signature_of, scoped=method is not signature_of)  # type: ignore[attr-defined]
    return answer


def _signature(fn: Callable[..., Any], *, scoped: bool) -> Any:
    """``fn``'s keyword params after its first (the scope), plus context and as_user/as_admin."""
    import inspect
    params = list(inspect.signature(fn).parameters.values())
    if scoped:
        params = params[1:]  # drop the scope
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
        params += [inspect.Parameter("as_user", inspect.Parameter.KEYWORD_ONLY, default=None),
                   inspect.Parameter("as_admin", inspect.Parameter.KEYWORD_ONLY, default=False)]
        params.insert(0, inspect.Parameter("caller", inspect.Parameter.POSITIONAL_ONLY))
    return inspect.Signature(params)
