"""Every method and every error code of SPEC §4, and the framing, against a real daemon.

One daemon serves the whole module (starting one costs more than most tests); each test
works as its own user (``as_user``, which an admin may pass while keeping admin-only job
types), so the tests do not see each other's jobs. Every response any test reads goes
through ``checked``: JSON-RPC 2.0, a code from §4's table, ``data`` an object whose
``http_status`` matches the table.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import Daemon, clone, make_upstream
from jobd.models import from_iso, iso

#: SPEC §4: every code jobd may send, and the HTTP status it maps to
HTTP_STATUS = {-32700: 400, -32600: 400, -32601: 404, -32602: 422, -32001: 401, -32003: 403,
               -32004: 404, -32009: 409, -32029: 429, -32050: 503, -32603: 500}

SERVICE = "jobdt_rpcsvc"
MAX_BATCH = 4
MAX_MESSAGE_BYTES = 200_000
MAX_QUEUED = 5

CONFIG = f"""
[server]
socket_mode = "0666"
max_batch = {MAX_BATCH}
max_message_bytes = {MAX_MESSAGE_BYTES}

[execution]
workers = 4
max_running_per_user = 3
max_queued_per_user = {MAX_QUEUED}
cancel_grace = "1s"
shutdown_grace = "5s"

[auth]
admins = ["root"]
services = ["{SERVICE}"]
"""

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# -- helpers ---------------------------------------------------------------------------------

def checked(resp: Any) -> dict[str, Any]:
    """``resp`` after checking it is a response as §4 allows."""
    assert isinstance(resp, dict) and resp.get("jsonrpc") == "2.0", resp
    assert ("result" in resp) != ("error" in resp), resp
    assert "id" in resp, resp
    if "error" in resp:
        err = resp["error"]
        assert set(err) == {"code", "message", "data"}, err
        assert err["code"] in HTTP_STATUS, f"code outside SPEC §4: {err}"
        assert isinstance(err["message"], str) and err["message"], err
        assert "Traceback" not in err["message"], err
        assert isinstance(err["data"], dict), err
        assert err["data"]["http_status"] == HTTP_STATUS[err["code"]], err
        assert set(err["data"]) <= {"http_status", "field", "detail"}, err
    return resp


class Conn:
    """One client connection: raw lines out, checked responses in."""

    def __init__(self, d: Daemon, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(d.socket))
        self.buf = b""
        self.ids = iter(range(1, 1 << 30))

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, **params: Any) -> int:
        """Send one request; its id."""
        ident = next(self.ids)
        self.write(json.dumps({"jsonrpc": "2.0", "id": ident, "method": method,
                               "params": params}).encode() + b"\n")
        return ident

    def line(self, timeout: float | None = None) -> bytes | None:
        """The next response line (without newline), or None at EOF."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def read(self, timeout: float | None = None) -> Any:
        """The next response (a checked object, or a list of them for a batch)."""
        line = self.line(timeout)
        assert line is not None, "the daemon closed the connection instead of answering"
        doc = json.loads(line)
        return [checked(r) for r in doc] if isinstance(doc, list) else checked(doc)

    def nothing_within(self, seconds: float) -> bool:
        """True when no byte arrives within ``seconds`` (the connection still open)."""
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return True
        self.buf += chunk
        return False

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = self.request(method, **params)
        resp = self.read()
        assert resp["id"] == ident
        return resp


def ok(d: Daemon, method: str, **params: Any) -> Any:
    resp = checked(d.raw(method, **params))
    assert "result" in resp, f"{method} {params} failed: {resp['error']}"
    return resp["result"]


def error(d: Daemon, code: int, method: str, **params: Any) -> dict[str, Any]:
    resp = checked(d.raw(method, **params))
    assert "error" in resp, f"{method} {params} answered {resp['result']}, expected {code}"
    assert resp["error"]["code"] == code, resp["error"]
    return resp["error"]


def send(d: Daemon, data: bytes) -> Any:
    """One raw line on a fresh connection; the checked answer."""
    with Conn(d) as c:
        c.write(data if data.endswith(b"\n") else data + b"\n")
        return c.read()


def user() -> str:
    """A user id of its own for one test."""
    return f"u{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def paused(d: Daemon) -> Iterator[None]:
    assert ok(d, "admin.pause") == {"paused": True}
    try:
        yield
    finally:
        assert ok(d, "admin.resume") == {"paused": False}


def until_status(d: Daemon, job_id: str, *statuses: str, timeout: float = 15.0,
                 **scope: Any) -> dict[str, Any]:
    """Follow the job with jobs.wait until it reaches one of ``statuses``."""
    deadline = time.monotonic() + timeout
    job = ok(d, "jobs.get", job_id=job_id, **scope)
    while job["status"] not in statuses:
        left = deadline - time.monotonic()
        if left <= 0 or (job["status"] in ("completed", "failed", "cancelled")):
            pytest.fail(f"job {job_id} is {job['status']} ({job['error']}), "
                        f"expected {statuses}")
        job = ok(d, "jobs.wait", job_id=job_id, after_version=job["version"],
                 timeout_s=min(5.0, left), **scope)
    return job


def python_job(d: Daemon, who: str, code: str, **extra: Any) -> dict[str, Any]:
    return ok(d, "jobs.submit", type="command", as_user=who,
              options={"argv": [sys.executable, "-c", code]}, **extra)


@pytest.fixture(scope="module")
def jd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("rpc"), CONFIG)
    d.socket.parent.chmod(0o755)  # other local users connect in the -32001 test
    d.start()
    yield d
    assert d.stop() == 0
    assert "rpc_method_crashed" not in d.log() and "request_failed" not in d.log()


# -- methods ---------------------------------------------------------------------------------

def test_ping_says_version_uptime_and_caller(jd: Daemon) -> None:
    import jobd
    result = ok(jd, "ping")
    assert result["version"] == jobd.__version__
    assert isinstance(result["uptime_s"], (int, float)) and result["uptime_s"] >= 0
    assert result["caller"] == {"uid": 0, "user": "root", "role": "admin"}


