"""SPEC §3's table, cell by cell, with real local users reaching the daemon's socket.

As root, the module creates two users (jobd_alice, jobd_bob), a service account
(jobd_cidx) and an admin by group (jobd_carol in @jobd_admins), starts one daemon whose
socket they can reach, and runs a small client as each of them under ``setpriv``: the
daemon knows them only by the socket's peer credentials. Dispatch stays paused while
the table is checked, so every job keeps the state the checks expect.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import Daemon, LocalAccounts, clone, make_upstream, wait_for

pytestmark = pytest.mark.root

ALICE, BOB, CIDX, CAROL = "jobd_alice", "jobd_bob", "jobd_cidx", "jobd_carol"
ADMINS_GROUP = "jobd_admins"
FORBIDDEN, UNAUTHENTICATED = -32003, -32001

CONFIG = f"""
[server]
socket_mode = "0666"

[execution]
cancel_grace = "1s"
shutdown_grace = "5s"

[auth]
admins = ["root", "@{ADMINS_GROUP}"]
services = ["{CIDX}"]

[types.golden]
argv = ["true", "{{alias}}"]
options = ["alias"]
roles = ["service", "admin"]

[types.mine]
argv = ["true", "{{project_id}}"]
project = "required"
roles = ["user"]
"""

#: runs as the test user: sends each (method, params) on one connection, prints each answer
CLIENT = r"""
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
stream = sock.makefile("rwb")
for i, (method, params) in enumerate(json.loads(sys.argv[2])):
    stream.write(json.dumps({"jsonrpc": "2.0", "id": i, "method": method,
                             "params": params}).encode() + b"\n")
    stream.flush()
    print(stream.readline().decode().strip())
