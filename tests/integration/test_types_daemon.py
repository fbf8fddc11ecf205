"""``[types.NAME]`` job types through a real daemon (SPEC §5): options into the argv,
refused options, roles, the result line, cancel and timeout of the program's whole
process group, and a reload that removes a type a queued job has."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import (FAST_CONFIG, Daemon, clone, error_of, group_alive, joblog,
                      make_upstream, result_of, wait_for, wait_terminal)

#: prints its arguments and working directory as the job's result
ECHO = textwrap.dedent("""\
    import json, os, sys
    print(json.dumps({"progress": 50, "message": "echoing"}), flush=True)
    # JSON's whitespace where JSON allows it (SPEC §5's result line is JSON)
    print('{ "result" : ' + json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                                        "key": os.environ.get("TYPE_KEY")}) + '}')
""")
#: starts a child in its own group's tree, says so, then sleeps
SLEEPER = textwrap.dedent("""\
    import json, os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(json.dumps({"progress": 10, "message": f"child {child.pid} pgid {os.getpgid(0)}"}),
          flush=True)
    time.sleep(120)
""")


def _types(python: str = sys.executable) -> str:
    q = json.dumps
    return FAST_CONFIG + f"""
[types.refresh_golden_repo]
argv = [{q(python)}, "-c", {q(ECHO)}, "{{alias}}", "{{branch}}", "{{user_id}}", "{{job_id}}",
        "{{repo_path}}"]
options = ["alias"]
optional_options = ["branch"]
roles = ["service", "admin"]
repo = "{{state_dir}}/repos/golden/{{alias}}"
env = {{ TYPE_KEY = "k1" }}
cwd = "{{state_dir}}"

[types.user_echo]
argv = [{q(python)}, "-c", {q(ECHO)}, "{{project_id}}", "{{repo_path}}"]
project = "required"
roles = ["user"]

[types.sleeper]
argv = [{q(python)}, "-c", {q(SLEEPER)}]
roles = ["admin"]

[types.activate]
argv = [{q(python)}, "-c", {q(SLEEPER)}, "{{repo_path}}"]
project = "required"
exclusive = true
roles = ["service", "admin"]

