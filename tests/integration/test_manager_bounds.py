"""The rules layer against a real daemon: bounded list pages, ``fields``, job ids to the
letter, who may ask which ``timeout_s``, and hostile params in every method (SPEC §3a, §4).

No value a client puts in a method's params may answer -32603: each is refused -32602
naming the param (or answered, where the value is a valid one).
"""

from __future__ import annotations

import json
import socket
import sys
import uuid
from typing import Any, Iterator

import pytest

from conftest import FAST_CONFIG, Daemon, error_of, result_of, wait_terminal


def line_of(d: Daemon, method: str, **params: Any) -> bytes:
    """One call on a fresh connection; the raw response line (without its newline)."""
    request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(d.socket))
        s.sendall(request.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            assert chunk, "the daemon closed the connection instead of answering"
            buf += chunk
    return buf[:-1]


def every_page(d: Daemon, **params: Any) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Page jobs.list by next_cursor to the end: each page's raw line and its result."""
    cursor = None
    for _ in range(10_000):
        line = line_of(d, "jobs.list", **params, **({"cursor": cursor} if cursor else {}))
        response = json.loads(line)
        assert "result" in response, response
        yield line, response["result"]
        cursor = response["result"]["next_cursor"]
        if cursor is None:
            return
    pytest.fail("jobs.list never ended its paging")


def user() -> str:
    return f"u{uuid.uuid4().hex[:10]}"


# -- item 7: bounded pages and fields ------------------------------------------------------

MAX_RESPONSE = 200_000


def test_list_pages_stay_under_max_response_bytes_and_hold_every_job_once(
        make_daemon: Any) -> None:
    d = make_daemon(f"[server]\nmax_response_bytes = {MAX_RESPONSE}\n{FAST_CONFIG}")
    who = user()
    submitted = []
    for i in range(24):
        # two bytes a character: a page counted in characters would pass the limit
        blob = "é" * (20_000 + 500 * i) if i % 3 else "x" * 200
        job = result_of(d, "jobs.submit", type="noop", as_user=who, metadata={"blob": blob})
        submitted.append(job["id"])
        if i == 11:  # the rest stay queued: those go out with what the daemon adds to them
            for job_id in submitted:
                wait_terminal(d, job_id)
            result_of(d, "admin.pause")
    newest_first = list(reversed(submitted))

    pages = list(every_page(d, user_id=who, limit=1000))
    assert len(pages) > 3
    for line, page in pages:
        assert len(line) <= MAX_RESPONSE
        assert page["jobs"], "a page without a job"
    listed = [job["id"] for _, page in pages for job in page["jobs"]]
    assert listed == newest_first
    statuses = {job["status"] for _, page in pages for job in page["jobs"]}
    assert statuses == {"completed", "queued"}
    queued = [job for _, page in pages for job in page["jobs"] if job["status"] == "queued"]
    assert [job["queue_position"] for job in reversed(queued)] == list(range(1, 13))

    trimmed = list(every_page(d, user_id=who, limit=1000, fields=["id", "status"]))
    assert len(trimmed) == 1  # small jobs: one page holds them all
    assert [job["id"] for job in trimmed[0][1]["jobs"]] == newest_first
    assert all(set(job) == {"id", "status"} for job in trimmed[0][1]["jobs"])
    # id always comes, so that paging by it works; the live fields come for active jobs
    live = list(every_page(d, user_id=who, limit=5, fields=["queue_position"]))
    assert [job["id"] for _, page in live for job in page["jobs"]] == newest_first
    assert all(set(job) == {"id", "queue_position"} for _, page in live for job in page["jobs"])
    assert [job["queue_position"] for _, page in live for job in page["jobs"]][:12] == list(
        range(12, 0, -1))
    result_of(d, "admin.resume")


@pytest.mark.parametrize("fields", [["id", "colour"], "status", [1], [["id"]], ["ID"],
                                    ["seq"], ["idempotency_key"], ["\ud800"]])
def test_list_fields_names_only_job_fields(hostile_daemon: tuple[Daemon, str],
                                           fields: Any) -> None:
    problem = _refused_naming(hostile_daemon[0].raw("jobs.list", fields=fields), "fields")
    assert problem is None, problem


def test_a_tiny_max_response_bytes_still_pages_one_job_at_a_time(make_daemon: Any) -> None:
    d = make_daemon(f"[server]\nmax_response_bytes = 1000\n{FAST_CONFIG}")
    who = user()
    submitted = [result_of(d, "jobs.submit", type="noop", as_user=who)["id"] for _ in range(5)]
    for job_id in submitted:
        wait_terminal(d, job_id)
    pages = list(every_page(d, user_id=who))
    assert [len(page["jobs"]) for _, page in pages] == [1] * 5
    assert [page["jobs"][0]["id"] for _, page in pages] == list(reversed(submitted))
    assert all(len(line) <= 1000 for line, _ in pages)


# -- item 10: ids to the letter ------------------------------------------------------------

def test_a_job_id_or_prefix_with_a_trailing_newline_is_invalid(make_daemon: Any) -> None:
    d = make_daemon()
    job = result_of(d, "jobs.submit", type="noop", as_user=user())
    for method in ("jobs.get", "jobs.cancel", "jobs.retry", "jobs.wait", "jobs.events",
                   "jobs.logs"):
        err = error_of(d, method, job_id=job["id"] + "\n")
        assert err["code"] == -32602 and err["data"]["field"] == "job_id", (method, err)
    err = error_of(d, "jobs.list", id_prefix=job["id"][:8] + "\n")
    assert err["code"] == -32602 and err["data"]["field"] == "id_prefix", err
    assert [j["id"] for j in result_of(d, "jobs.list", id_prefix=job["id"][:8])["jobs"]] == [
        job["id"]]


# -- item 18: timeout_s by role ------------------------------------------------------------

MAX_TIMEOUT_S = 3600


def test_timeout_0_is_no_limit_for_an_admin(make_daemon: Any) -> None:
    d = make_daemon(f'{FAST_CONFIG}default_timeout = "1s"\nmax_timeout = "1h"\n')
    argv = [sys.executable, "-c", "import time; time.sleep(1.6)"]
    unlimited = result_of(d, "jobs.submit", type="command", options={"argv": argv},
                          timeout_s=0)
    defaulted = result_of(d, "jobs.submit", type="command", options={"argv": argv})
    assert unlimited["timeout_s"] == 0 and defaulted["timeout_s"] is None
    assert wait_terminal(d, unlimited["id"])["status"] == "completed"
    timed_out = wait_terminal(d, defaulted["id"])
    assert timed_out["status"] == "failed" and "timed out" in timed_out["error"]
    # past max_timeout is the admin's to ask; a negative or endless one is nobody's
    assert result_of(d, "jobs.submit", type="noop", timeout_s=10 * MAX_TIMEOUT_S)[
        "timeout_s"] == 10 * MAX_TIMEOUT_S
    for value in (-1, -0.5, float("inf"), float("nan"), "60", True, 10**400):
        err = error_of(d, "jobs.submit", type="noop", timeout_s=value)
        assert err["code"] == -32602 and err["data"]["field"] == "timeout_s", (value, err)


def test_as_role_user_gives_an_admin_a_plain_users_timeout_range(make_daemon: Any) -> None:
    d = make_daemon(f'{FAST_CONFIG}max_timeout = "1h"\n')
    who = user()
    err = error_of(d, "jobs.submit", type="sync", project_id="p0", timeout_s=0, as_user=who,
                   as_role="user")
    assert err["code"] == -32602 and err["data"]["field"] == "timeout_s", err
    assert f"from 1 to {MAX_TIMEOUT_S}" in err["message"], err
    err = error_of(d, "jobs.submit", type="sync", project_id="p1",
                   timeout_s=MAX_TIMEOUT_S + 1, as_user=who, as_role="user")
    assert err["data"]["field"] == "timeout_s", err
    assert result_of(d, "jobs.submit", type="sync", project_id="p2", timeout_s=MAX_TIMEOUT_S,
                     as_user=who, as_role="user")["timeout_s"] == MAX_TIMEOUT_S
    # the same admin for the same user, with its own rights: no limit is its to ask
    assert result_of(d, "jobs.submit", type="sync", project_id="p3", timeout_s=0,
                     as_user=who)["timeout_s"] == 0


PLAIN_USER = f"jobdt_mb{uuid.uuid4().hex[:6]}"

CALLS_SCRIPT = (
    "import json, socket, sys\n"
    "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile('rwb')\n"
    "for i, (m, p) in enumerate(json.loads(sys.argv[2])):\n"
    "    f.write(json.dumps({'jsonrpc': '2.0', 'id': i, 'method': m, 'params': p})"
    ".encode() + b'\\n'); f.flush()\n"
    "    print(f.readline().decode().strip())\n")


def calls_as(accounts: Any, name: str, d: Daemon,
             calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Make ``calls`` on one connection as the local user ``name``; the responses."""
    out = accounts.run_as(name, [accounts.python, "-c", CALLS_SCRIPT, str(d.socket),
                                 json.dumps(calls)])
    return [json.loads(line) for line in out.splitlines()]


def plain_daemon(make_daemon: Any, max_timeout: str) -> Daemon:
    d = make_daemon(f'[server]\nsocket_mode = "0666"\n{FAST_CONFIG}max_timeout = "{max_timeout}"'
                    '\n[auth]\nadmins = ["root"]\nservices = []\n', start=False)
    d.socket.parent.chmod(0o755)  # the plain user connects
    return d.start()


@pytest.mark.root
def test_a_plain_users_timeout_lies_in_1_to_max_timeout(make_daemon: Any,
                                                        local_accounts: Any) -> None:
    local_accounts.user(PLAIN_USER)
    d = plain_daemon(make_daemon, "1h")

    def sync(project: str, timeout_s: Any) -> tuple[str, dict[str, Any]]:
        return ("jobs.submit", {"type": "sync", "project_id": project, "timeout_s": timeout_s})

    answers = calls_as(local_accounts, PLAIN_USER, d, [
        ("ping", {}), sync("p0", 0), sync("p1", MAX_TIMEOUT_S + 0.5), sync("p2", 0.5),
        sync("p3", 1), sync("p4", MAX_TIMEOUT_S), sync("p5", -1)])
    assert answers[0]["result"]["caller"]["role"] == "user"
    for refused in (answers[1], answers[2], answers[3], answers[6]):
        err = refused["error"]
        assert err["code"] == -32602 and err["data"]["field"] == "timeout_s", err
        assert f"from 1 to {MAX_TIMEOUT_S}" in err["message"], err
        assert "services and admins" in err["message"], err
    assert [answers[i]["result"]["timeout_s"] for i in (4, 5)] == [1, MAX_TIMEOUT_S]

    d.stop()
    unbounded = plain_daemon(make_daemon, "none")
    answers = calls_as(local_accounts, PLAIN_USER, unbounded, [
        sync("p6", 100 * MAX_TIMEOUT_S), sync("p7", 0)])
    assert answers[0]["result"]["timeout_s"] == 100 * MAX_TIMEOUT_S
    assert answers[1]["error"]["data"]["field"] == "timeout_s", answers[1]
    assert "at least 1" in answers[1]["error"]["message"], answers[1]


# -- items 8/9: hostile params never reach -32603 -----------------------------------------

def _nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


#: values a client may send; each (method, param) below names those that are valid for it
HOSTILE: dict[str, Any] = {
    "null": None, "true": True, "negative": -1, "int64": 2**63, "huge": 10**30,
    "fraction": 1.5, "float_max": 1e308, "nan": float("nan"), "inf": float("inf"),
    "empty": "", "surrogate": "\ud800", "newline": "abcd\n", "long": "x" * 5000,
    "list": [], "list_of_list": [[]], "list_of_object": [{}], "object": {},
    "object_of_list": {"a": [1]}, "deep": _nested(40), "surrogate_key": {"\ud800": 1},
    "nan_in_list": [float("nan")], "surrogate_in_list": ["\ud800"],
    "nan_in_object": {"a": float("nan")}, "inf_in_object": {"a": {"b": float("inf")}},
}

#: (method, param, the HOSTILE names that are valid values for it, other params)
PARAMS: list[tuple[str, str, set[str], dict[str, Any]]] = [
    ("jobs.submit", "type", set(), {}),
    ("jobs.submit", "project_id", {"null"}, {"type": "noop"}),
    ("jobs.submit", "project_id", set(), {"type": "sync"}),
    ("jobs.submit", "options", {"null", "object"}, {"type": "noop"}),
    ("jobs.submit", "priority", {"negative"}, {"type": "noop"}),
    ("jobs.submit", "metadata", {"null", "object", "object_of_list"}, {"type": "noop"}),
    ("jobs.submit", "description", {"null", "empty", "newline"}, {"type": "noop"}),
    ("jobs.submit", "timeout_s", {"null", "int64", "huge", "fraction", "float_max"},
     {"type": "noop"}),
    ("jobs.submit", "idempotency_key", {"null", "newline"}, {"type": "noop"}),
    ("jobs.get", "job_id", set(), {}),
    ("jobs.get", "as_user", {"null"}, {"job_id": str(uuid.UUID(int=1))}),
    ("jobs.get", "as_admin", {"true"}, {"job_id": str(uuid.UUID(int=1))}),
    ("jobs.list", "status", {"null", "list"}, {}),
    ("jobs.list", "type", {"null", "empty", "newline", "long", "list"}, {}),
    ("jobs.list", "user_id", {"null"}, {}),
    ("jobs.list", "project_id", {"null"}, {}),
    ("jobs.list", "created_after", {"null"}, {}),
    ("jobs.list", "created_before", {"null"}, {}),
    ("jobs.list", "id_prefix", {"null"}, {}),
    ("jobs.list", "limit", set(), {}),
    ("jobs.list", "cursor", {"null"}, {}),
    ("jobs.list", "fields", {"null", "list"}, {}),
    ("jobs.list", "offset", {"null"}, {}),
    ("jobs.list", "with_total", {"true"}, {}),
    ("jobs.cancel", "job_id", set(), {}),
    ("jobs.cancel", "wait", {"true"}, {"job_id": str(uuid.UUID(int=1))}),
    ("jobs.retry", "job_id", set(), {}),
    ("jobs.wait", "job_id", set(), {}),
    ("jobs.wait", "after_version", {"null", "negative", "int64", "huge"}, {"timeout_s": 0}),
    ("jobs.wait", "timeout_s", {"fraction"}, {}),
    ("jobs.changes", "after", {"null"}, {}),
    ("jobs.changes", "timeout_s", {"fraction"}, {}),
    ("jobs.changes", "status", {"null", "list"}, {}),
    ("jobs.changes", "type", {"null", "empty", "newline", "long", "list"}, {}),
    ("jobs.changes", "user_id", {"null"}, {}),
    ("jobs.changes", "project_id", {"null"}, {}),
    ("jobs.changes", "created_after", {"null"}, {}),
    ("jobs.changes", "id_prefix", {"null"}, {}),
    ("jobs.changes", "fields", {"null", "list"}, {}),
    ("jobs.events", "job_id", set(), {}),
    ("jobs.logs", "job_id", set(), {}),
    ("jobs.logs", "offset", set(), {}),
    ("jobs.logs", "limit_bytes", set(), {}),
    ("admin.stats", "since", {"null"}, {}),
    ("admin.cleanup", "older_than_s", {"null", "fraction"}, {"dry_run": True}),
    ("admin.cleanup", "dry_run", {"true"}, {}),
    ("admin.purge", "user_id", set(), {}),
]

#: the job options each built-in type checks, with hostile values for each
OPTIONS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("noop", {}, {"seconds": [-1, float("nan"), float("inf"), "1", True, 10**30, [1]]}),
    ("command", {"argv": ["true"]}, {
        "argv": ["true", [], [1], ["\ud800"], [""], [["x"]], ["x" * 20_000]],
        "cwd": [1, "\ud800", "relative", "/no/such/folder", "/tmp\n"],
        "env": [[], {"A": 1}, {"\ud800": "x"}, {"A": "\ud800"}, {"A=B": "x"}, {"": "x"}]}),
    ("sync", {}, {
        "branch": [1, "-x", "\ud800", "a\n", "a..b", "", "x" * 5000],
        "remote": [1, "-x", "\ud800", "", "a b"],
        "strategy": [1, "rebase", "\ud800"],
        "full_reindex": ["yes", 1, [True]],
        "repo_path": [1, "relative", "\ud800", "/etc", "/no/such\n"],
        "url": [1, "-u", "\ud800", "ext::sh -c x"]}),
    ("index", {}, {"full_reindex": ["yes", 1], "repo_path": [1, "\ud800", "/etc"]}),
]


@pytest.fixture(scope="module")
def hostile_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str]]:
    d = Daemon(tmp_path_factory.mktemp("hostile")).start()
    job = result_of(d, "jobs.submit", type="noop", as_user=user())
    yield d, job["id"]
    # nothing stored may have broken the answers; nothing crashed on the way
    assert "result" in d.raw("jobs.list", limit=1000)
    assert d.stop() == 0
    assert "rpc_method_crashed" not in d.log() and "Traceback" not in d.log()


def _refused_naming(response: dict[str, Any], field: str) -> str | None:
    """Why ``response`` is not a -32602 naming ``field`` (or a part of it), or None."""
    err = response.get("error")
    if err is None:
        return f"answered {json.dumps(response['result'])[:120]}"
    named = err["data"].get("field") or ""
    if err["code"] != -32602 or not (named == field or named.startswith((f"{field}.",
                                                                         f"{field}["))):
        return f"answered {err}"
    return None


@pytest.mark.parametrize("method,param,valid,extra", PARAMS,
                         ids=[f"{m}-{p}-{e.get('type', '')}" for m, p, _, e in PARAMS])
def test_hostile_params_are_refused_naming_the_param(
        hostile_daemon: tuple[Daemon, str], method: str, param: str, valid: set[str],
        extra: dict[str, Any]) -> None:
    d, job_id = hostile_daemon
    if param != "job_id" and method in ("jobs.wait", "jobs.logs"):
        extra = {"job_id": job_id, **extra}
    problems = []
    for name, value in HOSTILE.items():
        if name in valid:
            continue
        problem = _refused_naming(d.raw(method, **extra, **{param: value}), param)
        if problem is not None:
            problems.append(f"{param}={name}: {problem}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("type_,base,hostile", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_hostile_options_are_refused_naming_the_option(
        hostile_daemon: tuple[Daemon, str], type_: str, base: dict[str, Any],
        hostile: dict[str, list[Any]]) -> None:
    d, _ = hostile_daemon
    problems = []
    for option, values in hostile.items():
        for value in values:
            params = {"type": type_, "options": {**base, option: value}}
            if type_ in ("sync", "index"):
                params["project_id"] = f"p{uuid.uuid4().hex[:8]}"
            response = d.raw("jobs.submit", **params)
            err = response.get("error")
            if err is None or err["code"] == -32603 or not (
                    err["data"].get("field", "").startswith("options")):
                problems.append(f"{option}={value!r:.40}: {response}")
    assert not problems, "\n".join(problems)