"""


class World:
    """The daemon, the accounts, and the jobs seeded before the clients run."""

    def __init__(self, daemon: Daemon, accounts: LocalAccounts, entries: dict[str, Any]) -> None:
        self.d = daemon
        self.accounts = accounts
        self.entries = entries
        self.jobs: dict[str, dict[str, Any]] = {}

    def root_call(self, method: str, **params: Any) -> Any:
        resp = self.d.raw(method, **params)
        assert "result" in resp, f"{method} {params}: {resp}"
        return resp["result"]

    def run(self, name: str, role: str, calls: list[tuple[str, str, dict[str, Any], Any]]
            ) -> dict[str, dict[str, Any]]:
        """Run ``calls`` (label, method, params, expected) as ``name``; answers by label.

        ``expected`` is "ok" or an error code; every mismatch is reported at once. A
        ``ping`` first checks that the daemon sees the caller as ``role``.
        """
        calls = [("ping", "ping", {}, "ok"), *calls]
        out = self.accounts.run_as(name, [self.accounts.python, "-c", CLIENT, str(self.d.socket),
                                          json.dumps([[m, p] for _, m, p, _ in calls])])
        answers = [json.loads(line) for line in out.splitlines()]
        assert len(answers) == len(calls), out
        wrong = []
        by_label = {}
        for (label, method, params, expected), resp in zip(calls, answers):
            by_label[label] = resp
            got = "ok" if "result" in resp else resp["error"]["code"]
            if got != expected:
                wrong.append(f"{name}: {label} ({method} {params}): expected {expected}, "
                             f"got {resp.get('error') or 'a result'}")
            elif "error" in resp:
                status = {FORBIDDEN: 403, UNAUTHENTICATED: 401, -32602: 422}[got]
                assert resp["error"]["data"]["http_status"] == status, resp
        assert not wrong, "\n".join(wrong)
        assert by_label["ping"]["result"]["caller"] == {
            "uid": self.entries[name].pw_uid, "user": name, "role": role}
        return by_label


@pytest.fixture(scope="module")
def world(local_accounts: LocalAccounts, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[World]:
    local_accounts.group(ADMINS_GROUP)
    entries = {name: local_accounts.user(name) for name in (ALICE, BOB, CIDX)}
    entries[CAROL] = local_accounts.user(CAROL, groups=(ADMINS_GROUP,))
    root = tmp_path_factory.mktemp("auth")
    d = Daemon(root, CONFIG)
    d.socket.parent.chmod(0o755)  # the users must reach the socket inside it
    upstream = make_upstream(root / "upstream")
    for name in (ALICE, BOB, CAROL):
        clone(upstream, d.repos / name / "proj")
    for tree in ("tree2", "tree3"):  # other work than the seeded jobs' (no fold into them)
        clone(upstream, d.repos / ALICE / tree)
    d.start()
    w = World(d, local_accounts, entries)
    w.root_call("admin.pause")
    w.jobs["alice"] = w.root_call("jobs.submit", type="index", project_id="proj", as_user=ALICE)
    w.jobs["bob"] = w.root_call("jobs.submit", type="index", project_id="proj", as_user=BOB)
    w.jobs["alice_cmd"] = w.root_call("jobs.submit", type="command", as_user=ALICE,
                                      options={"argv": ["true"]})
    w.root_call("jobs.cancel", job_id=w.jobs["alice_cmd"]["id"])
    yield w
    assert d.stop() == 0


def job_calls(job_id: str, expected: Any, **scope: Any) -> list[tuple[str, str, dict[str, Any],
                                                                       Any]]:
    """See, wait, events, logs of one job: the first row of the table."""
    return [(f"{m} {job_id[:8]}", m, dict(job_id=job_id, **scope, **extra), expected)
            for m, extra in (("jobs.get", {}), ("jobs.wait", {"timeout_s": 0}),
                             ("jobs.events", {}), ("jobs.logs", {}))]


def test_user(world: World) -> None:
    own, other, cmd = (world.jobs[k]["id"] for k in ("alice", "bob", "alice_cmd"))
    repo = str(world.d.repos / ALICE / "proj")
    calls = [
        *job_calls(own, "ok"),
        *job_calls(other, FORBIDDEN),
        ("cancel other", "jobs.cancel", {"job_id": other}, FORBIDDEN),
        ("retry other", "jobs.retry", {"job_id": other}, FORBIDDEN),
        ("list", "jobs.list", {}, "ok"),
        ("list own", "jobs.list", {"user_id": ALICE}, "ok"),
        ("list other", "jobs.list", {"user_id": BOB}, FORBIDDEN),
        ("sync", "jobs.submit", {"type": "sync", "project_id": "proj"}, "ok"),
        ("index", "jobs.submit", {"type": "index", "project_id": "proj"}, "ok"),
        ("repo_path", "jobs.submit", {"type": "sync", "project_id": "proj",
                                      "options": {"repo_path": repo}}, FORBIDDEN),
        ("noop", "jobs.submit", {"type": "noop"}, FORBIDDEN),
        ("command", "jobs.submit", {"type": "command", "options": {"argv": ["id"]}}, FORBIDDEN),
        ("priority up", "jobs.submit", {"type": "sync", "project_id": "proj", "priority": 1},
         FORBIDDEN),
        ("priority down", "jobs.submit", {"type": "sync", "project_id": "proj",
                                          "priority": -5}, "ok"),
        ("stats", "admin.stats", {}, FORBIDDEN),
        ("cleanup", "admin.cleanup", {"dry_run": True}, FORBIDDEN),
        ("pause", "admin.pause", {}, FORBIDDEN),
        ("resume", "admin.resume", {}, FORBIDDEN),
        ("as self", "jobs.list", {"as_user": ALICE}, "ok"),
        ("as other", "jobs.list", {"as_user": BOB}, FORBIDDEN),
        ("as admin", "jobs.list", {"as_admin": True}, FORBIDDEN),
        ("get own command", "jobs.get", {"job_id": cmd}, "ok"),
        ("retry own command", "jobs.retry", {"job_id": cmd}, FORBIDDEN),
        ("cancel own", "jobs.cancel", {"job_id": own}, "ok"),
        ("cancel own again", "jobs.cancel", {"job_id": own}, "ok"),
        ("retry own", "jobs.retry", {"job_id": own}, "ok"),
    ]
    got = world.run(ALICE, "user", calls)
    listed = got["list"]["result"]["jobs"]
    assert {j["user_id"] for j in listed} == {ALICE}
    assert {own, cmd} <= {j["id"] for j in listed}
    assert got["list own"]["result"] == got["list"]["result"]
    assert got["sync"]["result"]["user_id"] == ALICE
    assert got["cancel own"]["result"]["status"] == "cancelled"
    assert got["retry own"]["result"]["status"] == "queued"
    events = world.root_call("jobs.events", job_id=own)
    assert [e["actor"] for e in events[-2:]] == [ALICE, ALICE]
    assert ALICE in got["list other"]["error"]["message"]


def test_service_must_say_whom_it_acts_for(world: World) -> None:
    own = world.jobs["alice"]["id"]
    calls = [
        ("list", "jobs.list", {}, UNAUTHENTICATED),
        ("get", "jobs.get", {"job_id": own}, UNAUTHENTICATED),
        ("submit", "jobs.submit", {"type": "sync", "project_id": "proj"}, UNAUTHENTICATED),
        ("stats", "admin.stats", {}, UNAUTHENTICATED),
        ("as_admin alone", "admin.stats", {"as_admin": True}, UNAUTHENTICATED),
    ]
    got = world.run(CIDX, "service", calls)
    assert "as_user" in got["list"]["error"]["message"]


def test_service_acting_for_a_user(world: World) -> None:
    own, other, cmd = (world.jobs[k]["id"] for k in ("alice", "bob", "alice_cmd"))
    repo, repo3 = (str(world.d.repos / ALICE / tree) for tree in ("tree2", "tree3"))
    scope = {"as_user": ALICE}
    calls = [
        *job_calls(own, "ok", **scope),
        *job_calls(other, FORBIDDEN, **scope),
        ("cancel other", "jobs.cancel", {"job_id": other, **scope}, FORBIDDEN),
        ("retry other", "jobs.retry", {"job_id": other, **scope}, FORBIDDEN),
        ("list", "jobs.list", scope, "ok"),
        ("list other", "jobs.list", {"user_id": BOB, **scope}, FORBIDDEN),
        ("sync", "jobs.submit", {"type": "sync", "project_id": "proj", **scope}, "ok"),
        ("repo_path", "jobs.submit", {"type": "index", "project_id": "elsewhere",
                                      "options": {"repo_path": repo}, **scope}, "ok"),
        ("priority up", "jobs.submit", {"type": "index", "project_id": "p2", "priority": 50,
                                        "options": {"repo_path": repo3}, **scope}, "ok"),
        ("noop", "jobs.submit", {"type": "noop", **scope}, FORBIDDEN),
        ("command", "jobs.submit", {"type": "command", "options": {"argv": ["id"]}, **scope},
         FORBIDDEN),
        ("retry command", "jobs.retry", {"job_id": cmd, **scope}, FORBIDDEN),
        ("stats", "admin.stats", scope, FORBIDDEN),
        ("cleanup", "admin.cleanup", {"dry_run": True, **scope}, FORBIDDEN),
        ("pause", "admin.pause", scope, FORBIDDEN),
        ("resume", "admin.resume", scope, FORBIDDEN),
    ]
    got = world.run(CIDX, "service", calls)
    assert {j["user_id"] for j in got["list"]["result"]["jobs"]} == {ALICE}
    for label in ("sync", "repo_path", "priority up"):
        assert got[label]["result"]["user_id"] == ALICE
    for label in ("repo_path", "priority up"):
        assert got[label]["result"]["deduplicated"] is False
    assert got["repo_path"]["result"]["options"]["repo_path"] == repo
    assert got["priority up"]["result"]["priority"] == 50
    created = world.root_call("jobs.events", job_id=got["repo_path"]["result"]["id"])[0]
    assert created["actor"] == f"service:{CIDX}"


def test_service_acting_for_one_of_its_admins(world: World) -> None:
    other, cmd = world.jobs["bob"]["id"], world.jobs["alice_cmd"]["id"]
    scope = {"as_user": ALICE, "as_admin": True}
    calls = [
        *job_calls(other, "ok", **scope),
        ("list", "jobs.list", scope, "ok"),
        ("list other", "jobs.list", {"user_id": BOB, **scope}, "ok"),
        ("sync", "jobs.submit", {"type": "sync", "project_id": "proj", **scope}, "ok"),
        ("noop", "jobs.submit", {"type": "noop", **scope}, FORBIDDEN),
        ("command", "jobs.submit", {"type": "command", "options": {"argv": ["id"]}, **scope},
         FORBIDDEN),
        ("retry command", "jobs.retry", {"job_id": cmd, **scope}, FORBIDDEN),
        ("stats", "admin.stats", scope, "ok"),
        ("cleanup", "admin.cleanup", {"dry_run": True, **scope}, "ok"),
        # pause only (resume is the same right): dispatch must stay paused for the other
        # checks of the table, and pausing again changes nothing
        ("pause", "admin.pause", scope, "ok"),
    ]
    got = world.run(CIDX, "service", calls)
    assert {ALICE, BOB} <= {j["user_id"] for j in got["list"]["result"]["jobs"]}
    assert {j["user_id"] for j in got["list other"]["result"]["jobs"]} == {BOB}
    assert got["sync"]["result"]["user_id"] == ALICE
    assert "paused" in got["stats"]["result"]


def test_a_service_acting_as_role_user_has_a_plain_users_rights(world: World) -> None:
    own, other = world.jobs["alice"]["id"], world.jobs["bob"]["id"]
    repo = str(world.d.repos / ALICE / "proj")
    scope = {"as_user": ALICE, "as_role": "user"}
    calls = [
        *job_calls(own, "ok", **scope),
        *job_calls(other, FORBIDDEN, **scope),
        ("list other", "jobs.list", {"user_id": BOB, **scope}, FORBIDDEN),
        ("sync", "jobs.submit", {"type": "sync", "project_id": "proj", **scope}, "ok"),
        ("repo_path", "jobs.submit", {"type": "index", "project_id": "elsewhere",
                                      "options": {"repo_path": repo}, **scope}, FORBIDDEN),
        ("priority up", "jobs.submit", {"type": "index", "project_id": "proj",
                                        "priority": 50, **scope}, FORBIDDEN),
        ("stats", "admin.stats", scope, FORBIDDEN),
        ("with as_admin", "admin.stats", {**scope, "as_admin": True}, -32602),
    ]
    got = world.run(CIDX, "service", calls)
    assert got["sync"]["result"]["user_id"] == ALICE
    assert got["with as_admin"]["error"]["data"]["field"] == "as_role"


def test_a_service_may_not_act_as_a_local_admin(world: World) -> None:
    root_job = world.root_call("jobs.submit", type="noop")  # root's own
    calls = [
        ("as root", "jobs.get", {"job_id": root_job["id"], "as_user": "root"}, FORBIDDEN),
        ("list as root", "jobs.list", {"as_user": "root"}, FORBIDDEN),
        ("as an admin by group", "jobs.list", {"as_user": CAROL}, FORBIDDEN),
        ("as root for its own admin", "jobs.get",
         {"job_id": root_job["id"], "as_user": "root", "as_admin": True}, "ok"),
    ]
    got = world.run(CIDX, "service", calls)
    assert "as_admin" in got["as root"]["error"]["message"]
    world.root_call("jobs.cancel", job_id=root_job["id"])


def test_admin_by_group_and_admin_acting_for_a_user(world: World) -> None:
    own, other, cmd = (world.jobs[k]["id"] for k in ("alice", "bob", "alice_cmd"))
    repo = str(world.d.repos / ALICE / "proj")
    scoped = {"as_user": ALICE}
    calls = [
        # admin + as_user: that user's jobs, admin-only job types, no daemon rights
        *job_calls(own, "ok", **scoped),
        *job_calls(other, FORBIDDEN, **scoped),
        ("scoped list", "jobs.list", scoped, "ok"),
        ("scoped list other", "jobs.list", {"user_id": BOB, **scoped}, FORBIDDEN),
        ("scoped command", "jobs.submit", {"type": "command", "options": {"argv": ["id"]},
                                           **scoped}, "ok"),
        ("scoped noop", "jobs.submit", {"type": "noop", **scoped}, "ok"),
        ("scoped repo_path", "jobs.submit", {"type": "index", "project_id": "x",
                                             "options": {"repo_path": repo}, **scoped}, "ok"),
        ("scoped priority", "jobs.submit", {"type": "noop", "priority": 100, **scoped}, "ok"),
        ("scoped retry command", "jobs.retry", {"job_id": cmd, **scoped}, "ok"),
        ("scoped stats", "admin.stats", scoped, FORBIDDEN),
        ("scoped cleanup", "admin.cleanup", {"dry_run": True, **scoped}, FORBIDDEN),
        ("scoped pause", "admin.pause", scoped, FORBIDDEN),
        ("scoped resume", "admin.resume", scoped, FORBIDDEN),
        # admin: everything
        *job_calls(other, "ok"),
        ("list", "jobs.list", {}, "ok"),
        ("list other", "jobs.list", {"user_id": BOB}, "ok"),
        ("sync", "jobs.submit", {"type": "sync", "project_id": "proj"}, "ok"),
        ("repo_path", "jobs.submit", {"type": "sync", "project_id": "proj2",
                                      "options": {"repo_path": repo}}, "ok"),
        ("command", "jobs.submit", {"type": "command", "options": {"argv": ["id"]}}, "ok"),
        ("priority", "jobs.submit", {"type": "noop", "priority": 7}, "ok"),
        ("stats", "admin.stats", {}, "ok"),
        ("cleanup", "admin.cleanup", {"dry_run": True}, "ok"),
        ("pause", "admin.pause", {}, "ok"),
        ("cancel other", "jobs.cancel", {"job_id": other}, "ok"),
        ("retry other", "jobs.retry", {"job_id": other}, "ok"),
        ("resume", "admin.resume", {}, "ok"),
    ]
    got = world.run(CAROL, "admin", calls)
    assert {j["user_id"] for j in got["scoped list"]["result"]["jobs"]} == {ALICE}
    for label in ("scoped command", "scoped noop", "scoped repo_path", "scoped priority"):
        assert got[label]["result"]["user_id"] == ALICE
    assert got["scoped retry command"]["result"]["status"] == "queued"
    assert got["sync"]["result"]["user_id"] == CAROL
    assert got["command"]["result"]["user_id"] == CAROL
    assert {ALICE, BOB} <= {j["user_id"] for j in got["list"]["result"]["jobs"]}
    assert got["pause"]["result"] == {"paused": True}
    assert got["resume"]["result"] == {"paused": False}
    # the cancel and the retry (after the resume the job may start at once: jobd's event)
    history = world.root_call("jobs.events", job_id=other)
    actors = [e["actor"] for e in history if e["actor"] != "jobd"][-2:]
    assert actors == [f"admin:{CAROL}", f"admin:{CAROL}"], history
    world.root_call("admin.pause")


def test_a_second_user_is_kept_apart_the_same_way(world: World) -> None:
    own, other = world.jobs["bob"]["id"], world.jobs["alice"]["id"]
    calls = [*job_calls(own, "ok"), *job_calls(other, FORBIDDEN),
             ("cancel other", "jobs.cancel", {"job_id": other}, FORBIDDEN),
             ("list", "jobs.list", {}, "ok"),
             ("list other", "jobs.list", {"user_id": ALICE}, FORBIDDEN)]
    got = world.run(BOB, "user", calls)
    assert {j["user_id"] for j in got["list"]["result"]["jobs"]} == {BOB}


def test_a_types_roles_decide_who_may_submit_it(world: World) -> None:
    golden = {"type": "golden", "options": {"alias": "org-repo"}}
    mine = {"type": "mine", "project_id": "proj"}
    world.run(ALICE, "user", [("golden", "jobs.submit", golden, FORBIDDEN),
                              ("mine", "jobs.submit", mine, "ok")])
    got = world.run(CIDX, "service", [
        ("golden", "jobs.submit", {**golden, "as_user": ALICE}, "ok"),
        ("golden as_admin", "jobs.submit", {**golden, "as_user": "boss", "as_admin": True}, "ok"),
        ("mine", "jobs.submit", {**mine, "as_user": ALICE}, FORBIDDEN),
        ("mine as_role user", "jobs.submit", {**mine, "as_user": ALICE, "as_role": "user"}, "ok"),
        ("golden as_role user", "jobs.submit", {**golden, "as_user": ALICE, "as_role": "user"},
         FORBIDDEN)])
    assert got["golden"]["result"]["user_id"] == ALICE
    world.run(CAROL, "admin", [("golden", "jobs.submit", golden, "ok"),
                               ("mine", "jobs.submit", mine, FORBIDDEN)])


def test_a_service_acts_for_web_identities_and_drains_as_admin(world: World) -> None:
    """SPEC §3a and §4 with a real service account: CIDX's own user names and aliases
    are ids; a web user's jobs are its own; maintenance is for admins, and for a service
    only ``as_admin``."""
    web, jane = "alice@example.com", "Jane Doe"
    golden = {"type": "golden", "options": {"alias": "org/repo"}}
    got = world.run(CIDX, "service", [
        ("submit", "jobs.submit", {**golden, "as_user": web}, "ok"),
        ("list", "jobs.list", {"as_user": web}, "ok"),
        ("list jane", "jobs.list", {"as_user": jane}, "ok"),
        ("control character", "jobs.list", {"as_user": "eve\n"}, -32602),
        ("maintenance as user", "admin.maintenance", {"as_user": web}, FORBIDDEN),
        ("maintenance as_admin", "admin.maintenance", {"as_user": web, "as_admin": True}, "ok"),
        ("stats as_admin", "admin.stats", {"as_user": web, "as_admin": True}, "ok")])
    job = got["submit"]["result"]
    assert job["user_id"] == web and job["options"] == {"alias": "org/repo"}
    assert [j["id"] for j in got["list"]["result"]["jobs"]] == [job["id"]]
    assert got["list jane"]["result"]["jobs"] == []
    assert got["control character"]["error"]["data"]["field"] == "as_user"
    assert got["maintenance as_admin"]["result"]["maintenance"] is False
    assert got["stats as_admin"]["result"]["by_type"]["golden"]["queued"] >= 1
    got = world.run(CIDX, "service", [
        ("get", "jobs.get", {"job_id": job["id"], "as_user": web}, "ok"),
        ("get as jane", "jobs.get", {"job_id": job["id"], "as_user": jane}, FORBIDDEN),
        ("cancel as jane", "jobs.cancel", {"job_id": job["id"], "as_user": jane}, FORBIDDEN),
        ("cancel", "jobs.cancel", {"job_id": job["id"], "as_user": web}, "ok")])
    assert got["cancel"]["result"]["status"] == "cancelled"
    world.run(ALICE, "user", [("maintenance", "admin.maintenance", {}, FORBIDDEN),
                              ("as a web user", "jobs.list", {"as_user": web}, FORBIDDEN)])


#: runs as the test user: one connection, a ping and admin.stats; says it is ready (a file in
#: the folder given), then the same again once the folder holds ``reloaded``
HELD = r"""
import json, os, socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
stream = sock.makefile("rwb")
def call(i, method):
    stream.write(json.dumps({"jsonrpc": "2.0", "id": i, "method": method}).encode() + b"\n")
    stream.flush()
    print(stream.readline().decode().strip(), flush=True)
