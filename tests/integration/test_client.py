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
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import Daemon
from jobd import errors
from jobd.client import AsyncClient, Client

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
                assert set(stats) == {"jobs", "running", "queued", "workers", "per_user",
                                      "paused", "config", "db_bytes", "uptime_s"}
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
