"""The state machine as data, and the wire shape of a job."""

from __future__ import annotations

import json

from jobd.models import TERMINAL, TRANSITIONS, Job, JobStatus, from_iso, iso, sources


def test_every_status_has_its_transitions() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    assert all(not TRANSITIONS[s] - {JobStatus.QUEUED} for s in TERMINAL)
    assert TRANSITIONS[JobStatus.COMPLETED] == frozenset()


def test_sources_is_the_inverse_of_transitions() -> None:
    for to in JobStatus:
        for frm in JobStatus:
            assert (frm in sources(to)) == (to in TRANSITIONS[frm])


def test_iso_has_microseconds_and_z_and_round_trips() -> None:
    assert iso(1_795_000_000_123_456) == "2026-11-18T11:06:40.123456Z"
    assert from_iso("2026-11-18T11:06:40.123456Z") == 1_795_000_000_123_456
    assert from_iso("2026-11-18T12:06:40.123456+01:00") == 1_795_000_000_123_456
    assert iso(None) is None


def test_job_wire_shape_is_json_and_has_every_spec_field() -> None:
    job = Job(id="0" * 8, type="sync", user_id="alice", project_id="p",
              status=JobStatus.QUEUED, created_at=1, updated_at=2, version=3, seq=9)
    out = job.to_dict()
    json.dumps(out)
    assert set(out) == {
        "id", "type", "user_id", "project_id", "status", "progress", "phase", "message",
        "priority", "options", "metadata", "result", "error", "attempts", "queue_position",
        "wait_reason", "cancel_requested", "version", "description", "timeout_s",
        "created_at", "started_at", "completed_at", "updated_at", "eta_s"}
    assert out["status"] == "queued" and "seq" not in out