call(0, "ping"); call(1, "admin.stats")
open(os.path.join(sys.argv[2], "ready"), "w").close()
deadline = time.monotonic() + 20
while not os.path.exists(os.path.join(sys.argv[2], "reloaded")) and time.monotonic() < deadline:
    time.sleep(0.02)
call(2, "ping"); call(3, "admin.stats")
"""


def test_a_role_taken_away_by_a_reload_is_gone_from_open_connections(
        local_accounts: LocalAccounts, tmp_path: Path) -> None:
    """SPEC §1: a reload applies ``[auth]`` at once, the role decided per call: an admin by
    group removed from ``auth.admins`` is a plain user on the connection it kept open."""
    local_accounts.group(ADMINS_GROUP)
    local_accounts.user(CAROL, groups=(ADMINS_GROUP,))
    d = Daemon(tmp_path / "jobd", CONFIG)
    d.socket.parent.chmod(0o755)
    d.start()
    flags = Path(tempfile.mkdtemp(prefix="jobd-flags-"))  # where the user can reach it
    flags.chmod(0o777)
    out: list[str] = []
    client = threading.Thread(target=lambda: out.append(local_accounts.run_as(
        CAROL, [local_accounts.python, "-c", HELD, str(d.socket), str(flags)])))
    client.start()
    try:
        wait_for(lambda: (flags / "ready").exists(), timeout=20, what="the client's first calls")
        d.config.write_text(CONFIG.replace(f', "@{ADMINS_GROUP}"', ""))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config_reloaded" in d.log(), what="the reload")
        (flags / "reloaded").write_text("")
        client.join(30)
        answers = [json.loads(line) for line in out[0].splitlines()]
        assert [a["result"]["caller"]["role"] for a in (answers[0], answers[2])] == [
            "admin", "user"], answers
        assert "result" in answers[1] and answers[3]["error"]["code"] == FORBIDDEN, answers
        assert "caller_role_changed" in d.log()
    finally:
        client.join(30)
        shutil.rmtree(flags, ignore_errors=True)
        assert d.stop() == 0
