"""The wire as a hostile client meets it, against a real daemon (SPEC §4, §3a, §1).

JSON-RPC 2.0 to the letter (notifications, invalid Request objects, ids), input that
once reached -32603 or dropped the connection (deep nesting, lone surrogates, huge and
non-finite numbers), bounded answers and clients that never read them, a request that
arrived while the daemon was stopped, and the per-user socket folder. Raw bytes go out;
every answer read is checked against §4 and never -32603.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import Daemon
from fuzz.wire import Wire, checked, ping_ms, request, rss_mb, tracebacks

CONFIG = """
[server]
max_batch = 20

[execution]
cancel_grace = "1s"
shutdown_grace = "5s"
"""


@pytest.fixture(scope="module")
def jd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("protocol"), CONFIG)
    d.start()
    yield d
    assert d.stop() == 0
    assert tracebacks(d.log()) == []


def who() -> str:
    return f"p{uuid.uuid4().hex[:10]}"


def error_of(answer: Any, code: int) -> dict[str, Any]:
    assert "error" in answer, f"expected {code}, got {answer}"
    assert answer["error"]["code"] == code, answer
    return answer["error"]


# -- JSON-RPC 2.0 to the letter (issue 7 item 10) -----------------------------------------------

NOTIFICATIONS = [
    b'{"jsonrpc":"2.0","method":"jobs.get","params":["00000000-0000-0000-0000-000000000000"]}',
    b'{"jsonrpc":"2.0","method":"jobs.get","params":{"job_id":5}}',
    b'{"jsonrpc":"2.0","method":"jobs.get","params":"x"}',
    b'{"jsonrpc":"2.0","method":"no.such.method"}',
    b'{"jsonrpc":"2.0","method":"jobs.submit","params":{"type":"noop","description":"\\ud800"}}',
    b'{"jsonrpc":"2.0","method":"jobs.submit","params":{"type":"noop","metadata":{"x":NaN}}}',
    b'{"jsonrpc":"2.0","method":"ping","params":{"unknown":1}}',
    b'{"jsonrpc":"2.0","method":"\\ud800"}',
]


@pytest.mark.parametrize("line", NOTIFICATIONS, ids=[
    "positional", "bad-param", "scalar-params", "unknown-method", "surrogate", "nan",
    "unknown-param", "surrogate-method"])
def test_a_failing_notification_is_never_answered(jd: Daemon, line: bytes) -> None:
    with Wire(jd.socket) as w:
        w.write(line + b"\n")
        assert w.silent_for(0.3), f"a notification was answered: {w.buf!r}"
        assert w.call("ping", ident="after")["id"] == "after"  # the next line is the next answer


def test_a_batch_answers_only_its_calls_and_one_of_notifications_gets_nothing(jd: Daemon) -> None:
    notes = [json.loads(line) for line in NOTIFICATIONS]
    with Wire(jd.socket) as w:
        w.write(json.dumps(notes).encode() + b"\n")
        assert w.silent_for(0.3), f"a batch of notifications was answered: {w.buf!r}"
        mixed = [notes[0], {"jsonrpc": "2.0", "id": "a", "method": "ping"}, notes[3],
                 {"jsonrpc": "2.0", "id": "b", "method": "jobs.get", "params": [1]}, notes[4]]
        answers = w.ask(json.dumps(mixed).encode())
        assert [a["id"] for a in answers] == ["a", "b"]
        assert "result" in answers[0]
        assert error_of(answers[1], -32602)["data"]["field"] == "params"


def _noop(w: Wire, seconds: float = 30) -> str:
    job = w.call("jobs.submit", type="noop", options={"seconds": seconds})["result"]
    return str(job["id"])


def _version(w: Wire, job_id: str) -> int:
    return int(w.call("jobs.get", job_id=job_id)["result"]["version"])


def test_a_notification_of_a_read_is_not_run(jd: Daemon) -> None:
    """Its answer would be thrown away: a ``jobs.wait`` sent as a notification does not
    hold up the connection's next call, nor does a ``jobs.list`` cost anyone its build."""
    with Wire(jd.socket) as w:
        w.call("admin.pause")  # a queued job: nothing changes it while the wait would wait
        job_id = _noop(w)
        try:
            wait = {"jsonrpc": "2.0", "method": "jobs.wait", "params": {
                "job_id": job_id, "after_version": _version(w, job_id), "timeout_s": 20}}
            started = time.monotonic()
            w.write(json.dumps(wait).encode() + b"\n")
            assert w.call("ping", ident="next")["id"] == "next"
            assert time.monotonic() - started < 5, "the notification's wait was run"
        finally:
            w.call("jobs.cancel", job_id=job_id)
            w.call("admin.resume")