[types.slow]
argv = [{q(python)}, "-c", {q(SLEEPER)}]
roles = ["admin"]
timeout = "1s"
"""


@pytest.fixture
def d(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon(config=_types())


def submit(d: Daemon, type_: str, **params: Any) -> dict[str, Any]:
    return result_of(d, "jobs.submit", type=type_, **params)


def test_options_go_into_the_argv_and_the_result_line_is_the_result(d: Daemon) -> None:
    job = submit(d, "refresh_golden_repo", options={"alias": "org-repo", "branch": "main"})
    repo = str(d.state / "repos" / "golden" / "org-repo")
    assert job["options"] == {"alias": "org-repo", "branch": "main", "repo_path": repo}
    done = wait_terminal(d, job["id"])
    assert done["status"] == "completed", done
    assert done["result"] == {"argv": ["org-repo", "main", "root", job["id"], repo],
                              "cwd": str(d.state), "key": "k1"}
    assert done["progress"] == 100
    # an option is one segment of the repository path
    climbing = submit(d, "refresh_golden_repo", options={"alias": "org/../../x"})
    assert climbing["options"]["repo_path"] == str(
        d.state / "repos" / "golden" / "org%2F..%2F..%2Fx")
    # an optional option left out drops its element
    bare = wait_terminal(d, submit(d, "refresh_golden_repo", options={"alias": "x"})["id"])
    assert bare["result"]["argv"][:2] == ["x", "root"]
    assert "[jobd " in joblog(d, job["id"])


@pytest.mark.parametrize("options, project_id, field", [
    ({}, None, "options.alias"),
    ({"alias": "a", "colour": "red"}, None, "options.colour"),
    ({"alias": "--upload-pack=evil"}, None, "options.alias"),
    ({"alias": "a", "branch": "-b"}, None, "options.branch"),
    ({"alias": 5}, None, "options.alias"),
    ({"alias": "a" * 1025}, None, "options.alias"),
    ({"alias": "a"}, "proj", "project_id"),
])
def test_bad_options_are_refused_naming_the_field(d: Daemon, options: dict[str, Any],
                                                  project_id: str | None, field: str) -> None:
    params: dict[str, Any] = {"options": options}
    if project_id is not None:
        params["project_id"] = project_id
    err = error_of(d, "jobs.submit", type="refresh_golden_repo", **params)
    assert (err["code"], err["data"]["field"]) == (-32602, field), err


def test_roles_say_who_may_submit_and_retry(d: Daemon) -> None:
    # root is an admin; as_role "user" gives it exactly a plain user's rights
    as_user = {"as_user": "alice", "as_role": "user"}
    err = error_of(d, "jobs.submit", type="refresh_golden_repo", options={"alias": "a"},
                   **as_user)
    assert err["code"] == -32003 and "services and admins" in err["message"], err
    err = error_of(d, "jobs.submit", type="user_echo", project_id="p")
    assert err["code"] == -32003 and "only plain users may submit user_echo" in err["message"]
    job = submit(d, "user_echo", project_id="p", **as_user)
    done = wait_terminal(d, job["id"])
    assert done["result"]["argv"] == ["p", str(d.state / "repos" / "alice" / "p")]
    # a plain user may not retry a type only admins and services may submit
    failed = submit(d, "refresh_golden_repo", options={"alias": "a"}, as_user="alice")
    result_of(d, "jobs.cancel", job_id=failed["id"])
    wait_terminal(d, failed["id"])
    err = error_of(d, "jobs.retry", job_id=failed["id"], **as_user)
    assert err["code"] == -32003 and "retry refresh_golden_repo" in err["message"], err


def test_an_admin_or_service_names_a_project_type_s_work_tree_by_repo_path(
        d: Daemon, tmp_path: Path) -> None:
    """As for ``sync``: a trusted submitter's ``options.repo_path`` is the job's
    repository (it need not exist yet), the key of its exclusivity with syncs of it."""
    tree = d.state / "repos" / "activated" / "alice@example.com" / "org" / "repo"
    job = submit(d, "activate", project_id="org/repo", as_user="alice@example.com",
                 options={"repo_path": str(tree)})
    assert job["options"] == {"repo_path": str(tree)}
    _child_of(d, job["id"])
    clone(make_upstream(tmp_path / "upstream"), tree)  # the program made the tree
    sync = submit(d, "sync", project_id="org/repo", as_user="bob",
                  options={"repo_path": str(tree)})
    assert result_of(d, "jobs.get", job_id=sync["id"])["wait_reason"] == "project_busy"
    result_of(d, "jobs.cancel", job_id=job["id"], wait=True)
    assert wait_terminal(d, sync["id"])["status"] == "completed"
    err = error_of(d, "jobs.submit", type="user_echo", project_id="p", as_user="alice",
                   as_role="user", options={"repo_path": str(tree)})
    assert err["code"] == -32003 and err["data"]["field"] == "options.repo_path", err
    err = error_of(d, "jobs.submit", type="refresh_golden_repo", as_user="alice",
                   options={"alias": "a", "repo_path": str(tree)})
    assert err["data"]["field"] == "options.repo_path", err
    assert "types.refresh_golden_repo.repo" in err["message"]
    err = error_of(d, "jobs.submit", type="sync", as_user="bob", options={"repo_path": str(tree)})
    assert "project_id is required for sync jobs, also with options.repo_path" in err["message"]
    err = error_of(d, "jobs.submit", type="activate", project_id="p", as_user="alice",
                   options={"repo_path": "/etc"})
    assert err["data"]["field"] == "options.repo_path" and "allowed roots" in err["message"]


def _child_of(d: Daemon, job_id: str) -> tuple[int, int]:
    message = wait_for(lambda: (m := result_of(d, "jobs.get", job_id=job_id)["message"])
                       and m.startswith("child ") and m, what="the program to start its child")
    _, pid, _, pgid = message.split()
    return int(pid), int(pgid)


def test_cancel_stops_the_whole_process_group(d: Daemon) -> None:
    job = submit(d, "sleeper")
    pid, pgid = _child_of(d, job["id"])
    assert group_alive(pgid)
    result_of(d, "jobs.cancel", job_id=job["id"])
    done = wait_terminal(d, job["id"])
    assert done["status"] == "cancelled", done
    wait_for(lambda: not group_alive(pgid), what="the job's process group to be gone")
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_the_types_timeout_fails_the_job_and_kills_its_group(d: Daemon) -> None:
    job = submit(d, "slow")
    _, pgid = _child_of(d, job["id"])
    done = wait_terminal(d, job["id"])
    assert done["status"] == "failed" and "timed out" in done["error"], done
    wait_for(lambda: not group_alive(pgid), what="the job's process group to be gone")


def test_a_queued_job_whose_type_a_reload_removed_fails_at_dispatch(d: Daemon) -> None:
    result_of(d, "admin.pause")
    job = submit(d, "refresh_golden_repo", options={"alias": "a"})
    d.config.write_text(FAST_CONFIG)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config_reloaded" in d.log(), what="the reload")
    err = error_of(d, "jobs.submit", type="refresh_golden_repo", options={"alias": "a"})
    assert err["data"]["field"] == "type"
    result_of(d, "admin.resume")
    done = wait_terminal(d, job["id"])
    assert done["status"] == "failed"
    assert "type refresh_golden_repo is no longer defined" in done["error"], done


def test_a_reload_refuses_a_bad_type_and_keeps_the_old_ones(d: Daemon) -> None:
    d.config.write_text(FAST_CONFIG + '[types.bad]\nargv = ["prog", "--x={alias}"]\n'
                        'options = ["alias"]\n')
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config_reload_failed" in d.log(), what="the reload to be refused")
    error = result_of(d, "admin.stats")["config"]["error"]
    assert "types.bad.argv" in error and "whole element" in error
    done = wait_terminal(d, submit(d, "refresh_golden_repo", options={"alias": "a"})["id"])
    assert done["status"] == "completed"


def test_a_bad_type_stops_jobd_at_start_with_one_line(make_daemon: Callable[..., Daemon]
                                                      ) -> None:
    d = make_daemon(config='[types.sync]\nargv = ["x"]\n', start=False)
    with pytest.raises(RuntimeError, match="exited with 1"):
        d.start()
    lines = [ln for ln in d.log().splitlines() if "types.sync" in ln]
    assert lines == [f"jobd: {d.config}: types.sync: sync is a built-in job type; give this "
                     "one another name"], d.log()