def test_submit_returns_the_stored_job_and_get_answers_it(jd: Daemon) -> None:
    who = user()
    with paused(jd):
        job = ok(jd, "jobs.submit", type="noop", as_user=who, options={"seconds": 0},
                 priority=5, metadata={"ticket": [1, "two", None]}, description="a test",
                 timeout_s=30, project_id="p1")
        assert UUID_RE.match(job["id"])
        assert job["deduplicated"] is False
        assert (job["type"], job["user_id"], job["project_id"]) == ("noop", who, "p1")
        assert (job["status"], job["priority"], job["timeout_s"]) == ("queued", 5, 30)
        assert job["metadata"] == {"ticket": [1, "two", None]}
        assert job["description"] == "a test"
        assert job["wait_reason"] == "paused" and job["queue_position"] >= 1
        got = ok(jd, "jobs.get", job_id=job["id"])
        assert {k: v for k, v in got.items() if k != "queue_position"} == {
            k: v for k, v in job.items() if k not in ("deduplicated", "queue_position")}
    done = until_status(jd, job["id"], "completed")
    assert done["progress"] == 100 and done["attempts"] == 1
    assert done["started_at"] and done["completed_at"] and done["version"] > job["version"]


def test_sync_and_index_are_deduplicated_per_user_and_project_while_queued(
        jd: Daemon, tmp_path: Path) -> None:
    alice, bob = user(), user()
    upstream = make_upstream(tmp_path / "upstream")
    for who in (alice, bob):
        clone(upstream, jd.repos / who / "proj")
    elsewhere = clone(upstream, jd.repos / "shared" / "checkout")
    with paused(jd):
        first = ok(jd, "jobs.submit", type="sync", project_id="proj", as_user=alice)
        assert first["deduplicated"] is False and first["options"]["full_reindex"] is False
        again = ok(jd, "jobs.submit", type="sync", project_id="proj", as_user=alice,
                   options={"full_reindex": True})
        assert again["id"] == first["id"] and again["deduplicated"] is True
        # a full re-index asked by either submitter is kept
        assert again["options"]["full_reindex"] is True
        assert ok(jd, "jobs.get", job_id=first["id"])["options"]["full_reindex"] is True
        index = ok(jd, "jobs.submit", type="index", project_id="proj", as_user=alice)
        assert index["id"] != first["id"] and index["deduplicated"] is False
        assert ok(jd, "jobs.submit", type="index", project_id="proj",
                  as_user=alice)["id"] == index["id"]
        other_user = ok(jd, "jobs.submit", type="sync", project_id="proj", as_user=bob)
        assert other_user["id"] != first["id"] and other_user["deduplicated"] is False
        # an explicit repo_path (admins and services) under allowed_roots
        by_path = ok(jd, "jobs.submit", type="sync", project_id="checkout", as_user=bob,
                     options={"repo_path": str(elsewhere)})
        assert by_path["options"]["repo_path"] == str(elsewhere.resolve())
        assert by_path["id"] != other_user["id"]
        for job in (first, other_user, by_path):
            view = ok(jd, "jobs.get", job_id=job["id"])
            assert view["wait_reason"] == "paused" and view["queue_position"] >= 1
    results = [until_status(jd, j["id"], "completed")
               for j in (first, index, other_user, by_path)]
    assert results[0]["result"]["files_indexed"] == 2
    assert results[0]["phase"] == "finalizing"
    # once it ran, the next sync is a new job
    assert ok(jd, "jobs.submit", type="sync", project_id="proj",
              as_user=alice)["id"] != first["id"]


def test_sync_outside_allowed_roots_is_refused_and_a_missing_repository_fails(
        jd: Daemon, tmp_path: Path) -> None:
    who = user()
    outside = clone(make_upstream(tmp_path / "upstream"), tmp_path / "outside" / "repo")
    err = error(jd, -32602, "jobs.submit", type="sync", project_id="repo", as_user=who,
                options={"repo_path": str(outside)})
    assert err["data"]["field"] == "options.repo_path"
    # a link under the root that leads outside it is judged by where it leads
    (jd.repos / who).mkdir(parents=True)
    (jd.repos / who / "linked").symlink_to(outside)
    err = error(jd, -32602, "jobs.submit", type="sync", project_id="linked", as_user=who)
    assert err["data"]["field"] == "project_id" and str(outside) in err["message"]
    err = error(jd, -32602, "jobs.submit", type="sync", as_user=who)
    assert err["data"]["field"] == "project_id"
    # a repository not cloned yet is checked when the job runs
    job = ok(jd, "jobs.submit", type="sync", project_id="nothing-here", as_user=who)
    failed = until_status(jd, job["id"], "failed")
    assert "does not exist" in failed["error"]


def test_idempotency_key_returns_the_first_job_of_that_user(jd: Daemon) -> None:
    who, other = user(), user()
    with paused(jd):
        first = ok(jd, "jobs.submit", type="noop", as_user=who, idempotency_key="req-1")
        again = ok(jd, "jobs.submit", type="noop", as_user=who, idempotency_key="req-1",
                   description="resent")
        assert again["id"] == first["id"] and again["description"] is None
        assert ok(jd, "jobs.submit", type="noop", as_user=other,
                  idempotency_key="req-1")["id"] != first["id"]
        assert ok(jd, "jobs.submit", type="noop", as_user=who,
                  idempotency_key="req-2")["id"] != first["id"]
        err = error(jd, -32602, "jobs.submit", type="noop", as_user=who,
                    idempotency_key="k" * 129)
        assert err["data"]["field"] == "idempotency_key"
    until_status(jd, first["id"], "completed")
    assert ok(jd, "jobs.submit", type="noop", as_user=who,
              idempotency_key="req-1")["id"] == first["id"]