def test_the_lines_a_client_left_when_it_went_away_are_not_run(jd: Daemon) -> None:
    """Once an answer cannot be written (the client closed its connection), the rest of
    what it sent is dropped, not run for no one."""
    with Wire(jd.socket) as w:
        job_id = _noop(w)
        counted = _waits_counted(w)
        try:
            gone = Wire(jd.socket)
            after = _version(w, job_id)
            gone.write(b"".join(request("jobs.wait", n, job_id=job_id, after_version=after,
                                        timeout_s=1) for n in range(6)))
            gone.close()  # before the first of the six waits has ended
            time.sleep(4.5)  # six run one after the other would be four done by now
            assert _waits_counted(w) - counted <= 1
        finally:
            w.call("jobs.cancel", job_id=job_id)


def _waits_counted(w: Wire) -> float:
    """The daemon's count of answered ``jobs.wait`` calls (``admin.metrics``)."""
    text = w.call("admin.metrics")["result"]["text"]
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith('jobd_rpc_requests_total{method="jobs.wait"'))


@pytest.mark.parametrize("item", [
    {"jsonrpc": "2.0", "id": 7},
    {"jsonrpc": "1.0", "id": 7, "method": "ping"},
    {"jsonrpc": "2.0", "id": 7, "method": 5},
    {"jsonrpc": "2.0", "id": 7, "method": "ping", "extra": 1},
    {"jsonrpc": "2.0", "id": True, "method": "ping"},
    {"jsonrpc": "2.0", "id": 1.5, "method": "ping"},
    {"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"},
    {"jsonrpc": "2.0", "id": [7], "method": "ping"},
    # names no set of methods may be asked about (unhashable)
    {"jsonrpc": "2.0", "id": 7, "method": ["jobs.list"]},
    {"jsonrpc": "2.0", "id": 7, "method": {"a": 1}, "params": {"filter": {}}},
], ids=["no-method", "jsonrpc-1.0", "method-number", "extra-member", "id-true", "id-float",
        "id-object", "id-array", "method-array", "method-object"])
def test_an_invalid_request_is_answered_with_id_null(jd: Daemon, item: dict[str, Any]) -> None:
    before = jd.log().count("request_failed")
    with Wire(jd.socket) as w:
        for line in (json.dumps(item), json.dumps([item, {"jsonrpc": "2.0", "id": 2,
                                                          "method": "ping"}])):
            answer = w.ask(line.encode())
            first = answer[0] if isinstance(answer, list) else answer
            error_of(first, -32600)
            assert first["id"] is None
        assert answer[1]["id"] == 2 and "result" in answer[1]
    assert jd.log().count("request_failed") == before  # no traceback


def test_positional_params_on_a_call_are_invalid_params_naming_params(jd: Daemon) -> None:
    with Wire(jd.socket) as w:
        answer = w.ask(b'{"jsonrpc":"2.0","id":9,"method":"jobs.get","params":["x"]}')
        assert answer["id"] == 9
        assert error_of(answer, -32602)["data"]["field"] == "params"


# -- client errors are never -32603 (items 8 and 9) ---------------------------------------------

