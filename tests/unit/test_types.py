"""Job types from ``[types.NAME]`` (SPEC §5): options checked at submit, the argv each
job runs (real programs, through a real job log), roles by the scope of a call, the
registry a reload replaces, and a program's result line."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from handler_context import Context, make_job

from jobd import errors
from jobd.auth import Caller, scope
from jobd.config import Config, ConfigError, load
from jobd.handlers import Handler, JobFailed, load_handlers
from jobd.handlers.program import ProgramHandler
from jobd.models import Role

#: prints its argv and cwd as a result line, and progress on the progress pipe
_ECHO = textwrap.dedent("""\
    import json, os, sys
    with os.fdopen(int(os.environ["JOBD_PROGRESS_FD"]), "w") as progress:
        progress.write(json.dumps({"progress": 50, "message": "half way"}) + "\\n")
    print(json.dumps({"result": {"argv": sys.argv[1:], "cwd": os.getcwd(),
                                 "key": os.environ.get("TYPE_KEY")}}))
""")


def _config(tmp_path: Path, types: str) -> Config:
    path = tmp_path / "jobd.toml"
    path.write_text(types.replace("PYTHON", json.dumps(sys.executable))
                    .replace("ECHO", json.dumps(_ECHO)), encoding="utf-8")
    (tmp_path / "state").mkdir(exist_ok=True)
    return load(path, db=str(tmp_path / "state" / "jobd.db"), env={})


_TYPES = """
[types.refresh]
argv = [PYTHON, "-c", ECHO, "{alias}", "{branch}", "{user_id}", "{job_id}", "{repo_path}",
        "{query}"]
options = ["alias"]
optional_options = ["branch", "query"]
allow_dash = ["query"]
roles = ["service", "admin"]
repo = "{state_dir}/repos/golden/{alias}"
exclusive = true
env = { TYPE_KEY = "k1" }
cwd = "{state_dir}"

[types.activate]
argv = [PYTHON, "-c", ECHO, "{project_id}", "{repo_path}"]
project = "required"
roles = ["user"]
"""


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return _config(tmp_path, _TYPES)


def _validate(handler: Handler, config: Config, options: dict[str, Any], *,
              user_id: str = "alice", project_id: str | None = None) -> dict[str, Any]:
    return handler.validate(options, user_id=user_id, project_id=project_id, trusted=True,
                            config=config)


def test_options_are_checked_at_submit(config: Config, tmp_path: Path) -> None:
    refresh = ProgramHandler("refresh", config.types["refresh"])
    golden = config.state_dir / "repos" / "golden"
    golden.mkdir(parents=True)
    (golden / "escape").symlink_to(tmp_path)  # its real path lies outside the roots
    for options, project_id, field, words in [
        ({}, None, "options.alias", "options.alias is required"),
        ({"alias": "a", "colour": "x"}, None, "options.colour", "unknown option"),
        ({"alias": 3}, None, "options.alias", "must be text"),
        ({"alias": "x" * 1025}, None, "options.alias", "1 KiB"),
        ({"alias": "-rf"}, None, "options.alias", "must not start with '-'"),
        ({"alias": "a", "branch": "--force"}, None, "options.branch", "must not start"),
        ({"alias": "a\0b"}, None, "options.alias", "NUL"),
        ({"alias": "escape"}, None, "options.alias", "outside the allowed roots"),
        ({"alias": ""}, None, "options.alias", "must not be empty"),
        ({"alias": "a"}, "proj", "project_id", "take no project_id"),
    ]:
        with pytest.raises(errors.InvalidParams) as refused:
            _validate(refresh, config, options, project_id=project_id)
        assert refused.value.field == field, options
        assert words in refused.value.message, refused.value.message
    # an option the type allows a dash in; the repository need not exist yet
    out = _validate(refresh, config, {"alias": "a", "query": "-x"})
    assert out == {"alias": "a", "query": "-x", "repo_path": str(golden / "a")}
    # an option in the repo template is one path segment: it cannot climb out
    assert _validate(refresh, config, {"alias": "../../etc"})["repo_path"] == str(
        golden / "%2E.%2F..%2Fetc")

    activate = ProgramHandler("activate", config.types["activate"])
    with pytest.raises(errors.InvalidParams, match="project_id is required") as refused:
        _validate(activate, config, {})
    assert refused.value.field == "project_id"
    # an id put into the argv may not start with '-' either
    with pytest.raises(errors.InvalidParams) as refused:
        _validate(activate, config, {}, project_id="-p")
    assert refused.value.field == "project_id"
    assert _validate(activate, config, {}, user_id="bob", project_id="p") == {
        "repo_path": str(config.state_dir / "repos" / "bob" / "p")}


def test_a_job_runs_its_rendered_argv_with_env_cwd_progress_and_result(config: Config) -> None:
    refresh = ProgramHandler("refresh", config.types["refresh"])
    options = _validate(refresh, config, {"alias": "org"})
    job = make_job("refresh", options, user_id="alice", project_id=None)
    ctx = Context(job, config)
    result = refresh.run(ctx)
    repo = str(config.state_dir / "repos" / "golden" / "org")
    # {branch}, an optional option left out, is dropped: not an empty argument
    assert result == {"argv": ["org", "alice", job.id, repo], "cwd": str(config.state_dir),
                      "key": "k1"}
    assert any(r.percent == 50 and r.message == "half way" for r in ctx.reports)

    with_branch = make_job("refresh", dict(options, branch="main"), project_id=None)
    assert refresh.run(Context(with_branch, config))["argv"][:2] == ["org", "main"]


def test_a_job_is_rendered_from_the_type_as_defined_when_it_starts(config: Config,
                                                                     tmp_path: Path) -> None:
    job = make_job("refresh", {"alias": "org"}, project_id=None)
    # a reload made branch required: the job, submitted without it, fails to start
    changed = _config(tmp_path, _TYPES.replace('options = ["alias"]',
                                               'options = ["alias", "branch"]').replace(
        'optional_options = ["branch", "query"]', 'optional_options = ["query"]'))
    with pytest.raises(JobFailed, match="now requires options.branch"):
        ProgramHandler("refresh", changed.types["refresh"]).run(Context(job, changed))
    # a reload that no longer allows a dash the job's option has
    dashed = make_job("refresh", {"alias": "org", "query": "-q"}, project_id=None)
    strict = _config(tmp_path, _TYPES.replace('allow_dash = ["query"]', ""))
    with pytest.raises(JobFailed, match="must not start with '-'"):
        ProgramHandler("refresh", strict.types["refresh"]).run(Context(dashed, strict))


def test_a_failing_or_missing_program_fails_the_job(tmp_path: Path) -> None:
    config = _config(tmp_path, """