def test_list_filters_pages_and_prefixes(jd: Daemon) -> None:
    who, other = user(), user()
    jobs = []
    for i in range(5):
        jobs.append(ok(jd, "jobs.submit", type="noop", as_user=who,
                       project_id="even" if i % 2 == 0 else "odd"))
        time.sleep(0.002)  # distinct created_at, for the time filters
    failing = python_job(jd, who, "raise SystemExit(3)")
    jobs.append(failing)
    ok(jd, "jobs.submit", type="noop", as_user=other)
    for job in jobs:
        until_status(jd, job["id"], "completed", "failed")
    newest_first = [j["id"] for j in reversed(jobs)]

    everything = ok(jd, "jobs.list", user_id=who)
    assert [j["id"] for j in everything["jobs"]] == newest_first
    assert everything["next_cursor"] is None
    # a scoped admin sees only that user's jobs without a filter
    assert [j["id"] for j in ok(jd, "jobs.list", as_user=who)["jobs"]] == newest_first

    pages, cursor = [], None
    while True:
        page = ok(jd, "jobs.list", user_id=who, limit=2,
                  **({"cursor": cursor} if cursor else {}))
        assert len(page["jobs"]) <= 2
        pages += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
    assert pages == newest_first

    def ids(**filters: Any) -> list[str]:
        return [j["id"] for j in ok(jd, "jobs.list", user_id=who, **filters)["jobs"]]

    assert ids(status="failed") == [failing["id"]]
    assert ids(status=["failed", "completed"]) == newest_first
    assert ids(status="queued") == []
    assert ids(type="command") == [failing["id"]]
    assert ids(project_id="even") == [jobs[4]["id"], jobs[2]["id"], jobs[0]["id"]]
    between = iso(from_iso(jobs[2]["created_at"]) + 500)  # 2 ms apart: 0.5 ms after #2
    assert ids(created_after=between) == newest_first[:3]
    assert ids(created_before=between) == newest_first[3:]
    assert ids(id_prefix=jobs[2]["id"][:8]) == [jobs[2]["id"]]
    assert ids(id_prefix=jobs[2]["id"]) == [jobs[2]["id"]]

    forged = base64.urlsafe_b64encode(b"9" * 30).decode()  # past SQLite's integers
    for name, value in (("limit", 0), ("limit", 1001), ("limit", "5"), ("cursor", 5),
                        ("cursor", "not a cursor!"), ("cursor", forged), ("id_prefix", "abc"),
                        ("id_prefix", "xyz123"), ("status", "done"), ("status", ["queued", 1]),
                        ("created_after", "yesterday"), ("user_id", "a\n"),
                        ("project_id", " p")):
        err = error(jd, -32602, "jobs.list", **{name: value})
        assert err["data"]["field"] == name, (name, value, err)


def test_cancel_a_queued_job_then_again_then_retry(jd: Daemon) -> None:
    who = user()
    with paused(jd):
        job = ok(jd, "jobs.submit", type="noop", as_user=who)
        cancelled = ok(jd, "jobs.cancel", job_id=job["id"])
        assert cancelled["status"] == "cancelled" and cancelled["completed_at"]
        assert cancelled["version"] > job["version"]
        # harmless the second time, with or without wait
        assert ok(jd, "jobs.cancel", job_id=job["id"])["status"] == "cancelled"
        assert ok(jd, "jobs.cancel", job_id=job["id"], wait=True)["status"] == "cancelled"
        retried = ok(jd, "jobs.retry", job_id=job["id"])
        assert retried["id"] == job["id"] and retried["status"] == "queued"
        assert retried["attempts"] == 0 and retried["error"] is None
        assert retried["wait_reason"] == "paused"
        assert error(jd, -32009, "jobs.retry", job_id=job["id"])["data"]["http_status"] == 409
    until_status(jd, job["id"], "completed")
    events = ok(jd, "jobs.events", job_id=job["id"])
    assert [e["status"] for e in events] == [
        "created", "queued", "cancelled", "queued", "running", "completed"]
    assert [e["actor"] for e in events] == [
        "admin:root", "admin:root", "admin:root", "admin:root", "jobd", "jobd"]
    stamps = [e["at"] for e in events]
    assert stamps == sorted(stamps)
    assert set(events[0]) == {"at", "status", "phase", "progress", "message", "actor"}


def test_cancel_a_running_job_without_and_with_wait(jd: Daemon) -> None:
    who = user()
    first = ok(jd, "jobs.submit", type="noop", as_user=who, options={"seconds": 30})
    second = ok(jd, "jobs.submit", type="noop", as_user=who, options={"seconds": 30})
    until_status(jd, first["id"], "running")
    until_status(jd, second["id"], "running")

    asked = ok(jd, "jobs.cancel", job_id=first["id"])
    assert asked["status"] == "running" and asked["cancel_requested"] is True
    again = ok(jd, "jobs.cancel", job_id=first["id"])
    assert again["status"] in ("running", "cancelled")
    done = until_status(jd, first["id"], "cancelled", timeout=5)
    assert done["completed_at"] and done["progress"] < 100
    history = [(e["status"], e["actor"]) for e in ok(jd, "jobs.events", job_id=first["id"])]
    # the request is an event of its own, naming who asked; the worker ends the job
    assert history == [("created", "admin:root"), ("queued", "admin:root"), ("running", "jobd"),
                       ("running", "admin:root"), ("cancelled", "jobd")]

    started = time.monotonic()
    waited = ok(jd, "jobs.cancel", job_id=second["id"], wait=True)
    assert waited["status"] == "cancelled"
    assert time.monotonic() - started < 1 + 2  # cancel_grace + 2 s
    assert ok(jd, "jobs.cancel", job_id=second["id"], wait=True)["status"] == "cancelled"
    assert error(jd, -32602, "jobs.cancel", job_id=second["id"],
                 wait="yes")["data"]["field"] == "wait"

    retried = ok(jd, "jobs.retry", job_id=second["id"])
    assert retried["status"] == "queued" and retried["attempts"] == 1
    assert retried["progress"] == 0 and retried["error"] is None
    until_status(jd, second["id"], "running")
    assert ok(jd, "jobs.cancel", job_id=second["id"], wait=True)["attempts"] == 2