def nested(depth: int) -> str:
    """params whose deepest value sits ``depth`` levels down in the request line."""
    inner = "1"
    for _ in range(depth - 2):  # the request object and params are two levels
        inner = '{"a":' + inner + "}"
    return ('{"jsonrpc":"2.0","id":3,"method":"jobs.submit","params":{"type":"noop",'
            f'"metadata":{inner}}}}}')


def test_nesting_over_64_levels_is_an_invalid_request_and_64_is_decoded(jd: Daemon) -> None:
    with Wire(jd.socket) as w:
        deep = w.ask(nested(65).encode())
        assert error_of(deep, -32600)["data"]["detail"] == "too deep"
        assert deep["id"] is None
        at_limit = w.ask(nested(64).encode())  # decoded: the manager decides
        assert "result" in at_limit or at_limit["error"]["code"] != -32600, at_limit


@pytest.mark.parametrize("line", [
    b"[" * (1 << 20 - 1), b'{"a":' * 200_000, b"[1," * 300_000,
    (b"[" * 64 + b"]" * 64) * 8000,
], ids=["brackets", "objects", "list-of-lists", "many-64-deep"])
def test_a_megabyte_line_is_refused_or_decoded_quickly(make_daemon: Any, line: bytes) -> None:
    d = make_daemon(config="[server]\nmax_message_bytes = 1100000\n")
    with Wire(d.socket) as w:
        started = time.perf_counter()
        answer = w.ask(line)
        took = time.perf_counter() - started
        assert answer["error"]["code"] in (-32600, -32700)
        assert took < 0.5, f"{len(line)} bytes took {took * 1000:.0f} ms"
        assert "result" in w.call("ping")


@pytest.mark.parametrize("method,params,field", [
    ("jobs.submit", '{"type":"noop","description":"ok \\ud800"}', "description"),
    ("jobs.submit", '{"type":"noop","idempotency_key":"\\udfff"}', "idempotency_key"),
    ("jobs.submit", '{"type":"noop","metadata":{"tags":["a","\\ud800x"]}}', "metadata.tags[1]"),
    ("jobs.submit", '{"type":"noop","metadata":{"\\ud800":1}}', "metadata"),
    ("jobs.list", '{"type":"\\ud800"}', "type"),
    ("jobs.cancel", '{"filter":{"type":"\\ud800"}}', "filter.type"),
    ("jobs.submit", '{"type":"noop","metadata":{"x":NaN}}', "metadata.x"),
    ("jobs.submit", '{"type":"noop","metadata":{"x":[1,Infinity]}}', "metadata.x[1]"),
    ("jobs.submit", '{"type":"noop","metadata":{"x":-Infinity}}', "metadata.x"),
    ("jobs.submit", '{"type":"noop","metadata":{"x":1e400}}', "metadata.x"),
    ("jobs.list", '{"limit":1e400}', "limit"),
    ("jobs.wait", '{"job_id":"x","timeout_s":NaN}', "timeout_s"),
], ids=["description", "idempotency-key", "list-item", "key", "list-type", "filter-type",
        "nan", "infinity", "minus-infinity", "1e400", "limit", "timeout"])
def test_surrogates_and_non_finite_numbers_are_invalid_params_naming_the_field(
        jd: Daemon, method: str, params: str, field: str) -> None:
    line = f'{{"jsonrpc":"2.0","id":4,"method":"{method}","params":{params}}}'
    with Wire(jd.socket) as w:
        answer = w.ask(line.encode())
        assert error_of(answer, -32602)["data"]["field"] == field
        assert answer["id"] == 4


@pytest.mark.parametrize("line", [
    b'{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}',
    b'{"jsonrpc":"2.0","id":1,"method":"ping","\\ud800":1}',
], ids=["id", "member"])
def test_a_surrogate_in_the_envelope_is_answered_and_the_connection_goes_on(
        jd: Daemon, line: bytes) -> None:
    with Wire(jd.socket) as w:
        answer = w.ask(line)
        assert answer["id"] is None
        error_of(answer, -32600)
        assert "result" in w.call("ping")


