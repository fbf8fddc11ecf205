"""``jobd.client``'s Client and AsyncClient against a real daemon (SPEC §4, §8).

Each test runs twice, once per client: the scenario is written as a coroutine that
calls ``call(client, method, ...)``, which awaits the AsyncClient's coroutines and
simply calls the blocking Client. One daemon serves the module, with a short
``idle_timeout`` so that the reconnect test need not wait long; each test acts for a
user of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import Daemon
from jobd import errors
from jobd.client import AsyncClient, AsyncClientPool, Client

CONFIG = """
[server]
idle_timeout = "1s"

[execution]
workers = 4
cancel_grace = "1s"
shutdown_grace = "5s"
"""

#: SPEC §2: every field of a job
JOB_FIELDS = {
    "id", "type", "user_id", "project_id", "status", "progress", "phase", "message",
    "priority", "options", "metadata", "result", "error", "attempts", "queue_position",
    "wait_reason", "cancel_requested", "version", "description", "timeout_s", "created_at",
    "started_at", "completed_at", "updated_at", "eta_s",
}
TERMINAL = ("completed", "failed", "cancelled")

_users = itertools.count(1)


@pytest.fixture(scope="module")
def jd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("client"), CONFIG).start()
    yield d
    assert d.stop() == 0
    assert "rpc_method_crashed" not in d.log()


@pytest.fixture
def who() -> str:
    return f"cl{os.getpid()}x{next(_users)}"


@pytest.fixture(params=["Client", "AsyncClient"])
def make(request: pytest.FixtureRequest) -> Callable[..., Client | AsyncClient]:
    """Makes clients of the class under test."""
    cls = {"Client": Client, "AsyncClient": AsyncClient}[request.param]
    return cls  # type: ignore[return-value]


async def call(client: Client | AsyncClient, method: str, *args: Any, **kw: Any) -> Any:
    """``client.method(...)``, awaited when the client is an AsyncClient."""
    result = getattr(client, method)(*args, **kw)
    return await result if asyncio.iscoroutine(result) else result


async def close(client: Client | AsyncClient) -> None:
    result = client.close()
    if asyncio.iscoroutine(result):
        await result


async def until_terminal(client: Client | AsyncClient, job: dict[str, Any],
                         timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while job["status"] not in TERMINAL:
        left = deadline - time.monotonic()
        assert left > 0, f"job {job['id']} still {job['status']} after {timeout}s"
        job = await call(client, "wait", job["id"], after_version=job["version"],
                         timeout_s=min(left, 5.0))
    return job


async def raises(cls: type[errors.JobdError], client: Client | AsyncClient, method: str,
                 *args: Any, **kw: Any) -> errors.JobdError:
    """The error of one call that must fail with ``cls``."""
    with pytest.raises(cls) as info:
        await call(client, method, *args, **kw)
    assert isinstance(info.value, errors.JobdError)
    return info.value


def a_job(job: Any) -> dict[str, Any]:
    assert isinstance(job, dict) and JOB_FIELDS <= set(job), sorted(JOB_FIELDS - set(job))
    return job


# -- every method --------------------------------------------------------------------------

def test_every_method_returns_its_documented_shape(jd: Daemon, who: str, make: Any) -> None:
    async def scenario() -> None:
        admin = make(socket=str(jd.socket))
        mine = make(socket=str(jd.socket), as_user=who)
        try:
            ping = await call(mine, "ping")
            assert set(ping) == {"version", "uptime_s", "caller"}
            assert ping["caller"] == {"uid": os.getuid(), "user": "root", "role": "admin"}
            assert mine.socket_path == jd.socket

            assert await call(admin, "pause") == {"paused": True}
            try:
                job = a_job(await call(mine, "submit", "noop", options={"seconds": 0},
                                       metadata={"k": [1, "ü"]}, description="shape"))
                assert job["deduplicated"] is False
                assert (job["status"], job["wait_reason"], job["user_id"]) == (
                    "queued", "paused", who)
                assert job["metadata"] == {"k": [1, "ü"]}
                got = a_job(await call(mine, "get", job["id"]))
                assert got["id"] == job["id"] and "deduplicated" not in got
                held = a_job(await call(mine, "wait", job["id"], after_version=got["version"],
                                        timeout_s=0.2))  # paused: unchanged at the timeout
                assert (held["version"], held["status"]) == (got["version"], "queued")
                page = await call(mine, "list")
                assert set(page) == {"jobs", "next_cursor"} and page["next_cursor"] is None
                assert [a_job(j)["id"] for j in page["jobs"]] == [job["id"]]
                stats = await call(admin, "stats")
                assert set(stats) == {"jobs", "by_type", "finished", "running", "queued",
                                      "workers", "per_user", "per_user_truncated", "paused",
                                      "maintenance", "config", "db_bytes", "uptime_s"}
                assert stats["paused"] is True and stats["jobs"]["queued"] >= 1
                assert stats["per_user"][who] == {"running": 0, "queued": 1}
            finally:
                assert await call(admin, "resume") == {"paused": False}
            done = a_job(await until_terminal(mine, job))
            assert done["status"] == "completed" and done["result"] == {"slept_s": 0.0}

            events = await call(mine, "events", job["id"])
            assert [e["status"] for e in events][:2] == ["created", "queued"]
            assert events[-1]["status"] == "completed"
            assert all(set(e) == {"at", "status", "phase", "progress", "message", "actor"}
                       for e in events)

            cmd = await call(mine, "submit", "command",
                             options={"argv": ["sh", "-c", "echo out; sleep 30"]})
            while cmd["status"] != "running":
                cmd = await call(mine, "wait", cmd["id"], after_version=cmd["version"],
                                 timeout_s=5)
            # running is recorded before the process starts: let it print before cancelling
            for _ in range(500):
                if "\nout\n" in (await call(mine, "logs", cmd["id"]))["data"]:
                    break
                await asyncio.sleep(0.01)
            asked = a_job(await call(mine, "cancel", cmd["id"]))
            assert asked["status"] == "running" and asked["cancel_requested"] is True
            stopped = a_job(await call(mine, "cancel", cmd["id"], wait=True))
            assert stopped["status"] == "cancelled"
            logs = await call(mine, "logs", cmd["id"])
            assert set(logs) == {"data", "next_offset", "eof"}
            assert "\nout\n" in logs["data"] and logs["eof"] is True
            size = len(logs["data"].encode())
            assert logs["next_offset"] == size
            at = logs["data"].index("\nout\n") + 2
            part = await call(mine, "logs", cmd["id"], offset=at, limit_bytes=2)
            assert part == {"data": "ut", "next_offset": at + 2, "eof": False}

            again = a_job(await call(mine, "retry", cmd["id"]))
            assert (again["id"], again["status"]) == (cmd["id"], "queued")
            await call(mine, "cancel", cmd["id"], wait=True)

            swept = await call(admin, "cleanup", older_than_s=3600, dry_run=True)
            assert set(swept) >= {"deleted", "cutoffs"} and swept["deleted"] == 0
            assert set(swept["cutoffs"]) == {"keep", "keep_failed"}
        finally:
            await close(admin)
            await close(mine)

    asyncio.run(scenario())


# -- errors --------------------------------------------------------------------------------

def test_errors_surface_as_named_exceptions_with_code_and_http_status(
        jd: Daemon, who: str, make: Any) -> None:
    async def scenario() -> None:
        mine = make(socket=str(jd.socket), as_user=who)
        bob = make(socket=str(jd.socket), as_user=f"{who}bob")
        try:
            missing = str(uuid.uuid4())
            e = await raises(errors.NotFound, mine, "get", missing)
            assert (e.code, e.http_status, e.field) == (-32004, 404, "job_id")
            assert missing in e.message

            e = await raises(errors.InvalidParams, mine, "get", "not-a-uuid")
            assert (e.code, e.http_status, e.field) == (-32602, 422, "job_id")
            e = await raises(errors.InvalidParams, mine, "list", limit=0)
            assert e.field == "limit"
            e = await raises(errors.InvalidParams, mine, "submit", "command",
                             options={"argv": "ls"})
            assert e.field == "options.argv"

            job = await call(mine, "submit", "noop", options={"seconds": 0})
            job = await until_terminal(mine, job)
            e = await raises(errors.Conflict, mine, "cancel", job["id"])
            assert (e.code, e.http_status) == (-32009, 409)
            assert e.detail == {"status": "completed"}
            e = await raises(errors.Conflict, mine, "retry", job["id"])
            assert e.http_status == 409

            e = await raises(errors.Forbidden, bob, "get", job["id"])
            assert (e.code, e.http_status) == (-32003, 403)
            e = await raises(errors.Forbidden, bob, "list", user_id=who)
            assert e.http_status == 403

            e = await raises(errors.MethodNotFound, mine, "call", "jobs.nope")
            assert (e.code, e.http_status) == (-32601, 404)

            # the connection is still good after all those errors
            assert (await call(mine, "get", job["id"]))["status"] == "completed"
        finally:
            await close(mine)
            await close(bob)

    asyncio.run(scenario())


# -- the connection ------------------------------------------------------------------------

def test_reconnects_after_the_daemon_closed_an_idle_connection(jd: Daemon, who: str,
                                                               make: Any) -> None:
    def idle_closes() -> int:
        return sum(1 for e in jd.log_events() if e.get("event") == "connection_timed_out"
                   and e.get("timeout") == "idle_timeout" and e.get("pid") == os.getpid())

    async def scenario() -> None:
        client = make(socket=str(jd.socket), as_user=who)
        try:
            before = idle_closes()
            await call(client, "ping")
            deadline = time.monotonic() + 10
            while idle_closes() == before:  # the daemon closes it after idle_timeout (1 s)
                assert time.monotonic() < deadline, "the daemon never closed the idle connection"
                await asyncio.sleep(0.05)
            # a submit is not resent after a broken call, so it must go out on a new connection
            job = await call(client, "submit", "noop", options={"seconds": 0})
            assert job["status"] in ("queued", "running", "completed")
            page = await call(client, "list")
            assert [j["id"] for j in page["jobs"]] == [job["id"]]
        finally:
            await close(client)

    asyncio.run(scenario())


def test_a_submit_after_a_line_too_long_goes_out_on_a_new_connection(jd: Daemon,
                                                                    who: str) -> None:
    # the daemon answers -32600 and closes the connection: the pool's one client must not
    # send the next submit on it before its event loop has seen the end
    async def scenario() -> None:
        pool = AsyncClientPool(1, socket=str(jd.socket), as_user=who)
        try:
            await pool.ping()
            for _ in range(3):
                with pytest.raises(errors.InvalidRequest):
                    await pool.submit("noop", metadata={"x": "a" * (1100 << 10)})
                job = await pool.submit("noop", options={"seconds": 0})
                assert job["status"] in ("queued", "running", "completed")
        finally:
            await pool.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("size", [1100 << 10, 4 << 20])
def test_a_line_the_daemon_cuts_off_is_an_invalid_request_not_a_broken_connection(
        jd: Daemon, who: str, make: Any, size: int) -> None:
    """SPEC §4: a line over max_message_bytes gets -32600 and the connection is closed.
    Far over it, the daemon closes while the client still sends: the client reads the
    answer left for it rather than reporting a connection that broke (whose call may or
    may not have taken effect), and its next call goes out on a new connection."""
    async def scenario() -> None:
        client = make(socket=str(jd.socket), as_user=who)
        try:
            for _ in range(2):
                e = await raises(errors.InvalidRequest, client, "submit", "noop",
                                 metadata={"x": "a" * size})
                assert e.code == -32600 and e.http_status == 400, e
                assert (await call(client, "ping"))["caller"]["user"]
        finally:
            await close(client)

    asyncio.run(scenario())


def test_an_async_client_works_under_one_event_loop_after_another(jd: Daemon, who: str) -> None:
    client = AsyncClient(socket=str(jd.socket), as_user=who)
    # each run is a new event loop: the connection of the one before is no use in it
    for _ in range(3):
        assert asyncio.run(client.ping())
    # and a pool, and its views, the same: more calls at once than it has connections,
    # so that calls wait for a free one in each loop
    pool = AsyncClientPool(2, socket=str(jd.socket), as_user=who)
    view = pool.acting(who)

    async def busy() -> list[Any]:
        return await asyncio.gather(*(c.ping() for c in (pool, view, pool, view, pool)))
    for _ in range(3):
        assert all(asyncio.run(busy()))
    asyncio.run(pool.close())


def test_a_list_answer_over_64_kib_comes_through_intact(jd: Daemon, who: str,
                                                        make: Any) -> None:
    async def scenario() -> None:
        client = make(socket=str(jd.socket), as_user=who)
        try:
            sent = []
            for i in range(12):
                metadata = {"i": i, "blob": f"{i:02d}" + "é✓x" * 3000}
                job = await call(client, "submit", "noop", options={"seconds": 0},
                                 metadata=metadata)
                sent.append((job["id"], metadata))
            page = await call(client, "list", limit=12)
            assert len(json.dumps(page, ensure_ascii=False).encode()) > 128 * 1024
            assert [(j["id"], j["metadata"]) for j in page["jobs"]] == list(reversed(sent))
        finally:
            await close(client)

    asyncio.run(scenario())


def test_unreachable_lists_every_path_tried(monkeypatch: pytest.MonkeyPatch, make: Any) -> None:
    if Path("/run/jobd/jobd.sock").exists():
        pytest.skip("a system jobd socket exists at /run/jobd/jobd.sock")
    runtime = Path(tempfile.mkdtemp(prefix="jobd-rt-", dir="/tmp"))
    try:
        stale = runtime / "jobd" / "jobd.sock"
        stale.parent.mkdir()
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(stale))  # bound, never listening: what a crashed daemon leaves behind
        monkeypatch.delenv("JOBD_SOCKET", raising=False)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))

        async def scenario() -> errors.JobdError:
            client = make()
            try:
                return await raises(errors.Unreachable, client, "ping")
            finally:
                await close(client)

        e = asyncio.run(scenario())
        assert e.http_status == 503
        assert e.detail == {"tried": [
            f"socket {stale}: no daemon answers (connection refused)",
            "socket /run/jobd/jobd.sock: no daemon answers (no such file)"]}
        assert str(stale) in e.message and "/run/jobd/jobd.sock" in e.message
        assert "systemctl start jobd" in e.message

        # a socket named by the caller is the only one tried
        monkeypatch.setenv("JOBD_SOCKET", str(runtime / "elsewhere.sock"))
        e = asyncio.run(scenario())
        assert e.detail == {"tried": [
            f"socket {runtime / 'elsewhere.sock'}: no daemon answers (no such file)"]}
    finally:
        shutil.rmtree(runtime)


# -- the follow protocol (SPEC §8): watch, tail, resolve; the pool --------------------------

async def collect(client: Client | AsyncClient, method: str, *args: Any, **kw: Any) -> list[Any]:
    """Everything ``client.method(...)`` yields, iterated with ``async for`` when async."""
    stream = getattr(client, method)(*args, **kw)
    if hasattr(stream, "__aiter__"):
        return [item async for item in stream]
    return list(stream)


def test_errors_are_importable_from_jobd_client() -> None:
    from jobd import client
    from jobd.client import Client as C, Forbidden, NotFound, Unreachable  # noqa: F401
    for name in ("InvalidRequest", "MethodNotFound", "InvalidParams", "Unauthenticated",
                 "Forbidden", "NotFound", "Conflict", "LimitExceeded", "Unavailable",
                 "InternalError", "Unreachable", "JobdError"):
        assert getattr(client, name) is getattr(errors, name) and name in client.__all__


def test_watch_yields_every_change_until_the_end_and_tail_the_log(jd: Daemon, who: str,
                                                                  make: Any) -> None:
    script = "for p in 20 40 60; do echo line $p; echo \"{\\\"progress\\\": $p}\"; sleep 0.2; done"

    async def scenario() -> None:
        client = make(socket=jd.socket, as_user="root")
        try:
            job = await call(client, "submit", "command",
                             options={"argv": ["sh", "-c", script]})
            seen = await collect(client, "watch", job["id"])
            assert seen[-1]["status"] == "completed"
            versions = [j["version"] for j in seen]
            assert versions == sorted(set(versions)), "a change yielded twice or out of order"
            assert {20.0, 40.0, 60.0} <= {j["progress"] for j in seen}
            pages = await collect(client, "tail", job["id"])
            text = "".join(p["data"] for p in pages)
            assert [ln for ln in text.splitlines() if ln.startswith("line")] == [
                "line 20", "line 40", "line 60"]
            assert pages[-1]["eof"] is True
            # from an offset: only what follows it
            rest = await collect(client, "tail", job["id"], offset=pages[-1]["next_offset"] - 8)
            assert "".join(p["data"] for p in rest) == text[-8:]
        finally:
            await close(client)
    asyncio.run(scenario())


def test_watch_stops_at_its_timeout_and_tail_follows_to_the_end(jd: Daemon, who: str,
                                                                make: Any) -> None:
    async def scenario() -> None:
        client = make(socket=jd.socket, as_user="root")
        try:
            job = await call(client, "submit", "command", options={
                "argv": ["sh", "-c", "sleep 0.8; echo late"]})
            started = time.monotonic()
            seen = await collect(client, "watch", job["id"], timeout=0.3)
            assert time.monotonic() - started < 2 and seen[-1]["status"] in ("queued", "running")
            pages = await collect(client, "tail", job["id"], follow=True)
            assert "late" in "".join(p["data"] for p in pages) and pages[-1]["eof"]
        finally:
            await close(client)
    asyncio.run(scenario())


@pytest.fixture(scope="module")
def crowd(jd: Daemon) -> tuple[str, list[str], list[str]]:
    """(user, their job ids, the ids that share a 4-character prefix): jobs are submitted
    until two ids share one (about 300 of them for 16^4 prefixes)."""
    user = f"crowd{os.getpid()}"
    ids: list[str] = []
    seen: dict[str, str] = {}
    with jd.client(as_user=user) as c:
        while len(ids) < 20_000:
            job_id = c.submit("noop", options={"seconds": 0})["id"]
            ids.append(job_id)
            if job_id[:4] in seen:
                return user, ids, [i for i in ids if i.startswith(job_id[:4])]
            seen[job_id[:4]] = job_id
    pytest.fail("no two of 20,000 ids share 4 characters")


def test_resolve_names_the_one_match_and_every_match_of_an_ambiguous_prefix(
        jd: Daemon, crowd: tuple[str, list[str], list[str]], make: Any) -> None:
    user, ids, shared = crowd

    async def scenario() -> None:
        client = make(socket=jd.socket, as_user=user)
        try:
            unique = next(i for i in ids if i[:6] != shared[0][:6])
            assert await call(client, "resolve", unique[:6].upper()) == unique
            assert await call(client, "resolve", unique) == unique
            e = await raises(errors.InvalidParams, client, "resolve", shared[0][:4])
            assert f"ambiguous prefix {shared[0][:4]!r}: it matches {len(shared)} jobs: " \
                   f"{', '.join(sorted(shared, key=ids.index, reverse=True))}; " in e.message
            assert e.detail == {"matches": sorted(shared, key=ids.index, reverse=True)}
            free = next(p for p in ("ffff", "0000", "1234") if not any(
                i.startswith(p) for i in ids))
            await raises(errors.NotFound, client, "resolve", free)
            await raises(errors.InvalidParams, client, "resolve", "abc")
        finally:
            await close(client)
    asyncio.run(scenario())


def test_a_pool_makes_calls_at_once_each_connection_one_at_a_time(make_daemon: Any) -> None:
    d = make_daemon()

    async def scenario() -> None:
        async with AsyncClientPool(3, socket=d.socket) as pool:
            await pool.pause()  # a queued job does not change: each long poll lasts its timeout
            job = await pool.submit("noop", options={"seconds": 0})

            async def polls(n: int, timeout_s: float) -> float:
                started = time.monotonic()
                held = await asyncio.gather(*(pool.wait(job["id"], after_version=job["version"],
                                                        timeout_s=timeout_s) for _ in range(n)))
                assert all(h["version"] == job["version"] for h in held)
                return time.monotonic() - started

            together = await polls(3, 1.0)
            assert 0.95 <= together < 1.8, f"3 long polls on a pool of 3 took {together:.1f} s"
            assert await polls(4, 0.5) >= 0.95  # the fourth waits for a free connection
            assert pool.socket_path == d.socket
    asyncio.run(scenario())


def test_a_pool_acts_for_each_web_user_on_the_same_connections(make_daemon: Any) -> None:
    """What a web server does: one pool, and for each request a view acting for its user
    (with a plain user's rights through ``as_role``), the scope sent with every call."""
    d = make_daemon()

    async def scenario() -> None:
        async with AsyncClientPool(2, socket=d.socket) as pool:
            await pool.pause()
            alice_job = await pool.acting("alice@example.com").submit(
                "noop", options={"seconds": 0})
            assert alice_job["user_id"] == "alice@example.com"
            alice = pool.acting("alice@example.com", as_role="user")
            jane = pool.acting("Jane Doe", as_role="user")
            with pytest.raises(errors.Forbidden):  # noop is for admins: the role is sent
                await alice.submit("noop", options={"seconds": 0})
            assert [j["id"] for j in (await alice.list())["jobs"]] == [alice_job["id"]]
            assert (await jane.list())["jobs"] == []
            with pytest.raises(errors.Forbidden):
                await jane.get(alice_job["id"])
            seen = [j async for j in alice.watch(alice_job["id"], timeout=0.2)]
            assert seen and seen[0]["id"] == alice_job["id"]
            assert await alice.resolve(alice_job["id"][:8]) == alice_job["id"]
            # the views took no connections of their own, and the pool acts for nobody
            assert pool.as_user is None and pool.size == 2
            assert (await pool.stats())["jobs"]["queued"] == 1
    asyncio.run(scenario())


def test_watch_reconnects_across_a_restart_and_says_so(make_daemon: Any, make: Any) -> None:
    d = make_daemon()

    async def scenario() -> None:
        client = make(socket=d.socket)
        lost: list[errors.JobdError] = []
        try:
            job = await call(client, "submit", "noop", options={"seconds": 2})
            # the restart happens while the watch long-polls, as it would for real
            restart = threading.Timer(0.5, lambda: (d.kill(), time.sleep(1), d.start()))
            restart.start()
            try:
                seen = await collect(client, "watch", job["id"], on_reconnect=lost.append)
            finally:
                restart.join()
            assert lost and all(isinstance(e, (errors.Unreachable, errors.Unavailable))
                                for e in lost)
            assert seen[-1]["status"] in ("completed", "failed"), seen[-1]
        finally:
            await close(client)
    asyncio.run(scenario())


def test_a_watch_and_a_tail_end_at_their_timeout_while_the_daemon_is_away(
        make_daemon: Any, make: Any) -> None:
    """A timeout bounds the wait, the daemon's absence too: the watch ends when it runs
    out (jobctl then exits 4), not after the reconnect budget (30 s) with Unreachable."""
    d = make_daemon()

    async def scenario() -> None:
        client = make(socket=d.socket)
        try:
            job = await call(client, "submit", "noop", options={"seconds": 60})
            for method, args in (("watch", {}), ("tail", {"follow": True})):
                if d.proc is None or d.proc.poll() is not None:
                    d.start()
                gone = threading.Timer(0.5, d.kill)  # while the watch long-polls
                gone.start()
                started = time.monotonic()
                try:
                    await collect(client, method, job["id"], timeout=2.0, **args)
                finally:
                    gone.join()
                took = time.monotonic() - started
                assert 1.9 < took < 5, (method, took)
        finally:
            await close(client)
    asyncio.run(scenario())


def test_permission_denied_explains_group_membership(tmp_path: Path) -> None:
    import errno as _errno
    from jobd.client import _connect_failure, _unreachable
    path = tmp_path / "jobd.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    why = _connect_failure(path, PermissionError(_errno.EACCES, "Permission denied"))
    assert "only its owner (root) and members of its group (root) may connect" in why
    assert f"`ls -l {path}`" in why and "add you to the group" in why
    assert "systemctl start" not in _unreachable([why]).message


def test_calls_that_wait_for_jobs_to_stop_outlast_the_answer_timeout(jd: Daemon, who: str,
                                                                     make: Any) -> None:
    """cancel with wait and purge are answered once the jobs have stopped (SPEC §4: up to
    cancel_grace + 2 s): a client whose answer timeout is shorter still gets the answer."""
    stubborn = ["sh", "-c", "trap '' TERM; echo up; sleep 30"]  # stops only at SIGKILL

    async def running(client: Client | AsyncClient) -> dict[str, Any]:
        job = await call(client, "submit", "command", options={"argv": stubborn})
        while job["status"] != "running":
            job = await call(client, "wait", job["id"], after_version=job["version"],
                             timeout_s=5)
        while "up" not in (await call(client, "logs", job["id"]))["data"]:
            await asyncio.sleep(0.05)  # the trap is set: SIGTERM is ignored from here
        return job

    async def scenario() -> None:
        mine = make(socket=str(jd.socket), as_user=who, timeout=0.3)
        admin = make(socket=str(jd.socket), timeout=0.3)
        try:
            job = await running(mine)
            started = time.monotonic()
            stopped = await call(mine, "cancel", job["id"], wait=True)
            assert stopped["status"] == "cancelled"
            assert time.monotonic() - started >= 0.9  # cancel_grace (1 s) went by first
            await running(mine)
            assert (await call(admin, "purge", who))["deleted"] == 2
        finally:
            await close(mine)
            await close(admin)
    asyncio.run(scenario())