def test_cancel_or_retry_a_completed_job_is_a_conflict(jd: Daemon) -> None:
    job = ok(jd, "jobs.submit", type="noop", as_user=user())
    until_status(jd, job["id"], "completed")
    for method in ("jobs.cancel", "jobs.retry"):
        err = error(jd, -32009, method, job_id=job["id"])
        assert err["data"]["detail"] == {"status": "completed"}
        assert "completed" in err["message"]
    assert ok(jd, "jobs.get", job_id=job["id"])["status"] == "completed"


def test_retry_a_failed_job_keeps_id_and_attempts_and_clears_the_error(jd: Daemon) -> None:
    who = user()
    job = python_job(jd, who, "import sys; print('boom'); sys.exit(2)")
    failed = until_status(jd, job["id"], "failed")
    assert failed["error"] and failed["attempts"] == 1
    retried = ok(jd, "jobs.retry", job_id=job["id"])
    assert (retried["id"], retried["status"], retried["error"]) == (job["id"], "queued", None)
    assert retried["attempts"] == 1 and retried["progress"] == 0
    assert until_status(jd, job["id"], "failed")["attempts"] == 2
    statuses = [e["status"] for e in ok(jd, "jobs.events", job_id=job["id"])]
    assert statuses == ["created", "queued", "running", "failed", "queued", "running", "failed"]


def test_wait_returns_at_once_wakes_on_change_and_times_out_unchanged(jd: Daemon) -> None:
    who = user()
    with paused(jd):
        job = ok(jd, "jobs.submit", type="noop", as_user=who)
        started = time.monotonic()
        now = ok(jd, "jobs.wait", job_id=job["id"], timeout_s=30)
        assert now["id"] == job["id"] and time.monotonic() - started < 2

        started = time.monotonic()
        same = ok(jd, "jobs.wait", job_id=job["id"], after_version=job["version"], timeout_s=0.5)
        assert 0.45 <= time.monotonic() - started < 5
        assert same["version"] == job["version"] and same["status"] == "queued"

        answers: list[tuple[float, dict[str, Any]]] = []

        def long_poll() -> None:
            with Conn(jd) as c:
                resp = c.call("jobs.wait", job_id=job["id"], after_version=job["version"],
                              timeout_s=20)
            answers.append((time.monotonic(), resp))

        poller = threading.Thread(target=long_poll)
        poller.start()
        time.sleep(0.3)  # the poll is waiting
        cancelled_at = time.monotonic()
        ok(jd, "jobs.cancel", job_id=job["id"])
        poller.join(10)
        assert answers, "jobs.wait did not wake on the change"
        woke, resp = answers[0]
        assert woke - cancelled_at < 2
        assert resp["result"]["status"] == "cancelled"
        assert resp["result"]["version"] > job["version"]

    # terminal: returns at once even with an after_version from the future
    started = time.monotonic()
    ok(jd, "jobs.wait", job_id=job["id"], after_version=job["version"] * 2, timeout_s=30)
    assert time.monotonic() - started < 2

    for bad, field in ((dict(timeout_s=61), "timeout_s"), (dict(timeout_s=-1), "timeout_s"),
                       (dict(timeout_s="10"), "timeout_s"), (dict(after_version="3"),
                                                            "after_version")):
        err = error(jd, -32602, "jobs.wait", job_id=job["id"], **bad)
        assert err["data"]["field"] == field