[types.fails]
argv = [PYTHON, "-c", "import sys; print('broken'); sys.exit(3)"]
[types.missing]
argv = ["no-such-program-jobd-types"]
""")
    for name, words in (("fails", "exited with 3: broken"),
                        ("missing", "no-such-program-jobd-types")):
        handler = ProgramHandler(name, config.types[name])
        with pytest.raises(JobFailed, match=words):
            handler.run(Context(make_job(name, {}, project_id=None), config))


def _scope(role: Role, **claims: Any) -> Any:
    caller = Caller(uid=1000, pid=1, user={"user": "alice", "service": "cidx",
                                           "admin": "root"}[role.value],
                    role=role, groups=frozenset())
    return scope(caller, claims.get("as_user"), claims.get("as_admin", False),
                 claims.get("as_role"))


def test_roles_decide_who_may_submit(config: Config) -> None:
    handlers = load_handlers(config)
    user = _scope(Role.USER)
    service = _scope(Role.SERVICE, as_user="alice")
    service_admin = _scope(Role.SERVICE, as_user="boss", as_admin=True)
    service_as_user = _scope(Role.SERVICE, as_user="alice", as_role="user")
    admin = _scope(Role.ADMIN)
    admin_for_user = _scope(Role.ADMIN, as_user="alice")
    admin_as_user = _scope(Role.ADMIN, as_user="alice", as_role="user")
    may = {name: [handlers[name].may_submit(s) for s in (
        user, service, service_admin, service_as_user, admin, admin_for_user, admin_as_user)]
        for name in ("refresh", "activate", "sync", "index", "command", "noop")}
    assert may == {
        "refresh": [False, True, True, False, True, True, False],
        "activate": [True, False, False, True, False, False, True],
        "sync": [True] * 7, "index": [True] * 7,
        "command": [False, False, False, False, True, True, False],
        "noop": [False, False, False, False, True, True, False],
    }
    assert handlers["refresh"].refusal("submit") == (
        "only services and admins may submit refresh jobs (the type's roles)")
    assert handlers["command"].refusal("retry") == "only admins may retry command jobs"


def test_the_registry_takes_a_reload_and_refuses_a_plugins_name(config: Config,
                                                                tmp_path: Path) -> None:
    handlers = load_handlers(config)
    assert {"sync", "index", "command", "noop", "refresh", "activate"} <= set(handlers)
    assert handlers["refresh"].exclusive and handlers["activate"].default_timeout(config) == (
        config.execution.default_timeout)
    assert handlers["refresh"].default_timeout(config) == config.execution.default_timeout
    fewer = _config(tmp_path, '[types.other]\nargv = ["x"]\ntimeout = "none"\n')
    handlers.reconfigure(fewer)
    assert "refresh" not in handlers and "other" in handlers and "sync" in handlers
    assert handlers["other"].default_timeout(fewer) is None
    # a name a plugin has (here: a registry whose fixed types include one)
    handlers.fixed["plugged"] = handlers["sync"]
    clash = _config(tmp_path, '[types.plugged]\nargv = ["x"]\n')
    with pytest.raises(ConfigError, match=r"types\.plugged: a plugin job type has that name"):
        handlers.reconfigure(clash)
    assert "other" in handlers  # the refused reload changed nothing


def test_a_command_hands_back_its_last_result_line(config: Config) -> None:
    from jobd.handlers.command import CommandHandler
    script = ("import json\n"
              "print(json.dumps({'result': {'first': 1}}))\n"
              "print('not json {')\n"
              "print(json.dumps({'result': {'alias': 'org', 'n': 2}}))\n"
              "print(json.dumps({'progress': 100}))\n")
    ctx = Context(make_job("command", {"argv": [sys.executable, "-c", script]},
                           project_id=None), config)
    assert CommandHandler().run(ctx) == {"alias": "org", "n": 2}
    # on stderr a result line is only output
    quiet = Context(make_job("command", {"argv": [
        sys.executable, "-c", "import sys; sys.stderr.write('{\"result\": {\"x\": 1}}\\n')"]},
        project_id=None), config)
    assert CommandHandler().run(quiet) == {"returncode": 0}


def test_a_result_line_past_64_kib_is_ignored_and_said_so(config: Config) -> None:
    from jobd.handlers.command import CommandHandler
    script = ("import json\n"
              "print(json.dumps({'result': {'small': True}}))\n"
              "print(json.dumps({'result': {'big': 'x' * 70000}}))\n")
    ctx = Context(make_job("command", {"argv": [sys.executable, "-c", script]},
                           project_id=None), config)
    assert CommandHandler().run(ctx) == {"small": True}
    assert "a result line of more than 65536 bytes was ignored" in ctx.log_text()