def test_a_method_named_with_a_lone_surrogate_is_no_such_method(jd: Daemon) -> None:
    # a valid Request for a method that cannot exist: -32601, the name not echoed back
    with Wire(jd.socket) as w:
        answer = w.ask(b'{"jsonrpc":"2.0","id":7,"method":"\\ud800"}')
        assert answer["id"] == 7 and "lone surrogate" in error_of(answer, -32601)["message"]
        assert "result" in w.call("ping")


@pytest.mark.parametrize("line,code", [
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"n":1' + b"0" * 5000 + b"}}", -32700),
    (b"1" * 1_000_000, -32700),
    (b'{"jsonrpc":"2.0","id":1' + b"0" * 5000 + b',"method":"ping"}', -32700),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"n":1e400}}', -32602),
    (b'{"jsonrpc":"2.0","id":1,"method":"jobs.get","params":{"job_id":1' + b"0" * 4000
     + b"}}", -32602),
    (b'{"jsonrpc":"2.0","id":1,"method":"jobs.list","params":{"limit":1' + b"0" * 4000
     + b"}}", -32602),
    (b'{"jsonrpc":"2.0","id":1' + b"0" * 4000 + b',"method":"nope"}', -32601),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":' + b'{"a":' * 60 + b"1"
     + b"}" * 60 + b"}", -32602),
], ids=["10**5000", "a-megabyte-of-digits", "huge-id", "1e400-unknown-param",
        "huge-job-id", "huge-limit", "huge-id-unknown-method", "deep-unknown-param"])
def test_huge_numbers_are_client_errors(make_daemon: Any, line: bytes, code: int) -> None:
    d = make_daemon(config="[server]\nmax_message_bytes = 1100000\n")
    with Wire(d.socket) as w:
        error_of(w.ask(line), code)
        assert "result" in w.call("ping")
    d.stop()
    assert tracebacks(d.log()) == []


def test_hostile_lines_are_logged_once_per_connection_without_a_traceback(
        make_daemon: Any) -> None:
    d = make_daemon()
    hostile = [b"[" * 100, b"not json", b'{"jsonrpc":"2.0","id":1,"method":"ping","params":[1]}',
               b'{"jsonrpc":"2.0","id":true,"method":"ping"}', b"\xff\xfe",
               b'{"jsonrpc":"2.0","id":1,"method":"jobs.submit","params":'
               b'{"type":"noop","description":"\\ud800"}}']
    for _ in range(2):  # two connections
        with Wire(d.socket) as w:
            for _ in range(50):
                for line in hostile:
                    w.ask(line)
    d.stop()
    refused = [e for e in d.log_events() if e.get("event") == "request_refused"
               and e.get("level") == "info"]
    assert len(refused) == 2, refused
    assert tracebacks(d.log()) == []
    assert len(d.log()) < 20_000  # 600 hostile lines, a few log lines


# -- bounded answers (item 7) -------------------------------------------------------------------

BOUNDED = """
[server]
max_response_bytes = {limit}
line_timeout = "{line_timeout}"
max_batch = 20

[execution]
cancel_grace = "1s"
shutdown_grace = "5s"
"""


def fill(d: Daemon, owner: str, jobs: int, metadata_bytes: int) -> None:
    """``jobs`` queued noop jobs of ``owner`` with ``metadata_bytes`` of metadata each."""
    pad = "m" * (metadata_bytes - 16)
    with Wire(d.socket) as w:
        assert "result" in w.call("admin.pause")
        for i in range(jobs):
            assert "result" in w.call("jobs.submit", i, type="noop", as_user=owner,
                                      metadata={"p": pad})