def test_logs_page_by_offset_until_eof(jd: Daemon) -> None:
    code = ("import sys\n"
            "for i in range(300): print(f'line {i:04d}')\n"
            "sys.stdout.flush(); sys.stdout.buffer.write(b'bad \\xff byte\\n')\n")
    job = python_job(jd, user(), code)
    until_status(jd, job["id"], "completed")
    expected = "".join(f"line {i:04d}\n" for i in range(300)) + "bad \ufffd byte\n"

    text, offset, pages = "", 0, 0
    while True:
        page = ok(jd, "jobs.logs", job_id=job["id"], offset=offset, limit_bytes=1000)
        pages += 1
        assert page["next_offset"] >= offset
        text += page["data"]
        offset = page["next_offset"]
        if page["eof"]:
            break
        assert pages < 100
    # between the daemon's own story lines: the attempt's start, its end
    assert re.fullmatch(r"\[jobd [0-9T:Z-]+\] attempt 1 started\n(?s:.*)"
                        + re.escape(expected) + r"\[jobd [0-9T:Z-]+\] ended completed\n", text)
    assert offset == len(text.encode()) - 2  # U+FFFD is 3 bytes, the byte it replaced 1
    assert pages == -(-offset // 1000)
    whole = ok(jd, "jobs.logs", job_id=job["id"])
    assert whole["data"] == text and whole["eof"] is True
    past = ok(jd, "jobs.logs", job_id=job["id"], offset=offset)
    assert past == {"data": "", "next_offset": offset, "eof": True}

    for bad, field in ((dict(offset=-1), "offset"), (dict(offset=2**70), "offset"),
                       (dict(offset="0"), "offset"), (dict(limit_bytes=0), "limit_bytes"),
                       (dict(limit_bytes=1_048_577), "limit_bytes"),
                       # offset + limit_bytes past what the OS seeks to
                       (dict(offset=2**63 - 1), "offset"),
                       (dict(offset=2**63 - 1000, limit_bytes=1000), "offset")):
        assert error(jd, -32602, "jobs.logs", job_id=job["id"], **bad)["data"]["field"] == field
    # the last offset allowed is answered (nothing there), never -32603
    last = ok(jd, "jobs.logs", job_id=job["id"], offset=2**63 - 1001, limit_bytes=1000)
    assert last == {"data": "", "next_offset": 2**63 - 1001, "eof": True}


def test_a_character_a_log_page_would_cut_comes_whole_in_the_next(jd: Daemon) -> None:
    """Pages end where a byte limit says, characters do not: one of 2, 3 or 4 bytes cut by
    the limit is left to the next page, so paging gives the text the whole log gives."""
    code = "print('h\u00e9 \u20ac\U0001F600 ' * 400)\nprint('\u20ac' * 999)\n"
    job = python_job(jd, user(), code)
    until_status(jd, job["id"], "completed")
    whole = ok(jd, "jobs.logs", job_id=job["id"], limit_bytes=1 << 20)
    assert "\ufffd" not in whole["data"] and whole["eof"] is True
    for limit in (4, 5, 7, 1000, 65536):
        text, offset = "", 0
        while True:
            page = ok(jd, "jobs.logs", job_id=job["id"], offset=offset, limit_bytes=limit)
            assert page["next_offset"] > offset and len(page["data"].encode()) <= limit
            text += page["data"]
            offset = page["next_offset"]
            if page["eof"]:
                break
        assert text == whole["data"] and offset == whole["next_offset"], limit
    # a limit below a character's size still moves on (the piece decoded as U+FFFD)
    start = whole["data"].index("\u20ac")
    at = len(whole["data"][:start].encode())
    assert ok(jd, "jobs.logs", job_id=job["id"], offset=at, limit_bytes=2) == {
        "data": "\ufffd", "next_offset": at + 2, "eof": False}


def test_a_running_jobs_log_ending_in_half_a_character_gives_the_rest_later(
        jd: Daemon, tmp_path: Path) -> None:
    """At a running job's end of log (a line longer than the log holds back) the bytes of
    a character still being written are not decoded yet (U+FFFD now, and again for the rest later): the page stops before
    them and the next one, once they are all there, has the whole character."""
    go = tmp_path / "go"
    code = ("import os, sys, time\n"
            # past what the log holds back of an unfinished line: it is written as it is
            "sys.stdout.buffer.write(b'a' * 16384 + b'x\\xe2\\x82'); sys.stdout.flush()\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\n"
            "sys.stdout.buffer.write(b'\\xac\\n'); sys.stdout.flush()\n")
    job = python_job(jd, user(), code)
    text, offset = "", 0
    deadline = time.monotonic() + 20
    while not text.endswith("x"):
        assert time.monotonic() < deadline, text
        page = ok(jd, "jobs.logs", job_id=job["id"], offset=offset)
        text, offset = text + page["data"], page["next_offset"]
        time.sleep(0.02)
    time.sleep(0.2)  # the two bytes are in the log: still not decoded
    assert ok(jd, "jobs.logs", job_id=job["id"], offset=offset) == {
        "data": "", "next_offset": offset, "eof": False}
    go.touch()
    until_status(jd, job["id"], "completed")
    rest = ok(jd, "jobs.logs", job_id=job["id"], offset=offset)
    assert rest["data"].startswith("\u20ac\n") and "\ufffd" not in text + rest["data"]


def test_logs_of_a_running_job_are_not_at_eof(jd: Daemon) -> None:
    job = python_job(jd, user(), "import time; print('started', flush=True); time.sleep(30)")
    until_status(jd, job["id"], "running")
    first = ok(jd, "jobs.logs", job_id=job["id"])
    assert first["eof"] is False
    ok(jd, "jobs.cancel", job_id=job["id"], wait=True)


def test_admin_stats_has_every_field(jd: Daemon) -> None:
    who = user()
    with paused(jd):
        ok(jd, "jobs.submit", type="noop", as_user=who)
        stats = ok(jd, "admin.stats")
        assert set(stats) >= {"jobs", "running", "queued", "workers", "per_user", "paused",
                              "db_bytes", "uptime_s"}
        assert set(stats["jobs"]) >= {"queued", "running", "completed", "failed", "cancelled"}
        assert stats["paused"] is True and stats["workers"] == 4
        assert stats["queued"] >= 1 and stats["per_user"][who] == {"running": 0, "queued": 1}
        assert stats["db_bytes"] > 0 and stats["uptime_s"] > 0
    assert ok(jd, "admin.stats")["paused"] is False


def test_admin_cleanup_dry_run_then_for_real(jd: Daemon) -> None:
    who = user()
    done = ok(jd, "jobs.submit", type="noop", as_user=who)
    until_status(jd, done["id"], "completed")
    log_file = jd.state / "logs" / f"{done['id']}.log"
    with paused(jd):
        active = ok(jd, "jobs.submit", type="noop", as_user=who)
        dry = ok(jd, "admin.cleanup", older_than_s=0, dry_run=True)
        assert dry["deleted"] >= 1 and set(dry["cutoffs"]) == {"keep", "keep_failed"}
        assert ok(jd, "jobs.get", job_id=done["id"])["status"] == "completed"
        real = ok(jd, "admin.cleanup", older_than_s=0)
        assert real["deleted"] >= 1
        error(jd, -32004, "jobs.get", job_id=done["id"])
        assert not log_file.exists()
        assert ok(jd, "jobs.get", job_id=active["id"])["status"] == "queued"
        # defaults: nothing this young is past retention
        assert ok(jd, "admin.cleanup")["deleted"] == 0
        assert error(jd, -32602, "admin.cleanup", older_than_s=-5)["data"]["field"] == \
            "older_than_s"
        assert error(jd, -32602, "admin.cleanup", dry_run="no")["data"]["field"] == "dry_run"


def test_admin_cleanup_of_one_status_leaves_the_others(jd: Daemon) -> None:
    who = user()
    done = ok(jd, "jobs.submit", type="noop", as_user=who)
    failing = python_job(jd, who, "raise SystemExit(3)")
    until_status(jd, done["id"], "completed")
    until_status(jd, failing["id"], "failed")
    dry = ok(jd, "admin.cleanup", older_than_s=0, status="failed", dry_run=True)
    assert dry["deleted"] >= 1
    assert ok(jd, "jobs.get", job_id=failing["id"])["status"] == "failed"
    assert ok(jd, "admin.cleanup", older_than_s=0, status=["failed"])["deleted"] >= 1
    error(jd, -32004, "jobs.get", job_id=failing["id"])
    assert ok(jd, "jobs.get", job_id=done["id"])["status"] == "completed"
    # only finished jobs are cleaned up, and only statuses there are
    for status in ("running", ["failed", "finished"], 3):
        err = error(jd, -32602, "admin.cleanup", status=status, dry_run=True)
        assert err["data"]["field"] == "status", err


def test_pause_holds_queued_jobs_and_resume_runs_them(jd: Daemon) -> None:
    who = user()
    with paused(jd):
        assert ok(jd, "admin.pause") == {"paused": True}  # twice is harmless
        jobs = [ok(jd, "jobs.submit", type="noop", as_user=who) for _ in range(3)]
        time.sleep(0.2)
        views = [ok(jd, "jobs.get", job_id=j["id"]) for j in jobs]
        assert [v["status"] for v in views] == ["queued"] * 3
        assert [v["wait_reason"] for v in views] == ["paused"] * 3
        positions = [v["queue_position"] for v in views]
        assert positions == sorted(positions) and len(set(positions)) == 3
    for job in jobs:
        finished = until_status(jd, job["id"], "completed")
        assert finished["queue_position"] is None and finished["wait_reason"] is None


def test_list_in_queue_order_follows_the_dispatcher_and_cursors_keep_their_order(
        jd: Daemon) -> None:
    who, other = user(), user()
    with paused(jd):
        # priorities and turns: the dispatch order is not the submit order
        jobs = [ok(jd, "jobs.submit", type="noop", priority=p, as_user=u)
                for p, u in ((0, who), (0, who), (5, who), (0, other))]
        seen, cursor = [], None
        while True:
            page = ok(jd, "jobs.list", order="queue", limit=2, cursor=cursor)
            seen += [j for j in page["jobs"] if j["user_id"] in (who, other)]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        places = {j["id"]: j["queue_position"] for j in seen}
        assert [j["id"] for j in seen] == sorted(places, key=places.__getitem__)
        assert [j["id"] for j in seen][:2] == [jobs[2]["id"], jobs[0]["id"]]
        assert set(places) == {j["id"] for j in jobs}
        # a cursor of one order is refused by another
        created = ok(jd, "jobs.list", limit=1, as_user=who)["next_cursor"]
        err = error(jd, -32602, "jobs.list", order="queue", cursor=created, as_user=who)
        assert err["data"]["field"] == "cursor"
        assert "another order or other filters" in err["message"]
        queue = ok(jd, "jobs.list", order="queue", limit=1, as_user=who)["next_cursor"]
        assert error(jd, -32602, "jobs.list", cursor=queue, as_user=who)["data"]["field"] == "cursor"
        assert error(jd, -32602, "jobs.list", order="oldest")["data"]["field"] == "order"
    for job in jobs:
        until_status(jd, job["id"], "completed")
    # by end time, newest first: the last to finish comes first
    done = ok(jd, "jobs.list", order="completed", as_user=who)["jobs"]
    ends = [j["completed_at"] for j in done]
    assert ends == sorted(ends, reverse=True) and len(ends) == 3


def test_too_many_queued_jobs_is_a_limit(jd: Daemon) -> None:
    who = user()
    with paused(jd):
        for _ in range(MAX_QUEUED):
            ok(jd, "jobs.submit", type="noop", as_user=who)
        err = error(jd, -32029, "jobs.submit", type="noop", as_user=who)
        assert str(MAX_QUEUED) in err["message"]
        ok(jd, "jobs.submit", type="noop", as_user=user())  # the limit is per user


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    b'{"jsonrpc":"2.0","id":1,"method":"ping"',
    b"{'jsonrpc': '2.0'}",
    b'{"jsonrpc":"2.0","id":1,"method":"p\xffing"}',
    b'\xc3\x28',
], ids=["truncated", "single-quotes", "invalid-utf8", "invalid-utf8-only"])
def test_parse_error_and_the_connection_goes_on(jd: Daemon, line: bytes) -> None:
    with Conn(jd) as c:
        c.write(line + b"\n")
        resp = c.read()
        assert resp["error"]["code"] == -32700 and resp["id"] is None
        assert resp["error"]["data"] == {"http_status": 400}
        assert "result" in c.call("ping")


