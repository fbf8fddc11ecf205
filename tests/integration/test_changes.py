"""jobs.changes and admin.purge against a real daemon (SPEC §4, §3, §8).

jobs.changes: a submitted job comes at once; a long poll wakes on a status change and on
a progress tick; scope and filters as jobs.list's; a cursor from before a restart still
yields what changed after it; the timeout answers an empty list with a usable cursor;
bad input is -32602 naming the field; answers are bounded, every job coming once, in
order. admin.purge: a user's finished jobs go with their logs and manifests, running
ones are cancelled first, other users' jobs stay; who may call it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import threading
import time
import uuid
from typing import Any, Callable

import pytest

from conftest import FAST_CONFIG, Daemon, error_of, result_of, wait_for, wait_terminal
from test_manager_bounds import calls_as

ALICE, BOB = "alice@example.com", "Bob Jones"


def changes(d: Daemon, **params: Any) -> dict[str, Any]:
    return result_of(d, "jobs.changes", **params)


def submit_queued(d: Daemon, count: int, per_batch: int = 100, **params: Any) -> list[str]:
    """``count`` noop jobs submitted in batches (dispatch is paused: they stay queued)."""
    ids: list[str] = []
    for start in range(0, count, per_batch):
        batch = [{"jsonrpc": "2.0", "id": n, "method": "jobs.submit",
                  "params": {"type": "noop", **params}}
                 for n in range(start, min(count, start + per_batch))]
        answers = d.send(batch)
        assert all("result" in a for a in answers), answers[:1]
        ids += [a["result"]["id"] for a in sorted(answers, key=lambda a: a["id"])]
    return ids


def iso_seconds(text: str) -> float:
    """An ISO 8601 UTC time of the wire as seconds since the epoch."""
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def in_thread(fn: Callable[[], Any]) -> Callable[[], tuple[Any, float]]:
    """Run ``fn`` on a thread now; a function that joins it: (its value, when it returned)."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append((fn(), time.monotonic())))
    thread.start()

    def join() -> tuple[Any, float]:
        thread.join(35)
        assert box, "the long poll did not return"
        return box[0]
    return join


# -- jobs.changes --------------------------------------------------------------------------

def test_changes_answers_a_submitted_job_at_once_and_starts_from_the_active_jobs(
        daemon: Daemon) -> None:
    result_of(daemon, "admin.pause")
    before = result_of(daemon, "jobs.submit", type="noop")
    start = changes(daemon)  # no cursor: the jobs active now, at once
    assert [j["id"] for j in start["jobs"]] == [before["id"]]
    assert start["jobs"][0]["status"] == "queued" and start["jobs"][0]["queue_position"] == 1

    job = result_of(daemon, "jobs.submit", type="noop")
    began = time.monotonic()
    answer = changes(daemon, after=start["cursor"], timeout_s=30)
    assert time.monotonic() - began < 1.0
    assert [j["id"] for j in answer["jobs"]] == [job["id"]]
    # nothing changed since: the same cursor's answer waits, the new one's has nothing
    assert changes(daemon, after=answer["cursor"], timeout_s=0)["jobs"] == []