def test_an_answer_over_max_response_bytes_is_unavailable_and_a_batch_keeps_the_limit(
        make_daemon: Any) -> None:
    limit = 300_000
    d = make_daemon(config=BOUNDED.format(limit=limit, line_timeout="30s"))
    owner = who()
    fill(d, owner, 12, 60_000)
    with Wire(d.socket) as w:
        big = w.ask(request("jobs.events", 1, job_id="00000000-0000-0000-0000-000000000000"))
        assert big["error"]["code"] == -32004  # small answers pass as they are
        page = [{"jsonrpc": "2.0", "id": i, "method": "jobs.list",
                 "params": {"as_user": owner, "limit": 3}} for i in range(6)]
        raw = b""
        w.write(json.dumps(page).encode() + b"\n")
        while not raw.endswith(b"\n"):
            raw += w.sock.recv(1 << 20)
        assert len(raw) - 1 <= limit
        answers = checked(json.loads(raw))
        assert [a["id"] for a in answers] == list(range(6))
        kept = [a for a in answers if "result" in a]
        refused = [a for a in answers if "error" in a]
        assert kept and refused, [("result" in a) for a in answers]
        assert all(a["error"]["code"] == -32050
                   and a["error"]["data"]["detail"] == "response too large" for a in refused)
        assert answers.index(refused[0]) == len(kept)  # the items past the limit


