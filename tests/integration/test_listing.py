"""jobs.list for a UI (SPEC §4): ``type`` as one or a list, ``offset``, ``with_total``, and
cursors bound to their order and filters, against a real daemon."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from conftest import Daemon, error_of, result_of, wait_for, wait_terminal

CONFIG = """
[execution]
workers = 2
max_queued_per_user = 50
shutdown_grace = "5s"
"""


@pytest.fixture
def jd(make_daemon: Any) -> Daemon:
    return make_daemon(CONFIG)


def ids(page: dict[str, Any]) -> list[str]:
    return [j["id"] for j in page["jobs"]]


def finished(d: Daemon, user: str, kind: str) -> dict[str, Any]:
    options = {"argv": ["true"]} if kind == "command" else {}
    job = result_of(d, "jobs.submit", type=kind, options=options, as_user=user)
    return wait_terminal(d, job["id"])


def test_type_takes_one_or_a_list_and_the_total_counts_what_matches(jd: Daemon) -> None:
    who = f"u{uuid.uuid4().hex[:8]}"
    made = [finished(jd, who, kind) for kind in ("noop", "command", "noop", "command", "noop")]
    by_type = {kind: [j["id"] for j in reversed(made) if j["type"] == kind]
               for kind in ("noop", "command")}
    assert ids(result_of(jd, "jobs.list", type="noop", as_user=who)) == by_type["noop"]
    both = result_of(jd, "jobs.list", type=["noop", "command"], with_total=True, as_user=who)
    assert ids(both) == [j["id"] for j in reversed(made)]
    assert (both["total"], both["total_capped"]) == (5, False)
    page = result_of(jd, "jobs.list", type=["command"], limit=1, with_total=True, as_user=who)
    assert (len(page["jobs"]), page["total"]) == (1, 2)
    assert "total" not in result_of(jd, "jobs.list", as_user=who)
    assert result_of(jd, "jobs.list", type=[], as_user=who)["jobs"]  # []: every type
    for bad in (3, ["noop", 4], {"a": 1}):
        assert error_of(jd, "jobs.list", type=bad, as_user=who)["data"]["field"] == "type"
    assert error_of(jd, "jobs.list", with_total="yes", as_user=who)["data"]["field"] == \
        "with_total"


def test_offset_skips_into_the_order_and_pages_on_by_cursor(jd: Daemon) -> None:
    who = f"u{uuid.uuid4().hex[:8]}"
    made = [finished(jd, who, "noop") for _ in range(6)]
    newest = [j["id"] for j in reversed(made)]
    page = result_of(jd, "jobs.list", offset=2, limit=2, as_user=who)
    assert ids(page) == newest[2:4]
    rest = result_of(jd, "jobs.list", cursor=page["next_cursor"], limit=10, as_user=who)
    assert ids(rest) == newest[4:] and rest["next_cursor"] is None
    assert ids(result_of(jd, "jobs.list", offset=6, as_user=who)) == []
    # by end time too: the same jobs, newest end first
    ends = ids(result_of(jd, "jobs.list", order="completed", as_user=who))
    assert ids(result_of(jd, "jobs.list", order="completed", offset=3, as_user=who)) == ends[3:]
    cursor = page["next_cursor"]
    err = error_of(jd, "jobs.list", offset=1, cursor=cursor, as_user=who)
    assert err["code"] == -32602 and err["data"]["field"] == "offset"
    for bad in (-1, 10_001, "2", 1.5):
        assert error_of(jd, "jobs.list", offset=bad, as_user=who)["data"]["field"] == "offset"
    assert result_of(jd, "jobs.list", offset=10_000, as_user=who)["jobs"] == []


def test_queue_order_takes_offset_and_total(jd: Daemon) -> None:
    who = f"u{uuid.uuid4().hex[:8]}"
    result_of(jd, "admin.pause")
    try:
        made = [result_of(jd, "jobs.submit", type="noop", priority=p, as_user=who)
                for p in (0, 0, 5, 0)]
        queue = result_of(jd, "jobs.list", order="queue", with_total=True, as_user=who)
        assert ids(queue)[0] == made[2]["id"] and queue["total"] == 4
        skipped = result_of(jd, "jobs.list", order="queue", offset=1, limit=2, as_user=who)
        assert ids(skipped) == ids(queue)[1:3]
        more = result_of(jd, "jobs.list", order="queue", cursor=skipped["next_cursor"],
                         as_user=who)
        assert ids(more) == ids(queue)[3:]
    finally:
        result_of(jd, "admin.resume")


def test_queue_order_pages_skip_no_job_when_those_ahead_start(jd: Daemon) -> None:
    who = f"u{uuid.uuid4().hex[:8]}"
    result_of(jd, "admin.pause")
    made = [result_of(jd, "jobs.submit", type="noop", options={"seconds": 60}, as_user=who)
            for _ in range(8)]
    try:
        first = result_of(jd, "jobs.list", order="queue", limit=4, as_user=who)
        assert ids(first) == [j["id"] for j in made[:4]]
        result_of(jd, "admin.resume")  # the first two start: every place moves up by two
        wait_for(lambda: result_of(jd, "admin.stats")["jobs"]["running"] >= 2,
                 what="two jobs to start")
        rest, cursor = [], first["next_cursor"]
        while cursor is not None:
            page = result_of(jd, "jobs.list", order="queue", limit=2, cursor=cursor,
                             as_user=who)
            rest += ids(page)
            cursor = page["next_cursor"]
        assert rest == [j["id"] for j in made[4:]]
    finally:
        for job in made:
            result_of(jd, "jobs.cancel", job_id=job["id"], as_user=who)


def test_a_cursor_is_bound_to_its_filters(jd: Daemon) -> None:
    who = f"u{uuid.uuid4().hex[:8]}"
    for kind in ("noop", "command", "noop", "command"):
        finished(jd, who, kind)
    cursor = result_of(jd, "jobs.list", type="noop", limit=1, as_user=who)["next_cursor"]
    assert cursor is not None
    # the same filters page on, however ``type`` is spelled
    assert len(result_of(jd, "jobs.list", type=["noop"], cursor=cursor, as_user=who)["jobs"]) == 1
    for other in ({"type": "command"}, {}, {"status": "failed", "type": "noop"},
                  {"type": "noop", "order": "completed"}):
        err = error_of(jd, "jobs.list", cursor=cursor, as_user=who, **other)
        assert err["code"] == -32602 and err["data"]["field"] == "cursor", other
        assert "other filters" in err["message"]


def test_started_and_completed_orders_page_past_jobs_without_that_time(jd: Daemon) -> None:
    """Queued jobs have no start or end: their sort key is -1 and their cursors page on."""
    who = f"u{uuid.uuid4().hex[:8]}"
    done = finished(jd, who, "noop")
    result_of(jd, "admin.pause")
    try:
        queued = [result_of(jd, "jobs.submit", type="noop", as_user=who)["id"] for _ in range(3)]
        for order in ("started", "completed"):
            seen, cursor = [], None
            while True:
                page = result_of(jd, "jobs.list", order=order, limit=1, cursor=cursor,
                                 as_user=who)
                seen += ids(page)
                if (cursor := page["next_cursor"]) is None:
                    break
            assert seen == [done["id"], *reversed(queued)], order
    finally:
        result_of(jd, "admin.resume")


def test_a_list_filter_is_one_filter_whatever_its_order_and_repeats(jd: Daemon) -> None:
    who = f"u{uuid.uuid4().hex[:8]}"
    for kind in ("noop", "command", "noop"):
        finished(jd, who, kind)
    page = result_of(jd, "jobs.list", type=["noop", "command"], status=["completed", "failed"],
                     limit=1, as_user=who)
    again = result_of(jd, "jobs.list", type=["command", "noop", "noop"],
                      status=["failed", "completed", "failed"], limit=5,
                      cursor=page["next_cursor"], as_user=who)
    assert len(again["jobs"]) == 2
    # a type list is bounded: each name is a parameter of the query
    many = [f"t{i}" for i in range(101)]
    err = error_of(jd, "jobs.list", type=many, as_user=who)
    assert err["data"]["field"] == "type" and "at most 100" in err["message"]
    assert result_of(jd, "jobs.list", type=many[:100] * 50, as_user=who)["jobs"] == []
    err = error_of(jd, "jobs.cancel", filter={"type": many}, as_user=who)
    assert err["data"]["field"] == "filter.type"