def test_a_long_poll_wakes_on_a_status_change_and_on_each_progress_tick(
        daemon: Daemon) -> None:
    result_of(daemon, "admin.pause")
    job = result_of(daemon, "jobs.submit", type="noop", options={"seconds": 3})
    cursor = changes(daemon)["cursor"]
    join = in_thread(lambda: (changes(daemon, after=cursor, timeout_s=20), time.time()))
    time.sleep(0.3)  # the poll waits
    result_of(daemon, "admin.resume")
    (answer, woke), _ = join()
    assert [(j["id"], j["status"]) for j in answer["jobs"]] == [(job["id"], "running")]
    started = iso_seconds(answer["jobs"][0]["started_at"])
    assert woke - started < 0.1, f"answered {woke - started:.3f}s after the job started"

    # every answer after that is a progress tick (noop reports every 50 ms), as live as
    # jobs.wait's: rising, one about every 50 ms
    cursor, seen, took = answer["cursor"], [], []
    for _ in range(6):
        began = time.monotonic()
        answer = changes(daemon, after=cursor, timeout_s=5)
        took.append(time.monotonic() - began)
        (fresh,) = answer["jobs"]
        seen.append(fresh["progress"])
        cursor = answer["cursor"]
    assert seen == sorted(seen) and seen[-1] > seen[0] > 0, seen
    assert sorted(took)[len(took) // 2] < 0.1 and max(took) < 0.5, took
    live = result_of(daemon, "jobs.get", job_id=job["id"])["progress"]
    assert live >= seen[-1]

    # a cancel request and the end are changes too
    result_of(daemon, "jobs.cancel", job_id=job["id"])
    statuses = []
    while not statuses or statuses[-1] != "cancelled":
        answer = changes(daemon, after=cursor, timeout_s=5)
        statuses += [j["status"] for j in answer["jobs"] if j["cancel_requested"]
                     or j["status"] == "cancelled"]
        cursor = answer["cursor"]
    assert statuses[-1] == "cancelled"


def test_changes_sees_only_the_callers_scope_and_applies_the_filters(daemon: Daemon) -> None:
    result_of(daemon, "admin.pause")
    cursor = changes(daemon)["cursor"]
    alice_p1 = result_of(daemon, "jobs.submit", type="noop", project_id="org/p1", as_user=ALICE)
    alice_p2 = result_of(daemon, "jobs.submit", type="noop", project_id="org/p2", as_user=ALICE)
    bob = result_of(daemon, "jobs.submit", type="noop", project_id="org/p1", as_user=BOB)
    result_of(daemon, "jobs.cancel", job_id=alice_p2["id"])

    def ids(**params: Any) -> list[str]:
        return [j["id"] for j in changes(daemon, after=cursor, timeout_s=0, **params)["jobs"]]

    # the start (no cursor) is the active jobs in scope
    assert [j["id"] for j in changes(daemon, as_user=ALICE)["jobs"]] == [alice_p1["id"]]
    assert ids(as_user=ALICE) == [alice_p1["id"], alice_p2["id"]]
    assert ids(as_user=BOB) == [bob["id"]]
    assert ids() == [alice_p1["id"], bob["id"], alice_p2["id"]]  # by latest change
    assert ids(project_id="org/p1") == [alice_p1["id"], bob["id"]]
    assert ids(status="cancelled") == [alice_p2["id"]]
    assert ids(status=["queued"], user_id=ALICE) == [alice_p1["id"]]
    assert ids(id_prefix=bob["id"][:8]) == [bob["id"]]
    assert ids(type="sync") == []
    assert ids(created_after="2000-01-01T00:00:00Z", created_before="2000-01-02T00:00:00Z") == []
    err = error_of(daemon, "jobs.changes", user_id=BOB, as_user=ALICE)
    assert err["code"] == -32003, err
    shown = changes(daemon, after=cursor, timeout_s=0, fields=["status"])["jobs"]
    assert all(set(j) == {"id", "status"} for j in shown), shown

    # a waiting poll of one user is not woken by another user's change
    join = in_thread(lambda: changes(daemon, after=changes(daemon, as_user=BOB, after=cursor,
                                                           timeout_s=0)["cursor"],
                                     timeout_s=0.6, as_user=BOB))
    time.sleep(0.2)
    result_of(daemon, "jobs.cancel", job_id=alice_p1["id"])
    answer, _ = join()
    assert answer["jobs"] == []


def test_a_cursor_from_before_a_restart_still_yields_every_job_changed_after_it(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    result_of(d, "admin.pause")
    old = result_of(d, "jobs.submit", type="noop")
    cursor = changes(d)["cursor"]
    before = result_of(d, "jobs.submit", type="noop")  # after the cursor, before the stop
    assert d.stop() == 0
    d.start()
    after = result_of(d, "jobs.submit", type="noop")
    answer = changes(d, after=cursor, timeout_s=0)
    got = [j["id"] for j in answer["jobs"]]
    assert before["id"] in got and after["id"] in got, got
    assert len(got) == len(set(got))
    assert old["id"] not in got or got.index(old["id"]) < got.index(before["id"])
    # and from its cursor on, the change log of this start: only what changes next
    newer = result_of(d, "jobs.submit", type="noop")
    assert [j["id"] for j in changes(d, after=answer["cursor"], timeout_s=5)["jobs"]] == [
        newer["id"]]


def test_the_timeout_answers_no_jobs_and_a_cursor_for_the_next_call(daemon: Daemon) -> None:
    result_of(daemon, "admin.pause")
    cursor = changes(daemon)["cursor"]
    began = time.monotonic()
    answer = changes(daemon, after=cursor, timeout_s=0.3)
    assert answer["jobs"] == [] and 0.3 <= time.monotonic() - began < 1.5
    job = result_of(daemon, "jobs.submit", type="noop")
    assert [j["id"] for j in changes(daemon, after=answer["cursor"], timeout_s=5)["jobs"]] == [
        job["id"]]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One daemon for the tests that only ask (refusals): started once."""
    d = Daemon(tmp_path_factory.mktemp("changes")).start()
    yield d
    assert d.stop() == 0
    assert "rpc_method_crashed" not in d.log() and "Traceback" not in d.log()


def _forged(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize("field,value", [
    ("after", "nope"), ("after", 17), ("after", ""), ("after", _forged("c1.zz.1.1")),
    ("after", _forged("c1.0123456789abcdef.1.1.1")), ("after", _forged("x1.1.1")),
    ("after", _forged("d1.1")),
    # another start's cursor is read by time, a rewind before it: none past int64
    ("after", _forged("c1.0123456789abcdef.1.-9223372036854775807")),
    ("after", _forged("d1.9223372036854775807.-9223372036854775807")), ("timeout_s", 61), ("timeout_s", -1), ("timeout_s", "5"),
    ("status", "done"), ("id_prefix", "xy"), ("fields", ["nope"]), ("user_id", ""),
])
def test_bad_params_are_refused_naming_the_field(shared: Daemon, field: str, value: Any) -> None:
    err = error_of(shared, "jobs.changes", **{field: value})
    assert err["code"] == -32602 and err["data"]["field"] == field, err


def test_a_cursor_past_the_head_of_this_start_is_refused(shared: Daemon) -> None:
    cursor = changes(shared)["cursor"]
    kind, boot, counter, at_us = base64.urlsafe_b64decode(cursor).decode().split(".")
    forged = _forged(f"{kind}.{boot}.{int(counter) + 1000}.{at_us}")
    err = error_of(shared, "jobs.changes", after=forged)
    assert err["code"] == -32602 and err["data"]["field"] == "after", err


def test_answers_are_bounded_and_every_job_comes_once_in_order(
        make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(f"{FAST_CONFIG}max_queued_per_user = 2000\n")
    result_of(daemon, "admin.pause")
    cursor = changes(daemon)["cursor"]
    ids = submit_queued(daemon, 1500)

    def drain(**params: Any) -> tuple[list[str], list[int]]:
        seen, sizes = [], []
        answer = changes(daemon, timeout_s=0, fields=["id"], **params)
        while answer["jobs"]:
            sizes.append(len(answer["jobs"]))
            seen += [j["id"] for j in answer["jobs"]]
            answer = changes(daemon, after=answer["cursor"], timeout_s=0, fields=["id"])
        return seen, sizes

    # from the change log
    seen, sizes = drain(after=cursor)
    assert sizes == [1000, 500] and seen == ids
    # from the database: no cursor, the active jobs, paged on by (last change, seq)
    seen, sizes = drain()
    assert sizes == [1000, 500] and seen == ids


def test_answers_stay_under_max_response_bytes(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(f"[server]\nmax_response_bytes = 200000\n{FAST_CONFIG}")
    result_of(d, "admin.pause")
    cursor = changes(d)["cursor"]
    ids = submit_queued(d, 60, per_batch=10, metadata={"pad": "x" * 10_000})
    for start in (cursor, None):
        seen, answers, after = [], 0, start
        while True:
            response = d.raw("jobs.changes", timeout_s=0, **({"after": after} if after else {}))
            answer = response["result"]
            if not answer["jobs"]:
                break
            assert len(json.dumps(response).encode()) <= 200_000
            answers += 1
            seen += [j["id"] for j in answer["jobs"]]
            after = answer["cursor"]
        assert seen == ids and answers >= 4, (answers, len(seen))


# -- admin.purge ---------------------------------------------------------------------------

def test_purge_cancels_a_running_job_then_deletes_the_users_jobs_logs_and_manifests(
        daemon: Daemon) -> None:
    echo = result_of(daemon, "jobs.submit", type="command", options={"argv": ["echo", "hi"]},
                     as_user=ALICE)
    wait_terminal(daemon, echo["id"])
    log = daemon.state / "logs" / f"{echo['id']}.log"
    assert log.exists()
    running = result_of(daemon, "jobs.submit", type="noop", options={"seconds": 60},
                        as_user=ALICE)
    wait_for(lambda: result_of(daemon, "jobs.get", job_id=running["id"])["status"] == "running")
    kept = result_of(daemon, "jobs.submit", type="noop", as_user=BOB)
    wait_terminal(daemon, kept["id"])
    manifests = daemon.state / "manifests" / "alice%40example.com"
    manifests.mkdir(parents=True)
    (manifests / "org%2Frepo.json").write_text("{}")

    began = time.monotonic()
    assert result_of(daemon, "admin.purge", user_id=ALICE) == {"deleted": 2}
    assert time.monotonic() - began < 1 + 2  # within cancel_grace + 2 s
    for job in (echo, running):
        assert error_of(daemon, "jobs.get", job_id=job["id"])["code"] == -32004
    assert not log.exists() and not manifests.exists()
    assert result_of(daemon, "jobs.get", job_id=kept["id"])["status"] == "completed"
    assert result_of(daemon, "jobs.list", user_id=ALICE)["jobs"] == []
    line = [e for e in daemon.log_events() if e.get("event") == "jobs_purged"]
    assert line and line[-1]["user"] == ALICE and line[-1]["deleted"] == 2
    assert line[-1]["actor"] == "admin:root"
    assert result_of(daemon, "admin.purge", user_id="nobody-ever") == {"deleted": 0}


@pytest.mark.parametrize("user_id", ["", " alice", "a\x00b", "x" * 256, 7, None])
def test_purge_refuses_a_bad_user_id_naming_it(shared: Daemon, user_id: Any) -> None:
    err = error_of(shared, "admin.purge", user_id=user_id)
    assert err["code"] == -32602 and err["data"]["field"] == "user_id", err


def test_purge_is_not_for_an_admin_acting_for_a_user(shared: Daemon) -> None:
    for user in (BOB, ALICE):  # not another user's jobs, nor that user's own
        err = error_of(shared, "admin.purge", user_id=user, as_user=ALICE)
        assert err["code"] == -32003 and "admin" in err["message"], err


# -- a real service account and a plain user -------------------------------------------------

SERVICE = f"jdch_svc{uuid.uuid4().hex[:6]}"
PLAIN = f"jdch_usr{uuid.uuid4().hex[:6]}"


@pytest.mark.root
def test_services_and_plain_users_see_their_scope_and_may_not_purge(
        make_daemon: Callable[..., Daemon], local_accounts: Any) -> None:
    local_accounts.user(SERVICE)
    local_accounts.user(PLAIN)
    d = make_daemon(f'[server]\nsocket_mode = "0666"\n{FAST_CONFIG}\n[auth]\n'
                    f'admins = ["root"]\nservices = ["{SERVICE}"]\n', start=False)
    d.socket.parent.chmod(0o755)  # the other accounts connect
    d.start()
    result_of(d, "admin.pause")
    cursor = changes(d)["cursor"]
    jobs = {who: result_of(d, "jobs.submit", type="noop", as_user=who)["id"]
            for who in (ALICE, BOB, PLAIN)}

    def call(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return ("jobs.changes", dict(params, after=cursor, timeout_s=0))

    alice, everyone, purge, purge_admin, other = calls_as(local_accounts, SERVICE, d, [
        call({"as_user": ALICE}), call({"as_user": ALICE, "as_admin": True}),
        ("admin.purge", {"user_id": BOB, "as_user": ALICE}),
        ("admin.purge", {"user_id": BOB, "as_user": ALICE, "as_admin": True}),
        call({"as_user": ALICE, "user_id": BOB})])
    assert [j["id"] for j in alice["result"]["jobs"]] == [jobs[ALICE]]
    assert {j["id"] for j in everyone["result"]["jobs"]} == set(jobs.values())
    assert purge["error"]["code"] == -32003, purge
    assert purge_admin["result"] == {"deleted": 1}
    assert other["error"]["code"] == -32003, other

    own, refused = calls_as(local_accounts, PLAIN, d, [
        call({}), ("admin.purge", {"user_id": ALICE})])
    assert [j["id"] for j in own["result"]["jobs"]] == [jobs[PLAIN]]
    assert refused["error"]["code"] == -32003, refused
    assert result_of(d, "jobs.get", job_id=jobs[ALICE])["status"] == "queued"


def test_jobctl_purge_asks_first_and_with_yes_purges(daemon: Daemon) -> None:
    from test_jobctl import as_json, jobctl
    job = result_of(daemon, "jobs.submit", type="noop", as_user=ALICE)
    wait_terminal(daemon, job["id"])
    refused = jobctl(daemon, "purge", ALICE)  # no terminal to ask on, and no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr, refused
    assert result_of(daemon, "jobs.get", job_id=job["id"])["status"] == "completed"
    assert as_json(jobctl(daemon, "purge", ALICE, "--yes", "--json")) == {"deleted": 1}
    done = jobctl(daemon, "purge", ALICE, "--yes")
    assert done.returncode == 0 and f"purged {ALICE}: 0 jobs deleted" in done.stdout, done


def test_every_client_has_changes_follow_changes_and_purge(daemon: Daemon) -> None:
    from jobd.client import AsyncClient, AsyncClientPool, Client
    result_of(daemon, "admin.pause")
    # the answer's wait is added to the client's own timeout, as for jobs.wait
    with Client(socket=str(daemon.socket), timeout=0.5) as c:
        first = c.changes()
        assert c.changes(after=first["cursor"], timeout_s=1)["jobs"] == []
        job = c.submit("noop")
        answer = next(iter(c.follow_changes(first["cursor"])))
        assert [j["id"] for j in answer["jobs"]] == [job["id"]]

    async def main() -> None:
        async with AsyncClientPool(2, socket=str(daemon.socket), as_user=ALICE) as pool:
            start = await pool.changes()
            mine = await pool.submit("noop")
            follow = pool.follow_changes(start["cursor"], status="queued")
            assert [j["id"] for j in (await follow.__anext__())["jobs"]] == [mine["id"]]
            await follow.aclose()
        async with AsyncClient(socket=str(daemon.socket)) as admin:
            assert await admin.purge(ALICE) == {"deleted": 1}
            answer = await admin.changes(after=start["cursor"], timeout_s=0)
            assert mine["id"] not in [j["id"] for j in answer["jobs"]]

    asyncio.run(main())


def test_waiting_polls_hold_no_answer_memory_from_the_callers_other_calls(
        daemon: Daemon) -> None:
    # one uid may hold room for two big answers at once; polls that wait hold none, so
    # three of them leave its jobs.list free to answer at once
    cursor = changes(daemon)["cursor"]
    joins = [in_thread(lambda: changes(daemon, after=cursor, timeout_s=3)) for _ in range(3)]
    time.sleep(0.3)
    began = time.monotonic()
    result_of(daemon, "jobs.list", limit=1)
    assert time.monotonic() - began < 1.0
    for join in joins:
        assert join()[0]["jobs"] == []