@pytest.mark.parametrize("request_", [
    5, "ping", None, [], [1], {"jsonrpc": "2.0", "id": 7},
    {"id": 7, "method": "ping"}, {"jsonrpc": "1.0", "id": 7, "method": "ping"},
    {"jsonrpc": "2.0", "id": 7, "method": 5},
    {"jsonrpc": "2.0", "id": 7, "method": "ping", "extra": 1},
    {"jsonrpc": "2.0", "id": [7], "method": "ping"},
], ids=["number", "string", "null", "empty-batch", "batch-of-number", "missing-method",
        "missing-jsonrpc", "jsonrpc-1.0", "method-not-string", "extra-member", "id-array"])
def test_invalid_request(jd: Daemon, request_: Any) -> None:
    resp = send(jd, json.dumps(request_).encode())
    item = resp[0] if isinstance(resp, list) else resp
    assert item["error"]["code"] == -32600
    assert item["id"] is None  # SPEC §4: an invalid Request is answered with "id": null


def test_batch_over_max_batch_is_refused_whole(jd: Daemon) -> None:
    batch = [{"jsonrpc": "2.0", "id": i, "method": "ping"} for i in range(MAX_BATCH + 1)]
    resp = send(jd, json.dumps(batch).encode())
    assert isinstance(resp, dict) and resp["error"]["code"] == -32600
    assert str(MAX_BATCH) in resp["error"]["message"]
    full = send(jd, json.dumps(batch[:MAX_BATCH]).encode())
    assert [r["id"] for r in full] == list(range(MAX_BATCH))