def batch_answers(w: Wire, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send ``items`` as one batch; its answers, checked."""
    raw = b""
    w.write(json.dumps(items).encode() + b"\n")
    while not raw.endswith(b"\n"):
        raw += w.sock.recv(1 << 20)
    return checked(json.loads(raw))


def test_items_of_a_batch_past_the_limit_are_not_run_and_a_write_that_was_run_says_so(
        make_daemon: Any) -> None:
    """Past the answer limit, a batch's items get -32050 "response too large" and are not
    run, so that a client may send them again: no job is made whose id nobody hears. A
    write that was run and whose answer does not fit says that it was done, and names
    its job."""
    limit = 300_000
    d = make_daemon(config=BOUNDED.format(limit=limit, line_timeout="30s"))
    owner = who()
    fill(d, owner, 4, 60_000)

    def item(i: int, method: str, **params: Any) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": i, "method": method,
                "params": {"as_user": owner, **params}}
    big = {"p": "b" * 60_000}
    with Wire(d.socket) as w:
        answers = batch_answers(w, [
            item(0, "jobs.list", limit=4),  # about 240 kB: fits
            item(1, "jobs.submit", type="noop", metadata=big),  # run; its answer cannot fit
            item(2, "jobs.submit", type="noop"),  # past the limit: not run
            item(3, "jobs.list", limit=1),
            item(4, "jobs.submit", type="noop", description="never")])
        assert [a["id"] for a in answers] == list(range(5))
        assert len(answers[0]["result"]["jobs"]) == 4
        done = error_of(answers[1], -32050)
        assert done["data"]["detail"] == "response too large", done
        made = [j for j in w.call("jobs.list", as_user=owner, limit=100)["result"]["jobs"]
                if j["metadata"] == big]
        assert [j["id"] for j in made] == [done["data"]["job_id"]], done
        assert "was done" in done["message"] and made[0]["id"] in done["message"], done
        for a in answers[2:]:
            refused = error_of(a, -32050)
            assert refused["data"] == {"http_status": 503, "detail": "response too large"}
            assert "not run" in refused["message"], refused
        # only the fill's jobs and the one write that was run
        assert w.call("jobs.list", as_user=owner, limit=100,
                      with_total=True)["result"]["total"] == 5


def test_a_single_answer_over_the_limit_is_unavailable_response_too_large(
        make_daemon: Any) -> None:
    d = make_daemon(config=BOUNDED.format(limit=100_000, line_timeout="30s"))
    with Wire(d.socket) as w:
        job = w.call("jobs.submit", type="command",
                     options={"argv": [sys.executable, "-c", "print('x' * 400_000)"]})["result"]
        while w.call("jobs.get", job_id=job["id"])["result"]["status"] != "completed":
            time.sleep(0.05)
        answer = w.call("jobs.logs", 7, job_id=job["id"], limit_bytes=1 << 20)
        assert answer["id"] == 7
        assert error_of(answer, -32050)["data"]["detail"] == "response too large"
        assert "max_response_bytes" in answer["error"]["message"]
        assert "result" in w.call("jobs.logs", 8, job_id=job["id"], limit_bytes=50_000)


def test_answers_nobody_reads_leave_memory_bounded_and_other_clients_fast(
        make_daemon: Any) -> None:
    """Issue 7 item 7, reduced: 16 connections each send a batch of 20 jobs.list of 100
    jobs with 60 KiB metadata and never read; RSS stays bounded and ping stays fast."""
    limit = 2 * 1024 * 1024
    d = make_daemon(config=BOUNDED.format(limit=limit, line_timeout="3s"))
    owner = who()
    fill(d, owner, 100, 60 * 1024)
    assert d.proc is not None
    base = rss_mb(d.proc.pid)
    batch = json.dumps([{"jsonrpc": "2.0", "id": i, "method": "jobs.list",
                         "params": {"as_user": owner, "limit": 100}}
                        for i in range(20)]).encode() + b"\n"
    hogs = []
    for _ in range(16):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(str(d.socket))
        s.sendall(batch)
        hogs.append(s)
    pings, peak = [], base
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pings.append(ping_ms(d.socket))
        peak = max(peak, rss_mb(d.proc.pid))
        time.sleep(0.02)
    for s in hogs:
        s.close()
    assert max(pings) <= 100, f"ping took up to {max(pings):.0f} ms (median " \
                              f"{sorted(pings)[len(pings) // 2]:.1f} ms)"
    # one user holds at most 2 × max_response_bytes of answers, however many connections
    assert peak - base <= 60, f"RSS grew {peak - base:.0f} MB (base {base:.0f} MB)"
    # past line_timeout, the daemon closed the connections that did not read their answers
    timed_out = [e for e in d.log_events() if e.get("event") == "connection_timed_out"]
    assert timed_out and all(e["timeout"] == "answer_unread" for e in timed_out)
    print(f"peak RSS {peak:.0f} MB (base {base:.0f} MB); ping median "
          f"{sorted(pings)[len(pings) // 2]:.1f} ms, max {max(pings):.1f} ms")


# -- a request while the daemon was stopped (item 20) -------------------------------------------

def test_a_request_sent_while_the_daemon_was_stopped_is_answered_after_it_goes_on(
        make_daemon: Any) -> None:
    d = make_daemon(config='[server]\nidle_timeout = "1s"\n')
    assert d.proc is not None
    for _ in range(3):  # the race is in one loop turn: try it a few times
        with Wire(d.socket) as w:
            assert "result" in w.call("ping")  # accepted, and its idle timer armed
            os.kill(d.proc.pid, signal.SIGSTOP)
            try:
                w.write(request("ping", "while-stopped"))
                time.sleep(1.5)  # past the idle timeout
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)
            answer = w.line(timeout=5)
            assert answer is not None, "the daemon closed on idle with a request waiting"
            assert json.loads(answer)["id"] == "while-stopped"


# -- the per-user socket folder (item 13) --------------------------------------------------------

def per_user_daemon(tmp_path: Path, make_daemon: Any) -> tuple[Daemon, Path]:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    d = make_daemon(env={"XDG_RUNTIME_DIR": str(runtime)}, start=False)
    d.socket = runtime / "jobd" / "jobd.sock"
    return d, runtime / "jobd"


@pytest.mark.parametrize("before", [None, 0o755], ids=["new", "left-0755"])
def test_the_per_user_socket_folder_is_made_0700_and_its_socket_0600(
        tmp_path: Path, make_daemon: Any, before: int | None) -> None:
    d, folder = per_user_daemon(tmp_path, make_daemon)
    if before is not None:
        folder.mkdir()
        folder.chmod(before)
    d.start()
    assert stat.S_IMODE(folder.lstat().st_mode) == 0o700
    assert stat.S_IMODE(d.socket.lstat().st_mode) == 0o600
    assert "result" in d.raw("ping")


def _other_owner(folder: Path) -> str:
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    return "is owned by uid 65534"


def _open_to_all(folder: Path) -> str:
    folder.mkdir()
    folder.chmod(0o777)
    return "is writable by others (mode 0777)"


def _symlink(folder: Path) -> str:
    target = folder.with_name("elsewhere")
    target.mkdir(mode=0o700)
    folder.symlink_to(target)
    return "is a symbolic link"


@pytest.mark.parametrize("make_unsafe", [_other_owner, _open_to_all, _symlink],
                         ids=["other-owner", "0777", "symlink"])
def test_an_unsafe_per_user_socket_folder_is_refused(tmp_path: Path, make_daemon: Any,
                                                     make_unsafe: Any) -> None:
    if os.geteuid() != 0 and make_unsafe is _other_owner:
        pytest.skip("giving a folder to another uid needs root")
    d, folder = per_user_daemon(tmp_path, make_daemon)
    problem = make_unsafe(folder)
    with pytest.raises(RuntimeError, match="exited with 1"):
        d.start(timeout=15)
    assert f"socket folder {folder} {problem}" in d.log()
    assert not (folder / "jobd.sock").exists()


def test_an_explicit_socket_elsewhere_keeps_its_folder_rules(tmp_path: Path,
                                                            make_daemon: Any) -> None:
    d = make_daemon(start=False)
    d.socket.parent.chmod(0o777)  # not a per-user folder: the operator's choice
    d.start()
    assert stat.S_IMODE(d.socket.lstat().st_mode) == 0o660


def _doubled_slash(socket: Path) -> Path:
    return Path("/" + str(socket))


def _dot_dot(socket: Path) -> Path:
    runtime = socket.parent.parent
    return runtime / ".." / runtime.name / "jobd" / socket.name


def _through_a_link(socket: Path) -> Path:
    runtime = socket.parent.parent
    alias = runtime.with_name("alias")
    alias.symlink_to(runtime)
    return alias / "jobd" / socket.name


@pytest.mark.parametrize("spell", [_doubled_slash, _dot_dot, _through_a_link],
                         ids=["//", "..", "link"])
def test_a_per_user_socket_folder_is_checked_however_the_socket_path_is_spelt(
        tmp_path: Path, make_daemon: Any, spell: Any) -> None:
    d, folder = per_user_daemon(tmp_path, make_daemon)
    problem = _open_to_all(folder)
    d.socket = spell(d.socket)
    with pytest.raises(RuntimeError, match="exited with 1"):
        d.start(timeout=15)
    assert f"socket folder {folder} {problem}" in d.log()
    assert not (folder / "jobd.sock").exists()


@pytest.mark.parametrize("no_limit", ['"0"', '"none"', "0"])
def test_a_connection_timeout_of_none_or_0_is_no_limit(make_daemon: Any, no_limit: str) -> None:
    d = make_daemon(config=f"[server]\nidle_timeout = {no_limit}\nline_timeout = {no_limit}\n")
    with Wire(d.socket) as w:
        assert "result" in w.call("ping")
        time.sleep(1.2)  # idle
        w.write(b'{"jsonrpc": "2.0", "method": "ping", ')  # a line begun
        time.sleep(1.2)
        w.write(b'"id": "late"}\n')
        answer = w.line(timeout=5)
        assert answer is not None and json.loads(answer)["id"] == "late"


def test_a_link_in_a_per_user_folders_place_does_not_claim_an_operators_folder(
        tmp_path: Path, make_daemon: Any) -> None:
    d, folder = per_user_daemon(tmp_path, make_daemon)
    elsewhere = tmp_path / "run-jobd"
    elsewhere.mkdir(mode=0o755)
    folder.symlink_to(elsewhere)  # as another user could make /tmp/jobd-<uid>
    d.socket = elsewhere / "jobd.sock"  # the operator's explicit path
    d.start()
    assert stat.S_IMODE(d.socket.lstat().st_mode) == 0o660  # socket_mode: not per-user
    assert "result" in d.raw("ping")
