"""Entry-point plugins (SPEC §5) as a real daemon loads them."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from conftest import FAST_CONFIG, plugin_env, wait_for, wait_terminal

PLUGIN = '''
import structlog

from jobd.handlers.noop import NoopHandler

log = structlog.get_logger()


class Picky(NoopHandler):
    name = "picky"

    def validate(self, options, **context):
        log.debug("picky_checked", options=options)
        if "colour" not in options:
            raise ValueError("a colour is needed")
        if not isinstance(options["colour"], str):
            raise TypeError("colour must be a string")
        return {}
'''


def test_a_plugin_whose_validate_raises_refuses_the_submit_naming_why(
        make_daemon: Any, tmp_path: Path) -> None:
    d = make_daemon(env=plugin_env(tmp_path / "site", "jobd_picky", PLUGIN, picky="Picky"))
    for options, why in (({}, "a colour is needed"), ({"colour": 3}, "colour must be a string")):
        error = d.raw("jobs.submit", type="picky", options=options)["error"]
        assert error["code"] == -32602, error
        assert error["message"] == f"picky jobs refuse these options: {why}"
        assert error["data"]["field"] == "options"
    assert "result" in d.raw("jobs.submit", type="picky", options={"colour": "red"})


CANCELLED_LATE = '''
from jobd.handlers.noop import NoopHandler


class Late(NoopHandler):
    """Its cancel is asked after its work is done, before its end is recorded."""
    name = "late"

    def run(self, ctx):
        ctx.joblog.write(b"work done\\\\n")
        ctx.engine.store.cancel_job(ctx.job.id, actor="admin:root")
        return {"done": True}
'''


def test_a_job_whose_cancel_came_just_before_its_end_says_it_ended_cancelled(
        make_daemon: Any, tmp_path: Path) -> None:
    d = make_daemon(env=plugin_env(tmp_path / "site", "jobd_late", CANCELLED_LATE, late="Late"))
    job = d.raw("jobs.submit", type="late")["result"]
    done = wait_terminal(d, job["id"])
    assert done["status"] == "cancelled"
    page = d.raw("jobs.logs", job_id=job["id"])["result"]
    assert page["eof"] is True and "work done" in page["data"]
    assert page["data"].splitlines()[-1].endswith("] ended cancelled"), page["data"]


def test_a_reloaded_log_level_reaches_a_plugins_logger(make_daemon: Any, tmp_path: Path) -> None:
    d = make_daemon(env=plugin_env(tmp_path / "site", "jobd_picky", PLUGIN, picky="Picky"))
    checked = lambda: d.log().count('"picky_checked"')  # noqa: E731
    assert "result" in d.raw("jobs.submit", type="picky", options={"colour": "red"})
    assert checked() == 0  # at info
    d.config.write_text(FAST_CONFIG + '\n[server]\nlog_level = "debug"\n')
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config_reloaded" in d.log(), what="the reload")
    assert "result" in d.raw("jobs.submit", type="picky", options={"colour": "blue"})
    assert checked() == 1