def test_line_over_max_message_bytes_is_refused_and_closed(jd: Daemon) -> None:
    with Conn(jd) as c:
        big = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping",
                          "params": {"pad": "x" * (MAX_MESSAGE_BYTES + 10)}}).encode() + b"\n"
        try:
            c.write(big)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon refused before reading it all
        resp = c.read(timeout=10)
        assert resp["error"]["code"] == -32600 and resp["id"] is None
        assert "max_message_bytes" in resp["error"]["message"]
        assert c.line(timeout=10) is None  # closed
    # a line just under the limit is fine
    pad = "x" * (MAX_MESSAGE_BYTES - 200)
    resp = send(jd, json.dumps({"jsonrpc": "2.0", "id": 2, "method": "jobs.get",
                                "params": {"job_id": pad}}).encode())
    assert resp["error"]["code"] == -32602


def test_method_not_found(jd: Daemon) -> None:
    for method in ("nope", "jobs.delete", "admin.stats.extra", "Ping", "_table"):
        err = error(jd, -32601, method)
        assert err["data"] == {"http_status": 404}
        assert method in err["message"]


@pytest.mark.parametrize("method,params,field", [
    ("ping", {"x": 1}, "x"),
    ("jobs.get", {"job_id": "00000000-0000-0000-0000-000000000000", "extra": True}, "extra"),
    ("jobs.get", {}, "job_id"),
    ("jobs.get", {"job_id": 5}, "job_id"),
    ("jobs.get", {"job_id": "../../etc/passwd"}, "job_id"),
    ("jobs.submit", {}, "type"),
    ("jobs.submit", {"type": "bogus"}, "type"),
    ("jobs.submit", {"type": 3}, "type"),
    ("jobs.submit", {"type": "sync", "project_id": "\u202ex"}, "project_id"),
    ("jobs.submit", {"type": "sync", "project_id": ""}, "project_id"),
    ("jobs.submit", {"type": "sync", "project_id": "x" * 256}, "project_id"),
    ("jobs.submit", {"type": "noop", "as_user": "a\x00b"}, "as_user"),
    ("jobs.submit", {"type": "noop", "as_user": "a "}, "as_user"),
    ("jobs.submit", {"type": "noop", "as_admin": "yes"}, "as_admin"),
    ("jobs.submit", {"type": "noop", "metadata": {"a": "x" * (64 * 1024)}}, "metadata"),
    ("jobs.submit", {"type": "noop", "metadata": [1]}, "metadata"),
    ("jobs.submit", {"type": "noop", "description": "d" * 1025}, "description"),
    ("jobs.submit", {"type": "noop", "description": 5}, "description"),
    ("jobs.submit", {"type": "noop", "options": "seconds=1"}, "options"),
    ("jobs.submit", {"type": "noop", "options": {"seconds": "x"}}, "options.seconds"),
    ("jobs.submit", {"type": "noop", "options": {"sleep": 1}}, None),
    ("jobs.submit", {"type": "command", "options": {"argv": "ls"}}, "options.argv"),
    ("jobs.submit", {"type": "noop", "priority": 101}, "priority"),
    ("jobs.submit", {"type": "noop", "priority": "high"}, "priority"),
    ("jobs.submit", {"type": "noop", "timeout_s": -1}, "timeout_s"),
    ("jobs.submit", {"type": "sync", "project_id": "p", "options": {"branch": "-x"}}, None),
    ("admin.stats", {"verbose": True}, "verbose"),
    # a name no keyword argument could have is named all the same
    ("jobs.get", {"job_id": "00000000-0000-0000-0000-000000000000", "as-user": 1}, "as-user"),
    ("ping", {"a b": 1}, "a b"),
    ("ping", {"it's": 1}, "it's"),
    ("ping", {"": 1}, ""),
])
def test_invalid_params_name_the_field(jd: Daemon, method: str, params: dict[str, Any],
                                       field: str | None) -> None:
    err = error(jd, -32602, method, **params)
    if field is not None:
        assert err["data"]["field"] == field, err
    else:
        assert err["data"]["field"].startswith("options."), err


def test_metadata_at_the_limit_is_accepted(jd: Daemon) -> None:
    filler = "x" * (64 * 1024 - len('{"a":""}'))
    job = ok(jd, "jobs.submit", type="noop", as_user=user(), metadata={"a": filler},
             description="é" * 512)
    assert ok(jd, "jobs.get", job_id=job["id"])["metadata"] == {"a": filler}


@pytest.mark.parametrize("params", [[], ["00000000-0000-0000-0000-000000000000"], "x", 5])
def test_params_must_be_named(jd: Daemon, params: Any) -> None:
    resp = send(jd, json.dumps({"jsonrpc": "2.0", "id": 3, "method": "jobs.get",
                                "params": params}).encode())
    if isinstance(params, list):  # positional params on a valid call
        assert resp["id"] == 3 and resp["error"]["code"] == -32602, resp
        assert resp["error"]["data"]["field"] == "params", resp
    else:  # SPEC §4: "anything else is -32600 or -32602"
        assert (resp["id"], resp["error"]["code"]) in ((None, -32600), (3, -32602)), resp


def test_unknown_job_is_not_found_in_every_job_method(jd: Daemon) -> None:
    missing = str(uuid.uuid4())
    for method in ("jobs.get", "jobs.cancel", "jobs.retry", "jobs.wait", "jobs.events",
                   "jobs.logs"):
        err = error(jd, -32004, method, job_id=missing)
        assert err["data"]["http_status"] == 404


