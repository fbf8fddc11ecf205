"""The JSON-RPC method table, and the one place where errors become JSON-RPC errors.

Built on jsonrpcserver 5: its dispatcher binds named params to each method's signature
(a missing or unknown param is -32602 naming it) and calls it with the connection's
``Caller`` as context. Its schema validator (about 140 µs a call) is replaced by a cheap
check of the envelope; batches are split here so each item is answered on its own.
Every error's ``data`` is an object ``{http_status, field?, detail?}``, and no code
outside SPEC §4's table is ever sent. Database work runs on a thread pool, never on the
event loop, and so does encoding its answers, which may be large.

What a client sends is checked before any method sees it (SPEC §4, §3a): nesting deeper
than 64 levels is refused before decoding, and one walk over the params refuses lone
surrogates and non-finite numbers, naming the field. No client line reaches -32603, and
hostile lines are logged once per connection.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import itertools
import json
import math
import operator
import re
import time
from typing import Any, Awaitable, Callable

import structlog
from jsonrpcserver import Error, Success
from jsonrpcserver.async_dispatcher import dispatch_request
from jsonrpcserver.dispatcher import create_request, to_response
from jsonrpcserver.response import ServerErrorResponse, to_serializable_one

from jobd import auth, errors, jsonenc
from jobd.auth import Caller
from jobd.models import READ_METHODS, RawJSON
from jobd.manager import ANSWER_ROOM, Manager, jobd_error
from jobd.metrics import OTHER
from jobd.store import StoreError
from jobd.server import Connection

__all__ = ["MAX_DEPTH", "Rpc", "error_line"]

log = structlog.get_logger()

#: the param a signature check names, as ``inspect`` quotes it (``repr``: any name)
_FIELD = re.compile(r"""argument:? ('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
#: SPEC §4: JSON nested deeper than this is refused before it is decoded
MAX_DEPTH = 64
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"')  # possessive: no backtracking
#: bytes.translate: [ and { become (, ] and } become ), everything else goes
_BRACKETS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_TOO_DEEP = b"(" * (MAX_DEPTH + 1)
_RUNS = re.compile(rb"\(+|\)+")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: methods whose answer may be large: they hold answer memory until it is sent
_LARGE_ANSWERS = frozenset({"jobs.list", "jobs.changes", "jobs.events", "jobs.logs"})
#: of those, the long polls: they may wait a while before they build their answer
_WAIT_FIRST = frozenset({"jobs.changes"})
_TOO_LARGE = "response too large"
#: the longest job id a "response too large" names (jobd's are 36 characters)
_JOB_ID_MAX = 64
_DECODE_ON_LOOP = 65536   # longer request lines are decoded on the pool
_SHOWN = 80   # characters of a client's string quoted back in a message


#: compact JSON, its encoder made once (``jobd.jsonenc``)
_dumps = jsonenc.encoder(separators=(",", ":"), ensure_ascii=False)


def _encode(value: Any) -> bytes:
    """A result as JSON bytes (a RawJSON page is already JSON)."""
    return (value if isinstance(value, RawJSON) else _dumps(value)).encode()


def _shown(text: str) -> str:
    """A client's string as quoted back: escaped, and cut if long."""
    return repr(text) if len(text) <= _SHOWN else repr(text[:_SHOWN]) + "…"


def _param_name(found: re.Match[str] | None) -> str | None:
    """The param a signature check's message names (quoted as ``repr`` quotes it)."""
    if found is None:
        return None
    try:
        name = ast.literal_eval(found.group(1))
    except (ValueError, SyntaxError):
        return None
    return name if isinstance(name, str) else None


def error_line(err: errors.JobdError, id: Any = None) -> str:
    """A JSON-RPC error response line (no newline) for ``err``."""
    return _dumps({"jsonrpc": "2.0", "id": id,
                   "error": {"code": err.code, "message": err.message, "data": err.data()}})


def _error_bytes(err: errors.JobdError, id: Any = None) -> bytes:
    return error_line(err, id).encode()


def _nested_over(line: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON ``line`` nests deeper than ``limit``, decided without decoding it.

    A line with few brackets is answered by counting. Otherwise strings are cut out, the
    brackets kept, the innermost pairs taken off (one level), and the depth read from
    the alternating runs of openers and closers that remain: all C-speed passes, a few
    milliseconds for a megabyte. Brackets that do not pair are counted as nesting: such
    a line is not valid JSON either way.
    """
    if line.count(b"[") + line.count(b"{") <= limit:
        return False
    if b'"' in line:
        line = _STRING.sub(b"", line)
    marks = line.translate(_BRACKETS, _NOT_BRACKET)
    if _TOO_DEEP in marks:
        return True
    runs = _RUNS.findall(marks.replace(b"()", b""))
    if runs and runs[0][:1] == b")":
        del runs[0]  # closers before any opener: not JSON; what follows still counts
    if not runs:
        return False
    opened = itertools.accumulate(map(len, runs[0::2]))
    closed = itertools.accumulate(map(len, runs[1::2]), initial=0)
    return max(map(operator.sub, opened, closed)) + 1 > limit  # +1: the pairs taken off


def _decode(line: bytes) -> Any:
    """The JSON value of a request line; raises the JobdError that answers a bad one."""
    if _nested_over(line):
        raise errors.InvalidRequest(f"JSON nested deeper than {MAX_DEPTH} levels; "
                                    "send flatter requests", detail="too deep")
    try:
        text = line.decode()
    except UnicodeDecodeError as e:
        raise errors.ParseError(f"request is not valid UTF-8 (byte {e.start}); "
                                "send JSON encoded as UTF-8") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise errors.InvalidRequest(f"JSON nested deeper than {MAX_DEPTH} levels; "
                                    "send flatter requests", detail="too deep") from None
    except ValueError as e:
        if "integer string conversion" in str(e):  # Python's int-from-text limit
            raise errors.ParseError("not valid JSON here: an integer of more than 4300 "
                                    "digits; send smaller numbers") from None
        raise errors.ParseError(f"not valid JSON: {e}") from None


def _bad_text(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def _unfit(value: Any) -> tuple[list[str | int], str] | None:
    """(path, problem) of the first lone surrogate or non-finite number in ``value``."""
    kind = type(value)
    if kind is str:
        if _bad_text(value):
            return [], "holds a lone surrogate (\\ud800-\\udfff): send valid Unicode"
    elif kind is float:
        if not math.isfinite(value):
            return [], "must be a finite number (NaN, Infinity and 1e400 are refused)"
    elif kind is dict:
        for key, item in value.items():
            if _bad_text(key):
                return [], "has a key holding a lone surrogate: send valid Unicode"
            if type(item) in (str, float, dict, list):
                found = _unfit(item)
                if found is not None:
                    found[0].append(key)
                    return found
    elif kind is list:
        for index, item in enumerate(value):
            if type(item) in (str, float, dict, list):
                found = _unfit(item)
                if found is not None:
                    found[0].append(index)
                    return found
    return None


def _path(segments: list[str | int]) -> str:
    """``["type", "filter"]`` (innermost first) -> ``filter.type``; list items as ``[i]``."""
    out = ""
    for segment in reversed(segments):
        if isinstance(segment, int):
            out += f"[{segment}]"
        else:
            out += f".{segment}" if out else segment
    return out


def _check_params(params: dict[str, Any]) -> None:
    """Refuse lone surrogates and non-finite numbers anywhere in ``params`` (SPEC §3a)."""
    found = _unfit(params)
    if found is not None:
        segments, problem = found
        field = _path(segments) or "params"
        raise errors.InvalidParams(f"{field} {problem}", field=field)


def _envelope_problem(item: Any) -> str | None:
    """Why ``item`` is not a JSON-RPC 2.0 Request object, or None."""
    if not isinstance(item, dict):
        return "a request must be a JSON object"
    if item.get("jsonrpc") != "2.0":
        return 'a request must have "jsonrpc": "2.0"'
    method = item.get("method")
    if not isinstance(method, str):
        return 'a request must have a "method" string'
    if "id" in item:
        ident = item["id"]
        if not (ident is None or isinstance(ident, (str, int)) and not isinstance(ident, bool)):
            return 'a request\'s "id" must be a string, an integer or null'
        if isinstance(ident, str) and _bad_text(ident):
            return 'a request\'s "id" must be valid Unicode (it holds a lone surrogate)'
    extra = set(item) - {"jsonrpc", "method", "params", "id"}
    if extra:
        return f"unknown request member {_shown(sorted(extra)[0])}"
    return None


def _method(item: Any) -> str | None:
    """The method a Request object names, None when it names none (not a string: a list
    or an object, which no set of names may be asked about)."""
    method = item.get("method") if isinstance(item, dict) else None
    return method if isinstance(method, str) else None


def _may_answer_large(item: Any) -> bool:
    """Whether ``item`` may build a large answer: it then takes the caller's answer room
    first, a notification too (a filtered cancel or retry builds its answer, then drops
    it); not a notification of a read, which is not run."""
    method = _method(item)
    return method is not None and ("id" in item or method not in READ_METHODS) and (
        method in _LARGE_ANSWERS
        or isinstance(item.get("params"), dict) and "filter" in item["params"])


class Rpc:
    """Maps JSON-RPC methods onto the manager for one daemon.

    Its limits (``max_batch``, ``max_response_bytes``) are read from ``manager.config``
    for each line, so a reload that replaces the manager's config changes them.
    """

    def __init__(self, manager: Manager, *, threads: int = 16) -> None:
        self.manager = manager
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, "jobd-rpc")
        self.shutting_down = False
        self.methods = self._table()
        self.telemetry = manager.telemetry

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    async def offload(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run blocking work (the database) on the pool, with the call's log context."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(ctx.run, fn, *args, **kw))

    # -- the protocol --------------------------------------------------------------------

    async def dispatch(self, line: bytes, conn: Connection) -> bytes | None:
        """One request line -> one answer line (with its newline), or None."""
        limits = self.manager.config.server
        try:
            # a long line is decoded on the pool: a megabyte of JSON takes milliseconds
            doc = await self.offload(_decode, line) if len(line) > _DECODE_ON_LOOP else _decode(line)
        except errors.JobdError as e:
            conn.refused(e.message)
            return _error_bytes(e) + b"\n"
        if not isinstance(doc, list):
            room = None
            if _may_answer_large(doc):
                if doc.get("method") in _WAIT_FIRST:
                    # a long poll holds room only while it builds an answer, not while it
                    # waits: the manager reserves it (``ANSWER_ROOM``)
                    room = ANSWER_ROOM.set(conn)
                else:
                    await conn.reserve()
            try:
                answer = await self._one(doc, conn)
            finally:
                if room is not None:
                    ANSWER_ROOM.reset(room)
            if answer is None:
                return None
            if len(answer) > limits.max_response_bytes:
                answer = self._too_large(doc, limits.max_response_bytes, answer=answer)
            conn.settle(len(answer) + 1)
            return answer + b"\n"
        if not doc:
            return _error_bytes(errors.InvalidRequest("an empty batch is not a request")) + b"\n"
        if len(doc) > limits.max_batch:
            return _error_bytes(errors.InvalidRequest(
                f"a batch holds at most {limits.max_batch} requests (got {len(doc)})")) + b"\n"
        if any(_may_answer_large(item) for item in doc):
            await conn.reserve()
        return await self._batch(doc, conn, limits.max_response_bytes)

    async def _batch(self, doc: list[Any], conn: Connection, limit: int) -> bytes | None:
        """A batch's answers, in order, within ``limit`` bytes: items past it are -32050.

        Room is kept for a "response too large" error for every item still to come, so
        the line never passes the limit. The first answer that does not fit is dropped as
        soon as it is built, and the items after it are not run (nor are their answers
        built): a client may send them again. A write that was run and did not fit says
        so, naming its job (``_too_large``).
        """
        spares = [self._spare(item, limit) + 1 if _has_id(item) else 0 for item in doc]
        room = limit - 2 - sum(spares)  # 2: the brackets
        answers: list[bytes] = []
        full = False
        for item, spare in zip(doc, spares):
            room += spare
            if full:
                answer = self._too_large(item, limit, run=False) if spare else None
            else:
                answer = await self._one(item, conn)
            if answer is None:
                continue
            if len(answer) + 1 > room:
                answer, full = self._too_large(item, limit, answer=answer), True
            room -= len(answer) + 1
            answers.append(answer)
        if not answers:
            return None
        out = b"[" + b",".join(answers) + b"]\n"
        conn.settle(len(out))
        return out

    def _too_large(self, item: Any, limit: int, *, run: bool = True,
                   answer: bytes | None = None) -> bytes:
        """-32050 "response too large" for ``item``: not ``run`` (past a batch's limit), or
        its ``answer`` dropped; a write's result dropped says that the write was done, and
        names the job it made or changed."""
        done = None
        method = _method(item)
        if answer is not None and method is not None and method not in READ_METHODS:
            done = json.loads(answer)
            if "result" not in done:
                done = None  # an error: nothing was done
            else:
                job_id = done["result"].get("id") if isinstance(done["result"], dict) else None
                done = job_id if isinstance(job_id, str) and len(job_id) <= _JOB_ID_MAX else ""
        return self._too_large_of(item, limit, run=run, done=done)

    def _spare(self, item: Any, limit: int) -> int:
        """The room a batch keeps for ``item``'s "response too large": its longest form, a
        write done with the longest job id (in the message and in ``data``)."""
        return len(self._too_large_of(item, limit, run=True, done="x" * _JOB_ID_MAX))

    def _too_large_of(self, item: Any, limit: int, *, run: bool, done: str | None) -> bytes:
        method = item.get("method") if isinstance(item, dict) else None
        ident = item.get("id") if _has_id(item) else None
        if not run:
            message = (f"{method} was not run: the batch's earlier answers fill "
                       f"server.max_response_bytes ({limit} bytes); send it again, or fewer "
                       "items per batch")
        elif done is not None:
            message = (f"{method} was done{f' (job {done})' if done else ''}, but its "
                       f"answer is larger than server.max_response_bytes ({limit} bytes) "
                       "lets through here: do not send it again; jobs.get reads the job")
        else:
            message = (f"the answer to {method} is larger than server.max_response_bytes "
                       f"({limit} bytes); ask for less (a smaller limit, fields) or fewer "
                       "items per batch")
        return _error_bytes(errors.Unavailable(message, detail=_TOO_LARGE,
                                               job_id=done or None), ident)

    async def _one(self, item: Any, conn: Connection) -> bytes | None:
        """One Request object's answer (no newline), or None for a notification; each
        answered call counted in the metrics by its method and code, with its time."""
        started = time.perf_counter()
        problem = _envelope_problem(item)
        if problem is not None:
            conn.refused(problem)
            return self._refused(errors.InvalidRequest(problem), None, OTHER, started)
        notification = "id" not in item
        ident = item.get("id")
        method = item["method"] if item["method"] in self.methods else OTHER
        if _bad_text(item["method"]):
            # no method has such a name: a notification of it is not answered, as for any
            # unknown method, and a call hears so without the name echoed back
            return None if notification else self._refused(errors.MethodNotFound(
                "no such method (its name holds a lone surrogate: send valid Unicode)"),
                ident, method, started)
        params = item.get("params", {})
        try:
            if not isinstance(params, dict):
                raise errors.InvalidParams("params must be an object of named params "
                                           "(positional params are not taken)", field="params")
            _check_params(params)
        except errors.InvalidParams as e:
            if not notification:
                conn.refused(e.message)
            return None if notification else self._refused(e, ident, method, started)
        if notification and item["method"] in READ_METHODS:
            # nothing would tell that it ran (JSON-RPC 2.0: no answer), and its answer, a
            # list of a thousand jobs, would cost others' time to build
            return None
        if self.shutting_down:
            return None if notification else self._refused(
                errors.Unavailable("jobd is shutting down; retry shortly"), ident, method,
                started)
        response = await self._call(item, conn.caller)
        if response is None:
            return None
        if "error" in response:
            code, answer = self._error(response["error"], response["id"])
            self.telemetry.rpc(method, code, time.perf_counter() - started)
            return answer.encode()
        self.telemetry.rpc(method, 0, time.perf_counter() - started)
        result = response["result"]
        encoded = result if isinstance(result, bytes) else _encode(result)
        return b'{"jsonrpc":"2.0","id":%s,"result":%s}' % (_dumps(ident).encode(), encoded)

    def _refused(self, err: errors.JobdError, ident: Any, method: str,
                 started: float) -> bytes:
        """A call refused before its method ran: its error line, counted."""
        self.telemetry.rpc(method, err.code, time.perf_counter() - started)
        return _error_bytes(err, ident)

    async def _call(self, item: dict[str, Any], caller: Caller) -> dict[str, Any] | None:
        """jsonrpcserver's dispatch of one request whose envelope and params are checked:
        its ``dispatch_request`` (method lookup, arguments bound to the signature, the
        call) and ``to_response``; None for a notification. Its ``dispatch_to_response``
        would add only what is done here already (decoding, validation) and a task per
        request for batches: one more turn of the event loop for every call."""
        request = create_request(item)
        try:
            _, result = await dispatch_request(self.methods, caller, request)
        except Exception as exc:  # as dispatch_to_response answers it
            log.exception("rpc_library_failed")
            return to_serializable_one(ServerErrorResponse(str(exc), None))
        if "id" not in item:
            return None
        return to_serializable_one(to_response(request, result))

    @staticmethod
    def _error(error: dict[str, Any], ident: Any) -> tuple[int, str]:
        """An error in our shape, and its code: ours pass as they are, jsonrpcserver's
        own are mapped."""
        data = error.get("data")
        if isinstance(data, dict) and "http_status" in data:
            return error["code"], _dumps({"jsonrpc": "2.0", "id": ident, "error": error})
        detail = data if isinstance(data, str) else None
        if error["code"] == errors.MethodNotFound.code:
            name = detail or ""
            err: errors.JobdError = errors.MethodNotFound(
                f"no such method: {name if len(name) <= _SHOWN else _shown(name)}")
        elif error["code"] == errors.InvalidParams.code:
            m = _FIELD.search(detail or "")
            err = errors.InvalidParams(f"invalid params: {detail}", field=_param_name(m))
        else:
            log.error("rpc_library_error", code=error["code"], detail=detail)
            err = errors.InternalError()
        return err.code, error_line(err, ident)

    # -- the methods -----------------------------------------------------------------------

    def _table(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        m = self.manager

        def scoped(name: str, fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
            """A user-scoped method: takes as_user/as_admin/as_role, runs ``fn(scope, ...)``."""
            on_loop = asyncio.iscoroutinefunction(fn)

            @functools.wraps(fn)
            async def method(caller: Caller, *, as_user: Any = None, as_admin: Any = False,
                             as_role: Any = None, **params: Any) -> Any:
                structlog.contextvars.clear_contextvars()
                structlog.contextvars.bind_contextvars(method=name, caller=caller.user)
                if isinstance(params.get("job_id"), str):
                    structlog.contextvars.bind_contextvars(job_id=params["job_id"])
                scope = auth.scope(caller, as_user, as_admin, as_role, config=m.config)
                if on_loop:
                    return await fn(scope, **params)
                # encoded where it was built, so a large answer costs the event loop nothing
                return await self.offload(lambda: _encode(fn(scope, **params)))
            return _answer(method, fn)

        async def ping(caller: Caller) -> Any:
            return m.ping(caller)

        scoped_methods = {
            "jobs.submit": m.submit, "jobs.get": m.get, "jobs.list": m.list,
            "jobs.cancel": m.cancel, "jobs.retry": m.retry, "jobs.wait": m.wait,
            "jobs.changes": m.changes, "jobs.events": m.events, "jobs.logs": m.logs,
            "admin.stats": m.stats,
            "admin.cleanup": m.cleanup, "admin.pause": m.pause, "admin.resume": m.resume,
            "admin.maintenance": m.maintenance, "admin.purge": m.purge,
            "admin.metrics": m.metrics,
        }
        return {"ping": _answer(ping, ping),
                **{name: scoped(name, fn) for name, fn in scoped_methods.items()}}


def _answer(method: Callable[..., Awaitable[Any]], signature_of: Callable[..., Any]
            ) -> Callable[..., Awaitable[Any]]:
    """Wrap a method so a JobdError or a crash becomes a JSON-RPC error in our shape.

    The wrapper shows jsonrpcserver the signature of ``signature_of`` plus the context
    and as_user/as_admin/as_role, so missing or unknown params are refused before the call.
    """
    @functools.wraps(method)
    async def answer(caller: Caller, **params: Any) -> Any:
        try:
            return Success(await method(caller, **params))
        except errors.JobdError as e:
            return Error(e.code, e.message, e.data())
        except StoreError as e:
            err = jobd_error(e)
            return Error(err.code, err.message, err.data())
        except Exception:
            log.exception("rpc_method_crashed", method=getattr(signature_of, "__name__", "?"))
            crash = errors.InternalError()  # the client gets no traceback
            return Error(crash.code, crash.message, crash.data())
    answer.__signature__ = _signature(signature_of, scoped=method is not signature_of)  # type: ignore[attr-defined]
    return answer


class _Checked(inspect.Signature):
    """A method's signature as jsonrpcserver checks every call against it (its
    ``validate_args`` binds the call to ``inspect.signature(method)``, about 7 µs in
    ``inspect``'s own ``bind``): a call that fits, the context and only keyword params
    the method names, every required one among them, is bound by two set comparisons;
    any other goes to ``inspect``'s ``bind``, whose TypeError names the missing or
    unknown param."""

    __slots__ = ("_positional", "_keywords", "_required")

    def __init__(self, parameters: list[inspect.Parameter], **kw: Any) -> None:
        super().__init__(parameters, **kw)
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._positional = tuple(p.name for p in parameters if p.kind in kinds)
        keywords = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
        self._keywords = frozenset(p.name for p in keywords)
        self._required = frozenset(p.name for p in keywords
                                   if p.default is inspect.Parameter.empty)

    def bind(self, *args: Any, **kwargs: Any) -> inspect.BoundArguments:
        if len(args) == len(self._positional) and (
                self._required <= kwargs.keys() <= self._keywords):
            arguments = dict(zip(self._positional, args), **kwargs)
            return inspect.BoundArguments(self, arguments)  # type: ignore[arg-type]
        return super().bind(*args, **kwargs)


def _signature(fn: Callable[..., Any], *, scoped: bool) -> _Checked:
    """``fn``'s keyword params after its first (the scope), plus context and as_user,
    as_admin and as_role."""
    params = list(inspect.signature(fn).parameters.values())
    if scoped:
        params = params[1:]  # drop the scope
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
        params += [inspect.Parameter("as_user", inspect.Parameter.KEYWORD_ONLY, default=None),
                   inspect.Parameter("as_admin", inspect.Parameter.KEYWORD_ONLY, default=False),
                   inspect.Parameter("as_role", inspect.Parameter.KEYWORD_ONLY, default=None)]
        params.insert(0, inspect.Parameter("caller", inspect.Parameter.POSITIONAL_ONLY))
    return _Checked(params)


def _has_id(item: Any) -> bool:
    """A Request that gets an answer: a valid one with an id (an invalid one gets id null)."""
    return isinstance(item, dict) and "id" in item and _envelope_problem(item) is None