def test_out_of_scope_is_forbidden_for_a_scoped_admin(jd: Daemon) -> None:
    owner, stranger = user(), user()
    job = ok(jd, "jobs.submit", type="noop", as_user=owner)
    for method in ("jobs.get", "jobs.cancel", "jobs.retry", "jobs.wait", "jobs.events",
                   "jobs.logs"):
        error(jd, -32003, method, job_id=job["id"], as_user=stranger)
    assert ok(jd, "jobs.get", job_id=job["id"], as_user=owner)["user_id"] == owner
    error(jd, -32003, "jobs.list", as_user=stranger, user_id=owner)
    for method in ("admin.stats", "admin.cleanup", "admin.pause", "admin.resume"):
        error(jd, -32003, method, as_user=stranger)


@pytest.mark.root
def test_service_without_as_user_is_unauthenticated(jd: Daemon, local_accounts: Any) -> None:
    account = local_accounts.user(SERVICE)
    script = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile('rwb')\n"
        "for i, (m, p) in enumerate(json.loads(sys.argv[2])):\n"
        "    f.write(json.dumps({'jsonrpc': '2.0', 'id': i, 'method': m, 'params': p})"
        ".encode() + b'\\n'); f.flush()\n"
        "    print(f.readline().decode().strip())\n")
    calls = [["ping", {}], ["jobs.list", {}], ["jobs.submit", {"type": "noop"}],
             ["admin.stats", {}], ["jobs.list", {"as_user": "someone"}]]
    out = local_accounts.run_as(SERVICE, [local_accounts.python, "-c", script, str(jd.socket),
                                          json.dumps(calls)])
    answers = [checked(json.loads(line)) for line in out.splitlines()]
    assert answers[0]["result"]["caller"] == {"uid": account.pw_uid, "user": SERVICE,
                                              "role": "service"}
    for resp in answers[1:4]:
        assert resp["error"]["code"] == -32001
        assert resp["error"]["data"] == {"http_status": 401}
        assert "as_user" in resp["error"]["message"]
    assert answers[4]["result"]["jobs"] == []


# -- notifications, batches, pipelining --------------------------------------------------------

def test_a_notification_gets_no_response(jd: Daemon) -> None:
    with Conn(jd) as c:
        c.write(b'{"jsonrpc":"2.0","method":"ping"}\n')
        c.write(b'{"jsonrpc":"2.0","method":"nope"}\n')
        c.write(b'{"jsonrpc":"2.0","method":"jobs.get","params":{"job_id":5}}\n')
        assert c.nothing_within(0.3)
        assert c.call("ping")["id"] == 1  # the first line back answers the request


def test_a_batch_answers_only_its_requests_in_order(jd: Daemon) -> None:
    batch = [{"jsonrpc": "2.0", "method": "ping"},
             {"jsonrpc": "2.0", "id": "a", "method": "ping"},
             {"jsonrpc": "2.0", "method": "nope"},
             {"jsonrpc": "2.0", "id": "b", "method": "nope"}]
    resp = send(jd, json.dumps(batch).encode())
    assert [r["id"] for r in resp] == ["a", "b"]
    assert "result" in resp[0] and resp[1]["error"]["code"] == -32601
    mixed = send(jd, json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "ping"}, 5,
                                 {"jsonrpc": "2.0", "id": 2, "method": "ping"}]).encode())
    assert [("result" in r, r["id"]) for r in mixed] == [(True, 1), (False, None), (True, 2)]
    assert mixed[1]["error"]["code"] == -32600
    with Conn(jd) as c:
        c.write(json.dumps([{"jsonrpc": "2.0", "method": "ping"}] * 2).encode() + b"\n")
        assert c.nothing_within(0.3)  # only notifications: nothing at all


def test_pipelined_requests_are_answered_in_order(jd: Daemon) -> None:
    missing = str(uuid.uuid4())
    lines = []
    for i in range(30):
        method, params = [("ping", {}), ("jobs.get", {"job_id": missing}), ("nope", {}),
                          ("jobs.list", {"limit": 1})][i % 4]
        lines.append(json.dumps({"jsonrpc": "2.0", "id": i, "method": method,
                                 "params": params}).encode())
    with Conn(jd) as c:
        c.write(b"\n".join(lines) + b"\n")  # one write
        answers = [c.read() for _ in lines]
    assert [a["id"] for a in answers] == list(range(30))
    assert [a.get("error", {}).get("code") for a in answers[:4]] == [None, -32004, -32601, None]


def test_a_line_split_over_many_writes_is_one_request(jd: Daemon) -> None:
    with Conn(jd) as c:
        data = b'{"jsonrpc":"2.0","id":9,"method":"ping"}\n'
        for i in range(0, len(data), 7):
            c.write(data[i:i + 7])
            time.sleep(0.01)
        assert c.read()["id"] == 9
        c.write(b"\n  \n")  # blank lines are ignored
        assert c.call("ping")["id"] == 1


# -- shutting down -----------------------------------------------------------------------------

def test_a_long_poll_in_flight_at_sigterm_is_answered_unavailable(make_daemon: Any) -> None:
    d = make_daemon()
    job = ok(d, "jobs.submit", type="noop", options={"seconds": 30})
    until_status(d, job["id"], "running")
    with Conn(d) as c:
        c.request("jobs.wait", job_id=job["id"], after_version=job["version"] * 2,
                  timeout_s=30)
        assert c.nothing_within(0.3)  # the poll is waiting
        d.proc.send_signal(15)
        started = time.monotonic()
        resp = c.read(timeout=10)
        assert resp["error"]["code"] == -32050
        assert resp["error"]["data"] == {"http_status": 503}
        assert time.monotonic() - started < 2.5  # no waiting out the poll
        assert c.line(timeout=10) is None
    assert d.proc.wait(20) == 0
    log = d.log()
    assert "Traceback" not in log and "requests_abandoned" not in log
    assert not d.socket.exists()
